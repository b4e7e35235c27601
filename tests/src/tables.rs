//! Every table of a service's database, as a "writes nothing" test compares
//! it: found from the catalog (so a table added later is covered without
//! anyone listing it), each with all of its rows, so that an update or a
//! delete shows as well as an insert.
//!
//! A refused command must leave every table as it was: events, outbox,
//! command answers, audit trail, timers, person keys, the service's own
//! tables and whatever tables come next. Background tasks write tables too
//! (the relay empties the outbox, projections move their checkpoints and read
//! models, timers fire), so [`ServiceTables`] takes its snapshots when the
//! service is quiescent: nothing in the outbox, no due timer unfired, and
//! every projection caught up with the streams it reads (see
//! [`ServiceTables::wait_until_quiescent`]). No table is excluded by name.
//!
//! ```ignore
//! let tables = app.tables();
//! let before = tables.snapshot().await;
//! // ... a command that must be refused ...
//! tables.assert_unchanged_since(&before, "accepting a declined referral").await;
//! ```

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::time::{Duration, Instant};

use async_nats::jetstream;
use nrm_kernel::settings::DatabaseSettings;
use sqlx::PgPool;

/// The tables no service writes: sqlx's migration bookkeeping (the
/// service's and the kernel's).
const MIGRATION_TABLES: &[&str] = &["_sqlx_migrations", "_nrm_kernel_migrations"];

/// How long a service may take to become quiescent.
const QUIESCENCE_TIMEOUT: Duration = Duration::from_secs(15);

/// Every row of every table of a database at one instant (one
/// repeatable-read transaction), each table's rows as text, sorted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TableSnapshot {
    tables: BTreeMap<String, Vec<String>>,
}

impl TableSnapshot {
    /// Reads every ordinary table of the `public` schema but the migration
    /// bookkeeping, in one read-only transaction. Does not wait for anything:
    /// see [`ServiceTables::snapshot`] for a running service.
    ///
    /// # Panics
    /// When a query fails.
    pub async fn take(pool: &PgPool) -> Self {
        let mut tx = pool.begin().await.expect("begin the snapshot");
        sqlx::query("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
            .execute(&mut *tx)
            .await
            .expect("a repeatable-read snapshot");
        let names: Vec<String> = sqlx::query_scalar(
            "SELECT c.relname::text FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
             WHERE n.nspname = 'public' AND c.relkind IN ('r', 'p') AND NOT (c.relname::text = ANY($1))
             ORDER BY 1",
        )
        .bind(MIGRATION_TABLES)
        .fetch_all(&mut *tx)
        .await
        .expect("list the tables");
        let mut tables = BTreeMap::new();
        for name in names {
            // The name comes from the catalog, quoted as an identifier.
            let quoted = format!("\"{}\"", name.replace('"', "\"\""));
            let sql = format!("SELECT t::text FROM {quoted} t ORDER BY t::text COLLATE \"C\"");
            let rows: Vec<String> = sqlx::query_scalar(sqlx::AssertSqlSafe(sql))
                .fetch_all(&mut *tx)
                .await
                .unwrap_or_else(|e| panic!("read table {name}: {e}"));
            tables.insert(name, rows);
        }
        tx.rollback().await.expect("end the snapshot");
        Self { tables }
    }

    /// The names of the tables, sorted.
    pub fn tables(&self) -> impl Iterator<Item = &str> {
        self.tables.keys().map(String::as_str)
    }

    /// Rows of `table`.
    ///
    /// # Panics
    /// When the database has no such table.
    #[must_use]
    pub fn rows(&self, table: &str) -> usize {
        self.tables
            .get(table)
            .unwrap_or_else(|| panic!("no table {table} among {:?}", self.tables.keys().collect::<Vec<_>>()))
            .len()
    }

    /// The tables whose rows differ from `before`'s (added, removed or
    /// changed rows, or a table that appeared or went).
    #[must_use]
    pub fn changed_since(&self, before: &Self) -> Vec<String> {
        let mut names: Vec<&String> = self.tables.keys().chain(before.tables.keys()).collect();
        names.sort();
        names.dedup();
        names
            .into_iter()
            .filter(|name| self.tables.get(*name) != before.tables.get(*name))
            .cloned()
            .collect()
    }

    /// Asserts that no table differs from `before`.
    ///
    /// # Panics
    /// Naming every table that changed, with the rows added and removed,
    /// and `what` was attempted.
    pub fn assert_unchanged_since(&self, before: &Self, what: &str) {
        self.assert_changed_only_since(before, &[], what);
    }

    /// Asserts that no table but those in `allowed` differs from `before`
    /// (for example `projection_checkpoints` when a message that changes
    /// nothing else moves a projection on).
    ///
    /// # Panics
    /// As [`assert_unchanged_since`](Self::assert_unchanged_since).
    /// `audit_log` allowed allows its chain head (`audit_chain_head`), which
    /// moves with every entry.
    pub fn assert_changed_only_since(&self, before: &Self, allowed: &[&str], what: &str) {
        let audit = allowed.contains(&"audit_log");
        let changed: Vec<String> = self
            .changed_since(before)
            .into_iter()
            .filter(|name| !(allowed.contains(&name.as_str()) || (audit && name == "audit_chain_head")))
            .collect();
        if changed.is_empty() {
            return;
        }
        let mut report = format!("{what} wrote to {} table(s): {}", changed.len(), changed.join(", "));
        for name in &changed {
            let empty = Vec::new();
            let old = before.tables.get(name).unwrap_or(&empty);
            let new = self.tables.get(name).unwrap_or(&empty);
            let _ = write!(report, "\n  {name}: {} rows -> {} rows", old.len(), new.len());
            if old.len() == new.len() {
                report.push_str(" (rows were changed in place)");
            }
            for (sign, rows, other) in [("+", new, old), ("-", old, new)] {
                let mut diff = rows.iter().filter(|r| !other.contains(r));
                for row in diff.by_ref().take(5) {
                    let _ = write!(report, "\n    {sign} {}", shorten(row));
                }
                let more = diff.count();
                if more > 0 {
                    let _ = write!(report, "\n    {sign} ... and {more} more");
                }
            }
        }
        panic!("{report}");
    }
}

/// A row for a failure message: long rows (payloads) cut short.
fn shorten(row: &str) -> String {
    const MAX: usize = 200;
    if row.chars().count() <= MAX {
        row.to_owned()
    } else {
        format!("{}…", row.chars().take(MAX).collect::<String>())
    }
}

/// A running service's database, with what it takes to tell when the
/// service has finished its background work.
#[derive(Clone)]
pub struct ServiceTables {
    pool: PgPool,
    jetstream: jetstream::Context,
    service: String,
    projections: Vec<String>,
}

impl ServiceTables {
    /// The tables behind `pool` of the service named `service` (for
    /// messages), which runs the projections and reactions named
    /// `projections` (as its `startup.rs` registers them).
    #[must_use]
    pub fn new(pool: PgPool, jetstream: jetstream::Context, service: &str, projections: &[&str]) -> Self {
        Self {
            pool,
            jetstream,
            service: service.to_owned(),
            projections: projections.iter().map(|p| (*p).to_owned()).collect(),
        }
    }

