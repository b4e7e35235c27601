//! `casepath_identification`: the identification stream into `cp_cases`,
//! `cp_notifications` and the identification steps.

use nrm_kernel::projection::{Delivery, Projection, Unprocessable, rows_digest};
use nrm_kernel::store::UnitOfWork;
use nrm_kernel::xborder::CountryCode;
use sqlx::PgConnection;

use crate::domain::changes::WatchKey;

use crate::domain::steps::{self, IdentificationWrite};

/// The stream it reads.
pub const CONTEXT: &str = "identification";

/// The projection's name (checkpoint key, `cp_steps.source`).
pub const NAME: &str = "casepath_identification";

/// Every row the projection owns, one text line each.
const DIGEST: &str = "SELECT 'cp_cases|' || t::text FROM cp_cases t
    UNION ALL SELECT 'cp_notifications|' || t::text FROM cp_notifications t
    UNION ALL SELECT 'cp_steps|' || t::text FROM cp_steps t WHERE t.source = 'casepath_identification'";

/// The identification projection.
#[derive(Debug, Clone)]
pub struct IdentificationProjection {
    country: CountryCode,
    watch_key: WatchKey,
}

impl IdentificationProjection {
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

impl Projection for IdentificationProjection {
    fn name(&self) -> &'static str {
        NAME
    }

    async fn apply(&self, uow: &mut UnitOfWork, delivery: &Delivery) -> Result<(), anyhow::Error> {
        let effect = steps::identification(&delivery.commit, &super::origin(&self.country, delivery))
            .map_err(Unprocessable::new)?;
        super::report_skipped(NAME, delivery, &effect.skipped);
        if effect.is_empty() {
            return Ok(());
        }
        super::write_effect(uow.conn(), NAME, &self.watch_key, delivery, &effect, query).await
    }

    async fn reset(&self, conn: &mut PgConnection) -> Result<(), anyhow::Error> {
        sqlx::query("DELETE FROM cp_cases").execute(&mut *conn).await?;
        sqlx::query("DELETE FROM cp_notifications").execute(&mut *conn).await?;
        super::reset_steps(conn, NAME).await
    }

    async fn digest(&self, conn: &mut PgConnection) -> Result<Option<String>, anyhow::Error> {
        Ok(Some(rows_digest(conn, DIGEST).await?))
    }

    /// Its own tables and `cp_steps`, of which its digest counts its own
    /// rows (a rebuild compares in a shadow of them).
    fn tables(&self) -> &'static [&'static str] {
        &["cp_cases", "cp_notifications", "cp_steps"]
    }
}

/// The statement of one write, with `steps` (see [`super::write_effect`]).
fn query<'q>(write: &'q IdentificationWrite, steps: &'q super::Steps) -> super::Query<'q> {
    match write {
        IdentificationWrite::Open(row) => steps
            .bind(sqlx::query(with_steps!(
                "INSERT INTO cp_cases (case_id, person_id, reporting_agency, competent_authority, status, reported_at,
                   found_at, gender, age_band, child, citizenship, country_of_exploitation, exploitation_forms,
                   decision, decided_at, decision_waiting_since, from_country, return_id, possible_duplicate)
                 VALUES ($13, $14, $15, $16, $17, $18, $19, $20, $21, $22, $23, $24, $25, $26, $27, $28, $29, $30, $31)
                 ON CONFLICT (case_id) DO NOTHING"
            )))
            .bind(row.case_id.as_uuid())
            .bind(row.person_id.as_uuid())
            .bind(&row.reporting_agency)
            .bind(&row.competent_authority)
            .bind(row.status)
            .bind(row.reported_at)
            .bind(row.found_at)
            .bind(row.gender)
            .bind(row.age_band)
            .bind(row.child)
            .bind(&row.citizenship)
            .bind(&row.country_of_exploitation)
            .bind(&row.exploitation_forms)
            .bind(row.decision)
            .bind(row.decided_at)
            .bind(row.decision_waiting_since)
            .bind(row.from_country.as_deref())
            .bind(row.return_id.map(|r| r.as_uuid()))
            .bind(row.possible_duplicate),
        IdentificationWrite::FlagDuplicate { case_id } => steps
            .bind(sqlx::query(with_steps!(
                "UPDATE cp_cases SET possible_duplicate = true WHERE case_id = $13"
            )))
            .bind(case_id.as_uuid()),
        IdentificationWrite::Screened { case_id } => steps
            .bind(sqlx::query(with_steps!(
                "UPDATE cp_cases SET status = $14 WHERE case_id = $13"
            )))
            .bind(case_id.as_uuid())
            .bind(nrm_proto::identification::v1::CaseStatus::Presumed as i32),
        IdentificationWrite::Decided {
            case_id,
            status,
            decision,
            decided_at,
        } => steps
            .bind(sqlx::query(with_steps!(
                "UPDATE cp_cases SET status = $14, decision = $15, decided_at = $16, decision_waiting_since = NULL
                 WHERE case_id = $13"
            )))
            .bind(case_id.as_uuid())
            .bind(status)
            .bind(decision)
            .bind(decided_at),
        IdentificationWrite::ReviewRequested { case_id, requested_at } => steps
            .bind(sqlx::query(with_steps!(
                "UPDATE cp_cases SET status = $14, decision_waiting_since = $15 WHERE case_id = $13"
            )))
            .bind(case_id.as_uuid())
            .bind(nrm_proto::identification::v1::CaseStatus::Presumed as i32)
            .bind(requested_at),
        IdentificationWrite::Erased { person_id, erased_at } => steps
            .bind(sqlx::query(with_steps!(
                "UPDATE cp_cases SET erased_at = coalesce(erased_at, $14) WHERE person_id = $13"
            )))
            .bind(person_id.as_uuid())
            .bind(erased_at),
        IdentificationWrite::Notification(n) => steps
            .bind(sqlx::query(with_steps!(
                "INSERT INTO cp_notifications (notification_id, filed_on, found_country, country_of_exploitation,
                   exploitation_forms, gender, age_band, citizenship)
                 VALUES ($13, $14, $15, $16, $17, $18, $19, $20) ON CONFLICT (notification_id) DO NOTHING"
            )))
            .bind(n.notification_id)
            .bind(n.filed_on)
            .bind(&n.found_country)
            .bind(&n.country_of_exploitation)
            .bind(&n.exploitation_forms)
            .bind(n.gender)
            .bind(n.age_band)
            .bind(&n.citizenship),
    }
}
