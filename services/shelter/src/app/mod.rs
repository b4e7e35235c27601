//! Command handling and queries: load the shelter, decide, append — with
//! idempotency, permissions, expiry timers and the audit trail around the
//! pure aggregate.
//!
//! Permissions are the kernel's matrix: the gate admits the caller's role,
//! and once the shelter (or the referral) is loaded the call checks how the
//! caller's agency stands to it ([`CallContext::check`]): its operator, the
//! agency a hold is for, the agency an accepted referral is addressed to.
//!
//! A bed is held only at a shelter the coordinator approved, for a referral
//! the service knows as accepted (`shelter_referrals`, a read model of the
//! referral stream) by the caller's agency, that asked for shelter in the
//! bed's category, and that has made fewer than
//! [`MAX_HOLDS_PER_REFERRAL`] holds. `HoldBed` takes the referral's lock
//! first, so holds for one referral queue, and the placement reaction that
//! releases an ended referral's hold waits for a hold being made.
//! Every append also writes, in its transaction, the shelter's free beds
//! (`shelter_beds`) and its open holds (`open_holds`, one per referral
//! across all shelters): placement chooses from them, so it never decides
//! on a view that lags. A bed held for a person announced from abroad (by
//! the arrivals reaction) names no referral; the reaction keeps which
//! return it is for (`placement_returns`), and `ListArrivals` shows it.
//!
//! Commands that act on the current version (`HoldBed`, `ReleaseHold`,
//! `Admit`, `Discharge`) queue per shelter on a transaction-scoped advisory
//! lock, so under contention the caller gets the bed or `NO_BED_FREE`; a
//! writer that takes no lock (the placement reaction, an expiry, a capacity
//! change) can still move the shelter on first, and then the command reloads
//! and decides again (the kernel's `retry::CONFLICTS`). The
//! expected-version append makes over-booking impossible either way. `ChangeCapacity`
//! names the version its caller read and gets `ABORTED` when it is stale.
//!
//! # Layout
//! - this module: the commands, and the one way events reach a shelter's
//!   stream ([`Shelters::append`]: events, outbox row, expiry timers, free
//!   beds and open holds in the caller's unit of work).
//! - [`queries`]: one shelter (with its address), free capacity, arrivals.

pub mod queries;

use chrono::{DateTime, Utc};
use nrm_kernel::bus::Bus;
use nrm_kernel::command::{self, CallContext, Decided, OnConflict, Request};
use nrm_kernel::error::{AppError, Violations};
use nrm_kernel::ids::{HoldId, ReferralId, ShelterId};
use nrm_kernel::permissions::Standing;
use nrm_kernel::seal::{DataKey, MasterKey};
use nrm_kernel::store::{Appended, EventMetadata, EventStore, NewEvent, RecordedEvent, UnitOfWork};
use nrm_kernel::{timers, validate};
use nrm_proto::common::v1::{CommandResult, PersonalIdentifiers};
use nrm_proto::shelter::v1 as pb;
use pb::shelter_event::Event;
use prost::Message;
use sqlx::PgConnection;
use tracing::field::{Empty, display};
use uuid::Uuid;

use crate::domain::{self, Command, DomainError, HeldFor, Shelter, parse};

/// Full protobuf name of the events this service publishes.
pub const PAYLOAD_TYPE: &str = "nrm.shelter.v1.ShelterEvent";
/// Name of the bounded context in subjects and stream names.
pub const CONTEXT: &str = "shelter";
/// Kind of the durable timer that expires a hold (aggregate ID: the hold; payload: the shelter ID).
pub const HOLD_EXPIRY: &str = "shelter.hold_expiry";

/// Rule code: the service knows no accepted referral with the ID (not yet
/// accepted, no longer open, or not yet seen on the referral stream: retry).
pub const REFERRAL_NOT_ACCEPTED: &str = "REFERRAL_NOT_ACCEPTED";
/// Rule code: the referral did not ask for shelter (no shelter need).
pub const NO_SHELTER_NEED: &str = "NO_SHELTER_NEED";
/// Rule code: the bed's category is not the one the referral's shelter need names.
pub const CATEGORY_MISMATCH: &str = "CATEGORY_MISMATCH";
/// Rule code: the referral used up the holds it may ever make.
pub const HOLD_LIMIT: &str = "HOLD_LIMIT";
/// Most holds one referral makes over its lifetime (by callers and by
/// placement together): enough for a hold that expired or a move, too few
/// to walk the shelters and read their addresses.
pub const MAX_HOLDS_PER_REFERRAL: i32 = 3;

impl From<DomainError> for AppError {
    fn from(err: DomainError) -> Self {
        match err {
            DomainError::NotFound => AppError::NotFound {
                kind: "shelter",
                id: String::new(),
            },
            other => AppError::precondition(other.code(), "shelter", other.to_string()),
        }
    }
}

/// The answer of a command on an existing shelter, made from what it appended.
trait Made: command::Answer {
    /// The answer of a command that appended `events`.
    fn made(events: &[Event], result: CommandResult) -> Self;
}

