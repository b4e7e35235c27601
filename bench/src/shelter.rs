//! The shelter service under load: bed holds under contention (and a check
//! that a race for the last beds never over-books), the free-capacity query,
//! and the reaction of the shelter service to an accepted referral (a bed
//! held, seen on NATS).
//!
//! The shelter service runs in this process with a database of its own and
//! subjects of its own, like [`crate::service`] runs the identification
//! service. For the reaction, the referral service's side of the bus is
//! played by the kernel, as `tests/tests/shelter.rs` does: an event store on
//! a scratch database and a relay to the referral stream of the same NATS
//! space, committing `ReferralAccepted` with a shelter need. Messages on
//! NATS are the relay's `EventCommit`s; `BedHeld` is found in their events.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use anyhow::{Context as _, bail};
use base64::Engine as _;
use futures::StreamExt as _;
use hdrhistogram::Histogram;
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

use crate::service::{auth_settings, authorized, token};
use crate::stats::{self, RunResult};

/// Beds of the shelter the throughput phases hold from (the most a category may have).
const MAX_BEDS: u32 = 10_000;
/// The regions of Kyrgyzstan the shelter service knows.
pub const REGIONS: [&str; 9] = ["KG-GB", "KG-GO", "KG-C", "KG-T", "KG-Y", "KG-N", "KG-J", "KG-O", "KG-B"];
/// The operator of every shelter registered here.
const OPERATOR: &str = "kg-ngo-sezim";

