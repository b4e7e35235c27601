//! `casepath_repatriation`: the repatriation stream into `cp_returns`,
//! `cp_return_commits` (every commit of a return, so that a bed held
//! because of one finds the return) and the return steps, on both sides of
//! the border: the destination country's own steps (outgoing), and at home
//! the steps as they crossed (incoming, one per origin version however
//! often a later snapshot repeats them). Crossing commits (`xborder-*`,
//! sealed for the partner) are skipped: casepath cannot open them.

use nrm_kernel::projection::{Delivery, Projection, rows_digest};
use nrm_kernel::store::UnitOfWork;
use nrm_kernel::xborder::CountryCode;
use sqlx::PgConnection;
use uuid::Uuid;

use super::column;
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
        self.apply_batch(uow, &[delivery]).await
    }

    async fn apply_batch(&self, uow: &mut UnitOfWork, deliveries: &[&Delivery]) -> Result<(), anyhow::Error> {
        super::apply_commits(
            uow,
            NAME,
            &self.country,
            &self.watch_key,
            deliveries,
            |delivery, origin| steps::repatriation(&delivery.commit, origin),
        )
        .await
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

impl super::Write for ReturnWrite {
    fn row(&self) -> Option<(&'static str, Uuid)> {
        Some(match self {
            Self::Commit { commit_id, .. } => ("cp_return_commits", commit_id.as_uuid()),
            Self::Opened(row) | Self::Announced(row) => ("cp_returns", row.return_id.as_uuid()),
            Self::Status { return_id, .. } => ("cp_returns", return_id.as_uuid()),
        })
    }

    async fn run(conn: &mut PgConnection, round: &[&Self]) -> Result<(), anyhow::Error> {
        let mut commits = Vec::new();
        let mut opened = Vec::new();
        let mut announced = Vec::new();
        let mut moved = Vec::new();
        for write in round {
            match write {
                Self::Commit { commit_id, return_id } => commits.push((commit_id.as_uuid(), return_id.as_uuid())),
                Self::Opened(row) => opened.push(row),
                Self::Announced(row) => announced.push(row),
                Self::Status {
                    return_id,
                    status,
                    handover,
                } => {
                    let (received_by, handed_over_at) = match handover {
                        Some((by, at)) => (Some(by.as_str()), Some(*at)),
                        None => (None, None),
                    };
                    moved.push((return_id.as_uuid(), *status, received_by, handed_over_at));
                }
            }
        }
        if !commits.is_empty() {
            sqlx::query(
                "INSERT INTO cp_return_commits (commit_id, return_id) SELECT * FROM unnest($1::uuid[], $2::uuid[])
                 ON CONFLICT (commit_id) DO NOTHING",
            )
            .bind(column(&commits, |c| c.0))
            .bind(column(&commits, |c| c.1))
            .execute(&mut *conn)
            .await?;
        }
        if !opened.is_empty() {
            upsert(&mut *conn, &opened, false).await?;
        }
        if !announced.is_empty() {
            upsert(&mut *conn, &announced, true).await?;
        }
        if !moved.is_empty() {
            sqlx::query(
                "UPDATE cp_returns r SET status = v.status, received_by = coalesce(v.received_by, r.received_by),
                   handed_over_at = coalesce(v.handed_over_at, r.handed_over_at)
                 FROM unnest($1::uuid[], $2::int4[], $3::text[], $4::timestamptz[])
                   AS v(return_id, status, received_by, handed_over_at)
                 WHERE r.return_id = v.return_id",
            )
            .bind(column(&moved, |m| m.0))
            .bind(column(&moved, |m| m.1))
            .bind(column(&moved, |m| m.2))
            .bind(column(&moved, |m| m.3))
            .execute(&mut *conn)
            .await?;
        }
        Ok(())
    }
}

/// The returns' rows; an announced one takes each newer snapshot's state.
async fn upsert(conn: &mut PgConnection, rows: &[&ReturnRow], announced: bool) -> Result<(), sqlx::Error> {
    let query = if announced {
        sqlx::query(
            "INSERT INTO cp_returns (return_id, direction, from_country, to_country, opened_by, consulate_agency,
               received_by, foreign_reference, status, opened_at, handed_over_at)
             SELECT * FROM unnest($1::uuid[], $2::int4[], $3::text[], $4::text[], $5::text[], $6::text[], $7::text[],
               $8::text[], $9::int4[], $10::timestamptz[], $11::timestamptz[])
             ON CONFLICT (return_id) DO UPDATE SET direction = EXCLUDED.direction, from_country = EXCLUDED.from_country,
               to_country = EXCLUDED.to_country, opened_by = EXCLUDED.opened_by, consulate_agency = EXCLUDED.consulate_agency,
               received_by = EXCLUDED.received_by,
               foreign_reference = EXCLUDED.foreign_reference, status = EXCLUDED.status,
               handed_over_at = EXCLUDED.handed_over_at",
        )
    } else {
        sqlx::query(
            "INSERT INTO cp_returns (return_id, direction, from_country, to_country, opened_by, consulate_agency,
               received_by, foreign_reference, status, opened_at, handed_over_at)
             SELECT * FROM unnest($1::uuid[], $2::int4[], $3::text[], $4::text[], $5::text[], $6::text[], $7::text[],
               $8::text[], $9::int4[], $10::timestamptz[], $11::timestamptz[])
             ON CONFLICT (return_id) DO NOTHING",
        )
    };
    query
        .bind(column(rows, |r| r.return_id.as_uuid()))
        .bind(column(rows, |r| r.direction))
        .bind(column(rows, |r| r.from_country.as_str()))
        .bind(column(rows, |r| r.to_country.as_str()))
        .bind(column(rows, |r| r.opened_by.as_str()))
        .bind(column(rows, |r| r.consulate_agency.as_str()))
        .bind(column(rows, |r| r.received_by.as_str()))
        .bind(column(rows, |r| r.foreign_reference.as_str()))
        .bind(column(rows, |r| r.status))
        .bind(column(rows, |r| r.opened_at))
        .bind(column(rows, |r| r.handed_over_at))
        .execute(conn)
        .await?;
    Ok(())
}
