//! Anonymous notifications over gRPC, against real NATS and PostgreSQL: an
//! adult who does not consent to a referral is counted (coded fields only,
//! its own stream `notification-<uuid>`), never listed as a case, never
//! linked to one; a child is refused (a child is reported); bad input names
//! every field and writes nothing; a retry answers the first result.
//!
//! Its own test process: it captures every log line and span of all its
//! tests at debug level, to check that a canary typed into a field reaches
//! no log and no error.

#![allow(clippy::unwrap_used)] // Test code: a failed unwrap is a failed test.

use nrm_e2e::canary::{NAME, PASSPORT, capture, leaks, values};
use nrm_e2e::ident::assert_refusal_audited;
use nrm_e2e::{TestApp, authorized, bad_fields, person, report_request, token};
use nrm_kernel::auth::Role;
use nrm_proto::common::v1 as common;
use nrm_proto::identification::v1 as pb;
use prost::Message as _;
use tonic::Code;
use tonic_types::StatusExt as _;

fn police() -> String {
    token("kg-mvd", Role::Police, "officer-17")
}

/// A valid notification of an adult.
fn notification(request_id: &str) -> pb::FileAnonymousNotificationRequest {
    pb::FileAnonymousNotificationRequest {
        request_id: request_id.to_owned(),
        found_country: "kg".into(),
        country_of_exploitation: "RU".into(),
        exploitation_forms: vec![
            pb::ExploitationForm::Labour as i32,
            pb::ExploitationForm::ForcedBegging as i32,
        ],
        gender: common::Gender::Female as i32,
        age_band: common::AgeBand::AgeBand2534 as i32,
        citizenship: "KG".into(),
    }
}

async fn file(
    app: &TestApp,
    request: pb::FileAnonymousNotificationRequest,
    token: &str,
) -> Result<pb::FileAnonymousNotificationResponse, tonic::Status> {
    app.client
        .clone()
        .file_anonymous_notification(authorized(request, token))
        .await
        .map(tonic::Response::into_inner)
}

/// The service's tables once its stream exists (the relay creates it as it
/// starts; a projection then finds it and writes that into its checkpoint):
/// a snapshot taken before would see that write as the test's.
async fn settled_tables(app: &TestApp) -> (nrm_e2e::tables::ServiceTables, nrm_e2e::tables::TableSnapshot) {
    for _ in 0..400 {
        if app.jetstream.get_stream(app.stream_name()).await.is_ok() {
            let tables = app.tables();
            let snapshot = tables.snapshot().await;
            return (tables, snapshot);
        }
        tokio::time::sleep(std::time::Duration::from_millis(25)).await;
    }
    panic!("the service's stream does not exist after 10 s");
}

