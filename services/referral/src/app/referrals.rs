//! Creating and answering referrals, and what timers and reactions do to
//! them. Every append to a referral also keeps, in the same transaction, the
//! `open_referrals` row (which consent an open referral rests on) and the
//! answer timer (scheduled on creation and redirection, cancelled once the
//! referral no longer awaits an answer).

use chrono::Utc;
use nrm_kernel::command::{self, CallContext, Decided, OnConflict, Request};
use nrm_kernel::error::AppError;
use nrm_kernel::ids::{ConsentId, ReferralId};
use nrm_kernel::permissions::Standing;
use nrm_kernel::store::{EventMetadata, UnitOfWork};
use nrm_kernel::{timers, validate};
use nrm_proto::common::v1::CommandResult;
use nrm_proto::referral::v1 as pb;
use pb::referral_event::Event;
use prost::Message;

use super::{ANSWER_DUE, Referrals, concerning, rejected, to_new_events};
use crate::domain::parse::{self, Target};
use crate::domain::referral::{self, Command, Referral};
use crate::domain::{ConsentGap, DomainError};

/// How an agency may stand to a referral: its sender owns it, its current
/// receiver is its addressee.
pub(crate) fn standing(state: &Referral) -> Standing<'_> {
    Standing {
        owner: Some(state.referring_agency()).filter(|a| !a.is_empty()),
        addressees: vec![state.receiving_agency.as_str()],
        ..Standing::default()
    }
}

/// Records the person a referral is about, for the call's audit entries.
pub(crate) fn concerns_person(ctx: &CallContext, state: &Referral) {
    if let Some(person_id) = state
        .created
        .as_ref()
        .and_then(|created| uuid::Uuid::parse_str(&created.person_id).ok())
    {
        ctx.concerns_person(person_id);
    }
}

/// Records the parsed referral ID on the current span (never the request's text).
fn traced(target: &Target) {
    tracing::Span::current().record("referral_id", tracing::field::display(target.referral_id));
}

/// A validated command on an existing referral.
struct Call {
    /// The RPC, for fingerprints and the audit trail.
    method: &'static str,
    target: Target,
    command: Command,
    /// A consent the command rests on, locked against withdrawal while it commits.
    consent: Option<ConsentId>,
}

impl Referrals {
    /// The referral folded from its events.
    ///
    /// # Errors
    /// When the store fails or an event does not decode.
    pub async fn load_referral(&self, referral_id: ReferralId) -> Result<Referral, AppError> {
        self.fold(&referral::stream_id(referral_id), referral::evolve).await
    }

    /// Appends `events` to a referral standing at `before`, and keeps its
    /// consent link and answer timer in step; returns the new event IDs.
    pub(crate) async fn append_referral(
        &self,
        uow: &mut UnitOfWork,
        referral_id: ReferralId,
        before: &Referral,
        events: &[Event],
        metadata: &EventMetadata,
    ) -> Result<Vec<String>, AppError> {
        if events.is_empty() {
            return Ok(Vec::new());
        }
        let appended = uow
            .append(
                &referral::stream_id(referral_id),
                before.version,
                &to_new_events(events),
                metadata,
                &self.subject(referral::NAME, &referral_id),
            )
            .await?;
        let after = events.iter().fold(before.clone(), referral::evolve);
        if after.status.is_open() {
            let consent_id = ConsentId::parse("consent_id", &after.consent_id)
                .map_err(|_| AppError::Internal("referral without a consent".into()))?;
            sqlx::query(
                "INSERT INTO open_referrals (referral_id, consent_id, accepted) VALUES ($1, $2, $3)
                 ON CONFLICT (referral_id) DO UPDATE SET consent_id = EXCLUDED.consent_id, accepted = EXCLUDED.accepted",
            )
            .bind(referral_id.as_uuid())
            .bind(consent_id.as_uuid())
            .bind(after.status == referral::Status::Accepted)
            .execute(uow.conn())
            .await?;
        } else {
            sqlx::query("DELETE FROM open_referrals WHERE referral_id = $1")
                .bind(referral_id.as_uuid())
                .execute(uow.conn())
                .await?;
        }
        let deadline_set = events
            .iter()
            .any(|e| matches!(e, Event::ReferralCreated(_) | Event::ReferralRedirected(_)));
        let due = after.answer_due_at.as_ref().and_then(validate::to_datetime);
        match due {
            Some(due) if deadline_set && after.status.awaits_answer() => {
                timers::schedule(uow.conn(), ANSWER_DUE, &referral_id.to_string(), due, &[]).await?;
            }
            _ if !after.status.awaits_answer() => {
                timers::cancel(uow.conn(), ANSWER_DUE, &referral_id.to_string()).await?;
            }
            _ => {}
        }
        Ok(appended.event_ids.iter().map(ToString::to_string).collect())
    }

