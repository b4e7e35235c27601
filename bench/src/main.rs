//! `nrm-bench`: the kernel's append throughput and latency beside the raw
//! PostgreSQL ceiling (pgbench, same rows, same server), and the latency from
//! a gRPC report to its event on NATS; then the shelter service's bed holds
//! under contention (with a race for the last beds that must not
//! over-book), its free-capacity query, and the latency from an accepted
//! referral to the bed held ([`shelter`]); last the catch-up after an outage:
//! the relay emptying a backlog of commits, and a projection runner
//! following a stream it is behind ([`catchup`]); and casepath: the replay
//! of a million events, the lag from a command to a watched path, the
//! statistics over 100,000 persons ([`casepath`]). `make bench` runs it on a private stack
//! (`scripts/bench.sh`); the servers come from `NRM_TEST_DATABASE_URL` and
//! `NRM_TEST_NATS_URL`, as for the tests.
//!
//! Modules: [`append`] drives the kernel, [`raw`] drives pgbench, [`e2e`]
//! times the service end to end ([`service`] starts it), [`stats`] keeps
//! histograms and CPU time, [`report`] prints and writes the result.
//! `--only` runs some sections alone.

mod append;
mod casepath;
mod catchup;
mod e2e;
mod raw;
mod report;
mod service;
mod shelter;
mod stats;

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context as _, bail};
use clap::{Parser, ValueEnum};
use nrm_kernel::settings::DatabaseSettings;
use nrm_kernel::store::EventStore;
use sqlx::PgPool;
use sqlx::postgres::PgPoolOptions;

use crate::append::Workload;
use crate::report::{AppendRow, Environment, Report, Variant};
use crate::stats::RunResult;

/// A part of the benchmark, for `--only`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Section {
    /// The kernel's append path beside pgbench, and its breakdown.
    Append,
    /// gRPC report → event on NATS.
    E2e,
    /// The shelter service: holds, the race, free capacity, accepted referral → bed held.
    Shelter,
    /// The relay's catch-up from a backlog in the outbox.
    Relay,
    /// A projection runner's catch-up (rebuild, live, after an outage).
    Projection,
    /// casepath: replay, command → watched path, statistics.
    Casepath,
}

