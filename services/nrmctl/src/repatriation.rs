//! `return …`: returns home across a border, on the repatriation service.
//! Each subcommand builds its request from the options, calls, and prints
//! the answer as text or proto3 JSON.

use anyhow::Result;
use nrm_proto::common::v1::{CommandResult, DocumentType, IdentityDocument, PersonalIdentifiers};
use nrm_proto::identification::v1::ExploitationForm;
use nrm_proto::repatriation::v1::repatriation_service_client::RepatriationServiceClient;
use nrm_proto::repatriation::v1::{
    ArrivalNeed, ArrivalPointKind, AssignEscortRequest, BookItineraryRequest, GetReturnRequest, HaltReturnRequest,
    ListReturnsRequest, ListReturnsResponse, OpenReturnRequest, RecordArrivalRequest, RecordDepartureRequest,
    RecordHandoverRequest, RecordReturnConsentRequest, RecordRiskAssessmentRequest, RecordTravelDocumentRequest,
    RequestTravelDocumentRequest, Return, SharedField,
};

use crate::cli::repatriation::{
    AssessArgs, AtArgs, ConsentArgs, DocumentArgs, EscortArgs, HaltArgs, HandoverArgs, ItineraryArgs, OpenArgs,
    ReturnCommand, ReturnListArgs, ShowArgs, TimeArgs,
};
use crate::cli::{Global, NumberCountry, Output};
use crate::enums::{ProtoEnum as _, cli_name, shown};
use crate::output::{self, or_dash, print_fields, print_json, time};
use crate::person::personal_fields;
use crate::rpc::{self, AuthChannel};

/// The repatriation client.
type Client = RepatriationServiceClient<AuthChannel>;

/// Runs a `return` subcommand.
///
/// # Errors
/// When the service cannot be reached or refuses the call (a `tonic::Status`
/// in the chain), or the output cannot be printed.
pub async fn run(global: &Global, command: ReturnCommand) -> Result<()> {
    let mut client = Client::new(rpc::connect(global, &global.repatriation_endpoint).await?);
    let output = global.output;
    match command {
        ReturnCommand::Open(args) => open(&mut client, output, *args).await,
        ReturnCommand::Consent(args) => consent(&mut client, output, args).await,
        ReturnCommand::Assess(args) => assess(&mut client, output, args).await,
        ReturnCommand::RequestDocument(args) => request_document(&mut client, output, args).await,
        ReturnCommand::Document(args) => document(&mut client, output, args).await,
        ReturnCommand::Itinerary(args) => itinerary(&mut client, output, args).await,
        ReturnCommand::Escort(args) => escort(&mut client, output, args).await,
        ReturnCommand::Depart(args) => depart(&mut client, output, args).await,
        ReturnCommand::Arrive(args) => arrive(&mut client, output, args).await,
        ReturnCommand::Handover(args) => handover(&mut client, output, args).await,
        ReturnCommand::Halt(args) => halt(&mut client, output, args).await,
        ReturnCommand::Show(args) => show(&mut client, output, args).await,
        ReturnCommand::List(args) => list(&mut client, output, args).await,
    }
}

async fn open(client: &mut Client, output: Output, args: OpenArgs) -> Result<()> {
    let request_id = rpc::request_id(args.request, output);
    let documents = documents(DocumentType::Passport, args.passports)
        .chain(documents(DocumentType::NationalId, args.national_ids))
        .chain(args.documents.into_iter().map(|(kind, doc)| document_of(kind, doc)))
        .collect::<Vec<_>>();
    let identifiers = PersonalIdentifiers {
        full_name: args.name.unwrap_or_default(),
        date_of_birth: args.dob.unwrap_or_default(),
        documents,
        phone: args.phone.unwrap_or_default(),
        address: args.address.unwrap_or_default(),
    };
    let request = OpenReturnRequest {
        request_id: request_id.clone(),
        citizenship: args.citizenship,
        identifiers: (identifiers != PersonalIdentifiers::default()).then_some(identifiers),
        gender: args.gender.map_or(0, Into::into),
        age_band: args.age_band.map_or(0, Into::into),
        form_of_exploitation: args.form.map(|f| f.proto_name().to_owned()).unwrap_or_default(),
        country_of_exploitation: args.exploitation_country.unwrap_or_default(),
        foreign_reference: args.foreign_reference,
        identified_by: args.identified_by,
        consulate_agency: args.consulate_agency,
    };
    let response = client.open_return(request).await?.into_inner();
    match output {
        Output::Json => print_json("nrm.repatriation.v1.OpenReturnResponse", &response),
        Output::Text => rpc::print_created(
            vec![("return_id", response.return_id.clone())],
            response.result.as_ref(),
            &request_id,
        ),
    }
}

