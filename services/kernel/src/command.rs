//! Idempotent commands: who calls and with which correlation, the request
//! key and fingerprint of a command, replaying the first answer to a retried
//! request, and recording the answer in the command's unit of work.
//!
//! A command runs once per request key (the caller's agency and its
//! `request_id`). Its answer is recorded in the same transaction as its
//! events; a retry with the same request is answered from that record, a
//! different request under the same key is refused.

use std::sync::{Arc, Mutex};

use nrm_proto::common::v1::CommandResult;
use prost::Message;
use sha2::{Digest, Sha256};
use uuid::Uuid;

use crate::audit;
use crate::auth::Caller;
use crate::error::AppError;
use crate::permissions::{self, Permit, Standing};
use crate::retry;
use crate::store::{
    Actor, Append, Appended, AuditEntry, CommandRecord, EventMetadata, EventStore, NewEvent, StoreError, UnitOfWork,
};
use crate::telemetry;

/// What a call concerns, as the application recorded it: parsed IDs only.
#[derive(Debug, Clone, Default)]
struct Concerns {
    subject: String,
    person: Option<Uuid>,
}

/// Who calls, with which permission, and the call's correlation.
#[derive(Debug, Clone)]
pub struct CallContext {
    /// The verified caller.
    pub caller: Caller,
    /// From `x-correlation-id` metadata, or new.
    pub correlation_id: Uuid,
    /// The caller's role's row of the permission matrix for this RPC.
    permit: Permit,
    /// What the call concerns, for its audit entries (a refusal's too).
    concerns: Arc<Mutex<Concerns>>,
}

impl CallContext {
    /// The context of a call by `caller` that the gate admitted with `permit`.
    #[must_use]
    pub fn new(caller: Caller, correlation_id: Uuid, permit: Permit) -> Self {
        Self {
            caller,
            correlation_id,
            permit,
            concerns: Arc::default(),
        }
    }

    /// The context of a command a service runs by itself, as a reaction or
    /// a timer (`task` names it in the audit trail and on the events): the
    /// system actor, under the permission `role` has for `method` of
    /// `service` (the rules of that RPC, never more), in the correlation of
    /// the event that caused it.
    ///
    /// # Errors
    /// [`AppError`] when the matrix gives `role` no such permission.
    pub fn system(
        task: &'static str,
        service: &str,
        method: &str,
        role: crate::auth::Role,
        cause: Option<&EventMetadata>,
    ) -> Result<Self, AppError> {
        let permit = crate::permissions::permit(service, method, None, role)?;
        let caller = Caller {
            actor: Actor::system(task),
            role,
        };
        Ok(Self::new(
            caller,
            cause.map_or_else(Uuid::now_v7, |m| m.correlation_id),
            permit,
        ))
    }

    /// The caller's permission for this RPC.
    #[must_use]
    pub fn permit(&self) -> &Permit {
        &self.permit
    }

    /// The caller's permission for `part` of this RPC (`personal data`).
    ///
    /// # Errors
    /// [`AppError::PermissionDenied`] when the role has none.
    pub fn part(&self, part: &str) -> Result<Permit, AppError> {
        let row = self.permit.permission();
        permissions::permit(row.service, row.method, Some(part), self.caller.role)
    }

    /// Fails unless the caller's agency stands in one of its permit's scopes
    /// to the record the call concerns.
    ///
    /// # Errors
    /// [`AppError::PermissionDenied`].
    pub fn check(&self, standing: &Standing<'_>) -> Result<(), AppError> {
        self.permit.check(self.agency(), standing)
    }

    /// Records what the call concerns (a parsed ID, never request text), for
    /// the audit entry the gate writes if the call is refused.
    pub fn concerns(&self, subject: impl std::fmt::Display) {
        if let Ok(mut concerns) = self.concerns.lock() {
            concerns.subject = subject.to_string();
        }
    }

    /// Records the person whose records the call reads or changes, so that
    /// its audit entries (a refusal's too) list under the person
    /// (`nrmctl audit person`).
    pub fn concerns_person(&self, person_id: Uuid) {
        if let Ok(mut concerns) = self.concerns.lock() {
            concerns.person = Some(person_id);
        }
    }

