//! `case …`: the identification service's commands and queries. Each
//! subcommand builds its request from the options, calls, and prints the
//! answer as text or proto3 JSON.

use anyhow::Result;
use nrm_proto::common::v1::{AgeBand, CommandResult, DocumentType, IdentityDocument, PersonalIdentifiers};
use nrm_proto::identification::v1::identification_service_client::IdentificationServiceClient;
use nrm_proto::identification::v1::{
    Case, CompleteScreeningRequest, DecideIdentificationRequest, ErasePersonalDataRequest, ExploitationForm,
    FileAnonymousNotificationRequest, FileAnonymousNotificationResponse, GetCaseRequest, ListCasesRequest,
    ListCasesResponse, ReportPresumedVictimRequest, ReportPresumedVictimResponse, RequestReviewRequest,
};

use crate::cli::{
    CaseCommand, DecideArgs, EraseArgs, GetArgs, Global, ListArgs, NotifyArgs, NumberCountry, Output, ReportArgs,
    ReviewArgs, ScreenArgs,
};
use crate::enums::{cli_name, shown};
use crate::output::{self, or_dash, print_fields, print_json, time};
use crate::person::personal_fields;
use crate::rpc::{self, AuthChannel};

/// The identification client.
type Client = IdentificationServiceClient<AuthChannel>;

/// Runs a `case` subcommand.
///
/// # Errors
/// When the service cannot be reached or refuses the call (a `tonic::Status`
/// in the chain), or the output cannot be printed.
pub async fn run(global: &Global, command: CaseCommand) -> Result<()> {
    let mut client = Client::new(rpc::connect(global, &global.endpoint).await?);
    match command {
        CaseCommand::Report(args) => report(&mut client, global.output, *args).await,
        CaseCommand::Notify(args) => notify(&mut client, global.output, args).await,
        CaseCommand::Screen(args) => screen(&mut client, global.output, args).await,
        CaseCommand::Decide(args) => decide(&mut client, global.output, args).await,
        CaseCommand::Review(args) => review(&mut client, global.output, args).await,
        CaseCommand::Erase(args) => erase(&mut client, global.output, args).await,
        CaseCommand::Get(args) => get(&mut client, global.output, args).await,
        CaseCommand::List(args) => list(&mut client, global.output, args).await,
    }
}

async fn report(client: &mut Client, output: Output, args: ReportArgs) -> Result<()> {
    let request_id = rpc::request_id(args.request, output);
    let documents = documents(DocumentType::Passport, args.passports)
        .chain(documents(DocumentType::NationalId, args.national_ids))
        .chain(args.documents.into_iter().map(|(kind, doc)| document(kind, doc)))
        .collect::<Vec<_>>();
    let personal = PersonalIdentifiers {
        full_name: args.name.unwrap_or_default(),
        date_of_birth: args.dob.unwrap_or_default(),
        documents,
        phone: args.phone.unwrap_or_default(),
        address: args.address.unwrap_or_default(),
    };
    let message = ReportPresumedVictimRequest {
        request_id: request_id.clone(),
        found_at: Some(args.found_at.unwrap_or_else(rpc::now)),
        found_country: args.found_country.unwrap_or_default(),
        found_region: args.found_region.unwrap_or_default(),
        country_of_exploitation: args.exploitation_country.unwrap_or_default(),
        exploitation_forms: args.forms.into_iter().map(Into::into).collect(),
        means_of_control: args.controls.into_iter().map(Into::into).collect(),
        recruitment_method: args.recruitment.map_or(0, Into::into),
        recruiter_relationship: args.recruiter.map_or(0, Into::into),
        child: args.child,
        gender: args.gender.map_or(0, Into::into),
        age_years: args.age,
        age_band: args.age_band.map_or(0, Into::into),
        citizenship: args.citizenship.unwrap_or_default(),
        personal: (personal != PersonalIdentifiers::default()).then_some(personal),
        competent_authority: args.competent_authority.unwrap_or_default(),
    };
    let response = client.report_presumed_victim(message).await?.into_inner();
    match output {
        Output::Json => print_json("nrm.identification.v1.ReportPresumedVictimResponse", &response),
        Output::Text => print_report(&response, &request_id),
    }
}