impl Made for CommandResult {
    fn made(_: &[Event], result: CommandResult) -> Self {
        result
    }
}

impl Made for pb::HoldBedResponse {
    fn made(events: &[Event], result: CommandResult) -> Self {
        let held = events.iter().find_map(|e| match e {
            Event::BedHeld(h) => Some(h),
            _ => None,
        });
        Self {
            hold_id: held.map(|h| h.hold_id.clone()).unwrap_or_default(),
            expires_at: held.and_then(|h| h.expires_at),
            result: Some(result),
        }
    }
}

/// A validated command on an existing shelter.
#[derive(Clone)]
struct ShelterCall {
    /// The RPC, for fingerprints and the audit trail.
    method: &'static str,
    request_id: String,
    shelter_id: ShelterId,
    /// `None`: act on the current version (and decide again after a conflict).
    expected_version: Option<u64>,
    /// How the caller's agency must stand to the shelter.
    standing: Who,
    command: Command,
}

/// What the caller's standing to a command's record is made of.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Who {
    /// The shelter's operator.
    Operator,
    /// The shelter's operator, and the agency the command's hold is for.
    OperatorOrHolder,
    /// The agency the referral is addressed to (checked on the referral).
    Referral,
    /// Whoever the matrix admits, in any scope (the coordinator).
    Anyone,
}

/// Records the person of `referral_id` (as the shelter service knows it) as
/// the one the call concerns.
async fn concern_person(ctx: &CallContext, conn: &mut PgConnection, referral_id: &str) -> Result<(), AppError> {
    let Ok(referral_id) = referral_id.parse::<Uuid>() else {
        return Ok(());
    };
    let person: Option<Option<Uuid>> =
        sqlx::query_scalar("SELECT person_id FROM shelter_referrals WHERE referral_id = $1")
            .bind(referral_id)
            .fetch_optional(conn)
            .await?;
    if let Some(person_id) = person.flatten() {
        ctx.concerns_person(person_id);
    }
    Ok(())
}

/// A stored shelter event, decoded.
fn decode(recorded: &RecordedEvent) -> Result<Event, AppError> {
    pb::ShelterEvent::decode(recorded.payload.as_slice())
        .ok()
        .and_then(|e| e.event)
        .ok_or_else(|| AppError::Internal(format!("event {} does not decode", recorded.event_id)))
}

/// A shelter folded from its stored events.
fn fold(events: &[RecordedEvent]) -> Result<Shelter, AppError> {
    events.iter().try_fold(Shelter::default(), |shelter, recorded| {
        Ok(domain::evolve(shelter, &decode(recorded)?))
    })
}

/// Takes the shelter's transaction-scoped lock: commands on its current
/// version queue on it instead of racing to append.
///
/// # Errors
/// When the database fails.
pub(crate) async fn lock_shelter(conn: &mut PgConnection, shelter_id: ShelterId) -> Result<(), sqlx::Error> {
    sqlx::query("SELECT pg_advisory_xact_lock(hashtextextended($1, 0))")
        .bind(domain::stream_id(shelter_id))
        .execute(conn)
        .await?;
    Ok(())
}

/// Takes the referral's transaction-scoped lock: `HoldBed` and the
/// placement reaction decide on one referral one at a time (always before
/// a shelter's lock).
///
/// # Errors
/// When the database fails.
pub(crate) async fn lock_referral(conn: &mut PgConnection, referral_id: ReferralId) -> Result<(), sqlx::Error> {
    sqlx::query("SELECT pg_advisory_xact_lock(hashtextextended($1, 0))")
        .bind(format!("shelter-referral-{referral_id}"))
        .execute(conn)
        .await?;
    Ok(())
}

/// Counts one more hold for `referral_id` (in the hold's transaction, under
/// the referral's lock); false, counting nothing, when it used up
/// [`MAX_HOLDS_PER_REFERRAL`].
///
/// # Errors
/// When the database fails.
pub(crate) async fn take_hold(conn: &mut PgConnection, referral_id: ReferralId) -> Result<bool, sqlx::Error> {
    let counted = sqlx::query(
        "INSERT INTO referral_hold_counts (referral_id, holds) VALUES ($1, 1)
         ON CONFLICT (referral_id) DO UPDATE SET holds = referral_hold_counts.holds + 1
         WHERE referral_hold_counts.holds < $2",
    )
    .bind(referral_id.as_uuid())
    .bind(MAX_HOLDS_PER_REFERRAL)
    .execute(conn)
    .await?
    .rows_affected();
    Ok(counted > 0)
}

/// Marks `shelter` approved when it was registered before approvals
/// existed (approved by the migration that introduced them).
async fn approved_by_migration(conn: &mut PgConnection, mut shelter: Shelter) -> Result<Shelter, AppError> {
    if shelter.version > 0 && !shelter.approved {
        shelter.approved = sqlx::query_scalar(
            "SELECT EXISTS (SELECT 1 FROM shelters_approved_by_migration WHERE shelter_id::text = $1)",
        )
        .bind(shelter.shelter_id())
        .fetch_one(conn)
        .await?;
    }
    Ok(shelter)
}

