//! The casepath service binary: settings, telemetry, run until SIGTERM.

use nrm_casepath::config::Settings;
use nrm_casepath::startup::Application;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    nrm_kernel::service::main(|settings: Settings| async move { Application::build(&settings).await }).await
}