/// What to measure.
#[derive(Debug, Clone)]
pub struct Plan {
    /// Client counts of the hold phases.
    pub hold_clients: Vec<usize>,
    /// Seconds per hold phase.
    pub hold_seconds: u64,
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

/// One hold phase.
#[derive(Debug, Clone)]
pub struct HoldPhase {
    /// Clients holding at once.
    pub clients: usize,
    /// Successful holds (latency from send to answer).
    pub holds: RunResult,
    /// Answers `FAILED_PRECONDITION`.
    pub failed_precondition: u64,
    /// Answers `ABORTED` (the service's own retries on a version conflict ran out).
    pub aborted: u64,
    /// Any other error.
    pub other_errors: u64,
}

/// The race for the last beds.
#[derive(Debug, Clone, Default)]
pub struct Race {
    /// Free beds at the start.
    pub beds: u32,
    /// Clients racing.
    pub clients: usize,
    /// Holds the clients were granted.
    pub successes: u64,
    /// `BedHeld` events in the shelter's stream afterwards.
    pub bed_held_events: i64,
    /// Answers `FAILED_PRECONDITION` / `ABORTED` / other.
    pub failed_precondition: u64,
    /// Answers `ABORTED`.
    pub aborted: u64,
    /// Other errors.
    pub other_errors: u64,
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
        let id = uuid::Uuid::new_v4().simple().to_string()[..12].to_owned();
        let settings = Settings {
            common: CommonSettings {
                server: ServerSettings {
                    grpc_addr: "127.0.0.1:0".parse()?,
                    metrics_addr: "127.0.0.1:0".parse()?,
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
        let shutdown = CancellationToken::new();
        let stop = shutdown.clone();
        let task = tokio::spawn(async move {
            if let Err(err) = app.run_until_stopped(stop).await {
                eprintln!("bench: the shelter service failed: {err:#}");
            }
        });
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
            request_id: uuid::Uuid::now_v7().to_string(),
            code: format!("CC-{}", &uuid::Uuid::new_v4().simple().to_string()[..6]),
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
}

/// Every measurement of this module, on one shelter service.
///
/// # Errors
/// When the service cannot start or a server fails.
pub async fn run(database_url: &str, nats_url: &str, plan: &Plan) -> anyhow::Result<ShelterResults> {
    let service = Service::start(database_url, nats_url).await?;
    let outcome = measure(&service, database_url, plan).await;
    service.stop().await;
    outcome
}

async fn measure(service: &Service, database_url: &str, plan: &Plan) -> anyhow::Result<ShelterResults> {
    let mut results = ShelterResults {
        hold_seconds: plan.hold_seconds,
        ..ShelterResults::default()
    };
    let msd = token("kg-msd", Role::Msd, "officer-2")?;
    if plan.hold_seconds > 0 {
        for &clients in &plan.hold_clients {
            // A shelter per phase, so that no phase runs out of beds.
            let shelter = service.register("KG-GB", &[(pb::BedCategory::Women, MAX_BEDS)]).await?;
            // Warm-up: connections, statements.
            let _ = holds(service, &msd, &shelter, 4, Duration::from_millis(500)).await?;
            eprintln!("bench: shelter holds, {clients} clients, {} s", plan.hold_seconds);
            let (phase, _) = holds(service, &msd, &shelter, clients, Duration::from_secs(plan.hold_seconds)).await?;
            results.holds.push(phase);
        }
    }
    if plan.race_clients > 0 && plan.race_beds > 0 {
        eprintln!(
            "bench: shelter race, {} clients for {} beds",
            plan.race_clients, plan.race_beds
        );
        results.race = Some(race(service, &msd, plan.race_beds, plan.race_clients).await?);
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
        results.placement = Some(placement(service, database_url, plan.placement_rate, plan.placement_seconds).await?);
    }
    Ok(results)
}

fn hold_request(shelter_id: &str) -> pb::HoldBedRequest {
    pb::HoldBedRequest {
        request_id: uuid::Uuid::now_v7().to_string(),
        shelter_id: shelter_id.to_owned(),
        category: pb::BedCategory::Women as i32,
        referral_id: uuid::Uuid::now_v7().to_string(),
        hold_minutes: 60,
    }
}

#[derive(Default)]
struct Counts {
    failed_precondition: AtomicU64,
    aborted: AtomicU64,
    other: AtomicU64,
}

impl Counts {
    fn count(&self, status: &tonic::Status) {
        let counter = match status.code() {
            Code::FailedPrecondition => &self.failed_precondition,
            Code::Aborted => &self.aborted,
            _ => &self.other,
        };
        counter.fetch_add(1, Ordering::Relaxed);
    }
}

/// `clients` clients holding beds of one shelter for `window`, each hold for a referral of its own.
async fn holds(
    service: &Service,
    token: &str,
    shelter: &str,
    clients: usize,
    window: Duration,
) -> anyhow::Result<(HoldPhase, Histogram<u64>)> {
    let counts = Arc::new(Counts::default());
    let started = Instant::now();
    let deadline = started + window;
    let mut workers = Vec::new();
    for _ in 0..clients.max(1) {
        let mut client = service.client.clone();
        let counts = Arc::clone(&counts);
        let token = token.to_owned();
        let shelter = shelter.to_owned();
        workers.push(tokio::spawn(async move {
            let mut histogram = stats::new_histogram()?;
            while Instant::now() < deadline {
                let sent = Instant::now();
                match client.hold_bed(authorized(hold_request(&shelter), &token)?).await {
                    Ok(_) => stats::record(&mut histogram, sent.elapsed()),
                    Err(status) => counts.count(&status),
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
    let phase = HoldPhase {
        clients,
        holds: RunResult::from_histogram(&histogram, elapsed, 0),
        failed_precondition: counts.failed_precondition.load(Ordering::Relaxed),
        aborted: counts.aborted.load(Ordering::Relaxed),
        other_errors: counts.other.load(Ordering::Relaxed),
    };
    Ok((phase, histogram))
}

/// `clients` clients racing for the `beds` beds of a new shelter, each
/// holding until told that no bed is free; then the events are counted.
async fn race(service: &Service, token: &str, beds: u32, clients: usize) -> anyhow::Result<Race> {
    let shelter = service.register("KG-GB", &[(pb::BedCategory::Women, beds)]).await?;
    let counts = Arc::new(Counts::default());
    let successes = Arc::new(AtomicU64::new(0));
    let start = Arc::new(tokio::sync::Barrier::new(clients.max(1)));
    let mut workers = Vec::new();
    for _ in 0..clients.max(1) {
        let mut client = service.client.clone();
        let counts = Arc::clone(&counts);
        let successes = Arc::clone(&successes);
        let start = Arc::clone(&start);
        let token = token.to_owned();
        let shelter = shelter.clone();
        workers.push(tokio::spawn(async move {
            start.wait().await;
            // At most twice the beds per client: a bound, should the service never refuse.
            for _ in 0..2 * beds {
                match client.hold_bed(authorized(hold_request(&shelter), &token)?).await {
                    Ok(_) => {
                        successes.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(status) => {
                        counts.count(&status);
                        if status.code() == Code::FailedPrecondition {
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
    Ok(Race {
        beds,
        clients,
        successes: successes.load(Ordering::Relaxed),
        bed_held_events,
        failed_precondition: counts.failed_precondition.load(Ordering::Relaxed),
        aborted: counts.aborted.load(Ordering::Relaxed),
        other_errors: counts.other.load(Ordering::Relaxed),
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

impl Feed {
    async fn new(service: &Service, database_url: &str) -> anyhow::Result<Self> {
        let database = DatabaseSettings {
            url: database_url.to_owned(),
            name: format!("bench_feed_{}", &uuid::Uuid::new_v4().simple().to_string()[..12]),
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

    /// Commits `ReferralAccepted` with a shelter need and publishes it;
    /// returns when JetStream has acknowledged it.
    async fn accept(&mut self, referral_id: &str, region: &str) -> anyhow::Result<()> {
        let event = referral::ReferralEvent {
            event: Some(referral::referral_event::Event::ReferralAccepted(
                referral::ReferralAccepted {
                    referral_id: referral_id.to_owned(),
                    person_id: uuid::Uuid::now_v7().to_string(),
                    receiving_agency: "kg-msd".into(),
                    shelter_need: Some(referral::ShelterNeed {
                        category: pb::BedCategory::Women as i32,
                        region: region.to_owned(),
                    }),
                    accepted_at: None,
                },
            )),
        };
        let metadata = EventMetadata {
            correlation_id: uuid::Uuid::now_v7(),
            causation_id: uuid::Uuid::now_v7(),
            actor: Actor {
                agency: "kg-msd".into(),
                role: "msd".into(),
                officer: "officer-2".into(),
            },
            traceparent: None,
            tracestate: None,
        };
        let mut uow = self.store.begin().await?;
        uow.append(
            &format!("referral-{referral_id}"),
            0,
            &[NewEvent {
                event_type: "ReferralAccepted".into(),
                schema_version: 1,
                payload: event.encode_to_vec(),
            }],
            &metadata,
            &self.bus.subject("referral", "referral", referral_id),
        )
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
async fn placement(service: &Service, database_url: &str, rate: u64, seconds: u64) -> anyhow::Result<Placement> {
    // Beds in the region asked for, enough for every referral.
    let region = "KG-T";
    service.register(region, &[(pb::BedCategory::Women, MAX_BEDS)]).await?;
    let mut feed = Feed::new(service, database_url).await?;
    let outcome = drive_placement(service, &mut feed, region, rate, seconds).await;
    feed.drop_all().await;
    outcome
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
        feed.accept(&uuid::Uuid::now_v7().to_string(), region).await?;
    }
    let total = usize::try_from(rate * seconds).unwrap_or(usize::MAX);
    let mut ticker = tokio::time::interval(Duration::from_micros(1_000_000 / rate.max(1)));
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let started = Instant::now();
    for _ in 0..total {
        ticker.tick().await;
        let referral_id = uuid::Uuid::now_v7().to_string();
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
}
