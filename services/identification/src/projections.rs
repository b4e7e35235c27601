//! The `case_list` read model: coded fields of every case, for listing with
//! filters. Fed by the kernel's projection runner from the service's own
//! stream; can be dropped and rebuilt by replaying.

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

    async fn apply(&self, uow: &mut UnitOfWork, delivery: &Delivery) -> Result<(), anyhow::Error> {
        let conn = uow.conn();
        for committed in &delivery.commit.events {
            let event = pb::IdentificationEvent::decode(committed.payload.as_slice())
                .with_context(|| format!("event {} does not decode", committed.event_id))?
                .event;
            let version = i64::try_from(committed.version)?;
            match event {
                Some(Event::PresumedVictimReported(r)) => {
                    let case_id: Uuid = r.case_id.parse()?;
                    let reported_at = r
                        .reported_at
                        .and_then(|t| DateTime::from_timestamp(t.seconds, u32::try_from(t.nanos).unwrap_or(0)))
                        .context("report without time")?;
                    sqlx::query(
                        "INSERT INTO case_list (case_id, status, reporting_agency, reported_at, exploitation_forms, child, citizenship, version)
                         VALUES ($1, $2, $3, $4, $5, $6, $7, $8) ON CONFLICT (case_id) DO NOTHING",
                    )
                    .bind(case_id)
                    .bind(r.status)
                    .bind(&r.reporting_agency)
                    .bind(reported_at)
                    .bind(&r.exploitation_forms)
                    .bind(r.child)
                    .bind(&r.citizenship)
                    .bind(version)
                    .execute(&mut *conn)
                    .await?;
                }
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
                    // The version guard keeps a replayed event from moving a case back.
                    sqlx::query(
                        "UPDATE case_list SET status = coalesce($2, status), version = $3 WHERE case_id = $1 AND version < $3",
                    )
                    .bind(case_id)
                    .bind(status)
                    .bind(version)
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
}
