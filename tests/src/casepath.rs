//! casepath in the tests: the service in-process beside the four others of
//! a country, one country or two joined by the cross-border link
//! ([`crate::federation`]), the full walk of a person from abroad to
//! reintegration, tokens per role, and waits on positive signals only.
//!
//! # Layout
//! - [`casepath_settings`], [`CasepathApp`]: the service on port 0 with its
//!   own database, on the subjects of its country's services; stopped and
//!   started again on the same database (a rebuild).
//! - [`Country`]: identification, referral, shelter, repatriation and
//!   casepath of one country, a shelter registered and approved;
//!   [`Country::settle`] waits until casepath has applied everything the
//!   four streams hold (every outbox empty, every checkpoint at its
//!   stream's last sequence), twice in a row.
//! - [`Countries`]: ru and kg on two nats-servers joined by the leaf link.
//! - [`Walk`]: the full scenario: ru reports, identifies and
//!   returns the person; kg receives, refers, holds a bed, admits, serves,
//!   plans, meets the goal.
//! - [`Caller`]: an agency in a role, with its token.

use std::time::Duration;

use async_nats::jetstream;
use nrm_casepath::config::{CasepathSettings, Settings};
use nrm_kernel::auth::Role;
use nrm_kernel::service::{CommonSettings, Service as _};
use nrm_kernel::settings::{DatabaseSettings, NatsSettings, RelaySettings, ServerSettings};
use nrm_kernel::validate::timestamp;
use nrm_kernel::xborder::XborderSettings;
use nrm_proto::casepath::v1 as cp;
use nrm_proto::casepath::v1::casepath_service_client::CasepathServiceClient;
use nrm_proto::common::v1 as common;
use nrm_proto::identification::v1 as idpb;
use nrm_proto::referral::v1 as rf;
use nrm_proto::repatriation::v1 as pb;
use nrm_proto::shelter::v1 as sh;
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;
use uuid::Uuid;

use crate::federation::{Federation, Side};
use crate::repatriation::{CountryKeys, RepatriationApp, repatriation_settings};
use crate::{ReferralApp, ShelterApp, Started, TestApp, authorized, unique};

/// The projections of casepath, one per context stream (their checkpoint names).
pub const PROJECTIONS: [(&str, &str); 4] = [
    ("identification", "casepath_identification"),
    ("referral", "casepath_referral"),
    ("shelter", "casepath_shelter"),
    ("repatriation", "casepath_repatriation"),
];

/// How long any positive condition may take.
pub const WAIT: Duration = Duration::from_secs(60);

/// A fresh request ID.
#[must_use]
pub fn rid() -> String {
    Uuid::now_v7().to_string()
}

/// Now, as a protobuf timestamp.
#[must_use]
pub fn now() -> prost_types::Timestamp {
    timestamp(chrono::Utc::now())
}

/// A whole second, `hours` from now.
#[must_use]
pub fn in_hours(hours: i64) -> prost_types::Timestamp {
    let t = chrono::Utc::now() + chrono::Duration::hours(hours);
    prost_types::Timestamp {
        seconds: t.timestamp(),
        nanos: 0,
    }
}

/// A bounded wait: `tick` sleeps a little, and fails the test once it is over.
pub struct Deadline {
    until: tokio::time::Instant,
    what: String,
}

impl Deadline {
    /// A wait of [`WAIT`] for `what`.
    #[must_use]
    pub fn new(what: impl Into<String>) -> Self {
        Self::within(what, WAIT)
    }

    /// A wait of `bound` for `what` (for what must happen promptly).
    #[must_use]
    pub fn within(what: impl Into<String>, bound: Duration) -> Self {
        Self {
            until: tokio::time::Instant::now() + bound,
            what: format!("{} within {bound:?}", what.into()),
        }
    }

