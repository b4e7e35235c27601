//! Latency histograms and CPU accounting shared by every measurement.
//!
//! Latencies are kept in microseconds in an HDR histogram (3 significant
//! digits). CPU time comes from `/proc`: the whole machine's busy time from
//! `/proc/stat`, this process's own time and that of its waited-for children
//! (pgbench) from `/proc/self/stat`, so a run can say how much CPU one
//! operation costs on the client side and on the server side.

use std::time::Duration;

use hdrhistogram::Histogram;

/// A latency histogram in microseconds, 1 µs to 60 s.
///
/// # Errors
/// Never with these bounds; kept as a `Result` for the constructor's sake.
pub fn new_histogram() -> anyhow::Result<Histogram<u64>> {
    Ok(Histogram::new_with_bounds(1, 60_000_000, 3)?)
}

/// Records one latency.
pub fn record(histogram: &mut Histogram<u64>, latency: Duration) {
    let micros = u64::try_from(latency.as_micros()).unwrap_or(u64::MAX).max(1);
    histogram.saturating_record(micros);
}

/// What one measured run produced.
#[derive(Debug, Clone, Default)]
pub struct RunResult {
    /// Operations (or transactions) completed in the measured window.
    pub ops: u64,
    /// Operations per second.
    pub ops_per_sec: f64,
    /// Median latency, µs.
    pub p50_us: u64,
    /// 99th percentile latency, µs.
    pub p99_us: u64,
    /// Operations that failed (they are not counted in `ops`).
    pub errors: u64,
    /// CPU spent per operation, if measured.
    pub cpu: Option<CpuPerOp>,
    /// The latencies, for merging runs.
    pub histogram: Option<Histogram<u64>>,
    /// The window the operations were counted over.
    pub window: Duration,
}

impl RunResult {
    /// A result from a histogram, a count and the window it was taken over.
    #[must_use]
    pub fn from_histogram(histogram: &Histogram<u64>, window: Duration, errors: u64) -> Self {
        let ops = histogram.len();
        let secs = window.as_secs_f64();
        Self {
            ops,
            ops_per_sec: if secs > 0.0 { ops as f64 / secs } else { 0.0 },
            p50_us: histogram.value_at_quantile(0.50),
            p99_us: histogram.value_at_quantile(0.99),
            errors,
            cpu: None,
            histogram: Some(histogram.clone()),
            window,
        }
    }

    /// Several runs of the same thing as one: latencies pooled, throughput
    /// over the summed windows, CPU per operation weighted by operations.
    ///
    /// # Errors
    /// When the histograms cannot be merged (they share bounds, so never).
    pub fn merge(parts: &[Self]) -> anyhow::Result<Self> {
        let mut histogram = new_histogram()?;
        let mut window = Duration::ZERO;
        let mut errors = 0;
        for part in parts {
            if let Some(h) = &part.histogram {
                histogram.add(h)?;
            }
            window += part.window;
            errors += part.errors;
        }
        let mut merged = Self::from_histogram(&histogram, window, errors);
        let measured: Vec<(&CpuPerOp, f64)> = parts
            .iter()
            .filter_map(|p| p.cpu.as_ref().map(|c| (c, p.ops as f64)))
            .collect();
        let weight: f64 = measured.iter().map(|(_, ops)| ops).sum();
        if weight > 0.0 {
            let mean = |f: fn(&CpuPerOp) -> f64| measured.iter().map(|(c, ops)| f(c) * ops).sum::<f64>() / weight;
            merged.cpu = Some(CpuPerOp {
                client_us: mean(|c| c.client_us),
                server_us: mean(|c| c.server_us),
                other_us: mean(|c| c.other_us),
                busy_share: mean(|c| c.busy_share),
            });
        }
        Ok(merged)
    }
}

