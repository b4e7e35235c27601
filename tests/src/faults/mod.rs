//! The fault suite (issue 8): a history and a checker, the Jepsen idea, on
//! the real servers.
//!
//! A load generator walks many cases through all three services at once
//! (report, screening, decision, consent, referral, answer, bed, admission),
//! every command with a client request ID, retried with the same ID on
//! `UNAVAILABLE`, `ABORTED`, timeouts and dropped connections, as a real
//! client would, and records what each client was finally told: `ok` (with
//! the IDs and version of the answer), `fail` (a definite refusal) or `info`
//! (it gave up while the outcome is unknown). Beside it, at seeded random
//! moments, the injector SIGKILLs a service (and restarts it), SIGKILLs the
//! NATS server (and restarts it), restarts PostgreSQL in immediate mode; and
//! some service processes run with `NRM_RELAY__FAULT_ABORT_AFTER_ACK`, so the
//! relay aborts between JetStream's acknowledgement and the outbox delete.
//!
//! Then everything comes back, the suite waits until the system is quiet
//! (outboxes empty, every checkpoint at its stream's end, no due timer), and
//! the checker holds the history against every event store, every stream and
//! every read model. It prints the counts and fails when an acknowledged event
//! is lost, an effect happened twice, or a read model differs from its rebuild.
//!
//! The suite runs on a private stack (`target/nrm-faultenv`), never on the
//! stack the other tests share: it kills that stack's servers.
//!
//! # Layout
//! - [`inject`]: the private stack, the service processes (started, killed,
//!   watched) and the fault injector.
//! - [`load`]: the load generator, its clients and the history.
//! - [`checker`]: quiescence, the checks, the rebuild and the summary.

mod checker;
mod inject;
mod load;

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use tokio_util::sync::CancellationToken;

/// How big a run is.
#[derive(Debug, Clone)]
pub struct Plan {
    /// `short` (in `make test`) or `full` (`make test-faults`).
    pub form: &'static str,
    /// The load runs until at least this many commands were sent…
    pub commands: u64,
    /// …and the injector injected at least this many faults (relay aborts not counted).
    pub faults: u64,
    /// Cases walked at the same time.
    pub workers: usize,
    /// Pause before each fault, at random between these bounds.
    pub fault_gap: (Duration, Duration),
    /// The load stops after this long even when a target was not reached.
    pub max_load: Duration,
    /// Longest wait for the system to become quiet.
    pub quiesce_timeout: Duration,
    /// `NRM_RELAY__FAULT_ABORT_AFTER_ACK` of the service processes during the load.
    pub abort_after_ack: f64,
    /// Beds of the larger shelters (the smallest has two).
    pub beds: u32,
    /// Keep the relay of the first service that aborts off for longer than
    /// JetStream's de-duplication window (DESIGN.md §7).
    pub dedupe_probe: bool,
}

impl Plan {
    /// The form that runs in `make test`: a few hundred commands, a handful
    /// of faults, about a minute and a half on two cores.
    #[must_use]
    pub fn short() -> Self {
        Self {
            form: "short",
            commands: 700,
            faults: 6,
            workers: 12,
            fault_gap: (Duration::from_secs(3), Duration::from_secs(6)),
            max_load: Duration::from_secs(75),
            quiesce_timeout: Duration::from_secs(120),
            abort_after_ack: 0.01,
            beds: 24,
            dedupe_probe: false,
        }
    }

    /// The form of `make test-faults`: at least 10,000 commands and 20 faults.
    #[must_use]
    pub fn full() -> Self {
        Self {
            form: "full",
            commands: 10_000,
            faults: 24,
            workers: 24,
            fault_gap: (Duration::from_secs(4), Duration::from_secs(9)),
            max_load: Duration::from_secs(900),
            quiesce_timeout: Duration::from_secs(300),
            abort_after_ack: 0.005,
            beds: 120,
            dedupe_probe: true,
        }
    }

