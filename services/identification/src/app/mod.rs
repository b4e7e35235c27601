//! Command handling and queries: load the case, decide, append — with
//! idempotency, permissions and the audit trail around the pure aggregate.
//!
//! Who may call what is the kernel's permission matrix: the gate admits the
//! caller's role, and each handler, once it has loaded the case, checks the
//! caller's agency against the case's standing ([`standing`]: the reporting
//! agency made it; it and the competent authority hold it). Span fields and
//! audit entries carry parsed IDs and codes only, never request text.
//!
//! # Layout
//! - this module: the commands.
//! - [`abroad`]: opening the case of a person handed over from abroad.
//! - [`notify`]: filing an anonymous notification (its own aggregate).
//! - [`queries`]: reading one case, listing cases.

pub mod abroad;
pub mod notify;
pub mod queries;

use chrono::Utc;
use nrm_kernel::auth::Role;
use nrm_kernel::bus::Bus;
use nrm_kernel::command::{self, CallContext, Decided, OnConflict, Planned, Request};
use nrm_kernel::error::{AppError, Violations};
use nrm_kernel::ids::{CaseId, PersonId};
use nrm_kernel::permissions::Standing;
use nrm_kernel::seal::{DataKey, MasterKey, MatchHasher};
use nrm_kernel::store::{EventStore, NewEvent, RecordedEvent, UnitOfWork};
use nrm_kernel::validate;
use nrm_proto::common::v1::CommandResult;
use nrm_proto::identification::v1 as pb;
use pb::identification_event::Event;
use prost::Message;
use uuid::Uuid;

use crate::domain::{self, Case, Command, DomainError, parse};

/// Full protobuf name of the events this service publishes.
pub const PAYLOAD_TYPE: &str = "nrm.identification.v1.IdentificationEvent";
/// Name of the bounded context in subjects and stream names.
pub const CONTEXT: &str = "identification";

/// How an agency stands to a case: the reporting agency made it; it and the
/// competent authority hold it.
#[must_use]
pub fn standing(report: &pb::PresumedVictimReported) -> Standing<'_> {
    let mut case_holders = vec![report.reporting_agency.as_str()];
    if !report.competent_authority.is_empty() {
        case_holders.push(report.competent_authority.as_str());
    }
    Standing {
        owner: Some(report.reporting_agency.as_str()),
        case_holders,
        competent_authority: Some(report.competent_authority.as_str()).filter(|a| !a.is_empty()),
        ..Standing::default()
    }
}

/// Whether `ctx`'s caller is told that an erasure of a case was requested:
/// the coordinator and the agencies holding the case.
#[must_use]
pub fn sees_erasure_requests(ctx: &CallContext, reporting_agency: &str, competent_authority: &str) -> bool {
    ctx.caller.role == Role::Coordinator || ctx.agency() == reporting_agency || ctx.agency() == competent_authority
}

/// The person a case's report is of.
fn person_of(report: &pb::PresumedVictimReported) -> Option<Uuid> {
    report.person_id.parse().ok()
}

impl From<DomainError> for AppError {
    fn from(err: DomainError) -> Self {
        match err {
            DomainError::NotFound => AppError::NotFound {
                kind: "case",
                id: String::new(),
            },
            other => AppError::precondition(other.code(), "case", other.to_string()),
        }
    }
}

/// The fields every command on an existing case carries.
struct Target {
    request_id: Option<String>,
    case_id: Option<CaseId>,
    /// `None`: act on the current version.
    expected_version: Option<u64>,
}

impl Target {
    /// Parses them, recording violations; `expected_version: None` for commands without one.
    fn parse(v: &mut Violations, request_id: &str, case_id: &str, expected_version: Option<u64>) -> Self {
        Self {
            request_id: v.check(validate::request_id(request_id)),
            case_id: v.check(CaseId::parse("case_id", case_id)),
            expected_version: expected_version.and_then(|e| v.check(validate::expected_version(domain::NAME, e))),
        }
    }

