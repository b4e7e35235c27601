//! The PostgreSQL event store.
//!
//! A command's effects are written in one [`UnitOfWork`]: its events (with
//! the expected stream version checked), one outbox row for the relay, one
//! row in `commits` (kept, so the store can refill the bus), the
//! command's first answer under its request key, and whatever the service
//! writes beside them (a person's key, a lookup table). Either all of it
//! commits or none of it does.

use std::sync::Arc;
use std::time::Instant;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use sqlx::postgres::PgRow;
use sqlx::types::Json;
use sqlx::{PgConnection, PgPool, Postgres, Row, Transaction};
use tokio::sync::Notify;
use uuid::Uuid;

use crate::error::AppError;
use crate::ids::{CommitId, EventId};

/// Who issued a command: taken from the caller's verified token.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Actor {
    /// Agency code, for example `kg-mvd`.
    pub agency: String,
    /// Role within the mechanism, for example `police`.
    pub role: String,
    /// Pseudonymous officer ID (never a name).
    pub officer: String,
}

impl Actor {
    /// The service acting by itself (a timer, a reaction): agency and role
    /// `system`, and as officer what acted (`shelter.placement`).
    #[must_use]
    pub fn system(task: &str) -> Self {
        Self {
            agency: "system".into(),
            role: "system".into(),
            officer: task.to_owned(),
        }
    }
}

/// Metadata stored with every event and carried in every published message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EventMetadata {
    /// Groups everything that follows from one user action.
    pub correlation_id: Uuid,
    /// The command or event that caused this one.
    pub causation_id: Uuid,
    /// Who acted.
    pub actor: Actor,
    /// W3C `traceparent` of the command's span.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub traceparent: Option<String>,
    /// W3C `tracestate`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tracestate: Option<String>,
}

impl EventMetadata {
    /// Metadata of what the service appends by itself ([`Actor::system`]):
    /// the correlation and causation continue the cause's, when there is one;
    /// the trace is the current span's.
    #[must_use]
    pub fn system(task: &str, cause: Option<&EventMetadata>) -> Self {
        let (traceparent, tracestate) = crate::telemetry::current_trace_context();
        Self {
            correlation_id: cause.map_or_else(Uuid::now_v7, |m| m.correlation_id),
            causation_id: cause.map_or_else(Uuid::now_v7, |m| m.causation_id),
            actor: Actor::system(task),
            traceparent,
            tracestate,
        }
    }
}

/// An event about to be appended.
#[derive(Debug, Clone)]
pub struct NewEvent {
    /// Name of the event message, for example `PresumedVictimReported`.
    pub event_type: String,
    /// Version of the payload's schema.
    pub schema_version: u32,
    /// The encoded protobuf payload.
    pub payload: Vec<u8>,
}

/// An event as stored.
#[derive(Debug, Clone)]
pub struct RecordedEvent {
    /// Position in this service's store.
    pub global_position: i64,
    /// The event's ID.
    pub event_id: EventId,
    /// The stream (aggregate instance) it belongs to.
    pub stream_id: String,
    /// Version of the stream after this event (1 for the first).
    pub version: u64,
    /// Name of the event message.
    pub event_type: String,
    /// Version of the payload's schema.
    pub schema_version: u32,
    /// The encoded protobuf payload.
    pub payload: Vec<u8>,
    /// Correlation, causation, actor, trace context.
    pub metadata: EventMetadata,
    /// When it was committed.
    pub recorded_at: DateTime<Utc>,
}

impl RecordedEvent {
    pub(crate) fn from_row(row: &PgRow) -> Result<Self, sqlx::Error> {
        let Json(metadata): Json<EventMetadata> = row.try_get("metadata")?;
        Ok(Self {
            global_position: row.try_get("global_position")?,
            event_id: EventId::from_uuid(row.try_get("event_id")?),
            stream_id: row.try_get("stream_id")?,
            version: u64::try_from(row.try_get::<i64, _>("version")?).unwrap_or_default(),
            event_type: row.try_get("event_type")?,
            schema_version: u32::try_from(row.try_get::<i32, _>("schema_version")?).unwrap_or_default(),
            payload: row.try_get("payload")?,
            metadata,
            recorded_at: row.try_get("recorded_at")?,
        })
    }
}

/// Errors of the event store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// Another writer appended to the stream first.
    #[error("version conflict on {stream_id}: expected {expected}, found {actual}")]
    Conflict {
        /// The stream.
        stream_id: String,
        /// The version the writer expected.
        expected: u64,
        /// The version the stream has.
        actual: u64,
    },
    /// A concurrent command with the same request key committed first.
    #[error("request key already recorded")]
    DuplicateRequest,
    /// The database failed.
    #[error(transparent)]
    Database(#[from] sqlx::Error),
}

