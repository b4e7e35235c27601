//! The test harness: a real NATS server and a real PostgreSQL for every test
//! run, a database and a JetStream subject space of its own for every test.
//!
//! `make test` starts both with `scripts/stack.sh` and passes their URLs in
//! `NRM_TEST_DATABASE_URL` and `NRM_TEST_NATS_URL`. A plain `cargo test` with
//! neither set starts the same private stack under `target/nrm-testenv` (and
//! leaves it running for the next run; `scripts/stack.sh down
//! target/nrm-testenv` stops it). Logs stay silent unless `TEST_LOG=1`.
//!
//! # Layout
//! - [`TestEnv`]: where the servers are.
//! - [`TestApp`]: an identification service on port 0 with its own database
//!   and subjects, and a client with tokens for any role.
//! - [`ReferralApp`]: a referral service beside an identification service
//!   (same subjects, its own database), which can be stopped and restarted.
//! - [`ShelterFeed`]: publishes shelter events as the shelter service would.
//! - [`faults`]: the fault suite (issue 8) on a private stack of its own.
//! - [`fixtures`]: events written straight into a kernel store.
//! - [`repatriation`]: a repatriation service with its country's keys and partners.
//! - [`casepath`]: casepath beside a country's four services, one country or two.
//! - [`homecoming`]: the home country's keys, and the link's stand-in that
//!   sends a destination country's sealed crossing messages.
//! - [`tables`]: every table of a service's database, snapshotted when the
//!   service is quiescent, for tests that a refused command writes nothing.

pub mod beds;
pub mod canary;
pub mod casepath;
pub mod casepath_seed;
pub mod consent;
pub mod faults;
pub mod federation;
pub mod fixtures;
pub mod homecoming;
pub mod ident;
pub mod raw;
pub mod repatriation;

use std::path::PathBuf;
use std::process::Command;
use std::sync::OnceLock;
use std::time::Duration;

use async_nats::jetstream;
use base64::Engine as _;
use nrm_identification::config::{IdentificationSettings, Settings};
use nrm_identification::startup::Application;
use nrm_kernel::auth::Role;
use nrm_kernel::retry::RetryPolicy;
use nrm_kernel::service::{CommonSettings, Service as _};
use nrm_kernel::settings::{
    AuthSettings, DatabaseSettings, NatsSettings, RelaySettings, SealingSettings, ServerSettings, TelemetrySettings,
};
use nrm_proto::identification::v1::identification_service_client::IdentificationServiceClient;
use secrecy::SecretString;
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;

pub mod tables;

/// Where the real servers are.
#[derive(Debug, Clone)]
pub struct TestEnv {
    /// PostgreSQL server URL (no database).
    pub database_url: String,
    /// NATS URL.
    pub nats_url: String,
}

/// The repository's root folder.
#[must_use]
pub fn workspace_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(PathBuf::from)
        .unwrap_or_default()
}

/// The servers of this test run, started once if `make test` did not.
///
/// # Panics
/// When the stack cannot be started: the tests cannot run without it.
pub fn env() -> &'static TestEnv {
    static ENV: OnceLock<TestEnv> = OnceLock::new();
    ENV.get_or_init(|| {
        init_logs();
        if let (Ok(database_url), Ok(nats_url)) = (
            std::env::var("NRM_TEST_DATABASE_URL"),
            std::env::var("NRM_TEST_NATS_URL"),
        ) {
            return TestEnv { database_url, nats_url };
        }
        let root = workspace_root();
        let dir = root.join("target").join("nrm-testenv");
        let status = Command::new("bash")
            .arg(root.join("scripts").join("stack.sh"))
            .arg("up")
            .arg(&dir)
            .stdout(std::process::Stdio::null())
            .status()
            .expect("run scripts/stack.sh");
        assert!(status.success(), "scripts/stack.sh up {} failed", dir.display());
        let text = std::fs::read_to_string(dir.join("stack.env")).expect("read stack.env");
        let get = |key: &str| {
            text.lines()
                .find_map(|l| l.strip_prefix(&format!("{key}=")))
                .map(|v| v.trim_matches('"').to_owned())
                .unwrap_or_else(|| panic!("{key} missing from stack.env"))
        };
        TestEnv {
            database_url: get("NRM_STACK_DATABASE_URL"),
            nats_url: get("NRM_STACK_NATS_URL"),
        }
    })
}

/// Telemetry as in production (so trace context flows), with logs shown
/// only when `TEST_LOG=1`.
fn init_logs() {
    let log = if std::env::var("TEST_LOG").is_ok_and(|v| v == "1") {
        std::env::var("TEST_LOG_FILTER").unwrap_or_else(|_| "info".into())
    } else {
        "off".into()
    };
    let settings = TelemetrySettings {
        log,
        log_format: "text".into(),
    };
    if let Ok(guard) =
        nrm_kernel::telemetry::init_with_writer("tests", &settings, tracing_subscriber::fmt::TestWriter::new)
    {
        // Lives as long as the test process.
        std::mem::forget(guard);
    }
}

