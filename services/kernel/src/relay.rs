//! The outbox relay: moves committed events from PostgreSQL to JetStream,
//! and refills JetStream from the event store when it lost messages.
//!
//! Guarantees, and how:
//! - **Nothing lost.** An outbox row is deleted only after JetStream
//!   acknowledged its message; a crash before that publishes it again. The
//!   service takes commands while NATS is down: they wait in the outbox.
//! - **Nothing duplicated downstream.** Every message carries `Nats-Msg-Id`
//!   (the commit ID), which JetStream de-duplicates within its window. Rows
//!   that may have been sent before (everything pending when the relay is
//!   elected, and every row of a failed round) are first checked against the
//!   stream: the commit is taken as published only when the stream holds
//!   that very version of its subject, never because it holds a later one
//!   (DESIGN.md §7).
//! - **Nothing skipped.** Rows are read only from transactions older than
//!   every transaction still running (`pg_snapshot_xmin`), ordered by
//!   (transaction, row), so commits reach the bus in causal order across
//!   aggregates. The horizon is cluster-wide: a long transaction in any
//!   database of the cluster delays publishing (it never loses anything).
//! - **Version order per aggregate.** A row is published only when no row of
//!   the same stream with a lower version waits, whatever transaction IDs
//!   they carry (a timer or a reaction may take its transaction ID before a
//!   user command and append the later version), and one round sends at most
//!   one commit per stream; the next round starts when the round was
//!   acknowledged.
//! - **One leader.** A session advisory lock elects the relay; the lock's
//!   session is checked before every round, so a relay that lost it (its
//!   connection dropped, the server restarted) stops before another is elected
//!   and publishes nothing beside it.
//! - **The store refills the bus** ([`refill`]). On election, and after every
//!   reconnection to NATS, the relay compares the stream with the `commits`
//!   table: when the stream holds fewer messages than the store has
//!   published, every aggregate whose last version on the stream is behind the
//!   store gets its missing commits back in the outbox, and goes out again in
//!   order under the original commit IDs. Operators run the full comparison
//!   on demand (`nrmctl ops refill`), which also finds holes in the middle of
//!   an aggregate's history. A commit JetStream de-duplicates is taken as
//!   published only when the stream holds it (the ID outlives a deleted
//!   message for the duplicate window).
//! - **Prompt.** Commits in this process wake the relay at once; commits by
//!   other processes are found by polling.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::HeaderMap;
use async_nats::jetstream::message::PublishMessage;
use async_nats::jetstream::message::StreamMessage;
use async_nats::jetstream::stream::{LastRawMessageErrorKind, RawMessageErrorKind, Stream};
use futures::StreamExt as _;
use futures::future::join_all;
use prost::Message as _;
use rand::Rng as _;
use sqlx::{Connection, PgConnection, PgPool, Row};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::bus::{self, Bus, Replay, StreamIdentity};
use crate::retry::RetryPolicy;
use crate::store::RecordedEvent;
use nrm_proto::common::v1::{CommittedEvent, EventCommit};

/// Key of the advisory lock that elects the relay.
const RELAY_LOCK_KEY: i64 = 0x6b6f_7075_725f_7231; // "kopur_r1"

/// How long the lease check may take before the lease counts as lost.
const LEASE_CHECK_TIMEOUT: Duration = Duration::from_secs(2);

/// How the relay behaves.
#[derive(Debug, Clone)]
pub struct RelayConfig {
    /// Full protobuf name of the service's event message.
    pub payload_type: &'static str,
    /// Streams of another payload type, by the start of their stream ID
    /// (the repatriation service's crossing commits): a commit of such a
    /// stream is labelled with that type, so consumers never decode it as
    /// the service's events.
    pub stream_payloads: &'static [(&'static str, &'static str)],
    /// Most commits read per batch.
    pub batch_size: i64,
    /// How often to look for commits of other processes.
    pub poll_interval: Duration,
    /// Back-off between failed rounds.
    pub retry: RetryPolicy,
    /// Fault injection for the fault suite: the probability that the process
    /// aborts after JetStream acknowledged a round and before its outbox rows
    /// are deleted (`NRM_RELAY__FAULT_ABORT_AFTER_ACK`, default 0).
    pub fault_abort_after_ack: f64,
}

