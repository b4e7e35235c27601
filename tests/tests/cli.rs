//! `nrmctl` as a user runs it, against a real identification service: the
//! README's walk-through, step by step, with the roles the permission matrix
//! allows: the police report and name the prosecutor's office as competent
//! authority, which decides; the coordinator reads identifiers for a coded
//! purpose; a case holder erases them with a reason.

#![allow(clippy::unwrap_used)] // Test code: a failed unwrap is a failed test.

use std::process::{Command, Output};

use nrm_e2e::{TestApp, binary, issuer_key_path};

/// The competent authority the police name in the walk-through.
const PROSECUTOR: &str = "kg-gpo";

/// nrmctl as agency kg-mvd with `role`.
fn nrmctl(app: &TestApp, role: &str, args: &[&str]) -> Output {
    nrmctl_as(app, "kg-mvd", role, args)
}

/// nrmctl as `agency` with `role`.
fn nrmctl_as(app: &TestApp, agency: &str, role: &str, args: &[&str]) -> Output {
    Command::new(binary("nrmctl"))
        .args(args)
        .env("NRM_ENDPOINT", &app.endpoint)
        .env("NRM_ISSUER_KEY", issuer_key_path())
        .env("NRM_AGENCY", agency)
        .env("NRM_ROLE", role)
        .env("NRM_OFFICER", "officer-5")
        .env("NRM_NATS__URL", &app.settings.nats.url)
        .env_remove("NRM_TOKEN")
        .env_remove("NRM_OUTPUT")
        .output()
        .expect("run nrmctl")
}

/// The refusal nrmctl printed on stderr, after checking it exited with 1.
fn refused(output: &Output) -> String {
    assert_eq!(
        output.status.code(),
        Some(1),
        "expected a refusal: {}",
        String::from_utf8_lossy(&output.stdout)
    );
    String::from_utf8_lossy(&output.stderr).into_owned()
}

/// The purpose codes the audit trail recorded for `action` on `subject`, oldest first.
async fn audited_purposes(app: &TestApp, action: &str, subject: &str) -> Vec<String> {
    sqlx::query_scalar(
        "SELECT purpose FROM audit_log WHERE action = $1 AND subject_id = $2 AND outcome = 'ok' ORDER BY seq",
    )
    .bind(action)
    .bind(subject)
    .fetch_all(&app.pool)
    .await
    .unwrap()
}

