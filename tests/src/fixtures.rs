//! Events written straight into a kernel event store, and a timer handler
//! that writes them, for the tests of the kernel itself (no service in between).

use nrm_kernel::store::{Actor, EventMetadata, EventStore, NewEvent, UnitOfWork};
use nrm_kernel::timers::{Timer, TimerHandler};
use nrm_proto::identification::v1 as pb;
use prost::Message as _;
use uuid::Uuid;

use crate::Parts;

/// Metadata of a police officer's command.
#[must_use]
pub fn metadata() -> EventMetadata {
    EventMetadata {
        correlation_id: Uuid::now_v7(),
        causation_id: Uuid::now_v7(),
        actor: Actor {
            agency: "kg-mvd".into(),
            role: "police".into(),
            officer: "officer-1".into(),
        },
        traceparent: None,
        tracestate: None,
    }
}

/// A report event of a new case, as the identification service writes it.
#[must_use]
pub fn reported(case_id: Uuid) -> NewEvent {
    NewEvent {
        event_type: "PresumedVictimReported".into(),
        schema_version: 1,
        payload: pb::IdentificationEvent {
            event: Some(pb::identification_event::Event::PresumedVictimReported(
                pb::PresumedVictimReported {
                    case_id: case_id.to_string(),
                    person_id: Uuid::now_v7().to_string(),
                    reporting_agency: "kg-mvd".into(),
                    reported_at: Some(prost_types::Timestamp {
                        seconds: 1_790_000_000,
                        nanos: 0,
                    }),
                    exploitation_forms: vec![pb::ExploitationForm::Labour as i32],
                    citizenship: "KG".into(),
                    status: pb::CaseStatus::Reported as i32,
                    ..Default::default()
                },
            )),
        }
        .encode_to_vec(),
    }
}

/// Appends a new case (version 1 of `case-<case_id>`) in a transaction of its own.
///
/// # Panics
/// When the store fails.
pub async fn append_case(parts: &Parts, store: &EventStore, case_id: Uuid) {
    let mut uow = store.begin().await.expect("begin");
    uow.append(
        &format!("case-{case_id}"),
        0,
        &[reported(case_id)],
        &metadata(),
        &parts.bus.subject("identification", "case", &case_id.to_string()),
    )
    .await
    .expect("append a case");
    uow.commit().await.expect("commit");
}

/// Kind of the timers [`CaseTimer`] fires.
pub const CASE_TIMER: &str = "test.case";

/// Fires [`CASE_TIMER`] timers: appends a new case named by the timer's
/// aggregate ID, and fails for an aggregate ID that is no UUID.
pub struct CaseTimer {
    /// The subject the cases are published under.
    pub subject: String,
}

impl TimerHandler for CaseTimer {
    fn kinds(&self) -> &'static [&'static str] {
        &[CASE_TIMER]
    }

    async fn fire(&self, uow: &mut UnitOfWork, timer: &Timer) -> Result<(), anyhow::Error> {
        let case_id: Uuid = timer
            .aggregate_id
            .parse()
            .map_err(|_| anyhow::anyhow!("timer {}: not a case", timer.id))?;
        uow.append(
            &format!("case-{case_id}"),
            0,
            &[reported(case_id)],
            &metadata(),
            &self.subject,
        )
        .await?;
        Ok(())
    }
}

/// The identification service's case list read model: (case, status, version), by case.
///
/// # Panics
/// When the query fails.
pub async fn case_list(pool: &sqlx::PgPool) -> Vec<(Uuid, i32, i64)> {
    sqlx::query_as("SELECT case_id, status, version FROM case_list ORDER BY case_id")
        .fetch_all(pool)
        .await
        .expect("read the case list")
}
