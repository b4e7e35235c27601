//! The shelter service under load: bed holds under contention (and a check
//! that a race for the last beds never over-books), the free-capacity query,
//! and the reaction of the shelter service to an accepted referral (a bed
//! held, seen on NATS).
//!
//! The shelter service runs in this process with a database of its own and
//! subjects of its own, like [`crate::service`] runs the identification
//! service. The referral service's side of the bus is played by the kernel,
//! as `tests/src/beds.rs` does ([`Feed`]): an event store on a scratch
//! database and a relay to the referral stream of the same NATS space,
//! committing `ReferralAccepted` addressed to [`HOLDER`].
//!
//! `HoldBed` holds a bed only for a referral the shelter service knows as
//! accepted and addressed to the caller's agency, once. So before each hold
//! phase (and the race) the referrals its holds will use are committed as
//! `ReferralAccepted` without a shelter need (the placement reaction holds
//! nothing for them), published, and waited for in the service's
//! `shelter_referrals`; only then are the holds timed, one per referral, by
//! an msd officer of [`HOLDER`]. For the reaction, `ReferralAccepted` carries
//! a shelter need; messages on NATS are the relay's `EventCommit`s and
//! `BedHeld` is found in their events.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use anyhow::{Context as _, bail};
use base64::Engine as _;
use futures::StreamExt as _;
use nrm_kernel::auth::Role;
use nrm_kernel::bus::Bus;
use nrm_kernel::relay::{Relay, RelayConfig};
use nrm_kernel::retry::RetryPolicy;
use nrm_kernel::service::{CommonSettings, Service as _};
use nrm_kernel::settings::{DatabaseSettings, NatsSettings, RelaySettings, ServerSettings, TelemetrySettings};
use nrm_kernel::store::{Actor, EventMetadata, EventStore, NewEvent};
use nrm_proto::common::v1::EventCommit;
use nrm_proto::referral::v1 as referral;
use nrm_proto::shelter::v1 as pb;
use nrm_proto::shelter::v1::shelter_service_client::ShelterServiceClient;
use nrm_shelter::config::{SealingSettings, Settings, ShelterSettings};
use nrm_shelter::startup::Application;
use prost::Message as _;
use secrecy::SecretString;
use sqlx::PgPool;
use tokio::sync::Mutex;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tonic::Code;
use tonic::transport::Channel;
use tonic_types::StatusExt as _;
use uuid::Uuid;

use crate::service::{auth_settings, authorized, token};
use crate::stats::{self, RunResult};

/// Beds of the shelter the throughput phases hold from (the most a category may have).
pub const MAX_BEDS: u32 = 10_000;
/// The regions of Kyrgyzstan the shelter service knows.
pub const REGIONS: [&str; 9] = ["KG-GB", "KG-GO", "KG-C", "KG-T", "KG-Y", "KG-N", "KG-J", "KG-O", "KG-B"];
/// The operator of every shelter registered here.
const OPERATOR: &str = "kg-ngo-sezim";
/// The agency every referral here is addressed to, and whose msd officer holds the beds.
pub const HOLDER: &str = "kg-msd";
/// Referrals held, at 4 clients, before each hold phase (not counted).
pub const WARMUP_HOLDS: usize = 50;

/// What to measure.
#[derive(Debug, Clone)]
pub struct Plan {
    /// Client counts of the hold phases.
    pub hold_clients: Vec<usize>,
    /// Seconds per hold phase.
    pub hold_seconds: u64,
    /// Accepted referrals prepared for each hold phase (a phase ends early when they run out).
    pub hold_referrals: usize,
    /// Free beds of the race.
    pub race_beds: u32,
    /// Clients of the race.
    pub race_clients: usize,
    /// Shelters registered for the free-capacity query.
    pub shelters: usize,
    /// Sequential free-capacity calls.
    pub queries: usize,
    /// Accepted referrals per second.
    pub placement_rate: u64,
    /// Seconds of accepted referrals.
    pub placement_seconds: u64,
}

/// How the calls that did not get a bed were answered.
#[derive(Debug, Clone, Default)]
pub struct Refusals {
    /// `FAILED_PRECONDITION` by rule code, and `PERMISSION_DENIED`.
    pub refused: BTreeMap<String, u64>,
    /// Answers `ABORTED` (the service's own retries on a version conflict ran out).
    pub aborted: u64,
    /// Any other error.
    pub other: u64,
}

