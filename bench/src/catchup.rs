//! Catch-up after an outage: how fast the kernel's relay empties an outbox
//! that filled while it could not publish, and how fast a projection runner
//! brings a read model up to a stream that grew while it did not run.
//!
//! Everything runs on the benchmark's servers, on scratch databases migrated
//! like the identification service's and a NATS space (subjects and stream)
//! of its own, with the identification service's events: a
//! `PresumedVictimReported` opening every case, `ScreeningCompleted` after
//! it. The backlog is committed by [`EventStore::append_command`] (as the
//! services commit a command) while no relay runs; then the real loops run
//! in tasks, [`Relay::run`] and [`ProjectionRunner::run`], and the outbox
//! and the checkpoint are polled until they are done.
//!
//! - Relay: the backlog spread over as many aggregates as commits (every
//!   case reported once, as traffic is), the relay elected onto it (as after
//!   an outage of NATS or of the relay: every pending row is checked against
//!   the stream first); the same backlog held back by an open transaction
//!   while the relay leads (no checks); and a backlog concentrated on a few
//!   aggregates with many commits each (per-aggregate order lets one round
//!   carry only one commit of an aggregate).
//! - Projection: `CaseList` from the stream the spread run filled, on a
//!   database of its own: rebuilt (no checkpoint: reset and replay in one
//!   transaction), and live (a valid checkpoint that far behind: one
//!   transaction per message); then the outage as a whole, the runner idle
//!   and current while the backlog waits in the outbox, until the read model
//!   is current after the relay starts.

use std::time::Duration;

use anyhow::{Context as _, bail};
use nrm_identification::app::{CONTEXT, PAYLOAD_TYPE};
use nrm_identification::domain;
use nrm_identification::projections::CaseList;
use nrm_kernel::bus::{Bus, StreamIdentity};
use nrm_kernel::ids::CaseId;
use nrm_kernel::projection::{Projection as _, ProjectionRunner};
use nrm_kernel::relay::{Relay, RelayConfig};
use nrm_kernel::settings::{DatabaseSettings, NatsSettings};
use nrm_kernel::store::{Append, Appended, AuditEntry, CommandRecord, EventStore, NewEvent};
use nrm_proto::common::v1 as common;
use nrm_proto::identification::v1 as pb;
use pb::identification_event::Event;
use prost::Message as _;
use sqlx::PgPool;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::append::{self, ACTION, FINGERPRINT, PURPOSE, RESPONSE};
use crate::stats::{self, CpuSample, LoadGenerator};

/// Concurrent writers of a backlog.
pub const WRITERS: usize = 8;
/// How often the outbox and the checkpoint are polled.
const POLL: Duration = Duration::from_millis(20);
/// Longest a catch-up may take before the run fails.
const LIMIT: Duration = Duration::from_secs(600);
/// Bytes of sealed personal data in every report (a sealed record of identifiers is about this long).
const SEALED_BYTES: usize = 256;
/// JetStream look-ups timed for the cost of the relay's check of rows pending at its election.
const LOOKUPS: usize = 1000;

/// What to measure.
#[derive(Debug, Clone)]
pub struct Plan {
    /// Commits in each backlog (0: nothing).
    pub commits: usize,
    /// Aggregates of the concentrated backlog (0: skip it).
    pub hot_aggregates: usize,
    /// Measure the relay.
    pub relay: bool,
    /// Measure the projection runner.
    pub projection: bool,
}

/// CPU time per commit or message, µs, by process.
#[derive(Debug, Clone, Copy, Default)]
pub struct Cpu {
    /// This process: the relay or the runner (and the benchmark's polling).
    pub this_process_us: f64,
    /// The PostgreSQL cluster.
    pub postgres_us: f64,
    /// The nats-server (0 when it was not found).
    pub nats_us: f64,
    /// Everything else on the machine: near 0 on a quiet machine.
    pub rest_us: f64,
    /// Whether the nats-server process was found (else it counts in `rest_us`).
    pub nats_found: bool,
}

impl Cpu {
    /// Share of all CPUs the rest of the machine took at `per_sec` items a second.
    #[must_use]
    pub fn rest_share(&self, per_sec: f64, cpus: usize) -> f64 {
        if cpus == 0 {
            return 0.0;
        }
        self.rest_us * per_sec / 1e6 / cpus as f64
    }
}

