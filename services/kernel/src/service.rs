//! How every service starts, once: the settings they all read, the
//! database, store, bus, token verification and listeners they all build,
//! the background tasks (relay, projections, reactions, timers), and the
//! gRPC server with health, reflection, the operator's and the auditor's
//! services and
//! `/metrics`. A service differs only in what it owns: its migrations, its
//! stream, its projections and timers, its gRPC service.
//!
//! A binary's `main` is one call to [`main`]; a service's `startup` builds a
//! [`Kit`], adds its runners and serves its routes with [`Kit::serve`]. Tests
//! start the very same thing on port 0.
//!
//! The service starts while NATS is down: the bus connects in the
//! background, streams are created when it is reachable, commands are taken
//! meanwhile and their events wait in the outbox.

use std::fmt::Debug;
use std::future::Future;
use std::net::SocketAddr;
use std::ops::{Deref, DerefMut};
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use serde::Deserialize;
use serde::de::DeserializeOwned;
use sqlx::PgPool;
use sqlx::migrate::Migrator;
use tokio_util::sync::CancellationToken;
use tonic::service::Routes;

use crate::auditor::AuditGrpc;
use crate::auth::Authenticator;
use crate::bus::Bus;
use crate::db;
use crate::gate::{Admission, Gate};
use crate::operator::{OperatorGrpc, ReadModels};
use crate::projection::{Projection, ProjectionRunner, Rebuildable, Source};
use crate::relay::{Relay, RelayConfig};
use crate::retry::RetryPolicy;
use crate::server::{self, AUDIT_SERVICE, Background, HEALTH_SERVICE, Listeners, OPERATOR_SERVICE};
use crate::settings::{AuthSettings, DatabaseSettings, NatsSettings, RelaySettings, ServerSettings, TelemetrySettings};
use crate::store::EventStore;
use crate::telemetry;
use crate::timers::{TimerHandler, TimerRunner};
use nrm_proto::common::v1::audit_service_server::AuditServiceServer;
use nrm_proto::common::v1::operator_service_server::OperatorServiceServer;

/// The settings every service reads, flattened into each service's own
/// `Settings` (which dereferences to them).
#[derive(Debug, Clone, Deserialize)]
pub struct CommonSettings {
    /// Listening addresses (`NRM_GRPC_ADDR`, `NRM_METRICS_ADDR`).
    #[serde(flatten)]
    pub server: ServerSettings,
    /// The service's own database (`NRM_DATABASE__*`; the name defaults to the service's).
    #[serde(default)]
    pub database: DatabaseSettings,
    /// NATS (`NRM_NATS__*`).
    #[serde(default)]
    pub nats: NatsSettings,
    /// The outbox relay (`NRM_RELAY__*`).
    #[serde(default)]
    pub relay: RelaySettings,
    /// Back-off and attempts of background work before an item is parked (`NRM_RETRY__*`).
    #[serde(default)]
    pub retry: RetryPolicy,
    /// Token verification (`NRM_AUTH__*`).
    pub auth: AuthSettings,
    /// Logs (`NRM_TELEMETRY__*`).
    #[serde(default)]
    pub telemetry: TelemetrySettings,
}

/// A service's own settings: the common ones and what the service adds.
pub trait ServiceSettings: Debug + DeserializeOwned + Deref<Target = CommonSettings> + DerefMut + Send + Sync {
    /// The service's name: its database's default name, its logs' service name.
    const NAME: &'static str;

    /// Reads the settings from `NRM_*` environment variables.
    ///
    /// # Errors
    /// Names the missing or malformed variable.
    fn from_env() -> Result<Self, Box<figment::Error>> {
        let mut settings: Self = crate::settings::from_env()?;
        if settings.database.name.is_empty() {
            Self::NAME.clone_into(&mut settings.database.name);
        }
        Ok(settings)
    }
}

/// Makes a service's `Settings` (a struct with `#[serde(flatten)] common:
/// CommonSettings`) dereference to the common settings and read itself from
/// the environment, its database named `$name` unless set.
#[macro_export]
macro_rules! service_settings {
    ($settings:ty, $name:literal) => {
        impl ::std::ops::Deref for $settings {
            type Target = $crate::service::CommonSettings;

            fn deref(&self) -> &Self::Target {
                &self.common
            }
        }

        impl ::std::ops::DerefMut for $settings {
            fn deref_mut(&mut self) -> &mut Self::Target {
                &mut self.common
            }
        }

        impl $crate::service::ServiceSettings for $settings {
            const NAME: &'static str = $name;
        }
    };
}

