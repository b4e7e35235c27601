//! Quiescence, the checks, the rebuild and the summary.
//!
//! After the faults the checker waits until the system is quiet, by
//! conditions and never by sleeping: every outbox empty, every projection's
//! checkpoint at the last message of its stream that its filter takes, and
//! no timer due. Then it
//! 1. sends every acknowledged command once more (same request, same
//!    request ID): the answer must be the first one, marked as a replay, and
//!    no event may be added;
//! 2. dumps every read model, rebuilds them all (services stopped,
//!    checkpoints deleted, read-model tables emptied, durable consumers
//!    deleted, services started: every projection replays its stream) and
//!    dumps them again: the two dumps must be equal;
//! 3. reads every event store and every stream whole and holds them against
//!    the history: nothing acknowledged is missing from its store, every
//!    stored event is on its stream, no commit or event twice on a stream, no
//!    second bed or escalation for a referral, no shelter over-booked, no
//!    command applied twice, no refused command that left an event, and
//!    every aggregate's commits on the bus in version order.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::fmt::Write as _;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use async_nats::jetstream;
use async_nats::jetstream::stream::RawMessageErrorKind;
use futures::StreamExt as _;
use nrm_proto::common::v1::EventCommit;
use nrm_proto::referral::v1 as rf;
use nrm_proto::shelter::v1 as sh;
use prost::Message as _;
use sqlx::{PgPool, Row as _};

use super::inject::{FaultKind, FaultLog, Service, Services, Stack};
use super::load::{self, History, Kind, Load, Op, Outcome, Replay};
use super::{Plan, Verdict};

/// The kernel's tables: everything else in a service's database is a read
/// model or a table its commands keep.
const KERNEL_TABLES: &[&str] = &[
    "events",
    "outbox",
    "commands",
    "projection_checkpoints",
    "person_keys",
    "audit_log",
    "timers",
    "commits",
    "parked_messages",
];

/// The read-model tables each projection empties before a rebuild (its `reset`).
const PROJECTION_TABLES: &[(Service, &[&str])] = &[
    (Service::Identification, &["case_list", "consents", "referrals"]),
    (Service::Referral, &["persons", "inbox"]),
    (
        Service::Shelter,
        &[
            "free_capacity",
            "free_capacity_shelters",
            "free_capacity_holds",
            "shelter_referrals",
        ],
    ),
];

/// Timers that fall due this soon are waited for before the read models are dumped.
const TIMER_HORIZON: Duration = Duration::from_secs(60);

/// A projection (or reaction) of a service: its checkpoint name and the
/// context stream it reads. Every one of them takes the whole stream, as
/// `Kit::project` runs it (`Bus::context_subjects`): its checkpoint ends at
/// the stream's last message, whatever that message's subject.
struct ProjectionSpec {
    service: Service,
    name: &'static str,
    stream: Service,
}

const PROJECTIONS: [ProjectionSpec; 8] = [
    ProjectionSpec {
        service: Service::Identification,
        name: "identification_case_list",
        stream: Service::Identification,
    },
    ProjectionSpec {
        service: Service::Identification,
        name: "identification_referral_access",
        stream: Service::Referral,
    },
    ProjectionSpec {
        service: Service::Referral,
        name: "referral_persons",
        stream: Service::Identification,
    },
    ProjectionSpec {
        service: Service::Referral,
        name: "referral_inbox",
        stream: Service::Referral,
    },
    ProjectionSpec {
        service: Service::Referral,
        name: "referral_shelter_answers",
        stream: Service::Shelter,
    },
    ProjectionSpec {
        service: Service::Shelter,
        name: "shelter_free_capacity",
        stream: Service::Shelter,
    },
    ProjectionSpec {
        service: Service::Shelter,
        name: "shelter_placement",
        stream: Service::Referral,
    },
    ProjectionSpec {
        service: Service::Shelter,
        name: "shelter_referrals",
        stream: Service::Referral,
    },
];

/// NATS subject matching with `*` and `>`.
fn subject_matches(pattern: &str, subject: &str) -> bool {
    let mut p = pattern.split('.');
    let mut s = subject.split('.');
    loop {
        match (p.next(), s.next()) {
            (Some(">"), Some(_)) => return true,
            (Some("*"), Some(_)) => {}
            (Some(a), Some(b)) if a == b => {}
            (None, None) => return true,
            _ => return false,
        }
    }
}

/// What the checker needs from the run.
pub(crate) struct Inputs<'a> {
    pub(crate) plan: &'a Plan,
    pub(crate) seed: u64,
    pub(crate) stack: &'a Arc<Stack>,
    pub(crate) services: &'a Arc<Services>,
    pub(crate) faults: &'a Arc<FaultLog>,
    pub(crate) history: &'a Arc<History>,
    pub(crate) load: &'a Arc<Load>,
    pub(crate) load_time: Duration,
    pub(crate) setup_failures: Vec<String>,
}

/// One message of a stream.
#[derive(Debug, Clone)]
struct Msg {
    seq: u64,
    subject: String,
    stream_id: Option<String>,
    version: Option<i64>,
    msg_id: Option<String>,
    commit: Option<EventCommit>,
}

/// What was read of one stream.
#[derive(Debug, Default)]
struct StreamCache {
    created: Option<String>,
    next: u64,
    messages: BTreeMap<u64, Msg>,
    /// Sequences inside the stream's range that hold no message (deleted).
    missing: BTreeSet<u64>,
    /// Set when the stream was not there, or recreated while the checker watched.
    notes: Vec<String>,
}

/// Connections to every database and to JetStream.
struct Probe {
    pools: BTreeMap<Service, PgPool>,
    js: jetstream::Context,
    subject_prefix: String,
    stream_prefix: String,
    streams: BTreeMap<Service, StreamCache>,
    timers_parked_column: bool,
}