/// One relay catch-up.
#[derive(Debug, Clone, Default)]
pub struct RelayRun {
    /// Whether the relay was already leading, the backlog held back by an open transaction.
    pub held_back: bool,
    /// Aggregates the backlog is spread over.
    pub aggregates: usize,
    /// Commits per aggregate.
    pub per_aggregate: usize,
    /// Commits in the backlog.
    pub commits: usize,
    /// From the relay's start until the outbox first shrank (election, stream check, first round).
    pub first_round: Duration,
    /// From the relay's start until the outbox was empty.
    pub elapsed: Duration,
    /// Rounds that published (the relay's `nrm_relay_round_seconds` count).
    pub rounds: u64,
    /// Time in those rounds' publish step (look-ups, publish, acknowledgements, outbox delete).
    pub publish: Duration,
    /// CPU per commit.
    pub cpu: Option<Cpu>,
}

impl RelayRun {
    /// Commits per second.
    #[must_use]
    pub fn rate(&self) -> f64 {
        per_sec(self.commits, self.elapsed)
    }
}

/// Sequential JetStream look-ups of a subject's last message, as the relay
/// makes one for every row pending at its election.
#[derive(Debug, Clone, Default)]
pub struct Lookups {
    /// Look-ups timed, for subjects the stream lacks.
    pub count: usize,
    /// Median, µs.
    pub p50_us: u64,
    /// 99th percentile, µs.
    pub p99_us: u64,
}

/// How a projection run starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Start {
    /// No checkpoint: the runner rebuilds (reset and replay in one transaction).
    #[default]
    Rebuild,
    /// A valid checkpoint at the stream's start: one transaction per message.
    Live,
    /// The runner current and idle on an empty stream; the backlog waits in the outbox until a relay starts.
    Outage,
}

/// One projection catch-up.
#[derive(Debug, Clone, Default)]
pub struct ProjectionRun {
    /// How it starts.
    pub start: Start,
    /// Messages to apply.
    pub messages: u64,
    /// From the start until the checkpoint first moved (none for a rebuild,
    /// whose checkpoint moves once, at its commit).
    pub first_applied: Option<Duration>,
    /// From the start (of the runner, or of the relay after an outage) until the checkpoint reached the stream's end.
    pub elapsed: Duration,
    /// After an outage: from the relay's start until the outbox was empty.
    pub relay_elapsed: Option<Duration>,
    /// Rows in `case_list` afterwards (one per case).
    pub rows: i64,
    /// CPU per message.
    pub cpu: Option<Cpu>,
}

impl ProjectionRun {
    /// Messages per second.
    #[must_use]
    pub fn rate(&self) -> f64 {
        per_sec(usize::try_from(self.messages).unwrap_or(usize::MAX), self.elapsed)
    }
}

/// Everything this module measured.
#[derive(Debug, Clone, Default)]
pub struct CatchUpResults {
    /// Relay catch-ups.
    pub relay: Vec<RelayRun>,
    /// The cost of the relay's look-ups.
    pub lookups: Option<Lookups>,
    /// Projection catch-ups.
    pub projection: Vec<ProjectionRun>,
    /// One-row autocommitted inserts, one after another, just before the live run: p50 and p99, µs.
    pub commit_us: Option<(u64, u64)>,
    /// Encoded bytes of a report event's payload.
    pub report_bytes: usize,
    /// Encoded bytes of a screening event's payload.
    pub screening_bytes: usize,
    /// Other processes' share of the CPUs when a measurement started anyway (waited for quiet in vain).
    pub busy_at_start: Vec<f64>,
}

fn per_sec(items: usize, elapsed: Duration) -> f64 {
    let secs = elapsed.as_secs_f64();
    if secs > 0.0 { items as f64 / secs } else { 0.0 }
}

/// A scratch database migrated like the identification service's.
struct Scratch {
    database: DatabaseSettings,
    store: EventStore,
}

impl Scratch {
    async fn new(database_url: &str, tag: &str) -> anyhow::Result<Self> {
        let database = DatabaseSettings {
            url: database_url.to_owned(),
            name: format!("bench_{tag}_{}", &uuid::Uuid::new_v4().simple().to_string()[..12]),
            max_connections: 16,
        };
        let pool = nrm_kernel::db::connect_and_migrate(&database, &nrm_identification::startup::MIGRATIONS)
            .await
            .with_context(|| format!("create the scratch database {}", database.name))?;
        Ok(Self {
            database,
            store: EventStore::new(pool),
        })
    }

