//! Building and running the service: the same code runs in `main` and in
//! the tests (on port 0). What every service does at start is the kernel's
//! ([`nrm_kernel::service`]); this names what referral owns.

use std::time::Duration;

use nrm_kernel::service::{Kit, Service, ServiceSpec};
use nrm_proto::referral::v1::referral_service_server::ReferralServiceServer;
use tokio_util::sync::CancellationToken;
use tonic::service::Routes;

use crate::app::{CONTEXT, PAYLOAD_TYPE, Policy, Referrals};
use crate::config::Settings;
use crate::domain::parse;
use crate::domain::referral::Deadlines;
use crate::grpc::ReferralGrpc;
use crate::projections::{Inbox, Persons};
use crate::reactions::{AnswerDue, ConsentExpiry, Homecomings, ShelterAnswers};

/// Name of the gRPC service, as reported by health checks.
pub const SERVICE_NAME: &str = "nrm.referral.v1.ReferralService";

/// The migrations of the referral service's own tables.
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

/// A built, not yet running, referral service.
pub struct Application {
    kit: Kit,
    app: Referrals,
}

impl Application {
    /// Connects to PostgreSQL (creating and migrating the database) and NATS
    /// (in the background when it is down), and binds the listeners. The
    /// service reads its own stream (the inbox), identification's (persons,
    /// and the cases of persons handed over from abroad, whom it refers for
    /// reintegration) and shelter's (answers to shelter needs), and fires answer deadlines and
    /// consent expiries. Consents recorded before issue 9 are upgraded
    /// first ([`Referrals::upgrade_consents`]).
    ///
    /// # Errors
    /// When the database or a port cannot be had.
    pub async fn build(settings: &Settings) -> Result<Self, anyhow::Error> {
        let mut kit = Kit::build(SPEC, settings).await?;
        let policy = Policy {
            deadlines: Deadlines {
                urgent_seconds: settings.referral.urgent_deadline_seconds,
                normal_seconds: settings.referral.normal_deadline_seconds,
            },
            allow_not_identified: settings.referral.allow_not_identified,
            reintegration_agency: parse::agency(
                "NRM_REFERRAL__REINTEGRATION_AGENCY",
                &settings.referral.reintegration_agency,
            )
            .map_err(|v| anyhow::anyhow!("{}: {}", v.field, v.description))?,
        };
        let app = Referrals::new(kit.store().clone(), kit.bus().clone(), policy);
        // Once, before serving: consents recorded before their rows knew
        // the recording agency and the expiry get both, and their timers.
        app.upgrade_consents().await?;
        kit.project("identification", Persons);
        kit.project(CONTEXT, Inbox);
        kit.project("shelter", ShelterAnswers::new(app.clone()));
        // A person identified abroad and handed over here is referred for reintegration.
        kit.project("identification", Homecomings::new(app.clone()));
        kit.fire_timers(
            AnswerDue::new(app.clone()),
            Duration::from_millis(settings.referral.timer_poll_ms.max(10)),
        );
        kit.fire_timers(
            ConsentExpiry::new(app.clone()),
            Duration::from_millis(settings.referral.timer_poll_ms.max(10)),
        );
        Ok(Self { kit, app })
    }

    /// The application (tests drive reactions through it).
    #[must_use]
    pub fn app(&self) -> &Referrals {
        &self.app
    }
}

impl Service for Application {
    fn kit(&self) -> &Kit {
        &self.kit
    }

    async fn run_until_stopped(self, shutdown: CancellationToken) -> Result<(), anyhow::Error> {
        let routes = Routes::new(ReferralServiceServer::new(ReferralGrpc::new(self.app)));
        self.kit.serve(routes, shutdown).await
    }
}