#[tokio::test]
async fn a_notification_is_one_event_on_its_own_stream_and_a_retry_appends_nothing() {
    // Every test of this process logs into the one capture (installed first).
    let _capture = capture();
    let app = TestApp::spawn().await;
    let (tables, before) = settled_tables(&app).await;

    // The caller's correlation (that of a case, say) does not reach the event.
    let correlation = uuid::Uuid::now_v7().to_string();
    let mut request = authorized(notification("n-1"), &police());
    request
        .metadata_mut()
        .insert("x-correlation-id", correlation.parse().unwrap());
    let filed = app
        .client
        .clone()
        .file_anonymous_notification(request)
        .await
        .unwrap()
        .into_inner();
    let metadata: String = sqlx::query_scalar("SELECT metadata::text FROM events")
        .fetch_one(&app.pool)
        .await
        .unwrap();
    assert!(metadata.contains("correlation_id"), "{metadata}");
    assert!(
        !metadata.contains(&correlation),
        "the caller's correlation is linked: {metadata}"
    );
    let id: uuid::Uuid = filed.notification_id.parse().expect("a UUID");
    assert_eq!(id.get_version_num(), 7);
    let result = filed.result.clone().expect("a result");
    assert_eq!(
        (
            result.aggregate_id.as_str(),
            result.version,
            result.event_ids.len(),
            result.replayed
        ),
        (filed.notification_id.as_str(), 1, 1, false)
    );

    // Exactly one event, on the notification's stream, with coded fields and the day only.
    let stream = format!("notification-{id}");
    let events: Vec<(String, String, Vec<u8>)> =
        sqlx::query_as("SELECT stream_id, event_type, payload FROM events ORDER BY global_position")
            .fetch_all(&app.pool)
            .await
            .unwrap();
    assert_eq!(events.len(), 1, "one event in the whole store");
    let (stream_id, event_type, payload) = &events[0];
    assert_eq!(
        (stream_id.as_str(), event_type.as_str()),
        (stream.as_str(), "AnonymousNotificationFiled")
    );
    let Some(pb::identification_event::Event::AnonymousNotificationFiled(event)) =
        pb::IdentificationEvent::decode(payload.as_slice()).unwrap().event
    else {
        panic!("an AnonymousNotificationFiled");
    };
    let filed_on = event.filed_on.expect("filed_on");
    assert_eq!((filed_on.seconds % 86_400, filed_on.nanos), (0, 0), "midnight UTC");
    let today = chrono::Utc::now().timestamp();
    assert!(today - filed_on.seconds < 86_400 + 60, "filed today");
    assert_eq!(
        event,
        pb::AnonymousNotificationFiled {
            notification_id: filed.notification_id.clone(),
            filed_on: Some(filed_on),
            found_country: "KG".into(),
            country_of_exploitation: "RU".into(),
            exploitation_forms: vec![
                pb::ExploitationForm::Labour as i32,
                pb::ExploitationForm::ForcedBegging as i32
            ],
            gender: common::Gender::Female as i32,
            age_band: common::AgeBand::AgeBand2534 as i32,
            citizenship: "KG".into(),
        }
    );

    // One message on NATS, for the notification's subject.
    let messages = app.wait_for_messages(1).await;
    assert_eq!(messages.len(), 1);
    assert!(
        messages[0]
            .subject
            .ends_with(&format!(".identification.v1.notification.{id}")),
        "{}",
        messages[0].subject
    );
    let commit = common::EventCommit::decode(messages[0].payload.as_ref()).unwrap();
    assert_eq!((commit.stream_id.as_str(), commit.events.len()), (stream.as_str(), 1));

    // What it wrote: its event, its answer, its audit entry (naming the
    // notification only, and no person); the runners' bookkeeping; no
    // person, key, match or case row.
    tables
        .assert_changed_only_since(
            &before,
            &[
                "events",
                "commits",
                "outbox",
                "commands",
                "audit_log",
                "projection_checkpoints",
                "projection_versions",
            ],
            "filing a notification",
        )
        .await;
    assert_eq!(app.count("outbox").await, 0, "published");
    let audit: Vec<(String, String, String, Option<uuid::Uuid>)> =
        sqlx::query_as("SELECT action, subject_id, purpose, person_id FROM audit_log ORDER BY seq")
            .fetch_all(&app.pool)
            .await
            .unwrap();
    assert_eq!(
        audit,
        [(
            "FileAnonymousNotification".to_owned(),
            filed.notification_id.clone(),
            "command".to_owned(),
            None
        )]
    );

    // A retry answers the first result and writes nothing, on the bus neither.
    let after = tables.snapshot().await;
    let again = file(&app, notification("n-1"), &police()).await.unwrap();
    assert_eq!(again.notification_id, filed.notification_id);
    let replayed = again.result.expect("a result");
    assert!(replayed.replayed);
    assert_eq!(
        (replayed.version, replayed.event_ids),
        (result.version, result.event_ids)
    );
    tables.assert_unchanged_since(&after, "a retried notification").await;
    assert_eq!(app.messages().await.len(), 1, "no second message");

    // The same request ID for another request is refused, writing nothing.
    let mut other = notification("n-1");
    other.citizenship = "KZ".into();
    let status = file(&app, other, &police()).await.unwrap_err();
    assert_eq!(status.code(), Code::AlreadyExists, "{status:?}");
    tables.assert_unchanged_since(&after, "a reused request ID").await;
    app.stop().await;
}