    fn pool(&self) -> &PgPool {
        self.store.pool()
    }

    async fn outbox(&self) -> anyhow::Result<i64> {
        Ok(sqlx::query_scalar("SELECT count(*) FROM outbox")
            .fetch_one(self.pool())
            .await?)
    }

    async fn checkpoint(&self) -> anyhow::Result<Option<i64>> {
        Ok(
            sqlx::query_scalar("SELECT stream_sequence FROM projection_checkpoints WHERE projection = $1")
                .bind(CaseList.name())
                .fetch_optional(self.pool())
                .await?,
        )
    }

    async fn case_rows(&self) -> anyhow::Result<i64> {
        Ok(sqlx::query_scalar("SELECT count(*) FROM case_list")
            .fetch_one(self.pool())
            .await?)
    }

    /// As autovacuum leaves the tables during a long outage, then a checkpoint.
    async fn settle(&self) -> anyhow::Result<()> {
        sqlx::raw_sql("VACUUM ANALYZE outbox, commits, events")
            .execute(self.pool())
            .await?;
        sqlx::raw_sql("CHECKPOINT").execute(self.pool()).await?;
        Ok(())
    }

    /// Waits until a relay holds this database's relay lock (a session advisory lock).
    async fn wait_for_leader(&self) -> anyhow::Result<()> {
        let waited = Instant::now();
        loop {
            let led: bool = sqlx::query_scalar(
                "SELECT EXISTS (SELECT 1 FROM pg_locks WHERE locktype = 'advisory' AND granted
                 AND database = (SELECT oid FROM pg_database WHERE datname = current_database()))",
            )
            .fetch_one(self.pool())
            .await?;
            if led {
                // Past its election: the stream check on an empty store is quick.
                tokio::time::sleep(Duration::from_millis(500)).await;
                return Ok(());
            }
            if waited.elapsed() > Duration::from_secs(30) {
                bail!("no relay was elected within 30 s");
            }
            tokio::time::sleep(POLL).await;
        }
    }

    fn relay(&self, space: &Space) -> Relay {
        Relay::new(
            self.pool().clone(),
            space.bus.clone(),
            CONTEXT,
            self.store.appended_signal(),
            RelayConfig::new(PAYLOAD_TYPE),
        )
    }

    fn runner(&self, space: &Space) -> ProjectionRunner<CaseList> {
        ProjectionRunner::new(self.store.clone(), space.bus.clone(), CONTEXT, CaseList)
    }

    async fn drop_all(self) {
        self.store.pool().close().await;
        if let Err(err) = nrm_kernel::db::drop_database(&self.database).await {
            eprintln!("bench: could not drop {}: {err}", self.database.name);
        }
    }
}

/// Subjects and a stream of their own on the benchmark's NATS server.
struct Space {
    bus: Bus,
}

impl Space {
    async fn new(nats_url: &str) -> anyhow::Result<Self> {
        let id = uuid::Uuid::new_v4().simple().to_string()[..12].to_owned();
        let settings = NatsSettings {
            url: nats_url.to_owned(),
            subject_prefix: format!("c{id}"),
            stream_prefix: format!("C{}", id.to_ascii_uppercase()),
            replicas: 1,
            duplicate_window_seconds: 120,
        };
        let bus = Bus::connect(&settings).await?;
        bus.ensure_stream(CONTEXT).await?;
        Ok(Self { bus })
    }

    async fn stream(&self) -> anyhow::Result<async_nats::jetstream::stream::Stream> {
        Ok(self.bus.jetstream().get_stream(self.bus.stream_name(CONTEXT)).await?)
    }

    async fn messages(&self) -> anyhow::Result<(u64, u64)> {
        let mut stream = self.stream().await?;
        let state = &stream.info().await?.state;
        Ok((state.messages, state.last_sequence))
    }

    async fn delete(self) {
        let _ = self.bus.jetstream().delete_stream(self.bus.stream_name(CONTEXT)).await;
    }
}

/// CPU counters at the start of a measurement.
struct Meter {
    sample: CpuSample,
    nats_pid: Option<u32>,
    nats_us: f64,
}

impl Meter {
    fn start(nats_pid: Option<u32>) -> Self {
        Self {
            sample: CpuSample::now(),
            nats_pid,
            nats_us: nats_pid.map_or(0.0, stats::process_cpu_us),
        }
    }

