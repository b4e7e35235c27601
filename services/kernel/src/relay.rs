//! The outbox relay: moves committed events from PostgreSQL to JetStream.
//!
//! Guarantees, and how:
//! - **Nothing lost.** An outbox row is deleted only after JetStream
//!   acknowledged its message; a crash before that publishes it again.
//! - **Nothing duplicated downstream.** Every message carries `Nats-Msg-Id`
//!   (the commit ID), which JetStream de-duplicates within its window. Rows
//!   that may have been sent before (everything pending when the relay
//!   starts, and every row of a failed round) are first checked against the
//!   last message the stream holds for their subject, so a republish after a
//!   longer outage than the window is skipped too (DESIGN.md §7).
//! - **Nothing skipped.** Rows are read only from transactions older than
//!   every transaction still running (`pg_snapshot_xmin`), ordered by
//!   (transaction, row): a transaction that took an early ID but commits late
//!   is waited for, not passed over. The horizon is cluster-wide: a long
//!   transaction in any database of the cluster delays publishing (it never
//!   loses anything); keep transactions short.
//! - **Order per aggregate.** One round sends at most one commit per subject,
//!   and the next round starts only when the round was acknowledged, so a
//!   subject's messages are stored in version order.
//! - **One relay per database.** A session advisory lock elects the relay;
//!   other instances wait.
//! - **Prompt.** Commits in this process wake the relay at once; commits by
//!   other processes are found by polling.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::HeaderMap;
use async_nats::jetstream::message::PublishMessage;
use async_nats::jetstream::stream::{LastRawMessageErrorKind, Stream};
use futures::future::join_all;
use prost::Message as _;
use sqlx::{Connection, PgConnection, PgPool, Row};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::bus::{self, Bus};
use crate::store::RecordedEvent;
use nrm_proto::common::v1::{CommittedEvent, EventCommit};

/// Key of the advisory lock that elects the relay.
const RELAY_LOCK_KEY: i64 = 0x6b6f_7075_725f_7231; // "kopur_r1"

/// How the relay behaves.
#[derive(Debug, Clone)]
pub struct RelayConfig {
    /// Full protobuf name of the service's event message.
    pub payload_type: &'static str,
    /// Most commits read per batch.
    pub batch_size: i64,
    /// How often to look for commits of other processes.
    pub poll_interval: Duration,
}

impl RelayConfig {
    /// Defaults for a service whose events are `payload_type`.
    #[must_use]
    pub fn new(payload_type: &'static str) -> Self {
        Self {
            payload_type,
            batch_size: 256,
            poll_interval: Duration::from_millis(250),
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

/// Publishes a service's outbox.
pub struct Relay {
    pool: PgPool,
    bus: Bus,
    stream: Stream,
    appended: Arc<Notify>,
    config: RelayConfig,
    /// Rows with an ID up to this may have been sent before: check first.
    check_upto: i64,
}

impl Relay {
    /// A relay for `stream`, woken by `appended`.
    #[must_use]
    pub fn new(pool: PgPool, bus: Bus, stream: Stream, appended: Arc<Notify>, config: RelayConfig) -> Self {
        Self {
            pool,
            bus,
            stream,
            appended,
            config,
            check_upto: i64::MAX,
        }
    }

    /// Runs until `shutdown`: waits to be elected, then publishes.
    pub async fn run(mut self, shutdown: CancellationToken) {
        let mut backoff = Duration::from_millis(200);
        while !shutdown.is_cancelled() {
            match self.lead(&shutdown).await {
                Ok(()) => return,
                Err(err) => {
                    metrics::counter!("nrm_relay_errors_total").increment(1);
                    tracing::warn!(error = %err, backoff_ms = backoff.as_millis() as u64, "relay round failed; retrying");
                    tokio::select! {
                        () = shutdown.cancelled() => return,
                        () = tokio::time::sleep(backoff) => {}
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(10));
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
        tracing::info!("relay elected for this database");
        // Anything pending now may have been sent by a previous relay.
        self.check_upto = sqlx::query_scalar("SELECT coalesce(max(id), 0) FROM outbox")
            .fetch_one(&self.pool)
            .await?;
        loop {
            if shutdown.is_cancelled() {
                return Ok(());
            }
            let published = self.publish_round().await?;
            if published == 0 {
                tokio::select! {
                    () = shutdown.cancelled() => return Ok(()),
                    () = self.appended.notified() => {}
                    () = tokio::time::sleep(self.config.poll_interval) => {}
                }
                // Keep the lock session alive and detect its loss.
                sqlx::query("SELECT 1").execute(&mut lock_conn).await?;
            }
        }
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
        let started = Instant::now();
        let mut done: Vec<i64> = Vec::with_capacity(batch.len());
        let mut to_send: Vec<&PendingCommit> = Vec::with_capacity(batch.len());
        for commit in &batch {
            if commit.id <= self.check_upto && self.already_published(commit).await? {
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
                Ok(ack) => {
                    if ack.duplicate {
                        metrics::counter!("nrm_relay_deduplicated_total").increment(1);
                    }
                    done.push(commit.id);
                }
                Err(e) => failure = Some(e),
            }
        }
        sqlx::query("DELETE FROM outbox WHERE id = ANY($1)")
            .bind(&done)
            .execute(&self.pool)
            .await?;
        metrics::counter!("nrm_relay_published_total").increment(done.len() as u64);
        metrics::histogram!("nrm_relay_round_seconds").record(started.elapsed().as_secs_f64());
        if let Some(err) = failure {
            self.check_upto = self.check_upto.max(batch.iter().map(|c| c.id).max().unwrap_or(0));
            return Err(RelayError::Publish(err));
        }
        Ok(done.len())
    }

    /// Whether the stream already holds this commit: the last message on its
    /// subject is at or past the commit's last version.
    async fn already_published(&self, commit: &PendingCommit) -> Result<bool, RelayError> {
        match self.stream.get_last_raw_message_by_subject(&commit.subject).await {
            Ok(message) => {
                let version = message
                    .headers
                    .get(bus::HEADER_STREAM_VERSION)
                    .and_then(|v| v.as_str().parse::<i64>().ok())
                    .unwrap_or(0);
                Ok(version >= commit.last_version)
            }
            Err(e) if e.kind() == LastRawMessageErrorKind::NoMessageFound => Ok(false),
            Err(e) => Err(RelayError::Publish(e.to_string())),
        }
    }

    /// Reads the next commits that are safe to publish, at most one per subject.
    async fn read_batch(&self) -> Result<Vec<PendingCommit>, RelayError> {
        let rows = sqlx::query(
            "SELECT id, commit_id, stream_id, first_version, last_version, subject FROM outbox
             WHERE tx_id < pg_snapshot_xmin(pg_current_snapshot())
             ORDER BY tx_id, id LIMIT $1",
        )
        .bind(self.config.batch_size)
        .fetch_all(&self.pool)
        .await?;
        let mut subjects = HashSet::new();
        let mut batch = Vec::with_capacity(rows.len());
        for row in rows {
            let subject: String = row.get("subject");
            if !subjects.insert(subject.clone()) {
                break;
            }
            batch.push(PendingCommit {
                id: row.get("id"),
                commit_id: row.get("commit_id"),
                stream_id: row.get("stream_id"),
                first_version: row.get("first_version"),
                last_version: row.get("last_version"),
                subject,
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
             ORDER BY e.global_position",
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
            payload_type: self.config.payload_type.to_owned(),
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
