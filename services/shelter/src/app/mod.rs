//! Command handling and queries: load the shelter, decide, append — with
//! idempotency, permissions, expiry timers and the audit trail around the
//! pure aggregate.
//!
//! Commands that act on the current version (`HoldBed`, `ReleaseHold`,
//! `Admit`, `Discharge`) queue per shelter on a transaction-scoped advisory
//! lock, so under contention the caller gets the bed or `NO_BED_FREE`; a
//! writer that takes no lock (the placement reaction, an expiry, a capacity
//! change) can still move the shelter on first, and then the command reloads
//! and decides again, a bounded number of times with a little jitter. The
//! expected-version append makes over-booking impossible either way. `ChangeCapacity`
//! names the version its caller read and gets `ABORTED` when it is stale.
//!
//! # Layout
//! - this module: the commands, and the one way events reach a shelter's
//!   stream ([`Shelters::append`]: events, outbox row and expiry timers in
//!   the caller's unit of work).
//! - [`queries`]: one shelter, free capacity.

pub mod queries;

use std::time::Duration;

use chrono::Utc;
use nrm_kernel::auth::Role;
use nrm_kernel::bus::Bus;
use nrm_kernel::command::{self, CallContext};
use nrm_kernel::error::{AppError, Violations};
use nrm_kernel::ids::{HoldId, ReferralId, ShelterId};
use nrm_kernel::seal::{DataKey, MasterKey};
use nrm_kernel::store::{Actor, Appended, EventMetadata, EventStore, NewEvent, StoreError, UnitOfWork};
use nrm_kernel::{audit, timers, validate};
use nrm_proto::common::v1::{CommandResult, PersonalIdentifiers};
use nrm_proto::shelter::v1 as pb;
use pb::shelter_event::Event;
use prost::Message;
use rand::Rng as _;

use crate::domain::{self, Command, DomainError, Shelter, parse};

/// Full protobuf name of the events this service publishes.
pub const PAYLOAD_TYPE: &str = "nrm.shelter.v1.ShelterEvent";
/// Name of the bounded context in subjects and stream names.
pub const CONTEXT: &str = "shelter";
/// Kind of the durable timer that expires a hold (aggregate ID: the hold; payload: the shelter ID).
pub const HOLD_EXPIRY: &str = "shelter.hold_expiry";

/// Roles that run shelters: register them, change capacity, admit, discharge.
pub const OPERATORS: &[Role] = &[Role::Shelter, Role::Msd, Role::Ngo, Role::Iom, Role::Coordinator];
/// Roles that may hold (and release) a bed for a referral.
pub const HOLDERS: &[Role] = &[
    Role::Msd,
    Role::Moh,
    Role::Ngo,
    Role::Iom,
    Role::Police,
    Role::Prosecutor,
    Role::Shelter,
    Role::Coordinator,
];

/// How many times a command on the current version is decided again after
/// another writer appended first.
const MAX_ATTEMPTS: u32 = 20;

/// The actor of what the service does by itself (timers, reactions).
#[must_use]
pub fn system_actor(task: &str) -> Actor {
    Actor {
        agency: "system".into(),
        role: "system".into(),
        officer: format!("shelter.{task}"),
    }
}

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

/// An answer that can be replayed for a retried request.
trait Answer: Message + Default {
    /// The answer of a command that appended `events`.
    fn answer(events: &[Event], result: CommandResult) -> Self;
    /// Marks the answer as the replay of the first one.
    fn mark_replayed(&mut self);
}

/// An answer marked as the replay of the first one.
fn replayed<R: Answer>(mut answer: R) -> R {
    answer.mark_replayed();
    answer
}

impl Answer for CommandResult {
    fn answer(_: &[Event], result: CommandResult) -> Self {
        result
    }

    fn mark_replayed(&mut self) {
        self.replayed = true;
    }
}

impl Answer for pb::RegisterShelterResponse {
    fn answer(_: &[Event], result: CommandResult) -> Self {
        Self {
            shelter_id: result.aggregate_id.clone(),
            result: Some(result),
        }
    }

    fn mark_replayed(&mut self) {
        if let Some(r) = self.result.as_mut() {
            r.replayed = true;
        }
    }
}

