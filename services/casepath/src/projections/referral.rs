//! `casepath_referral`: the referral stream (consents, referrals, plans)
//! into `cp_consents`, `cp_referrals`, `cp_goals`, their steps, and each
//! person's statistical facts derived from them (`cp_person_referrals`).

use nrm_kernel::projection::{Delivery, Projection, rows_digest};
use nrm_kernel::store::UnitOfWork;
use nrm_kernel::xborder::CountryCode;
use sqlx::PgConnection;
use uuid::Uuid;

use super::{column, int_array};
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
    UNION ALL SELECT 'cp_person_referrals|' || t::text FROM cp_person_referrals t
    UNION ALL SELECT 'cp_steps|' || t::text FROM cp_steps t WHERE t.source = 'casepath_referral'";

/// `cp_person_referrals` from `cp_referrals` and `cp_goals` (one row per
/// person with a referral or a plan goal, for the statistics): `flags` has
/// 8 for a referral pending, 16 accepted, 32 closed with an outcome, 512 a
/// plan goal, 1024 a goal not met; `last_met_at` is when the last goal was
/// met. `$prefix`, `$records`, `$facts` and `upsert` or `insert` as in
/// `person_cases!` (identification).
macro_rules! person_referrals {
    (@conflict upsert) => {
        "ON CONFLICT (person_id) DO UPDATE SET flags = excluded.flags, last_met_at = excluded.last_met_at
WHERE (s.flags, s.last_met_at) IS DISTINCT FROM (excluded.flags, excluded.last_met_at)"
    };
    (@conflict insert) => {
        ""
    };
    ($prefix:literal, $records:literal, $facts:literal, $how:ident) => {
        concat!(
            "WITH ",
            $prefix,
            r"x AS (
    SELECT person_id,
        CASE status WHEN 'pending' THEN 8 WHEN 'accepted' THEN 16
            WHEN 'closed' THEN CASE WHEN outcome <> 0 THEN 32 ELSE 0 END ELSE 0 END AS f,
        NULL::timestamptz AS met_at
    FROM cp_referrals WHERE ",
            $records,
            r"
    UNION ALL
    SELECT person_id, CASE WHEN met_at IS NULL THEN 1536 ELSE 512 END, met_at
    FROM cp_goals WHERE ",
            $records,
            r"
),
gone AS (
    DELETE FROM cp_person_referrals s
    WHERE ",
            $facts,
            r" AND NOT EXISTS (SELECT FROM x WHERE x.person_id = s.person_id)
)
INSERT INTO cp_person_referrals AS s (person_id, flags, last_met_at)
SELECT person_id, bit_or(f), max(met_at) FROM x GROUP BY person_id
ORDER BY person_id
",
            person_referrals!(@conflict $how)
        )
    };
}

/// [`person_referrals!`] of the persons of the referrals `$1` and the goals `$2`.
const PERSON_REFERRALS_OF: &str = person_referrals!(
    "t AS (SELECT person_id FROM cp_referrals WHERE referral_id = ANY($1::uuid[])
    UNION SELECT person_id FROM cp_goals WHERE goal_id = ANY($2::uuid[])),\n",
    "person_id IN (SELECT person_id FROM t)",
    "s.person_id IN (SELECT person_id FROM t)",
    upsert
);