/// `ALREADY_HELD`: the referral has an open hold (at this or another shelter).
fn already_held() -> AppError {
    AppError::precondition(
        DomainError::AlreadyHeld.code(),
        "referral",
        DomainError::AlreadyHeld.to_string(),
    )
}

fn not_accepted() -> AppError {
    AppError::precondition(
        REFERRAL_NOT_ACCEPTED,
        "referral",
        "the shelter service knows no accepted referral with this ID (yet): retry once the referral is accepted",
    )
}

/// Writes what `after` says of the shelter's beds: the free beds of each of
/// its categories, at its version.
async fn write_beds(conn: &mut PgConnection, shelter_id: ShelterId, after: &Shelter) -> Result<(), AppError> {
    let version = i64::try_from(after.version).map_err(|e| AppError::Internal(e.to_string()))?;
    for (&category, &beds) in &after.capacity {
        sqlx::query(
            "INSERT INTO shelter_beds (shelter_id, category, region, capacity, free, version, approved)
             VALUES ($1, $2, $3, $4, $5, $6,
                     $7 OR EXISTS (SELECT 1 FROM shelters_approved_by_migration m WHERE m.shelter_id = $1))
             ON CONFLICT (shelter_id, category) DO UPDATE
             SET region = EXCLUDED.region, capacity = EXCLUDED.capacity, free = EXCLUDED.free,
                 version = EXCLUDED.version, approved = EXCLUDED.approved",
        )
        .bind(shelter_id.as_uuid())
        .bind(category)
        .bind(after.region())
        .bind(i32::try_from(beds).unwrap_or(i32::MAX))
        .bind(i32::try_from(after.free(category)).unwrap_or(i32::MAX))
        .bind(version)
        .bind(after.approved)
        .execute(&mut *conn)
        .await?;
    }
    Ok(())
}

fn uuid(text: &str) -> Result<Uuid, AppError> {
    text.parse()
        .map_err(|_| AppError::Internal("an event carries a malformed ID".into()))
}

/// An ID an event may leave empty (a hold for an arrival names no referral).
fn optional_uuid(text: &str) -> Result<Option<Uuid>, AppError> {
    if text.is_empty() {
        Ok(None)
    } else {
        uuid(text).map(Some)
    }
}

/// Records `event`'s effect on the open holds.
///
/// # Errors
/// `ALREADY_HELD` when a `BedHeld` is for a referral with an open hold.
async fn write_hold(
    conn: &mut PgConnection,
    shelter_id: ShelterId,
    event: &Event,
    held_at: DateTime<Utc>,
) -> Result<(), AppError> {
    match event {
        Event::BedHeld(held) => {
            let expires_at = held
                .expires_at
                .as_ref()
                .and_then(validate::to_datetime)
                .unwrap_or(held_at);
            let inserted = sqlx::query(
                "INSERT INTO open_holds
                     (hold_id, referral_id, shelter_id, category, holder_agency, status, held_at, expires_at)
                 VALUES ($1, $2, $3, $4, $5, 'held', $6, $7) ON CONFLICT DO NOTHING",
            )
            .bind(uuid(&held.hold_id)?)
            .bind(optional_uuid(&held.referral_id)?)
            .bind(shelter_id.as_uuid())
            .bind(held.category)
            .bind(&held.holder_agency)
            .bind(held_at)
            .bind(expires_at)
            .execute(conn)
            .await?
            .rows_affected();
            if inserted == 0 {
                return Err(already_held());
            }
        }
        Event::PersonAdmitted(e) => {
            sqlx::query("UPDATE open_holds SET status = 'admitted' WHERE hold_id = $1")
                .bind(uuid(&e.hold_id)?)
                .execute(conn)
                .await?;
        }
        Event::HoldReleased(pb::HoldReleased { hold_id, .. })
        | Event::HoldExpired(pb::HoldExpired { hold_id, .. })
        | Event::PersonDischarged(pb::PersonDischarged { hold_id, .. }) => {
            sqlx::query("DELETE FROM open_holds WHERE hold_id = $1")
                .bind(uuid(hold_id)?)
                .execute(conn)
                .await?;
        }
        Event::ShelterRegistered(_)
        | Event::ShelterApproved(_)
        | Event::CapacityChanged(_)
        | Event::NoBedAvailable(_) => {}
    }
    Ok(())
}

/// The shelter application.
#[derive(Clone, Debug)]
pub struct Shelters {
    store: EventStore,
    bus: Bus,
    master: MasterKey,
    hold_minutes_default: u32,
}

/// The events to append, as the store takes them.
pub(crate) fn to_new_events(events: &[Event]) -> Vec<NewEvent> {
    command::new_events(events, domain::event_type, |event| pb::ShelterEvent {
        event: Some(event.clone()),
    })
}

