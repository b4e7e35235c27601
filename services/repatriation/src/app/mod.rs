//! Command handling: load the return, decide, append — on the kernel's one
//! command path ([`command::run`]: idempotent request keys, the audit entry
//! and the answer in the command's unit of work), with the person's
//! identifiers sealed under a key of the return's own.
//!
//! Permissions are the kernel's matrix: the gate admitted the caller's role;
//! once the return is loaded the call says what it concerns and checks how
//! the caller's agency stands to it (`ctx.check`): the agencies holding a
//! return are the one that opened it and the consulate it names.
//!
//! Every command on an existing return names the version it read (a stale
//! one answers `ABORTED`). From the consent on, every command appends in
//! the same unit of work one crossing commit for the home country
//! ([`crossing`]): either both are written or neither.
//!
//! # Layout
//! - this module: the application, opening a return, the commands on one.
//! - [`crossing`]: the crossing commits: out (sealed for the partner) and in
//!   (opened, sealed again here, applied once).
//! - [`queries`]: one return (identifiers to whom they are due, audited), the list.

pub mod crossing;
pub mod queries;

use std::sync::Arc;

use chrono::{DateTime, Utc};
use nrm_kernel::bus::Bus;
use nrm_kernel::command::{self, CallContext, Decided, OnConflict, Request};
use nrm_kernel::error::AppError;
use nrm_kernel::ids::{PersonId, ReturnId};
use nrm_kernel::permissions::Standing;
use nrm_kernel::seal::{DataKey, MasterKey};
use nrm_kernel::store::{EventStore, NewEvent, RecordedEvent, UnitOfWork};
use nrm_kernel::validate;
use nrm_kernel::xborder::{CountryCode, Federation};
use nrm_proto::common::v1::{CommandResult, IdentityDocument, PersonalIdentifiers, SealedData};
use nrm_proto::repatriation::v1 as pb;
use pb::repatriation_event::Event;
use prost::Message;
use tracing::field::{Empty, display};

use crate::domain::{self, Command, DomainError, Return, parse};

/// Full protobuf name of the events of a return.
pub const PAYLOAD_TYPE: &str = "nrm.repatriation.v1.RepatriationEvent";
/// Name of the bounded context in subjects and stream names.
pub const CONTEXT: &str = "repatriation";
/// Rule code: the citizenship is not a partner country of this deployment
/// (or is this country).
pub const UNKNOWN_PARTNER: &str = "UNKNOWN_PARTNER";

impl From<DomainError> for AppError {
    fn from(err: DomainError) -> Self {
        match err {
            DomainError::NotFound => AppError::NotFound {
                kind: "return",
                id: String::new(),
            },
            other => AppError::precondition(other.code(), "return", other.to_string()),
        }
    }
}

/// A return folded from its stored events, with its step history.
#[derive(Debug, Clone, Default)]
pub struct History {
    /// The state.
    pub state: Return,
    /// Outgoing: every step, when and by whom (incoming: the snapshot's).
    pub steps: Vec<pb::Step>,
    /// When the first event was recorded.
    pub opened_at: Option<DateTime<Utc>>,
    /// When the last event was recorded.
    pub updated_at: Option<DateTime<Utc>>,
}

impl History {
    /// The steps as both sides see them: recorded here for an outgoing
    /// return, as they crossed for an incoming one.
    #[must_use]
    pub fn steps(&self) -> &[pb::Step] {
        match &self.state.announced {
            Some(snapshot) => &snapshot.steps,
            None => &self.steps,
        }
    }
}

/// A stored event, decoded.
///
/// # Errors
/// [`AppError::Internal`] when it does not decode.
pub fn decode(recorded: &RecordedEvent) -> Result<Event, AppError> {
    decode_payload(&recorded.payload)
        .ok_or_else(|| AppError::Internal(format!("event {} does not decode", recorded.event_id)))
}

/// An event's payload, decoded.
#[must_use]
pub fn decode_payload(payload: &[u8]) -> Option<Event> {
    pb::RepatriationEvent::decode(payload).ok().and_then(|e| e.event)
}