impl RelayConfig {
    /// The payload type of the commits of `stream_id`.
    #[must_use]
    pub fn payload_type_of(&self, stream_id: &str) -> &'static str {
        self.stream_payloads
            .iter()
            .find(|(prefix, _)| stream_id.starts_with(prefix))
            .map_or(self.payload_type, |(_, payload_type)| payload_type)
    }

    /// Defaults for a service whose events are `payload_type`.
    #[must_use]
    pub fn new(payload_type: &'static str) -> Self {
        Self {
            payload_type,
            stream_payloads: &[],
            batch_size: 256,
            poll_interval: Duration::from_millis(250),
            retry: RetryPolicy::default(),
            fault_abort_after_ack: 0.0,
        }
    }
}

/// Errors of a relay round.
#[derive(Debug, thiserror::Error)]
pub enum RelayError {
    /// PostgreSQL failed.
    #[error("outbox: {0}")]
    Database(#[from] sqlx::Error),
    /// NATS failed or refused.
    #[error("publish: {0}")]
    Publish(String),
    /// The relay's lease on the database is gone.
    #[error("relay lease lost")]
    LeaseLost,
}

/// One outbox row with its events.
#[derive(Debug)]
struct PendingCommit {
    id: i64,
    commit_id: uuid::Uuid,
    stream_id: String,
    first_version: i64,
    last_version: i64,
    subject: String,
    events: Vec<RecordedEvent>,
}

/// Publishes a service's outbox to its context's stream.
pub struct Relay {
    pool: PgPool,
    bus: Bus,
    context: &'static str,
    stream: Option<(Stream, StreamIdentity)>,
    appended: Arc<Notify>,
    config: RelayConfig,
    /// Rows with an ID up to this may have been sent before: check first.
    check_upto: i64,
}

impl Relay {
    /// A relay publishing to `context`'s stream, woken by `appended`. NATS
    /// need not be reachable yet.
    #[must_use]
    pub fn new(pool: PgPool, bus: Bus, context: &'static str, appended: Arc<Notify>, config: RelayConfig) -> Self {
        Self {
            pool,
            bus,
            context,
            stream: None,
            appended,
            config,
            check_upto: i64::MAX,
        }
    }

    /// Runs until `shutdown`: waits to be elected, then publishes.
    pub async fn run(mut self, shutdown: CancellationToken) {
        let mut failures = 0;
        while !shutdown.is_cancelled() {
            let started = Instant::now();
            match self.lead(&shutdown).await {
                Ok(()) => return,
                Err(err) => {
                    // A leadership that lasted starts the back-off afresh.
                    if started.elapsed() > Duration::from_secs(30) {
                        failures = 0;
                    }
                    failures += 1;
                    let backoff = self.config.retry.delay(failures);
                    metrics::counter!("nrm_relay_errors_total").increment(1);
                    tracing::warn!(error = %err, backoff_ms = backoff.as_millis() as u64, "relay round failed; retrying");
                    tokio::select! {
                        () = shutdown.cancelled() => return,
                        () = tokio::time::sleep(backoff) => {}
                    }
                }
            }
        }
    }

    /// Holds the relay lock and publishes until shutdown or an error.
    async fn lead(&mut self, shutdown: &CancellationToken) -> Result<(), RelayError> {
        let mut lock_conn = PgConnection::connect_with(&self.pool.connect_options()).await?;
        loop {
            let locked: bool = sqlx::query_scalar("SELECT pg_try_advisory_lock($1)")
                .bind(RELAY_LOCK_KEY)
                .fetch_one(&mut lock_conn)
                .await?;
            if locked {
                break;
            }
            tokio::select! {
                () = shutdown.cancelled() => return Ok(()),
                () = tokio::time::sleep(Duration::from_secs(2)) => {}
            }
        }
        metrics::gauge!("nrm_relay_leader").set(1.0);
        let result = self.publish_as_leader(&mut lock_conn, shutdown).await;
        metrics::gauge!("nrm_relay_leader").set(0.0);
        result
    }

