//! `person get`: a person's identifiers from the identification service,
//! as far as a consent lets the caller's agency read them; and the text
//! form of personal identifiers that `case get --personal` shares.

use anyhow::Result;
use nrm_proto::common::v1::{DocumentType, IdentityDocument, PersonalDataView, personal_data_view};
use nrm_proto::identification::v1::identification_service_client::IdentificationServiceClient;
use nrm_proto::identification::v1::{GetPersonalDataRequest, GetPersonalDataResponse};
use nrm_proto::referral::v1::DataCategory;

use crate::cli::{Global, Output, PersonCommand, PersonGetArgs};
use crate::enums::{cli_name, cli_name_of};
use crate::output::{self, or_dash, print_fields, print_json};
use crate::rpc;

/// Runs a `person` subcommand.
///
/// # Errors
/// When the service cannot be reached or refuses the call, or the output
/// cannot be printed.
pub async fn run(global: &Global, command: PersonCommand) -> Result<()> {
    let mut client = IdentificationServiceClient::new(rpc::connect(global, &global.endpoint).await?);
    match command {
        PersonCommand::Get(args) => {
            let response = client.get_personal_data(request(args)).await?.into_inner();
            match global.output {
                Output::Json => print_json("nrm.identification.v1.GetPersonalDataResponse", &response),
                Output::Text => print_person(&response),
            }
        }
    }
}

fn request(args: PersonGetArgs) -> GetPersonalDataRequest {
    GetPersonalDataRequest {
        person_id: args.person_id,
        purpose: args.purpose.unwrap_or_default(),
        read_purpose: args.read_purpose.map_or(0, Into::into),
    }
}

fn print_person(response: &GetPersonalDataResponse) -> Result<()> {
    let mut fields = vec![
        ("person_id", response.person_id.clone()),
        ("consent_id", or_dash(&response.consent_id)),
        (
            "categories",
            output::list(response.data_categories().map(cli_name::<DataCategory>)),
        ),
    ];
    fields.extend(personal_fields(response.personal.as_ref()));
    print_fields(&fields)
}

/// The text lines of a personal-data view: `personal: withheld (…)`,
/// `erased` or `-`, or one line per identifier.
pub fn personal_fields(personal: Option<&PersonalDataView>) -> Vec<(&'static str, String)> {
    match personal.and_then(|p| p.view.as_ref()) {
        None => vec![("personal", "-".to_owned())],
        Some(personal_data_view::View::Withheld(withheld)) => {
            vec![("personal", format!("withheld ({})", or_dash(&withheld.reason)))]
        }
        Some(personal_data_view::View::Erased(_)) => vec![("personal", "erased".to_owned())],
        Some(personal_data_view::View::Identifiers(ids)) => vec![
            ("name", or_dash(&ids.full_name)),
            ("date_of_birth", or_dash(&ids.date_of_birth)),
            ("documents", output::list(ids.documents.iter().map(describe_document))),
            ("phone", or_dash(&ids.phone)),
            ("address", or_dash(&ids.address)),
        ],
    }
}

fn describe_document(doc: &IdentityDocument) -> String {
    format!(
        "{}:{}:{}",
        cli_name_of::<DocumentType>(doc.r#type),
        doc.number,
        doc.issuing_country
    )
}
