//! The report: one markdown document, printed and written to `bench/results/`.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use chrono::{DateTime, Utc};

use crate::catchup::{CatchUpResults, Cpu, Start};
use crate::e2e::E2eResult;
use crate::shelter::ShelterResults;
use crate::stats::{RunResult, ms};

/// The share of the raw ceiling the kernel should reach at the highest client count.
pub const AIM: f64 = 0.70;

/// Where and how the run took place.
#[derive(Debug, Clone, Default)]
pub struct Environment {
    /// When the run started.
    pub started: DateTime<Utc>,
    /// Logical CPUs.
    pub cpus: usize,
    /// CPU model, from `/proc/cpuinfo`.
    pub cpu_model: String,
    /// Linux release.
    pub os_release: String,
    /// `SELECT version()`.
    pub postgres: String,
    /// `fsync`, `synchronous_commit`, `full_page_writes`, `wal_sync_method`, … as `name=value`.
    pub postgres_settings: Vec<(String, String)>,
    /// The NATS server's version (from its INFO).
    pub nats: String,
    /// The pgbench binary.
    pub pgbench: String,
    /// Measured seconds per run, warm-up seconds, payload bytes, pool size.
    pub seconds: u64,
    /// Warm-up seconds before each run.
    pub warmup: u64,
    /// Rounds each measurement is split into.
    pub rounds: u64,
    /// Payload bytes per event.
    pub payload_bytes: usize,
    /// Metadata JSON bytes per event.
    pub metadata_bytes: usize,
    /// Connections in the kernel's pool.
    pub pool_size: usize,
    /// Whether the kernel's pool pings every connection before handing it out.
    pub pool_pings: bool,
    /// The sections asked for (`--only`), all when it was not given.
    pub sections: Vec<String>,
    /// Whether `--only` left some sections out.
    pub partial: bool,
}

/// One row of the main table.
#[derive(Debug, Clone)]
pub struct AppendRow {
    /// Concurrent clients.
    pub clients: usize,
    /// The kernel.
    pub kernel: RunResult,
    /// pgbench.
    pub raw: RunResult,
}

impl AppendRow {
    /// Kernel ops/s over raw ops/s.
    #[must_use]
    pub fn ratio(&self) -> f64 {
        if self.raw.ops_per_sec > 0.0 {
            self.kernel.ops_per_sec / self.raw.ops_per_sec
        } else {
            0.0
        }
    }
}

/// One variant of the breakdown at the highest client count.
#[derive(Debug, Clone)]
pub struct Variant {
    /// What runs.
    pub name: String,
    /// Client–server round trips per operation.
    pub round_trips: u32,
    /// The result.
    pub result: RunResult,
}

/// Everything a run measured.
#[derive(Debug, Clone, Default)]
pub struct Report {
    /// Where and how.
    pub env: Environment,
    /// Kernel against pgbench, per client count.
    pub append: Vec<AppendRow>,
    /// The breakdown (empty when skipped).
    pub variants: Vec<Variant>,
    /// Clients of the breakdown.
    pub variant_clients: usize,
    /// Seconds per breakdown run.
    pub variant_seconds: u64,
    /// `EXPLAIN ANALYZE` of the kernel's statement and of the raw one.
    pub explains: Vec<(String, String)>,
    /// End to end (empty when skipped).
    pub e2e: Vec<E2eResult>,
    /// The shelter service: holds, the race, free capacity, the placement reaction.
    pub shelter: Option<ShelterResults>,
    /// The relay's and a projection runner's catch-up after an outage.
    pub catchup: Option<CatchUpResults>,
    /// casepath: replay, lag to a watched path, statistics.
    pub casepath: Option<crate::casepath::CasepathResults>,
}

/// The free-capacity query's aim: p99 under this many µs.
pub const QUERY_AIM_US: u64 = 5_000;
/// The placement reaction's aim: p99 under this many µs.
pub const PLACEMENT_AIM_US: u64 = 100_000;

fn aim(met: bool) -> &'static str {
    if met { "met" } else { "NOT met" }
}

fn ops(r: &RunResult) -> String {
    format!("{:.0}", r.ops_per_sec)
}

