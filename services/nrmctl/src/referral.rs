//! `referral …`: referrals to service providers, on the referral service.
//! Each subcommand builds its request from the options, calls, and prints
//! the answer as text or proto3 JSON.

use anyhow::Result;
use nrm_proto::common::v1::CommandResult;
use nrm_proto::referral::v1::referral_service_client::ReferralServiceClient;
use nrm_proto::referral::v1::{
    AcceptReferralRequest, CloseReferralRequest, CreateReferralRequest, DeclineReferralRequest, GetReferralRequest,
    ListInboxRequest, ListInboxResponse, RecordServiceDeliveredRequest, RedirectReferralRequest, Referral, ServiceKind,
    ShelterNeed,
};
use nrm_proto::shelter::v1::BedCategory;

use crate::cli::referral::{
    AcceptArgs, CloseArgs, CreateReferralArgs, DeclineArgs, DeliverArgs, InboxArgs, RedirectArgs, ReferralCommand,
    ReferralGetArgs,
};
use crate::cli::{Global, Output};
use crate::enums::{cli_name, cli_name_of, shown};
use crate::output::{self, or_dash, print_fields, print_json, time};
use crate::rpc::{self, AuthChannel};

/// The referral client.
type Client = ReferralServiceClient<AuthChannel>;

/// Runs a `referral` subcommand.
///
/// # Errors
/// When the service cannot be reached or refuses the call (a `tonic::Status`
/// in the chain), or the output cannot be printed.
pub async fn run(global: &Global, command: ReferralCommand) -> Result<()> {
    let mut client = Client::new(rpc::connect(global, &global.referral_endpoint).await?);
    let output = global.output;
    match command {
        ReferralCommand::Create(args) => create(&mut client, output, *args).await,
        ReferralCommand::Accept(args) => accept(&mut client, output, args).await,
        ReferralCommand::Decline(args) => decline(&mut client, output, args).await,
        ReferralCommand::Redirect(args) => redirect(&mut client, output, args).await,
        ReferralCommand::Deliver(args) => deliver(&mut client, output, args).await,
        ReferralCommand::Close(args) => close(&mut client, output, args).await,
        ReferralCommand::Get(args) => get(&mut client, output, args).await,
        ReferralCommand::Inbox(args) => inbox(&mut client, output, args).await,
    }
}

async fn create(client: &mut Client, output: Output, args: CreateReferralArgs) -> Result<()> {
    let request_id = rpc::request_id(args.request, output);
    let shelter_need = match (args.shelter_category, args.shelter_region) {
        (Some(category), Some(region)) => Some(ShelterNeed {
            category: category.into(),
            region,
        }),
        // clap makes each of the two require the other.
        _ => None,
    };
    let request = CreateReferralRequest {
        request_id: request_id.clone(),
        person_id: args.person_id,
        case_id: args.case_id,
        receiving_agency: args.receiving_agency,
        services: args.services.into_iter().map(Into::into).collect(),
        urgency: args.urgency.into(),
        consent_id: args.consent_id,
        shelter_need,
    };
    let response = client.create_referral(request).await?.into_inner();
    match output {
        Output::Json => print_json("nrm.referral.v1.CreateReferralResponse", &response),
        Output::Text => rpc::print_created(
            vec![
                ("referral_id", response.referral_id.clone()),
                ("answer_due_at", time(response.answer_due_at.as_ref())),
            ],
            response.result.as_ref(),
            &request_id,
        ),
    }
}

async fn accept(client: &mut Client, output: Output, args: AcceptArgs) -> Result<()> {
    let request_id = rpc::request_id(args.request, output);
    let request = AcceptReferralRequest {
        request_id: request_id.clone(),
        referral_id: args.at.referral_id,
        expected_version: args.at.expected_version,
    };
    let result = client.accept_referral(request).await?.into_inner();
    print_result(output, &result, &request_id)
}

async fn decline(client: &mut Client, output: Output, args: DeclineArgs) -> Result<()> {
    let request_id = rpc::request_id(args.request, output);
    let request = DeclineReferralRequest {
        request_id: request_id.clone(),
        referral_id: args.at.referral_id,
        expected_version: args.at.expected_version,
        reason: args.reason.into(),
    };
    let result = client.decline_referral(request).await?.into_inner();
    print_result(output, &result, &request_id)
}

async fn redirect(client: &mut Client, output: Output, args: RedirectArgs) -> Result<()> {
    let request_id = rpc::request_id(args.request, output);
    let request = RedirectReferralRequest {
        request_id: request_id.clone(),
        referral_id: args.at.referral_id,
        expected_version: args.at.expected_version,
        receiving_agency: args.receiving_agency,
        consent_id: args.consent_id,
    };
    let result = client.redirect_referral(request).await?.into_inner();
    print_result(output, &result, &request_id)
}