/// [`person_referrals!`] of every person, into an emptied table
/// ([`super::derive_all`]).
const PERSON_REFERRALS_ALL: &str = person_referrals!("", "true", "true", insert);

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
        self.apply_batch(uow, &[delivery]).await
    }

    async fn apply_batch(&self, uow: &mut UnitOfWork, deliveries: &[&Delivery]) -> Result<(), anyhow::Error> {
        super::apply_commits(
            uow,
            NAME,
            &self.country,
            &self.watch_key,
            deliveries,
            |delivery, origin| steps::referral(&delivery.commit, origin),
        )
        .await
    }

    async fn reset(&self, conn: &mut PgConnection) -> Result<(), anyhow::Error> {
        sqlx::query("DELETE FROM cp_consents").execute(&mut *conn).await?;
        sqlx::query("DELETE FROM cp_referrals").execute(&mut *conn).await?;
        sqlx::query("DELETE FROM cp_goals").execute(&mut *conn).await?;
        sqlx::query("DELETE FROM cp_person_referrals")
            .execute(&mut *conn)
            .await?;
        super::reset_steps(conn, NAME).await
    }

    /// Every person's `cp_person_referrals`, once, from the replayed records.
    async fn after_replay(&self, conn: &mut PgConnection) -> Result<(), anyhow::Error> {
        super::derive_all(conn, "cp_person_referrals", PERSON_REFERRALS_ALL).await
    }

    async fn digest(&self, conn: &mut PgConnection) -> Result<Option<String>, anyhow::Error> {
        Ok(Some(rows_digest(conn, DIGEST).await?))
    }

    /// Its own tables and `cp_steps`, of which its digest counts its own
    /// rows (a rebuild compares in a shadow of them).
    fn tables(&self) -> &'static [&'static str] {
        &[
            "cp_consents",
            "cp_referrals",
            "cp_goals",
            "cp_person_referrals",
            "cp_steps",
        ]
    }
}

impl super::Write for ReferralWrite {
    fn row(&self) -> Option<(&'static str, Uuid)> {
        Some(match self {
            Self::Consent(c) => ("cp_consents", c.consent_id.as_uuid()),
            Self::ConsentEnded { consent_id, .. } => ("cp_consents", consent_id.as_uuid()),
            Self::Referral(r) => ("cp_referrals", r.referral_id.as_uuid()),
            Self::Accepted { referral_id, .. }
            | Self::Declined { referral_id, .. }
            | Self::Redirected { referral_id, .. }
            | Self::Closed { referral_id, .. }
            | Self::Cancelled { referral_id } => ("cp_referrals", referral_id.as_uuid()),
            Self::Goal(g) => ("cp_goals", g.goal_id.as_uuid()),
            Self::GoalMet { goal_id, .. } => ("cp_goals", goal_id.as_uuid()),
        })
    }