    async fn publish_as_leader(
        &mut self,
        lock_conn: &mut PgConnection,
        shutdown: &CancellationToken,
    ) -> Result<(), RelayError> {
        tracing::info!(context = self.context, "relay elected for this database");
        // Anything pending now may have been sent by a previous relay.
        self.check_upto = sqlx::query_scalar("SELECT coalesce(max(id), 0) FROM outbox")
            .fetch_one(&self.pool)
            .await?;
        // The stream must exist (it may have been deleted, or NATS wiped) and
        // hold what the store has published.
        self.stream = None;
        let connections = self.bus.connections();
        let stream = self.stream().await?.clone();
        let report = refill(&self.pool, &stream, RefillMode::Quick).await?;
        if report.requeued > 0 {
            tracing::warn!(
                context = self.context,
                aggregates = report.aggregates_behind,
                commits = report.requeued,
                "the stream lacked commits of the store: published again"
            );
        }
        loop {
            if shutdown.is_cancelled() {
                return Ok(());
            }
            check_lease(lock_conn).await?;
            if self.bus.connections() != connections {
                // The server may have restarted and lost its unsynced tail.
                return Err(RelayError::Publish(
                    "NATS reconnected; checking the stream again".into(),
                ));
            }
            let published = self.publish_round().await?;
            if published == 0 {
                tokio::select! {
                    () = shutdown.cancelled() => return Ok(()),
                    () = self.appended.notified() => {}
                    () = tokio::time::sleep(self.config.poll_interval) => {}
                }
            }
        }
    }

    /// The context's stream, created when missing.
    async fn stream(&mut self) -> Result<&Stream, RelayError> {
        if self.stream.is_none() {
            let mut stream = self
                .bus
                .ensure_stream(self.context)
                .await
                .map_err(|e| RelayError::Publish(e.to_string()))?;
            let identity = StreamIdentity::of(stream.info().await.map_err(|e| RelayError::Publish(e.to_string()))?);
            self.stream = Some((stream, identity));
        }
        self.stream
            .as_ref()
            .map(|(stream, _)| stream)
            .ok_or_else(|| RelayError::Publish("no stream".into()))
    }

    /// Publishes one round; returns how many commits left the outbox.
    ///
    /// # Errors
    /// [`RelayError`]; the rows of a failed round stay and are checked before
    /// they are sent again.
    pub async fn publish_round(&mut self) -> Result<usize, RelayError> {
        let batch = self.read_batch().await?;
        if batch.is_empty() {
            return Ok(0);
        }
        let result = self.publish_batch(&batch).await;
        if result.is_err() {
            // Whatever this round sent may be on the stream: check before resending.
            self.check_upto = self.check_upto.max(batch.iter().map(|c| c.id).max().unwrap_or(0));
            // The stream may be gone (deleted, NATS wiped): find it again.
            self.stream = None;
        }
        result
    }