    /// The tables of a service running as its own process, on `database`,
    /// with NATS at `nats_url`; `service` and `projections` as in [`new`](Self::new).
    ///
    /// # Panics
    /// When PostgreSQL or NATS cannot be reached.
    pub async fn connect(database: &DatabaseSettings, nats_url: &str, service: &str, projections: &[&str]) -> Self {
        let pool = PgPool::connect_with(nrm_kernel::db::connect_options(database).expect("database options"))
            .await
            .expect("connect to the service's database");
        let client = async_nats::connect(nats_url).await.expect("connect to NATS");
        Self::new(pool, jetstream::new(client), service, projections)
    }

    /// The tables of the identification service (process or not) on `database`.
    ///
    /// # Panics
    /// As [`connect`](Self::connect).
    pub async fn identification(database: &DatabaseSettings, nats_url: &str) -> Self {
        Self::connect(database, nats_url, "identification", IDENTIFICATION_PROJECTIONS).await
    }

    /// The tables of the referral service (process or not) on `database`.
    ///
    /// # Panics
    /// As [`connect`](Self::connect).
    pub async fn referral(database: &DatabaseSettings, nats_url: &str) -> Self {
        Self::connect(database, nats_url, "referral", REFERRAL_PROJECTIONS).await
    }

    /// The tables of the shelter service (process or not) on `database`.
    ///
    /// # Panics
    /// As [`connect`](Self::connect).
    pub async fn shelter(database: &DatabaseSettings, nats_url: &str) -> Self {
        Self::connect(database, nats_url, "shelter", SHELTER_PROJECTIONS).await
    }