    /// `INVALID_ARGUMENT` naming every violation of the request, or the target.
    fn finish(self, v: Violations) -> Result<Self, AppError> {
        if v.is_empty() { Ok(self) } else { Err(v.into_error()) }
    }

    fn command(self, method: &'static str, command: Command) -> CaseCommand {
        CaseCommand {
            method,
            request_id: self.request_id.unwrap_or_default(),
            case_id: self.case_id.unwrap_or_default(),
            expected_version: self.expected_version,
            command,
        }
    }
}

/// A validated command on an existing case.
struct CaseCommand {
    /// The RPC, for fingerprints and the audit trail.
    method: &'static str,
    request_id: String,
    case_id: CaseId,
    /// `None`: act on the current version.
    expected_version: Option<u64>,
    command: Command,
}

/// The identification application.
#[derive(Clone, Debug)]
pub struct Identification {
    store: EventStore,
    bus: Bus,
    master: MasterKey,
    hasher: MatchHasher,
    reflection_days: u32,
    homecoming: abroad::HomecomingRules,
}

fn to_new_events(events: &[Event]) -> Vec<NewEvent> {
    command::new_events(events, domain::event_type, |event| pb::IdentificationEvent {
        event: Some(event.clone()),
    })
}

/// The case its events make.
fn fold(events: &[RecordedEvent]) -> Result<Case, AppError> {
    events.iter().try_fold(Case::default(), |case, recorded| {
        let event = pb::IdentificationEvent::decode(recorded.payload.as_slice())
            .ok()
            .and_then(|e| e.event)
            .ok_or_else(|| AppError::Internal(format!("event {} does not decode", recorded.event_id)))?;
        Ok(domain::evolve(case, &event))
    })
}

fn not_found(case_id: CaseId) -> AppError {
    AppError::NotFound {
        kind: "case",
        id: case_id.to_string(),
    }
}

impl Identification {
    /// The application over its store; `homecoming` names who handles the
    /// cases that returns from abroad open.
    #[must_use]
    pub fn new(
        store: EventStore,
        bus: Bus,
        (master, hasher): (MasterKey, MatchHasher),
        reflection_days: u32,
        homecoming: abroad::HomecomingRules,
    ) -> Self {
        Self {
            store,
            bus,
            master,
            hasher,
            reflection_days,
            homecoming,
        }
    }

    /// The event store.
    #[must_use]
    pub fn store(&self) -> &EventStore {
        &self.store
    }

    /// Appends a new case's first events (a report, or a case from
    /// abroad) and answers as `ReportPresumedVictim` does. `purpose` is what
    /// the audit entry records.
    ///
    /// # Errors
    /// The domain's refusal; the store's errors.
    pub(crate) async fn open_case(
        &self,
        uow: &mut UnitOfWork,
        caller: &CallContext,
        (case_id, person_id): (CaseId, PersonId),
        command: &Command,
        purpose: &'static str,
    ) -> Result<Decided<pb::ReportPresumedVictimResponse>, AppError> {
        let events = domain::decide(&Case::default(), command)?;
        let state = events.iter().fold(Case::default(), domain::evolve);
        let appended = uow
            .append(
                &domain::stream_id(case_id),
                0,
                &to_new_events(&events),
                &caller.metadata(),
                &self.subject(case_id),
            )
            .await?;
        Ok(Decided {
            answer: pb::ReportPresumedVictimResponse {
                case_id: case_id.to_string(),
                person_id: person_id.to_string(),
                status: state.status.to_proto() as i32,
                // Never told to the reporter (no oracle): see `Case.possible_duplicate`.
                possible_duplicate: false,
                result: Some(command::result(case_id, &appended)),
            },
            subject: case_id.to_string(),
            purpose,
            linked: Vec::new(),
        })
    }

    fn subject(&self, case_id: CaseId) -> String {
        self.bus.subject(CONTEXT, domain::NAME, &case_id.to_string())
    }

    /// The case folded from its events.
    ///
    /// # Errors
    /// When the store fails or an event does not decode.
    pub async fn load(&self, case_id: CaseId) -> Result<Case, AppError> {
        fold(&self.store.read_stream(&domain::stream_id(case_id)).await?)
    }

