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
use crate::gate::Gate;
use crate::settings::ServerSettings;
use crate::telemetry;

/// Streams one HTTP/2 connection may have open at once.
const MAX_STREAMS_PER_CONNECTION: u32 = 128;

/// How often an idle connection is pinged, and how long its client has to
/// answer before the connection is closed: a client gone without closing
/// it (a laptop asleep, a dropped mobile link) would otherwise hold its
/// streams (a watch and its turn) until its token expired.
const KEEPALIVE_INTERVAL: std::time::Duration = std::time::Duration::from_secs(30);
const KEEPALIVE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(20);

/// How long, from the moment a stop is asked, the gRPC server's
/// connections and the calls in flight get to end. A connection still open
/// then (a stream that never ends, a client that stopped reading and holds
/// the response in HTTP/2 flow control) is not waited for.
pub const DRAIN_TIMEOUT: Duration = Duration::from_secs(8);

/// How long the background tasks then get to end.
pub const BACKGROUND_TIMEOUT: Duration = Duration::from_secs(5);

/// The longest a stop takes, [`DRAIN_TIMEOUT`] and [`BACKGROUND_TIMEOUT`]:
/// well inside systemd's `TimeoutStopSec` (30 s, `deploy/systemd`) and the
/// tests' 15 s.
pub const STOP_LIMIT: Duration = DRAIN_TIMEOUT.saturating_add(BACKGROUND_TIMEOUT);

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

/// Name of the operator's service, which every service serves.
pub const OPERATOR_SERVICE: &str = "nrm.common.v1.OperatorService";
/// Name of the auditor's service, which every service serves.
pub const AUDIT_SERVICE: &str = "nrm.common.v1.AuditService";
/// Name of the gRPC health service.
pub const HEALTH_SERVICE: &str = "grpc.health.v1.Health";
/// Health entry of the service's database: `SERVING` while it answers.
pub const HEALTH_DATABASE: &str = "nrm.kernel.database";
/// Health entry of the bus: `SERVING` while NATS is connected. When it is
/// not, the service still takes commands; their events wait in the outbox.
pub const HEALTH_BUS: &str = "nrm.kernel.nats";

/// Reflection services (v1 and v1alpha, for older `grpcurl`) that list
/// exactly `services` (what the server serves, besides reflection itself) and
/// can describe every Köpür type and `google.rpc`'s error details, so that
/// `grpcurl` prints `BadRequest` field violations.
///
/// # Panics
/// Never with the descriptor sets built into `nrm-proto`, `tonic-health` and `tonic-types`.
#[must_use]
#[allow(clippy::type_complexity)]
pub fn reflection(
    services: &[&str],
) -> (
    tonic_reflection::server::v1::ServerReflectionServer<impl tonic_reflection::server::v1::ServerReflection>,
    tonic_reflection::server::v1alpha::ServerReflectionServer<impl tonic_reflection::server::v1alpha::ServerReflection>,
) {
    let builder = || {
        let mut builder = tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(nrm_proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_types::pb::FILE_DESCRIPTOR_SET);
        let reflection = [
            "grpc.reflection.v1.ServerReflection",
            "grpc.reflection.v1alpha.ServerReflection",
        ];
        for service in services.iter().chain(&reflection) {
            builder = builder.with_service_name(*service);
        }
        builder
    };
    let v1 = builder()
        .build_v1()
        .unwrap_or_else(|e| unreachable!("descriptor sets are built in: {e}"));
    let v1alpha = builder()
        .build_v1alpha()
        .unwrap_or_else(|e| unreachable!("descriptor sets are built in: {e}"));
    (v1, v1alpha)
}