/// The return folded from its stored events, with its steps.
///
/// # Errors
/// [`AppError::Internal`] when an event does not decode.
pub fn fold(recorded: &[RecordedEvent]) -> Result<History, AppError> {
    let mut history = History::default();
    for r in recorded {
        let event = decode(r)?;
        history.state = domain::evolve(std::mem::take(&mut history.state), &event);
        if !matches!(event, Event::Announced(_) | Event::AnnouncedStep(_)) {
            let step = domain::step(
                &history.state,
                &event,
                validate::timestamp(r.recorded_at),
                &r.metadata.actor.agency,
            );
            history.steps.push(step);
        }
        history.opened_at.get_or_insert(r.recorded_at);
        history.updated_at = Some(r.recorded_at);
    }
    Ok(history)
}

/// The events to append, as the store takes them.
fn to_new_events(events: &[Event]) -> Vec<NewEvent> {
    command::new_events(events, domain::event_type, |event| pb::RepatriationEvent {
        event: Some(event.clone()),
    })
}

fn not_found(return_id: ReturnId) -> AppError {
    AppError::NotFound {
        kind: "return",
        id: return_id.to_string(),
    }
}

/// The pseudonymous person whose key seals the return's identifiers.
fn key_owner(sealed: &SealedData) -> Result<PersonId, AppError> {
    PersonId::parse("person_id", &sealed.person_id)
        .map_err(|_| AppError::Internal("sealed data name no key owner".into()))
}

/// Records the return a call concerns: on its span, and for the audit entry
/// of a refusal; and the person its identifiers are sealed for, so that the
/// entries list under the person.
fn concern(ctx: &CallContext, return_id: ReturnId, state: Option<&Return>) {
    tracing::Span::current().record("return_id", display(return_id));
    ctx.concerns(return_id);
    let sealed = state.and_then(|s| {
        s.opened
            .as_ref()
            .and_then(|o| o.identifiers.as_ref())
            .or(s.announced_identifiers.as_ref())
    });
    if let Some(person) = sealed.and_then(|s| key_owner(s).ok()) {
        ctx.concerns_person(person.as_uuid());
    }
}

/// How the caller's agency stands to a return: its holders (outgoing), or
/// the home country's agencies under the person's consent (incoming).
#[must_use]
pub fn standing(state: &Return) -> Standing<'_> {
    Standing {
        case_holders: state.holders(),
        consented: state.is_incoming(),
        ..Standing::default()
    }
}

/// The repatriation application.
#[derive(Clone, Debug)]
pub struct Returns {
    store: EventStore,
    bus: Bus,
    master: MasterKey,
    federation: Arc<Federation>,
}

impl Returns {
    /// The application over its store, bus, sealing key and partners.
    #[must_use]
    pub fn new(store: EventStore, bus: Bus, master: MasterKey, federation: Federation) -> Self {
        Self {
            store,
            bus,
            master,
            federation: Arc::new(federation),
        }
    }

    /// The event store.
    #[must_use]
    pub fn store(&self) -> &EventStore {
        &self.store
    }

    /// This deployment among its partners.
    #[must_use]
    pub fn federation(&self) -> &Federation {
        &self.federation
    }

    /// The subject of a return's own commits.
    fn subject(&self, return_id: &str) -> String {
        self.bus.subject(CONTEXT, domain::NAME, return_id)
    }

    /// The return with its steps, read from the store.
    ///
    /// # Errors
    /// When the store fails or an event does not decode.
    pub async fn load(&self, return_id: ReturnId) -> Result<History, AppError> {
        fold(&self.store.read_stream(&domain::stream_id(return_id)).await?)
    }

    /// The return with its steps, read in `uow`.
    ///
    /// # Errors
    /// When the store fails or an event does not decode.
    pub async fn load_in(&self, uow: &mut UnitOfWork, return_id: ReturnId) -> Result<History, AppError> {
        fold(&uow.read_stream(&domain::stream_id(return_id)).await?)
    }