    #[allow(clippy::too_many_lines)] // One statement per kind of write, side by side.
    async fn run(conn: &mut PgConnection, round: &[&Self]) -> Result<(), anyhow::Error> {
        let mut consents = Vec::new();
        let mut ended = Vec::new();
        let mut referrals = Vec::new();
        let mut accepted = Vec::new();
        let mut declined = Vec::new();
        let mut redirected = Vec::new();
        let mut closed = Vec::new();
        let mut cancelled = Vec::new();
        let mut goals = Vec::new();
        let mut met = Vec::new();
        for write in round {
            match write {
                Self::Consent(c) => consents.push(c),
                Self::ConsentEnded {
                    consent_id,
                    ended_at,
                    end_reason,
                } => ended.push((consent_id.as_uuid(), *ended_at, *end_reason)),
                Self::Referral(r) => referrals.push(r),
                Self::Accepted { referral_id, at } => accepted.push((referral_id.as_uuid(), *at)),
                Self::Declined { referral_id, at } => declined.push((referral_id.as_uuid(), *at)),
                Self::Redirected {
                    referral_id,
                    receiving_agency,
                    at,
                    answer_due_at,
                    consent_id,
                } => redirected.push((
                    referral_id.as_uuid(),
                    receiving_agency.as_str(),
                    *at,
                    *answer_due_at,
                    consent_id.map(|i| i.as_uuid()),
                )),
                Self::Closed {
                    referral_id,
                    outcome,
                    at,
                } => closed.push((referral_id.as_uuid(), *outcome, *at)),
                Self::Cancelled { referral_id } => cancelled.push(referral_id.as_uuid()),
                Self::Goal(g) => goals.push(g),
                Self::GoalMet { goal_id, met_at } => met.push((goal_id.as_uuid(), *met_at)),
            }
        }
        if !consents.is_empty() {
            sqlx::query(
                "INSERT INTO cp_consents (consent_id, person_id, case_id, recipient_agency, recorded_by_agency,
                   purposes, data_categories, recorded_at, expires_at)
                 SELECT v.consent_id, v.person_id, v.case_id, v.recipient_agency, v.recorded_by_agency,
                   v.purposes::int4[], v.data_categories::int4[], v.recorded_at, v.expires_at
                 FROM unnest($1::uuid[], $2::uuid[], $3::uuid[], $4::text[], $5::text[], $6::text[], $7::text[],
                   $8::timestamptz[], $9::timestamptz[])
                   AS v(consent_id, person_id, case_id, recipient_agency, recorded_by_agency, purposes, data_categories,
                     recorded_at, expires_at)
                 ON CONFLICT (consent_id) DO NOTHING",
            )
            .bind(column(&consents, |c| c.consent_id.as_uuid()))
            .bind(column(&consents, |c| c.person_id.as_uuid()))
            .bind(column(&consents, |c| c.case_id.map(|i| i.as_uuid())))
            .bind(column(&consents, |c| c.recipient_agency.as_str()))
            .bind(column(&consents, |c| c.recorded_by_agency.as_str()))
            .bind(column(&consents, |c| int_array(&c.purposes)))
            .bind(column(&consents, |c| int_array(&c.data_categories)))
            .bind(column(&consents, |c| c.recorded_at))
            .bind(column(&consents, |c| c.expires_at))
            .execute(&mut *conn)
            .await?;
        }
        if !ended.is_empty() {
            sqlx::query(
                "UPDATE cp_consents c SET ended_at = coalesce(c.ended_at, v.ended_at),
                   end_reason = CASE WHEN c.ended_at IS NULL THEN v.end_reason ELSE c.end_reason END
                 FROM unnest($1::uuid[], $2::timestamptz[], $3::int4[]) AS v(consent_id, ended_at, end_reason)
                 WHERE c.consent_id = v.consent_id",
            )
            .bind(column(&ended, |e| e.0))
            .bind(column(&ended, |e| e.1))
            .bind(column(&ended, |e| e.2))
            .execute(&mut *conn)
            .await?;
        }
        if !referrals.is_empty() {
            sqlx::query(
                "INSERT INTO cp_referrals (referral_id, person_id, case_id, referring_agency, receiving_agency,
                   consent_id, services, urgency, status, created_at, waiting_since, answer_due_at)
                 SELECT v.referral_id, v.person_id, v.case_id, v.referring_agency, v.receiving_agency, v.consent_id,
                   v.services::int4[], v.urgency, 'pending', v.created_at, v.created_at, v.answer_due_at
                 FROM unnest($1::uuid[], $2::uuid[], $3::uuid[], $4::text[], $5::text[], $6::uuid[], $7::text[],
                   $8::int4[], $9::timestamptz[], $10::timestamptz[])
                   AS v(referral_id, person_id, case_id, referring_agency, receiving_agency, consent_id, services,
                     urgency, created_at, answer_due_at)
                 ON CONFLICT (referral_id) DO NOTHING",
            )
            .bind(column(&referrals, |r| r.referral_id.as_uuid()))
            .bind(column(&referrals, |r| r.person_id.as_uuid()))
            .bind(column(&referrals, |r| r.case_id.map(|i| i.as_uuid())))
            .bind(column(&referrals, |r| r.referring_agency.as_str()))
            .bind(column(&referrals, |r| r.receiving_agency.as_str()))
            .bind(column(&referrals, |r| r.consent_id.map(|i| i.as_uuid())))
            .bind(column(&referrals, |r| int_array(&r.services)))
            .bind(column(&referrals, |r| r.urgency))
            .bind(column(&referrals, |r| r.created_at))
            .bind(column(&referrals, |r| r.answer_due_at))
            .execute(&mut *conn)
            .await?;
        }
        if !accepted.is_empty() {
            sqlx::query(
                "UPDATE cp_referrals r SET status = 'accepted', accepted_at = v.at,
                   answered_at = coalesce(r.answered_at, v.at), waiting_since = NULL
                 FROM unnest($1::uuid[], $2::timestamptz[]) AS v(referral_id, at) WHERE r.referral_id = v.referral_id",
            )
            .bind(column(&accepted, |a| a.0))
            .bind(column(&accepted, |a| a.1))
            .execute(&mut *conn)
            .await?;
        }
        if !declined.is_empty() {
            sqlx::query(
                "UPDATE cp_referrals r SET status = 'declined', answered_at = coalesce(r.answered_at, v.at),
                   waiting_since = NULL
                 FROM unnest($1::uuid[], $2::timestamptz[]) AS v(referral_id, at) WHERE r.referral_id = v.referral_id",
            )
            .bind(column(&declined, |d| d.0))
            .bind(column(&declined, |d| d.1))
            .execute(&mut *conn)
            .await?;
        }
        if !redirected.is_empty() {
            sqlx::query(
                "UPDATE cp_referrals r SET receiving_agency = v.receiving_agency, status = 'pending',
                   waiting_since = v.at, answer_due_at = v.answer_due_at, consent_id = coalesce(v.consent_id, r.consent_id)
                 FROM unnest($1::uuid[], $2::text[], $3::timestamptz[], $4::timestamptz[], $5::uuid[])
                   AS v(referral_id, receiving_agency, at, answer_due_at, consent_id)
                 WHERE r.referral_id = v.referral_id",
            )
            .bind(column(&redirected, |r| r.0))
            .bind(column(&redirected, |r| r.1))
            .bind(column(&redirected, |r| r.2))
            .bind(column(&redirected, |r| r.3))
            .bind(column(&redirected, |r| r.4))
            .execute(&mut *conn)
            .await?;
        }
        if !closed.is_empty() {
            sqlx::query(
                "UPDATE cp_referrals r SET status = 'closed', outcome = v.outcome, closed_at = v.at, waiting_since = NULL
                 FROM unnest($1::uuid[], $2::int4[], $3::timestamptz[]) AS v(referral_id, outcome, at)
                 WHERE r.referral_id = v.referral_id",
            )
            .bind(column(&closed, |c| c.0))
            .bind(column(&closed, |c| c.1))
            .bind(column(&closed, |c| c.2))
            .execute(&mut *conn)
            .await?;
        }
        if !cancelled.is_empty() {
            sqlx::query(
                "UPDATE cp_referrals r SET status = 'cancelled', waiting_since = NULL
                 FROM unnest($1::uuid[]) AS v(referral_id) WHERE r.referral_id = v.referral_id",
            )
            .bind(cancelled)
            .execute(&mut *conn)
            .await?;
        }
        if !goals.is_empty() {
            sqlx::query(
                "INSERT INTO cp_goals (goal_id, person_id, kind, added_at, due_at)
                 SELECT * FROM unnest($1::uuid[], $2::uuid[], $3::int4[], $4::timestamptz[], $5::timestamptz[])
                 ON CONFLICT (goal_id) DO NOTHING",
            )
            .bind(column(&goals, |g| g.goal_id.as_uuid()))
            .bind(column(&goals, |g| g.person_id.as_uuid()))
            .bind(column(&goals, |g| g.kind))
            .bind(column(&goals, |g| g.added_at))
            .bind(column(&goals, |g| g.due_at))
            .execute(&mut *conn)
            .await?;
        }
        if !met.is_empty() {
            sqlx::query(
                "UPDATE cp_goals g SET met_at = coalesce(g.met_at, v.met_at)
                 FROM unnest($1::uuid[], $2::timestamptz[]) AS v(goal_id, met_at) WHERE g.goal_id = v.goal_id",
            )
            .bind(column(&met, |m| m.0))
            .bind(column(&met, |m| m.1))
            .execute(&mut *conn)
            .await?;
        }
        Ok(())
    }

    async fn refresh(conn: &mut PgConnection, writes: &[&Self]) -> Result<(), anyhow::Error> {
        let mut referrals = Vec::new();
        let mut goals = Vec::new();
        for write in writes {
            match write.row() {
                Some(("cp_referrals", id)) => referrals.push(id),
                Some(("cp_goals", id)) => goals.push(id),
                _ => {}
            }
        }
        if referrals.is_empty() && goals.is_empty() {
            return Ok(());
        }
        sqlx::query(PERSON_REFERRALS_OF)
            .bind(referrals)
            .bind(goals)
            .execute(conn)
            .await?;
        Ok(())
    }
}