    /// Refers a person to an agency under a consent (an agency holding the
    /// person's case; never to itself).
    ///
    /// # Errors
    /// `INVALID_ARGUMENT` naming bad fields, `PERMISSION_DENIED` (not an agency holding the case),
    /// `FAILED_PRECONDITION` (`SENDER_IS_RECEIVER`, `UNKNOWN_PERSON`, `NOT_IDENTIFIED`, `CASE_MISMATCH`,
    /// `NO_CONSENT`).
    #[tracing::instrument(skip_all, fields(person_id = tracing::field::Empty, referral_id = tracing::field::Empty))]
    pub async fn create_referral(
        &self,
        ctx: &CallContext,
        req: &pb::CreateReferralRequest,
    ) -> Result<pb::CreateReferralResponse, AppError> {
        let valid = parse::create_referral(req, Utc::now())?;
        concerning(ctx, valid.person_id);
        let referral_id = ReferralId::new();
        tracing::Span::current().record("referral_id", tracing::field::display(referral_id));
        let request = Request {
            method: "CreateReferral",
            request_id: &valid.request_id,
            message: req,
        };
        // The attempt owns what it uses: a future that borrows from the
        // handler is not known to be `Send` (rust-lang/rust#110338).
        let (app, caller) = (self.clone(), ctx.clone());
        let (person_id, consent_id, proposed) = (valid.person_id, valid.consent_id, valid.referral);
        command::run(&self.store, ctx, request, OnConflict::Retry, async move |uow| {
            let person = app.case_held(uow.conn(), &caller, person_id).await?;
            let consent = Self::load_consent_in(uow, consent_id).await?;
            let mut created = proposed.clone();
            created.referral_id = referral_id.to_string();
            caller.agency().clone_into(&mut created.referring_agency);
            let command = Command::Create {
                referral: Box::new(created),
                person,
                consent: Box::new(consent),
                allow_not_identified: app.policy.allow_not_identified,
                deadlines: app.policy.deadlines,
            };
            let events =
                referral::decide(&Referral::default(), &command).map_err(rejected(referral::NAME, referral_id))?;
            if !app.lock_consent(uow, consent_id).await? {
                return Err(rejected(referral::NAME, referral_id)(DomainError::NoConsent(
                    ConsentGap::Withdrawn,
                )));
            }
            let event_ids = app
                .append_referral(uow, referral_id, &Referral::default(), &events, &caller.metadata())
                .await?;
            let state = events.iter().fold(Referral::default(), referral::evolve);
            Ok(Decided {
                answer: pb::CreateReferralResponse {
                    referral_id: referral_id.to_string(),
                    answer_due_at: state.answer_due_at,
                    result: Some(CommandResult {
                        aggregate_id: referral_id.to_string(),
                        version: state.version,
                        event_ids,
                        replayed: false,
                    }),
                },
                subject: referral_id.to_string(),
                purpose: "command",
                linked: Vec::new(),
            })
        })
        .await
    }

    /// Runs a command on an existing referral at the version its caller
    /// read, or answers as its first run did.
    async fn on_referral(
        &self,
        ctx: &CallContext,
        request: &impl Message,
        call: Call,
    ) -> Result<CommandResult, AppError> {
        let Call {
            method,
            target,
            command,
            consent,
        } = call;
        ctx.concerns(target.referral_id);
        let request = Request {
            method,
            request_id: &target.request_id,
            message: request,
        };
        let (referral_id, expected_version) = (target.referral_id, target.expected_version);
        let on_conflict = OnConflict::unless_versioned(Some(expected_version));
        // Owned, as in `create_referral`.
        let (app, caller) = (self.clone(), ctx.clone());
        command::run(&self.store, ctx, request, on_conflict, async move |uow| {
            let state = Self::fold_in(uow, &referral::stream_id(referral_id), referral::evolve).await?;
            if state.version == 0 {
                return Err(AppError::NotFound {
                    kind: referral::NAME,
                    id: referral_id.to_string(),
                });
            }
            concerns_person(&caller, &state);
            caller.check(&standing(&state))?;
            if expected_version != state.version {
                return Err(AppError::Conflict {
                    stream_id: referral::stream_id(referral_id),
                    expected: expected_version,
                    actual: state.version,
                });
            }
            let events = referral::decide(&state, &command).map_err(rejected(referral::NAME, referral_id))?;
            if let Some(consent_id) = consent
                && !app.lock_consent(uow, consent_id).await?
            {
                return Err(rejected(referral::NAME, referral_id)(DomainError::NoConsent(
                    ConsentGap::Withdrawn,
                )));
            }
            let event_ids = app
                .append_referral(uow, referral_id, &state, &events, &caller.metadata())
                .await?;
            Ok(Decided {
                answer: CommandResult {
                    aggregate_id: referral_id.to_string(),
                    version: state.version + events.len() as u64,
                    event_ids,
                    replayed: false,
                },
                subject: referral_id.to_string(),
                purpose: "command",
                linked: Vec::new(),
            })
        })
        .await
    }