    fn per_item(&self, items: usize) -> Option<Cpu> {
        let later = CpuSample::now();
        let items = u64::try_from(items).unwrap_or(u64::MAX);
        let own = self.sample.per_op(&later, items, LoadGenerator::ThisProcess)?;
        let nats = self.nats_pid.map_or(0.0, |pid| {
            (stats::process_cpu_us(pid) - self.nats_us).max(0.0) / items.max(1) as f64
        });
        Some(Cpu {
            this_process_us: own.client_us,
            postgres_us: own.server_us,
            nats_us: nats,
            rest_us: (own.other_us - nats).max(0.0),
            nats_found: self.nats_pid.is_some(),
        })
    }
}

/// The port of a `nats://host:port` URL (4222 when it names none).
fn nats_port(url: &str) -> u16 {
    let rest = url.split_once("://").map_or(url, |(_, r)| r);
    let host_port = rest.rsplit_once('@').map_or(rest, |(_, h)| h);
    let host_port = host_port.split(['/', ',']).next().unwrap_or(host_port);
    host_port
        .rsplit_once(':')
        .and_then(|(_, p)| p.parse().ok())
        .unwrap_or(4222)
}

fn timestamp(at: chrono::DateTime<chrono::Utc>) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: at.timestamp(),
        nanos: i32::try_from(at.timestamp_subsec_nanos()).unwrap_or(0),
    }
}

/// The first event of a case, as the identification service writes it (coded fields, sealed identifiers).
pub(crate) fn report_event(case: CaseId) -> pb::IdentificationEvent {
    let person_id = uuid::Uuid::now_v7().to_string();
    let now = chrono::Utc::now();
    pb::IdentificationEvent {
        event: Some(Event::PresumedVictimReported(pb::PresumedVictimReported {
            case_id: case.to_string(),
            person_id: person_id.clone(),
            reporting_agency: "kg-mvd".into(),
            competent_authority: "kg-mvd".into(),
            matching_case_ids: Vec::new(),
            reported_at: Some(timestamp(now)),
            found_at: Some(timestamp(now - chrono::Duration::days(2))),
            found_country: "KG".into(),
            found_region: "KG-C".into(),
            country_of_exploitation: "RU".into(),
            exploitation_forms: vec![pb::ExploitationForm::Labour as i32],
            means_of_control: vec![1, 3],
            recruitment_method: pb::RecruitmentMethod::JobOffer as i32,
            recruiter_relationship: 1,
            child: false,
            gender: common::Gender::Female as i32,
            age_years: Some(27),
            age_band: 4,
            citizenship: "KG".into(),
            personal: Some(common::SealedData {
                person_id,
                key_version: 1,
                nonce: vec![0x11; 24],
                ciphertext: append::payload(SEALED_BYTES),
            }),
            status: pb::CaseStatus::Reported as i32,
        })),
    }
}

/// A later event of a case.
pub(crate) fn screening_event(case: CaseId) -> pb::IdentificationEvent {
    pb::IdentificationEvent {
        event: Some(Event::ScreeningCompleted(pb::ScreeningCompleted {
            case_id: case.to_string(),
            indicators: vec![
                pb::Indicator::DeceptionAboutWork as i32,
                pb::Indicator::DocumentsRetained as i32,
            ],
            screened_at: Some(timestamp(chrono::Utc::now())),
        })),
    }
}

