//! The identification service over gRPC, against real NATS and PostgreSQL.

#![allow(clippy::unwrap_used)] // Test code: a failed unwrap is a failed test.

use nrm_e2e::ident::{assert_refusal_audited, audit_since, coded_case, erase, read_case, report_for};
use nrm_e2e::{TestApp, authorized, bad_fields, person, report_request, token};
use nrm_kernel::auth::Role;
use nrm_proto::common::v1::personal_data_view::View;
use nrm_proto::identification::v1 as pb;
use prost::Message as _;
use tonic::Code;
use tonic_types::StatusExt as _;

fn police() -> String {
    token("kg-mvd", Role::Police, "officer-17")
}

async fn report(app: &TestApp, request_id: &str) -> pb::ReportPresumedVictimResponse {
    app.client
        .clone()
        .report_presumed_victim(authorized(
            report_request(request_id, person("Aigul Asanova", "AC1234567", "+996 555 000 111")),
            &police(),
        ))
        .await
        .expect("report")
        .into_inner()
}

async fn get(app: &TestApp, case_id: &str, personal: bool) -> Result<pb::Case, tonic::Status> {
    app.client
        .clone()
        .get_case(authorized(
            if personal {
                read_case(case_id, pb::ReadPurpose::CaseReview)
            } else {
                coded_case(case_id)
            },
            &police(),
        ))
        .await
        .map(tonic::Response::into_inner)
}

fn screening(case_id: &str, version: u64) -> pb::CompleteScreeningRequest {
    pb::CompleteScreeningRequest {
        request_id: uuid::Uuid::now_v7().to_string(),
        case_id: case_id.to_owned(),
        expected_version: version,
        indicators: vec![
            pb::Indicator::DocumentsRetained as i32,
            pb::Indicator::WagesWithheld as i32,
        ],
    }
}

fn decision(case_id: &str, version: u64, decision: pb::Decision) -> pb::DecideIdentificationRequest {
    pb::DecideIdentificationRequest {
        request_id: uuid::Uuid::now_v7().to_string(),
        case_id: case_id.to_owned(),
        expected_version: version,
        decision: decision as i32,
        reason: pb::NotIdentifiedReason::InsufficientIndicators as i32,
        non_punishment: decision == pb::Decision::Identified,
        best_interests_assessed: false,
    }
}

