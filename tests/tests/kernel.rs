//! The kernel's guarantees, each against the real servers: one winner per
//! version, nothing skipped, nothing published twice, redelivery harmless.

#![allow(clippy::unwrap_used)] // Test code: a failed unwrap is a failed test.

use std::time::Duration;

use async_nats::jetstream::AckKind;
use futures::StreamExt as _;
use nrm_e2e::Parts;
use nrm_e2e::fixtures::{CASE_TIMER, CaseTimer, append_case, case_list, metadata, reported};
use nrm_e2e::tables::TableSnapshot;
use nrm_identification::projections::CaseList;
use nrm_kernel::projection::{Outcome, ProjectionRunner};
use nrm_kernel::store::{EventStore, StoreError};
use uuid::Uuid;

#[tokio::test]
async fn of_concurrent_appends_at_one_version_exactly_one_wins() {
    let parts = Parts::new().await;
    let store = EventStore::new(parts.pool.clone());
    let case_id = Uuid::now_v7();
    let subject = parts.bus.subject("identification", "case", &case_id.to_string());
    let mut tasks = Vec::new();
    for _ in 0..16 {
        let store = store.clone();
        let subject = subject.clone();
        tasks.push(tokio::spawn(async move {
            let mut uow = store.begin().await?;
            uow.append(
                &format!("case-{case_id}"),
                0,
                &[reported(case_id)],
                &metadata(),
                &subject,
            )
            .await?;
            uow.commit().await
        }));
    }
    let mut wins = 0;
    let mut conflicts = 0;
    for task in tasks {
        match task.await.unwrap() {
            Ok(()) => wins += 1,
            Err(StoreError::Conflict { .. }) => conflicts += 1,
            Err(other) => panic!("unexpected error: {other}"),
        }
    }
    assert_eq!((wins, conflicts), (1, 15));
    assert_eq!(store.read_stream(&format!("case-{case_id}")).await.unwrap().len(), 1);
    let outbox: i64 = sqlx::query_scalar("SELECT count(*) FROM outbox")
        .fetch_one(&parts.pool)
        .await
        .unwrap();
    assert_eq!(outbox, 1, "only the winner's commit waits to be published");
    parts.drop_all().await;
}

#[tokio::test]
async fn transactions_committing_in_reverse_order_are_both_published() {
    let parts = Parts::new().await;
    let store = EventStore::new(parts.pool.clone());
    let mut relay = parts.relay(&store);
    let (early, late) = (Uuid::now_v7(), Uuid::now_v7());

    // The early transaction takes the first outbox ID but stays open...
    let mut first = store.begin().await.unwrap();
    first
        .append(
            &format!("case-{early}"),
            0,
            &[reported(early)],
            &metadata(),
            &parts.bus.subject("identification", "case", &early.to_string()),
        )
        .await
        .unwrap();
    // ...while a later one commits.
    append_case(&parts, &store, late).await;
    let published = relay.publish_round().await.unwrap();
    assert_eq!(
        published, 0,
        "the relay waits for the open transaction instead of passing over it"
    );

    first.commit().await.unwrap();
    assert_eq!(parts.publish_all(&mut relay).await, 2);
    let messages = parts.messages().await;
    let streams: Vec<&str> = messages
        .iter()
        .map(|m| m.headers.get("Nrm-Stream-Id").unwrap().as_str())
        .collect();
    assert_eq!(streams, [format!("case-{early}"), format!("case-{late}")]);
    parts.drop_all().await;
}

/// The state a relay crash between JetStream's acknowledgement and the
/// outbox delete leaves behind, rebuilt in place (the row put back): no
/// process dies here (`process.rs` and the fault suite kill one for real).
#[tokio::test]
async fn a_commit_already_on_the_stream_is_not_published_again_when_its_outbox_row_is_back() {
    let parts = Parts::new().await;
    let store = EventStore::new(parts.pool.clone());
    let case_id = Uuid::now_v7();
    append_case(&parts, &store, case_id).await;
    // The row as it was before the relay published it.
    let row: (Uuid, String, i64, i64, String) =
        sqlx::query_as("SELECT commit_id, stream_id, first_version, last_version, subject FROM outbox")
            .fetch_one(&parts.pool)
            .await
            .unwrap();
    assert_eq!(parts.publish_all(&mut parts.relay(&store)).await, 1);
    assert_eq!(parts.messages().await.len(), 1);

    // As if the relay had died after the acknowledgement and before deleting
    // the row: put the row back, under another message ID, so that JetStream's
    // de-duplication (`Nats-Msg-Id`, which holds only for its window) cannot
    // catch the republish: only the relay's check of the stream can.
    sqlx::query(
        "INSERT INTO outbox (commit_id, stream_id, first_version, last_version, subject) VALUES ($1, $2, $3, $4, $5)",
    )
    .bind(Uuid::now_v7())
    .bind(&row.1)
    .bind(row.2)
    .bind(row.3)
    .bind(&row.4)
    .execute(&parts.pool)
    .await
    .unwrap();

    // A new relay (as after a restart) checks the stream first.
    assert_eq!(parts.publish_all(&mut parts.relay(&store)).await, 1);
    assert_eq!(parts.messages().await.len(), 1, "the commit is on NATS exactly once");
    let left: i64 = sqlx::query_scalar("SELECT count(*) FROM outbox")
        .fetch_one(&parts.pool)
        .await
        .unwrap();
    assert_eq!(left, 0);
    parts.drop_all().await;
}

