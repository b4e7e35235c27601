//! What the service does without a caller: following the referrals it holds
//! beds for, holding a bed when a referral with a shelter need is accepted,
//! releasing it when the referral ends, and expiring holds nobody acted on.
//!
//! - [`ReferralsView`]: the `shelter_referrals` read model (who each
//!   referral is for, its state, whether it asked for shelter and its
//!   shelter need), which `HoldBed` and `ListArrivals` read. A runner of its
//!   own: a new one has no checkpoint and replays the referral stream from
//!   its first message, so it also knows the referrals accepted before it
//!   was deployed.
//! - [`Placement`]: a reaction on the referral stream, in stream order, one
//!   commit per transaction beside its checkpoint. For each referral event
//!   it
//!   1. keeps its own guard (`placement_referrals`: the referral version it
//!      acted on, and whether the referral ended; an event at or below that
//!      version changes nothing), under the referral's lock;
//!   2. on `ReferralAccepted` with a shelter need, picks the shelter of the
//!      region with the most free beds of the category, from `shelter_beds`
//!      (written with the shelters' events, so a shelter registered a moment
//!      ago is there and "no bed" is never a stale answer), decides
//!      `HoldBed` on that shelter's state under its lock and appends
//!      `BedHeld` (with its expiry timer). When no shelter of the region has
//!      a bed it appends `NoBedAvailable` with the nearest regions that have
//!      one to `placement-<referral_id>`. A commit is acted on once
//!      (`placement_handled`), and a referral with an open hold anywhere
//!      gets no second one;
//!   3. on `ReferralCancelled`, `ReferralClosed`, `ReferralDeclined` or
//!      `ReferralRedirected`, releases the referral's held bed (an admitted
//!      person stays). A redelivery finds nothing held and does nothing.
//!
//!   One runner does all three so that they follow the referral's events in
//!   their order: a cancellation is never acted on before the acceptance.
//!   Nothing here reads `shelter_referrals`: auto-release follows the
//!   referral events and `open_holds`. Whichever of the two runners is
//!   ahead, no bed stays held for an ended referral: `HoldBed` takes the
//!   referral's lock and refuses when either `shelter_referrals` says it is
//!   not accepted or this reaction has seen it end; a hold made before the
//!   end is found in `open_holds` and released here. Locks are taken in one
//!   order, the referral's lock, then the shelter's lock, as `HoldBed`
//!   takes them.
//! - [`HoldExpiry`]: the handler of the `shelter.hold_expiry` timers, which
//!   appends `HoldExpired` when the hold is still held.
//! - [`arrivals`]: the same placement for a person announced from abroad,
//!   on the home country's repatriation stream ([`ArrivalPlacement`]).
//!
//! Both placements choose among the candidates the same way
//! (`first_free`: each shelter in turn, under its lock, decided on its own
//! folded state), release the same way (`release_held`) and record "no
//! bed" the same way (`record_no_bed`).

pub mod arrivals;

pub use arrivals::{ArrivalPlacement, REPATRIATION_CONTEXT};

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
use referral::referral_event::Event as ReferralEvent;
use sqlx::{PgConnection, Postgres, QueryBuilder};
use uuid::Uuid;

use crate::app::{CONTEXT, HOLD_EXPIRY, Shelters, lock_referral, lock_shelter, take_hold, to_new_events};
use crate::domain::{self, Command, DomainError, HeldFor, Shelter, parse, regions};

/// Full protobuf name of the referral service's events.
pub const REFERRAL_PAYLOAD_TYPE: &str = "nrm.referral.v1.ReferralEvent";
/// Name of the referral context (its stream and subjects).
pub const REFERRAL_CONTEXT: &str = "referral";
/// Most shelters tried for one person before it counts as "no bed".
const MAX_CANDIDATES: i64 = 20;

/// What trying the candidate shelters in turn found.
enum Choice {
    /// The first with a free bed: its state (read under its lock, held
    /// until the transaction ends) and the events of the hold.
    Free {
        shelter_id: ShelterId,
        shelter: Box<Shelter>,
        events: Vec<pb::shelter_event::Event>,
    },
    /// The person holds a bed there already.
    AlreadyHeld,
    /// None of them has a free bed (any more).
    NoBed,
}