fn json(output: &Output) -> serde_json::Value {
    assert!(
        output.status.success(),
        "nrmctl failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_slice(&output.stdout).expect("JSON output")
}

// nrmctl runs as a blocking child process while the service answers on other threads.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_user_reports_screens_decides_reads_lists_watches_and_erases_with_nrmctl() {
    let app = TestApp::spawn().await;
    let reported = json(&nrmctl(
        &app,
        "police",
        &[
            "--output",
            "json",
            "case",
            "report",
            "--competent-authority",
            PROSECUTOR,
            "--found-country",
            "KZ",
            "--found-region",
            "ALA",
            "--exploitation-country",
            "KZ",
            "--form",
            "labour",
            "--control",
            "document-retention",
            "--gender",
            "female",
            "--age",
            "24",
            "--citizenship",
            "KG",
            "--name",
            "Aigul Asanova",
            "--passport",
            "AC1234567:KG",
        ],
    ));
    let case_id = reported["case_id"].as_str().expect("case_id").to_owned();
    assert_eq!(reported["status"], "CASE_STATUS_REPORTED");

    // Any other reporter must name the competent authority.
    let ngo_report = [
        "case",
        "report",
        "--found-country",
        "KG",
        "--exploitation-country",
        "RU",
        "--citizenship",
        "KG",
        "--form",
        "labour",
        "--gender",
        "male",
    ];
    let stderr = refused(&nrmctl_as(&app, "kg-ngo-tirek", "ngo", &ngo_report));
    assert!(
        stderr.contains("INVALID_ARGUMENT") && stderr.contains("competent_authority"),
        "{stderr}"
    );

    json(&nrmctl(
        &app,
        "police",
        &[
            "--output",
            "json",
            "case",
            "screen",
            &case_id,
            "--version",
            "1",
            "--indicator",
            "documents-retained",
        ],
    ));
    // The police who reported hold the case but do not decide: the
    // prosecutor's office they named does.
    let decide = [
        "--output",
        "json",
        "case",
        "decide",
        &case_id,
        "--version",
        "2",
        "--decision",
        "identified",
        "--non-punishment",
    ];
    let stderr = refused(&nrmctl(&app, "police", &decide));
    assert!(stderr.contains("PERMISSION_DENIED"), "{stderr}");
    json(&nrmctl_as(
        &app,
        PROSECUTOR,
        "prosecutor",
        &[
            "--output",
            "json",
            "case",
            "decide",
            &case_id,
            "--version",
            "2",
            "--decision",
            "identified",
            "--non-punishment",
        ],
    ));
    let case = json(&nrmctl(
        &app,
        "police",
        &[
            "--output",
            "json",
            "case",
            "get",
            &case_id,
            "--personal",
            "--purpose",
            "walk-through",
        ],
    ));
    assert_eq!(case["status"], "CASE_STATUS_IDENTIFIED");
    assert_eq!(case["competent_authority"], PROSECUTOR);
    assert_eq!(case["personal"]["identifiers"]["full_name"], "Aigul Asanova");

    // The coordinator reads the identifiers only for a purpose from the
    // fixed list; that code is what the audit trail keeps.
    let stderr = refused(&nrmctl_as(
        &app,
        "kg-coordinator",
        "coordinator",
        &["case", "get", &case_id, "--personal", "--purpose", "oversight visit"],
    ));
    assert!(
        stderr.contains("INVALID_ARGUMENT") && stderr.contains("read_purpose"),
        "{stderr}"
    );
    let case = json(&nrmctl_as(
        &app,
        "kg-coordinator",
        "coordinator",
        &[
            "--output",
            "json",
            "case",
            "get",
            &case_id,
            "--personal",
            "--read-purpose",
            "oversight",
        ],
    ));
    assert_eq!(case["personal"]["identifiers"]["full_name"], "Aigul Asanova");
    assert_eq!(
        audited_purposes(&app, "ReadPersonalData", &case_id).await,
        ["READ_PURPOSE_NOT_CODED", "READ_PURPOSE_OVERSIGHT"],
        "the police's free text is not kept; the coordinator's code is"
    );

    // A stale version: the command is refused (ABORTED), the exit code is 1,
    // and nothing is written.
    let tables = app.tables();
    let before = tables.snapshot().await;
    let refused = nrmctl(&app, "police", &["case", "screen", &case_id, "--version", "1"]);
    assert_eq!(refused.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&refused.stderr).contains("ABORTED"));
    tables
        .assert_unchanged_since(&before, "nrmctl screening at a stale version")
        .await;

    // Bad input: the field is named, the exit code is 1, and nothing is written.
    let invalid = nrmctl(&app, "police", &["case", "screen", "not-a-case", "--version", "3"]);
    assert_eq!(invalid.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&invalid.stderr);
    assert!(
        stderr.contains("INVALID_ARGUMENT") && stderr.contains("case_id"),
        "{stderr}"
    );
    tables
        .assert_unchanged_since(&before, "nrmctl screening with a malformed case ID")
        .await;

    // The events, decoded as JSON.
    let stream = app.stream_name();
    let watched = nrmctl(
        &app,
        "police",
        &["events", "watch", "--stream", &stream, "--from-start", "--count", "3"],
    );
    assert!(watched.status.success(), "{}", String::from_utf8_lossy(&watched.stderr));
    let lines: Vec<serde_json::Value> = String::from_utf8_lossy(&watched.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).expect("one JSON object per line"))
        .collect();
    assert_eq!(lines.len(), 3);
    let text = serde_json::to_string(&lines).unwrap();
    for event in [
        "presumed_victim_reported",
        "screening_completed",
        "identification_decided",
    ] {
        assert!(text.contains(event), "{event} in the watched events");
    }
    assert!(!text.contains("Aigul"), "events carry sealed identifiers only");

    // The list is a projection: it catches up within moments.
    let mut listed = serde_json::Value::Null;
    for _ in 0..100 {
        listed = json(&nrmctl(
            &app,
            "police",
            &["--output", "json", "case", "list", "--status", "identified"],
        ));
        if listed["cases"].as_array().is_some_and(|c| c.len() == 1) {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert_eq!(listed["cases"][0]["case_id"], case_id.as_str());

    // Erasure needs a reason from the fixed list (nrmctl refuses to call
    // without one) and a case holder or the coordinator.
    let missing = nrmctl(&app, "police", &["case", "erase", &case_id]);
    assert_eq!(missing.status.code(), Some(2), "a usage error, nothing sent");
    assert!(String::from_utf8_lossy(&missing.stderr).contains("--reason"));
    let erased = json(&nrmctl(
        &app,
        "police",
        &[
            "--output",
            "json",
            "case",
            "erase",
            &case_id,
            "--reason",
            "data-subject-request",
        ],
    ));
    assert_eq!(erased["aggregate_id"], case_id.as_str());
    assert_eq!(
        audited_purposes(&app, "ErasePersonalData", &case_id).await,
        ["ERASURE_REASON_DATA_SUBJECT_REQUEST"]
    );
    let case = json(&nrmctl_as(
        &app,
        "kg-coordinator",
        "coordinator",
        &[
            "--output",
            "json",
            "case",
            "get",
            &case_id,
            "--personal",
            "--read-purpose",
            "data-subject-request",
        ],
    ));
    assert!(case["personal"]["erased"].is_object(), "{case}");
    app.stop().await;
}