/// Benchmark of Köpür's append path and of report → NATS latency.
#[derive(Debug, Parser)]
#[command(name = "nrm-bench", version)]
struct Args {
    /// Run only these sections, comma-separated (default: all).
    #[arg(long, env = "NRM_BENCH_ONLY", value_enum, value_delimiter = ',')]
    only: Vec<Section>,
    /// Measured seconds per client count, for the kernel and for pgbench each
    /// (split into `--rounds` slices of whole seconds).
    #[arg(long, env = "NRM_BENCH_SECONDS", default_value_t = 10)]
    seconds: u64,
    /// Warm-up seconds before the first slice of each (1 s before later ones).
    #[arg(long, env = "NRM_BENCH_WARMUP", default_value_t = 2)]
    warmup: u64,
    /// Client counts, comma-separated.
    #[arg(long, env = "NRM_BENCH_CLIENTS", value_delimiter = ',', default_value = "1,8,32")]
    clients: Vec<usize>,
    /// Payload bytes per event.
    #[arg(long, env = "NRM_BENCH_PAYLOAD_BYTES", default_value_t = 300)]
    payload_bytes: usize,
    /// Measured seconds per variant of the breakdown at the highest client count (0: skip it).
    #[arg(long, env = "NRM_BENCH_DIAGNOSE_SECONDS", default_value_t = 6)]
    diagnose_seconds: u64,
    /// Rounds: every measurement is split into this many slices, taken in
    /// turn with the things it is compared with.
    #[arg(long, env = "NRM_BENCH_ROUNDS", default_value_t = 2)]
    rounds: u64,
    /// Reports per end-to-end phase (0: skip end to end).
    #[arg(long, env = "NRM_BENCH_E2E_REPORTS", default_value_t = 500)]
    e2e_reports: usize,
    /// Reports in flight in each end-to-end phase, comma-separated.
    #[arg(
        long,
        env = "NRM_BENCH_E2E_CONCURRENCY",
        value_delimiter = ',',
        default_value = "1,8"
    )]
    e2e_concurrency: Vec<usize>,
    /// Seconds per shelter hold phase (0: skip the shelter sections' holds).
    #[arg(long, env = "NRM_BENCH_SHELTER_SECONDS", default_value_t = 5)]
    shelter_seconds: u64,
    /// Clients of the shelter hold phases, comma-separated.
    #[arg(
        long,
        env = "NRM_BENCH_SHELTER_CLIENTS",
        value_delimiter = ',',
        default_value = "8,32"
    )]
    shelter_clients: Vec<usize>,
    /// Accepted referrals prepared before each shelter hold phase, one hold
    /// each (the phase ends early when they run out; at most 9950).
    #[arg(long, env = "NRM_BENCH_SHELTER_REFERRALS", default_value_t = 2000)]
    shelter_referrals: usize,
    /// Free beds the race is for (0: skip the race).
    #[arg(long, env = "NRM_BENCH_RACE_BEDS", default_value_t = 50)]
    race_beds: u32,
    /// Clients racing for them.
    #[arg(long, env = "NRM_BENCH_RACE_CLIENTS", default_value_t = 32)]
    race_clients: usize,
    /// Shelters registered for the free-capacity query (0: skip it).
    #[arg(long, env = "NRM_BENCH_SHELTERS", default_value_t = 200)]
    shelters: usize,
    /// Sequential free-capacity calls.
    #[arg(long, env = "NRM_BENCH_CAPACITY_CALLS", default_value_t = 2000)]
    capacity_calls: usize,
    /// Accepted referrals per second for the placement reaction (0: skip it).
    #[arg(long, env = "NRM_BENCH_PLACEMENT_RATE", default_value_t = 100)]
    placement_rate: u64,
    /// Seconds of accepted referrals.
    #[arg(long, env = "NRM_BENCH_PLACEMENT_SECONDS", default_value_t = 10)]
    placement_seconds: u64,
    /// Commits in each backlog of the catch-up sections (0: skip them).
    #[arg(long, env = "NRM_BENCH_CATCHUP_COMMITS", default_value_t = 10_000)]
    catchup_commits: usize,
    /// Aggregates the relay's concentrated backlog is spread over (0: skip that backlog).
    #[arg(long, env = "NRM_BENCH_CATCHUP_HOT_AGGREGATES", default_value_t = 100)]
    catchup_hot_aggregates: usize,
    /// Events casepath replays from the identification stream (0: skip the replay).
    #[arg(long, env = "NRM_BENCH_CASEPATH_EVENTS", default_value_t = 1_000_000)]
    casepath_events: usize,
    /// Commands a second from acknowledgement to a watched casepath path (0: skip it).
    #[arg(long, env = "NRM_BENCH_CASEPATH_RATE", default_value_t = 500)]
    casepath_rate: u64,
    /// Seconds of those commands.
    #[arg(long, env = "NRM_BENCH_CASEPATH_SECONDS", default_value_t = 10)]
    casepath_seconds: u64,
    /// Paths watched meanwhile (of the loaded persons; their commands are timed).
    #[arg(long, env = "NRM_BENCH_CASEPATH_WATCHED", default_value_t = 50)]
    casepath_watched: usize,
    /// Persons the commands go round (each its own aggregate, so that the
    /// load does not become a queue of version conflicts on a few).
    #[arg(long, env = "NRM_BENCH_CASEPATH_LOADED", default_value_t = 1_000)]
    casepath_loaded: usize,
    /// Persons of the statistics query (0: skip it).
    #[arg(long, env = "NRM_BENCH_CASEPATH_PERSONS", default_value_t = 100_000)]
    casepath_persons: usize,
    /// Seconds the whole run may wait, in total, for other processes to
    /// leave the CPUs before a measurement (runs disturbed anyway are flagged).
    #[arg(long, env = "NRM_BENCH_QUIET_WAIT", default_value_t = 30)]
    quiet_wait: u64,
    /// Where the markdown results go.
    #[arg(long, env = "NRM_BENCH_RESULTS_DIR", default_value = concat!(env!("CARGO_MANIFEST_DIR"), "/results"))]
    results_dir: PathBuf,
}