fn not_found(shelter_id: ShelterId) -> AppError {
    AppError::NotFound {
        kind: "shelter",
        id: shelter_id.to_string(),
    }
}

/// Records the parsed IDs a call concerns: on its span, and for the audit
/// entry of a refusal.
fn concern(ctx: &CallContext, shelter_id: ShelterId, hold_id: Option<HoldId>) {
    let span = tracing::Span::current();
    span.record("shelter_id", display(shelter_id));
    if let Some(hold_id) = hold_id {
        span.record("hold_id", display(hold_id));
    }
    ctx.concerns(shelter_id);
}

/// Parses the fields every command on a shelter carries, recording violations.
fn target(v: &mut Violations, request_id: &str, shelter_id: &str) -> (Option<String>, Option<ShelterId>) {
    (
        v.check(validate::request_id(request_id)),
        v.check(ShelterId::parse("shelter_id", shelter_id)),
    )
}

impl Shelters {
    /// The application over its store.
    #[must_use]
    pub fn new(store: EventStore, bus: Bus, master: MasterKey, hold_minutes_default: u32) -> Self {
        Self {
            store,
            bus,
            master,
            hold_minutes_default,
        }
    }

    /// The event store.
    #[must_use]
    pub fn store(&self) -> &EventStore {
        &self.store
    }

    /// The bus.
    #[must_use]
    pub fn bus(&self) -> &Bus {
        &self.bus
    }

    /// How long a hold lasts when nobody says.
    #[must_use]
    pub fn hold_minutes_default(&self) -> u32 {
        self.hold_minutes_default
    }

    fn subject(&self, shelter_id: ShelterId) -> String {
        self.bus.subject(CONTEXT, domain::NAME, &shelter_id.to_string())
    }

    /// The shelter folded from its events (version 0 when it does not exist).
    ///
    /// # Errors
    /// When the store fails or an event does not decode.
    pub async fn load(&self, shelter_id: ShelterId) -> Result<Shelter, AppError> {
        let shelter = fold(&self.store.read_stream(&domain::stream_id(shelter_id)).await?)?;
        let mut conn = self.store.pool().acquire().await?;
        approved_by_migration(&mut conn, shelter).await
    }

    /// The shelter folded from its events, read in `uow`.
    ///
    /// # Errors
    /// When the store fails or an event does not decode.
    pub async fn load_in(&self, uow: &mut UnitOfWork, shelter_id: ShelterId) -> Result<Shelter, AppError> {
        let shelter = fold(&uow.read_stream(&domain::stream_id(shelter_id)).await?)?;
        approved_by_migration(uow.conn(), shelter).await
    }

    /// Appends `events` to the stream of the shelter that is `before` (at
    /// its version), in `uow`, with what they imply beside them: a `BedHeld`
    /// schedules its expiry timer, a release or an admission cancels it; the
    /// shelter's free beds and open holds as the events leave them.
    ///
    /// # Errors
    /// [`AppError::Conflict`] when the stream moved on; `ALREADY_HELD` when
    /// a `BedHeld` is for a referral with an open hold anywhere; the unit of
    /// work is then spent.
    pub async fn append(
        &self,
        uow: &mut UnitOfWork,
        shelter_id: ShelterId,
        before: &Shelter,
        events: &[Event],
        metadata: &EventMetadata,
    ) -> Result<Appended, AppError> {
        let appended = uow
            .append(
                &domain::stream_id(shelter_id),
                before.version,
                &to_new_events(events),
                metadata,
                &self.subject(shelter_id),
            )
            .await?;
        let now = Utc::now();
        for event in events {
            write_hold(uow.conn(), shelter_id, event, now).await?;
            match event {
                Event::BedHeld(held) => {
                    let due = held
                        .expires_at
                        .as_ref()
                        .and_then(validate::to_datetime)
                        .unwrap_or_else(Utc::now);
                    timers::schedule(
                        uow.conn(),
                        HOLD_EXPIRY,
                        &held.hold_id,
                        due,
                        shelter_id.to_string().as_bytes(),
                    )
                    .await?;
                }
                Event::HoldReleased(e) => {
                    timers::cancel(uow.conn(), HOLD_EXPIRY, &e.hold_id).await?;
                }
                Event::PersonAdmitted(e) => {
                    timers::cancel(uow.conn(), HOLD_EXPIRY, &e.hold_id).await?;
                }
                _ => {}
            }
        }
        let after = events.iter().fold(before.clone(), domain::evolve);
        write_beds(uow.conn(), shelter_id, &after).await?;
        Ok(appended)
    }

