//! The identification service as its own process: killed between commit and
//! publish, restarted, stopped with SIGTERM (also while a client holds a
//! stream it does not read, and while a health watch is open).

#![allow(clippy::unwrap_used)] // Test code: a failed unwrap is a failed test.

use std::io::{BufRead as _, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use futures::StreamExt as _;
use nrm_e2e::raw::{RawConnection, grpc_frame};
use nrm_e2e::tables::ServiceTables;
use nrm_e2e::{TestApp, authorized, binary, messages, person, report_request, service_env, settings, token};
use nrm_kernel::auth::Role;
use nrm_kernel::server::{DRAIN_TIMEOUT, STOP_LIMIT};
use nrm_proto::identification::v1::identification_service_client::IdentificationServiceClient;

/// Starts the binary and returns it with the gRPC address from its log.
fn start(extra: &[(&str, &str)], settings: &nrm_identification::config::Settings) -> (Child, String) {
    let mut command = Command::new(binary("identification"));
    command
        .envs(service_env(settings))
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    for (k, v) in extra {
        command.env(k, v);
    }
    let mut child = command.spawn().expect("start the service");
    let stdout = child.stdout.take().expect("stdout");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut sent = false;
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if !sent && line.contains("identification service listening") {
                let addr = line
                    .split("\"grpc\":\"")
                    .nth(1)
                    .and_then(|rest| rest.split('"').next())
                    .unwrap_or_default()
                    .to_owned();
                let _ = tx.send(addr);
                sent = true;
            }
        }
    });
    let addr = rx.recv_timeout(Duration::from_secs(30)).expect("the service starts");
    (child, format!("http://{addr}"))
}

async fn stream_messages(settings: &nrm_identification::config::Settings) -> usize {
    let nats = async_nats::connect(settings.nats.url.as_str()).await.unwrap();
    let js = async_nats::jetstream::new(nats);
    messages(&js, &format!("{}_IDENTIFICATION", settings.nats.stream_prefix))
        .await
        .len()
}

