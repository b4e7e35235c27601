//! `plan …`: the individual rehabilitation plan, on the referral service.

use anyhow::Result;
use nrm_proto::common::v1::CommandResult;
use nrm_proto::referral::v1::referral_service_client::ReferralServiceClient;
use nrm_proto::referral::v1::{AddPlanGoalRequest, GetPlanRequest, MarkGoalMetRequest, Plan, RecordFollowUpRequest};

use crate::cli::referral::{AddGoalArgs, FollowUpArgs, GoalMetArgs, PlanCommand, PlanGetArgs};
use crate::cli::{Global, Output};
use crate::enums::shown;
use crate::output::{self, or_dash, print_fields, print_json, time};
use crate::rpc::{self, AuthChannel};

/// The referral client.
type Client = ReferralServiceClient<AuthChannel>;

/// Runs a `plan` subcommand.
///
/// # Errors
/// When the service cannot be reached or refuses the call, or the output
/// cannot be printed.
pub async fn run(global: &Global, command: PlanCommand) -> Result<()> {
    let mut client = Client::new(rpc::connect(global, &global.referral_endpoint).await?);
    let output = global.output;
    match command {
        PlanCommand::AddGoal(args) => add_goal(&mut client, output, args).await,
        PlanCommand::FollowUp(args) => follow_up(&mut client, output, args).await,
        PlanCommand::GoalMet(args) => goal_met(&mut client, output, args).await,
        PlanCommand::Get(args) => get(&mut client, output, args).await,
    }
}

async fn add_goal(client: &mut Client, output: Output, args: AddGoalArgs) -> Result<()> {
    let request_id = rpc::request_id(args.request, output);
    let request = AddPlanGoalRequest {
        request_id: request_id.clone(),
        person_id: args.person_id,
        kind: args.kind.into(),
        due_at: args.due,
    };
    let response = client.add_plan_goal(request).await?.into_inner();
    match output {
        Output::Json => print_json("nrm.referral.v1.AddPlanGoalResponse", &response),
        Output::Text => rpc::print_created(
            vec![("goal_id", response.goal_id.clone())],
            response.result.as_ref(),
            &request_id,
        ),
    }
}

async fn follow_up(client: &mut Client, output: Output, args: FollowUpArgs) -> Result<()> {
    let request_id = rpc::request_id(args.request, output);
    let request = RecordFollowUpRequest {
        request_id: request_id.clone(),
        person_id: args.person_id,
        goal_id: args.goal_id,
        followed_up_at: Some(args.at.unwrap_or_else(rpc::now)),
        status_code: args.status,
    };
    let result = client.record_follow_up(request).await?.into_inner();
    print_result(output, &result, &request_id)
}

async fn goal_met(client: &mut Client, output: Output, args: GoalMetArgs) -> Result<()> {
    let request_id = rpc::request_id(args.request, output);
    let request = MarkGoalMetRequest {
        request_id: request_id.clone(),
        person_id: args.person_id,
        goal_id: args.goal_id,
    };
    let result = client.mark_goal_met(request).await?.into_inner();
    print_result(output, &result, &request_id)
}

/// Prints the answer of a command on a plan (a person has one plan).
fn print_result(output: Output, result: &CommandResult, request_id: &str) -> Result<()> {
    rpc::print_result(output, result, "person_id", request_id)
}

async fn get(client: &mut Client, output: Output, args: PlanGetArgs) -> Result<()> {
    let request = GetPlanRequest {
        person_id: args.person_id,
    };
    let plan = client.get_plan(request).await?.into_inner();
    match output {
        Output::Json => print_json("nrm.referral.v1.Plan", &plan),
        Output::Text => print_plan(&plan),
    }
}

/// The plan's person and version, then one row per goal with its latest
/// follow-up (`time CODE`).
fn print_plan(plan: &Plan) -> Result<()> {
    print_fields(&[
        ("person_id", plan.person_id.clone()),
        ("version", plan.version.to_string()),
        ("goals", plan.goals.len().to_string()),
    ])?;
    if plan.goals.is_empty() {
        return Ok(());
    }
    let rows = plan
        .goals
        .iter()
        .map(|goal| {
            vec![
                goal.goal_id.clone(),
                shown(goal.kind()),
                time(goal.due_at.as_ref()),
                if goal.met { "yes" } else { "-" }.to_owned(),
                goal.follow_ups.len().to_string(),
                or_dash(goal.follow_ups.last().map_or("", String::as_str)),
            ]
        })
        .collect::<Vec<_>>();
    output::emit("\n")?;
    output::print_table(
        &["GOAL_ID", "KIND", "DUE_AT", "MET", "FOLLOW_UPS", "LAST_FOLLOW_UP"],
        &rows,
    )
}
