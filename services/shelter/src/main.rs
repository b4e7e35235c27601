//! The shelter service binary: settings, telemetry, run until SIGTERM.

use nrm_kernel::{server, telemetry};
use nrm_shelter::config::Settings;
use nrm_shelter::startup::Application;
use tokio_util::sync::CancellationToken;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let settings = Settings::from_env().map_err(|e| anyhow::anyhow!("configuration: {e}"))?;
    let _telemetry = telemetry::init("shelter", &settings.telemetry)?;
    tracing::info!(config = ?settings, "effective configuration");
    let app = Application::build(&settings).await?;
    tracing::info!(grpc = %app.grpc_addr()?, metrics = %app.metrics_addr()?, "shelter service listening");
    let shutdown = CancellationToken::new();
    let trigger = shutdown.clone();
    tokio::spawn(async move {
        server::shutdown_signal().await;
        trigger.cancel();
    });
    app.run_until_stopped(shutdown).await
}
