//! Beds at home for people announced from abroad: the arrivals reaction
//! ([`ArrivalPlacement`], checkpoint `shelter_arrivals`) on the home
//! country's repatriation stream (context `repatriation`).
//!
//! The repatriation service appends, for an incoming return, `ReturnAnnounced`
//! and then `AnnouncedStepRecorded`, each with a snapshot of the whole
//! return as it stands (only the fields the person consented to share). For
//! each snapshot, in stream order, one commit per transaction beside the
//! runner's checkpoint, the reaction
//! 1. keeps its own record of the return (`placement_returns`): the
//!    return's stream version acted on (a snapshot at or below it changes
//!    nothing: a redelivery, a replay of a recreated stream), whether it
//!    halted, its arrival time, and the one hold it made for it;
//! 2. the first time a snapshot that is not halted carries a shelter need
//!    (`ARRIVAL_NEED_SHELTER`) and an arrival time, tries once, ever:
//!    picks the shelters of the arrival point's region, then of the nearest
//!    regions of the same country ([`arrivals::candidates`]) from
//!    `shelter_beds` (written with the shelters' events), decides `HoldBed`
//!    on each in turn under its lock on its own folded state, and appends
//!    `BedHeld` for the returns agency (the home country's IOM,
//!    `NRM_SHELTER__RETURNS_AGENCY`), expiring a hold default after the
//!    arrival. No bed anywhere in the country: `NoBedAvailable` on
//!    `arrival-<return_id>`. Either way the return is placed and never
//!    tried again (a later snapshot with another arrival time moves
//!    nothing; a hold released by the operator or the IOM, or expired, is
//!    not made again);
//! 3. on a halted snapshot, releases the return's hold if it is still held
//!    (an admitted person stays). A handed-over return keeps its hold until
//!    it is admitted or expires.
//!
//! The hold's events name no referral: which return a hold is for lives in
//! `placement_returns`, written in the transaction of the `BedHeld`, and
//! `ListArrivals` shows it (the return's ID as the person's pseudonym, and
//! the arrival time the latest snapshot gives). Only this runner writes the
//! table, one message at a time (the runner's checkpoint row is locked in
//! each transaction, so replicas take turns).
//!
//! A deployment without the repatriation service has no such stream: the
//! runner waits for it (as every runner waits for the streams of other
//! services) and does nothing else.

use anyhow::Context as _;
use chrono::{DateTime, Utc};
use nrm_kernel::audit;
use nrm_kernel::ids::{HoldId, ReturnId, ShelterId};
use nrm_kernel::projection::{Delivery, Projection};
use nrm_kernel::store::{EventMetadata, UnitOfWork};
use nrm_kernel::validate;
use nrm_proto::repatriation::v1 as repatriation;
use nrm_proto::shelter::v1 as pb;
use prost::Message as _;
use repatriation::repatriation_event::Event as RepatriationEvent;
use sqlx::PgConnection;
use uuid::Uuid;

use super::{Choice, MAX_CANDIDATES, first_free, record_no_bed, release_held};
use crate::app::Shelters;
use crate::domain::{self, Command, HeldFor, arrivals};

/// Name of the repatriation context (its stream and subjects).
pub const REPATRIATION_CONTEXT: &str = "repatriation";
/// Full protobuf name of the repatriation service's domestic events.
pub const REPATRIATION_PAYLOAD_TYPE: &str = "nrm.repatriation.v1.RepatriationEvent";

/// The arrivals reaction.
#[derive(Debug, Clone)]
pub struct ArrivalPlacement {
    app: Shelters,
    returns_agency: String,
}

/// The reaction's record of one return, as the guard leaves it.
struct Record {
    placed: bool,
    hold: Option<(HoldId, ShelterId)>,
}

impl ArrivalPlacement {
    /// A reaction that holds beds through `app` for `returns_agency` (the
    /// agency that receives returning persons: it may read the shelter's
    /// address and release the hold).
    #[must_use]
    pub fn new(app: Shelters, returns_agency: impl Into<String>) -> Self {
        Self {
            app,
            returns_agency: returns_agency.into(),
        }
    }

