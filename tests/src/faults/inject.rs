//! The private stack, the service processes and the fault injector.
//!
//! - [`Stack`]: PostgreSQL and NATS of the suite's own, started with
//!   `scripts/stack.sh` in `target/nrm-faultenv`; NATS is SIGKILLed through its
//!   pid file and started again with `stack.sh up` (which reuses its data),
//!   PostgreSQL is stopped with `pg_ctl -m immediate` as the user that owns
//!   its data folder and started again the same way.
//! - [`Services`]: the three service binaries as processes on fixed ports
//!   (so clients reconnect to the same address), their logs in
//!   `target/nrm-faultenv/logs`. A watcher restarts a process that exited by
//!   itself, and counts a SIGABRT as a relay abort (the crash window between
//!   JetStream's acknowledgement and the outbox delete).
//! - [`inject`]: the injector task: at seeded random moments one fault.

use std::collections::BTreeMap;
use std::os::unix::fs::MetadataExt as _;
use std::os::unix::process::ExitStatusExt as _;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex as StdMutex};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use base64::Engine as _;
use tokio::io::{AsyncBufReadExt as _, AsyncWriteExt as _};
use tokio::process::{Child, Command};
use tokio::sync::Mutex;
use tokio_util::sync::CancellationToken;

use super::{Plan, Rng};

/// How long one `stack.sh` call may take.
const SCRIPT_TIMEOUT: Duration = Duration::from_secs(180);
/// How long a service may take to say that it listens.
const START_TIMEOUT: Duration = Duration::from_secs(45);
/// How long a service keeps failing to start before the suite gives up.
const START_GIVE_UP: Duration = Duration::from_secs(120);
/// How long the de-duplication probe keeps a relay off (JetStream's window is 120 s).
const DEDUPE_PROBE: Duration = Duration::from_secs(130);

/// The suite's own PostgreSQL and NATS.
#[derive(Debug)]
pub(crate) struct Stack {
    dir: PathBuf,
    script: PathBuf,
    /// `postgres://nrm@127.0.0.1:port` (no database).
    pub(crate) database_url: String,
    /// `nats://127.0.0.1:port`.
    pub(crate) nats_url: String,
}

impl Stack {
    /// Deletes whatever an earlier run left in `dir` and starts both servers.
    pub(crate) async fn fresh(dir: PathBuf) -> anyhow::Result<Self> {
        let script = crate::workspace_root().join("scripts").join("stack.sh");
        let mut stack = Self {
            dir,
            script,
            database_url: String::new(),
            nats_url: String::new(),
        };
        stack.script("reset").await?;
        stack.script("up").await?;
        let (database_url, nats_url) = stack.read_env()?;
        stack.database_url = database_url;
        stack.nats_url = nats_url;
        Ok(stack)
    }

    async fn script(&self, command: &str) -> anyhow::Result<()> {
        let mut cmd = Command::new("bash");
        cmd.arg(&self.script)
            .arg(command)
            .arg(&self.dir)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        if std::env::var_os("NRM_STACK_PG_FALLBACK_ROOT").is_none() {
            // As root PostgreSQL runs as `postgres`, which may not reach the clone (scripts/test.sh does the same).
            cmd.env("NRM_STACK_PG_FALLBACK_ROOT", "/tmp");
        }
        let output = tokio::time::timeout(SCRIPT_TIMEOUT, cmd.output())
            .await
            .with_context(|| format!("scripts/stack.sh {command} took more than {SCRIPT_TIMEOUT:?}"))?
            .with_context(|| format!("running scripts/stack.sh {command}"))?;
        if !output.status.success() {
            let stderr = String::from_utf8_lossy(&output.stderr);
            let tail: Vec<&str> = stderr.lines().rev().take(15).collect();
            bail!(
                "scripts/stack.sh {command} {} failed ({}):\n{}",
                self.dir.display(),
                output.status,
                tail.into_iter().rev().collect::<Vec<_>>().join("\n")
            );
        }
        Ok(())
    }

    fn read_env(&self) -> anyhow::Result<(String, String)> {
        let text = std::fs::read_to_string(self.dir.join("stack.env")).context("reading stack.env")?;
        let get = |key: &str| {
            text.lines()
                .find_map(|l| l.strip_prefix(&format!("{key}=")))
                .map(|v| v.trim_matches('"').to_owned())
                .with_context(|| format!("{key} missing from stack.env"))
        };
        Ok((get("NRM_STACK_DATABASE_URL")?, get("NRM_STACK_NATS_URL")?))
    }

