//! Personal data never appear in logs, spans, metrics, error messages, NATS
//! messages or stored events; after erasure a read says so.
//!
//! This file is its own test process so that it can capture every log line
//! and span of the service at debug level (one capture for all its tests).
//!
//! A canary pasted into any ID or code field of any identification RPC
//! (request, case, person and agency IDs, country and region codes, page
//! tokens, purposes; anonymous notifications' too), by callers of every standing, reaches no log line, no
//! span and no error message on any error path the sweep reaches.

#![allow(clippy::unwrap_used)] // Test code: a failed unwrap is a failed test.

use nrm_e2e::canary::{Answers, NAME, PASSPORT, capture, identifiers as canary, leaks, values};
use nrm_e2e::ident::{erase, report_for};
use nrm_e2e::{TestApp, authorized, report_request, token};
use nrm_kernel::auth::Role;
use nrm_proto::common::v1 as common;
use nrm_proto::common::v1::personal_data_view::View;
use nrm_proto::identification::v1 as pb;

#[tokio::test]
async fn canary_identifiers_appear_nowhere_but_in_an_authorised_read_and_are_gone_after_erasure() {
    let capture = capture();
    let app = TestApp::spawn().await;
    let police = token("kg-mvd", Role::Police, "officer-9");
    let mut client = app.client.clone();

    let reported = client
        .report_presumed_victim(authorized(report_request("pii-1", canary()), &police))
        .await
        .unwrap()
        .into_inner();

    // An invalid request carrying the canaries: its error names fields, never
    // values, and it writes nothing (no sealed copy, no key, no match keys).
    let tables = app.tables();
    let before = tables.snapshot().await;
    let mut invalid = report_request("pii-2", canary());
    invalid.citizenship = PASSPORT.into();
    invalid.found_region = NAME.into();
    let status = client
        .report_presumed_victim(authorized(invalid, &police))
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::InvalidArgument);
    assert!(leaks(status.message().as_bytes()).is_empty(), "error message leaks");
    assert!(leaks(status.details()).is_empty(), "error details leak");
    tables
        .assert_unchanged_since(&before, "an invalid report carrying the canaries")
        .await;

    client
        .complete_screening(authorized(
            pb::CompleteScreeningRequest {
                request_id: "pii-3".into(),
                case_id: reported.case_id.clone(),
                expected_version: 1,
                indicators: vec![pb::Indicator::DocumentsRetained as i32],
            },
            &police,
        ))
        .await
        .unwrap();
    let read = |personal: bool| pb::GetCaseRequest {
        case_id: reported.case_id.clone(),
        include_personal_data: personal,
        read_purpose: pb::ReadPurpose::CaseReview as i32,
        ..Default::default()
    };
    let case = client
        .get_case(authorized(read(true), &police))
        .await
        .unwrap()
        .into_inner();
    let Some(View::Identifiers(identifiers)) = case.personal.and_then(|p| p.view) else {
        panic!("the reporting agency reads the identifiers");
    };
    assert_eq!(identifiers.full_name, NAME);

    // NATS: bodies and headers.
    let messages = app.wait_for_messages(2).await;
    for message in &messages {
        assert!(leaks(&message.payload).is_empty(), "a NATS body leaks");
        assert!(
            leaks(format!("{:?}", message.headers).as_bytes()).is_empty(),
            "a NATS header leaks"
        );
    }
    // The event store holds sealed data only.
    let payloads: Vec<Vec<u8>> = sqlx::query_scalar("SELECT payload FROM events")
        .fetch_all(&app.pool)
        .await
        .unwrap();
    assert!(payloads.iter().all(|p| leaks(p).is_empty()), "a stored event leaks");
    let metadata: Vec<String> = sqlx::query_scalar("SELECT metadata::text FROM events")
        .fetch_all(&app.pool)
        .await
        .unwrap();
    assert!(
        metadata.iter().all(|m| leaks(m.as_bytes()).is_empty()),
        "event metadata leaks"
    );
    // Metrics.
    let metrics = nrm_e2e::canary::get(&app.metrics_url).await;
    assert!(metrics.contains("nrm_store_append_seconds"), "metrics are served");
    assert!(leaks(metrics.as_bytes()).is_empty(), "metrics leak");

    // Erasure: the key goes, every copy becomes unreadable.
    client
        .erase_personal_data(authorized(
            pb::ErasePersonalDataRequest {
                request_id: "pii-4".into(),
                case_id: reported.case_id.clone(),
                reason: pb::ErasureReason::DataSubjectRequest as i32,
            },
            &token("kg-coordinator", Role::Coordinator, "coord-1"),
        ))
        .await
        .unwrap();
    let case = client
        .get_case(authorized(read(true), &police))
        .await
        .unwrap()
        .into_inner();
    assert!(matches!(case.personal.and_then(|p| p.view), Some(View::Erased(_))));
    assert_eq!(app.count("person_keys").await, 0);

    // Logs and spans (span fields are logged when spans close), at debug level.
    let logs = capture.logs();
    let text = String::from_utf8_lossy(&logs);
    assert!(text.contains(&reported.case_id), "the capture saw the service's spans");
    assert!(text.contains("\"span\""), "span fields are in the capture");
    assert_eq!(leaks(&logs), Vec::<&str>::new(), "logs or spans leak");
    app.stop().await;
}