#[tokio::test]
async fn a_case_goes_from_report_through_screening_to_identification() {
    let app = TestApp::spawn().await;
    // The police report; the prosecutor is the competent authority deciding.
    let reported = app
        .client
        .clone()
        .report_presumed_victim(authorized(
            report_for(
                "r-1",
                person("Aigul Asanova", "AC1234567", "+996 555 000 111"),
                "kg-prosecutor",
            ),
            &police(),
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(reported.status, pb::CaseStatus::Reported as i32);
    assert!(!reported.possible_duplicate);

    let case = get(&app, &reported.case_id, false).await.unwrap();
    assert_eq!(case.version, 1);
    assert_eq!(case.reporting_agency, "kg-mvd");
    assert_eq!(case.competent_authority, "kg-prosecutor");
    assert!(matches!(case.personal.unwrap().view, Some(View::Withheld(_))));

    let mut client = app.client.clone();
    let screened = client
        .complete_screening(authorized(screening(&reported.case_id, 1), &police()))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(screened.version, 2);
    let decided = client
        .decide_identification(authorized(
            decision(&reported.case_id, 2, pb::Decision::Identified),
            &token("kg-prosecutor", Role::Prosecutor, "prosecutor-3"),
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(decided.version, 3);

    let case = get(&app, &reported.case_id, true).await.unwrap();
    assert_eq!(case.status, pb::CaseStatus::Identified as i32);
    assert!(case.non_punishment);
    let decided_at = case.decided_at.unwrap().seconds;
    assert_eq!(
        case.reflection_period_ends_at.unwrap().seconds,
        decided_at + 30 * 86_400
    );
    let Some(View::Identifiers(identifiers)) = case.personal.unwrap().view else {
        panic!("the reporting agency reads the identifiers");
    };
    assert_eq!(identifiers.full_name, "Aigul Asanova");
    // The read of personal data is in the audit trail, with its purpose's code.
    // It names the person read, so `nrmctl audit person` lists it.
    let audited: Vec<Option<uuid::Uuid>> = sqlx::query_scalar(
        "SELECT person_id FROM audit_log WHERE action = 'ReadPersonalData' AND purpose = 'READ_PURPOSE_CASE_REVIEW' AND officer = 'officer-17'",
    )
    .fetch_all(&app.pool)
    .await
    .unwrap();
    assert_eq!(audited, [Some(reported.person_id.parse().unwrap())]);
    // So do the entries of the commands on the case.
    let commands: Vec<(String, Option<uuid::Uuid>)> = sqlx::query_as(
        "SELECT action, person_id FROM audit_log WHERE subject_id = $1 AND action <> 'ReadPersonalData' ORDER BY id",
    )
    .bind(&reported.case_id)
    .fetch_all(&app.pool)
    .await
    .unwrap();
    assert!(commands.len() >= 3, "{commands:?}");
    assert!(
        commands
            .iter()
            .all(|(_, person)| person.map(|p| p.to_string()).as_deref() == Some(reported.person_id.as_str())),
        "{commands:?}"
    );

    // Every commit reaches NATS once, with the actor and the event types.
    let messages = app.wait_for_messages(3).await;
    assert_eq!(messages.len(), 3);
    let last = nrm_proto::common::v1::EventCommit::decode(messages[2].payload.as_ref()).unwrap();
    assert_eq!(last.events[0].event_type, "IdentificationDecided");
    assert_eq!(
        messages[2].headers.get("Nrm-Actor-Role").unwrap().as_str(),
        "prosecutor"
    );
    app.stop().await;
}

#[tokio::test]
async fn a_child_is_presumed_at_once_and_not_identified_only_after_best_interests() {
    let app = TestApp::spawn().await;
    let mut request = report_request("child-1", person("Child Name", "ID777777", ""));
    request.child = true;
    request.age_years = Some(15);
    let mut client = app.client.clone();
    let reported = client
        .report_presumed_victim(authorized(request, &police()))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(reported.status, pb::CaseStatus::Presumed as i32);
    client
        .complete_screening(authorized(screening(&reported.case_id, 1), &police()))
        .await
        .unwrap();
    let tables = app.tables();
    let before = tables.snapshot().await;
    let refused = client
        .decide_identification(authorized(
            decision(&reported.case_id, 2, pb::Decision::NotIdentified),
            &police(),
        ))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::FailedPrecondition);
    assert_eq!(
        refused.get_details_precondition_failure().unwrap().violations[0].r#type,
        "CHILD_BEST_INTERESTS_ASSESSMENT_REQUIRED"
    );
    assert_refusal_audited(
        &tables,
        &before,
        "DecideIdentification:refused",
        &reported.case_id,
        "a child found not identified without a best-interests assessment",
    )
    .await;
    app.stop().await;
}

#[tokio::test]
async fn invalid_reports_name_every_field_and_write_nothing() {
    let app = TestApp::spawn().await;
    let tables = app.tables();
    let before = tables.snapshot().await;
    let mut request = report_request("", person("Name", "AB12345", "not a phone"));
    request.citizenship = "XX".into();
    request.exploitation_forms = vec![];
    request.found_at = None;
    let status = app
        .client
        .clone()
        .report_presumed_victim(authorized(request, &police()))
        .await
        .unwrap_err();
    assert_eq!(
        bad_fields(&status),
        [
            "request_id",
            "found_at",
            "exploitation_forms",
            "citizenship",
            "personal.phone"
        ]
    );
    tables.assert_unchanged_since(&before, "an invalid report").await;
    app.stop().await;
}

#[tokio::test]
async fn commands_out_of_order_or_on_stale_versions_are_refused_and_write_nothing() {
    let app = TestApp::spawn().await;
    let reported = report(&app, "r-order").await;
    let mut client = app.client.clone();
    let tables = app.tables();
    let before = tables.snapshot().await;

    // Deciding before screening.
    let status = client
        .decide_identification(authorized(
            decision(&reported.case_id, 1, pb::Decision::Identified),
            &police(),
        ))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::FailedPrecondition);
    assert_eq!(
        status.get_details_precondition_failure().unwrap().violations[0].r#type,
        "NOT_SCREENED"
    );
    let before = assert_refusal_audited(
        &tables,
        &before,
        "DecideIdentification:refused",
        &reported.case_id,
        "deciding before screening",
    )
    .await;

    // A stale expected version.
    let status = client
        .complete_screening(authorized(screening(&reported.case_id, 7), &police()))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Aborted);
    tables
        .assert_unchanged_since(&before, "screening at a stale expected version")
        .await;

    // An unknown case.
    let status = client
        .complete_screening(authorized(screening(&uuid::Uuid::now_v7().to_string(), 1), &police()))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::NotFound);
    tables
        .assert_unchanged_since(&before, "screening an unknown case")
        .await;

    // A malformed case ID and a missing version are both named.
    let mut bad = screening("not-a-uuid", 0);
    bad.indicators = vec![0];
    let status = client.complete_screening(authorized(bad, &police())).await.unwrap_err();
    assert_eq!(bad_fields(&status), ["case_id", "expected_version", "indicators[0]"]);
    tables.assert_unchanged_since(&before, "a malformed screening").await;

    // A role that may not screen: refused by the gate, before the case is known.
    let status = client
        .complete_screening(authorized(
            screening(&reported.case_id, 1),
            &token("kg-ngo-sezim", Role::Ngo, "worker-2"),
        ))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied);
    let before = assert_refusal_audited(&tables, &before, "CompleteScreening:denied", "", "screening by an NGO").await;

    // Police of another unit, not holding the case: refused after loading it.
    let status = client
        .complete_screening(authorized(
            screening(&reported.case_id, 1),
            &token("kg-mvd-osh", Role::Police, "officer-3"),
        ))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied);
    let before = assert_refusal_audited(
        &tables,
        &before,
        "CompleteScreening:denied",
        &reported.case_id,
        "screening by police not holding the case",
    )
    .await;

    // Deciding twice.
    client
        .complete_screening(authorized(screening(&reported.case_id, 1), &police()))
        .await
        .unwrap();
    client
        .decide_identification(authorized(
            decision(&reported.case_id, 2, pb::Decision::Identified),
            &police(),
        ))
        .await
        .unwrap();
    let decided = tables.snapshot().await;
    assert_eq!(decided.rows("events"), before.rows("events") + 2);
    let status = client
        .decide_identification(authorized(
            decision(&reported.case_id, 3, pb::Decision::NotIdentified),
            &police(),
        ))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::FailedPrecondition);
    assert_refusal_audited(
        &tables,
        &decided,
        "DecideIdentification:refused",
        &reported.case_id,
        "deciding twice",
    )
    .await;
    app.stop().await;
}