/// What a service is, to the kernel.
#[derive(Debug, Clone, Copy)]
pub struct ServiceSpec {
    /// Full name of the service's gRPC service, for health and reflection.
    pub grpc_service: &'static str,
    /// The bounded context: the service's stream and subjects.
    pub context: &'static str,
    /// Full protobuf name of the service's event message.
    pub payload_type: &'static str,
    /// Streams whose commits carry another payload type, by the start of
    /// their stream ID (see [`RelayConfig::stream_payloads`]); mostly empty.
    pub stream_payloads: &'static [(&'static str, &'static str)],
    /// The migrations of the service's own tables (the kernel's run first).
    pub migrations: &'static Migrator,
    /// Whether the service appends events of its own (and so runs the
    /// outbox relay into its stream). casepath only reads others' streams.
    pub publishes: bool,
}

type Task = Box<dyn FnOnce(CancellationToken) -> Pin<Box<dyn Future<Output = ()> + Send>> + Send>;

/// A service being assembled: what every service has, and the background
/// tasks it will run.
pub struct Kit {
    spec: ServiceSpec,
    store: EventStore,
    bus: Bus,
    auth: Authenticator,
    retry: RetryPolicy,
    listeners: Listeners,
    admission: Admission,
    tasks: Vec<Task>,
    read_models: Vec<Arc<dyn Rebuildable>>,
}

impl Kit {
    /// Creates and migrates the service's database, connects to NATS (in the
    /// background when it is down), binds the listeners and prepares the relay.
    ///
    /// # Errors
    /// When `NRM_MAX_CALLS_IN_FLIGHT` is 0, the database cannot be had or
    /// migrated, or a port is taken.
    pub async fn build(spec: ServiceSpec, settings: &CommonSettings) -> Result<Self, anyhow::Error> {
        // Calls beyond what the pool can serve wait their turn at the gate,
        // not in the pool, where they would all time out together.
        let admission = Admission::new(
            settings
                .server
                .calls_in_flight(settings.database.max_connections)
                .map_err(anyhow::Error::msg)?,
            Duration::from_millis(settings.server.call_queue_ms),
        );
        tracing::info!(
            calls_in_flight = admission.limit(),
            call_queue_ms = settings.server.call_queue_ms,
            "calls beyond the limit wait their turn, then are refused UNAVAILABLE (OVERLOADED)"
        );
        let pool = db::connect_and_migrate(&settings.database, spec.migrations)
            .await
            .context("preparing the database")?;
        let bus = Bus::connect(&settings.nats).await?;
        let store = EventStore::new(pool);
        let listeners = Listeners::bind(&settings.server).await?;
        let auth = Authenticator::new(&settings.auth)
            .await
            .context("loading the token keys (NRM_AUTH__JWKS)")?;
        let mut kit = Self {
            spec,
            auth: auth.clone(),
            retry: settings.retry,
            store,
            bus,
            listeners,
            admission,
            tasks: Vec::new(),
            read_models: Vec::new(),
        };
        kit.spawn(|stop| auth.run_refresh(stop));
        if settings.relay.fault_abort_after_ack > 0.0 {
            tracing::warn!(
                probability = settings.relay.fault_abort_after_ack,
                "NRM_RELAY__FAULT_ABORT_AFTER_ACK is set: the relay aborts the process at random (fault injection, for the fault suite only)"
            );
        }
        if !spec.publishes {
            // Nothing of its own to publish: no relay, no stream.
        } else if settings.relay.enabled {
            let relay = Relay::new(
                kit.store.pool().clone(),
                kit.bus.clone(),
                spec.context,
                kit.store.appended_signal(),
                RelayConfig {
                    retry: settings.retry,
                    fault_abort_after_ack: settings.relay.fault_abort_after_ack,
                    stream_payloads: spec.stream_payloads,
                    ..RelayConfig::new(spec.payload_type)
                },
            );
            kit.spawn(|stop| relay.run(stop));
        } else {
            tracing::warn!("relay disabled (NRM_RELAY__ENABLED=false): events stay in the outbox");
        }
        Ok(kit)
    }

    /// The event store.
    #[must_use]
    pub fn store(&self) -> &EventStore {
        &self.store
    }

    /// The database pool.
    #[must_use]
    pub fn pool(&self) -> &PgPool {
        self.store.pool()
    }

    /// The bus.
    #[must_use]
    pub fn bus(&self) -> &Bus {
        &self.bus
    }

    /// Token verification.
    #[must_use]
    pub fn auth(&self) -> &Authenticator {
        &self.auth
    }

    /// A runner of `projection` on the stream of `context`, with the
    /// service's retry policy; not yet running.
    pub fn runner<P: Projection>(&self, context: &'static str, projection: P) -> ProjectionRunner<P> {
        ProjectionRunner::new(self.store.clone(), self.bus.clone(), context, projection).with_retry(self.retry)
    }

    /// Runs `projection` on the stream of `context` while the service runs;
    /// a read model is also registered for the operator's rebuild
    /// (`RebuildReadModels`).
    pub fn project<P: Projection>(&mut self, context: &'static str, projection: P) {
        let runner = self.runner(context, projection);
        self.run_registered(runner);
    }

