//! Runs the `nrmctl` binary against an in-process fake identification
//! service: what reaches the server, what is printed, the exit code.

use std::net::SocketAddr;
use std::process::Output;
use std::sync::{Arc, Mutex};

use nrm_kernel::auth::Authenticator;
use nrm_proto::common::v1::{CommandResult, PersonalDataView, Withheld, personal_data_view};
use nrm_proto::identification::v1::identification_service_server::{
    IdentificationService, IdentificationServiceServer,
};
use nrm_proto::identification::v1::{
    Case, CaseStatus, CaseSummary, CompleteScreeningRequest, DecideIdentificationRequest, ErasePersonalDataRequest,
    ExploitationForm, GetCaseRequest, ListCasesRequest, ListCasesResponse, ReportPresumedVictimRequest,
    ReportPresumedVictimResponse, RequestReviewRequest,
};
use secrecy::SecretString;
use tonic::{Request, Response, Status};
use tonic_types::{ErrorDetails, StatusExt};

const SECRET: &str = "nrmctl-test-secret-nrmctl-test-secret";

/// What the fake saw.
#[derive(Default)]
struct Seen {
    reports: Vec<ReportPresumedVictimRequest>,
    officers: Vec<String>,
    list_tokens: Vec<String>,
}

#[derive(Clone)]
struct Fake {
    seen: Arc<Mutex<Seen>>,
    auth: Authenticator,
}

impl Fake {
    fn caller<T>(&self, request: &Request<T>) -> Result<(), Status> {
        let caller = self
            .auth
            .verify(request.metadata())
            .map_err(|_| Status::unauthenticated("bad token"))?;
        self.seen
            .lock()
            .map_err(|_| Status::internal("poisoned"))?
            .officers
            .push(caller.actor.officer);
        Ok(())
    }
}

#[tonic::async_trait]
impl IdentificationService for Fake {
    async fn report_presumed_victim(
        &self,
        request: Request<ReportPresumedVictimRequest>,
    ) -> Result<Response<ReportPresumedVictimResponse>, Status> {
        self.caller(&request)?;
        let message = request.into_inner();
        self.seen
            .lock()
            .map_err(|_| Status::internal("poisoned"))?
            .reports
            .push(message);
        Ok(Response::new(ReportPresumedVictimResponse {
            case_id: "case-1".into(),
            person_id: "person-1".into(),
            status: CaseStatus::Reported.into(),
            possible_duplicate: true,
            result: Some(CommandResult {
                aggregate_id: "case-1".into(),
                version: 1,
                event_ids: vec!["e-1".into()],
                replayed: false,
            }),
        }))
    }

    async fn complete_screening(
        &self,
        request: Request<CompleteScreeningRequest>,
    ) -> Result<Response<CommandResult>, Status> {
        self.caller(&request)?;
        let mut details = ErrorDetails::new();
        details.add_bad_request_violation("indicators", "name at least one indicator");
        Err(Status::with_error_details(
            tonic::Code::InvalidArgument,
            "the screening is invalid",
            details,
        ))
    }

    async fn decide_identification(
        &self,
        _: Request<DecideIdentificationRequest>,
    ) -> Result<Response<CommandResult>, Status> {
        Err(Status::unimplemented("decide"))
    }

    async fn request_review(&self, _: Request<RequestReviewRequest>) -> Result<Response<CommandResult>, Status> {
        Err(Status::unimplemented("review"))
    }

    async fn erase_personal_data(
        &self,
        _: Request<ErasePersonalDataRequest>,
    ) -> Result<Response<CommandResult>, Status> {
        Err(Status::unimplemented("erase"))
    }

    async fn get_case(&self, request: Request<GetCaseRequest>) -> Result<Response<Case>, Status> {
        self.caller(&request)?;
        Ok(Response::new(Case {
            case_id: request.into_inner().case_id,
            status: CaseStatus::Presumed.into(),
            version: 2,
            exploitation_forms: vec![ExploitationForm::Labour.into(), ExploitationForm::ForcedBegging.into()],
            personal: Some(PersonalDataView {
                view: Some(personal_data_view::View::Withheld(Withheld {
                    reason: "NOT_REQUESTED".into(),
                })),
            }),
            ..Case::default()
        }))
    }

    async fn list_cases(&self, request: Request<ListCasesRequest>) -> Result<Response<ListCasesResponse>, Status> {
        self.caller(&request)?;
        let token = request.into_inner().page_token;
        self.seen
            .lock()
            .map_err(|_| Status::internal("poisoned"))?
            .list_tokens
            .push(token.clone());
        let (ids, next): (&[&str], &str) = match token.as_str() {
            "" => (&["c-1", "c-2"], "p2"),
            "p2" => (&["c-3"], ""),
            _ => return Err(Status::invalid_argument("bad page token")),
        };
        Ok(Response::new(ListCasesResponse {
            cases: ids
                .iter()
                .map(|id| CaseSummary {
                    case_id: (*id).into(),
                    status: CaseStatus::Reported.into(),
                    reporting_agency: "kg-mvd".into(),
                    version: 1,
                    ..CaseSummary::default()
                })
                .collect(),
            next_page_token: next.into(),
        }))
    }
}

