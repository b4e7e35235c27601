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

use crate::domain::steps::{self, ShelterWrite};

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
}

impl ShelterProjection {
    /// The projection of a deployment in `country`.
    #[must_use]
    pub fn new(country: &CountryCode) -> Self {
        Self {
            country: country.clone(),
        }
    }
}

impl Projection for ShelterProjection {
    fn name(&self) -> &'static str {
        NAME
    }

    async fn apply(&self, uow: &mut UnitOfWork, delivery: &Delivery) -> Result<(), anyhow::Error> {
        let cause = delivery.metadata.as_ref().map(|m| CommitId::from_uuid(m.causation_id));
        let effect = steps::shelter(&delivery.commit, cause, &super::origin(&self.country, delivery))?;
        if effect.is_empty() {
            return Ok(());
        }
        let conn = uow.conn();
        for write in &effect.writes {
            write_one(&mut *conn, write).await?;
        }
        super::finish(conn, NAME, delivery, &effect.steps).await
    }

    async fn reset(&self, conn: &mut PgConnection) -> Result<(), anyhow::Error> {
        sqlx::query("DELETE FROM cp_shelters").execute(&mut *conn).await?;
        sqlx::query("DELETE FROM cp_holds").execute(&mut *conn).await?;
        super::reset_steps(conn, NAME).await
    }

    async fn digest(&self, conn: &mut PgConnection) -> Result<Option<String>, anyhow::Error> {
        Ok(Some(rows_digest(conn, DIGEST).await?))
    }
}

async fn write_one(conn: &mut PgConnection, write: &ShelterWrite) -> Result<(), anyhow::Error> {
    match write {
        ShelterWrite::Shelter(s) => {
            sqlx::query(
                "INSERT INTO cp_shelters (shelter_id, code, region, operator_agency) VALUES ($1, $2, $3, $4)
                 ON CONFLICT (shelter_id) DO UPDATE SET code = EXCLUDED.code, region = EXCLUDED.region,
                   operator_agency = EXCLUDED.operator_agency",
            )
            .bind(s.shelter_id.as_uuid())
            .bind(&s.code)
            .bind(&s.region)
            .bind(&s.operator_agency)
            .execute(conn)
            .await?;
        }
        ShelterWrite::Hold(h) => {
            sqlx::query(
                "INSERT INTO cp_holds (hold_id, shelter_id, referral_id, cause_commit_id, holder_agency, category,
                   held_at, expires_at, status)
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, 'held') ON CONFLICT (hold_id) DO NOTHING",
            )
            .bind(h.hold_id.as_uuid())
            .bind(h.shelter_id.as_uuid())
            .bind(h.referral_id.map(|i| i.as_uuid()))
            .bind(h.cause_commit_id.map(|i| i.as_uuid()))
            .bind(&h.holder_agency)
            .bind(h.category)
            .bind(h.held_at)
            .bind(h.expires_at)
            .execute(conn)
            .await?;
        }
        ShelterWrite::HoldStatus { hold_id, status, at } => {
            let (admitted, discharged) = match status {
                steps::HoldStatus::Admitted => (Some(*at), None),
                steps::HoldStatus::Discharged => (None, Some(*at)),
                steps::HoldStatus::Released | steps::HoldStatus::Expired => (None, None),
            };
            sqlx::query(
                "UPDATE cp_holds SET status = $2, admitted_at = coalesce(admitted_at, $3),
                   discharged_at = coalesce(discharged_at, $4)
                 WHERE hold_id = $1",
            )
            .bind(hold_id.as_uuid())
            .bind(status.as_str())
            .bind(admitted)
            .bind(discharged)
            .execute(conn)
            .await?;
        }
    }
    Ok(())
}