/// A random lowercase suffix for names.
#[must_use]
pub fn unique() -> String {
    uuid::Uuid::new_v4().simple().to_string()[..12].to_owned()
}

/// The development issuer of this test process: a key pair made once, in a
/// folder of its own; the services read only its `jwks.json`.
#[must_use]
pub fn issuer_dir() -> &'static std::path::Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("nrm-test-issuer-{}", unique()));
        nrm_issuer::init(&dir).expect("create the test issuer");
        dir
    })
}

/// The test issuer's private key file (`NRM_ISSUER_KEY` for nrmctl).
#[must_use]
pub fn issuer_key_path() -> PathBuf {
    nrm_issuer::signing_key_path(issuer_dir())
}

/// The test issuer's signing key.
///
/// # Panics
/// When the key written by [`issuer_dir`] cannot be read.
#[must_use]
pub fn issuer_key() -> &'static nrm_issuer::SigningKey {
    static KEY: OnceLock<nrm_issuer::SigningKey> = OnceLock::new();
    KEY.get_or_init(|| nrm_issuer::SigningKey::load(&issuer_key_path()).expect("read the test issuer's key"))
}

/// `NRM_AUTH__JWKS` of every test service: the test issuer's public keys.
#[must_use]
pub fn jwks_url() -> String {
    format!("file://{}", nrm_issuer::jwks_path(issuer_dir()).display())
}

/// Settings of an identification service with its own database and subjects.
#[must_use]
pub fn settings() -> Settings {
    let env = env();
    let id = unique();
    let key = |b: u8| SecretString::from(base64::engine::general_purpose::STANDARD.encode([b; 32]));
    Settings {
        common: CommonSettings {
            server: ServerSettings {
                grpc_addr: "127.0.0.1:0".parse().unwrap_or_else(|_| unreachable!()),
                metrics_addr: "127.0.0.1:0".parse().unwrap_or_else(|_| unreachable!()),
                ..ServerSettings::default()
            },
            database: DatabaseSettings {
                url: env.database_url.clone(),
                name: format!("test_{id}"),
                max_connections: 8,
            },
            nats: NatsSettings {
                url: env.nats_url.clone(),
                subject_prefix: format!("t{id}"),
                stream_prefix: format!("T{}", id.to_ascii_uppercase()),
                replicas: 1,
                duplicate_window_seconds: 120,
            },
            relay: RelaySettings::default(),
            retry: RetryPolicy::default(),
            auth: AuthSettings::new(jwks_url()),
            telemetry: TelemetrySettings::default(),
        },
        sealing: SealingSettings {
            master_key: key(7),
            match_key: key(9),
        },
        identification: IdentificationSettings::default(),
        xborder: nrm_kernel::xborder::XborderSettings::default(),
    }
}

/// A bearer token for `officer` of `agency` in `role`.
///
/// # Panics
/// Never with the test issuer's key.
#[must_use]
pub fn token(agency: &str, role: Role, officer: &str) -> String {
    issuer_key()
        .sign(&nrm_issuer::TokenClaims::new(
            nrm_issuer::DEFAULT_ISSUER,
            nrm_issuer::DEFAULT_AUDIENCE,
            agency,
            role.as_str(),
            officer,
            3600,
        ))
        .expect("mint token")
}

/// How many backends of `pool`'s server wait, directly or behind another
/// waiter (the second waiter for a row waits for the first), on the locks
/// held by the backend `holder` (a `pg_backend_pid()`): a call that is
/// certainly waiting on a lock a test holds.
///
/// # Panics
/// When the query fails.
pub async fn blocked_by(pool: &sqlx::PgPool, holder: i32) -> i64 {
    sqlx::query_scalar(
        "WITH RECURSIVE blocked(pid) AS (
             SELECT pid FROM pg_stat_activity WHERE $1 = ANY(pg_blocking_pids(pid))
             UNION
             SELECT a.pid FROM pg_stat_activity a JOIN blocked b ON b.pid = ANY(pg_blocking_pids(a.pid))
         )
         SELECT count(*) FROM blocked",
    )
    .bind(holder)
    .fetch_one(pool)
    .await
    .expect("the waiters")
}

