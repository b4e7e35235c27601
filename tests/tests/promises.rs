//! The kernel's promises under faults (issue 8), each against the real
//! servers and each able to fail when its promise is broken:
//! version order per aggregate whatever the transaction IDs, no event skipped
//! after a lost delivery, replicas applying each message once and in order,
//! the crash window between JetStream's acknowledgement and the outbox delete
//! at process level, poison timers and messages parked without delaying the
//! others, the event store refilling a deleted stream, a service taking
//! commands while NATS is down, and reflection listing what is served.

#![allow(clippy::unwrap_used)] // Test code: a failed unwrap is a failed test.

use std::future::Future;
use std::os::unix::process::ExitStatusExt as _;
use std::time::{Duration, Instant};

use futures::StreamExt as _;
use nrm_e2e::fixtures::{CASE_TIMER, CaseTimer, append_case, case_list, metadata, reported};
use nrm_e2e::{Parts, ServiceProcess, TestApp, authorized, person, process_env, report_request, settings, token};
use nrm_identification::projections::CaseList;
use nrm_kernel::auth::Role;
use nrm_kernel::projection::{Delivery, Outcome, Projection, ProjectionRunner};
use nrm_kernel::retry::RetryPolicy;
use nrm_kernel::store::{EventStore, UnitOfWork};
use nrm_proto::common::v1 as common;
use nrm_proto::common::v1::operator_service_client::OperatorServiceClient;
use nrm_proto::identification::v1 as pb;
use nrm_proto::identification::v1::identification_service_client::IdentificationServiceClient;
use sqlx::PgConnection;
use uuid::Uuid;