    /// Writes the free beds and open holds of every shelter whose events are
    /// ahead of them (shelters registered before the tables existed), from
    /// the shelters' events. Runs at start, before anything is served.
    ///
    /// # Errors
    /// When the store fails or an event does not decode.
    pub async fn index_shelters(&self) -> Result<usize, AppError> {
        let behind: Vec<String> = sqlx::query_scalar(
            "SELECT e.stream_id FROM events e WHERE e.stream_id LIKE 'shelter-%'
             GROUP BY e.stream_id
             HAVING max(e.version) > coalesce(
                 (SELECT max(b.version) FROM shelter_beds b WHERE 'shelter-' || b.shelter_id::text = e.stream_id), 0)",
        )
        .fetch_all(self.store.pool())
        .await?;
        for stream_id in &behind {
            let Some(shelter_id) = stream_id
                .strip_prefix("shelter-")
                .and_then(|id| ShelterId::parse("stream_id", id).ok())
            else {
                continue;
            };
            let mut uow = self.store.begin().await?;
            lock_shelter(uow.conn(), shelter_id).await?;
            let recorded = uow.read_stream(stream_id).await?;
            sqlx::query("DELETE FROM open_holds WHERE shelter_id = $1")
                .bind(shelter_id.as_uuid())
                .execute(uow.conn())
                .await?;
            let mut shelter = Shelter::default();
            for r in &recorded {
                let event = decode(r)?;
                match write_hold(uow.conn(), shelter_id, &event, r.recorded_at).await {
                    // Two open holds for one referral from before the rule: the first stays indexed.
                    Err(AppError::FailedPrecondition { .. }) => {
                        tracing::warn!(%shelter_id, "a referral holds beds in two shelters; one is indexed");
                    }
                    other => other?,
                }
                shelter = domain::evolve(shelter, &event);
            }
            write_beds(uow.conn(), shelter_id, &shelter).await?;
            uow.commit().await?;
        }
        Ok(behind.len())
    }

    /// Registers a shelter; the caller's agency operates it. The address is
    /// sealed under a key of the shelter's own.
    ///
    /// # Errors
    /// `INVALID_ARGUMENT` naming bad fields, `PERMISSION_DENIED` for a role that runs no shelters.
    #[tracing::instrument(skip_all, fields(shelter_id = Empty))]
    pub async fn register(
        &self,
        ctx: &CallContext,
        req: &pb::RegisterShelterRequest,
    ) -> Result<pb::RegisterShelterResponse, AppError> {
        // The matrix lets the roles that run shelters register any new one.
        ctx.check(&Standing::default())?;
        let valid = parse::registration(req)?;
        let shelter_id = ShelterId::new();
        tracing::Span::current().record("shelter_id", display(shelter_id));
        let request = Request {
            method: "RegisterShelter",
            request_id: &valid.request_id,
            message: req,
        };
        // The attempt owns what it uses: a future that borrows from the
        // handler is not known to be `Send` (rust-lang/rust#110338).
        let (app, caller) = (self.clone(), ctx.clone());
        let valid = valid.clone();
        command::run(&self.store, ctx, request, OnConflict::Retry, async move |uow| {
            let address = if valid.address.is_empty() {
                None
            } else {
                let data_key = DataKey::create(uow.conn(), &app.master, shelter_id).await?;
                Some(data_key.seal(&PersonalIdentifiers {
                    address: valid.address.clone(),
                    ..Default::default()
                }))
            };
            let registered = pb::ShelterRegistered {
                shelter_id: shelter_id.to_string(),
                code: valid.code.clone(),
                region: valid.region.clone(),
                address,
                capacity: valid.capacity.clone(),
                services: valid.services.clone(),
                wheelchair_accessible: valid.wheelchair_accessible,
                operator_agency: caller.caller.actor.agency.clone(),
            };
            let events = domain::decide(
                &Shelter::default(),
                &Command::Register {
                    registered: Box::new(registered),
                },
            )?;
            let appended = app
                .append(uow, shelter_id, &Shelter::default(), &events, &caller.metadata())
                .await?;
            let result = command::result(shelter_id, &appended);
            Ok(Decided {
                answer: pb::RegisterShelterResponse {
                    shelter_id: result.aggregate_id.clone(),
                    result: Some(result),
                },
                subject: shelter_id.to_string(),
                purpose: "command",
                linked: Vec::new(),
            })
        })
        .await
    }

    /// Runs a command on an existing shelter, or answers as its first run
    /// did. One that names a version is refused when the shelter moved on;
    /// one on the current version is decided again.
    async fn on_shelter<R: Made>(
        &self,
        ctx: &CallContext,
        request: &impl Message,
        call: ShelterCall,
    ) -> Result<R, AppError> {
        let request = Request {
            method: call.method,
            request_id: &call.request_id,
            message: request,
        };
        let on_conflict = OnConflict::unless_versioned(call.expected_version);
        // Owned, as in `register`.
        let (app, caller, call) = (self.clone(), ctx.clone(), call.clone());
        command::run(&self.store, ctx, request, on_conflict, async move |uow| {
            app.on_shelter_once(&caller, uow, &call).await
        })
        .await
    }

