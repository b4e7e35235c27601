//! `shelter …`: shelters, beds and holds, on the shelter service. Each
//! subcommand builds its request from the options, calls, and prints the
//! answer as text or proto3 JSON.

use anyhow::Result;
use nrm_proto::common::v1::CommandResult;
use nrm_proto::shelter::v1::shelter_service_client::ShelterServiceClient;
use nrm_proto::shelter::v1::{
    AdmitRequest, ApproveShelterRequest, BedCapacity, BedCategory, ChangeCapacityRequest, DischargeRequest,
    GetShelterRequest, HoldBedRequest, ListArrivalsRequest, ListFreeCapacityRequest, RegisterShelterRequest,
    ReleaseHoldRequest, Shelter,
};

use crate::cli::shelter::{
    ApproveArgs, CapacityArgs, FreeArgs, HoldArgs, HoldRefArgs, RegisterArgs, ShelterCommand, ShelterGetArgs,
};
use crate::cli::{Global, Output};
use crate::enums::{cli_name, cli_name_of, shown};
use crate::output::{self, or_dash, print_fields, print_json, time};
use crate::rpc::{self, AuthChannel};

/// The shelter client.
type Client = ShelterServiceClient<AuthChannel>;

/// Runs a `shelter` subcommand.
///
/// # Errors
/// When the service cannot be reached or refuses the call (a `tonic::Status`
/// in the chain), or the output cannot be printed.
pub async fn run(global: &Global, command: ShelterCommand) -> Result<()> {
    let mut client = Client::new(rpc::connect(global, &global.shelter_endpoint).await?);
    let output = global.output;
    match command {
        ShelterCommand::Register(args) => register(&mut client, output, args).await,
        ShelterCommand::Approve(args) => approve(&mut client, output, args).await,
        ShelterCommand::Capacity(args) => capacity(&mut client, output, args).await,
        ShelterCommand::Hold(args) => hold(&mut client, output, args).await,
        ShelterCommand::Release(args) => on_hold(&mut client, output, Step::Release, args).await,
        ShelterCommand::Admit(args) => on_hold(&mut client, output, Step::Admit, args).await,
        ShelterCommand::Discharge(args) => on_hold(&mut client, output, Step::Discharge, args).await,
        ShelterCommand::Get(args) => get(&mut client, output, args).await,
        ShelterCommand::Free(args) => free(&mut client, output, args).await,
        ShelterCommand::Arrivals(args) => arrivals(&mut client, output, args).await,
    }
}

async fn register(client: &mut Client, output: Output, args: RegisterArgs) -> Result<()> {
    let request_id = rpc::request_id(args.request, output);
    let request = RegisterShelterRequest {
        request_id: request_id.clone(),
        code: args.code,
        region: args.region,
        address: args.address.unwrap_or_default(),
        capacity: args.beds,
        services: args.services.into_iter().map(Into::into).collect(),
        wheelchair_accessible: args.accessible,
    };
    let response = client.register_shelter(request).await?.into_inner();
    match output {
        Output::Json => print_json("nrm.shelter.v1.RegisterShelterResponse", &response),
        Output::Text => rpc::print_created(
            vec![("shelter_id", response.shelter_id.clone())],
            response.result.as_ref(),
            &request_id,
        ),
    }
}

async fn approve(client: &mut Client, output: Output, args: ApproveArgs) -> Result<()> {
    let request_id = rpc::request_id(args.request, output);
    let request = ApproveShelterRequest {
        request_id: request_id.clone(),
        shelter_id: args.shelter_id,
        expected_version: args.expected_version,
    };
    let result = client.approve_shelter(request).await?.into_inner();
    print_result(output, &result, &request_id)
}

async fn capacity(client: &mut Client, output: Output, args: CapacityArgs) -> Result<()> {
    let request_id = rpc::request_id(args.request, output);
    let request = ChangeCapacityRequest {
        request_id: request_id.clone(),
        shelter_id: args.shelter_id,
        expected_version: args.expected_version,
        category: args.category.into(),
        beds: args.beds,
    };
    let result = client.change_capacity(request).await?.into_inner();
    print_result(output, &result, &request_id)
}

async fn hold(client: &mut Client, output: Output, args: HoldArgs) -> Result<()> {
    let request_id = rpc::request_id(args.request, output);
    let request = HoldBedRequest {
        request_id: request_id.clone(),
        shelter_id: args.shelter_id,
        category: args.category.into(),
        referral_id: args.referral_id,
        hold_minutes: args.minutes.unwrap_or(0),
    };
    let response = client.hold_bed(request).await?.into_inner();
    match output {
        Output::Json => print_json("nrm.shelter.v1.HoldBedResponse", &response),
        Output::Text => rpc::print_created(
            vec![
                (
                    "shelter_id",
                    response
                        .result
                        .as_ref()
                        .map_or_else(String::new, |r| r.aggregate_id.clone()),
                ),
                ("hold_id", response.hold_id.clone()),
                ("expires_at", time(response.expires_at.as_ref())),
            ],
            response.result.as_ref(),
            &request_id,
        ),
    }
}