/// Commits `aggregates` × `per_aggregate` single-event commands, interleaved
/// across aggregates (each writer goes round its aggregates one version at a
/// time), by [`WRITERS`] writers. No relay runs.
async fn append_backlog(
    scratch: &Scratch,
    space: &Space,
    aggregates: usize,
    per_aggregate: usize,
) -> anyhow::Result<()> {
    let started = Instant::now();
    let mut writers = Vec::new();
    for w in 0..WRITERS.min(aggregates.max(1)) {
        let store = scratch.store.clone();
        let bus = space.bus.clone();
        writers.push(tokio::spawn(async move {
            let cases: Vec<CaseId> = (w..aggregates).step_by(WRITERS).map(|_| CaseId::new()).collect();
            for version in 0..per_aggregate {
                for &case in &cases {
                    let event = if version == 0 {
                        report_event(case)
                    } else {
                        screening_event(case)
                    };
                    let events = [NewEvent {
                        event_type: if version == 0 {
                            "PresumedVictimReported"
                        } else {
                            "ScreeningCompleted"
                        }
                        .into(),
                        schema_version: 1,
                        payload: event.encode_to_vec(),
                    }];
                    let stream_id = domain::stream_id(case);
                    let subject = bus.subject(CONTEXT, domain::NAME, &case.to_string());
                    let metadata = append::metadata();
                    let expected = u64::try_from(version).unwrap_or(u64::MAX);
                    let plan = Appended::plan(expected, 1);
                    let key = format!("kg-mvd:{}", uuid::Uuid::new_v4());
                    let subject_id = case.to_string();
                    store
                        .append_command(
                            &Append {
                                stream_id: &stream_id,
                                expected_version: expected,
                                events: &events,
                                metadata: &metadata,
                                subject: &subject,
                            },
                            &plan,
                            &CommandRecord {
                                request_key: &key,
                                fingerprint: &FINGERPRINT,
                                response: &RESPONSE,
                            },
                            Some(&AuditEntry {
                                action: ACTION,
                                subject_id: &subject_id,
                                purpose: PURPOSE,
                                person_id: None,
                            }),
                        )
                        .await?;
                }
            }
            anyhow::Ok(())
        }));
    }
    for writer in writers {
        writer.await??;
    }
    eprintln!(
        "bench: backlog of {} commits committed in {:.1} s",
        aggregates * per_aggregate,
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

/// `(rounds, seconds in rounds)` from the relay's round histogram so far.
fn relay_rounds() -> (u64, f64) {
    let text = nrm_kernel::server::metrics_handle().render();
    let value = |name: &str| -> f64 {
        text.lines()
            .filter(|l| {
                l.strip_prefix(name)
                    .is_some_and(|rest| rest.starts_with(' ') || rest.starts_with('{'))
            })
            .filter_map(|l| l.rsplit_once(' ').and_then(|(_, v)| v.parse::<f64>().ok()))
            .sum()
    };
    (
        value("nrm_relay_round_seconds_count") as u64,
        value("nrm_relay_round_seconds_sum"),
    )
}

/// Every measurement of this module.
///
/// # Errors
/// When a server fails or a catch-up does not finish within [`LIMIT`].
pub async fn run(
    database_url: &str,
    nats_url: &str,
    plan: &Plan,
    quiet: &mut Duration,
) -> anyhow::Result<CatchUpResults> {
    // The relay's round histogram is read from the process-wide recorder.
    let _ = nrm_kernel::server::metrics_handle();
    let nats_pid = stats::listening_pid(nats_port(nats_url));
    if nats_pid.is_none() {
        eprintln!("bench: the nats-server process was not found: its CPU counts as the rest of the machine");
    }
    let sample = CaseId::new();
    let mut results = CatchUpResults {
        report_bytes: report_event(sample).encoded_len(),
        screening_bytes: screening_event(sample).encoded_len(),
        ..CatchUpResults::default()
    };
    let commits = plan.commits;
    if commits == 0 || !(plan.relay || plan.projection) {
        return Ok(results);
    }
    let mut ctx = Ctx {
        database_url,
        nats_pid,
        quiet,
        busy: Vec::new(),
    };
    // The spread backlog; its stream feeds the projection runs.
    let space = Space::new(nats_url).await?;
    let scratch = Scratch::new(database_url, "relay").await?;
    let outcome = spread_and_projection(&mut ctx, &scratch, &space, plan, &mut results).await;
    scratch.drop_all().await;
    space.delete().await;
    outcome?;
    if plan.relay {
        let space = Space::new(nats_url).await?;
        let scratch = Scratch::new(database_url, "relay").await?;
        let outcome = relay_catch_up(&mut ctx, &scratch, &space, commits, 1, true).await;
        scratch.drop_all().await;
        space.delete().await;
        results.relay.push(outcome?);
    }
    if plan.relay && plan.hot_aggregates > 0 {
        let aggregates = plan.hot_aggregates.min(commits);
        let per_aggregate = commits.div_ceil(aggregates);
        let space = Space::new(nats_url).await?;
        let scratch = Scratch::new(database_url, "relay").await?;
        let outcome = relay_catch_up(&mut ctx, &scratch, &space, aggregates, per_aggregate, false).await;
        scratch.drop_all().await;
        space.delete().await;
        results.relay.push(outcome?);
    }
    if plan.projection {
        let space = Space::new(nats_url).await?;
        let scratch = Scratch::new(database_url, "outage").await?;
        let outcome = outage(&mut ctx, &scratch, &space, commits).await;
        scratch.drop_all().await;
        space.delete().await;
        results.projection.push(outcome?);
    }
    results.busy_at_start = ctx.busy;
    Ok(results)
}

/// What every measurement needs.
struct Ctx<'a> {
    database_url: &'a str,
    nats_pid: Option<u32>,
    quiet: &'a mut Duration,
    busy: Vec<f64>,
}

impl Ctx<'_> {
    async fn wait_for_quiet(&mut self) {
        if let Some(share) = stats::wait_for_quiet(self.quiet, 0.10).await {
            self.busy.push(share);
        }
    }
}