    /// One attempt of a command on an existing shelter, in `uow`.
    async fn on_shelter_once<R: Made>(
        &self,
        ctx: &CallContext,
        uow: &mut UnitOfWork,
        call: &ShelterCall,
    ) -> Result<Decided<R>, AppError> {
        let shelter_id = call.shelter_id;
        if let Command::HoldBed {
            held_for: HeldFor::Referral(referral_id),
            category,
            ..
        } = &call.command
        {
            // Before the shelter's lock, always in this order (the placement
            // reaction takes them in the same order).
            self.check_referral(ctx, uow.conn(), *referral_id, *category).await?;
        }
        if call.expected_version.is_none() {
            // Commands on the current version queue per shelter instead of
            // racing to append and retrying: under contention (many agencies
            // asking one shelter for beds) every caller gets an answer, a bed
            // or NO_BED_FREE. The lock ends with the transaction.
            lock_shelter(uow.conn(), shelter_id).await?;
        }
        let shelter = self.load_in(uow, shelter_id).await?;
        if shelter.version == 0 {
            return Err(not_found(shelter_id));
        }
        let hold = match &call.command {
            Command::ReleaseHold { hold_id } | Command::Admit { hold_id, .. } | Command::Discharge { hold_id, .. } => {
                shelter.holds.get(&hold_id.to_string())
            }
            _ => None,
        };
        if let Some(hold) = hold {
            // The audit entry (a refusal's too) lists under the referral's person.
            concern_person(ctx, uow.conn(), &hold.referral_id).await?;
        }
        let holder = match &call.command {
            Command::ReleaseHold { .. } => hold.map(|h| h.holder_agency.as_str()),
            _ => None,
        };
        match call.standing {
            Who::Operator => ctx.check(&Standing {
                shelter_operator: Some(shelter.operator_agency()),
                ..Standing::default()
            })?,
            Who::OperatorOrHolder => ctx.check(&Standing {
                shelter_operator: Some(shelter.operator_agency()),
                addressees: holder.into_iter().collect(),
                ..Standing::default()
            })?,
            // Checked on the referral above.
            Who::Referral => {}
            // The matrix admits only the roles that may (the coordinator).
            Who::Anyone => ctx.check(&Standing::default())?,
        }
        if let Some(expected) = call.expected_version.filter(|e| *e != shelter.version) {
            return Err(AppError::Conflict {
                stream_id: domain::stream_id(shelter_id),
                expected,
                actual: shelter.version,
            });
        }
        let events = domain::decide(&shelter, &call.command)?;
        let appended = self.append(uow, shelter_id, &shelter, &events, &ctx.metadata()).await?;
        Ok(Decided {
            answer: R::made(&events, command::result(shelter_id, &appended)),
            subject: shelter_id.to_string(),
            purpose: "command",
            linked: Vec::new(),
        })
    }

    /// Fails unless `referral_id` is an accepted referral addressed to the
    /// caller's agency that asked for shelter in `category`, has no open
    /// hold anywhere and has holds left; counts the hold. Takes the
    /// referral's lock (and its row's) until the transaction ends: holds for
    /// one referral queue, and the placement reaction's release of an ended
    /// referral waits for this one (or this one sees the end).
    ///
    /// Order of the answers, for a read model that may lag: a referral not
    /// known as accepted is "not yet" (`REFERRAL_NOT_ACCEPTED`, retryable),
    /// whoever asks: a declined referral redirected to the caller and
    /// accepted by it may still read "declined, receiving someone else"
    /// here. `PERMISSION_DENIED` only when the row says accepted by another
    /// agency: an accepted referral is never redirected.
    ///
    /// # Errors
    /// `FAILED_PRECONDITION` `REFERRAL_NOT_ACCEPTED`, `NO_SHELTER_NEED`,
    /// `CATEGORY_MISMATCH`, `ALREADY_HELD` or `HOLD_LIMIT`;
    /// `PERMISSION_DENIED` when the referral was accepted by another agency.
    async fn check_referral(
        &self,
        ctx: &CallContext,
        conn: &mut PgConnection,
        referral_id: ReferralId,
        category: pb::BedCategory,
    ) -> Result<(), AppError> {
        lock_referral(&mut *conn, referral_id).await?;
        let row: Option<(String, String, bool, i32, Option<Uuid>)> = sqlx::query_as(
            "SELECT receiving_agency, state, wants_shelter, category, person_id
             FROM shelter_referrals WHERE referral_id = $1 FOR UPDATE",
        )
        .bind(referral_id.as_uuid())
        .fetch_optional(&mut *conn)
        .await?;
        // Not seen yet is not "no": the referral stream may be a moment behind.
        let Some((receiving_agency, state, wants_shelter, need, person_id)) = row else {
            return Err(not_accepted());
        };
        if let Some(person_id) = person_id {
            ctx.concerns_person(person_id);
        }
        if state != "accepted" {
            return Err(not_accepted());
        }
        ctx.check(&Standing {
            addressees: vec![receiving_agency.as_str()],
            ..Standing::default()
        })?;
        // The placement reaction may have seen the referral end before this
        // read model did.
        let ended: Option<bool> = sqlx::query_scalar("SELECT ended FROM placement_referrals WHERE referral_id = $1")
            .bind(referral_id.as_uuid())
            .fetch_optional(&mut *conn)
            .await?;
        if ended == Some(true) {
            return Err(not_accepted());
        }
        if !wants_shelter || need == 0 {
            return Err(AppError::precondition(
                NO_SHELTER_NEED,
                "referral",
                "the referral asked for no shelter: a bed is held only for a referral with a shelter need",
            ));
        }
        if need != category as i32 {
            return Err(AppError::precondition(
                CATEGORY_MISMATCH,
                "category",
                "the bed category is not the one the referral's shelter need names",
            ));
        }
        let open: Option<Uuid> = sqlx::query_scalar("SELECT hold_id FROM open_holds WHERE referral_id = $1")
            .bind(referral_id.as_uuid())
            .fetch_optional(&mut *conn)
            .await?;
        if open.is_some() {
            return Err(already_held());
        }
        // Counted in this transaction: a hold that fails after this counts nothing.
        if !take_hold(conn, referral_id).await? {
            return Err(AppError::precondition(
                HOLD_LIMIT,
                "referral",
                "the referral used up the holds it may make",
            ));
        }
        Ok(())
    }