/// Decides `command` (a `HoldBed`, made anew for each) on each of
/// `candidates` in turn, under the shelter's lock, on its own folded state;
/// the first that holds a bed. A shelter whose bed was taken since the
/// candidates were read is passed over.
async fn first_free(
    app: &Shelters,
    uow: &mut UnitOfWork,
    candidates: Vec<Uuid>,
    command: impl Fn() -> Command,
) -> Result<Choice, anyhow::Error> {
    for shelter_id in candidates.into_iter().map(ShelterId::from_uuid) {
        lock_shelter(uow.conn(), shelter_id).await?;
        let shelter = app.load_in(uow, shelter_id).await?;
        match domain::decide(&shelter, &command()) {
            Ok(events) => {
                return Ok(Choice::Free {
                    shelter_id,
                    shelter: Box::new(shelter),
                    events,
                });
            }
            Err(DomainError::AlreadyHeld) => return Ok(Choice::AlreadyHeld),
            // Taken since the candidates were read: try the next shelter.
            Err(_) => {}
        }
    }
    Ok(Choice::NoBed)
}

/// Releases `hold_id` at `shelter_id` if it is still held (an admitted
/// person stays, a hold released or expired meanwhile changes nothing);
/// whether it released it.
async fn release_held(
    app: &Shelters,
    uow: &mut UnitOfWork,
    (hold_id, shelter_id): (HoldId, ShelterId),
    why: &'static str,
    metadata: &EventMetadata,
) -> Result<bool, anyhow::Error> {
    lock_shelter(uow.conn(), shelter_id).await?;
    let shelter = app.load_in(uow, shelter_id).await?;
    let events = match domain::decide(&shelter, &Command::ReleaseHold { hold_id }) {
        Ok(events) => events,
        Err(DomainError::NotHeld) => return Ok(false),
        Err(e) => return Err(e.into()),
    };
    app.append(uow, shelter_id, &shelter, &events, metadata).await?;
    audit::record(uow.conn(), &metadata.actor, "ReleaseHold", &shelter_id.to_string(), why).await?;
    tracing::info!(%shelter_id, %hold_id, reason = why, "hold released");
    Ok(true)
}

/// Appends `NoBedAvailable` (for `referral_id`, "" for an arrival) to the
/// placement stream `stream_id`, published on the subject of aggregate
/// `aggregate` instance `id`, naming the regions nearest to `region` that
/// have a free bed of `category`.
async fn record_no_bed(
    app: &Shelters,
    uow: &mut UnitOfWork,
    (stream_id, aggregate, id): (String, &str, &str),
    referral_id: String,
    (region, category): (&str, pb::BedCategory),
    metadata: &EventMetadata,
) -> Result<(), anyhow::Error> {
    let with_beds: Vec<String> =
        sqlx::query_scalar("SELECT DISTINCT region FROM shelter_beds WHERE approved AND category = $1 AND free > 0")
            .bind(category as i32)
            .fetch_all(uow.conn())
            .await?;
    let event = pb::shelter_event::Event::NoBedAvailable(pb::NoBedAvailable {
        referral_id,
        region: region.to_owned(),
        category: category as i32,
        nearest_regions_with_beds: regions::nearest(region, with_beds),
    });
    let version = stream_version(uow.conn(), &stream_id).await?;
    uow.append(
        &stream_id,
        version,
        &to_new_events(&[event]),
        metadata,
        &app.bus().subject(CONTEXT, aggregate, id),
    )
    .await?;
    Ok(())
}

/// The placement reaction.
#[derive(Debug, Clone)]
pub struct Placement {
    app: Shelters,
}

/// What one referral event makes of the referral's row.
struct Change<'a> {
    referral_id: &'a str,
    state: &'static str,
    person_id: Option<&'a str>,
    receiving_agency: Option<&'a str>,
    need: Option<&'a referral::ShelterNeed>,
    /// Whether the referral asked for shelter (`None`: the event does not say).
    wants_shelter: Option<bool>,
}