    /// What the call concerns, as recorded (empty: nothing yet).
    #[must_use]
    pub fn concerned(&self) -> String {
        self.concerns.lock().map(|c| c.subject.clone()).unwrap_or_default()
    }

    /// The person the call concerns, as recorded.
    #[must_use]
    pub fn concerned_person(&self) -> Option<Uuid> {
        self.concerns.lock().ok().and_then(|c| c.person)
    }

    /// The audit entry of this call's `action` on `subject` for `purpose`,
    /// with the person it concerns.
    #[must_use]
    pub fn audit_entry<'a>(&'a self, action: &'a str, subject: &'a str, purpose: &'a str) -> audit::Entry<'a> {
        audit::Entry {
            person_id: self.concerned_person(),
            ..audit::Entry::new(&self.caller.actor, action, subject, purpose)
        }
    }

    /// Metadata of the events this call appends: the caller is the actor,
    /// the call's correlation, a new causation, and the current trace context.
    #[must_use]
    pub fn metadata(&self) -> EventMetadata {
        let (traceparent, tracestate) = telemetry::current_trace_context();
        EventMetadata {
            correlation_id: self.correlation_id,
            causation_id: Uuid::now_v7(),
            actor: self.caller.actor.clone(),
            traceparent,
            tracestate,
        }
    }

    /// The key a command's answer is recorded under: request IDs are the
    /// caller's agency's own, so two agencies never collide.
    #[must_use]
    pub fn request_key(&self, request_id: &str) -> String {
        format!("{}:{request_id}", self.caller.actor.agency)
    }

    /// The caller's agency.
    #[must_use]
    pub fn agency(&self) -> &str {
        &self.caller.actor.agency
    }

    /// Whether the caller is told of possible duplicates of a case reported
    /// by `reporting_agency` and handled by `competent_authority`: the
    /// national coordinator, and the competent authority unless it is also
    /// the reporting agency (police reporting are their own competent
    /// authority by default). A reporter never learns whether, or by whom,
    /// the person was reported before (no oracle), in any service.
    #[must_use]
    pub fn sees_possible_duplicates(&self, reporting_agency: &str, competent_authority: &str) -> bool {
        self.caller.role == crate::auth::Role::Coordinator
            || (!competent_authority.is_empty()
                && self.agency() == competent_authority
                && self.agency() != reporting_agency)
    }
}

/// The fingerprint of a request to `method`: a retry must carry the same one.
#[must_use]
pub fn fingerprint(method: &str, request: &impl Message) -> Vec<u8> {
    let mut hash = Sha256::new();
    hash.update(method.as_bytes());
    hash.update(request.encode_to_vec());
    hash.finalize().to_vec()
}

/// The first answer to the request recorded under `key`, if it ran before.
/// The answer comes back as it was recorded (`replayed` is not set).
///
/// # Errors
/// [`AppError::RequestIdReused`] when the key was used for a request with
/// another fingerprint; [`AppError::Internal`] when the stored answer does not
/// decode as `R`; the store's errors.
pub(crate) async fn replay<R: Message + Default>(
    store: &EventStore,
    key: &str,
    fingerprint: &[u8],
) -> Result<Option<R>, AppError> {
    let Some(stored) = store.find_command(key).await? else {
        return Ok(None);
    };
    if stored.fingerprint != fingerprint {
        return Err(AppError::RequestIdReused);
    }
    R::decode(stored.response.as_slice())
        .map(Some)
        .map_err(|e| AppError::Internal(format!("stored response does not decode: {e}")))
}

/// Records `response` as the answer under `key` and commits `uow`. When a
/// concurrent twin of the request recorded its answer first, `uow` is rolled
/// back and the twin's answer returned as it was recorded.
///
/// # Errors
/// As [`replay`], and the store's errors on recording or committing.
pub async fn finish<R: Message + Default>(
    store: &EventStore,
    uow: UnitOfWork,
    key: &str,
    fingerprint: &[u8],
    response: R,
) -> Result<R, AppError> {
    finish_with(store, uow, key, fingerprint, response, |twin| twin).await
}

