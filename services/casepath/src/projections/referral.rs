//! `casepath_referral`: the referral stream (consents, referrals, plans)
//! into `cp_consents`, `cp_referrals`, `cp_goals` and their steps.

use nrm_kernel::projection::{Delivery, Projection, rows_digest};
use nrm_kernel::store::UnitOfWork;
use nrm_kernel::xborder::CountryCode;
use sqlx::PgConnection;

use crate::domain::steps::{self, ReferralWrite};

/// The stream it reads.
pub const CONTEXT: &str = "referral";

/// The projection's name (checkpoint key, `cp_steps.source`).
pub const NAME: &str = "casepath_referral";

/// Every row the projection owns, one text line each.
const DIGEST: &str = "SELECT 'cp_consents|' || t::text FROM cp_consents t
    UNION ALL SELECT 'cp_referrals|' || t::text FROM cp_referrals t
    UNION ALL SELECT 'cp_goals|' || t::text FROM cp_goals t
    UNION ALL SELECT 'cp_steps|' || t::text FROM cp_steps t WHERE t.source = 'casepath_referral'";

/// The referral projection.
#[derive(Debug, Clone)]
pub struct ReferralProjection {
    country: CountryCode,
}

impl ReferralProjection {
    /// The projection of a deployment in `country`.
    #[must_use]
    pub fn new(country: &CountryCode) -> Self {
        Self {
            country: country.clone(),
        }
    }
}

impl Projection for ReferralProjection {
    fn name(&self) -> &'static str {
        NAME
    }

    async fn apply(&self, uow: &mut UnitOfWork, delivery: &Delivery) -> Result<(), anyhow::Error> {
        let effect = steps::referral(&delivery.commit, &super::origin(&self.country, delivery))?;
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
        sqlx::query("DELETE FROM cp_consents").execute(&mut *conn).await?;
        sqlx::query("DELETE FROM cp_referrals").execute(&mut *conn).await?;
        sqlx::query("DELETE FROM cp_goals").execute(&mut *conn).await?;
        super::reset_steps(conn, NAME).await
    }

    async fn digest(&self, conn: &mut PgConnection) -> Result<Option<String>, anyhow::Error> {
        Ok(Some(rows_digest(conn, DIGEST).await?))
    }
}

async fn write_one(conn: &mut PgConnection, write: &ReferralWrite) -> Result<(), anyhow::Error> {
    match write {
        ReferralWrite::Consent(c) => {
            sqlx::query(
                "INSERT INTO cp_consents (consent_id, person_id, case_id, recipient_agency, recorded_by_agency,
                   purposes, data_categories, recorded_at, expires_at)
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9) ON CONFLICT (consent_id) DO NOTHING",
            )
            .bind(c.consent_id.as_uuid())
            .bind(c.person_id.as_uuid())
            .bind(c.case_id.map(|i| i.as_uuid()))
            .bind(&c.recipient_agency)
            .bind(&c.recorded_by_agency)
            .bind(&c.purposes)
            .bind(&c.data_categories)
            .bind(c.recorded_at)
            .bind(c.expires_at)
            .execute(conn)
            .await?;
        }
        ReferralWrite::ConsentEnded {
            consent_id,
            ended_at,
            end_reason,
        } => {
            sqlx::query(
                "UPDATE cp_consents SET ended_at = coalesce(ended_at, $2),
                   end_reason = CASE WHEN ended_at IS NULL THEN $3 ELSE end_reason END
                 WHERE consent_id = $1",
            )
            .bind(consent_id.as_uuid())
            .bind(ended_at)
            .bind(end_reason)
            .execute(conn)
            .await?;
        }
        ReferralWrite::Referral(r) => {
            sqlx::query(
                "INSERT INTO cp_referrals (referral_id, person_id, case_id, referring_agency, receiving_agency,
                   consent_id, services, urgency, status, created_at, waiting_since, answer_due_at)
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, 'pending', $9, $9, $10) ON CONFLICT (referral_id) DO NOTHING",
            )
            .bind(r.referral_id.as_uuid())
            .bind(r.person_id.as_uuid())
            .bind(r.case_id.map(|i| i.as_uuid()))
            .bind(&r.referring_agency)
            .bind(&r.receiving_agency)
            .bind(r.consent_id.map(|i| i.as_uuid()))
            .bind(&r.services)
            .bind(r.urgency)
            .bind(r.created_at)
            .bind(r.answer_due_at)
            .execute(conn)
            .await?;
        }
        ReferralWrite::Accepted { referral_id, at } => {
            sqlx::query(
                "UPDATE cp_referrals SET status = 'accepted', accepted_at = $2,
                   answered_at = coalesce(answered_at, $2), waiting_since = NULL
                 WHERE referral_id = $1",
            )
            .bind(referral_id.as_uuid())
            .bind(at)
            .execute(conn)
            .await?;
        }
        ReferralWrite::Declined { referral_id, at } => {
            sqlx::query(
                "UPDATE cp_referrals SET status = 'declined', answered_at = coalesce(answered_at, $2), waiting_since = NULL
                 WHERE referral_id = $1",
            )
            .bind(referral_id.as_uuid())
            .bind(at)
            .execute(conn)
            .await?;
        }
        ReferralWrite::Redirected {
            referral_id,
            receiving_agency,
            at,
            answer_due_at,
            consent_id,
        } => {
            sqlx::query(
                "UPDATE cp_referrals SET receiving_agency = $2, status = 'pending', waiting_since = $3,
                   answer_due_at = $4, consent_id = coalesce($5, consent_id)
                 WHERE referral_id = $1",
            )
            .bind(referral_id.as_uuid())
            .bind(receiving_agency)
            .bind(at)
            .bind(answer_due_at)
            .bind(consent_id.map(|i| i.as_uuid()))
            .execute(conn)
            .await?;
        }
        ReferralWrite::Closed {
            referral_id,
            outcome,
            at,
        } => {
            sqlx::query(
                "UPDATE cp_referrals SET status = 'closed', outcome = $2, closed_at = $3, waiting_since = NULL
                 WHERE referral_id = $1",
            )
            .bind(referral_id.as_uuid())
            .bind(outcome)
            .bind(at)
            .execute(conn)
            .await?;
        }
        ReferralWrite::Cancelled { referral_id } => {
            sqlx::query("UPDATE cp_referrals SET status = 'cancelled', waiting_since = NULL WHERE referral_id = $1")
                .bind(referral_id.as_uuid())
                .execute(conn)
                .await?;
        }
        ReferralWrite::Goal(g) => {
            sqlx::query(
                "INSERT INTO cp_goals (goal_id, person_id, kind, added_at, due_at)
                 VALUES ($1, $2, $3, $4, $5) ON CONFLICT (goal_id) DO NOTHING",
            )
            .bind(g.goal_id.as_uuid())
            .bind(g.person_id.as_uuid())
            .bind(g.kind)
            .bind(g.added_at)
            .bind(g.due_at)
            .execute(conn)
            .await?;
        }
        ReferralWrite::GoalMet { goal_id, met_at } => {
            sqlx::query("UPDATE cp_goals SET met_at = coalesce(met_at, $2) WHERE goal_id = $1")
                .bind(goal_id.as_uuid())
                .bind(met_at)
                .execute(conn)
                .await?;
        }
    }
    Ok(())
}
