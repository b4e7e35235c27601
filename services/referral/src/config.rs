//! Settings of the referral service, from `NRM_*` environment variables.

use nrm_kernel::service::CommonSettings;
use serde::Deserialize;

/// Everything the service reads at start.
#[derive(Debug, Clone, Deserialize)]
pub struct Settings {
    /// What every service reads: addresses, database (name default
    /// `referral`), NATS, relay, retries, tokens, logs.
    #[serde(flatten)]
    pub common: CommonSettings,
    /// Rules of referral (`NRM_REFERRAL__*`).
    #[serde(default)]
    pub referral: ReferralSettings,
}

nrm_kernel::service_settings!(Settings, "referral");

/// Country rules of referral.
#[derive(Debug, Clone, Deserialize)]
pub struct ReferralSettings {
    /// Seconds to answer an urgent referral (`NRM_REFERRAL__URGENT_DEADLINE_SECONDS`, default 86400).
    #[serde(default = "default_urgent")]
    pub urgent_deadline_seconds: u64,
    /// Seconds to answer a normal referral (`NRM_REFERRAL__NORMAL_DEADLINE_SECONDS`, default 259200).
    #[serde(default = "default_normal")]
    pub normal_deadline_seconds: u64,
    /// Refer persons found not identified too (`NRM_REFERRAL__ALLOW_NOT_IDENTIFIED`, default false).
    #[serde(default)]
    pub allow_not_identified: bool,
    /// How often due deadlines are looked for, in milliseconds
    /// (`NRM_REFERRAL__TIMER_POLL_MS`, default 250).
    #[serde(default = "default_poll")]
    pub timer_poll_ms: u64,
    /// The agency a person identified abroad is referred to for
    /// reintegration when handed over home, if they agreed abroad
    /// (`NRM_REFERRAL__REINTEGRATION_AGENCY`, default `kg-msd`).
    #[serde(default = "default_reintegration_agency")]
    pub reintegration_agency: String,
}

impl Default for ReferralSettings {
    fn default() -> Self {
        Self {
            urgent_deadline_seconds: default_urgent(),
            normal_deadline_seconds: default_normal(),
            allow_not_identified: false,
            timer_poll_ms: default_poll(),
            reintegration_agency: default_reintegration_agency(),
        }
    }
}

fn default_urgent() -> u64 {
    86_400
}

fn default_normal() -> u64 {
    259_200
}

fn default_poll() -> u64 {
    250
}

fn default_reintegration_agency() -> String {
    "kg-msd".into()
}
