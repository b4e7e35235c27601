//! The kernel's one command path (`nrm_kernel::command::run`, `run_append`)
//! against the real PostgreSQL: a retry answers as the first run did, a
//! reused request ID is refused, a conflict on the current version is decided
//! again while a named version is refused, and a failed attempt writes
//! nothing, not even its audit entry.

#![allow(clippy::unwrap_used)] // Test code: a failed unwrap is a failed test.

use nrm_e2e::Parts;
use nrm_e2e::fixtures::reported;
use nrm_e2e::tables::TableSnapshot;
use nrm_kernel::AppError;
use nrm_kernel::auth::{Caller, Role};
use nrm_kernel::command::{self, CallContext, Decided, OnConflict, Planned, Request};
use nrm_kernel::permissions;
use nrm_kernel::store::{Actor, EventStore};
use nrm_proto::common::v1::CommandResult;
use std::sync::atomic::{AtomicUsize, Ordering};

use uuid::Uuid;

fn ctx() -> CallContext {
    let caller = Caller {
        actor: Actor {
            agency: "kg-mvd".into(),
            role: "police".into(),
            officer: "officer-1".into(),
        },
        role: Role::Police,
    };
    let permit = permissions::permit(permissions::IDENTIFICATION, "CompleteScreening", None, Role::Police).unwrap();
    CallContext::new(caller, Uuid::now_v7(), permit)
}

fn message(id: &str) -> CommandResult {
    CommandResult {
        aggregate_id: id.to_owned(),
        ..Default::default()
    }
}

/// The store and caller the commands run with.
struct On<'a> {
    parts: &'a Parts,
    store: &'a EventStore,
    ctx: &'a CallContext,
}

/// Appends one event to `stream` at its current version (read in the unit of work).
async fn append_current(
    on: &On<'_>,
    request_id: &str,
    stream: &str,
    on_conflict: OnConflict,
    pinned_version: Option<u64>,
    attempts: &AtomicUsize,
) -> Result<CommandResult, AppError> {
    let On { parts, store, ctx } = *on;
    let msg = message(stream);
    let subject = parts.bus.subject("identification", "case", stream);
    command::run(
        store,
        ctx,
        Request {
            method: "Append",
            request_id,
            message: &msg,
        },
        on_conflict,
        async |uow| {
            attempts.fetch_add(1, Ordering::Relaxed);
            let version = match pinned_version {
                Some(v) => v,
                None => uow.read_stream(stream).await?.len() as u64,
            };
            // Give a concurrent writer the chance to get in between.
            tokio::task::yield_now().await;
            let appended = uow
                .append(stream, version, &[reported(Uuid::now_v7())], &ctx.metadata(), &subject)
                .await?;
            Ok(Decided {
                answer: command::result(stream, &appended),
                subject: stream.to_owned(),
                purpose: "command",
                linked: Vec::new(),
            })
        },
    )
    .await
}

async fn audit_rows(parts: &Parts, action: &str) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM audit_log WHERE action = $1")
        .bind(action)
        .fetch_one(&parts.pool)
        .await
        .unwrap()
}

#[tokio::test]
async fn a_retry_answers_as_the_first_run_and_a_reused_request_id_is_refused() {
    let parts = Parts::new().await;
    let store = EventStore::new(parts.pool.clone());
    let ctx = ctx();
    let stream = format!("case-{}", Uuid::now_v7());
    let first = append_current(
        &On {
            parts: &parts,
            store: &store,
            ctx: &ctx,
        },
        "r-1",
        &stream,
        OnConflict::Retry,
        None,
        &AtomicUsize::new(0),
    )
    .await
    .unwrap();
    assert!(!first.replayed);
    let again = append_current(
        &On {
            parts: &parts,
            store: &store,
            ctx: &ctx,
        },
        "r-1",
        &stream,
        OnConflict::Retry,
        None,
        &AtomicUsize::new(0),
    )
    .await
    .unwrap();
    assert!(again.replayed, "the retry is marked as a replay");
    assert_eq!((again.version, &again.event_ids), (first.version, &first.event_ids));
    assert_eq!(
        store.read_stream(&stream).await.unwrap().len(),
        1,
        "the retry appended nothing"
    );
    assert_eq!(
        audit_rows(&parts, "Append").await,
        1,
        "one audit entry, with the first run's events"
    );

    let other = format!("case-{}", Uuid::now_v7());
    let reused = append_current(
        &On {
            parts: &parts,
            store: &store,
            ctx: &ctx,
        },
        "r-1",
        &other,
        OnConflict::Retry,
        None,
        &AtomicUsize::new(0),
    )
    .await;
    assert!(matches!(reused, Err(AppError::RequestIdReused)), "{reused:?}");
    assert!(store.read_stream(&other).await.unwrap().is_empty());
    parts.drop_all().await;
}