impl Probe {
    async fn connect(stack: &Stack, services: &Services) -> anyhow::Result<Self> {
        let mut pools = BTreeMap::new();
        for service in Service::ALL {
            let settings = nrm_kernel::settings::DatabaseSettings {
                url: stack.database_url.clone(),
                name: service.name().to_owned(),
                max_connections: 4,
            };
            let pool = sqlx::postgres::PgPoolOptions::new()
                .max_connections(4)
                .acquire_timeout(Duration::from_secs(10))
                .connect_with(nrm_kernel::db::connect_options(&settings)?)
                .await
                .with_context(|| format!("connecting to the {} database", service.name()))?;
            pools.insert(service, pool);
        }
        let nats = async_nats::connect(stack.nats_url.as_str())
            .await
            .context("connecting to NATS")?;
        let mut probe = Self {
            pools,
            js: jetstream::new(nats),
            subject_prefix: services.subject_prefix.clone(),
            stream_prefix: services.stream_prefix.clone(),
            streams: BTreeMap::new(),
            timers_parked_column: false,
        };
        probe.timers_parked_column = probe.column_exists(Service::Referral, "timers", "parked_at").await;
        Ok(probe)
    }

    fn pool(&self, service: Service) -> &PgPool {
        &self.pools[&service]
    }

    fn stream_name(&self, service: Service) -> String {
        format!("{}_{}", self.stream_prefix, service.name().to_ascii_uppercase())
    }

    async fn table_exists(&self, service: Service, table: &str) -> bool {
        sqlx::query_scalar::<_, bool>(
            "SELECT EXISTS (SELECT 1 FROM information_schema.tables WHERE table_schema = 'public' AND table_name = $1)",
        )
        .bind(table)
        .fetch_one(self.pool(service))
        .await
        .unwrap_or(false)
    }

    async fn column_exists(&self, service: Service, table: &str, column: &str) -> bool {
        sqlx::query_scalar::<_, bool>(
            "SELECT EXISTS (SELECT 1 FROM information_schema.columns
             WHERE table_schema = 'public' AND table_name = $1 AND column_name = $2)",
        )
        .bind(table)
        .bind(column)
        .fetch_one(self.pool(service))
        .await
        .unwrap_or(false)
    }

    /// Reads the messages of `service`'s stream that are new since the last call
    /// (all of them with `fresh`).
    async fn refresh(&mut self, service: Service, fresh: bool) -> anyhow::Result<()> {
        let name = self.stream_name(service);
        if fresh {
            self.streams.remove(&service);
        }
        let cache = self.streams.entry(service).or_default();
        let mut stream = match self.js.get_stream(&name).await {
            Ok(stream) => stream,
            Err(err) => {
                let note = format!("stream {name} not found: {err}");
                if !cache.notes.contains(&note) {
                    cache.notes.push(note);
                }
                return Ok(());
            }
        };
        let info = stream.info().await.with_context(|| format!("info of {name}"))?.clone();
        let created = format!("{:?}", info.created);
        if cache.created.as_ref().is_some_and(|c| *c != created) {
            cache
                .notes
                .push(format!("stream {name} was recreated while the checker watched"));
            cache.messages.clear();
            cache.missing.clear();
            cache.next = 0;
        }
        cache.created = Some(created);
        let first = info.state.first_sequence.max(1);
        let last = info.state.last_sequence;
        let from = cache.next.max(first);
        if info.state.messages == 0 || from > last {
            cache.next = cache.next.max(last + 1);
            return Ok(());
        }
        let stream = &stream;
        let fetched: Vec<(u64, anyhow::Result<Option<Msg>>)> = futures::stream::iter(from..=last)
            .map(|seq| async move { (seq, fetch(stream, seq).await) })
            .buffer_unordered(32)
            .collect()
            .await;
        for (seq, message) in fetched {
            match message? {
                Some(message) => {
                    cache.messages.insert(seq, message);
                }
                None => {
                    cache.missing.insert(seq);
                }
            }
        }
        cache.next = last + 1;
        Ok(())
    }

    async fn refresh_all(&mut self, fresh: bool) -> anyhow::Result<()> {
        for service in Service::ALL {
            self.refresh(service, fresh).await?;
        }
        Ok(())
    }

    /// The last sequence of `stream` whose subject `filter` takes (0: none).
    fn last_matching(&self, stream: Service, filter: &str) -> u64 {
        let pattern = format!("{}.{filter}", self.subject_prefix);
        self.streams.get(&stream).map_or(0, |cache| {
            cache
                .messages
                .values()
                .rev()
                .find(|m| subject_matches(&pattern, &m.subject))
                .map_or(0, |m| m.seq)
        })
    }

    /// What keeps the system from being quiet, empty when it is.
    async fn unquiet(&mut self, horizon: Duration) -> Vec<String> {
        let mut waiting = Vec::new();
        if let Err(err) = self.refresh_all(false).await {
            waiting.push(format!("streams unreadable: {err:#}"));
            return waiting;
        }
        for service in Service::ALL {
            let pool = self.pool(service);
            match sqlx::query_scalar::<_, i64>("SELECT count(*) FROM outbox")
                .fetch_one(pool)
                .await
            {
                Ok(0) => {}
                Ok(n) => waiting.push(format!("{} outbox holds {n} rows", service.name())),
                Err(err) => waiting.push(format!("{} outbox unreadable: {err}", service.name())),
            }
            // A parked timer is reported on its own, not waited for.
            let sql = if self.timers_parked_column {
                "SELECT count(*) FROM timers WHERE fired_at IS NULL AND parked_at IS NULL
                 AND due_at <= now() + make_interval(secs => $1)"
            } else {
                "SELECT count(*) FROM timers WHERE fired_at IS NULL AND due_at <= now() + make_interval(secs => $1)"
            };
            match sqlx::query_scalar::<_, i64>(sql)
                .bind(horizon.as_secs_f64())
                .fetch_one(pool)
                .await
            {
                Ok(0) => {}
                Ok(n) => waiting.push(format!(
                    "{} has {n} timers due (or due within {} s) and not fired",
                    service.name(),
                    horizon.as_secs()
                )),
                Err(err) => waiting.push(format!("{} timers unreadable: {err}", service.name())),
            }
        }
        for spec in &PROJECTIONS {
            let target = self.last_matching(spec.stream, &format!("{}.v1.>", spec.stream.name()));
            let checkpoint: Result<Option<i64>, _> =
                sqlx::query_scalar("SELECT stream_sequence FROM projection_checkpoints WHERE projection = $1")
                    .bind(spec.name)
                    .fetch_optional(self.pool(spec.service))
                    .await;
            match checkpoint {
                Ok(checkpoint) => {
                    let at = u64::try_from(checkpoint.unwrap_or(0)).unwrap_or(0);
                    if at < target {
                        waiting.push(format!(
                            "{} checkpoint at {at}, its stream {} at {target}",
                            spec.name,
                            self.stream_name(spec.stream)
                        ));
                    } else if at > target {
                        waiting.push(format!(
                            "{} checkpoint at {at}, past the last message it takes from {} ({target})",
                            spec.name,
                            self.stream_name(spec.stream)
                        ));
                    }
                }
                Err(err) => waiting.push(format!("{} checkpoint unreadable: {err}", spec.name)),
            }
        }
        waiting
    }

    /// Waits until the system is quiet; returns how long that took, or what still moved.
    async fn quiesce(&mut self, timeout: Duration, horizon: Duration, what: &str) -> Result<Duration, String> {
        let started = Instant::now();
        let mut quiet_in_a_row = 0;
        let mut last = Vec::new();
        while started.elapsed() < timeout {
            last = self.unquiet(horizon).await;
            if last.is_empty() {
                quiet_in_a_row += 1;
                if quiet_in_a_row >= 2 {
                    println!(
                        "fault suite: quiet {what} after {:.1} s",
                        started.elapsed().as_secs_f64()
                    );
                    return Ok(started.elapsed());
                }
            } else {
                quiet_in_a_row = 0;
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        Err(format!(
            "not quiet {what} within {} s: {}",
            timeout.as_secs(),
            last.join("; ")
        ))
    }

    /// Events per service and type.
    async fn event_count(&self) -> BTreeMap<(String, String), i64> {
        let mut counts = BTreeMap::new();
        for service in Service::ALL {
            let rows: Vec<(String, i64)> =
                sqlx::query_as("SELECT event_type, count(*) FROM events GROUP BY event_type")
                    .fetch_all(self.pool(service))
                    .await
                    .unwrap_or_default();
            for (event_type, n) in rows {
                counts.insert((service.name().to_owned(), event_type), n);
            }
        }
        counts
    }

    /// Every table that is no kernel table, each as its rows in text, sorted.
    async fn dump(&self) -> anyhow::Result<BTreeMap<String, Vec<String>>> {
        let mut out = BTreeMap::new();
        for service in Service::ALL {
            let pool = self.pool(service);
            let tables: Vec<String> = sqlx::query_scalar(
                "SELECT table_name::text FROM information_schema.tables
                 WHERE table_schema = 'public' AND table_type = 'BASE TABLE' ORDER BY 1",
            )
            .fetch_all(pool)
            .await?;
            for table in tables {
                if KERNEL_TABLES.contains(&table.as_str()) || table.starts_with("_sqlx") {
                    continue;
                }
                let rows: Vec<String> = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
                    "SELECT r::text FROM \"{table}\" r ORDER BY 1"
                )))
                .fetch_all(pool)
                .await
                .with_context(|| format!("dumping {}.{table}", service.name()))?;
                out.insert(format!("{}.{table}", service.name()), rows);
            }
        }
        Ok(out)
    }

    /// Empties every read model and deletes every checkpoint and durable
    /// consumer, with the services stopped, so that each projection replays
    /// its stream from the first message when they start.
    async fn reset_projections(&self) -> anyhow::Result<()> {
        for service in Service::ALL {
            let pool = self.pool(service);
            sqlx::query("DELETE FROM projection_checkpoints").execute(pool).await?;
            let tables = PROJECTION_TABLES
                .iter()
                .find(|(s, _)| *s == service)
                .map_or(&[][..], |(_, t)| *t);
            for table in tables {
                if self.table_exists(service, table).await {
                    sqlx::query(sqlx::AssertSqlSafe(format!("TRUNCATE \"{table}\"")))
                        .execute(pool)
                        .await?;
                }
            }
        }
        for spec in &PROJECTIONS {
            let consumer = format!("{}_{}", self.stream_prefix, spec.name);
            for stream in Service::ALL {
                let _ = self
                    .js
                    .delete_consumer_from_stream(&consumer, self.stream_name(stream))
                    .await;
            }
        }
        Ok(())
    }
}