/// Keeps the health of `service` (and the server's overall health, `""`) at
/// `SERVING` while PostgreSQL answers: the service takes commands then, also
/// while NATS is down. [`HEALTH_DATABASE`] and [`HEALTH_BUS`] say which of the
/// two is degraded; so do the gauge `nrm_dependency_up` and a log line at each change.
/// On `shutdown` every entry goes `NOT_SERVING` and is then removed, which
/// ends the health `Watch` streams (they would hold the stop open).
pub async fn watch_health(
    mut reporter: HealthReporter,
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
        let nats_ok = bus.is_connected();
        metrics::gauge!("nrm_dependency_up", "dependency" => "database").set(f64::from(u8::from(db_ok)));
        metrics::gauge!("nrm_dependency_up", "dependency" => "nats").set(f64::from(u8::from(nats_ok)));
        let status = |ok: bool| {
            if ok {
                ServingStatus::Serving
            } else {
                ServingStatus::NotServing
            }
        };
        if last != Some((db_ok, nats_ok)) {
            if db_ok && nats_ok {
                tracing::info!(database = db_ok, nats = nats_ok, "health: serving");
            } else {
                tracing::warn!(
                    database = db_ok,
                    nats = nats_ok,
                    "health: degraded{}{}",
                    if db_ok {
                        ""
                    } else {
                        "; the database does not answer: commands fail with UNAVAILABLE"
                    },
                    if nats_ok {
                        ""
                    } else {
                        "; NATS is unreachable: events wait in the outbox"
                    }
                );
            }
            reporter.set_service_status(service, status(db_ok)).await;
            reporter.set_service_status("", status(db_ok)).await;
            reporter.set_service_status(HEALTH_DATABASE, status(db_ok)).await;
            reporter.set_service_status(HEALTH_BUS, status(nats_ok)).await;
            last = Some((db_ok, nats_ok));
        }
        tokio::select! {
            () = shutdown.cancelled() => {
                for name in [service, "", HEALTH_DATABASE, HEALTH_BUS] {
                    reporter.set_service_status(name, ServingStatus::NotServing).await;
                }
                for name in [service, "", HEALTH_DATABASE, HEALTH_BUS] {
                    reporter.clear_service_status(name).await;
                }
                return;
            }
            () = tokio::time::sleep(Duration::from_secs(1)) => {}
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

    /// Cancels the stop token and waits up to [`BACKGROUND_TIMEOUT`] for every task to end.
    async fn stop(mut self) {
        self.stop.cancel();
        let drained = tokio::time::timeout(BACKGROUND_TIMEOUT, async {
            while self.tasks.join_next().await.is_some() {}
        })
        .await;
        if drained.is_err() {
            tracing::warn!(
                within_ms = BACKGROUND_TIMEOUT.as_millis(),
                "background tasks did not stop in time"
            );
        }
    }
}

/// Serves `routes` (the service's own gRPC services), every call through
/// `gate`, on `listeners` beside
/// health (of `service_name`, watched on `pool` and `bus`), reflection
/// listing `reflected`, and `/metrics`, with `background` running, until
/// `shutdown` is cancelled; then gives connections and calls in flight up
/// to [`DRAIN_TIMEOUT`] to end and the background tasks
/// [`BACKGROUND_TIMEOUT`]: a stop never takes longer than [`STOP_LIMIT`].
/// Services start through [`crate::service::Kit::serve`].
///
/// # Errors
/// When the gRPC server fails.
#[allow(clippy::too_many_arguments)]
pub async fn serve(
    listeners: Listeners,
    service_name: &'static str,
    reflected: &[&str],
    routes: Routes,
    gate: Gate,
    pool: PgPool,
    bus: Bus,
    mut background: Background,
    shutdown: CancellationToken,
) -> Result<(), anyhow::Error> {
    let (health, health_service) = tonic_health::server::health_reporter();
    // Known, and not serving, before the first call can ask.
    for name in [service_name, "", HEALTH_DATABASE, HEALTH_BUS] {
        health.set_service_status(name, ServingStatus::NotServing).await;
    }
    let (reflection_v1, reflection_v1alpha) = reflection(reflected);
    // Health ends its watches as soon as the stop is asked (or the server
    // failed), not after the drain they would otherwise hold up.
    let serving = shutdown.child_token();
    let health_stop = serving.clone();
    background.spawn(move |stop| async move {
        tokio::select! {
            () = watch_health(health, service_name, pool, bus, health_stop) => {}
            () = stop.cancelled() => {}
        }
    });
    background.spawn(|stop| serve_metrics(listeners.metrics, stop));
    let admitted = gate.clone();
    let mut server = Box::pin(
        tonic::transport::Server::builder()
            .trace_fn(telemetry::grpc_span)
            // Streams one connection may open at once: beyond, the client waits.
            .max_concurrent_streams(Some(MAX_STREAMS_PER_CONNECTION))
            .http2_keepalive_interval(Some(KEEPALIVE_INTERVAL))
            .http2_keepalive_timeout(Some(KEEPALIVE_TIMEOUT))
            .layer(gate.layer())
            .add_routes(routes)
            .add_service(health_service)
            .add_service(reflection_v1)
            .add_service(reflection_v1alpha)
            .serve_with_incoming_shutdown(
                tonic::transport::server::TcpIncoming::from(listeners.grpc).with_nodelay(Some(true)),
                shutdown.clone().cancelled_owned(),
            ),
    );
    // The server ends by itself only once every connection has closed,
    // which a stream that never ends or a client that stopped reading
    // would put off for ever: past the deadline it is dropped (its
    // listener is already closed), and the process goes on stopping.
    let (result, deadline) = tokio::select! {
        result = &mut server => (result, tokio::time::Instant::now() + DRAIN_TIMEOUT),
        () = shutdown.cancelled() => {
            let deadline = tokio::time::Instant::now() + DRAIN_TIMEOUT;
            match tokio::time::timeout_at(deadline, &mut server).await {
                Ok(result) => (result, deadline),
                Err(_) => {
                    tracing::warn!(
                        within_ms = DRAIN_TIMEOUT.as_millis(),
                        "connections still open after the stop was asked are not waited for"
                    );
                    (Ok(()), deadline)
                }
            }
        }
    };
    drop(server);
    serving.cancel();
    let left = deadline.saturating_duration_since(tokio::time::Instant::now());
    if !admitted.drained(left).await {
        tracing::warn!(
            within_ms = DRAIN_TIMEOUT.as_millis(),
            "calls in flight did not end in time"
        );
    }
    background.stop().await;
    tracing::info!("stopped");
    result.map_err(Into::into)
}
