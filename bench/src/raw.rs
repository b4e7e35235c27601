//! The raw ceiling: what PostgreSQL itself does with the same rows, driven by
//! `pgbench` (C, libpq, prepared statements) on the same server and database.
//!
//! `raw_events`, `raw_outbox`, `raw_commands` and `raw_audit_log` are copies
//! of `events`, `outbox`, `commands` and `audit_log` (`LIKE … INCLUDING ALL`:
//! the same columns, defaults, checks and indexes, with sequences of their
//! own); `raw_audit_log` is chained like `audit_log` (`raw_audit_chain_head`
//! and a trigger of the same body: every entry numbered and hashed under the
//! head's row lock). One raw transaction writes what the kernel writes for one
//! single-event command: one row into each, of the same sizes and kinds (a
//! payload of the same length, metadata JSON with the same keys, time-ordered
//! UUIDv7 event, commit and stream IDs as the kernel makes, a request key,
//! fingerprint and answer of the same lengths, the same audit entry), as one
//! autocommitted statement without the kernel's version check. Anything the
//! kernel does beyond that is its overhead.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context as _, bail};
use sqlx::PgPool;

use crate::append::{ACTION, ACTOR, EVENT_TYPE, FINGERPRINT, PURPOSE, RESPONSE, SUBJECT_PREFIX, TRACEPARENT, payload};
use crate::stats::{self, CpuSample, LoadGenerator, RunResult};

/// Creates (or re-creates) the raw tables beside the kernel's.
///
/// # Errors
/// When the database refuses.
pub async fn create_tables(pool: &PgPool) -> anyhow::Result<()> {
    sqlx::raw_sql(
        "DROP TABLE IF EXISTS raw_events, raw_outbox, raw_commands, raw_audit_log, raw_audit_chain_head;
         CREATE TABLE raw_events (LIKE events INCLUDING ALL);
         CREATE SEQUENCE raw_events_global_position_seq OWNED BY raw_events.global_position;
         ALTER TABLE raw_events ALTER COLUMN global_position SET DEFAULT nextval('raw_events_global_position_seq');
         CREATE TABLE raw_outbox (LIKE outbox INCLUDING ALL);
         CREATE SEQUENCE raw_outbox_id_seq OWNED BY raw_outbox.id;
         ALTER TABLE raw_outbox ALTER COLUMN id SET DEFAULT nextval('raw_outbox_id_seq');
         CREATE TABLE raw_commands (LIKE commands INCLUDING ALL);
         CREATE TABLE raw_audit_log (LIKE audit_log INCLUDING ALL);
         CREATE SEQUENCE raw_audit_log_id_seq OWNED BY raw_audit_log.id;
         ALTER TABLE raw_audit_log ALTER COLUMN id SET DEFAULT nextval('raw_audit_log_id_seq');
         -- The audit chain as the kernel's migration builds it: every entry
         -- numbered and hashed after the head, whose row lock it holds until
         -- the transaction ends, by a trigger of the same body.
         CREATE TABLE raw_audit_chain_head (LIKE audit_chain_head INCLUDING ALL);
         INSERT INTO raw_audit_chain_head (seq, hash) VALUES (0, decode(repeat('00', 32), 'hex'));
         CREATE OR REPLACE FUNCTION raw_audit_log_chain() RETURNS trigger LANGUAGE plpgsql AS $$
         DECLARE
             head raw_audit_chain_head%ROWTYPE;
         BEGIN
             SELECT * INTO head FROM raw_audit_chain_head FOR UPDATE;
             IF NOT FOUND THEN
                 RAISE EXCEPTION 'raw_audit_chain_head is missing';
             END IF;
             NEW.seq := head.seq + 1;
             NEW.prev_hash := head.hash;
             NEW.hash := audit_entry_hash(NEW.seq, NEW.prev_hash, NEW.at, NEW.agency, NEW.role, NEW.officer,
                                          NEW.action, NEW.subject_id, NEW.person_id, NEW.purpose, NEW.outcome);
             UPDATE raw_audit_chain_head SET seq = NEW.seq, hash = NEW.hash;
             RETURN NEW;
         END $$;
         CREATE TRIGGER raw_audit_log_chain BEFORE INSERT ON raw_audit_log
             FOR EACH ROW EXECUTE FUNCTION raw_audit_log_chain();
         CREATE TRIGGER raw_audit_chain_head_guard BEFORE UPDATE OR DELETE ON raw_audit_chain_head
             FOR EACH ROW EXECUTE FUNCTION audit_chain_head_moves_with_the_log();
         -- A UUIDv7 (the kernel's IDs are v7: time-ordered, so they land on the
         -- right edge of their indexes; random v4 UUIDs would scatter over the
         -- leaves and write a full-page image for each one after a checkpoint).
         CREATE OR REPLACE FUNCTION raw_uuid_v7() RETURNS uuid LANGUAGE sql VOLATILE AS $$
             SELECT encode(set_bit(set_bit(overlay(uuid_send(gen_random_uuid())
                 PLACING substring(int8send(floor(extract(epoch FROM clock_timestamp()) * 1000)::bigint) FROM 3)
                 FROM 1 FOR 6), 52, 1), 53, 1), 'hex')::uuid
         $$;",
    )
    .execute(pool)
    .await
    .context("create the raw tables")?;
    Ok(())
}