    /// The pool on the service's database.
    #[must_use]
    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// What the service still has to do in the background, if anything.
    async fn busy(&self) -> Option<String> {
        let outbox: i64 = sqlx::query_scalar("SELECT count(*) FROM outbox")
            .fetch_one(&self.pool)
            .await
            .expect("count the outbox");
        if outbox > 0 {
            return Some(format!("{outbox} commit(s) wait in the outbox"));
        }
        // A parked timer will not fire: it is no pending work.
        let due: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM timers WHERE fired_at IS NULL AND parked_at IS NULL AND due_at <= now()",
        )
        .fetch_one(&self.pool)
        .await
        .expect("count due timers");
        if due > 0 {
            return Some(format!("{due} due timer(s) have not fired"));
        }
        // Every runner writes its checkpoint when it starts (naming the stream
        // it counts in), and moves it with every message of its context's
        // whole stream, in the transaction of the message's effects: caught
        // up, it stands at the stream's last message.
        let checkpoints: Vec<(String, Option<String>, i64, Option<i64>)> = sqlx::query_as(
            "SELECT projection, stream_name, stream_sequence, stream_created FROM projection_checkpoints ORDER BY 1",
        )
        .fetch_all(&self.pool)
        .await
        .expect("read the checkpoints");
        for projection in &self.projections {
            if !checkpoints
                .iter()
                .any(|(p, name, _, _)| p == projection && name.is_some())
            {
                return Some(format!("projection {projection} has not started"));
            }
        }
        for (projection, stream, at, created) in checkpoints {
            let Some(stream) = stream else {
                return Some(format!("projection {projection} has not started"));
            };
            let Ok(mut stream) = self.jetstream.get_stream(&stream).await else {
                // The service's own stream is created by its relay once it
                // runs: until then the runner will still find it and write
                // its identity. A runner waiting for another context's
                // stream that does not exist has nothing to do.
                if stream.ends_with(&format!("_{}", self.service.to_ascii_uppercase())) {
                    return Some(format!("the relay has not created the {stream} stream yet"));
                }
                continue;
            };
            // The stream exists but the runner has not found it yet: it will
            // write the stream's identity into its checkpoint.
            if created.is_none() {
                return Some(format!("projection {projection} has not found its stream yet"));
            }
            let last = stream.info().await.map_or(0, |i| i.state.last_sequence);
            if u64::try_from(at).unwrap_or(0) < last {
                return Some(format!("projection {projection} stands at {at} of {last}"));
            }
        }
        None
    }

    /// Waits until the service is quiescent: its outbox empty (every commit
    /// published), no due timer unfired, and each of its projections and
    /// reactions started and caught up (its checkpoint, which commits with
    /// its writes, at the last message of the stream it reads). Then no
    /// background task has anything left to write.
    ///
    /// # Panics
    /// After 15 s, saying what is still pending.
    pub async fn wait_until_quiescent(&self) {
        let deadline = Instant::now() + QUIESCENCE_TIMEOUT;
        loop {
            let Some(pending) = self.busy().await else {
                return;
            };
            assert!(
                Instant::now() < deadline,
                "the {} service is not quiescent after {QUIESCENCE_TIMEOUT:?}: {pending}",
                self.service
            );
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    /// Every table, once the service is quiescent.
    pub async fn snapshot(&self) -> TableSnapshot {
        self.wait_until_quiescent().await;
        TableSnapshot::take(&self.pool).await
    }

    /// Asserts that every table is as in `before` (a [`snapshot`](Self::snapshot)):
    /// at once (so that nothing written and then undone by a background task
    /// goes unseen), and again once the service is quiescent (so that
    /// nothing the attempt set off in the background goes unseen).
    ///
    /// # Panics
    /// Naming each table that changed.
    pub async fn assert_unchanged_since(&self, before: &TableSnapshot, what: &str) {
        self.assert_changed_only_since(before, &[], what).await;
    }

    /// As [`assert_unchanged_since`](Self::assert_unchanged_since), but the
    /// tables in `allowed` may differ.
    ///
    /// # Panics
    /// Naming each other table that changed.
    pub async fn assert_changed_only_since(&self, before: &TableSnapshot, allowed: &[&str], what: &str) {
        TableSnapshot::take(&self.pool)
            .await
            .assert_changed_only_since(before, allowed, what);
        self.snapshot()
            .await
            .assert_changed_only_since(before, allowed, &format!("{what} (in the background)"));
    }

    /// Closes the pool.
    pub async fn close(self) {
        self.pool.close().await;
    }
}

/// The projections and reactions of each service, as its `startup.rs`
/// registers them (a name missing here is still waited for once it has a
/// checkpoint; a name here that the service no longer runs makes
/// [`ServiceTables::wait_until_quiescent`] say so).
const IDENTIFICATION_PROJECTIONS: &[&str] = &["identification_case_list", "identification_referral_access"];
const REFERRAL_PROJECTIONS: &[&str] = &["referral_persons", "referral_inbox", "referral_shelter_answers"];
const SHELTER_PROJECTIONS: &[&str] = &["shelter_free_capacity", "shelter_placement", "shelter_referrals"];

impl crate::TestApp {
    /// Every table of the identification service's database.
    #[must_use]
    pub fn tables(&self) -> ServiceTables {
        ServiceTables::new(
            self.pool.clone(),
            self.jetstream.clone(),
            "identification",
            IDENTIFICATION_PROJECTIONS,
        )
    }
}

impl crate::ReferralApp {
    /// Every table of the referral service's database.
    #[must_use]
    pub fn tables(&self) -> ServiceTables {
        ServiceTables::new(
            self.pool.clone(),
            self.jetstream.clone(),
            "referral",
            REFERRAL_PROJECTIONS,
        )
    }
}

impl crate::ShelterApp {
    /// Every table of the shelter service's database.
    #[must_use]
    pub fn tables(&self) -> ServiceTables {
        ServiceTables::new(
            self.pool.clone(),
            self.jetstream.clone(),
            "shelter",
            SHELTER_PROJECTIONS,
        )
    }
}