impl From<StoreError> for AppError {
    fn from(err: StoreError) -> Self {
        match err {
            StoreError::Conflict {
                stream_id,
                expected,
                actual,
            } => AppError::Conflict {
                stream_id,
                expected,
                actual,
            },
            // A twin of the request is being recorded: retrying with the same
            // request ID returns the answer it recorded.
            StoreError::DuplicateRequest => AppError::Unavailable("request key recorded concurrently".into()),
            StoreError::Database(e) => e.into(),
        }
    }
}

/// The first answer recorded for a request key.
#[derive(Debug, Clone)]
pub struct StoredCommand {
    /// Hash of the command as first received.
    pub fingerprint: Vec<u8>,
    /// The encoded answer.
    pub response: Vec<u8>,
}

/// What an append wrote.
#[derive(Debug, Clone)]
pub struct Appended {
    /// Version of the stream after the append.
    pub version: u64,
    /// IDs of the events, in order.
    pub event_ids: Vec<EventId>,
    /// The commit, published as one message.
    pub commit_id: CommitId,
}

impl Appended {
    /// What an append of `events` events at `expected_version` will write
    /// when it succeeds: IDs chosen before it runs, so that a command's answer
    /// can be recorded in the same statement.
    #[must_use]
    pub fn plan(expected_version: u64, events: usize) -> Self {
        Self {
            version: expected_version + events as u64,
            event_ids: (0..events).map(|_| EventId::new()).collect(),
            commit_id: CommitId::new(),
        }
    }
}

/// What to append: events to one stream at an expected version, published under one subject.
#[derive(Debug, Clone, Copy)]
pub struct Append<'a> {
    /// The stream.
    pub stream_id: &'a str,
    /// Its version as the caller read it (0: a new stream).
    pub expected_version: u64,
    /// The events.
    pub events: &'a [NewEvent],
    /// Their metadata.
    pub metadata: &'a EventMetadata,
    /// The subject their commit is published under.
    pub subject: &'a str,
}

/// A command's first answer, recorded with its events.
#[derive(Debug, Clone, Copy)]
pub struct CommandRecord<'a> {
    /// Agency-scoped request key.
    pub request_key: &'a str,
    /// Hash of the command as received.
    pub fingerprint: &'a [u8],
    /// The encoded answer.
    pub response: &'a [u8],
}

/// An audit-trail entry recorded with a command's events (the actor is the events').
#[derive(Debug, Clone, Copy)]
pub struct AuditEntry<'a> {
    /// What was done (the RPC).
    pub action: &'a str,
    /// The aggregate concerned.
    pub subject_id: &'a str,
    /// Why.
    pub purpose: &'a str,
    /// The person whose records the command changed, when known.
    pub person_id: Option<Uuid>,
}

/// Every event of a stream, in version order, through `executor`.
async fn read_stream<'e>(
    executor: impl sqlx::PgExecutor<'e>,
    stream_id: &str,
) -> Result<Vec<RecordedEvent>, StoreError> {
    let rows = sqlx::query(
        "SELECT global_position, event_id, stream_id, version, event_type, schema_version, payload, metadata, recorded_at
         FROM events WHERE stream_id = $1 ORDER BY version",
    )
    .bind(stream_id)
    .fetch_all(executor)
    .await?;
    rows.iter()
        .map(RecordedEvent::from_row)
        .collect::<Result<_, _>>()
        .map_err(Into::into)
}

