//! `casepath_shelter`: the shelter stream into `cp_shelters` (code, region
//! and operator: never the sealed address), `cp_holds` and the bed steps.
//! A bed held for an arrival from abroad keeps the commit that caused it
//! (the delivery's causation ID: a commit of the return), resolved to the
//! return when read.

use nrm_kernel::ids::CommitId;
use nrm_kernel::projection::{Delivery, Projection, rows_digest};
use nrm_kernel::store::UnitOfWork;
use nrm_kernel::xborder::CountryCode;
use sqlx::PgConnection;
use uuid::Uuid;

use super::column;
use crate::domain::changes::WatchKey;

use crate::domain::steps::{self, HoldStatus, ShelterWrite};

/// The stream it reads.
pub const CONTEXT: &str = "shelter";

/// The projection's name (checkpoint key, `cp_steps.source`).
pub const NAME: &str = "casepath_shelter";

/// Every row the projection owns, one text line each.
const DIGEST: &str = "SELECT 'cp_shelters|' || t::text FROM cp_shelters t
    UNION ALL SELECT 'cp_holds|' || t::text FROM cp_holds t
    UNION ALL SELECT 'cp_steps|' || t::text FROM cp_steps t WHERE t.source = 'casepath_shelter'";

/// The shelter projection.
#[derive(Debug, Clone)]
pub struct ShelterProjection {
    country: CountryCode,
    watch_key: WatchKey,
}

impl ShelterProjection {
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

impl Projection for ShelterProjection {
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
            |delivery, origin| {
                let cause = delivery.metadata.as_ref().map(|m| CommitId::from_uuid(m.causation_id));
                steps::shelter(&delivery.commit, cause, origin)
            },
        )
        .await
    }

    async fn reset(&self, conn: &mut PgConnection) -> Result<(), anyhow::Error> {
        sqlx::query("DELETE FROM cp_shelters").execute(&mut *conn).await?;
        sqlx::query("DELETE FROM cp_holds").execute(&mut *conn).await?;
        super::reset_steps(conn, NAME).await
    }

    async fn digest(&self, conn: &mut PgConnection) -> Result<Option<String>, anyhow::Error> {
        Ok(Some(rows_digest(conn, DIGEST).await?))
    }

    /// Its own tables and `cp_steps`, of which its digest counts its own
    /// rows (a rebuild compares in a shadow of them).
    fn tables(&self) -> &'static [&'static str] {
        &["cp_shelters", "cp_holds", "cp_steps"]
    }
}

impl super::Write for ShelterWrite {
    fn row(&self) -> Option<(&'static str, Uuid)> {
        Some(match self {
            Self::Shelter(s) => ("cp_shelters", s.shelter_id.as_uuid()),
            Self::Hold(h) => ("cp_holds", h.hold_id.as_uuid()),
            Self::HoldStatus { hold_id, .. } => ("cp_holds", hold_id.as_uuid()),
        })
    }

    async fn run(conn: &mut PgConnection, round: &[&Self]) -> Result<(), anyhow::Error> {
        let mut shelters = Vec::new();
        let mut holds = Vec::new();
        let mut moved = Vec::new();
        for write in round {
            match write {
                Self::Shelter(s) => shelters.push(s),
                Self::Hold(h) => holds.push(h),
                Self::HoldStatus { hold_id, status, at } => {
                    let (admitted, discharged) = match status {
                        HoldStatus::Admitted => (Some(*at), None),
                        HoldStatus::Discharged => (None, Some(*at)),
                        HoldStatus::Released | HoldStatus::Expired => (None, None),
                    };
                    moved.push((hold_id.as_uuid(), status.as_str(), admitted, discharged));
                }
            }
        }
        if !shelters.is_empty() {
            sqlx::query(
                "INSERT INTO cp_shelters (shelter_id, code, region, operator_agency)
                 SELECT * FROM unnest($1::uuid[], $2::text[], $3::text[], $4::text[])
                 ON CONFLICT (shelter_id) DO UPDATE SET code = EXCLUDED.code, region = EXCLUDED.region,
                   operator_agency = EXCLUDED.operator_agency",
            )
            .bind(column(&shelters, |s| s.shelter_id.as_uuid()))
            .bind(column(&shelters, |s| s.code.as_str()))
            .bind(column(&shelters, |s| s.region.as_str()))
            .bind(column(&shelters, |s| s.operator_agency.as_str()))
            .execute(&mut *conn)
            .await?;
        }
        if !holds.is_empty() {
            sqlx::query(
                "INSERT INTO cp_holds (hold_id, shelter_id, referral_id, cause_commit_id, holder_agency, category,
                   held_at, expires_at, status)
                 SELECT v.*, 'held' FROM unnest($1::uuid[], $2::uuid[], $3::uuid[], $4::uuid[], $5::text[], $6::int4[],
                   $7::timestamptz[], $8::timestamptz[]) AS v
                 ON CONFLICT (hold_id) DO NOTHING",
            )
            .bind(column(&holds, |h| h.hold_id.as_uuid()))
            .bind(column(&holds, |h| h.shelter_id.as_uuid()))
            .bind(column(&holds, |h| h.referral_id.map(|i| i.as_uuid())))
            .bind(column(&holds, |h| h.cause_commit_id.map(|i| i.as_uuid())))
            .bind(column(&holds, |h| h.holder_agency.as_str()))
            .bind(column(&holds, |h| h.category))
            .bind(column(&holds, |h| h.held_at))
            .bind(column(&holds, |h| h.expires_at))
            .execute(&mut *conn)
            .await?;
        }
        if !moved.is_empty() {
            sqlx::query(
                "UPDATE cp_holds h SET status = v.status, admitted_at = coalesce(h.admitted_at, v.admitted_at),
                   discharged_at = coalesce(h.discharged_at, v.discharged_at)
                 FROM unnest($1::uuid[], $2::text[], $3::timestamptz[], $4::timestamptz[])
                   AS v(hold_id, status, admitted_at, discharged_at)
                 WHERE h.hold_id = v.hold_id",
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