fn cpu(r: &RunResult) -> (String, String, String) {
    r.cpu.map_or_else(
        || ("–".into(), "–".into(), "–".into()),
        |c| {
            (
                format!("{:.0}", c.client_us),
                format!("{:.0}", c.server_us),
                format!("{:.0}", c.other_us),
            )
        },
    )
}

/// Runs during which other processes took more than this share of the CPUs are flagged.
const DISTURBED: f64 = 0.05;

impl Report {
    /// Whether the aim is met at the highest client count, and the ratio there.
    #[must_use]
    pub fn verdict(&self) -> Option<(usize, f64, bool)> {
        let row = self.append.iter().max_by_key(|r| r.clients)?;
        let ratio = row.ratio();
        Some((row.clients, ratio, ratio >= AIM))
    }

    /// The runs during which other processes took a noticeable share of the CPUs.
    #[must_use]
    pub fn disturbed(&self) -> Vec<String> {
        let cpus = self.env.cpus;
        let mut runs: Vec<(String, &RunResult)> = Vec::new();
        for row in &self.append {
            runs.push((format!("kernel at {} clients", row.clients), &row.kernel));
            runs.push((format!("raw at {} clients", row.clients), &row.raw));
        }
        for v in &self.variants {
            runs.push((format!("\"{}\"", v.name), &v.result));
        }
        let mut seen = std::collections::HashSet::new();
        runs.into_iter()
            .filter_map(|(name, r)| {
                let share = r.cpu?.other_share(r.ops_per_sec, cpus);
                (share > DISTURBED && seen.insert(name.clone())).then(|| format!("{name} ({:.0}%)", share * 100.0))
            })
            .collect()
    }

    /// The report as markdown.
    #[must_use]
    pub fn markdown(&self) -> String {
        let mut out = String::new();
        let env = &self.env;
        let _ = writeln!(
            out,
            "# Köpür benchmark, {}\n",
            env.started.format("%Y-%m-%d %H:%M:%S UTC")
        );
        self.write_environment(&mut out);
        self.write_append(&mut out);
        self.write_variants(&mut out);
        self.write_e2e(&mut out);
        if let Some(shelter) = &self.shelter {
            write_shelter(&mut out, shelter);
        }
        if let Some(catchup) = &self.catchup {
            write_catchup(&mut out, catchup, env.cpus);
        }
        if let Some(casepath) = &self.casepath {
            out.push_str(&crate::casepath::markdown(casepath));
        }
        self.write_explains(&mut out);
        out
    }

    fn write_environment(&self, out: &mut String) {
        let env = &self.env;
        let _ = writeln!(out, "## Environment\n");
        let _ = writeln!(
            out,
            "- machine: {} CPUs ({}), Linux {}",
            env.cpus, env.cpu_model, env.os_release
        );
        let _ = writeln!(out, "- PostgreSQL: {}", env.postgres);
        let settings: Vec<String> = env.postgres_settings.iter().map(|(k, v)| format!("{k}={v}")).collect();
        let _ = writeln!(out, "- PostgreSQL settings: {}", settings.join(", "));
        let _ = writeln!(out, "- nats-server: {}", env.nats);
        if !env.pgbench.is_empty() {
            let _ = writeln!(out, "- pgbench: {}", env.pgbench);
        }
        if !env.sections.is_empty() {
            let _ = writeln!(
                out,
                "- sections run: {}{}",
                env.sections.join(", "),
                if env.partial {
                    " (a partial run, `--only`: the other sections' latest numbers are in an earlier file of `bench/results/`)"
                } else {
                    ""
                }
            );
        }
        if self.append.is_empty() {
            let _ = writeln!(out);
            return;
        }
        let _ = writeln!(
            out,
            "- runs: {} s measured per client count and side, in {} rounds taken in turn (kernel, raw, kernel, …) so that anything else on the machine falls on both alike; before each slice a CHECKPOINT, a wait for a quiet machine, and a warm-up ({} s the first time, 1 s after); event payload {} bytes, metadata JSON {} bytes; kernel pool {} connections, {} on acquire",
            env.seconds,
            env.rounds,
            env.warmup,
            env.payload_bytes,
            env.metadata_bytes,
            env.pool_size,
            if env.pool_pings { "pinged" } else { "not pinged" }
        );
        let _ = writeln!(out);
    }

