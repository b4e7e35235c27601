//! Projections and reactions: consumers of a stream whose handler writes its
//! effects and its stream position in one PostgreSQL transaction. The stream
//! is a [`Source`]: a context's stream (the usual case), or any other one,
//! such as the incoming stream of a partner country.
//!
//! A *projection* writes a read model through [`UnitOfWork::conn`]. A
//! *reaction* (a service acting on another service's events) appends its own
//! events through [`UnitOfWork::append`] in the same transaction as the
//! checkpoint, so a redelivered event holds no second bed and sends no second
//! escalation.
//!
//! What holds, and how (DESIGN.md §7):
//! - **Strict stream order, nothing skipped.** Each runner reads the whole
//!   context stream through an ordered consumer started at checkpoint + 1
//!   (one message in flight, no acknowledgements, recreated by the client on
//!   any gap it sees), and applies a message only when it is the one right
//!   after the checkpoint. A later one (a delivery lost on a reconnect)
//!   moves nothing: the consumer is placed at checkpoint + 1 again. Only a
//!   sequence the stream no longer holds at all is passed over.
//! - **Exactly once.** The checkpoint row is locked in the handler's
//!   transaction, so two replicas of a service apply each message once: the
//!   second finds it at or below the checkpoint.
//! - **A recreated stream is noticed.** Beside the sequence the checkpoint
//!   keeps the stream's identity (name and creation time) and the commit ID
//!   of the message at the checkpoint. A stream deleted and created again, or
//!   one that lost its tail and was refilled, no longer matches: the read
//!   model is rebuilt.
//! - **Rebuilds are atomic.** A rebuild resets the read model and replays the
//!   stream in one transaction: readers see the old model until the new one
//!   is complete, and an interrupted rebuild leaves the old one. (The
//!   transaction holds back the relay's horizon while it runs.) A reaction
//!   has no read model: on a new stream it starts from the first message
//!   again and its idempotence keeps effects single.
//! - **An aggregate never moves back.** Per source aggregate the runner
//!   keeps the last version it applied (`projection_versions`, in the same
//!   transaction): a commit at or below it (a hole refilled after later
//!   versions, a reaction replaying a recreated stream, a redelivery) changes
//!   nothing, so a closed referral is never "accepted" again.
//! - **Nothing stuck behind one bad message.** A failing handler is retried
//!   with growing back-off ([`RetryPolicy`]); transient database faults are
//!   retried as long as they last and count nothing; after the policy's
//!   attempts the message is parked (`parked_messages`, a metric and a log
//!   line with its IDs) and the checkpoint moves on; a message that cannot
//!   be decoded or mapped ([`Unprocessable`]) is parked at its first failure,
//!   so that nothing waits behind it. An operator lists and
//!   retries parked messages (`nrmctl ops parked`, `nrmctl ops retry`).
//! - **Catching up in batches.** A read model that finds messages waiting
//!   (after a start or an outage) applies up to 500 (`BATCH`) consecutive ones
//!   in one transaction with one checkpoint write, their aggregates'
//!   versions read in one statement and written in one, the commits
//!   handed to the projection together ([`Projection::apply_batch`], which
//!   may write them with fewer statements than one by one); any failure
//!   rolls the batch back and its messages are applied one by one as above
//!   (retries and parking unchanged), from the one that failed when the
//!   error names it ([`AtCommit`]). A rebuild likewise replays a batch
//!   under one savepoint, reading the next batches from the stream while
//!   it writes one. A read model's transactions commit without
//!   waiting for the disk (`synchronous_commit = off`): its checkpoint
//!   commits with its effects, so a tail lost in a crash of PostgreSQL is
//!   applied again from the stream. A reaction keeps one message per
//!   transaction, committed durably: the relay publishes what it appends.
//! - **Comparisons leave the live model alone.** An operator's comparison
//!   of a read model with a rebuild ([`ProjectionRunner::rebuild_compare`])
//!   replays into temporary copies of its tables ([`Projection::tables`])
//!   on a connection of its own and takes no lock: the live model keeps
//!   following its stream meanwhile. Only a model found different is
//!   rebuilt in place, atomically.

use std::collections::HashMap;
use std::future::Future;
use std::time::Duration;

use async_nats::HeaderMap;
use async_nats::jetstream::consumer::{AckPolicy, DeliverPolicy, pull};
use async_nats::jetstream::stream::{RawMessageErrorKind, Stream};
use futures::{FutureExt as _, StreamExt as _};
use prost::Message as _;
use sqlx::{PgConnection, Row};
use tokio_util::sync::CancellationToken;
use tracing::Instrument as _;
use uuid::Uuid;

use crate::bus::{self, Bus, BusError, Replay, StreamIdentity};
use crate::retry::{self, RetryPolicy};
use crate::store::{EventMetadata, EventStore, UnitOfWork};
use crate::telemetry;
use crate::xborder::CountryCode;
use nrm_proto::common::v1::EventCommit;

/// How often a consuming runner looks for parked messages an operator asked to retry.
const PARKED_POLL: Duration = Duration::from_secs(1);

/// Longest an error text kept with a parked item.
const MAX_ERROR_TEXT: usize = 500;

/// Most messages a read model applies in one transaction (the live runner
/// catching up) or under one savepoint (a rebuild).
const BATCH: usize = 500;

/// Batches a rebuild reads from the stream ahead of the one it writes.
const READ_AHEAD: usize = 2;

/// Messages a shadow comparison replays per transaction: each holds back
/// the horizon of every relay on the cluster while it is open (what commits
/// meanwhile is published after it), so they stay short.
const SHADOW_BATCH: usize = 100;

/// Longest the live runner spends gathering the messages of one batch.
const BATCH_TIME: Duration = Duration::from_millis(50);

/// Most aggregates whose versions a rebuild keeps in memory; past it the
/// versions are read again from `projection_versions`, a batch at a time.
const VERSIONS_KEPT: usize = 200_000;

/// A read model (or a reaction) fed by one stream (a [`Source`]).
pub trait Projection: Send + Sync + 'static {
    /// Whether this is a read model, rebuilt atomically by a reset and a full
    /// replay in one transaction. A reaction (`false`) has no read model: its
    /// effects are events, which stay; on a new stream it starts again from
    /// the first message, one transaction per message, and relies on its own
    /// idempotence (a commit acted on once, by commit ID or by state).
    const READ_MODEL: bool = true;

    /// Stable name: the checkpoint key.
    fn name(&self) -> &'static str;

    /// Applies one commit inside the unit of work that will also store the
    /// checkpoint. Commits the projection has no use for are ignored here.
    fn apply(
        &self,
        uow: &mut UnitOfWork,
        delivery: &Delivery,
    ) -> impl Future<Output = Result<(), anyhow::Error>> + Send;

    /// Applies consecutive commits (in stream order, each newer than its
    /// aggregate's last applied version) inside one unit of work, leaving
    /// the read model exactly as applying them one by one with
    /// [`Projection::apply`] would. By default it does just that, each in
    /// the trace of the command that caused it; a projection that can write
    /// many commits with fewer statements overrides it. An error that names
    /// the commit it came from ([`AtCommit`]) lets the runner apply the ones
    /// before it as a batch and that one alone; any other sends the whole
    /// batch one by one. Nothing of a failed batch stays (the runner rolls
    /// it back).
    fn apply_batch(
        &self,
        uow: &mut UnitOfWork,
        deliveries: &[&Delivery],
    ) -> impl Future<Output = Result<(), anyhow::Error>> + Send {
        async move {
            for (index, delivery) in deliveries.iter().enumerate() {
                let span = tracing::info_span!(
                    "projection.apply",
                    projection = self.name(),
                    stream_id = %delivery.commit.stream_id,
                    stream_sequence = delivery.stream_sequence
                );
                if let Some(metadata) = &delivery.metadata {
                    telemetry::continue_trace(&span, metadata);
                }
                self.apply(uow, delivery)
                    .instrument(span)
                    .await
                    .map_err(|source| AtCommit { index, source })?;
            }
            Ok(())
        }
    }

    /// Completes, once a rebuild has replayed every message, what the
    /// projection leaves undone while it replays ([`UnitOfWork::replaying`]):
    /// rows derived from the records as a whole (per-person aggregates, for
    /// example) are then written once, from the replayed records, instead
    /// of after every batch. Called in the rebuild's one transaction (after
    /// its reset and replay), before its checkpoint and its digest; not in
    /// a shadow comparison, whose short transactions apply as live ones do.
    /// By default: nothing.
    fn after_replay(&self, conn: &mut PgConnection) -> impl Future<Output = Result<(), anyhow::Error>> + Send {
        let _ = conn;
        async { Ok(()) }
    }

    /// Empties the read model before a rebuild (a reaction, whose effects
    /// are events, keeps them and relies on its own idempotence).
    fn reset(&self, conn: &mut PgConnection) -> impl Future<Output = Result<(), anyhow::Error>> + Send;

    /// A digest of the whole read model as it stands (every row this
    /// projection owns, in a fixed order; see [`rows_digest`]), so that a
    /// rebuild can say whether it came out equal to the live model. `None`:
    /// the read model cannot be compared.
    fn digest(&self, conn: &mut PgConnection) -> impl Future<Output = Result<Option<String>, anyhow::Error>> + Send {
        let _ = conn;
        async { Ok(None) }
    }

    /// Every table the read model owns (writes in [`Projection::apply`],
    /// empties in [`Projection::reset`], reads in [`Projection::digest`]),
    /// by its plain name, unqualified. With them a comparison
    /// ([`ProjectionRunner::rebuild_compare`]) replays into private copies
    /// of them (temporary tables shadowing these names on a connection of
    /// its own) and leaves the live model alone; without them (empty, the
    /// default) it rebuilds the live model under its checkpoint lock.
    /// Every statement of the three methods must name these tables
    /// unqualified (never `public.…`), and `apply` must read no table of the
    /// model that is not listed (it would see the live one).
    fn tables(&self) -> &'static [&'static str] {
        &[]
    }
}