async fn start() -> (SocketAddr, Arc<Mutex<Seen>>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("address");
    let seen = Arc::new(Mutex::new(Seen::default()));
    let fake = Fake {
        seen: seen.clone(),
        auth: Authenticator::new(&SecretString::from(SECRET), "kopur"),
    };
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(IdentificationServiceServer::new(fake))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );
    (addr, seen)
}

async fn nrmctl(addr: SocketAddr, args: &[&str]) -> Output {
    let mut command = tokio::process::Command::new(env!("CARGO_BIN_EXE_nrmctl"));
    for var in [
        "NRM_TOKEN",
        "NRM_AGENCY",
        "NRM_ROLE",
        "NRM_OFFICER",
        "NRM_OUTPUT",
        "NRM_AUTH__ISSUER",
    ] {
        command.env_remove(var);
    }
    command
        .env("NRM_ENDPOINT", format!("http://{addr}"))
        .env("NRM_AUTH__JWT_SECRET", SECRET)
        .args(args)
        .output()
        .await
        .expect("nrmctl runs")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

#[tokio::test]
async fn a_report_sends_its_fields_with_a_self_minted_token() {
    let (addr, seen) = start().await;
    let out = nrmctl(
        addr,
        &[
            "case",
            "report",
            "--found-country",
            "KZ",
            "--form",
            "labour,sexual",
            "--control",
            "debt-bondage",
            "--passport",
            "AC1:KG",
            "--age",
            "24",
            "--as-officer",
            "officer-9",
        ],
    )
    .await;
    assert!(out.status.success(), "stderr: {}", text(&out.stderr));
    let stdout = text(&out.stdout);
    assert!(stdout.contains("case_id:"), "{stdout}");
    assert!(stdout.contains("possible_duplicate: true"), "{stdout}");

    let seen = seen.lock().expect("lock");
    let report = &seen.reports[0];
    assert_eq!(report.found_country, "KZ");
    assert_eq!(
        report.exploitation_forms,
        [i32::from(ExploitationForm::Labour), i32::from(ExploitationForm::Sexual)]
    );
    assert_eq!(report.age_years, Some(24));
    assert!(report.found_at.is_some(), "found_at defaults to now");
    let personal = report.personal.as_ref().expect("identifiers");
    assert_eq!(personal.documents[0].number, "AC1");
    let request_id = uuid::Uuid::parse_str(&report.request_id).expect("a UUID");
    assert_eq!(request_id.get_version_num(), 7);
    assert!(stdout.contains(&report.request_id), "the request ID is printed");
    assert_eq!(seen.officers, ["officer-9"]);
}

#[tokio::test]
async fn a_refused_command_prints_the_code_and_field_violations_and_exits_1() {
    let (addr, _) = start().await;
    let out = nrmctl(addr, &["case", "screen", "case-1", "--version", "1"]).await;
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(
        text(&out.stderr),
        "error: INVALID_ARGUMENT: the screening is invalid\n  indicators: name at least one indicator\n"
    );
}

#[tokio::test]
async fn list_all_follows_the_page_tokens_into_one_json_answer() {
    let (addr, seen) = start().await;
    let out = nrmctl(addr, &["case", "list", "--all", "--output", "json"]).await;
    assert!(out.status.success(), "stderr: {}", text(&out.stderr));
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
    let ids: Vec<&str> = json["cases"]
        .as_array()
        .expect("cases")
        .iter()
        .filter_map(|c| c["case_id"].as_str())
        .collect();
    assert_eq!(ids, ["c-1", "c-2", "c-3"]);
    assert_eq!(json["cases"][0]["status"], "CASE_STATUS_REPORTED");
    assert_eq!(seen.lock().expect("lock").list_tokens, ["", "p2"]);
}

#[tokio::test]
async fn a_case_prints_as_one_field_a_line() {
    let (addr, _) = start().await;
    let out = nrmctl(addr, &["case", "get", "case-7"]).await;
    assert!(out.status.success(), "stderr: {}", text(&out.stderr));
    let stdout = text(&out.stdout);
    for line in [
        "case_id:              case-7",
        "status:               presumed",
        "forms:                labour,forced-begging",
        "personal:             withheld (NOT_REQUESTED)",
    ] {
        assert!(stdout.contains(line), "{line:?} missing in\n{stdout}");
    }
}

#[tokio::test]
async fn a_wrong_token_is_refused_by_the_server() {
    let (addr, _) = start().await;
    let out = nrmctl(addr, &["--token", "not-a-jwt", "case", "get", "case-7"]).await;
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(text(&out.stderr), "error: UNAUTHENTICATED: bad token\n");
}
