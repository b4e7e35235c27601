//! A service past what it can serve sheds the excess at its gate: a call
//! beyond `NRM_MAX_CALLS_IN_FLIGHT` waits at most `NRM_CALL_QUEUE_MS`, then
//! is refused `UNAVAILABLE` (`OVERLOADED`, with a pause to retry after) with
//! nothing of it written, while the calls let in go on and succeed, health
//! still answers, and the same request retried later runs as its first run.
//!
//! The service is held busy for certain, not by timing: the test holds the
//! audit chain's head row, so that every command let in waits in PostgreSQL
//! (with its turn at the gate) until the test lets go.

#![allow(clippy::unwrap_used)] // Test code: a failed unwrap is a failed test.

use std::time::Duration;

use nrm_e2e::tables::TableSnapshot;
use nrm_e2e::{TestApp, authorized, eventually, health, person, report_request, settings, token};
use nrm_kernel::auth::Role;
use nrm_kernel::settings::ServerSettings;
use nrm_proto::identification::v1 as pb;
use tonic::Code;
use tonic_types::StatusExt as _;
use uuid::Uuid;

async fn report(app: &TestApp, request_id: &str) -> Result<pb::ReportPresumedVictimResponse, tonic::Status> {
    app.client
        .clone()
        .report_presumed_victim(authorized(
            report_request(request_id, person("Aigul Asanova", "AC1234567", "+996 555 000 111")),
            &token("kg-mvd", Role::Police, "officer-17"),
        ))
        .await
        .map(tonic::Response::into_inner)
}

/// Backends of the service's database waiting for a lock.
async fn waiting_for_a_lock(app: &TestApp) -> i64 {
    sqlx::query_scalar(
        "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND wait_event_type = 'Lock'",
    )
    .fetch_one(&app.pool)
    .await
    .unwrap()
}

#[tokio::test]
async fn a_call_beyond_the_limit_is_refused_at_once_with_nothing_written_and_the_rest_are_served() {
    let mut s = settings();
    s.common.server = ServerSettings {
        max_calls_in_flight: Some(2),
        call_queue_ms: 200,
        ..s.common.server
    };
    let app = TestApp::spawn_with(s).await;
    // A first report, so that everything a report touches exists.
    report(&app, &Uuid::now_v7().to_string()).await.unwrap();

    // Every command appends to the audit chain under its head row's lock.
    let mut holder = app.pool.begin().await.unwrap();
    sqlx::query("SELECT seq FROM audit_chain_head FOR UPDATE")
        .execute(&mut *holder)
        .await
        .unwrap();
    let in_flight: Vec<_> = (0..2)
        .map(|_| {
            let client = app.client.clone();
            let request_id = Uuid::now_v7().to_string();
            tokio::spawn(async move {
                let mut client = client;
                client
                    .report_presumed_victim(authorized(
                        report_request(&request_id, person("Aigul Asanova", "AC1234567", "+996 555 000 111")),
                        &token("kg-mvd", Role::Police, "officer-17"),
                    ))
                    .await
                    .map(tonic::Response::into_inner)
            })
        })
        .collect();
    eventually(
        "both calls let in wait for the chain's head",
        Duration::from_secs(10),
        || async { (waiting_for_a_lock(&app).await >= 2).then_some(()) },
    )
    .await;
    let before = TableSnapshot::take(&app.pool).await;

    // The third: refused while the two still wait (the head is still held,
    // so it cannot have waited for them), and nothing of it written.
    let shed_id = Uuid::now_v7().to_string();
    let refused = tokio::time::timeout(Duration::from_secs(5), report(&app, &shed_id))
        .await
        .expect("the call beyond the limit is answered while the others still wait")
        .expect_err("the call beyond the limit is refused");
    assert_eq!(refused.code(), Code::Unavailable, "{refused:?}");
    let details = refused.get_error_details();
    assert_eq!(details.error_info().map(|i| i.reason.as_str()), Some("OVERLOADED"));
    assert!(
        details.retry_info().and_then(|r| r.retry_delay).is_some(),
        "it says how long to pause"
    );
    assert!(refused.message().contains("nothing was done"), "{}", refused.message());
    TableSnapshot::take(&app.pool)
        .await
        .assert_unchanged_since(&before, "the refused call");
    assert_eq!(
        health(&app.endpoint, "").await,
        1,
        "health is served while the calls are held back"
    );
    let metrics = nrm_e2e::canary::get(&app.metrics_url).await;
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("nrm_calls_shed_total{rpc=\"ReportPresumedVictim\"}")),
        "the shed call is counted:\n{metrics}"
    );

    // Let go: the two let in are served.
    holder.rollback().await.unwrap();
    for call in in_flight {
        let answer = call.await.unwrap().expect("a call let in is served");
        assert!(!answer.case_id.is_empty());
    }
    // The refused one, sent again with its request ID, runs as a first run.
    let retried = report(&app, &shed_id).await.expect("the retry is served");
    assert!(
        !retried.result.unwrap().replayed,
        "the refused call had recorded nothing to replay"
    );
    let commands: i64 = sqlx::query_scalar("SELECT count(*) FROM commands")
        .fetch_one(&app.pool)
        .await
        .unwrap();
    assert_eq!(commands, 4);
    app.stop().await;
}