#[tokio::test]
async fn a_redelivered_message_leaves_the_read_model_unchanged() {
    let parts = Parts::new().await;
    let store = EventStore::new(parts.pool.clone());
    append_case(&parts, &store, Uuid::now_v7()).await;
    parts.publish_all(&mut parts.relay(&store)).await;
    let runner = ProjectionRunner::new(
        EventStore::new(parts.pool.clone()),
        parts.bus.clone(),
        "identification",
        CaseList,
    );
    // A durable consumer with acknowledgements, so the server can be asked to redeliver.
    let consumer = parts
        .stream
        .create_consumer(async_nats::jetstream::consumer::pull::Config {
            durable_name: Some("redelivery".into()),
            ack_policy: async_nats::jetstream::consumer::AckPolicy::Explicit,
            ..Default::default()
        })
        .await
        .unwrap();
    let mut messages = consumer.messages().await.unwrap();

    let first = messages.next().await.unwrap().unwrap();
    assert_eq!(runner.handle(&first).await.unwrap(), Outcome::Applied);
    let after_first = case_list(&parts.pool).await;
    assert_eq!(after_first.len(), 1);

    // Ask the server to deliver it again, as after a crash before the ack.
    first.ack_with(AckKind::Nak(None)).await.unwrap();
    let again = tokio::time::timeout(Duration::from_secs(10), messages.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    let info = again.info().unwrap();
    assert_eq!(info.delivered, 2, "a real redelivery");
    assert_eq!(runner.handle(&again).await.unwrap(), Outcome::AlreadyApplied);
    again.ack().await.unwrap();
    assert_eq!(case_list(&parts.pool).await, after_first);
    parts.drop_all().await;
}

#[tokio::test]
async fn a_projection_rebuilt_from_the_stream_equals_the_original() {
    let parts = Parts::new().await;
    let store = EventStore::new(parts.pool.clone());
    for _ in 0..5 {
        append_case(&parts, &store, Uuid::now_v7()).await;
    }
    parts.publish_all(&mut parts.relay(&store)).await;
    let runner = || {
        ProjectionRunner::new(
            EventStore::new(parts.pool.clone()),
            parts.bus.clone(),
            "identification",
            CaseList,
        )
    };
    let shutdown = tokio_util::sync::CancellationToken::new();
    let task = tokio::spawn(runner().run(shutdown.clone()));
    for _ in 0..200 {
        if case_list(&parts.pool).await.len() == 5 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    shutdown.cancel();
    task.await.unwrap();
    let original = case_list(&parts.pool).await;
    assert_eq!(original.len(), 5);

    // Damage the read model; a rebuild replays the stream and restores it, in one go.
    sqlx::query("DELETE FROM case_list WHERE case_id = $1")
        .bind(original[0].0)
        .execute(&parts.pool)
        .await
        .unwrap();
    sqlx::query("UPDATE case_list SET version = 99")
        .execute(&parts.pool)
        .await
        .unwrap();
    runner().rebuild().await.unwrap();
    assert_eq!(case_list(&parts.pool).await, original);
    parts.drop_all().await;
}

#[tokio::test]
async fn a_due_timer_fires_exactly_once_across_concurrent_runners_and_a_later_one() {
    use chrono::Utc;
    use nrm_kernel::timers::{self, TimerRunner};

    let parts = Parts::new().await;
    let store = EventStore::new(parts.pool.clone());
    let (due, later, cancelled) = (Uuid::now_v7(), Uuid::now_v7(), Uuid::now_v7());
    let mut conn = parts.pool.acquire().await.unwrap();
    let past = Utc::now() - chrono::Duration::seconds(1);
    timers::schedule(&mut conn, CASE_TIMER, &due.to_string(), past, b"")
        .await
        .unwrap();
    timers::schedule(&mut conn, CASE_TIMER, &cancelled.to_string(), past, b"")
        .await
        .unwrap();
    timers::schedule(
        &mut conn,
        CASE_TIMER,
        &later.to_string(),
        Utc::now() + chrono::Duration::hours(1),
        b"",
    )
    .await
    .unwrap();
    assert!(
        timers::cancel(&mut conn, CASE_TIMER, &cancelled.to_string())
            .await
            .unwrap()
    );
    drop(conn);

    let runner = || {
        TimerRunner::new(
            store.clone(),
            CaseTimer {
                subject: parts.bus.subject("identification", "case", "timers"),
            },
            Duration::from_millis(50),
        )
    };
    // Two runners at once, as two replicas of a service would be.
    let (a, b) = (runner(), runner());
    let (fired_a, fired_b) = tokio::join!(a.fire_due(), b.fire_due());
    assert_eq!(fired_a.unwrap() + fired_b.unwrap(), 1);
    // A runner started later (as after a restart) finds nothing more to fire.
    assert_eq!(runner().fire_due().await.unwrap(), 0);
    let events: i64 = sqlx::query_scalar("SELECT count(*) FROM events")
        .fetch_one(&parts.pool)
        .await
        .unwrap();
    assert_eq!(events, 1, "only the due, uncancelled timer had an effect");
    parts.drop_all().await;
}

#[tokio::test]
async fn a_command_appended_in_one_statement_writes_all_or_nothing() {
    use nrm_kernel::store::{Append, Appended, AuditEntry, CommandRecord};

    let parts = Parts::new().await;
    let store = EventStore::new(parts.pool.clone());
    let case_id = Uuid::now_v7();
    let stream_id = format!("case-{case_id}");
    let subject = parts.bus.subject("identification", "case", &case_id.to_string());
    let events = [reported(case_id)];
    let metadata = metadata();
    let append = |expected_version| Append {
        stream_id: &stream_id,
        expected_version,
        events: &events,
        metadata: &metadata,
        subject: &subject,
    };
    let audit = AuditEntry {
        action: "ReportPresumedVictim",
        subject_id: &stream_id,
        purpose: "command",
        person_id: None,
    };
    let record = |key| CommandRecord {
        request_key: key,
        fingerprint: b"fp",
        response: b"answer",
    };
    let plan = Appended::plan(0, 1);
    store
        .append_command(&append(0), &plan, &record("kg-mvd:r-1"), Some(&audit))
        .await
        .unwrap();
    assert_eq!(
        store.read_stream(&stream_id).await.unwrap()[0].event_id,
        plan.event_ids[0]
    );
    let written = TableSnapshot::take(&parts.pool).await;
    for table in ["events", "outbox", "commands", "audit_log"] {
        assert_eq!(written.rows(table), 1, "{table}");
    }

    // A stale version writes nothing: no event, no answer, no audit entry, in no table.
    let stale = store
        .append_command(&append(0), &Appended::plan(0, 1), &record("kg-mvd:r-2"), Some(&audit))
        .await;
    assert!(matches!(stale, Err(StoreError::Conflict { .. })));
    TableSnapshot::take(&parts.pool)
        .await
        .assert_unchanged_since(&written, "an append at a stale version");
    // A twin of an answered command writes nothing either.
    let twin = store
        .append_command(&append(1), &Appended::plan(1, 1), &record("kg-mvd:r-1"), Some(&audit))
        .await;
    assert!(matches!(twin, Err(StoreError::DuplicateRequest)));
    TableSnapshot::take(&parts.pool)
        .await
        .assert_unchanged_since(&written, "a twin of an answered command");
    parts.drop_all().await;
}

/// A transaction begun in another's snapshot (`db::begin_in_snapshot_of`)
/// reads what that one reads: a row committed after the first took its
/// snapshot, and before the second began, is in neither; a transaction of
/// its own sees it. Without the snapshot's import the second sees it too.
/// A READ COMMITTED transaction's snapshot is refused.
#[tokio::test]
async fn a_transaction_begun_in_anothers_snapshot_reads_what_that_one_reads() {
    let parts = Parts::new().await;
    let pool = &parts.pool;
    sqlx::query("CREATE TABLE snapshot_probe (n integer)")
        .execute(pool)
        .await
        .unwrap();
    sqlx::query("INSERT INTO snapshot_probe VALUES (1)")
        .execute(pool)
        .await
        .unwrap();
    let count = "SELECT count(*) FROM snapshot_probe";
    let mut first = pool.begin().await.unwrap();
    sqlx::query("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
        .execute(&mut *first)
        .await
        .unwrap();
    let seen: i64 = sqlx::query_scalar(count).fetch_one(&mut *first).await.unwrap();
    sqlx::query("INSERT INTO snapshot_probe VALUES (2)")
        .execute(pool)
        .await
        .unwrap();
    let mut conn = pool.acquire().await.unwrap();
    let mut second = nrm_kernel::db::begin_in_snapshot_of(&mut first, &mut conn)
        .await
        .unwrap();
    let beside: i64 = sqlx::query_scalar(count).fetch_one(&mut *second).await.unwrap();
    let refused = sqlx::query("INSERT INTO snapshot_probe VALUES (3)")
        .execute(&mut *second)
        .await;
    assert!(refused.is_err(), "the second transaction reads only");
    second.rollback().await.unwrap();
    drop(conn);
    first.commit().await.unwrap();
    let now: i64 = sqlx::query_scalar(count).fetch_one(pool).await.unwrap();
    assert_eq!((seen, beside, now), (1, 1, 2));
    // A READ COMMITTED transaction would not keep the snapshot it exports.
    let mut read_committed = pool.begin().await.unwrap();
    let mut conn = pool.acquire().await.unwrap();
    let refused = nrm_kernel::db::begin_in_snapshot_of(&mut read_committed, &mut conn)
        .await
        .map(|_| ());
    assert!(matches!(refused, Err(sqlx::Error::InvalidArgument(_))), "{refused:?}");
    drop(conn);
    read_committed.rollback().await.unwrap();
    parts.drop_all().await;
}