async fn fetch(stream: &jetstream::stream::Stream, seq: u64) -> anyhow::Result<Option<Msg>> {
    let mut tries = 0;
    loop {
        match stream.get_raw_message(seq).await {
            Ok(m) => {
                let header = |name: &str| m.headers.get(name).map(|v| v.as_str().to_owned());
                return Ok(Some(Msg {
                    seq,
                    subject: m.subject.to_string(),
                    stream_id: header("Nrm-Stream-Id"),
                    version: header("Nrm-Stream-Version").and_then(|v| v.parse().ok()),
                    msg_id: header("Nats-Msg-Id"),
                    commit: EventCommit::decode(m.payload.as_ref()).ok(),
                }));
            }
            Err(e) if e.kind() == RawMessageErrorKind::NoMessageFound => return Ok(None),
            Err(e) => {
                tries += 1;
                if tries >= 5 {
                    return Err(anyhow::anyhow!("reading message {seq}: {e}"));
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

/// One event as stored.
#[derive(Debug, Clone)]
struct StoredEvent {
    event_id: String,
    stream_id: String,
    version: i64,
    event_type: String,
    payload: Vec<u8>,
    correlation: Option<String>,
    causation: Option<String>,
    system: bool,
}

async fn stored_events(pool: &PgPool) -> anyhow::Result<Vec<StoredEvent>> {
    let rows = sqlx::query(
        "SELECT event_id::text AS event_id, stream_id, version, event_type, payload,
                metadata->>'correlation_id' AS correlation, metadata->>'causation_id' AS causation,
                coalesce(metadata->'actor'->>'role', '') AS role
         FROM events ORDER BY global_position",
    )
    .fetch_all(pool)
    .await?;
    rows.iter()
        .map(|r| {
            Ok(StoredEvent {
                event_id: r.try_get("event_id")?,
                stream_id: r.try_get("stream_id")?,
                version: r.try_get("version")?,
                event_type: r.try_get("event_type")?,
                payload: r.try_get("payload")?,
                correlation: r.try_get("correlation")?,
                causation: r.try_get("causation")?,
                system: r.try_get::<String, _>("role")? == "system",
            })
        })
        .collect()
}

/// The broken rules, by the line of the summary they count on.
#[derive(Debug, Default)]
struct Findings {
    lost: Vec<String>,
    duplicated: Vec<String>,
    read_models: Vec<String>,
    refused_with_effect: Vec<String>,
    out_of_order: Vec<String>,
    bus_mismatch: Vec<String>,
    not_quiet: Vec<String>,
    parked: Vec<String>,
}

/// Runs every check and builds the verdict.
///
/// # Errors
/// When the databases or NATS cannot be read at all.
pub(crate) async fn check(inputs: Inputs<'_>) -> anyhow::Result<Verdict> {
    let Inputs {
        plan,
        seed,
        stack,
        services,
        faults,
        history,
        load,
        load_time,
        setup_failures,
    } = inputs;
    let mut f = Findings::default();
    let mut probe = Probe::connect(stack, services).await?;
    let mut timings = Vec::new();

    // Timers falling due soon (urgent answer deadlines) fire first: the
    // replay below counts every new event as a duplicate.
    match probe
        .quiesce(plan.quiesce_timeout, TIMER_HORIZON, "after the faults")
        .await
    {
        Ok(t) => timings.push(format!("quiet after the faults in {:.1} s", t.as_secs_f64())),
        Err(e) => f.not_quiet.push(e),
    }

    // 1. Every acknowledged command once more: the same answer, no new event.
    let ops = history.ops();
    let before = probe.event_count().await;
    let replay_started = Instant::now();
    let clients = load.clients().clone();
    let acknowledged: Vec<(usize, &Op)> = ops
        .iter()
        .enumerate()
        .filter(|(_, op)| matches!(op.outcome, Outcome::Ok(_)))
        .collect();
    let final_replays: Vec<(usize, anyhow::Result<Replay>)> = futures::stream::iter(acknowledged)
        .map(|(i, op)| {
            let clients = clients.clone();
            async move { (i, load::replay(&clients, op).await) }
        })
        .buffer_unordered(16)
        .collect()
        .await;
    let after = probe.event_count().await;
    timings.push(format!(
        "{} acknowledged commands sent again in {:.1} s",
        final_replays.len(),
        replay_started.elapsed().as_secs_f64()
    ));
    if after != before {
        let added: Vec<String> = after
            .iter()
            .filter_map(|(key, n)| {
                let was = before.get(key).copied().unwrap_or(0);
                (*n != was).then(|| format!("{} {} +{}", key.0, key.1, n - was))
            })
            .collect();
        f.duplicated.push(format!(
            "sending the acknowledged commands again added events: {}",
            added.join(", ")
        ));
    }
    let mut replays_of: HashMap<usize, Vec<Replay>> = HashMap::new();
    for (i, replay) in final_replays {
        match replay {
            Ok(r) => replays_of.entry(i).or_default().push(r),
            Err(err) => f.not_quiet.push(format!(
                "{} {} not answered when sent again: {err:#}",
                ops[i].kind().rpc(),
                ops[i].request.request_id()
            )),
        }
    }
    for (i, op) in ops.iter().enumerate() {
        let Outcome::Ok(first) = &op.outcome else {
            continue;
        };
        for replay in op.replays.iter().chain(replays_of.get(&i).into_iter().flatten()) {
            match replay {
                Replay::Answer(again) if !again.same(first) => f.duplicated.push(format!(
                    "{} {}: answered {:?} v{} first, {:?} v{} on a retry",
                    op.kind().rpc(),
                    op.request.request_id(),
                    first.ids,
                    first.version,
                    again.ids,
                    again.version
                )),
                Replay::Answer(again) if !again.replayed => f.duplicated.push(format!(
                    "{} {}: a retry ran the command again (answer not marked as replayed)",
                    op.kind().rpc(),
                    op.request.request_id()
                )),
                Replay::Answer(_) => {}
                Replay::Refused(why) => f.duplicated.push(format!(
                    "{} {}: acknowledged, then refused on a retry ({why})",
                    op.kind().rpc(),
                    op.request.request_id()
                )),
            }
        }
    }
    if after != before
        && let Err(e) = probe
            .quiesce(plan.quiesce_timeout, Duration::ZERO, "after the retries")
            .await
    {
        f.not_quiet.push(e);
    }

    // 2. The read models against their rebuild.
    if let Err(e) = probe
        .quiesce(plan.quiesce_timeout, TIMER_HORIZON, "before the rebuild")
        .await
    {
        f.not_quiet.push(e);
    }
    let rebuild_started = Instant::now();
    let original = probe.dump().await?;
    for service in Service::ALL {
        services.stop(service).await?;
    }
    probe.reset_projections().await?;
    for service in Service::ALL {
        services.start(service).await?;
    }
    match probe
        .quiesce(plan.quiesce_timeout, Duration::ZERO, "after the rebuild")
        .await
    {
        Ok(_) => {}
        Err(e) => f.not_quiet.push(e),
    }
    let rebuilt = probe.dump().await?;
    timings.push(format!(
        "read models rebuilt and compared in {:.1} s",
        rebuild_started.elapsed().as_secs_f64()
    ));
    compare_dumps(&original, &rebuilt, &mut f);

    // 3. The stores and the streams, read whole, against the history.
    probe.refresh_all(true).await?;
    let mut stores = BTreeMap::new();
    for service in Service::ALL {
        stores.insert(service, stored_events(probe.pool(service)).await?);
    }
    check_bus(&probe, &stores, &mut f).await;
    check_history(&ops, &stores, &mut f);
    check_effects(&stores, &mut f);
    for service in Service::ALL {
        if probe.table_exists(service, "parked_messages").await {
            let parked: Vec<String> = sqlx::query_scalar(
                "SELECT projection || ' seq ' || stream_sequence || ': ' || left(last_error, 120) FROM parked_messages",
            )
            .fetch_all(probe.pool(service))
            .await
            .unwrap_or_default();
            f.parked.extend(
                parked
                    .into_iter()
                    .map(|p| format!("{}: parked message {p}", service.name())),
            );
        }
        if probe.timers_parked_column {
            let parked: Vec<String> = sqlx::query_scalar(
                "SELECT kind || ' ' || aggregate_id || ': ' || left(coalesce(last_error, ''), 120)
                 FROM timers WHERE parked_at IS NOT NULL",
            )
            .fetch_all(probe.pool(service))
            .await
            .unwrap_or_default();
            f.parked.extend(
                parked
                    .into_iter()
                    .map(|p| format!("{}: parked timer {p}", service.name())),
            );
        }
    }
    for pool in probe.pools.values() {
        pool.close().await;
    }
    Ok(summarise(&Summary {
        plan,
        seed,
        ops: &ops,
        history,
        faults,
        services,
        findings: &f,
        load_time,
        timings: &timings,
        setup_failures: &setup_failures,
    }))
}

fn compare_dumps(original: &BTreeMap<String, Vec<String>>, rebuilt: &BTreeMap<String, Vec<String>>, f: &mut Findings) {
    let tables: BTreeSet<&String> = original.keys().chain(rebuilt.keys()).collect();
    for table in tables {
        let empty = Vec::new();
        let a = original.get(table).unwrap_or(&empty);
        let b = rebuilt.get(table).unwrap_or(&empty);
        if a == b {
            continue;
        }
        let a_set: BTreeSet<&String> = a.iter().collect();
        let b_set: BTreeSet<&String> = b.iter().collect();
        let only_before: Vec<&&String> = a_set.difference(&b_set).collect();
        let only_after: Vec<&&String> = b_set.difference(&a_set).collect();
        let example = only_before
            .first()
            .map(|r| format!("; before only: {}", clip(r, 160)))
            .unwrap_or_default()
            + &only_after
                .first()
                .map(|r| format!("; rebuilt only: {}", clip(r, 160)))
                .unwrap_or_default();
        f.read_models.push(format!(
            "{table}: {} rows before, {} rebuilt, {} only before, {} only rebuilt{example}",
            a.len(),
            b.len(),
            only_before.len(),
            only_after.len()
        ));
    }
}

fn clip(text: &str, max: usize) -> String {
    if text.chars().count() <= max {
        text.to_owned()
    } else {
        format!("{}…", text.chars().take(max).collect::<String>())
    }
}

/// Every stored event on its stream, nothing twice, commits in version order,
/// and nothing on the bus the store does not hold.
async fn check_bus(probe: &Probe, stores: &BTreeMap<Service, Vec<StoredEvent>>, f: &mut Findings) {
    for service in Service::ALL {
        let name = probe.stream_name(service);
        let empty = StreamCache::default();
        let cache = probe.streams.get(&service).unwrap_or(&empty);
        for note in &cache.notes {
            f.bus_mismatch.push(note.clone());
        }
        if !cache.missing.is_empty() {
            f.bus_mismatch.push(format!(
                "{name}: {} sequences hold no message (deleted?), first {:?}",
                cache.missing.len(),
                cache.missing.iter().take(5).collect::<Vec<_>>()
            ));
        }
        let store = &stores[&service];
        let stored: HashMap<&str, &StoredEvent> = store.iter().map(|e| (e.event_id.as_str(), e)).collect();
        let mut on_bus: HashMap<String, u64> = HashMap::new();
        let mut msg_ids: HashMap<String, Vec<u64>> = HashMap::new();
        let mut last_version: HashMap<String, (i64, u64)> = HashMap::new();
        for m in cache.messages.values() {
            let Some(commit) = &m.commit else {
                f.bus_mismatch
                    .push(format!("{name} seq {}: the body is no EventCommit", m.seq));
                continue;
            };
            if let Some(id) = &m.msg_id {
                msg_ids.entry(id.clone()).or_default().push(m.seq);
                if *id != commit.commit_id {
                    f.bus_mismatch.push(format!(
                        "{name} seq {}: Nats-Msg-Id {id} is not the commit ID {}",
                        m.seq, commit.commit_id
                    ));
                }
            } else {
                f.bus_mismatch.push(format!("{name} seq {}: no Nats-Msg-Id", m.seq));
            }
            for e in &commit.events {
                *on_bus.entry(e.event_id.clone()).or_default() += 1;
                match stored.get(e.event_id.as_str()) {
                    None => f.bus_mismatch.push(format!(
                        "{name} seq {}: event {} ({}) is in no store",
                        m.seq, e.event_id, e.event_type
                    )),
                    Some(s) if s.stream_id != commit.stream_id || u64::try_from(s.version).ok() != Some(e.version) => {
                        f.bus_mismatch.push(format!(
                            "{name} seq {}: event {} is {} v{} on the bus, {} v{} in the store",
                            m.seq, e.event_id, commit.stream_id, e.version, s.stream_id, s.version
                        ));
                    }
                    Some(s) if s.payload != e.payload => f.bus_mismatch.push(format!(
                        "{name} seq {}: event {} differs from the stored one",
                        m.seq, e.event_id
                    )),
                    Some(_) => {}
                }
            }
            let stream_id = m.stream_id.clone().unwrap_or_else(|| commit.stream_id.clone());
            let version = m
                .version
                .or_else(|| commit.events.last().and_then(|e| i64::try_from(e.version).ok()))
                .unwrap_or(0);
            if let Some((previous, previous_seq)) = last_version.get(&stream_id).copied()
                && version <= previous
            {
                f.out_of_order.push(format!(
                    "{name}: {stream_id} v{version} (seq {}) after v{previous} (seq {previous_seq})",
                    m.seq
                ));
            }
            let entry = last_version.entry(stream_id).or_insert((version, m.seq));
            if version > entry.0 {
                *entry = (version, m.seq);
            }
        }
        for (id, seqs) in &msg_ids {
            if seqs.len() > 1 {
                f.duplicated.push(format!(
                    "{name}: commit {id} published {} times (seq {seqs:?})",
                    seqs.len()
                ));
            }
        }
        for (id, n) in &on_bus {
            if *n > 1 {
                f.duplicated.push(format!("{name}: event {id} in {n} messages"));
            }
        }
        for e in store {
            if !on_bus.contains_key(&e.event_id) {
                f.lost.push(format!(
                    "{}: {} v{} {} ({}) is in the store and on no message of {name}",
                    service.name(),
                    e.stream_id,
                    e.version,
                    e.event_type,
                    e.event_id
                ));
            }
        }
        if probe.table_exists(service, "commits").await {
            let commits: Vec<(String, String, i64)> =
                sqlx::query_as("SELECT commit_id::text, stream_id, last_version FROM commits")
                    .fetch_all(probe.pool(service))
                    .await
                    .unwrap_or_default();
            for (commit_id, stream_id, last) in commits {
                if !msg_ids.contains_key(&commit_id) {
                    f.lost.push(format!(
                        "{}: commit {commit_id} ({stream_id} up to v{last}) is on no message of {name}",
                        service.name()
                    ));
                }
            }
        }
    }
}

/// Every acknowledged command in its store once, every refused one absent,
/// none applied twice.
fn check_history(ops: &[Op], stores: &BTreeMap<Service, Vec<StoredEvent>>, f: &mut Findings) {
    // Per service: event ID → event; correlation → the caller's own events.
    let mut by_id: BTreeMap<Service, HashMap<&str, &StoredEvent>> = BTreeMap::new();
    let mut by_correlation: BTreeMap<Service, HashMap<&str, Vec<&StoredEvent>>> = BTreeMap::new();
    let mut stream_version: BTreeMap<Service, HashMap<&str, i64>> = BTreeMap::new();
    for (service, events) in stores {
        let ids = by_id.entry(*service).or_default();
        let corr = by_correlation.entry(*service).or_default();
        let versions = stream_version.entry(*service).or_default();
        for e in events {
            ids.insert(e.event_id.as_str(), e);
            let v = versions.entry(e.stream_id.as_str()).or_insert(0);
            *v = (*v).max(e.version);
            if !e.system
                && let Some(c) = e.correlation.as_deref()
            {
                corr.entry(c).or_default().push(e);
            }
        }
    }
    for op in ops {
        let service = op.kind().service();
        let label = format!("{} {}", op.kind().rpc(), op.request.request_id());
        let correlation = op.correlation.to_string();
        let own: &[&StoredEvent] = by_correlation[&service]
            .get(correlation.as_str())
            .map_or(&[], Vec::as_slice);
        let executions: HashSet<&str> = own.iter().filter_map(|e| e.causation.as_deref()).collect();
        if executions.len() > 1 {
            f.duplicated.push(format!(
                "{label}: applied {} times ({} events under its correlation)",
                executions.len(),
                own.len()
            ));
        }
        match &op.outcome {
            Outcome::Ok(answer) => {
                for event_id in &answer.event_ids {
                    if !by_id[&service].contains_key(event_id.as_str()) {
                        f.lost.push(format!(
                            "{label}: acknowledged event {event_id} is not in the {} store",
                            service.name()
                        ));
                    }
                }
                let stream_id = format!("{}-{}", op.kind().aggregate(), answer.aggregate_id);
                let stored = stream_version[&service].get(stream_id.as_str()).copied().unwrap_or(0);
                if u64::try_from(stored).unwrap_or(0) < answer.version {
                    f.lost.push(format!(
                        "{label}: acknowledged {stream_id} at v{}, the store holds v{stored}",
                        answer.version
                    ));
                }
                let answered: HashSet<&str> = answer.event_ids.iter().map(String::as_str).collect();
                let extra: Vec<&str> = own
                    .iter()
                    .map(|e| e.event_id.as_str())
                    .filter(|id| !answered.contains(id))
                    .collect();
                if !extra.is_empty() {
                    f.duplicated.push(format!(
                        "{label}: {} events under its correlation beyond the {} it was answered ({})",
                        extra.len(),
                        answered.len(),
                        extra.first().copied().unwrap_or_default()
                    ));
                }
            }
            Outcome::Fail { code, reason } => {
                if !own.is_empty() {
                    f.refused_with_effect.push(format!(
                        "{label}: refused ({code:?} {reason}) after {} unknown attempts, yet {} events of it are stored ({} v{})",
                        op.unknown_attempts,
                        own.len(),
                        own[0].stream_id,
                        own[0].version
                    ));
                }
            }
            Outcome::Info { .. } => {}
        }
    }
}

/// No referral with two beds, a bed and "no bed", two escalations or an
/// answer recorded twice; no shelter over-booked.
fn check_effects(stores: &BTreeMap<Service, Vec<StoredEvent>>, f: &mut Findings) {
    let mut beds: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let mut no_bed: BTreeMap<String, usize> = BTreeMap::new();
    // Per shelter: capacity and active holds by category; hold → category.
    let mut capacity: HashMap<(String, i32), i64> = HashMap::new();
    let mut active: HashMap<(String, i32), i64> = HashMap::new();
    let mut holds: HashMap<String, (String, i32, bool)> = HashMap::new();
    for e in &stores[&Service::Shelter] {
        let Ok(event) = sh::ShelterEvent::decode(e.payload.as_slice()) else {
            f.bus_mismatch
                .push(format!("shelter: event {} does not decode", e.event_id));
            continue;
        };
        let shelter = e.stream_id.strip_prefix("shelter-").unwrap_or_default().to_owned();
        use sh::shelter_event::Event;
        match event.event {
            Some(Event::ShelterRegistered(r)) => {
                for c in r.capacity {
                    capacity.insert((shelter.clone(), c.category), i64::from(c.beds));
                }
            }
            Some(Event::CapacityChanged(c)) => {
                capacity.insert((shelter.clone(), c.category), i64::from(c.beds));
            }
            Some(Event::BedHeld(h)) => {
                beds.entry(h.referral_id.clone()).or_default().push(h.hold_id.clone());
                let key = (shelter.clone(), h.category);
                let n = active.entry(key.clone()).or_insert(0);
                *n += 1;
                let cap = capacity.get(&key).copied().unwrap_or(0);
                if *n > cap {
                    f.duplicated.push(format!(
                        "shelter {shelter}: {n} beds of category {} taken, {cap} exist (at v{})",
                        h.category, e.version
                    ));
                }
                holds.insert(h.hold_id, (shelter.clone(), h.category, true));
            }
            Some(Event::HoldReleased(sh::HoldReleased { hold_id, .. }))
            | Some(Event::HoldExpired(sh::HoldExpired { hold_id, .. }))
            | Some(Event::PersonDischarged(sh::PersonDischarged { hold_id, .. })) => {
                if let Some((s, category, taken)) = holds.get_mut(&hold_id)
                    && *taken
                {
                    *taken = false;
                    if let Some(n) = active.get_mut(&(s.clone(), *category)) {
                        *n -= 1;
                    }
                }
            }
            Some(Event::NoBedAvailable(n)) => *no_bed.entry(n.referral_id).or_default() += 1,
            Some(Event::PersonAdmitted(_) | Event::ShelterApproved(_)) | None => {}
        }
    }
    for (referral, held) in &beds {
        if held.len() > 1 {
            f.duplicated.push(format!(
                "referral {referral}: {} beds held (holds {held:?})",
                held.len()
            ));
        }
        if no_bed.contains_key(referral) {
            f.duplicated
                .push(format!("referral {referral}: a bed held and NoBedAvailable as well"));
        }
    }
    for (referral, n) in &no_bed {
        if *n > 1 {
            f.duplicated
                .push(format!("referral {referral}: NoBedAvailable {n} times"));
        }
    }
    let mut overdue: BTreeMap<&str, usize> = BTreeMap::new();
    let mut recorded_holds: BTreeMap<(String, String), usize> = BTreeMap::new();
    let mut recorded_no_bed: BTreeMap<String, usize> = BTreeMap::new();
    for e in &stores[&Service::Referral] {
        match e.event_type.as_str() {
            "ReferralOverdue" => *overdue.entry(e.stream_id.as_str()).or_default() += 1,
            "BedHoldRecorded" | "NoBedRecorded" => {
                match rf::ReferralEvent::decode(e.payload.as_slice())
                    .ok()
                    .and_then(|r| r.event)
                {
                    Some(rf::referral_event::Event::BedHoldRecorded(r)) => {
                        *recorded_holds.entry((r.referral_id, r.hold_id)).or_default() += 1;
                    }
                    Some(rf::referral_event::Event::NoBedRecorded(r)) => {
                        *recorded_no_bed.entry(r.referral_id).or_default() += 1;
                    }
                    _ => f
                        .bus_mismatch
                        .push(format!("referral: event {} does not decode", e.event_id)),
                }
            }
            _ => {}
        }
    }
    for (stream, n) in overdue {
        if n > 1 {
            f.duplicated
                .push(format!("{stream}: escalated (ReferralOverdue) {n} times"));
        }
    }
    for ((referral, hold), n) in recorded_holds {
        if n > 1 {
            f.duplicated
                .push(format!("referral {referral}: hold {hold} recorded {n} times"));
        }
    }
    for (referral, n) in recorded_no_bed {
        if n > 1 {
            f.duplicated
                .push(format!("referral {referral}: no bed recorded {n} times"));
        }
    }
}

struct Summary<'a> {
    plan: &'a Plan,
    seed: u64,
    ops: &'a [Op],
    history: &'a History,
    faults: &'a FaultLog,
    services: &'a Services,
    findings: &'a Findings,
    load_time: Duration,
    timings: &'a [String],
    setup_failures: &'a [String],
}

fn summarise(s: &Summary<'_>) -> Verdict {
    let f = s.findings;
    let sent = s.history.sent.load(std::sync::atomic::Ordering::Relaxed);
    let ok = s.ops.iter().filter(|o| matches!(o.outcome, Outcome::Ok(_))).count();
    let fail = s
        .ops
        .iter()
        .filter(|o| matches!(o.outcome, Outcome::Fail { .. }))
        .count();
    let info = s
        .ops
        .iter()
        .filter(|o| matches!(o.outcome, Outcome::Info { .. }))
        .count();
    let internal: u32 = s.ops.iter().map(|o| o.internal).sum();
    let internal_ops = s.ops.iter().filter(|o| o.internal > 0).count();
    let records = s.faults.records();
    let injected = s.faults.injected();
    let mut out = String::new();
    let line = |out: &mut String, label: &str, value: String| {
        let _ = writeln!(out, "  {label:<50} {value:>8}");
    };
    let _ = writeln!(
        out,
        "Fault suite, {} form, seed {:#x}: {:.0} s of load",
        s.plan.form,
        s.seed,
        s.load_time.as_secs_f64()
    );
    line(&mut out, "commands sent", sent.to_string());
    line(&mut out, "acknowledged (ok)", ok.to_string());
    line(&mut out, "refused (fail)", fail.to_string());
    line(&mut out, "unknown (info)", info.to_string());
    line(
        &mut out,
        "INTERNAL answers",
        if internal_ops > 0 {
            format!("{internal} ({internal_ops} commands)")
        } else {
            "0".into()
        },
    );
    line(&mut out, "faults injected", records.len().to_string());
    for kind in FaultKind::ALL {
        let n = records.iter().filter(|r| r.kind == kind).count();
        line(&mut out, &format!("  {}", kind.label()), n.to_string());
    }
    line(&mut out, "events lost", f.lost.len().to_string());
    line(&mut out, "effects duplicated", f.duplicated.len().to_string());
    line(
        &mut out,
        "read models differing from a rebuild",
        f.read_models.len().to_string(),
    );
    let _ = writeln!(out, "  further checks:");
    line(
        &mut out,
        "  refused commands that left events",
        f.refused_with_effect.len().to_string(),
    );
    line(
        &mut out,
        "  commits on the bus out of version order",
        f.out_of_order.len().to_string(),
    );
    line(
        &mut out,
        "  bus and store disagreeing otherwise",
        f.bus_mismatch.len().to_string(),
    );
    line(&mut out, "  parked messages and timers", f.parked.len().to_string());
    line(
        &mut out,
        "  quiescence and retries not reached",
        f.not_quiet.len().to_string(),
    );
    let exits = s.faults.exits();
    let start_failures = s.faults.start_failures();
    line(&mut out, "  service exits nobody asked for", exits.len().to_string());
    line(
        &mut out,
        "  services that did not start while NATS was down",
        s.faults.broken().len().to_string(),
    );
    line(
        &mut out,
        "  failed starts (tried again; not counted)",
        start_failures.len().to_string(),
    );

    let _ = writeln!(out, "  commands by kind (sent / ok / fail / info):");
    let mut by_kind: BTreeMap<Kind, [usize; 4]> = BTreeMap::new();
    let mut refusals: BTreeMap<String, usize> = BTreeMap::new();
    let mut unknowns: BTreeMap<String, usize> = BTreeMap::new();
    for op in s.ops {
        let counts = by_kind.entry(op.kind()).or_default();
        counts[0] += 1;
        match &op.outcome {
            Outcome::Ok(_) => counts[1] += 1,
            Outcome::Fail { code, reason } => {
                counts[2] += 1;
                *refusals
                    .entry(format!("{} {code:?} {reason}", op.kind().rpc()))
                    .or_default() += 1;
            }
            Outcome::Info { last } => {
                counts[3] += 1;
                *unknowns
                    .entry(format!("{} {}", op.kind().rpc(), clip(last, 60)))
                    .or_default() += 1;
            }
        }
    }
    for (kind, [n, ok, fail, info]) in &by_kind {
        let _ = writeln!(out, "    {:<24} {n:>6} {ok:>6} {fail:>6} {info:>6}", kind.rpc());
    }
    let retried = s.ops.iter().filter(|o| o.attempts > 1).count();
    let _ = writeln!(
        out,
        "    {retried} commands needed more than one attempt, {} attempts in all",
        s.ops.iter().map(|o| u64::from(o.attempts)).sum::<u64>()
    );
    if !refusals.is_empty() {
        let _ = writeln!(out, "  refusals:");
        for (what, n) in &refusals {
            let _ = writeln!(out, "    {n:>6}  {what}");
        }
    }
    if !unknowns.is_empty() {
        let _ = writeln!(out, "  given up (last answer):");
        for (what, n) in &unknowns {
            let _ = writeln!(out, "    {n:>6}  {what}");
        }
    }
    let starts = s.services.starts();
    let _ = writeln!(
        out,
        "  process starts: {}",
        starts
            .iter()
            .map(|(svc, n)| format!("{} {n}", svc.name()))
            .collect::<Vec<_>>()
            .join(", ")
    );
    for t in s.timings {
        let _ = writeln!(out, "  {t}");
    }
    let _ = writeln!(out, "  faults:");
    for r in &records {
        let _ = writeln!(out, "    {:>7.1} s  {} {}", r.at.as_secs_f64(), r.kind.label(), r.note);
    }
    let sections: [(&str, &Vec<String>); 8] = [
        ("events lost", &f.lost),
        ("effects duplicated", &f.duplicated),
        ("read models differing from a rebuild", &f.read_models),
        ("refused commands that left events", &f.refused_with_effect),
        ("commits out of version order", &f.out_of_order),
        ("bus and store disagreeing", &f.bus_mismatch),
        ("parked", &f.parked),
        ("not quiet / not answered", &f.not_quiet),
    ];
    for (title, items) in sections {
        if items.is_empty() {
            continue;
        }
        let _ = writeln!(out, "  {title} ({}), first ones:", items.len());
        for item in items.iter().take(12) {
            let _ = writeln!(out, "    - {}", clip(item, 300));
        }
    }
    let broken = s.faults.broken();
    for (title, items) in [
        ("service exits", &exits),
        ("failed starts", &start_failures),
        ("broken promises", &broken),
    ] {
        if items.is_empty() {
            continue;
        }
        let _ = writeln!(out, "  {title} ({}):", items.len());
        for a in items.iter().take(12) {
            let _ = writeln!(out, "    - {}", clip(a, 300));
        }
    }
    let notes = s.history.notes();
    if !notes.is_empty() {
        let _ = writeln!(out, "  load notes ({}), first ones:", notes.len());
        for n in notes.iter().take(8) {
            let _ = writeln!(out, "    - {n}");
        }
    }

    let mut failures = Vec::new();
    let mut must_be_zero = |what: &str, n: usize| {
        if n > 0 {
            failures.push(format!("{what}: {n}"));
        }
    };
    must_be_zero("events lost", f.lost.len());
    must_be_zero("effects duplicated", f.duplicated.len());
    must_be_zero("read models differing from a rebuild", f.read_models.len());
    must_be_zero("INTERNAL answers", internal_ops);
    must_be_zero("refused commands that left events", f.refused_with_effect.len());
    must_be_zero("commits out of version order", f.out_of_order.len());
    must_be_zero("bus and store disagreeing", f.bus_mismatch.len());
    must_be_zero("parked messages and timers", f.parked.len());
    must_be_zero("not quiet", f.not_quiet.len());
    must_be_zero("service exits nobody asked for", exits.len());
    let broken = s.faults.broken();
    must_be_zero("services that could not start while NATS was down", broken.len());
    failures.extend(s.setup_failures.iter().cloned());
    if sent < s.plan.commands {
        failures.push(format!(
            "only {sent} commands sent, the {} form needs {}",
            s.plan.form, s.plan.commands
        ));
    }
    if injected < s.plan.faults {
        failures.push(format!(
            "only {injected} faults injected, the {} form needs {}",
            s.plan.form, s.plan.faults
        ));
    }
    if ok == 0 {
        failures.push("no command was acknowledged".into());
    }
    let _ = writeln!(
        out,
        "  verdict: {}",
        if failures.is_empty() {
            "PASS".to_owned()
        } else {
            format!("FAIL ({})", failures.join(", "))
        }
    );
    Verdict { summary: out, failures }
}