#[tokio::test]
async fn commands_on_the_current_version_are_decided_again_and_named_versions_refused() {
    let parts = Parts::new().await;
    let store = EventStore::new(parts.pool.clone());
    let ctx = ctx();
    let stream = format!("case-{}", Uuid::now_v7());
    let writers = 12;
    let attempts = &AtomicUsize::new(0);
    let results = futures::future::join_all((0..writers).map(|i| {
        let (parts, store, ctx, stream) = (&parts, &store, &ctx, &stream);
        async move {
            append_current(
                &On { parts, store, ctx },
                &format!("w-{i}"),
                stream,
                OnConflict::Retry,
                None,
                attempts,
            )
            .await
        }
    }))
    .await;
    let mut versions: Vec<u64> = results.into_iter().map(|r| r.unwrap().version).collect();
    versions.sort_unstable();
    assert_eq!(
        versions,
        (1..=writers).collect::<Vec<_>>(),
        "every writer got its own version"
    );
    assert!(
        attempts.load(Ordering::Relaxed) > usize::try_from(writers).unwrap(),
        "the writers collided and were decided again"
    );

    // A caller that named version 1 of a stream at version 12 is refused, and nothing is written.
    let before = TableSnapshot::take(&parts.pool).await;
    let stale = append_current(
        &On {
            parts: &parts,
            store: &store,
            ctx: &ctx,
        },
        "stale",
        &stream,
        OnConflict::Refuse,
        Some(1),
        attempts,
    )
    .await;
    assert!(matches!(stale, Err(AppError::Conflict { .. })), "{stale:?}");
    TableSnapshot::take(&parts.pool)
        .await
        .assert_unchanged_since(&before, "a command on a stale named version");
    parts.drop_all().await;
}

#[tokio::test]
async fn the_one_statement_path_records_events_answer_and_audit_together() {
    let parts = Parts::new().await;
    let store = EventStore::new(parts.pool.clone());
    let ctx = ctx();
    let stream = format!("case-{}", Uuid::now_v7());
    let subject = parts.bus.subject("identification", "case", &stream);
    let msg = message(&stream);
    let run = |request_id: &'static str, fail: bool| {
        let (store, ctx, stream, subject, msg) = (&store, &ctx, &stream, &subject, &msg);
        async move {
            command::run_append(
                store,
                ctx,
                Request {
                    method: "AppendFast",
                    request_id,
                    message: msg,
                },
                OnConflict::Retry,
                async || {
                    if fail {
                        return Err(AppError::precondition("TEST_RULE", "case", "the rule says no"));
                    }
                    let version = store.read_stream(stream).await?.len() as u64;
                    let id = stream.clone();
                    Ok(Planned {
                        stream_id: stream.clone(),
                        expected_version: version,
                        events: vec![reported(Uuid::now_v7())],
                        subject: subject.clone(),
                        audit_subject: stream.clone(),
                        answer: Box::new(move |appended| command::result(id, appended)),
                    })
                },
            )
            .await
        }
    };
    let before = TableSnapshot::take(&parts.pool).await;
    let refused = run("f-0", true).await;
    assert!(
        matches!(refused, Err(AppError::FailedPrecondition { .. })),
        "{refused:?}"
    );
    TableSnapshot::take(&parts.pool)
        .await
        .assert_unchanged_since(&before, "a command its rule refuses");

    let first = run("f-1", false).await.unwrap();
    let again = run("f-1", false).await.unwrap();
    assert!(again.replayed && !first.replayed);
    assert_eq!(first.event_ids, again.event_ids);
    assert_eq!(store.read_stream(&stream).await.unwrap().len(), 1);
    assert_eq!(audit_rows(&parts, "AppendFast").await, 1);
    parts.drop_all().await;
}