    /// The case folded from its events as `uow` reads them (on its
    /// connection: a command holding locks takes no second connection).
    ///
    /// # Errors
    /// As [`Self::load`].
    async fn load_in(uow: &mut UnitOfWork, case_id: CaseId) -> Result<Case, AppError> {
        fold(&uow.read_stream(&domain::stream_id(case_id)).await?)
    }

    /// Reports a presumed victim. The answer never tells whether the person
    /// was reported before: a possible duplicate is shown to the competent
    /// authority and the coordinator only.
    ///
    /// # Errors
    /// `INVALID_ARGUMENT` naming bad fields (`competent_authority` when a
    /// reporter other than police or a prosecutor names none).
    #[tracing::instrument(skip_all, fields(case_id = tracing::field::Empty))]
    pub async fn report(
        &self,
        ctx: &CallContext,
        req: &pb::ReportPresumedVictimRequest,
    ) -> Result<pb::ReportPresumedVictimResponse, AppError> {
        // The gate admitted the role; every reporter may report (scope: any).
        let now = Utc::now();
        let reporter = parse::Reporter {
            agency: ctx.agency(),
            authority: matches!(ctx.caller.role, Role::Police | Role::Prosecutor),
        };
        let valid = parse::report(req, now, reporter)?;
        let case_id = CaseId::new();
        let person_id = PersonId::new();
        tracing::Span::current().record("case_id", tracing::field::display(case_id));
        ctx.concerns(case_id);
        ctx.concerns_person(person_id.as_uuid());
        let request = Request {
            method: "ReportPresumedVictim",
            request_id: &valid.request_id,
            message: req,
        };
        // The attempt owns what it uses: a future that borrows from the
        // handler is not known to be `Send` (rust-lang/rust#110338).
        let (app, caller) = (self.clone(), ctx.clone());
        command::run(&self.store, ctx, request, OnConflict::Retry, async move |uow| {
            let mut report = valid.coded.clone();
            app.new_person(uow, case_id, person_id, &valid.personal, &mut report)
                .await?;
            report.reporting_agency.clone_from(&caller.caller.actor.agency);
            let command = Command::Report {
                report: Box::new(report),
            };
            app.open_case(uow, &caller, (case_id, person_id), &command, "command")
                .await
        })
        .await
    }

    /// Gives the person of a new case a data key and a row, seals their
    /// identifiers into `report` and records their match keys; fills in the
    /// report's IDs and the earlier cases whose match keys it shares.
    async fn new_person(
        &self,
        uow: &mut UnitOfWork,
        case_id: CaseId,
        person_id: PersonId,
        identifiers: &nrm_proto::common::v1::PersonalIdentifiers,
        report: &mut pb::PresumedVictimReported,
    ) -> Result<(), AppError> {
        let person_key = DataKey::create(uow.conn(), &self.master, person_id).await?;
        let match_keys = self.hasher.match_keys(identifiers);
        let matching: Vec<Uuid> =
            sqlx::query_scalar("SELECT DISTINCT case_id FROM match_keys WHERE match_key = ANY($1)")
                .bind(&match_keys)
                .fetch_all(&mut *uow.conn())
                .await?;
        sqlx::query("INSERT INTO persons (person_id, case_id) VALUES ($1, $2)")
            .bind(person_id.as_uuid())
            .bind(case_id.as_uuid())
            .execute(&mut *uow.conn())
            .await?;
        sqlx::query(
            "INSERT INTO match_keys (match_key, case_id) SELECT k, $2 FROM UNNEST($1::bytea[]) AS k ON CONFLICT DO NOTHING",
        )
        .bind(&match_keys)
        .bind(case_id.as_uuid())
        .execute(&mut *uow.conn())
        .await?;
        report.case_id = case_id.to_string();
        report.person_id = person_id.to_string();
        report.personal = Some(person_key.seal(identifiers));
        report.matching_case_ids = matching.iter().map(ToString::to_string).collect();
        Ok(())
    }

