//! Settings of the identification service, from `NRM_*` environment variables.

use nrm_kernel::settings::{
    AuthSettings, DatabaseSettings, NatsSettings, RelaySettings, SealingSettings, ServerSettings, TelemetrySettings,
};
use serde::Deserialize;

/// Everything the service reads at start.
#[derive(Debug, Clone, Deserialize)]
pub struct Settings {
    /// Listening addresses (`NRM_GRPC_ADDR`, `NRM_METRICS_ADDR`).
    #[serde(flatten)]
    pub server: ServerSettings,
    /// The service's own database (`NRM_DATABASE__*`).
    #[serde(default)]
    pub database: DatabaseSettings,
    /// NATS (`NRM_NATS__*`).
    #[serde(default)]
    pub nats: NatsSettings,
    /// The outbox relay (`NRM_RELAY__*`).
    #[serde(default)]
    pub relay: RelaySettings,
    /// Token verification (`NRM_AUTH__*`).
    pub auth: AuthSettings,
    /// Keys for personal data (`NRM_SEALING__*`).
    pub sealing: SealingSettings,
    /// Logs (`NRM_TELEMETRY__*`).
    #[serde(default)]
    pub telemetry: TelemetrySettings,
    /// Rules of identification (`NRM_IDENTIFICATION__*`).
    #[serde(default)]
    pub identification: IdentificationSettings,
}

/// Country rules of identification.
#[derive(Debug, Clone, Deserialize)]
pub struct IdentificationSettings {
    /// Days of the recovery and reflection period opened by identification
    /// (`NRM_IDENTIFICATION__REFLECTION_DAYS`, default 30).
    #[serde(default = "default_reflection_days")]
    pub reflection_days: u32,
}

impl Default for IdentificationSettings {
    fn default() -> Self {
        Self {
            reflection_days: default_reflection_days(),
        }
    }
}

fn default_reflection_days() -> u32 {
    30
}

impl Settings {
    /// Reads the settings from the environment.
    ///
    /// # Errors
    /// Names the missing or malformed variable.
    pub fn from_env() -> Result<Self, Box<figment::Error>> {
        let mut settings: Self = nrm_kernel::settings::from_env()?;
        if settings.database.name.is_empty() {
            "identification".clone_into(&mut settings.database.name);
        }
        Ok(settings)
    }
}