/// As [`finish`], with the twin's answer passed through `replayed` (to mark it
/// as a replay).
///
/// # Errors
/// As [`finish`].
pub(crate) async fn finish_with<R: Message + Default>(
    store: &EventStore,
    mut uow: UnitOfWork,
    key: &str,
    fingerprint: &[u8],
    response: R,
    replayed: impl FnOnce(R) -> R,
) -> Result<R, AppError> {
    match uow.record_command(key, fingerprint, &response.encode_to_vec()).await {
        Ok(()) => {
            uow.commit().await?;
            Ok(response)
        }
        Err(StoreError::DuplicateRequest) => {
            drop(uow);
            replay(store, key, fingerprint)
                .await?
                .map(replayed)
                .ok_or_else(|| AppError::Internal("twin request vanished".into()))
        }
        Err(e) => Err(e.into()),
    }
}

/// An answer a command gives, and gives again, marked, to a retry.
pub trait Answer: Message + Default {
    /// Marks the answer as the replay of the first one.
    fn mark_replayed(&mut self);
}

impl Answer for CommandResult {
    fn mark_replayed(&mut self) {
        self.replayed = true;
    }
}

/// Answers that carry a [`CommandResult`] beside what the command made.
/// Implemented here: the services cannot implement the kernel's trait for
/// the proto crate's messages themselves (orphan rule).
macro_rules! answers_with_result {
    ($($answer:ty),+ $(,)?) => {
        $(impl Answer for $answer {
            fn mark_replayed(&mut self) {
                if let Some(result) = self.result.as_mut() {
                    result.mark_replayed();
                }
            }
        })+
    };
}

answers_with_result!(
    nrm_proto::identification::v1::ReportPresumedVictimResponse,
    nrm_proto::referral::v1::CreateReferralResponse,
    nrm_proto::referral::v1::RecordConsentResponse,
    nrm_proto::referral::v1::AddPlanGoalResponse,
    nrm_proto::shelter::v1::RegisterShelterResponse,
    nrm_proto::shelter::v1::HoldBedResponse,
);

fn marked<R: Answer>(mut answer: R) -> R {
    answer.mark_replayed();
    answer
}

/// A command as the caller sent it: its RPC, its request ID, the request.
#[derive(Debug, Clone, Copy)]
pub struct Request<'a, M> {
    /// The RPC (`AcceptReferral`): the fingerprint's and the audit entry's name.
    pub method: &'static str,
    /// The caller's request ID (already validated).
    pub request_id: &'a str,
    /// The request as received, for the fingerprint.
    pub message: &'a M,
}

/// What a command does when another writer appended to its stream first.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnConflict {
    /// The caller named the version it decided on: answer `ABORTED`.
    Refuse,
    /// The command is decided on the current version: decide again, up to
    /// [`crate::retry::CONFLICTS`]'s attempts.
    Retry,
}

impl OnConflict {
    /// `Refuse` when the caller named a version, `Retry` otherwise.
    #[must_use]
    pub fn unless_versioned(expected_version: Option<u64>) -> Self {
        if expected_version.is_some() {
            OnConflict::Refuse
        } else {
            OnConflict::Retry
        }
    }
}

/// What one attempt of a command decided, in its unit of work.
#[derive(Debug)]
pub struct Decided<R> {
    /// The answer to the caller.
    pub answer: R,
    /// What the audit entry names: the aggregate the command concerned.
    pub subject: String,
    /// Why, as the audit entry records it: `command`, or a code (an
    /// erasure's reason), never free text.
    pub purpose: &'static str,
    /// Other aggregates the command changed too (an erasure's linked
    /// cases), each audited after the main entry as `<method>:linked`.
    pub linked: Vec<String>,
}

/// What one attempt of a command that only appends decided: the kernel
/// writes events, outbox row, answer and audit entry in one statement.
pub struct Planned<R> {
    /// The stream.
    pub stream_id: String,
    /// Its version as the attempt read it.
    pub expected_version: u64,
    /// The events.
    pub events: Vec<NewEvent>,
    /// The subject their commit is published under.
    pub subject: String,
    /// What the audit entry names.
    pub audit_subject: String,
    /// The answer, made from what the append will write.
    pub answer: Box<dyn FnOnce(&Appended) -> R + Send>,
}