#[tokio::test]
async fn a_canary_in_any_id_or_code_field_of_any_rpc_reaches_no_log_span_or_error() {
    let capture = capture();
    let app = TestApp::spawn().await;
    let mut client = app.client.clone();
    let police = token("kg-mvd", Role::Police, "officer-9");
    let callers = [
        ("police holding the case", police.clone()),
        (
            "police outside the case",
            token("kg-mvd-osh", Role::Police, "officer-3"),
        ),
        ("an NGO", token("kg-ngo-sezim", Role::Ngo, "worker-2")),
        ("the coordinator", token("kg-coordinator", Role::Coordinator, "coord-1")),
        ("MSD", token("kg-msd", Role::Msd, "social-worker-1")),
    ];
    let reported = client
        .report_presumed_victim(authorized(report_request("sweep-case", canary()), &police))
        .await
        .unwrap()
        .into_inner();
    let (case_id, person_id) = (reported.case_id.clone(), reported.person_id.clone());
    let unknown = uuid::Uuid::now_v7().to_string();
    let values = values();
    let mut answers = Answers::default();
    let mut n = 0;
    for value in &values {
        let value = value.as_str();
        for (who, caller) in &callers {
            let ask = |rpc: &str, field: &str| format!("{rpc}.{field} by {who}");
            // A fresh request ID where the canary is not the request ID.
            let mut rid = || {
                n += 1;
                format!("sweep-{n}")
            };
            let valid_reads = pb::ReadPurpose::CaseReview as i32;

            // ReportPresumedVictim: every coded string field.
            for field in [
                "request_id",
                "found_country",
                "found_region",
                "country_of_exploitation",
                "citizenship",
                "competent_authority",
            ] {
                let mut request = report_for(&rid(), canary(), "kg-mvd");
                let slot = match field {
                    "request_id" => &mut request.request_id,
                    "found_country" => &mut request.found_country,
                    "found_region" => &mut request.found_region,
                    "country_of_exploitation" => &mut request.country_of_exploitation,
                    "citizenship" => &mut request.citizenship,
                    _ => &mut request.competent_authority,
                };
                value.clone_into(slot);
                let answer = client.report_presumed_victim(authorized(request, caller)).await;
                answers.record(&ask("ReportPresumedVictim", field), answer);
            }

            // FileAnonymousNotification: every string field (an adult's band,
            // and a child's, refused by the rule after the fields are checked).
            for field in ["request_id", "found_country", "country_of_exploitation", "citizenship"] {
                for band in [common::AgeBand::AgeBand2534, common::AgeBand::AgeBand1217] {
                    let mut request = pb::FileAnonymousNotificationRequest {
                        request_id: rid(),
                        found_country: "KG".into(),
                        country_of_exploitation: "RU".into(),
                        exploitation_forms: vec![pb::ExploitationForm::Labour as i32],
                        gender: common::Gender::Female as i32,
                        age_band: band as i32,
                        citizenship: "KG".into(),
                    };
                    let slot = match field {
                        "request_id" => &mut request.request_id,
                        "found_country" => &mut request.found_country,
                        "country_of_exploitation" => &mut request.country_of_exploitation,
                        _ => &mut request.citizenship,
                    };
                    value.clone_into(slot);
                    let answer = client.file_anonymous_notification(authorized(request, caller)).await;
                    answers.record(&ask("FileAnonymousNotification", field), answer);
                }
            }

            // The commands on a case: the canary as request ID (on the case,
            // on an unknown case, at a stale version) or as case ID.
            for target in [case_id.as_str(), unknown.as_str()] {
                for (request_id, case, version) in [
                    (value.to_owned(), target.to_owned(), 1),
                    (value.to_owned(), target.to_owned(), 9),
                    (rid(), value.to_owned(), 1),
                ] {
                    let answer = client
                        .complete_screening(authorized(
                            pb::CompleteScreeningRequest {
                                request_id: request_id.clone(),
                                case_id: case.clone(),
                                expected_version: version,
                                indicators: vec![pb::Indicator::Isolation as i32],
                            },
                            caller,
                        ))
                        .await;
                    answers.record(&ask("CompleteScreening", "request_id/case_id"), answer);
                    let answer = client
                        .decide_identification(authorized(
                            pb::DecideIdentificationRequest {
                                request_id: request_id.clone(),
                                case_id: case.clone(),
                                expected_version: version,
                                decision: pb::Decision::Identified as i32,
                                ..Default::default()
                            },
                            caller,
                        ))
                        .await;
                    answers.record(&ask("DecideIdentification", "request_id/case_id"), answer);
                    let answer = client
                        .request_review(authorized(
                            pb::RequestReviewRequest {
                                request_id: request_id.clone(),
                                case_id: case.clone(),
                                expected_version: version,
                                reason: pb::ReviewReason::NewEvidence as i32,
                            },
                            caller,
                        ))
                        .await;
                    answers.record(&ask("RequestReview", "request_id/case_id"), answer);
                    // Erasure is aimed at unknown cases only (the case stays for the sweep),
                    // and once without a reason.
                    let erasing = if case == case_id { unknown.clone() } else { case.clone() };
                    for reason in [pb::ErasureReason::ReportedInError, pb::ErasureReason::Unspecified] {
                        let answer = client
                            .erase_personal_data(authorized(erase(&request_id, &erasing, reason), caller))
                            .await;
                        answers.record(&ask("ErasePersonalData", "request_id/case_id"), answer);
                    }
                }
            }

            // GetCase: the canary as case ID, and as the free-text purpose.
            for (case, personal, purpose) in [
                (value, false, String::new()),
                (value, true, value.to_owned()),
                (case_id.as_str(), true, value.to_owned()),
            ] {
                let answer = client
                    .get_case(authorized(
                        pb::GetCaseRequest {
                            case_id: case.to_owned(),
                            include_personal_data: personal,
                            purpose,
                            read_purpose: 0,
                        },
                        caller,
                    ))
                    .await;
                answers.record(&ask("GetCase", "case_id/purpose"), answer);
            }
            let answer = client
                .get_case(authorized(
                    pb::GetCaseRequest {
                        case_id: case_id.clone(),
                        include_personal_data: true,
                        purpose: value.to_owned(),
                        read_purpose: 77,
                    },
                    caller,
                ))
                .await;
            answers.record(&ask("GetCase", "read_purpose"), answer);

            // ListCases: page token and agency filter.
            for (page_token, agency) in [(value, ""), ("", value)] {
                let answer = client
                    .list_cases(authorized(
                        pb::ListCasesRequest {
                            page_token: page_token.to_owned(),
                            reporting_agency: agency.to_owned(),
                            ..Default::default()
                        },
                        caller,
                    ))
                    .await;
                answers.record(&ask("ListCases", "page_token/reporting_agency"), answer);
            }

            // GetPersonalData: person ID and purpose.
            for (person, purpose, code) in [
                (value, String::new(), valid_reads),
                (person_id.as_str(), value.to_owned(), 0),
                (unknown.as_str(), value.to_owned(), 0),
            ] {
                let answer = client
                    .get_personal_data(authorized(
                        pb::GetPersonalDataRequest {
                            person_id: person.to_owned(),
                            purpose,
                            read_purpose: code,
                        },
                        caller,
                    ))
                    .await;
                answers.record(&ask("GetPersonalData", "person_id/purpose"), answer);
            }
        }
    }
    println!("answers of the canary sweep: {:?}", answers.0);
    for code in [
        "Ok",
        "InvalidArgument",
        "PermissionDenied",
        "NotFound",
        "FailedPrecondition",
        "Aborted",
        "AlreadyExists",
    ] {
        assert!(
            answers.0.contains_key(code),
            "the sweep reached {code}: {:?}",
            answers.0
        );
    }
    // Let the background work (relay, projections) log what it logs.
    app.tables().wait_until_quiescent().await;
    let logs = capture.logs();
    assert!(
        String::from_utf8_lossy(&logs).contains(&case_id),
        "the capture saw the service's spans"
    );
    assert_eq!(leaks(&logs), Vec::<&str>::new(), "logs or spans leak");
    app.stop().await;
}