    async fn publish_batch(&mut self, batch: &[PendingCommit]) -> Result<usize, RelayError> {
        let started = Instant::now();
        let stream = self.stream().await?.clone();
        // A stream deleted and created again meanwhile lacks what was
        // published before: fail the round, so that the relay is elected
        // anew and refills it first.
        let now = StreamIdentity::of(
            &stream
                .get_info()
                .await
                .map_err(|e| RelayError::Publish(e.to_string()))?,
        );
        if self.stream.as_ref().is_some_and(|(_, identity)| *identity != now) {
            return Err(RelayError::Publish("the stream was created anew".into()));
        }
        let mut done: Vec<i64> = Vec::with_capacity(batch.len());
        let mut to_send: Vec<&PendingCommit> = Vec::with_capacity(batch.len());
        // Rows that may have been sent before are checked against the stream, pipelined.
        let suspects: Vec<&PendingCommit> = batch.iter().filter(|c| c.id <= self.check_upto).collect();
        let verdicts = join_all(
            suspects
                .iter()
                .map(|commit| holds_commit(&stream, &commit.subject, commit.last_version)),
        )
        .await;
        let mut published = HashSet::new();
        for (commit, verdict) in suspects.into_iter().zip(verdicts) {
            if verdict? {
                published.insert(commit.id);
            }
        }
        // The rest go out in the batch's (transaction) order.
        for commit in batch {
            if published.contains(&commit.id) {
                metrics::counter!("nrm_relay_already_published_total").increment(1);
                done.push(commit.id);
            } else {
                to_send.push(commit);
            }
        }
        let mut sends = Vec::with_capacity(to_send.len());
        for commit in &to_send {
            let (headers, body) = self.encode(commit);
            let publish = PublishMessage::build()
                .payload(body.into())
                .headers(headers)
                .message_id(commit.commit_id.to_string());
            sends.push(self.bus.jetstream().send_publish(commit.subject.clone(), publish).await);
        }
        let acks = join_all(sends.into_iter().map(|sent| async move {
            match sent {
                Ok(ack) => ack.await.map_err(|e| e.to_string()),
                Err(e) => Err(e.to_string()),
            }
        }))
        .await;
        let mut failure = None;
        for (commit, ack) in to_send.iter().zip(acks) {
            match ack {
                Ok(ack) if ack.duplicate => {
                    metrics::counter!("nrm_relay_deduplicated_total").increment(1);
                    // JetStream remembers the message ID for its window even
                    // when the message itself is gone (deleted, or lost and
                    // refilled): count it published only if the stream holds it.
                    if holds_commit(&stream, &commit.subject, commit.last_version).await? {
                        done.push(commit.id);
                    } else {
                        tracing::warn!(stream_id = %commit.stream_id, version = commit.last_version, "deduplicated by JetStream but not on the stream; published again once the duplicate window has passed");
                    }
                }
                Ok(_) => done.push(commit.id),
                Err(e) => failure = Some(e),
            }
        }
        if self.config.fault_abort_after_ack > 0.0
            && !done.is_empty()
            && rand::thread_rng().gen_bool(self.config.fault_abort_after_ack.min(1.0))
        {
            // Fault injection: the crash window between JetStream's
            // acknowledgement and the outbox delete.
            eprintln!("relay: fault injection: abort after the acknowledgement, before the outbox delete");
            std::process::abort();
        }
        sqlx::query("DELETE FROM outbox WHERE id = ANY($1)")
            .bind(&done)
            .execute(&self.pool)
            .await?;
        metrics::counter!("nrm_relay_published_total").increment(done.len() as u64);
        metrics::histogram!("nrm_relay_round_seconds").record(started.elapsed().as_secs_f64());
        if let Some(err) = failure {
            return Err(RelayError::Publish(err));
        }
        Ok(done.len())
    }

    /// Reads the next commits that are safe to publish: below the horizon,
    /// and the lowest waiting version of their stream (so at most one per
    /// stream).
    async fn read_batch(&self) -> Result<Vec<PendingCommit>, RelayError> {
        let rows = sqlx::query(
            "SELECT o.id, o.commit_id, o.stream_id, o.first_version, o.last_version, o.subject FROM outbox o
             WHERE o.tx_id < pg_snapshot_xmin(pg_current_snapshot())
               AND NOT EXISTS (
                   SELECT 1 FROM outbox p WHERE p.stream_id = o.stream_id AND p.first_version < o.first_version
               )
             ORDER BY o.tx_id, o.id LIMIT $1",
        )
        .bind(self.config.batch_size)
        .fetch_all(&self.pool)
        .await?;
        let mut streams = HashSet::new();
        let mut batch = Vec::with_capacity(rows.len());
        for row in rows {
            let stream_id: String = row.get("stream_id");
            if !streams.insert(stream_id.clone()) {
                continue;
            }
            batch.push(PendingCommit {
                id: row.get("id"),
                commit_id: row.get("commit_id"),
                stream_id,
                first_version: row.get("first_version"),
                last_version: row.get("last_version"),
                subject: row.get("subject"),
                events: Vec::new(),
            });
        }
        if batch.is_empty() {
            return Ok(batch);
        }
        let events = sqlx::query(
            "SELECT e.global_position, e.event_id, e.stream_id, e.version, e.event_type, e.schema_version,
                    e.payload, e.metadata, e.recorded_at
             FROM events e
             JOIN UNNEST($1::text[], $2::bigint[], $3::bigint[]) AS r(stream_id, first_version, last_version)
               ON e.stream_id = r.stream_id AND e.version BETWEEN r.first_version AND r.last_version
             ORDER BY e.stream_id, e.version",
        )
        .bind(batch.iter().map(|c| c.stream_id.clone()).collect::<Vec<_>>())
        .bind(batch.iter().map(|c| c.first_version).collect::<Vec<_>>())
        .bind(batch.iter().map(|c| c.last_version).collect::<Vec<_>>())
        .fetch_all(&self.pool)
        .await?;
        let index: HashMap<String, usize> = batch
            .iter()
            .enumerate()
            .map(|(i, c)| (c.stream_id.clone(), i))
            .collect();
        for row in &events {
            let event = RecordedEvent::from_row(row)?;
            if let Some(&i) = index.get(&event.stream_id) {
                batch[i].events.push(event);
            }
        }
        Ok(batch)
    }

