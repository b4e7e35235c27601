//! The one retry policy of the kernel, and the one rule that tells a passing
//! fault from a failure.
//!
//! - A *transient* error is one of the infrastructure, not of the item: the
//!   database restarting or unreachable, a connection dropped, a pool
//!   exhausted, a serialisation failure. Whatever was being done is retried,
//!   as often as it takes, and never counts against the item. A command that
//!   meets one answers `UNAVAILABLE` (retryable with the same request ID).
//! - Any other error counts as an attempt of the item (a message, a timer):
//!   retried with growing back-off, then *parked* so that the items behind it
//!   go on (see [`crate::projection`] and [`crate::timers`]).

use std::time::Duration;

use serde::Deserialize;

/// Back-off and attempts of background work (relay rounds, messages, timers).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub struct RetryPolicy {
    /// Attempts of one item before it is parked (`NRM_RETRY__ATTEMPTS`, default 8).
    #[serde(default = "default_attempts")]
    pub attempts: u32,
    /// The first back-off (`NRM_RETRY__FIRST_MS`, default 100).
    #[serde(default = "default_first_ms")]
    pub first_ms: u64,
    /// The longest back-off (`NRM_RETRY__MAX_MS`, default 10000).
    #[serde(default = "default_max_ms")]
    pub max_ms: u64,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            attempts: default_attempts(),
            first_ms: default_first_ms(),
            max_ms: default_max_ms(),
        }
    }
}

fn default_attempts() -> u32 {
    8
}

fn default_first_ms() -> u64 {
    100
}

fn default_max_ms() -> u64 {
    10_000
}

/// How a command decided on the current version is decided again after
/// another writer appended first: at once, with a short random pause that
/// grows, up to 20 attempts.
pub const CONFLICTS: RetryPolicy = RetryPolicy {
    attempts: 20,
    first_ms: 1,
    max_ms: 50,
};

impl RetryPolicy {
    /// [`RetryPolicy::delay`] with full jitter: a random pause up to it, so
    /// that writers that collided do not collide again.
    #[must_use]
    pub fn jittered(&self, failures: u32) -> Duration {
        use rand::Rng as _;
        let ceiling = u64::try_from(self.delay(failures).as_micros())
            .unwrap_or(u64::MAX)
            .max(1);
        Duration::from_micros(rand::thread_rng().gen_range(1..=ceiling))
    }

    /// The back-off after `failures` failures (1 for the first): doubling
    /// from the first back-off up to the longest.
    #[must_use]
    pub fn delay(&self, failures: u32) -> Duration {
        let exponent = failures.saturating_sub(1).min(20);
        let ms = self
            .first_ms
            .max(1)
            .saturating_mul(1 << exponent)
            .min(self.max_ms.max(1));
        Duration::from_millis(ms)
    }

    /// Whether an item that failed `failures` times is parked now.
    #[must_use]
    pub fn exhausted(&self, failures: u32) -> bool {
        failures >= self.attempts.max(1)
    }
}

/// Whether a database error is a passing fault of the infrastructure.
#[must_use]
pub fn is_transient_sqlx(err: &sqlx::Error) -> bool {
    match err {
        sqlx::Error::Io(_)
        | sqlx::Error::Tls(_)
        | sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::WorkerCrashed
        | sqlx::Error::Protocol(_) => true,
        sqlx::Error::Database(db) => db.code().is_some_and(|code| {
            // 08: connection exception; 57P01-03: the server shutting down,
            // crashed or starting; 53300: too many connections; 40001/40P01:
            // serialisation failure and deadlock; 55P03: a lock not
            // granted within lock_timeout (contention); 25006: a read-only
            // transaction (a replica, during a failover).
            code.starts_with("08")
                || matches!(
                    &*code,
                    "57P01" | "57P02" | "57P03" | "53300" | "40001" | "40P01" | "25006" | "55P03"
                )
        }),
        _ => false,
    }
}

/// Whether any error in `err`'s chain is a transient database error.
#[must_use]
pub fn is_transient(err: &anyhow::Error) -> bool {
    err.chain().any(|cause| {
        cause.downcast_ref::<sqlx::Error>().is_some_and(is_transient_sqlx)
            || cause
                .downcast_ref::<crate::store::StoreError>()
                .is_some_and(|e| matches!(e, crate::store::StoreError::Database(db) if is_transient_sqlx(db)))
            // The application's errors keep only the text of a database fault.
            || cause
                .downcast_ref::<crate::error::AppError>()
                .is_some_and(|e| matches!(e, crate::error::AppError::Unavailable(_)))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn back_off_doubles_up_to_the_longest() {
        let policy = RetryPolicy {
            attempts: 4,
            first_ms: 100,
            max_ms: 500,
        };
        let delays: Vec<u128> = (1..=5).map(|n| policy.delay(n).as_millis()).collect();
        assert_eq!(delays, [100, 200, 400, 500, 500]);
        assert!(!policy.exhausted(3));
        assert!(policy.exhausted(4));
    }

    #[test]
    fn a_dropped_connection_is_transient_and_a_bug_is_not() {
        let io = sqlx::Error::Io(std::io::Error::from(std::io::ErrorKind::ConnectionReset));
        assert!(is_transient(&anyhow::Error::from(io).context("applying")));
        assert!(!is_transient(&anyhow::anyhow!("event does not decode")));
        assert!(!is_transient(&anyhow::Error::from(sqlx::Error::RowNotFound)));
        let unavailable = crate::error::AppError::from(sqlx::Error::PoolTimedOut);
        assert!(is_transient(&anyhow::Error::from(unavailable)));
    }
}