    /// Sets the beds of one category; never below the beds held or occupied.
    ///
    /// # Errors
    /// `INVALID_ARGUMENT`, `NOT_FOUND`, `PERMISSION_DENIED` (not the operator),
    /// `ABORTED` (stale version), `FAILED_PRECONDITION` `CAPACITY_BELOW_OCCUPANCY`.
    #[tracing::instrument(skip_all, fields(shelter_id = Empty))]
    pub async fn change_capacity(
        &self,
        ctx: &CallContext,
        req: &pb::ChangeCapacityRequest,
    ) -> Result<CommandResult, AppError> {
        let mut v = Violations::new();
        let (request_id, shelter_id) = target(&mut v, &req.request_id, &req.shelter_id);
        let expected_version = v.check(validate::expected_version(domain::NAME, req.expected_version));
        let category = v.check(parse::category("category", req.category));
        let beds = v.check(parse::beds("beds", req.beds));
        let call = v.finish(|| ShelterCall {
            method: "ChangeCapacity",
            request_id: request_id.unwrap_or_default(),
            shelter_id: shelter_id.unwrap_or_default(),
            expected_version,
            standing: Who::Operator,
            command: Command::ChangeCapacity {
                category: category.unwrap_or_default(),
                beds: beds.unwrap_or_default(),
            },
        })?;
        concern(ctx, call.shelter_id, None);
        self.on_shelter(ctx, req, call).await
    }

    /// Approves a registered shelter: from then on placement, `HoldBed` and
    /// the capacity lists consider it. The coordinator's (the matrix admits
    /// no one else).
    ///
    /// # Errors
    /// `INVALID_ARGUMENT`, `NOT_FOUND`, `PERMISSION_DENIED`, `ABORTED` (stale
    /// version), `FAILED_PRECONDITION` `ALREADY_APPROVED`.
    #[tracing::instrument(skip_all, fields(shelter_id = Empty))]
    pub async fn approve_shelter(
        &self,
        ctx: &CallContext,
        req: &pb::ApproveShelterRequest,
    ) -> Result<CommandResult, AppError> {
        let mut v = Violations::new();
        let (request_id, shelter_id) = target(&mut v, &req.request_id, &req.shelter_id);
        let expected_version = v.check(validate::expected_version(domain::NAME, req.expected_version));
        let call = v.finish(|| ShelterCall {
            method: "ApproveShelter",
            request_id: request_id.unwrap_or_default(),
            shelter_id: shelter_id.unwrap_or_default(),
            expected_version,
            standing: Who::Anyone,
            command: Command::Approve,
        })?;
        concern(ctx, call.shelter_id, None);
        self.on_shelter(ctx, req, call).await
    }