/// The one command path: a retried request is answered as its first run
/// was; otherwise `attempt` decides in a new unit of work, the kernel records
/// the audit entry and the answer there and commits; a conflict with another
/// writer is refused or decided again (`on_conflict`), and a concurrent twin
/// of the request that committed first is answered as it was. The caller has
/// parsed the request and the gate has checked the role; `attempt` loads the
/// record, checks the permit's scope, decides and appends.
///
/// # Errors
/// What `attempt` returns; [`AppError::RequestIdReused`] for a request ID
/// used for another request; the store's errors.
pub async fn run<M: Message, R: Answer>(
    store: &EventStore,
    ctx: &CallContext,
    request: Request<'_, M>,
    on_conflict: OnConflict,
    mut attempt: impl AsyncFnMut(&mut UnitOfWork) -> Result<Decided<R>, AppError>,
) -> Result<R, AppError> {
    let key = ctx.request_key(request.request_id);
    let fp = fingerprint(request.method, request.message);
    if let Some(previous) = replay::<R>(store, &key, &fp).await? {
        return Ok(marked(previous));
    }
    let mut failures = 0;
    loop {
        let mut uow = store.begin().await?;
        let outcome = match attempt(&mut uow).await {
            Ok(decided) => {
                audit::append(
                    uow.conn(),
                    &ctx.audit_entry(request.method, &decided.subject, decided.purpose),
                )
                .await?;
                let linked = format!("{}:linked", request.method);
                for subject in &decided.linked {
                    audit::append(uow.conn(), &ctx.audit_entry(&linked, subject, decided.purpose)).await?;
                }
                finish_with(store, uow, &key, &fp, decided.answer, marked).await
            }
            Err(e) => {
                // Rolled back before the twin's record is read and before any
                // pause: the attempt's connection and locks go back at once.
                drop(uow);
                Err(e)
            }
        };
        match again(store, &key, &fp, on_conflict, &mut failures, request.method, outcome).await? {
            Some(answer) => return Ok(answer),
            None => continue,
        }
    }
}

/// [`run`] for a command that writes nothing but its events: the events,
/// outbox row, answer and audit entry go in one autocommitted statement.
///
/// # Errors
/// As [`run`].
pub async fn run_append<M: Message, R: Answer>(
    store: &EventStore,
    ctx: &CallContext,
    request: Request<'_, M>,
    on_conflict: OnConflict,
    mut attempt: impl AsyncFnMut() -> Result<Planned<R>, AppError>,
) -> Result<R, AppError> {
    let key = ctx.request_key(request.request_id);
    let fp = fingerprint(request.method, request.message);
    if let Some(previous) = replay::<R>(store, &key, &fp).await? {
        return Ok(marked(previous));
    }
    let metadata = ctx.metadata();
    let mut failures = 0;
    loop {
        let outcome = match attempt().await {
            Ok(planned) => {
                let plan = Appended::plan(planned.expected_version, planned.events.len());
                let answer = (planned.answer)(&plan);
                let response = answer.encode_to_vec();
                let append = Append {
                    stream_id: &planned.stream_id,
                    expected_version: planned.expected_version,
                    events: &planned.events,
                    metadata: &metadata,
                    subject: &planned.subject,
                };
                let record = CommandRecord {
                    request_key: &key,
                    fingerprint: &fp,
                    response: &response,
                };
                let audit = AuditEntry {
                    action: request.method,
                    subject_id: &planned.audit_subject,
                    purpose: "command",
                    person_id: ctx.concerned_person(),
                };
                match store.append_command(&append, &plan, &record, Some(&audit)).await {
                    Ok(()) => Ok(answer),
                    Err(StoreError::DuplicateRequest) => replay(store, &key, &fp)
                        .await?
                        .map(marked)
                        .ok_or_else(|| AppError::Internal("twin request vanished".into())),
                    Err(e) => Err(e.into()),
                }
            }
            Err(e) => Err(e),
        };
        match again(store, &key, &fp, on_conflict, &mut failures, request.method, outcome).await? {
            Some(answer) => return Ok(answer),
            None => continue,
        }
    }
}

