//! The individual rehabilitation plan (MSD and the national coordinator):
//! goals, follow-ups, goals met. Plan commands carry no expected version:
//! they act on the plan as it stands, retrying when they lose a race.
//! The MSD keeps the plan of a person it has an accepted referral for under
//! an active consent (the `consented` scope); the coordinator any plan.

use chrono::Utc;
use nrm_kernel::command::{self, CallContext, Decided, OnConflict, Request};
use nrm_kernel::error::AppError;
use nrm_kernel::ids::{GoalId, PersonId};
use nrm_kernel::permissions::Standing;
use nrm_kernel::store::{Appended, UnitOfWork};
use nrm_kernel::validate;
use nrm_proto::common::v1::CommandResult;
use nrm_proto::referral::v1 as pb;
use prost::Message;

use super::{Referrals, rejected, to_new_events};
use crate::domain::DomainError;
use crate::domain::parse;
use crate::domain::plan::{self, Command, Plan};

impl Referrals {
    /// Fails unless the caller may act on the person's plan: any plan
    /// (the coordinator), or one of a person its agency has an accepted
    /// referral for under an active consent.
    async fn check_plan<'c>(
        &self,
        db: impl sqlx::PgExecutor<'c>,
        ctx: &CallContext,
        person_id: PersonId,
    ) -> Result<(), AppError> {
        ctx.concerns(person_id);
        ctx.concerns_person(person_id.as_uuid());
        let consented = !ctx.permit().any() && self.consented(db, person_id, ctx.agency()).await?;
        ctx.check(&Standing {
            consented,
            ..Standing::default()
        })
    }

    /// The person's plan folded from its events.
    ///
    /// # Errors
    /// When the store fails or an event does not decode.
    pub async fn load_plan(&self, person_id: PersonId) -> Result<Plan, AppError> {
        self.fold(&plan::stream_id(person_id), plan::evolve).await
    }

    /// Decides `command` on the person's plan as it stands in `uow` and
    /// appends what it decided.
    async fn append_plan(
        &self,
        uow: &mut UnitOfWork,
        caller: &CallContext,
        person_id: PersonId,
        command: &Command,
    ) -> Result<Appended, AppError> {
        let state = Self::fold_in(uow, &plan::stream_id(person_id), plan::evolve).await?;
        let events = plan::decide(&state, command).map_err(rejected(plan::NAME, person_id))?;
        Ok(uow
            .append(
                &plan::stream_id(person_id),
                state.version,
                &to_new_events(&events),
                &caller.metadata(),
                &self.subject(plan::NAME, &person_id),
            )
            .await?)
    }

    /// Runs `command` on the person's plan as it stands (decided again when
    /// another writer moved it on), or answers as its first run did.
    async fn on_plan(
        &self,
        ctx: &CallContext,
        request: &impl Message,
        method: &'static str,
        request_id: &str,
        person_id: PersonId,
        command: Command,
    ) -> Result<CommandResult, AppError> {
        let request = Request {
            method,
            request_id,
            message: request,
        };
        // The attempt owns what it uses: a future that borrows from the
        // handler is not known to be `Send` (rust-lang/rust#110338).
        let (app, caller) = (self.clone(), ctx.clone());
        command::run(&self.store, ctx, request, OnConflict::Retry, async move |uow| {
            app.check_plan(uow.conn(), &caller, person_id).await?;
            let appended = app.append_plan(uow, &caller, person_id, &command).await?;
            Ok(Decided {
                answer: command::result(person_id, &appended),
                subject: person_id.to_string(),
                purpose: "command",
                linked: Vec::new(),
            })
        })
        .await
    }

    /// Adds a goal to the person's plan.
    ///
    /// # Errors
    /// `INVALID_ARGUMENT`, `PERMISSION_DENIED`, `FAILED_PRECONDITION` (`UNKNOWN_PERSON`).
    #[tracing::instrument(skip_all, fields(person_id = tracing::field::Empty))]
    pub async fn add_goal(
        &self,
        ctx: &CallContext,
        req: &pb::AddPlanGoalRequest,
    ) -> Result<pb::AddPlanGoalResponse, AppError> {
        let (target, (kind, due_at)) = parse::add_goal(req, Utc::now())?;
        let person_id = target.person_id;
        traced(person_id);
        let goal_id = GoalId::new();
        let request = Request {
            method: "AddPlanGoal",
            request_id: &target.request_id,
            message: req,
        };
        // Owned, as in `on_plan`.
        let (app, caller) = (self.clone(), ctx.clone());
        command::run(&self.store, ctx, request, OnConflict::Retry, async move |uow| {
            app.check_plan(uow.conn(), &caller, person_id).await?;
            let person_known = app.person(uow.conn(), person_id).await?.is_some();
            let command = Command::AddGoal {
                person_id: person_id.to_string(),
                goal_id: goal_id.to_string(),
                kind,
                due_at,
                person_known,
            };
            let appended = app.append_plan(uow, &caller, person_id, &command).await?;
            Ok(Decided {
                answer: pb::AddPlanGoalResponse {
                    goal_id: goal_id.to_string(),
                    result: Some(command::result(person_id, &appended)),
                },
                subject: person_id.to_string(),
                purpose: "command",
                linked: Vec::new(),
            })
        })
        .await
    }

    /// Records a follow-up of a goal.
    ///
    /// # Errors
    /// `INVALID_ARGUMENT`, `PERMISSION_DENIED`, `NOT_FOUND` (goal),
    /// `FAILED_PRECONDITION` (`GOAL_ALREADY_MET`).
    #[tracing::instrument(skip_all, fields(person_id = tracing::field::Empty))]
    pub async fn follow_up(
        &self,
        ctx: &CallContext,
        req: &pb::RecordFollowUpRequest,
    ) -> Result<CommandResult, AppError> {
        let (target, (goal_id, followed_up_at, status_code)) = parse::follow_up(req, Utc::now())?;
        traced(target.person_id);
        let command = Command::RecordFollowUp {
            person_id: target.person_id.to_string(),
            goal_id: goal_id.to_string(),
            followed_up_at,
            status_code,
        };
        self.on_plan(
            ctx,
            req,
            "RecordFollowUp",
            &target.request_id,
            target.person_id,
            command,
        )
        .await
    }

    /// Marks a goal met.
    ///
    /// # Errors
    /// `INVALID_ARGUMENT`, `PERMISSION_DENIED`, `NOT_FOUND` (goal),
    /// `FAILED_PRECONDITION` (`GOAL_ALREADY_MET`).
    #[tracing::instrument(skip_all, fields(person_id = tracing::field::Empty))]
    pub async fn goal_met(&self, ctx: &CallContext, req: &pb::MarkGoalMetRequest) -> Result<CommandResult, AppError> {
        let (target, goal_id) = parse::goal_met(req)?;
        traced(target.person_id);
        let command = Command::MarkGoalMet {
            person_id: target.person_id.to_string(),
            goal_id: goal_id.to_string(),
            now: validate::timestamp(Utc::now()),
        };
        self.on_plan(ctx, req, "MarkGoalMet", &target.request_id, target.person_id, command)
            .await
    }

    /// The person's plan.
    ///
    /// # Errors
    /// `INVALID_ARGUMENT`, `PERMISSION_DENIED`, `NOT_FOUND` (no plan yet).
    #[tracing::instrument(skip_all, fields(person_id = tracing::field::Empty))]
    pub async fn get_plan(&self, ctx: &CallContext, req: &pb::GetPlanRequest) -> Result<pb::Plan, AppError> {
        let person_id = PersonId::parse("person_id", &req.person_id).map_err(|v| AppError::InvalidArgument(vec![v]))?;
        traced(person_id);
        self.check_plan(self.store.pool(), ctx, person_id).await?;
        let state = self.load_plan(person_id).await?;
        if state.version == 0 {
            return Err(rejected(plan::NAME, person_id)(DomainError::NotFound(plan::NAME)));
        }
        Ok(pb::Plan {
            person_id: person_id.to_string(),
            goals: state
                .goals
                .iter()
                .map(|g| pb::PlanGoal {
                    goal_id: g.goal_id.clone(),
                    kind: g.kind,
                    due_at: g.due_at,
                    met: g.met,
                    follow_ups: g
                        .follow_ups
                        .iter()
                        .map(|(at, code)| {
                            let at = validate::to_datetime(at)
                                .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true))
                                .unwrap_or_default();
                            format!("{at} {code}")
                        })
                        .collect(),
                })
                .collect(),
            version: state.version,
        })
    }
}

/// Records the parsed person ID on the current span (never the request's text).
fn traced(person_id: PersonId) {
    tracing::Span::current().record("person_id", tracing::field::display(person_id));
}