impl Refusals {
    /// The refusals as a table cell: "0", or "32 (NO_BED_FREE 32)".
    #[must_use]
    pub fn refused_cell(&self) -> String {
        let total: u64 = self.refused.values().sum();
        if total == 0 {
            return "0".into();
        }
        let reasons: Vec<String> = self.refused.iter().map(|(r, n)| format!("{r} {n}")).collect();
        format!("{total} ({})", reasons.join(", "))
    }
}

/// One hold phase.
#[derive(Debug, Clone)]
pub struct HoldPhase {
    /// Clients holding at once.
    pub clients: usize,
    /// Accepted referrals prepared for the phase, one hold each.
    pub referrals: usize,
    /// Whether the phase ended because they ran out (before its seconds were up).
    pub ran_out: bool,
    /// Successful holds (latency from send to answer; the window is the phase's).
    pub holds: RunResult,
    /// The calls that got no bed.
    pub refusals: Refusals,
}

/// The race for the last beds.
#[derive(Debug, Clone, Default)]
pub struct Race {
    /// Free beds at the start.
    pub beds: u32,
    /// Clients racing.
    pub clients: usize,
    /// Accepted referrals prepared for the race, one hold each.
    pub referrals: usize,
    /// Holds the clients were granted.
    pub successes: u64,
    /// `BedHeld` events in the shelter's stream afterwards.
    pub bed_held_events: i64,
    /// The calls that got no bed.
    pub refusals: Refusals,
}

impl Race {
    /// Holds beyond the beds there were, by the clients' count or the events, whichever is more.
    #[must_use]
    pub fn over_bookings(&self) -> u64 {
        let events = u64::try_from(self.bed_held_events).unwrap_or(0);
        self.successes.max(events).saturating_sub(u64::from(self.beds))
    }
}

/// The free-capacity query.
#[derive(Debug, Clone, Default)]
pub struct Query {
    /// Shelters registered.
    pub shelters: usize,
    /// Regions they are spread over.
    pub regions: usize,
    /// Calls, sequential; latency per call.
    pub calls: RunResult,
    /// Entries per answer, on average.
    pub entries: f64,
}

/// Accepted referral → bed held.
#[derive(Debug, Clone, Default)]
pub struct Placement {
    /// Referrals per second asked for.
    pub rate: u64,
    /// Referrals published.
    pub referrals: usize,
    /// Referrals per second achieved.
    pub achieved_rate: f64,
    /// From the relay's publish acknowledgement to `BedHeld` on NATS.
    pub latency: RunResult,
    /// `BedHeld` that did not arrive within 10 s of the last publish.
    pub missing: usize,
}

/// Everything this module measured.
#[derive(Debug, Clone, Default)]
pub struct ShelterResults {
    /// Hold phases.
    pub holds: Vec<HoldPhase>,
    /// Seconds per hold phase.
    pub hold_seconds: u64,
    /// The race.
    pub race: Option<Race>,
    /// The query.
    pub query: Option<Query>,
    /// The reaction.
    pub placement: Option<Placement>,
}

/// A running shelter service.
struct Service {
    settings: Settings,
    client: ShelterServiceClient<Channel>,
    pool: PgPool,
    shutdown: CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

impl Service {
    async fn start(database_url: &str, nats_url: &str) -> anyhow::Result<Self> {
        let id = Uuid::new_v4().simple().to_string()[..12].to_owned();
        let settings = Settings {
            common: CommonSettings {
                server: ServerSettings {
                    grpc_addr: "127.0.0.1:0".parse()?,
                    metrics_addr: "127.0.0.1:0".parse()?,
                    ..ServerSettings::default()
                },
                database: DatabaseSettings {
                    url: database_url.to_owned(),
                    name: format!("bench_shelter_{id}"),
                    max_connections: 16,
                },
                nats: NatsSettings {
                    url: nats_url.to_owned(),
                    subject_prefix: format!("s{id}"),
                    stream_prefix: format!("S{}", id.to_ascii_uppercase()),
                    replicas: 1,
                    duplicate_window_seconds: 120,
                },
                relay: RelaySettings::default(),
                retry: RetryPolicy::default(),
                auth: auth_settings()?,
                telemetry: TelemetrySettings::default(),
            },
            sealing: SealingSettings {
                master_key: SecretString::from(base64::engine::general_purpose::STANDARD.encode([7u8; 32])),
            },
            shelter: ShelterSettings::default(),
        };
        let app = Application::build(&settings)
            .await
            .context("build the shelter service")?;
        let addr = app.kit().grpc_addr()?;
        let (shutdown, task) = crate::casepath::run_in_background(app, "the shelter service");
        let client = ShelterServiceClient::connect(format!("http://{addr}"))
            .await
            .context("connect to the shelter service")?;
        let pool = PgPool::connect_with(nrm_kernel::db::connect_options(&settings.database)?)
            .await
            .context("connect to the shelter database")?;
        Ok(Self {
            settings,
            client,
            pool,
            shutdown,
            task,
        })
    }

