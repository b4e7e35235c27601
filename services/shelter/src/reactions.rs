//! What the service does without a caller: holding a bed when a referral with
//! a shelter need is accepted, and expiring holds nobody acted on.
//!
//! - [`Placement`]: a reaction on the referral stream. On `ReferralAccepted`
//!   with a shelter need it picks the shelter of the region with the most
//!   free beds of the category (from the `free_capacity` read model), decides
//!   `HoldBed` on that shelter's current state and appends `BedHeld` (with
//!   its expiry timer) in the runner's unit of work, beside the checkpoint.
//!   A version conflict fails the message, which the runner retries in
//!   place. When no shelter of the region has a bed, it appends
//!   `NoBedAvailable` with the nearest regions that have one to
//!   `placement-<referral_id>`. A commit is acted on once
//!   (`placement_handled`, in the same transaction), and a referral that
//!   already holds or occupies a bed gets no second one.
//! - [`HoldExpiry`]: the handler of the `shelter.hold_expiry` timers, which
//!   appends `HoldExpired` when the hold is still held.

use anyhow::Context as _;
use chrono::Utc;
use nrm_kernel::ids::{HoldId, ReferralId, ShelterId};
use nrm_kernel::projection::{Delivery, Projection};
use nrm_kernel::store::{EventMetadata, UnitOfWork};
use nrm_kernel::timers::{Timer, TimerHandler};
use nrm_kernel::{audit, validate};
use nrm_proto::referral::v1 as referral;
use nrm_proto::shelter::v1 as pb;
use prost::Message as _;
use sqlx::{PgConnection, Postgres, QueryBuilder};
use uuid::Uuid;

use crate::app::{CONTEXT, HOLD_EXPIRY, Shelters, system_actor, to_new_events};
use crate::domain::{self, Command, DomainError, parse, regions};

/// Full protobuf name of the referral service's events.
pub const REFERRAL_PAYLOAD_TYPE: &str = "nrm.referral.v1.ReferralEvent";
/// Name of the referral context (its stream and subjects).
pub const REFERRAL_CONTEXT: &str = "referral";
/// Most shelters tried for one referral before it counts as "no bed".
const MAX_CANDIDATES: i64 = 20;

/// The placement reaction.
#[derive(Debug, Clone)]
pub struct Placement {
    app: Shelters,
}

impl Placement {
    /// A reaction that holds beds through `app`.
    #[must_use]
    pub fn new(app: Shelters) -> Self {
        Self { app }
    }

    /// Holds a bed for `accepted`, or records that none is free.
    async fn place(
        &self,
        uow: &mut UnitOfWork,
        accepted: &referral::ReferralAccepted,
        metadata: &EventMetadata,
    ) -> Result<(), anyhow::Error> {
        let Some(need) = accepted.shelter_need.as_ref().filter(|n| n.category != 0) else {
            return Ok(());
        };
        let (Ok(referral_id), Ok(category)) = (
            ReferralId::parse("referral_id", &accepted.referral_id),
            parse::category("shelter_need.category", need.category),
        ) else {
            tracing::warn!(referral_id = %accepted.referral_id, "accepted referral with a malformed shelter need; no bed held");
            return Ok(());
        };
        let region = parse::region("shelter_need.region", &need.region).unwrap_or_default();
        let active: Option<Uuid> = sqlx::query_scalar(
            "SELECT hold_id FROM free_capacity_holds WHERE referral_id = $1 AND status IN ('held', 'admitted') LIMIT 1",
        )
        .bind(referral_id.as_uuid())
        .fetch_optional(uow.conn())
        .await?;
        if let Some(hold_id) = active {
            tracing::info!(%referral_id, %hold_id, "the referral holds a bed already");
            return Ok(());
        }
        let mut q: QueryBuilder<Postgres> =
            QueryBuilder::new("SELECT shelter_id FROM free_capacity WHERE free > 0 AND category = ");
        q.push_bind(category as i32);
        if !region.is_empty() {
            q.push(" AND region = ").push_bind(region.clone());
        }
        q.push(" ORDER BY free DESC, shelter_id LIMIT ")
            .push_bind(MAX_CANDIDATES);
        let candidates: Vec<Uuid> = q.build_query_scalar().fetch_all(uow.conn()).await?;
        let expires_at = Utc::now() + chrono::Duration::minutes(i64::from(self.app.hold_minutes_default()));
        for shelter_id in candidates.into_iter().map(ShelterId::from_uuid) {
            let shelter = self.app.load(shelter_id).await?;
            let command = Command::HoldBed {
                hold_id: HoldId::new(),
                category,
                referral_id,
                expires_at: validate::timestamp(expires_at),
                holder_agency: accepted.receiving_agency.clone(),
            };
            match domain::decide(&shelter, &command) {
                Ok(events) => {
                    // A conflict fails the message; the runner retries it on the new state.
                    self.app
                        .append(uow, shelter_id, shelter.version, &events, metadata)
                        .await?;
                    audit::record(
                        uow.conn(),
                        &metadata.actor,
                        "HoldBed",
                        &shelter_id.to_string(),
                        "referral accepted",
                    )
                    .await?;
                    tracing::info!(%referral_id, %shelter_id, "bed held for an accepted referral");
                    return Ok(());
                }
                Err(DomainError::AlreadyHeld) => return Ok(()),
                // The read model was behind: try the next shelter.
                Err(_) => {}
            }
        }
        self.no_bed(uow, referral_id, &region, category, metadata).await
    }