/// Polls `check` every 10 ms until it gives a value, for at most `within`.
///
/// # Panics
/// After `within`, naming `what`.
pub async fn eventually<T, F, Fut>(what: &str, within: std::time::Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = std::time::Instant::now() + within;
    loop {
        if let Some(value) = check().await {
            return value;
        }
        assert!(std::time::Instant::now() < deadline, "{what}: not within {within:?}");
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
}

/// Whether a service shed the call at its gate (`UNAVAILABLE`, `OVERLOADED`):
/// nothing of it ran.
#[must_use]
pub fn overloaded(status: &tonic::Status) -> bool {
    use tonic_types::StatusExt as _;
    status.code() == tonic::Code::Unavailable
        && status
            .get_error_details()
            .error_info()
            .is_some_and(|info| info.reason == "OVERLOADED")
}

/// `call` sent again, as a client would, while the service sheds it
/// (after the pause its `RetryInfo` asks for), for at most 30 s; its
/// answer or its other error.
///
/// # Panics
/// When the service still sheds it after 30 s.
pub async fn patiently<T, F, Fut>(mut call: F) -> Result<T, tonic::Status>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, tonic::Status>>,
{
    use tonic_types::StatusExt as _;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        match call().await {
            Err(status) if overloaded(&status) => {
                assert!(
                    std::time::Instant::now() < deadline,
                    "still shed after 30 s: {status:?}"
                );
                let pause = status
                    .get_error_details()
                    .retry_info()
                    .and_then(|r| r.retry_delay)
                    .unwrap_or(std::time::Duration::from_millis(500));
                tokio::time::sleep(pause).await;
            }
            answer => return answer,
        }
    }
}

/// The field names of an `INVALID_ARGUMENT`, in the order the service
/// named them.
///
/// # Panics
/// When the status is another code or carries no `BadRequest` details.
#[must_use]
pub fn bad_fields(status: &tonic::Status) -> Vec<String> {
    use tonic_types::StatusExt as _;
    assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status:?}");
    status
        .get_details_bad_request()
        .expect("BadRequest details")
        .field_violations
        .into_iter()
        .map(|v| v.field)
        .collect()
}

/// Adds `authorization: Bearer <token>` to a request.
pub fn authorized<T>(message: T, token: &str) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    request
        .metadata_mut()
        .insert("authorization", format!("Bearer {token}").parse().expect("ascii token"));
    request
}