    /// Starts whatever of the two is down, on the same ports as before.
    pub(crate) async fn up(&self) -> anyhow::Result<()> {
        self.script("up").await?;
        let (database_url, nats_url) = self.read_env()?;
        if database_url != self.database_url || nats_url != self.nats_url {
            bail!(
                "the stack came back on other ports ({database_url}, {nats_url} instead of {}, {}): \
                 something took a port while a server was down",
                self.database_url,
                self.nats_url
            );
        }
        Ok(())
    }

    /// Stops both servers and keeps the data.
    pub(crate) async fn down(&self) -> anyhow::Result<()> {
        self.script("down").await
    }

    /// Stops both servers and deletes the folder.
    pub(crate) async fn reset(&self) -> anyhow::Result<()> {
        self.script("reset").await
    }

    fn nats_pid(&self) -> Option<u32> {
        std::fs::read_to_string(self.dir.join("nats.pid"))
            .ok()?
            .trim()
            .parse()
            .ok()
    }

    /// True while the NATS server's process lives and its port takes connections.
    pub(crate) async fn nats_up(&self) -> bool {
        let alive = self.nats_pid().is_some_and(alive);
        let addr = self.nats_url.trim_start_matches("nats://").to_owned();
        alive
            && tokio::time::timeout(Duration::from_secs(1), tokio::net::TcpStream::connect(addr))
                .await
                .is_ok_and(|c| c.is_ok())
    }

    /// SIGKILLs the NATS server and waits until it is gone.
    pub(crate) async fn kill_nats(&self) -> anyhow::Result<u32> {
        let pid = self.nats_pid().context("no NATS pid file")?;
        signal(pid, "KILL").await?;
        wait_gone(pid).await?;
        Ok(pid)
    }

    /// Stops PostgreSQL in immediate mode (no checkpoint: crash recovery at
    /// the next start), as the user that owns its data folder.
    pub(crate) async fn stop_postgres_immediately(&self) -> anyhow::Result<()> {
        let pgdata = std::fs::canonicalize(self.dir.join("pgdata")).context("the stack's pgdata")?;
        let version = std::fs::read_to_string(pgdata.join("PG_VERSION")).context("PG_VERSION")?;
        let bin = PathBuf::from(format!("/usr/lib/postgresql/{}/bin/pg_ctl", version.trim()));
        let pg_ctl = if bin.exists() { bin } else { PathBuf::from("pg_ctl") };
        let owner = std::fs::metadata(&pgdata)?.uid();
        let mut cmd = if owner == current_uid() {
            Command::new(&pg_ctl)
        } else {
            let user = user_name(owner).with_context(|| format!("no user name for uid {owner}"))?;
            let mut c = Command::new("runuser");
            c.args(["-u", &user, "--"]).arg(&pg_ctl);
            c
        };
        cmd.arg("-D")
            .arg(&pgdata)
            .args(["-m", "immediate", "-w", "-t", "60", "stop"])
            .current_dir("/")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        let output = tokio::time::timeout(Duration::from_secs(90), cmd.output())
            .await
            .context("pg_ctl stop -m immediate took more than 90 s")??;
        if !output.status.success() {
            bail!(
                "pg_ctl stop -m immediate failed: {}",
                String::from_utf8_lossy(&output.stderr).trim()
            );
        }
        Ok(())
    }
}

fn current_uid() -> u32 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Uid:"))
                .and_then(|rest| rest.split_whitespace().next().and_then(|u| u.parse().ok()))
        })
        .unwrap_or(u32::MAX)
}

fn user_name(uid: u32) -> Option<String> {
    std::fs::read_to_string("/etc/passwd").ok()?.lines().find_map(|line| {
        let mut fields = line.split(':');
        let name = fields.next()?;
        let _password = fields.next()?;
        (fields.next()?.parse::<u32>().ok()? == uid).then(|| name.to_owned())
    })
}

/// True when `pid` exists and is not a zombie.
fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
        stat.rsplit_once(") ")
            .and_then(|(_, rest)| rest.chars().next())
            .is_some_and(|state| state != 'Z')
    })
}

