//! What every service's gRPC server shares: Prometheus metrics on their own
//! port, gRPC health that says `SERVING` only while the store and the bus
//! answer, reflection for `grpcurl`, background tasks stopped together, and
//! shutdown on SIGTERM or Ctrl-C. [`serve`] runs a service with all of it.

use std::net::SocketAddr;
use std::sync::OnceLock;
use std::time::Duration;

use anyhow::Context as _;
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use sqlx::PgPool;
use tokio::net::TcpListener;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tonic::service::Routes;
use tonic_health::ServingStatus;
use tonic_health::server::HealthReporter;

use crate::bus::Bus;
use crate::relay::Relay;
use crate::settings::ServerSettings;
use crate::telemetry;

/// How long background tasks get to stop after the gRPC server stopped.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(10);

static METRICS: OnceLock<PrometheusHandle> = OnceLock::new();

/// The process-wide Prometheus recorder (installed on first use).
pub fn metrics_handle() -> PrometheusHandle {
    METRICS
        .get_or_init(|| {
            let recorder = PrometheusBuilder::new()
                .set_buckets(&[
                    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                ])
                .map(PrometheusBuilder::build_recorder)
                .unwrap_or_else(|_| PrometheusBuilder::new().build_recorder());
            let handle = recorder.handle();
            if metrics::set_global_recorder(recorder).is_err() {
                tracing::warn!("a metrics recorder was already installed");
            }
            handle
        })
        .clone()
}

/// Serves `GET /metrics` on `listener` until `shutdown`.
pub async fn serve_metrics(listener: TcpListener, shutdown: CancellationToken) {
    let handle = metrics_handle();
    let app = axum::Router::new().route(
        "/metrics",
        axum::routing::get(move || {
            let handle = handle.clone();
            async move { handle.render() }
        }),
    );
    if let Err(err) = axum::serve(listener, app)
        .with_graceful_shutdown(async move { shutdown.cancelled().await })
        .await
    {
        tracing::error!(error = %err, "metrics endpoint failed");
    }
}

/// Binds a TCP listener.
///
/// # Errors
/// When the address is taken or not allowed.
pub async fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    TcpListener::bind(addr).await
}

/// Reflection services (v1 and v1alpha, for older `grpcurl`) over every Köpür proto.
///
/// # Panics
/// Never with the descriptor set built into `nrm-proto`.
#[must_use]
#[allow(clippy::type_complexity)]
pub fn reflection() -> (
    tonic_reflection::server::v1::ServerReflectionServer<impl tonic_reflection::server::v1::ServerReflection>,
    tonic_reflection::server::v1alpha::ServerReflectionServer<impl tonic_reflection::server::v1alpha::ServerReflection>,
) {
    let v1 = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(nrm_proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()
        .unwrap_or_else(|e| unreachable!("descriptor set is built in: {e}"));
    let v1alpha = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(nrm_proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1alpha()
        .unwrap_or_else(|e| unreachable!("descriptor set is built in: {e}"));
    (v1, v1alpha)
}

/// Keeps `service`'s health (and the server's overall health, `""`) at
/// `SERVING` while PostgreSQL and NATS answer, `NOT_SERVING` otherwise.
pub async fn watch_health(
    reporter: HealthReporter,
    service: &'static str,
    pool: PgPool,
    bus: Bus,
    shutdown: CancellationToken,
) {
    let mut last = None;
    loop {
        let db_ok = tokio::time::timeout(Duration::from_secs(2), sqlx::query("SELECT 1").execute(&pool))
            .await
            .is_ok_and(|r| r.is_ok());
        let status = if db_ok && bus.is_connected() {
            ServingStatus::Serving
        } else {
            ServingStatus::NotServing
        };
        if last != Some(status) {
            tracing::info!(
                database = db_ok,
                nats = bus.is_connected(),
                serving = status == ServingStatus::Serving,
                "health changed"
            );
            reporter.set_service_status(service, status).await;
            reporter.set_service_status("", status).await;
            last = Some(status);
        }
        tokio::select! {
            () = shutdown.cancelled() => {
                reporter.set_service_status(service, ServingStatus::NotServing).await;
                reporter.set_service_status("", ServingStatus::NotServing).await;
                return;
            }
            () = tokio::time::sleep(Duration::from_secs(2)) => {}
        }
    }
}

/// Resolves on SIGTERM or Ctrl-C.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {}
        () = term => {}
    }
    tracing::info!("shutdown requested");
}