fn documents(kind: DocumentType, docs: Vec<NumberCountry>) -> impl Iterator<Item = IdentityDocument> {
    docs.into_iter().map(move |doc| document_of(kind, doc))
}

fn document_of(kind: DocumentType, doc: NumberCountry) -> IdentityDocument {
    IdentityDocument {
        r#type: kind.into(),
        number: doc.number,
        issuing_country: doc.country,
    }
}

async fn consent(client: &mut Client, output: Output, args: ConsentArgs) -> Result<()> {
    let request_id = rpc::request_id(args.request, output);
    let request = RecordReturnConsentRequest {
        request_id: request_id.clone(),
        return_id: args.at.return_id,
        expected_version: args.at.expected_version,
        informed_consent_to_return: args.informed_consent_to_return,
        shared_fields: args.shared_fields.into_iter().map(Into::into).collect(),
        consent_to_reintegration_referral: args.consent_to_reintegration_referral,
        attested_by: args.attested_by,
        consent_form_ref: args.consent_form_ref,
    };
    let result = client.record_return_consent(request).await?.into_inner();
    print_result(output, &result, &request_id)
}

async fn assess(client: &mut Client, output: Output, args: AssessArgs) -> Result<()> {
    let request_id = rpc::request_id(args.request, output);
    let request = RecordRiskAssessmentRequest {
        request_id: request_id.clone(),
        return_id: args.at.return_id,
        expected_version: args.at.expected_version,
        safe_to_return: args.safe && !args.not_safe,
        family_involvement: args.family_involvement.into(),
        needs: args.needs.into_iter().map(Into::into).collect(),
        interpretation_language: args.interpretation_language.unwrap_or_default(),
    };
    let result = client.record_risk_assessment(request).await?.into_inner();
    print_result(output, &result, &request_id)
}

async fn request_document(client: &mut Client, output: Output, args: AtArgs) -> Result<()> {
    let request_id = rpc::request_id(args.request, output);
    let request = RequestTravelDocumentRequest {
        request_id: request_id.clone(),
        return_id: args.at.return_id,
        expected_version: args.at.expected_version,
    };
    let result = client.request_travel_document(request).await?.into_inner();
    print_result(output, &result, &request_id)
}

async fn document(client: &mut Client, output: Output, args: DocumentArgs) -> Result<()> {
    let request_id = rpc::request_id(args.request, output);
    let request = RecordTravelDocumentRequest {
        request_id: request_id.clone(),
        return_id: args.at.return_id,
        expected_version: args.at.expected_version,
        issued: args.issued && !args.refused,
        document_number: args.document_number.unwrap_or_default(),
        valid_until: args.valid_until,
    };
    let result = client.record_travel_document(request).await?.into_inner();
    print_result(output, &result, &request_id)
}

async fn itinerary(client: &mut Client, output: Output, args: ItineraryArgs) -> Result<()> {
    let request_id = rpc::request_id(args.request, output);
    let (kind, point) = match (args.airport, args.border_post) {
        (Some(airport), _) => (ArrivalPointKind::Airport, airport),
        (None, Some(post)) => (ArrivalPointKind::BorderPost, post),
        (None, None) => (ArrivalPointKind::Unspecified, String::new()),
    };
    let request = BookItineraryRequest {
        request_id: request_id.clone(),
        return_id: args.at.return_id,
        expected_version: args.at.expected_version,
        departure_at: Some(args.departure_at),
        arrival_at: Some(args.arrival_at),
        carrier: args.carrier,
        arrival_point_kind: kind.into(),
        arrival_point: point,
    };
    let result = client.book_itinerary(request).await?.into_inner();
    print_result(output, &result, &request_id)
}

