//! A service past what it can serve sheds the excess at its gate: a call
//! beyond `NRM_MAX_CALLS_IN_FLIGHT` waits at most `NRM_CALL_QUEUE_MS`, then
//! is refused `UNAVAILABLE` (`OVERLOADED`, with a pause to retry after) with
//! nothing of it written, while the calls let in go on and succeed, health
//! still answers, and the same request retried later runs as its first run.
//!
//! The service is held busy for certain, not by timing: the test holds the
//! audit chain's head row, so that every command let in waits in PostgreSQL
//! (with its turn at the gate) until the test lets go; the waiting backends
//! are those `pg_blocking_pids` names the test's own as blocking. After the
//! release the writes are counted exactly: the two let in, nothing of the
//! shed one (its events, answer and audit entry each missing).

#![allow(clippy::unwrap_used)] // Test code: a failed unwrap is a failed test.

use std::time::Duration;

use bytes::Bytes;
use nrm_e2e::raw::RawConnection;
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

async fn count(app: &TestApp, table: &str) -> i64 {
    app.count(table).await
}

#[tokio::test]
async fn a_call_beyond_the_limit_is_refused_after_its_wait_with_nothing_written_and_the_rest_are_served() {
    let mut s = settings();
    s.common.server = ServerSettings {
        max_calls_in_flight: Some(2),
        call_queue_ms: 200,
        ..s.common.server
    };
    let app = TestApp::spawn_with(s).await;
    let tables = app.tables();
    // A first report, so that everything a report touches exists, and
    // what one report writes is known.
    report(&app, &Uuid::now_v7().to_string()).await.unwrap();
    let before = tables.snapshot().await;
    let (events, audited) = (count(&app, "events").await, count(&app, "audit_log").await);
    assert!(events > 0 && audited > 0);

    // Every command appends to the audit chain under its head row's lock.
    let mut holder = app.pool.begin().await.unwrap();
    let holder_pid: i32 = sqlx::query_scalar("SELECT pg_backend_pid()")
        .fetch_one(&mut *holder)
        .await
        .unwrap();
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
        "both calls let in wait behind the chain's head",
        Duration::from_secs(10),
        || async { (nrm_e2e::blocked_by(&app.pool, holder_pid).await == 2).then_some(()) },
    )
    .await;

    // The third: refused while the two still wait (the head is still held,
    // so it cannot have waited for them), after waiting its turn.
    let shed_id = Uuid::now_v7().to_string();
    let sent = std::time::Instant::now();
    let refused = tokio::time::timeout(Duration::from_secs(5), report(&app, &shed_id))
        .await
        .expect("the call beyond the limit is answered while the others still wait")
        .expect_err("the call beyond the limit is refused");
    assert!(
        sent.elapsed() >= Duration::from_millis(200),
        "it waited NRM_CALL_QUEUE_MS for a turn first"
    );
    assert_eq!(refused.code(), Code::Unavailable, "{refused:?}");
    let details = refused.get_error_details();
    assert_eq!(details.error_info().map(|i| i.reason.as_str()), Some("OVERLOADED"));
    assert!(
        details.error_info().is_some_and(|i| i.metadata.is_empty()),
        "the limit is not told"
    );
    assert!(
        details.retry_info().and_then(|r| r.retry_delay).is_some(),
        "it says how long to pause"
    );
    assert!(refused.message().contains("nothing was done"), "{}", refused.message());
    assert_eq!(
        nrm_e2e::blocked_by(&app.pool, holder_pid).await,
        2,
        "the two let in still wait"
    );
    TableSnapshot::take(&app.pool)
        .await
        .assert_unchanged_since(&before, "the refused call, while the two let in wait");
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

    // Let go: the two let in are served, and exactly their writes follow.
    holder.rollback().await.unwrap();
    for call in in_flight {
        let answer = call.await.unwrap().expect("a call let in is served");
        assert!(!answer.case_id.is_empty());
    }
    tables.wait_until_quiescent().await;
    assert_eq!(count(&app, "commands").await, 3, "the first report and the two let in");
    assert_eq!(count(&app, "events").await, 3 * events);
    assert_eq!(
        count(&app, "audit_log").await,
        3 * audited,
        "nothing audited of the shed call"
    );

    // The refused one, sent again with its request ID, runs as a first run.
    let retried = report(&app, &shed_id).await.expect("the retry is served");
    assert!(
        !retried.result.unwrap().replayed,
        "the refused call had recorded nothing to replay"
    );
    assert_eq!(count(&app, "commands").await, 4);
    assert_eq!(count(&app, "events").await, 4 * events);
    app.stop().await;
}

