//! Building and running the service: the same code runs in `main` and in
//! the tests (on port 0). What every service does at start is the kernel's
//! ([`nrm_kernel::service`]); this names what identification owns.

use nrm_kernel::projection::Source;
use nrm_kernel::seal::{MasterKey, MatchHasher};
use nrm_kernel::service::{Kit, Service, ServiceSpec};
use nrm_kernel::settings::decode_key;
use nrm_proto::identification::v1::identification_service_server::IdentificationServiceServer;
use tokio_util::sync::CancellationToken;
use tonic::service::Routes;

use crate::app::abroad::HomecomingRules;
use crate::app::{CONTEXT, Identification, PAYLOAD_TYPE};
use crate::config::Settings;
use crate::domain::parse;
use crate::grpc::IdentificationGrpc;
use crate::homecoming::Handovers;
use crate::projections::{CaseList, ReferralAccess};

/// Name of the gRPC service, as reported by health checks.
pub const SERVICE_NAME: &str = "nrm.identification.v1.IdentificationService";

/// The migrations of the identification service's own tables.
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

/// A built, not yet running, identification service.
pub struct Application {
    kit: Kit,
    app: Identification,
}

impl Application {
    /// Connects to PostgreSQL (creating and migrating the database) and NATS
    /// (in the background when it is down), and binds the listeners.
    ///
    /// # Errors
    /// When a key setting is malformed, or the database or a port cannot be had.
    pub async fn build(settings: &Settings) -> Result<Self, anyhow::Error> {
        let master = MasterKey::new(
            decode_key("NRM_SEALING__MASTER_KEY", &settings.sealing.master_key).map_err(anyhow::Error::msg)?,
        );
        let hasher = MatchHasher::new(
            decode_key("NRM_SEALING__MATCH_KEY", &settings.sealing.match_key).map_err(anyhow::Error::msg)?,
        );
        let authority = parse::agency(
            "NRM_IDENTIFICATION__HOMECOMING_AUTHORITY",
            &settings.identification.homecoming_authority,
        )
        .map_err(|v| anyhow::anyhow!("{}: {}", v.field, v.description))?;
        let federation = settings.xborder.load()?;
        let mut kit = Kit::build(SPEC, settings).await?;
        kit.project(CONTEXT, CaseList);
        // Consents and referrals arrive from the referral service's stream.
        kit.project("referral", ReferralAccess);
        let app = Identification::new(
            kit.store().clone(),
            kit.bus().clone(),
            (master, hasher),
            settings.identification.reflection_days,
            HomecomingRules {
                country: federation.country.as_str().to_owned(),
                competent_authority: authority,
                receivers: settings.identification.homecoming_receivers.clone(),
            },
        );
        // Returns handed over from each partner open cases here.
        match &federation.key {
            Some(key) => {
                for (partner, partner_key) in &federation.partners {
                    let source = Source::inbound(kit.bus(), partner);
                    let handovers = Handovers::new(
                        app.clone(),
                        key.clone(),
                        (partner.clone(), partner_key.clone()),
                        federation.country.clone(),
                    );
                    kit.project_source(source, handovers);
                }
            }
            None if !federation.partners.is_empty() => {
                tracing::warn!(
                    "no private key (NRM_XBORDER__PRIVATE_KEY_FILE): handovers from abroad open no case here"
                );
            }
            None => {}
        }
        Ok(Self { kit, app })
    }
}

impl Service for Application {
    fn kit(&self) -> &Kit {
        &self.kit
    }

    async fn run_until_stopped(self, shutdown: CancellationToken) -> Result<(), anyhow::Error> {
        let routes = Routes::new(IdentificationServiceServer::new(IdentificationGrpc::new(self.app)));
        self.kit.serve(routes, shutdown).await
    }
}
