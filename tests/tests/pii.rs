//! Personal data never appear in logs, spans, metrics, error messages, NATS
//! messages or stored events; after erasure a read says so.
//!
//! This file is its own test process so that it can capture every log line
//! and span of the service at debug level.

#![allow(clippy::unwrap_used)] // Test code: a failed unwrap is a failed test.

use std::io::Write;
use std::sync::{Arc, Mutex};

use nrm_e2e::{TestApp, authorized, report_request, token};
use nrm_kernel::auth::Role;
use nrm_kernel::settings::TelemetrySettings;
use nrm_proto::common::v1 as common;
use nrm_proto::common::v1::personal_data_view::View;
use nrm_proto::identification::v1 as pb;

const NAME: &str = "Zarina Canaryname Tokoeva";
const NAME_PART: &str = "canaryname";
const PASSPORT: &str = "CANARY998877";
const PHONE: &str = "+996 700 123 987";
const PHONE_DIGITS: &str = "700123987";

#[derive(Clone, Default)]
struct Capture(Arc<Mutex<Vec<u8>>>);

impl Write for Capture {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().expect("capture lock").extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn leaks(haystack: &[u8]) -> Vec<&'static str> {
    let text = String::from_utf8_lossy(haystack).to_lowercase();
    let compact: String = text.chars().filter(char::is_ascii_digit).collect();
    let mut found = Vec::new();
    if text.contains(NAME_PART) {
        found.push("name");
    }
    if text.contains(&PASSPORT.to_lowercase()) {
        found.push("document number");
    }
    if text.contains("700 123 987") || compact.contains(PHONE_DIGITS) {
        found.push("phone");
    }
    found
}

fn canary() -> common::PersonalIdentifiers {
    common::PersonalIdentifiers {
        full_name: NAME.into(),
        date_of_birth: "1998-07-01".into(),
        documents: vec![common::IdentityDocument {
            r#type: common::DocumentType::Passport as i32,
            number: PASSPORT.into(),
            issuing_country: "KG".into(),
        }],
        phone: PHONE.into(),
        address: "Osh, Canarystreet 5".into(),
    }
}

#[tokio::test]
async fn canary_identifiers_appear_nowhere_but_in_an_authorised_read_and_are_gone_after_erasure() {
    let capture = Capture::default();
    let writer = capture.clone();
    let settings = TelemetrySettings {
        log: "debug".into(),
        log_format: "json".into(),
    };
    let _telemetry = nrm_kernel::telemetry::init_with_writer("pii-test", &settings, move || writer.clone())
        .expect("this process's only subscriber");
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
    let metrics = reqwest_free_get(&app.metrics_url).await;
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
    let logs = capture.0.lock().unwrap().clone();
    let text = String::from_utf8_lossy(&logs);
    assert!(text.contains(&reported.case_id), "the capture saw the service's spans");
    assert!(text.contains("\"span\""), "span fields are in the capture");
    assert_eq!(leaks(&logs), Vec::<&str>::new(), "logs or spans leak");
    app.stop().await;
}

/// `GET url` over a plain TCP connection (no HTTP client dependency for one call).
async fn reqwest_free_get(url: &str) -> String {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let rest = url.strip_prefix("http://").unwrap();
    let (host, path) = rest.split_once('/').unwrap();
    let mut stream = tokio::net::TcpStream::connect(host).await.unwrap();
    stream
        .write_all(format!("GET /{path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut body = String::new();
    stream.read_to_string(&mut body).await.unwrap();
    body
}