#[tokio::test]
async fn invalid_notifications_name_every_field_and_write_nothing() {
    // Every test of this process logs into the one capture (installed first).
    let _capture = capture();
    let app = TestApp::spawn().await;
    let (tables, before) = settled_tables(&app).await;
    let cases: Vec<(&str, pb::FileAnonymousNotificationRequest, Vec<&str>)> = vec![
        (
            "everything missing",
            pb::FileAnonymousNotificationRequest::default(),
            vec![
                "request_id",
                "found_country",
                "country_of_exploitation",
                "exploitation_forms",
                "gender",
                "age_band",
                "citizenship",
            ],
        ),
        (
            "unknown countries",
            pb::FileAnonymousNotificationRequest {
                found_country: "XX".into(),
                country_of_exploitation: "Russia".into(),
                citizenship: "K".into(),
                ..notification("bad-1")
            },
            vec!["found_country", "country_of_exploitation", "citizenship"],
        ),
        (
            "unspecified, unknown and repeated forms",
            pb::FileAnonymousNotificationRequest {
                exploitation_forms: vec![
                    pb::ExploitationForm::Labour as i32,
                    0,
                    99,
                    pb::ExploitationForm::Labour as i32,
                ],
                ..notification("bad-2")
            },
            vec![
                "exploitation_forms[1]",
                "exploitation_forms[2]",
                "exploitation_forms[3]",
            ],
        ),
        (
            "an unspecified age band and gender",
            pb::FileAnonymousNotificationRequest {
                age_band: common::AgeBand::Unspecified as i32,
                gender: common::Gender::Unspecified as i32,
                ..notification("bad-3")
            },
            vec!["gender", "age_band"],
        ),
        (
            "an unknown age band",
            pb::FileAnonymousNotificationRequest {
                age_band: 42,
                ..notification("bad-4")
            },
            vec!["age_band"],
        ),
        ("a request ID with a space", notification("bad 5"), vec!["request_id"]),
    ];
    for (what, request, fields) in cases {
        let status = file(&app, request, &police()).await.unwrap_err();
        assert_eq!(bad_fields(&status), fields, "{what}");
        tables.assert_unchanged_since(&before, what).await;
    }
    app.stop().await;
}

#[tokio::test]
async fn a_child_is_refused_with_the_rule_code_and_only_the_refusal_is_audited() {
    // Every test of this process logs into the one capture (installed first).
    let _capture = capture();
    let app = TestApp::spawn().await;
    let (tables, mut before) = settled_tables(&app).await;
    for band in [common::AgeBand::AgeBand011, common::AgeBand::AgeBand1217] {
        let request = pb::FileAnonymousNotificationRequest {
            age_band: band as i32,
            ..notification(&format!("child-{}", band as i32))
        };
        let status = file(&app, request, &police()).await.unwrap_err();
        assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}");
        assert_eq!(
            status.get_details_precondition_failure().unwrap().violations[0].r#type,
            "CHILD_MUST_BE_REPORTED"
        );
        // Nothing was filed: the refusal names no notification.
        before = assert_refusal_audited(
            &tables,
            &before,
            "FileAnonymousNotification:refused",
            "",
            "a notification of a child",
        )
        .await;
    }
    // An unknown age is counted.
    let unknown = pb::FileAnonymousNotificationRequest {
        age_band: common::AgeBand::Unknown as i32,
        ..notification("unknown-age")
    };
    file(&app, unknown, &police()).await.unwrap();
    app.stop().await;
}

