//! Building and running the service: the same code runs in `main` and in
//! the tests (on port 0). What every service does at start is the kernel's
//! ([`nrm_kernel::service`]); this names what casepath owns: its tables,
//! one projection per context stream, and its query service. It publishes
//! nothing, so it runs no relay and has no stream.

use nrm_kernel::service::{Kit, Service, ServiceSpec};
use nrm_kernel::xborder::CountryCode;
use nrm_proto::casepath::v1::casepath_service_server::CasepathServiceServer;
use tokio_util::sync::CancellationToken;
use tonic::service::Routes;

use crate::app::Casepath;
use crate::config::Settings;
use crate::grpc::CasepathGrpc;

/// Name of the gRPC service, as reported by health checks.
pub const SERVICE_NAME: &str = "nrm.casepath.v1.CasepathService";

/// The migrations of casepath's own tables.
pub static MIGRATIONS: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

/// What the kernel needs to know of the service.
pub const SPEC: ServiceSpec = ServiceSpec {
    grpc_service: SERVICE_NAME,
    context: "casepath",
    payload_type: "",
    stream_payloads: &[],
    migrations: &MIGRATIONS,
    publishes: false,
};

/// A built, not yet running, casepath service.
pub struct Application {
    kit: Kit,
    app: Casepath,
}

impl Application {
    /// Connects to PostgreSQL (creating and migrating the database) and
    /// NATS (in the background when it is down), binds the listeners, and
    /// prepares the projections of every context's stream and the queries.
    ///
    /// # Errors
    /// When a setting or the calendar is malformed, or the database or a
    /// port cannot be had.
    pub async fn build(settings: &Settings) -> Result<Self, anyhow::Error> {
        let country = CountryCode::parse("NRM_XBORDER__COUNTRY", &settings.xborder.country)
            .map_err(|v| anyhow::anyhow!("NRM_XBORDER__COUNTRY: {}", v.description))?;
        let mut kit = Kit::build(SPEC, settings).await?;
        let watch_key = crate::app::watch::load_key(kit.pool()).await?;
        crate::projections::register(&mut kit, &country, &watch_key);
        let app = Casepath::build(&mut kit, &settings.casepath, &country, watch_key)?;
        Ok(Self { kit, app })
    }

    /// The application (tests reach it directly).
    #[must_use]
    pub fn app(&self) -> &Casepath {
        &self.app
    }
}

impl Service for Application {
    fn kit(&self) -> &Kit {
        &self.kit
    }

    async fn run_until_stopped(self, shutdown: CancellationToken) -> Result<(), anyhow::Error> {
        // Open watches end when the service is asked to stop, so that the
        // server, which waits for its connections, is not held open by them.
        // Nothing outlives the server: when it fails before a stop was
        // asked, the watches end too.
        let closing = self.app.closing();
        let routes = Routes::new(CasepathServiceServer::new(CasepathGrpc::new(self.app)));
        let serving = self.kit.serve(routes, shutdown.clone());
        tokio::pin!(serving);
        tokio::select! {
            served = &mut serving => {
                closing.cancel();
                return served;
            }
            () = shutdown.cancelled() => closing.cancel(),
        }
        serving.await
    }
}