#[tokio::test]
async fn a_service_killed_after_commit_and_before_publish_publishes_exactly_once_after_restart() {
    let settings = settings();
    // Relay off: the command commits, the event waits in the outbox.
    let (mut child, endpoint) = start(&[("NRM_RELAY__ENABLED", "false")], &settings);
    let mut client = IdentificationServiceClient::connect(endpoint).await.unwrap();
    let reported = client
        .report_presumed_victim(authorized(
            report_request("crash-1", person("Name Surname", "AB12345", "")),
            &token("kg-mvd", Role::Police, "officer-1"),
        ))
        .await
        .expect("the command is acknowledged")
        .into_inner();
    assert_eq!(stream_messages(&settings).await, 0);
    let tables = ServiceTables::identification(&settings.database, &settings.nats.url).await;
    let waiting: i64 = sqlx::query_scalar("SELECT count(*) FROM outbox")
        .fetch_one(tables.pool())
        .await
        .unwrap();
    assert_eq!(waiting, 1, "the commit waits in the outbox when the process dies");
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();

    let (mut child, endpoint) = start(&[], &settings);
    // The restarted relay is done once the outbox is empty (a row goes only
    // after JetStream acknowledged it): nothing more will be published.
    tables.wait_until_quiescent().await;
    assert_eq!(stream_messages(&settings).await, 1, "published exactly once");
    tables.close().await;

    // The acknowledged case survived the kill.
    let mut client = IdentificationServiceClient::connect(endpoint).await.unwrap();
    let case = client
        .get_case(authorized(
            nrm_proto::identification::v1::GetCaseRequest {
                case_id: reported.case_id,
                ..Default::default()
            },
            &token("kg-mvd", Role::Police, "officer-1"),
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(case.version, 1);

    // SIGTERM stops it cleanly.
    let status = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let deadline = Instant::now() + Duration::from_secs(15);
    let exit = loop {
        if let Some(exit) = child.try_wait().unwrap() {
            break exit;
        }
        assert!(Instant::now() < deadline, "the service did not stop on SIGTERM");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(exit.success(), "graceful shutdown exits 0, got {exit}");
    let nats = async_nats::connect(settings.nats.url.as_str()).await.unwrap();
    let _ = async_nats::jetstream::new(nats)
        .delete_stream(format!("{}_IDENTIFICATION", settings.nats.stream_prefix))
        .await;
    let _ = nrm_kernel::db::drop_database(&settings.database).await;
}

#[tokio::test]
async fn sigterm_ends_the_process_within_its_stop_limit_while_a_client_holds_a_stream_it_does_not_read() {
    let settings = settings();
    let (mut child, endpoint) = start(&[], &settings);
    // A health watch from a client that grants no flow-control window: the
    // server can send none of its answers, so the stream cannot end and
    // the connection cannot close by itself.
    let mut raw = RawConnection::open(&endpoint, 0).await;
    let (answer, mut stream) = raw.call("/grpc.health.v1.Health/Watch", None).await;
    stream
        .send_data(
            grpc_frame(&tonic_health::pb::HealthCheckRequest { service: String::new() }),
            true,
        )
        .unwrap();
    let answer = tokio::time::timeout(Duration::from_secs(10), answer)
        .await
        .expect("the watch's headers")
        .expect("the watch is open");
    assert_eq!(answer.status(), 200);

    let status = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let asked = Instant::now();
    // systemd's TimeoutStopSec is 30 s; the stop must never need it.
    let deadline = asked + STOP_LIMIT + Duration::from_secs(3);
    let exit = loop {
        if let Some(exit) = child.try_wait().unwrap() {
            break exit;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            panic!("the service did not stop within {STOP_LIMIT:?} of SIGTERM");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let took = asked.elapsed();
    assert!(exit.success(), "a stop past the drain exits 0, got {exit}");
    assert!(
        took >= DRAIN_TIMEOUT - Duration::from_millis(500),
        "the unread stream held the stop until the drain was over ({took:?}): the test held what it says"
    );
    drop(raw);
    let nats = async_nats::connect(settings.nats.url.as_str()).await.unwrap();
    let _ = async_nats::jetstream::new(nats)
        .delete_stream(format!("{}_IDENTIFICATION", settings.nats.stream_prefix))
        .await;
    let _ = nrm_kernel::db::drop_database(&settings.database).await;
}

#[tokio::test]
async fn a_health_watch_is_told_not_serving_and_ended_when_the_stop_is_asked_without_holding_the_stop() {
    let app = TestApp::spawn().await;
    let channel = tonic::transport::Channel::from_shared(app.endpoint.clone())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut health = tonic_health::pb::health_client::HealthClient::new(channel);
    let mut watch = health
        .watch(tonic_health::pb::HealthCheckRequest { service: String::new() })
        .await
        .unwrap()
        .into_inner();
    let serving = tonic_health::pb::health_check_response::ServingStatus::Serving as i32;
    // Not serving until the first check of the store; then serving.
    loop {
        let status = tokio::time::timeout(Duration::from_secs(10), watch.next())
            .await
            .expect("a status within 10 s")
            .expect("the watch is open")
            .unwrap()
            .status;
        if status == serving {
            break;
        }
    }
    let watching = tokio::spawn(async move {
        let mut seen = Vec::new();
        while let Some(status) = watch.next().await {
            seen.push(status.map(|s| s.status).map_err(|e| e.code()));
        }
        seen
    });
    let took = app.stop_timed().await.expect("the service stops");
    assert!(
        took < DRAIN_TIMEOUT,
        "the open watch must not hold the stop until the drain is over ({took:?})"
    );
    let seen = tokio::time::timeout(Duration::from_secs(5), watching)
        .await
        .expect("the watch ended")
        .unwrap();
    let not_serving = tonic_health::pb::health_check_response::ServingStatus::NotServing as i32;
    assert_eq!(
        seen.last(),
        Some(&Ok(not_serving)),
        "told not serving, then ended: {seen:?}"
    );
}