/// A service started in this process: its address, a pool on its database,
/// JetStream, and the handle that stops it.
struct Started {
    endpoint: String,
    pool: sqlx::PgPool,
    jetstream: jetstream::Context,
    shutdown: CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

impl Started {
    /// Runs `run` (a service's `run_until_stopped`) in a task and connects to
    /// what the service listens on and writes to.
    async fn run<F>(
        addr: std::net::SocketAddr,
        database: &DatabaseSettings,
        nats_url: &str,
        run: impl FnOnce(CancellationToken) -> F,
    ) -> Self
    where
        F: std::future::Future<Output = Result<(), anyhow::Error>> + Send + 'static,
    {
        let shutdown = CancellationToken::new();
        let running = run(shutdown.clone());
        let task = tokio::spawn(async move {
            if let Err(err) = running.await {
                panic!("service failed: {err}");
            }
        });
        let pool = sqlx::PgPool::connect_with(nrm_kernel::db::connect_options(database).expect("options"))
            .await
            .expect("connect to the test database");
        let nats = async_nats::connect(nats_url).await.expect("connect to NATS");
        Self {
            endpoint: format!("http://{addr}"),
            pool,
            jetstream: jetstream::new(nats),
            shutdown,
            task,
        }
    }
}

/// A running identification service.
pub struct TestApp {
    /// Its settings (database, subjects).
    pub settings: Settings,
    /// `http://127.0.0.1:port`.
    pub endpoint: String,
    /// `http://127.0.0.1:port/metrics`.
    pub metrics_url: String,
    /// A client.
    pub client: IdentificationServiceClient<Channel>,
    /// A pool on its database, for checking what was written.
    pub pool: sqlx::PgPool,
    /// JetStream on the test's NATS.
    pub jetstream: jetstream::Context,
    shutdown: CancellationToken,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl TestApp {
    /// Builds and starts an identification service with `settings`.
    ///
    /// # Panics
    /// When the service cannot start.
    pub async fn spawn_with(settings: Settings) -> Self {
        let app = Application::build(&settings)
            .await
            .expect("build the identification service");
        let metrics_url = format!("http://{}/metrics", app.kit().metrics_addr().expect("metrics address"));
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
        let client = IdentificationServiceClient::connect(endpoint.clone())
            .await
            .expect("connect");
        Self {
            settings,
            endpoint,
            metrics_url,
            client,
            pool,
            jetstream,
            shutdown,
            task: Some(task),
        }
    }

    /// Builds and starts an identification service of its own.
    pub async fn spawn() -> Self {
        Self::spawn_with(settings()).await
    }

    /// Name of the service's JetStream stream.
    #[must_use]
    pub fn stream_name(&self) -> String {
        format!("{}_IDENTIFICATION", self.settings.nats.stream_prefix)
    }

    /// Every message of the service's stream so far.
    ///
    /// # Panics
    /// When JetStream fails.
    pub async fn messages(&self) -> Vec<jetstream::message::StreamMessage> {
        messages(&self.jetstream, &self.stream_name()).await
    }

    /// Waits until the stream holds at least `count` messages.
    ///
    /// # Panics
    /// After 10 s.
    pub async fn wait_for_messages(&self, count: usize) -> Vec<jetstream::message::StreamMessage> {
        for _ in 0..200 {
            let messages = self.messages().await;
            if messages.len() >= count {
                return messages;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("fewer than {count} messages after 10 s");
    }

    /// Rows in a table of the service's database.
    ///
    /// # Panics
    /// When the query fails.
    pub async fn count(&self, table: &str) -> i64 {
        let sql = match table {
            "events" => "SELECT count(*) FROM events",
            "outbox" => "SELECT count(*) FROM outbox",
            "commands" => "SELECT count(*) FROM commands",
            "person_keys" => "SELECT count(*) FROM person_keys",
            "audit_log" => "SELECT count(*) FROM audit_log",
            "case_list" => "SELECT count(*) FROM case_list",
            other => panic!("no count for {other}"),
        };
        sqlx::query_scalar(sql).fetch_one(&self.pool).await.expect("count")
    }

    /// Stops the service and drops its database and stream.
    pub async fn stop(self) {
        let _ = self.stop_timed().await;
    }

    /// Stops the service as [`TestApp::stop`] does, and tells how long it
    /// took to end after the stop was asked (`None`: not within 15 s).
    pub async fn stop_timed(mut self) -> Option<Duration> {
        self.shutdown.cancel();
        let asked = std::time::Instant::now();
        let ended = match self.task.take() {
            Some(task) => tokio::time::timeout(Duration::from_secs(15), task).await.is_ok(),
            None => true,
        };
        let took = asked.elapsed();
        self.pool.close().await;
        let _ = self.jetstream.delete_stream(self.stream_name()).await;
        let _ = nrm_kernel::db::drop_database(&self.settings.database).await;
        ended.then_some(took)
    }
}

impl Drop for TestApp {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

/// Every message of `stream` so far, read directly by sequence.
///
/// # Panics
/// When JetStream fails.
pub async fn messages(js: &jetstream::Context, stream: &str) -> Vec<jetstream::message::StreamMessage> {
    let Ok(mut stream) = js.get_stream(stream).await else {
        return Vec::new();
    };
    let info = stream.info().await.expect("stream info").clone();
    let mut out = Vec::new();
    if info.state.messages == 0 {
        return out;
    }
    for seq in info.state.first_sequence..=info.state.last_sequence {
        if let Ok(m) = stream.get_raw_message(seq).await {
            out.push(m);
        }
    }
    out
}

/// A health check client's view of the service.
///
/// # Panics
/// When the call fails.
pub async fn health(endpoint: &str, service: &str) -> i32 {
    let channel = Channel::from_shared(endpoint.to_owned())
        .expect("endpoint")
        .connect()
        .await
        .expect("connect health");
    let mut client = tonic_health::pb::health_client::HealthClient::new(channel);
    client
        .check(tonic_health::pb::HealthCheckRequest {
            service: service.to_owned(),
        })
        .await
        .expect("health check")
        .into_inner()
        .status
}

/// A valid report of an adult woman exploited in Kazakhstan, with the given identifiers.
#[must_use]
pub fn report_request(
    request_id: &str,
    personal: nrm_proto::common::v1::PersonalIdentifiers,
) -> nrm_proto::identification::v1::ReportPresumedVictimRequest {
    use nrm_proto::common::v1 as common;
    use nrm_proto::identification::v1 as pb;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs();
    pb::ReportPresumedVictimRequest {
        request_id: request_id.to_owned(),
        found_at: Some(prost_types::Timestamp {
            seconds: i64::try_from(now).unwrap_or(0) - 86_400,
            nanos: 0,
        }),
        found_country: "KZ".into(),
        found_region: "ALA".into(),
        country_of_exploitation: "KZ".into(),
        exploitation_forms: vec![pb::ExploitationForm::Labour as i32],
        means_of_control: vec![pb::MeansOfControl::DocumentRetention as i32],
        recruitment_method: pb::RecruitmentMethod::JobOffer as i32,
        recruiter_relationship: pb::RecruiterRelationship::Acquaintance as i32,
        child: false,
        gender: common::Gender::Female as i32,
        age_years: Some(24),
        age_band: 0,
        citizenship: "KG".into(),
        personal: Some(personal),
        competent_authority: String::new(),
    }
}

/// Identifiers of a made-up person.
#[must_use]
pub fn person(name: &str, passport: &str, phone: &str) -> nrm_proto::common::v1::PersonalIdentifiers {
    use nrm_proto::common::v1 as common;
    common::PersonalIdentifiers {
        full_name: name.to_owned(),
        date_of_birth: "2001-03-14".into(),
        documents: vec![common::IdentityDocument {
            r#type: common::DocumentType::Passport as i32,
            number: passport.to_owned(),
            issuing_country: "KG".into(),
        }],
        phone: phone.to_owned(),
        address: "Bishkek, Chui 1".into(),
    }
}

/// A migrated database, a bus and the identification stream of their own,
/// for testing the kernel's parts one at a time.
pub struct Parts {
    /// Their settings.
    pub settings: Settings,
    /// A pool on the database.
    pub pool: sqlx::PgPool,
    /// The bus.
    pub bus: nrm_kernel::bus::Bus,
    /// The stream.
    pub stream: jetstream::stream::Stream,
}

impl Parts {
    /// Creates them.
    ///
    /// # Panics
    /// When a server refuses.
    pub async fn new() -> Self {
        let settings = settings();
        let pool = nrm_kernel::db::connect_and_migrate(&settings.database, &nrm_identification::startup::MIGRATIONS)
            .await
            .expect("database");
        let bus = nrm_kernel::bus::Bus::connect(&settings.nats).await.expect("bus");
        let stream = bus.ensure_stream("identification").await.expect("stream");
        Self {
            settings,
            pool,
            bus,
            stream,
        }
    }

    /// A relay over the parts.
    #[must_use]
    pub fn relay(&self, store: &nrm_kernel::store::EventStore) -> nrm_kernel::relay::Relay {
        nrm_kernel::relay::Relay::new(
            self.pool.clone(),
            self.bus.clone(),
            "identification",
            store.appended_signal(),
            nrm_kernel::relay::RelayConfig::new(nrm_identification::app::PAYLOAD_TYPE),
        )
    }

    /// Runs relay rounds until the outbox is empty (10 s at most). One round
    /// may publish nothing while a transaction anywhere in the cluster is
    /// older than the outbox rows (the relay waits for it), so tests poll.
    ///
    /// # Panics
    /// When the outbox is not empty after 10 s.
    pub async fn publish_all(&self, relay: &mut nrm_kernel::relay::Relay) -> usize {
        let mut published = 0;
        for _ in 0..400 {
            published += relay.publish_round().await.expect("relay round");
            let left: i64 = sqlx::query_scalar("SELECT count(*) FROM outbox")
                .fetch_one(&self.pool)
                .await
                .expect("outbox count");
            if left == 0 {
                return published;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        panic!("the outbox did not empty within 10 s");
    }

    /// Every message in the stream so far.
    pub async fn messages(&self) -> Vec<jetstream::message::StreamMessage> {
        messages(self.bus.jetstream(), &self.bus.stream_name("identification")).await
    }

    /// Drops the database and the stream.
    pub async fn drop_all(self) {
        self.pool.close().await;
        let _ = self
            .bus
            .jetstream()
            .delete_stream(self.bus.stream_name("identification"))
            .await;
        let _ = nrm_kernel::db::drop_database(&self.settings.database).await;
    }
}

/// A binary of the workspace, built by `cargo test --workspace` beside the test binaries.
///
/// # Panics
/// When it was not built.
#[must_use]
pub fn binary(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("test binary path");
    // target/debug/deps/<test> -> target/debug/<name>
    let path = exe
        .parent()
        .and_then(std::path::Path::parent)
        .map(|dir| dir.join(name))
        .expect("target folder");
    assert!(
        path.exists(),
        "{} is missing: build it first (`cargo build --workspace --bins`; `make test` does)",
        path.display()
    );
    path
}

/// The environment variables that configure a service process like `settings`.
#[must_use]
pub fn service_env(settings: &Settings) -> Vec<(String, String)> {
    use secrecy::ExposeSecret as _;
    vec![
        ("NRM_GRPC_ADDR".into(), settings.server.grpc_addr.to_string()),
        ("NRM_METRICS_ADDR".into(), settings.server.metrics_addr.to_string()),
        ("NRM_DATABASE__URL".into(), settings.database.url.clone()),
        ("NRM_DATABASE__NAME".into(), settings.database.name.clone()),
        ("NRM_NATS__URL".into(), settings.nats.url.clone()),
        ("NRM_NATS__SUBJECT_PREFIX".into(), settings.nats.subject_prefix.clone()),
        ("NRM_NATS__STREAM_PREFIX".into(), settings.nats.stream_prefix.clone()),
        ("NRM_AUTH__JWKS".into(), settings.auth.jwks.clone()),
        (
            "NRM_SEALING__MASTER_KEY".into(),
            settings.sealing.master_key.expose_secret().to_owned(),
        ),
        (
            "NRM_SEALING__MATCH_KEY".into(),
            settings.sealing.match_key.expose_secret().to_owned(),
        ),
        ("NRM_TELEMETRY__LOG".into(), "info".into()),
    ]
}

/// Settings of a shelter service with its own database and subjects; its
/// expiry timers are looked at every 100 ms.
#[must_use]
pub fn shelter_settings() -> nrm_shelter::config::Settings {
    let base = settings();
    nrm_shelter::config::Settings {
        common: CommonSettings {
            database: DatabaseSettings {
                max_connections: 16,
                ..base.common.database
            },
            ..base.common
        },
        sealing: nrm_shelter::config::SealingSettings {
            master_key: base.sealing.master_key,
        },
        shelter: nrm_shelter::config::ShelterSettings {
            hold_minutes_default: 1440,
            timer_poll_ms: 100,
        },
    }
}

/// A running shelter service.
pub struct ShelterApp {
    /// Its settings (database, subjects).
    pub settings: nrm_shelter::config::Settings,
    /// `http://127.0.0.1:port`.
    pub endpoint: String,
    /// A client.
    pub client: nrm_proto::shelter::v1::shelter_service_client::ShelterServiceClient<Channel>,
    /// A pool on its database, for checking what was written.
    pub pool: sqlx::PgPool,
    /// JetStream on the test's NATS.
    pub jetstream: jetstream::Context,
    shutdown: CancellationToken,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl ShelterApp {
    /// Builds and starts a shelter service with `settings`.
    ///
    /// # Panics
    /// When the service cannot start.
    pub async fn spawn_with(settings: nrm_shelter::config::Settings) -> Self {
        let app = nrm_shelter::startup::Application::build(&settings)
            .await
            .expect("build the shelter service");
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
        let client = nrm_proto::shelter::v1::shelter_service_client::ShelterServiceClient::connect(endpoint.clone())
            .await
            .expect("connect");
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

    /// Builds and starts a shelter service of its own.
    pub async fn spawn() -> Self {
        Self::spawn_with(shelter_settings()).await
    }

    /// Name of a context's JetStream stream in this test's space.
    #[must_use]
    pub fn stream_name(&self, context: &str) -> String {
        format!("{}_{}", self.settings.nats.stream_prefix, context.to_ascii_uppercase())
    }

    /// Every message of the shelter stream so far.
    pub async fn messages(&self) -> Vec<jetstream::message::StreamMessage> {
        messages(&self.jetstream, &self.stream_name("shelter")).await
    }

    /// Rows in a table of the service's database.
    ///
    /// # Panics
    /// When the query fails.
    pub async fn count(&self, table: &str) -> i64 {
        let sql = match table {
            "events" => "SELECT count(*) FROM events",
            "outbox" => "SELECT count(*) FROM outbox",
            "commands" => "SELECT count(*) FROM commands",
            "person_keys" => "SELECT count(*) FROM person_keys",
            "audit_log" => "SELECT count(*) FROM audit_log",
            "timers" => "SELECT count(*) FROM timers",
            "free_capacity" => "SELECT count(*) FROM free_capacity",
            other => panic!("no count for {other}"),
        };
        sqlx::query_scalar(sql).fetch_one(&self.pool).await.expect("count")
    }

    /// Stops the service and drops its database and streams.
    pub async fn stop(mut self) {
        self.shutdown.cancel();
        if let Some(task) = self.task.take() {
            let _ = tokio::time::timeout(Duration::from_secs(15), task).await;
        }
        self.pool.close().await;
        for context in ["shelter", "referral"] {
            let _ = self.jetstream.delete_stream(self.stream_name(context)).await;
        }
        let _ = nrm_kernel::db::drop_database(&self.settings.database).await;
    }
}

impl Drop for ShelterApp {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

/// Settings of a referral service beside the identification service
/// configured by `identification`: the same NATS subjects and streams (so it
/// learns that service's persons), a database of its own.
#[must_use]
pub fn referral_settings(identification: &Settings) -> nrm_referral::config::Settings {
    nrm_referral::config::Settings {
        common: CommonSettings {
            server: ServerSettings {
                grpc_addr: "127.0.0.1:0".parse().unwrap_or_else(|_| unreachable!()),
                metrics_addr: "127.0.0.1:0".parse().unwrap_or_else(|_| unreachable!()),
                ..ServerSettings::default()
            },
            database: DatabaseSettings {
                url: identification.database.url.clone(),
                name: format!("test_{}", unique()),
                max_connections: 8,
            },
            relay: RelaySettings::default(),
            ..identification.common.clone()
        },
        referral: nrm_referral::config::ReferralSettings::default(),
    }
}

/// A running referral service.
pub struct ReferralApp {
    /// Its settings (database, subjects, deadlines).
    pub settings: nrm_referral::config::Settings,
    /// `http://127.0.0.1:port`.
    pub endpoint: String,
    /// A client.
    pub client: nrm_proto::referral::v1::referral_service_client::ReferralServiceClient<Channel>,
    /// A pool on its database, for checking what was written.
    pub pool: sqlx::PgPool,
    /// JetStream on the test's NATS.
    pub jetstream: jetstream::Context,
    shutdown: CancellationToken,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl ReferralApp {
    /// Builds and starts a referral service with `settings`.
    ///
    /// # Panics
    /// When the service cannot start.
    pub async fn spawn_with(settings: nrm_referral::config::Settings) -> Self {
        let app = nrm_referral::startup::Application::build(&settings)
            .await
            .expect("build the referral service");
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
        let client = nrm_proto::referral::v1::referral_service_client::ReferralServiceClient::connect(endpoint.clone())
            .await
            .expect("connect");
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

    /// Builds and starts a referral service beside `identification`.
    pub async fn spawn_beside(identification: &TestApp) -> Self {
        Self::spawn_with(referral_settings(&identification.settings)).await
    }

    /// Stops the service and keeps its database; returns its settings.
    pub async fn halt(mut self) -> nrm_referral::config::Settings {
        self.shutdown.cancel();
        if let Some(task) = self.task.take() {
            let _ = tokio::time::timeout(Duration::from_secs(15), task).await;
        }
        self.pool.close().await;
        self.settings.clone()
    }

    /// Stops the service and starts a new one on the same database.
    pub async fn restart(self) -> Self {
        let settings = self.halt().await;
        Self::spawn_with(settings).await
    }

    /// Name of the stream of `context` in this test's subject space.
    #[must_use]
    pub fn stream_name(&self, context: &str) -> String {
        format!("{}_{}", self.settings.nats.stream_prefix, context.to_ascii_uppercase())
    }

    /// Events stored so far, of one type or (with `None`) of any.
    ///
    /// # Panics
    /// When the query fails.
    pub async fn count_events(&self, event_type: Option<&str>) -> i64 {
        sqlx::query_scalar("SELECT count(*) FROM events WHERE $1::text IS NULL OR event_type = $1")
            .bind(event_type)
            .fetch_one(&self.pool)
            .await
            .expect("count events")
    }

    /// Waits until the persons projection knows `person_id` with `status`
    /// (an `nrm.identification.v1.CaseStatus`).
    ///
    /// # Panics
    /// After 10 s.
    pub async fn wait_for_person(&self, person_id: &str, status: i32) {
        let id: uuid::Uuid = person_id.parse().expect("person ID");
        for _ in 0..200 {
            let found: Option<i32> = sqlx::query_scalar("SELECT status FROM persons WHERE person_id = $1")
                .bind(id)
                .fetch_optional(&self.pool)
                .await
                .expect("persons");
            if found == Some(status) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("the referral service did not learn person {person_id} with status {status} within 10 s");
    }

    /// Stops the service and drops its database and the streams it made.
    pub async fn stop(self) {
        let js = self.jetstream.clone();
        let streams = [self.stream_name("referral"), self.stream_name("shelter")];
        let settings = self.halt().await;
        for stream in streams {
            let _ = js.delete_stream(stream).await;
        }
        let _ = nrm_kernel::db::drop_database(&settings.database).await;
    }
}

impl Drop for ReferralApp {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

/// Stands in for the shelter service on the bus: an event store on a
/// scratch database and a relay to the shelter stream of a test's subject
/// space, so tests can publish `nrm.shelter.v1.ShelterEvent`s as the
/// shelter service would.
pub struct ShelterFeed {
    database: DatabaseSettings,
    /// A pool on the scratch database.
    pub pool: sqlx::PgPool,
    /// The bus.
    pub bus: nrm_kernel::bus::Bus,
    store: nrm_kernel::store::EventStore,
    relay: nrm_kernel::relay::Relay,
}

impl ShelterFeed {
    /// A feed into the shelter stream of `nats`'s subject space.
    ///
    /// # Panics
    /// When a server refuses.
    pub async fn new(nats: &NatsSettings) -> Self {
        let database = DatabaseSettings {
            url: env().database_url.clone(),
            name: format!("test_{}", unique()),
            max_connections: 4,
        };
        let pool = nrm_kernel::db::connect_and_migrate(&database, &nrm_referral::startup::MIGRATIONS)
            .await
            .expect("database");
        let bus = nrm_kernel::bus::Bus::connect(nats).await.expect("bus");
        bus.ensure_stream("shelter").await.expect("stream");
        let store = nrm_kernel::store::EventStore::new(pool.clone());
        let relay = nrm_kernel::relay::Relay::new(
            pool.clone(),
            bus.clone(),
            "shelter",
            store.appended_signal(),
            nrm_kernel::relay::RelayConfig::new("nrm.shelter.v1.ShelterEvent"),
        );
        Self {
            database,
            pool,
            bus,
            store,
            relay,
        }
    }

    /// Appends `events` to the stream `{aggregate}-{id}` (published on the
    /// subject of that aggregate instance) and publishes them.
    ///
    /// # Panics
    /// When the store or the relay fails, or the outbox does not empty within 10 s.
    pub async fn publish(
        &mut self,
        aggregate: &str,
        id: &str,
        events: &[nrm_proto::shelter::v1::shelter_event::Event],
    ) {
        use prost::Message as _;
        let stream_id = format!("{aggregate}-{id}");
        let version = self.store.read_stream(&stream_id).await.expect("read").len() as u64;
        let new_events: Vec<nrm_kernel::store::NewEvent> = events
            .iter()
            .map(|event| {
                use nrm_proto::shelter::v1::shelter_event::Event;
                let event_type = match event {
                    Event::BedHeld(_) => "BedHeld",
                    Event::NoBedAvailable(_) => "NoBedAvailable",
                    _ => "Other",
                };
                nrm_kernel::store::NewEvent {
                    event_type: event_type.into(),
                    schema_version: 1,
                    payload: nrm_proto::shelter::v1::ShelterEvent {
                        event: Some(event.clone()),
                    }
                    .encode_to_vec(),
                }
            })
            .collect();
        let metadata = nrm_kernel::store::EventMetadata {
            correlation_id: uuid::Uuid::now_v7(),
            causation_id: uuid::Uuid::now_v7(),
            actor: nrm_kernel::store::Actor {
                agency: "kg-shelter-1".into(),
                role: "shelter".into(),
                officer: "operator-1".into(),
            },
            traceparent: None,
            tracestate: None,
        };
        let mut uow = self.store.begin().await.expect("begin");
        uow.append(
            &stream_id,
            version,
            &new_events,
            &metadata,
            &self.bus.subject("shelter", aggregate, id),
        )
        .await
        .expect("append");
        uow.commit().await.expect("commit");
        for _ in 0..400 {
            self.relay.publish_round().await.expect("relay round");
            let left: i64 = sqlx::query_scalar("SELECT count(*) FROM outbox")
                .fetch_one(&self.pool)
                .await
                .expect("outbox count");
            if left == 0 {
                return;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        panic!("the shelter outbox did not empty within 10 s");
    }

    /// Drops the scratch database.
    pub async fn drop_all(self) {
        self.pool.close().await;
        let _ = nrm_kernel::db::drop_database(&self.database).await;
    }
}

/// A service binary running as its own process, as in production.
pub struct ServiceProcess {
    name: &'static str,
    env: Vec<(String, String)>,
    child: std::process::Child,
    /// `http://127.0.0.1:port` of its gRPC server.
    pub endpoint: String,
}

impl ServiceProcess {
    /// Starts `target/debug/<name>` with `env` and waits until it logs that it listens.
    ///
    /// # Panics
    /// When it does not start within 30 s.
    #[must_use]
    pub fn start(name: &'static str, env: Vec<(String, String)>) -> Self {
        use std::io::BufRead as _;
        let mut child = Command::new(binary(name))
            .envs(env.iter().cloned())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::inherit())
            .spawn()
            .unwrap_or_else(|e| panic!("start {name}: {e}"));
        let stdout = child.stdout.take().expect("stdout");
        let (tx, rx) = std::sync::mpsc::channel();
        let marker = format!("{name} service listening");
        std::thread::spawn(move || {
            let mut sent = false;
            // Keep reading so the child never blocks on a full pipe.
            for line in std::io::BufReader::new(stdout).lines().map_while(Result::ok) {
                if !sent && line.contains(&marker) {
                    let addr = line
                        .split("\"grpc\":\"")
                        .nth(1)
                        .and_then(|rest| rest.split('"').next())
                        .unwrap_or_default()
                        .to_owned();
                    let _ = tx.send(addr);
                    sent = true;
                }
            }
        });
        let addr = rx
            .recv_timeout(Duration::from_secs(30))
            .unwrap_or_else(|_| panic!("{name} did not start within 30 s"));
        Self {
            name,
            env,
            child,
            endpoint: format!("http://{addr}"),
        }
    }

    /// SIGKILL, then start again with the same settings (and a new port).
    #[must_use]
    pub fn kill_and_restart(mut self) -> Self {
        self.kill();
        Self::start(self.name, std::mem::take(&mut self.env))
    }

    /// Waits up to `timeout` for the process to end by itself; its exit status.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let deadline = std::time::Instant::now() + timeout;
        while std::time::Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }

    /// SIGKILL.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// A gRPC channel to it.
    ///
    /// # Panics
    /// When it does not answer.
    pub async fn channel(&self) -> Channel {
        Channel::from_shared(self.endpoint.clone())
            .expect("endpoint")
            .connect()
            .await
            .expect("connect")
    }
}

impl Drop for ServiceProcess {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Environment of a service process named `service` sharing `base`'s
/// servers, keys and subjects, with its own database.
#[must_use]
pub fn process_env(base: &Settings, service: &str, extra: &[(&str, &str)]) -> Vec<(String, String)> {
    let mut env: Vec<(String, String)> = service_env(base)
        .into_iter()
        .filter(|(k, _)| k != "NRM_DATABASE__NAME")
        .collect();
    env.push(("NRM_DATABASE__NAME".into(), format!("{}_{service}", base.database.name)));
    env.extend(extra.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())));
    env
}

/// Drops the databases and streams `process_env` made for `services`.
pub async fn drop_processes_data(base: &Settings, services: &[&str]) {
    let nats = async_nats::connect(base.nats.url.as_str())
        .await
        .expect("connect to NATS");
    let js = jetstream::new(nats);
    for context in ["identification", "referral", "shelter"] {
        let _ = js
            .delete_stream(format!("{}_{}", base.nats.stream_prefix, context.to_ascii_uppercase()))
            .await;
    }
    for service in services {
        let mut database = base.database.clone();
        database.name = format!("{}_{service}", base.database.name);
        let _ = nrm_kernel::db::drop_database(&database).await;
    }
}