async fn escort(client: &mut Client, output: Output, args: EscortArgs) -> Result<()> {
    let request_id = rpc::request_id(args.request, output);
    let request = AssignEscortRequest {
        request_id: request_id.clone(),
        return_id: args.at.return_id,
        expected_version: args.at.expected_version,
        escort_officer: args.escort_officer,
        escort_agency: args.escort_agency,
    };
    let result = client.assign_escort(request).await?.into_inner();
    print_result(output, &result, &request_id)
}

async fn depart(client: &mut Client, output: Output, args: TimeArgs) -> Result<()> {
    let request_id = rpc::request_id(args.request, output);
    let request = RecordDepartureRequest {
        request_id: request_id.clone(),
        return_id: args.at.return_id,
        expected_version: args.at.expected_version,
        departed_at: Some(args.when.unwrap_or_else(rpc::now)),
    };
    let result = client.record_departure(request).await?.into_inner();
    print_result(output, &result, &request_id)
}

async fn arrive(client: &mut Client, output: Output, args: TimeArgs) -> Result<()> {
    let request_id = rpc::request_id(args.request, output);
    let request = RecordArrivalRequest {
        request_id: request_id.clone(),
        return_id: args.at.return_id,
        expected_version: args.at.expected_version,
        arrived_at: Some(args.when.unwrap_or_else(rpc::now)),
    };
    let result = client.record_arrival(request).await?.into_inner();
    print_result(output, &result, &request_id)
}

async fn handover(client: &mut Client, output: Output, args: HandoverArgs) -> Result<()> {
    let request_id = rpc::request_id(args.request, output);
    let request = RecordHandoverRequest {
        request_id: request_id.clone(),
        return_id: args.at.return_id,
        expected_version: args.at.expected_version,
        handed_over_at: Some(args.when.unwrap_or_else(rpc::now)),
        received_by: args.received_by,
    };
    let result = client.record_handover(request).await?.into_inner();
    print_result(output, &result, &request_id)
}

async fn halt(client: &mut Client, output: Output, args: HaltArgs) -> Result<()> {
    let request_id = rpc::request_id(args.request, output);
    let request = HaltReturnRequest {
        request_id: request_id.clone(),
        return_id: args.at.return_id,
        expected_version: args.at.expected_version,
        reason: args.reason.into(),
    };
    let result = client.halt_return(request).await?.into_inner();
    print_result(output, &result, &request_id)
}

/// Prints the answer of a command on a return.
fn print_result(output: Output, result: &CommandResult, request_id: &str) -> Result<()> {
    rpc::print_result(output, result, "return_id", request_id)
}

async fn show(client: &mut Client, output: Output, args: ShowArgs) -> Result<()> {
    let request = GetReturnRequest {
        return_id: args.return_id,
    };
    let found = client.get_return(request).await?.into_inner();
    match output {
        Output::Json => print_json("nrm.repatriation.v1.Return", &found),
        Output::Text => print_return(&found),
    }
}

/// A return as `label: value` lines, then its steps as a table.
fn print_return(r: &Return) -> Result<()> {
    let arrival_point = if r.arrival_point.is_empty() {
        "-".to_owned()
    } else {
        format!("{} ({})", r.arrival_point, shown(r.arrival_point_kind()))
    };
    let mut fields = vec![
        ("return_id", r.return_id.clone()),
        ("direction", shown(r.direction())),
        ("status", shown(r.status())),
        ("from", or_dash(&r.from_country)),
        ("to", or_dash(&r.to_country)),
        ("version", r.version.to_string()),
        ("opened_by", or_dash(&r.opened_by)),
        ("consulate", or_dash(&r.consulate_agency)),
        ("foreign_reference", or_dash(&r.foreign_reference)),
        ("identified_by", or_dash(&r.identified_by)),
        ("shared", shared(&r.shared_fields)),
        ("reintegration", r.consent_to_reintegration_referral.to_string()),
        ("gender", shown(r.gender())),
        ("age_band", shown(r.age_band())),
        ("form", form(&r.form_of_exploitation)),
        ("exploited_in", or_dash(&r.country_of_exploitation)),
        ("safe_to_return", r.safe_to_return.to_string()),
        ("family", shown(r.family_involvement())),
        ("needs", needs(&r.needs)),
        ("language", or_dash(&r.interpretation_language)),
        ("departure_at", time(r.departure_at.as_ref())),
        ("arrival_at", time(r.arrival_at.as_ref())),
        ("carrier", or_dash(&r.carrier)),
        ("arrival_point", arrival_point),
        ("escort_agency", or_dash(&r.escort_agency)),
        ("received_by", or_dash(&r.received_by)),
        ("halt_reason", shown(r.halt_reason())),
    ];
    fields.extend(personal_fields(r.personal_data.as_ref()));
    print_fields(&fields)?;
    let rows = r
        .steps
        .iter()
        .map(|s| {
            vec![
                s.origin_version.to_string(),
                or_dash(&s.step),
                shown(s.status_after()),
                time(s.at.as_ref()),
                or_dash(&s.agency),
            ]
        })
        .collect::<Vec<_>>();
    output::emit("\n")?;
    output::print_table(&["VERSION", "STEP", "STATUS_AFTER", "AT", "AGENCY"], &rows)
}

