//! Settings of the identification service, from `NRM_*` environment variables.

use nrm_kernel::service::CommonSettings;
use nrm_kernel::settings::SealingSettings;
use nrm_kernel::xborder::XborderSettings;
use serde::Deserialize;

/// Everything the service reads at start.
#[derive(Debug, Clone, Deserialize)]
pub struct Settings {
    /// What every service reads: addresses, database, NATS, relay, retries,
    /// tokens, logs.
    #[serde(flatten)]
    pub common: CommonSettings,
    /// Keys for personal data (`NRM_SEALING__*`).
    pub sealing: SealingSettings,
    /// Rules of identification (`NRM_IDENTIFICATION__*`).
    #[serde(default)]
    pub identification: IdentificationSettings,
    /// This country and its partners (`NRM_XBORDER__*`): the service opens
    /// the case of every person handed over from a partner country.
    #[serde(default)]
    pub xborder: XborderSettings,
}

nrm_kernel::service_settings!(Settings, "identification");

/// Country rules of identification.
#[derive(Debug, Clone, Deserialize)]
pub struct IdentificationSettings {
    /// Days of the recovery and reflection period opened by identification
    /// (`NRM_IDENTIFICATION__REFLECTION_DAYS`, default 30).
    #[serde(default = "default_reflection_days")]
    pub reflection_days: u32,
    /// The competent authority handling the cases that open when a person
    /// identified abroad is handed over here (`NRM_IDENTIFICATION__HOMECOMING_AUTHORITY`,
    /// default `kg-mvd`). Police or a prosecutor: only they take the formal
    /// decision on a review, and the agency that received the person (the
    /// case's reporting agency, IOM) is not its own competent authority.
    #[serde(default = "default_homecoming_authority")]
    pub homecoming_authority: String,
    /// The agencies here that receive persons handed over from abroad,
    /// comma-separated (`NRM_IDENTIFICATION__HOMECOMING_RECEIVERS`, default
    /// `kg-iom`). The one a handover names holds the case it opens; a name
    /// not on the list (typed abroad) holds nothing, and the competent
    /// authority reports the case.
    #[serde(default = "default_homecoming_receivers")]
    pub homecoming_receivers: String,
}

impl Default for IdentificationSettings {
    fn default() -> Self {
        Self {
            reflection_days: default_reflection_days(),
            homecoming_authority: default_homecoming_authority(),
            homecoming_receivers: default_homecoming_receivers(),
        }
    }
}

fn default_homecoming_receivers() -> String {
    "kg-iom".into()
}

fn default_homecoming_authority() -> String {
    "kg-mvd".into()
}

fn default_reflection_days() -> u32 {
    30
}
