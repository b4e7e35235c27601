//! `nrmctl case notify` as a user runs it, against a real identification
//! service: an NGO counts an adult who does not consent to a referral; the
//! notification ID is printed; a retry with the same request ID prints the
//! same one; a child's band is refused with its rule code; the case list
//! stays empty.

#![allow(clippy::unwrap_used)] // Test code: a failed unwrap is a failed test.

use std::process::{Command, Output};

use nrm_e2e::{TestApp, binary, issuer_key_path};

/// nrmctl as `agency` with `role`.
fn nrmctl_as(app: &TestApp, agency: &str, role: &str, args: &[&str]) -> Output {
    Command::new(binary("nrmctl"))
        .args(args)
        .env("NRM_ENDPOINT", &app.endpoint)
        .env("NRM_ISSUER_KEY", issuer_key_path())
        .env("NRM_AGENCY", agency)
        .env("NRM_ROLE", role)
        .env("NRM_OFFICER", "worker-4")
        .env("NRM_NATS__URL", &app.settings.nats.url)
        .env_remove("NRM_TOKEN")
        .env_remove("NRM_OUTPUT")
        .output()
        .expect("run nrmctl")
}

fn stdout(output: &Output) -> String {
    assert!(
        output.status.success(),
        "nrmctl failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// The value of `field` in nrmctl's text output (`field: value` lines).
fn field(text: &str, field: &str) -> String {
    text.lines()
        .find_map(|line| line.strip_prefix(&format!("{field}:")))
        .unwrap_or_else(|| panic!("no {field} in {text}"))
        .trim()
        .to_owned()
}

const NOTIFY: [&str; 14] = [
    "case",
    "notify",
    "--found-country",
    "KG",
    "--country-of-exploitation",
    "RU",
    "--form",
    "labour",
    "--gender",
    "female",
    "--age-band",
    "25-34",
    "--citizenship",
    "KG",
];

// nrmctl runs as a blocking child process while the service answers on other threads.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_user_files_an_anonymous_notification_with_nrmctl_and_a_retry_prints_the_same_id() {
    let app = TestApp::spawn().await;
    let first: Vec<&str> = NOTIFY.iter().copied().chain(["--request-id", "walk-n-1"]).collect();
    let text = stdout(&nrmctl_as(&app, "kg-ngo-tirek", "ngo", &first));
    let id = field(&text, "notification_id");
    assert_eq!(id.parse::<uuid::Uuid>().expect("a UUID").get_version_num(), 7);
    assert_eq!(field(&text, "version"), "1");
    assert_eq!(field(&text, "replayed"), "false");
    assert_eq!(field(&text, "request_id"), "walk-n-1");

    let again = stdout(&nrmctl_as(&app, "kg-ngo-tirek", "ngo", &first));
    assert_eq!(field(&again, "notification_id"), id);
    assert_eq!(field(&again, "replayed"), "true");

    // JSON output.
    let json: Vec<&str> = ["--output", "json"].into_iter().chain(NOTIFY).collect();
    let answer: serde_json::Value =
        serde_json::from_str(&stdout(&nrmctl_as(&app, "kg-ngo-tirek", "ngo", &json))).expect("JSON output");
    assert_ne!(answer["notification_id"], id.as_str());
    assert_eq!(answer["result"]["aggregate_id"], answer["notification_id"]);

    // A child is reported, never only counted: the rule code is printed.
    let child: Vec<&str> = NOTIFY.iter().map(|a| if *a == "25-34" { "12-17" } else { a }).collect();
    let refused = nrmctl_as(&app, "kg-ngo-tirek", "ngo", &child);
    assert_eq!(refused.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(
        stderr.contains("FAILED_PRECONDITION") && stderr.contains("CHILD_MUST_BE_REPORTED"),
        "{stderr}"
    );

    // Without a form: the field is named.
    let no_form: Vec<&str> = NOTIFY
        .iter()
        .copied()
        .filter(|a| *a != "--form" && *a != "labour")
        .collect();
    let refused = nrmctl_as(&app, "kg-ngo-tirek", "ngo", &no_form);
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(
        stderr.contains("INVALID_ARGUMENT") && stderr.contains("exploitation_forms"),
        "{stderr}"
    );

    // Counted, not a case: the coordinator's case list is empty.
    app.tables().wait_until_quiescent().await;
    let list = stdout(&nrmctl_as(
        &app,
        "kg-coordinator",
        "coordinator",
        &["--output", "json", "case", "list"],
    ));
    assert!(!list.contains(&id), "{list}");
    assert_eq!(app.count("case_list").await, 0);
    app.stop().await;
}