    /// Sleeps 50 ms.
    ///
    /// # Panics
    /// Once the wait is over.
    pub async fn tick(&self) {
        assert!(tokio::time::Instant::now() < self.until, "{} did not happen", self.what);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Calls `call` (a request with a fresh request ID each time: a refusal
/// is an answer too) until the service answers, while it does not know yet
/// what the request names (`FAILED_PRECONDITION`, `PERMISSION_DENIED` or `NOT_FOUND`: the
/// events it needs are still on their way); the answer.
///
/// # Panics
/// On any other refusal, or after [`WAIT`].
pub async fn until_known<T, F, Fut>(what: &str, mut call: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<tonic::Response<T>, tonic::Status>>,
{
    let deadline = Deadline::new(what);
    loop {
        match call().await {
            Ok(answer) => return answer.into_inner(),
            Err(status)
                if matches!(
                    status.code(),
                    tonic::Code::FailedPrecondition | tonic::Code::PermissionDenied | tonic::Code::NotFound
                ) =>
            {
                deadline.tick().await;
            }
            Err(status) => panic!("{what}: {status:?}"),
        }
    }
}

/// An agency in a role.
#[derive(Debug, Clone)]
pub struct Caller {
    /// The agency code.
    pub agency: String,
    /// The role.
    pub role: Role,
}

impl Caller {
    /// `agency` in `role`.
    #[must_use]
    pub fn new(agency: &str, role: Role) -> Self {
        Self {
            agency: agency.to_owned(),
            role,
        }
    }

    /// A token for one officer of the agency.
    #[must_use]
    pub fn token(&self) -> String {
        crate::token(&self.agency, self.role, &format!("{}-officer", self.role.as_str()))
    }
}

/// The walk-throughs' agencies in a country (the contract's list); an
/// agency of its own for each role that has none there.
#[must_use]
pub fn agency_of(country: &str, role: Role) -> Caller {
    let agency = match (country, role) {
        ("kg", Role::Police) => "kg-mvd".to_owned(),
        ("kg", Role::Prosecutor) => "kg-prosecutor".to_owned(),
        ("kg", Role::Msd) => "kg-msd".to_owned(),
        ("kg", Role::Moh) => "kg-moh".to_owned(),
        ("kg", Role::Iom) => "kg-iom".to_owned(),
        ("kg", Role::Coordinator) => "kg-coordinator".to_owned(),
        ("kg", Role::Shelter) => SHELTER_OPERATOR.to_owned(),
        ("ru", Role::Police) => "ru-mvd".to_owned(),
        ("ru", Role::Iom) => "ru-iom".to_owned(),
        ("ru", Role::Consulate) | ("kg", Role::Consulate) => CONSULATE.to_owned(),
        ("ru", Role::Coordinator) => "ru-coordinator".to_owned(),
        (cc, role) => format!("{cc}-{}", role.as_str().replace('_', "-")),
    };
    Caller::new(&agency, role)
}

/// kg's consulate in Moscow.
pub const CONSULATE: &str = "kg-consulate-moscow";
/// The agency that runs each country's test shelter.
pub const SHELTER_OPERATOR: &str = "kg-shelter-umut";

/// Settings of casepath for `country`, on `nats` (the subjects and streams
/// of the country's services), with a database of its own.
#[must_use]
pub fn casepath_settings(nats: &NatsSettings, country: &str) -> Settings {
    let base = crate::settings();
    Settings {
        common: CommonSettings {
            server: ServerSettings {
                grpc_addr: "127.0.0.1:0".parse().unwrap_or_else(|_| unreachable!()),
                metrics_addr: "127.0.0.1:0".parse().unwrap_or_else(|_| unreachable!()),
                ..ServerSettings::default()
            },
            database: DatabaseSettings {
                url: base.common.database.url.clone(),
                name: format!("test_{}", unique()),
                max_connections: 16,
            },
            nats: nats.clone(),
            relay: RelaySettings::default(),
            ..base.common.clone()
        },
        casepath: CasepathSettings {
            watch_interval_ms: 50,
            ..CasepathSettings::default()
        },
        xborder: XborderSettings {
            country: country.to_owned(),
            ..XborderSettings::default()
        },
    }
}

/// A running casepath.
pub struct CasepathApp {
    /// Its settings.
    pub settings: Settings,
    /// `http://127.0.0.1:port`.
    pub endpoint: String,
    /// A client.
    pub client: CasepathServiceClient<Channel>,
    /// A pool on its database.
    pub pool: sqlx::PgPool,
    /// JetStream on its country's NATS.
    pub jetstream: jetstream::Context,
    shutdown: CancellationToken,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl CasepathApp {
    /// Builds and starts casepath with `settings`.
    ///
    /// # Panics
    /// When it cannot start.
    pub async fn spawn_with(settings: Settings) -> Self {
        let app = nrm_casepath::startup::Application::build(&settings)
            .await
            .expect("build casepath");
        let addr = app.kit().grpc_addr().expect("grpc address");
        let Started {
            endpoint,
            pool,
            jetstream,
            shutdown,
            task,
        } = Started::run(addr, &settings.database, &settings.nats.url, |stop| {
            app.run_until_stopped(stop)
        })
        .await;
        let client = CasepathServiceClient::connect(endpoint.clone()).await.expect("connect");
        Self {
            settings,
            endpoint,
            client,
            pool,
            jetstream,
            shutdown,
            task: Some(task),
        }
    }

    /// Stops casepath and keeps its database; returns its settings.
    pub async fn halt(mut self) -> Settings {
        self.shutdown.cancel();
        if let Some(task) = self.task.take() {
            let _ = tokio::time::timeout(Duration::from_secs(15), task).await;
        }
        self.pool.close().await;
        self.settings.clone()
    }

    /// Stops casepath, drops its read models (every `cp_*` table emptied,
    /// its checkpoints deleted) and starts it again on the same database,
    /// where it rebuilds them from the streams.
    ///
    /// # Panics
    /// When the database refuses.
    pub async fn drop_read_models_and_restart(&mut self) {
        self.shutdown.cancel();
        if let Some(task) = self.task.take() {
            let _ = tokio::time::timeout(Duration::from_secs(15), task).await;
        }
        let tables: Vec<String> = sqlx::query_scalar(
            "SELECT tablename::text FROM pg_tables WHERE schemaname = current_schema() AND tablename LIKE 'cp\\_%'",
        )
        .fetch_all(&self.pool)
        .await
        .expect("casepath's tables");
        assert!(tables.len() >= 10, "the cp_* tables: {tables:?}");
        // The names come from the catalogue, not from a caller.
        sqlx::query(sqlx::AssertSqlSafe(format!("TRUNCATE {}", tables.join(", "))))
            .execute(&self.pool)
            .await
            .expect("truncate the read models");
        sqlx::query("DELETE FROM projection_checkpoints WHERE projection LIKE 'casepath%'")
            .execute(&self.pool)
            .await
            .expect("delete the checkpoints");
        let fresh = Self::spawn_with(self.settings.clone()).await;
        let old = std::mem::replace(self, fresh);
        old.pool.close().await;
    }

    /// The checkpoint of `projection` (0 when it has none yet).
    ///
    /// # Panics
    /// When the query fails.
    pub async fn checkpoint(&self, projection: &str) -> u64 {
        let sequence: Option<i64> =
            sqlx::query_scalar("SELECT stream_sequence FROM projection_checkpoints WHERE projection = $1")
                .bind(projection)
                .fetch_optional(&self.pool)
                .await
                .expect("read a checkpoint");
        u64::try_from(sequence.unwrap_or(0)).unwrap_or(0)
    }

    /// The stream of `context` in casepath's subject space.
    #[must_use]
    pub fn stream_name(&self, context: &str) -> String {
        format!("{}_{}", self.settings.nats.stream_prefix, context.to_ascii_uppercase())
    }

    /// Waits until each projection's checkpoint is at its stream's last
    /// sequence as it stands now (a stream that does not exist counts 0).
    ///
    /// # Panics
    /// After [`WAIT`].
    pub async fn caught_up(&self) {
        for (context, projection) in PROJECTIONS {
            let last = last_sequence(&self.jetstream, &self.stream_name(context)).await;
            let deadline = Deadline::new(format!("{projection} at {last}"));
            while self.checkpoint(projection).await < last {
                deadline.tick().await;
            }
        }
    }

    /// Stops casepath and drops its database.
    pub async fn stop(self) {
        let settings = self.halt().await;
        let _ = nrm_kernel::db::drop_database(&settings.database).await;
    }

    /// `person_id`'s path as `caller` sees it.
    ///
    /// # Errors
    /// casepath's answer when it refuses.
    pub async fn path(&self, person_id: &str, caller: &Caller) -> Result<cp::Path, tonic::Status> {
        self.client
            .clone()
            .get_path(authorized(
                cp::GetPathRequest {
                    person_id: person_id.to_owned(),
                },
                &caller.token(),
            ))
            .await
            .map(tonic::Response::into_inner)
    }

    /// Waits until `caller` sees a path of `person_id` that `done` accepts.
    ///
    /// # Panics
    /// After [`WAIT`], with the last path seen.
    pub async fn wait_path(&self, person_id: &str, caller: &Caller, done: impl Fn(&cp::Path) -> bool) -> cp::Path {
        self.wait_path_within(person_id, caller, WAIT, done).await
    }

    /// As [`CasepathApp::wait_path`], within `bound`.
    ///
    /// # Panics
    /// After `bound`, with the last path seen.
    pub async fn wait_path_within(
        &self,
        person_id: &str,
        caller: &Caller,
        bound: Duration,
        done: impl Fn(&cp::Path) -> bool,
    ) -> cp::Path {
        let deadline = Deadline::within(format!("a path of {person_id} for {}", caller.agency), bound);
        loop {
            let seen = self.path(person_id, caller).await;
            if let Ok(path) = &seen
                && done(path)
            {
                return path.clone();
            }
            if tokio::time::Instant::now() + Duration::from_millis(60) >= deadline.until {
                panic!("{} waited for: {seen:?}", deadline.what);
            }
            deadline.tick().await;
        }
    }

    /// `caller`'s inbox (every page).
    ///
    /// # Panics
    /// When casepath refuses.
    pub async fn inbox(&self, caller: &Caller, mut request: cp::ListInboxRequest) -> Vec<cp::InboxItem> {
        let mut items = Vec::new();
        request.page_size = 500;
        loop {
            let page = self
                .client
                .clone()
                .list_inbox(authorized(request.clone(), &caller.token()))
                .await
                .expect("list the inbox")
                .into_inner();
            items.extend(page.items);
            if page.next_page_token.is_empty() {
                return items;
            }
            request.page_token = page.next_page_token;
        }
    }

    /// Every path summary the coordinator lists (every page).
    ///
    /// # Panics
    /// When casepath refuses.
    pub async fn all_paths(&self, coordinator: &Caller) -> Vec<cp::PathSummary> {
        let mut out = Vec::new();
        let mut request = cp::ListPathsRequest {
            page_size: 500,
            ..Default::default()
        };
        loop {
            let page = self
                .client
                .clone()
                .list_paths(authorized(request.clone(), &coordinator.token()))
                .await
                .expect("list the paths")
                .into_inner();
            out.extend(page.paths);
            if page.next_page_token.is_empty() {
                return out;
            }
            request.page_token = page.next_page_token;
        }
    }

    /// The statistics of a period.
    ///
    /// # Errors
    /// casepath's answer when it refuses.
    pub async fn statistics(
        &self,
        coordinator: &Caller,
        request: cp::GetStatisticsRequest,
    ) -> Result<cp::Statistics, tonic::Status> {
        self.client
            .clone()
            .get_statistics(authorized(request, &coordinator.token()))
            .await
            .map(tonic::Response::into_inner)
    }
}

impl Drop for CasepathApp {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

/// The last sequence of `stream` (0 when it has none or does not exist).
pub async fn last_sequence(js: &jetstream::Context, stream: &str) -> u64 {
    match js.get_stream(stream).await {
        Ok(mut s) => s.info().await.map(|i| i.state.last_sequence).unwrap_or(0),
        Err(_) => 0,
    }
}

/// Waits until the outbox of the service on `pool` is empty.
///
/// # Panics
/// After [`WAIT`].
pub async fn wait_outbox(pool: &sqlx::PgPool, what: &str) {
    let deadline = Deadline::new(format!("{what}'s outbox published"));
    loop {
        let left: i64 = sqlx::query_scalar("SELECT count(*) FROM outbox")
            .fetch_one(pool)
            .await
            .expect("count the outbox");
        if left == 0 {
            return;
        }
        deadline.tick().await;
    }
}

/// One country's five services and its approved shelter.
pub struct Country {
    /// The country code.
    pub code: &'static str,
    /// The identification service.
    pub id: TestApp,
    /// The referral service.
    pub referral: ReferralApp,
    /// The shelter service.
    pub shelter: ShelterApp,
    /// The repatriation service.
    pub repatriation: RepatriationApp,
    /// casepath.
    pub casepath: CasepathApp,
    /// A shelter in region `<CC>-C` with women's beds, run by [`SHELTER_OPERATOR`].
    pub shelter_id: String,
}

impl Country {
    /// Starts the country's services on `nats` with `keys` and `partners`;
    /// `tune` may change casepath's settings first.
    ///
    /// # Panics
    /// When a service does not start.
    pub async fn start(
        code: &'static str,
        keys: &CountryKeys,
        partners: &[&CountryKeys],
        nats: &NatsSettings,
        tune: impl FnOnce(&mut Settings),
    ) -> Self {
        let mut repatriation_settings = repatriation_settings(keys, partners);
        repatriation_settings.common.nats = nats.clone();
        let mut id_settings = crate::settings();
        id_settings.common.nats = nats.clone();
        id_settings.xborder = repatriation_settings.xborder.clone();
        let referral_settings = crate::referral_settings(&id_settings);
        let mut shelter_settings = crate::shelter_settings();
        shelter_settings.common.nats = nats.clone();
        let mut casepath_settings = casepath_settings(nats, code);
        tune(&mut casepath_settings);
        let (repatriation, id, referral, shelter) = tokio::join!(
            RepatriationApp::spawn_with(repatriation_settings),
            TestApp::spawn_with(id_settings),
            ReferralApp::spawn_with(referral_settings),
            ShelterApp::spawn_with(shelter_settings),
        );
        let casepath = CasepathApp::spawn_with(casepath_settings).await;
        let operator = Caller::new(SHELTER_OPERATOR, Role::Shelter);
        let shelter_id = shelter
            .client
            .clone()
            .register_shelter(authorized(
                sh::RegisterShelterRequest {
                    request_id: rid(),
                    code: format!("CC-{}", &unique()[..6]),
                    region: format!("{}-C", code.to_ascii_uppercase()),
                    address: crate::canary::ADDRESS.into(),
                    capacity: vec![sh::BedCapacity {
                        category: sh::BedCategory::Women as i32,
                        beds: 8,
                    }],
                    services: vec![],
                    wheelchair_accessible: false,
                },
                &operator.token(),
            ))
            .await
            .expect("register the shelter")
            .into_inner()
            .shelter_id;
        shelter
            .client
            .clone()
            .approve_shelter(authorized(
                sh::ApproveShelterRequest {
                    request_id: rid(),
                    shelter_id: shelter_id.clone(),
                    expected_version: 1,
                },
                &agency_of(code, Role::Coordinator).token(),
            ))
            .await
            .expect("approve the shelter");
        Self {
            code,
            id,
            referral,
            shelter,
            repatriation,
            casepath,
            shelter_id,
        }
    }

    /// One country alone on the test stack's NATS (no partner).
    pub async fn alone(code: &'static str, tune: impl FnOnce(&mut Settings)) -> Self {
        let nats = crate::settings().common.nats;
        Self::start(code, &CountryKeys::generate(code), &[], &nats, tune).await
    }

    /// The agency of `role` here, with its token.
    #[must_use]
    pub fn caller(&self, role: Role) -> Caller {
        agency_of(self.code, role)
    }

    /// Waits until casepath has applied everything the four services
    /// recorded: every outbox empty and every checkpoint at its stream's
    /// end, twice in a row with nothing new in between (reactions of one
    /// service to another's events settle too).
    pub async fn settle(&self) {
        let mut before = Vec::new();
        loop {
            wait_outbox(&self.id.pool, "identification").await;
            wait_outbox(&self.referral.pool, "referral").await;
            wait_outbox(&self.shelter.pool, "shelter").await;
            wait_outbox(&self.repatriation.pool, "repatriation").await;
            self.casepath.caught_up().await;
            let mut now = Vec::new();
            for (context, _) in PROJECTIONS {
                now.push(last_sequence(&self.casepath.jetstream, &self.casepath.stream_name(context)).await);
            }
            if now == before {
                return;
            }
            before = now;
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Stops every service and drops their databases and streams.
    pub async fn stop(self, partners: &[&CountryKeys]) {
        self.casepath.stop().await;
        self.repatriation.stop(partners).await;
        self.shelter.stop().await;
        self.referral.stop().await;
        self.id.stop().await;
    }

    /// The police (`as_police`) report a presumed victim found in `found`,
    /// `gender`, of `citizenship`; the case and person IDs and the version.
    ///
    /// # Panics
    /// When the service refuses.
    pub async fn report(&self, reporter: &Caller, tune: impl FnOnce(&mut idpb::ReportPresumedVictimRequest)) -> Case {
        let mut request = crate::report_request(&rid(), crate::person("Test Person", &unique(), ""));
        request.found_country = self.code.to_ascii_uppercase();
        tune(&mut request);
        let answer = self
            .id
            .client
            .clone()
            .report_presumed_victim(authorized(request, &reporter.token()))
            .await
            .expect("report")
            .into_inner();
        Case {
            case_id: answer.case_id,
            person_id: answer.person_id,
            version: answer.result.map_or(1, |r| r.version),
        }
    }

    /// Screening done and the person identified, by `authority`.
    ///
    /// # Panics
    /// When the service refuses.
    pub async fn identify(&self, authority: &Caller, case: &mut Case) {
        let mut c = self.id.client.clone();
        case.version = c
            .complete_screening(authorized(
                idpb::CompleteScreeningRequest {
                    request_id: rid(),
                    case_id: case.case_id.clone(),
                    expected_version: case.version,
                    indicators: vec![idpb::Indicator::Isolation as i32],
                },
                &authority.token(),
            ))
            .await
            .expect("screen")
            .into_inner()
            .version;
        case.version = c
            .decide_identification(authorized(
                idpb::DecideIdentificationRequest {
                    request_id: rid(),
                    case_id: case.case_id.clone(),
                    expected_version: case.version,
                    decision: idpb::Decision::Identified as i32,
                    reason: 0,
                    non_punishment: true,
                    best_interests_assessed: false,
                },
                &authority.token(),
            ))
            .await
            .expect("decide")
            .into_inner()
            .version;
    }

    /// `holder` records the person's consent to share with `recipient`.
    ///
    /// # Panics
    /// When the service refuses.
    pub async fn consent(&self, holder: &Caller, case: &Case, recipient: &str, purposes: &[rf::ServiceKind]) -> String {
        until_known("record a consent: the referral service knowing the case", || {
            let mut client = self.referral.client.clone();
            let request = rf::RecordConsentRequest {
                request_id: rid(),
                person_id: case.person_id.clone(),
                case_id: case.case_id.clone(),
                given_by: rf::ConsentGiver::Person as i32,
                recipient_agency: recipient.to_owned(),
                purposes: purposes.iter().map(|p| *p as i32).collect(),
                data_categories: vec![rf::DataCategory::Name as i32],
                expires_at: Some(in_hours(24 * 90)),
                ..Default::default()
            };
            let request = authorized(request, &holder.token());
            async move { client.record_consent(request).await }
        })
        .await
        .consent_id
    }

    /// `holder` refers the person to `receiver` under `consent_id`; the
    /// referral ID. Waits until the referral service knows the person.
    ///
    /// # Panics
    /// When the service refuses.
    pub async fn refer(
        &self,
        holder: &Caller,
        case: &Case,
        receiver: &str,
        services: &[rf::ServiceKind],
        consent_id: &str,
    ) -> String {
        until_known("create a referral: the referral service knowing the person", || {
            let mut client = self.referral.client.clone();
            let request = rf::CreateReferralRequest {
                request_id: rid(),
                person_id: case.person_id.clone(),
                case_id: case.case_id.clone(),
                receiving_agency: receiver.to_owned(),
                services: services.iter().map(|s| *s as i32).collect(),
                urgency: rf::Urgency::Normal as i32,
                consent_id: consent_id.to_owned(),
                shelter_need: None,
            };
            let request = authorized(request, &holder.token());
            async move { client.create_referral(request).await }
        })
        .await
        .referral_id
    }

    /// The referral's current version.
    ///
    /// # Panics
    /// When the service refuses.
    pub async fn referral_version(&self, caller: &Caller, referral_id: &str) -> u64 {
        self.referral
            .client
            .clone()
            .get_referral(authorized(
                rf::GetReferralRequest {
                    referral_id: referral_id.to_owned(),
                },
                &caller.token(),
            ))
            .await
            .expect("get the referral")
            .into_inner()
            .version
    }

    /// `receiver` accepts the referral.
    ///
    /// # Panics
    /// When the service refuses.
    pub async fn accept(&self, receiver: &Caller, referral_id: &str) {
        let version = self.referral_version(receiver, referral_id).await;
        self.referral
            .client
            .clone()
            .accept_referral(authorized(
                rf::AcceptReferralRequest {
                    request_id: rid(),
                    referral_id: referral_id.to_owned(),
                    expected_version: version,
                },
                &receiver.token(),
            ))
            .await
            .expect("accept the referral");
    }
}

/// A case just reported.
#[derive(Debug, Clone)]
pub struct Case {
    /// The case.
    pub case_id: String,
    /// The person.
    pub person_id: String,
    /// The case version last answered.
    pub version: u64,
}

/// ru and kg joined by the link, each with its five services.
pub struct Countries {
    /// The two nats-servers.
    pub federation: Federation,
    /// ru's key pair.
    pub ru_keys: CountryKeys,
    /// kg's key pair.
    pub kg_keys: CountryKeys,
    /// The destination country.
    pub ru: Country,
    /// The home country.
    pub kg: Country,
}

impl Countries {
    /// Starts the federation and both countries.
    pub async fn start() -> Self {
        let federation = Federation::start().await;
        let (ru_keys, kg_keys) = (CountryKeys::generate("ru"), CountryKeys::generate("kg"));
        let (ru_nats, kg_nats) = (federation.nats_settings(Side::Ru), federation.nats_settings(Side::Kg));
        let (ru_partners, kg_partners) = ([&kg_keys], [&ru_keys]);
        let (ru, kg) = tokio::join!(
            Country::start("ru", &ru_keys, &ru_partners, &ru_nats, |_| {}),
            Country::start("kg", &kg_keys, &kg_partners, &kg_nats, |_| {}),
        );
        Self {
            federation,
            ru_keys,
            kg_keys,
            ru,
            kg,
        }
    }

    /// Stops both countries and the federation.
    pub async fn stop(self) {
        let Self {
            federation,
            ru_keys,
            kg_keys,
            ru,
            kg,
        } = self;
        ru.stop(&[&kg_keys]).await;
        kg.stop(&[&ru_keys]).await;
        drop(federation);
    }
}

/// What the full walk leaves behind.
#[derive(Debug, Clone)]
pub struct Walked {
    /// ru's case of the person (reported and identified there).
    pub ru_case: Case,
    /// The return.
    pub return_id: String,
    /// kg's case, opened from abroad at the handover.
    pub kg_case: Case,
    /// kg's reintegration referral to MSD (opened by itself).
    pub referral_id: String,
    /// kg's consent for MSD (recorded by itself).
    pub consent_id: String,
    /// The bed held in kg for the arrival.
    pub hold_id: String,
    /// The plan goal MSD added and met.
    pub goal_id: String,
}

/// The full scenario, across all four services and both countries.
pub struct Walk;

impl Walk {
    /// ru: the police report and identify the person, ru's IOM office
    /// opens the return for that case and runs it to the handover (with a
    /// shelter need). kg: the case opened from abroad, the consent and the
    /// reintegration referral to MSD (both by themselves), MSD accepts, the
    /// bed held for the arrival, the shelter admits, MSD records a service
    /// and a plan goal, and the goal is met. Ends with both casepaths settled.
    ///
    /// # Panics
    /// When any service refuses.
    pub async fn run(world: &Countries) -> Walked {
        let (ru, kg) = (&world.ru, &world.kg);
        let police = ru.caller(Role::Police);
        let mut ru_case = ru
            .report(&police, |r| {
                r.found_country = "RU".into();
                r.country_of_exploitation = "RU".into();
                r.citizenship = "KG".into();
            })
            .await;
        ru.identify(&police, &mut ru_case).await;

        let iom = ru.caller(Role::Iom);
        let consulate = ru.caller(Role::Consulate);
        let mut c = ru.repatriation.client.clone();
        let opened = c
            .open_return(authorized(
                pb::OpenReturnRequest {
                    request_id: rid(),
                    citizenship: "KG".into(),
                    identifiers: Some(crate::person("Walk Person", &unique(), "")),
                    gender: common::Gender::Female as i32,
                    age_band: common::AgeBand::AgeBand1824 as i32,
                    form_of_exploitation: "EXPLOITATION_FORM_LABOUR".into(),
                    country_of_exploitation: "RU".into(),
                    foreign_reference: ru_case.case_id.clone(),
                    identified_by: police.agency.clone(),
                    consulate_agency: CONSULATE.into(),
                },
                &iom.token(),
            ))
            .await
            .expect("open the return")
            .into_inner();
        let return_id = opened.return_id;
        let mut version = opened.result.map_or(1, |r| r.version);
        let t = iom.token();
        // Each step is seen in kg before the next is taken, so that the
        // steps recorded at home interleave with ru's in one known order.
        macro_rules! step {
            ($call:ident, $token:expr, $req:expr) => {{
                version = c
                    .$call(authorized($req, $token))
                    .await
                    .expect(stringify!($call))
                    .into_inner()
                    .version;
                converged(ru, kg, &return_id).await;
            }};
        }
        step!(
            record_return_consent,
            &t,
            pb::RecordReturnConsentRequest {
                request_id: rid(),
                return_id: return_id.clone(),
                expected_version: version,
                informed_consent_to_return: true,
                shared_fields: vec![
                    pb::SharedField::Identity as i32,
                    pb::SharedField::Profile as i32,
                    pb::SharedField::Needs as i32
                ],
                consent_to_reintegration_referral: true,
                attested_by: "iom-officer".into(),
                consent_form_ref: "FORM-1".into(),
            }
        );
        step!(
            record_risk_assessment,
            &t,
            pb::RecordRiskAssessmentRequest {
                request_id: rid(),
                return_id: return_id.clone(),
                expected_version: version,
                safe_to_return: true,
                family_involvement: pb::FamilyInvolvement::None as i32,
                needs: vec![pb::ArrivalNeed::Shelter as i32],
                interpretation_language: String::new(),
            }
        );
        step!(
            request_travel_document,
            &t,
            pb::RequestTravelDocumentRequest {
                request_id: rid(),
                return_id: return_id.clone(),
                expected_version: version,
            }
        );
        step!(
            record_travel_document,
            &consulate.token(),
            pb::RecordTravelDocumentRequest {
                request_id: rid(),
                return_id: return_id.clone(),
                expected_version: version,
                issued: true,
                document_number: format!("CR{}", &unique()[..7]),
                valid_until: Some(in_hours(24 * 30)),
            }
        );
        step!(
            book_itinerary,
            &t,
            pb::BookItineraryRequest {
                request_id: rid(),
                return_id: return_id.clone(),
                expected_version: version,
                departure_at: Some(in_hours(48)),
                arrival_at: Some(in_hours(52)),
                carrier: "KC 210".into(),
                arrival_point_kind: pb::ArrivalPointKind::Airport as i32,
                arrival_point: "FRU".into(),
            }
        );
        // The bed at home is held for the arrival once it is booked.
        let hold_id = kg.wait_arrival(&return_id).await;
        step!(
            assign_escort,
            &t,
            pb::AssignEscortRequest {
                request_id: rid(),
                return_id: return_id.clone(),
                expected_version: version,
                escort_officer: "escort-3".into(),
                escort_agency: iom.agency.clone(),
            }
        );
        step!(
            record_departure,
            &t,
            pb::RecordDepartureRequest {
                request_id: rid(),
                return_id: return_id.clone(),
                expected_version: version,
                departed_at: Some(now()),
            }
        );
        step!(
            record_arrival,
            &t,
            pb::RecordArrivalRequest {
                request_id: rid(),
                return_id: return_id.clone(),
                expected_version: version,
                arrived_at: Some(now()),
            }
        );
        step!(
            record_handover,
            &t,
            pb::RecordHandoverRequest {
                request_id: rid(),
                return_id: return_id.clone(),
                expected_version: version,
                handed_over_at: Some(now()),
                received_by: "kg-iom".into(),
            }
        );
        let _ = version;

        // kg: the case from abroad, and the referral the referral service opens for it.
        let kg_case = kg.wait_case_from_abroad(&return_id).await;
        let msd = kg.caller(Role::Msd);
        let (referral_id, consent_id) = kg.wait_homecoming_referral(&kg_case).await;
        kg.accept(&msd, &referral_id).await;
        kg.shelter
            .client
            .clone()
            .admit(authorized(
                sh::AdmitRequest {
                    request_id: rid(),
                    shelter_id: kg.shelter_id.clone(),
                    hold_id: hold_id.clone(),
                },
                &kg.caller(Role::Shelter).token(),
            ))
            .await
            .expect("admit");
        let version = kg.referral_version(&msd, &referral_id).await;
        kg.referral
            .client
            .clone()
            .record_service_delivered(authorized(
                rf::RecordServiceDeliveredRequest {
                    request_id: rid(),
                    referral_id: referral_id.clone(),
                    expected_version: version,
                    kind: rf::ServiceKind::Reintegration as i32,
                    delivered_at: Some(now()),
                    provider: "kg-msd-bishkek".into(),
                },
                &msd.token(),
            ))
            .await
            .expect("record a service delivered");
        let goal_id = kg
            .referral
            .client
            .clone()
            .add_plan_goal(authorized(
                rf::AddPlanGoalRequest {
                    request_id: rid(),
                    person_id: kg_case.person_id.clone(),
                    kind: rf::GoalKind::Housing as i32,
                    due_at: Some(in_hours(24 * 60)),
                },
                &msd.token(),
            ))
            .await
            .expect("add a plan goal")
            .into_inner()
            .goal_id;
        kg.referral
            .client
            .clone()
            .mark_goal_met(authorized(
                rf::MarkGoalMetRequest {
                    request_id: rid(),
                    person_id: kg_case.person_id.clone(),
                    goal_id: goal_id.clone(),
                },
                &msd.token(),
            ))
            .await
            .expect("mark the goal met");
        ru.settle().await;
        kg.settle().await;
        Walked {
            ru_case,
            return_id,
            kg_case,
            referral_id,
            consent_id,
            hold_id,
            goal_id,
        }
    }
}

impl Country {
    /// Waits until the shelter holds a bed for `return_id`'s arrival; the hold.
    ///
    /// # Panics
    /// After [`WAIT`].
    pub async fn wait_arrival(&self, return_id: &str) -> String {
        let deadline = Deadline::new(format!("a bed held for return {return_id}"));
        loop {
            let arrivals = self
                .shelter
                .client
                .clone()
                .list_arrivals(authorized(
                    sh::ListArrivalsRequest {
                        shelter_id: self.shelter_id.clone(),
                    },
                    &self.caller(Role::Shelter).token(),
                ))
                .await
                .expect("list arrivals")
                .into_inner()
                .arrivals;
            if let Some(arrival) = arrivals.iter().find(|a| a.return_id == return_id) {
                return arrival.hold_id.clone();
            }
            deadline.tick().await;
        }
    }

    /// Waits until identification opened a case for `return_id`.
    ///
    /// # Panics
    /// After [`WAIT`].
    pub async fn wait_case_from_abroad(&self, return_id: &str) -> Case {
        let deadline = Deadline::new(format!("a case opened from abroad for {return_id}"));
        let coordinator = self.caller(Role::Coordinator);
        loop {
            let cases = self
                .id
                .client
                .clone()
                .list_cases(authorized(
                    idpb::ListCasesRequest {
                        page_size: 500,
                        ..Default::default()
                    },
                    &coordinator.token(),
                ))
                .await
                .expect("list cases")
                .into_inner()
                .cases;
            for summary in cases {
                let case = self
                    .id
                    .client
                    .clone()
                    .get_case(authorized(
                        crate::ident::coded_case(&summary.case_id),
                        &coordinator.token(),
                    ))
                    .await
                    .expect("get a case")
                    .into_inner();
                if case
                    .identified_abroad
                    .as_ref()
                    .is_some_and(|a| a.return_id == return_id)
                {
                    return Case {
                        case_id: case.case_id,
                        person_id: case.person_id,
                        version: case.version,
                    };
                }
            }
            deadline.tick().await;
        }
    }

    /// Waits until the referral service opened the reintegration referral
    /// (and its consent) for `case`; (referral, consent).
    ///
    /// # Panics
    /// After [`WAIT`].
    pub async fn wait_homecoming_referral(&self, case: &Case) -> (String, String) {
        let deadline = Deadline::new(format!("a referral for case {}", case.case_id));
        let msd = self.caller(Role::Msd);
        loop {
            let inbox = self
                .referral
                .client
                .clone()
                .list_inbox(authorized(rf::ListInboxRequest::default(), &msd.token()))
                .await
                .expect("MSD's inbox")
                .into_inner()
                .referrals;
            if let Some(r) = inbox.iter().find(|r| r.case_id == case.case_id) {
                return (r.referral_id.clone(), r.consent_id.clone());
            }
            deadline.tick().await;
        }
    }
}

/// Waits until kg's IOM office sees the return with ru's status and steps.
///
/// # Panics
/// After [`WAIT`].
pub async fn converged(ru: &Country, kg: &Country, return_id: &str) {
    let deadline = Deadline::new(format!("kg seeing return {return_id} as ru has it"));
    let request = || pb::GetReturnRequest {
        return_id: return_id.to_owned(),
    };
    loop {
        let there = ru
            .repatriation
            .client
            .clone()
            .get_return(authorized(request(), &ru.caller(Role::Iom).token()))
            .await
            .expect("ru's view")
            .into_inner();
        if let Ok(here) = kg
            .repatriation
            .client
            .clone()
            .get_return(authorized(request(), &kg.caller(Role::Iom).token()))
            .await
            .map(tonic::Response::into_inner)
            && here.status == there.status
            && here.steps == there.steps
        {
            return;
        }
        deadline.tick().await;
    }
}

/// The kinds of `path`'s steps, in order.
#[must_use]
pub fn kinds(path: &cp::Path) -> Vec<cp::StepKind> {
    path.steps
        .iter()
        .map(|s| cp::StepKind::try_from(s.kind).unwrap_or(cp::StepKind::Unspecified))
        .collect()
}

/// A protobuf duration as std (negative ones as `None`).
#[must_use]
pub fn duration(d: Option<&prost_types::Duration>) -> Option<Duration> {
    let d = d?;
    if d.seconds < 0 || d.nanos < 0 {
        return None;
    }
    Some(Duration::new(
        u64::try_from(d.seconds).ok()?,
        u32::try_from(d.nanos).ok()?,
    ))
}

/// A protobuf time as chrono.
#[must_use]
pub fn time(t: Option<&prost_types::Timestamp>) -> chrono::DateTime<chrono::Utc> {
    let t = t.expect("a time");
    chrono::DateTime::from_timestamp(t.seconds, u32::try_from(t.nanos).unwrap_or(0)).expect("a valid time")
}
