//! Read models, each fed by the kernel's projection runner and rebuilt by
//! replaying its stream:
//! - [`Persons`]: who identification knows, with their case, status,
//!   whether a child and the agencies holding the case (the reporting agency
//!   and the competent authority), from the identification stream.
//! - [`Inbox`]: every referral as its readers see it, with the columns the
//!   inbox filters on, from this service's own stream.

use anyhow::Context as _;
use nrm_kernel::projection::{Delivery, Projection};
use nrm_kernel::store::UnitOfWork;
use nrm_kernel::validate;
use nrm_proto::identification::v1 as idpb;
use nrm_proto::referral::v1 as pb;
use prost::Message as _;
use sqlx::PgConnection;
use uuid::Uuid;

use crate::app::{decode_event, queries};
use crate::domain::referral;

/// The persons read model, over the identification stream.
#[derive(Debug, Clone, Copy, Default)]
pub struct Persons;

/// Payload type of identification events.
const IDENTIFICATION_PAYLOAD: &str = "nrm.identification.v1.IdentificationEvent";

impl Projection for Persons {
    fn name(&self) -> &'static str {
        "referral_persons"
    }

    fn tables(&self) -> &'static [&'static str] {
        &["persons"]
    }

    async fn apply(&self, uow: &mut UnitOfWork, delivery: &Delivery) -> Result<(), anyhow::Error> {
        if delivery.commit.payload_type != IDENTIFICATION_PAYLOAD {
            return Ok(());
        }
        let Some(case_id) = delivery.commit.stream_id.strip_prefix("case-") else {
            return Ok(());
        };
        let case_id: Uuid = case_id.parse().context("case stream with a malformed ID")?;
        let conn = uow.conn();
        for committed in &delivery.commit.events {
            use idpb::identification_event::Event;
            let event = idpb::IdentificationEvent::decode(committed.payload.as_slice())
                .with_context(|| format!("event {} does not decode", committed.event_id))?
                .event;
            let version = i64::try_from(committed.version)?;
            let status = match &event {
                Some(Event::PresumedVictimReported(r)) => {
                    let person_id = r.person_id.parse().context("report with a malformed person ID")?;
                    insert_person(&mut *conn, person_id, case_id, r, version).await?;
                    continue;
                }
                Some(Event::CaseOpenedFromAbroad(opened)) => {
                    let r = opened
                        .report
                        .as_ref()
                        .context("a case from abroad without its report")?;
                    let person_id = r.person_id.parse().context("report with a malformed person ID")?;
                    insert_person(&mut *conn, person_id, case_id, r, version).await?;
                    continue;
                }
                Some(Event::ScreeningCompleted(_) | Event::ReviewRequested(_)) => Some(idpb::CaseStatus::Presumed),
                Some(Event::IdentificationDecided(d)) if d.decision == idpb::Decision::Identified as i32 => {
                    Some(idpb::CaseStatus::Identified)
                }
                Some(Event::IdentificationDecided(_)) => Some(idpb::CaseStatus::NotIdentified),
                Some(_) => None,
                None => anyhow::bail!("event {} is empty", committed.event_id),
            };
            // The version guard keeps a replayed event from moving a person back.
            sqlx::query(
                "UPDATE persons SET status = coalesce($2, status), version = $3 WHERE case_id = $1 AND version < $3",
            )
            .bind(case_id)
            .bind(status.map(|s| s as i32))
            .bind(version)
            .execute(&mut *conn)
            .await?;
        }
        Ok(())
    }

    async fn reset(&self, conn: &mut PgConnection) -> Result<(), anyhow::Error> {
        sqlx::query("TRUNCATE persons").execute(conn).await?;
        Ok(())
    }

    /// Every row of `persons`, whole (nothing in it is wall-clock).
    async fn digest(&self, conn: &mut PgConnection) -> Result<Option<String>, anyhow::Error> {
        Ok(Some(
            nrm_kernel::projection::rows_digest(conn, "SELECT t::text FROM persons t").await?,
        ))
    }
}