/// The raw transaction: one row into each raw table, one statement. Free of
/// pgbench variables (no `:`), so pgbench sends it as is.
#[must_use]
pub fn insert_sql(payload_len: usize) -> String {
    let hex = |bytes: &[u8]| bytes.iter().map(|b| format!("{b:02x}")).collect::<String>();
    let payload = hex(&payload(payload_len));
    let fingerprint = hex(&FINGERPRINT);
    let response = hex(&RESPONSE);
    let (agency, role, officer) = ACTOR;
    format!(
        "WITH s AS (SELECT raw_uuid_v7() AS id),
e AS (
    INSERT INTO raw_events (event_id, stream_id, version, event_type, schema_version, payload, metadata)
    SELECT raw_uuid_v7(), 'case-' || s.id, 1, '{EVENT_TYPE}', 1, decode('{payload}', 'hex'),
           jsonb_build_object('correlation_id', gen_random_uuid(), 'causation_id', gen_random_uuid(),
                              'actor', jsonb_build_object('agency', '{agency}', 'role', '{role}', 'officer', '{officer}'),
                              'traceparent', '{TRACEPARENT}')
    FROM s
    RETURNING stream_id
),
o AS (
    INSERT INTO raw_outbox (commit_id, stream_id, first_version, last_version, subject)
    SELECT raw_uuid_v7(), e.stream_id, 1, 1, '{SUBJECT_PREFIX}' || substr(e.stream_id, 6) FROM e
),
c AS (
    INSERT INTO raw_commands (request_key, fingerprint, response)
    SELECT '{agency}' || chr(58) || gen_random_uuid(), decode('{fingerprint}', 'hex'), decode('{response}', 'hex') FROM e
)
INSERT INTO raw_audit_log (agency, role, officer, action, subject_id, purpose)
SELECT '{agency}', '{role}', '{officer}', '{ACTION}', substr(e.stream_id, 6), '{PURPOSE}' FROM e"
    )
}

/// Where pgbench is: `NRM_BENCH_PGBENCH`, else the one of the server's major
/// version under `/usr/lib/postgresql`, else the newest there, else `PATH`.
///
/// # Errors
/// When none is found.
pub fn find_pgbench(server_major: Option<u32>) -> anyhow::Result<PathBuf> {
    if let Ok(path) = std::env::var("NRM_BENCH_PGBENCH") {
        return Ok(PathBuf::from(path));
    }
    if let Some(major) = server_major {
        let path = PathBuf::from(format!("/usr/lib/postgresql/{major}/bin/pgbench"));
        if path.is_file() {
            return Ok(path);
        }
    }
    let mut found: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|entry| {
            let major = entry.file_name().to_str()?.parse().ok()?;
            let path = entry.path().join("bin").join("pgbench");
            path.is_file().then_some((major, path))
        })
        .collect();
    found.sort();
    if let Some((_, path)) = found.pop() {
        return Ok(path);
    }
    let on_path = std::process::Command::new("sh")
        .args(["-c", "command -v pgbench"])
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .map(|s| s.trim().to_owned())
        .filter(|s| !s.is_empty());
    on_path
        .map(PathBuf::from)
        .context("pgbench not found (Debian: apt-get install postgresql; or set NRM_BENCH_PGBENCH)")
}

/// The libpq URI of database `name` on the server at `server_url`.
#[must_use]
pub fn database_uri(server_url: &str, name: &str) -> String {
    let (base, query) = server_url
        .split_once('?')
        .map_or((server_url, None), |(b, q)| (b, Some(q)));
    // Drop a database path the server URL may carry.
    let authority_start = base.find("://").map_or(0, |i| i + 3);
    let base = match base[authority_start..].find('/') {
        Some(slash) => &base[..authority_start + slash],
        None => base,
    };
    match query {
        Some(q) => format!("{base}/{name}?{q}"),
        None => format!("{base}/{name}"),
    }
}

/// One pgbench invocation.
pub struct Pgbench<'a> {
    /// The binary.
    pub binary: &'a Path,
    /// libpq URI of the database.
    pub uri: &'a str,
    /// The script file.
    pub script: &'a Path,
    /// A folder for the transaction logs.
    pub log_dir: &'a Path,
}

