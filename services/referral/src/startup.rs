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
use nrm_kernel::server::{self, Background, Listeners};
use nrm_kernel::store::EventStore;
use nrm_kernel::timers::TimerRunner;
use nrm_proto::referral::v1::referral_service_server::ReferralServiceServer;
use tokio_util::sync::CancellationToken;
use tonic::service::Routes;

use crate::app::{CONTEXT, PAYLOAD_TYPE, Policy, Referrals};
use crate::config::Settings;
use crate::domain::referral::{self, Deadlines};
use crate::grpc::ReferralGrpc;
use crate::projections::{Inbox, Persons};
use crate::reactions::{AnswerDue, ShelterAnswers};

/// Name of the gRPC service, as reported by health checks.
pub const SERVICE_NAME: &str = "nrm.referral.v1.ReferralService";

/// The migrations of the referral service's own tables.
pub static MIGRATIONS: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

/// A built, not yet running, referral service.
pub struct Application {
    listeners: Listeners,
    app: Referrals,
    bus: Bus,
    auth: Authenticator,
    relay: Option<Relay>,
    persons: ProjectionRunner<Persons>,
    inbox: ProjectionRunner<Inbox>,
    shelter_answers: ProjectionRunner<ShelterAnswers>,
    timers: TimerRunner<AnswerDue>,
}

impl Application {
    /// Connects to PostgreSQL (creating and migrating the database) and NATS
    /// (creating the referral stream, and finding or creating the
    /// identification and shelter streams it reads), and binds the listeners.
    ///
    /// # Errors
    /// When the database, NATS or a port cannot be had.
    pub async fn build(settings: &Settings) -> Result<Self, anyhow::Error> {
        let auth = Authenticator::new(&settings.auth.jwt_secret, &settings.auth.issuer);
        let pool = db::connect_and_migrate(&settings.database, &MIGRATIONS)
            .await
            .context("preparing the database")?;
        let bus = Bus::connect(&settings.nats).await?;
        let stream = bus.ensure_stream(CONTEXT).await?;
        let identification = bus.ensure_stream("identification").await?;
        let shelter = bus.ensure_stream("shelter").await?;
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
        let policy = Policy {
            deadlines: Deadlines {
                urgent_seconds: settings.referral.urgent_deadline_seconds,
                normal_seconds: settings.referral.normal_deadline_seconds,
            },
            allow_not_identified: settings.referral.allow_not_identified,
        };
        let app = Referrals::new(store.clone(), bus.clone(), policy);
        let persons = ProjectionRunner::new(
            store.clone(),
            bus.clone(),
            identification,
            bus.context_subjects("identification"),
            Persons,
        );
        let inbox = ProjectionRunner::new(
            store.clone(),
            bus.clone(),
            stream,
            bus.subject(CONTEXT, referral::NAME, "*"),
            Inbox,
        );
        let shelter_answers = ProjectionRunner::new(
            store.clone(),
            bus.clone(),
            shelter,
            bus.context_subjects("shelter"),
            ShelterAnswers::new(app.clone()),
        );
        let timers = TimerRunner::new(
            store,
            AnswerDue::new(app.clone()),
            Duration::from_millis(settings.referral.timer_poll_ms.max(10)),
        );
        let listeners = Listeners::bind(&settings.server).await?;
        Ok(Self {
            listeners,
            app,
            bus,
            auth,
            relay,
            persons,
            inbox,
            shelter_answers,
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

    /// The application (tests drive reactions through it).
    #[must_use]
    pub fn app(&self) -> &Referrals {
        &self.app
    }

    /// Serves until `shutdown` is cancelled, then stops the relay, the
    /// projections, the reaction and the timers, and lets calls in flight finish.
    ///
    /// # Errors
    /// When the gRPC server fails.
    pub async fn run_until_stopped(self, shutdown: CancellationToken) -> Result<(), anyhow::Error> {
        let mut background = Background::new();
        background.spawn_relay(self.relay);
        background.spawn(|stop| self.persons.run(stop));
        background.spawn(|stop| self.inbox.run(stop));
        background.spawn(|stop| self.shelter_answers.run(stop));
        background.spawn(|stop| self.timers.run(stop));
        let pool = self.app.store().pool().clone();
        let routes = Routes::new(ReferralServiceServer::new(ReferralGrpc::new(self.app, self.auth)));
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