    /// The receiver accepts.
    ///
    /// # Errors
    /// `INVALID_ARGUMENT`, `NOT_FOUND`, `PERMISSION_DENIED` (not the receiver),
    /// `FAILED_PRECONDITION` (`NOT_AWAITING_ANSWER`), `ABORTED`.
    #[tracing::instrument(skip_all, fields(referral_id = tracing::field::Empty))]
    pub async fn accept(&self, ctx: &CallContext, req: &pb::AcceptReferralRequest) -> Result<CommandResult, AppError> {
        let target = parse::accept(req)?;
        traced(&target);
        let command = Command::Accept {
            agency: ctx.agency().to_owned(),
            now: validate::timestamp(Utc::now()),
        };
        self.on_referral(
            ctx,
            req,
            Call {
                method: "AcceptReferral",
                target,
                command,
                consent: None,
            },
        )
        .await
    }

    /// The receiver declines, with a reason.
    ///
    /// # Errors
    /// `INVALID_ARGUMENT`, `NOT_FOUND`, `PERMISSION_DENIED` (not the receiver),
    /// `FAILED_PRECONDITION` (`NOT_AWAITING_ANSWER`), `ABORTED`.
    #[tracing::instrument(skip_all, fields(referral_id = tracing::field::Empty))]
    pub async fn decline(
        &self,
        ctx: &CallContext,
        req: &pb::DeclineReferralRequest,
    ) -> Result<CommandResult, AppError> {
        let (target, reason) = parse::decline(req)?;
        traced(&target);
        let command = Command::Decline {
            agency: ctx.agency().to_owned(),
            reason,
            now: validate::timestamp(Utc::now()),
        };
        self.on_referral(
            ctx,
            req,
            Call {
                method: "DeclineReferral",
                target,
                command,
                consent: None,
            },
        )
        .await
    }

    /// The agency that declined a referral (or the national coordinator)
    /// sends it on to another agency, under a consent covering it.
    ///
    /// # Errors
    /// `INVALID_ARGUMENT`, `NOT_FOUND`, `PERMISSION_DENIED` (not the addressee),
    /// `FAILED_PRECONDITION` (`NOT_DECLINED`, `SAME_AGENCY`, `SENDER_IS_RECEIVER`, `NO_CONSENT`), `ABORTED`.
    #[tracing::instrument(skip_all, fields(referral_id = tracing::field::Empty))]
    pub async fn redirect(
        &self,
        ctx: &CallContext,
        req: &pb::RedirectReferralRequest,
    ) -> Result<CommandResult, AppError> {
        let (target, (receiving_agency, consent_id)) = parse::redirect(req)?;
        traced(&target);
        let consent = self.load_consent(consent_id).await?;
        let command = Command::Redirect {
            receiving_agency,
            consent_id: consent_id.to_string(),
            consent: Box::new(consent),
            now: validate::timestamp(Utc::now()),
            deadlines: self.policy.deadlines,
        };
        self.on_referral(
            ctx,
            req,
            Call {
                method: "RedirectReferral",
                target,
                command,
                consent: Some(consent_id),
            },
        )
        .await
    }