/// The one statement of every append: events, outbox row and, when given, the
/// command's answer and an audit entry, all or nothing.
async fn append_statement<'e>(
    executor: impl sqlx::PgExecutor<'e>,
    append: &Append<'_>,
    plan: &Appended,
    command: Option<&CommandRecord<'_>>,
    audit: Option<&AuditEntry<'_>>,
) -> Result<(), StoreError> {
    let started = Instant::now();
    let expected = i64::try_from(append.expected_version).unwrap_or(i64::MAX);
    let actor = &append.metadata.actor;
    let result = sqlx::query(
        "WITH current AS (
             SELECT coalesce(max(version), 0) AS v FROM events WHERE stream_id = $1
         ), ins AS (
             INSERT INTO events (event_id, stream_id, version, event_type, schema_version, payload, metadata)
             SELECT e.event_id, $1, $2 + e.ord, e.event_type, e.schema_version, e.payload, $6
             FROM UNNEST($3::uuid[], $4::text[], $5::int4[], $7::bytea[])
                  WITH ORDINALITY AS e(event_id, event_type, schema_version, payload, ord), current
             WHERE current.v = $2
             RETURNING version
         ), ob AS (
             INSERT INTO outbox (commit_id, stream_id, first_version, last_version, subject)
             SELECT $8, $1, min(version), max(version), $9 FROM ins HAVING count(*) > 0
         ), cm AS (
             INSERT INTO commits (commit_id, stream_id, first_version, last_version, subject)
             SELECT $8, $1, min(version), max(version), $9 FROM ins HAVING count(*) > 0
         ), cmd AS (
             INSERT INTO commands (request_key, fingerprint, response)
             SELECT $10, $11, $12 WHERE $10::text IS NOT NULL AND EXISTS (SELECT 1 FROM ins)
         ), aud AS (
             INSERT INTO audit_log (agency, role, officer, action, subject_id, purpose, person_id)
             SELECT $13, $14, $15, $16, $17, $18, $19 WHERE $16::text IS NOT NULL AND EXISTS (SELECT 1 FROM ins)
         )
         SELECT (SELECT v FROM current) AS current_version, (SELECT count(*) FROM ins) AS inserted",
    )
    .bind(append.stream_id)
    .bind(expected)
    .bind(plan.event_ids.iter().map(EventId::as_uuid).collect::<Vec<_>>())
    .bind(append.events.iter().map(|e| e.event_type.clone()).collect::<Vec<_>>())
    .bind(
        append
            .events
            .iter()
            .map(|e| i32::try_from(e.schema_version).unwrap_or(i32::MAX))
            .collect::<Vec<_>>(),
    )
    .bind(Json(append.metadata))
    .bind(append.events.iter().map(|e| e.payload.clone()).collect::<Vec<_>>())
    .bind(plan.commit_id.as_uuid())
    .bind(append.subject)
    .bind(command.map(|c| c.request_key))
    .bind(command.map(|c| c.fingerprint))
    .bind(command.map(|c| c.response))
    .bind(&actor.agency)
    .bind(&actor.role)
    .bind(&actor.officer)
    .bind(audit.map(|a| a.action))
    .bind(audit.map(|a| a.subject_id))
    .bind(audit.map(|a| a.purpose))
    .bind(audit.and_then(|a| a.person_id))
    .fetch_one(executor)
    .await;
    let conflict = |actual: u64| StoreError::Conflict {
        stream_id: append.stream_id.to_owned(),
        expected: append.expected_version,
        actual,
    };
    let outcome = match result {
        Ok(row) => {
            let current: i64 = row.get("current_version");
            let inserted: i64 = row.get("inserted");
            if current != expected || usize::try_from(inserted).ok() != Some(append.events.len()) {
                Err(conflict(u64::try_from(current).unwrap_or_default()))
            } else {
                Ok(())
            }
        }
        Err(sqlx::Error::Database(db)) if db.is_unique_violation() && db.constraint() == Some("commands_pkey") => {
            Err(StoreError::DuplicateRequest)
        }
        // The winner's version is at least one past ours.
        Err(sqlx::Error::Database(db)) if db.is_unique_violation() => Err(conflict(append.expected_version + 1)),
        Err(e) => Err(e.into()),
    };
    let label = if outcome.is_ok() { "ok" } else { "conflict_or_error" };
    metrics::histogram!("nrm_store_append_seconds", "outcome" => label).record(started.elapsed().as_secs_f64());
    outcome
}

/// The event store of one service.
#[derive(Clone, Debug)]
pub struct EventStore {
    pool: PgPool,
    appended: Arc<Notify>,
}

impl EventStore {
    /// A store on the service's pool.
    #[must_use]
    pub fn new(pool: PgPool) -> Self {
        Self {
            pool,
            appended: Arc::new(Notify::new()),
        }
    }

    /// The pool underneath.
    #[must_use]
    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// Signalled after every commit that appended events: the relay waits on it.
    #[must_use]
    pub fn appended_signal(&self) -> Arc<Notify> {
        Arc::clone(&self.appended)
    }

    /// Every event of a stream, in version order.
    ///
    /// # Errors
    /// [`StoreError::Database`].
    pub async fn read_stream(&self, stream_id: &str) -> Result<Vec<RecordedEvent>, StoreError> {
        read_stream(&self.pool, stream_id).await
    }

    /// The first answer to a request key, if the command ran before.
    ///
    /// # Errors
    /// [`StoreError::Database`].
    pub async fn find_command(&self, request_key: &str) -> Result<Option<StoredCommand>, StoreError> {
        let row = sqlx::query("SELECT fingerprint, response FROM commands WHERE request_key = $1")
            .bind(request_key)
            .fetch_optional(&self.pool)
            .await?;
        Ok(row.map(|r| StoredCommand {
            fingerprint: r.get("fingerprint"),
            response: r.get("response"),
        }))
    }