async fn signal(pid: u32, name: &str) -> anyhow::Result<()> {
    let status = Command::new("kill")
        .arg(format!("-{name}"))
        .arg(pid.to_string())
        .status()
        .await?;
    if !status.success() && alive(pid) {
        bail!("kill -{name} {pid} failed");
    }
    Ok(())
}

async fn wait_gone(pid: u32) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(20);
    while alive(pid) {
        if Instant::now() > deadline {
            bail!("process {pid} still alive 20 s after SIGKILL");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(())
}

/// The three services under test.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(crate) enum Service {
    Identification,
    Referral,
    Shelter,
}

impl Service {
    pub(crate) const ALL: [Service; 3] = [Service::Identification, Service::Referral, Service::Shelter];

    /// Binary, database and context name.
    pub(crate) fn name(self) -> &'static str {
        match self {
            Service::Identification => "identification",
            Service::Referral => "referral",
            Service::Shelter => "shelter",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// The kinds of fault.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(crate) enum FaultKind {
    Kill(Service),
    KillNats,
    /// A service SIGKILLed while NATS is down, and started again before NATS is back.
    KillWithoutNats(Service),
    RestartPostgres,
    /// A service process aborted by itself (SIGABRT): the relay's crash window.
    RelayAbort,
}

impl FaultKind {
    pub(crate) const ALL: [FaultKind; 9] = [
        FaultKind::Kill(Service::Identification),
        FaultKind::Kill(Service::Referral),
        FaultKind::Kill(Service::Shelter),
        FaultKind::KillNats,
        FaultKind::KillWithoutNats(Service::Identification),
        FaultKind::KillWithoutNats(Service::Referral),
        FaultKind::KillWithoutNats(Service::Shelter),
        FaultKind::RestartPostgres,
        FaultKind::RelayAbort,
    ];

    /// The kinds the injector causes (a relay abort happens by itself; a
    /// kill while NATS is down is counted with that NATS kill).
    fn injected(self) -> bool {
        matches!(
            self,
            FaultKind::Kill(_) | FaultKind::KillNats | FaultKind::RestartPostgres
        )
    }

    pub(crate) fn label(self) -> String {
        match self {
            FaultKind::Kill(s) => format!("SIGKILL {}", s.name()),
            FaultKind::KillNats => "SIGKILL nats-server".into(),
            FaultKind::KillWithoutNats(s) => format!("  and then SIGKILL {}", s.name()),
            FaultKind::RestartPostgres => "PostgreSQL immediate restart".into(),
            FaultKind::RelayAbort => "relay abort after ack (SIGABRT)".into(),
        }
    }
}

/// One fault, when it happened.
#[derive(Debug, Clone)]
pub(crate) struct FaultRecord {
    pub(crate) kind: FaultKind,
    pub(crate) at: Duration,
    pub(crate) note: String,
}

/// Every fault, and what else the processes did that they should not have.
#[derive(Debug)]
pub(crate) struct FaultLog {
    started: Instant,
    records: StdMutex<Vec<FaultRecord>>,
    /// Exits that were neither ours nor a relay abort.
    exits: StdMutex<Vec<String>>,
    /// Starts that failed (and were tried again).
    start_failures: StdMutex<Vec<String>>,
    /// Promises the injector saw broken (a service that cannot start while NATS is down).
    broken: StdMutex<Vec<String>>,
    injected: AtomicU64,
}

impl FaultLog {
    pub(crate) fn new() -> Self {
        Self {
            started: Instant::now(),
            records: StdMutex::new(Vec::new()),
            exits: StdMutex::new(Vec::new()),
            start_failures: StdMutex::new(Vec::new()),
            broken: StdMutex::new(Vec::new()),
            injected: AtomicU64::new(0),
        }
    }

    fn record(&self, kind: FaultKind, note: String) {
        if kind.injected() {
            self.injected.fetch_add(1, Ordering::Relaxed);
        }
        let at = self.started.elapsed();
        println!(
            "fault suite: {:>6.1} s  fault: {} {note}",
            at.as_secs_f64(),
            kind.label()
        );
        if let Ok(mut records) = self.records.lock() {
            records.push(FaultRecord { kind, at, note });
        }
    }

    /// A process exited when nobody asked it to (and not by the relay's abort).
    fn exit(&self, text: String) {
        println!(
            "fault suite: {:>6.1} s  unexpected exit: {text}",
            self.started.elapsed().as_secs_f64()
        );
        if let Ok(mut exits) = self.exits.lock() {
            exits.push(text);
        }
    }

