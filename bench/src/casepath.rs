//! casepath (issue 11): how fast its projections replay the streams, how
//! long a command takes to reach a watched path, and how fast the national
//! statistics answer.
//!
//! - Replay: `--casepath-events` identification events (each case
//!   reported, screened and decided: three events in one commit, as
//!   domain events of the identification service) written straight into an
//!   event store on a scratch database and published by the kernel's relay
//!   into the identification stream of a NATS space of its own (not
//!   timed); then casepath starts on an empty database and is timed from
//!   its start until its identification checkpoint is at the stream's end:
//!   events per second (aim ≥ 50,000/s).
//! - Lag: the identification and referral services and casepath
//!   in-process; `--casepath-loaded` persons reported (and each given a
//!   first consent), `--casepath-watched` of them with a WatchPath open as
//!   the police who hold the case; then consents recorded round-robin over
//!   all of them at `--casepath-rate` commands a second for
//!   `--casepath-seconds` (each person its own aggregate, a command every
//!   few seconds, as in real use: not a queue of version conflicts on a
//!   few): from each watched person's RecordConsent acknowledgement to the
//!   first watched path showing that consent, p50/p99 (aim p99 < 100 ms).
//!   casepath runs with `NRM_CASEPATH__WATCH_INTERVAL_MS=10` so that its
//!   pacing of updates does not hide the lag behind it.
//! - Statistics: `--casepath-persons` persons written straight into
//!   casepath's read model (cases reported over a year, half of them
//!   decided; half as many persons a year before; later cases, referrals,
//!   goals, beds and returns of a share of them), then `GetStatistics` for the thirteen whole months that
//!   hold them, publishable, called
//!   sequentially: p50/p99 (aim < 200 ms).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context as _, bail};
use futures::StreamExt as _;
use nrm_casepath::config::{CasepathSettings, Settings as CasepathConfig};
use nrm_casepath::domain::changes::WatchKey;
use nrm_casepath::projections::{IdentificationProjection, ReferralProjection};
use nrm_identification::app::{CONTEXT, PAYLOAD_TYPE};
use nrm_identification::domain;
use nrm_kernel::auth::Role;
use nrm_kernel::bus::Bus;
use nrm_kernel::ids::CaseId;
use nrm_kernel::relay::{Relay, RelayConfig};
use nrm_kernel::retry::RetryPolicy;
use nrm_kernel::service::{CommonSettings, Service};
use nrm_kernel::settings::{DatabaseSettings, NatsSettings, RelaySettings, ServerSettings, TelemetrySettings};
use nrm_kernel::store::{EventStore, NewEvent};
use nrm_kernel::xborder::CountryCode;
use nrm_proto::casepath::v1 as cp;
use nrm_proto::casepath::v1::casepath_service_client::CasepathServiceClient;
use nrm_proto::identification::v1 as pb;
use nrm_proto::referral::v1 as rf;
use prost::Message as _;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;

use crate::service::{self, authorized, token};
use crate::stats;

/// The replay's aim, events a second.
pub const REPLAY_AIM: f64 = 50_000.0;
/// The lag's aim: p99 under this many µs.
pub const LAG_AIM_US: u64 = 100_000;
/// The statistics query's aim: p99 under this many µs.
pub const STATS_AIM_US: u64 = 200_000;
/// Cases appended per transaction while the replay's backlog is written.
const BATCH: usize = 500;
/// Longest any phase may take.
const LIMIT: Duration = Duration::from_secs(1800);
/// The share of the lag phase's rate the bench must have sent for its
/// measurement to count: below it, the machine (not the services) set the pace.
const SENT_SHARE: f64 = 0.99;
/// Sequential statistics calls.
const STATS_CALLS: usize = 30;

/// What to measure.
#[derive(Debug, Clone)]
pub struct Plan {
    /// Events replayed (0: skip the replay).
    pub events: usize,
    /// Commands a second of the lag phase (0: skip it).
    pub rate: u64,
    /// Seconds of the lag phase.
    pub seconds: u64,
    /// Persons watched during the lag phase.
    pub watched: usize,
    /// Persons the lag phase's commands go round (at least `watched`).
    pub loaded: usize,
    /// Persons of the statistics query (0: skip it).
    pub persons: usize,
}

/// What was measured.
#[derive(Debug, Clone, Default)]
pub struct CasepathResults {
    /// Events and commits replayed, and how long casepath took.
    pub replay: Option<(usize, usize, Duration)>,
    /// Commands sent and seen, their rate, lag p50/p99/max (µs).
    pub lag: Option<Lag>,
    /// Persons, calls, p50/p99 (µs) of GetStatistics.
    pub statistics: Option<(usize, usize, u64, u64)>,
}