    async fn stop(self) {
        self.shutdown.cancel();
        let _ = tokio::time::timeout(Duration::from_secs(15), self.task).await;
        self.pool.close().await;
        if let Ok(nats) = async_nats::connect(self.settings.nats.url.as_str()).await {
            let js = async_nats::jetstream::new(nats);
            for context in ["SHELTER", "REFERRAL"] {
                let _ = js
                    .delete_stream(format!("{}_{context}", self.settings.nats.stream_prefix))
                    .await;
            }
        }
        if let Err(err) = nrm_kernel::db::drop_database(&self.settings.database).await {
            eprintln!("bench: could not drop {}: {err}", self.settings.database.name);
        }
    }

    /// Registers a shelter with `beds` of each category given and has the
    /// coordinator approve it; returns its ID.
    async fn register(&self, region: &str, beds: &[(pb::BedCategory, u32)]) -> anyhow::Result<String> {
        let request = pb::RegisterShelterRequest {
            request_id: Uuid::now_v7().to_string(),
            code: format!("CC-{}", &Uuid::new_v4().simple().to_string()[..6]),
            region: region.to_owned(),
            address: "Street 1, house 2".into(),
            capacity: beds
                .iter()
                .map(|(category, beds)| pb::BedCapacity {
                    category: *category as i32,
                    beds: *beds,
                })
                .collect(),
            services: vec![pb::OnSiteService::Psychological as i32],
            wheelchair_accessible: true,
        };
        let operator = token(OPERATOR, Role::Ngo, "officer-1")?;
        let shelter_id = self
            .client
            .clone()
            .register_shelter(authorized(request, &operator)?)
            .await
            .context("register a shelter")?
            .into_inner()
            .shelter_id;
        // A shelter takes referrals once the coordinator approved it.
        let coordinator = token("kg-coordinator", Role::Coordinator, "coordinator-1")?;
        let approve = pb::ApproveShelterRequest {
            request_id: uuid::Uuid::now_v7().to_string(),
            shelter_id: shelter_id.clone(),
            expected_version: 1,
        };
        self.client
            .clone()
            .approve_shelter(authorized(approve, &coordinator)?)
            .await
            .context("approve the shelter")?;
        Ok(shelter_id)
    }