    /// A runner of `projection` on `source`, with the service's retry
    /// policy; not yet running.
    pub fn source_runner<P: Projection>(&self, source: Source, projection: P) -> ProjectionRunner<P> {
        ProjectionRunner::on_source(self.store.clone(), self.bus.clone(), source, projection).with_retry(self.retry)
    }

    /// Runs `projection` on `source` (any stream, for example
    /// [`Source::inbound`] of a partner country) while the service runs;
    /// a read model is also registered, as by [`Kit::project`].
    pub fn project_source<P: Projection>(&mut self, source: Source, projection: P) {
        let runner = self.source_runner(source, projection);
        self.run_registered(runner);
    }

    /// Runs `runner` while the service runs and, when its projection is a
    /// read model, registers it (the same runner) for the operator.
    fn run_registered<P: Projection>(&mut self, runner: ProjectionRunner<P>) {
        let runner = Arc::new(runner);
        if P::READ_MODEL {
            self.read_models.push(runner.clone());
        }
        self.spawn(move |stop| async move { runner.run_shared(stop).await });
    }

    /// The read models registered so far, by [`Kit::project`] and
    /// [`Kit::project_source`], in the order they were.
    #[must_use]
    pub fn read_models(&self) -> ReadModels {
        ReadModels::new(self.read_models.clone())
    }

    /// Fires `handler`'s timers, looking every `poll_interval`, while the service runs.
    pub fn fire_timers<H: TimerHandler>(&mut self, handler: H, poll_interval: Duration) {
        let runner = TimerRunner::new(self.store.clone(), handler, poll_interval).with_retry(self.retry);
        self.spawn(|stop| runner.run(stop));
    }

    /// Runs the task `run` makes of the stop token while the service runs.
    pub fn spawn<F>(&mut self, run: impl FnOnce(CancellationToken) -> F + Send + 'static)
    where
        F: Future<Output = ()> + Send + 'static,
    {
        self.tasks.push(Box::new(move |stop| Box::pin(run(stop))));
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

    /// Serves `routes` (the service's own gRPC service) beside health,
    /// reflection of what is served, the operator's and the auditor's
    /// services and `/metrics`,
    /// with the background tasks running, until `shutdown` is cancelled;
    /// then lets calls in flight finish and stops the tasks.
    ///
    /// # Errors
    /// When the gRPC server fails.
    pub async fn serve(self, routes: Routes, shutdown: CancellationToken) -> Result<(), anyhow::Error> {
        let mut background = Background::new();
        for task in self.tasks {
            background.spawn(task);
        }
        let operator = OperatorGrpc::new(self.store.pool().clone(), self.bus.clone(), self.spec.context)
            .publishing(self.spec.publishes)
            .with_read_models(ReadModels::new(self.read_models.clone()));
        let auditor = AuditGrpc::new(self.store.pool().clone(), self.spec.context);
        let gate = Gate::new(self.auth.clone(), self.store.pool().clone(), self.admission);
        let routes = routes
            .add_service(OperatorServiceServer::new(operator))
            .add_service(AuditServiceServer::new(auditor));
        server::serve(
            self.listeners,
            self.spec.grpc_service,
            &[self.spec.grpc_service, OPERATOR_SERVICE, AUDIT_SERVICE, HEALTH_SERVICE],
            routes,
            gate,
            self.store.pool().clone(),
            self.bus,
            background,
            shutdown,
        )
        .await
    }
}

/// A built service, ready to run.
pub trait Service: Sized + Send {
    /// Its kit (for the addresses it listens on).
    fn kit(&self) -> &Kit;

    /// Serves until `shutdown` is cancelled.
    fn run_until_stopped(self, shutdown: CancellationToken) -> impl Future<Output = Result<(), anyhow::Error>> + Send;
}

/// The whole of a service binary's `main`: settings from the environment,
/// telemetry, the effective configuration printed (without secrets), the
/// service built by `build`, served until SIGTERM or Ctrl-C.
///
/// # Errors
/// When the settings are malformed or the service cannot be built or served.
pub async fn main<S, A, F>(build: impl FnOnce(S) -> F) -> Result<(), anyhow::Error>
where
    S: ServiceSettings,
    A: Service,
    F: Future<Output = Result<A, anyhow::Error>>,
{
    let settings = S::from_env().map_err(|e| anyhow::anyhow!("configuration: {e}"))?;
    let _telemetry = telemetry::init(S::NAME, &settings.telemetry)?;
    tracing::info!(config = ?settings, "effective configuration");
    let service = build(settings).await?;
    tracing::info!(
        grpc = %service.kit().grpc_addr()?,
        metrics = %service.kit().metrics_addr()?,
        "{} service listening",
        S::NAME
    );
    let shutdown = CancellationToken::new();
    let trigger = shutdown.clone();
    tokio::spawn(async move {
        server::shutdown_signal().await;
        trigger.cancel();
    });
    service.run_until_stopped(shutdown).await
}