#[tokio::test]
async fn a_flood_of_anonymous_refusals_does_not_shed_an_insiders_denied_attempt() {
    let mut s = settings();
    // Four calls at once: anonymous refusals wait in a lane of one.
    s.common.server = ServerSettings {
        max_calls_in_flight: Some(4),
        call_queue_ms: 200,
        ..s.common.server
    };
    let app = TestApp::spawn_with(s).await;
    let before = count(&app, "audit_log").await;
    // Every refusal's entry waits behind the audit chain's head.
    let mut holder = app.pool.begin().await.unwrap();
    let holder_pid: i32 = sqlx::query_scalar("SELECT pg_backend_pid()")
        .fetch_one(&mut *holder)
        .await
        .unwrap();
    sqlx::query("SELECT seq FROM audit_chain_head FOR UPDATE")
        .execute(&mut *holder)
        .await
        .unwrap();
    let call = |bearer: String| {
        let client = app.client.clone();
        tokio::spawn(async move {
            let mut client = client;
            client
                .report_presumed_victim(authorized(
                    report_request(&Uuid::now_v7().to_string(), person("Aigul Asanova", "AC1234567", "")),
                    &bearer,
                ))
                .await
                .map(drop)
        })
    };
    // The anonymous lane's one turn, taken.
    let anonymous = call("not-a-token".into());
    eventually(
        "the anonymous refusal's entry waits behind the chain's head",
        Duration::from_secs(10),
        || async { (nrm_e2e::blocked_by(&app.pool, holder_pid).await == 1).then_some(()) },
    )
    .await;
    // The next anonymous one finds the lane full and is shed as any call.
    let shed = tokio::time::timeout(Duration::from_secs(5), call("still-not-a-token".into()))
        .await
        .expect("the shed refusal is answered while the first waits")
        .unwrap()
        .expect_err("refused");
    assert_eq!(shed.code(), Code::Unavailable, "{shed:?}");
    assert_eq!(
        shed.get_error_details().error_info().map(|i| i.reason.as_str()),
        Some("OVERLOADED")
    );
    assert!(shed.message().contains("nothing was done"), "{}", shed.message());

    // An insider with a valid token and a role the matrix refuses is not
    // shed by the anonymous flood: its entry waits behind the head too.
    let insider = call(token("kg-audit", Role::Auditor, "auditor-3"));
    eventually(
        "the insider's denied attempt waits for its entry, not shed",
        Duration::from_secs(10),
        || async { (nrm_e2e::blocked_by(&app.pool, holder_pid).await == 2).then_some(()) },
    )
    .await;
    assert!(!insider.is_finished(), "not answered before its entry is written");

    holder.rollback().await.unwrap();
    let anonymous = anonymous.await.unwrap().expect_err("refused");
    assert_eq!(anonymous.code(), Code::Unauthenticated);
    let insider = insider.await.unwrap().expect_err("refused");
    assert_eq!(insider.code(), Code::PermissionDenied);
    let entries: Vec<(String, String, String)> =
        sqlx::query_as("SELECT agency, action, outcome FROM audit_log ORDER BY seq OFFSET $1")
            .bind(before)
            .fetch_all(&app.pool)
            .await
            .unwrap();
    assert_eq!(
        entries,
        [
            (
                "-".into(),
                "ReportPresumedVictim:unauthenticated".into(),
                "unauthenticated".into()
            ),
            ("kg-audit".into(), "ReportPresumedVictim:denied".into(), "denied".into()),
        ],
        "both answered refusals are audited; the shed one, which ran nothing, is not"
    );
    let metrics = nrm_e2e::canary::get(&app.metrics_url).await;
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("nrm_refusals_shed_total{lane=\"refusals\"}")),
        "the shed refusal is counted:\n{metrics}"
    );
    app.stop().await;
}