impl Args {
    /// Whether `section` is to run.
    fn runs(&self, section: Section) -> bool {
        self.only.is_empty() || self.only.contains(&section)
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    // The development issuer's folder goes with the run, however it ends
    // short of a signal: returned, failed or panicked.
    let _issuer = service::IssuerFolder;
    if args.clients.is_empty() || args.clients.contains(&0) {
        bail!("--clients needs positive client counts");
    }
    let Ok(server_url) = std::env::var("NRM_TEST_DATABASE_URL") else {
        bail!(
            "NRM_TEST_DATABASE_URL is not set: run `make bench` (scripts/bench.sh) or point it at a PostgreSQL server"
        );
    };
    let nats_url = std::env::var("NRM_TEST_NATS_URL").unwrap_or_default();
    if args.e2e_reports > 0 && args.runs(Section::E2e) && nats_url.is_empty() {
        bail!("NRM_TEST_NATS_URL is not set: run `make bench` (scripts/bench.sh), or pass --e2e-reports 0");
    }
    let catchup = args.catchup_commits > 0 && (args.runs(Section::Relay) || args.runs(Section::Projection));
    if catchup && nats_url.is_empty() {
        bail!("NRM_TEST_NATS_URL is not set: run `make bench` (scripts/bench.sh), or pass --catchup-commits 0");
    }
    if args.placement_rate > 1_000_000 {
        bail!("--placement-rate is at most 1000000 a second");
    }
    let started = chrono::Utc::now();
    let clock = std::time::Instant::now();
    let max_clients = args.clients.iter().copied().max().unwrap_or(1);
    let settings = DatabaseSettings {
        url: server_url.clone(),
        name: format!("bench_{}", &uuid::Uuid::new_v4().simple().to_string()[..12]),
        max_connections: u32::try_from(max_clients).unwrap_or(u32::MAX),
    };
    let pool = nrm_kernel::db::connect_and_migrate(&settings, &nrm_identification::startup::MIGRATIONS)
        .await
        .context("create and migrate the benchmark database")?;
    let backend: i32 = sqlx::query_scalar("SELECT pg_backend_pid()").fetch_one(&pool).await?;
    stats::set_server_backend(u32::try_from(backend).unwrap_or(0));
    let work_dir = std::env::temp_dir().join(format!("nrm-bench-{}", settings.name));
    std::fs::create_dir_all(&work_dir)?;
    let outcome = run(&args, &settings, &nats_url, &pool, &work_dir, started).await;
    pool.close().await;
    let _ = std::fs::remove_dir_all(&work_dir);
    if let Err(err) = nrm_kernel::db::drop_database(&settings).await {
        eprintln!("bench: could not drop {}: {err}", settings.name);
    }
    let report = outcome?;
    let text = report.markdown();
    println!("{text}");
    let path = report.write(&args.results_dir)?;
    eprintln!(
        "bench: written to {} and {} ({} s)",
        path.display(),
        args.results_dir.join("latest.md").display(),
        clock.elapsed().as_secs()
    );
    Ok(())
}

async fn run(
    args: &Args,
    settings: &DatabaseSettings,
    nats_url: &str,
    pool: &PgPool,
    work_dir: &std::path::Path,
    started: chrono::DateTime<chrono::Utc>,
) -> anyhow::Result<Report> {
    let warmup = Duration::from_secs(args.warmup);
    let mut env = environment(pool, args, started).await?;
    let all = [
        Section::Append,
        Section::E2e,
        Section::Shelter,
        Section::Relay,
        Section::Projection,
        Section::Casepath,
    ];
    env.partial = !all.iter().all(|&section| args.runs(section));
    env.sections = all
        .into_iter()
        .filter(|&section| args.runs(section))
        .filter_map(|section| section.to_possible_value().map(|v| v.get_name().to_owned()))
        .collect();
    let mut report = Report {
        env,
        ..Report::default()
    };
    let mut plan = Plan {
        pool,
        payload_bytes: args.payload_bytes,
        rounds: args.rounds.max(1),
        first_warmup: warmup,
        quiet_budget: Duration::from_secs(args.quiet_wait),
    };
    if args.runs(Section::Append) {
        append_section(args, settings, &mut plan, work_dir, &mut report).await?;
    }

    if args.e2e_reports > 0 && args.runs(Section::E2e) {
        stats::wait_for_quiet(&mut plan.quiet_budget, 0.10).await;
        eprintln!(
            "bench: end to end, {} reports at {:?} in flight",
            args.e2e_reports, args.e2e_concurrency
        );
        let (results, nats_version) =
            e2e::run(&settings.url, nats_url, args.e2e_reports, &args.e2e_concurrency).await?;
        report.env.nats = nats_version;
        report.e2e = results;
    }

    let shelter_plan = shelter::Plan {
        hold_clients: args.shelter_clients.clone(),
        hold_seconds: args.shelter_seconds,
        hold_referrals: args.shelter_referrals,
        race_beds: args.race_beds,
        race_clients: args.race_clients,
        shelters: args.shelters,
        queries: args.capacity_calls,
        placement_rate: args.placement_rate,
        placement_seconds: args.placement_seconds,
    };
    let any_shelter = args.shelter_seconds > 0
        || args.race_beds > 0
        || (args.shelters > 0 && args.capacity_calls > 0)
        || (args.placement_rate > 0 && args.placement_seconds > 0);
    if any_shelter && args.runs(Section::Shelter) && !nats_url.is_empty() {
        stats::wait_for_quiet(&mut plan.quiet_budget, 0.10).await;
        report.shelter = Some(shelter::run(&settings.url, nats_url, &shelter_plan).await?);
    }

    let catchup_plan = catchup::Plan {
        commits: args.catchup_commits,
        hot_aggregates: args.catchup_hot_aggregates,
        relay: args.runs(Section::Relay),
        projection: args.runs(Section::Projection),
    };
    if catchup_plan.commits > 0 && (catchup_plan.relay || catchup_plan.projection) {
        report.catchup = Some(catchup::run(&settings.url, nats_url, &catchup_plan, &mut plan.quiet_budget).await?);
    }

    if args.runs(Section::Casepath) && !nats_url.is_empty() {
        stats::wait_for_quiet(&mut plan.quiet_budget, 0.10).await;
        let casepath_plan = casepath::Plan {
            events: args.casepath_events,
            rate: args.casepath_rate,
            seconds: args.casepath_seconds,
            watched: args.casepath_watched,
            loaded: args.casepath_loaded,
            persons: args.casepath_persons,
        };
        report.casepath = Some(casepath::run(&settings.url, nats_url, &casepath_plan).await?);
    }
    Ok(report)
}

/// The kernel's append path beside pgbench at every client count, then its breakdown.
async fn append_section(
    args: &Args,
    settings: &DatabaseSettings,
    plan: &mut Plan<'_>,
    work_dir: &std::path::Path,
    report: &mut Report,
) -> anyhow::Result<()> {
    let pool = plan.pool;
    let measure = Duration::from_secs(args.seconds);
    let max_clients = args.clients.iter().copied().max().unwrap_or(1);
    let server_major: Option<u32> = sqlx::query_scalar::<_, String>("SHOW server_version_num")
        .fetch_one(pool)
        .await
        .ok()
        .and_then(|v| v.parse::<u32>().ok())
        .map(|n| n / 10_000);
    let pgbench_bin = raw::find_pgbench(server_major)?;
    report.env.pgbench = pgbench_bin.display().to_string();
    raw::create_tables(pool).await?;
    let raw_sql = raw::insert_sql(args.payload_bytes);
    let script = work_dir.join("raw.sql");
    std::fs::write(&script, format!("-- nrm-bench: one raw append\n{raw_sql};\n"))?;
    let uri = raw::database_uri(&settings.url, &settings.name);
    let pgbench = raw::Pgbench {
        binary: &pgbench_bin,
        uri: &uri,
        script: &script,
        log_dir: work_dir,
    };

    let kernel = Workload::Command(EventStore::new(pool.clone()));
    for &clients in &args.clients {
        let contenders = [
            ("kernel append", Contender::Sqlx(kernel.clone())),
            ("raw (pgbench)", Contender::Pgbench(&pgbench)),
        ];
        let mut results = plan.round_robin(&contenders, clients, measure).await?.into_iter();
        report.append.push(AppendRow {
            clients,
            kernel: results.next().unwrap_or_default(),
            raw: results.next().unwrap_or_default(),
        });
    }

    if args.diagnose_seconds > 0 {
        report.variant_clients = max_clients;
        report.variant_seconds = args.diagnose_seconds;
        report.variants = breakdown(args, settings, plan, &raw_sql, &pgbench, max_clients).await?;
        report.explains = vec![
            (
                "EXPLAIN ANALYZE of the kernel's append statement (rolled back; third of three)".into(),
                append::explain_kernel_append(pool, args.payload_bytes)
                    .await
                    .unwrap_or_else(|err| format!("not available: {err:#}")),
            ),
            (
                "EXPLAIN ANALYZE of the raw statement (rolled back; third of three)".into(),
                explain(pool, &raw_sql).await?,
            ),
        ];
    }
    Ok(())
}

/// The kernel's path taken apart at the highest client count, from the raw
/// ceiling up to the kernel as configured, and the transaction path beside
/// it, all measured in the same rounds.
async fn breakdown(
    args: &Args,
    settings: &DatabaseSettings,
    plan: &mut Plan<'_>,
    raw_sql: &str,
    pgbench: &raw::Pgbench<'_>,
    clients: usize,
) -> anyhow::Result<Vec<Variant>> {
    // connect_and_migrate's pool, with and without sqlx's ping on every acquire.
    let options = nrm_kernel::db::connect_options(settings)?;
    let pool_with = |ping: bool| {
        PgPoolOptions::new()
            .max_connections(settings.max_connections)
            .acquire_timeout(Duration::from_secs(5))
            .test_before_acquire(ping)
            .connect_with(options.clone())
    };
    let no_ping = pool_with(false).await?;
    let ping = pool_with(true).await?;
    let kernel_pings = plan.pool.options().get_test_before_acquire();
    let mark = |pings: bool| {
        if pings == kernel_pings {
            " ← the kernel's pool"
        } else {
            ""
        }
    };
    let names = [
        "raw ceiling: pgbench, one statement".to_owned(),
        "raw statement sent by sqlx, pool without ping".to_owned(),
        format!("kernel: append_command, pool without ping{}", mark(false)),
        format!(
            "kernel: append_command, pool with ping on acquire (sqlx's default){}",
            mark(true)
        ),
        "kernel: transaction path (begin, append, record_command, audit, commit), the kernel's pool".to_owned(),
    ];
    let steps = [
        (&names[0], 1, Contender::Pgbench(pgbench)),
        (
            &names[1],
            1,
            Contender::Sqlx(Workload::RawStatement(no_ping.clone(), raw_sql.into())),
        ),
        (
            &names[2],
            1,
            Contender::Sqlx(Workload::Command(EventStore::new(no_ping.clone()))),
        ),
        (
            &names[3],
            2,
            Contender::Sqlx(Workload::Command(EventStore::new(ping.clone()))),
        ),
        (
            &names[4],
            5 + u32::from(kernel_pings),
            Contender::Sqlx(Workload::Transaction(EventStore::new(plan.pool.clone()))),
        ),
    ];
    let contenders: Vec<(&str, Contender<'_>)> = steps.iter().map(|(name, _, c)| (name.as_str(), c.clone())).collect();
    let first_warmup = std::mem::replace(&mut plan.first_warmup, Duration::from_secs(1));
    let results = plan
        .round_robin(&contenders, clients, Duration::from_secs(args.diagnose_seconds))
        .await;
    plan.first_warmup = first_warmup;
    no_ping.close().await;
    ping.close().await;
    Ok(steps
        .iter()
        .zip(results?)
        .map(|((name, round_trips, _), result)| Variant {
            name: (*name).clone(),
            round_trips: *round_trips,
            result,
        })
        .collect())
}

/// What generates the load of one contender.
#[derive(Clone)]
enum Contender<'a> {
    /// Tokio tasks in this process.
    Sqlx(Workload),
    /// pgbench.
    Pgbench(&'a raw::Pgbench<'a>),
}

/// How measurements are taken: in rounds, each contender in turn, so that
/// whatever else happens on the machine falls on all of them alike.
struct Plan<'a> {
    pool: &'a PgPool,
    payload_bytes: usize,
    rounds: u64,
    /// Warm-up before a contender's first slice (1 s before later ones).
    first_warmup: Duration,
    /// What is left of the time allowed for waiting for a quiet machine.
    quiet_budget: Duration,
}