/// The lag phase.
#[derive(Debug, Clone, Default)]
pub struct Lag {
    /// Persons the commands went round, and how many were watched.
    pub persons: usize,
    /// Watched persons.
    pub watched: usize,
    /// Commands not acknowledged, by gRPC code.
    pub refused: std::collections::BTreeMap<String, usize>,
    /// Commands acknowledged, of all persons.
    pub acknowledged: usize,
    /// Commands for the watched persons acknowledged.
    pub sent: usize,
    /// Of those, seen on a watched path.
    pub seen: usize,
    /// The rate asked for, and the rate achieved.
    pub rate: u64,
    /// Commands a second the bench actually sent: on a busy machine its
    /// own pacing falls behind, and a lag at a lower rate is not the one asked
    /// for (the aim then counts as not met).
    pub sent_rate: f64,
    /// Commands a second acknowledged: all of them over the time until the last answer.
    pub achieved: f64,
    /// p50, p99 and the largest lag, µs.
    pub p50_us: u64,
    /// 99th percentile.
    pub p99_us: u64,
    /// Largest.
    pub max_us: u64,
}

fn space(nats_url: &str) -> NatsSettings {
    let id = uuid::Uuid::new_v4().simple().to_string()[..12].to_owned();
    NatsSettings {
        url: nats_url.to_owned(),
        subject_prefix: format!("p{id}"),
        stream_prefix: format!("P{}", id.to_ascii_uppercase()),
        replicas: 1,
        duplicate_window_seconds: 120,
    }
}

fn database(database_url: &str, tag: &str) -> DatabaseSettings {
    DatabaseSettings {
        url: database_url.to_owned(),
        name: format!("bench_{tag}_{}", &uuid::Uuid::new_v4().simple().to_string()[..12]),
        max_connections: 16,
    }
}

/// Runs a built service in the background until the token returned is
/// cancelled (the task ends then); a failure is printed, naming `what`.
/// Shared by the benches that start a service in-process.
pub(crate) fn run_in_background<S: Service + 'static>(
    app: S,
    what: &'static str,
) -> (CancellationToken, tokio::task::JoinHandle<()>) {
    let shutdown = CancellationToken::new();
    let stop = shutdown.clone();
    let task = tokio::spawn(async move {
        if let Err(err) = app.run_until_stopped(stop).await {
            eprintln!("bench: {what} failed: {err:#}");
        }
    });
    (shutdown, task)
}

fn common(database_url: &str, tag: &str, nats: &NatsSettings) -> anyhow::Result<CommonSettings> {
    Ok(CommonSettings {
        server: ServerSettings {
            grpc_addr: "127.0.0.1:0".parse()?,
            metrics_addr: "127.0.0.1:0".parse()?,
            ..ServerSettings::default()
        },
        database: database(database_url, tag),
        nats: nats.clone(),
        relay: RelaySettings::default(),
        retry: RetryPolicy::default(),
        auth: service::auth_settings()?,
        telemetry: TelemetrySettings::default(),
    })
}

/// casepath running in this process.
struct Casepath {
    settings: CasepathConfig,
    client: CasepathServiceClient<Channel>,
    pool: sqlx::PgPool,
    shutdown: CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

impl Casepath {
    async fn start(database_url: &str, nats: &NatsSettings, watch_interval_ms: u64) -> anyhow::Result<Self> {
        let settings = CasepathConfig {
            common: common(database_url, "casepath", nats)?,
            casepath: CasepathSettings {
                watch_interval_ms,
                ..CasepathSettings::default()
            },
            xborder: nrm_kernel::xborder::XborderSettings::default(),
        };
        let app = nrm_casepath::startup::Application::build(&settings)
            .await
            .context("build casepath")?;
        let addr = app.kit().grpc_addr()?;
        let pool = app.kit().pool().clone();
        let (shutdown, task) = run_in_background(app, "casepath");
        let client = CasepathServiceClient::connect(format!("http://{addr}"))
            .await
            .context("connect to casepath")?;
        Ok(Self {
            settings,
            client,
            pool,
            shutdown,
            task,
        })
    }

    async fn checkpoint(&self, projection: &str) -> anyhow::Result<u64> {
        let sequence: Option<i64> =
            sqlx::query_scalar("SELECT stream_sequence FROM projection_checkpoints WHERE projection = $1")
                .bind(projection)
                .fetch_optional(&self.pool)
                .await?;
        Ok(u64::try_from(sequence.unwrap_or(0)).unwrap_or(0))
    }