/// The two listeners of a service: gRPC and `/metrics`.
#[derive(Debug)]
pub struct Listeners {
    grpc: TcpListener,
    metrics: TcpListener,
}

impl Listeners {
    /// Binds the gRPC and the metrics address of `settings`.
    ///
    /// # Errors
    /// When an address is taken or not allowed; the error names it.
    pub async fn bind(settings: &ServerSettings) -> Result<Self, anyhow::Error> {
        let grpc = bind(settings.grpc_addr)
            .await
            .with_context(|| format!("binding gRPC to {}", settings.grpc_addr))?;
        let metrics = bind(settings.metrics_addr)
            .await
            .with_context(|| format!("binding metrics to {}", settings.metrics_addr))?;
        Ok(Self { grpc, metrics })
    }

    /// Where gRPC listens.
    ///
    /// # Errors
    /// When the socket has no address.
    pub fn grpc_addr(&self) -> std::io::Result<SocketAddr> {
        self.grpc.local_addr()
    }

    /// Where `/metrics` listens.
    ///
    /// # Errors
    /// When the socket has no address.
    pub fn metrics_addr(&self) -> std::io::Result<SocketAddr> {
        self.metrics.local_addr()
    }
}

/// A service's background tasks (relay, projections, reactions, timers):
/// each gets the same stop token, cancelled when the gRPC server has stopped.
#[derive(Debug, Default)]
pub struct Background {
    stop: CancellationToken,
    tasks: JoinSet<()>,
}

impl Background {
    /// No tasks yet.
    #[must_use]
    pub fn new() -> Self {
        Self::default()
    }

    /// Spawns the task `run` makes of the stop token.
    pub fn spawn<F>(&mut self, run: impl FnOnce(CancellationToken) -> F)
    where
        F: Future<Output = ()> + Send + 'static,
    {
        self.tasks.spawn(run(self.stop.clone()));
    }

    /// Spawns the relay; without one (`NRM_RELAY__ENABLED=false`) warns that
    /// events stay in the outbox.
    pub fn spawn_relay(&mut self, relay: Option<Relay>) {
        match relay {
            Some(relay) => self.spawn(|stop| relay.run(stop)),
            None => tracing::warn!("relay disabled (NRM_RELAY__ENABLED=false): events stay in the outbox"),
        }
    }

    /// Cancels the stop token and waits up to [`DRAIN_TIMEOUT`] for every task to end.
    async fn stop(mut self) {
        self.stop.cancel();
        let drained =
            tokio::time::timeout(DRAIN_TIMEOUT, async { while self.tasks.join_next().await.is_some() {} }).await;
        if drained.is_err() {
            tracing::warn!("background tasks did not stop within 10 s");
        }
    }
}

/// Serves `routes` (the service's own gRPC services) on `listeners` beside
/// health (of `service_name`, watched on `pool` and `bus`), reflection and
/// `/metrics`, with `background` running, until `shutdown` is cancelled; then
/// lets calls in flight finish and stops the background tasks.
///
/// # Errors
/// When the gRPC server fails.
pub async fn serve(
    listeners: Listeners,
    service_name: &'static str,
    routes: Routes,
    pool: PgPool,
    bus: Bus,
    mut background: Background,
    shutdown: CancellationToken,
) -> Result<(), anyhow::Error> {
    let (health, health_service) = tonic_health::server::health_reporter();
    let (reflection_v1, reflection_v1alpha) = reflection();
    background.spawn(|stop| watch_health(health, service_name, pool, bus, stop));
    background.spawn(|stop| serve_metrics(listeners.metrics, stop));
    let result = tonic::transport::Server::builder()
        .trace_fn(telemetry::grpc_span)
        .add_routes(routes)
        .add_service(health_service)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .serve_with_incoming_shutdown(
            tonic::transport::server::TcpIncoming::from(listeners.grpc).with_nodelay(Some(true)),
            shutdown.cancelled_owned(),
        )
        .await;
    background.stop().await;
    tracing::info!("stopped");
    result.map_err(Into::into)
}