async fn spread_and_projection(
    ctx: &mut Ctx<'_>,
    scratch: &Scratch,
    space: &Space,
    plan: &Plan,
    results: &mut CatchUpResults,
) -> anyhow::Result<()> {
    let run = relay_catch_up(ctx, scratch, space, plan.commits, 1, false).await?;
    if plan.relay {
        results.relay.push(run);
        results.lookups = Some(lookups(space).await?);
    }
    if plan.projection {
        for start in [Start::Rebuild, Start::Live] {
            let reader = Scratch::new(ctx.database_url, "projection").await?;
            if start == Start::Live {
                results.commit_us = Some(commit_latency(reader.pool()).await?);
            }
            let outcome = projection_catch_up(ctx, &reader, space, start).await;
            reader.drop_all().await;
            results.projection.push(outcome?);
        }
    }
    Ok(())
}

/// A backlog of `aggregates` × `per_aggregate` commits, then a relay until
/// the outbox is empty. Unless `held_back`, the relay starts on the backlog
/// (elected onto it, as after an outage of the relay's process or of NATS:
/// every pending row is checked against the stream first); with
/// `held_back`, the relay leads from the start and the backlog forms behind
/// an open transaction (the relay's horizon), which then ends.
async fn relay_catch_up(
    ctx: &mut Ctx<'_>,
    scratch: &Scratch,
    space: &Space,
    aggregates: usize,
    per_aggregate: usize,
    held_back: bool,
) -> anyhow::Result<RelayRun> {
    let shutdown = CancellationToken::new();
    let mut task = None;
    let mut blocker = None;
    if held_back {
        task = Some(tokio::spawn(scratch.relay(space).run(shutdown.clone())));
        scratch.wait_for_leader().await?;
        let mut tx = scratch.pool().begin().await?;
        sqlx::query("SELECT pg_current_xact_id()").execute(&mut *tx).await?;
        blocker = Some(tx);
    }
    let outcome = relay_measure(
        ctx,
        scratch,
        space,
        aggregates,
        per_aggregate,
        &shutdown,
        &mut task,
        blocker,
    )
    .await;
    shutdown.cancel();
    if let Some(task) = task {
        let _ = tokio::time::timeout(Duration::from_secs(10), task).await;
    }
    outcome
}

#[allow(clippy::too_many_arguments)]
async fn relay_measure(
    ctx: &mut Ctx<'_>,
    scratch: &Scratch,
    space: &Space,
    aggregates: usize,
    per_aggregate: usize,
    shutdown: &CancellationToken,
    task: &mut Option<tokio::task::JoinHandle<()>>,
    blocker: Option<sqlx::Transaction<'static, sqlx::Postgres>>,
) -> anyhow::Result<RelayRun> {
    let commits = aggregates * per_aggregate;
    let held_back = blocker.is_some();
    append_backlog(scratch, space, aggregates, per_aggregate).await?;
    scratch.settle().await?;
    if scratch.outbox().await? != i64::try_from(commits)? {
        bail!("commits left the outbox before the relay was to start");
    }
    ctx.wait_for_quiet().await;
    eprintln!(
        "bench: relay catch-up, {aggregates} aggregates × {per_aggregate} commits{}",
        if held_back { ", relay leading, held back" } else { "" }
    );
    let (rounds_before, seconds_before) = relay_rounds();
    let meter = Meter::start(ctx.nats_pid);
    let started = Instant::now();
    match blocker {
        Some(tx) => {
            tx.rollback().await?;
            // As the next commit in this process would wake it.
            scratch.store.appended_signal().notify_one();
        }
        None => *task = Some(tokio::spawn(scratch.relay(space).run(shutdown.clone()))),
    }
    let total = i64::try_from(commits)?;
    let mut first_round = None;
    let outcome = loop {
        tokio::time::sleep(POLL).await;
        let left = scratch.outbox().await?;
        if left < total && first_round.is_none() {
            first_round = Some(started.elapsed());
        }
        if left == 0 {
            break Ok(started.elapsed());
        }
        if started.elapsed() > LIMIT {
            break Err(anyhow::anyhow!(
                "the relay left {left} of {commits} commits in the outbox after {} s",
                LIMIT.as_secs()
            ));
        }
    };
    let cpu = meter.per_item(commits);
    let (rounds_after, seconds_after) = relay_rounds();
    let elapsed = outcome?;
    let (stream_messages, _) = space.messages().await?;
    if stream_messages != u64::try_from(commits)? {
        bail!("the stream holds {stream_messages} messages after the relay emptied an outbox of {commits}");
    }
    Ok(RelayRun {
        held_back,
        aggregates,
        per_aggregate,
        commits,
        first_round: first_round.unwrap_or(elapsed),
        elapsed,
        rounds: rounds_after.saturating_sub(rounds_before),
        publish: Duration::from_secs_f64((seconds_after - seconds_before).max(0.0)),
        cpu,
    })
}

