//! Durable deadlines: "mark this referral overdue at 14:00", "free this bed
//! when the hold expires".
//!
//! A timer is written in the transaction of the command that sets it, so it
//! exists exactly when the command committed. The runner fires each due timer
//! in a transaction of its own that also writes the timer's effects and marks
//! it fired: after a crash it fires again only if its effects were not
//! committed, so it fires exactly once, whatever restarts in between. Several
//! runners may poll the same database (`FOR UPDATE SKIP LOCKED`).
//!
//! Due is decided by the database's clock (`due_at <= now()`), and a
//! handler's effect uses the timer's [`Timer::due_at`], never the clock of the
//! machine it runs on, which may disagree.
//!
//! A handler that fails is retried with growing back-off ([`RetryPolicy`])
//! while the other due timers go on; after the policy's attempts the timer is
//! parked (`parked_at`, a metric and a log line with its IDs) until an
//! operator retries it (`nrmctl ops retry`). A transient database fault
//! counts no attempt.

use std::future::Future;
use std::time::Duration;

use chrono::{DateTime, Utc};
use sqlx::{PgConnection, Row};
use tokio_util::sync::CancellationToken;
use tracing::Instrument as _;
use uuid::Uuid;

use crate::projection::error_text;
use crate::retry::{self, RetryPolicy};
use crate::store::{EventStore, UnitOfWork};

/// A due timer, as its handler sees it.
#[derive(Debug, Clone)]
pub struct Timer {
    /// Its ID.
    pub id: Uuid,
    /// What it is for, for example `referral.overdue`.
    pub kind: String,
    /// The aggregate it concerns.
    pub aggregate_id: String,
    /// When it was due.
    pub due_at: DateTime<Utc>,
    /// Whatever the handler needs (encoded by the service).
    pub payload: Vec<u8>,
}

/// Sets (or moves) the timer of `kind` for `aggregate_id`, in the caller's transaction.
///
/// # Errors
/// When the database fails.
pub async fn schedule(
    conn: &mut PgConnection,
    kind: &str,
    aggregate_id: &str,
    due_at: DateTime<Utc>,
    payload: &[u8],
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "INSERT INTO timers (id, kind, aggregate_id, due_at, payload) VALUES ($1, $2, $3, $4, $5)
         ON CONFLICT (kind, aggregate_id) DO UPDATE SET due_at = EXCLUDED.due_at, payload = EXCLUDED.payload,
             fired_at = NULL, attempts = 0, next_attempt_at = NULL, parked_at = NULL, last_error = NULL",
    )
    .bind(Uuid::now_v7())
    .bind(kind)
    .bind(aggregate_id)
    .bind(due_at)
    .bind(payload)
    .execute(conn)
    .await?;
    Ok(())
}

/// Cancels the pending timer of `kind` for `aggregate_id`; returns whether one was pending.
///
/// # Errors
/// When the database fails.
pub async fn cancel(conn: &mut PgConnection, kind: &str, aggregate_id: &str) -> Result<bool, sqlx::Error> {
    let deleted = sqlx::query("DELETE FROM timers WHERE kind = $1 AND aggregate_id = $2 AND fired_at IS NULL")
        .bind(kind)
        .bind(aggregate_id)
        .execute(conn)
        .await?
        .rows_affected();
    Ok(deleted > 0)
}

/// What happens when a timer is due.
pub trait TimerHandler: Send + Sync + 'static {
    /// The kinds of timer this handler fires.
    fn kinds(&self) -> &'static [&'static str];

    /// Writes the timer's effects in `uow`; the timer is marked fired in the same transaction.
    fn fire(&self, uow: &mut UnitOfWork, timer: &Timer) -> impl Future<Output = Result<(), anyhow::Error>> + Send;
}

/// Polls for due timers and fires them.
pub struct TimerRunner<H> {
    store: EventStore,
    handler: H,
    poll_interval: Duration,
    retry: RetryPolicy,
}

impl<H: TimerHandler> TimerRunner<H> {
    /// A runner polling every `poll_interval`.
    pub fn new(store: EventStore, handler: H, poll_interval: Duration) -> Self {
        Self {
            store,
            handler,
            poll_interval,
            retry: RetryPolicy::default(),
        }
    }

    /// The same runner with another retry policy.
    #[must_use]
    pub fn with_retry(mut self, retry: RetryPolicy) -> Self {
        self.retry = retry;
        self
    }