    /// Holds a bed for an accepted referral addressed to the caller's agency
    /// until the hold expires.
    ///
    /// # Errors
    /// `INVALID_ARGUMENT`, `NOT_FOUND`, `PERMISSION_DENIED` (the referral was
    /// accepted by another agency), `FAILED_PRECONDITION`
    /// `REFERRAL_NOT_ACCEPTED`, `NO_SHELTER_NEED`, `CATEGORY_MISMATCH`,
    /// `SHELTER_NOT_APPROVED`, `NO_BED_FREE`, `ALREADY_HELD` or `HOLD_LIMIT`.
    #[tracing::instrument(skip_all, fields(shelter_id = Empty, referral_id = Empty))]
    pub async fn hold_bed(&self, ctx: &CallContext, req: &pb::HoldBedRequest) -> Result<pb::HoldBedResponse, AppError> {
        let mut v = Violations::new();
        let (request_id, shelter_id) = target(&mut v, &req.request_id, &req.shelter_id);
        let category = v.check(parse::category("category", req.category));
        let referral_id = v.check(ReferralId::parse("referral_id", &req.referral_id));
        let minutes = v.check(parse::hold_minutes(req.hold_minutes, self.hold_minutes_default));
        let expires_at = Utc::now() + chrono::Duration::minutes(i64::from(minutes.unwrap_or_default()));
        let call = v.finish(|| ShelterCall {
            method: "HoldBed",
            request_id: request_id.unwrap_or_default(),
            shelter_id: shelter_id.unwrap_or_default(),
            expected_version: None,
            standing: Who::Referral,
            command: Command::HoldBed {
                hold_id: HoldId::new(),
                category: category.unwrap_or_default(),
                held_for: HeldFor::Referral(referral_id.unwrap_or_default()),
                expires_at: validate::timestamp(expires_at),
                holder_agency: ctx.caller.actor.agency.clone(),
            },
        })?;
        if let Command::HoldBed {
            held_for: HeldFor::Referral(referral_id),
            ..
        } = &call.command
        {
            tracing::Span::current().record("referral_id", display(referral_id));
            // A refused hold is audited as an attempt on the referral.
            ctx.concerns(referral_id);
        }
        tracing::Span::current().record("shelter_id", display(call.shelter_id));
        self.on_shelter(ctx, req, call).await
    }

    /// Releases a hold before it expires.
    ///
    /// # Errors
    /// `INVALID_ARGUMENT`, `NOT_FOUND`, `FAILED_PRECONDITION` `NOT_HELD`.
    #[tracing::instrument(skip_all, fields(shelter_id = Empty, hold_id = Empty))]
    pub async fn release_hold(
        &self,
        ctx: &CallContext,
        req: &pb::ReleaseHoldRequest,
    ) -> Result<CommandResult, AppError> {
        // The agency the bed is held for, the operator or the coordinator.
        let call = Self::hold_call(
            ctx,
            "ReleaseHold",
            (&req.request_id, &req.shelter_id, &req.hold_id),
            Who::OperatorOrHolder,
            |hold_id| Command::ReleaseHold { hold_id },
        )?;
        self.on_shelter(ctx, req, call).await
    }

    /// Admits the person a held, unexpired hold was for.
    ///
    /// # Errors
    /// `INVALID_ARGUMENT`, `NOT_FOUND`, `PERMISSION_DENIED` (not the operator),
    /// `FAILED_PRECONDITION` `ADMIT_WITHOUT_HOLD`.
    #[tracing::instrument(skip_all, fields(shelter_id = Empty, hold_id = Empty))]
    pub async fn admit(&self, ctx: &CallContext, req: &pb::AdmitRequest) -> Result<CommandResult, AppError> {
        let now = validate::timestamp(Utc::now());
        let call = Self::hold_call(
            ctx,
            "Admit",
            (&req.request_id, &req.shelter_id, &req.hold_id),
            Who::Operator,
            |hold_id| Command::Admit { hold_id, now },
        )?;
        self.on_shelter(ctx, req, call).await
    }

    /// Discharges an admitted person.
    ///
    /// # Errors
    /// `INVALID_ARGUMENT`, `NOT_FOUND`, `PERMISSION_DENIED` (not the operator),
    /// `FAILED_PRECONDITION` `NOT_ADMITTED`.
    #[tracing::instrument(skip_all, fields(shelter_id = Empty, hold_id = Empty))]
    pub async fn discharge(&self, ctx: &CallContext, req: &pb::DischargeRequest) -> Result<CommandResult, AppError> {
        let now = validate::timestamp(Utc::now());
        let call = Self::hold_call(
            ctx,
            "Discharge",
            (&req.request_id, &req.shelter_id, &req.hold_id),
            Who::Operator,
            |hold_id| Command::Discharge { hold_id, now },
        )?;
        self.on_shelter(ctx, req, call).await
    }

    /// Validates the fields (request, shelter and hold ID) of a command on
    /// one hold, and records what it concerns.
    fn hold_call(
        ctx: &CallContext,
        method: &'static str,
        (request_id, shelter_id, hold_id): (&str, &str, &str),
        standing: Who,
        command: impl FnOnce(HoldId) -> Command,
    ) -> Result<ShelterCall, AppError> {
        let mut v = Violations::new();
        let (request_id, shelter_id) = target(&mut v, request_id, shelter_id);
        let hold_id = v.check(HoldId::parse("hold_id", hold_id));
        let (request_id, shelter_id, hold_id) = v.finish(|| {
            (
                request_id.unwrap_or_default(),
                shelter_id.unwrap_or_default(),
                hold_id.unwrap_or_default(),
            )
        })?;
        concern(ctx, shelter_id, Some(hold_id));
        Ok(ShelterCall {
            method,
            request_id,
            shelter_id,
            expected_version: None,
            standing,
            command: command(hold_id),
        })
    }
}
