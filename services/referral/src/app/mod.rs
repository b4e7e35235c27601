//! Command handling and queries: load the aggregate, decide, append — with
//! idempotency (request keys, fingerprints, replay), permissions, the audit
//! trail, and the service's own tables (consents, open referrals, timers)
//! written in the same transaction as the events.
//!
//! Permissions are the kernel's matrix: the gate admitted the caller's role;
//! once the record is loaded, the application says what the call concerns
//! (`ctx.concerns`, for the audit entry of a refusal) and how the caller's
//! agency stands to it (`ctx.check`): the agency that made it, the agencies
//! holding the person's case, the referral's addressee, or (plans) an
//! accepted referral under an active consent.
//!
//! # Layout
//! - this module: the application, shared plumbing (loading, errors).
//! - [`consents`]: recording and withdrawing consents.
//! - [`referrals`]: creating and answering referrals; what timers and reactions do to them.
//! - [`plans`]: the individual rehabilitation plan.
//! - [`homecoming`]: the reintegration referral of a person handed over from abroad.
//! - [`queries`]: reading a referral or a plan, the inbox.

pub mod consents;
pub mod homecoming;
pub mod plans;
pub mod queries;
pub mod referrals;

use nrm_kernel::bus::Bus;
use nrm_kernel::command::{self, CallContext};
use nrm_kernel::error::{AppError, FieldViolation};
use nrm_kernel::ids::PersonId;
use nrm_kernel::permissions::Standing;
use nrm_kernel::store::{EventStore, NewEvent, UnitOfWork};
use nrm_proto::referral::v1 as pb;
use pb::referral_event::Event;
use prost::Message;
use sqlx::Row as _;
use uuid::Uuid;

use crate::domain::referral::Deadlines;
use crate::domain::{self, DomainError, PersonFacts, PersonStatus};

/// Full protobuf name of the events this service publishes.
pub const PAYLOAD_TYPE: &str = "nrm.referral.v1.ReferralEvent";
/// Name of the bounded context in subjects and stream names.
pub const CONTEXT: &str = "referral";
/// Kind of the timer that marks an unanswered referral overdue.
pub const ANSWER_DUE: &str = "referral.answer_due";
/// Kind of the timer that ends a consent at its expiry.
pub const CONSENT_EXPIRES: &str = "referral.consent_expires";

/// Policy of the service, from settings.
#[derive(Debug, Clone)]
pub struct Policy {
    /// Answer deadlines by urgency.
    pub deadlines: Deadlines,
    /// Refer persons found not identified too.
    pub allow_not_identified: bool,
    /// Where a person identified abroad is referred for reintegration on
    /// coming home (an agency code).
    pub reintegration_agency: String,
}

/// Records the person a call concerns: on the current span, and for the
/// call's audit entries (a refusal's too), so that it lists under the person.
fn concerning(ctx: &CallContext, person_id: PersonId) {
    tracing::Span::current().record("person_id", tracing::field::display(person_id));
    ctx.concerns(person_id);
    ctx.concerns_person(person_id.as_uuid());
}

/// Maps a domain error on aggregate `kind` with ID `id` to the application error.
fn rejected(kind: &'static str, id: impl ToString) -> impl FnOnce(DomainError) -> AppError {
    move |err| match err {
        DomainError::NotFound(kind) => AppError::NotFound {
            kind,
            id: id.to_string(),
        },
        DomainError::GoalNotFound => AppError::NotFound {
            kind: "goal",
            id: String::new(),
        },
        DomainError::NotReceivingAgency | DomainError::NotCaseHolder => {
            AppError::PermissionDenied(format!("{err} ({})", err.code()))
        }
        DomainError::AttestationMissing(fields) => AppError::InvalidArgument(
            fields
                .into_iter()
                .map(|field| FieldViolation::new(field, "is required for a consent given this way"))
                .collect(),
        ),
        other => AppError::precondition(other.code(), format!("{kind}/{}", id.to_string()), other.to_string()),
    }
}

fn to_new_events(events: &[Event]) -> Vec<NewEvent> {
    command::new_events(events, domain::event_type, |event| pb::ReferralEvent {
        event: Some(event.clone()),
    })
}

/// Decodes a stored or published payload.
///
/// # Errors
/// When the bytes are not a `ReferralEvent` with an event inside.
pub fn decode_event(payload: &[u8]) -> Result<Event, AppError> {
    pb::ReferralEvent::decode(payload)
        .ok()
        .and_then(|e| e.event)
        .ok_or_else(|| AppError::Internal("stored event does not decode".into()))
}

