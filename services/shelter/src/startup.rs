//! Building and running the service: the same code runs in `main` and in
//! the tests (on port 0). What every service does at start is the kernel's
//! ([`nrm_kernel::service`]); this names what shelter owns.

use std::time::Duration;

use nrm_kernel::seal::MasterKey;
use nrm_kernel::service::{Kit, Service, ServiceSpec};
use nrm_kernel::settings::decode_key;
use nrm_proto::shelter::v1::shelter_service_server::ShelterServiceServer;
use tokio_util::sync::CancellationToken;
use tonic::service::Routes;

use crate::app::{CONTEXT, PAYLOAD_TYPE, Shelters};
use crate::config::{ReturnsSettings, Settings};
use crate::domain::parse;
use crate::grpc::ShelterGrpc;
use crate::projections::FreeCapacity;
use crate::reactions::{
    ArrivalPlacement, HoldExpiry, Placement, REFERRAL_CONTEXT, REPATRIATION_CONTEXT, ReferralsView,
};

/// Name of the gRPC service, as reported by health checks.
pub const SERVICE_NAME: &str = "nrm.shelter.v1.ShelterService";

/// The migrations of the shelter service's own tables.
pub static MIGRATIONS: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

/// What the kernel needs to know of the service.
pub const SPEC: ServiceSpec = ServiceSpec {
    grpc_service: SERVICE_NAME,
    context: CONTEXT,
    payload_type: PAYLOAD_TYPE,
    stream_payloads: &[],
    migrations: &MIGRATIONS,
    publishes: true,
};

/// A built, not yet running, shelter service.
pub struct Application {
    kit: Kit,
    app: Shelters,
}

impl Application {
    /// Connects to PostgreSQL (creating and migrating the database) and NATS
    /// (in the background when it is down), and binds the listeners. The
    /// service projects free capacity from its own stream, follows the
    /// referral stream (the referrals it may hold beds for; holding a bed for
    /// an accepted referral, releasing it when the referral ends), follows
    /// the repatriation stream where there is one (holding a bed for a
    /// return announced with a shelter need, releasing it when the return
    /// halts) and expires holds. `NRM_SHELTER__RETURNS_AGENCY` is read from
    /// the environment ([`ReturnsSettings::from_env`]).
    ///
    /// # Errors
    /// When a setting is malformed, or the database or a port cannot be had.
    pub async fn build(settings: &Settings) -> Result<Self, anyhow::Error> {
        let returns = ReturnsSettings::from_env()?;
        Self::build_with(settings, &returns).await
    }

    /// As [`build`](Self::build), with the returns settings given.
    ///
    /// # Errors
    /// When a setting is malformed, or the database or a port cannot be had.
    pub async fn build_with(settings: &Settings, returns: &ReturnsSettings) -> Result<Self, anyhow::Error> {
        let returns_agency = returns.agency()?.to_owned();
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
        let mut kit = Kit::build(SPEC, settings).await?;
        let app = Shelters::new(kit.store().clone(), kit.bus().clone(), master, hold_minutes);
        // Shelters from before the bed index: indexed from their events before anything is served.
        let indexed = app.index_shelters().await?;
        if indexed > 0 {
            tracing::info!(
                shelters = indexed,
                "free beds and open holds indexed from the shelters' events"
            );
        }
        kit.project(CONTEXT, FreeCapacity);
        // What the service knows of the referrals (read by HoldBed), on a
        // runner of its own: a new one replays the referral stream from its
        // first message, so referrals accepted before it was deployed count.
        kit.project(REFERRAL_CONTEXT, ReferralsView);
        kit.project(REFERRAL_CONTEXT, Placement::new(app.clone()));
        // Beds for people announced from abroad. A deployment without the
        // repatriation service has no such stream: the runner waits for it.
        kit.project(REPATRIATION_CONTEXT, ArrivalPlacement::new(app.clone(), returns_agency));
        kit.fire_timers(
            HoldExpiry::new(app.clone()),
            Duration::from_millis(settings.shelter.timer_poll_ms.max(10)),
        );
        Ok(Self { kit, app })
    }
}

impl Service for Application {
    fn kit(&self) -> &Kit {
        &self.kit
    }

    async fn run_until_stopped(self, shutdown: CancellationToken) -> Result<(), anyhow::Error> {
        let routes = Routes::new(ShelterServiceServer::new(ShelterGrpc::new(self.app)));
        self.kit.serve(routes, shutdown).await
    }
}