/// SHA-256 (hex) of the rows `query` returns, each one text column (for
/// example `SELECT t::text FROM my_table t`), sorted by that text, so that
/// the digest does not depend on the physical order of the rows. Columns
/// that a rebuild cannot reproduce (the time a row was written) must be left
/// out of the text.
///
/// The lines are the non-NULL ones, sorted bytewise (`COLLATE "C"`) by
/// PostgreSQL (which spills a large sort to disk) and streamed into the
/// hash here, joined by `\n`: memory stays flat however many rows the
/// model holds, and the value is the SHA-256 of the same text an
/// aggregation of the lines in PostgreSQL would give.
///
/// # Errors
/// When the query fails.
pub async fn rows_digest(conn: &mut PgConnection, query: &'static str) -> Result<String, sqlx::Error> {
    use futures::TryStreamExt as _;
    use sha2::Digest as _;
    // The query is the projection's own constant text, never a caller's.
    let mut lines = sqlx::query_scalar::<_, String>(sqlx::AssertSqlSafe(format!(
        "SELECT r.line FROM ({query}) AS r(line) WHERE r.line IS NOT NULL ORDER BY r.line COLLATE \"C\""
    )))
    .fetch(conn);
    let mut hash = sha2::Sha256::new();
    let mut first = true;
    while let Some(line) = lines.try_next().await? {
        if !first {
            hash.update(b"\n");
        }
        first = false;
        hash.update(line.as_bytes());
    }
    Ok(format!("{:x}", hash.finalize()))
}

/// An error of the message itself, not of the moment: it cannot be decoded,
/// or what it says cannot be mapped. Trying again can only fail again, so a
/// runner parks the message at its first failure instead of holding every
/// message behind it through the retry policy's back-off. A handler returns
/// it (or wraps its own error in it, with [`Unprocessable::new`]) for such
/// errors; any other error is retried first.
#[derive(Debug, thiserror::Error)]
#[error("unprocessable message: {0}")]
pub struct Unprocessable(#[source] pub anyhow::Error);

impl Unprocessable {
    /// `err` as an error of the message.
    pub fn new(err: impl Into<anyhow::Error>) -> Self {
        Self(err.into())
    }
}

/// The error of one commit of a batch ([`Projection::apply_batch`]): the
/// commit's index in the slice the batch was given.
#[derive(Debug, thiserror::Error)]
#[error("commit {index} of the batch: {source}")]
pub struct AtCommit {
    /// Index of the commit in the batch.
    pub index: usize,
    /// What failed.
    #[source]
    pub source: anyhow::Error,
}

/// Whether `err` is an error of the message itself ([`Unprocessable`]).
#[must_use]
pub fn is_unprocessable(err: &anyhow::Error) -> bool {
    err.chain().any(|cause| cause.is::<Unprocessable>())
}

/// One message as a handler sees it.
#[derive(Debug, Clone)]
pub struct Delivery {
    /// Sequence of the message in its JetStream stream.
    pub stream_sequence: u64,
    /// The subject it was published on.
    pub subject: String,
    /// The commit: every event one command appended.
    pub commit: EventCommit,
    /// Correlation, causation, actor and trace context from the headers.
    pub metadata: Option<EventMetadata>,
}

/// What handling one message did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The handler ran and the checkpoint moved.
    Applied,
    /// The message was at or below the checkpoint: nothing changed.
    AlreadyApplied,
    /// The message kept failing: it is parked and the checkpoint moved past it.
    Parked,
}

/// What a rebuild of a running read model found
/// ([`ProjectionRunner::rebuild_compare`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RebuildReport {
    /// The projection's name.
    pub projection: &'static str,
    /// Its stream.
    pub stream: String,
    /// The stream sequence the live model had reached and the rebuild replayed to.
    pub stream_sequence: u64,
    /// Messages replayed.
    pub messages: u64,
    /// The digest of the live model before the rebuild (`None`: the
    /// projection has no digest).
    pub live_digest: Option<String>,
    /// The digest of the rebuilt model.
    pub rebuilt_digest: Option<String>,
    /// Messages parked during the rebuild (they kept failing).
    pub parked: u64,
}

impl RebuildReport {
    /// Both digests are there and the same.
    #[must_use]
    pub fn equal(&self) -> bool {
        matches!((&self.live_digest, &self.rebuilt_digest), (Some(live), Some(rebuilt)) if live == rebuilt)
    }
}

/// A running read model that can be rebuilt and compared, type-erased (the
/// registry of [`crate::service::Kit`] serves them to the operator).
pub trait Rebuildable: Send + Sync + 'static {
    /// The projection's name.
    fn name(&self) -> &'static str;

    /// See [`ProjectionRunner::rebuild_compare`].
    fn rebuild_compare(&self) -> futures::future::BoxFuture<'_, Result<RebuildReport, anyhow::Error>>;
}

impl<P: Projection> Rebuildable for ProjectionRunner<P> {
    fn name(&self) -> &'static str {
        self.projection.name()
    }

    fn rebuild_compare(&self) -> futures::future::BoxFuture<'_, Result<RebuildReport, anyhow::Error>> {
        Box::pin(ProjectionRunner::rebuild_compare(self))
    }
}

/// What one replay of a rebuild did.
#[derive(Debug, Default)]
struct Replayed {
    /// The last message replayed: its sequence and commit ID.
    at: (u64, Option<Uuid>),
    messages: u64,
    parked: u64,
}

/// The last version applied per source aggregate (`projection_versions`),
/// as one transaction sees it: each aggregate read once (locked), changes
/// kept in memory and written back with one statement ([`Versions::flush`]).
#[derive(Debug, Default)]
struct Versions {
    /// An aggregate missing from `known` has no row (the table was emptied
    /// in this transaction, by a reset).
    complete: bool,
    /// Versions as the table holds them in this transaction (`None`: no row).
    known: HashMap<String, Option<i64>>,
    /// Versions admitted since the last flush.
    pending: HashMap<String, i64>,
}

impl Versions {
    /// After a reset in this transaction: nothing to read.
    fn after_reset() -> Self {
        Self {
            complete: true,
            ..Self::default()
        }
    }

    /// Reads (and locks) the rows of the aggregates among `ids` not known yet.
    async fn load<'a>(
        &mut self,
        conn: &mut PgConnection,
        projection: &str,
        ids: impl IntoIterator<Item = &'a str>,
    ) -> Result<(), anyhow::Error> {
        if self.complete {
            return Ok(());
        }
        let mut missing: Vec<&str> = ids
            .into_iter()
            .filter(|id| !self.known.contains_key(*id) && !self.pending.contains_key(*id))
            .collect();
        missing.sort_unstable();
        missing.dedup();
        if missing.is_empty() {
            return Ok(());
        }
        let rows: Vec<(String, i64)> = sqlx::query_as(
            "SELECT stream_id, version FROM projection_versions WHERE projection = $1 AND stream_id = ANY($2) FOR UPDATE",
        )
        .bind(projection)
        .bind(&missing)
        .fetch_all(&mut *conn)
        .await?;
        for id in missing {
            self.known.insert(id.to_owned(), None);
        }
        for (id, version) in rows {
            self.known.insert(id, Some(version));
        }
        Ok(())
    }

    /// Whether a commit that brings `stream_id` to `last` moves it forward
    /// (then it is noted); the aggregate must have been loaded.
    /// The last version applied (or admitted) of `stream_id`, if any.
    fn applied(&self, stream_id: &str) -> Option<i64> {
        self.pending
            .get(stream_id)
            .copied()
            .or_else(|| self.known.get(stream_id).copied().flatten())
    }

    fn admit(&mut self, stream_id: &str, last: i64) -> Option<i64> {
        let applied = self.applied(stream_id);
        if applied.is_some_and(|v| last <= v) {
            return applied;
        }
        self.pending.insert(stream_id.to_owned(), last);
        None
    }

    /// Writes the versions admitted since the last flush, in one statement.
    async fn flush(&mut self, conn: &mut PgConnection, projection: &str) -> Result<(), anyhow::Error> {
        if self.pending.is_empty() {
            return Ok(());
        }
        let (ids, versions): (Vec<&str>, Vec<i64>) = self.pending.iter().map(|(id, v)| (id.as_str(), *v)).unzip();
        sqlx::query(
            "INSERT INTO projection_versions (projection, stream_id, version)
             SELECT $1, v.stream_id, v.version FROM unnest($2::text[], $3::int8[]) AS v(stream_id, version)
             ON CONFLICT (projection, stream_id) DO UPDATE SET version = EXCLUDED.version",
        )
        .bind(projection)
        .bind(&ids)
        .bind(&versions)
        .execute(conn)
        .await?;
        for (id, version) in self.pending.drain() {
            self.known.insert(id, Some(version));
        }
        if self.known.len() > VERSIONS_KEPT {
            self.known.clear();
            self.complete = false;
        }
        Ok(())
    }

    /// [`Versions::flush`] and [`write_checkpoint`] in one statement: the
    /// live runner ends every batch with both, and each round trip of a
    /// batch is lag between a command and its read model (and time its
    /// transaction holds back the relays' horizon).
    async fn flush_with_checkpoint(
        &mut self,
        conn: &mut PgConnection,
        projection: &str,
        sequence: u64,
        identity: &StreamIdentity,
        commit_id: Option<Uuid>,
    ) -> Result<(), anyhow::Error> {
        if self.pending.is_empty() {
            return write_checkpoint(conn, projection, sequence, identity, commit_id).await;
        }
        let (ids, versions): (Vec<&str>, Vec<i64>) = self.pending.iter().map(|(id, v)| (id.as_str(), *v)).unzip();
        sqlx::query(
            "WITH versions AS (
                 INSERT INTO projection_versions (projection, stream_id, version)
                 SELECT $1, v.stream_id, v.version FROM unnest($6::text[], $7::int8[]) AS v(stream_id, version)
                 ON CONFLICT (projection, stream_id) DO UPDATE SET version = EXCLUDED.version
             )
             UPDATE projection_checkpoints
             SET stream_sequence = $2, stream_name = $3, stream_created = $4, commit_id = $5, updated_at = now()
             WHERE projection = $1",
        )
        .bind(projection)
        .bind(i64::try_from(sequence)?)
        .bind(&identity.name)
        .bind(identity.created)
        .bind(commit_id)
        .bind(&ids)
        .bind(&versions)
        .execute(conn)
        .await?;
        for (id, version) in self.pending.drain() {
            self.known.insert(id, Some(version));
        }
        if self.known.len() > VERSIONS_KEPT {
            self.known.clear();
            self.complete = false;
        }
        Ok(())
    }

    /// Forgets what was admitted since the last flush (rolled back).
    fn discard(&mut self) {
        self.pending.clear();
    }
}