/// Holds the audit chain's head in a transaction of the test's own, so
/// that every audit entry waits in PostgreSQL; its backend's pid.
async fn hold_chain(app: &TestApp) -> (sqlx::Transaction<'static, sqlx::Postgres>, i32) {
    let mut holder = app.pool.begin().await.unwrap();
    let pid: i32 = sqlx::query_scalar("SELECT pg_backend_pid()")
        .fetch_one(&mut *holder)
        .await
        .unwrap();
    sqlx::query("SELECT seq FROM audit_chain_head FOR UPDATE")
        .execute(&mut *holder)
        .await
        .unwrap();
    (holder, pid)
}

const REPORT: &str = "/nrm.identification.v1.IdentificationService/ReportPresumedVictim";

#[tokio::test]
async fn one_callers_flood_of_denied_calls_does_not_shed_another_agencys_permitted_call() {
    let mut s = settings();
    // Four turns: one caller holds at most one with its refusals.
    s.common.server = ServerSettings {
        max_calls_in_flight: Some(4),
        call_queue_ms: 200,
        ..s.common.server
    };
    let app = TestApp::spawn_with(s).await;
    let before = count(&app, "audit_log").await;
    let (holder, holder_pid) = hold_chain(&app).await;
    let denied = || {
        let client = app.client.clone();
        tokio::spawn(async move {
            let mut client = client;
            client
                .report_presumed_victim(authorized(
                    report_request(&Uuid::now_v7().to_string(), person("Aigul Asanova", "AC1234567", "")),
                    &token("kg-audit", Role::Auditor, "auditor-3"),
                ))
                .await
                .map(drop)
        })
    };
    // The first denied call takes the caller's one refusal turn and waits
    // for its entry; the flood after it is shed at once.
    let first = denied();
    eventually(
        "the first denial's entry waits behind the chain's head",
        Duration::from_secs(10),
        || async { (nrm_e2e::blocked_by(&app.pool, holder_pid).await == 1).then_some(()) },
    )
    .await;
    for _ in 1..6 {
        let shed = tokio::time::timeout(Duration::from_secs(5), denied())
            .await
            .expect("a denial over the caller's share is answered at once")
            .unwrap()
            .expect_err("refused");
        assert_eq!(shed.code(), Code::Unavailable, "{shed:?}");
        assert_eq!(
            shed.get_error_details().error_info().map(|i| i.reason.as_str()),
            Some("OVERLOADED")
        );
    }
    // Another agency's permitted call still gets its turn: it waits in
    // PostgreSQL behind the head too, not shed at the gate.
    let permitted = tokio::spawn({
        let app_client = app.client.clone();
        async move {
            let mut client = app_client;
            client
                .report_presumed_victim(authorized(
                    report_request(
                        &Uuid::now_v7().to_string(),
                        person("Aigul Asanova", "AC1234567", "+996 555 000 111"),
                    ),
                    &token("kg-mvd", Role::Police, "officer-17"),
                ))
                .await
                .map(drop)
        }
    });
    eventually(
        "the permitted call waits in PostgreSQL, not shed",
        Duration::from_secs(10),
        || async { (nrm_e2e::blocked_by(&app.pool, holder_pid).await == 2).then_some(()) },
    )
    .await;
    holder.rollback().await.unwrap();
    permitted.await.unwrap().expect("the permitted call is served");
    let first = first.await.unwrap().expect_err("refused");
    assert_eq!(first.code(), Code::PermissionDenied);
    let denials: i64 =
        sqlx::query_scalar("SELECT count(*) FROM (SELECT action FROM audit_log ORDER BY seq OFFSET $1) a WHERE action = 'ReportPresumedVictim:denied'")
            .bind(before)
            .fetch_one(&app.pool)
            .await
            .unwrap();
    assert_eq!(denials, 1, "the answered denial is audited; the shed ones ran nothing");
    let metrics = nrm_e2e::canary::get(&app.metrics_url).await;
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("nrm_refusals_shed_total{lane=\"actor\"}")),
        "the shed denials are counted:\n{metrics}"
    );
    app.stop().await;
}