impl Plan<'_> {
    /// Measures each contender for `total`, split into `rounds` slices of
    /// whole seconds (pgbench's `-T`), taken in turn; merges each one's slices.
    async fn round_robin(
        &mut self,
        contenders: &[(&str, Contender<'_>)],
        clients: usize,
        total: Duration,
    ) -> anyhow::Result<Vec<RunResult>> {
        let slice = Duration::from_secs((total.as_secs() / self.rounds).max(1));
        let mut parts: Vec<Vec<RunResult>> = vec![Vec::new(); contenders.len()];
        for round in 0..self.rounds {
            for ((name, contender), parts) in contenders.iter().zip(parts.iter_mut()) {
                let warmup = if round == 0 {
                    self.first_warmup
                } else {
                    Duration::from_secs(1)
                };
                prepare(self.pool, &mut self.quiet_budget).await?;
                eprintln!(
                    "bench: {name}, {clients} clients, round {}/{}, {} s",
                    round + 1,
                    self.rounds,
                    slice.as_secs()
                );
                let result = match contender {
                    Contender::Sqlx(workload) => {
                        append::drive(workload, clients, warmup, slice, self.payload_bytes).await?
                    }
                    Contender::Pgbench(pgbench) => pgbench.run(clients, warmup, slice).await?,
                };
                parts.push(result);
            }
        }
        parts.iter().map(|p| RunResult::merge(p)).collect()
    }
}

/// Before a measured run: a checkpoint, so every run starts with the same
/// full-page-write cost, then a wait (out of `quiet_budget`) for other
/// processes to leave the CPUs.
async fn prepare(pool: &PgPool, quiet_budget: &mut Duration) -> anyhow::Result<()> {
    sqlx::query("CHECKPOINT").execute(pool).await.context("CHECKPOINT")?;
    stats::wait_for_quiet(quiet_budget, 0.10).await;
    Ok(())
}

/// `EXPLAIN (ANALYZE, BUFFERS, WAL)` of a parameterless statement, rolled
/// back; the last of three, so first-touch effects do not show.
async fn explain(pool: &PgPool, sql: &str) -> anyhow::Result<String> {
    let mut plan = String::new();
    for _ in 0..3 {
        let mut tx = pool.begin().await?;
        let rows: Vec<String> = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
            "EXPLAIN (ANALYZE, BUFFERS, WAL, COSTS OFF) {sql}"
        )))
        .fetch_all(&mut *tx)
        .await?;
        tx.rollback().await?;
        plan = rows.join("\n");
    }
    Ok(plan)
}