    /// A start failed; it is tried again.
    fn start_failure(&self, text: String) {
        println!(
            "fault suite: {:>6.1} s  start failed: {text}",
            self.started.elapsed().as_secs_f64()
        );
        if let Ok(mut failures) = self.start_failures.lock() {
            failures.push(text);
        }
    }

    /// Faults the injector caused (relay aborts not counted).
    pub(crate) fn injected(&self) -> u64 {
        self.injected.load(Ordering::Relaxed)
    }

    pub(crate) fn count(&self, kind: FaultKind) -> usize {
        self.records
            .lock()
            .map(|r| r.iter().filter(|f| f.kind == kind).count())
            .unwrap_or(0)
    }

    pub(crate) fn records(&self) -> Vec<FaultRecord> {
        self.records.lock().map(|r| r.clone()).unwrap_or_default()
    }

    pub(crate) fn exits(&self) -> Vec<String> {
        self.exits.lock().map(|a| a.clone()).unwrap_or_default()
    }

    fn broke(&self, text: String) {
        println!(
            "fault suite: {:>6.1} s  promise broken: {text}",
            self.started.elapsed().as_secs_f64()
        );
        if let Ok(mut broken) = self.broken.lock() {
            broken.push(text);
        }
    }

    pub(crate) fn broken(&self) -> Vec<String> {
        self.broken.lock().map(|a| a.clone()).unwrap_or_default()
    }

    pub(crate) fn start_failures(&self) -> Vec<String> {
        self.start_failures.lock().map(|a| a.clone()).unwrap_or_default()
    }
}

/// One running service process.
#[derive(Debug)]
struct Running {
    child: Child,
    pid: u32,
}

/// One service: its port, its settings and (while it runs) its process.
#[derive(Debug)]
struct Slot {
    service: Service,
    port: u16,
    env: Vec<(String, String)>,
    running: Mutex<Option<Running>>,
    starts: AtomicU32,
}

/// The service processes.
#[derive(Debug)]
pub(crate) struct Services {
    stack: Arc<Stack>,
    faults: Arc<FaultLog>,
    logs: PathBuf,
    slots: [Arc<Slot>; 3],
    /// `NRM_RELAY__FAULT_ABORT_AFTER_ACK` of the next starts.
    abort_after_ack: StdMutex<f64>,
    /// Whether the next relay abort keeps that service's relay off for longer
    /// than JetStream's de-duplication window.
    dedupe_probe: AtomicBool,
    /// The service whose relay is kept off, and until when.
    relay_off: StdMutex<Option<(Service, Instant)>>,
    /// Set when the faults are over: no delayed restart any more.
    faults_over: AtomicBool,
    /// Subject prefix (`NRM_NATS__SUBJECT_PREFIX`) of every service.
    pub(crate) subject_prefix: String,
    /// Stream prefix (`NRM_NATS__STREAM_PREFIX`) of every service.
    pub(crate) stream_prefix: String,
    /// The binaries of this run, copied once: a build that replaces
    /// `target/debug/<service>` meanwhile does not change what restarts run.
    binaries: [PathBuf; 3],
}

/// Ends the service processes an earlier run left running from `bin` (a
/// run killed before it could stop them): on this run's PostgreSQL and
/// NATS they would load the machine and answer the injector's faults, and
/// this run's findings would not be its own.
fn end_leftovers(bin: &std::path::Path) {
    let Ok(bin) = std::fs::canonicalize(bin) else {
        return;
    };
    let Ok(processes) = std::fs::read_dir("/proc") else {
        return;
    };
    for process in processes.flatten() {
        let Ok(pid) = process.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(exe) = std::fs::read_link(process.path().join("exe")) else {
            continue;
        };
        if exe.starts_with(&bin) {
            eprintln!(
                "fault suite: ending {} (pid {pid}), left running by an earlier run",
                exe.display()
            );
            let _ = std::process::Command::new("kill")
                .args(["-KILL", &pid.to_string()])
                .status();
        }
    }
}

/// A port nobody listens on now.
fn free_port() -> anyhow::Result<u16> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    Ok(listener.local_addr()?.port())
}