/// One-row autocommitted inserts into a table of their own, one after
/// another: p50 and p99 of the commit, µs.
async fn commit_latency(pool: &PgPool) -> anyhow::Result<(u64, u64)> {
    sqlx::raw_sql("CREATE TABLE bench_commit_probe (n integer)")
        .execute(pool)
        .await?;
    let mut histogram = stats::new_histogram()?;
    for n in 0..220 {
        let sent = Instant::now();
        sqlx::query("INSERT INTO bench_commit_probe VALUES ($1)")
            .bind(n)
            .execute(pool)
            .await?;
        if n >= 20 {
            stats::record(&mut histogram, sent.elapsed());
        }
    }
    sqlx::raw_sql("DROP TABLE bench_commit_probe").execute(pool).await?;
    Ok((histogram.value_at_quantile(0.50), histogram.value_at_quantile(0.99)))
}

/// [`LOOKUPS`] sequential look-ups of the last message of subjects the stream lacks.
async fn lookups(space: &Space) -> anyhow::Result<Lookups> {
    let stream = space.stream().await?;
    let mut histogram = stats::new_histogram()?;
    for n in 0..LOOKUPS + 50 {
        let subject = space.bus.subject(CONTEXT, domain::NAME, &CaseId::new().to_string());
        let sent = Instant::now();
        let found = stream.get_last_raw_message_by_subject(&subject).await;
        if found.is_ok() {
            bail!("a subject never published holds a message");
        }
        if n >= 50 {
            stats::record(&mut histogram, sent.elapsed());
        }
    }
    Ok(Lookups {
        count: LOOKUPS,
        p50_us: histogram.value_at_quantile(0.50),
        p99_us: histogram.value_at_quantile(0.99),
    })
}

/// `CaseList` on `reader` (a database of its own) from the stream's start until its checkpoint reaches the stream's end.
async fn projection_catch_up(
    ctx: &mut Ctx<'_>,
    reader: &Scratch,
    space: &Space,
    start: Start,
) -> anyhow::Result<ProjectionRun> {
    let (messages, last) = space.messages().await?;
    if start == Start::Live {
        // Valid and behind: the stream's identity, nothing applied yet.
        let mut stream = space.stream().await?;
        let identity = StreamIdentity::of(stream.info().await?);
        sqlx::query(
            "INSERT INTO projection_checkpoints (projection, stream_sequence, stream_name, stream_created, commit_id)
             VALUES ($1, 0, $2, $3, NULL)",
        )
        .bind(CaseList.name())
        .bind(&identity.name)
        .bind(identity.created)
        .execute(reader.pool())
        .await?;
    }
    sqlx::raw_sql("CHECKPOINT").execute(reader.pool()).await?;
    ctx.wait_for_quiet().await;
    eprintln!("bench: projection catch-up ({start:?}), {messages} messages");
    let meter = Meter::start(ctx.nats_pid);
    let shutdown = CancellationToken::new();
    let started = Instant::now();
    let task = tokio::spawn(reader.runner(space).run(shutdown.clone()));
    let target = i64::try_from(last)?;
    let mut first_applied = None;
    let outcome = loop {
        tokio::time::sleep(POLL).await;
        let at = reader.checkpoint().await?.unwrap_or(0);
        if at > 0 && first_applied.is_none() {
            first_applied = Some(started.elapsed());
        }
        if at >= target {
            break Ok(started.elapsed());
        }
        if started.elapsed() > LIMIT {
            break Err(anyhow::anyhow!(
                "the runner's checkpoint stood at {at} of {target} after {} s",
                LIMIT.as_secs()
            ));
        }
    };
    let cpu = meter.per_item(usize::try_from(messages)?);
    shutdown.cancel();
    let _ = tokio::time::timeout(Duration::from_secs(10), task).await;
    let elapsed = outcome?;
    Ok(ProjectionRun {
        start,
        messages,
        first_applied: if start == Start::Rebuild { None } else { first_applied },
        elapsed,
        relay_elapsed: None,
        rows: reader.case_rows().await?,
        cpu,
    })
}

