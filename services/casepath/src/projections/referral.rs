//! `casepath_referral`: the referral stream (consents, referrals, plans)
//! into `cp_consents`, `cp_referrals`, `cp_goals` and their steps.

use nrm_kernel::projection::{Delivery, Projection, Unprocessable, rows_digest};
use nrm_kernel::store::UnitOfWork;
use nrm_kernel::xborder::CountryCode;
use sqlx::PgConnection;

use crate::domain::changes::WatchKey;

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
    watch_key: WatchKey,
}

impl ReferralProjection {
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

impl Projection for ReferralProjection {
    fn name(&self) -> &'static str {
        NAME
    }

    async fn apply(&self, uow: &mut UnitOfWork, delivery: &Delivery) -> Result<(), anyhow::Error> {
        let effect =
            steps::referral(&delivery.commit, &super::origin(&self.country, delivery)).map_err(Unprocessable::new)?;
        super::report_skipped(NAME, delivery, &effect.skipped);
        if effect.is_empty() {
            return Ok(());
        }
        super::write_effect(uow.conn(), NAME, &self.watch_key, delivery, &effect, query).await
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

    /// Its own tables and `cp_steps`, of which its digest counts its own
    /// rows (a rebuild compares in a shadow of them).
    fn tables(&self) -> &'static [&'static str] {
        &["cp_consents", "cp_referrals", "cp_goals", "cp_steps"]
    }
}

/// The statement of one write, with `steps` (see [`super::write_effect`]).
fn query<'q>(write: &'q ReferralWrite, steps: &'q super::Steps) -> super::Query<'q> {
    match write {
        ReferralWrite::Consent(c) => {
            steps.bind(sqlx::query(with_steps!("INSERT INTO cp_consents (consent_id, person_id, case_id, recipient_agency, recorded_by_agency,
                   purposes, data_categories, recorded_at, expires_at)
                 VALUES ($13, $14, $15, $16, $17, $18, $19, $20, $21) ON CONFLICT (consent_id) DO NOTHING")))
            .bind(c.consent_id.as_uuid())
            .bind(c.person_id.as_uuid())
            .bind(c.case_id.map(|i| i.as_uuid()))
            .bind(&c.recipient_agency)
            .bind(&c.recorded_by_agency)
            .bind(&c.purposes)
            .bind(&c.data_categories)
            .bind(c.recorded_at)
            .bind(c.expires_at)
        }
        ReferralWrite::ConsentEnded {
            consent_id,
            ended_at,
            end_reason,
        } => {
            steps.bind(sqlx::query(with_steps!("UPDATE cp_consents SET ended_at = coalesce(ended_at, $14),
                   end_reason = CASE WHEN ended_at IS NULL THEN $15 ELSE end_reason END
                 WHERE consent_id = $13")))
            .bind(consent_id.as_uuid())
            .bind(ended_at)
            .bind(end_reason)
        }
        ReferralWrite::Referral(r) => {
            steps.bind(sqlx::query(with_steps!("INSERT INTO cp_referrals (referral_id, person_id, case_id, referring_agency, receiving_agency,
                   consent_id, services, urgency, status, created_at, waiting_since, answer_due_at)
                 VALUES ($13, $14, $15, $16, $17, $18, $19, $20, 'pending', $21, $21, $22) ON CONFLICT (referral_id) DO NOTHING")))
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
        }
        ReferralWrite::Accepted { referral_id, at } => {
            steps.bind(sqlx::query(with_steps!("UPDATE cp_referrals SET status = 'accepted', accepted_at = $14,
                   answered_at = coalesce(answered_at, $14), waiting_since = NULL
                 WHERE referral_id = $13")))
            .bind(referral_id.as_uuid())
            .bind(at)
        }
        ReferralWrite::Declined { referral_id, at } => {
            steps.bind(sqlx::query(with_steps!("UPDATE cp_referrals SET status = 'declined', answered_at = coalesce(answered_at, $14), waiting_since = NULL
                 WHERE referral_id = $13")))
            .bind(referral_id.as_uuid())
            .bind(at)
        }
        ReferralWrite::Redirected {
            referral_id,
            receiving_agency,
            at,
            answer_due_at,
            consent_id,
        } => {
            steps.bind(sqlx::query(with_steps!("UPDATE cp_referrals SET receiving_agency = $14, status = 'pending', waiting_since = $15,
                   answer_due_at = $16, consent_id = coalesce($17, consent_id)
                 WHERE referral_id = $13")))
            .bind(referral_id.as_uuid())
            .bind(receiving_agency)
            .bind(at)
            .bind(answer_due_at)
            .bind(consent_id.map(|i| i.as_uuid()))
        }
        ReferralWrite::Closed {
            referral_id,
            outcome,
            at,
        } => {
            steps.bind(sqlx::query(with_steps!("UPDATE cp_referrals SET status = 'closed', outcome = $14, closed_at = $15, waiting_since = NULL
                 WHERE referral_id = $13")))
            .bind(referral_id.as_uuid())
            .bind(outcome)
            .bind(at)
        }
        ReferralWrite::Cancelled { referral_id } => {
            steps.bind(sqlx::query(with_steps!("UPDATE cp_referrals SET status = 'cancelled', waiting_since = NULL WHERE referral_id = $13")))
                .bind(referral_id.as_uuid())
        }
        ReferralWrite::Goal(g) => {
            steps.bind(sqlx::query(with_steps!("INSERT INTO cp_goals (goal_id, person_id, kind, added_at, due_at)
                 VALUES ($13, $14, $15, $16, $17) ON CONFLICT (goal_id) DO NOTHING")))
            .bind(g.goal_id.as_uuid())
            .bind(g.person_id.as_uuid())
            .bind(g.kind)
            .bind(g.added_at)
            .bind(g.due_at)
        }
        ReferralWrite::GoalMet { goal_id, met_at } => {
            steps.bind(sqlx::query(with_steps!("UPDATE cp_goals SET met_at = coalesce(met_at, $14) WHERE goal_id = $13")))
                .bind(goal_id.as_uuid())
                .bind(met_at)
        }
    }
}