#[tokio::test]
async fn a_retried_command_with_the_same_request_id_appends_nothing() {
    let app = TestApp::spawn().await;
    // One request sent twice (a request built again a second later would
    // carry another `found_at`: another command under the same ID).
    let request = report_request("retry-me", person("Aigul Asanova", "AC1234567", "+996 555 000 111"));
    let send = || {
        let mut client = app.client.clone();
        let request = request.clone();
        async move {
            client
                .report_presumed_victim(authorized(request, &police()))
                .await
                .expect("report")
                .into_inner()
        }
    };
    let first = send().await;
    let tables = app.tables();
    let before = tables.snapshot().await;
    let again = send().await;
    assert_eq!(first.case_id, again.case_id);
    assert!(again.result.unwrap().replayed);
    tables.assert_unchanged_since(&before, "a retried report").await;
    assert_eq!(before.rows("events"), 1);

    // The same ID for a different command is refused.
    let mut other = report_request("retry-me", person("Someone Else", "ZZ99999", ""));
    other.citizenship = "TJ".into();
    let status = app
        .client
        .clone()
        .report_presumed_victim(authorized(other, &police()))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::AlreadyExists);
    tables
        .assert_unchanged_since(&before, "another report under a used request ID")
        .await;

    // Concurrent retries of one screening: one append, one answer.
    let request = screening(&first.case_id, 1);
    let mut tasks = Vec::new();
    for _ in 0..8 {
        let mut client = app.client.clone();
        let request = request.clone();
        tasks.push(tokio::spawn(async move {
            client.complete_screening(authorized(request, &police())).await
        }));
    }
    let mut versions = Vec::new();
    for task in tasks {
        versions.push(task.await.unwrap().expect("every retry succeeds").into_inner().version);
    }
    assert!(versions.iter().all(|v| *v == 2));
    assert_eq!(app.count("events").await, 2);
    app.stop().await;
}

#[tokio::test]
async fn a_second_report_of_the_same_person_is_flagged_to_the_competent_authority_only() {
    let app = TestApp::spawn().await;
    let first = report(&app, "dup-1").await;
    let ngo = token("kg-ngo-sezim", Role::Ngo, "worker-2");
    let coordinator = token("kg-coordinator", Role::Coordinator, "coord-1");
    let ngo_report = |request_id: &str, who: nrm_proto::common::v1::PersonalIdentifiers| {
        let mut client = app.client.clone();
        let request = report_for(request_id, who, "kg-mvd");
        let ngo = ngo.clone();
        async move {
            client
                .report_presumed_victim(authorized(request, &ngo))
                .await
                .unwrap()
                .into_inner()
        }
    };
    // The same person, and someone new: the NGO is told the same of both.
    let second = ngo_report("dup-2", person("ASANOVA  aigul", "ac-1234567", "")).await;
    let fresh = ngo_report("dup-3", person("Nurzhan Nobody", "ZX7654321", "")).await;
    assert_ne!(first.case_id, second.case_id);
    for answer in [&second, &fresh] {
        assert!(!answer.possible_duplicate, "no oracle in the answer");
        assert_eq!(answer.status, pb::CaseStatus::Reported as i32);
        let result = answer.result.clone().unwrap();
        assert_eq!((result.version, result.event_ids.len()), (1, 1));
    }
    let encoded = second.encode_to_vec();
    assert!(!String::from_utf8_lossy(&encoded).contains(&first.case_id));

    // The NGO's own view of its cases: no flag, no matching case, same version.
    let read = |case_id: &str, who: &str| {
        let mut client = app.client.clone();
        let request = coded_case(case_id);
        let who = who.to_owned();
        async move {
            client
                .get_case(authorized(request, &who))
                .await
                .map(tonic::Response::into_inner)
        }
    };
    for case_id in [&second.case_id, &fresh.case_id] {
        let case = read(case_id, &ngo).await.unwrap();
        assert!(!case.possible_duplicate);
        assert!(case.matching_case_ids.is_empty());
        assert_eq!(case.version, 1);
        assert_eq!(case.competent_authority, "kg-mvd");
    }
    // The competent authority and the coordinator see the flag and the match.
    for who in [police(), coordinator.clone()] {
        let case = read(&second.case_id, &who).await.unwrap();
        assert!(case.possible_duplicate);
        assert_eq!(case.matching_case_ids, std::slice::from_ref(&first.case_id));
        assert!(!read(&fresh.case_id, &who).await.unwrap().possible_duplicate);
    }
    // The same in the list (a projection: wait for it).
    let list = |who: &str| {
        let mut client = app.client.clone();
        let who = who.to_owned();
        async move {
            client
                .list_cases(authorized(pb::ListCasesRequest::default(), &who))
                .await
                .unwrap()
                .into_inner()
                .cases
        }
    };
    for _ in 0..200 {
        if list(&coordinator).await.len() == 3 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(25)).await;
    }
    let ngo_list = list(&ngo).await;
    assert_eq!(ngo_list.len(), 2, "the NGO lists the cases it reported");
    assert!(
        ngo_list
            .iter()
            .all(|c| !c.possible_duplicate && c.matching_case_ids.is_empty())
    );
    for who in [police(), coordinator.clone()] {
        let cases = list(&who).await;
        let flagged: Vec<_> = cases.iter().filter(|c| c.possible_duplicate).collect();
        assert_eq!(flagged.len(), 1, "{cases:?}");
        assert_eq!(flagged[0].case_id, second.case_id);
        assert_eq!(flagged[0].matching_case_ids, std::slice::from_ref(&first.case_id));
    }

    // Police reporting the person again are their own competent authority:
    // as the reporter, they are not told of the earlier report; the
    // coordinator is.
    let again = app
        .client
        .clone()
        .report_presumed_victim(authorized(
            report_request("dup-4", person("Aigul Asanova", "AC1234567", "")),
            &police(),
        ))
        .await
        .unwrap()
        .into_inner();
    assert!(!again.possible_duplicate);
    let case = read(&again.case_id, &police()).await.unwrap();
    assert_eq!(case.competent_authority, "kg-mvd");
    assert!(
        !case.possible_duplicate,
        "no oracle for a reporter that is its own authority"
    );
    assert!(case.matching_case_ids.is_empty());
    let case = read(&again.case_id, &coordinator).await.unwrap();
    assert!(case.possible_duplicate);
    assert!(case.matching_case_ids.contains(&first.case_id), "{case:?}");
    for _ in 0..200 {
        if list(&coordinator).await.len() == 4 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(25)).await;
    }
    let own = list(&police()).await;
    let own = own.iter().find(|c| c.case_id == again.case_id).unwrap();
    assert!(!own.possible_duplicate && own.matching_case_ids.is_empty());

    // The NGO cannot read the police's case: refused and audited, with the case ID only.
    let tables = app.tables();
    let before = tables.snapshot().await;
    let status = read(&first.case_id, &ngo).await.unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied);
    assert!(!status.message().contains("kg-mvd"), "{status:?}");
    assert_refusal_audited(
        &tables,
        &before,
        "GetCase:denied",
        &first.case_id,
        "the NGO's refused read of the police's case",
    )
    .await;
    app.stop().await;
}

