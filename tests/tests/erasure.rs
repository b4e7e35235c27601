//! Erasure is per person, owned and complete: only an agency holding the
//! case (or the coordinator) erases, for a reason from the fixed list; every
//! case of the person goes at once; and no identifier of theirs is left in
//! the database (a full `pg_dump`), on any JetStream stream, or in any log
//! line or span, before or after.
//!
//! This file is its own test process so that it can capture every log line
//! and span of the service at debug level.

#![allow(clippy::unwrap_used)] // Test code: a failed unwrap is a failed test.

use std::io::Write;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use futures::StreamExt as _;
use nrm_e2e::ident::{assert_refusal_audited, audit_since, erase, read_case, report_for};
use nrm_e2e::{ReferralApp, ShelterApp, TestApp, authorized, person, report_request, token};
use nrm_kernel::auth::Role;
use nrm_kernel::settings::{DatabaseSettings, TelemetrySettings};
use nrm_proto::common::v1 as common;
use nrm_proto::common::v1::personal_data_view::View;
use nrm_proto::identification::v1 as pb;
use prost::Message as _;
use tonic::Code;
use tonic_types::StatusExt as _;

const NAME: &str = "Gulnara Canaryperson Erasova";
const DATE_OF_BIRTH: &str = "1987-03-19";
const DOCUMENT: &str = "ERASE5566778";
const PHONE: &str = "+996 777 314 159";
const ADDRESS: &str = "Naryn, Canaryerasestreet 12";

/// What of the canary `haystack` holds, case-insensitively.
fn canary_in(haystack: &[u8]) -> Vec<&'static str> {
    let text = String::from_utf8_lossy(haystack).to_lowercase();
    let mut found = Vec::new();
    if text.contains("canaryperson") || text.contains("erasova") {
        found.push("name");
    }
    if text.contains(DATE_OF_BIRTH) {
        found.push("date of birth");
    }
    if text.contains(&DOCUMENT.to_lowercase()) {
        found.push("document number");
    }
    if text.contains("777 314 159") || text.contains("996777314159") {
        found.push("phone");
    }
    if text.contains("canaryerasestreet") {
        found.push("address");
    }
    found
}

fn canary() -> common::PersonalIdentifiers {
    common::PersonalIdentifiers {
        full_name: NAME.into(),
        date_of_birth: DATE_OF_BIRTH.into(),
        documents: vec![common::IdentityDocument {
            r#type: common::DocumentType::Passport as i32,
            number: DOCUMENT.into(),
            issuing_country: "KG".into(),
        }],
        phone: PHONE.into(),
        address: ADDRESS.into(),
    }
}

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

/// `pg_dump` of the server's major version, as `scripts/stack.sh` finds
/// PostgreSQL (Debian's folders, then `pg_config`, then `PATH`).
async fn pg_dump_binary(pool: &sqlx::PgPool) -> PathBuf {
    let version: String = sqlx::query_scalar("SHOW server_version_num")
        .fetch_one(pool)
        .await
        .unwrap();
    let major = version.parse::<u32>().unwrap() / 10_000;
    let mut candidates = vec![PathBuf::from(format!("/usr/lib/postgresql/{major}/bin/pg_dump"))];
    if let Ok(out) = std::process::Command::new("pg_config").arg("--bindir").output() {
        candidates.push(PathBuf::from(String::from_utf8_lossy(&out.stdout).trim()).join("pg_dump"));
    }
    candidates
        .into_iter()
        .find(|p| p.exists())
        .unwrap_or_else(|| PathBuf::from("pg_dump"))
}

/// The whole database as `pg_dump` writes it, and every hex-encoded
/// `bytea` value of it decoded (a plaintext inside a byte column would
/// otherwise hide as hex).
async fn dump(pool: &sqlx::PgPool, database: &DatabaseSettings) -> (Vec<u8>, Vec<u8>) {
    let binary = pg_dump_binary(pool).await;
    let url = format!("{}/{}", database.url.trim_end_matches('/'), database.name);
    let out = tokio::process::Command::new(&binary)
        .arg("--no-owner")
        .arg("--dbname")
        .arg(&url)
        .output()
        .await
        .unwrap_or_else(|e| panic!("run {}: {e}", binary.display()));
    assert!(
        out.status.success(),
        "pg_dump failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(text.contains("COPY public.events"), "the dump holds the event store");
    let mut decoded = Vec::new();
    for run in text.split("\\\\x").skip(1) {
        let hex: String = run.chars().take_while(char::is_ascii_hexdigit).collect();
        decoded.extend((0..hex.len() / 2).filter_map(|i| u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).ok()));
        decoded.push(b'\n');
    }
    (out.stdout, decoded)
}