/// CPU time per operation, µs.
#[derive(Debug, Clone, Copy, Default)]
pub struct CpuPerOp {
    /// Spent by the load generator (this process, or pgbench).
    pub client_us: f64,
    /// Spent by the PostgreSQL cluster under test (postmaster and its children).
    pub server_us: f64,
    /// Spent by everything else on the machine: ideally nothing; other work
    /// running beside the benchmark shows here and makes the run less trustworthy.
    pub other_us: f64,
    /// Share of all CPUs busy (with anything) while the run was sampled.
    pub busy_share: f64,
}

impl CpuPerOp {
    /// Share of all CPUs the other work took during a run of `ops_per_sec`.
    #[must_use]
    pub fn other_share(&self, ops_per_sec: f64, cpus: usize) -> f64 {
        if cpus == 0 {
            return 0.0;
        }
        self.other_us * ops_per_sec / 1e6 / cpus as f64
    }
}

/// The postmaster of the cluster under test, once known.
static POSTMASTER: std::sync::OnceLock<u32> = std::sync::OnceLock::new();

/// Tells the CPU accounting which PostgreSQL cluster is under test: the
/// parent of `backend_pid` (from `pg_backend_pid()`) is its postmaster.
pub fn set_server_backend(backend_pid: u32) {
    if let Some(parent) = proc_stat(backend_pid).map(|s| s.ppid) {
        let _ = POSTMASTER.set(parent);
    }
}

/// A snapshot of the CPU counters, in clock ticks.
#[derive(Debug, Clone, Copy, Default)]
pub struct CpuSample {
    /// Busy ticks of all CPUs (user, nice, system, irq, softirq, steal).
    machine_busy: u64,
    /// This process: user + system.
    own: u64,
    /// Waited-for children of this process: user + system.
    children: u64,
    /// The postmaster and its children, with the children it has reaped.
    server: u64,
    /// When it was taken.
    at: Option<std::time::Instant>,
}

/// Which process generated the load of a run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LoadGenerator {
    /// This process (the kernel's code, sqlx, tokio).
    ThisProcess,
    /// A child process that has been waited for (pgbench).
    Child,
}

impl CpuSample {
    /// Reads the counters now; zeros where `/proc` is not readable.
    #[must_use]
    pub fn now() -> Self {
        let own = proc_stat(std::process::id()).unwrap_or_default();
        Self {
            machine_busy: machine_busy_ticks().unwrap_or(0),
            own: own.utime + own.stime,
            children: own.cutime + own.cstime,
            server: POSTMASTER.get().map_or(0, |&pm| server_ticks(pm)),
            at: Some(std::time::Instant::now()),
        }
    }

    /// CPU per operation between `self` and `later`, for `ops` operations.
    #[must_use]
    pub fn per_op(&self, later: &Self, ops: u64, generator: LoadGenerator) -> Option<CpuPerOp> {
        if ops == 0 || later.machine_busy == 0 {
            return None;
        }
        let tick_us = 1_000_000.0 / clock_ticks_per_sec() as f64;
        let busy = later.machine_busy.saturating_sub(self.machine_busy) as f64 * tick_us;
        let client = match generator {
            LoadGenerator::ThisProcess => later.own.saturating_sub(self.own),
            LoadGenerator::Child => later.children.saturating_sub(self.children),
        } as f64
            * tick_us;
        let server = if later.server == 0 {
            // Unknown cluster: count the whole rest of the machine as the server.
            (busy - client).max(0.0)
        } else {
            later.server.saturating_sub(self.server) as f64 * tick_us
        };
        let wall = match (self.at, later.at) {
            (Some(a), Some(b)) => b.duration_since(a).as_secs_f64() * 1e6,
            _ => 0.0,
        };
        let cpus = std::thread::available_parallelism().map_or(1, usize::from) as f64;
        Some(CpuPerOp {
            client_us: client / ops as f64,
            server_us: server / ops as f64,
            other_us: (busy - client - server).max(0.0) / ops as f64,
            busy_share: if wall > 0.0 { busy / (wall * cpus) } else { 0.0 },
        })
    }
}