    /// Appends a command's events with its first answer (and an audit entry)
    /// in one statement, outside any transaction: one round trip, all or
    /// nothing. The path for commands that write nothing else. `plan` (from
    /// [`Appended::plan`]) fixes the IDs the answer was built with.
    ///
    /// # Errors
    /// [`StoreError::Conflict`] when the stream is at another version;
    /// [`StoreError::DuplicateRequest`] when a concurrent twin of the command
    /// recorded its answer first. Nothing is written then.
    pub async fn append_command(
        &self,
        append: &Append<'_>,
        plan: &Appended,
        command: &CommandRecord<'_>,
        audit: Option<&AuditEntry<'_>>,
    ) -> Result<(), StoreError> {
        append_statement(&self.pool, append, plan, Some(command), audit).await?;
        self.appended.notify_one();
        Ok(())
    }

    /// Starts a unit of work.
    ///
    /// # Errors
    /// [`StoreError::Database`].
    pub async fn begin(&self) -> Result<UnitOfWork, StoreError> {
        Ok(UnitOfWork {
            tx: self.pool.begin().await?,
            appended: Arc::clone(&self.appended),
            wrote_events: false,
            replaying: false,
        })
    }
}

/// One transaction: events, outbox row, command record and the service's own writes.
pub struct UnitOfWork {
    tx: Transaction<'static, Postgres>,
    appended: Arc<Notify>,
    wrote_events: bool,
    replaying: bool,
}

impl UnitOfWork {
    /// The transaction's connection, for the service's own writes.
    pub fn conn(&mut self) -> &mut PgConnection {
        &mut self.tx
    }

    /// Whether this unit of work replays a stream into a read model: a
    /// rebuild's one transaction, after its reset (not a shadow
    /// comparison's short ones). What a projection derives from its records
    /// as a whole it may then leave to
    /// [`crate::projection::Projection::after_replay`], once.
    #[must_use]
    pub fn replaying(&self) -> bool {
        self.replaying
    }

    /// Marks this unit of work as a replay's (see [`UnitOfWork::replaying`]).
    pub(crate) fn set_replaying(&mut self) {
        self.replaying = true;
    }

    /// Every event of a stream, read in this transaction (on its connection,
    /// so a command that holds a lock needs no second connection).
    ///
    /// # Errors
    /// [`StoreError::Database`].
    pub async fn read_stream(&mut self, stream_id: &str) -> Result<Vec<RecordedEvent>, StoreError> {
        read_stream(&mut *self.tx, stream_id).await
    }

    /// Appends `events` to `stream_id` if it stands at `expected_version`
    /// (0 for a new stream), with one outbox row publishing them under `subject`.
    ///
    /// # Errors
    /// [`StoreError::Conflict`] when the stream is at another version (also
    /// when a concurrent writer commits first); the transaction is then spent.
    pub async fn append(
        &mut self,
        stream_id: &str,
        expected_version: u64,
        events: &[NewEvent],
        metadata: &EventMetadata,
        subject: &str,
    ) -> Result<Appended, StoreError> {
        let append = Append {
            stream_id,
            expected_version,
            events,
            metadata,
            subject,
        };
        let plan = Appended::plan(expected_version, events.len());
        append_statement(&mut *self.tx, &append, &plan, None, None).await?;
        self.wrote_events = true;
        Ok(plan)
    }

    /// Records the first answer to a request key, in this transaction.
    ///
    /// # Errors
    /// [`StoreError::DuplicateRequest`] when a concurrent command with the same key committed first.
    pub async fn record_command(
        &mut self,
        request_key: &str,
        fingerprint: &[u8],
        response: &[u8],
    ) -> Result<(), StoreError> {
        let result = sqlx::query("INSERT INTO commands (request_key, fingerprint, response) VALUES ($1, $2, $3)")
            .bind(request_key)
            .bind(fingerprint)
            .bind(response)
            .execute(&mut *self.tx)
            .await;
        match result {
            Ok(_) => Ok(()),
            Err(sqlx::Error::Database(db)) if db.is_unique_violation() => Err(StoreError::DuplicateRequest),
            Err(e) => Err(e.into()),
        }
    }

    /// Commits, then wakes the relay.
    ///
    /// # Errors
    /// [`StoreError::Database`]; nothing was written then.
    pub async fn commit(self) -> Result<(), StoreError> {
        self.tx.commit().await?;
        if self.wrote_events {
            self.appended.notify_one();
        }
        Ok(())
    }
}