fn print_report(response: &ReportPresumedVictimResponse, request_id: &str) -> Result<()> {
    rpc::print_created(
        vec![
            ("case_id", response.case_id.clone()),
            ("person_id", response.person_id.clone()),
            ("status", shown(response.status())),
            ("possible_duplicate", response.possible_duplicate.to_string()),
        ],
        response.result.as_ref(),
        request_id,
    )
}

async fn notify(client: &mut Client, output: Output, args: NotifyArgs) -> Result<()> {
    let request_id = rpc::request_id(args.request, output);
    let message = FileAnonymousNotificationRequest {
        request_id: request_id.clone(),
        found_country: args.found_country.unwrap_or_default(),
        country_of_exploitation: args.country_of_exploitation.unwrap_or_default(),
        exploitation_forms: args.forms.into_iter().map(Into::into).collect(),
        gender: args.gender.map_or(0, Into::into),
        age_band: args.age_band.map_or(0, Into::into),
        citizenship: args.citizenship.unwrap_or_default(),
    };
    let response = client.file_anonymous_notification(message).await?.into_inner();
    match output {
        Output::Json => print_json("nrm.identification.v1.FileAnonymousNotificationResponse", &response),
        Output::Text => print_notification(&response, &request_id),
    }
}

fn print_notification(response: &FileAnonymousNotificationResponse, request_id: &str) -> Result<()> {
    rpc::print_created(
        vec![("notification_id", response.notification_id.clone())],
        response.result.as_ref(),
        request_id,
    )
}

fn documents(kind: DocumentType, docs: Vec<NumberCountry>) -> impl Iterator<Item = IdentityDocument> {
    docs.into_iter().map(move |doc| document(kind, doc))
}

fn document(kind: DocumentType, doc: NumberCountry) -> IdentityDocument {
    IdentityDocument {
        r#type: kind.into(),
        number: doc.number,
        issuing_country: doc.country,
    }
}

async fn screen(client: &mut Client, output: Output, args: ScreenArgs) -> Result<()> {
    let request_id = rpc::request_id(args.request, output);
    let request = CompleteScreeningRequest {
        request_id: request_id.clone(),
        case_id: args.at.case_id,
        expected_version: args.at.expected_version,
        indicators: args.indicators.into_iter().map(Into::into).collect(),
    };
    let result = client.complete_screening(request).await?.into_inner();
    print_result(output, &result, &request_id)
}

async fn decide(client: &mut Client, output: Output, args: DecideArgs) -> Result<()> {
    let request_id = rpc::request_id(args.request, output);
    let request = DecideIdentificationRequest {
        request_id: request_id.clone(),
        case_id: args.at.case_id,
        expected_version: args.at.expected_version,
        decision: args.decision.into(),
        reason: args.reason.map_or(0, Into::into),
        non_punishment: args.non_punishment,
        best_interests_assessed: args.best_interests_assessed,
    };
    let result = client.decide_identification(request).await?.into_inner();
    print_result(output, &result, &request_id)
}

async fn review(client: &mut Client, output: Output, args: ReviewArgs) -> Result<()> {
    let request_id = rpc::request_id(args.request, output);
    let request = RequestReviewRequest {
        request_id: request_id.clone(),
        case_id: args.at.case_id,
        expected_version: args.at.expected_version,
        reason: args.reason.into(),
    };
    let result = client.request_review(request).await?.into_inner();
    print_result(output, &result, &request_id)
}

async fn erase(client: &mut Client, output: Output, args: EraseArgs) -> Result<()> {
    let request_id = rpc::request_id(args.request, output);
    let request = ErasePersonalDataRequest {
        request_id: request_id.clone(),
        case_id: args.case_id,
        reason: args.reason.into(),
    };
    let result = client.erase_personal_data(request).await?.into_inner();
    print_result(output, &result, &request_id)
}

/// Prints the answer of a command on a case.
fn print_result(output: Output, result: &CommandResult, request_id: &str) -> Result<()> {
    rpc::print_result(output, result, "case_id", request_id)
}

