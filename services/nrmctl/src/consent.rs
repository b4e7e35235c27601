//! `consent …`: consents to share with an agency, on the referral service.

use anyhow::Result;
use nrm_proto::referral::v1::referral_service_client::ReferralServiceClient;
use nrm_proto::referral::v1::{RecordConsentRequest, WithdrawConsentRequest};

use crate::cli::referral::{ConsentCommand, RecordConsentArgs, WithdrawConsentArgs};
use crate::cli::{Global, Output};
use crate::output::print_json;
use crate::rpc::{self, AuthChannel};

/// The referral client.
type Client = ReferralServiceClient<AuthChannel>;

/// Runs a `consent` subcommand.
///
/// # Errors
/// When the service cannot be reached or refuses the call, or the output
/// cannot be printed.
pub async fn run(global: &Global, command: ConsentCommand) -> Result<()> {
    let mut client = Client::new(rpc::connect(global, &global.referral_endpoint).await?);
    match command {
        ConsentCommand::Record(args) => record(&mut client, global.output, args).await,
        ConsentCommand::Withdraw(args) => withdraw(&mut client, global.output, args).await,
    }
}

async fn record(client: &mut Client, output: Output, args: RecordConsentArgs) -> Result<()> {
    let request_id = rpc::request_id(args.request, output);
    let request = RecordConsentRequest {
        request_id: request_id.clone(),
        person_id: args.person_id,
        case_id: args.case_id,
        given_by: args.given_by.into(),
        child: args.child,
        recipient_agency: args.recipient,
        purposes: args.purposes.into_iter().map(Into::into).collect(),
        data_categories: args.data_categories.into_iter().map(Into::into).collect(),
        expires_at: args.expires,
    };
    let response = client.record_consent(request).await?.into_inner();
    match output {
        Output::Json => print_json("nrm.referral.v1.RecordConsentResponse", &response),
        Output::Text => rpc::print_created(
            vec![("consent_id", response.consent_id.clone())],
            response.result.as_ref(),
            &request_id,
        ),
    }
}

async fn withdraw(client: &mut Client, output: Output, args: WithdrawConsentArgs) -> Result<()> {
    let request_id = rpc::request_id(args.request, output);
    let request = WithdrawConsentRequest {
        request_id: request_id.clone(),
        consent_id: args.consent_id,
    };
    let result = client.withdraw_consent(request).await?.into_inner();
    rpc::print_result(output, &result, "consent_id", &request_id)
}
