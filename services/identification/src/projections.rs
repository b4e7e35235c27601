//! Read models, fed by the kernel's projection runner; each can be dropped
//! and rebuilt by replaying.
//!
//! - [`CaseList`]: coded fields of every case, for listing with filters
//!   (from the service's own stream; anonymous notifications are no cases
//!   and are left out).
//! - [`crate::homecoming::Handovers`] (a reaction, not a read model): the
//!   cases opened on returns handed over from abroad.
//! - [`ReferralAccess`]: consents and accepted referrals (from the referral
//!   service's stream), deciding who else may read a person's identifiers.

use anyhow::Context as _;
use chrono::DateTime;
use nrm_kernel::projection::{Delivery, Projection};
use nrm_kernel::store::UnitOfWork;
use nrm_proto::identification::v1 as pb;
use pb::identification_event::Event;
use prost::Message as _;
use sqlx::PgConnection;
use uuid::Uuid;

/// The case list projection.
#[derive(Debug, Clone, Copy, Default)]
pub struct CaseList;

impl Projection for CaseList {
    fn name(&self) -> &'static str {
        "identification_case_list"
    }

    fn tables(&self) -> &'static [&'static str] {
        &["case_list"]
    }

    async fn apply(&self, uow: &mut UnitOfWork, delivery: &Delivery) -> Result<(), anyhow::Error> {
        let conn = uow.conn();
        for committed in &delivery.commit.events {
            let event = pb::IdentificationEvent::decode(committed.payload.as_slice())
                .with_context(|| format!("event {} does not decode", committed.event_id))?
                .event;
            let version = i64::try_from(committed.version)?;
            match event {
                Some(Event::PresumedVictimReported(r)) => insert_case(conn, &r, version, false).await?,
                Some(Event::CaseOpenedFromAbroad(opened)) => {
                    let r = opened.report.context("a case from abroad without its report")?;
                    insert_case(conn, &r, version, true).await?;
                }
                // An anonymous notification is no case: it is never listed.
                Some(Event::AnonymousNotificationFiled(_)) => {}
                Some(other) => {
                    let status = match &other {
                        Event::ScreeningCompleted(_) | Event::ReviewRequested(_) => {
                            Some(pb::CaseStatus::Presumed as i32)
                        }
                        Event::IdentificationDecided(d) if d.decision == pb::Decision::Identified as i32 => {
                            Some(pb::CaseStatus::Identified as i32)
                        }
                        Event::IdentificationDecided(_) => Some(pb::CaseStatus::NotIdentified as i32),
                        _ => None,
                    };
                    let case_id: Uuid = delivery
                        .commit
                        .stream_id
                        .strip_prefix("case-")
                        .context("unexpected stream")?
                        .parse()?;
                    // Streams written before reports carried their matches.
                    let matching = match &other {
                        Event::PossibleDuplicateFlagged(f) => uuids(&f.matching_case_ids)?,
                        _ => Vec::new(),
                    };
                    // The version guard keeps a replayed event from moving a case back.
                    sqlx::query(
                        "UPDATE case_list SET status = coalesce($2, status), version = $3,
                           matching_case_ids = ARRAY(SELECT DISTINCT unnest(matching_case_ids || $4::uuid[]))
                         WHERE case_id = $1 AND version < $3",
                    )
                    .bind(case_id)
                    .bind(status)
                    .bind(version)
                    .bind(&matching)
                    .execute(&mut *conn)
                    .await?;
                }
                None => anyhow::bail!("event {} is empty", committed.event_id),
            }
        }
        Ok(())
    }

    async fn reset(&self, conn: &mut PgConnection) -> Result<(), anyhow::Error> {
        sqlx::query("TRUNCATE case_list").execute(conn).await?;
        Ok(())
    }

    /// Every row of `case_list`, whole (nothing in it is wall-clock).
    async fn digest(&self, conn: &mut PgConnection) -> Result<Option<String>, anyhow::Error> {
        Ok(Some(
            nrm_kernel::projection::rows_digest(conn, "SELECT t::text FROM case_list t").await?,
        ))
    }
}

/// The row of a new case (its first event: a report, or a case from abroad).
async fn insert_case(
    conn: &mut PgConnection,
    r: &pb::PresumedVictimReported,
    version: i64,
    identified_abroad: bool,
) -> Result<(), anyhow::Error> {
    let case_id: Uuid = r.case_id.parse()?;
    let reported_at = r
        .reported_at
        .and_then(|t| DateTime::from_timestamp(t.seconds, u32::try_from(t.nanos).unwrap_or(0)))
        .context("report without time")?;
    let matching = uuids(&r.matching_case_ids)?;
    sqlx::query(
        "INSERT INTO case_list (case_id, status, reporting_agency, competent_authority, matching_case_ids, reported_at, exploitation_forms, child, citizenship, version, identified_abroad)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11) ON CONFLICT (case_id) DO NOTHING",
    )
    .bind(case_id)
    .bind(r.status)
    .bind(&r.reporting_agency)
    .bind(&r.competent_authority)
    .bind(&matching)
    .bind(reported_at)
    .bind(&r.exploitation_forms)
    .bind(r.child)
    .bind(&r.citizenship)
    .bind(version)
    .bind(identified_abroad)
    .execute(conn)
    .await?;
    Ok(())
}

