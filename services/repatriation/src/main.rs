//! The repatriation service binary: settings, telemetry, run until SIGTERM.

use nrm_repatriation::config::Settings;
use nrm_repatriation::startup::Application;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    nrm_kernel::service::main(|settings: Settings| async move { Application::build(&settings).await }).await
}
