//! Settings of the repatriation service, from `NRM_*` environment variables.

use nrm_kernel::service::CommonSettings;
use nrm_kernel::xborder::XborderSettings;
use secrecy::SecretString;
use serde::Deserialize;

/// Everything the service reads at start.
#[derive(Debug, Clone, Deserialize)]
pub struct Settings {
    /// What every service reads: addresses, database (name default
    /// `repatriation`), NATS, relay, retries, tokens, logs.
    #[serde(flatten)]
    pub common: CommonSettings,
    /// The key that seals the identifiers of every return (`NRM_SEALING__*`).
    pub sealing: SealingSettings,
    /// This deployment's country, its key and its partners
    /// (`NRM_XBORDER__COUNTRY`, `NRM_XBORDER__PRIVATE_KEY_FILE`,
    /// `NRM_XBORDER__PARTNERS`).
    #[serde(default)]
    pub xborder: XborderSettings,
}

nrm_kernel::service_settings!(Settings, "repatriation");

/// Keys of the repatriation service. Only the master key: returns need no
/// duplicate detection, so `NRM_SEALING__MATCH_KEY` is not read.
#[derive(Debug, Clone, Deserialize)]
pub struct SealingSettings {
    /// Master key wrapping every return's data key, base64 of 32 bytes
    /// (`NRM_SEALING__MASTER_KEY`, required).
    pub master_key: SecretString,
}