/// What happens to a hold.
#[derive(Debug, Clone, Copy)]
enum Step {
    Release,
    Admit,
    Discharge,
}

async fn on_hold(client: &mut Client, output: Output, step: Step, args: HoldRefArgs) -> Result<()> {
    let request_id = rpc::request_id(args.request, output);
    let (shelter_id, hold_id) = (args.shelter_id, args.hold_id);
    let response = match step {
        Step::Release => {
            let request = ReleaseHoldRequest {
                request_id: request_id.clone(),
                shelter_id,
                hold_id,
            };
            client.release_hold(request).await
        }
        Step::Admit => {
            let request = AdmitRequest {
                request_id: request_id.clone(),
                shelter_id,
                hold_id,
            };
            client.admit(request).await
        }
        Step::Discharge => {
            let request = DischargeRequest {
                request_id: request_id.clone(),
                shelter_id,
                hold_id,
            };
            client.discharge(request).await
        }
    };
    let result = response?.into_inner();
    print_result(output, &result, &request_id)
}

/// Prints the answer of a command on a shelter.
fn print_result(output: Output, result: &CommandResult, request_id: &str) -> Result<()> {
    rpc::print_result(output, result, "shelter_id", request_id)
}

async fn get(client: &mut Client, output: Output, args: ShelterGetArgs) -> Result<()> {
    let request = GetShelterRequest {
        shelter_id: args.shelter_id,
    };
    let shelter = client.get_shelter(request).await?.into_inner();
    match output {
        Output::Json => print_json("nrm.shelter.v1.Shelter", &shelter),
        Output::Text => print_shelter(&shelter),
    }
}

fn print_shelter(shelter: &Shelter) -> Result<()> {
    print_fields(&[
        ("shelter_id", shelter.shelter_id.clone()),
        ("code", or_dash(&shelter.code)),
        ("region", or_dash(&shelter.region)),
        ("operator", or_dash(&shelter.operator_agency)),
        ("version", shelter.version.to_string()),
        ("beds", beds(&shelter.capacity)),
        ("free", beds(&shelter.free)),
        ("services", output::list(shelter.services().map(cli_name))),
        ("accessible", shelter.wheelchair_accessible.to_string()),
        ("address", or_dash(&shelter.address)),
    ])
}

/// Beds as on the command line: `women=6,children=4`.
fn beds(capacity: &[BedCapacity]) -> String {
    output::list(
        capacity
            .iter()
            .map(|c| format!("{}={}", cli_name_of::<BedCategory>(c.category), c.beds)),
    )
}

async fn free(client: &mut Client, output: Output, args: FreeArgs) -> Result<()> {
    let request = ListFreeCapacityRequest {
        region: args.region.unwrap_or_default(),
        category: args.category.map_or(0, Into::into),
    };
    let response = client.list_free_capacity(request).await?.into_inner();
    match output {
        Output::Json => print_json("nrm.shelter.v1.ListFreeCapacityResponse", &response),
        Output::Text => {
            let rows = response
                .entries
                .iter()
                .map(|entry| {
                    vec![
                        entry.shelter_id.clone(),
                        or_dash(&entry.region),
                        shown(entry.category()),
                        entry.free.to_string(),
                    ]
                })
                .collect::<Vec<_>>();
            output::print_table(&["SHELTER_ID", "REGION", "CATEGORY", "FREE"], &rows)
        }
    }
}

async fn arrivals(client: &mut Client, output: Output, args: ShelterGetArgs) -> Result<()> {
    let request = ListArrivalsRequest {
        shelter_id: args.shelter_id,
    };
    let response = client.list_arrivals(request).await?.into_inner();
    match output {
        Output::Json => print_json("nrm.shelter.v1.ListArrivalsResponse", &response),
        Output::Text => {
            let rows = response
                .arrivals
                .iter()
                .map(|a| {
                    vec![
                        a.hold_id.clone(),
                        or_dash(&a.person_id),
                        shown(a.category()),
                        or_dash(&a.holder_agency),
                        time(a.held_at.as_ref()),
                        time(a.expires_at.as_ref()),
                    ]
                })
                .collect::<Vec<_>>();
            output::print_table(
                &[
                    "HOLD_ID",
                    "PERSON_ID",
                    "CATEGORY",
                    "BROUGHT_BY",
                    "HELD_AT",
                    "EXPIRES_AT",
                ],
                &rows,
            )
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn beds_print_as_they_are_given() {
        let capacity = [
            BedCapacity {
                category: BedCategory::Women.into(),
                beds: 6,
            },
            BedCapacity {
                category: BedCategory::MothersWithChildren.into(),
                beds: 2,
            },
        ];
        assert_eq!(beds(&capacity), "women=6,mothers-with-children=2");
        assert_eq!(beds(&[]), "-");
    }
}
