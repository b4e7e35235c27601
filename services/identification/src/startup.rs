//! Building and running the service: the same code runs in `main` and in
//! the tests (on port 0).

use std::net::SocketAddr;

use anyhow::Context as _;
use nrm_kernel::auth::Authenticator;
use nrm_kernel::bus::Bus;
use nrm_kernel::db;
use nrm_kernel::projection::ProjectionRunner;
use nrm_kernel::relay::{Relay, RelayConfig};
use nrm_kernel::seal::{MasterKey, MatchHasher};
use nrm_kernel::server::{self, Background, Listeners};
use nrm_kernel::settings::decode_key;
use nrm_kernel::store::EventStore;
use nrm_proto::identification::v1::identification_service_server::IdentificationServiceServer;
use tokio_util::sync::CancellationToken;
use tonic::service::Routes;

use crate::app::{CONTEXT, Identification, PAYLOAD_TYPE};
use crate::config::Settings;
use crate::grpc::IdentificationGrpc;
use crate::projections::{CaseList, ReferralAccess};

/// Name of the gRPC service, as reported by health checks.
pub const SERVICE_NAME: &str = "nrm.identification.v1.IdentificationService";

/// The migrations of the identification service's own tables.
pub static MIGRATIONS: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

/// A built, not yet running, identification service.
pub struct Application {
    listeners: Listeners,
    app: Identification,
    bus: Bus,
    auth: Authenticator,
    relay: Option<Relay>,
    case_list: ProjectionRunner<CaseList>,
    referral_access: ProjectionRunner<ReferralAccess>,
}

impl Application {
    /// Connects to PostgreSQL (creating and migrating the database) and NATS
    /// (creating the stream), and binds the listeners.
    ///
    /// # Errors
    /// When a key setting is malformed, or the database, NATS or a port cannot be had.
    pub async fn build(settings: &Settings) -> Result<Self, anyhow::Error> {
        let master = MasterKey::new(
            decode_key("NRM_SEALING__MASTER_KEY", &settings.sealing.master_key).map_err(anyhow::Error::msg)?,
        );
        let hasher = MatchHasher::new(
            decode_key("NRM_SEALING__MATCH_KEY", &settings.sealing.match_key).map_err(anyhow::Error::msg)?,
        );
        let auth = Authenticator::new(&settings.auth.jwt_secret, &settings.auth.issuer);
        let pool = db::connect_and_migrate(&settings.database, &MIGRATIONS)
            .await
            .context("preparing the database")?;
        let bus = Bus::connect(&settings.nats).await?;
        let stream = bus.ensure_stream(CONTEXT).await?;
        let store = EventStore::new(pool.clone());
        let relay = settings.relay.enabled.then(|| {
            Relay::new(
                pool.clone(),
                bus.clone(),
                stream.clone(),
                store.appended_signal(),
                RelayConfig::new(PAYLOAD_TYPE),
            )
        });
        let case_list = ProjectionRunner::new(
            store.clone(),
            bus.clone(),
            stream,
            bus.context_subjects(CONTEXT),
            CaseList,
        );
        // Consents and referrals arrive from the referral service's stream.
        let referral_stream = bus.ensure_stream("referral").await?;
        let referral_access = ProjectionRunner::new(
            store.clone(),
            bus.clone(),
            referral_stream,
            bus.context_subjects("referral"),
            ReferralAccess,
        );
        let app = Identification::new(
            store,
            bus.clone(),
            master,
            hasher,
            settings.identification.reflection_days,
        );
        let listeners = Listeners::bind(&settings.server).await?;
        Ok(Self {
            listeners,
            app,
            bus,
            auth,
            relay,
            case_list,
            referral_access,
        })
    }

    /// Where gRPC listens.
    ///
    /// # Errors
    /// When the socket has no address.
    pub fn grpc_addr(&self) -> std::io::Result<SocketAddr> {
        self.listeners.grpc_addr()
    }

    /// Where `/metrics` listens.
    ///
    /// # Errors
    /// When the socket has no address.
    pub fn metrics_addr(&self) -> std::io::Result<SocketAddr> {
        self.listeners.metrics_addr()
    }

    /// The case list projection (tests rebuild it).
    #[must_use]
    pub fn case_list(&self) -> &ProjectionRunner<CaseList> {
        &self.case_list
    }

    /// Serves until `shutdown` is cancelled, then stops the relay and the
    /// projection and lets calls in flight finish.
    ///
    /// # Errors
    /// When the gRPC server fails.
    pub async fn run_until_stopped(self, shutdown: CancellationToken) -> Result<(), anyhow::Error> {
        let mut background = Background::new();
        background.spawn_relay(self.relay);
        background.spawn(|stop| self.case_list.run(stop));
        background.spawn(|stop| self.referral_access.run(stop));
        let pool = self.app.store().pool().clone();
        let routes = Routes::new(IdentificationServiceServer::new(IdentificationGrpc::new(
            self.app, self.auth,
        )));
        server::serve(
            self.listeners,
            SERVICE_NAME,
            routes,
            pool,
            self.bus,
            background,
            shutdown,
        )
        .await
    }
}