async fn deliver(client: &mut Client, output: Output, args: DeliverArgs) -> Result<()> {
    let request_id = rpc::request_id(args.request, output);
    let request = RecordServiceDeliveredRequest {
        request_id: request_id.clone(),
        referral_id: args.at.referral_id,
        expected_version: args.at.expected_version,
        kind: args.kind.into(),
        delivered_at: Some(args.at_time.unwrap_or_else(rpc::now)),
        provider: args.provider,
    };
    let result = client.record_service_delivered(request).await?.into_inner();
    print_result(output, &result, &request_id)
}

async fn close(client: &mut Client, output: Output, args: CloseArgs) -> Result<()> {
    let request_id = rpc::request_id(args.request, output);
    let request = CloseReferralRequest {
        request_id: request_id.clone(),
        referral_id: args.at.referral_id,
        expected_version: args.at.expected_version,
        outcome: args.outcome.into(),
    };
    let result = client.close_referral(request).await?.into_inner();
    print_result(output, &result, &request_id)
}

/// Prints the answer of a command on a referral.
fn print_result(output: Output, result: &CommandResult, request_id: &str) -> Result<()> {
    rpc::print_result(output, result, "referral_id", request_id)
}

async fn get(client: &mut Client, output: Output, args: ReferralGetArgs) -> Result<()> {
    let request = GetReferralRequest {
        referral_id: args.referral_id,
    };
    let referral = client.get_referral(request).await?.into_inner();
    match output {
        Output::Json => print_json("nrm.referral.v1.Referral", &referral),
        Output::Text => print_referral(&referral),
    }
}

fn print_referral(referral: &Referral) -> Result<()> {
    let mut fields = vec![
        ("referral_id", referral.referral_id.clone()),
        ("status", shown(referral.status())),
        ("version", referral.version.to_string()),
        ("person_id", or_dash(&referral.person_id)),
        ("case_id", or_dash(&referral.case_id)),
        ("from", or_dash(&referral.referring_agency)),
        ("to", or_dash(&referral.receiving_agency)),
        ("services", services(referral.services())),
        ("urgency", shown(referral.urgency())),
        ("consent_id", or_dash(&referral.consent_id)),
        ("created_at", time(referral.created_at.as_ref())),
        ("answer_due_at", time(referral.answer_due_at.as_ref())),
        ("overdue", referral.overdue.to_string()),
    ];
    if referral.decline_reason != 0 {
        fields.push(("decline_reason", shown(referral.decline_reason())));
    }
    fields.push(("delivered", services(referral.services_delivered())));
    if referral.outcome != 0 {
        fields.push(("outcome", shown(referral.outcome())));
    }
    if let Some(need) = &referral.shelter_need {
        fields.extend([
            (
                "shelter_need",
                format!(
                    "{} {}",
                    cli_name_of::<BedCategory>(need.category),
                    or_dash(&need.region)
                ),
            ),
            ("shelter_id", or_dash(&referral.shelter_id)),
            ("hold_id", or_dash(&referral.hold_id)),
        ]);
    }
    if !referral.nearest_regions_with_beds.is_empty() {
        fields.push((
            "nearest_free_beds",
            output::list(referral.nearest_regions_with_beds.iter().cloned()),
        ));
    }
    print_fields(&fields)
}

fn services(kinds: impl Iterator<Item = ServiceKind>) -> String {
    output::list(kinds.map(cli_name))
}

async fn inbox(client: &mut Client, output: Output, args: InboxArgs) -> Result<()> {
    let mut message = ListInboxRequest {
        page_size: args.page_size.unwrap_or(0),
        page_token: args.page_token.unwrap_or_default(),
        status: args.status.map_or(0, Into::into),
        urgency: args.urgency.map_or(0, Into::into),
        overdue_only: args.overdue,
    };
    let mut all = ListInboxResponse::default();
    loop {
        let page = client.list_inbox(message.clone()).await?.into_inner();
        all.referrals.extend(page.referrals);
        all.next_page_token = page.next_page_token;
        if !args.all || all.next_page_token.is_empty() || all.next_page_token == message.page_token {
            break;
        }
        message.page_token.clone_from(&all.next_page_token);
    }
    match output {
        Output::Json => print_json("nrm.referral.v1.ListInboxResponse", &all),
        Output::Text => {
            let rows = all
                .referrals
                .iter()
                .map(|referral| {
                    vec![
                        referral.referral_id.clone(),
                        shown(referral.status()),
                        shown(referral.urgency()),
                        or_dash(&referral.referring_agency),
                        services(referral.services()),
                        time(referral.answer_due_at.as_ref()),
                        if referral.overdue { "yes" } else { "-" }.to_owned(),
                        referral.version.to_string(),
                    ]
                })
                .collect::<Vec<_>>();
            output::print_table(
                &[
                    "REFERRAL_ID",
                    "STATUS",
                    "URGENCY",
                    "FROM",
                    "SERVICES",
                    "ANSWER_DUE_AT",
                    "OVERDUE",
                    "VERSION",
                ],
                &rows,
            )?;
            if !all.next_page_token.is_empty() {
                eprintln!("more referrals: --page-token {} (or --all)", all.next_page_token);
            }
            Ok(())
        }
    }
}