/// What became of a batch of the live runner ([`ProjectionRunner::handle_batch`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Batched {
    /// Applied (or at or below the checkpoint already), in one transaction.
    Applied,
    /// Nothing written: the message at this index failed.
    FailedAt(usize),
    /// Nothing written, for a reason of the batch as a whole.
    Failed,
}

/// Why a runner stops consuming and starts again from its checkpoint.
#[derive(Debug, thiserror::Error)]
enum Restart {
    /// A message came that is not the one after the checkpoint.
    #[error("gap: expected sequence {expected}, got {got}")]
    Gap { expected: u64, got: u64 },
    /// The checkpoint counts in another stream (a rebuild happened elsewhere).
    #[error("the checkpoint counts in another stream")]
    OtherStream,
    /// The NATS connection was re-established.
    #[error("NATS reconnected")]
    Reconnected,
    /// The stream does not exist yet (its service creates it).
    #[error("the stream does not exist yet")]
    NoStream,
}

/// The stored checkpoint of one runner.
#[derive(Debug, Clone, Default)]
struct Checkpoint {
    sequence: u64,
    identity: Option<StreamIdentity>,
    commit_id: Option<Uuid>,
}

/// A raw message, from a consumer or read by sequence.
struct Raw<'a> {
    sequence: u64,
    subject: &'a str,
    headers: Option<&'a HeaderMap>,
    payload: &'a [u8],
}

impl<'a> Raw<'a> {
    /// A message delivered by a consumer.
    fn delivered(message: &'a async_nats::jetstream::Message) -> Result<Self, anyhow::Error> {
        let info = message
            .info()
            .map_err(|e| anyhow::anyhow!("not a JetStream message: {e}"))?;
        Ok(Self {
            sequence: info.stream_sequence,
            subject: message.subject.as_str(),
            headers: message.headers.as_ref(),
            payload: message.payload.as_ref(),
        })
    }

    /// A message read from the stream by its sequence.
    fn stored(message: &'a async_nats::jetstream::message::StreamMessage) -> Self {
        Self {
            sequence: message.sequence,
            subject: message.subject.as_str(),
            headers: Some(&message.headers),
            payload: message.payload.as_ref(),
        }
    }

    fn commit_id(&self) -> Option<Uuid> {
        self.headers
            .and_then(|h| h.get("Nats-Msg-Id"))
            .and_then(|v| v.as_str().parse().ok())
    }

    fn delivery(&self) -> Result<Delivery, anyhow::Error> {
        Ok(Delivery {
            stream_sequence: self.sequence,
            subject: self.subject.to_owned(),
            commit: EventCommit::decode(self.payload).map_err(Unprocessable::new)?,
            metadata: bus::metadata_from_headers(self.headers),
        })
    }
}

/// What a runner reads: a stream, by name, and the subjects of it that it
/// takes. A runner never creates its stream: it waits until the service
/// that owns it has.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Source {
    stream: String,
    filter: String,
}

impl Source {
    /// The whole stream `stream`, or the part of it `filter` names.
    #[must_use]
    pub fn new(stream: impl Into<String>, filter: impl Into<String>) -> Self {
        Self {
            stream: stream.into(),
            filter: filter.into(),
        }
    }

    /// The whole stream of `context` (`{STREAM_PREFIX}_{CONTEXT}`, subjects
    /// `{prefix}.{context}.v1.>`).
    #[must_use]
    pub fn context(bus: &Bus, context: &'static str) -> Self {
        Self::new(bus.stream_name(context), bus.context_subjects(context))
    }

    /// The incoming stream from partner country `from`
    /// (`{STREAM_PREFIX}_XB_IN_{FROM}`), every crossing message it holds.
    /// The repatriation service creates it; a runner waits until it exists.
    #[must_use]
    pub fn inbound(bus: &Bus, from: &CountryCode) -> Self {
        Self::new(bus.inbound_stream_name(from), bus.outbound_filter_all())
    }

    /// The stream's name.
    #[must_use]
    pub fn stream(&self) -> &str {
        &self.stream
    }

    /// The subjects taken from it (a filter, with wildcards).
    #[must_use]
    pub fn filter(&self) -> &str {
        &self.filter
    }
}

/// Runs one projection on one [`Source`].
pub struct ProjectionRunner<P> {
    store: EventStore,
    bus: Bus,
    source: Source,
    projection: P,
    retry: RetryPolicy,
}

impl<P: Projection> ProjectionRunner<P> {
    /// A runner for `projection`, fed by the whole stream of `context`.
    pub fn new(store: EventStore, bus: Bus, context: &'static str, projection: P) -> Self {
        let source = Source::context(&bus, context);
        Self::on_source(store, bus, source, projection)
    }

    /// A runner for `projection`, fed by `source`.
    pub fn on_source(store: EventStore, bus: Bus, source: Source, projection: P) -> Self {
        Self {
            store,
            bus,
            source,
            projection,
            retry: RetryPolicy::default(),
        }
    }

    /// What the runner reads.
    #[must_use]
    pub fn source(&self) -> &Source {
        &self.source
    }

    /// The same runner with another retry policy.
    #[must_use]
    pub fn with_retry(mut self, retry: RetryPolicy) -> Self {
        self.retry = retry;
        self
    }