    /// Commands per second that spread the commands over the faults.
    fn rate(&self) -> f64 {
        let mean_gap = (self.fault_gap.0 + self.fault_gap.1).as_secs_f64() / 2.0;
        // The first fault comes after one gap; the load goes on to the last one.
        let span = mean_gap * (self.faults as f64 + 0.5);
        self.commands as f64 / span.max(1.0)
    }
}

/// What a run found.
#[derive(Debug)]
pub struct Verdict {
    /// The summary table (also written to `target/fault-suite-<form>.txt`).
    pub summary: String,
    /// Every broken rule, one line each; empty when the run passed.
    pub failures: Vec<String>,
}

/// The seed of a run: `NRM_FAULTS_SEED` (decimal or 0x-hex) or the clock.
fn seed() -> u64 {
    if let Ok(text) = std::env::var("NRM_FAULTS_SEED") {
        let text = text.trim();
        let parsed = text
            .strip_prefix("0x")
            .map_or_else(|| text.parse::<u64>().ok(), |hex| u64::from_str_radix(hex, 16).ok());
        if let Some(seed) = parsed {
            return seed;
        }
    }
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    u64::try_from(now.as_nanos() % u128::from(u64::MAX)).unwrap_or(7)
}

/// A small seeded generator (SplitMix64): the suite's choices repeat for a seed.
#[derive(Debug, Clone)]
pub(crate) struct Rng(u64);

impl Rng {
    pub(crate) fn new(seed: u64) -> Self {
        Self(seed)
    }

    /// An independent generator for stream `n` of this one.
    pub(crate) fn fork(&self, n: u64) -> Self {
        let mut r = Self(self.0 ^ n.wrapping_mul(0xA076_1D64_78BD_642F));
        r.next_u64();
        r
    }

