//! Building and running the service: the same code runs in `main` and in
//! the tests (on port 0). What every service does at start is the kernel's
//! ([`nrm_kernel::service`]); this names what repatriation owns: its
//! stream and tables, the list read model, the crossing streams of every
//! partner and the reaction to what each one sends.

use std::time::Duration;

use nrm_kernel::bus::{Bus, BusError, version_at_least};
use nrm_kernel::projection::Source;
use nrm_kernel::retry::RetryPolicy;
use nrm_kernel::seal::MasterKey;
use nrm_kernel::service::{Kit, Service, ServiceSpec};
use nrm_kernel::settings::decode_key;
use nrm_kernel::xborder::{CountryCode, Federation};
use nrm_proto::repatriation::v1::repatriation_service_server::RepatriationServiceServer;
use tokio_util::sync::CancellationToken;
use tonic::service::Routes;

use crate::app::crossing::CROSSING_STREAM;
use crate::app::{CONTEXT, PAYLOAD_TYPE, Returns};
use crate::config::Settings;
use crate::grpc::RepatriationGrpc;
use crate::projections::ReturnList;
use crate::reactions::Inbound;

/// Name of the gRPC service, as reported by health checks.
pub const SERVICE_NAME: &str = "nrm.repatriation.v1.RepatriationService";

/// The migrations of the repatriation service's own tables.
pub static MIGRATIONS: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

/// What the kernel needs to know of the service.
pub const SPEC: ServiceSpec = ServiceSpec {
    grpc_service: SERVICE_NAME,
    context: CONTEXT,
    payload_type: PAYLOAD_TYPE,
    // The crossing commits (`xborder-{to}-{id}`) hold CrossBorderMessages.
    stream_payloads: &[(CROSSING_STREAM, nrm_kernel::xborder::OUTBOUND_PAYLOAD_TYPE)],
    migrations: &MIGRATIONS,
    publishes: true,
};

/// A built, not yet running, repatriation service.
pub struct Application {
    kit: Kit,
    app: Returns,
}

impl Application {
    /// Reads the keys and partners, connects to PostgreSQL (creating and
    /// migrating the database) and NATS (in the background when it is
    /// down), and binds the listeners. The service projects its list from
    /// its own stream; for every partner it creates the outgoing and the
    /// incoming stream (in the background, until NATS takes them) and
    /// applies what comes in on the latter.
    ///
    /// # Errors
    /// When a setting or key file is malformed, or the database or a port
    /// cannot be had.
    pub async fn build(settings: &Settings) -> Result<Self, anyhow::Error> {
        let master = MasterKey::new(
            decode_key("NRM_SEALING__MASTER_KEY", &settings.sealing.master_key).map_err(anyhow::Error::msg)?,
        );
        let federation = settings.xborder.load()?;
        let mut kit = Kit::build(SPEC, settings).await?;
        let app = Returns::new(kit.store().clone(), kit.bus().clone(), master, federation.clone());
        kit.project(CONTEXT, ReturnList);
        let bus = kit.bus().clone();
        for (partner, _) in &federation.partners {
            kit.project_source(
                Source::inbound(&bus, partner),
                Inbound::new(app.clone(), partner.clone()),
            );
        }
        let retry = settings.retry;
        kit.spawn(move |stop| crossing_streams(bus, federation, retry, stop));
        Ok(Self { kit, app })
    }

    /// The application (tests reach it directly).
    #[must_use]
    pub fn app(&self) -> &Returns {
        &self.app
    }
}

/// Creates, for every partner, the outgoing stream (what this country sends
/// it) and the incoming stream (what it sends here), retrying while NATS is
/// unreachable; a stream that exists with another configuration is
/// reported and left alone (an operator settles it).
async fn crossing_streams(bus: Bus, federation: Federation, retry: RetryPolicy, stop: CancellationToken) {
    let here = federation.country.clone();
    let mut pending: Vec<(CountryCode, bool)> = federation
        .partners
        .iter()
        .flat_map(|(partner, _)| [(partner.clone(), true), (partner.clone(), false)])
        .collect();
    let mut failures = 0;
    while !pending.is_empty() {
        let mut left = Vec::new();
        for (partner, outbound) in pending {
            let created = if outbound {
                bus.ensure_outbound_stream(&partner).await
            } else {
                bus.ensure_inbound_stream(&partner, &here).await
            };
            let which = if outbound { "outgoing" } else { "incoming" };
            match created {
                Ok(_) => {
                    tracing::info!(partner = %partner, stream = which, "crossing stream ready");
                    // Before 2.14 (2.12.7, 2.11.16) a hub does not check what a
                    // leaf sends against the link user's permissions: a
                    // partner that runs a modified server gets past them
                    // (deploy/federation/README.md).
                    if outbound && !version_at_least(&bus.server_version(), 2, 14) {
                        tracing::warn!(
                            partner = %partner,
                            server_version = %bus.server_version(),
                            "this NATS server does not enforce the link's permissions on what the partner's server sends; run the hub on 2.14 or later in production"
                        );
                    }
                }
                Err(e @ BusError::ConfigMismatch { .. }) => {
                    tracing::error!(partner = %partner, stream = which, error = %e, "a crossing stream exists with another configuration; left as it is");
                }
                Err(e) => {
                    tracing::warn!(partner = %partner, stream = which, error = %e, "crossing stream not created yet; retrying");
                    left.push((partner, outbound));
                }
            }
        }
        pending = left;
        if pending.is_empty() {
            return;
        }
        failures += 1;
        let pause = retry.delay(failures).min(Duration::from_secs(30));
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep(pause) => {}
        }
    }
}

impl Service for Application {
    fn kit(&self) -> &Kit {
        &self.kit
    }

    async fn run_until_stopped(self, shutdown: CancellationToken) -> Result<(), anyhow::Error> {
        let routes = Routes::new(RepatriationServiceServer::new(RepatriationGrpc::new(self.app)));
        self.kit.serve(routes, shutdown).await
    }
}