    /// The projection's name.
    #[must_use]
    pub fn name(&self) -> &'static str {
        self.projection.name()
    }

    /// Consumes until `shutdown`, starting again from the checkpoint after errors.
    pub async fn run(self, shutdown: CancellationToken) {
        self.run_shared(shutdown).await;
    }

    /// As [`ProjectionRunner::run`], for a runner shared with others (the
    /// operator's registry of read models).
    pub async fn run_shared(&self, shutdown: CancellationToken) {
        let mut failures = 0;
        while !shutdown.is_cancelled() {
            match self.consume(&shutdown).await {
                Ok(()) => return,
                // Whatever it was doing when the stop came (a retry's
                // back-off): nothing to restart.
                Err(_) if shutdown.is_cancelled() => return,
                Err(err) => {
                    let restart = err.downcast_ref::<Restart>().is_some();
                    failures = if restart { 0 } else { failures + 1 };
                    let backoff = match err.downcast_ref::<Restart>() {
                        Some(Restart::NoStream) => PARKED_POLL,
                        Some(_) => Duration::ZERO,
                        None => self.retry.delay(failures),
                    };
                    if let Some(Restart::Gap { .. }) = err.downcast_ref::<Restart>() {
                        metrics::counter!("nrm_projection_gaps_total", "projection" => self.name()).increment(1);
                    }
                    tracing::warn!(projection = self.name(), error = %err, backoff_ms = backoff.as_millis() as u64, "projection consumer restarts from its checkpoint");
                    tokio::select! {
                        () = shutdown.cancelled() => return,
                        () = tokio::time::sleep(backoff) => {}
                    }
                }
            }
        }
    }

    /// The stream with its identity. A runner never creates a stream: the
    /// service that owns it does (and refills it), so a missing stream is
    /// waited for rather than replaced by an empty one.
    async fn stream(&self) -> Result<(Stream, StreamIdentity), anyhow::Error> {
        let mut stream = match self.bus.find_stream_named(&self.source.stream).await {
            Ok(stream) => stream,
            Err(BusError::NoStream(name)) => {
                // A runner that never started says which stream it waits for.
                sqlx::query(
                    "INSERT INTO projection_checkpoints (projection, stream_sequence, stream_name) VALUES ($1, 0, $2)
                     ON CONFLICT (projection) DO UPDATE SET stream_name = EXCLUDED.stream_name
                     WHERE projection_checkpoints.stream_sequence = 0 AND projection_checkpoints.stream_created IS NULL",
                )
                .bind(self.name())
                .bind(&name)
                .execute(self.store.pool())
                .await?;
                return Err(Restart::NoStream.into());
            }
            Err(e) => return Err(e.into()),
        };
        let identity = StreamIdentity::of(stream.info().await?);
        Ok((stream, identity))
    }

    /// A consumer of the whole stream from `start`, one this runner owns: no
    /// acknowledgements (the checkpoint is the position), and an error, not a
    /// silent re-creation, when the stream or the consumer goes away.
    async fn consumer(&self, stream: &Stream, start: u64) -> Result<pull::Stream, anyhow::Error> {
        let wanted = pull::Config {
            filter_subject: self.source.filter.clone(),
            deliver_policy: DeliverPolicy::ByStartSequence { start_sequence: start },
            ack_policy: AckPolicy::None,
            inactive_threshold: Duration::from_secs(60),
            ..Default::default()
        };
        let consumer = stream.create_consumer(wanted.clone()).await?;
        let applied = &consumer.cached_info().config;
        let checks = [
            ("filter_subject", applied.filter_subject == wanted.filter_subject),
            ("ack_policy", applied.ack_policy == wanted.ack_policy),
            ("deliver_policy", applied.deliver_policy == wanted.deliver_policy),
        ];
        if let Some((field, _)) = checks.iter().find(|(_, same)| !same) {
            return Err(BusError::ConfigMismatch {
                what: "consumer",
                name: self.name().to_owned(),
                server_version: self.bus.server_version(),
                difference: (*field).to_owned(),
            }
            .into());
        }
        Ok(consumer.messages().await?)
    }

    async fn consume(&self, shutdown: &CancellationToken) -> Result<(), anyhow::Error> {
        let connections = self.bus.connections();
        let (stream, identity) = self.stream().await?;
        let checkpoint = read_checkpoint(self.store.pool(), self.name()).await?;
        if let Some(legacy) = checkpoint.as_ref().filter(|c| c.identity.is_none() && c.sequence > 0) {
            // Written before checkpoints kept their stream's identity: this
            // stream, as long as it still reaches that far.
            if stream.get_info().await?.state.last_sequence >= legacy.sequence {
                adopt_identity(self.store.pool(), self.name(), &identity).await?;
            }
        }
        let checkpoint = read_checkpoint(self.store.pool(), self.name()).await?;
        if !still_valid(&stream, &identity, checkpoint.as_ref()).await? {
            self.rebuild_on(&stream, &identity, false).await?;
        }
        let start = read_checkpoint(self.store.pool(), self.name())
            .await?
            .map_or(0, |c| c.sequence)
            + 1;
        let mut messages = self.consumer(&stream, start).await?;
        let mut parked_poll = tokio::time::interval(PARKED_POLL);
        loop {
            let next = tokio::select! {
                () = shutdown.cancelled() => return Ok(()),
                _ = parked_poll.tick() => {
                    if self.bus.connections() != connections {
                        return Err(Restart::Reconnected.into());
                    }
                    // A stream deleted and created again under the same name.
                    if StreamIdentity::of(&stream.get_info().await?) != identity {
                        return Err(Restart::OtherStream.into());
                    }
                    self.retry_requested(&stream, &identity).await?;
                    continue;
                }
                next = messages.next() => next,
            };
            let Some(message) = next else {
                anyhow::bail!("message stream ended");
            };
            let mut batch = vec![message?];
            // A read model catching up takes what has come already, in one
            // transaction; the consumer's error (or end) after them waits
            // until they are applied.
            let mut after = None;
            if P::READ_MODEL {
                let gathering = std::time::Instant::now();
                while batch.len() < BATCH && gathering.elapsed() < BATCH_TIME {
                    match messages.next().now_or_never() {
                        Some(Some(Ok(message))) => batch.push(message),
                        Some(Some(Err(e))) => {
                            after = Some(anyhow::Error::from(e));
                            break;
                        }
                        Some(None) => {
                            after = Some(anyhow::anyhow!("message stream ended"));
                            break;
                        }
                        None => break,
                    }
                }
            }
            // After a reconnection the server may have lost (and since
            // refilled) its unsynced tail: check the checkpoint against the
            // stream before applying anything more.
            if self.bus.connections() != connections {
                return Err(Restart::Reconnected.into());
            }
            let raws = batch.iter().map(Raw::delivered).collect::<Result<Vec<_>, _>>()?;
            let mut rest = raws.as_slice();
            while let Some((first, after_first)) = rest.split_first() {
                // Again before each step: one by one, with retries, a batch
                // can take long enough for NATS to reconnect meanwhile.
                if self.bus.connections() != connections {
                    return Err(Restart::Reconnected.into());
                }
                if after_first.is_empty() {
                    self.handle_with_retries(&stream, &identity, first, shutdown).await?;
                    break;
                }
                match self.handle_batch(&identity, rest).await? {
                    Batched::Applied => break,
                    // The ones before the failing message as a batch again,
                    // that one on its own (retried, parked), then the rest.
                    Batched::FailedAt(at) => {
                        let (before, from) = rest.split_at(at);
                        let batched =
                            before.len() >= 2 && self.handle_batch(&identity, before).await? == Batched::Applied;
                        let single = if batched { &from[..1] } else { &rest[..=at] };
                        for raw in single {
                            self.handle_with_retries(&stream, &identity, raw, shutdown).await?;
                        }
                        rest = &from[1..];
                    }
                    Batched::Failed => {
                        for raw in rest {
                            if self.bus.connections() != connections {
                                return Err(Restart::Reconnected.into());
                            }
                            self.handle_with_retries(&stream, &identity, raw, shutdown).await?;
                        }
                        break;
                    }
                }
            }
            if let Some(err) = after {
                return Err(err);
            }
        }
    }

    /// Applies consecutive messages of a read model in one transaction, with
    /// one checkpoint write. When they cannot all be applied so (a handler
    /// fails, a message does not decode, a sequence is missing, the database
    /// fails) nothing is written, and the caller applies them one by one,
    /// with retries and parking: from the message that failed, when that is
    /// known. Messages at or below the checkpoint are passed over.
    async fn handle_batch(&self, identity: &StreamIdentity, raws: &[Raw<'_>]) -> Result<Batched, anyhow::Error> {
        match self.try_batch(identity, raws).await {
            Ok(batched) => Ok(batched),
            Err(err) if err.downcast_ref::<Restart>().is_some() => Err(err),
            Err(err) => {
                tracing::debug!(projection = self.name(), messages = raws.len(), error = %err, "a batch failed: its messages one by one");
                Ok(Batched::Failed)
            }
        }
    }

    async fn try_batch(&self, identity: &StreamIdentity, raws: &[Raw<'_>]) -> Result<Batched, anyhow::Error> {
        let mut uow = self.store.begin().await?;
        let checkpoint = lock_read_model_checkpoint(uow.conn(), self.name()).await?;
        let fresh = checkpoint.identity.is_none() && checkpoint.sequence == 0;
        if !fresh && checkpoint.identity.as_ref() != Some(identity) {
            return Err(Restart::OtherStream.into());
        }
        // In stream order: the ones not applied yet are the tail.
        let passed = raws.iter().take_while(|r| r.sequence <= checkpoint.sequence).count();
        let new = &raws[passed..];
        if passed > 0 {
            metrics::counter!("nrm_projection_redelivered_total", "projection" => self.name()).increment(passed as u64);
        }
        let Some(last) = new.last() else {
            return Ok(Batched::Applied);
        };
        let consecutive = new
            .iter()
            .zip(checkpoint.sequence + 1..)
            .all(|(raw, expected)| raw.sequence == expected);
        if !consecutive {
            return Ok(Batched::Failed);
        }
        let mut deliveries = Vec::with_capacity(new.len());
        for (at, raw) in new.iter().enumerate() {
            match raw.delivery() {
                Ok(delivery) => deliveries.push(delivery),
                Err(_) => return Ok(Batched::FailedAt(passed + at)),
            }
        }
        let mut versions = Versions::default();
        versions
            .load(
                uow.conn(),
                self.name(),
                deliveries.iter().map(|d| d.commit.stream_id.as_str()),
            )
            .await?;
        if let Err(err) = self.apply_deliveries(&mut uow, &deliveries, &mut versions).await {
            return Ok(match err.downcast_ref::<AtCommit>() {
                Some(failed) => {
                    tracing::debug!(projection = self.name(), stream_sequence = deliveries[failed.index].stream_sequence, error = %err, "a message of a batch failed: it is applied on its own");
                    Batched::FailedAt(passed + failed.index)
                }
                None => {
                    tracing::debug!(projection = self.name(), messages = deliveries.len(), error = %err, "a batch failed: its messages one by one");
                    Batched::Failed
                }
            });
        }
        versions
            .flush_with_checkpoint(uow.conn(), self.name(), last.sequence, identity, last.commit_id())
            .await?;
        uow.commit().await?;
        metrics::counter!("nrm_projection_applied_total", "projection" => self.name()).increment(new.len() as u64);
        Ok(Batched::Applied)
    }

    /// Applies one message (retrying, then parking it) unless the checkpoint
    /// already covers it. Returns early on shutdown.
    async fn handle_with_retries(
        &self,
        stream: &Stream,
        identity: &StreamIdentity,
        raw: &Raw<'_>,
        shutdown: &CancellationToken,
    ) -> Result<Outcome, anyhow::Error> {
        let mut failures = 0;
        let mut transient = 0;
        loop {
            let err = match self.handle_raw(stream, identity, raw, None).await {
                Ok(outcome) => return Ok(outcome),
                Err(err) if err.downcast_ref::<Restart>().is_some() => return Err(err),
                Err(err) => err,
            };
            let delay = if retry::is_transient(&err) {
                transient += 1;
                tracing::warn!(projection = self.name(), stream_sequence = raw.sequence, error = %err, "database unavailable; retrying the message");
                self.retry.delay(transient)
            } else {
                failures += 1;
                metrics::counter!("nrm_projection_errors_total", "projection" => self.name()).increment(1);
                if is_unprocessable(&err) || self.retry.exhausted(failures) {
                    return self.handle_raw(stream, identity, raw, Some((failures, &err))).await;
                }
                tracing::error!(projection = self.name(), stream_sequence = raw.sequence, attempt = failures, error = %err, "projection handler failed; retrying the message");
                self.retry.delay(failures)
            };
            tokio::select! {
                () = shutdown.cancelled() => return Err(anyhow::anyhow!("shutdown while retrying")),
                () = tokio::time::sleep(delay) => {}
            }
        }
    }

    /// Applies one message unless the checkpoint already covers it. Does not
    /// acknowledge (the ordered consumer needs none). For tests: `message`
    /// from any consumer of the runner's stream.
    ///
    /// # Errors
    /// When the message is not the one after the checkpoint, cannot be
    /// decoded, the handler fails or the database fails; nothing is written then.
    pub async fn handle(&self, message: &async_nats::jetstream::Message) -> Result<Outcome, anyhow::Error> {
        let raw = Raw::delivered(message)?;
        let (stream, identity) = self.stream().await?;
        self.handle_raw(&stream, &identity, &raw, None).await
    }

    /// One attempt at one message; with `park`, sets it aside instead.
    async fn handle_raw(
        &self,
        stream: &Stream,
        identity: &StreamIdentity,
        raw: &Raw<'_>,
        park: Option<(u32, &anyhow::Error)>,
    ) -> Result<Outcome, anyhow::Error> {
        let mut uow = self.store.begin().await?;
        let checkpoint = if P::READ_MODEL {
            lock_read_model_checkpoint(uow.conn(), self.name()).await?
        } else {
            lock_checkpoint(uow.conn(), self.name()).await?
        };
        // A checkpoint that never counted anything takes this stream's identity.
        let fresh = checkpoint.identity.is_none() && checkpoint.sequence == 0;
        if !fresh && checkpoint.identity.as_ref() != Some(identity) {
            return Err(Restart::OtherStream.into());
        }
        if raw.sequence <= checkpoint.sequence {
            metrics::counter!("nrm_projection_redelivered_total", "projection" => self.name()).increment(1);
            return Ok(Outcome::AlreadyApplied);
        }
        let expected = checkpoint.sequence + 1;
        if raw.sequence > expected {
            // Only sequences the stream no longer holds may be passed over.
            for missing in expected..raw.sequence {
                match stream.get_raw_message(missing).await {
                    Err(e) if e.kind() == RawMessageErrorKind::NoMessageFound => {}
                    _ => {
                        return Err(Restart::Gap {
                            expected,
                            got: raw.sequence,
                        }
                        .into());
                    }
                }
            }
            tracing::warn!(
                projection = self.name(),
                from = expected,
                to = raw.sequence - 1,
                "sequences deleted from the stream passed over"
            );
        }
        let outcome = if let Some((attempts, err)) = park {
            park_message(uow.conn(), self.name(), identity, raw, attempts, err).await?;
            metrics::counter!("nrm_projection_parked_total", "projection" => self.name()).increment(1);
            tracing::error!(projection = self.name(), stream = %identity.name, stream_sequence = raw.sequence, commit_id = ?raw.commit_id(), attempts, error = %err, "message parked: the handler kept failing");
            write_checkpoint(uow.conn(), self.name(), raw.sequence, identity, raw.commit_id()).await?;
            Outcome::Parked
        } else {
            let mut versions = Versions::default();
            self.apply(&mut uow, raw, &mut versions).await?;
            versions
                .flush_with_checkpoint(uow.conn(), self.name(), raw.sequence, identity, raw.commit_id())
                .await?;
            Outcome::Applied
        };
        uow.commit().await?;
        if outcome == Outcome::Applied {
            metrics::counter!("nrm_projection_applied_total", "projection" => self.name()).increment(1);
        }
        Ok(outcome)
    }

    /// Decodes and applies one message in `uow`, in the span of the command
    /// that caused it, unless its aggregate is already past it: a commit at
    /// or below the last version applied for its aggregate changes nothing.
    /// The version it brings is noted in `versions`, written by its flush.
    async fn apply(&self, uow: &mut UnitOfWork, raw: &Raw<'_>, versions: &mut Versions) -> Result<(), anyhow::Error> {
        let delivery = raw.delivery()?;
        versions
            .load(uow.conn(), self.name(), [delivery.commit.stream_id.as_str()])
            .await?;
        self.apply_one(uow, &delivery, versions).await
    }

    /// A reaction's parked message, applied on an operator's retry unless
    /// its aggregate has moved past it meanwhile: then acting on it could
    /// act on a state that no longer holds, and passing it over in silence
    /// would lose it (the version guard's "stale" is for redeliveries, not
    /// for a message never applied), so it stays parked, saying why.
    async fn retry_one(
        &self,
        uow: &mut UnitOfWork,
        raw: &Raw<'_>,
        versions: &mut Versions,
    ) -> Result<(), anyhow::Error> {
        let delivery = raw.delivery()?;
        let stream_id = delivery.commit.stream_id.as_str();
        versions.load(uow.conn(), self.name(), [stream_id]).await?;
        if let Some(last) = delivery.commit.events.iter().map(|e| e.version).max()
            && let Some(applied) = versions
                .applied(stream_id)
                .filter(|v| i64::try_from(last).is_ok_and(|l| l <= *v))
        {
            anyhow::bail!(
                "its aggregate has moved past it (this commit ends at version {last}, version {applied} was applied since): not applied, left parked"
            );
        }
        self.apply_one(uow, &delivery, versions).await
    }

    /// [`ProjectionRunner::apply`] of a decoded message whose aggregate
    /// `versions` has loaded; its error as the projection gave it.
    async fn apply_one(
        &self,
        uow: &mut UnitOfWork,
        delivery: &Delivery,
        versions: &mut Versions,
    ) -> Result<(), anyhow::Error> {
        self.apply_deliveries(uow, std::slice::from_ref(delivery), versions)
            .await
            .map_err(|err| match err.downcast::<AtCommit>() {
                Ok(failed) => failed.source,
                Err(err) => err,
            })
    }

    /// Applies decoded messages, in stream order, whose aggregates
    /// `versions` has loaded, as one batch of the projection
    /// ([`Projection::apply_batch`]): each unless its aggregate is already
    /// past it (a commit at or below the last version applied for its
    /// aggregate changes nothing); the versions they bring are noted in
    /// `versions`, written by its flush. An error of one commit
    /// ([`AtCommit`]) names its index in `deliveries`.
    async fn apply_deliveries(
        &self,
        uow: &mut UnitOfWork,
        deliveries: &[Delivery],
        versions: &mut Versions,
    ) -> Result<(), anyhow::Error> {
        let mut admitted = Vec::with_capacity(deliveries.len());
        let mut indices = Vec::with_capacity(deliveries.len());
        for (index, delivery) in deliveries.iter().enumerate() {
            let last = delivery.commit.events.iter().map(|e| e.version).max();
            if let Some(last) = last {
                let last = i64::try_from(last)?;
                if let Some(applied) = versions.admit(&delivery.commit.stream_id, last) {
                    metrics::counter!("nrm_projection_stale_total", "projection" => self.name()).increment(1);
                    tracing::warn!(projection = self.name(), stream_id = %delivery.commit.stream_id, version = last, applied, stream_sequence = delivery.stream_sequence, "commit older than its aggregate's last applied version: skipped");
                    continue;
                }
            }
            admitted.push(delivery);
            indices.push(index);
        }
        if admitted.is_empty() {
            return Ok(());
        }
        self.projection
            .apply_batch(uow, &admitted)
            .await
            .map_err(|err| match err.downcast::<AtCommit>() {
                // Its index among the admitted, as an index of `deliveries`.
                Ok(AtCommit { index, source }) => match indices.get(index) {
                    Some(&index) => AtCommit { index, source }.into(),
                    None => source,
                },
                Err(err) => err,
            })
    }

    /// Applies `deliveries` (decoded, in stream order) in `uow`, their
    /// aggregates' versions read in one statement and written in one.
    async fn apply_all(
        &self,
        uow: &mut UnitOfWork,
        deliveries: &[Delivery],
        versions: &mut Versions,
    ) -> Result<(), anyhow::Error> {
        versions
            .load(
                uow.conn(),
                self.name(),
                deliveries.iter().map(|d| d.commit.stream_id.as_str()),
            )
            .await?;
        self.apply_deliveries(uow, deliveries, versions).await?;
        versions.flush(uow.conn(), self.name()).await
    }

    /// Retries the parked messages an operator asked for. A read model is
    /// rebuilt (reset and full replay in one transaction): applying one old
    /// message out of order could undo what later ones did (a consent
    /// withdrawn after it was recorded); the replay applies it in its place,
    /// and parks it again if it still fails. A reaction applies the message
    /// itself, one transaction each, under a lock on the parked row, so two
    /// replicas never both do.
    async fn retry_requested(&self, stream: &Stream, identity: &StreamIdentity) -> Result<(), anyhow::Error> {
        let requested: Vec<i64> = sqlx::query_scalar(
            "SELECT stream_sequence FROM parked_messages WHERE projection = $1 AND retry_requested ORDER BY stream_sequence",
        )
        .bind(self.name())
        .fetch_all(self.store.pool())
        .await?;
        if requested.is_empty() {
            return Ok(());
        }
        if P::READ_MODEL {
            tracing::info!(
                projection = self.name(),
                parked = requested.len(),
                "retrying parked messages by a rebuild"
            );
            return self.rebuild_on(stream, identity, true).await;
        }
        for sequence in requested {
            let mut uow = self.store.begin().await?;
            let locked: Option<i64> = sqlx::query_scalar(
                "SELECT stream_sequence FROM parked_messages
                 WHERE projection = $1 AND stream_sequence = $2 AND retry_requested FOR UPDATE SKIP LOCKED",
            )
            .bind(self.name())
            .bind(sequence)
            .fetch_optional(uow.conn())
            .await?;
            if locked.is_none() {
                continue;
            }
            let message = stream.get_raw_message(u64::try_from(sequence)?).await;
            let mut versions = Versions::default();
            let result = match &message {
                Ok(m) => match self.retry_one(&mut uow, &Raw::stored(m), &mut versions).await {
                    Ok(()) => versions.flush(uow.conn(), self.name()).await,
                    Err(e) => Err(e),
                },
                Err(e) => Err(anyhow::anyhow!("message no longer in the stream: {e}")),
            };
            match result {
                Ok(()) => {
                    sqlx::query("DELETE FROM parked_messages WHERE projection = $1 AND stream_sequence = $2")
                        .bind(self.name())
                        .bind(sequence)
                        .execute(uow.conn())
                        .await?;
                    uow.commit().await?;
                    tracing::info!(
                        projection = self.name(),
                        stream_sequence = sequence,
                        "parked message applied on retry"
                    );
                }
                Err(err) if retry::is_transient(&err) => return Err(err),
                Err(err) => {
                    drop(uow);
                    sqlx::query(
                        "UPDATE parked_messages SET attempts = attempts + 1, last_error = $3, retry_requested = false
                         WHERE projection = $1 AND stream_sequence = $2",
                    )
                    .bind(self.name())
                    .bind(sequence)
                    .bind(error_text(&err))
                    .execute(self.store.pool())
                    .await?;
                    tracing::error!(projection = self.name(), stream_sequence = sequence, error = %err, "parked message failed again on retry");
                }
            }
        }
        Ok(())
    }

    /// Rebuilds the read model from the current stream, atomically: reset
    /// and full replay in one transaction.
    ///
    /// # Errors
    /// When the database or JetStream fails; the old read model stays then.
    pub async fn rebuild(&self) -> Result<(), anyhow::Error> {
        let (stream, identity) = self.stream().await?;
        self.rebuild_on(&stream, &identity, true).await
    }

    async fn rebuild_on(&self, stream: &Stream, identity: &StreamIdentity, force: bool) -> Result<(), anyhow::Error> {
        let mut uow = self.store.begin().await?;
        if !P::READ_MODEL {
            lock_checkpoint(uow.conn(), self.name()).await?;
            sqlx::query("DELETE FROM parked_messages WHERE projection = $1")
                .bind(self.name())
                .execute(uow.conn())
                .await?;
            write_checkpoint(uow.conn(), self.name(), 0, identity, None).await?;
            uow.commit().await?;
            tracing::info!(projection = self.name(), stream = %identity.name, "reaction starts from the first message of the stream");
            return Ok(());
        }
        let replay = Replay::start(stream, self.source.filter.clone(), false).await?;
        lock_checkpoint(uow.conn(), self.name()).await?;
        let requested: i64 =
            sqlx::query_scalar("SELECT count(*) FROM parked_messages WHERE projection = $1 AND retry_requested")
                .bind(self.name())
                .fetch_one(uow.conn())
                .await?;
        // Another replica may have rebuilt while this one waited for the lock.
        let current = read_checkpoint_in(uow.conn(), self.name()).await?;
        if !force && requested == 0 && still_valid(stream, identity, current.as_ref()).await? {
            return Ok(());
        }
        tracing::info!(projection = self.name(), stream = %identity.name, "rebuilding the read model from the stream");
        let replayed = self.replay_into(&mut uow, identity, replay).await?;
        write_checkpoint(uow.conn(), self.name(), replayed.at.0, identity, replayed.at.1).await?;
        uow.commit().await?;
        metrics::counter!("nrm_projection_rebuilds_total", "projection" => self.name()).increment(1);
        tracing::info!(
            projection = self.name(),
            stream_sequence = replayed.at.0,
            "read model rebuilt"
        );
        Ok(())
    }

    /// Rebuilds the read model from its stream while the service runs and
    /// says whether that equals the live model, up to the very message the
    /// live model had reached (its checkpoint).
    ///
    /// A read model that lists its [`Projection::tables`] and has a digest
    /// is first compared in a *shadow*: in one snapshot (repeatable read,
    /// no lock) the checkpoint and the digest of the live model (a message
    /// commits with its checkpoint, so the two belong together); then, on a
    /// new connection of its own (no statement prepared on it before, closed
    /// afterwards), temporary tables copied from the model's (they shadow
    /// the live names on that connection), the stream replayed into them up
    /// to and including that checkpoint through the same apply path, a
    /// batch per short transaction (a long one would hold back every
    /// relay's horizon, and with it every live update), and digested. The
    /// live model, its checkpoint and its runners are never touched or
    /// waited for. Equal: that is the report. Different: the live model is
    /// repaired as below, and that comparison is the report.
    ///
    /// Otherwise, and to repair, in one transaction: the checkpoint row
    /// locked (the runners of every replica wait), the live model digested,
    /// reset (with its aggregate versions and parked messages, as a rebuild
    /// does), the stream replayed from its start up to and including the
    /// checkpoint's sequence, digested again, the checkpoint written back as
    /// it was.
    ///
    /// A checkpoint that no longer counts in the stream (recreated, or lost
    /// its tail) is rebuilt to the stream's end, as
    /// [`ProjectionRunner::rebuild`] does. A reaction (not a read model) is
    /// left alone: its report says it replayed nothing and has no digests.
    ///
    /// # Errors
    /// When the database or JetStream fails; the live model stays then.
    pub async fn rebuild_compare(&self) -> Result<RebuildReport, anyhow::Error> {
        let mut report = RebuildReport {
            projection: self.name(),
            stream: self.source.stream.clone(),
            stream_sequence: 0,
            messages: 0,
            live_digest: None,
            rebuilt_digest: None,
            parked: 0,
        };
        if !P::READ_MODEL {
            return Ok(report);
        }
        let mut stream = match self.bus.find_stream_named(&self.source.stream).await {
            Ok(stream) => stream,
            Err(BusError::NoStream(_)) => return self.rebuild_without_stream(report).await,
            Err(e) => return Err(e.into()),
        };
        let identity = StreamIdentity::of(stream.info().await?);
        if !self.projection.tables().is_empty() {
            let (checkpoint, live) = self.live_snapshot().await?;
            if live.is_some() && still_valid(&stream, &identity, checkpoint.as_ref()).await? {
                let checkpoint = checkpoint.unwrap_or_default();
                let (rebuilt, replayed) = self.shadow_replay(&stream, &identity, checkpoint.sequence).await?;
                if rebuilt == live {
                    report.stream_sequence = checkpoint.sequence;
                    report.messages = replayed.messages;
                    report.parked = replayed.parked;
                    report.live_digest = live;
                    report.rebuilt_digest = rebuilt;
                    metrics::counter!("nrm_projection_rebuilds_total", "projection" => self.name()).increment(1);
                    tracing::info!(
                        projection = self.name(),
                        stream_sequence = checkpoint.sequence,
                        messages = replayed.messages,
                        parked = replayed.parked,
                        equal = true,
                        "read model compared with its shadow rebuild: equal, left as it is"
                    );
                    return Ok(report);
                }
                tracing::warn!(
                    projection = self.name(),
                    stream_sequence = checkpoint.sequence,
                    "the shadow rebuild differs from the live read model: rebuilding the live model"
                );
            }
        }
        self.rebuild_compare_locked(&stream, &identity, report).await
    }

    /// The checkpoint and the digest of the live model, in one snapshot and
    /// without a lock.
    async fn live_snapshot(&self) -> Result<(Option<Checkpoint>, Option<String>), anyhow::Error> {
        let mut tx = self.store.pool().begin().await?;
        sqlx::query("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
            .execute(&mut *tx)
            .await?;
        let checkpoint = read_checkpoint_in(&mut tx, self.name()).await?;
        let digest = self.projection.digest(&mut tx).await?;
        tx.rollback().await?;
        Ok((checkpoint, digest))
    }

    /// Replays the stream up to and including `until` into temporary copies
    /// of the model's tables on a connection of its own; the digest of
    /// that copy. Nothing of it outlives the connection, closed here.
    async fn shadow_replay(
        &self,
        stream: &Stream,
        identity: &StreamIdentity,
        until: u64,
    ) -> Result<(Option<String>, Replayed), anyhow::Error> {
        // One connection, new: no statement of it was ever prepared against
        // the live tables (a cached plan keeps the table it was planned on).
        // It is never replaced: a second connection would not have the
        // temporary tables (and each batch checks that they are there).
        let pool = sqlx::postgres::PgPoolOptions::new()
            .max_connections(1)
            .min_connections(0)
            .max_lifetime(None)
            .idle_timeout(None)
            .test_before_acquire(false)
            .connect_lazy_with((*self.store.pool().connect_options()).clone());
        let result = self.shadow_replay_on(&pool, stream, identity, until).await;
        pool.close().await;
        result
    }

    async fn shadow_replay_on(
        &self,
        pool: &sqlx::PgPool,
        stream: &Stream,
        identity: &StreamIdentity,
        until: u64,
    ) -> Result<(Option<String>, Replayed), anyhow::Error> {
        let mut tables: Vec<&'static str> = self.projection.tables().to_vec();
        tables.extend(["projection_versions", "parked_messages", "projection_checkpoints"]);
        if let Some(bad) = tables.iter().find(|t| {
            t.is_empty()
                || !t
                    .chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
        }) {
            anyhow::bail!("projection {} lists a table that is no plain name: {bad}", self.name());
        }
        let store = EventStore::new(pool.clone());
        let mut uow = store.begin().await?;
        let pid: i32 = sqlx::query_scalar("SELECT pg_backend_pid()")
            .fetch_one(uow.conn())
            .await?;
        // A model of many rows: temporary tables live in this session's buffers.
        sqlx::query("SET temp_buffers = '64MB'").execute(uow.conn()).await?;
        sqlx::query("SET synchronous_commit = off").execute(uow.conn()).await?;
        sqlx::query("SELECT set_config('search_path', 'pg_temp, ' || current_setting('search_path'), false)")
            .execute(uow.conn())
            .await?;
        for table in &tables {
            let schema: Option<String> = sqlx::query_scalar(
                "SELECT n.nspname::text FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
                 WHERE c.oid = to_regclass(quote_ident($1))",
            )
            .bind(table)
            .fetch_optional(uow.conn())
            .await?;
            let schema =
                schema.ok_or_else(|| anyhow::anyhow!("table {table} of projection {} does not exist", self.name()))?;
            // Names checked above, the schema quoted by PostgreSQL's own rules.
            sqlx::query(sqlx::AssertSqlSafe(format!(
                "CREATE TEMPORARY TABLE \"{table}\" (LIKE {}.\"{table}\" INCLUDING ALL)",
                quote_identifier(&schema)
            )))
            .execute(uow.conn())
            .await?;
        }
        uow.commit().await?;
        // From now on the session writes nothing but its temporary tables:
        // PostgreSQL refuses any other write (and NOTIFY) in a read-only
        // transaction, so a projection writing a table it does not list in
        // `tables()` fails the comparison instead of writing the live one.
        // `nrm.shadow` tells a projection's statements that they replay
        // into a shadow.
        sqlx::query(
            "SELECT set_config('nrm.shadow', 'on', false), set_config('default_transaction_read_only', 'on', false)",
        )
        .execute(&mut *pool.acquire().await?)
        .await?;
        tracing::info!(projection = self.name(), stream = %identity.name, stream_sequence = until, "replaying the stream into a shadow of the read model to compare it with the live one");
        let mut replay = Replay::start_until(stream, self.source.filter.clone(), false, Some(until)).await?;
        let mut replayed = Replayed::default();
        let mut versions = Versions::after_reset();
        let none = HashMap::new();
        loop {
            let batch = next_batch(&mut replay, SHADOW_BATCH).await?;
            if batch.is_empty() {
                break;
            }
            // Not `replaying`: each batch is a short transaction of its own
            // and derives what it touched as a live one does, so that the
            // shadow never holds one long transaction (and with it every
            // relay's horizon) for all of its derived rows at the end.
            let mut uow = store.begin().await?;
            still_shadowed(uow.conn(), &tables, pid).await?;
            // Impatient: a failing message is set aside in the shadow at once
            // (the transaction holds back every relay while it is open, and
            // a shadow that differs is rebuilt in place, patiently, anyway).
            self.replay_batch(
                &mut uow,
                identity,
                &batch,
                None,
                &none,
                &mut versions,
                &mut replayed,
                false,
            )
            .await
            .map_err(|e| self.outside_tables(e))?;
            uow.commit().await.map_err(|e| self.outside_tables(e.into()))?;
            // This service's relay may have found a commit held back by
            // that transaction: it need not wait for its next poll.
            self.store.appended_signal().notify_one();
        }
        let mut conn = pool.acquire().await?;
        still_shadowed(&mut conn, &tables, pid).await?;
        let digest = self.projection.digest(&mut conn).await?;
        Ok((digest, replayed))
    }

    /// A shadow's error: a write refused as read-only (25006) means the
    /// projection writes a table outside [`Projection::tables`], a fault of
    /// the code, not a passing one.
    fn outside_tables(&self, err: anyhow::Error) -> anyhow::Error {
        let read_only = err.chain().any(|cause| {
            cause
                .downcast_ref::<sqlx::Error>()
                .and_then(|e| e.as_database_error())
                .and_then(|d| d.code())
                .is_some_and(|code| code == "25006")
        });
        if read_only {
            anyhow::anyhow!(
                "projection {} writes a table (or sends a notification) outside the tables it lists in tables(): its comparison cannot be made in a shadow",
                self.name()
            )
        } else {
            err
        }
    }

    /// [`ProjectionRunner::rebuild_compare`] under the checkpoint lock,
    /// the live model rebuilt in place.
    async fn rebuild_compare_locked(
        &self,
        stream: &Stream,
        identity: &StreamIdentity,
        mut report: RebuildReport,
    ) -> Result<RebuildReport, anyhow::Error> {
        let mut uow = self.store.begin().await?;
        let checkpoint = lock_checkpoint(uow.conn(), self.name()).await?;
        report.live_digest = self.projection.digest(uow.conn()).await?;
        let same_stream = still_valid(stream, identity, Some(&checkpoint)).await?;
        let until = same_stream.then_some(checkpoint.sequence);
        if !same_stream {
            tracing::warn!(projection = self.name(), stream = %identity.name, "the checkpoint no longer counts in the stream: rebuilt to the stream's end");
        }
        let replay = Replay::start_until(stream, self.source.filter.clone(), false, until).await?;
        tracing::info!(projection = self.name(), stream = %identity.name, stream_sequence = ?until, "rebuilding the read model to compare it with the live one");
        let replayed = self.replay_into(&mut uow, identity, replay).await?;
        report.rebuilt_digest = self.projection.digest(uow.conn()).await?;
        let (sequence, commit_id) = if same_stream {
            (checkpoint.sequence, checkpoint.commit_id)
        } else {
            replayed.at
        };
        write_checkpoint(uow.conn(), self.name(), sequence, identity, commit_id).await?;
        uow.commit().await?;
        report.stream_sequence = sequence;
        report.messages = replayed.messages;
        report.parked = replayed.parked;
        metrics::counter!("nrm_projection_rebuilds_total", "projection" => self.name()).increment(1);
        if report.live_digest.is_some() && !report.equal() {
            metrics::counter!("nrm_projection_rebuild_differences_total", "projection" => self.name()).increment(1);
        }
        tracing::info!(
            projection = self.name(),
            stream_sequence = sequence,
            messages = replayed.messages,
            parked = replayed.parked,
            equal = report.equal(),
            "read model rebuilt and compared"
        );
        Ok(report)
    }

    /// [`ProjectionRunner::rebuild_compare`] of a read model whose stream
    /// does not exist (yet): one that never counted a message is what a
    /// replay of nothing gives, the empty model; one that did stays as it
    /// is (the stream's own service creates and refills it) and the call fails.
    async fn rebuild_without_stream(&self, mut report: RebuildReport) -> Result<RebuildReport, anyhow::Error> {
        let mut uow = self.store.begin().await?;
        let checkpoint = lock_checkpoint(uow.conn(), self.name()).await?;
        if checkpoint.sequence > 0 {
            anyhow::bail!(
                "stream {} does not exist, and {} had counted {} messages of it: the read model stays as it is until the stream is back",
                self.source.stream,
                self.name(),
                checkpoint.sequence
            );
        }
        report.live_digest = self.projection.digest(uow.conn()).await?;
        self.reset_in(&mut uow).await?;
        report.rebuilt_digest = self.projection.digest(uow.conn()).await?;
        uow.commit().await?;
        tracing::info!(projection = self.name(), stream = %self.source.stream, equal = report.equal(), "read model of a stream that does not exist yet: compared with the empty model");
        Ok(report)
    }

    /// Resets the read model, its aggregate versions and its parked messages.
    async fn reset_in(&self, uow: &mut UnitOfWork) -> Result<(), anyhow::Error> {
        self.projection.reset(uow.conn()).await?;
        sqlx::query("DELETE FROM projection_versions WHERE projection = $1")
            .bind(self.name())
            .execute(uow.conn())
            .await?;
        sqlx::query("DELETE FROM parked_messages WHERE projection = $1")
            .bind(self.name())
            .execute(uow.conn())
            .await?;
        Ok(())
    }

    /// The one replay loop of a rebuild, in `uow` (whose checkpoint row is
    /// locked): resets the read model, its aggregate versions and its parked
    /// messages, and applies every message `replay` delivers.
    async fn replay_into(
        &self,
        uow: &mut UnitOfWork,
        identity: &StreamIdentity,
        mut replay: Replay,
    ) -> Result<Replayed, anyhow::Error> {
        // A retried message starts a fresh round of attempts on top of its count.
        let earlier: HashMap<u64, u32> = sqlx::query_as::<_, (i64, i32)>(
            "SELECT stream_sequence, attempts FROM parked_messages WHERE projection = $1 AND retry_requested",
        )
        .bind(self.name())
        .fetch_all(uow.conn())
        .await?
        .into_iter()
        .map(|(sequence, attempts)| {
            (
                u64::try_from(sequence).unwrap_or(0),
                u32::try_from(attempts).unwrap_or(0),
            )
        })
        .collect();
        self.reset_in(uow).await?;
        uow.set_replaying();
        let mut replayed = Replayed::default();
        let mut versions = Versions::after_reset();
        // The next batches are read from the stream and decoded while this
        // one is written (the stream, the decoding and the database each
        // wait less on the others); the reader stops with the replay,
        // however it ends.
        let (batches, mut next) = tokio::sync::mpsc::channel(READ_AHEAD);
        let mut reader = tokio_util::task::AbortOnDropHandle::new(tokio::spawn(
            async move {
                loop {
                    let batch = next_batch(&mut replay, BATCH).await.map(ReadBatch::decoded);
                    let last = batch.as_ref().map_or(true, |b| b.messages.is_empty());
                    if batches.send(batch).await.is_err() || last {
                        return;
                    }
                }
            }
            .in_current_span(),
        ));
        loop {
            let Some(batch) = next.recv().await else {
                // It sends an end or an error before it returns: it panicked.
                // Not the panic's message: it may hold what the task read.
                let how = match (&mut reader).await {
                    Err(e) if e.is_panic() => "panicked",
                    Err(_) => "was cancelled",
                    Ok(()) => "returned",
                };
                anyhow::bail!("the replay's reader {how} before the end");
            };
            let ReadBatch { messages, deliveries } = batch?;
            if messages.is_empty() {
                self.projection.after_replay(uow.conn()).await?;
                return Ok(replayed);
            }
            self.replay_batch(
                uow,
                identity,
                &messages,
                deliveries,
                &earlier,
                &mut versions,
                &mut replayed,
                true,
            )
            .await?;
            drop_elsewhere(messages);
        }
    }

    /// Messages of a rebuild under one savepoint; when one of them fails,
    /// the savepoint is rolled back and each message applied on its own
    /// ([`ProjectionRunner::apply_in_rebuild`]: retried, then parked).
    /// `decoded`: their deliveries as [`ReadBatch::decoded`] gave them, if
    /// the reader decoded them already (else they are decoded here).
    #[allow(clippy::too_many_arguments)] // One call site each for rebuilds and shadows.
    async fn replay_batch(
        &self,
        uow: &mut UnitOfWork,
        identity: &StreamIdentity,
        batch: &[async_nats::jetstream::Message],
        decoded: Option<Result<Vec<Delivery>, anyhow::Error>>,
        earlier: &HashMap<u64, u32>,
        versions: &mut Versions,
        replayed: &mut Replayed,
        patient: bool,
    ) -> Result<(), anyhow::Error> {
        let raws = batch.iter().map(Raw::delivered).collect::<Result<Vec<_>, _>>()?;
        let decoded = decoded.unwrap_or_else(|| raws.iter().map(Raw::delivery).collect());
        sqlx::query("SAVEPOINT nrm_batch").execute(uow.conn()).await?;
        let applied = match decoded {
            Ok(deliveries) => {
                let applied = self.apply_all(uow, &deliveries, versions).await;
                drop_elsewhere(deliveries);
                applied
            }
            Err(err) => Err(err),
        };
        match applied {
            Ok(()) => {
                sqlx::query("RELEASE SAVEPOINT nrm_batch").execute(uow.conn()).await?;
            }
            Err(err) if retry::is_transient(&err) => return Err(err),
            Err(err) => {
                sqlx::query("ROLLBACK TO SAVEPOINT nrm_batch")
                    .execute(uow.conn())
                    .await?;
                versions.discard();
                tracing::debug!(projection = self.name(), error = %err, messages = raws.len(), "a batch of a rebuild failed: its messages one by one");
                for raw in &raws {
                    let before = earlier.get(&raw.sequence).copied().unwrap_or(0);
                    if self
                        .apply_in_rebuild(uow, identity, raw, before, versions, patient)
                        .await?
                    {
                        replayed.parked += 1;
                    }
                }
            }
        }
        if let Some(last) = raws.last() {
            replayed.at = (last.sequence, last.commit_id());
        }
        replayed.messages += raws.len() as u64;
        Ok(())
    }

    /// One message of a rebuild, under a savepoint: retried, then parked,
    /// without losing the rest of the rebuild. True when it was parked.
    async fn apply_in_rebuild(
        &self,
        uow: &mut UnitOfWork,
        identity: &StreamIdentity,
        raw: &Raw<'_>,
        earlier_attempts: u32,
        versions: &mut Versions,
        patient: bool,
    ) -> Result<bool, anyhow::Error> {
        let mut failures = 0;
        loop {
            sqlx::query("SAVEPOINT nrm_message").execute(uow.conn()).await?;
            let applied = match self.apply(uow, raw, versions).await {
                Ok(()) => versions.flush(uow.conn(), self.name()).await,
                Err(err) => Err(err),
            };
            match applied {
                Ok(()) => {
                    sqlx::query("RELEASE SAVEPOINT nrm_message").execute(uow.conn()).await?;
                    return Ok(false);
                }
                Err(err) if retry::is_transient(&err) => return Err(err),
                Err(err) => {
                    sqlx::query("ROLLBACK TO SAVEPOINT nrm_message")
                        .execute(uow.conn())
                        .await?;
                    versions.discard();
                    failures += 1;
                    if !patient || is_unprocessable(&err) || self.retry.exhausted(failures) {
                        park_message(
                            uow.conn(),
                            self.name(),
                            identity,
                            raw,
                            earlier_attempts + failures,
                            &err,
                        )
                        .await?;
                        metrics::counter!("nrm_projection_parked_total", "projection" => self.name()).increment(1);
                        tracing::error!(projection = self.name(), stream_sequence = raw.sequence, error = %err, "message parked during a rebuild");
                        return Ok(true);
                    }
                    tokio::time::sleep(self.retry.delay(failures)).await;
                }
            }
        }
    }
}

/// A batch of a rebuild's replay as its reader hands it over: the messages
/// and, decoded from them ahead of their writing, their deliveries.
struct ReadBatch {
    messages: Vec<async_nats::jetstream::Message>,
    /// What [`ProjectionRunner::replay_batch`] would decode from them (the
    /// first message that does not decode, as its error: the batch then
    /// goes one by one, and that message is parked in its place); `None`
    /// when one is not a JetStream message, which the writer reports as
    /// before, in its turn.
    deliveries: Option<Result<Vec<Delivery>, anyhow::Error>>,
}

impl ReadBatch {
    /// `messages` with their deliveries decoded.
    fn decoded(messages: Vec<async_nats::jetstream::Message>) -> Self {
        let deliveries = messages
            .iter()
            .map(Raw::delivered)
            .collect::<Result<Vec<_>, _>>()
            .ok()
            .map(|raws| raws.iter().map(Raw::delivery).collect());
        Self { messages, deliveries }
    }
}

/// Frees `value` in a task of its own: a batch's messages and commits are
/// thousands of allocations (header maps, strings, events), which the
/// replay's writer need not free between two batches' writes.
fn drop_elsewhere<T: Send + 'static>(value: T) {
    drop(tokio::spawn(async move { drop(value) }));
}

/// The next messages of `replay`, at most `most`; none at its end.
async fn next_batch(replay: &mut Replay, most: usize) -> Result<Vec<async_nats::jetstream::Message>, anyhow::Error> {
    let mut batch = Vec::new();
    while batch.len() < most {
        match replay.next().await? {
            Some(message) => batch.push(message),
            None => break,
        }
    }
    Ok(batch)
}

/// Whether `checkpoint` counts in `stream` as it is now: same identity, and
/// the message at the checkpoint is still the one that was applied.
async fn still_valid(
    stream: &Stream,
    identity: &StreamIdentity,
    checkpoint: Option<&Checkpoint>,
) -> Result<bool, anyhow::Error> {
    let Some(checkpoint) = checkpoint else {
        return Ok(false);
    };
    if checkpoint.identity.as_ref() != Some(identity) {
        return Ok(false);
    }
    if checkpoint.sequence == 0 {
        return Ok(true);
    }
    match stream.get_raw_message(checkpoint.sequence).await {
        Ok(message) => {
            let at = message
                .headers
                .get("Nats-Msg-Id")
                .and_then(|v| v.as_str().parse::<Uuid>().ok());
            Ok(at == checkpoint.commit_id)
        }
        Err(e) if e.kind() == RawMessageErrorKind::NoMessageFound => {
            // Deleted from a stream that still holds later messages: fine;
            // beyond its end: the stream lost its tail.
            Ok(stream.get_info().await?.state.last_sequence > checkpoint.sequence)
        }
        Err(e) => Err(e.into()),
    }
}

fn checkpoint_from_row(row: &sqlx::postgres::PgRow) -> Result<Checkpoint, sqlx::Error> {
    let name: Option<String> = row.try_get("stream_name")?;
    let created: Option<i64> = row.try_get("stream_created")?;
    Ok(Checkpoint {
        sequence: u64::try_from(row.try_get::<i64, _>("stream_sequence")?).unwrap_or(0),
        identity: name
            .zip(created)
            .map(|(name, created)| StreamIdentity { name, created }),
        commit_id: row.try_get("commit_id")?,
    })
}

async fn read_checkpoint(pool: &sqlx::PgPool, projection: &str) -> Result<Option<Checkpoint>, anyhow::Error> {
    let mut conn = pool.acquire().await?;
    read_checkpoint_in(&mut conn, projection).await
}

async fn read_checkpoint_in(conn: &mut PgConnection, projection: &str) -> Result<Option<Checkpoint>, anyhow::Error> {
    let row = sqlx::query(
        "SELECT stream_sequence, stream_name, stream_created, commit_id FROM projection_checkpoints WHERE projection = $1",
    )
    .bind(projection)
    .fetch_optional(conn)
    .await?;
    Ok(row.as_ref().map(checkpoint_from_row).transpose()?)
}

/// Gives a checkpoint written before checkpoints kept an identity the
/// identity of `stream`.
async fn adopt_identity(pool: &sqlx::PgPool, projection: &str, identity: &StreamIdentity) -> Result<(), anyhow::Error> {
    sqlx::query(
        "UPDATE projection_checkpoints SET stream_name = $2, stream_created = $3
         WHERE projection = $1 AND stream_name IS NULL",
    )
    .bind(projection)
    .bind(&identity.name)
    .bind(identity.created)
    .execute(pool)
    .await?;
    tracing::info!(projection, stream = %identity.name, "checkpoint of an earlier version takes the stream's identity");
    Ok(())
}

/// Locks the runner's checkpoint row for this transaction (creating an empty
/// one first), so replicas take turns.
async fn lock_checkpoint(conn: &mut PgConnection, projection: &str) -> Result<Checkpoint, anyhow::Error> {
    sqlx::query(
        "INSERT INTO projection_checkpoints (projection, stream_sequence) VALUES ($1, 0) ON CONFLICT (projection) DO NOTHING",
    )
    .bind(projection)
    .execute(&mut *conn)
    .await?;
    let row = sqlx::query(
        "SELECT stream_sequence, stream_name, stream_created, commit_id FROM projection_checkpoints
         WHERE projection = $1 FOR UPDATE",
    )
    .bind(projection)
    .fetch_one(&mut *conn)
    .await?;
    Ok(checkpoint_from_row(&row)?)
}

/// [`read_model_commit`] and [`lock_checkpoint`] in one round trip, for the
/// live runner: each round trip of a batch is lag between a command and its
/// read model. Only a runner's first transaction (no row yet) takes them
/// one by one.
async fn lock_read_model_checkpoint(conn: &mut PgConnection, projection: &str) -> Result<Checkpoint, anyhow::Error> {
    let row = sqlx::query(
        "SELECT set_config('synchronous_commit', 'off', true), stream_sequence, stream_name, stream_created, commit_id
         FROM projection_checkpoints WHERE projection = $1 FOR UPDATE",
    )
    .bind(projection)
    .fetch_optional(&mut *conn)
    .await?;
    match row {
        Some(row) => Ok(checkpoint_from_row(&row)?),
        None => {
            read_model_commit(conn).await?;
            lock_checkpoint(conn, projection).await
        }
    }
}

/// Lets the transaction of a read model (never a reaction's, whose events
/// the relay publishes) return before its commit is flushed to disk: its
/// checkpoint commits with its effects, so a tail lost in a crash of
/// PostgreSQL is applied again from the stream.
async fn read_model_commit(conn: &mut PgConnection) -> Result<(), anyhow::Error> {
    sqlx::query("SET LOCAL synchronous_commit = off").execute(conn).await?;
    Ok(())
}

async fn write_checkpoint(
    conn: &mut PgConnection,
    projection: &str,
    sequence: u64,
    identity: &StreamIdentity,
    commit_id: Option<Uuid>,
) -> Result<(), anyhow::Error> {
    sqlx::query(
        "UPDATE projection_checkpoints
         SET stream_sequence = $2, stream_name = $3, stream_created = $4, commit_id = $5, updated_at = now()
         WHERE projection = $1",
    )
    .bind(projection)
    .bind(i64::try_from(sequence)?)
    .bind(&identity.name)
    .bind(identity.created)
    .bind(commit_id)
    .execute(conn)
    .await?;
    Ok(())
}

async fn park_message(
    conn: &mut PgConnection,
    projection: &str,
    identity: &StreamIdentity,
    raw: &Raw<'_>,
    attempts: u32,
    err: &anyhow::Error,
) -> Result<(), anyhow::Error> {
    sqlx::query(
        "INSERT INTO parked_messages (projection, stream_sequence, stream_name, subject, commit_id, attempts, last_error)
         VALUES ($1, $2, $3, $4, $5, $6, $7)
         ON CONFLICT (projection, stream_sequence) DO UPDATE
         SET attempts = EXCLUDED.attempts, last_error = EXCLUDED.last_error, parked_at = now(), retry_requested = false",
    )
    .bind(projection)
    .bind(i64::try_from(raw.sequence)?)
    .bind(&identity.name)
    .bind(raw.subject)
    .bind(raw.commit_id())
    .bind(i32::try_from(attempts).unwrap_or(i32::MAX))
    .bind(error_text(err))
    .execute(conn)
    .await?;
    Ok(())
}

/// Fails unless `conn` is still the shadow's connection (backend `pid`)
/// and each of `tables` resolves to its temporary copy there.
async fn still_shadowed(conn: &mut PgConnection, tables: &[&str], pid: i32) -> Result<(), anyhow::Error> {
    let (now, all): (i32, bool) = sqlx::query_as(
        "SELECT pg_backend_pid(), coalesce(bool_and(c.relnamespace = pg_my_temp_schema()), false)
         FROM unnest($1::text[]) AS t(name) LEFT JOIN pg_class c ON c.oid = to_regclass(quote_ident(t.name))",
    )
    .bind(tables)
    .fetch_one(conn)
    .await?;
    if now != pid || !all {
        anyhow::bail!("the shadow's connection lost its temporary tables");
    }
    Ok(())
}

/// `name` as a quoted SQL identifier.
fn quote_identifier(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// An error as kept with a parked item: the chain, shortened. Handlers'
/// errors carry IDs and codes only.
pub(crate) fn error_text(err: &anyhow::Error) -> String {
    let mut text = format!("{err:#}");
    if text.len() > MAX_ERROR_TEXT {
        let mut end = MAX_ERROR_TEXT;
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        text.truncate(end);
    }
    text
}
