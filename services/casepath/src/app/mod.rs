//! The queries: a person's path part by part, inboxes, the list of paths,
//! statistics, and watching them change.
//!
//! STUB: the query helper replaces this file.

use nrm_kernel::service::Kit;
use nrm_kernel::xborder::CountryCode;

use crate::config::CasepathSettings;

/// The application: casepath's queries over its read models.
#[derive(Debug, Clone)]
pub struct Casepath {
    pool: sqlx::PgPool,
}

impl Casepath {
    /// Builds the queries and spawns what they need on `kit`.
    ///
    /// # Errors
    /// When the calendar is malformed.
    pub fn build(kit: &mut Kit, _settings: &CasepathSettings, _country: &CountryCode) -> Result<Self, anyhow::Error> {
        Ok(Self {
            pool: kit.pool().clone(),
        })
    }

    /// The database pool.
    #[must_use]
    pub fn pool(&self) -> &sqlx::PgPool {
        &self.pool
    }
}
