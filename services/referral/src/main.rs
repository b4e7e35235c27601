//! The referral service binary: settings, telemetry, run until SIGTERM.

use nrm_referral::config::Settings;
use nrm_referral::startup::Application;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    nrm_kernel::service::main(|settings: Settings| async move { Application::build(&settings).await }).await
}
