//! Settings of the shelter service, from `NRM_*` environment variables.

use nrm_kernel::service::CommonSettings;
use secrecy::SecretString;
use serde::Deserialize;

/// Everything the service reads at start.
#[derive(Debug, Clone, Deserialize)]
pub struct Settings {
    /// What every service reads: addresses, database (name default
    /// `shelter`), NATS, relay, retries, tokens, logs.
    #[serde(flatten)]
    pub common: CommonSettings,
    /// The key that seals shelter addresses (`NRM_SEALING__*`).
    pub sealing: SealingSettings,
    /// Rules of bed holds (`NRM_SHELTER__*`).
    #[serde(default)]
    pub shelter: ShelterSettings,
}

nrm_kernel::service_settings!(Settings, "shelter");

/// Keys of the shelter service. Only the master key: shelters need no
/// duplicate detection, so `NRM_SEALING__MATCH_KEY` is not read.
#[derive(Debug, Clone, Deserialize)]
pub struct SealingSettings {
    /// Master key wrapping every shelter's data key, base64 of 32 bytes
    /// (`NRM_SEALING__MASTER_KEY`, required).
    pub master_key: SecretString,
}

/// Rules of bed holds.
#[derive(Debug, Clone, Deserialize)]
pub struct ShelterSettings {
    /// How long a hold lasts when the request leaves `hold_minutes` at 0, and
    /// for the beds the placement reaction holds
    /// (`NRM_SHELTER__HOLD_MINUTES_DEFAULT`, default 1440 = 24 h, at most 10080).
    #[serde(default = "default_hold_minutes")]
    pub hold_minutes_default: u32,
    /// How often the expiry timers are looked at, in milliseconds
    /// (`NRM_SHELTER__TIMER_POLL_MS`, default 1000): a hold expires at
    /// most this late.
    #[serde(default = "default_timer_poll_ms")]
    pub timer_poll_ms: u64,
}

impl Default for ShelterSettings {
    fn default() -> Self {
        Self {
            hold_minutes_default: default_hold_minutes(),
            timer_poll_ms: default_timer_poll_ms(),
        }
    }
}

fn default_hold_minutes() -> u32 {
    1440
}

fn default_timer_poll_ms() -> u64 {
    1000
}