/// The outage as a whole: the runner current on an empty stream, a backlog
/// of `commits` cases in the outbox of the same database, then a relay;
/// until the runner's checkpoint reaches the stream's end.
async fn outage(ctx: &mut Ctx<'_>, scratch: &Scratch, space: &Space, commits: usize) -> anyhow::Result<ProjectionRun> {
    let shutdown = CancellationToken::new();
    let runner = tokio::spawn(scratch.runner(space).run(shutdown.clone()));
    let outcome = outage_with_runner(ctx, scratch, space, commits).await;
    shutdown.cancel();
    let _ = tokio::time::timeout(Duration::from_secs(10), runner).await;
    outcome
}

async fn outage_with_runner(
    ctx: &mut Ctx<'_>,
    scratch: &Scratch,
    space: &Space,
    commits: usize,
) -> anyhow::Result<ProjectionRun> {
    // The runner takes the empty stream as its own (a rebuild of nothing).
    let waited = Instant::now();
    loop {
        let ready: Option<bool> =
            sqlx::query_scalar("SELECT stream_name IS NOT NULL FROM projection_checkpoints WHERE projection = $1")
                .bind(CaseList.name())
                .fetch_optional(scratch.pool())
                .await?;
        if ready == Some(true) {
            break;
        }
        if waited.elapsed() > Duration::from_secs(30) {
            bail!("the runner did not take the empty stream within 30 s");
        }
        tokio::time::sleep(POLL).await;
    }
    append_backlog(scratch, space, commits, 1).await?;
    scratch.settle().await?;
    ctx.wait_for_quiet().await;
    eprintln!("bench: after the outage, relay and runner, {commits} commits");
    let meter = Meter::start(ctx.nats_pid);
    let shutdown = CancellationToken::new();
    let started = Instant::now();
    let task = tokio::spawn(scratch.relay(space).run(shutdown.clone()));
    let target = i64::try_from(commits)?;
    let mut relay_elapsed = None;
    let mut first_applied = None;
    let outcome = loop {
        tokio::time::sleep(POLL).await;
        if relay_elapsed.is_none() && scratch.outbox().await? == 0 {
            relay_elapsed = Some(started.elapsed());
        }
        let at = scratch.checkpoint().await?.unwrap_or(0);
        if at > 0 && first_applied.is_none() {
            first_applied = Some(started.elapsed());
        }
        if at >= target && relay_elapsed.is_some() {
            break Ok(started.elapsed());
        }
        if started.elapsed() > LIMIT {
            break Err(anyhow::anyhow!(
                "after {} s the outbox held {} and the checkpoint stood at {at} of {target}",
                LIMIT.as_secs(),
                scratch.outbox().await?
            ));
        }
    };
    let cpu = meter.per_item(commits);
    shutdown.cancel();
    let _ = tokio::time::timeout(Duration::from_secs(10), task).await;
    let elapsed = outcome?;
    let (messages, _) = space.messages().await?;
    Ok(ProjectionRun {
        start: Start::Outage,
        messages,
        first_applied,
        elapsed,
        relay_elapsed,
        rows: scratch.case_rows().await?,
        cpu,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nats_ports_come_from_the_url() {
        assert_eq!(nats_port("nats://127.0.0.1:14222"), 14222);
        assert_eq!(nats_port("nats://user:pw@localhost:4333/"), 4333);
        assert_eq!(nats_port("localhost"), 4222);
    }

    #[test]
    fn events_decode_as_the_case_list_reads_them() {
        let case = CaseId::new();
        let bytes = report_event(case).encode_to_vec();
        let decoded = pb::IdentificationEvent::decode(bytes.as_slice()).unwrap();
        assert!(matches!(decoded.event, Some(Event::PresumedVictimReported(r)) if r.case_id == case.to_string()));
    }
}