async fn get(client: &mut Client, output: Output, args: GetArgs) -> Result<()> {
    let request = GetCaseRequest {
        case_id: args.case_id,
        include_personal_data: args.personal,
        purpose: args.purpose.unwrap_or_default(),
        read_purpose: args.read_purpose.map_or(0, Into::into),
    };
    let case = client.get_case(request).await?.into_inner();
    match output {
        Output::Json => print_json("nrm.identification.v1.Case", &case),
        Output::Text => print_case(&case),
    }
}

fn print_case(case: &Case) -> Result<()> {
    let age = match (case.age_years, case.age_band()) {
        (Some(years), AgeBand::Unspecified) => years.to_string(),
        (Some(years), band) => format!("{years} ({})", shown(band)),
        (None, AgeBand::Unspecified) => "-".to_owned(),
        (None, band) => shown(band),
    };
    let mut fields = vec![
        ("case_id", case.case_id.clone()),
        ("person_id", or_dash(&case.person_id)),
        ("status", shown(case.status())),
        ("version", case.version.to_string()),
        ("reporting_agency", or_dash(&case.reporting_agency)),
        ("competent_authority", or_dash(&case.competent_authority)),
        ("reported_at", time(case.reported_at.as_ref())),
        ("found_at", time(case.found_at.as_ref())),
        (
            "found_in",
            format!("{} {}", or_dash(&case.found_country), case.found_region)
                .trim_end()
                .to_owned(),
        ),
        ("exploitation_country", or_dash(&case.country_of_exploitation)),
        ("forms", output::list(case.exploitation_forms().map(cli_name))),
        ("means_of_control", output::list(case.means_of_control().map(cli_name))),
        ("recruitment", shown(case.recruitment_method())),
        ("recruiter", shown(case.recruiter_relationship())),
        ("child", case.child.to_string()),
        ("gender", shown(case.gender())),
        ("age", age),
        ("citizenship", or_dash(&case.citizenship)),
        ("screened", case.screened.to_string()),
        ("indicators", output::list(case.indicators().map(cli_name))),
        ("decision", shown(case.decision())),
    ];
    if case.not_identified_reason != 0 {
        fields.push(("reason", shown(case.not_identified_reason())));
    }
    fields.extend([
        ("non_punishment", case.non_punishment.to_string()),
        ("decided_at", time(case.decided_at.as_ref())),
        ("reflection_ends_at", time(case.reflection_period_ends_at.as_ref())),
        ("possible_duplicate", case.possible_duplicate.to_string()),
        ("under_review", case.under_review.to_string()),
    ]);
    fields.extend(personal_fields(case.personal.as_ref()));
    print_fields(&fields)
}

async fn list(client: &mut Client, output: Output, args: ListArgs) -> Result<()> {
    let mut message = ListCasesRequest {
        page_size: args.page_size.unwrap_or(0),
        page_token: args.page_token.unwrap_or_default(),
        status: args.status.map_or(0, Into::into),
        reporting_agency: args.agency.unwrap_or_default(),
        exploitation_form: args.form.map_or(0, Into::into),
        reported_after: args.after,
        reported_before: args.before,
    };
    let mut all = ListCasesResponse::default();
    loop {
        let page = client.list_cases(message.clone()).await?.into_inner();
        all.cases.extend(page.cases);
        all.next_page_token = page.next_page_token;
        if !args.all || all.next_page_token.is_empty() || all.next_page_token == message.page_token {
            break;
        }
        message.page_token.clone_from(&all.next_page_token);
    }
    match output {
        Output::Json => print_json("nrm.identification.v1.ListCasesResponse", &all),
        Output::Text => {
            let rows = all
                .cases
                .iter()
                .map(|case| {
                    vec![
                        case.case_id.clone(),
                        shown(case.status()),
                        or_dash(&case.reporting_agency),
                        time(case.reported_at.as_ref()),
                        output::list(case.exploitation_forms().map(cli_name::<ExploitationForm>)),
                        case.version.to_string(),
                    ]
                })
                .collect::<Vec<_>>();
            output::print_table(
                &["CASE_ID", "STATUS", "AGENCY", "REPORTED_AT", "FORMS", "VERSION"],
                &rows,
            )?;
            if !all.next_page_token.is_empty() {
                eprintln!("more cases: --page-token {} (or --all)", all.next_page_token);
            }
            Ok(())
        }
    }
}