#[tokio::test]
async fn every_case_has_a_competent_authority_which_holds_it() {
    let app = TestApp::spawn().await;
    let mut client = app.client.clone();
    let ngo = token("kg-ngo-sezim", Role::Ngo, "worker-2");
    // An NGO must name it; police default to their own agency.
    let status = client
        .report_presumed_victim(authorized(report_request("ca-1", person("Name", "AB12345", "")), &ngo))
        .await
        .unwrap_err();
    assert_eq!(bad_fields(&status), ["competent_authority"]);
    let status = client
        .report_presumed_victim(authorized(
            report_for("ca-1", person("Name", "AB12345", ""), "not an agency!"),
            &ngo,
        ))
        .await
        .unwrap_err();
    assert_eq!(bad_fields(&status), ["competent_authority"]);
    // Nor name itself: it would be told of duplicates of its own report.
    let status = client
        .report_presumed_victim(authorized(
            report_for("ca-1", person("Name", "AB12345", ""), "kg-ngo-sezim"),
            &ngo,
        ))
        .await
        .unwrap_err();
    assert_eq!(bad_fields(&status), ["competent_authority"]);
    let violation = &status.get_details_bad_request().unwrap().field_violations[0];
    assert!(violation.description.contains("reporting agency"), "{violation:?}");
    let reported = client
        .report_presumed_victim(authorized(
            report_for("ca-2", person("Name", "AB12345", ""), "kg-mvd-osh"),
            &ngo,
        ))
        .await
        .unwrap()
        .into_inner();
    let own = report(&app, "ca-3").await;
    assert_eq!(
        get(&app, &own.case_id, false).await.unwrap().competent_authority,
        "kg-mvd"
    );

    // The competent authority holds the case: it screens it and reads the identifiers.
    let osh = token("kg-mvd-osh", Role::Police, "officer-5");
    client
        .complete_screening(authorized(screening(&reported.case_id, 1), &osh))
        .await
        .unwrap();
    let case = client
        .get_case(authorized(
            read_case(&reported.case_id, pb::ReadPurpose::CriminalProceedings),
            &osh,
        ))
        .await
        .unwrap()
        .into_inner();
    assert!(matches!(case.personal.unwrap().view, Some(View::Identifiers(_))));

    // Police outside the case get the coded case, never the identifiers.
    let coded = get(&app, &reported.case_id, false).await.unwrap();
    assert_eq!(coded.status, pb::CaseStatus::Presumed as i32);
    assert!(matches!(coded.personal.unwrap().view, Some(View::Withheld(_))));
    let tables = app.tables();
    let before = tables.snapshot().await;
    let status = get(&app, &reported.case_id, true).await.unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied);
    let before = assert_refusal_audited(
        &tables,
        &before,
        "GetCase:denied",
        &reported.case_id,
        "identifiers read by police outside the case",
    )
    .await;

    // The coordinator reads identifiers only for a purpose from the fixed list.
    let coordinator = token("kg-coordinator", Role::Coordinator, "coord-1");
    let mut free_text = read_case(&reported.case_id, pb::ReadPurpose::Unspecified);
    free_text.purpose = "just looking".into();
    let status = client.get_case(authorized(free_text, &coordinator)).await.unwrap_err();
    assert_eq!(bad_fields(&status), ["read_purpose"]);
    tables
        .assert_unchanged_since(&before, "a coordinator's read without a coded purpose")
        .await;
    client
        .get_case(authorized(
            read_case(&reported.case_id, pb::ReadPurpose::Oversight),
            &coordinator,
        ))
        .await
        .unwrap();
    // Free text is never recorded; the code is.
    let mut texted = read_case(&reported.case_id, pb::ReadPurpose::Unspecified);
    texted.purpose = "Aigul told me to".into();
    client.get_case(authorized(texted, &osh)).await.unwrap();
    let entries = audit_since(&app.pool, &before).await;
    let purposes: Vec<&str> = entries
        .iter()
        .filter(|(action, _, _)| action == "ReadPersonalData")
        .map(|(_, _, purpose)| purpose.as_str())
        .collect();
    assert_eq!(purposes, ["READ_PURPOSE_OVERSIGHT", "READ_PURPOSE_NOT_CODED"]);

    // An NGO holding the case reads all identifiers through GetPersonalData.
    let personal = client
        .get_personal_data(authorized(
            pb::GetPersonalDataRequest {
                person_id: reported.person_id.clone(),
                read_purpose: pb::ReadPurpose::VictimProtection as i32,
                ..Default::default()
            },
            &ngo,
        ))
        .await
        .unwrap()
        .into_inner();
    let Some(View::Identifiers(identifiers)) = personal.personal.unwrap().view else {
        panic!("identifiers");
    };
    assert_eq!(identifiers.documents[0].number, "AB12345");
    // An unknown person looks as another agency's: refused, not "not found".
    let status = client
        .get_personal_data(authorized(
            pb::GetPersonalDataRequest {
                person_id: uuid::Uuid::now_v7().to_string(),
                read_purpose: pb::ReadPurpose::VictimProtection as i32,
                ..Default::default()
            },
            &ngo,
        ))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied);
    app.stop().await;
}