impl Services {
    /// The three services on the stack, none started yet.
    pub(crate) fn new(stack: Arc<Stack>, faults: Arc<FaultLog>, logs: PathBuf) -> anyhow::Result<Self> {
        std::fs::create_dir_all(&logs)?;
        let bin = logs.with_file_name("bin");
        std::fs::create_dir_all(&bin)?;
        end_leftovers(&bin);
        let copy = |service: Service| -> anyhow::Result<PathBuf> {
            let to = bin.join(service.name());
            std::fs::copy(crate::binary(service.name()), &to)
                .with_context(|| format!("copying the {} binary", service.name()))?;
            Ok(to)
        };
        let binaries = [
            copy(Service::Identification)?,
            copy(Service::Referral)?,
            copy(Service::Shelter)?,
        ];
        let id = crate::unique();
        let subject_prefix = format!("f{id}");
        let stream_prefix = format!("F{}", id.to_ascii_uppercase());
        let key = |b: u8| base64::engine::general_purpose::STANDARD.encode([b; 32]);
        let slot = |service: Service| -> anyhow::Result<Arc<Slot>> {
            let port = free_port()?;
            let mut env: Vec<(String, String)> = [
                ("NRM_GRPC_ADDR", format!("127.0.0.1:{port}")),
                ("NRM_METRICS_ADDR", "127.0.0.1:0".into()),
                ("NRM_DATABASE__URL", stack.database_url.clone()),
                ("NRM_DATABASE__NAME", service.name().into()),
                ("NRM_DATABASE__MAX_CONNECTIONS", "10".into()),
                ("NRM_NATS__URL", stack.nats_url.clone()),
                ("NRM_NATS__SUBJECT_PREFIX", subject_prefix.clone()),
                ("NRM_NATS__STREAM_PREFIX", stream_prefix.clone()),
                ("NRM_AUTH__JWKS", crate::jwks_url()),
                ("NRM_SEALING__MASTER_KEY", key(7)),
                ("NRM_SEALING__MATCH_KEY", key(9)),
                ("NRM_TELEMETRY__LOG", "info".into()),
                ("NRM_TELEMETRY__LOG_FORMAT", "json".into()),
            ]
            .into_iter()
            .map(|(k, v)| (k.to_owned(), v))
            .collect();
            match service {
                Service::Referral => {
                    // Unanswered urgent referrals are escalated during the run.
                    env.push(("NRM_REFERRAL__URGENT_DEADLINE_SECONDS".into(), "4".into()));
                    env.push(("NRM_REFERRAL__TIMER_POLL_MS".into(), "200".into()));
                }
                Service::Shelter => env.push(("NRM_SHELTER__TIMER_POLL_MS".into(), "200".into())),
                Service::Identification => {}
            }
            Ok(Arc::new(Slot {
                service,
                port,
                env,
                running: Mutex::new(None),
                starts: AtomicU32::new(0),
            }))
        };
        Ok(Self {
            slots: [
                slot(Service::Identification)?,
                slot(Service::Referral)?,
                slot(Service::Shelter)?,
            ],
            stack,
            faults,
            logs,
            abort_after_ack: StdMutex::new(0.0),
            dedupe_probe: AtomicBool::new(false),
            relay_off: StdMutex::new(None),
            faults_over: AtomicBool::new(false),
            subject_prefix,
            stream_prefix,
            binaries,
        })
    }

    fn slot(&self, service: Service) -> &Arc<Slot> {
        &self.slots[service.index()]
    }

    /// `http://127.0.0.1:port` of a service (the same across restarts).
    pub(crate) fn endpoint(&self, service: Service) -> String {
        format!("http://127.0.0.1:{}", self.slot(service).port)
    }

    /// The relay-abort probability of the processes started from now on.
    pub(crate) fn set_abort_after_ack(&self, p: f64) {
        if let Ok(mut current) = self.abort_after_ack.lock() {
            *current = p;
        }
    }

    /// Makes the next relay abort keep that service's relay off for
    /// [`DEDUPE_PROBE`] (longer than JetStream's 120 s de-duplication
    /// window): the commits it had published before it aborted are then
    /// sent again when no de-duplication covers them, and the relay must see
    /// on the stream that they are there.
    pub(crate) fn arm_dedupe_probe(&self) {
        self.dedupe_probe.store(true, Ordering::SeqCst);
    }

    /// The faults are over: every process from now on runs with its relay on,
    /// and no delayed restart comes any more.
    pub(crate) fn faults_over(&self) {
        self.faults_over.store(true, Ordering::SeqCst);
        if let Ok(mut off) = self.relay_off.lock() {
            *off = None;
        }
    }