impl Pgbench<'_> {
    /// Runs `clients` clients for `warmup` (not measured), then for `measure`
    /// with a per-transaction log, and reads throughput and latencies.
    ///
    /// # Errors
    /// When pgbench fails or its output cannot be read.
    pub async fn run(&self, clients: usize, warmup: Duration, measure: Duration) -> anyhow::Result<RunResult> {
        if !warmup.is_zero() {
            self.invoke(clients, warmup, None).await?;
        }
        let prefix = self.log_dir.join(format!("raw_c{clients}"));
        let before = CpuSample::now();
        let output = self.invoke(clients, measure, Some(&prefix)).await?;
        let after = CpuSample::now();
        let mut histogram = stats::new_histogram()?;
        let mut failed = 0;
        for entry in std::fs::read_dir(self.log_dir)? {
            let path = entry?.path();
            let is_ours = path
                .file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with(&format!("raw_c{clients}.")));
            if !is_ours {
                continue;
            }
            let text = std::fs::read_to_string(&path)?;
            for line in text.lines() {
                // client_id transaction_no time script_no time_epoch time_us
                match line.split_whitespace().nth(2).map(str::parse::<u64>) {
                    Some(Ok(us)) => stats::record(&mut histogram, Duration::from_micros(us)),
                    Some(Err(_)) => failed += 1,
                    None => {}
                }
            }
            std::fs::remove_file(&path)?;
        }
        let tps = parse_tps(&output).with_context(|| format!("no tps in pgbench's output:\n{output}"))?;
        // pgbench's own rate excludes the time spent connecting: take its window.
        let window = if tps > 0.0 {
            Duration::from_secs_f64(histogram.len() as f64 / tps)
        } else {
            measure
        };
        let mut result = RunResult::from_histogram(&histogram, window, failed);
        result.cpu = before.per_op(&after, result.ops, LoadGenerator::Child);
        Ok(result)
    }

    async fn invoke(&self, clients: usize, duration: Duration, log_prefix: Option<&Path>) -> anyhow::Result<String> {
        let threads = clients.min(std::thread::available_parallelism().map_or(2, usize::from));
        let mut command = tokio::process::Command::new(self.binary);
        command
            .arg("-n")
            .args(["-M", "prepared"])
            .args(["-c", &clients.to_string()])
            .args(["-j", &threads.to_string()])
            .args(["-T", &duration.as_secs().max(1).to_string()])
            .arg("-f")
            .arg(self.script);
        if let Some(prefix) = log_prefix {
            command.arg("-l").arg("--log-prefix").arg(prefix);
        }
        command.arg(self.uri).current_dir(self.log_dir).kill_on_drop(true);
        let output = command
            .output()
            .await
            .with_context(|| format!("run {}", self.binary.display()))?;
        let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
        if !output.status.success() {
            bail!(
                "pgbench failed ({}):\n{stdout}\n{}",
                output.status,
                String::from_utf8_lossy(&output.stderr)
            );
        }
        Ok(stdout)
    }
}

/// `tps = 1234.5 (without initial connection time)` → 1234.5.
fn parse_tps(output: &str) -> Option<f64> {
    output
        .lines()
        .filter_map(|l| l.trim().strip_prefix("tps = "))
        .filter_map(|rest| rest.split_whitespace().next()?.parse().ok())
        .next_back()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tps_is_read_from_pgbench_output() {
        let out = "number of transactions actually processed: 100\nlatency average = 1.000 ms\n\
                   initial connection time = 3.2 ms\ntps = 4521.123456 (without initial connection time)\n";
        assert_eq!(parse_tps(out), Some(4521.123456));
        assert_eq!(parse_tps("nothing"), None);
    }

    #[test]
    fn the_database_uri_replaces_any_path() {
        assert_eq!(
            database_uri("postgres://nrm@127.0.0.1:15432", "b"),
            "postgres://nrm@127.0.0.1:15432/b"
        );
        assert_eq!(
            database_uri("postgres://nrm@127.0.0.1:15432/postgres?sslmode=disable", "b"),
            "postgres://nrm@127.0.0.1:15432/b?sslmode=disable"
        );
    }

    #[test]
    fn the_raw_statement_has_no_pgbench_variables() {
        let sql = insert_sql(300);
        assert!(!sql.contains(':'));
        let hex: String = payload(300).iter().map(|b| format!("{b:02x}")).collect();
        assert!(sql.contains(&format!("decode('{hex}', 'hex')")));
        for table in ["raw_events", "raw_outbox", "raw_commands", "raw_audit_log"] {
            assert!(sql.contains(&format!("INSERT INTO {table} ")), "{table}");
        }
    }
}
