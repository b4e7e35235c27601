//! The projection runner's comparison of a read model with a rebuild of it
//! (`RebuildReadModels`), against a real identification service: done in a
//! shadow, it leaves the live model alone (live commands keep reaching it
//! while the comparison runs, and none of its rows is rewritten); a changed
//! row is still found different and set right; nothing of the shadow is left.
//! And a read model catching up on a backlog applies it in batches, each
//! message once and in stream order, a poison message parked alone.

#![allow(clippy::unwrap_used)] // Test code: a failed unwrap is a failed test.

use std::time::{Duration, Instant};

use nrm_e2e::fixtures::{append_case, metadata, reported};
use nrm_e2e::{Parts, TestApp, authorized, eventually, person, report_request, token};
use nrm_kernel::auth::Role;
use nrm_kernel::bus::Bus;
use nrm_kernel::projection::{Delivery, Projection, ProjectionRunner};
use nrm_kernel::store::{EventStore, UnitOfWork};
use nrm_proto::common::v1 as common;
use nrm_proto::common::v1::operator_service_client::OperatorServiceClient;
use sqlx::PgConnection;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

const CASE_LIST: &str = "identification_case_list";

/// Cases written straight into the service's event store before a
/// comparison: enough that replaying them takes a while.
const BACKLOG: usize = 20_000;

/// Cases appended per transaction while the backlog is written.
const PER_TRANSACTION: usize = 500;

/// `RebuildReadModels` of the case list, as the operator calls it.
async fn compare_case_list(endpoint: String) -> common::RebuiltReadModel {
    let mut client = OperatorServiceClient::connect(endpoint).await.unwrap();
    let mut models = client
        .rebuild_read_models(authorized(
            common::RebuildReadModelsRequest {
                projection: CASE_LIST.to_owned(),
            },
            &token("kg-ops", Role::Operator, "operator-1"),
        ))
        .await
        .unwrap()
        .into_inner()
        .read_models;
    assert_eq!(models.len(), 1, "{models:?}");
    models.remove(0)
}

/// Reports one case through the service; its ID.
async fn report(app: &TestApp, n: usize) -> Uuid {
    app.client
        .clone()
        .report_presumed_victim(authorized(
            report_request(
                &format!("runner-{}-{n}", Uuid::now_v7()),
                person("Test Person", &format!("PR{n:07}"), ""),
            ),
            &token("kg-mvd", Role::Police, "officer-1"),
        ))
        .await
        .unwrap()
        .into_inner()
        .case_id
        .parse()
        .unwrap()
}

async fn listed(app: &TestApp, case_id: Uuid) -> bool {
    sqlx::query_scalar::<_, bool>("SELECT EXISTS (SELECT 1 FROM case_list WHERE case_id = $1)")
        .bind(case_id)
        .fetch_one(&app.pool)
        .await
        .unwrap()
}

async fn checkpoint(app: &TestApp) -> u64 {
    let sequence: Option<i64> =
        sqlx::query_scalar("SELECT stream_sequence FROM projection_checkpoints WHERE projection = $1")
            .bind(CASE_LIST)
            .fetch_optional(&app.pool)
            .await
            .unwrap();
    u64::try_from(sequence.unwrap_or(0)).unwrap()
}

/// Every row of the case list with the transaction that wrote it: a row
/// rewritten (even with the same values) has another.
async fn rows_as_written(app: &TestApp) -> Vec<(Uuid, String)> {
    sqlx::query_as("SELECT case_id, xmin::text FROM case_list ORDER BY case_id")
        .fetch_all(&app.pool)
        .await
        .unwrap()
}

/// Temporary copies of the case list in any session of the cluster.
async fn shadows(app: &TestApp) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM pg_class WHERE relname = 'case_list' AND relpersistence = 't'")
        .fetch_one(&app.pool)
        .await
        .unwrap()
}