async fn environment(
    pool: &PgPool,
    args: &Args,
    started: chrono::DateTime<chrono::Utc>,
) -> anyhow::Result<Environment> {
    let postgres: String = sqlx::query_scalar("SELECT version()").fetch_one(pool).await?;
    let mut postgres_settings = Vec::new();
    for name in [
        "fsync",
        "synchronous_commit",
        "full_page_writes",
        "wal_sync_method",
        "wal_level",
        "shared_buffers",
        "max_wal_size",
    ] {
        let value: String = sqlx::query_scalar(sqlx::AssertSqlSafe(format!("SHOW {name}")))
            .fetch_one(pool)
            .await?;
        postgres_settings.push((name.to_owned(), value));
    }
    let cpu_model = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|t| {
            t.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, v)| v.trim().to_owned())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let os_release = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_owned())
        .unwrap_or_default();
    let metadata_bytes = serde_json::to_string(&append::metadata()).map_or(0, |s| s.len());
    Ok(Environment {
        started,
        cpus: std::thread::available_parallelism().map_or(0, usize::from),
        cpu_model,
        os_release,
        postgres,
        postgres_settings,
        nats: nats_server_version().unwrap_or_else(|| "not measured".into()),
        pgbench: String::new(),
        seconds: args.seconds,
        warmup: args.warmup,
        rounds: args.rounds.max(1),
        payload_bytes: args.payload_bytes,
        metadata_bytes,
        pool_size: args.clients.iter().copied().max().unwrap_or(1),
        pool_pings: pool.options().get_test_before_acquire(),
        sections: Vec::new(),
        partial: false,
    })
}

/// `nats-server --version`, when the binary is on `PATH` (the end-to-end part
/// replaces it with what the server itself announces).
fn nats_server_version() -> Option<String> {
    let output = std::process::Command::new("nats-server")
        .arg("--version")
        .output()
        .ok()?;
    let text = String::from_utf8_lossy(&output.stdout).trim().to_owned();
    (!text.is_empty()).then_some(text)
}
