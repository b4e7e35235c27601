//! casepath's projections against the real streams: a casepath service in
//! this process beside identification, referral and shelter services (one
//! subject space, each its own database), waiting until its checkpoints
//! reach the streams' last sequences, rebuilding and re-applying its read
//! models to compare their digests, and looking for text in every column
//! of its database.

use std::future::Future;
use std::time::Duration;

use nrm_casepath::domain::changes::WatchKey;
use nrm_casepath::projections::{
    IdentificationProjection, ReferralProjection, RepatriationProjection, ShelterProjection,
};
use nrm_identification::config::Settings;
use nrm_kernel::auth::Role;
use nrm_kernel::bus::{self, Bus};
use nrm_kernel::projection::{Delivery, Projection, ProjectionRunner};
use nrm_kernel::service::{CommonSettings, Service as _};
use nrm_kernel::settings::{DatabaseSettings, RelaySettings};
use nrm_kernel::store::EventStore;
use nrm_kernel::xborder::CountryCode;
use nrm_proto::common::v1::EventCommit;
use prost::Message as _;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use nrm_e2e::{ReferralApp, ShelterApp, TestApp, messages, referral_settings, settings, token, unique};

/// A token of `who` (agency, role), officer `officer-1`.
pub fn as_(who: (&str, Role)) -> String {
    token(who.0, who.1, "officer-1")
}

/// A fresh request ID.
pub fn rid() -> String {
    Uuid::now_v7().to_string()
}

/// `text` as a UUID.
///
/// # Panics
/// When it is not one.
pub fn uuid(text: &str) -> Uuid {
    text.parse().expect("a UUID")
}

