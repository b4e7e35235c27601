//! Building and running the service: the same code runs in `main` and in
//! the tests (on port 0).

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::Context as _;
use nrm_kernel::auth::Authenticator;
use nrm_kernel::bus::Bus;
use nrm_kernel::db;
use nrm_kernel::projection::ProjectionRunner;
use nrm_kernel::relay::{Relay, RelayConfig};
use nrm_kernel::seal::MasterKey;
use nrm_kernel::server::{self, Background, Listeners};
use nrm_kernel::settings::decode_key;
use nrm_kernel::store::EventStore;
use nrm_kernel::timers::TimerRunner;
use nrm_proto::shelter::v1::shelter_service_server::ShelterServiceServer;
use tokio_util::sync::CancellationToken;
use tonic::service::Routes;

use crate::app::{CONTEXT, PAYLOAD_TYPE, Shelters};
use crate::config::Settings;
use crate::domain::{self, parse};
use crate::grpc::ShelterGrpc;
use crate::projections::FreeCapacity;
use crate::reactions::{HoldExpiry, Placement, REFERRAL_CONTEXT};

/// Name of the gRPC service, as reported by health checks.
pub const SERVICE_NAME: &str = "nrm.shelter.v1.ShelterService";

/// The migrations of the shelter service's own tables.
pub static MIGRATIONS: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

/// A built, not yet running, shelter service.
pub struct Application {
    listeners: Listeners,
    app: Shelters,
    bus: Bus,
    auth: Authenticator,
    relay: Option<Relay>,
    free_capacity: ProjectionRunner<FreeCapacity>,
    placement: ProjectionRunner<Placement>,
    timers: TimerRunner<HoldExpiry>,
}

impl Application {
    /// Connects to PostgreSQL (creating and migrating the database) and NATS
    /// (creating the shelter stream, and the referral stream it reacts to
    /// when the referral service has not yet), and binds the listeners.
    ///
    /// # Errors
    /// When a setting is malformed, or the database, NATS or a port cannot be had.
    pub async fn build(settings: &Settings) -> Result<Self, anyhow::Error> {
        let master = MasterKey::new(
            decode_key("NRM_SEALING__MASTER_KEY", &settings.sealing.master_key).map_err(anyhow::Error::msg)?,
        );
        let hold_minutes = settings.shelter.hold_minutes_default;
        if !(1..=parse::MAX_HOLD_MINUTES).contains(&hold_minutes) {
            anyhow::bail!(
                "NRM_SHELTER__HOLD_MINUTES_DEFAULT must be 1-{}",
                parse::MAX_HOLD_MINUTES
            );
        }
        let auth = Authenticator::new(&settings.auth.jwt_secret, &settings.auth.issuer);
        let pool = db::connect_and_migrate(&settings.database, &MIGRATIONS)
            .await
            .context("preparing the database")?;
        let bus = Bus::connect(&settings.nats).await?;
        let stream = bus.ensure_stream(CONTEXT).await?;
        let referral_stream = bus.ensure_stream(REFERRAL_CONTEXT).await?;
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
        let app = Shelters::new(store.clone(), bus.clone(), master, hold_minutes);
        let free_capacity = ProjectionRunner::new(
            store.clone(),
            bus.clone(),
            stream,
            // Shelter streams only: placement streams change no capacity.
            bus.subject(CONTEXT, domain::NAME, ">"),
            FreeCapacity,
        );
        let placement = ProjectionRunner::new(
            store.clone(),
            bus.clone(),
            referral_stream,
            bus.context_subjects(REFERRAL_CONTEXT),
            Placement::new(app.clone()),
        );
        let timers = TimerRunner::new(
            store,
            HoldExpiry::new(app.clone()),
            Duration::from_millis(settings.shelter.timer_poll_ms.max(10)),
        );
        let listeners = Listeners::bind(&settings.server).await?;
        Ok(Self {
            listeners,
            app,
            bus,
            auth,
            relay,
            free_capacity,
            placement,
            timers,
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

    /// The free-capacity projection (tests rebuild it).
    #[must_use]
    pub fn free_capacity(&self) -> &ProjectionRunner<FreeCapacity> {
        &self.free_capacity
    }

    /// Serves until `shutdown` is cancelled, then stops the relay, the
    /// projections and the timers and lets calls in flight finish.
    ///
    /// # Errors
    /// When the gRPC server fails.
    pub async fn run_until_stopped(self, shutdown: CancellationToken) -> Result<(), anyhow::Error> {
        let mut background = Background::new();
        background.spawn_relay(self.relay);
        background.spawn(|stop| self.free_capacity.run(stop));
        background.spawn(|stop| self.placement.run(stop));
        background.spawn(|stop| self.timers.run(stop));
        let pool = self.app.store().pool().clone();
        let routes = Routes::new(ShelterServiceServer::new(ShelterGrpc::new(self.app, self.auth)));
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