    fn relay_off(&self, service: Service) -> bool {
        self.relay_off
            .lock()
            .ok()
            .and_then(|off| *off)
            .is_some_and(|(s, until)| s == service && Instant::now() < until)
    }

    /// Waits until a service can be started: at once, as the services start
    /// while NATS is down (the kernel's promise, which the injector's kills
    /// during a NATS outage hold it to). `NRM_FAULTS_WAIT_FOR_NATS=1` waits for
    /// NATS first, for a kernel that cannot.
    async fn wait_until_startable(&self) -> anyhow::Result<()> {
        if !std::env::var("NRM_FAULTS_WAIT_FOR_NATS").is_ok_and(|v| v == "1") {
            return Ok(());
        }
        let deadline = Instant::now() + Duration::from_secs(180);
        while !self.stack.nats_up().await {
            if Instant::now() > deadline {
                bail!("NATS did not come back within 180 s");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Ok(())
    }

    /// Starts a service that is not running and waits until it listens.
    pub(crate) async fn start(&self, service: Service) -> anyhow::Result<()> {
        let slot = self.slot(service).clone();
        let mut running = slot.running.lock().await;
        if running.is_none() {
            *running = Some(self.spawn_until_listening(&slot).await?);
        }
        Ok(())
    }

    /// Spawns the process, again and again while it fails to start, until it listens.
    async fn spawn_until_listening(&self, slot: &Slot) -> anyhow::Result<Running> {
        let give_up = Instant::now() + START_GIVE_UP;
        loop {
            self.wait_until_startable().await?;
            match self.spawn(slot).await {
                Ok(running) => return Ok(running),
                Err(err) => {
                    self.faults.start_failure(format!("{}: {err:#}", slot.service.name()));
                    if Instant::now() > give_up {
                        bail!(
                            "{} did not start within {START_GIVE_UP:?}: {err:#}",
                            slot.service.name()
                        );
                    }
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
            }
        }
    }

    async fn spawn(&self, slot: &Slot) -> anyhow::Result<Running> {
        let name = slot.service.name();
        let n = slot.starts.fetch_add(1, Ordering::Relaxed) + 1;
        let log_path = self.logs.join(format!("{name}-{n:03}.log"));
        let stderr = std::fs::File::create(&log_path)?;
        let abort = self.abort_after_ack.lock().map(|p| *p).unwrap_or(0.0);
        let mut cmd = Command::new(&self.binaries[slot.service.index()]);
        for (key, _) in std::env::vars_os() {
            // Nothing of the caller's NRM_* environment reaches the service.
            if key.to_string_lossy().starts_with("NRM_") {
                cmd.env_remove(&key);
            }
        }
        if self.relay_off(slot.service) {
            cmd.env("NRM_RELAY__ENABLED", "false");
        }
        cmd.envs(slot.env.iter().cloned())
            .env("NRM_RELAY__FAULT_ABORT_AFTER_ACK", abort.to_string())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::from(stderr))
            .kill_on_drop(true);
        let mut child = cmd.spawn().with_context(|| format!("spawning {name}"))?;
        let pid = child.id().context("no pid")?;
        let stdout = child.stdout.take().context("no stdout")?;
        let (tx, mut rx) = tokio::sync::oneshot::channel();
        let marker = format!("{name} service listening");
        let log_path2 = log_path.clone();
        tokio::spawn(async move {
            let mut out = tokio::fs::OpenOptions::new().append(true).open(&log_path2).await.ok();
            let mut lines = tokio::io::BufReader::new(stdout).lines();
            let mut tx = Some(tx);
            // Keep reading so that the child never blocks on a full pipe.
            while let Ok(Some(line)) = lines.next_line().await {
                if line.contains(&marker)
                    && let Some(tx) = tx.take()
                {
                    let _ = tx.send(());
                }
                if let Some(f) = out.as_mut() {
                    let _ = f.write_all(line.as_bytes()).await;
                    let _ = f.write_all(b"\n").await;
                }
            }
        });
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            match rx.try_recv() {
                Ok(()) => return Ok(Running { child, pid }),
                Err(tokio::sync::oneshot::error::TryRecvError::Closed) => {
                    let status = child.wait().await?;
                    bail!("exited ({status}) before listening; log {}", log_path.display());
                }
                Err(tokio::sync::oneshot::error::TryRecvError::Empty) => {}
            }
            if let Some(status) = child.try_wait()? {
                // The last lines may still be on their way to the log.
                tokio::time::sleep(Duration::from_millis(50)).await;
                if rx.try_recv().is_ok() {
                    bail!("exited ({status}) right after it listened; log {}", log_path.display());
                }
                bail!("exited ({status}) before listening; log {}", log_path.display());
            }
            if Instant::now() > deadline {
                let _ = child.start_kill();
                let _ = child.wait().await;
                bail!("did not listen within {START_TIMEOUT:?}; log {}", log_path.display());
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// SIGKILLs a service, records the fault as `kind`, and starts it again.
    pub(crate) async fn kill(&self, service: Service, kind: FaultKind) -> anyhow::Result<()> {
        let slot = self.slot(service).clone();
        let mut running = slot.running.lock().await;
        if let Some(mut r) = running.take() {
            let _ = r.child.start_kill();
            let _ = r.child.wait().await;
            self.faults.record(kind, format!("(pid {})", r.pid));
        }
        *running = Some(self.spawn_until_listening(&slot).await?);
        Ok(())
    }

    /// Stops a service gracefully (SIGTERM; SIGKILL after 20 s); it stays down.
    pub(crate) async fn stop(&self, service: Service) -> anyhow::Result<()> {
        let slot = self.slot(service).clone();
        let mut running = slot.running.lock().await;
        if let Some(mut r) = running.take() {
            signal(r.pid, "TERM").await?;
            match tokio::time::timeout(Duration::from_secs(20), r.child.wait()).await {
                Ok(status) => {
                    let status = status?;
                    if !status.success() {
                        self.faults.exit(format!(
                            "{} exited with {status} on SIGTERM (a graceful stop should exit 0)",
                            service.name()
                        ));
                    }
                }
                Err(_) => {
                    self.faults
                        .exit(format!("{} did not stop within 20 s of SIGTERM", service.name()));
                    let _ = r.child.start_kill();
                    let _ = r.child.wait().await;
                }
            }
        }
        Ok(())
    }

    /// Stops a service gracefully and starts it again with the current settings.
    pub(crate) async fn restart_clean(&self, service: Service) -> anyhow::Result<()> {
        self.stop(service).await?;
        self.start(service).await
    }

    /// Restarts every service that exits by itself; a SIGABRT is the relay's
    /// fault injection, anything else an anomaly.
    pub(crate) fn watch(self: Arc<Self>) -> tokio::task::JoinHandle<()> {
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_millis(100)).await;
                for service in Service::ALL {
                    let slot = self.slot(service).clone();
                    let Ok(mut running) = slot.running.try_lock() else {
                        continue;
                    };
                    let exited = match running.as_mut().map(|r| r.child.try_wait()) {
                        Some(Ok(Some(status))) => Some(status),
                        _ => None,
                    };
                    let Some(status) = exited else {
                        continue;
                    };
                    let pid = running.take().map_or(0, |r| r.pid);
                    if status.signal() == Some(6) {
                        // Not identification's relay: with it off no case reaches the
                        // referral service, and the load would stand still.
                        let probe = service != Service::Identification
                            && !self.faults_over.load(Ordering::SeqCst)
                            && self.dedupe_probe.swap(false, Ordering::SeqCst);
                        let note = if probe {
                            if let Ok(mut off) = self.relay_off.lock() {
                                *off = Some((service, Instant::now() + DEDUPE_PROBE));
                            }
                            let me = self.clone();
                            tokio::spawn(async move {
                                tokio::time::sleep(DEDUPE_PROBE).await;
                                if !me.faults_over.load(Ordering::SeqCst)
                                    && let Err(err) = me.restart_clean(service).await
                                {
                                    me.faults
                                        .exit(format!("{} not restarted with its relay on: {err:#}", service.name()));
                                }
                            });
                            format!(
                                " (restarted with its relay off for {} s: past the de-duplication window)",
                                DEDUPE_PROBE.as_secs()
                            )
                        } else {
                            String::new()
                        };
                        self.faults
                            .record(FaultKind::RelayAbort, format!("{} (pid {pid}){note}", service.name()));
                    } else {
                        self.faults
                            .exit(format!("{} (pid {pid}) exited by itself: {status}", service.name()));
                    }
                    match self.spawn_until_listening(&slot).await {
                        Ok(r) => *running = Some(r),
                        Err(err) => self.faults.exit(format!("{} not restarted: {err:#}", service.name())),
                    }
                }
            }
        })
    }