    /// Records `snapshot` at the return's stream `version`; the record when
    /// the snapshot is new (above the version acted on), `None` otherwise.
    async fn guard(
        conn: &mut PgConnection,
        return_id: ReturnId,
        snapshot: &repatriation::CrossBorderReturn,
        version: i64,
    ) -> Result<Option<Record>, anyhow::Error> {
        let halted = snapshot.status == repatriation::ReturnStatus::Halted as i32;
        let arrival_at: Option<DateTime<Utc>> = snapshot.arrival_at.as_ref().and_then(validate::to_datetime);
        let row: Option<(bool, Option<Uuid>, Option<Uuid>)> = sqlx::query_as(
            "INSERT INTO placement_returns (return_id, version, halted, arrival_at) VALUES ($1, $2, $3, $4)
             ON CONFLICT (return_id) DO UPDATE SET
                 version = EXCLUDED.version,
                 halted = EXCLUDED.halted,
                 arrival_at = coalesce(EXCLUDED.arrival_at, placement_returns.arrival_at)
             WHERE placement_returns.version < EXCLUDED.version
             RETURNING placed, hold_id, shelter_id",
        )
        .bind(return_id.as_uuid())
        .bind(version)
        .bind(halted)
        .bind(arrival_at)
        .fetch_optional(conn)
        .await?;
        Ok(row.map(|(placed, hold_id, shelter_id)| Record {
            placed,
            hold: hold_id
                .zip(shelter_id)
                .map(|(h, s)| (HoldId::from_uuid(h), ShelterId::from_uuid(s))),
        }))
    }

    /// Acts on one snapshot of an incoming return.
    async fn follow(
        &self,
        uow: &mut UnitOfWork,
        snapshot: &repatriation::CrossBorderReturn,
        version: i64,
        metadata: &EventMetadata,
    ) -> Result<(), anyhow::Error> {
        let Ok(return_id) = ReturnId::parse("return_id", &snapshot.return_id) else {
            tracing::warn!("an announced return with a malformed return ID; ignored");
            return Ok(());
        };
        let Some(record) = Self::guard(uow.conn(), return_id, snapshot, version).await? else {
            tracing::info!(%return_id, version, "return snapshot acted on before");
            return Ok(());
        };
        if snapshot.status == repatriation::ReturnStatus::Halted as i32 {
            if let Some(hold) = record.hold {
                release_held(&self.app, uow, hold, "return halted", metadata).await?;
            }
            return Ok(());
        }
        if record.placed || !arrivals::needs_shelter(&snapshot.needs) {
            return Ok(());
        }
        let Some(arrival_at) = snapshot.arrival_at.as_ref().and_then(validate::to_datetime) else {
            // Placed once the itinerary gives an arrival time.
            return Ok(());
        };
        self.place(uow, return_id, snapshot, arrival_at, metadata).await
    }