    /// The key sealing the return's identifiers, read on `db` (a command's
    /// unit of work, so that it holds one connection, not two; or the
    /// pool); `None` when it was deleted.
    async fn key_of<'c>(
        &self,
        db: impl sqlx::PgExecutor<'c>,
        sealed: &SealedData,
    ) -> Result<Option<DataKey>, AppError> {
        Ok(DataKey::load(db, &self.master, key_owner(sealed)?).await?)
    }

    /// The identifiers of an outgoing return (with the certificate of
    /// return once issued), opened with its key read on `db`; `None` when
    /// its key was deleted.
    async fn identifiers_of<'c>(
        &self,
        db: impl sqlx::PgExecutor<'c>,
        state: &Return,
    ) -> Result<Option<PersonalIdentifiers>, AppError> {
        let Some(sealed) = state.opened.as_ref().and_then(|o| o.identifiers.as_ref()) else {
            return Ok(None);
        };
        let Some(key) = self.key_of(db, sealed).await? else {
            return Ok(None);
        };
        // Never the sealing error's text: it could name what it opened.
        let opening = |_| AppError::Internal("the return's sealed data do not open".into());
        let mut identifiers = key.open(sealed).map_err(opening)?;
        if let Some(document) = state.document.as_ref().and_then(|d| d.document.as_ref()) {
            identifiers
                .documents
                .extend(key.open(document).map_err(opening)?.documents);
        }
        Ok(Some(identifiers))
    }

    /// Opens a return for a person whose citizenship is a partner country;
    /// the caller's agency and the named consulate hold it. The identifiers
    /// are sealed at once under a new key of the return's own.
    ///
    /// # Errors
    /// `INVALID_ARGUMENT` naming bad fields; `FAILED_PRECONDITION`
    /// `UNKNOWN_PARTNER`; `PERMISSION_DENIED`.
    #[tracing::instrument(skip_all, fields(return_id = Empty))]
    pub async fn open(
        &self,
        ctx: &CallContext,
        req: &pb::OpenReturnRequest,
    ) -> Result<pb::OpenReturnResponse, AppError> {
        // The matrix lets IOM and the consulates open any new return.
        ctx.check(&Standing::default())?;
        let opening = parse::open(req, Utc::now())?;
        let citizenship = CountryCode::parse("citizenship", &opening.coded.citizenship)
            .map_err(|v| AppError::InvalidArgument(vec![v]))?;
        if self.federation.partner(&citizenship).is_none() {
            return Err(AppError::precondition(
                UNKNOWN_PARTNER,
                "citizenship",
                "the citizenship is not a partner country of this deployment: a return goes to a partner",
            ));
        }
        let return_id = ReturnId::new();
        concern(ctx, return_id, None);
        let request = Request {
            method: "OpenReturn",
            request_id: &opening.request_id,
            message: req,
        };
        // The attempt owns what it uses: a future that borrows from the
        // handler is not known to be `Send` (rust-lang/rust#110338).
        let (app, caller) = (self.clone(), ctx.clone());
        let result = command::run(&self.store, ctx, request, OnConflict::Retry, async move |uow| {
            let person = PersonId::new();
            caller.concerns_person(person.as_uuid());
            let key = DataKey::create(uow.conn(), &app.master, person).await?;
            let opened = pb::ReturnOpened {
                return_id: return_id.to_string(),
                from_country: app.federation.country.as_str().to_owned(),
                identifiers: Some(key.seal(&opening.identifiers)),
                opened_by: caller.agency().to_owned(),
                ..opening.coded.clone()
            };
            let events = domain::decide(&Return::default(), &Command::Open(Box::new(opened)))?;
            let appended = uow
                .append(
                    &domain::stream_id(return_id),
                    0,
                    &to_new_events(&events),
                    &caller.metadata(),
                    &app.subject(&return_id.to_string()),
                )
                .await?;
            Ok(Decided {
                answer: command::result(return_id, &appended),
                subject: return_id.to_string(),
                purpose: "command",
                linked: Vec::new(),
            })
        })
        .await?;
        Ok(pb::OpenReturnResponse {
            return_id: result.aggregate_id.clone(),
            result: Some(result),
        })
    }

    /// Runs a validated command on an existing return, or answers as its
    /// first run did. `sealed_document` is the number of a travel document
    /// to seal under the return's key.
    async fn on_return(
        &self,
        ctx: &CallContext,
        method: &'static str,
        request: &impl Message,
        step: parse::Step,
        sealed_document: Option<String>,
    ) -> Result<CommandResult, AppError> {
        concern(ctx, step.target.return_id, None);
        let request_id = step.target.request_id.clone();
        let request = Request {
            method,
            request_id: &request_id,
            message: request,
        };
        let (app, caller) = (self.clone(), ctx.clone());
        command::run(&self.store, ctx, request, OnConflict::Refuse, async move |uow| {
            app.on_return_once(&caller, uow, &step, sealed_document.as_deref())
                .await
        })
        .await
    }

    /// One attempt of a command on an existing return, in `uow`.
    async fn on_return_once(
        &self,
        ctx: &CallContext,
        uow: &mut UnitOfWork,
        step: &parse::Step,
        document_number: Option<&str>,
    ) -> Result<Decided<CommandResult>, AppError> {
        let return_id = step.target.return_id;
        // The transaction's time: the one its events are recorded at.
        let now: DateTime<Utc> = sqlx::query_scalar("SELECT now()").fetch_one(uow.conn()).await?;
        let history = self.load_in(uow, return_id).await?;
        let state = &history.state;
        if !state.exists() {
            return Err(not_found(return_id));
        }
        concern(ctx, return_id, Some(state));
        // An incoming return has no holders: the home country's agencies
        // read it, and its steps are recorded where it was opened.
        if state.is_incoming() {
            return Err(DomainError::IncomingReturn.into());
        }
        ctx.check(&standing(state))?;
        if step.target.expected_version != state.version {
            return Err(AppError::Conflict {
                stream_id: domain::stream_id(return_id),
                expected: step.target.expected_version,
                actual: state.version,
            });
        }
        let command = match (&step.command, document_number) {
            (Command::RecordDocument(Some(issued)), Some(number)) => {
                Command::RecordDocument(Some(self.seal_document(uow.conn(), state, issued, number).await?))
            }
            (command, _) => command.clone(),
        };
        let events = domain::decide(state, &command)?;
        let metadata = ctx.metadata();
        let appended = uow
            .append(
                &domain::stream_id(return_id),
                state.version,
                &to_new_events(&events),
                &metadata,
                &self.subject(&return_id.to_string()),
            )
            .await?;
        let mut after = state.clone();
        let mut steps = history.steps.clone();
        for event in &events {
            after = domain::evolve(after, event);
            steps.push(domain::step(&after, event, validate::timestamp(now), ctx.agency()));
        }
        if after.crosses() {
            self.cross_out(uow, &after, &steps, &metadata).await?;
        }
        Ok(Decided {
            answer: command::result(return_id, &appended),
            subject: return_id.to_string(),
            purpose: "command",
            linked: Vec::new(),
        })
    }

    /// The issued document with its number sealed under the return's key.
    async fn seal_document<'c>(
        &self,
        db: impl sqlx::PgExecutor<'c>,
        state: &Return,
        issued: &pb::TravelDocumentIssued,
        number: &str,
    ) -> Result<pb::TravelDocumentIssued, AppError> {
        let sealed = state.opened.as_ref().and_then(|o| o.identifiers.as_ref());
        let key = match sealed {
            Some(sealed) => self.key_of(db, sealed).await?,
            None => None,
        };
        let Some(key) = key else {
            return Err(AppError::precondition(
                "ERASED",
                "return",
                "the person's data of this return were erased: no document can be sealed for it",
            ));
        };
        let document = PersonalIdentifiers {
            documents: vec![IdentityDocument {
                r#type: nrm_proto::common::v1::DocumentType::CertificateOfReturn as i32,
                number: number.to_owned(),
                issuing_country: state.to_country().to_ascii_uppercase(),
            }],
            ..Default::default()
        };
        Ok(pb::TravelDocumentIssued {
            document: Some(key.seal(&document)),
            valid_until: issued.valid_until,
        })
    }

    /// Records the person's informed consent to return and what may cross.
    ///
    /// # Errors
    /// `INVALID_ARGUMENT`, `NOT_FOUND`, `PERMISSION_DENIED`, `ABORTED`,
    /// `FAILED_PRECONDITION` (`STEP_OUT_OF_ORDER`, `FINISHED`, `INCOMING_RETURN`).
    #[tracing::instrument(skip_all, fields(return_id = Empty))]
    pub async fn record_consent(
        &self,
        ctx: &CallContext,
        req: &pb::RecordReturnConsentRequest,
    ) -> Result<CommandResult, AppError> {
        let step = parse::consent(req)?;
        self.on_return(ctx, "RecordReturnConsent", req, step, None).await
    }

    /// Records the risk assessment; not safe to return halts the return.
    ///
    /// # Errors
    /// As [`Returns::record_consent`].
    #[tracing::instrument(skip_all, fields(return_id = Empty))]
    pub async fn record_risk(
        &self,
        ctx: &CallContext,
        req: &pb::RecordRiskAssessmentRequest,
    ) -> Result<CommandResult, AppError> {
        let step = parse::risk(req)?;
        self.on_return(ctx, "RecordRiskAssessment", req, step, None).await
    }

    /// Asks the consulate for a travel document.
    ///
    /// # Errors
    /// As [`Returns::record_consent`].
    #[tracing::instrument(skip_all, fields(return_id = Empty))]
    pub async fn request_document(
        &self,
        ctx: &CallContext,
        req: &pb::RequestTravelDocumentRequest,
    ) -> Result<CommandResult, AppError> {
        let step = parse::request_document(req)?;
        self.on_return(ctx, "RequestTravelDocument", req, step, None).await
    }

    /// The consulate's answer: issued (the number sealed) or refused (the return halts).
    ///
    /// # Errors
    /// As [`Returns::record_consent`].
    #[tracing::instrument(skip_all, fields(return_id = Empty))]
    pub async fn record_document(
        &self,
        ctx: &CallContext,
        req: &pb::RecordTravelDocumentRequest,
    ) -> Result<CommandResult, AppError> {
        let answer = parse::document(req, Utc::now())?;
        let (command, number) = match answer.issued {
            Some((number, valid_until)) => (
                Command::RecordDocument(Some(pb::TravelDocumentIssued {
                    document: None,
                    valid_until: Some(valid_until),
                })),
                Some(number),
            ),
            None => (Command::RecordDocument(None), None),
        };
        let step = parse::Step {
            target: answer.target,
            command,
        };
        self.on_return(ctx, "RecordTravelDocument", req, step, number).await
    }

    /// Books the itinerary.
    ///
    /// # Errors
    /// As [`Returns::record_consent`].
    #[tracing::instrument(skip_all, fields(return_id = Empty))]
    pub async fn book_itinerary(
        &self,
        ctx: &CallContext,
        req: &pb::BookItineraryRequest,
    ) -> Result<CommandResult, AppError> {
        let step = parse::itinerary(req)?;
        self.on_return(ctx, "BookItinerary", req, step, None).await
    }

    /// Assigns the escort.
    ///
    /// # Errors
    /// As [`Returns::record_consent`].
    #[tracing::instrument(skip_all, fields(return_id = Empty))]
    pub async fn assign_escort(
        &self,
        ctx: &CallContext,
        req: &pb::AssignEscortRequest,
    ) -> Result<CommandResult, AppError> {
        let step = parse::escort(req)?;
        self.on_return(ctx, "AssignEscort", req, step, None).await
    }

    /// Records the departure (after the escort, when one was asked for).
    ///
    /// # Errors
    /// As [`Returns::record_consent`], and `ESCORT_REQUIRED`.
    #[tracing::instrument(skip_all, fields(return_id = Empty))]
    pub async fn record_departure(
        &self,
        ctx: &CallContext,
        req: &pb::RecordDepartureRequest,
    ) -> Result<CommandResult, AppError> {
        let step = parse::departure(req, Utc::now())?;
        self.on_return(ctx, "RecordDeparture", req, step, None).await
    }

    /// Records the arrival.
    ///
    /// # Errors
    /// As [`Returns::record_consent`], and `TIME_OUT_OF_ORDER`.
    #[tracing::instrument(skip_all, fields(return_id = Empty))]
    pub async fn record_arrival(
        &self,
        ctx: &CallContext,
        req: &pb::RecordArrivalRequest,
    ) -> Result<CommandResult, AppError> {
        let step = parse::arrival(req, Utc::now())?;
        self.on_return(ctx, "RecordArrival", req, step, None).await
    }

    /// Records the handover to the home country's NRM.
    ///
    /// # Errors
    /// As [`Returns::record_consent`], and `TIME_OUT_OF_ORDER`.
    #[tracing::instrument(skip_all, fields(return_id = Empty))]
    pub async fn record_handover(
        &self,
        ctx: &CallContext,
        req: &pb::RecordHandoverRequest,
    ) -> Result<CommandResult, AppError> {
        let step = parse::handover(req, Utc::now())?;
        self.on_return(ctx, "RecordHandover", req, step, None).await
    }

    /// Halts the return before departure.
    ///
    /// # Errors
    /// As [`Returns::record_consent`], and `ALREADY_DEPARTED`.
    #[tracing::instrument(skip_all, fields(return_id = Empty))]
    pub async fn halt(&self, ctx: &CallContext, req: &pb::HaltReturnRequest) -> Result<CommandResult, AppError> {
        let step = parse::halt(req)?;
        self.on_return(ctx, "HaltReturn", req, step, None).await
    }
}