/// Writes the person a case's first event (`report`, at case stream
/// `version`) is of; a person known already keeps its status and version
/// and takes the agencies holding the case. The persons projection and the
/// reaction to cases from abroad both write it, in either order.
///
/// # Errors
/// When the database fails.
pub(crate) async fn insert_person(
    conn: &mut PgConnection,
    person_id: Uuid,
    case_id: Uuid,
    report: &idpb::PresumedVictimReported,
    version: i64,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "INSERT INTO persons (person_id, case_id, status, child, version, reporting_agency, competent_authority)
         VALUES ($1, $2, $3, $4, $5, $6, $7)
         ON CONFLICT (person_id) DO UPDATE
         SET reporting_agency = EXCLUDED.reporting_agency,
             competent_authority = EXCLUDED.competent_authority",
    )
    .bind(person_id)
    .bind(case_id)
    .bind(report.status)
    .bind(report.child)
    .bind(version)
    .bind(&report.reporting_agency)
    .bind(&report.competent_authority)
    .execute(conn)
    .await?;
    Ok(())
}

/// The inbox read model, over this service's referral subjects.
#[derive(Debug, Clone, Copy, Default)]
pub struct Inbox;

impl Projection for Inbox {
    fn name(&self) -> &'static str {
        "referral_inbox"
    }

    fn tables(&self) -> &'static [&'static str] {
        &["inbox"]
    }

    /// Folds the referral from the store up to the commit's last version
    /// (the same fold commands use), so the row is exactly the referral at
    /// that version, and keeps the newest.
    async fn apply(&self, uow: &mut UnitOfWork, delivery: &Delivery) -> Result<(), anyhow::Error> {
        let stream_id = &delivery.commit.stream_id;
        let Some(id) = stream_id.strip_prefix("referral-") else {
            return Ok(());
        };
        let referral_id: Uuid = id.parse().context("referral stream with a malformed ID")?;
        let Some(last) = delivery.commit.events.iter().map(|e| e.version).max() else {
            return Ok(());
        };
        let last = i64::try_from(last)?;
        let conn = uow.conn();
        let payloads: Vec<Vec<u8>> =
            sqlx::query_scalar("SELECT payload FROM events WHERE stream_id = $1 AND version <= $2 ORDER BY version")
                .bind(stream_id)
                .bind(last)
                .fetch_all(&mut *conn)
                .await?;
        let mut state = referral::Referral::default();
        for payload in &payloads {
            state = referral::evolve(state, &decode_event(payload)?);
        }
        let Some(created) = &state.created else {
            anyhow::bail!("referral {referral_id} has no creation event");
        };
        let created_at = created
            .created_at
            .as_ref()
            .and_then(validate::to_datetime)
            .context("referral without creation time")?;
        let view: pb::Referral = queries::view(&state);
        sqlx::query(
            "INSERT INTO inbox (referral_id, receiving_agency, status, urgency, overdue, created_at, version, view)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8)
             ON CONFLICT (referral_id) DO UPDATE SET receiving_agency = EXCLUDED.receiving_agency,
                 status = EXCLUDED.status, urgency = EXCLUDED.urgency, overdue = EXCLUDED.overdue,
                 version = EXCLUDED.version, view = EXCLUDED.view
             WHERE inbox.version < EXCLUDED.version",
        )
        .bind(referral_id)
        .bind(&state.receiving_agency)
        .bind(view.status)
        .bind(view.urgency)
        .bind(view.overdue)
        .bind(created_at)
        .bind(last)
        .bind(view.encode_to_vec())
        .execute(&mut *conn)
        .await?;
        Ok(())
    }

    async fn reset(&self, conn: &mut PgConnection) -> Result<(), anyhow::Error> {
        sqlx::query("TRUNCATE inbox").execute(conn).await?;
        Ok(())
    }

    /// Every row of `inbox`, whole (`created_at` is the event's time, not the write's).
    async fn digest(&self, conn: &mut PgConnection) -> Result<Option<String>, anyhow::Error> {
        Ok(Some(
            nrm_kernel::projection::rows_digest(conn, "SELECT t::text FROM inbox t").await?,
        ))
    }
}