impl Answer for pb::HoldBedResponse {
    fn answer(events: &[Event], result: CommandResult) -> Self {
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

    fn mark_replayed(&mut self) {
        if let Some(r) = self.result.as_mut() {
            r.replayed = true;
        }
    }
}

/// A validated command on an existing shelter.
struct ShelterCall {
    /// The RPC, for fingerprints and the audit trail.
    method: &'static str,
    request_id: String,
    shelter_id: ShelterId,
    /// `None`: act on the current version (and decide again after a conflict).
    expected_version: Option<u64>,
    /// Only the operating agency (or the coordinator) may do this.
    operator_only: bool,
    /// The agency a hold is for may do this too (releasing its own hold).
    holder_too: bool,
    command: Command,
}

/// A shelter folded from its stored events.
fn fold(events: &[nrm_kernel::store::RecordedEvent]) -> Result<Shelter, AppError> {
    events.iter().try_fold(Shelter::default(), |shelter, recorded| {
        let event = pb::ShelterEvent::decode(recorded.payload.as_slice())
            .ok()
            .and_then(|e| e.event)
            .ok_or_else(|| AppError::Internal(format!("event {} does not decode", recorded.event_id)))?;
        Ok(domain::evolve(shelter, &event))
    })
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
        fold(&self.store.read_stream(&domain::stream_id(shelter_id)).await?)
    }

    /// The shelter folded from its events, read in `uow`.
    ///
    /// # Errors
    /// When the store fails or an event does not decode.
    pub async fn load_in(&self, uow: &mut UnitOfWork, shelter_id: ShelterId) -> Result<Shelter, AppError> {
        fold(&uow.read_stream(&domain::stream_id(shelter_id)).await?)
    }