/// The referral application.
#[derive(Clone, Debug)]
pub struct Referrals {
    store: EventStore,
    bus: Bus,
    policy: Policy,
}

impl Referrals {
    /// The application over its store.
    #[must_use]
    pub fn new(store: EventStore, bus: Bus, policy: Policy) -> Self {
        Self { store, bus, policy }
    }

    /// The event store.
    #[must_use]
    pub fn store(&self) -> &EventStore {
        &self.store
    }

    fn subject(&self, aggregate: &str, id: &impl ToString) -> String {
        self.bus.subject(CONTEXT, aggregate, &id.to_string())
    }

    /// Folds a stream with `evolve`.
    async fn fold<S: Default>(&self, stream_id: &str, evolve: fn(S, &Event) -> S) -> Result<S, AppError> {
        let events = self.store.read_stream(stream_id).await?;
        events.iter().try_fold(S::default(), |state, recorded| {
            Ok(evolve(state, &decode_event(&recorded.payload)?))
        })
    }

    /// Folds a stream with `evolve`, reading inside `uow` (so it sees what
    /// the unit of work appended so far).
    async fn fold_in<S: Default>(
        uow: &mut UnitOfWork,
        stream_id: &str,
        evolve: fn(S, &Event) -> S,
    ) -> Result<S, AppError> {
        let payloads: Vec<Vec<u8>> =
            sqlx::query_scalar("SELECT payload FROM events WHERE stream_id = $1 ORDER BY version")
                .bind(stream_id)
                .fetch_all(uow.conn())
                .await?;
        payloads.iter().try_fold(S::default(), |state, payload| {
            Ok(evolve(state, &decode_event(payload)?))
        })
    }

    /// What identification has told us of a person (`None`: not known yet),
    /// read on `db` (a command's unit of work, so that it holds one
    /// connection, not two; or the pool).
    async fn person<'c>(
        &self,
        db: impl sqlx::PgExecutor<'c>,
        person_id: PersonId,
    ) -> Result<Option<PersonFacts>, AppError> {
        let row = sqlx::query(
            "SELECT case_id, status, child, reporting_agency, competent_authority FROM persons WHERE person_id = $1",
        )
        .bind(person_id.as_uuid())
        .fetch_optional(db)
        .await?;
        Ok(row.map(|r| PersonFacts {
            case_id: r.get::<Uuid, _>("case_id").to_string(),
            status: PersonStatus::from_case_status(r.get("status")),
            child: r.get("child"),
            reporting_agency: r.get("reporting_agency"),
            competent_authority: r.get("competent_authority"),
        }))
    }

    /// What identification has told us of a person, once the caller's
    /// agency is found to hold their case (`None`: not known yet, which the
    /// domain refuses).
    ///
    /// # Errors
    /// `PERMISSION_DENIED` (not an agency holding the case); the store's errors.
    async fn case_held<'c>(
        &self,
        db: impl sqlx::PgExecutor<'c>,
        caller: &CallContext,
        person_id: PersonId,
    ) -> Result<Option<PersonFacts>, AppError> {
        let person = self.person(db, person_id).await?;
        if let Some(person) = &person {
            caller.check(&Standing {
                case_holders: person.case_holders(),
                ..Standing::default()
            })?;
        }
        Ok(person)
    }

    /// Whether `agency` has an accepted referral for the person under an
    /// active consent (the `consented` scope), read on `db`. The consent
    /// row it finds is locked (`FOR SHARE`) until `db`'s transaction ends,
    /// so that a withdrawal or an expiry, which update that row, either
    /// waits for the command that relied on it or is seen by it; the
    /// referral rows are not locked, so that a withdrawal cancelling them
    /// cannot deadlock with it (in autocommit, on a read, the lock ends with
    /// the query).
    async fn consented<'c>(
        &self,
        db: impl sqlx::PgExecutor<'c>,
        person_id: PersonId,
        agency: &str,
    ) -> Result<bool, AppError> {
        let consented: bool = sqlx::query_scalar(
            "SELECT EXISTS (SELECT 1 FROM open_referrals o JOIN consents c ON c.consent_id = o.consent_id
             WHERE c.person_id = $1 AND c.recipient_agency = $2 AND o.accepted AND NOT c.withdrawn
               AND (c.expires_at IS NULL OR c.expires_at > now())
             FOR SHARE OF c)",
        )
        .bind(person_id.as_uuid())
        .bind(agency)
        .fetch_one(db)
        .await?;
        Ok(consented)
    }
}
