//! Settings of the casepath service, from `NRM_*` environment variables.

use nrm_kernel::service::CommonSettings;
use serde::Deserialize;

/// Everything the service reads at start.
#[derive(Debug, Clone, Deserialize)]
pub struct Settings {
    /// What every service reads: addresses, database (name default
    /// `casepath`), NATS, retries, tokens, logs. (casepath publishes
    /// nothing: the relay settings are not used.)
    #[serde(flatten)]
    pub common: CommonSettings,
    /// What casepath adds (`NRM_CASEPATH__*`).
    #[serde(default)]
    pub casepath: CasepathSettings,
    /// This deployment's country (`NRM_XBORDER__COUNTRY`, default `kg`):
    /// the country of the steps recorded here, and the default calendar.
    /// Only the country is read; keys and partners are repatriation's.
    #[serde(default)]
    pub xborder: nrm_kernel::xborder::XborderSettings,
}

nrm_kernel::service_settings!(Settings, "casepath");

/// casepath's own settings.
#[derive(Debug, Clone, Deserialize)]
pub struct CasepathSettings {
    /// Working days the competent authority has for the identification
    /// decision, from the report or the review request
    /// (`NRM_CASEPATH__DECISION_WORKING_DAYS`, default 5).
    #[serde(default = "default_decision_working_days")]
    pub decision_working_days: u32,
    /// A calendar file (TOML: UTC offset, weekend days, public holidays,
    /// working weekend days) instead of the built-in one of the country
    /// (`NRM_CASEPATH__CALENDAR_FILE`, default empty: `deploy/casepath/calendars/<country>.toml`,
    /// compiled in).
    #[serde(default)]
    pub calendar_file: String,
    /// The smallest count a publishable statistic shows unless the request
    /// names one (`NRM_CASEPATH__MIN_CELL`, default 5).
    #[serde(default = "default_min_cell")]
    pub min_cell: u32,
    /// Shortest time between two updates a watcher is sent, in milliseconds
    /// (`NRM_CASEPATH__WATCH_INTERVAL_MS`, default 200).
    #[serde(default = "default_watch_interval_ms")]
    pub watch_interval_ms: u64,
    /// Watches (`WatchPath`, `WatchInbox`) one officer of one agency may
    /// have open at once in this process; one more is refused
    /// `RESOURCE_EXHAUSTED` (`NRM_CASEPATH__MAX_WATCHES_PER_OFFICER`,
    /// default 8, at least 1).
    #[serde(default = "default_max_watches_per_officer")]
    pub max_watches_per_officer: u32,
}

impl Default for CasepathSettings {
    fn default() -> Self {
        Self {
            decision_working_days: default_decision_working_days(),
            calendar_file: String::new(),
            min_cell: default_min_cell(),
            watch_interval_ms: default_watch_interval_ms(),
            max_watches_per_officer: default_max_watches_per_officer(),
        }
    }
}

fn default_decision_working_days() -> u32 {
    5
}

fn default_max_watches_per_officer() -> u32 {
    8
}

fn default_min_cell() -> u32 {
    5
}

fn default_watch_interval_ms() -> u64 {
    200
}