    /// The receiver records a service delivered.
    ///
    /// # Errors
    /// `INVALID_ARGUMENT`, `NOT_FOUND`, `PERMISSION_DENIED` (not the receiver),
    /// `FAILED_PRECONDITION` (`NOT_ACCEPTED`, `SERVICE_NOT_REFERRED`), `ABORTED`.
    #[tracing::instrument(skip_all, fields(referral_id = tracing::field::Empty))]
    pub async fn service_delivered(
        &self,
        ctx: &CallContext,
        req: &pb::RecordServiceDeliveredRequest,
    ) -> Result<CommandResult, AppError> {
        let (target, delivery) = parse::service_delivered(req, Utc::now())?;
        traced(&target);
        let command = Command::RecordServiceDelivered {
            agency: ctx.agency().to_owned(),
            kind: delivery.kind,
            delivered_at: delivery.delivered_at,
            provider: delivery.provider,
        };
        self.on_referral(
            ctx,
            req,
            Call {
                method: "RecordServiceDelivered",
                target,
                command,
                consent: None,
            },
        )
        .await
    }

    /// The sender, the receiver (or the national coordinator) closes the referral with an outcome.
    ///
    /// # Errors
    /// `INVALID_ARGUMENT`, `NOT_FOUND`, `PERMISSION_DENIED` (neither sender nor receiver),
    /// `FAILED_PRECONDITION` (`NOT_ACCEPTED`), `ABORTED`.
    #[tracing::instrument(skip_all, fields(referral_id = tracing::field::Empty))]
    pub async fn close(&self, ctx: &CallContext, req: &pb::CloseReferralRequest) -> Result<CommandResult, AppError> {
        let (target, outcome) = parse::close(req)?;
        traced(&target);
        let command = Command::Close {
            outcome,
            now: validate::timestamp(Utc::now()),
        };
        self.on_referral(
            ctx,
            req,
            Call {
                method: "CloseReferral",
                target,
                command,
                consent: None,
            },
        )
        .await
    }

    /// The answer deadline of a referral passed: marks it overdue (escalated
    /// to the national coordinator) unless it was answered; inside the
    /// timer's unit of work.
    ///
    /// # Errors
    /// When the store fails (the timer then stays pending).
    pub async fn answer_due(
        &self,
        uow: &mut UnitOfWork,
        referral_id: ReferralId,
        due_at: chrono::DateTime<Utc>,
    ) -> Result<bool, AppError> {
        let state = Self::fold_in(uow, &referral::stream_id(referral_id), referral::evolve).await?;
        // The timer's due time, never this machine's clock: a clock behind
        // the database's would find the referral not yet due and lose the
        // escalation. The database keeps microseconds, the deadline may carry
        // nanoseconds: the timer stands for the whole microsecond.
        let command = Command::MarkOverdue {
            now: validate::timestamp(due_at + chrono::Duration::nanoseconds(999)),
        };
        let events = match referral::decide(&state, &command) {
            Ok(events) => events,
            Err(DomainError::NotFound(_)) => {
                tracing::warn!(referral_id = %referral_id, "answer timer for an unknown referral");
                return Ok(false);
            }
            Err(err) => return Err(AppError::Internal(err.to_string())),
        };
        let metadata = EventMetadata::system(ANSWER_DUE, None);
        let ids = self
            .append_referral(uow, referral_id, &state, &events, &metadata)
            .await?;
        if !ids.is_empty() {
            tracing::info!(referral_id = %referral_id, "referral overdue: escalated to the national coordinator");
        }
        Ok(!ids.is_empty())
    }

    /// Records the shelter service's answer to a referral's shelter need,
    /// inside the reaction's unit of work; nothing when it was recorded
    /// before or the referral is not ours.
    ///
    /// # Errors
    /// When the store fails or another writer moved the referral on (the message is then retried).
    pub async fn record_placement(
        &self,
        uow: &mut UnitOfWork,
        referral_id: ReferralId,
        command: Command,
        cause: Option<&EventMetadata>,
    ) -> Result<bool, AppError> {
        let state = Self::fold_in(uow, &referral::stream_id(referral_id), referral::evolve).await?;
        let events = match referral::decide(&state, &command) {
            Ok(events) => events,
            Err(DomainError::NotFound(_)) => {
                tracing::warn!(referral_id = %referral_id, "shelter answer for an unknown referral; ignored");
                return Ok(false);
            }
            Err(err) => return Err(AppError::Internal(err.to_string())),
        };
        let metadata = EventMetadata::system("referral.placement", cause);
        let ids = self
            .append_referral(uow, referral_id, &state, &events, &metadata)
            .await?;
        Ok(!ids.is_empty())
    }
}