    /// The message of one commit: headers with metadata, an `EventCommit` body.
    fn encode(&self, commit: &PendingCommit) -> (HeaderMap, Vec<u8>) {
        let mut headers = HeaderMap::new();
        headers.insert(bus::HEADER_STREAM_ID, commit.stream_id.as_str());
        headers.insert(bus::HEADER_STREAM_VERSION, commit.last_version.to_string().as_str());
        if let Some(first) = commit.events.first() {
            bus::metadata_headers(&mut headers, &first.metadata);
        }
        let body = EventCommit {
            commit_id: commit.commit_id.to_string(),
            stream_id: commit.stream_id.clone(),
            payload_type: self.config.payload_type_of(&commit.stream_id).to_owned(),
            events: commit
                .events
                .iter()
                .map(|e| CommittedEvent {
                    event_id: e.event_id.to_string(),
                    version: e.version,
                    event_type: e.event_type.clone(),
                    schema_version: e.schema_version,
                    recorded_at: Some(prost_types::Timestamp {
                        seconds: e.recorded_at.timestamp(),
                        nanos: i32::try_from(e.recorded_at.timestamp_subsec_nanos()).unwrap_or(0),
                    }),
                    payload: e.payload.clone(),
                })
                .collect(),
        };
        (headers, body.encode_to_vec())
    }
}

/// Whether the lease's session is alive (and so still holds the lock): a
/// session advisory lock is lost only with its session.
async fn check_lease(lock_conn: &mut PgConnection) -> Result<(), RelayError> {
    match tokio::time::timeout(LEASE_CHECK_TIMEOUT, sqlx::query("SELECT 1").execute(&mut *lock_conn)).await {
        Ok(Ok(_)) => Ok(()),
        Ok(Err(e)) => {
            tracing::warn!(error = %e, "relay lease lost");
            Err(RelayError::LeaseLost)
        }
        Err(_) => Err(RelayError::LeaseLost),
    }
}

/// The version a message carries (`Nrm-Stream-Version`), 0 when it has none.
fn message_version(message: &StreamMessage) -> i64 {
    message
        .headers
        .get(bus::HEADER_STREAM_VERSION)
        .and_then(|v| v.as_str().parse::<i64>().ok())
        .unwrap_or(0)
}

/// Whether `stream` holds the commit ending at `last_version` of `subject`.
/// The last message of the subject answers most checks; a later version
/// there is no proof, so then the subject's messages are searched.
async fn holds_commit(stream: &Stream, subject: &str, last_version: i64) -> Result<bool, RelayError> {
    let last = match stream.get_last_raw_message_by_subject(subject).await {
        Ok(message) => message,
        Err(e) if e.kind() == LastRawMessageErrorKind::NoMessageFound => return Ok(false),
        Err(e) => return Err(RelayError::Publish(e.to_string())),
    };
    let version = message_version(&last);
    if version <= last_version {
        return Ok(version == last_version);
    }
    let mut sequence = 1;
    while sequence <= last.sequence {
        match stream.get_first_raw_message_by_subject(subject, sequence).await {
            Ok(message) => {
                if message_version(&message) == last_version {
                    return Ok(true);
                }
                sequence = message.sequence + 1;
            }
            Err(e) if e.kind() == RawMessageErrorKind::NoMessageFound => break,
            Err(e) => return Err(RelayError::Publish(e.to_string())),
        }
    }
    Ok(false)
}

/// How much [`refill`] compares.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RefillMode {
    /// What a relay does on election and after a reconnection: when the
    /// stream holds fewer messages than the store has published, compare the
    /// last version of every aggregate and put back what follows it. This
    /// finds what a deleted stream, a wiped server or a lost unsynced tail
    /// leaves; it trusts the message count otherwise (only the service
    /// publishes on its subjects).
    Quick,
    /// What an operator asks for: read the headers of every message and put
    /// back every commit the stream lacks, holes in the middle of an
    /// aggregate's history included (those arrive after later versions).
    Full,
    /// As [`RefillMode::Full`], but only count: nothing is put back.
    DryRun,
}