/// Waits, out of `budget`, until processes other than this one, its children
/// and the cluster under test use less than `threshold` of the CPUs over half
/// a second. Returns the share last seen when the budget ran out first.
pub async fn wait_for_quiet(budget: &mut Duration, threshold: f64) -> Option<f64> {
    let cpus = std::thread::available_parallelism().map_or(1, usize::from) as f64;
    let window = Duration::from_millis(500);
    let mut announced = false;
    loop {
        let before = CpuSample::now();
        tokio::time::sleep(window).await;
        let after = CpuSample::now();
        let ours =
            (after.own + after.children + after.server).saturating_sub(before.own + before.children + before.server);
        let other = after
            .machine_busy
            .saturating_sub(before.machine_busy)
            .saturating_sub(ours) as f64;
        let share = other / (cpus * window.as_secs_f64() * clock_ticks_per_sec() as f64);
        if share < threshold {
            return None;
        }
        if budget.is_zero() {
            return Some(share);
        }
        if !announced {
            eprintln!(
                "bench: other processes use {:.0}% of the CPUs: waiting up to {} s for quiet",
                share * 100.0,
                budget.as_secs()
            );
            announced = true;
        }
        *budget = budget.saturating_sub(window);
    }
}

/// The fields of `/proc/PID/stat` used here.
#[derive(Debug, Clone, Copy, Default)]
struct ProcStat {
    ppid: u32,
    utime: u64,
    stime: u64,
    cutime: u64,
    cstime: u64,
}

fn proc_stat(pid: u32) -> Option<ProcStat> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name (which may hold spaces) start at field 3.
    let rest = text.rsplit_once(')')?.1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // 1-based field numbers of the whole line: 4 ppid, 14 utime, 15 stime, 16 cutime, 17 cstime.
    let get = |n: usize| fields.get(n - 3).and_then(|f| f.parse::<u64>().ok()).unwrap_or(0);
    Some(ProcStat {
        ppid: u32::try_from(get(4)).unwrap_or(0),
        utime: get(14),
        stime: get(15),
        cutime: get(16),
        cstime: get(17),
    })
}

/// CPU ticks of a postmaster and its live children, including the children
/// it has reaped (their time moves into its `cutime`/`cstime` when they exit).
fn server_ticks(postmaster: u32) -> u64 {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return 0;
    };
    entries
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter_map(|pid| proc_stat(pid).map(|s| (pid, s)))
        .filter(|(pid, s)| *pid == postmaster || s.ppid == postmaster)
        .map(|(_, s)| s.utime + s.stime + s.cutime + s.cstime)
        .sum()
}

/// CPU time (user + system) of one process so far, µs; 0 when it cannot be read.
#[must_use]
pub fn process_cpu_us(pid: u32) -> f64 {
    proc_stat(pid).map_or(0.0, |s| (s.utime + s.stime) as f64 * 1e6 / clock_ticks_per_sec() as f64)
}

/// The process listening on TCP `port` (of this machine), found through
/// `/proc/net/tcp{,6}` and the processes' open sockets.
#[must_use]
pub fn listening_pid(port: u16) -> Option<u32> {
    let mut inodes = Vec::new();
    for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let Ok(text) = std::fs::read_to_string(table) else {
            continue;
        };
        for line in text.lines().skip(1) {
            let fields: Vec<&str> = line.split_whitespace().collect();
            // sl local_address rem_address st … inode (field 10); 0A = LISTEN.
            let (Some(local), Some(state), Some(inode)) = (fields.get(1), fields.get(3), fields.get(9)) else {
                continue;
            };
            let listening_port = local
                .rsplit_once(':')
                .and_then(|(_, p)| u16::from_str_radix(p, 16).ok());
            if *state == "0A" && listening_port == Some(port) {
                inodes.push(format!("socket:[{inode}]"));
            }
        }
    }
    if inodes.is_empty() {
        return None;
    }
    std::fs::read_dir("/proc")
        .ok()?
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .find(|pid| {
            std::fs::read_dir(format!("/proc/{pid}/fd")).is_ok_and(|fds| {
                fds.flatten().any(|fd| {
                    std::fs::read_link(fd.path())
                        .is_ok_and(|target| inodes.iter().any(|i| target.as_os_str() == i.as_str()))
                })
            })
        })
}