    /// Appends `events` to the shelter's stream at `expected_version`, in
    /// `uow`, with what they imply beside them: a `BedHeld` schedules its
    /// expiry timer, a release or an admission cancels it.
    ///
    /// # Errors
    /// [`StoreError::Conflict`] when the stream moved on; the unit of work is then spent.
    pub async fn append(
        &self,
        uow: &mut UnitOfWork,
        shelter_id: ShelterId,
        expected_version: u64,
        events: &[Event],
        metadata: &EventMetadata,
    ) -> Result<Appended, StoreError> {
        let appended = uow
            .append(
                &domain::stream_id(shelter_id),
                expected_version,
                &to_new_events(events),
                metadata,
                &self.subject(shelter_id),
            )
            .await?;
        for event in events {
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
        Ok(appended)
    }

    /// The first answer to a request, if it ran before, marked as replayed.
    async fn replay<R: Answer>(&self, key: &str, fingerprint: &[u8]) -> Result<Option<R>, AppError> {
        Ok(command::replay::<R>(&self.store, key, fingerprint).await?.map(replayed))
    }

    /// Registers a shelter; the caller's agency operates it. The address is
    /// sealed under a key of the shelter's own.
    ///
    /// # Errors
    /// `INVALID_ARGUMENT` naming bad fields, `PERMISSION_DENIED` for a role that runs no shelters.
    #[tracing::instrument(skip_all, fields(shelter_id = tracing::field::Empty))]
    pub async fn register(
        &self,
        ctx: &CallContext,
        req: &pb::RegisterShelterRequest,
    ) -> Result<pb::RegisterShelterResponse, AppError> {
        ctx.caller.require("register a shelter", OPERATORS)?;
        let valid = parse::registration(req)?;
        let key = ctx.request_key(&valid.request_id);
        let fp = command::fingerprint("RegisterShelter", req);
        if let Some(previous) = self.replay(&key, &fp).await? {
            return Ok(previous);
        }
        let shelter_id = ShelterId::new();
        tracing::Span::current().record("shelter_id", tracing::field::display(shelter_id));
        let mut uow = self.store.begin().await?;
        let address = if valid.address.is_empty() {
            None
        } else {
            let data_key = DataKey::create(uow.conn(), &self.master, shelter_id).await?;
            Some(data_key.seal(&PersonalIdentifiers {
                address: valid.address,
                ..Default::default()
            }))
        };
        let registered = pb::ShelterRegistered {
            shelter_id: shelter_id.to_string(),
            code: valid.code,
            region: valid.region,
            address,
            capacity: valid.capacity,
            services: valid.services,
            wheelchair_accessible: valid.wheelchair_accessible,
            operator_agency: ctx.caller.actor.agency.clone(),
        };
        let events = domain::decide(
            &Shelter::default(),
            &Command::Register {
                registered: Box::new(registered),
            },
        )?;
        let appended = self.append(&mut uow, shelter_id, 0, &events, &ctx.metadata()).await?;
        audit::record(
            uow.conn(),
            &ctx.caller.actor,
            "RegisterShelter",
            &shelter_id.to_string(),
            "command",
        )
        .await?;
        let response = pb::RegisterShelterResponse::answer(&events, command::result(shelter_id, &appended));
        command::finish_with(&self.store, uow, &key, &fp, response, replayed).await
    }

    /// Runs a command on an existing shelter, or answers as its first run did.
    async fn on_shelter<R: Answer>(
        &self,
        ctx: &CallContext,
        request: &impl Message,
        call: ShelterCall,
    ) -> Result<R, AppError> {
        let key = ctx.request_key(&call.request_id);
        let fp = command::fingerprint(call.method, request);
        if let Some(previous) = self.replay::<R>(&key, &fp).await? {
            return Ok(previous);
        }
        let mut attempt = 1;
        loop {
            match self.on_shelter_once::<R>(ctx, &key, &fp, &call).await {
                Err(conflict @ AppError::Conflict { .. }) => {
                    // A twin of this request may have moved the shelter on first: answer as it did.
                    if let Some(previous) = self.replay::<R>(&key, &fp).await? {
                        return Ok(previous);
                    }
                    if call.expected_version.is_some() || attempt >= MAX_ATTEMPTS {
                        return Err(conflict);
                    }
                    metrics::counter!("nrm_shelter_command_retries_total", "method" => call.method).increment(1);
                    let pause = rand::thread_rng().gen_range(1..=5 * u64::from(attempt));
                    tokio::time::sleep(Duration::from_millis(pause)).await;
                    attempt += 1;
                }
                other => return other,
            }
        }
    }

    async fn on_shelter_once<R: Answer>(
        &self,
        ctx: &CallContext,
        key: &str,
        fp: &[u8],
        call: &ShelterCall,
    ) -> Result<R, AppError> {
        let shelter_id = call.shelter_id;
        let mut uow = self.store.begin().await?;
        if call.expected_version.is_none() {
            // Commands on the current version queue per shelter instead of
            // racing to append and retrying: under contention (many agencies
            // asking one shelter for beds) every caller gets an answer, a bed
            // or NO_BED_FREE. The lock ends with the transaction.
            sqlx::query("SELECT pg_advisory_xact_lock(hashtextextended($1, 0))")
                .bind(domain::stream_id(shelter_id))
                .execute(uow.conn())
                .await?;
        }
        let shelter = self.load_in(&mut uow, shelter_id).await?;
        if shelter.version == 0 {
            return Err(not_found(shelter_id));
        }
        let operator = shelter.operator_agency() == ctx.caller.actor.agency || ctx.caller.role == Role::Coordinator;
        let holder = call.holder_too
            && matches!(&call.command, Command::ReleaseHold { hold_id }
                if shelter.holds.get(&hold_id.to_string()).is_some_and(|h| h.holder_agency == ctx.caller.actor.agency));
        if (call.operator_only || call.holder_too) && !operator && !holder {
            return Err(AppError::PermissionDenied(format!(
                "only the operating agency or the coordinator may {}",
                call.method
            )));
        }
        if let Some(expected) = call.expected_version.filter(|e| *e != shelter.version) {
            return Err(AppError::Conflict {
                stream_id: domain::stream_id(shelter_id),
                expected,
                actual: shelter.version,
            });
        }
        let events = domain::decide(&shelter, &call.command)?;
        let appended = self
            .append(&mut uow, shelter_id, shelter.version, &events, &ctx.metadata())
            .await?;
        audit::record(
            uow.conn(),
            &ctx.caller.actor,
            call.method,
            &shelter_id.to_string(),
            "command",
        )
        .await?;
        let response = R::answer(&events, command::result(shelter_id, &appended));
        command::finish_with(&self.store, uow, key, fp, response, replayed).await
    }

    /// Sets the beds of one category; never below the beds held or occupied.
    ///
    /// # Errors
    /// `INVALID_ARGUMENT`, `NOT_FOUND`, `PERMISSION_DENIED` (not the operator),
    /// `ABORTED` (stale version), `FAILED_PRECONDITION` `CAPACITY_BELOW_OCCUPANCY`.
    #[tracing::instrument(skip_all, fields(shelter_id = %req.shelter_id))]
    pub async fn change_capacity(
        &self,
        ctx: &CallContext,
        req: &pb::ChangeCapacityRequest,
    ) -> Result<CommandResult, AppError> {
        ctx.caller.require("change a shelter's capacity", OPERATORS)?;
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
            operator_only: true,
            holder_too: false,
            command: Command::ChangeCapacity {
                category: category.unwrap_or_default(),
                beds: beds.unwrap_or_default(),
            },
        })?;
        self.on_shelter(ctx, req, call).await
    }

    /// Holds a bed for a referral until the hold expires.
    ///
    /// # Errors
    /// `INVALID_ARGUMENT`, `NOT_FOUND`, `FAILED_PRECONDITION` `NO_BED_FREE` or `ALREADY_HELD`.
    #[tracing::instrument(skip_all, fields(shelter_id = %req.shelter_id))]
    pub async fn hold_bed(&self, ctx: &CallContext, req: &pb::HoldBedRequest) -> Result<pb::HoldBedResponse, AppError> {
        ctx.caller.require("hold a bed", HOLDERS)?;
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
            operator_only: false,
            holder_too: false,
            command: Command::HoldBed {
                hold_id: HoldId::new(),
                category: category.unwrap_or_default(),
                referral_id: referral_id.unwrap_or_default(),
                expires_at: validate::timestamp(expires_at),
                holder_agency: ctx.caller.actor.agency.clone(),
            },
        })?;
        self.on_shelter(ctx, req, call).await
    }

    /// Releases a hold before it expires.
    ///
    /// # Errors
    /// `INVALID_ARGUMENT`, `NOT_FOUND`, `FAILED_PRECONDITION` `NOT_HELD`.
    #[tracing::instrument(skip_all, fields(shelter_id = %req.shelter_id, hold_id = %req.hold_id))]
    pub async fn release_hold(
        &self,
        ctx: &CallContext,
        req: &pb::ReleaseHoldRequest,
    ) -> Result<CommandResult, AppError> {
        ctx.caller.require("release a hold", HOLDERS)?;
        let mut call = Self::hold_call(
            "ReleaseHold",
            &req.request_id,
            &req.shelter_id,
            &req.hold_id,
            |hold_id| Command::ReleaseHold { hold_id },
        )?;
        // Only the agency the bed is held for, the operator or the coordinator.
        call.holder_too = true;
        self.on_shelter(ctx, req, call).await
    }

    /// Admits the person a held, unexpired hold was for.
    ///
    /// # Errors
    /// `INVALID_ARGUMENT`, `NOT_FOUND`, `PERMISSION_DENIED` (not the operator),
    /// `FAILED_PRECONDITION` `ADMIT_WITHOUT_HOLD`.
    #[tracing::instrument(skip_all, fields(shelter_id = %req.shelter_id, hold_id = %req.hold_id))]
    pub async fn admit(&self, ctx: &CallContext, req: &pb::AdmitRequest) -> Result<CommandResult, AppError> {
        ctx.caller.require("admit a person", OPERATORS)?;
        let now = validate::timestamp(Utc::now());
        let mut call = Self::hold_call("Admit", &req.request_id, &req.shelter_id, &req.hold_id, |hold_id| {
            Command::Admit { hold_id, now }
        })?;
        call.operator_only = true;
        self.on_shelter(ctx, req, call).await
    }

    /// Discharges an admitted person.
    ///
    /// # Errors
    /// `INVALID_ARGUMENT`, `NOT_FOUND`, `PERMISSION_DENIED` (not the operator),
    /// `FAILED_PRECONDITION` `NOT_ADMITTED`.
    #[tracing::instrument(skip_all, fields(shelter_id = %req.shelter_id, hold_id = %req.hold_id))]
    pub async fn discharge(&self, ctx: &CallContext, req: &pb::DischargeRequest) -> Result<CommandResult, AppError> {
        ctx.caller.require("discharge a person", OPERATORS)?;
        let now = validate::timestamp(Utc::now());
        let mut call = Self::hold_call("Discharge", &req.request_id, &req.shelter_id, &req.hold_id, |hold_id| {
            Command::Discharge { hold_id, now }
        })?;
        call.operator_only = true;
        self.on_shelter(ctx, req, call).await
    }

    /// Validates the fields of a command on one hold.
    fn hold_call(
        method: &'static str,
        request_id: &str,
        shelter_id: &str,
        hold_id: &str,
        command: impl FnOnce(HoldId) -> Command,
    ) -> Result<ShelterCall, AppError> {
        let mut v = Violations::new();
        let (request_id, shelter_id) = target(&mut v, request_id, shelter_id);
        let hold_id = v.check(HoldId::parse("hold_id", hold_id));
        v.finish(|| ShelterCall {
            method,
            request_id: request_id.unwrap_or_default(),
            shelter_id: shelter_id.unwrap_or_default(),
            expected_version: None,
            operator_only: false,
            holder_too: false,
            command: command(hold_id.unwrap_or_default()),
        })
    }
}