/// Writes `count` new cases straight into the service's event store (its
/// relay publishes them) and waits until the case list holds them all.
async fn backlog(app: &TestApp, count: usize) {
    let bus = Bus::connect(&app.settings.nats).await.unwrap();
    let store = EventStore::new(app.pool.clone());
    let metadata = metadata();
    let mut written = 0;
    while written < count {
        let mut uow = store.begin().await.unwrap();
        for _ in 0..PER_TRANSACTION.min(count - written) {
            let case_id = Uuid::now_v7();
            uow.append(
                &format!("case-{case_id}"),
                0,
                &[reported(case_id)],
                &metadata,
                &bus.subject("identification", "case", &case_id.to_string()),
            )
            .await
            .unwrap();
            written += 1;
        }
        uow.commit().await.unwrap();
    }
    let count = i64::try_from(count).unwrap();
    eventually("the case list holds the backlog", Duration::from_secs(180), || async {
        (app.count("case_list").await >= count).then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn live_commands_reach_the_read_model_while_a_comparison_runs_and_it_is_left_untouched() {
    let app = TestApp::spawn().await;
    backlog(&app, BACKLOG).await;
    let backlog_end = checkpoint(&app).await;
    assert_eq!(backlog_end, u64::try_from(BACKLOG).unwrap());
    let before = rows_as_written(&app).await;

    let comparison = tokio::spawn(compare_case_list(app.endpoint.clone()));
    // Commands one after the other while the comparison runs: each
    // acknowledged, then looked for in the read model.
    let mut seen_during = Vec::new();
    let mut n = 0;
    while !comparison.is_finished() {
        let case_id = report(&app, n).await;
        let acknowledged = Instant::now();
        eventually("a live command's case in the list", Duration::from_secs(1), || async {
            listed(&app, case_id).await.then_some(())
        })
        .await;
        // Seen while the comparison had not answered yet: the order of the
        // two is this observation, not a guess from durations.
        if !comparison.is_finished() {
            seen_during.push((acknowledged.elapsed(), checkpoint(&app).await));
        }
        n += 1;
    }
    let report = comparison.await.unwrap();
    let slowest = seen_during.iter().map(|(lag, _)| *lag).max().unwrap_or_default();
    println!(
        "comparison of {} messages; {} live commands reached the list meanwhile, the slowest {slowest:?} after its acknowledgement",
        report.messages,
        seen_during.len()
    );
    // One of them could slip through just after a comparison that held
    // the live model back; two in a row cannot.
    assert!(
        seen_during.len() >= 2,
        "live commands reached the read model before the comparison answered: {seen_during:?}"
    );
    assert!(report.equal, "{report:?}");
    assert_eq!(report.live_digest.len(), 64, "{report:?}");
    assert!(
        report.stream_sequence >= backlog_end && report.messages == report.stream_sequence,
        "{report:?}"
    );
    let (_, last_seen_at) = seen_during.last().copied().unwrap();
    assert!(
        last_seen_at > report.stream_sequence,
        "the live model moved past the position the comparison replayed to, before it answered: {report:?}, {seen_during:?}"
    );

    let after = rows_as_written(&app).await;
    let untouched = before.iter().all(|row| after.binary_search(row).is_ok());
    assert!(
        untouched,
        "every row of the backlog is the one written before the comparison"
    );
    assert_eq!(after.len(), before.len() + n, "and every live case is listed");
    eventually(
        "no temporary copy of the case list left",
        Duration::from_secs(10),
        || async { (shadows(&app).await == 0).then_some(()) },
    )
    .await;
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_changed_row_is_found_different_and_set_right_and_the_next_comparison_leaves_it() {
    let app = TestApp::spawn().await;
    let mut ids = Vec::new();
    for n in 0..3 {
        ids.push(report(&app, n).await);
    }
    eventually("three cases listed", Duration::from_secs(30), || async {
        (app.count("case_list").await == 3).then_some(())
    })
    .await;
    let right = rows_as_written(&app).await;
    let citizenship = || async {
        sqlx::query_scalar::<_, String>("SELECT citizenship FROM case_list WHERE case_id = $1")
            .bind(ids[1])
            .fetch_one(&app.pool)
            .await
            .unwrap()
    };
    let listed_citizenship = citizenship().await;
    let changed = sqlx::query("UPDATE case_list SET citizenship = 'XX' WHERE case_id = $1")
        .bind(ids[1])
        .execute(&app.pool)
        .await
        .unwrap()
        .rows_affected();
    assert_eq!(changed, 1);

    let different = compare_case_list(app.endpoint.clone()).await;
    assert!(!different.equal, "{different:?}");
    assert_ne!(different.live_digest, different.rebuilt_digest, "{different:?}");
    assert_eq!((different.stream_sequence, different.messages), (3, 3), "{different:?}");
    assert_eq!(citizenship().await, listed_citizenship, "the row is right again");
    let repaired = rows_as_written(&app).await;
    assert!(
        right.iter().all(|row| repaired.binary_search(row).is_err()),
        "the live model was rebuilt"
    );

    let equal = compare_case_list(app.endpoint.clone()).await;
    assert!(equal.equal, "{equal:?}");
    assert_eq!(
        equal.live_digest, different.rebuilt_digest,
        "the rebuilt model is the one kept"
    );
    assert_eq!(
        rows_as_written(&app).await,
        repaired,
        "an equal comparison rewrites nothing"
    );
    eventually(
        "no temporary copy of the case list left",
        Duration::from_secs(10),
        || async { (shadows(&app).await == 0).then_some(()) },
    )
    .await;
    app.stop().await;
}

/// Keeps one row per message it applied: its sequence and aggregate.
struct Recorder;

impl Projection for Recorder {
    fn name(&self) -> &'static str {
        "test_recorder"
    }

    async fn apply(&self, uow: &mut UnitOfWork, delivery: &Delivery) -> Result<(), anyhow::Error> {
        sqlx::query("INSERT INTO test_recorded (stream_sequence, stream_id) VALUES ($1, $2)")
            .bind(i64::try_from(delivery.stream_sequence)?)
            .bind(&delivery.commit.stream_id)
            .execute(uow.conn())
            .await?;
        Ok(())
    }

    async fn reset(&self, conn: &mut PgConnection) -> Result<(), anyhow::Error> {
        sqlx::query("DELETE FROM test_recorded").execute(conn).await?;
        Ok(())
    }
}

async fn scalar(pool: &sqlx::PgPool, sql: &'static str) -> i64 {
    sqlx::query_scalar(sql).fetch_one(pool).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backlog_is_caught_up_in_batches_each_message_once_in_order_a_poison_message_parked_alone() {
    const CASES: usize = 600;
    let parts = Parts::new().await;
    let store = EventStore::new(parts.pool.clone());
    sqlx::query("CREATE TABLE test_recorded (applied BIGSERIAL PRIMARY KEY, stream_sequence BIGINT NOT NULL, stream_id TEXT NOT NULL)")
        .execute(&parts.pool)
        .await
        .unwrap();
    let checkpoint_of = || {
        scalar(
            &parts.pool,
            "SELECT coalesce(max(stream_sequence), 0) FROM projection_checkpoints WHERE projection = 'test_recorder' AND stream_created IS NOT NULL",
        )
    };
    // The runner starts on the empty stream (its checkpoint takes the
    // stream's identity) and stops: what follows is a catch-up, not a rebuild.
    let shutdown = CancellationToken::new();
    let runner = tokio::spawn(
        ProjectionRunner::new(store.clone(), parts.bus.clone(), "identification", Recorder).run(shutdown.clone()),
    );
    eventually("the runner counts in the stream", Duration::from_secs(15), || async {
        let known: i64 = scalar(&parts.pool, "SELECT count(*) FROM projection_checkpoints WHERE projection = 'test_recorder' AND stream_created IS NOT NULL").await;
        (known == 1).then_some(())
    })
    .await;
    shutdown.cancel();
    runner.await.unwrap();

    // The backlog: cases, a message no handler can decode in the middle,
    // more cases, then the first case's commit again under another ID (an
    // older version than its aggregate's: changes nothing).
    for _ in 0..CASES / 2 {
        append_case(&parts, &store, Uuid::now_v7()).await;
    }
    parts.publish_all(&mut parts.relay(&store)).await;
    let poison_subject = parts.bus.subject("identification", "case", &Uuid::now_v7().to_string());
    let poison = parts
        .bus
        .jetstream()
        .publish(poison_subject, b"\xff\xff not a commit".as_slice().into())
        .await
        .unwrap()
        .await
        .unwrap()
        .sequence;
    for _ in 0..CASES / 2 {
        append_case(&parts, &store, Uuid::now_v7()).await;
    }
    parts.publish_all(&mut parts.relay(&store)).await;
    let first = parts.messages().await.remove(0);
    let mut headers = first.headers.clone();
    headers.insert("Nats-Msg-Id", Uuid::now_v7().to_string().as_str());
    let stale = parts
        .bus
        .jetstream()
        .publish_with_headers(first.subject.to_string(), headers, first.payload.clone())
        .await
        .unwrap()
        .await
        .unwrap()
        .sequence;
    assert_eq!(stale, u64::try_from(CASES).unwrap() + 2);

    let shutdown = CancellationToken::new();
    let runner = tokio::spawn(
        ProjectionRunner::new(store.clone(), parts.bus.clone(), "identification", Recorder).run(shutdown.clone()),
    );
    let stale_at = i64::try_from(stale).unwrap();
    eventually(
        "the runner reaches the end of the backlog",
        Duration::from_secs(30),
        || async { (checkpoint_of().await == stale_at).then_some(()) },
    )
    .await;
    shutdown.cancel();
    runner.await.unwrap();

    let applied: Vec<i64> = sqlx::query_scalar("SELECT stream_sequence FROM test_recorded ORDER BY applied")
        .fetch_all(&parts.pool)
        .await
        .unwrap();
    let poison = i64::try_from(poison).unwrap();
    let expected: Vec<i64> = (1..stale_at).filter(|s| *s != poison).collect();
    assert_eq!(
        applied, expected,
        "every message once, in stream order; neither the poison nor the stale one"
    );
    let parked: Vec<(i64, i32)> =
        sqlx::query_as("SELECT stream_sequence, attempts FROM parked_messages WHERE projection = 'test_recorder'")
            .fetch_all(&parts.pool)
            .await
            .unwrap();
    assert_eq!(parked, [(poison, 1)], "the poison message parked at its first failure");
    let transactions = scalar(&parts.pool, "SELECT count(DISTINCT xmin::text) FROM test_recorded").await;
    println!("{} messages applied in {transactions} transactions", applied.len());
    assert!(
        transactions < i64::try_from(applied.len()).unwrap() / 10,
        "caught up in batches: {transactions} transactions for {} messages",
        applied.len()
    );
    parts.drop_all().await;
}

/// A reaction (no read model) that fails, as unprocessable, on the stream
/// sequences listed in `test_poison`, and records what it acted on.
struct Reaction;

impl Projection for Reaction {
    const READ_MODEL: bool = false;

    fn name(&self) -> &'static str {
        "test_reaction"
    }

    async fn apply(&self, uow: &mut UnitOfWork, delivery: &Delivery) -> Result<(), anyhow::Error> {
        let sequence = i64::try_from(delivery.stream_sequence)?;
        let poisoned: bool = sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM test_poison WHERE stream_sequence = $1)")
            .bind(sequence)
            .fetch_one(uow.conn())
            .await?;
        if poisoned {
            return Err(nrm_kernel::projection::Unprocessable::new(anyhow::anyhow!("poisoned for the test")).into());
        }
        sqlx::query("INSERT INTO test_reacted (stream_sequence, stream_id) VALUES ($1, $2)")
            .bind(sequence)
            .bind(&delivery.commit.stream_id)
            .execute(uow.conn())
            .await?;
        Ok(())
    }

    async fn reset(&self, _conn: &mut PgConnection) -> Result<(), anyhow::Error> {
        Ok(())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retried_reaction_message_whose_aggregate_moved_past_it_stays_parked_and_says_why() {
    let parts = Parts::new().await;
    let store = EventStore::new(parts.pool.clone());
    for ddl in [
        "CREATE TABLE test_poison (stream_sequence BIGINT PRIMARY KEY)",
        "CREATE TABLE test_reacted (stream_sequence BIGINT PRIMARY KEY, stream_id TEXT NOT NULL)",
        "INSERT INTO test_poison VALUES (1), (2)",
    ] {
        sqlx::query(ddl).execute(&parts.pool).await.unwrap();
    }
    // Case a (sequence 1) and case b (2) are parked; a's next version (3)
    // is acted on, so a's aggregate moves past its parked first version.
    let (a, b) = (Uuid::now_v7(), Uuid::now_v7());
    append_case(&parts, &store, a).await;
    append_case(&parts, &store, b).await;
    let mut uow = store.begin().await.unwrap();
    uow.append(
        &format!("case-{a}"),
        1,
        &[reported(a)],
        &metadata(),
        &parts.bus.subject("identification", "case", &a.to_string()),
    )
    .await
    .unwrap();
    uow.commit().await.unwrap();
    parts.publish_all(&mut parts.relay(&store)).await;

    let shutdown = CancellationToken::new();
    let runner = tokio::spawn(
        ProjectionRunner::new(store.clone(), parts.bus.clone(), "identification", Reaction).run(shutdown.clone()),
    );
    eventually("both parked, the third acted on", Duration::from_secs(15), || async {
        let parked = scalar(
            &parts.pool,
            "SELECT count(*) FROM parked_messages WHERE projection = 'test_reaction'",
        )
        .await;
        let reacted = scalar(&parts.pool, "SELECT count(*) FROM test_reacted").await;
        (parked == 2 && reacted == 1).then_some(())
    })
    .await;

    // The cause is gone; the operator retries both.
    for sql in [
        "DELETE FROM test_poison",
        "UPDATE parked_messages SET retry_requested = true WHERE projection = 'test_reaction'",
    ] {
        sqlx::query(sql).execute(&parts.pool).await.unwrap();
    }
    eventually("the retries ran", Duration::from_secs(15), || async {
        let waiting = scalar(
            &parts.pool,
            "SELECT count(*) FROM parked_messages WHERE projection = 'test_reaction' AND retry_requested",
        )
        .await;
        (waiting == 0).then_some(())
    })
    .await;
    shutdown.cancel();
    runner.await.unwrap();

    let reacted: Vec<i64> = sqlx::query_scalar("SELECT stream_sequence FROM test_reacted ORDER BY stream_sequence")
        .fetch_all(&parts.pool)
        .await
        .unwrap();
    assert_eq!(
        reacted,
        [2, 3],
        "b acted on at its retry; a's first version not, after its second"
    );
    let parked: Vec<(i64, String, bool)> = sqlx::query_as(
        "SELECT stream_sequence, last_error, retry_requested FROM parked_messages WHERE projection = 'test_reaction'",
    )
    .fetch_all(&parts.pool)
    .await
    .unwrap();
    assert_eq!(parked.len(), 1, "{parked:?}");
    assert_eq!(parked[0].0, 1);
    assert!(parked[0].1.contains("moved past"), "{parked:?}");
    assert!(!parked[0].2);
    parts.drop_all().await;
}

/// A read model that lists one table but also writes another.
struct Leaky;

impl Projection for Leaky {
    fn name(&self) -> &'static str {
        "test_leaky"
    }

    async fn apply(&self, uow: &mut UnitOfWork, delivery: &Delivery) -> Result<(), anyhow::Error> {
        let sequence = i64::try_from(delivery.stream_sequence)?;
        for sql in [
            "INSERT INTO test_listed (stream_sequence) VALUES ($1)",
            "INSERT INTO test_unlisted (stream_sequence) VALUES ($1)",
        ] {
            sqlx::query(sql).bind(sequence).execute(uow.conn()).await?;
        }
        Ok(())
    }

    async fn reset(&self, conn: &mut PgConnection) -> Result<(), anyhow::Error> {
        sqlx::query("DELETE FROM test_listed").execute(&mut *conn).await?;
        sqlx::query("DELETE FROM test_unlisted").execute(conn).await?;
        Ok(())
    }

    async fn digest(&self, conn: &mut PgConnection) -> Result<Option<String>, anyhow::Error> {
        Ok(Some(
            nrm_kernel::projection::rows_digest(conn, "SELECT t::text FROM test_listed t").await?,
        ))
    }

    fn tables(&self) -> &'static [&'static str] {
        &["test_listed"]
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shadow_comparison_never_writes_a_table_the_projection_does_not_list() {
    let parts = Parts::new().await;
    let store = EventStore::new(parts.pool.clone());
    for ddl in [
        "CREATE TABLE test_listed (stream_sequence BIGINT PRIMARY KEY)",
        "CREATE TABLE test_unlisted (stream_sequence BIGINT PRIMARY KEY)",
    ] {
        sqlx::query(ddl).execute(&parts.pool).await.unwrap();
    }
    for _ in 0..3 {
        append_case(&parts, &store, Uuid::now_v7()).await;
    }
    parts.publish_all(&mut parts.relay(&store)).await;
    let shutdown = CancellationToken::new();
    let runner = tokio::spawn(
        ProjectionRunner::new(store.clone(), parts.bus.clone(), "identification", Leaky).run(shutdown.clone()),
    );
    eventually("the three applied", Duration::from_secs(15), || async {
        (scalar(&parts.pool, "SELECT count(*) FROM test_unlisted").await == 3).then_some(())
    })
    .await;
    shutdown.cancel();
    runner.await.unwrap();

    let before: Vec<(i64, String)> = sqlx::query_as("SELECT stream_sequence, xmin::text FROM test_unlisted ORDER BY 1")
        .fetch_all(&parts.pool)
        .await
        .unwrap();
    let compared = ProjectionRunner::new(store.clone(), parts.bus.clone(), "identification", Leaky)
        .rebuild_compare()
        .await;
    let err = compared.expect_err("a projection writing outside tables() cannot be compared in a shadow");
    assert!(format!("{err:#}").contains("tables()"), "{err:#}");
    let after: Vec<(i64, String)> = sqlx::query_as("SELECT stream_sequence, xmin::text FROM test_unlisted ORDER BY 1")
        .fetch_all(&parts.pool)
        .await
        .unwrap();
    assert_eq!(after, before, "the live table it does not list is untouched");
    parts.drop_all().await;
}