fn uuids(ids: &[String]) -> Result<Vec<Uuid>, anyhow::Error> {
    ids.iter()
        .map(|id| id.parse::<Uuid>().context("a matching case ID is no UUID"))
        .collect()
}

/// What other agencies may read, from the referral service's events:
/// consents and the referrals they rest on. `GetPersonalData` checks it.
#[derive(Debug, Clone, Copy, Default)]
pub struct ReferralAccess;

fn timestamp(t: Option<prost_types::Timestamp>) -> Option<DateTime<chrono::Utc>> {
    t.and_then(|t| DateTime::from_timestamp(t.seconds, u32::try_from(t.nanos).unwrap_or(0)))
}

impl Projection for ReferralAccess {
    fn name(&self) -> &'static str {
        "identification_referral_access"
    }

    fn tables(&self) -> &'static [&'static str] {
        &["consents", "referrals"]
    }

    async fn apply(&self, uow: &mut UnitOfWork, delivery: &Delivery) -> Result<(), anyhow::Error> {
        use nrm_proto::referral::v1 as rf;
        use rf::referral_event::Event as R;
        let conn = uow.conn();
        for committed in &delivery.commit.events {
            let event = rf::ReferralEvent::decode(committed.payload.as_slice())
                .with_context(|| format!("referral event {} does not decode", committed.event_id))?
                .event;
            match event {
                Some(R::ConsentRecorded(c)) => {
                    sqlx::query(
                        "INSERT INTO consents (consent_id, person_id, recipient_agency, data_categories, expires_at)
                         VALUES ($1, $2, $3, $4, $5) ON CONFLICT (consent_id) DO NOTHING",
                    )
                    .bind(c.consent_id.parse::<Uuid>()?)
                    .bind(c.person_id.parse::<Uuid>()?)
                    .bind(&c.recipient_agency)
                    .bind(&c.data_categories)
                    .bind(timestamp(c.expires_at))
                    .execute(&mut *conn)
                    .await?;
                }
                Some(R::ConsentWithdrawn(c)) => {
                    sqlx::query("UPDATE consents SET withdrawn = true WHERE consent_id = $1")
                        .bind(c.consent_id.parse::<Uuid>()?)
                        .execute(&mut *conn)
                        .await?;
                }
                Some(R::ReferralCreated(r)) => {
                    sqlx::query(
                        "INSERT INTO referrals (referral_id, person_id, receiving_agency, consent_id, state)
                         VALUES ($1, $2, $3, $4, 'pending') ON CONFLICT (referral_id) DO NOTHING",
                    )
                    .bind(r.referral_id.parse::<Uuid>()?)
                    .bind(r.person_id.parse::<Uuid>()?)
                    .bind(&r.receiving_agency)
                    .bind(r.consent_id.parse::<Uuid>()?)
                    .execute(&mut *conn)
                    .await?;
                }
                Some(R::ReferralRedirected(r)) => {
                    sqlx::query(
                        "UPDATE referrals SET receiving_agency = $2, consent_id = $3, state = 'pending' WHERE referral_id = $1",
                    )
                    .bind(r.referral_id.parse::<Uuid>()?)
                    .bind(&r.receiving_agency)
                    .bind(r.consent_id.parse::<Uuid>()?)
                    .execute(&mut *conn)
                    .await?;
                }
                Some(R::ReferralAccepted(r)) => set_state(conn, &r.referral_id, "accepted").await?,
                Some(R::ReferralDeclined(r)) => set_state(conn, &r.referral_id, "ended").await?,
                Some(R::ReferralClosed(r)) => set_state(conn, &r.referral_id, "ended").await?,
                Some(R::ReferralCancelled(r)) => set_state(conn, &r.referral_id, "ended").await?,
                Some(_) => {}
                None => anyhow::bail!("referral event {} is empty", committed.event_id),
            }
        }
        Ok(())
    }

    async fn reset(&self, conn: &mut PgConnection) -> Result<(), anyhow::Error> {
        sqlx::query("TRUNCATE consents, referrals").execute(conn).await?;
        Ok(())
    }

    /// Every row of `consents` and `referrals`, whole, each tagged with its table.
    async fn digest(&self, conn: &mut PgConnection) -> Result<Option<String>, anyhow::Error> {
        Ok(Some(nrm_kernel::projection::rows_digest(conn, "SELECT 'consents ' || t::text FROM consents t UNION ALL SELECT 'referrals ' || t::text FROM referrals t").await?))
    }
}

async fn set_state(conn: &mut PgConnection, referral_id: &str, state: &str) -> Result<(), anyhow::Error> {
    sqlx::query("UPDATE referrals SET state = $2 WHERE referral_id = $1")
        .bind(referral_id.parse::<Uuid>()?)
        .bind(state)
        .execute(conn)
        .await?;
    Ok(())
}