#[tokio::test]
async fn one_caller_filling_its_body_share_does_not_shed_another_callers_small_call() {
    let mut s = settings();
    // Two turns: a budget of four bodies of 4 MiB; one caller's share is two.
    s.common.server = ServerSettings {
        max_calls_in_flight: Some(2),
        call_queue_ms: 300,
        ..s.common.server
    };
    let app = TestApp::spawn_with(s).await;
    let flooder = token("kg-mvd", Role::Police, "officer-99");
    let mut raw = RawConnection::open(&app.endpoint, 65_535).await;
    // Five streams, each 4 MiB of a message that never ends: without a
    // share, four would fill the whole budget.
    let mut streams = Vec::new();
    for _ in 0..5 {
        let (answer, mut stream) = raw.call(REPORT, Some(&flooder)).await;
        let mut chunk = vec![0u8; 4 * 1024 * 1024];
        chunk[1..5].copy_from_slice(&(4u32 * 1024 * 1024).to_be_bytes());
        stream.send_data(Bytes::from(chunk), false).unwrap();
        streams.push((answer, stream));
    }
    // The three streams past its share of two bodies are shed as their
    // bytes come (waited for, not slept on: the two within its share are
    // not answered before their 10 s deadline).
    let mut answered = vec![false; streams.len()];
    let mut shed = 0;
    let waiting = tokio::time::Instant::now();
    while shed < 3 && waiting.elapsed() < Duration::from_secs(8) {
        for ((answer, _), answered) in streams.iter_mut().zip(&mut answered) {
            if *answered {
                continue;
            }
            if let Ok(Ok(response)) = tokio::time::timeout(Duration::from_millis(20), &mut *answer).await {
                *answered = true;
                let status = tonic::Status::from_header_map(response.headers());
                if status.as_ref().map(tonic::Status::code) == Some(Code::Unavailable) {
                    shed += 1;
                }
            }
        }
    }
    assert_eq!(shed, 3, "the caller's bodies past its share are shed");
    // While its two bodies still hold their share, another caller's small
    // call is read at once and served.
    report(&app, &Uuid::now_v7().to_string())
        .await
        .expect("another caller's call is served, not shed for room");
    drop(streams);
    app.stop().await;
}

#[tokio::test]
async fn a_denial_whose_client_resets_while_it_waits_for_its_turn_is_still_audited() {
    let mut s = settings();
    // One turn for anonymous refusals, and a long wait for it.
    s.common.server = ServerSettings {
        max_calls_in_flight: Some(1),
        call_queue_ms: 10_000,
        ..s.common.server
    };
    let app = TestApp::spawn_with(s).await;
    let before = count(&app, "audit_log").await;
    let (holder, holder_pid) = hold_chain(&app).await;
    let mut raw = RawConnection::open(&app.endpoint, 65_535).await;
    let (first, _first_stream) = raw.call(REPORT, Some("not-a-token")).await;
    eventually(
        "the first refusal's entry waits behind the chain's head",
        Duration::from_secs(10),
        || async { (nrm_e2e::blocked_by(&app.pool, holder_pid).await == 1).then_some(()) },
    )
    .await;
    // The second waits for the lane's one turn; its client goes away.
    let (second, mut second_stream) = raw.call(REPORT, Some("still-not-a-token")).await;
    raw.round_trip().await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    second_stream.send_reset(h2::Reason::CANCEL);
    raw.round_trip().await;
    assert!(second.await.is_err(), "reset before any answer");
    holder.rollback().await.unwrap();
    let _ = first.await;
    let entries = eventually("both refusals' entries", Duration::from_secs(15), || async {
        let n: i64 = count(&app, "audit_log").await - before;
        (n == 2).then_some(n)
    })
    .await;
    assert_eq!(entries, 2);
    app.stop().await;
}