    fn write_append(&self, out: &mut String) {
        if self.append.is_empty() {
            return;
        }
        let _ = writeln!(out, "## Append path: the kernel against the raw PostgreSQL ceiling\n");
        let _ = writeln!(
            out,
            "Kernel: a single-event command as the services run one on a case: `EventStore::append_command` on a new stream, writing the event, its outbox row, the command's answer and an audit entry in one autocommitted statement, on the pool `connect_and_migrate` builds.  \n\
             Raw: pgbench (`-M prepared`, `-j` = min(clients, CPUs)) inserting the same four rows into `raw_events`, `raw_outbox`, `raw_commands` and `raw_audit_log` (`LIKE … INCLUDING ALL`: same columns, defaults and indexes; the audit entry chained by a trigger like the kernel's, under the chain head's row lock), same sizes, UUIDv7 IDs like the kernel's (made by a SQL function), one autocommitted statement, same database and settings.  \n\
             Latency in ms; ratio = kernel ops/s ÷ raw ops/s.\n"
        );
        let _ = writeln!(
            out,
            "| clients | kernel ops/s | kernel p50 | kernel p99 | raw ops/s | raw p50 | raw p99 | kernel/raw | kernel CPU µs/op | raw CPU µs/op |"
        );
        let _ = writeln!(out, "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
        let own_cpu = |r: &RunResult| {
            r.cpu
                .map_or_else(|| "–".into(), |c| format!("{:.0}", c.client_us + c.server_us))
        };
        for row in &self.append {
            let _ = writeln!(
                out,
                "| {} | {} | {} | {} | {} | {} | {} | {:.0}% | {} | {} |",
                row.clients,
                ops(&row.kernel),
                ms(row.kernel.p50_us),
                ms(row.kernel.p99_us),
                ops(&row.raw),
                ms(row.raw.p50_us),
                ms(row.raw.p99_us),
                row.ratio() * 100.0,
                own_cpu(&row.kernel),
                own_cpu(&row.raw),
            );
        }
        let _ = writeln!(
            out,
            "\nCPU µs/op: the load generator's and PostgreSQL's CPU time per operation (client + server). Where the CPUs are saturated (\"CPUs busy\" below), throughput follows the inverse of this figure, and it is less disturbed than ops/s by other work on the machine."
        );
        let disturbed = self.disturbed();
        if !disturbed.is_empty() {
            let _ = writeln!(
                out,
                "\nOther processes took more than {:.0}% of the CPUs during: {}. Those numbers are low by about that much; run again on a quiet machine.",
                DISTURBED * 100.0,
                disturbed.join(", ")
            );
        }
        let errors: u64 = self.append.iter().map(|r| r.kernel.errors + r.raw.errors).sum();
        if errors > 0 {
            let _ = writeln!(out, "\n{errors} operations failed and are not counted.");
        }
        if let Some((clients, ratio, met)) = self.verdict() {
            let _ = writeln!(
                out,
                "\n**Aim (kernel ≥ {:.0}% of raw at {clients} clients): {}** ({:.0}%).\n",
                AIM * 100.0,
                if met { "met" } else { "NOT met" },
                ratio * 100.0
            );
        }
    }

    fn write_variants(&self, out: &mut String) {
        if self.variants.is_empty() {
            return;
        }
        let raw = self.variants.first().map_or(0.0, |v| v.result.ops_per_sec);
        let _ = writeln!(
            out,
            "## Where the kernel's time goes ({} clients, {} s each)\n",
            self.variant_clients, self.variant_seconds
        );
        let _ = writeln!(
            out,
            "All measured again, in turn, from the raw ceiling up to the kernel, one thing added per line, then the transaction path that commands writing more than their event take (% of this table's raw run); every line writes the same four rows. CPU per operation: \"client\" is the load generator (this process, or pgbench), \"server\" the PostgreSQL cluster (postmaster and backends), \"other\" the rest of the machine (should be near 0); \"CPUs busy\" is how busy all CPUs were: near 100% the run is CPU-bound, and every µs of CPU per operation, on either side, costs throughput. Round trips: the pool's ping on acquire (sqlx `test_before_acquire`, on by default), then the statements (and `BEGIN`, `COMMIT`).\n"
        );
        let _ = writeln!(
            out,
            "| variant | round trips | ops/s | % of raw | p50 | p99 | client CPU µs/op | server CPU µs/op | other CPU µs/op | CPUs busy |"
        );
        let _ = writeln!(out, "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
        for v in &self.variants {
            let (client, server, other) = cpu(&v.result);
            let share = if raw > 0.0 {
                format!("{:.0}%", v.result.ops_per_sec / raw * 100.0)
            } else {
                "–".into()
            };
            let busy = v
                .result
                .cpu
                .map_or_else(|| "–".into(), |c| format!("{:.0}%", c.busy_share * 100.0));
            let _ = writeln!(
                out,
                "| {} | {} | {} | {} | {} | {} | {client} | {server} | {other} | {busy} |",
                v.name,
                v.round_trips,
                ops(&v.result),
                share,
                ms(v.result.p50_us),
                ms(v.result.p99_us),
            );
        }
        let _ = writeln!(out);
        // Consecutive differences, in µs of wall time per operation at this concurrency.
        let per_op = |r: &RunResult| {
            if r.ops_per_sec > 0.0 { 1e6 / r.ops_per_sec } else { 0.0 }
        };
        if self.variants.len() >= 2 {
            let _ = writeln!(
                out,
                "Cost of each step, as time per operation of the whole system (1 / throughput):\n"
            );
            for pair in self.variants.windows(2) {
                let (lower, higher) = (&pair[0], &pair[1]);
                let _ = writeln!(
                    out,
                    "- {} → {}: {:+.1} µs/op",
                    lower.name,
                    higher.name,
                    per_op(&higher.result) - per_op(&lower.result)
                );
            }
            let _ = writeln!(out);
        }
    }

    fn write_e2e(&self, out: &mut String) {
        if self.e2e.is_empty() {
            return;
        }
        let _ = writeln!(out, "## End to end: gRPC report → event on NATS\n");
        let _ = writeln!(
            out,
            "The identification service in this process; `ReportPresumedVictim` over gRPC (loopback) until the event arrives on a core NATS subscription to the service's subjects. The message reaches that subscription as the server routes it into the stream, so arrival = stored by JetStream; the relay's acknowledgement follows one hop later. nats-server {}{}. Latency in ms; reports/s from the first send to the last arrival.\n",
            self.env.nats,
            if nats_syncs_always(&self.env.nats) {
                " with `sync_interval: always`"
            } else {
                " (before 2.10: JetStream writes without fsync; flushed every 2 min)"
            }
        );
        let _ = writeln!(
            out,
            "| reports in flight | reports | reports/s | RPC p50 | RPC p99 | to NATS p50 | to NATS p99 | missing |"
        );
        let _ = writeln!(out, "|---:|---:|---:|---:|---:|---:|---:|---:|");
        for r in &self.e2e {
            let _ = writeln!(
                out,
                "| {} | {} | {:.0} | {} | {} | {} | {} | {} |",
                r.concurrency,
                r.reports,
                r.to_nats.ops_per_sec,
                ms(r.rpc.p50_us),
                ms(r.rpc.p99_us),
                ms(r.to_nats.p50_us),
                ms(r.to_nats.p99_us),
                r.missing
            );
        }
        let _ = writeln!(out);
    }

    fn write_explains(&self, out: &mut String) {
        for (title, plan) in &self.explains {
            let _ = writeln!(out, "### {title}\n\n```\n{plan}\n```\n");
        }
    }

    /// Writes the report to `dir/<UTC date-time>.md` and `dir/latest.md`.
    ///
    /// # Errors
    /// When the folder cannot be written.
    pub fn write(&self, dir: &Path) -> anyhow::Result<PathBuf> {
        std::fs::create_dir_all(dir)?;
        let text = self.markdown();
        let path = dir.join(format!("{}.md", self.env.started.format("%Y-%m-%dT%H%M%SZ")));
        std::fs::write(&path, &text)?;
        std::fs::write(dir.join("latest.md"), &text)?;
        Ok(path)
    }
}

fn write_shelter(out: &mut String, s: &ShelterResults) {
    if !s.holds.is_empty() {
        let _ = writeln!(out, "## Shelter: bed holds under contention\n");
        let _ = writeln!(
            out,
            "The shelter service in this process; `HoldBed` over gRPC (loopback) by an msd officer of {holder} on one shelter of {beds} women's beds (a new one per line), every hold for an accepted referral of its own, addressed to {holder}. Before each line its referrals are committed as `ReferralAccepted` (without a shelter need, so the placement reaction holds nothing for them) to a scratch event store, published to the referral stream by a kernel relay, and waited for until the shelter service's placement runner has them all in `shelter_referrals`; then {warmup} holds at 4 clients warm up, and only the holds are timed: {seconds} s per line, or less when its referrals run out (then marked). Each hold checks its referral (locking its row) and then queues on the shelter's lock (and is serialized by its version check). Latency in ms of successful holds; refused = FAILED_PRECONDITION by rule code and PERMISSION_DENIED (none are expected here), aborted = ABORTED (the service's own retries on a version conflict ran out).\n",
            holder = crate::shelter::HOLDER,
            beds = crate::shelter::MAX_BEDS,
            warmup = crate::shelter::WARMUP_HOLDS,
            seconds = s.hold_seconds
        );
        let _ = writeln!(
            out,
            "| clients | referrals ready | holds | s | holds/s | p50 | p99 | refused | aborted | other errors |"
        );
        let _ = writeln!(out, "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
        for h in &s.holds {
            let _ = writeln!(
                out,
                "| {} | {} | {} | {:.1}{} | {:.0} | {} | {} | {} | {} | {} |",
                h.clients,
                h.referrals,
                h.holds.ops,
                h.holds.window.as_secs_f64(),
                if h.ran_out { " (referrals ran out)" } else { "" },
                h.holds.ops_per_sec,
                ms(h.holds.p50_us),
                ms(h.holds.p99_us),
                h.refusals.refused_cell(),
                h.refusals.aborted,
                h.refusals.other
            );
        }
        let _ = writeln!(out);
    }
    if let Some(r) = &s.race {
        let _ = writeln!(
            out,
            "### Race for the last beds\n\n{} clients hold beds of a shelter with {} free, each hold for an accepted referral of its own ({} prepared as above), each client until told NO_BED_FREE; then the shelter's `BedHeld` events are counted in its database.\n",
            r.clients, r.beds, r.referrals
        );
        let _ = writeln!(
            out,
            "| free beds | clients | holds granted | BedHeld events | refused | aborted | other errors |"
        );
        let _ = writeln!(out, "|---:|---:|---:|---:|---:|---:|---:|");
        let _ = writeln!(
            out,
            "| {} | {} | {} | {} | {} | {} | {} |\n",
            r.beds,
            r.clients,
            r.successes,
            r.bed_held_events,
            r.refusals.refused_cell(),
            r.refusals.aborted,
            r.refusals.other
        );
        let over = r.over_bookings();
        let _ = writeln!(
            out,
            "**over-bookings: {over}**{}\n",
            if over == 0 {
                ""
            } else {
                " — the shelter gave more beds than it has"
            }
        );
    }
    if let Some(q) = &s.query {
        let met = q.calls.ops > 0 && q.calls.p99_us < QUERY_AIM_US;
        let _ = writeln!(out, "## Shelter: free-capacity query\n");
        let _ = writeln!(
            out,
            "`ListFreeCapacity` over gRPC by region (the {} regions in turn) and women's beds, one call after another, with {} shelters registered (and those of the sections above). Latency in ms.\n",
            q.regions, q.shelters
        );
        let _ = writeln!(out, "| shelters | calls | calls/s | entries per answer | p50 | p99 |");
        let _ = writeln!(out, "|---:|---:|---:|---:|---:|---:|");
        let _ = writeln!(
            out,
            "| {} | {} | {:.0} | {:.1} | {} | {} |\n",
            q.shelters,
            q.calls.ops,
            q.calls.ops_per_sec,
            q.entries,
            ms(q.calls.p50_us),
            ms(q.calls.p99_us)
        );
        let _ = writeln!(
            out,
            "**Aim (p99 under {} ms): {}** ({} ms).\n",
            QUERY_AIM_US / 1000,
            aim(met),
            ms(q.calls.p99_us)
        );
    }
    if let Some(p) = &s.placement {
        let met = p.latency.ops > 0 && p.missing == 0 && p.latency.p99_us < PLACEMENT_AIM_US;
        let _ = writeln!(out, "## Shelter: accepted referral → bed held\n");
        let _ = writeln!(
            out,
            "The referral service's side played by the kernel (as `tests/src/beds.rs` does), not the referral service: `ReferralAccepted` addressed to {} with a need for a women's bed in a region with beds, committed to an event store on a scratch database and published to the referral stream by a kernel relay, {}/s; the shelter service's placement reaction holds a bed. Latency in ms from the relay's publish acknowledgement to `BedHeld` (matched by referral ID) on a core NATS subscription to the shelter subjects.\n",
            crate::shelter::HOLDER,
            p.rate
        );
        let _ = writeln!(out, "| referrals | asked /s | achieved /s | p50 | p99 | missing |");
        let _ = writeln!(out, "|---:|---:|---:|---:|---:|---:|");
        let _ = writeln!(
            out,
            "| {} | {} | {:.0} | {} | {} | {} |\n",
            p.referrals,
            p.rate,
            p.achieved_rate,
            ms(p.latency.p50_us),
            ms(p.latency.p99_us),
            p.missing
        );
        let _ = writeln!(
            out,
            "**Aim (p99 under {} ms at {}/s, none missing): {}** ({} ms).\n",
            PLACEMENT_AIM_US / 1000,
            p.rate,
            aim(met),
            ms(p.latency.p99_us)
        );
    }
}

/// CPU µs per item as table cells: this process, PostgreSQL, NATS, the rest.
fn cpu_cells(cpu: Option<&Cpu>) -> String {
    cpu.map_or_else(
        || "– | – | – | –".into(),
        |c| {
            format!(
                "{:.0} | {:.0} | {} | {:.0}",
                c.this_process_us,
                c.postgres_us,
                if c.nats_found {
                    format!("{:.0}", c.nats_us)
                } else {
                    "–".into()
                },
                c.rest_us
            )
        },
    )
}

fn secs(d: std::time::Duration) -> String {
    format!("{:.2}", d.as_secs_f64())
}

fn millis(d: std::time::Duration) -> String {
    format!("{:.0}", d.as_secs_f64() * 1000.0)
}

fn write_catchup(out: &mut String, c: &CatchUpResults, cpus: usize) {
    let mut disturbed = Vec::new();
    if !c.relay.is_empty() {
        let _ = writeln!(
            out,
            "## Relay: catch-up after an outage
"
        );
        let _ = writeln!(
            out,
            "A backlog waits in the outbox of a scratch database migrated like the identification service's: single-event commands committed by `append_command` ({} writers), interleaved across aggregates, a `PresumedVictimReported` ({} bytes) opening each case and `ScreeningCompleted` ({} bytes) after it; then `VACUUM ANALYZE` of the outbox, commits and events (as autovacuum leaves them during a long outage) and a CHECKPOINT. A kernel relay (`Relay::run` in a task, default `RelayConfig`: batches of 256) publishes it to a stream of its own; times are from the start until the outbox is empty (polled every 20 ms); the stream then holds every commit.\n\n- **relay elected onto it**: the outage of NATS or of the relay's process. No relay ran while the backlog formed; the relay starts on it: election, the stream check (refill), then rounds. Every row pending at the election may have been sent before, so before publishing it the relay asks the stream for its subject's last message (a JetStream request per row; pipelined within a round).\n- **relay leading, held back by an open transaction**: the same backlog forms behind a transaction that stays open (the relay publishes only below the oldest running transaction), with the relay elected and idle; the time is from that transaction's end (and a wake-up, as the next commit would give). No row is checked against the stream: the difference to the row above is the cost of those checks (and of the election).\n- **few aggregates**: order per aggregate lets a round carry one commit of each aggregate, so a backlog on few aggregates takes at least as many rounds as it has commits per aggregate.\n\nRounds, and the time in their publish step (the checks, publish, acknowledgements, outbox delete), are the relay's `nrm_relay_round_seconds`; the rest of a round's time is reading the batch and its events, and the lease check. CPU µs per commit: this process (the relay), the PostgreSQL cluster, the nats-server, and the rest of the machine.\n",
            crate::catchup::WRITERS,
            c.report_bytes,
            c.screening_bytes
        );
        let _ = writeln!(
            out,
            "| backlog | commits | first round done, ms | caught up, s | commits/s | rounds | commits/round | publish step ms/round | rest ms/round | relay CPU µs/commit | PostgreSQL | NATS | rest of machine |"
        );
        let _ = writeln!(out, "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
        for r in &c.relay {
            let rounds = r.rounds.max(1) as f64;
            let publish_ms = r.publish.as_secs_f64() * 1000.0 / rounds;
            let rest_ms = (r.elapsed.saturating_sub(r.first_round).as_secs_f64() * 1000.0
                - r.publish.as_secs_f64() * 1000.0 * (rounds - 1.0) / rounds)
                .max(0.0)
                / (rounds - 1.0).max(1.0);
            let _ = writeln!(
                out,
                "| {} aggregates × {}, {} | {} | {} | {} | {:.0} | {} | {:.0} | {:.1} | {:.1} | {} |",
                r.aggregates,
                r.per_aggregate,
                if r.held_back {
                    "relay leading, held back by an open transaction"
                } else {
                    "relay elected onto it"
                },
                r.commits,
                millis(r.first_round),
                secs(r.elapsed),
                r.rate(),
                r.rounds,
                r.commits as f64 / rounds,
                publish_ms,
                rest_ms,
                cpu_cells(r.cpu.as_ref())
            );
            if let Some(cpu) = &r.cpu {
                let share = cpu.rest_share(r.rate(), cpus);
                if share > DISTURBED {
                    disturbed.push(format!(
                        "relay, {} aggregates × {}{} ({:.0}%)",
                        r.aggregates,
                        r.per_aggregate,
                        if r.held_back { ", held back" } else { "" },
                        share * 100.0
                    ));
                }
            }
        }
        let _ = writeln!(out);
        let _ = writeln!(
            out,
            "\"rest ms/round\": (caught up − first round done − the publish steps after the first) ÷ (rounds − 1), taking every publish step as long as the mean: reading the next batch and its events, the lease check (and the 20 ms granularity of the poll)."
        );
        if let Some(l) = &c.lookups {
            let _ = writeln!(
                out,
                "\nThe relay takes every row pending at its election for possibly sent before, and asks the stream for the last message of its subject before publishing it. One such look-up (`get_last_raw_message_by_subject`, a JetStream API request), {} in a row for subjects the stream lacks: p50 {} ms, p99 {} ms.",
                l.count,
                ms(l.p50_us),
                ms(l.p99_us)
            );
        }
        let _ = writeln!(out);
    }
    if !c.projection.is_empty() {
        let _ = writeln!(
            out,
            "## Projection: catch-up
"
        );
        let _ = writeln!(
            out,
            "The identification service's `CaseList` read model (one `INSERT … ON CONFLICT DO NOTHING` into `case_list` per report) in a kernel `ProjectionRunner` (`run` in a task, consuming the whole context stream in order), on a scratch database of its own, fed by the stream the spread relay run filled (one `PresumedVictimReported` per message); done when its checkpoint (`projection_checkpoints.stream_sequence`) reaches the stream's last sequence (polled every 20 ms).\n\n\
- **rebuild**: no checkpoint, so the runner rebuilds: it resets the read model and replays the whole stream in one transaction (a savepoint per message), then writes the checkpoint once; the read model is current when that transaction commits.\n\
- **live**: a valid checkpoint (this stream's identity) at sequence 0, so the runner consumes from sequence 1 as it does after any stop: one transaction per message (lock the checkpoint row, apply, move the checkpoint, commit).\n\
- **after an outage**: the whole recovery in one database, as a service runs it: the runner current and idle on the empty stream, the backlog committed to the outbox with no relay running; then a relay starts, and the time is from its start until the runner's checkpoint reaches the end (the relay's own time to an empty outbox beside it). The runner follows the relay message by message, as live.\n"
        );
        let _ = writeln!(
            out,
            "| path | messages | first message applied, ms | caught up, s | messages/s | relay done, s | case_list rows | CPU µs/message: this process | PostgreSQL | NATS | rest of machine |"
        );
        let _ = writeln!(out, "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
        for p in &c.projection {
            let name = match p.start {
                Start::Rebuild => "rebuild (no checkpoint)",
                Start::Live => "live (checkpoint at 0)",
                Start::Outage => "after an outage (relay and runner)",
            };
            let _ = writeln!(
                out,
                "| {name} | {} | {} | {} | {:.0} | {} | {} | {} |",
                p.messages,
                p.first_applied.map_or_else(|| "–".into(), millis),
                secs(p.elapsed),
                p.rate(),
                p.relay_elapsed.map_or_else(|| "–".into(), secs),
                p.rows,
                cpu_cells(p.cpu.as_ref())
            );
            if let Some(cpu) = &p.cpu {
                let share = cpu.rest_share(p.rate(), cpus);
                if share > DISTURBED {
                    disturbed.push(format!("projection, {name} ({:.0}%)", share * 100.0));
                }
            }
        }
        let _ = writeln!(out);
        if let Some((p50, p99)) = c.commit_us {
            let _ = writeln!(
                out,
                "The live path commits once per message. A commit on this server just before the live run (one-row `INSERT`s, autocommitted, one after another): p50 {} ms, p99 {} ms.\n",
                ms(p50),
                ms(p99)
            );
        }
    }
    if !disturbed.is_empty() || !c.busy_at_start.is_empty() {
        let _ = writeln!(
            out,
            "Other processes took more than {:.0}% of the CPUs during: {}. Those numbers are low; run again on a quiet machine.\n",
            DISTURBED * 100.0,
            if disturbed.is_empty() {
                "the start of some of these runs (the wait for quiet ran out)".to_owned()
            } else {
                disturbed.join(", ")
            }
        );
    }
}

/// Whether a NATS version string is 2.10 or later (the local stack then sets `sync_interval: always`).
fn nats_syncs_always(version: &str) -> bool {
    let mut parts = version
        .trim_start_matches('v')
        .split('.')
        .map(|p| p.parse::<u32>().unwrap_or(0));
    let (major, minor) = (parts.next().unwrap_or(0), parts.next().unwrap_or(0));
    major > 2 || (major == 2 && minor >= 10)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(ops_per_sec: f64) -> RunResult {
        RunResult {
            ops: 10,
            ops_per_sec,
            p50_us: 1500,
            p99_us: 4000,
            ..RunResult::default()
        }
    }

    #[test]
    fn the_verdict_is_taken_at_the_highest_client_count() {
        let report = Report {
            append: vec![
                AppendRow {
                    clients: 1,
                    kernel: run(10.0),
                    raw: run(100.0),
                },
                AppendRow {
                    clients: 32,
                    kernel: run(80.0),
                    raw: run(100.0),
                },
            ],
            ..Report::default()
        };
        let (clients, ratio, met) = report.verdict().unwrap();
        assert_eq!(clients, 32);
        assert!((ratio - 0.8).abs() < 1e-9);
        assert!(met);
        let md = report.markdown();
        assert!(
            md.contains("| 32 | 80 | 1.50 | 4.00 | 100 | 1.50 | 4.00 | 80% |"),
            "{md}"
        );
        assert!(md.contains("met**"));
    }

    #[test]
    fn nats_versions_compare() {
        assert!(!nats_syncs_always("2.9.10"));
        assert!(nats_syncs_always("2.10.0"));
        assert!(nats_syncs_always("v2.11.3"));
    }
}