#[tokio::test]
async fn a_notification_is_in_no_case_list_for_any_role_and_no_case() {
    // Every test of this process logs into the one capture (installed first).
    let _capture = capture();
    let app = TestApp::spawn().await;
    let reported = app
        .client
        .clone()
        .report_presumed_victim(authorized(
            report_request("case-1", person("Aigul Asanova", "AC1234567", "+996 555 000 111")),
            &police(),
        ))
        .await
        .unwrap()
        .into_inner();
    let filed = file(&app, notification("n-1"), &police()).await.unwrap();
    // Every role that may notify does; none of it is a case.
    let reporters = [
        Role::Police,
        Role::Prosecutor,
        Role::BorderService,
        Role::Ngo,
        Role::Hotline,
        Role::Iom,
        Role::Consulate,
    ];
    let mut notified = vec![filed.notification_id.clone()];
    for role in reporters {
        let agency = format!("kg-{}", role.as_str().replace('_', "-"));
        let who = token(&agency, role, "officer-1");
        notified.push(file(&app, notification("n-each"), &who).await.unwrap().notification_id);
    }
    // Every projection has seen every commit.
    app.tables().wait_until_quiescent().await;
    assert_eq!(app.count("case_list").await, 1, "the case list holds the case only");

    let coordinator = token("kg-coordinator", Role::Coordinator, "coord-1");
    let mut listed_the_case = false;
    for role in Role::ALL {
        let who = if role == Role::Coordinator {
            coordinator.clone()
        } else {
            token("kg-mvd", role, "officer-2")
        };
        let answer = app
            .client
            .clone()
            .list_cases(authorized(
                pb::ListCasesRequest {
                    page_size: 500,
                    ..Default::default()
                },
                &who,
            ))
            .await;
        match answer {
            Ok(list) => {
                let ids: Vec<String> = list.into_inner().cases.into_iter().map(|c| c.case_id).collect();
                assert!(
                    notified.iter().all(|n| !ids.contains(n)),
                    "{role} lists a notification: {ids:?}"
                );
                listed_the_case |= ids.contains(&reported.case_id);
            }
            Err(status) => assert_eq!(status.code(), Code::PermissionDenied, "{role}: {status:?}"),
        }
    }
    assert!(listed_the_case, "the lists work: some role sees the case");

    for who in [police(), coordinator] {
        let status = app
            .client
            .clone()
            .get_case(authorized(
                pb::GetCaseRequest {
                    case_id: filed.notification_id.clone(),
                    ..Default::default()
                },
                &who,
            ))
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::NotFound, "{status:?}");
    }
    app.stop().await;
}

#[tokio::test]
async fn a_canary_typed_into_a_notification_reaches_no_log_span_or_error() {
    let capture = capture();
    let app = TestApp::spawn().await;
    let tables = app.tables();
    let mut refused = 0;
    let mut n = 0;
    for value in values() {
        for field in ["request_id", "found_country", "country_of_exploitation", "citizenship"] {
            for band in [common::AgeBand::AgeBand1824, common::AgeBand::AgeBand011] {
                n += 1;
                let mut request = pb::FileAnonymousNotificationRequest {
                    age_band: band as i32,
                    ..notification(&format!("canary-{n}"))
                };
                let slot = match field {
                    "request_id" => &mut request.request_id,
                    "found_country" => &mut request.found_country,
                    "country_of_exploitation" => &mut request.country_of_exploitation,
                    _ => &mut request.citizenship,
                };
                slot.clone_from(&value);
                match file(&app, request, &police()).await {
                    Ok(filed) => assert!(leaks(format!("{filed:?}").as_bytes()).is_empty(), "an answer leaks"),
                    Err(status) => {
                        refused += 1;
                        assert!(leaks(status.message().as_bytes()).is_empty(), "error message leaks");
                        assert!(leaks(status.details()).is_empty(), "error details leak");
                    }
                }
            }
        }
    }
    assert!(refused > 0, "the canaries were refused somewhere");
    // The loop filed one under a canary request ID (PASSPORT passes as one).
    let count: i64 = sqlx::query_scalar("SELECT count(*) FROM commands WHERE request_key LIKE '%' || $1")
        .bind(PASSPORT)
        .fetch_one(&app.pool)
        .await
        .unwrap();
    assert_eq!(count, 1, "a canary request ID was accepted");
    let filed = file(&app, notification("canary-final"), &police()).await.unwrap();
    let bad = pb::FileAnonymousNotificationRequest {
        found_country: NAME.into(),
        ..notification("canary-last")
    };
    file(&app, bad, &police()).await.unwrap_err();
    tables.wait_until_quiescent().await;
    // Audit entries name notification IDs only.
    let audit: Vec<String> = sqlx::query_scalar("SELECT audit_log::text FROM audit_log")
        .fetch_all(&app.pool)
        .await
        .unwrap();
    assert!(audit.len() > 1, "the filings were audited");
    assert!(leaks(audit.join("\n").as_bytes()).is_empty(), "the audit trail leaks");
    let logs = capture.logs();
    assert!(
        String::from_utf8_lossy(&logs).contains(&filed.notification_id),
        "the capture saw the service's spans"
    );
    assert_eq!(leaks(&logs), Vec::<&str>::new(), "logs or spans leak");
    app.stop().await;
}