#[tokio::test]
async fn callers_without_a_valid_token_or_role_are_refused() {
    let app = TestApp::spawn().await;
    let tables = app.tables();
    let before = tables.snapshot().await;
    let request = report_request("auth-1", person("Name", "AB12345", ""));
    let mut client = app.client.clone();
    let status = client
        .report_presumed_victim(tonic::Request::new(request.clone()))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated);
    let before = assert_refusal_audited(
        &tables,
        &before,
        "ReportPresumedVictim:unauthenticated",
        "",
        "a report without a token",
    )
    .await;
    let status = client
        .report_presumed_victim(authorized(request.clone(), "not.a.jwt"))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated);
    let before = assert_refusal_audited(
        &tables,
        &before,
        "ReportPresumedVictim:unauthenticated",
        "",
        "a report with a bad token",
    )
    .await;
    let status = client
        .report_presumed_victim(authorized(request, &token("kg-moh", Role::Moh, "doctor-1")))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied);
    assert_refusal_audited(&tables, &before, "ReportPresumedVictim:denied", "", "a report by MoH").await;
    app.stop().await;
}

#[tokio::test]
async fn cases_are_listed_with_filters_and_pages() {
    let app = TestApp::spawn().await;
    let mut ids = Vec::new();
    for i in 0..5 {
        ids.push(report(&app, &format!("list-{i}")).await.case_id);
    }
    let mut client = app.client.clone();
    client
        .complete_screening(authorized(screening(&ids[0], 1), &police()))
        .await
        .unwrap();
    // The list is a projection: wait until it caught up.
    let coordinator = token("kg-coordinator", Role::Coordinator, "coord-1");
    let list = |status: i32, page_size: i32, page_token: String| pb::ListCasesRequest {
        page_size,
        page_token,
        status,
        ..Default::default()
    };
    for _ in 0..100 {
        let presumed = client
            .list_cases(authorized(
                list(pb::CaseStatus::Presumed as i32, 10, String::new()),
                &coordinator,
            ))
            .await
            .unwrap()
            .into_inner();
        if presumed.cases.len() == 1 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    let presumed = client
        .list_cases(authorized(
            list(pb::CaseStatus::Presumed as i32, 10, String::new()),
            &coordinator,
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(presumed.cases.len(), 1);
    assert_eq!(presumed.cases[0].case_id, ids[0]);

    let mut seen = Vec::new();
    let mut page_token = String::new();
    let mut pages = 0;
    loop {
        let page = client
            .list_cases(authorized(list(0, 2, page_token.clone()), &coordinator))
            .await
            .unwrap()
            .into_inner();
        pages += 1;
        seen.extend(page.cases.into_iter().map(|c| c.case_id));
        if page.next_page_token.is_empty() {
            break;
        }
        page_token = page.next_page_token;
    }
    assert_eq!(pages, 3);
    ids.reverse();
    assert_eq!(seen, ids, "newest first, each case once");

    // A token used with other filters is refused, naming the field.
    let first = client
        .list_cases(authorized(list(0, 2, String::new()), &coordinator))
        .await
        .unwrap()
        .into_inner();
    let status = client
        .list_cases(authorized(
            list(pb::CaseStatus::Reported as i32, 2, first.next_page_token),
            &coordinator,
        ))
        .await
        .unwrap_err();
    assert_eq!(bad_fields(&status), ["page_token"]);

    // Without a permit for any case, an agency lists only the cases it holds.
    for who in [
        token("kg-ngo-sezim", Role::Ngo, "worker-2"),
        token("kg-mvd-osh", Role::Police, "officer-5"),
    ] {
        let own = client
            .list_cases(authorized(list(0, 50, String::new()), &who))
            .await
            .unwrap()
            .into_inner();
        assert!(own.cases.is_empty());
    }
    let own = client
        .list_cases(authorized(list(0, 50, String::new()), &police()))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(own.cases.len(), 5);
    app.stop().await;
}

#[tokio::test]
async fn the_trace_context_of_a_call_travels_with_its_event() {
    let app = TestApp::spawn().await;
    let trace_id = "4bf92f3577b34da6a3ce929d0e0e4736";
    let mut request = authorized(report_request("trace-1", person("Name", "AB12345", "")), &police());
    request.metadata_mut().insert(
        "traceparent",
        format!("00-{trace_id}-00f067aa0ba902b7-01").parse().unwrap(),
    );
    app.client.clone().report_presumed_victim(request).await.unwrap();
    let messages = app.wait_for_messages(1).await;
    let traceparent = messages[0]
        .headers
        .get("traceparent")
        .expect("traceparent header")
        .as_str();
    assert!(traceparent.contains(trace_id), "{traceparent}");
    app.stop().await;
}

#[tokio::test]
async fn health_is_serving_while_the_store_and_the_bus_answer() {
    let app = TestApp::spawn().await;
    let mut status = 0;
    for _ in 0..50 {
        status = nrm_e2e::health(&app.endpoint, nrm_identification::startup::SERVICE_NAME).await;
        if status == tonic_health::ServingStatus::Serving as i32 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert_eq!(
        status,
        tonic_health::pb::health_check_response::ServingStatus::Serving as i32
    );
    app.stop().await;
}

#[tokio::test]
async fn reflection_lists_the_service_for_grpcurl() {
    use tonic_reflection::pb::v1::ServerReflectionRequest;
    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;

    let app = TestApp::spawn().await;
    let channel = tonic::transport::Channel::from_shared(app.endpoint.clone())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut client = ServerReflectionClient::new(channel);
    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut responses = client
        .server_reflection_info(futures::stream::iter([request]))
        .await
        .unwrap()
        .into_inner();
    let response = responses.message().await.unwrap().expect("a response");
    let Some(MessageResponse::ListServicesResponse(list)) = response.message_response else {
        panic!("a list of services");
    };
    let names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
    assert!(
        names.contains(&"nrm.identification.v1.IdentificationService".to_owned()),
        "{names:?}"
    );
    assert!(names.contains(&"grpc.health.v1.Health".to_owned()), "{names:?}");
    app.stop().await;
}

/// Publishes referral-service events on the test's subjects, as the referral
/// service would: a kernel event store and relay on a scratch database.
struct ReferralEvents {
    settings: nrm_identification::config::Settings,
    store: nrm_kernel::store::EventStore,
    relay: nrm_kernel::relay::Relay,
    bus: nrm_kernel::bus::Bus,
}

impl ReferralEvents {
    async fn new(app: &TestApp) -> Self {
        let mut settings = app.settings.clone();
        settings.database.name = format!("{}_referral", settings.database.name);
        let pool = nrm_kernel::db::connect_and_migrate(&settings.database, &nrm_identification::startup::MIGRATIONS)
            .await
            .unwrap();
        let bus = nrm_kernel::bus::Bus::connect(&settings.nats).await.unwrap();
        bus.ensure_stream("referral").await.unwrap();
        let store = nrm_kernel::store::EventStore::new(pool.clone());
        let relay = nrm_kernel::relay::Relay::new(
            pool,
            bus.clone(),
            "referral",
            store.appended_signal(),
            nrm_kernel::relay::RelayConfig::new("nrm.referral.v1.ReferralEvent"),
        );
        Self {
            settings,
            store,
            relay,
            bus,
        }
    }

    async fn publish(&mut self, stream_id: &str, events: Vec<nrm_proto::referral::v1::referral_event::Event>) {
        let new_events: Vec<nrm_kernel::store::NewEvent> = events
            .into_iter()
            .map(|event| nrm_kernel::store::NewEvent {
                event_type: "ReferralEvent".into(),
                schema_version: 1,
                payload: nrm_proto::referral::v1::ReferralEvent { event: Some(event) }.encode_to_vec(),
            })
            .collect();
        let version = self.store.read_stream(stream_id).await.unwrap().len() as u64;
        let metadata = nrm_kernel::store::EventMetadata {
            correlation_id: uuid::Uuid::now_v7(),
            causation_id: uuid::Uuid::now_v7(),
            actor: nrm_kernel::store::Actor {
                agency: "kg-mvd".into(),
                role: "police".into(),
                officer: "officer-17".into(),
            },
            traceparent: None,
            tracestate: None,
        };
        let mut uow = self.store.begin().await.unwrap();
        uow.append(
            stream_id,
            version,
            &new_events,
            &metadata,
            &self.bus.subject("referral", "referral", stream_id),
        )
        .await
        .unwrap();
        uow.commit().await.unwrap();
        while self.relay.publish_round().await.unwrap() == 0 {
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    }

    async fn drop_all(self) {
        self.store.pool().close().await;
        let _ = self
            .bus
            .jetstream()
            .delete_stream(self.bus.stream_name("referral"))
            .await;
        let _ = nrm_kernel::db::drop_database(&self.settings.database).await;
    }
}

#[tokio::test]
async fn an_agency_reads_only_consented_identifiers_after_accepting_and_not_after_withdrawal() {
    use nrm_proto::referral::v1 as rf;
    use rf::referral_event::Event as R;

    let app = TestApp::spawn().await;
    let reported = report(&app, "grant-1").await;
    let msd = token("kg-msd", Role::Msd, "social-worker-4");
    let read = |purpose: &str| pb::GetPersonalDataRequest {
        person_id: reported.person_id.clone(),
        purpose: purpose.to_owned(),
        read_purpose: pb::ReadPurpose::VictimProtection as i32,
    };
    let mut client = app.client.clone();
    // Without a referral: nothing, and a refused read is no read in the audit trail.
    let tables = app.tables();
    let before = tables.snapshot().await;
    let status = client
        .get_personal_data(authorized(read("rehabilitation"), &msd))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied);
    assert_refusal_audited(
        &tables,
        &before,
        "GetPersonalData:denied",
        &reported.person_id,
        "MSD's refused read without a referral",
    )
    .await;

    let mut events = ReferralEvents::new(&app).await;
    let consent_id = uuid::Uuid::now_v7().to_string();
    let referral_id = uuid::Uuid::now_v7().to_string();
    events
        .publish(
            &format!("consent-{consent_id}"),
            vec![R::ConsentRecorded(rf::ConsentRecorded {
                consent_id: consent_id.clone(),
                person_id: reported.person_id.clone(),
                recipient_agency: "kg-msd".into(),
                purposes: vec![rf::ServiceKind::Shelter as i32],
                data_categories: vec![rf::DataCategory::Name as i32, rf::DataCategory::Phone as i32],
                ..Default::default()
            })],
        )
        .await;
    events
        .publish(
            &format!("referral-{referral_id}"),
            vec![
                R::ReferralCreated(rf::ReferralCreated {
                    referral_id: referral_id.clone(),
                    person_id: reported.person_id.clone(),
                    receiving_agency: "kg-msd".into(),
                    consent_id: consent_id.clone(),
                    ..Default::default()
                }),
                R::ReferralAccepted(rf::ReferralAccepted {
                    referral_id: referral_id.clone(),
                    person_id: reported.person_id.clone(),
                    receiving_agency: "kg-msd".into(),
                    ..Default::default()
                }),
            ],
        )
        .await;

    // The grant arrives through NATS: wait for it.
    let mut granted = None;
    for _ in 0..200 {
        match client.get_personal_data(authorized(read("rehabilitation"), &msd)).await {
            Ok(response) => {
                granted = Some(response.into_inner());
                break;
            }
            Err(_) => tokio::time::sleep(std::time::Duration::from_millis(25)).await,
        }
    }
    let granted = granted.expect("MSD may read after accepting under consent");
    let Some(View::Identifiers(identifiers)) = granted.personal.unwrap().view else {
        panic!("identifiers");
    };
    assert_eq!(identifiers.full_name, "Aigul Asanova");
    assert_eq!(identifiers.phone, "+996 555 000 111");
    assert!(
        identifiers.documents.is_empty(),
        "documents are not covered by the consent"
    );
    assert!(
        identifiers.address.is_empty(),
        "the address is not covered by the consent"
    );
    assert_eq!(granted.consent_id, consent_id);
    let audited: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM audit_log WHERE action = 'ReadPersonalData' AND agency = 'kg-msd' AND purpose = 'READ_PURPOSE_VICTIM_PROTECTION'",
    )
    .fetch_one(&app.pool)
    .await
    .unwrap();
    assert_eq!(audited, 1);
    // MoH, without a referral, still cannot.
    let before = tables.snapshot().await;
    let status = client
        .get_personal_data(authorized(read("treatment"), &token("kg-moh", Role::Moh, "doctor-1")))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied);
    assert_refusal_audited(
        &tables,
        &before,
        "GetPersonalData:denied",
        &reported.person_id,
        "MoH's refused read without a referral",
    )
    .await;

    // The person withdraws consent: MSD can no longer read.
    events
        .publish(
            &format!("consent-{consent_id}"),
            vec![R::ConsentWithdrawn(rf::ConsentWithdrawn {
                consent_id: consent_id.clone(),
                person_id: reported.person_id.clone(),
                recipient_agency: "kg-msd".into(),
                ..Default::default()
            })],
        )
        .await;
    let mut denied = false;
    for _ in 0..200 {
        if let Err(status) = client.get_personal_data(authorized(read("rehabilitation"), &msd)).await {
            assert_eq!(status.code(), Code::PermissionDenied);
            denied = true;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(25)).await;
    }
    assert!(denied, "withdrawal removes the data from MSD's view");
    events.drop_all().await;
    app.stop().await;
}

/// Whose view of `case_id`'s identifiers: identifiers, erased or withheld.
async fn identifiers_of(app: &TestApp, case_id: &str, who: &str) -> pb::Case {
    app.client
        .clone()
        .get_case(authorized(read_case(case_id, pb::ReadPurpose::DataSubjectRequest), who))
        .await
        .unwrap()
        .into_inner()
}

#[tokio::test]
// Beside `erasure.rs`, whose test is its process's only telemetry subscriber.
async fn an_erasure_takes_the_cases_the_caller_holds_and_asks_for_the_others() {
    let app = TestApp::spawn().await;
    let mut client = app.client.clone();
    let police = token("kg-mvd", Role::Police, "officer-9");
    let ngo = token("kg-ngo-sezim", Role::Ngo, "worker-2");
    let coordinator = token("kg-coordinator", Role::Coordinator, "coord-1");
    let who = || person("Aida Twicereported", "TW1234567", "+996 555 303 404");

    // The police's case, and the NGO's of the same person (another police
    // unit is its competent authority): neither holds the other's.
    let held_by_police = client
        .report_presumed_victim(authorized(report_request("tw-1", who()), &police))
        .await
        .unwrap()
        .into_inner();
    let held_by_ngo = client
        .report_presumed_victim(authorized(report_for("tw-2", who(), "kg-mvd-osh"), &ngo))
        .await
        .unwrap()
        .into_inner();
    let tables = app.tables();
    let before = tables.snapshot().await;

    // The NGO erases: its case goes; the police's is not its to erase and
    // gets a request instead, and the answer tells nothing of it.
    let erased = client
        .erase_personal_data(authorized(
            erase("tw-3", &held_by_ngo.case_id, pb::ErasureReason::DataSubjectRequest),
            &ngo,
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(erased.aggregate_id, held_by_ngo.case_id);
    assert_eq!((erased.version, erased.event_ids.len()), (2, 1));
    assert!(matches!(
        identifiers_of(&app, &held_by_ngo.case_id, &ngo)
            .await
            .personal
            .and_then(|p| p.view),
        Some(View::Erased(_))
    ));
    let police_case = identifiers_of(&app, &held_by_police.case_id, &police).await;
    assert!(matches!(
        police_case.personal.and_then(|p| p.view),
        Some(View::Identifiers(_))
    ));
    assert!(police_case.erasure_requested, "the police see the request");
    assert_eq!(police_case.version, 1, "nothing appended on the police's case");
    let audited = audit_since(&app.pool, &before).await;
    assert_eq!(
        audited
            .first()
            .map(|(action, subject, purpose)| (action.as_str(), subject.as_str(), purpose.as_str())),
        Some((
            "ErasePersonalData",
            held_by_ngo.case_id.as_str(),
            "ERASURE_REASON_DATA_SUBJECT_REQUEST"
        ))
    );
    assert!(
        !audited
            .iter()
            .any(|(action, _, _)| action == "ErasePersonalData:linked"),
        "{audited:?}"
    );
    // The erasure's entry names the person erased.
    let named: Option<uuid::Uuid> =
        sqlx::query_scalar("SELECT person_id FROM audit_log WHERE action = 'ErasePersonalData' AND subject_id = $1")
            .bind(&held_by_ngo.case_id)
            .fetch_one(&app.pool)
            .await
            .unwrap();
    assert_eq!(named, Some(held_by_ngo.person_id.parse().unwrap()));
    // The coordinator sees the request, in the case and in the list; an
    // agency outside the case does not.
    assert!(
        client
            .get_case(authorized(coded_case(&held_by_police.case_id), &coordinator))
            .await
            .unwrap()
            .into_inner()
            .erasure_requested
    );
    assert!(
        !client
            .get_case(authorized(
                coded_case(&held_by_police.case_id),
                &token("kg-mvd-osh", Role::Police, "officer-3")
            ))
            .await
            .unwrap()
            .into_inner()
            .erasure_requested
    );
    let mut listed = Vec::new();
    for _ in 0..200 {
        listed = client
            .list_cases(authorized(pb::ListCasesRequest::default(), &coordinator))
            .await
            .unwrap()
            .into_inner()
            .cases;
        if listed.len() == 2 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(25)).await;
    }
    let requested: Vec<&str> = listed
        .iter()
        .filter(|c| c.erasure_requested)
        .map(|c| c.case_id.as_str())
        .collect();
    assert_eq!(requested, [held_by_police.case_id.as_str()]);

    // The police meet the request: the case is erased, the request gone.
    client
        .erase_personal_data(authorized(
            erase("tw-4", &held_by_police.case_id, pb::ErasureReason::DataSubjectRequest),
            &police,
        ))
        .await
        .unwrap();
    let police_case = identifiers_of(&app, &held_by_police.case_id, &police).await;
    assert!(matches!(
        police_case.personal.and_then(|p| p.view),
        Some(View::Erased(_))
    ));
    assert!(!police_case.erasure_requested);

    // The coordinator's erasure takes every case of the person at once.
    let first = client
        .report_presumed_victim(authorized(
            report_request("tw-5", person("Bakyt Alsoreported", "BA7654321", "")),
            &police,
        ))
        .await
        .unwrap()
        .into_inner();
    let second = client
        .report_presumed_victim(authorized(
            report_for("tw-6", person("Bakyt Alsoreported", "BA7654321", ""), "kg-mvd-osh"),
            &ngo,
        ))
        .await
        .unwrap()
        .into_inner();
    let before = tables.snapshot().await;
    client
        .erase_personal_data(authorized(
            erase("tw-7", &second.case_id, pb::ErasureReason::RetentionExpired),
            &coordinator,
        ))
        .await
        .unwrap();
    for (case_id, who) in [(&first.case_id, &police), (&second.case_id, &ngo)] {
        let case = identifiers_of(&app, case_id, who).await;
        assert!(matches!(case.personal.and_then(|p| p.view), Some(View::Erased(_))));
        assert!(!case.erasure_requested);
    }
    let audited = audit_since(&app.pool, &before).await;
    let code = "ERASURE_REASON_RETENTION_EXPIRED".to_owned();
    assert_eq!(
        audited,
        [
            ("ErasePersonalData".to_owned(), second.case_id.clone(), code.clone()),
            ("ErasePersonalData:linked".to_owned(), first.case_id.clone(), code),
        ]
    );
    app.stop().await;
}