    pub(crate) fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n`.
    pub(crate) fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n.max(1)
    }

    /// True with probability `p`.
    pub(crate) fn chance(&mut self, p: f64) -> bool {
        ((self.next_u64() >> 11) as f64 / (1u64 << 53) as f64) < p
    }

    /// Uniform between `lo` and `hi`.
    pub(crate) fn between(&mut self, lo: Duration, hi: Duration) -> Duration {
        let lo_ms = u64::try_from(lo.as_millis()).unwrap_or(0);
        let hi_ms = u64::try_from(hi.as_millis()).unwrap_or(lo_ms).max(lo_ms);
        Duration::from_millis(lo_ms + self.below(hi_ms - lo_ms + 1))
    }

    /// One of `items`, by weight.
    pub(crate) fn weighted<'a, T>(&mut self, items: &'a [(T, u64)]) -> &'a T {
        let total: u64 = items.iter().map(|(_, w)| w).sum();
        let mut pick = self.below(total);
        for (item, weight) in items {
            if pick < *weight {
                return item;
            }
            pick -= weight;
        }
        &items[items.len() - 1].0
    }
}

/// Runs the suite as `plan` says and returns its verdict.
///
/// # Errors
/// When the stack or the services cannot be set up at all (a broken rule is
/// a failure in the verdict, not an error).
pub async fn run(plan: Plan) -> anyhow::Result<Verdict> {
    let seed = seed();
    println!(
        "fault suite ({} form): seed {seed:#x} (NRM_FAULTS_SEED={seed:#x} repeats the choices)",
        plan.form
    );
    let rng = Rng::new(seed);
    let root = crate::workspace_root();
    let dir = root.join("target").join("nrm-faultenv");
    let stack = Arc::new(inject::Stack::fresh(dir.clone()).await.context("private stack")?);
    let faults = Arc::new(inject::FaultLog::new());
    let services = Arc::new(inject::Services::new(stack.clone(), faults.clone(), dir.join("logs"))?);
    let result = drive(&plan, seed, &rng, &stack, &services, &faults).await;
    services.shutdown().await;
    let verdict = match result {
        Ok(verdict) => verdict,
        Err(err) => {
            let _ = stack.down().await;
            return Err(err);
        }
    };
    let file = root.join("target").join(format!("fault-suite-{}.txt", plan.form));
    let _ = std::fs::write(&file, &verdict.summary);
    if verdict.failures.is_empty() {
        stack.reset().await?;
    } else {
        // Kept for a look: service logs in target/nrm-faultenv/logs; the next run resets it.
        stack.down().await?;
        println!(
            "fault suite: the stack's data and the service logs are kept in {}",
            dir.display()
        );
    }
    Ok(verdict)
}

async fn drive(
    plan: &Plan,
    seed: u64,
    rng: &Rng,
    stack: &Arc<inject::Stack>,
    services: &Arc<inject::Services>,
    faults: &Arc<inject::FaultLog>,
) -> anyhow::Result<Verdict> {
    services.set_abort_after_ack(plan.abort_after_ack);
    for service in inject::Service::ALL {
        services.start(service).await?;
    }
    let watcher = services.clone().watch();
    let history = Arc::new(load::History::new());
    let clients = load::Clients::new(services)?;
    let load = Arc::new(load::Load::new(plan, clients.clone(), history.clone()));
    load.setup(&mut rng.fork(1)).await.context("registering the shelters")?;
    // Only now: a relay aborting while the shelters are registered is
    // restarted at once; one kept off past the de-duplication window then
    // would hold their beds back longer than registering waits.
    if plan.dedupe_probe {
        services.arm_dedupe_probe();
    }
    println!(
        "fault suite: stack up, services up, {} shelters registered; load and faults start",
        load.shelter_count()
    );

    let stop_faults = CancellationToken::new();
    let injector = tokio::spawn(inject::inject(
        services.clone(),
        stack.clone(),
        plan.clone(),
        rng.fork(2),
        stop_faults.clone(),
    ));
    let workers = load.clone().start(rng.fork(3));
    let started = Instant::now();
    let mut last_print = Instant::now();
    loop {
        tokio::time::sleep(Duration::from_millis(250)).await;
        let sent = history.sent.load(Ordering::Relaxed);
        let injected = faults.injected();
        if last_print.elapsed() >= Duration::from_secs(10) {
            println!(
                "fault suite: {:>4.0} s  {sent} commands sent, {injected} faults injected, {} relay aborts",
                started.elapsed().as_secs_f64(),
                faults.count(inject::FaultKind::RelayAbort)
            );
            last_print = Instant::now();
        }
        if (sent >= plan.commands && injected >= plan.faults) || started.elapsed() >= plan.max_load {
            break;
        }
        if injector.is_finished() {
            // It stops by itself only when it failed.
            break;
        }
    }
    stop_faults.cancel();
    let injector_result = injector.await;
    load.stop();
    for worker in workers {
        let _ = worker.await;
    }
    let load_time = started.elapsed();
    println!(
        "fault suite: load stopped after {:.0} s; bringing everything up without faults",
        load_time.as_secs_f64()
    );
    let mut setup_failures = Vec::new();
    match injector_result {
        Ok(Ok(())) => {}
        Ok(Err(err)) => setup_failures.push(format!("the fault injector failed: {err:#}")),
        Err(err) => setup_failures.push(format!("the fault injector panicked: {err}")),
    }

    // Faults stop: the servers up, every service restarted without the relay abort.
    stack.up().await.context("bringing the stack up after the faults")?;
    services.faults_over();
    services.set_abort_after_ack(0.0);
    for service in inject::Service::ALL {
        services.restart_clean(service).await?;
    }
    let report = checker::check(checker::Inputs {
        plan,
        seed,
        stack,
        services,
        faults,
        history: &history,
        load: &load,
        load_time,
        setup_failures,
    })
    .await;
    watcher.abort();
    report
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_generator_repeats_for_a_seed_and_spreads_evenly() {
        let mut a = Rng::new(42).fork(2);
        let mut b = Rng::new(42).fork(2);
        assert_eq!(a.next_u64(), b.next_u64());
        let mut heads = 0;
        for _ in 0..10_000 {
            if a.chance(0.5) {
                heads += 1;
            }
            let d = a.between(Duration::from_millis(300), Duration::from_millis(3000));
            assert!((300..=3000).contains(&d.as_millis()));
            assert!(a.below(3) < 3);
        }
        assert!((4_500..5_500).contains(&heads), "{heads} of 10,000");
    }
}
