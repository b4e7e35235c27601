//! `consent …`: consents to share with an agency, on the referral service.

use anyhow::Result;
use nrm_proto::referral::v1::referral_service_client::ReferralServiceClient;
use nrm_proto::referral::v1::{
    ConsentGiver, DataCategory, ListConsentsRequest, RecordConsentRequest, ServiceKind, WithdrawConsentRequest,
};

use crate::cli::referral::{ConsentCommand, ListConsentsArgs, RecordConsentArgs, WithdrawConsentArgs};
use crate::cli::{Global, Output};
use crate::enums::cli_name_of;
use crate::output::{or_dash, print_json, print_table, time};
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
        ConsentCommand::List(args) => list(&mut client, global.output, args).await,
    }
}

async fn record(client: &mut Client, output: Output, args: RecordConsentArgs) -> Result<()> {
    let request_id = rpc::request_id(args.request, output);
    let request = RecordConsentRequest {
        request_id: request_id.clone(),
        person_id: args.person_id,
        case_id: args.case_id,
        given_by: args.given_by.into(),
        recipient_agency: args.recipient,
        purposes: args.purposes.into_iter().map(Into::into).collect(),
        data_categories: args.data_categories.into_iter().map(Into::into).collect(),
        expires_at: args.expires,
        guardian_ref: args.guardian_ref.unwrap_or_default(),
        best_interests_decision_ref: args.best_interests_decision.unwrap_or_default(),
        best_interests_decided_by: args.decided_by.unwrap_or_default(),
        // Ignored by the service: whether the person is a child is identification's.
        child: false,
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

async fn list(client: &mut Client, output: Output, args: ListConsentsArgs) -> Result<()> {
    let response = client
        .list_consents(ListConsentsRequest {
            person_id: args.person_id,
        })
        .await?
        .into_inner();
    match output {
        Output::Json => print_json("nrm.referral.v1.ListConsentsResponse", &response),
        Output::Text => {
            let rows: Vec<Vec<String>> = response
                .consents
                .iter()
                .map(|c| {
                    let attestation = c.attestation.clone().unwrap_or_default();
                    let attested = [
                        attestation.attesting_officer,
                        attestation.guardian_ref,
                        attestation.best_interests_decision_ref,
                        attestation.best_interests_decided_by,
                    ]
                    .into_iter()
                    .filter(|s| !s.is_empty())
                    .collect::<Vec<_>>()
                    .join(" ");
                    let status = c.status().as_str_name().trim_start_matches("CONSENT_STATUS_");
                    vec![
                        c.consent_id.clone(),
                        status.to_ascii_lowercase(),
                        or_dash(&c.recipient_agency),
                        c.purposes
                            .iter()
                            .map(|p| cli_name_of::<ServiceKind>(*p))
                            .collect::<Vec<_>>()
                            .join(","),
                        c.data_categories
                            .iter()
                            .map(|d| cli_name_of::<DataCategory>(*d))
                            .collect::<Vec<_>>()
                            .join(","),
                        cli_name_of::<ConsentGiver>(c.given_by),
                        or_dash(&c.recorded_by_agency),
                        or_dash(&attested),
                        time(c.expires_at.as_ref()),
                    ]
                })
                .collect();
            print_table(
                &[
                    "CONSENT",
                    "STATUS",
                    "RECIPIENT",
                    "PURPOSES",
                    "DATA",
                    "GIVEN BY",
                    "RECORDED BY",
                    "ATTESTED BY",
                    "EXPIRES",
                ],
                &rows,
            )
        }
    }
}
