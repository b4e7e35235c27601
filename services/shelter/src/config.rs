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

/// Beds for people announced from abroad (`NRM_SHELTER__RETURNS_AGENCY`).
///
/// Read from the environment beside [`Settings`] by
/// [`Application::build`](crate::startup::Application::build) rather than
/// as a field of [`ShelterSettings`], so that code building a
/// `ShelterSettings` by hand keeps compiling;
/// [`Application::build_with`](crate::startup::Application::build_with)
/// takes it explicitly.
#[derive(Debug, Clone, Deserialize)]
pub struct ReturnsSettings {
    /// The agency a bed is held for when a return announced to this country
    /// needs shelter on arrival: it receives the person, may read the
    /// shelter's address and release the hold
    /// (`NRM_SHELTER__RETURNS_AGENCY`, default `kg-iom`, the home country's
    /// IOM office).
    #[serde(default = "default_returns_agency")]
    pub returns_agency: String,
}

impl Default for ReturnsSettings {
    fn default() -> Self {
        Self {
            returns_agency: default_returns_agency(),
        }
    }
}

fn default_returns_agency() -> String {
    "kg-iom".into()
}

impl ReturnsSettings {
    /// Reads `NRM_SHELTER__RETURNS_AGENCY` (the other `NRM_SHELTER__*`
    /// variables are [`ShelterSettings`]'s).
    ///
    /// # Errors
    /// Names the variable when it is malformed.
    pub fn from_env() -> Result<Self, Box<figment::Error>> {
        #[derive(Deserialize)]
        struct Env {
            #[serde(default)]
            shelter: ReturnsSettings,
        }
        nrm_kernel::settings::from_env::<Env>().map(|env| env.shelter)
    }

    /// The agency code, checked: lower-case letters, digits and hyphens.
    ///
    /// # Errors
    /// When it is empty or has other characters.
    pub fn agency(&self) -> Result<&str, anyhow::Error> {
        let agency = self.returns_agency.as_str();
        if agency.is_empty()
            || !agency
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
        {
            anyhow::bail!("NRM_SHELTER__RETURNS_AGENCY must be an agency code such as kg-iom");
        }
        Ok(agency)
    }
}