    async fn stop(self) {
        self.shutdown.cancel();
        let _ = tokio::time::timeout(Duration::from_secs(15), self.task).await;
        self.pool.close().await;
        if let Err(err) = nrm_kernel::db::drop_database(&self.settings.common.database).await {
            eprintln!("bench: could not drop {}: {err}", self.settings.common.database.name);
        }
    }
}

/// Every context stream casepath follows, so that none of its runners waits for a stream.
async fn ensure_streams(bus: &Bus) -> anyhow::Result<()> {
    for context in ["identification", "referral", "shelter", "repatriation"] {
        bus.ensure_stream(context).await?;
    }
    Ok(())
}

async fn delete_streams(bus: &Bus) {
    for context in ["identification", "referral", "shelter", "repatriation"] {
        let _ = bus.jetstream().delete_stream(bus.stream_name(context)).await;
    }
}

fn decided_event(case: CaseId) -> pb::IdentificationEvent {
    let now = chrono::Utc::now();
    pb::IdentificationEvent {
        event: Some(pb::identification_event::Event::IdentificationDecided(
            pb::IdentificationDecided {
                case_id: case.to_string(),
                decision: pb::Decision::Identified as i32,
                reason: 0,
                non_punishment: false,
                decided_at: Some(nrm_kernel::validate::timestamp(now)),
                reflection_period_ends_at: Some(nrm_kernel::validate::timestamp(now + chrono::Duration::days(30))),
                best_interests_assessed: false,
            },
        )),
    }
}

/// The replay: the backlog written and published, then casepath timed.
async fn replay(database_url: &str, nats_url: &str, events: usize) -> anyhow::Result<(usize, usize, Duration)> {
    let nats = space(nats_url);
    let bus = Bus::connect(&nats).await?;
    ensure_streams(&bus).await?;
    let scratch = database(database_url, "replay");
    let pool = nrm_kernel::db::connect_and_migrate(&scratch, &nrm_identification::startup::MIGRATIONS).await?;
    let store = EventStore::new(pool.clone());
    let cases = events.div_ceil(3);
    let written = Instant::now();
    let metadata = crate::append::metadata();
    let mut done = 0;
    while done < cases {
        let mut uow = store.begin().await?;
        for _ in 0..BATCH.min(cases - done) {
            let case = CaseId::new();
            let new = |event_type: &str, event: pb::IdentificationEvent| NewEvent {
                event_type: event_type.into(),
                schema_version: 1,
                payload: event.encode_to_vec(),
            };
            let batch = [
                new("PresumedVictimReported", crate::catchup::report_event(case)),
                new("ScreeningCompleted", crate::catchup::screening_event(case)),
                new("IdentificationDecided", decided_event(case)),
            ];
            let subject = bus.subject(CONTEXT, domain::NAME, &case.to_string());
            uow.append(&domain::stream_id(case), 0, &batch, &metadata, &subject)
                .await?;
            done += 1;
        }
        uow.commit().await?;
    }
    eprintln!(
        "bench: casepath replay: {} events in {cases} commits written in {:.1} s; publishing",
        cases * 3,
        written.elapsed().as_secs_f64()
    );
    let relay = Relay::new(
        pool.clone(),
        bus.clone(),
        CONTEXT,
        store.appended_signal(),
        RelayConfig::new(PAYLOAD_TYPE),
    );
    let stop_relay = CancellationToken::new();
    let relay_task = tokio::spawn({
        let stop = stop_relay.clone();
        async move { relay.run(stop).await }
    });
    let published = Instant::now();
    let stream_name = bus.stream_name(CONTEXT);
    let target = u64::try_from(cases).unwrap_or(u64::MAX);
    loop {
        let mut stream = bus.jetstream().get_stream(&stream_name).await?;
        if stream.info().await?.state.messages >= target {
            break;
        }
        if published.elapsed() > LIMIT {
            bail!("the relay did not publish the replay's backlog within {LIMIT:?}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    stop_relay.cancel();
    let _ = relay_task.await;
    eprintln!(
        "bench: casepath replay: published in {:.1} s; casepath starts",
        published.elapsed().as_secs_f64()
    );

    let mut stream = bus.jetstream().get_stream(&stream_name).await?;
    let last = stream.info().await?.state.last_sequence;
    let started = Instant::now();
    let casepath = Casepath::start(database_url, &nats, 200).await?;
    loop {
        if casepath.checkpoint("casepath_identification").await? >= last {
            break;
        }
        if started.elapsed() > LIMIT {
            bail!("casepath did not replay within {LIMIT:?}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let elapsed = started.elapsed();
    casepath.stop().await;
    pool.close().await;
    let _ = nrm_kernel::db::drop_database(&scratch).await;
    delete_streams(&bus).await;
    Ok((cases * 3, cases, elapsed))
}

/// The identification and referral services in this process, beside casepath.
struct Services {
    identification: nrm_proto::identification::v1::identification_service_client::IdentificationServiceClient<Channel>,
    referral: nrm_proto::referral::v1::referral_service_client::ReferralServiceClient<Channel>,
    databases: Vec<DatabaseSettings>,
    shutdown: CancellationToken,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Services {
    async fn start(database_url: &str, nats: &NatsSettings) -> anyhow::Result<Self> {
        use base64::Engine as _;
        let key = |b: u8| secrecy::SecretString::from(base64::engine::general_purpose::STANDARD.encode([b; 32]));
        let id_settings = nrm_identification::config::Settings {
            common: common(database_url, "cp_ident", nats)?,
            sealing: nrm_kernel::settings::SealingSettings {
                master_key: key(7),
                match_key: key(9),
            },
            identification: nrm_identification::config::IdentificationSettings::default(),
            xborder: nrm_kernel::xborder::XborderSettings::default(),
        };
        let referral_settings = nrm_referral::config::Settings {
            common: common(database_url, "cp_referral", nats)?,
            referral: nrm_referral::config::ReferralSettings::default(),
        };
        let shutdown = CancellationToken::new();
        let identification = nrm_identification::startup::Application::build(&id_settings).await?;
        let id_addr = identification.kit().grpc_addr()?;
        let referral = nrm_referral::startup::Application::build(&referral_settings).await?;
        let referral_addr = referral.kit().grpc_addr()?;
        let tasks = vec![
            tokio::spawn({
                let stop = shutdown.clone();
                async move {
                    if let Err(err) = identification.run_until_stopped(stop).await {
                        eprintln!("bench: identification failed: {err:#}");
                    }
                }
            }),
            tokio::spawn({
                let stop = shutdown.clone();
                async move {
                    if let Err(err) = referral.run_until_stopped(stop).await {
                        eprintln!("bench: referral failed: {err:#}");
                    }
                }
            }),
        ];
        Ok(Self {
            identification:
                nrm_proto::identification::v1::identification_service_client::IdentificationServiceClient::connect(
                    format!("http://{id_addr}"),
                )
                .await?,
            referral: nrm_proto::referral::v1::referral_service_client::ReferralServiceClient::connect(format!(
                "http://{referral_addr}"
            ))
            .await?,
            databases: vec![id_settings.common.database, referral_settings.common.database],
            shutdown,
            tasks,
        })
    }

    async fn stop(self) {
        self.shutdown.cancel();
        for task in self.tasks {
            let _ = tokio::time::timeout(Duration::from_secs(15), task).await;
        }
        for database in &self.databases {
            let _ = nrm_kernel::db::drop_database(database).await;
        }
    }
}

/// How many CONSENT_RECORDED steps a path shows.
fn consents(path: &cp::Path) -> usize {
    path.steps
        .iter()
        .filter(|s| s.kind == cp::StepKind::ConsentRecorded as i32)
        .count()
}

/// A refusal as the report names it: its code, and for a call shed at the
/// gate (`OVERLOADED`) that too, apart from the other `UNAVAILABLE`s.
fn refusal(status: &tonic::Status) -> String {
    use tonic_types::StatusExt as _;
    match status.get_error_details().error_info() {
        Some(info) if info.reason == "OVERLOADED" => format!("{:?} (OVERLOADED)", status.code()),
        _ => format!("{:?}", status.code()),
    }
}

/// The lag phase.
async fn lag(database_url: &str, nats_url: &str, plan: &Plan) -> anyhow::Result<Lag> {
    let nats = space(nats_url);
    let bus = Bus::connect(&nats).await?;
    ensure_streams(&bus).await?;
    let services = Services::start(database_url, &nats).await?;
    let casepath = Casepath::start(database_url, &nats, 10).await?;
    let police = token("kg-mvd", Role::Police, "bench-officer")?;

    // The persons: reported, known to the referral service; the first `watched` watched.
    let mut persons = Vec::new();
    for i in 0..plan.loaded.max(plan.watched) {
        let answer = services
            .identification
            .clone()
            .report_presumed_victim(authorized(
                service::report_request(
                    &uuid::Uuid::now_v7().to_string(),
                    service::person("Bench Person", &format!("BP{i:07}"), ""),
                ),
                &police,
            )?)
            .await?
            .into_inner();
        persons.push((answer.case_id, answer.person_id));
    }
    // seen[(person, n)] = when the watch first showed n consents.
    let seen: Arc<Mutex<HashMap<(usize, usize), Instant>>> = Arc::default();
    let mut watchers = Vec::new();
    for (index, (_, person_id)) in persons.iter().enumerate().take(plan.watched) {
        let deadline = Instant::now() + Duration::from_secs(60);
        let mut stream = loop {
            match casepath
                .client
                .clone()
                .watch_path(authorized(
                    cp::GetPathRequest {
                        person_id: person_id.clone(),
                    },
                    &police,
                )?)
                .await
            {
                Ok(stream) => break stream.into_inner(),
                Err(status) if Instant::now() < deadline => {
                    let _ = status;
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Err(status) => bail!("WatchPath: {status:?}"),
            }
        };
        let seen = seen.clone();
        watchers.push(tokio::spawn(async move {
            let mut shown = 0;
            while let Some(Ok(path)) = stream.next().await {
                let at = Instant::now();
                let count = consents(&path);
                let mut seen = seen.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
                while shown < count {
                    shown += 1;
                    seen.entry((index, shown)).or_insert(at);
                }
            }
        }));
    }
    // The referral service must know each person before it records a consent.
    let mut c = services.referral.clone();
    let consent = |case_id: &str, person_id: &str| rf::RecordConsentRequest {
        request_id: uuid::Uuid::now_v7().to_string(),
        person_id: person_id.to_owned(),
        case_id: case_id.to_owned(),
        given_by: rf::ConsentGiver::Person as i32,
        recipient_agency: "kg-msd".into(),
        purposes: vec![rf::ServiceKind::Social as i32],
        data_categories: vec![rf::DataCategory::Name as i32],
        expires_at: None,
        ..Default::default()
    };
    for (case_id, person_id) in &persons {
        let deadline = Instant::now() + Duration::from_secs(60);
        while c
            .record_consent(authorized(consent(case_id, person_id), &police)?)
            .await
            .is_err()
        {
            if Instant::now() > deadline {
                bail!("the referral service did not learn the bench's persons within 60 s");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    // Wait until every watch shows its first consent.
    let deadline = Instant::now() + Duration::from_secs(60);
    while seen.lock().unwrap_or_else(std::sync::PoisonError::into_inner).len() < plan.watched.min(persons.len()) {
        if Instant::now() > deadline {
            bail!("the watched paths did not show the first consents within 60 s");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // The measured phase: consents round-robin at the rate, each acknowledged in turn.
    let total = usize::try_from(plan.rate * plan.seconds).unwrap_or(usize::MAX);
    let interval = Duration::from_secs_f64(1.0 / plan.rate.max(1) as f64);
    let (ack_tx, mut ack_rx) = tokio::sync::mpsc::unbounded_channel();
    let started = Instant::now();
    let mut senders = Vec::new();
    let mut counts = vec![1usize; persons.len()];
    for i in 0..total {
        let due = started + interval.mul_f64(i as f64);
        tokio::time::sleep_until(due).await;
        let index = i % persons.len();
        counts[index] += 1;
        let n = counts[index];
        let (case_id, person_id) = &persons[index];
        let request = authorized(consent(case_id, person_id), &police)?;
        let mut client = services.referral.clone();
        let tx = ack_tx.clone();
        let watched = index < plan.watched;
        senders.push(tokio::spawn(async move {
            let answer = client
                .record_consent(request)
                .await
                .map(|_| ())
                .map_err(|s| refusal(&s));
            let _ = tx.send((watched, (index, n), Instant::now(), answer));
        }));
    }
    // The last one went out now: the rate sent, apart from the rate answered.
    let sent_rate = total as f64 / started.elapsed().as_secs_f64();
    for sender in senders {
        let _ = sender.await;
    }
    let achieved = total as f64 / started.elapsed().as_secs_f64();
    drop(ack_tx);
    let mut acks = Vec::new();
    let mut acknowledged = 0;
    let mut refused: std::collections::BTreeMap<String, usize> = std::collections::BTreeMap::new();
    while let Some((watched, key, at, answer)) = ack_rx.recv().await {
        if let Err(code) = answer {
            *refused.entry(code).or_default() += 1;
            continue;
        }
        acknowledged += 1;
        if watched {
            acks.push((key, at));
        }
    }
    // Every acknowledged consent reaches its watch (or the run fails after 30 s).
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let all_seen = {
            let seen = seen.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            acks.iter().all(|(key, _)| seen.contains_key(key))
        };
        if all_seen || Instant::now() > deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let mut histogram = stats::new_histogram()?;
    let mut shown = 0;
    {
        let seen = seen.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        for (key, acked) in &acks {
            if let Some(at) = seen.get(key) {
                shown += 1;
                // A watch may show the consent before its acknowledgement arrives: 0.
                stats::record(&mut histogram, at.saturating_duration_since(*acked));
            }
        }
    }
    for watcher in watchers {
        watcher.abort();
    }
    casepath.stop().await;
    services.stop().await;
    delete_streams(&bus).await;
    Ok(Lag {
        persons: persons.len(),
        watched: plan.watched.min(persons.len()),
        acknowledged,
        refused,
        sent: acks.len(),
        seen: shown,
        rate: plan.rate,
        sent_rate,
        achieved,
        p50_us: histogram.value_at_quantile(0.50),
        p99_us: histogram.value_at_quantile(0.99),
        max_us: histogram.max(),
    })
}

/// The statistics' read model: `$1` persons first reported over the last
/// year and half as many a year before (the first statement binds `$1`);
/// the others add records to a share of the persons written.
const STATS_SEED: [&str; 6] = [
    // $1 persons first reported over the last year, $1 / 2 more a year before them
    r"INSERT INTO cp_cases (case_id, person_id, reporting_agency, competent_authority, status, reported_at,
             found_at, gender, age_band, child, citizenship, country_of_exploitation, exploitation_forms,
             decision, decided_at, decision_waiting_since)
         WITH p AS (SELECT i, CASE WHEN i <= $1 THEN now() - make_interval(secs => (i * 313 % 31536000)::double precision)
                              ELSE now() - interval '400 days' - make_interval(secs => (i * 313 % 25920000)::double precision) END AS t
                    FROM generate_series(1, $1 + $1 / 2) AS i)
         SELECT md5('c' || i)::uuid, md5('p' || i)::uuid, 'kg-mvd', 'kg-mvd',
                CASE WHEN i % 2 = 0 THEN 3 ELSE 2 END, t, t - interval '1 day',
                1 + i % 3, 1 + i % 7, i % 11 = 0,
                (ARRAY['KG','KZ','TJ','UZ','TM'])[1 + i % 5], (ARRAY['RU','KZ','TR','AE','KR'])[1 + i % 5],
                ARRAY[1 + i % 8],
                CASE WHEN i % 2 = 0 THEN 1 ELSE 0 END,
                CASE WHEN i % 2 = 0 THEN t + make_interval(secs => (i % 1209600)::double precision) END,
                CASE WHEN i % 2 = 0 THEN NULL ELSE t END
         FROM p",
    // a later case of one person in twenty (spelt otherwise, other forms), half-way to now
    r"INSERT INTO cp_cases (case_id, person_id, reporting_agency, competent_authority, status, reported_at,
             found_at, gender, age_band, child, citizenship, country_of_exploitation, exploitation_forms,
             decision, decided_at, decision_waiting_since)
         SELECT md5('d' || c.case_id)::uuid, c.person_id, 'kg-mvd', 'kg-mvd', 2, c.reported_at + (now() - c.reported_at) / 2, NULL,
                1 + (c.gender + 1) % 3, c.age_band, false, lower(c.citizenship), 'TR', ARRAY[1 + c.exploitation_forms[1] % 8, 1 + c.exploitation_forms[1] % 8, 2],
                0, NULL, c.reported_at + (now() - c.reported_at) / 2
         FROM cp_cases c WHERE get_byte(uuid_send(c.person_id), 1) % 20 = 7",
    // referrals of two persons in five (a second for one in ten), of each status
    r"INSERT INTO cp_referrals (referral_id, person_id, case_id, referring_agency, receiving_agency, services, urgency,
             status, created_at, waiting_since, answer_due_at, answered_at, accepted_at, closed_at, outcome)
         SELECT md5('r' || k || c.case_id)::uuid, c.person_id, c.case_id, 'kg-mvd', 'kg-ngo', ARRAY[1], 1,
                (ARRAY['pending','accepted','closed','declined','cancelled'])[1 + (get_byte(uuid_send(c.person_id), 2) + k) % 5],
                c.reported_at + interval '2 days',
                CASE WHEN (get_byte(uuid_send(c.person_id), 2) + k) % 5 = 0 THEN c.reported_at + interval '2 days' END,
                CASE WHEN (get_byte(uuid_send(c.person_id), 2) + k) % 5 = 0 THEN c.reported_at + interval '5 days' END,
                CASE WHEN (get_byte(uuid_send(c.person_id), 2) + k) % 5 IN (1, 2, 3) THEN c.reported_at + interval '2 days' + make_interval(secs => get_byte(uuid_send(c.person_id), 3) * 1000) END,
                CASE WHEN (get_byte(uuid_send(c.person_id), 2) + k) % 5 IN (1, 2) THEN c.reported_at + interval '3 days' END,
                CASE WHEN (get_byte(uuid_send(c.person_id), 2) + k) % 5 = 2 THEN c.reported_at + interval '30 days' END,
                CASE WHEN (get_byte(uuid_send(c.person_id), 2) + k) % 5 = 2 THEN 1 + k ELSE 0 END
         FROM cp_cases c, generate_series(1, 2) AS k
         WHERE c.found_at IS NOT NULL AND get_byte(uuid_send(c.person_id), 4) % 5 < 2 AND (k = 1 OR get_byte(uuid_send(c.person_id), 4) % 10 = 0)",
    // plan goals of one person in eight, some met
    r"INSERT INTO cp_goals (goal_id, person_id, kind, added_at, due_at, met_at)
         SELECT md5('g' || k || c.case_id)::uuid, c.person_id, k, c.reported_at + interval '10 days', NULL,
                CASE WHEN (get_byte(uuid_send(c.person_id), 5) + k) % 3 > 0 THEN c.reported_at + make_interval(days => 10 + k * 20) END
         FROM cp_cases c, generate_series(1, 2) AS k WHERE c.found_at IS NOT NULL AND get_byte(uuid_send(c.person_id), 6) % 8 = 4",
    // a bed for one in three accepted or closed referrals, admitted (or discharged)
    r"INSERT INTO cp_holds (hold_id, shelter_id, referral_id, holder_agency, category, held_at, status, admitted_at, discharged_at)
         SELECT md5('h' || r.referral_id)::uuid, md5('shelter')::uuid, r.referral_id, 'kg-ngo', 1, r.created_at,
                CASE WHEN r.status = 'accepted' THEN 'admitted' ELSE 'discharged' END, r.accepted_at, r.closed_at
         FROM cp_referrals r WHERE r.status IN ('accepted', 'closed') AND get_byte(uuid_send(r.referral_id), 0) % 3 = 0",
    // a return home of one person in fifty, opened for the case (a few handed over)
    r"INSERT INTO cp_returns (return_id, direction, from_country, to_country, opened_by, consulate_agency, foreign_reference,
             status, opened_at, handed_over_at)
         SELECT md5('t' || c.case_id)::uuid, 1, 'RU', 'KG', 'kg-mfa', 'kg-mfa', c.case_id::text,
                CASE WHEN get_byte(uuid_send(c.person_id), 7) % 2 = 0 THEN 10 ELSE 2 END, c.reported_at + interval '20 days',
                CASE WHEN get_byte(uuid_send(c.person_id), 7) % 2 = 0 THEN c.reported_at + interval '40 days' END
         FROM cp_cases c WHERE c.found_at IS NOT NULL AND get_byte(uuid_send(c.person_id), 8) % 50 = 1",
];

/// The statistics query over `persons` persons written into casepath's read model.
async fn statistics(database_url: &str, nats_url: &str, persons: usize) -> anyhow::Result<(usize, usize, u64, u64)> {
    let nats = space(nats_url);
    let bus = Bus::connect(&nats).await?;
    ensure_streams(&bus).await?;
    let casepath = Casepath::start(database_url, &nats, 200).await?;
    // A year of reports (and half as many persons a year before it, who
    // are not counted): gender, age band, citizenship and form spread over
    // their values; half decided within a fortnight. Then the records the
    // stage is decided on, for a share of all persons: a later case (one in
    // twenty), referrals of each status (two in five), plan goals (one in
    // eight), beds (a third of accepted or closed referrals), returns home
    // (one in fifty, by the case ID).
    let persons_in = i64::try_from(persons).unwrap_or(i64::MAX);
    for (step, sql) in STATS_SEED.iter().enumerate() {
        let query = sqlx::query(*sql);
        let query = if step == 0 { query.bind(persons_in) } else { query };
        query
            .execute(&casepath.pool)
            .await
            .with_context(|| format!("write the statistics' read model (step {step})"))?;
    }
    // The per-person facts of those records, as a rebuild derives them at
    // its end (the projections keep them after each batch they apply).
    {
        use nrm_kernel::projection::Projection as _;
        let country = CountryCode::parse("country", "KG").map_err(|v| anyhow::anyhow!("{v:?}"))?;
        let key = WatchKey::new(&[0; 32]);
        let mut conn = casepath.pool.acquire().await?;
        IdentificationProjection::new(&country, &key)
            .after_replay(&mut conn)
            .await
            .context("derive the persons' case facts")?;
        ReferralProjection::new(&country, &key)
            .after_replay(&mut conn)
            .await
            .context("derive the persons' referral facts")?;
    }
    sqlx::raw_sql(
        "VACUUM ANALYZE cp_cases, cp_referrals, cp_goals, cp_holds, cp_returns, cp_person_cases, cp_person_referrals",
    )
    .execute(&casepath.pool)
    .await?;
    let coordinator = token("kg-coordinator", Role::Coordinator, "bench-coordinator")?;
    // Publishable figures are of whole calendar months: the thirteen that
    // hold the year of reports, up to the first of next month.
    use chrono::Datelike as _;
    let this_month = chrono::Utc::now()
        .date_naive()
        .with_day(1)
        .context("the first of this month")?;
    let month_start = |months_ahead: i32| -> anyhow::Result<chrono::DateTime<chrono::Utc>> {
        let date = if months_ahead >= 0 {
            this_month.checked_add_months(chrono::Months::new(months_ahead.unsigned_abs()))
        } else {
            this_month.checked_sub_months(chrono::Months::new(months_ahead.unsigned_abs()))
        };
        Ok(date.context("a month")?.and_time(chrono::NaiveTime::MIN).and_utc())
    };
    let request = cp::GetStatisticsRequest {
        from: Some(nrm_kernel::validate::timestamp(month_start(-12)?)),
        to: Some(nrm_kernel::validate::timestamp(month_start(1)?)),
        publishable: true,
        min_cell: 0,
    };
    let mut client = casepath.client.clone();
    // One call first: a warm cache, and a check that everyone is counted.
    let first = client
        .get_statistics(authorized(request, &coordinator)?)
        .await?
        .into_inner();
    let total = first
        .counts
        .iter()
        .find(|c| c.dimension == "stage" && c.value == "total")
        .map_or(0, |c| c.count);
    if total != u64::try_from(persons).unwrap_or(0) {
        eprintln!("bench: casepath statistics count {total} persons of {persons}");
    }
    let mut histogram = stats::new_histogram()?;
    for _ in 0..STATS_CALLS {
        let started = Instant::now();
        client.get_statistics(authorized(request, &coordinator)?).await?;
        stats::record(&mut histogram, started.elapsed());
    }
    casepath.stop().await;
    delete_streams(&bus).await;
    Ok((
        persons,
        STATS_CALLS,
        histogram.value_at_quantile(0.50),
        histogram.value_at_quantile(0.99),
    ))
}

/// Every measurement of this module.
///
/// # Errors
/// When a server fails or a phase does not finish in time.
pub async fn run(database_url: &str, nats_url: &str, plan: &Plan) -> anyhow::Result<CasepathResults> {
    let mut results = CasepathResults::default();
    if plan.persons > 0 {
        eprintln!("bench: casepath statistics over {} persons", plan.persons);
        results.statistics = Some(statistics(database_url, nats_url, plan.persons).await?);
    }
    if plan.rate > 0 && plan.seconds > 0 && plan.watched > 0 {
        eprintln!(
            "bench: casepath lag, {} commands/s for {} s over {} persons, {} of them watched",
            plan.rate,
            plan.seconds,
            plan.loaded.max(plan.watched),
            plan.watched
        );
        results.lag = Some(lag(database_url, nats_url, plan).await?);
    }
    if plan.events > 0 {
        eprintln!("bench: casepath replay of {} events", plan.events);
        results.replay = Some(replay(database_url, nats_url, plan.events).await?);
    }
    Ok(results)
}

/// The results as a markdown section.
#[must_use]
pub fn markdown(r: &CasepathResults) -> String {
    use std::fmt::Write as _;
    let met = |ok: bool| if ok { "met" } else { "NOT met" };
    let mut out = String::from("\n## casepath (issue 11)\n\n| measurement | result | aim |\n|---|---|---|\n");
    if let Some((events, commits, elapsed)) = r.replay {
        let rate = events as f64 / elapsed.as_secs_f64().max(f64::EPSILON);
        let _ = writeln!(
            out,
            "| replay of {events} identification events ({commits} commits) into an empty casepath | {rate:.0} events/s ({:.1} s) | ≥ {REPLAY_AIM:.0}/s: {} |",
            elapsed.as_secs_f64(),
            met(rate >= REPLAY_AIM)
        );
    }
    if let Some(lag) = &r.lag {
        let _ = writeln!(
            out,
            "| RecordConsent acknowledged → watched path shows it, {} commands/s asked ({:.0} sent, {:.0} achieved, {} acknowledged, not acknowledged: {}) over {} persons, {} watched; of the watched persons' commands {} of {} seen | p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms | p99 < {} ms: {} |",
            lag.rate,
            lag.sent_rate,
            lag.achieved,
            lag.acknowledged,
            if lag.refused.is_empty() {
                "none".to_owned()
            } else {
                lag.refused
                    .iter()
                    .map(|(code, n)| format!("{code} {n}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            },
            lag.persons,
            lag.watched,
            lag.seen,
            lag.sent,
            lag.p50_us as f64 / 1000.0,
            lag.p99_us as f64 / 1000.0,
            lag.max_us as f64 / 1000.0,
            LAG_AIM_US / 1000,
            met(lag.p99_us < LAG_AIM_US && lag.seen == lag.sent && lag.sent_rate >= lag.rate as f64 * SENT_SHARE)
        );
    }
    if let Some((persons, calls, p50, p99)) = r.statistics {
        let _ = writeln!(
            out,
            "| GetStatistics (publishable, a year) over {persons} persons, {calls} calls | p50 {:.1} ms, p99 {:.1} ms | < {} ms: {} |",
            p50 as f64 / 1000.0,
            p99 as f64 / 1000.0,
            STATS_AIM_US / 1000,
            met(p99 < STATS_AIM_US)
        );
    }
    out
}