    /// Runs a command on an existing case (its events, answer and audit
    /// entry in one statement), or answers as its first run did. A command
    /// naming a version is refused when the case moved on; one without is
    /// decided again.
    async fn on_case(
        &self,
        ctx: &CallContext,
        request: &impl Message,
        call: CaseCommand,
    ) -> Result<CommandResult, AppError> {
        let CaseCommand {
            method,
            request_id,
            case_id,
            expected_version,
            command,
        } = call;
        tracing::Span::current().record("case_id", tracing::field::display(case_id));
        ctx.concerns(case_id);
        let request = Request {
            method,
            request_id: &request_id,
            message: request,
        };
        let on_conflict = OnConflict::unless_versioned(expected_version);
        // Owned, as in `report`.
        let (app, caller) = (self.clone(), ctx.clone());
        command::run_append(&self.store, ctx, request, on_conflict, async move || {
            let case = app.load(case_id).await?;
            if let Some(person) = case.report.as_ref().and_then(person_of) {
                caller.concerns_person(person);
            }
            Self::held(&caller, case_id, &case)?;
            if let Some(expected) = expected_version.filter(|e| *e != case.version) {
                return Err(AppError::Conflict {
                    stream_id: domain::stream_id(case_id),
                    expected,
                    actual: case.version,
                });
            }
            let events = domain::decide(&case, &command)?;
            Ok(Planned {
                stream_id: domain::stream_id(case_id),
                expected_version: case.version,
                events: to_new_events(&events),
                subject: app.subject(case_id),
                audit_subject: case_id.to_string(),
                answer: Box::new(move |appended| command::result(case_id, appended)),
            })
        })
        .await
    }