/// What a comparison of the stream with the store found.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RefillReport {
    /// Messages in the stream.
    pub stream_messages: u64,
    /// Commits the store has published (in `commits`, not in the outbox).
    pub published_commits: u64,
    /// Aggregates compared (0 when a quick check found the counts in agreement).
    pub aggregates_checked: u64,
    /// Aggregates the stream lacks commits of.
    pub aggregates_behind: u64,
    /// Commits the stream lacks.
    pub missing: u64,
    /// Commits put back in the outbox (0 on a dry run).
    pub requeued: u64,
}

/// Compares `stream` with the store and puts back in the outbox every
/// commit the stream lacks (see [`RefillMode`]); the relay then publishes
/// them in version order under their original commit IDs.
///
/// # Errors
/// [`RelayError`] when PostgreSQL or JetStream fails; nothing half-done
/// matters then, the next run compares again.
pub async fn refill(pool: &PgPool, stream: &Stream, mode: RefillMode) -> Result<RefillReport, RelayError> {
    let info = stream
        .get_info()
        .await
        .map_err(|e| RelayError::Publish(e.to_string()))?;
    let published: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM commits c WHERE NOT EXISTS (SELECT 1 FROM outbox o WHERE o.commit_id = c.commit_id)",
    )
    .fetch_one(pool)
    .await?;
    let mut report = RefillReport {
        stream_messages: info.state.messages,
        published_commits: u64::try_from(published).unwrap_or(0),
        ..RefillReport::default()
    };
    let missing = match mode {
        RefillMode::Quick if report.stream_messages >= report.published_commits => return Ok(report),
        RefillMode::Quick => missing_tails(pool, stream, &mut report).await?,
        RefillMode::Full | RefillMode::DryRun => missing_anywhere(pool, stream, &mut report).await?,
    };
    report.missing = missing.len() as u64;
    report.aggregates_behind = missing
        .iter()
        .map(|(stream_id, _)| stream_id)
        .collect::<HashSet<_>>()
        .len() as u64;
    if missing.is_empty() || mode == RefillMode::DryRun {
        return Ok(report);
    }
    let (stream_ids, versions): (Vec<String>, Vec<i64>) = missing.into_iter().unzip();
    report.requeued = sqlx::query(
        "INSERT INTO outbox (commit_id, stream_id, first_version, last_version, subject)
         SELECT c.commit_id, c.stream_id, c.first_version, c.last_version, c.subject
         FROM commits c JOIN UNNEST($1::text[], $2::bigint[]) AS m(stream_id, last_version)
           ON c.stream_id = m.stream_id AND c.last_version = m.last_version
         ORDER BY c.stream_id, c.first_version
         ON CONFLICT (commit_id) DO NOTHING",
    )
    .bind(&stream_ids)
    .bind(&versions)
    .execute(pool)
    .await?
    .rows_affected();
    metrics::counter!("nrm_relay_refilled_total").increment(report.requeued);
    Ok(report)
}