    /// Fires due timers until `shutdown`.
    pub async fn run(self, shutdown: CancellationToken) {
        let mut failures = 0;
        loop {
            let pause = match self.fire_due().await {
                Ok(fired) if fired > 0 => {
                    failures = 0;
                    continue;
                }
                Ok(_) => {
                    failures = 0;
                    self.poll_interval
                }
                Err(err) => {
                    failures += 1;
                    tracing::warn!(error = %err, "timer round failed; retrying");
                    self.retry.delay(failures).max(self.poll_interval)
                }
            };
            tokio::select! {
                () = shutdown.cancelled() => return,
                () = tokio::time::sleep(pause) => {}
            }
        }
    }

    /// Fires every timer due now, one transaction each; returns how many
    /// fired. A timer whose handler fails is put back with a later attempt
    /// time (or parked) and the others go on.
    ///
    /// # Errors
    /// When the database fails (the round stops; the timers stay pending).
    pub async fn fire_due(&self) -> Result<usize, anyhow::Error> {
        let mut fired = 0;
        loop {
            let mut uow = self.store.begin().await?;
            let Some(row) = sqlx::query(
                "SELECT id, kind, aggregate_id, due_at, payload, attempts FROM timers
                 WHERE fired_at IS NULL AND parked_at IS NULL AND due_at <= now() AND kind = ANY($1)
                   AND (next_attempt_at IS NULL OR next_attempt_at <= now())
                 ORDER BY due_at LIMIT 1 FOR UPDATE SKIP LOCKED",
            )
            .bind(self.handler.kinds())
            .fetch_optional(uow.conn())
            .await?
            else {
                return Ok(fired);
            };
            let timer = Timer {
                id: row.get("id"),
                kind: row.get("kind"),
                aggregate_id: row.get("aggregate_id"),
                due_at: row.get("due_at"),
                payload: row.get("payload"),
            };
            let attempts: i32 = row.get("attempts");
            let span = tracing::info_span!("timer.fire", kind = %timer.kind, aggregate_id = %timer.aggregate_id);
            match self.handler.fire(&mut uow, &timer).instrument(span).await {
                Ok(()) => {
                    sqlx::query("UPDATE timers SET fired_at = now() WHERE id = $1")
                        .bind(timer.id)
                        .execute(uow.conn())
                        .await?;
                    uow.commit().await?;
                    metrics::counter!("nrm_timers_fired_total", "kind" => timer.kind.clone()).increment(1);
                    fired += 1;
                }
                Err(err) => {
                    drop(uow);
                    if retry::is_transient(&err) {
                        return Err(err);
                    }
                    self.failed(&timer, u32::try_from(attempts).unwrap_or(0) + 1, &err)
                        .await?;
                }
            }
        }
    }

    /// Records a failed attempt: a later attempt time, or parked.
    async fn failed(&self, timer: &Timer, attempts: u32, err: &anyhow::Error) -> Result<(), anyhow::Error> {
        let park = self.retry.exhausted(attempts);
        let delay_ms = i64::try_from(self.retry.delay(attempts).as_millis()).unwrap_or(i64::MAX);
        sqlx::query(
            "UPDATE timers SET attempts = $2, last_error = $3,
                 next_attempt_at = now() + make_interval(secs => $4::double precision / 1000),
                 parked_at = CASE WHEN $5 THEN now() END
             WHERE id = $1 AND fired_at IS NULL",
        )
        .bind(timer.id)
        .bind(i32::try_from(attempts).unwrap_or(i32::MAX))
        .bind(error_text(err))
        .bind(delay_ms)
        .bind(park)
        .execute(self.store.pool())
        .await?;
        metrics::counter!("nrm_timers_failed_total", "kind" => timer.kind.clone()).increment(1);
        if park {
            metrics::counter!("nrm_timers_parked_total", "kind" => timer.kind.clone()).increment(1);
            tracing::error!(timer_id = %timer.id, kind = %timer.kind, aggregate_id = %timer.aggregate_id, attempts, error = %err, "timer parked: its handler kept failing");
        } else {
            tracing::warn!(timer_id = %timer.id, kind = %timer.kind, aggregate_id = %timer.aggregate_id, attempts, error = %err, "timer failed; tried again later");
        }
        Ok(())
    }
}