impl<'a> Change<'a> {
    fn of(event: &'a ReferralEvent) -> Option<Self> {
        let change = |referral_id, state| Change {
            referral_id,
            state,
            person_id: None,
            receiving_agency: None,
            need: None,
            wants_shelter: None,
        };
        Some(match event {
            ReferralEvent::ReferralCreated(e) => Change {
                person_id: Some(&e.person_id),
                receiving_agency: Some(&e.receiving_agency),
                need: e.shelter_need.as_ref(),
                wants_shelter: Some(
                    e.shelter_need.is_some() || e.services.contains(&(referral::ServiceKind::Shelter as i32)),
                ),
                ..change(&e.referral_id, "pending")
            },
            ReferralEvent::ReferralAccepted(e) => Change {
                person_id: Some(&e.person_id),
                receiving_agency: Some(&e.receiving_agency),
                need: e.shelter_need.as_ref(),
                // The acceptance copies the need; without one it says nothing new.
                wants_shelter: e.shelter_need.as_ref().map(|_| true),
                ..change(&e.referral_id, "accepted")
            },
            ReferralEvent::ReferralDeclined(e) => Change {
                receiving_agency: Some(&e.receiving_agency),
                ..change(&e.referral_id, "declined")
            },
            ReferralEvent::ReferralRedirected(e) => Change {
                receiving_agency: Some(&e.receiving_agency),
                ..change(&e.referral_id, "redirected")
            },
            ReferralEvent::ReferralClosed(e) => change(&e.referral_id, "closed"),
            ReferralEvent::ReferralCancelled(e) => Change {
                person_id: Some(&e.person_id),
                receiving_agency: Some(&e.receiving_agency),
                ..change(&e.referral_id, "cancelled")
            },
            _ => return None,
        })
    }

    /// Whether the referral no longer needs the bed held for it.
    fn ends_hold(&self) -> bool {
        matches!(self.state, "declined" | "redirected" | "closed" | "cancelled")
    }
}

impl Placement {
    /// A reaction that holds beds through `app`.
    #[must_use]
    pub fn new(app: Shelters) -> Self {
        Self { app }
    }

