//! The shelter service binary: settings, telemetry, run until SIGTERM.

use nrm_shelter::config::Settings;
use nrm_shelter::startup::Application;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    nrm_kernel::service::main(|settings: Settings| async move { Application::build(&settings).await }).await
}
