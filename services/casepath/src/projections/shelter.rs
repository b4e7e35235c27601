//! `casepath_shelter`: the shelter stream into `cp_shelters` (code, region
//! and operator: never the sealed address), `cp_holds` and the bed steps.
//! A bed held for an arrival from abroad keeps the commit that caused it
//! (the delivery's causation ID: a commit of the return), resolved to the
//! return when read.

use nrm_kernel::ids::CommitId;
use nrm_kernel::projection::{Delivery, Projection, Unprocessable, rows_digest};
use nrm_kernel::store::UnitOfWork;
use nrm_kernel::xborder::CountryCode;
use sqlx::PgConnection;

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
        let cause = delivery.metadata.as_ref().map(|m| CommitId::from_uuid(m.causation_id));
        let effect = steps::shelter(&delivery.commit, cause, &super::origin(&self.country, delivery))
            .map_err(Unprocessable::new)?;
        super::report_skipped(NAME, delivery, &effect.skipped);
        if effect.is_empty() {
            return Ok(());
        }
        super::write_effect(uow.conn(), NAME, &self.watch_key, delivery, &effect, query).await
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

/// The statement of one write, with `steps` (see [`super::write_effect`]).
fn query<'q>(write: &'q ShelterWrite, steps: &'q super::Steps) -> super::Query<'q> {
    match write {
        ShelterWrite::Shelter(s) => steps
            .bind(sqlx::query(with_steps!(
                "INSERT INTO cp_shelters (shelter_id, code, region, operator_agency) VALUES ($13, $14, $15, $16)
                 ON CONFLICT (shelter_id) DO UPDATE SET code = EXCLUDED.code, region = EXCLUDED.region,
                   operator_agency = EXCLUDED.operator_agency"
            )))
            .bind(s.shelter_id.as_uuid())
            .bind(&s.code)
            .bind(&s.region)
            .bind(&s.operator_agency),
        ShelterWrite::Hold(h) => steps
            .bind(sqlx::query(with_steps!(
                "INSERT INTO cp_holds (hold_id, shelter_id, referral_id, cause_commit_id, holder_agency, category,
                   held_at, expires_at, status)
                 VALUES ($13, $14, $15, $16, $17, $18, $19, $20, 'held') ON CONFLICT (hold_id) DO NOTHING"
            )))
            .bind(h.hold_id.as_uuid())
            .bind(h.shelter_id.as_uuid())
            .bind(h.referral_id.map(|i| i.as_uuid()))
            .bind(h.cause_commit_id.map(|i| i.as_uuid()))
            .bind(&h.holder_agency)
            .bind(h.category)
            .bind(h.held_at)
            .bind(h.expires_at),
        ShelterWrite::HoldStatus { hold_id, status, at } => {
            let (admitted, discharged) = match status {
                HoldStatus::Admitted => (Some(*at), None),
                HoldStatus::Discharged => (None, Some(*at)),
                HoldStatus::Released | HoldStatus::Expired => (None, None),
            };
            steps
                .bind(sqlx::query(with_steps!(
                    "UPDATE cp_holds SET status = $14, admitted_at = coalesce(admitted_at, $15),
                   discharged_at = coalesce(discharged_at, $16)
                 WHERE hold_id = $13"
                )))
                .bind(hold_id.as_uuid())
                .bind(status.as_str())
                .bind(admitted)
                .bind(discharged)
        }
    }
}