/// Per aggregate, the commits after the last version the stream holds for its subject.
async fn missing_tails(
    pool: &PgPool,
    stream: &Stream,
    report: &mut RefillReport,
) -> Result<Vec<(String, i64)>, RelayError> {
    let heads = sqlx::query(
        "SELECT DISTINCT ON (stream_id) stream_id, subject, last_version FROM commits
         ORDER BY stream_id, last_version DESC",
    )
    .fetch_all(pool)
    .await?;
    report.aggregates_checked = heads.len() as u64;
    let heads: Vec<(String, String, i64)> = heads
        .iter()
        .map(|r| (r.get("stream_id"), r.get("subject"), r.get("last_version")))
        .collect();
    let behind: Vec<Result<Option<(String, i64)>, RelayError>> = futures::stream::iter(heads)
        .map(|(stream_id, subject, store_version)| async move {
            let on_bus = match stream.get_last_raw_message_by_subject(&subject).await {
                Ok(message) => message_version(&message),
                Err(e) if e.kind() == LastRawMessageErrorKind::NoMessageFound => 0,
                Err(e) => return Err(RelayError::Publish(e.to_string())),
            };
            Ok((on_bus < store_version).then_some((stream_id, on_bus)))
        })
        .buffer_unordered(64)
        .collect()
        .await;
    let mut ids = Vec::new();
    let mut after = Vec::new();
    for item in behind {
        if let Some((stream_id, on_bus)) = item? {
            ids.push(stream_id);
            after.push(on_bus);
        }
    }
    let rows = sqlx::query(
        "SELECT c.stream_id, c.last_version FROM commits c
         JOIN UNNEST($1::text[], $2::bigint[]) AS b(stream_id, on_bus)
           ON c.stream_id = b.stream_id AND c.last_version > b.on_bus
         WHERE NOT EXISTS (SELECT 1 FROM outbox o WHERE o.commit_id = c.commit_id)",
    )
    .bind(&ids)
    .bind(&after)
    .fetch_all(pool)
    .await?;
    Ok(rows
        .iter()
        .map(|r| (r.get("stream_id"), r.get("last_version")))
        .collect())
}

/// Every published commit whose (aggregate, version) no message of the stream carries.
async fn missing_anywhere(
    pool: &PgPool,
    stream: &Stream,
    report: &mut RefillReport,
) -> Result<Vec<(String, i64)>, RelayError> {
    let mut on_bus: HashSet<(String, i64)> = HashSet::new();
    let filter = stream
        .cached_info()
        .config
        .subjects
        .first()
        .cloned()
        .unwrap_or_default();
    let mut replay = Replay::start(stream, filter, true)
        .await
        .map_err(|e| RelayError::Publish(e.to_string()))?;
    while let Some(message) = replay.next().await.map_err(|e| RelayError::Publish(e.to_string()))? {
        if let Some(headers) = message.headers.as_ref()
            && let (Some(id), Some(version)) = (
                headers.get(bus::HEADER_STREAM_ID),
                headers
                    .get(bus::HEADER_STREAM_VERSION)
                    .and_then(|v| v.as_str().parse::<i64>().ok()),
            )
        {
            on_bus.insert((id.as_str().to_owned(), version));
        }
    }
    let commits = sqlx::query(
        "SELECT c.stream_id, c.last_version FROM commits c
         WHERE NOT EXISTS (SELECT 1 FROM outbox o WHERE o.commit_id = c.commit_id)",
    )
    .fetch_all(pool)
    .await?;
    let mut aggregates = HashSet::new();
    let mut missing = Vec::new();
    for row in &commits {
        let key: (String, i64) = (row.get("stream_id"), row.get("last_version"));
        aggregates.insert(key.0.clone());
        if !on_bus.contains(&key) {
            missing.push(key);
        }
    }
    report.aggregates_checked = aggregates.len() as u64;
    Ok(missing)
}