/// Polls `check` until it holds, for at most `within`.
async fn eventually<F, Fut>(what: &str, within: Duration, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = Instant::now() + within;
    while !check().await {
        assert!(Instant::now() < deadline, "{what}: not within {within:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn scalar(pool: &sqlx::PgPool, sql: &'static str) -> i64 {
    sqlx::query_scalar(sql).fetch_one(pool).await.unwrap()
}

/// Versions on the bus of one subject, in stream order.
async fn versions_on(parts: &Parts, stream_id: &str) -> Vec<u64> {
    parts
        .messages()
        .await
        .iter()
        .filter(|m| m.headers.get("Nrm-Stream-Id").map(|v| v.as_str()) == Some(stream_id))
        .map(|m| m.headers.get("Nrm-Stream-Version").unwrap().as_str().parse().unwrap())
        .collect()
}

#[tokio::test]
async fn a_timer_and_a_command_on_one_aggregate_reach_the_bus_in_version_order_across_a_relay_restart() {
    let parts = Parts::new().await;
    let store = EventStore::new(parts.pool.clone());
    let case_id = Uuid::now_v7();
    let stream_id = format!("case-{case_id}");
    let subject = parts.bus.subject("identification", "case", &case_id.to_string());
    append_case(&parts, &store, case_id).await;
    parts.publish_all(&mut parts.relay(&store)).await;

    // A timer's transaction takes its transaction ID first (as one does
    // that locks its timer row before it reads the stream)...
    let mut timer = store.begin().await.unwrap();
    sqlx::query("SELECT pg_current_xact_id()")
        .execute(timer.conn())
        .await
        .unwrap();
    // ...a user command appends version 2 and commits...
    let mut command = store.begin().await.unwrap();
    command
        .append(&stream_id, 1, &[reported(case_id)], &metadata(), &subject)
        .await
        .unwrap();
    command.commit().await.unwrap();
    // ...and the timer, reading the stream now, appends version 3 under its older ID.
    assert_eq!(timer.read_stream(&stream_id).await.unwrap().len(), 2);
    timer
        .append(&stream_id, 2, &[reported(case_id)], &metadata(), &subject)
        .await
        .unwrap();
    timer.commit().await.unwrap();
    let by_transaction: Vec<i64> =
        sqlx::query_scalar("SELECT last_version FROM outbox ORDER BY tx_id::text::bigint, id")
            .fetch_all(&parts.pool)
            .await
            .unwrap();
    assert_eq!(
        by_transaction,
        [3, 2],
        "the premise: transaction order is the reverse of version order"
    );

    // One round of one relay, then a restarted relay.
    let mut first = parts.relay(&store);
    let deadline = Instant::now() + Duration::from_secs(10);
    while first.publish_round().await.unwrap() == 0 {
        assert!(Instant::now() < deadline, "a first round publishes");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    drop(first);
    parts.publish_all(&mut parts.relay(&store)).await;
    assert_eq!(versions_on(&parts, &stream_id).await, [1, 2, 3]);
    parts.drop_all().await;
}

#[tokio::test]
async fn a_projection_that_misses_a_delivery_moves_nothing_past_it_and_ends_like_a_rebuild() {
    let parts = Parts::new().await;
    let store = EventStore::new(parts.pool.clone());
    for _ in 0..3 {
        append_case(&parts, &store, Uuid::now_v7()).await;
    }
    parts.publish_all(&mut parts.relay(&store)).await;
    let runner = || ProjectionRunner::new(store.clone(), parts.bus.clone(), "identification", CaseList);
    let consumer = parts
        .stream
        .create_consumer(async_nats::jetstream::consumer::pull::Config {
            durable_name: Some("lossy".into()),
            ack_policy: async_nats::jetstream::consumer::AckPolicy::Explicit,
            ..Default::default()
        })
        .await
        .unwrap();
    let mut messages = consumer.messages().await.unwrap();
    let first = messages.next().await.unwrap().unwrap();
    assert_eq!(runner().handle(&first).await.unwrap(), Outcome::Applied);
    let _lost = messages.next().await.unwrap().unwrap();
    let third = messages.next().await.unwrap().unwrap();
    assert!(
        runner().handle(&third).await.is_err(),
        "the message after a lost one is not applied"
    );
    let checkpoint = scalar(
        &parts.pool,
        "SELECT stream_sequence FROM projection_checkpoints WHERE projection = 'identification_case_list'",
    )
    .await;
    assert_eq!(checkpoint, 1, "the checkpoint stays before the lost message");
    assert_eq!(case_list(&parts.pool).await.len(), 1);

    // The runner goes on from the checkpoint and gets every case.
    let shutdown = tokio_util::sync::CancellationToken::new();
    let task = tokio::spawn(runner().run(shutdown.clone()));
    eventually("the runner catches up", Duration::from_secs(15), || async {
        case_list(&parts.pool).await.len() == 3
    })
    .await;
    shutdown.cancel();
    task.await.unwrap();
    let live = case_list(&parts.pool).await;
    runner().rebuild().await.unwrap();
    assert_eq!(case_list(&parts.pool).await, live, "the same read model as a rebuild");
    parts.drop_all().await;
}

/// A read model that keeps one row per message it applied, in the order applied.
struct Journal;

impl Projection for Journal {
    fn name(&self) -> &'static str {
        "test_journal"
    }

    async fn apply(&self, uow: &mut UnitOfWork, delivery: &Delivery) -> Result<(), anyhow::Error> {
        sqlx::query("INSERT INTO test_journal (stream_sequence) VALUES ($1)")
            .bind(i64::try_from(delivery.stream_sequence)?)
            .execute(uow.conn())
            .await?;
        Ok(())
    }

    async fn reset(&self, conn: &mut PgConnection) -> Result<(), anyhow::Error> {
        sqlx::query("DELETE FROM test_journal").execute(conn).await?;
        Ok(())
    }
}

#[tokio::test]
async fn two_replicas_of_a_projection_apply_every_message_once_and_in_stream_order() {
    let parts = Parts::new().await;
    let store = EventStore::new(parts.pool.clone());
    sqlx::query("CREATE TABLE test_journal (applied BIGSERIAL PRIMARY KEY, stream_sequence BIGINT NOT NULL)")
        .execute(&parts.pool)
        .await
        .unwrap();
    let mut relay = parts.relay(&store);
    for _ in 0..40 {
        append_case(&parts, &store, Uuid::now_v7()).await;
    }
    parts.publish_all(&mut relay).await;
    let shutdown = tokio_util::sync::CancellationToken::new();
    let replicas: Vec<_> = (0..2)
        .map(|_| {
            let runner = ProjectionRunner::new(store.clone(), parts.bus.clone(), "identification", Journal);
            tokio::spawn(runner.run(shutdown.clone()))
        })
        .collect();
    // More messages while both replicas run.
    for _ in 0..40 {
        append_case(&parts, &store, Uuid::now_v7()).await;
    }
    parts.publish_all(&mut relay).await;
    let last = parts.stream.clone().info().await.unwrap().state.last_sequence;
    assert_eq!(last, 80);
    eventually("both replicas catch up", Duration::from_secs(20), || async {
        scalar(
            &parts.pool,
            "SELECT coalesce(max(stream_sequence), 0) FROM test_journal",
        )
        .await
            == 80
    })
    .await;
    shutdown.cancel();
    for replica in replicas {
        replica.await.unwrap();
    }
    let applied: Vec<i64> = sqlx::query_scalar("SELECT stream_sequence FROM test_journal ORDER BY applied")
        .fetch_all(&parts.pool)
        .await
        .unwrap();
    assert_eq!(
        applied,
        (1..=80).collect::<Vec<i64>>(),
        "each message once, in stream order"
    );
    parts.drop_all().await;
}

#[tokio::test]
async fn a_service_killed_between_the_acknowledgement_and_the_outbox_delete_publishes_its_commit_once() {
    let base = settings();
    let database = {
        let mut d = base.database.clone();
        d.name = format!("{}_identification", base.database.name);
        d
    };
    // The relay aborts the process right after JetStream acknowledged.
    // JetStream's de-duplication window is one second here and is waited
    // out: only the relay's check of the stream can keep the commit single.
    let window = ("NRM_NATS__DUPLICATE_WINDOW_SECONDS", "1");
    let mut service = ServiceProcess::start(
        "identification",
        process_env(
            &base,
            "identification",
            &[("NRM_RELAY__FAULT_ABORT_AFTER_ACK", "1"), window],
        ),
    );
    let mut client = IdentificationServiceClient::new(service.channel().await);
    client
        .report_presumed_victim(authorized(
            report_request("window-1", person("Test Person", "AB1234567", "")),
            &token("kg-mvd", Role::Police, "officer-1"),
        ))
        .await
        .expect("the command is acknowledged");
    let exit = service
        .wait_exit(Duration::from_secs(20))
        .expect("the relay aborts the process");
    assert_eq!(exit.signal(), Some(6), "SIGABRT in the crash window, got {exit}");

    let pool = sqlx::PgPool::connect_with(nrm_kernel::db::connect_options(&database).unwrap())
        .await
        .unwrap();
    let nats = async_nats::connect(base.nats.url.as_str()).await.unwrap();
    let js = async_nats::jetstream::new(nats);
    let stream = format!("{}_IDENTIFICATION", base.nats.stream_prefix);
    // The crash fell in the window: on the stream, and still in the outbox.
    assert_eq!(nrm_e2e::messages(&js, &stream).await.len(), 1);
    assert_eq!(scalar(&pool, "SELECT count(*) FROM outbox").await, 1);

    tokio::time::sleep(Duration::from_millis(1500)).await; // past the window, not a wait for an outcome
    let service = ServiceProcess::start("identification", process_env(&base, "identification", &[window]));
    eventually(
        "the restarted relay settles the row",
        Duration::from_secs(20),
        || async { scalar(&pool, "SELECT count(*) FROM outbox").await == 0 },
    )
    .await;
    let messages = nrm_e2e::messages(&js, &stream).await;
    assert_eq!(messages.len(), 1, "the commit is on the stream exactly once");
    drop(service);
    pool.close().await;
    nrm_e2e::drop_processes_data(&base, &["identification"]).await;
}

#[tokio::test]
async fn a_poison_timer_is_parked_and_does_not_delay_the_timers_after_it() {
    use chrono::Utc;
    use nrm_kernel::timers::{self, TimerRunner};

    let parts = Parts::new().await;
    let store = EventStore::new(parts.pool.clone());
    let mut conn = parts.pool.acquire().await.unwrap();
    timers::schedule(
        &mut conn,
        CASE_TIMER,
        "poison",
        Utc::now() - chrono::Duration::seconds(10),
        b"",
    )
    .await
    .unwrap();
    let good = Uuid::now_v7();
    timers::schedule(
        &mut conn,
        CASE_TIMER,
        &good.to_string(),
        Utc::now() - chrono::Duration::seconds(1),
        b"",
    )
    .await
    .unwrap();
    drop(conn);
    let runner = TimerRunner::new(
        store.clone(),
        CaseTimer {
            subject: parts.bus.subject("identification", "case", "timers"),
        },
        Duration::from_millis(20),
    )
    .with_retry(RetryPolicy {
        attempts: 3,
        first_ms: 50,
        max_ms: 50,
    });
    // The first round meets the poison timer first (it is due earlier) and
    // still fires the good one.
    assert_eq!(runner.fire_due().await.unwrap(), 1);
    assert_eq!(scalar(&parts.pool, "SELECT count(*) FROM events").await, 1);
    eventually("the poison timer is parked", Duration::from_secs(10), || async {
        runner.fire_due().await.unwrap();
        scalar(&parts.pool, "SELECT count(*) FROM timers WHERE parked_at IS NOT NULL").await == 1
    })
    .await;
    let (attempts, error): (i32, String) =
        sqlx::query_as("SELECT attempts, last_error FROM timers WHERE aggregate_id = 'poison'")
            .fetch_one(&parts.pool)
            .await
            .unwrap();
    assert_eq!(attempts, 3);
    assert!(error.contains("not a case"), "{error}");
    assert_eq!(
        runner.fire_due().await.unwrap(),
        0,
        "a parked timer is not tried again by itself"
    );
    assert_eq!(scalar(&parts.pool, "SELECT count(*) FROM events").await, 1);
    parts.drop_all().await;
}

fn quick_retries(mut settings: nrm_identification::config::Settings) -> nrm_identification::config::Settings {
    settings.retry = RetryPolicy {
        attempts: 3,
        first_ms: 20,
        max_ms: 50,
    };
    settings
}

async fn operator_client(app: &TestApp) -> OperatorServiceClient<tonic::transport::Channel> {
    OperatorServiceClient::connect(app.endpoint.clone()).await.unwrap()
}

async fn report(app: &TestApp, request_id: &str) -> String {
    app.client
        .clone()
        .report_presumed_victim(authorized(
            report_request(request_id, person("Test Person", "AB7654321", "")),
            &token("kg-mvd", Role::Police, "officer-1"),
        ))
        .await
        .unwrap()
        .into_inner()
        .case_id
}

#[tokio::test]
async fn a_poison_message_is_parked_listed_and_retried_and_the_messages_after_it_go_on() {
    let app = TestApp::spawn_with(quick_retries(settings())).await;
    report(&app, "before-poison").await;
    eventually("the first case is listed", Duration::from_secs(10), || async {
        app.count("case_list").await == 1
    })
    .await;
    // A message that no handler can decode, on a case's subject.
    let subject = format!(
        "{}.identification.v1.case.{}",
        app.settings.nats.subject_prefix,
        Uuid::now_v7()
    );
    app.jetstream
        .publish(subject, b"\xff\xff not a commit".as_slice().into())
        .await
        .unwrap()
        .await
        .unwrap();
    report(&app, "after-poison").await;
    eventually(
        "the case after the poison message is listed",
        Duration::from_secs(15),
        || async { app.count("case_list").await == 2 },
    )
    .await;

    let as_operator = || token("kg-ops", Role::Operator, "operator-1");
    let parked = operator_client(&app)
        .await
        .list_parked(authorized(common::ListParkedRequest {}, &as_operator()))
        .await
        .unwrap()
        .into_inner()
        .items;
    assert_eq!(parked.len(), 1, "{parked:?}");
    let item = &parked[0];
    assert_eq!(item.kind, common::ParkedKind::Message as i32);
    assert_eq!(item.owner, "identification_case_list");
    // Undecodable: parked at its first failure, not after the policy's
    // back-off, so that the messages behind it wait for nothing.
    assert_eq!(item.attempts, 1);
    assert_eq!(item.item_id, "2");

    // A retry that fails again keeps it parked, with one more attempt.
    operator_client(&app)
        .await
        .retry_parked(authorized(
            common::RetryParkedRequest {
                kind: item.kind,
                owner: item.owner.clone(),
                item_id: item.item_id.clone(),
            },
            &as_operator(),
        ))
        .await
        .unwrap();
    // The read model is rebuilt: the message is tried in its place in the
    // stream, fails again and is parked again; the cases around it stay
    // listed.
    eventually("the retry ran", Duration::from_secs(10), || async {
        scalar(
            &app.pool,
            "SELECT coalesce(max(attempts), 0)::bigint FROM parked_messages WHERE NOT retry_requested",
        )
        .await
            == 2
    })
    .await;
    assert_eq!(app.count("case_list").await, 2);

    // Only operators.
    let denied = operator_client(&app)
        .await
        .list_parked(authorized(
            common::ListParkedRequest {},
            &token("kg-mvd", Role::Police, "officer-1"),
        ))
        .await
        .unwrap_err();
    assert_eq!(denied.code(), tonic::Code::PermissionDenied);
    app.stop().await;
}

#[tokio::test]
async fn a_deleted_stream_is_refilled_from_the_event_store_and_the_read_model_converges() {
    let app = TestApp::spawn().await;
    for n in 0..5 {
        report(&app, &format!("refill-{n}")).await;
    }
    app.wait_for_messages(5).await;
    eventually("the cases are listed", Duration::from_secs(10), || async {
        app.count("case_list").await == 5
    })
    .await;
    let before = case_list(&app.pool).await;
    let commits: Vec<String> = app
        .messages()
        .await
        .iter()
        .map(|m| m.headers.get("Nats-Msg-Id").unwrap().as_str().to_owned())
        .collect();

    // JetStream loses everything.
    app.jetstream.delete_stream(app.stream_name()).await.unwrap();

    // On demand: an operator asks the service to compare and refill.
    let refilled = operator_client(&app)
        .await
        .refill_stream(authorized(
            common::RefillStreamRequest { dry_run: false },
            &token("kg-ops", Role::Operator, "operator-1"),
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!((refilled.aggregates_behind, refilled.requeued), (5, 5), "{refilled:?}");
    let again = app.wait_for_messages(5).await;
    let mut republished: Vec<String> = again
        .iter()
        .map(|m| m.headers.get("Nats-Msg-Id").unwrap().as_str().to_owned())
        .collect();
    let mut original = commits.clone();
    republished.sort();
    original.sort();
    assert_eq!(
        republished, original,
        "the same commits, under their original IDs, once each"
    );
    // A case reported on the new stream is listed too: the projection
    // noticed the new stream, rebuilt from it and follows it.
    let after = report(&app, "refill-after").await;
    eventually("the read model converges", Duration::from_secs(20), || async {
        let listed = case_list(&app.pool).await;
        listed.len() == 6
            && before.iter().all(|case| listed.contains(case))
            && listed.iter().any(|(case_id, _, _)| case_id.to_string() == after)
    })
    .await;
    let mut stream = app.jetstream.get_stream(app.stream_name()).await.unwrap();
    let created = i64::try_from(stream.info().await.unwrap().created.unix_timestamp_nanos()).unwrap();
    let (sequence, counted_in): (i64, i64) = sqlx::query_as(
        "SELECT stream_sequence, stream_created FROM projection_checkpoints
         WHERE projection = 'identification_case_list'",
    )
    .fetch_one(&app.pool)
    .await
    .unwrap();
    assert_eq!(counted_in, created, "the checkpoint counts in the new stream");
    assert_eq!(sequence, 6);
    app.stop().await;
}

#[tokio::test]
async fn a_service_started_while_nats_is_down_takes_commands_and_publishes_them_when_nats_is_back() {
    use nrm_kernel::server::{HEALTH_BUS, HEALTH_DATABASE};
    use nrm_kernel::service::Service as _;
    use tonic_health::pb::health_check_response::ServingStatus;

    // A NATS server of this test's own, started and stopped by the project's script.
    let dir = nrm_e2e::workspace_root()
        .join("target")
        .join(format!("nrm-natsdown-{}", nrm_e2e::unique()));
    let stack = |verb: &str| {
        let status = std::process::Command::new("bash")
            .arg(nrm_e2e::workspace_root().join("scripts").join("stack.sh"))
            .arg(verb)
            .arg(&dir)
            .env("NRM_STACK_PG_FALLBACK_ROOT", "/tmp")
            .stdout(std::process::Stdio::null())
            .status()
            .unwrap();
        assert!(status.success(), "stack.sh {verb}");
    };
    stack("up");
    let env = std::fs::read_to_string(dir.join("stack.env")).unwrap();
    let nats_url = env
        .lines()
        .find_map(|l| l.strip_prefix("NRM_STACK_NATS_URL="))
        .unwrap()
        .to_owned();
    stack("down");

    let mut settings = settings();
    settings.nats.url = nats_url.clone();
    let app = nrm_identification::startup::Application::build(&settings)
        .await
        .expect("the service starts without NATS");
    let endpoint = format!("http://{}", app.kit().grpc_addr().unwrap());
    let shutdown = tokio_util::sync::CancellationToken::new();
    let task = tokio::spawn(app.run_until_stopped(shutdown.clone()));
    let mut client = IdentificationServiceClient::connect(endpoint.clone()).await.unwrap();
    client
        .report_presumed_victim(authorized(
            report_request("nats-down-1", person("Test Person", "AB1111111", "")),
            &token("kg-mvd", Role::Police, "officer-1"),
        ))
        .await
        .expect("a command is taken while NATS is down");
    let status = |service: &'static str| {
        let endpoint = endpoint.clone();
        async move { nrm_e2e::health(&endpoint, service).await }
    };
    eventually("health says what is degraded", Duration::from_secs(10), || async {
        status(HEALTH_BUS).await == ServingStatus::NotServing as i32
            && status(HEALTH_DATABASE).await == ServingStatus::Serving as i32
            && status(nrm_identification::startup::SERVICE_NAME).await == ServingStatus::Serving as i32
    })
    .await;
    let pool = sqlx::PgPool::connect_with(nrm_kernel::db::connect_options(&settings.database).unwrap())
        .await
        .unwrap();
    assert_eq!(
        scalar(&pool, "SELECT count(*) FROM outbox").await,
        1,
        "the event waits in the outbox"
    );

    stack("up");
    eventually(
        "the outbox drains once NATS is back",
        Duration::from_secs(30),
        || async { scalar(&pool, "SELECT count(*) FROM outbox").await == 0 },
    )
    .await;
    let nats = async_nats::connect(nats_url.as_str()).await.unwrap();
    let js = async_nats::jetstream::new(nats);
    let stream = format!("{}_IDENTIFICATION", settings.nats.stream_prefix);
    assert_eq!(nrm_e2e::messages(&js, &stream).await.len(), 1);
    eventually("health is whole again", Duration::from_secs(10), || async {
        status(HEALTH_BUS).await == ServingStatus::Serving as i32
    })
    .await;
    shutdown.cancel();
    task.await.unwrap().unwrap();
    pool.close().await;
    stack("reset");
    let _ = nrm_kernel::db::drop_database(&settings.database).await;
}

/// The services a server's reflection lists.
async fn reflected(endpoint: &str) -> Vec<String> {
    use tonic_reflection::pb::v1::ServerReflectionRequest;
    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;

    let channel = tonic::transport::Channel::from_shared(endpoint.to_owned())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut client = ServerReflectionClient::new(channel);
    let requests = [
        MessageRequest::ListServices(String::new()),
        MessageRequest::FileContainingSymbol("google.rpc.BadRequest".into()),
    ]
    .map(|r| ServerReflectionRequest {
        host: String::new(),
        message_request: Some(r),
    });
    let mut responses = client
        .server_reflection_info(futures::stream::iter(requests))
        .await
        .unwrap()
        .into_inner();
    let Some(MessageResponse::ListServicesResponse(list)) =
        responses.message().await.unwrap().unwrap().message_response
    else {
        panic!("a list of services");
    };
    let Some(MessageResponse::FileDescriptorResponse(file)) =
        responses.message().await.unwrap().unwrap().message_response
    else {
        panic!("google.rpc.BadRequest is described, so grpcurl can print field violations");
    };
    assert!(!file.file_descriptor_proto.is_empty());
    let mut names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
    names.sort();
    names
}

#[tokio::test]
async fn each_service_reflects_exactly_what_it_serves() {
    let expected = |own: &str| {
        let mut names: Vec<String> = [
            own,
            "grpc.health.v1.Health",
            "grpc.reflection.v1.ServerReflection",
            "grpc.reflection.v1alpha.ServerReflection",
            "nrm.common.v1.AuditService",
            "nrm.common.v1.OperatorService",
        ]
        .map(str::to_owned)
        .to_vec();
        names.sort();
        names
    };
    let identification = TestApp::spawn().await;
    let referral = nrm_e2e::ReferralApp::spawn_beside(&identification).await;
    let shelter = nrm_e2e::ShelterApp::spawn().await;
    assert_eq!(
        reflected(&identification.endpoint).await,
        expected("nrm.identification.v1.IdentificationService")
    );
    assert_eq!(
        reflected(&referral.endpoint).await,
        expected("nrm.referral.v1.ReferralService")
    );
    assert_eq!(
        reflected(&shelter.endpoint).await,
        expected("nrm.shelter.v1.ShelterService")
    );
    shelter.stop().await;
    referral.stop().await;
    identification.stop().await;
}

#[tokio::test]
async fn a_commit_deleted_from_the_stream_inside_the_duplicate_window_is_published_again_not_taken_as_a_duplicate() {
    use nrm_kernel::relay::{RefillMode, Relay, RelayConfig, refill};

    let mut settings = settings();
    // A short window, so that the test can wait it out.
    settings.nats.duplicate_window_seconds = 3;
    let pool = nrm_kernel::db::connect_and_migrate(&settings.database, &nrm_identification::startup::MIGRATIONS)
        .await
        .unwrap();
    let bus = nrm_kernel::bus::Bus::connect(&settings.nats).await.unwrap();
    let stream = bus.ensure_stream("identification").await.unwrap();
    let store = EventStore::new(pool.clone());
    let mut relay = Relay::new(
        pool.clone(),
        bus.clone(),
        "identification",
        store.appended_signal(),
        RelayConfig::new(nrm_identification::app::PAYLOAD_TYPE),
    );
    let case_id = Uuid::now_v7();
    let mut uow = store.begin().await.unwrap();
    uow.append(
        &format!("case-{case_id}"),
        0,
        &[reported(case_id)],
        &metadata(),
        &bus.subject("identification", "case", &case_id.to_string()),
    )
    .await
    .unwrap();
    uow.commit().await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while scalar(&pool, "SELECT count(*) FROM outbox").await > 0 {
        assert!(Instant::now() < deadline, "published");
        relay.publish_round().await.unwrap();
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    let js = bus.jetstream();
    let name = bus.stream_name("identification");
    assert_eq!(nrm_e2e::messages(js, &name).await.len(), 1);

    // The message is deleted at once, while JetStream still remembers its ID.
    stream.delete_message(1).await.unwrap();
    let report = refill(&pool, &stream, RefillMode::Full).await.unwrap();
    assert_eq!((report.missing, report.requeued), (1, 1));
    let deadline = Instant::now() + Duration::from_secs(20);
    while scalar(&pool, "SELECT count(*) FROM outbox").await > 0 {
        assert!(Instant::now() < deadline, "published again after the window");
        relay.publish_round().await.unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let messages = nrm_e2e::messages(js, &name).await;
    assert_eq!(messages.len(), 1, "the commit is back on the stream");
    assert_eq!(
        messages[0].headers.get("Nrm-Stream-Id").unwrap().as_str(),
        format!("case-{case_id}")
    );
    pool.close().await;
    let _ = js.delete_stream(&name).await;
    let _ = nrm_kernel::db::drop_database(&settings.database).await;
}

#[tokio::test]
async fn an_operator_token_reaches_no_case_referral_or_shelter_whatever_agency_it_names() {
    use nrm_proto::referral::v1 as rf;
    use nrm_proto::shelter::v1 as sh;

    let app = TestApp::spawn().await;
    let referral = nrm_e2e::ReferralApp::spawn_beside(&app).await;
    let shelter = nrm_e2e::ShelterApp::spawn().await;
    let case_id = report(&app, "operator-reads").await;
    // An operator token that names the reporting agency itself.
    let operator = token("kg-mvd", Role::Operator, "operator-1");
    let denied = |status: tonic::Status| {
        assert_eq!(status.code(), tonic::Code::PermissionDenied, "{status:?}");
        assert!(status.message().contains("role operator may not call"), "{status:?}");
    };
    let mut identification = app.client.clone();
    denied(
        identification
            .get_case(authorized(
                pb::GetCaseRequest {
                    case_id: case_id.clone(),
                    include_personal_data: true,
                    purpose: "operations".into(),
                    ..Default::default()
                },
                &operator,
            ))
            .await
            .unwrap_err(),
    );
    denied(
        identification
            .list_cases(authorized(pb::ListCasesRequest::default(), &operator))
            .await
            .unwrap_err(),
    );
    let channel = tonic::transport::Channel::from_shared(referral.endpoint.clone())
        .unwrap()
        .connect()
        .await
        .unwrap();
    denied(
        rf::referral_service_client::ReferralServiceClient::new(channel)
            .list_inbox(authorized(rf::ListInboxRequest::default(), &operator))
            .await
            .unwrap_err(),
    );
    let channel = tonic::transport::Channel::from_shared(shelter.endpoint.clone())
        .unwrap()
        .connect()
        .await
        .unwrap();
    denied(
        sh::shelter_service_client::ShelterServiceClient::new(channel)
            .get_shelter(authorized(
                sh::GetShelterRequest {
                    shelter_id: Uuid::now_v7().to_string(),
                },
                &operator,
            ))
            .await
            .unwrap_err(),
    );

    // A refused call of the operator's service is audited, with what it concerned.
    let refused = operator_client(&app)
        .await
        .retry_parked(authorized(
            common::RetryParkedRequest {
                kind: common::ParkedKind::Timer as i32,
                owner: "Aigul Asanova".into(),
                item_id: "not an id".into(),
            },
            &token("kg-mvd", Role::Police, "officer-1"),
        ))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::PermissionDenied);
    let (action, subject): (String, String) =
        sqlx::query_as("SELECT action, subject_id FROM audit_log WHERE action LIKE 'RetryParked%'")
            .fetch_one(&app.pool)
            .await
            .unwrap();
    assert_eq!(action, "RetryParked:denied");
    // The gate refused the call before anything of it was parsed: the entry
    // names the RPC and the caller, and nothing typed into the request.
    assert_eq!(subject, "", "raw text never reaches the audit trail");
    shelter.stop().await;
    referral.stop().await;
    app.stop().await;
}

/// Keeps one row per commit it applied: the aggregate and the commit's last version.
struct Versions;

impl Projection for Versions {
    fn name(&self) -> &'static str {
        "test_versions"
    }

    async fn apply(&self, uow: &mut UnitOfWork, delivery: &Delivery) -> Result<(), anyhow::Error> {
        let last = delivery.commit.events.iter().map(|e| e.version).max().unwrap_or(0);
        sqlx::query("INSERT INTO test_versions (stream_id, version) VALUES ($1, $2)")
            .bind(&delivery.commit.stream_id)
            .bind(i64::try_from(last)?)
            .execute(uow.conn())
            .await?;
        Ok(())
    }

    async fn reset(&self, conn: &mut PgConnection) -> Result<(), anyhow::Error> {
        sqlx::query("DELETE FROM test_versions").execute(conn).await?;
        Ok(())
    }
}

#[tokio::test]
async fn a_commit_older_than_its_aggregates_last_applied_version_changes_nothing() {
    let parts = Parts::new().await;
    let store = EventStore::new(parts.pool.clone());
    sqlx::query(
        "CREATE TABLE test_versions (applied BIGSERIAL PRIMARY KEY, stream_id TEXT NOT NULL, version BIGINT NOT NULL)",
    )
    .execute(&parts.pool)
    .await
    .unwrap();
    let case_id = Uuid::now_v7();
    let stream_id = format!("case-{case_id}");
    let subject = parts.bus.subject("identification", "case", &case_id.to_string());
    append_case(&parts, &store, case_id).await;
    let mut uow = store.begin().await.unwrap();
    uow.append(&stream_id, 1, &[reported(case_id)], &metadata(), &subject)
        .await
        .unwrap();
    uow.commit().await.unwrap();
    parts.publish_all(&mut parts.relay(&store)).await;
    // Version 1 arrives again after version 2, as a hole refilled after the
    // later versions would, under another message ID.
    let first = parts.messages().await.remove(0);
    let mut headers = first.headers.clone();
    headers.insert("Nats-Msg-Id", Uuid::now_v7().to_string().as_str());
    parts
        .bus
        .jetstream()
        .publish_with_headers(first.subject.to_string(), headers, first.payload.clone())
        .await
        .unwrap()
        .await
        .unwrap();

    let shutdown = tokio_util::sync::CancellationToken::new();
    let task = tokio::spawn(
        ProjectionRunner::new(store.clone(), parts.bus.clone(), "identification", Versions).run(shutdown.clone()),
    );
    eventually(
        "the runner reaches the last message",
        Duration::from_secs(15),
        || async {
            scalar(
            &parts.pool,
            "SELECT coalesce(max(stream_sequence), 0) FROM projection_checkpoints WHERE projection = 'test_versions'",
        )
        .await
            == 3
        },
    )
    .await;
    shutdown.cancel();
    task.await.unwrap();
    let applied: Vec<(String, i64)> = sqlx::query_as("SELECT stream_id, version FROM test_versions ORDER BY applied")
        .fetch_all(&parts.pool)
        .await
        .unwrap();
    assert_eq!(
        applied,
        [(stream_id.clone(), 1), (stream_id, 2)],
        "the late version 1 changed nothing"
    );
    parts.drop_all().await;
}
