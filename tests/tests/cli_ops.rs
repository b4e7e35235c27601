//! `nrmctl ops …` as an operator runs it, against a real identification
//! service: parked items listed and retried, the stream refilled from the
//! store, and every other role refused.

#![allow(clippy::unwrap_used)] // Test code: a failed unwrap is a failed test.

use std::process::{Command, Output};
use std::time::Duration;

use nrm_e2e::{TestApp, authorized, binary, eventually, issuer_key_path, person, report_request, settings, token};
use nrm_kernel::auth::Role;
use nrm_kernel::retry::RetryPolicy;

/// Endpoints nothing listens on, for the services a test does not start.
const NOBODY: &str = "http://127.0.0.1:1";

fn nrmctl(app: &TestApp, role: &str, args: &[&str]) -> Output {
    Command::new(binary("nrmctl"))
        .args(args)
        .env("NRM_ENDPOINT", &app.endpoint)
        .env("NRM_REFERRAL_ENDPOINT", NOBODY)
        .env("NRM_SHELTER_ENDPOINT", NOBODY)
        .env("NRM_REPATRIATION_ENDPOINT", NOBODY)
        .env("NRM_CASEPATH_ENDPOINT", NOBODY)
        .env("NRM_ISSUER_KEY", issuer_key_path())
        .env("NRM_AGENCY", "kg-ops")
        .env("NRM_ROLE", role)
        .env("NRM_OFFICER", "operator-1")
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

fn json(output: &Output) -> serde_json::Value {
    serde_json::from_str(&stdout(output)).expect("JSON output")
}

/// The items `ops parked --service identification` lists, as JSON.
fn parked_items(app: &TestApp) -> Vec<serde_json::Value> {
    let listed = json(&nrmctl(
        app,
        "operator",
        &["--output", "json", "ops", "parked", "--service", "identification"],
    ));
    listed["identification"]["items"].as_array().expect("items").clone()
}

/// The data rows of a table printed by nrmctl, split on whitespace (the
/// last column, free text, is not looked at).
fn rows(text: &str) -> Vec<Vec<String>> {
    text.lines()
        .skip(1)
        .filter(|line| !line.trim().is_empty())
        .map(|line| line.split_whitespace().map(str::to_owned).collect())
        .collect()
}

// nrmctl runs as a blocking child process while the service answers on other threads.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fresh_service_has_no_parked_items() {
    let app = TestApp::spawn().await;
    let listed = stdout(&nrmctl(
        &app,
        "operator",
        &["ops", "parked", "--service", "identification"],
    ));
    assert_eq!(listed, "no parked items (identification)\n");
    assert_eq!(
        json(&nrmctl(
            &app,
            "operator",
            &["--output", "json", "ops", "parked", "--service", "identification"]
        )),
        serde_json::json!({"identification": {"items": []}})
    );

    // By default every service is asked: the answer of the one running is
    // printed, the others are named on stderr, and the exit code says so.
    let all = nrmctl(&app, "operator", &["ops", "parked"]);
    assert_eq!(all.status.code(), Some(1));
    assert_eq!(
        String::from_utf8_lossy(&all.stdout),
        "no parked items (identification)\n"
    );
    let errors = String::from_utf8_lossy(&all.stderr);
    assert!(errors.contains("error: referral: cannot connect to"), "{errors}");
    assert!(errors.contains("error: shelter: cannot connect to"), "{errors}");
    assert!(
        errors.contains("4 of 5 services did not answer: referral, shelter, repatriation, casepath"),
        "{errors}"
    );
    // A refill of every service asks those that publish a stream: casepath,
    // which only reads, is not among them.
    let refill = nrmctl(&app, "operator", &["ops", "refill", "--dry-run"]);
    assert_eq!(refill.status.code(), Some(1));
    let errors = String::from_utf8_lossy(&refill.stderr);
    assert!(
        errors.contains("3 of 4 services did not answer: referral, shelter, repatriation"),
        "{errors}"
    );
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_operator_lists_and_retries_a_parked_message_and_refills_the_stream_with_nrmctl() {
    let mut quick = settings();
    quick.retry = RetryPolicy {
        attempts: 3,
        first_ms: 20,
        max_ms: 50,
    };
    let app = TestApp::spawn_with(quick).await;
    app.client
        .clone()
        .report_presumed_victim(authorized(
            report_request("ops-1", person("Test Person", "AB7654321", "")),
            &token("kg-mvd", Role::Police, "officer-1"),
        ))
        .await
        .unwrap();
    let commit_id = app.wait_for_messages(1).await[0]
        .headers
        .get("Nats-Msg-Id")
        .unwrap()
        .as_str()
        .to_owned();

    // A message no handler can decode, on a case's subject: sequence 2.
    let subject = format!(
        "{}.identification.v1.case.{}",
        app.settings.nats.subject_prefix,
        uuid::Uuid::now_v7()
    );
    let poison_subject = subject.clone();
    app.jetstream
        .publish(subject, b"not a commit".as_slice().into())
        .await
        .unwrap()
        .await
        .unwrap();

    let item = eventually("the poison message is parked", Duration::from_secs(20), || async {
        parked_items(&app).into_iter().next()
    })
    .await;
    assert_eq!(item["kind"], "PARKED_KIND_MESSAGE", "{item}");
    assert_eq!(item["owner"], "identification_case_list", "{item}");
    assert_eq!(item["item_id"], "2", "{item}");
    assert_eq!(item["source"], app.stream_name(), "{item}");
    // Undecodable: parked at its first failure, with nothing held behind it.
    assert_eq!(item["attempts"], 1, "{item}");
    assert_eq!(item["retry_requested"], false, "{item}");
    assert_eq!(parked_items(&app).len(), 1);

    // The text: a header and one line with the item's IDs.
    let listed = stdout(&nrmctl(
        &app,
        "operator",
        &["ops", "parked", "--service", "identification"],
    ));
    assert_eq!(
        listed.lines().next().unwrap().split_whitespace().collect::<Vec<_>>(),
        [
            "service",
            "kind",
            "owner",
            "item_id",
            "source",
            "subject",
            "commit_id",
            "attempts",
            "parked_at",
            "retry_requested",
            "last_error"
        ],
        "{listed}"
    );
    let row = &rows(&listed)[..];
    assert_eq!(row.len(), 1, "{listed}");
    assert_eq!(
        row[0][..8],
        [
            "identification",
            "message",
            "identification_case_list",
            "2",
            &app.stream_name(),
            &poison_subject,
            "-",
            "1"
        ],
        "{listed}"
    );
    assert_eq!(row[0][9], "false", "{listed}");

    // A retry: asked, then run by the projection's runner; it fails again,
    // so the item stays parked with one more attempt counted.
    let retried = stdout(&nrmctl(
        &app,
        "operator",
        &[
            "ops",
            "retry",
            "--service",
            "identification",
            "--kind",
            "message",
            "--owner",
            "identification_case_list",
            "--item",
            "2",
        ],
    ));
    assert!(retried.contains("owner:   identification_case_list"), "{retried}");
    assert!(retried.contains("item_id: 2"), "{retried}");
    assert!(retried.contains("within about a second"), "{retried}");
    eventually("the runner tried it again", Duration::from_secs(20), || async {
        let items = parked_items(&app);
        // A read model's message is retried by a rebuild: it fails once
        // more and is parked again.
        (items.len() == 1 && items[0]["attempts"] == 2 && items[0]["retry_requested"] == false).then_some(())
    })
    .await;

    // A retry of an item that is not parked names it.
    let missing = nrmctl(
        &app,
        "operator",
        &[
            "ops",
            "retry",
            "--service",
            "identification",
            "--kind",
            "message",
            "--owner",
            "identification_case_list",
            "--item",
            "99",
        ],
    );
    assert_eq!(missing.status.code(), Some(1));
    assert_eq!(
        String::from_utf8_lossy(&missing.stderr),
        "error: NOT_FOUND: parked item 99 not found\n"
    );
    let bad = nrmctl(
        &app,
        "operator",
        &[
            "ops",
            "retry",
            "--service",
            "identification",
            "--kind",
            "message",
            "--owner",
            "identification_case_list",
            "--item",
            "two",
        ],
    );
    assert_eq!(bad.status.code(), Some(1));
    let errors = String::from_utf8_lossy(&bad.stderr);
    assert!(
        errors.starts_with("error: INVALID_ARGUMENT: invalid fields: item_id\n"),
        "{errors}"
    );
    assert!(errors.contains("  item_id: must be the stream sequence"), "{errors}");

    // Refill when the stream lacks nothing: the counts, nothing requeued.
    let refilled = eventually("the commit counts as published", Duration::from_secs(20), || async {
        let refilled = json(&nrmctl(
            &app,
            "operator",
            &["--output", "json", "ops", "refill", "--service", "identification"],
        ));
        (refilled["identification"]["published_commits"] == "1").then_some(refilled)
    })
    .await;
    assert_eq!(
        refilled["identification"],
        serde_json::json!({
            "stream": app.stream_name(),
            "stream_messages": "2",
            "published_commits": "1",
            "aggregates_checked": "1",
            "aggregates_behind": "0",
            "missing": "0",
            "requeued": "0",
        })
    );

    // JetStream loses the stream: a dry run counts what is missing and puts
    // nothing back; the refill requeues the commit, the relay publishes it
    // again under its original commit ID.
    app.jetstream.delete_stream(app.stream_name()).await.unwrap();
    let counted = json(&nrmctl(
        &app,
        "operator",
        &[
            "--output",
            "json",
            "ops",
            "refill",
            "--service",
            "identification",
            "--dry-run",
        ],
    ));
    assert_eq!(counted["identification"]["missing"], "1", "{counted}");
    assert_eq!(counted["identification"]["requeued"], "0", "{counted}");
    assert_eq!(app.count("outbox").await, 0, "a dry run puts nothing back");
    let refilled = stdout(&nrmctl(
        &app,
        "operator",
        &["ops", "refill", "--service", "identification"],
    ));
    let header = refilled.lines().next().unwrap();
    assert_eq!(
        header.split_whitespace().collect::<Vec<_>>(),
        [
            "service",
            "stream",
            "stream_messages",
            "published_commits",
            "aggregates_checked",
            "aggregates_behind",
            "missing",
            "requeued"
        ],
        "{refilled}"
    );
    let counts = &rows(&refilled)[0];
    assert_eq!(
        counts[..],
        ["identification", &app.stream_name(), "0", "1", "1", "1", "1", "1"],
        "{refilled}"
    );
    assert!(refilled.contains("the relay publishes them"), "{refilled}");
    let again = app.wait_for_messages(1).await;
    assert_eq!(again.len(), 1);
    assert_eq!(again[0].headers.get("Nats-Msg-Id").unwrap().as_str(), commit_id);
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_the_operator_role_may_run_the_ops_commands() {
    let app = TestApp::spawn().await;
    let commands: [&[&str]; 3] = [
        &["ops", "parked", "--service", "identification"],
        &[
            "ops",
            "retry",
            "--service",
            "identification",
            "--kind",
            "timer",
            "--owner",
            "referral_deadline",
            "--item",
            "0190a8a4-0000-7000-8000-000000000000",
        ],
        &["ops", "refill", "--service", "identification"],
    ];
    for role in Role::ALL.iter().filter(|role| **role != Role::Operator) {
        for args in commands {
            let refused = nrmctl(&app, role.as_str(), args);
            let errors = String::from_utf8_lossy(&refused.stderr);
            assert_eq!(refused.status.code(), Some(1), "{role} {args:?}: {errors}");
            assert!(
                errors.starts_with(&format!(
                    "error: PERMISSION_DENIED: permission denied: role {role} may not "
                )),
                "{role} {args:?}: {errors}"
            );
            assert!(errors.contains("allowed: operator"), "{errors}");
            assert!(refused.stdout.is_empty(), "{role} {args:?}: nothing on stdout");
        }
    }
    // The operator may: the timer is not parked, which is NOT_FOUND, not a refusal.
    let retried = nrmctl(&app, "operator", commands[1]);
    assert_eq!(
        String::from_utf8_lossy(&retried.stderr),
        "error: NOT_FOUND: parked item 0190a8a4-0000-7000-8000-000000000000 not found\n"
    );
    app.stop().await;
}