/// Every message of every stream on the server: raw bytes, headers, and
/// the payload decoded as an event commit and each event as what it is.
async fn every_stream(js: &async_nats::jetstream::Context) -> (usize, Vec<u8>) {
    let mut names = js.stream_names();
    let mut all = Vec::new();
    let mut count = 0;
    while let Some(name) = names.next().await {
        let name = name.unwrap();
        for message in nrm_e2e::messages(js, &name).await {
            count += 1;
            all.extend_from_slice(&message.payload);
            all.extend_from_slice(format!("{:?}", message.headers).as_bytes());
            if let Ok(commit) = common::EventCommit::decode(message.payload.as_ref()) {
                all.extend_from_slice(format!("{commit:?}").as_bytes());
                for event in &commit.events {
                    if let Ok(decoded) = pb::IdentificationEvent::decode(event.payload.as_slice()) {
                        all.extend_from_slice(format!("{decoded:?}").as_bytes());
                    }
                }
            }
        }
    }
    (count, all)
}

/// The referral and shelter services beside identification, on its NATS.
struct Beside {
    referral: ReferralApp,
    shelter: ShelterApp,
}

/// Searches the dumps of every service's database, every stream and the
/// capture for the canary; each search must also find `case_id` (in the
/// identification database) or `person_id` (in the others), so that it
/// looks where the data are.
async fn assert_no_canary_anywhere(
    app: &TestApp,
    beside: &Beside,
    capture: &Capture,
    case_id: &str,
    person_id: &str,
    when: &str,
) {
    let seen = |haystack: &[u8]| String::from_utf8_lossy(haystack).contains(case_id);
    let (dumped, decoded) = dump(&app.pool, &app.settings.database).await;
    assert!(seen(&decoded), "the decoded byte columns hold the events");
    assert_eq!(canary_in(&dumped), Vec::<&str>::new(), "pg_dump {when}");
    assert_eq!(canary_in(&decoded), Vec::<&str>::new(), "pg_dump's byte columns {when}");
    for (name, pool, database) in [
        ("referral", &beside.referral.pool, &beside.referral.settings.database),
        ("shelter", &beside.shelter.pool, &beside.shelter.settings.database),
    ] {
        let (dumped, decoded) = dump(pool, database).await;
        assert!(
            String::from_utf8_lossy(&dumped).contains(person_id),
            "the {name} database knows the person"
        );
        assert_eq!(canary_in(&dumped), Vec::<&str>::new(), "{name}'s pg_dump {when}");
        assert_eq!(canary_in(&decoded), Vec::<&str>::new(), "{name}'s byte columns {when}");
    }
    let (messages, streams) = every_stream(&app.jetstream).await;
    assert!(
        messages > 0 && seen(&streams),
        "the streams hold the service's messages"
    );
    assert_eq!(canary_in(&streams), Vec::<&str>::new(), "JetStream {when}");
    let logs = capture.0.lock().unwrap().clone();
    assert!(seen(&logs), "the capture saw the service's spans");
    assert_eq!(canary_in(&logs), Vec::<&str>::new(), "logs and spans {when}");
}