    /// Holds one bed for the return, or records that none is free; marks it
    /// placed either way.
    async fn place(
        &self,
        uow: &mut UnitOfWork,
        return_id: ReturnId,
        snapshot: &repatriation::CrossBorderReturn,
        arrival_at: DateTime<Utc>,
        metadata: &EventMetadata,
    ) -> Result<(), anyhow::Error> {
        let category = arrivals::category_of(snapshot.gender, snapshot.age_band);
        let region = arrivals::region_of(&snapshot.arrival_point);
        let with_beds: Vec<(Uuid, String, i32)> = sqlx::query_as(
            "SELECT shelter_id, region, free FROM shelter_beds WHERE approved AND free > 0 AND category = $1",
        )
        .bind(category as i32)
        .fetch_all(uow.conn())
        .await?;
        let mut candidates = arrivals::candidates(region, with_beds);
        candidates.truncate(usize::try_from(MAX_CANDIDATES).unwrap_or(usize::MAX));
        let expires_at = arrivals::hold_until(arrival_at, Utc::now(), self.app.hold_minutes_default());
        let command = || Command::HoldBed {
            hold_id: HoldId::new(),
            category,
            held_for: HeldFor::Arrival,
            expires_at: validate::timestamp(expires_at),
            holder_agency: self.returns_agency.clone(),
        };
        let hold = match first_free(&self.app, uow, candidates, command).await? {
            Choice::Free {
                shelter_id,
                shelter,
                events,
            } => {
                let hold_id = events
                    .iter()
                    .find_map(|e| match e {
                        pb::shelter_event::Event::BedHeld(held) => held.hold_id.parse::<Uuid>().ok(),
                        _ => None,
                    })
                    .context("a hold without its BedHeld")?;
                // A conflict fails the message; the runner retries it on the new state.
                self.app.append(uow, shelter_id, &shelter, &events, metadata).await?;
                audit::record(
                    uow.conn(),
                    &metadata.actor,
                    "HoldBed",
                    &shelter_id.to_string(),
                    "return announced",
                )
                .await?;
                tracing::info!(%return_id, %shelter_id, %hold_id, "bed held for a person announced from abroad");
                Some((hold_id, shelter_id.as_uuid()))
            }
            // An arrival's hold never answers so; nothing to hold then.
            Choice::AlreadyHeld => None,
            Choice::NoBed => {
                record_no_bed(
                    &self.app,
                    uow,
                    (
                        domain::arrival_stream_id(return_id),
                        domain::ARRIVAL,
                        &return_id.to_string(),
                    ),
                    String::new(),
                    (region.unwrap_or_default(), category),
                    metadata,
                )
                .await?;
                tracing::info!(%return_id, "no bed free for a person announced from abroad");
                None
            }
        };
        sqlx::query("UPDATE placement_returns SET placed = true, hold_id = $2, shelter_id = $3 WHERE return_id = $1")
            .bind(return_id.as_uuid())
            .bind(hold.map(|(h, _)| h))
            .bind(hold.map(|(_, s)| s))
            .execute(uow.conn())
            .await?;
        Ok(())
    }
}

impl Projection for ArrivalPlacement {
    const READ_MODEL: bool = false;

    fn name(&self) -> &'static str {
        "shelter_arrivals"
    }

    async fn apply(&self, uow: &mut UnitOfWork, delivery: &Delivery) -> Result<(), anyhow::Error> {
        // Crossing commits (CrossBorderMessage) and outgoing returns share the stream.
        if delivery.commit.payload_type != REPATRIATION_PAYLOAD_TYPE {
            return Ok(());
        }
        let commit_id: Uuid = delivery.commit.commit_id.parse().context("commit ID")?;
        // Caused by the repatriation commit, in its trace.
        let cause = delivery.metadata.as_ref();
        let metadata = EventMetadata {
            causation_id: commit_id,
            traceparent: cause.and_then(|m| m.traceparent.clone()),
            tracestate: cause.and_then(|m| m.tracestate.clone()),
            ..EventMetadata::system("shelter.arrivals", cause)
        };
        for committed in &delivery.commit.events {
            let event = repatriation::RepatriationEvent::decode(committed.payload.as_slice())
                .with_context(|| format!("event {} does not decode", committed.event_id))?;
            let snapshot = match event.event {
                Some(RepatriationEvent::Announced(announced)) => announced.snapshot,
                Some(RepatriationEvent::AnnouncedStep(step)) => step.snapshot,
                _ => continue,
            };
            if let Some(snapshot) = snapshot {
                self.follow(uow, &snapshot, i64::try_from(committed.version)?, &metadata)
                    .await?;
            }
        }
        Ok(())
    }

    /// Nothing to empty: `placement_returns` stays, so a replay of the
    /// repatriation stream holds no bed twice.
    async fn reset(&self, _conn: &mut PgConnection) -> Result<(), anyhow::Error> {
        Ok(())
    }
}