    /// Kills every process (the end of a run).
    pub(crate) async fn shutdown(&self) {
        for service in Service::ALL {
            let slot = self.slot(service).clone();
            let mut running = slot.running.lock().await;
            if let Some(mut r) = running.take() {
                let _ = r.child.start_kill();
                let _ = r.child.wait().await;
            }
        }
    }

    /// Starts counted per service (the first start included).
    pub(crate) fn starts(&self) -> BTreeMap<Service, u32> {
        Service::ALL
            .into_iter()
            .map(|s| (s, self.slot(s).starts.load(Ordering::Relaxed)))
            .collect()
    }
}

/// What the injector does next.
#[derive(Debug, Clone, Copy)]
enum Pick {
    Kill(Service),
    Nats,
    /// NATS down, and meanwhile a service SIGKILLed and started again.
    NatsAndKill,
    Postgres,
}

/// Injects faults at seeded random moments until `stop`.
///
/// # Errors
/// When a server cannot be brought back.
pub(crate) async fn inject(
    services: Arc<Services>,
    stack: Arc<Stack>,
    plan: Plan,
    mut rng: Rng,
    stop: CancellationToken,
) -> anyhow::Result<()> {
    // The first six faults are one of each kind, in a random order.
    let mut first = vec![
        Pick::Kill(Service::Identification),
        Pick::Kill(Service::Referral),
        Pick::Kill(Service::Shelter),
        Pick::Nats,
        Pick::NatsAndKill,
        Pick::Postgres,
    ];
    for i in (1..first.len()).rev() {
        let j = usize::try_from(rng.below(i as u64 + 1)).unwrap_or(0);
        first.swap(i, j);
    }
    let weights = [
        (Pick::Kill(Service::Identification), 2),
        (Pick::Kill(Service::Referral), 3),
        (Pick::Kill(Service::Shelter), 3),
        (Pick::Nats, 2),
        (Pick::NatsAndKill, 1),
        (Pick::Postgres, 2),
    ];
    loop {
        let gap = rng.between(plan.fault_gap.0, plan.fault_gap.1);
        tokio::select! {
            () = stop.cancelled() => return Ok(()),
            () = tokio::time::sleep(gap) => {}
        }
        let pick = first.pop().unwrap_or_else(|| *rng.weighted(&weights));
        match pick {
            Pick::Kill(service) => services.kill(service, FaultKind::Kill(service)).await?,
            Pick::Nats | Pick::NatsAndKill => {
                let pid = stack.kill_nats().await?;
                let down = rng.between(Duration::from_millis(300), Duration::from_millis(3000));
                services.faults.record(
                    FaultKind::KillNats,
                    format!("(pid {pid}, down {} ms)", down.as_millis()),
                );
                let outage = Instant::now();
                if let Pick::NatsAndKill = pick {
                    let service = Service::ALL[usize::try_from(rng.below(3)).unwrap_or(0)];
                    kill_without_nats(&services, service).await;
                }
                tokio::time::sleep(down.saturating_sub(outage.elapsed())).await;
                stack.up().await?;
            }
            Pick::Postgres => {
                stack.stop_postgres_immediately().await?;
                let down = rng.between(Duration::from_millis(0), Duration::from_millis(1500));
                services
                    .faults
                    .record(FaultKind::RestartPostgres, format!("(down {} ms)", down.as_millis()));
                tokio::time::sleep(down).await;
                stack.up().await?;
            }
        }
    }
}

/// While NATS is down: SIGKILL a service and start it again, which must
/// succeed before NATS is back (the services start without NATS).
async fn kill_without_nats(services: &Arc<Services>, service: Service) {
    let restart = {
        let services = services.clone();
        tokio::spawn(async move { services.kill(service, FaultKind::KillWithoutNats(service)).await })
    };
    match tokio::time::timeout(Duration::from_secs(20), restart).await {
        Ok(Ok(Ok(()))) => {}
        Ok(Ok(Err(err))) => services.faults.broke(format!(
            "{} did not start again while NATS was down: {err:#}",
            service.name()
        )),
        Ok(Err(err)) => services
            .faults
            .broke(format!("restarting {} panicked: {err}", service.name())),
        Err(_) => services.faults.broke(format!(
            "{} did not start within 20 s while NATS was down (it does once NATS is back)",
            service.name()
        )),
    }
}