fn machine_busy_ticks() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/stat").ok()?;
    let line = text.lines().find(|l| l.starts_with("cpu "))?;
    let fields: Vec<u64> = line.split_whitespace().skip(1).filter_map(|f| f.parse().ok()).collect();
    // user nice system idle iowait irq softirq steal [guest guest_nice: already in user]
    let get = |i: usize| fields.get(i).copied().unwrap_or(0);
    Some(get(0) + get(1) + get(2) + get(5) + get(6) + get(7))
}

/// `getconf CLK_TCK`, 100 when it cannot be asked.
fn clock_ticks_per_sec() -> u64 {
    static TICKS: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    *TICKS.get_or_init(|| {
        std::process::Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|o| String::from_utf8(o.stdout).ok())
            .and_then(|s| s.trim().parse().ok())
            .filter(|t| *t > 0)
            .unwrap_or(100)
    })
}

/// Microseconds as milliseconds with two decimals.
#[must_use]
pub fn ms(us: u64) -> String {
    format!("{:.2}", us as f64 / 1000.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_histogram_reports_its_quantiles() {
        let mut h = new_histogram().unwrap();
        for i in 1..=100u64 {
            record(&mut h, Duration::from_micros(i * 10));
        }
        let r = RunResult::from_histogram(&h, Duration::from_secs(1), 0);
        assert_eq!(r.ops, 100);
        assert!((r.ops_per_sec - 100.0).abs() < 1e-9);
        assert_eq!(r.p50_us, 500);
        assert_eq!(r.p99_us, 990);
    }

    #[test]
    fn runs_merge_into_one() {
        let mut a = new_histogram().unwrap();
        let mut b = new_histogram().unwrap();
        for _ in 0..100 {
            record(&mut a, Duration::from_micros(100));
        }
        for _ in 0..300 {
            record(&mut b, Duration::from_micros(300));
        }
        let mut ra = RunResult::from_histogram(&a, Duration::from_secs(1), 1);
        ra.cpu = Some(CpuPerOp {
            client_us: 10.0,
            server_us: 100.0,
            other_us: 0.0,
            busy_share: 1.0,
        });
        let mut rb = RunResult::from_histogram(&b, Duration::from_secs(1), 0);
        rb.cpu = Some(CpuPerOp {
            client_us: 30.0,
            server_us: 100.0,
            other_us: 4.0,
            busy_share: 1.0,
        });
        let m = RunResult::merge(&[ra, rb]).unwrap();
        assert_eq!(m.ops, 400);
        assert_eq!(m.errors, 1);
        assert!((m.ops_per_sec - 200.0).abs() < 1e-9);
        assert_eq!(m.p50_us, 300);
        let cpu = m.cpu.unwrap();
        assert!((cpu.client_us - 25.0).abs() < 1e-9);
        assert!((cpu.other_us - 3.0).abs() < 1e-9);
    }

    #[test]
    fn cpu_counters_are_readable_on_linux() {
        let a = CpuSample::now();
        let mut x = 0u64;
        for i in 0..5_000_000u64 {
            x = x.wrapping_mul(31).wrapping_add(i);
        }
        assert_ne!(x, 1);
        let b = CpuSample::now();
        assert!(b.machine_busy >= a.machine_busy);
        assert!(a.per_op(&b, 1, LoadGenerator::ThisProcess).is_some());
    }
}