    /// Takes the referral's lock and records `change` at referral stream
    /// `version` in the reaction's guard; whether it was new (above the
    /// version acted on).
    async fn guard(conn: &mut PgConnection, change: &Change<'_>, version: i64) -> Result<bool, anyhow::Error> {
        let Ok(referral_id) = change.referral_id.parse::<Uuid>() else {
            tracing::warn!("a referral event with a malformed referral ID; ignored");
            return Ok(false);
        };
        lock_referral(&mut *conn, ReferralId::from_uuid(referral_id)).await?;
        let applied = sqlx::query(
            "INSERT INTO placement_referrals (referral_id, version, ended) VALUES ($1, $2, $3)
             ON CONFLICT (referral_id) DO UPDATE SET version = EXCLUDED.version, ended = EXCLUDED.ended
             WHERE placement_referrals.version < EXCLUDED.version",
        )
        .bind(referral_id)
        .bind(version)
        .bind(change.ends_hold())
        .execute(conn)
        .await?
        .rows_affected();
        Ok(applied > 0)
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
            tracing::warn!("accepted referral with a malformed shelter need; no bed held");
            return Ok(());
        };
        let region = parse::region("shelter_need.region", &need.region).unwrap_or_default();
        let active: Option<Uuid> = sqlx::query_scalar("SELECT hold_id FROM open_holds WHERE referral_id = $1")
            .bind(referral_id.as_uuid())
            .fetch_optional(uow.conn())
            .await?;
        if let Some(hold_id) = active {
            tracing::info!(%referral_id, %hold_id, "the referral holds a bed already");
            return Ok(());
        }
        let mut q: QueryBuilder<Postgres> =
            QueryBuilder::new("SELECT shelter_id FROM shelter_beds WHERE approved AND free > 0 AND category = ");
        q.push_bind(category as i32);
        if !region.is_empty() {
            q.push(" AND region = ").push_bind(region.clone());
        }
        q.push(" ORDER BY free DESC, shelter_id LIMIT ")
            .push_bind(MAX_CANDIDATES);
        let candidates: Vec<Uuid> = q.build_query_scalar().fetch_all(uow.conn()).await?;
        let expires_at = Utc::now() + chrono::Duration::minutes(i64::from(self.app.hold_minutes_default()));
        let command = || Command::HoldBed {
            hold_id: HoldId::new(),
            category,
            held_for: HeldFor::Referral(referral_id),
            expires_at: validate::timestamp(expires_at),
            holder_agency: accepted.receiving_agency.clone(),
        };
        match first_free(&self.app, uow, candidates, command).await? {
            Choice::Free {
                shelter_id,
                shelter,
                events,
            } => {
                if !take_hold(uow.conn(), referral_id).await? {
                    tracing::warn!(%referral_id, "the referral used up its holds; no bed held");
                    return Ok(());
                }
                // A conflict fails the message; the runner retries it on the new state.
                self.app.append(uow, shelter_id, &shelter, &events, metadata).await?;
                audit::record(
                    uow.conn(),
                    &metadata.actor,
                    "HoldBed",
                    &shelter_id.to_string(),
                    "referral accepted",
                )
                .await?;
                tracing::info!(%referral_id, %shelter_id, "bed held for an accepted referral");
                Ok(())
            }
            Choice::AlreadyHeld => Ok(()),
            Choice::NoBed => {
                record_no_bed(
                    &self.app,
                    uow,
                    (
                        domain::placement_stream_id(referral_id),
                        domain::PLACEMENT,
                        &referral_id.to_string(),
                    ),
                    referral_id.to_string(),
                    (&region, category),
                    metadata,
                )
                .await?;
                tracing::info!(%referral_id, "no bed free in the region");
                Ok(())
            }
        }
    }

    /// Releases the bed held for `referral_id`, if one is (an admitted
    /// person stays).
    async fn release(
        &self,
        uow: &mut UnitOfWork,
        referral_id: Uuid,
        why: &'static str,
        metadata: &EventMetadata,
    ) -> Result<(), anyhow::Error> {
        let held: Option<(Uuid, Uuid)> =
            sqlx::query_as("SELECT hold_id, shelter_id FROM open_holds WHERE referral_id = $1 AND status = 'held'")
                .bind(referral_id)
                .fetch_optional(uow.conn())
                .await?;
        let Some((hold_id, shelter_id)) = held else {
            return Ok(());
        };
        let hold = (HoldId::from_uuid(hold_id), ShelterId::from_uuid(shelter_id));
        release_held(&self.app, uow, hold, why, metadata).await?;
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
        let mut events = Vec::new();
        for committed in &delivery.commit.events {
            let event = referral::ReferralEvent::decode(committed.payload.as_slice())
                .with_context(|| format!("event {} does not decode", committed.event_id))?;
            if let Some(event) = event.event {
                events.push((i64::try_from(committed.version)?, event));
            }
        }
        if !events.iter().any(|(_, e)| Change::of(e).is_some()) {
            return Ok(());
        }
        let commit_id: Uuid = delivery.commit.commit_id.parse().context("commit ID")?;
        // A commit that may hold a bed is acted on once, whatever its version says.
        if events
            .iter()
            .any(|(_, e)| matches!(e, ReferralEvent::ReferralAccepted(_)))
        {
            let first_time =
                sqlx::query("INSERT INTO placement_handled (commit_id) VALUES ($1) ON CONFLICT DO NOTHING")
                    .bind(commit_id)
                    .execute(uow.conn())
                    .await?
                    .rows_affected()
                    > 0;
            if !first_time {
                tracing::info!(%commit_id, "referral commit acted on before");
                return Ok(());
            }
        }
        let (traceparent, tracestate) = delivery
            .metadata
            .as_ref()
            .map(|m| (m.traceparent.clone(), m.tracestate.clone()))
            .unwrap_or_default();
        // Caused by the referral commit, in its trace.
        let metadata = |task: &str| EventMetadata {
            causation_id: commit_id,
            traceparent: traceparent.clone(),
            tracestate: tracestate.clone(),
            ..EventMetadata::system(task, delivery.metadata.as_ref())
        };
        for (version, event) in &events {
            let Some(change) = Change::of(event) else {
                continue;
            };
            if !Self::guard(uow.conn(), &change, *version).await? {
                continue;
            }
            match event {
                ReferralEvent::ReferralAccepted(a) => self.place(uow, a, &metadata("shelter.placement")).await?,
                _ if change.ends_hold() => {
                    if let Ok(referral_id) = change.referral_id.parse::<Uuid>() {
                        let why = match change.state {
                            "cancelled" => "referral cancelled",
                            "closed" => "referral closed",
                            "declined" => "referral declined",
                            _ => "referral redirected",
                        };
                        self.release(uow, referral_id, why, &metadata("shelter.release"))
                            .await?;
                    }
                }
                _ => {}
            }
        }
        Ok(())
    }

    /// Nothing to empty: the handled commits stay, so a replay from the
    /// start of the referral stream holds no bed twice, and the guard skips
    /// what was acted on.
    async fn reset(&self, _conn: &mut PgConnection) -> Result<(), anyhow::Error> {
        Ok(())
    }
}