    /// Waits until the free-capacity read model knows `shelters` shelters.
    async fn wait_read_model(&self, shelters: i64) -> anyhow::Result<()> {
        for _ in 0..600 {
            let known: i64 = sqlx::query_scalar("SELECT count(*) FROM free_capacity_shelters")
                .fetch_one(&self.pool)
                .await?;
            if known >= shelters {
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        bail!("the free-capacity read model did not reach {shelters} shelters within 30 s")
    }

    /// Waits until the placement runner has put every one of `referrals`
    /// into `shelter_referrals` as accepted (what `HoldBed` checks).
    async fn wait_referrals(&self, referrals: &[Uuid]) -> anyhow::Result<()> {
        let want = i64::try_from(referrals.len())?;
        // 30 s, and 20 ms more per referral.
        let deadline =
            Instant::now() + Duration::from_secs(30) + Duration::from_millis(20) * u32::try_from(referrals.len())?;
        loop {
            let known: i64 = sqlx::query_scalar(
                "SELECT count(*) FROM shelter_referrals WHERE referral_id = ANY($1) AND state = 'accepted'",
            )
            .bind(referrals)
            .fetch_one(&self.pool)
            .await
            .context("count the referrals the shelter service knows")?;
            if known >= want {
                return Ok(());
            }
            if Instant::now() >= deadline {
                bail!("the shelter service knew {known} of {want} accepted referrals when the wait ended");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// Every measurement of this module, on one shelter service.
///
/// # Errors
/// When the service cannot start or a server fails.
pub async fn run(database_url: &str, nats_url: &str, plan: &Plan) -> anyhow::Result<ShelterResults> {
    let service = Service::start(database_url, nats_url).await?;
    let outcome = match Feed::new(&service, database_url).await {
        Ok(mut feed) => {
            let outcome = measure(&service, &mut feed, plan).await;
            feed.drop_all().await;
            outcome
        }
        Err(err) => Err(err),
    };
    service.stop().await;
    outcome
}

async fn measure(service: &Service, feed: &mut Feed, plan: &Plan) -> anyhow::Result<ShelterResults> {
    let mut results = ShelterResults {
        hold_seconds: plan.hold_seconds,
        ..ShelterResults::default()
    };
    // HoldBed admits msd, moh, ngo, iom and shelter for referrals addressed to their agency.
    let msd = token(HOLDER, Role::Msd, "officer-2")?;
    if plan.hold_seconds > 0 {
        for &clients in &plan.hold_clients {
            results
                .holds
                .push(hold_phase(service, feed, &msd, clients, plan).await?);
        }
    }
    if plan.race_clients > 0 && plan.race_beds > 0 {
        results.race = Some(race(service, feed, &msd, plan.race_beds, plan.race_clients).await?);
    }
    if plan.shelters > 0 && plan.queries > 0 {
        eprintln!(
            "bench: free capacity, {} shelters, {} calls",
            plan.shelters, plan.queries
        );
        results.query = Some(query(service, &msd, plan.shelters, plan.queries).await?);
    }
    if plan.placement_rate > 0 && plan.placement_seconds > 0 {
        eprintln!(
            "bench: accepted referral → bed held, {}/s for {} s",
            plan.placement_rate, plan.placement_seconds
        );
        results.placement = Some(placement(service, feed, plan.placement_rate, plan.placement_seconds).await?);
    }
    Ok(results)
}

/// Referrals accepted for [`HOLDER`], handed out one per hold.
struct Referrals {
    ids: Vec<String>,
    next: AtomicUsize,
}

impl Referrals {
    fn new(ids: Vec<String>) -> Arc<Self> {
        Arc::new(Self {
            ids,
            next: AtomicUsize::new(0),
        })
    }

    /// The next referral nobody has held for, if one is left.
    fn take(&self) -> Option<&str> {
        self.ids
            .get(self.next.fetch_add(1, Ordering::Relaxed))
            .map(String::as_str)
    }

    /// Whether a client asked for a referral when none was left.
    fn ran_out(&self) -> bool {
        self.next.load(Ordering::Relaxed) > self.ids.len()
    }
}

/// `count` referrals accepted for [`HOLDER`] without a shelter need,
/// published and known to the shelter service.
async fn prepare(service: &Service, feed: &mut Feed, count: usize) -> anyhow::Result<Vec<String>> {
    let started = Instant::now();
    let ids: Vec<Uuid> = (0..count).map(|_| Uuid::now_v7()).collect();
    feed.accept_all(&ids).await?;
    service.wait_referrals(&ids).await?;
    eprintln!(
        "bench: {count} accepted referrals for {HOLDER} known to the shelter service in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    Ok(ids.iter().map(Uuid::to_string).collect())
}

/// One hold phase: a shelter of its own (so that no phase runs out of
/// beds), its referrals prepared, a warm-up, then `clients` clients holding
/// for `plan.hold_seconds` or until the referrals run out.
async fn hold_phase(
    service: &Service,
    feed: &mut Feed,
    token: &str,
    clients: usize,
    plan: &Plan,
) -> anyhow::Result<HoldPhase> {
    let shelter = service.register("KG-GB", &[(pb::BedCategory::Women, MAX_BEDS)]).await?;
    let beds = usize::try_from(MAX_BEDS)?;
    let count = plan.hold_referrals.clamp(1, beds - WARMUP_HOLDS);
    let mut ids = prepare(service, feed, WARMUP_HOLDS + count).await?;
    let timed = ids.split_off(WARMUP_HOLDS);
    // Warm-up: connections, statements.
    let warmup = holds(
        service,
        token,
        &shelter,
        4,
        Duration::from_secs(10),
        Referrals::new(ids),
    )
    .await?;
    warn_refusals("the hold warm-up", &warmup.refusals);
    eprintln!(
        "bench: shelter holds, {clients} clients, {} s or {count} referrals",
        plan.hold_seconds
    );
    let phase = holds(
        service,
        token,
        &shelter,
        clients,
        Duration::from_secs(plan.hold_seconds),
        Referrals::new(timed),
    )
    .await?;
    warn_refusals(&format!("the holds at {clients} clients"), &phase.refusals);
    if phase.ran_out {
        eprintln!(
            "bench: the holds at {clients} clients used all {count} referrals in {:.1} s (raise --shelter-referrals)",
            phase.holds.window.as_secs_f64()
        );
    }
    Ok(phase)
}

fn warn_refusals(what: &str, refusals: &Refusals) {
    if !refusals.refused.is_empty() || refusals.aborted > 0 || refusals.other > 0 {
        eprintln!(
            "bench: {what} got refusals {}, {} aborted, {} other errors",
            refusals.refused_cell(),
            refusals.aborted,
            refusals.other
        );
    }
}

fn hold_request(shelter_id: &str, referral_id: &str) -> pb::HoldBedRequest {
    pb::HoldBedRequest {
        request_id: Uuid::now_v7().to_string(),
        shelter_id: shelter_id.to_owned(),
        category: pb::BedCategory::Women as i32,
        referral_id: referral_id.to_owned(),
        hold_minutes: 60,
    }
}

/// The rule code of a refusal: a `FAILED_PRECONDITION`'s violation type, or the status code.
fn reason(status: &tonic::Status) -> String {
    status
        .get_details_precondition_failure()
        .and_then(|p| p.violations.first().map(|v| v.r#type.clone()))
        .unwrap_or_else(|| format!("{:?}", status.code()))
}

/// The counts of [`Refusals`], shared by the clients.
#[derive(Default)]
struct Counts {
    refused: std::sync::Mutex<BTreeMap<String, u64>>,
    aborted: AtomicU64,
    other: AtomicU64,
    /// The first other error, for the log.
    first_other: std::sync::OnceLock<String>,
}

impl Counts {
    /// Counts `status`; its rule code when it is a refusal.
    fn count(&self, status: &tonic::Status) -> Option<String> {
        match status.code() {
            Code::FailedPrecondition | Code::PermissionDenied => {
                let reason = reason(status);
                if let Ok(mut refused) = self.refused.lock() {
                    *refused.entry(reason.clone()).or_default() += 1;
                }
                return Some(reason);
            }
            Code::Aborted => self.aborted.fetch_add(1, Ordering::Relaxed),
            _ => {
                let _ = self
                    .first_other
                    .set(format!("{:?}: {}", status.code(), status.message()));
                self.other.fetch_add(1, Ordering::Relaxed)
            }
        };
        None
    }

    fn refusals(&self) -> Refusals {
        if let Some(first) = self.first_other.get() {
            eprintln!("bench: a hold failed with {first}");
        }
        Refusals {
            refused: self.refused.lock().map(|r| r.clone()).unwrap_or_default(),
            aborted: self.aborted.load(Ordering::Relaxed),
            other: self.other.load(Ordering::Relaxed),
        }
    }
}

/// `clients` clients holding beds of one shelter for `window`, each hold
/// for the next of `referrals`, until the window ends or they run out.
async fn holds(
    service: &Service,
    token: &str,
    shelter: &str,
    clients: usize,
    window: Duration,
    referrals: Arc<Referrals>,
) -> anyhow::Result<HoldPhase> {
    let counts = Arc::new(Counts::default());
    let started = Instant::now();
    let deadline = started + window;
    let mut workers = Vec::new();
    for _ in 0..clients.max(1) {
        let mut client = service.client.clone();
        let counts = Arc::clone(&counts);
        let referrals = Arc::clone(&referrals);
        let token = token.to_owned();
        let shelter = shelter.to_owned();
        workers.push(tokio::spawn(async move {
            let mut histogram = stats::new_histogram()?;
            while Instant::now() < deadline {
                let Some(referral_id) = referrals.take() else {
                    break;
                };
                let request = authorized(hold_request(&shelter, referral_id), &token)?;
                let sent = Instant::now();
                match client.hold_bed(request).await {
                    Ok(_) => stats::record(&mut histogram, sent.elapsed()),
                    Err(status) => {
                        counts.count(&status);
                    }
                }
            }
            anyhow::Ok(histogram)
        }));
    }
    let mut histogram = stats::new_histogram()?;
    for worker in workers {
        histogram.add(worker.await??)?;
    }
    let elapsed = started.elapsed();
    Ok(HoldPhase {
        clients,
        referrals: referrals.ids.len(),
        // Clients ask only before the deadline.
        ran_out: referrals.ran_out(),
        holds: RunResult::from_histogram(&histogram, elapsed, 0),
        refusals: counts.refusals(),
    })
}

/// `clients` clients racing for the `beds` beds of a new shelter, each
/// holding (a referral of its own each time) until told that no bed is
/// free; then the events are counted.
async fn race(service: &Service, feed: &mut Feed, token: &str, beds: u32, clients: usize) -> anyhow::Result<Race> {
    let shelter = service.register("KG-GB", &[(pb::BedCategory::Women, beds)]).await?;
    let clients = clients.max(1);
    // Every bed and every client's NO_BED_FREE, twice over: a bound, should the service never refuse.
    let ids = prepare(service, feed, 2 * (usize::try_from(beds)? + clients)).await?;
    let referrals = Referrals::new(ids);
    eprintln!("bench: shelter race, {clients} clients for {beds} beds");
    let counts = Arc::new(Counts::default());
    let successes = Arc::new(AtomicU64::new(0));
    let start = Arc::new(tokio::sync::Barrier::new(clients));
    let mut workers = Vec::new();
    for _ in 0..clients {
        let mut client = service.client.clone();
        let counts = Arc::clone(&counts);
        let successes = Arc::clone(&successes);
        let start = Arc::clone(&start);
        let referrals = Arc::clone(&referrals);
        let token = token.to_owned();
        let shelter = shelter.clone();
        workers.push(tokio::spawn(async move {
            start.wait().await;
            while let Some(referral_id) = referrals.take() {
                match client
                    .hold_bed(authorized(hold_request(&shelter, referral_id), &token)?)
                    .await
                {
                    Ok(_) => {
                        successes.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(status) => {
                        if counts.count(&status).as_deref() == Some("NO_BED_FREE") {
                            break;
                        }
                    }
                }
            }
            anyhow::Ok(())
        }));
    }
    for worker in workers {
        worker.await??;
    }
    let bed_held_events: i64 =
        sqlx::query_scalar("SELECT count(*) FROM events WHERE stream_id = $1 AND event_type = 'BedHeld'")
            .bind(format!("shelter-{shelter}"))
            .fetch_one(&service.pool)
            .await
            .context("count BedHeld events")?;
    let refusals = counts.refusals();
    // NO_BED_FREE ends each client's turn; anything else is worth a line.
    let mut unexpected = refusals.clone();
    unexpected.refused.remove("NO_BED_FREE");
    warn_refusals("the race", &unexpected);
    Ok(Race {
        beds,
        clients,
        referrals: referrals.ids.len(),
        successes: successes.load(Ordering::Relaxed),
        bed_held_events,
        refusals,
    })
}

/// `shelters` shelters over the regions, then `calls` sequential
/// `ListFreeCapacity` by region (in turn) and women's beds.
async fn query(service: &Service, token: &str, shelters: usize, calls: usize) -> anyhow::Result<Query> {
    let before: i64 = sqlx::query_scalar("SELECT count(*) FROM free_capacity_shelters")
        .fetch_one(&service.pool)
        .await?;
    for n in 0..shelters {
        let beds = u32::try_from(5 + n % 20).unwrap_or(5);
        service
            .register(
                REGIONS[n % REGIONS.len()],
                &[(pb::BedCategory::Women, beds), (pb::BedCategory::Men, beds / 2 + 1)],
            )
            .await?;
    }
    service
        .wait_read_model(before + i64::try_from(shelters).unwrap_or(i64::MAX))
        .await?;
    let mut client = service.client.clone();
    let request = |n: usize| pb::ListFreeCapacityRequest {
        region: REGIONS[n % REGIONS.len()].to_owned(),
        category: pb::BedCategory::Women as i32,
    };
    for n in 0..50 {
        client.list_free_capacity(authorized(request(n), token)?).await?;
    }
    let mut histogram = stats::new_histogram()?;
    let mut entries = 0usize;
    let started = Instant::now();
    for n in 0..calls {
        let sent = Instant::now();
        let answer = client
            .list_free_capacity(authorized(request(n), token)?)
            .await
            .context("ListFreeCapacity")?;
        stats::record(&mut histogram, sent.elapsed());
        entries += answer.into_inner().entries.len();
    }
    Ok(Query {
        shelters,
        regions: REGIONS.len(),
        calls: RunResult::from_histogram(&histogram, started.elapsed(), 0),
        entries: entries as f64 / calls.max(1) as f64,
    })
}

/// The referral service's side of the bus: an event store on a scratch
/// database and a relay to the shelter service's referral stream.
struct Feed {
    database: DatabaseSettings,
    store: EventStore,
    relay: Relay,
    bus: Bus,
}

/// `ReferralAccepted` of `referral_id`, addressed to [`HOLDER`], with a need for a women's bed in `region` when given.
fn accepted(referral_id: &str, region: Option<&str>) -> referral::ReferralEvent {
    referral::ReferralEvent {
        event: Some(referral::referral_event::Event::ReferralAccepted(
            referral::ReferralAccepted {
                referral_id: referral_id.to_owned(),
                person_id: Uuid::now_v7().to_string(),
                receiving_agency: HOLDER.into(),
                shelter_need: region.map(|region| referral::ShelterNeed {
                    category: pb::BedCategory::Women as i32,
                    region: region.to_owned(),
                }),
                accepted_at: None,
            },
        )),
    }
}

impl Feed {
    async fn new(service: &Service, database_url: &str) -> anyhow::Result<Self> {
        let database = DatabaseSettings {
            url: database_url.to_owned(),
            name: format!("bench_feed_{}", &Uuid::new_v4().simple().to_string()[..12]),
            max_connections: 4,
        };
        let pool = nrm_kernel::db::connect_and_migrate(&database, &nrm_shelter::startup::MIGRATIONS)
            .await
            .context("create the referral feed's database")?;
        let bus = Bus::connect(&service.settings.nats).await?;
        bus.ensure_stream("referral").await?;
        let store = EventStore::new(pool.clone());
        let relay = Relay::new(
            pool,
            bus.clone(),
            "referral",
            store.appended_signal(),
            RelayConfig::new("nrm.referral.v1.ReferralEvent"),
        );
        Ok(Self {
            database,
            store,
            relay,
            bus,
        })
    }

    fn metadata() -> EventMetadata {
        EventMetadata {
            correlation_id: Uuid::now_v7(),
            causation_id: Uuid::now_v7(),
            actor: Actor {
                agency: HOLDER.into(),
                role: "msd".into(),
                officer: "officer-2".into(),
            },
            traceparent: None,
            tracestate: None,
        }
    }

    /// Adds `event` as the first of the stream of `referral_id` (a commit of its own) to `uow`.
    async fn append(
        &self,
        uow: &mut nrm_kernel::store::UnitOfWork,
        referral_id: &str,
        event: &referral::ReferralEvent,
    ) -> anyhow::Result<()> {
        uow.append(
            &format!("referral-{referral_id}"),
            0,
            &[NewEvent {
                event_type: "ReferralAccepted".into(),
                schema_version: 1,
                payload: event.encode_to_vec(),
            }],
            &Self::metadata(),
            &self.bus.subject("referral", "referral", referral_id),
        )
        .await?;
        Ok(())
    }

    /// Commits `ReferralAccepted` without a shelter need for each of
    /// `referrals` (a commit each, 200 to a transaction) and publishes them
    /// all; returns when the outbox is empty.
    async fn accept_all(&mut self, referrals: &[Uuid]) -> anyhow::Result<()> {
        for chunk in referrals.chunks(200) {
            let mut uow = self.store.begin().await?;
            for referral_id in chunk {
                let referral_id = referral_id.to_string();
                self.append(&mut uow, &referral_id, &accepted(&referral_id, None))
                    .await?;
            }
            uow.commit().await?;
        }
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let published = self.relay.publish_round().await?;
            let left: i64 = sqlx::query_scalar("SELECT count(*) FROM outbox")
                .fetch_one(self.store.pool())
                .await?;
            if left == 0 {
                return Ok(());
            }
            if Instant::now() >= deadline {
                bail!("{left} referral commits were not published within 60 s");
            }
            if published == 0 {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }
    }

    /// Commits `ReferralAccepted` with a need for a women's bed in `region`
    /// and publishes it; returns when JetStream has acknowledged it.
    async fn accept(&mut self, referral_id: &str, region: &str) -> anyhow::Result<()> {
        let mut uow = self.store.begin().await?;
        self.append(&mut uow, referral_id, &accepted(referral_id, Some(region)))
            .await?;
        uow.commit().await?;
        // A round may publish nothing while an older transaction anywhere in
        // the cluster is open (the relay waits for it).
        for _ in 0..2000 {
            if self.relay.publish_round().await? > 0 {
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        bail!("the referral commit was not published within 2 s")
    }

    async fn drop_all(self) {
        self.store.pool().close().await;
        let _ = nrm_kernel::db::drop_database(&self.database).await;
    }
}

/// `rate` accepted referrals a second for `seconds`, each until its `BedHeld` is on NATS.
async fn placement(service: &Service, feed: &mut Feed, rate: u64, seconds: u64) -> anyhow::Result<Placement> {
    // Beds in the region asked for, enough for every referral.
    let region = "KG-T";
    service.register(region, &[(pb::BedCategory::Women, MAX_BEDS)]).await?;
    drive_placement(service, feed, region, rate, seconds).await
}

async fn drive_placement(
    service: &Service,
    feed: &mut Feed,
    region: &str,
    rate: u64,
    seconds: u64,
) -> anyhow::Result<Placement> {
    let nats = async_nats::connect(service.settings.nats.url.as_str())
        .await
        .context("connect to NATS")?;
    let mut subscriber = nats
        .subscribe(format!("{}.shelter.v1.>", service.settings.nats.subject_prefix))
        .await?;
    nats.flush().await?;
    let arrivals: Arc<Mutex<HashMap<String, Instant>>> = Arc::default();
    let collector = {
        let arrivals = Arc::clone(&arrivals);
        tokio::spawn(async move {
            while let Some(message) = subscriber.next().await {
                let now = Instant::now();
                // The relay's body: an `EventCommit` of `ShelterEvent` payloads.
                let Ok(commit) = EventCommit::decode(message.payload.as_ref()) else {
                    continue;
                };
                for committed in &commit.events {
                    if let Ok(pb::ShelterEvent {
                        event: Some(pb::shelter_event::Event::BedHeld(held)),
                    }) = pb::ShelterEvent::decode(committed.payload.as_slice())
                    {
                        arrivals.lock().await.entry(held.referral_id).or_insert(now);
                    }
                }
            }
        })
    };
    let mut published: Vec<(String, Instant)> = Vec::new();
    // Warm-up: a few referrals, not counted.
    for _ in 0..10 {
        feed.accept(&Uuid::now_v7().to_string(), region).await?;
    }
    let total = usize::try_from(rate * seconds).unwrap_or(usize::MAX);
    let mut ticker = tokio::time::interval(Duration::from_micros(1_000_000 / rate.max(1)));
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let started = Instant::now();
    for _ in 0..total {
        ticker.tick().await;
        let referral_id = Uuid::now_v7().to_string();
        feed.accept(&referral_id, region).await?;
        published.push((referral_id, Instant::now()));
    }
    let achieved_rate = total as f64 / started.elapsed().as_secs_f64();
    let wait_until = Instant::now() + Duration::from_secs(10);
    loop {
        let arrived = {
            let at = arrivals.lock().await;
            published.iter().filter(|(id, _)| at.contains_key(id)).count()
        };
        if arrived == published.len() || Instant::now() >= wait_until {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    collector.abort();
    let at = arrivals.lock().await;
    let mut histogram = stats::new_histogram()?;
    let mut missing = 0;
    for (id, sent) in &published {
        match at.get(id) {
            Some(arrived) => stats::record(&mut histogram, arrived.saturating_duration_since(*sent)),
            None => missing += 1,
        }
    }
    Ok(Placement {
        rate,
        referrals: total,
        achieved_rate,
        latency: RunResult::from_histogram(&histogram, Duration::from_secs(seconds), 0),
        missing,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn over_bookings_count_the_larger_of_answers_and_events() {
        let race = |successes, bed_held_events| Race {
            beds: 50,
            clients: 32,
            successes,
            bed_held_events,
            ..Race::default()
        };
        assert_eq!(race(50, 50).over_bookings(), 0);
        assert_eq!(race(49, 50).over_bookings(), 0);
        assert_eq!(race(50, 52).over_bookings(), 2);
        assert_eq!(race(53, 50).over_bookings(), 3);
    }

    #[test]
    fn refusals_are_shown_by_rule_code() {
        let mut refusals = Refusals::default();
        assert_eq!(refusals.refused_cell(), "0");
        refusals.refused.insert("NO_BED_FREE".into(), 32);
        refusals.refused.insert("REFERRAL_NOT_ACCEPTED".into(), 2);
        assert_eq!(refusals.refused_cell(), "34 (NO_BED_FREE 32, REFERRAL_NOT_ACCEPTED 2)");
    }
}