    /// The case's report, once the caller's agency is found to stand to it.
    ///
    /// # Errors
    /// `NOT_FOUND` without a report; `PERMISSION_DENIED` out of scope.
    fn held<'c>(
        ctx: &CallContext,
        case_id: CaseId,
        case: &'c Case,
    ) -> Result<&'c pb::PresumedVictimReported, AppError> {
        let Some(report) = case.report.as_ref() else {
            return Err(not_found(case_id));
        };
        ctx.check(&standing(report))?;
        Ok(report)
    }

    /// The cases of the same person as `case`: those sharing a match key
    /// with it (either was reported first), those its report names and
    /// those whose report names it. One hop, not the closure: a chain of
    /// partial matches may reach another person.
    async fn linked_cases(
        conn: &mut sqlx::PgConnection,
        case_id: CaseId,
        case: &Case,
    ) -> Result<Vec<CaseId>, AppError> {
        let mut linked: Vec<Uuid> = sqlx::query_scalar(
            "SELECT DISTINCT other.case_id FROM match_keys own
             JOIN match_keys other ON other.match_key = own.match_key
             WHERE own.case_id = $1 AND other.case_id <> $1
             UNION
             SELECT case_id FROM case_list WHERE $1 = ANY(matching_case_ids) AND case_id <> $1",
        )
        .bind(case_id.as_uuid())
        .fetch_all(&mut *conn)
        .await?;
        linked.extend(case.matching_case_ids.iter().filter_map(|id| id.parse::<Uuid>().ok()));
        linked.sort_unstable();
        linked.dedup();
        linked.retain(|id| *id != case_id.as_uuid());
        Ok(linked.into_iter().map(CaseId::from_uuid).collect())
    }

    /// Deletes the data key and the match keys of the person of `case`, the
    /// requests to erase it, and the fingerprints of the requests on it.
    async fn shred(uow: &mut UnitOfWork, case_id: CaseId, case: &Case) -> Result<(), AppError> {
        let person_id = case
            .report
            .as_ref()
            .and_then(|r| PersonId::parse("person_id", &r.person_id).ok())
            .ok_or_else(|| AppError::Internal("case without person".into()))?;
        DataKey::shred(uow.conn(), person_id).await?;
        sqlx::query("DELETE FROM match_keys WHERE case_id = $1")
            .bind(case_id.as_uuid())
            .execute(&mut *uow.conn())
            .await?;
        // A request to erase the case is met.
        sqlx::query("DELETE FROM erasure_requests WHERE case_id = $1")
            .bind(case_id.as_uuid())
            .execute(&mut *uow.conn())
            .await?;
        // The answers recorded for the case's commands stay (IDs only; a
        // retry is never run again), but their fingerprints go: a report's is
        // a digest of a request that carried the identifiers. A retry is then
        // refused as a reused request ID.
        sqlx::query("UPDATE commands SET fingerprint = ''::bytea WHERE position($1::bytea IN response) > 0")
            .bind(case_id.to_string().into_bytes())
            .execute(&mut *uow.conn())
            .await?;
        Ok(())
    }

    /// Records the screening.
    ///
    /// # Errors
    /// `INVALID_ARGUMENT`, `NOT_FOUND`, `ABORTED` (version), `FAILED_PRECONDITION` (decided).
    #[tracing::instrument(skip_all, fields(case_id = tracing::field::Empty))]
    pub async fn screen(
        &self,
        ctx: &CallContext,
        req: &pb::CompleteScreeningRequest,
    ) -> Result<CommandResult, AppError> {
        let mut v = Violations::new();
        let target = Target::parse(&mut v, &req.request_id, &req.case_id, Some(req.expected_version));
        let indicators = parse::indicators(&req.indicators, &mut v);
        let target = target.finish(v)?;
        let command = Command::CompleteScreening {
            indicators,
            now: validate::timestamp(Utc::now()),
        };
        self.on_case(ctx, req, target.command("CompleteScreening", command))
            .await
    }

    /// Records the formal decision.
    ///
    /// # Errors
    /// `INVALID_ARGUMENT`, `NOT_FOUND`, `ABORTED`, `FAILED_PRECONDITION` (not screened, decided twice).
    #[tracing::instrument(skip_all, fields(case_id = tracing::field::Empty))]
    pub async fn decide(
        &self,
        ctx: &CallContext,
        req: &pb::DecideIdentificationRequest,
    ) -> Result<CommandResult, AppError> {
        let mut v = Violations::new();
        let target = Target::parse(&mut v, &req.request_id, &req.case_id, Some(req.expected_version));
        let (decision, reason) = parse::decision(req, &mut v);
        let target = target.finish(v)?;
        let command = Command::Decide {
            decision,
            reason,
            non_punishment: req.non_punishment,
            best_interests_assessed: req.best_interests_assessed,
            now: validate::timestamp(Utc::now()),
            reflection_days: self.reflection_days,
        };
        self.on_case(ctx, req, target.command("DecideIdentification", command))
            .await
    }

    /// Reopens a decision.
    ///
    /// # Errors
    /// `INVALID_ARGUMENT`, `NOT_FOUND`, `ABORTED`, `FAILED_PRECONDITION` (not decided).
    #[tracing::instrument(skip_all, fields(case_id = tracing::field::Empty))]
    pub async fn review(&self, ctx: &CallContext, req: &pb::RequestReviewRequest) -> Result<CommandResult, AppError> {
        let mut v = Violations::new();
        let target = Target::parse(&mut v, &req.request_id, &req.case_id, Some(req.expected_version));
        let reason = v.check(parse::review_reason(req.reason));
        let target = target.finish(v)?;
        let command = Command::RequestReview {
            reason: reason.unwrap_or(pb::ReviewReason::Unspecified),
            now: validate::timestamp(Utc::now()),
        };
        self.on_case(ctx, req, target.command("RequestReview", command)).await
    }

    /// Erases the person of the case in every case of theirs the caller
    /// holds (the coordinator: every one), in one transaction, or answers as
    /// its first run did: each such case's data key is shredded, its match
    /// keys deleted, and `PersonalDataErased` (with the reason) appended on
    /// it. A linked case held by another agency only is not erased: an
    /// erasure request is recorded on it for its holders and the
    /// coordinator. The answer is the same either way, so that it never
    /// tells the caller whether another agency reported the person.
    ///
    /// On [`command::run`]: every read is on the unit of work's connection
    /// and every append is made before the attempt returns; the kernel then
    /// writes the audit entries (the reason's code as their purpose, the
    /// erased case's first, then one `ErasePersonalData:linked` per linked
    /// case erased), so the audit chain's head is locked last.
    ///
    /// # Errors
    /// `INVALID_ARGUMENT` (also without a reason), `NOT_FOUND`,
    /// `PERMISSION_DENIED` (not holding the case), `FAILED_PRECONDITION`
    /// (already erased).
    #[tracing::instrument(skip_all, fields(case_id = tracing::field::Empty))]
    pub async fn erase(
        &self,
        ctx: &CallContext,
        req: &pb::ErasePersonalDataRequest,
    ) -> Result<CommandResult, AppError> {
        let mut v = Violations::new();
        let target = Target::parse(&mut v, &req.request_id, &req.case_id, None);
        let reason = v.check(parse::erasure_reason(req.reason));
        let target = target.finish(v)?;
        let reason = reason.unwrap_or(pb::ErasureReason::Unspecified);
        let command = Command::ErasePersonalData {
            reason,
            now: validate::timestamp(Utc::now()),
        };
        let call = target.command("ErasePersonalData", command);
        let CaseCommand {
            method,
            request_id,
            case_id,
            command,
            ..
        } = call;
        tracing::Span::current().record("case_id", tracing::field::display(case_id));
        ctx.concerns(case_id);
        let request = Request {
            method,
            request_id: &request_id,
            message: req,
        };
        // Owned, as in `report`; the reason's code is made in the attempt:
        // a captured `&str` makes its future not general enough to be `Send`
        // (rust-lang/rust#110338).
        let (bus, caller) = (self.bus.clone(), ctx.clone());
        command::run(&self.store, ctx, request, OnConflict::Retry, async move |uow| {
            let reason_code = reason.as_str_name();
            let case = Self::load_in(uow, case_id).await?;
            if let Some(person) = case.report.as_ref().and_then(person_of) {
                caller.concerns_person(person);
            }
            Self::held(&caller, case_id, &case)?;
            let events = domain::decide(&case, &command)?;
            let metadata = caller.metadata();
            let others = Self::linked_cases(uow.conn(), case_id, &case).await?;
            let subject = bus.subject(CONTEXT, domain::NAME, &case_id.to_string());
            Self::shred(uow, case_id, &case).await?;
            let appended = uow
                .append(
                    &domain::stream_id(case_id),
                    case.version,
                    &to_new_events(&events),
                    &metadata,
                    &subject,
                )
                .await?;
            let mut linked = Vec::new();
            for other_id in others {
                let other = Self::load_in(uow, other_id).await?;
                let Some(report) = other.report.as_ref() else {
                    continue;
                };
                // Erased before: nothing of the person is left there.
                if other.erased {
                    continue;
                }
                // A linked case is erased with the standing erasing it would
                // take; another authority's case gets a request instead (an
                // agency cannot reach it through a duplicate it reported,
                // nor block or detect it by failing).
                if !caller.permit().admits(caller.agency(), &standing(report)) {
                    sqlx::query(
                        "INSERT INTO erasure_requests (case_id, reason) VALUES ($1, $2) ON CONFLICT (case_id) DO NOTHING",
                    )
                    .bind(other_id.as_uuid())
                    .bind(reason_code)
                    .execute(&mut *uow.conn())
                    .await?;
                    continue;
                }
                let Ok(events) = domain::decide(&other, &command) else {
                    continue;
                };
                let subject = bus.subject(CONTEXT, domain::NAME, &other_id.to_string());
                Self::shred(uow, other_id, &other).await?;
                uow.append(
                    &domain::stream_id(other_id),
                    other.version,
                    &to_new_events(&events),
                    &metadata,
                    &subject,
                )
                .await?;
                linked.push(other_id.to_string());
            }
            Ok(Decided {
                answer: command::result(case_id, &appended),
                subject: case_id.to_string(),
                purpose: reason_code,
                linked,
            })
        })
        .await
    }
}
