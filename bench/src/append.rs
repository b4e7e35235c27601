//! The append load: N tokio tasks, each running one single-event command
//! per iteration on a new stream for a fixed time, after a warm-up.
//!
//! The main workload is the kernel's path for such a command:
//! `EventStore::append_command` (the event, its outbox row, the command's
//! answer and an audit entry, one statement), exactly as the services run a
//! command on a case. The other workloads take its cost apart or set it
//! beside the transaction path (`begin`, `append`, `record_command`, audit,
//! `commit`) that commands writing more than their event still take.

use std::sync::Arc;
use std::time::Duration;

use nrm_kernel::ids::{CaseId, CommitId, EventId};
use nrm_kernel::store::{Actor, Append, Appended, AuditEntry, CommandRecord, EventMetadata, EventStore, NewEvent};
use sqlx::PgPool;
use sqlx::types::Json;
use tokio::time::Instant;

use crate::stats::{self, CpuSample, LoadGenerator, RunResult};

/// Event type of every benchmark event (the identification service's first event).
pub const EVENT_TYPE: &str = "PresumedVictimReported";
/// W3C trace parent carried in every benchmark event's metadata.
pub const TRACEPARENT: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
/// Subject prefix of the benchmark's outbox rows.
pub const SUBJECT_PREFIX: &str = "bench.identification.v1.case.";
/// Acting agency, role and officer of every benchmark event.
pub const ACTOR: (&str, &str, &str) = ("kg-mvd", "police", "officer-17");

/// The command recorded with every benchmark event (a single-event command on a case).
pub const ACTION: &str = "CompleteScreening";
/// Purpose of every benchmark audit entry.
pub const PURPOSE: &str = "command";
/// A command's fingerprint (a SHA-256): its size is what matters.
pub const FINGERPRINT: [u8; 32] = [0x5a; 32];
/// A command's encoded answer (a `CommandResult` is about this long).
pub const RESPONSE: [u8; 100] = [0x3c; 100];

/// The kernel's append statement, read from `services/kernel/src/store.rs`
/// when this was built (for `EXPLAIN` only), if it can still be found there.
fn kernel_statement() -> Option<&'static str> {
    let source = include_str!("../../services/kernel/src/store.rs");
    let start = source.find("WITH current AS (")?;
    let end = start + source[start..].find("AS inserted")? + "AS inserted".len();
    Some(&source[start..end])
}

/// A request key as the kernel makes them: `{agency}:{client request ID}`.
fn request_key() -> String {
    format!("{}:{}", ACTOR.0, uuid::Uuid::new_v4())
}

/// A payload of `len` bytes (a fixed, non-repeating-looking pattern).
#[must_use]
pub fn payload(len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| u8::try_from((i * 131 + 7) % 251).unwrap_or(0))
        .collect()
}

/// Metadata of one benchmark event: new correlation and causation IDs.
#[must_use]
pub fn metadata() -> EventMetadata {
    EventMetadata {
        correlation_id: uuid::Uuid::now_v7(),
        causation_id: uuid::Uuid::now_v7(),
        actor: Actor {
            agency: ACTOR.0.into(),
            role: ACTOR.1.into(),
            officer: ACTOR.2.into(),
        },
        traceparent: Some(TRACEPARENT.into()),
        tracestate: None,
    }
}

/// What one iteration does.
#[derive(Clone)]
pub enum Workload {
    /// `EventStore::append_command`: one event, outbox row, answer and audit entry in one statement.
    Command(EventStore),
    /// The same rows through a transaction: `begin`, `append`,
    /// `record_command`, `audit::record`, `commit`.
    Transaction(EventStore),
    /// The raw ceiling's statement (see `raw.rs`), autocommit, sent by sqlx.
    RawStatement(PgPool, Arc<str>),
}

impl Workload {
    async fn run_once(&self, payload: &[u8]) -> anyhow::Result<()> {
        let (store, transaction) = match self {
            Self::Command(store) => (store, false),
            Self::Transaction(store) => (store, true),
            Self::RawStatement(pool, sql) => {
                sqlx::query(sqlx::AssertSqlSafe(Arc::clone(sql))).execute(pool).await?;
                return Ok(());
            }
        };
        let case = CaseId::new();
        let stream_id = format!("case-{case}");
        let subject = format!("{SUBJECT_PREFIX}{case}");
        let subject_id = case.to_string();
        let meta = metadata();
        let events = [NewEvent {
            event_type: EVENT_TYPE.into(),
            schema_version: 1,
            payload: payload.to_vec(),
        }];
        let key = request_key();
        if transaction {
            let mut uow = store.begin().await?;
            uow.append(&stream_id, 0, &events, &meta, &subject).await?;
            uow.record_command(&key, &FINGERPRINT, &RESPONSE).await?;
            nrm_kernel::audit::record(uow.conn(), &meta.actor, ACTION, &subject_id, PURPOSE).await?;
            uow.commit().await?;
        } else {
            let append = Append {
                stream_id: &stream_id,
                expected_version: 0,
                events: &events,
                metadata: &meta,
                subject: &subject,
            };
            let record = CommandRecord {
                request_key: &key,
                fingerprint: &FINGERPRINT,
                response: &RESPONSE,
            };
            let audit = AuditEntry {
                action: ACTION,
                subject_id: &subject_id,
                purpose: PURPOSE,
                person_id: None,
            };
            store
                .append_command(&append, &Appended::plan(0, events.len()), &record, Some(&audit))
                .await?;
        }
        Ok(())
    }
}

