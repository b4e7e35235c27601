//! `casepath_repatriation`: the repatriation stream into `cp_returns`,
//! `cp_return_commits` (every commit of a return, so that a bed held
//! because of one finds the return) and the return steps, on both sides of
//! the border: the destination country's own steps (outgoing), and at home
//! the steps as they crossed (incoming, one per origin version however
//! often a later snapshot repeats them). Crossing commits (`xborder-*`,
//! sealed for the partner) are skipped: casepath cannot open them.

use nrm_kernel::projection::{Delivery, Projection, Unprocessable, rows_digest};
use nrm_kernel::store::UnitOfWork;
use nrm_kernel::xborder::CountryCode;
use sqlx::PgConnection;

use crate::domain::changes::WatchKey;

use crate::domain::steps::{self, ReturnRow, ReturnWrite};

/// The stream it reads.
pub const CONTEXT: &str = "repatriation";

/// The projection's name (checkpoint key, `cp_steps.source`).
pub const NAME: &str = "casepath_repatriation";

/// Every row the projection owns, one text line each.
const DIGEST: &str = "SELECT 'cp_returns|' || t::text FROM cp_returns t
    UNION ALL SELECT 'cp_return_commits|' || t::text FROM cp_return_commits t
    UNION ALL SELECT 'cp_steps|' || t::text FROM cp_steps t WHERE t.source = 'casepath_repatriation'";

/// The repatriation projection.
#[derive(Debug, Clone)]
pub struct RepatriationProjection {
    country: CountryCode,
    watch_key: WatchKey,
}

impl RepatriationProjection {
    /// The projection of a deployment in `country`, notifying its changes
    /// under `watch_key`.
    #[must_use]
    pub fn new(country: &CountryCode, watch_key: &WatchKey) -> Self {
        Self {
            country: country.clone(),
            watch_key: watch_key.clone(),
        }
    }
}

impl Projection for RepatriationProjection {
    fn name(&self) -> &'static str {
        NAME
    }

    async fn apply(&self, uow: &mut UnitOfWork, delivery: &Delivery) -> Result<(), anyhow::Error> {
        let effect = steps::repatriation(&delivery.commit, &super::origin(&self.country, delivery))
            .map_err(Unprocessable::new)?;
        super::report_skipped(NAME, delivery, &effect.skipped);
        if effect.is_empty() {
            return Ok(());
        }
        super::write_effect(uow.conn(), NAME, &self.watch_key, delivery, &effect, query).await
    }

    async fn reset(&self, conn: &mut PgConnection) -> Result<(), anyhow::Error> {
        sqlx::query("DELETE FROM cp_returns").execute(&mut *conn).await?;
        sqlx::query("DELETE FROM cp_return_commits").execute(&mut *conn).await?;
        super::reset_steps(conn, NAME).await
    }

    async fn digest(&self, conn: &mut PgConnection) -> Result<Option<String>, anyhow::Error> {
        Ok(Some(rows_digest(conn, DIGEST).await?))
    }

    /// Its own tables and `cp_steps`, of which its digest counts its own
    /// rows (a rebuild compares in a shadow of them).
    fn tables(&self) -> &'static [&'static str] {
        &["cp_returns", "cp_return_commits", "cp_steps"]
    }
}

/// The statement of one write, with `steps` (see [`super::write_effect`]).
fn query<'q>(write: &'q ReturnWrite, steps: &'q super::Steps) -> super::Query<'q> {
    match write {
        ReturnWrite::Commit { commit_id, return_id } => {
            steps.bind(sqlx::query(with_steps!("INSERT INTO cp_return_commits (commit_id, return_id) VALUES ($13, $14) ON CONFLICT (commit_id) DO NOTHING")))
            .bind(commit_id.as_uuid())
            .bind(return_id.as_uuid())
        }
        ReturnWrite::Opened(row) => upsert(row, false, steps),
        ReturnWrite::Announced(row) => upsert(row, true, steps),
        ReturnWrite::Status {
            return_id,
            status,
            handover,
        } => {
            let (received_by, handed_over_at) = match handover {
                Some((by, at)) => (Some(by.as_str()), Some(*at)),
                None => (None, None),
            };
            steps.bind(sqlx::query(with_steps!("UPDATE cp_returns SET status = $14, received_by = coalesce($15, received_by),
                   handed_over_at = coalesce($16, handed_over_at)
                 WHERE return_id = $13")))
            .bind(return_id.as_uuid())
            .bind(status)
            .bind(received_by)
            .bind(handed_over_at)
        }
    }
}

/// The return's row; an announced one takes each newer snapshot's state.
fn upsert<'q>(row: &'q ReturnRow, announced: bool, steps: &'q super::Steps) -> super::Query<'q> {
    let query = if announced {
        sqlx::query(with_steps!(
            "INSERT INTO cp_returns (return_id, direction, from_country, to_country, opened_by, consulate_agency,
               received_by, foreign_reference, status, opened_at, handed_over_at)
             VALUES ($13, $14, $15, $16, $17, $18, $19, $20, $21, $22, $23)
             ON CONFLICT (return_id) DO UPDATE SET direction = EXCLUDED.direction, from_country = EXCLUDED.from_country,
               to_country = EXCLUDED.to_country, opened_by = EXCLUDED.opened_by, consulate_agency = EXCLUDED.consulate_agency,
               received_by = EXCLUDED.received_by,
               foreign_reference = EXCLUDED.foreign_reference, status = EXCLUDED.status,
               handed_over_at = EXCLUDED.handed_over_at"
        ))
    } else {
        sqlx::query(with_steps!(
            "INSERT INTO cp_returns (return_id, direction, from_country, to_country, opened_by, consulate_agency,
               received_by, foreign_reference, status, opened_at, handed_over_at)
             VALUES ($13, $14, $15, $16, $17, $18, $19, $20, $21, $22, $23)
             ON CONFLICT (return_id) DO NOTHING"
        ))
    };
    steps
        .bind(query)
        .bind(row.return_id.as_uuid())
        .bind(row.direction)
        .bind(&row.from_country)
        .bind(&row.to_country)
        .bind(&row.opened_by)
        .bind(&row.consulate_agency)
        .bind(&row.received_by)
        .bind(&row.foreign_reference)
        .bind(row.status)
        .bind(row.opened_at)
        .bind(row.handed_over_at)
}