    /// Appends `NoBedAvailable` to the referral's placement stream.
    async fn no_bed(
        &self,
        uow: &mut UnitOfWork,
        referral_id: ReferralId,
        region: &str,
        category: pb::BedCategory,
        metadata: &EventMetadata,
    ) -> Result<(), anyhow::Error> {
        let with_beds: Vec<String> =
            sqlx::query_scalar("SELECT DISTINCT region FROM free_capacity WHERE category = $1 AND free > 0")
                .bind(category as i32)
                .fetch_all(uow.conn())
                .await?;
        let event = pb::shelter_event::Event::NoBedAvailable(pb::NoBedAvailable {
            referral_id: referral_id.to_string(),
            region: region.to_owned(),
            category: category as i32,
            nearest_regions_with_beds: regions::nearest(region, with_beds),
        });
        let stream_id = domain::placement_stream_id(referral_id);
        let version = stream_version(uow.conn(), &stream_id).await?;
        uow.append(
            &stream_id,
            version,
            &to_new_events(&[event]),
            metadata,
            &self
                .app
                .bus()
                .subject(CONTEXT, domain::PLACEMENT, &referral_id.to_string()),
        )
        .await?;
        tracing::info!(%referral_id, "no bed free in the region");
        Ok(())
    }
}

async fn stream_version(conn: &mut PgConnection, stream_id: &str) -> Result<u64, anyhow::Error> {
    let version: i64 = sqlx::query_scalar("SELECT coalesce(max(version), 0) FROM events WHERE stream_id = $1")
        .bind(stream_id)
        .fetch_one(conn)
        .await?;
    Ok(u64::try_from(version)?)
}

impl Projection for Placement {
    const READ_MODEL: bool = false;

    fn name(&self) -> &'static str {
        "shelter_placement"
    }

    async fn apply(&self, uow: &mut UnitOfWork, delivery: &Delivery) -> Result<(), anyhow::Error> {
        if delivery.commit.payload_type != REFERRAL_PAYLOAD_TYPE {
            return Ok(());
        }
        let mut accepted = Vec::new();
        for committed in &delivery.commit.events {
            if committed.event_type != "ReferralAccepted" {
                continue;
            }
            let event = referral::ReferralEvent::decode(committed.payload.as_slice())
                .with_context(|| format!("event {} does not decode", committed.event_id))?;
            if let Some(referral::referral_event::Event::ReferralAccepted(a)) = event.event {
                accepted.push(a);
            }
        }
        if accepted.is_empty() {
            return Ok(());
        }
        let commit_id: Uuid = delivery.commit.commit_id.parse().context("commit ID")?;
        let first_time = sqlx::query("INSERT INTO placement_handled (commit_id) VALUES ($1) ON CONFLICT DO NOTHING")
            .bind(commit_id)
            .execute(uow.conn())
            .await?
            .rows_affected()
            > 0;
        if !first_time {
            tracing::info!(%commit_id, "referral commit acted on before");
            return Ok(());
        }
        let (traceparent, tracestate) = delivery
            .metadata
            .as_ref()
            .map(|m| (m.traceparent.clone(), m.tracestate.clone()))
            .unwrap_or_default();
        let metadata = EventMetadata {
            correlation_id: delivery
                .metadata
                .as_ref()
                .map_or_else(Uuid::now_v7, |m| m.correlation_id),
            causation_id: commit_id,
            actor: system_actor("placement"),
            traceparent,
            tracestate,
        };
        for a in &accepted {
            self.place(uow, a, &metadata).await?;
        }
        Ok(())
    }

    /// Nothing to empty: the handled commits stay, so a replay from the
    /// start of the referral stream holds no bed twice.
    async fn reset(&self, _conn: &mut PgConnection) -> Result<(), anyhow::Error> {
        Ok(())
    }
}

/// Expires holds whose timer fired.
#[derive(Debug, Clone)]
pub struct HoldExpiry {
    app: Shelters,
}

impl HoldExpiry {
    /// A handler appending through `app`.
    #[must_use]
    pub fn new(app: Shelters) -> Self {
        Self { app }
    }
}

impl TimerHandler for HoldExpiry {
    fn kinds(&self) -> &'static [&'static str] {
        &[HOLD_EXPIRY]
    }

    async fn fire(&self, uow: &mut UnitOfWork, timer: &Timer) -> Result<(), anyhow::Error> {
        let hold_id = HoldId::parse("aggregate_id", &timer.aggregate_id)
            .map_err(|v| anyhow::anyhow!("timer {}: {}", timer.id, v.description))?;
        let shelter_id = ShelterId::parse("payload", std::str::from_utf8(&timer.payload)?)
            .map_err(|v| anyhow::anyhow!("timer {}: {}", timer.id, v.description))?;
        let shelter = self.app.load(shelter_id).await?;
        let events = domain::decide(&shelter, &Command::ExpireHold { hold_id })?;
        if events.is_empty() {
            return Ok(());
        }
        let metadata = EventMetadata {
            correlation_id: Uuid::now_v7(),
            causation_id: timer.id,
            actor: system_actor("hold_expiry"),
            traceparent: None,
            tracestate: None,
        };
        self.app
            .append(uow, shelter_id, shelter.version, &events, &metadata)
            .await?;
        audit::record(
            uow.conn(),
            &metadata.actor,
            "ExpireHold",
            &shelter_id.to_string(),
            "timer",
        )
        .await?;
        tracing::info!(%shelter_id, %hold_id, "hold expired");
        Ok(())
    }
}