/// The `shelter_referrals` read model: what the shelter service knows of
/// each referral (coded fields only, never the referral's reason or case).
#[derive(Debug, Clone, Copy, Default)]
pub struct ReferralsView;

impl ReferralsView {
    /// Applies `change` at referral stream `version` to the referral's row
    /// (an event at or below the row's version changes nothing).
    async fn project(conn: &mut PgConnection, change: &Change<'_>, version: i64) -> Result<(), anyhow::Error> {
        let Ok(referral_id) = change.referral_id.parse::<Uuid>() else {
            tracing::warn!("a referral event with a malformed referral ID; ignored");
            return Ok(());
        };
        let person_id = change.person_id.and_then(|p| p.parse::<Uuid>().ok());
        let wants_shelter = change.wants_shelter;
        let (category, region) = change
            .need
            .map_or((None, None), |n| (Some(n.category), Some(n.region.as_str())));
        sqlx::query(
            "INSERT INTO shelter_referrals
                 (referral_id, person_id, receiving_agency, state, category, region, version, wants_shelter)
             VALUES ($1, $2, coalesce($3, ''), $4, coalesce($5, 0), coalesce($6, ''), $7, coalesce($8, false))
             ON CONFLICT (referral_id) DO UPDATE SET
                 person_id = coalesce(EXCLUDED.person_id, shelter_referrals.person_id),
                 receiving_agency = coalesce($3, shelter_referrals.receiving_agency),
                 state = EXCLUDED.state,
                 category = coalesce($5, shelter_referrals.category),
                 region = coalesce($6, shelter_referrals.region),
                 version = EXCLUDED.version,
                 wants_shelter = coalesce($8, shelter_referrals.wants_shelter)
             WHERE shelter_referrals.version < EXCLUDED.version",
        )
        .bind(referral_id)
        .bind(person_id)
        .bind(change.receiving_agency)
        .bind(change.state)
        .bind(category)
        .bind(region)
        .bind(version)
        .bind(wants_shelter)
        .execute(conn)
        .await?;
        Ok(())
    }
}

impl Projection for ReferralsView {
    fn name(&self) -> &'static str {
        "shelter_referrals"
    }

    fn tables(&self) -> &'static [&'static str] {
        &["shelter_referrals"]
    }

    async fn apply(&self, uow: &mut UnitOfWork, delivery: &Delivery) -> Result<(), anyhow::Error> {
        if delivery.commit.payload_type != REFERRAL_PAYLOAD_TYPE {
            return Ok(());
        }
        for committed in &delivery.commit.events {
            let event = referral::ReferralEvent::decode(committed.payload.as_slice())
                .with_context(|| format!("event {} does not decode", committed.event_id))?;
            if let Some(change) = event.event.as_ref().and_then(Change::of) {
                Self::project(uow.conn(), &change, i64::try_from(committed.version)?).await?;
            }
        }
        Ok(())
    }

    async fn reset(&self, conn: &mut PgConnection) -> Result<(), anyhow::Error> {
        sqlx::query("TRUNCATE shelter_referrals").execute(conn).await?;
        Ok(())
    }

    async fn digest(&self, conn: &mut PgConnection) -> Result<Option<String>, anyhow::Error> {
        Ok(Some(
            nrm_kernel::projection::rows_digest(conn, "SELECT t::text FROM shelter_referrals t").await?,
        ))
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
        let shelter = self.app.load_in(uow, shelter_id).await?;
        let events = domain::decide(&shelter, &Command::ExpireHold { hold_id })?;
        if events.is_empty() {
            return Ok(());
        }
        let metadata = EventMetadata {
            causation_id: timer.id,
            ..EventMetadata::system(HOLD_EXPIRY, None)
        };
        self.app.append(uow, shelter_id, &shelter, &events, &metadata).await?;
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