/// A form of exploitation as on the command line (`labour`), or as sent.
fn form(name: &str) -> String {
    ExploitationForm::from_str_name(name).map_or_else(|| or_dash(name), cli_name)
}

/// Shared fields as on the command line: `profile,needs`.
fn shared(fields: &[i32]) -> String {
    output::list(
        fields
            .iter()
            .filter_map(|f| SharedField::try_from(*f).ok())
            .map(cli_name),
    )
}

/// Arrival needs as on the command line: `medical,shelter`.
fn needs(values: &[i32]) -> String {
    output::list(
        values
            .iter()
            .filter_map(|n| ArrivalNeed::try_from(*n).ok())
            .map(cli_name),
    )
}

async fn list(client: &mut Client, output: Output, args: ReturnListArgs) -> Result<()> {
    let mut request = ListReturnsRequest {
        page_size: args.page_size.unwrap_or(0),
        page_token: args.page_token.unwrap_or_default(),
        status: args.status.map_or(0, Into::into),
        direction: args.direction.map_or(0, Into::into),
    };
    let mut all = ListReturnsResponse::default();
    loop {
        let page = client.list_returns(request.clone()).await?.into_inner();
        all.returns.extend(page.returns);
        all.next_page_token = page.next_page_token;
        if !args.all || all.next_page_token.is_empty() || all.next_page_token == request.page_token {
            break;
        }
        request.page_token.clone_from(&all.next_page_token);
    }
    match output {
        Output::Json => print_json("nrm.repatriation.v1.ListReturnsResponse", &all),
        Output::Text => {
            let rows = all
                .returns
                .iter()
                .map(|r| {
                    vec![
                        r.return_id.clone(),
                        shown(r.direction()),
                        shown(r.status()),
                        format!("{}>{}", or_dash(&r.from_country), or_dash(&r.to_country)),
                        time(r.arrival_at.as_ref()),
                        or_dash(&r.arrival_point),
                        needs(&r.needs),
                        r.version.to_string(),
                    ]
                })
                .collect::<Vec<_>>();
            output::print_table(
                &[
                    "RETURN_ID",
                    "DIRECTION",
                    "STATUS",
                    "FROM>TO",
                    "ARRIVAL_AT",
                    "ARRIVAL_POINT",
                    "NEEDS",
                    "VERSION",
                ],
                &rows,
            )?;
            if !all.next_page_token.is_empty() {
                eprintln!("more returns: --page-token {} (or --all)", all.next_page_token);
            }
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shared_fields_and_needs_print_as_they_are_given() {
        assert_eq!(
            shared(&[SharedField::Profile.into(), SharedField::Risk.into()]),
            "profile,risk"
        );
        assert_eq!(
            needs(&[ArrivalNeed::Shelter.into(), ArrivalNeed::Interpretation.into()]),
            "shelter,interpretation"
        );
        assert_eq!(shared(&[]), "-");
        assert_eq!(form("EXPLOITATION_FORM_FORCED_BEGGING"), "forced-begging");
        assert_eq!(form(""), "-");
    }
}