/// Retries `call` until it succeeds (events take a moment to cross the bus).
///
/// # Panics
/// When it has not succeeded within 15 s.
pub async fn eventually<T, F, Fut>(what: &str, mut call: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, tonic::Status>>,
{
    let mut last = None;
    for _ in 0..300 {
        match call().await {
            Ok(value) => return value,
            Err(status) => last = Some(status),
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("{what} did not happen within 15 s: {last:?}");
}

/// The contexts casepath follows, with the projection of each.
pub const PROJECTIONS: [(&str, &str); 4] = [
    ("identification", "casepath_identification"),
    ("referral", "casepath_referral"),
    ("shelter", "casepath_shelter"),
    ("repatriation", "casepath_repatriation"),
];

/// Identification, referral and shelter services on one subject space.
pub struct Mechanism {
    /// The identification service's settings (the space's base).
    pub base: Settings,
    /// Identification.
    pub identification: TestApp,
    /// Referral.
    pub referral: ReferralApp,
    /// Shelter.
    pub shelter: ShelterApp,
}

impl Mechanism {
    /// Starts the three services.
    pub async fn start() -> Self {
        let base = settings();
        let identification = TestApp::spawn_with(base.clone()).await;
        let referral = ReferralApp::spawn_with(referral_settings(&base)).await;
        let shelter_settings = nrm_shelter::config::Settings {
            common: CommonSettings {
                database: DatabaseSettings {
                    url: base.database.url.clone(),
                    name: format!("test_{}", unique()),
                    max_connections: 8,
                },
                relay: RelaySettings::default(),
                ..base.common.clone()
            },
            sealing: nrm_shelter::config::SealingSettings {
                master_key: base.sealing.master_key.clone(),
            },
            shelter: nrm_shelter::config::ShelterSettings {
                hold_minutes_default: 1440,
                timer_poll_ms: 100,
            },
        };
        let shelter = ShelterApp::spawn_with(shelter_settings).await;
        Self {
            base,
            identification,
            referral,
            shelter,
        }
    }

    /// Waits until no service has anything left to publish.
    ///
    /// # Panics
    /// After 15 s.
    pub async fn wait_published(&self) {
        for _ in 0..300 {
            let mut left = 0i64;
            for pool in [&self.identification.pool, &self.referral.pool, &self.shelter.pool] {
                left += sqlx::query_scalar::<_, i64>("SELECT count(*) FROM outbox")
                    .fetch_one(pool)
                    .await
                    .expect("outbox");
            }
            if left == 0 {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("the services did not publish everything within 15 s");
    }

    /// Stops everything and drops its data.
    pub async fn stop(self) {
        self.shelter.stop().await;
        self.referral.stop().await;
        self.identification.stop().await;
    }
}

/// A casepath service in this process.
pub struct CasepathApp {
    /// Its settings.
    pub settings: nrm_casepath::config::Settings,
    /// A pool on its database.
    pub pool: sqlx::PgPool,
    /// The bus of its subject space.
    pub bus: Bus,
    country: CountryCode,
    watch_key: WatchKey,
    shutdown: CancellationToken,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl CasepathApp {
    /// Builds and starts casepath (country kg) on `base`'s subject space, its own database.
    ///
    /// # Panics
    /// When it cannot start.
    pub async fn spawn_beside(base: &Settings) -> Self {
        Self::spawn_on(&base.common, "kg").await
    }

    /// Builds and starts casepath of `country` on `common`'s subject space,
    /// its own database.
    ///
    /// # Panics
    /// When it cannot start.
    pub async fn spawn_on(common: &CommonSettings, country: &str) -> Self {
        let settings = nrm_casepath::config::Settings {
            common: CommonSettings {
                database: DatabaseSettings {
                    url: common.database.url.clone(),
                    name: format!("test_{}", unique()),
                    max_connections: 8,
                },
                relay: RelaySettings::default(),
                ..common.clone()
            },
            casepath: nrm_casepath::config::CasepathSettings::default(),
            xborder: nrm_kernel::xborder::XborderSettings {
                country: country.to_owned(),
                ..Default::default()
            },
        };
        Self::spawn_with(settings).await
    }

    /// Builds and starts casepath with `settings`.
    ///
    /// # Panics
    /// When it cannot start.
    pub async fn spawn_with(settings: nrm_casepath::config::Settings) -> Self {
        let app = nrm_casepath::startup::Application::build(&settings)
            .await
            .expect("build the casepath service");
        let pool = app.kit().pool().clone();
        let bus = app.kit().bus().clone();
        let shutdown = CancellationToken::new();
        let running = app.run_until_stopped(shutdown.clone());
        let task = tokio::spawn(async move {
            if let Err(err) = running.await {
                panic!("casepath failed: {err}");
            }
        });
        let country = CountryCode::parse("country", &settings.xborder.country).expect("country");
        let watch_key = nrm_casepath::app::watch::load_key(&pool).await.expect("the watch key");
        Self {
            settings,
            pool,
            bus,
            country,
            watch_key,
            shutdown,
            task: Some(task),
        }
    }

    /// The last sequence of a context's stream (0 when it has none).
    async fn last_sequence(&self, context: &str) -> u64 {
        match self.bus.jetstream().get_stream(self.bus.stream_name(context)).await {
            Ok(mut stream) => stream.info().await.expect("stream info").state.last_sequence,
            Err(_) => 0,
        }
    }

    /// Waits until every projection's checkpoint has reached its stream's
    /// last sequence (as it stands when called).
    ///
    /// # Panics
    /// After 20 s, naming the projections behind.
    pub async fn wait_caught_up(&self) {
        let mut targets = Vec::new();
        for (context, projection) in PROJECTIONS {
            targets.push((projection, self.last_sequence(context).await));
        }
        let mut behind = Vec::new();
        for _ in 0..400 {
            behind.clear();
            for (projection, target) in &targets {
                let at: Option<i64> =
                    sqlx::query_scalar("SELECT stream_sequence FROM projection_checkpoints WHERE projection = $1")
                        .bind(projection)
                        .fetch_optional(&self.pool)
                        .await
                        .expect("checkpoint");
                let at = at.and_then(|s| u64::try_from(s).ok()).unwrap_or(0);
                if at < *target {
                    behind.push(format!("{projection} at {at} of {target}"));
                }
            }
            if behind.is_empty() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("casepath did not catch up within 20 s: {behind:?}");
    }

    fn runner<P: Projection>(&self, context: &'static str, projection: P) -> ProjectionRunner<P> {
        ProjectionRunner::new(
            EventStore::new(self.pool.clone()),
            self.bus.clone(),
            context,
            projection,
        )
    }

    /// The digests of the four read models.
    ///
    /// # Panics
    /// When the database fails.
    pub async fn digests(&self) -> Vec<String> {
        let mut conn = self.pool.acquire().await.expect("connection");
        let mut out = Vec::new();
        let country = &self.country;
        out.push(
            IdentificationProjection::new(country, &self.watch_key)
                .digest(&mut conn)
                .await,
        );
        out.push(
            ReferralProjection::new(country, &self.watch_key)
                .digest(&mut conn)
                .await,
        );
        out.push(ShelterProjection::new(country, &self.watch_key).digest(&mut conn).await);
        out.push(
            RepatriationProjection::new(country, &self.watch_key)
                .digest(&mut conn)
                .await,
        );
        out.into_iter().map(|d| d.expect("digest").expect("a digest")).collect()
    }

    /// Rebuilds the read models whose stream exists (reset and full replay).
    ///
    /// # Panics
    /// When a rebuild fails.
    pub async fn rebuild(&self) {
        let country = &self.country;
        if self.last_sequence("identification").await > 0 {
            self.runner(
                "identification",
                IdentificationProjection::new(country, &self.watch_key),
            )
            .rebuild()
            .await
            .expect("rebuild identification");
        }
        if self.last_sequence("referral").await > 0 {
            self.runner("referral", ReferralProjection::new(country, &self.watch_key))
                .rebuild()
                .await
                .expect("rebuild referral");
        }
        if self.last_sequence("shelter").await > 0 {
            self.runner("shelter", ShelterProjection::new(country, &self.watch_key))
                .rebuild()
                .await
                .expect("rebuild shelter");
        }
        if self.last_sequence("repatriation").await > 0 {
            self.runner("repatriation", RepatriationProjection::new(country, &self.watch_key))
                .rebuild()
                .await
                .expect("rebuild repatriation");
        }
    }

    /// Applies every message of every stream once more, straight through the
    /// projections (past the runner's checkpoint and version guards), in
    /// one transaction: what an event applied twice does.
    ///
    /// # Panics
    /// When an apply fails.
    pub async fn reapply_all(&self) {
        let store = EventStore::new(self.pool.clone());
        let mut uow = store.begin().await.expect("begin");
        let country = &self.country;
        for (context, _) in PROJECTIONS {
            for message in messages(self.bus.jetstream(), &self.bus.stream_name(context)).await {
                let delivery = Delivery {
                    stream_sequence: message.sequence,
                    subject: message.subject.to_string(),
                    commit: EventCommit::decode(message.payload.as_ref()).expect("a commit"),
                    metadata: bus::metadata_from_headers(Some(&message.headers)),
                };
                let applied = match context {
                    "identification" => {
                        IdentificationProjection::new(country, &self.watch_key)
                            .apply(&mut uow, &delivery)
                            .await
                    }
                    "referral" => {
                        ReferralProjection::new(country, &self.watch_key)
                            .apply(&mut uow, &delivery)
                            .await
                    }
                    "shelter" => {
                        ShelterProjection::new(country, &self.watch_key)
                            .apply(&mut uow, &delivery)
                            .await
                    }
                    _ => {
                        RepatriationProjection::new(country, &self.watch_key)
                            .apply(&mut uow, &delivery)
                            .await
                    }
                };
                applied.expect("apply again");
            }
        }
        uow.commit().await.expect("commit");
    }

    /// Empties the four read models and applies every message of every
    /// stream again, straight through the projections, in one transaction:
    /// each commit as a batch of its own, or all of a stream's commits in
    /// one batch ([`Projection::apply_batch`]), so that a test can compare
    /// the two with the live read models.
    ///
    /// # Panics
    /// When a reset or an apply fails.
    pub async fn reset_and_apply(&self, one_batch: bool) {
        let store = EventStore::new(self.pool.clone());
        let mut uow = store.begin().await.expect("begin");
        let country = &self.country;
        let identification = IdentificationProjection::new(country, &self.watch_key);
        let referral = ReferralProjection::new(country, &self.watch_key);
        let shelter = ShelterProjection::new(country, &self.watch_key);
        let repatriation = RepatriationProjection::new(country, &self.watch_key);
        identification.reset(uow.conn()).await.expect("reset");
        referral.reset(uow.conn()).await.expect("reset");
        shelter.reset(uow.conn()).await.expect("reset");
        repatriation.reset(uow.conn()).await.expect("reset");
        for (context, _) in PROJECTIONS {
            let deliveries: Vec<Delivery> = messages(self.bus.jetstream(), &self.bus.stream_name(context))
                .await
                .into_iter()
                .map(|message| Delivery {
                    stream_sequence: message.sequence,
                    subject: message.subject.to_string(),
                    commit: EventCommit::decode(message.payload.as_ref()).expect("a commit"),
                    metadata: bus::metadata_from_headers(Some(&message.headers)),
                })
                .collect();
            let all: Vec<&Delivery> = deliveries.iter().collect();
            let batches: Vec<&[&Delivery]> = if one_batch {
                vec![&all[..]]
            } else {
                all.chunks(1).collect()
            };
            for batch in batches {
                let applied = match context {
                    "identification" => identification.apply_batch(&mut uow, batch).await,
                    "referral" => referral.apply_batch(&mut uow, batch).await,
                    "shelter" => shelter.apply_batch(&mut uow, batch).await,
                    _ => repatriation.apply_batch(&mut uow, batch).await,
                };
                applied.expect("apply");
            }
        }
        uow.commit().await.expect("commit");
    }

    /// The rows of every table of casepath's database (its own and the
    /// kernel's) whose text contains `needle` (as text, or hex-encoded as
    /// in a bytea column's text): `table: row` lines.
    ///
    /// # Panics
    /// When the database fails.
    pub async fn rows_containing(&self, needle: &str) -> Vec<String> {
        let tables: Vec<String> =
            sqlx::query_scalar("SELECT tablename::text FROM pg_tables WHERE schemaname = 'public' ORDER BY 1")
                .fetch_all(&self.pool)
                .await
                .expect("tables");
        let hex: String = needle.bytes().map(|b| format!("{b:02x}")).collect();
        let mut found = Vec::new();
        for table in tables {
            // The table names come from the catalogue, quoted.
            let sql = format!(
                "SELECT t::text FROM \"{}\" t WHERE strpos(lower(t::text), lower($1)) > 0 OR strpos(t::text, $2) > 0",
                table.replace('"', "\"\"")
            );
            let rows: Vec<String> = sqlx::query_scalar(sqlx::AssertSqlSafe(sql))
                .bind(needle)
                .bind(&hex)
                .fetch_all(&self.pool)
                .await
                .expect("scan");
            found.extend(rows.into_iter().map(|r| format!("{table}: {r}")));
        }
        found
    }

    /// Stops casepath and drops its database.
    pub async fn stop(mut self) {
        self.shutdown.cancel();
        if let Some(task) = self.task.take() {
            let _ = tokio::time::timeout(Duration::from_secs(15), task).await;
        }
        self.pool.close().await;
        let _ = nrm_kernel::db::drop_database(&self.settings.common.database).await;
    }
}

impl Drop for CasepathApp {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}