/// After an attempt: its answer; when it failed, a twin's answer if one
/// committed first; on a conflict, `None` to decide again after a pause, or
/// the conflict; the attempt's error otherwise.
async fn again<R: Answer>(
    store: &EventStore,
    key: &str,
    fp: &[u8],
    on_conflict: OnConflict,
    failures: &mut u32,
    method: &'static str,
    outcome: Result<R, AppError>,
) -> Result<Option<R>, AppError> {
    match outcome {
        Ok(answer) => Ok(Some(answer)),
        Err(AppError::RequestIdReused) => Err(AppError::RequestIdReused),
        Err(conflict @ AppError::Conflict { .. }) => {
            // A twin of this request may have moved the aggregate on first: answer as it did.
            if let Some(previous) = replay::<R>(store, key, fp).await? {
                return Ok(Some(marked(previous)));
            }
            *failures += 1;
            if on_conflict == OnConflict::Refuse || retry::CONFLICTS.exhausted(*failures) {
                return Err(conflict);
            }
            metrics::counter!("nrm_command_retries_total", "method" => method).increment(1);
            tokio::time::sleep(retry::CONFLICTS.jittered(*failures)).await;
            Ok(None)
        }
        // A twin that committed before this attempt loaded makes it fail on
        // a rule (already withdrawn, goal already met) or a standing the
        // twin changed: answer as the twin did. Without a twin (or when the
        // record cannot be read), the attempt's own error.
        Err(e) => match replay::<R>(store, key, fp).await {
            Ok(Some(previous)) => Ok(Some(marked(previous))),
            _ => Err(e),
        },
    }
}

/// The result of a command on `aggregate_id` that appended `appended`.
#[must_use]
pub fn result(aggregate_id: impl ToString, appended: &Appended) -> CommandResult {
    CommandResult {
        aggregate_id: aggregate_id.to_string(),
        version: appended.version,
        event_ids: appended.event_ids.iter().map(ToString::to_string).collect(),
        replayed: false,
    }
}

/// Marks a recorded result as the replay of the first answer.
#[must_use]
pub fn replayed(mut result: CommandResult) -> CommandResult {
    result.replayed = true;
    result
}

/// Events to append: each named by `event_type`, at schema version 1, its
/// payload the encoded `envelope` of the event.
pub fn new_events<E, M: Message>(
    events: &[E],
    event_type: impl Fn(&E) -> &'static str,
    envelope: impl Fn(&E) -> M,
) -> Vec<NewEvent> {
    events
        .iter()
        .map(|event| NewEvent {
            event_type: event_type(event).to_owned(),
            schema_version: 1,
            payload: envelope(event).encode_to_vec(),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fingerprints_tell_methods_and_requests_apart() {
        let a = CommandResult {
            aggregate_id: "a".into(),
            ..Default::default()
        };
        let b = CommandResult {
            aggregate_id: "b".into(),
            ..Default::default()
        };
        assert_eq!(fingerprint("Do", &a), fingerprint("Do", &a));
        assert_ne!(fingerprint("Do", &a), fingerprint("Do", &b));
        assert_ne!(fingerprint("Do", &a), fingerprint("Undo", &a));
    }

    #[test]
    fn request_keys_belong_to_the_agency() {
        let caller = Caller {
            actor: crate::store::Actor {
                agency: "kg-msd".into(),
                role: "msd".into(),
                officer: "o-1".into(),
            },
            role: crate::auth::Role::Msd,
        };
        let permit =
            permissions::permit(permissions::REFERRAL, "AcceptReferral", None, crate::auth::Role::Msd).unwrap();
        let ctx = CallContext::new(caller, Uuid::now_v7(), permit);
        assert_eq!(ctx.request_key("r-1"), "kg-msd:r-1");
        assert_eq!(ctx.agency(), "kg-msd");
        assert_eq!(ctx.metadata().correlation_id, ctx.correlation_id);
    }
}
