//! The queries: a person's path part by part, inboxes, the list of paths,
//! statistics, and watching them change. Everything here READS the `cp_*`
//! tables the projections write; links across streams are resolved here
//! (the contract's link rules), never when written.
//!
//! What a caller sees is decided by the kernel's matrix: the gate admits
//! the role for the RPC; a path's parts by the rows `GetPath (<part>)` (also
//! for `WatchPath`), and every record of a part by
//! [`Permit::admits`](nrm_kernel::permissions::Permit::admits) with the
//! caller's standing to it.
//!
//! # Layout
//! - [`path`]: `GetPath`: gathering, deciding part by part and item by item, audit.
//! - [`inbox`]: `ListInbox`: referrals and decisions waiting, with deadlines.
//! - [`lists`]: `ListPaths` and `GetStatistics` (set-based).
//! - [`watch`]: the change listener and the watchers of a path or an inbox.

pub mod inbox;
pub mod lists;
pub mod path;
pub mod watch;

use std::sync::Arc;

use chrono::{DateTime, TimeDelta, Utc};
use nrm_kernel::service::Kit;
use nrm_kernel::xborder::CountryCode;
use tokio_util::sync::CancellationToken;

use crate::config::CasepathSettings;
use crate::domain::calendar::{self, Calendar};
use crate::domain::changes::WatchKey;

/// The application: casepath's queries over its read models.
#[derive(Debug, Clone)]
pub struct Casepath {
    pool: sqlx::PgPool,
    calendar: Arc<Calendar>,
    settings: CasepathSettings,
    /// Every `casepath_changed` notification's change (and
    /// [`Touched::All`](crate::domain::changes::Touched::All) on every
    /// reconnect of the listener, which may have missed some).
    changes: tokio::sync::broadcast::Sender<watch::Change>,
    /// The key of the tokens changes name.
    watch_key: WatchKey,
    /// Cancelled when the service stops: open watches end.
    closing: CancellationToken,
    /// Turns of the open watches' queries: a quarter of the pool (at least
    /// one), whatever the number of watches.
    rechecks: Arc<tokio::sync::Semaphore>,
    /// Second connections of `GetStatistics` (its reads beside the
    /// persons' counts): an eighth of the pool (at least one), so that
    /// coordinators' calls take no more of it than the gate reckons with.
    side_reads: Arc<tokio::sync::Semaphore>,
    /// Open watches by (agency, officer): at most
    /// `max_watches_per_officer` each ([`watch::WatchTurn`]).
    watchers: watch::Watchers,
}

impl Casepath {
    /// Cancelled when the service stops: cancelling it ends the open watches.
    #[must_use]
    pub fn closing(&self) -> CancellationToken {
        self.closing.clone()
    }
}

/// The calendar the settings name: the file of `NRM_CASEPATH__CALENDAR_FILE`,
/// else the country's built-in one, else Monday–Friday without holidays in
/// UTC (with a warning).
///
/// # Errors
/// When the file cannot be read or is malformed.
pub fn load_calendar(settings: &CasepathSettings, country: &CountryCode) -> Result<Calendar, anyhow::Error> {
    if !settings.calendar_file.is_empty() {
        let text = std::fs::read_to_string(&settings.calendar_file)
            .map_err(|e| anyhow::anyhow!("NRM_CASEPATH__CALENDAR_FILE cannot be read: {e}"))?;
        return Calendar::from_toml(&text).map_err(|e| anyhow::anyhow!("NRM_CASEPATH__CALENDAR_FILE: {e}"));
    }
    match calendar::builtin(country.as_str()) {
        Some(text) => {
            Calendar::from_toml(text).map_err(|e| anyhow::anyhow!("the built-in calendar of {}: {e}", country.as_str()))
        }
        None => {
            tracing::warn!(
                country = country.as_str(),
                "no calendar for this country: Monday to Friday, no public holidays, UTC \
                 (set NRM_CASEPATH__CALENDAR_FILE)"
            );
            Ok(Calendar::default())
        }
    }
}

impl Casepath {
    /// Builds the queries and spawns the change listener on `kit`.
    ///
    /// # Errors
    /// When the calendar is malformed.
    pub fn build(
        kit: &mut Kit,
        settings: &CasepathSettings,
        country: &CountryCode,
        watch_key: WatchKey,
    ) -> Result<Self, anyhow::Error> {
        let calendar = load_calendar(settings, country)?;
        let (changes, _) = tokio::sync::broadcast::channel(watch::BACKLOG);
        let closing = CancellationToken::new();
        let pool = kit.pool().clone();
        {
            let (pool, changes, closing) = (pool.clone(), changes.clone(), closing.clone());
            kit.spawn(move |stop| async move {
                watch::listen(pool, changes, stop).await;
                closing.cancel();
            });
        }
        let rechecks = Arc::new(tokio::sync::Semaphore::new(
            usize::try_from(pool.options().get_max_connections() / 4)
                .unwrap_or(1)
                .max(1),
        ));
        let side_reads = Arc::new(tokio::sync::Semaphore::new(
            usize::try_from(pool.options().get_max_connections() / 8)
                .unwrap_or(1)
                .max(1),
        ));
        Ok(Self {
            pool,
            calendar: Arc::new(calendar),
            settings: settings.clone(),
            changes,
            watch_key,
            closing,
            rechecks,
            side_reads,
            watchers: watch::Watchers::default(),
        })
    }

    /// The database pool.
    #[must_use]
    pub fn pool(&self) -> &sqlx::PgPool {
        &self.pool
    }

    /// The working-day calendar in use.
    #[must_use]
    pub fn calendar(&self) -> &Calendar {
        &self.calendar
    }

    /// Writes the audit entry of an answered read (`action`: the RPC) on
    /// `subject` (parsed IDs and codes only) for `purpose`, before the
    /// answer leaves: a read that cannot be audited is not answered.
    pub(crate) async fn audit_read(
        &self,
        ctx: &nrm_kernel::command::CallContext,
        action: &str,
        subject: &str,
        purpose: &str,
    ) -> Result<(), nrm_kernel::error::AppError> {
        let mut conn = self.pool.acquire().await?;
        nrm_kernel::audit::append(&mut conn, &ctx.audit_entry(action, subject, purpose)).await?;
        Ok(())
    }

    /// When an identification decision waiting since `since` is due.
    fn decision_due(&self, since: DateTime<Utc>) -> DateTime<Utc> {
        self.calendar
            .add_working_days(since, self.settings.decision_working_days)
    }
}

/// A protobuf duration of `d` (negative when `d` is).
#[must_use]
pub fn duration(d: TimeDelta) -> prost_types::Duration {
    prost_types::Duration {
        seconds: d.num_seconds(),
        nanos: d.subsec_nanos(),
    }
}

/// The protobuf timestamp of `t`.
fn ts(t: DateTime<Utc>) -> prost_types::Timestamp {
    nrm_kernel::validate::timestamp(t)
}