/// Runs `workload` with `clients` concurrent tasks: `warmup`, then `measure`.
/// Only iterations that start inside the measured window count.
///
/// # Errors
/// When a task panics; failed iterations are counted, not fatal.
pub async fn drive(
    workload: &Workload,
    clients: usize,
    warmup: Duration,
    measure: Duration,
    payload_len: usize,
) -> anyhow::Result<RunResult> {
    let payload: Arc<[u8]> = payload(payload_len).into();
    let start = Instant::now();
    let measure_start = start + warmup;
    let end = measure_start + measure;
    let mut tasks = Vec::with_capacity(clients);
    for _ in 0..clients {
        let workload = workload.clone();
        let payload = Arc::clone(&payload);
        tasks.push(tokio::spawn(client_loop(workload, payload, measure_start, end)));
    }
    tokio::time::sleep_until(measure_start).await;
    let cpu_before = CpuSample::now();
    let mut histogram = stats::new_histogram()?;
    let mut errors = 0;
    let mut first_error = None;
    let mut last_finish = end;
    for task in tasks {
        let outcome = task.await?;
        histogram.add(&outcome.histogram)?;
        errors += outcome.errors;
        last_finish = last_finish.max(outcome.last_finish);
        if first_error.is_none() {
            first_error = outcome.first_error;
        }
    }
    let cpu_after = CpuSample::now();
    if let Some(err) = first_error {
        eprintln!("bench: {errors} iterations failed; the first: {err}");
    }
    let mut result = RunResult::from_histogram(&histogram, last_finish - measure_start, errors);
    result.cpu = cpu_before.per_op(&cpu_after, result.ops, LoadGenerator::ThisProcess);
    Ok(result)
}

struct ClientOutcome {
    histogram: hdrhistogram::Histogram<u64>,
    errors: u64,
    first_error: Option<String>,
    last_finish: Instant,
}

async fn client_loop(workload: Workload, payload: Arc<[u8]>, measure_start: Instant, end: Instant) -> ClientOutcome {
    let mut outcome = ClientOutcome {
        histogram: stats::new_histogram().unwrap_or_else(|_| unreachable!("constant bounds")),
        errors: 0,
        first_error: None,
        last_finish: measure_start,
    };
    loop {
        let started = Instant::now();
        if started >= end {
            break;
        }
        let result = workload.run_once(&payload).await;
        let finished = Instant::now();
        if started < measure_start {
            continue;
        }
        outcome.last_finish = finished;
        match result {
            Ok(()) => stats::record(&mut outcome.histogram, finished - started),
            Err(err) => {
                outcome.errors += 1;
                if outcome.first_error.is_none() {
                    outcome.first_error = Some(format!("{err:#}"));
                }
            }
        }
    }
    outcome
}

/// `EXPLAIN (ANALYZE, BUFFERS, WAL)` of the kernel's statement for one
/// single-event command, inside a transaction that is rolled back; the last
/// of three, so first-touch effects (a full-page image, a cold cache) do not show.
///
/// # Errors
/// When the statement is no longer where it was in `store.rs`, or its
/// parameters changed, or the database refuses.
pub async fn explain_kernel_append(pool: &PgPool, payload_len: usize) -> anyhow::Result<String> {
    let sql = kernel_statement().ok_or_else(|| anyhow::anyhow!("the append statement was not found in store.rs"))?;
    let mut plan = String::new();
    for _ in 0..3 {
        let case = CaseId::new();
        let meta = metadata();
        let mut tx = pool.begin().await?;
        let rows: Vec<String> = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
            "EXPLAIN (ANALYZE, BUFFERS, WAL, COSTS OFF) {sql}"
        )))
        .bind(format!("case-{case}"))
        .bind(0i64)
        .bind(vec![EventId::new().as_uuid()])
        .bind(vec![EVENT_TYPE.to_owned()])
        .bind(vec![1i32])
        .bind(Json(&meta))
        .bind(vec![payload(payload_len)])
        .bind(CommitId::new().as_uuid())
        .bind(format!("{SUBJECT_PREFIX}{case}"))
        .bind(Some(request_key()))
        .bind(Some(FINGERPRINT.to_vec()))
        .bind(Some(RESPONSE.to_vec()))
        .bind(ACTOR.0)
        .bind(ACTOR.1)
        .bind(ACTOR.2)
        .bind(Some(ACTION))
        .bind(Some(case.to_string()))
        .bind(Some(PURPOSE))
        .fetch_all(&mut *tx)
        .await?;
        tx.rollback().await?;
        plan = rows.join("\n");
    }
    Ok(plan)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_payload_has_the_asked_size() {
        assert_eq!(payload(300).len(), 300);
        assert_ne!(payload(300)[0], payload(300)[1]);
    }

    #[test]
    fn the_kernel_statement_is_found_in_the_store() {
        let sql = kernel_statement().unwrap();
        assert!(sql.contains("INSERT INTO events"));
        assert!(sql.ends_with("AS inserted"));
    }

    #[test]
    fn metadata_serialises_to_a_fixed_size() {
        let a = serde_json::to_string(&metadata()).unwrap();
        let b = serde_json::to_string(&metadata()).unwrap();
        assert_eq!(a.len(), b.len());
    }
}