/// Records a consent for MSD and refers the person there with a shelter
/// need, once the referral service knows them; waits until the shelter
/// service has the referral.
async fn refer_on(beside: &Beside, reported: &pb::ReportPresumedVictimResponse, police: &str) {
    use nrm_proto::referral::v1 as rf;
    use nrm_proto::shelter::v1 as sh;
    let mut client = beside.referral.client.clone();
    let mut consent = None;
    for _ in 0..400 {
        let request = rf::RecordConsentRequest {
            request_id: format!("consent-{}", reported.case_id),
            person_id: reported.person_id.clone(),
            case_id: reported.case_id.clone(),
            given_by: rf::ConsentGiver::Person as i32,
            recipient_agency: "kg-msd".into(),
            purposes: vec![rf::ServiceKind::Shelter as i32],
            data_categories: vec![rf::DataCategory::Name as i32],
            ..Default::default()
        };
        if let Ok(answer) = client.record_consent(authorized(request, police)).await {
            consent = Some(answer.into_inner().consent_id);
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    let consent_id = consent.expect("the referral service learns the person");
    let referral_id = client
        .create_referral(authorized(
            rf::CreateReferralRequest {
                request_id: format!("referral-{}", reported.case_id),
                person_id: reported.person_id.clone(),
                case_id: reported.case_id.clone(),
                receiving_agency: "kg-msd".into(),
                services: vec![rf::ServiceKind::Shelter as i32],
                urgency: rf::Urgency::Urgent as i32,
                consent_id,
                shelter_need: Some(rf::ShelterNeed {
                    category: sh::BedCategory::Women as i32,
                    region: "KG-N".into(),
                }),
            },
            police,
        ))
        .await
        .unwrap()
        .into_inner()
        .referral_id;
    let id: uuid::Uuid = referral_id.parse().unwrap();
    for _ in 0..400 {
        let known: bool = sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM shelter_referrals WHERE referral_id = $1)")
            .bind(id)
            .fetch_one(&beside.shelter.pool)
            .await
            .unwrap();
        if known {
            return;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    panic!("the shelter service did not learn the referral");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn erasure_takes_every_case_of_the_person_and_leaves_no_identifier_anywhere() {
    let capture = Capture::default();
    let writer = capture.clone();
    let settings = TelemetrySettings {
        log: "debug".into(),
        log_format: "json".into(),
    };
    let _telemetry = nrm_kernel::telemetry::init_with_writer("erasure-test", &settings, move || writer.clone())
        .expect("this process's only subscriber");
    let app = TestApp::spawn().await;
    let referral = ReferralApp::spawn_beside(&app).await;
    let mut shelter_settings = nrm_e2e::shelter_settings();
    shelter_settings.common.nats = app.settings.common.nats.clone();
    let beside = Beside {
        referral,
        shelter: ShelterApp::spawn_with(shelter_settings).await,
    };
    let mut client = app.client.clone();
    let police = token("kg-mvd", Role::Police, "officer-9");
    let ngo = token("kg-ngo-sezim", Role::Ngo, "worker-2");

    // The canary person reported twice (the second a possible duplicate), and someone else.
    let first_request = report_request("er-1", canary());
    let first = client
        .report_presumed_victim(authorized(first_request.clone(), &police))
        .await
        .unwrap()
        .into_inner();
    let second = client
        .report_presumed_victim(authorized(report_for("er-2", canary(), "kg-mvd"), &ngo))
        .await
        .unwrap()
        .into_inner();
    let other = client
        .report_presumed_victim(authorized(
            report_request("er-3", person("Someone Else", "OT1234567", "+996 555 101 202")),
            &police,
        ))
        .await
        .unwrap()
        .into_inner();
    let replayed = client
        .report_presumed_victim(authorized(first_request.clone(), &police))
        .await
        .unwrap()
        .into_inner();
    assert!(replayed.result.unwrap().replayed);
    // The identifiers opened once, by the competent authority.
    let case = client
        .get_case(authorized(
            read_case(&second.case_id, pb::ReadPurpose::CaseReview),
            &police,
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(case.matching_case_ids, std::slice::from_ref(&first.case_id));
    let Some(View::Identifiers(identifiers)) = case.personal.and_then(|p| p.view) else {
        panic!("the competent authority reads the identifiers");
    };
    assert_eq!(identifiers, canary());
    // The person is referred on (consent, referral with a shelter need): the
    // referral and shelter services learn of them, by IDs and codes only.
    refer_on(&beside, &first, &police).await;
    let tables = app.tables();
    let before = tables.snapshot().await;
    // Sealed copies are there, as ciphertext only.
    assert_eq!(before.rows("person_keys"), 3);
    assert_no_canary_anywhere(
        &app,
        &beside,
        &capture,
        &first.case_id,
        &first.person_id,
        "before erasure",
    )
    .await;

    // Not without a reason; not by police outside the case; not by MSD.
    let status = client
        .erase_personal_data(authorized(
            erase("er-4", &first.case_id, pb::ErasureReason::Unspecified),
            &police,
        ))
        .await
        .unwrap_err();
    let fields: Vec<String> = status
        .get_details_bad_request()
        .unwrap()
        .field_violations
        .into_iter()
        .map(|v| v.field)
        .collect();
    assert_eq!(fields, ["reason"]);
    tables
        .assert_unchanged_since(&before, "an erasure without a reason")
        .await;
    let status = client
        .erase_personal_data(authorized(
            erase("er-5", &first.case_id, pb::ErasureReason::DataSubjectRequest),
            &token("kg-mvd-osh", Role::Police, "officer-3"),
        ))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied);
    let before = assert_refusal_audited(
        &tables,
        &before,
        "ErasePersonalData:denied",
        &first.case_id,
        "an erasure by police not holding the case",
    )
    .await;
    let status = client
        .erase_personal_data(authorized(
            erase("er-6", &first.case_id, pb::ErasureReason::DataSubjectRequest),
            &token("kg-msd", Role::Msd, "social-worker-1"),
        ))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied);
    let before = assert_refusal_audited(&tables, &before, "ErasePersonalData:denied", "", "an erasure by MSD").await;

    // The police holding the first case erase the person: both cases go.
    let erased = client
        .erase_personal_data(authorized(
            erase("er-7", &first.case_id, pb::ErasureReason::DataSubjectRequest),
            &police,
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(erased.aggregate_id, first.case_id);
    let remaining: Vec<uuid::Uuid> = sqlx::query_scalar("SELECT person_id FROM person_keys")
        .fetch_all(&app.pool)
        .await
        .unwrap();
    assert_eq!(
        remaining,
        [other.person_id.parse::<uuid::Uuid>().unwrap()],
        "only the other person's key is left"
    );
    let keys: Vec<uuid::Uuid> = sqlx::query_scalar("SELECT DISTINCT case_id FROM match_keys")
        .fetch_all(&app.pool)
        .await
        .unwrap();
    assert_eq!(
        keys,
        [other.case_id.parse::<uuid::Uuid>().unwrap()],
        "only the other person's match keys are left"
    );
    for case_id in [&first.case_id, &second.case_id] {
        let payload: Vec<u8> =
            sqlx::query_scalar("SELECT payload FROM events WHERE stream_id = $1 AND event_type = 'PersonalDataErased'")
                .bind(format!("case-{case_id}"))
                .fetch_one(&app.pool)
                .await
                .unwrap();
        let Some(pb::identification_event::Event::PersonalDataErased(event)) =
            pb::IdentificationEvent::decode(payload.as_slice()).unwrap().event
        else {
            panic!("PersonalDataErased");
        };
        assert_eq!(event.reason, pb::ErasureReason::DataSubjectRequest as i32);
    }
    let audited = audit_since(&app.pool, &before).await;
    assert_eq!(
        audited,
        [
            (
                "ErasePersonalData".to_owned(),
                first.case_id.clone(),
                "ERASURE_REASON_DATA_SUBJECT_REQUEST".to_owned()
            ),
            (
                "ErasePersonalData:linked".to_owned(),
                second.case_id.clone(),
                "ERASURE_REASON_DATA_SUBJECT_REQUEST".to_owned()
            ),
        ]
    );
    // Each holder now reads "erased"; the other person is untouched.
    for (case_id, who) in [(&first.case_id, &police), (&second.case_id, &ngo)] {
        let case = client
            .get_case(authorized(read_case(case_id, pb::ReadPurpose::DataSubjectRequest), who))
            .await
            .unwrap()
            .into_inner();
        assert!(matches!(case.personal.and_then(|p| p.view), Some(View::Erased(_))));
    }
    let case = client
        .get_case(authorized(
            read_case(&other.case_id, pb::ReadPurpose::CaseReview),
            &police,
        ))
        .await
        .unwrap()
        .into_inner();
    assert!(matches!(case.personal.and_then(|p| p.view), Some(View::Identifiers(_))));
    // A retry of the first report is answered no more (its fingerprint, a
    // digest of the identifiers, is gone) and never runs again.
    let status = client
        .report_presumed_victim(authorized(first_request, &police))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::AlreadyExists);
    // Erasing again is refused: nothing is left to erase.
    let status = client
        .erase_personal_data(authorized(
            erase("er-8", &second.case_id, pb::ErasureReason::DataSubjectRequest),
            &ngo,
        ))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::FailedPrecondition);

    tables.wait_until_quiescent().await;
    assert_no_canary_anywhere(
        &app,
        &beside,
        &capture,
        &first.case_id,
        &first.person_id,
        "after erasure",
    )
    .await;
    app.stop().await;
}
