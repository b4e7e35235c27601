//! Two countries' NATS servers joined by the cross-border leaf-node link, as
//! `deploy/federation/{ru,kg}.conf` describe them: `ru` (destination, the
//! hub, JetStream domain `ru`) and `kg` (home, a leaf node of `ru` over TLS,
//! domain `kg`). The templates are rendered into a folder of their own with
//! free loopback ports, a fresh link password, fresh TLS files and the
//! test's own stream and subject prefixes, and run with the project's
//! nats-server (`NRM_NATS_SERVER`, else `nats-server` on `PATH`, else
//! `/usr/sbin/nats-server`), 2.9.10 included. The link can be cut and
//! restored by stopping (or killing) kg's server and starting it again on
//! the same ports and data.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use nrm_kernel::settings::NatsSettings;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::process::{Child, Command};

/// How long a server may take to start, or the link to come up.
const START_TIMEOUT: Duration = Duration::from_secs(30);

/// Which of the two countries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    /// The destination country, the hub.
    Ru,
    /// The home country, the leaf.
    Kg,
}

impl Side {
    /// The country code (and JetStream domain).
    #[must_use]
    pub const fn code(self) -> &'static str {
        match self {
            Self::Ru => "ru",
            Self::Kg => "kg",
        }
    }
}

/// One country's server.
struct Server {
    side: Side,
    dir: PathBuf,
    conf: PathBuf,
    port: u16,
    http_port: u16,
    child: Option<Child>,
}

/// Two NATS servers joined by the link, in a temporary folder removed on drop.
pub struct Federation {
    root: PathBuf,
    /// The subject prefix of this federation's services (`t…`).
    pub subject_prefix: String,
    /// The stream prefix of this federation's services (`T…`).
    pub stream_prefix: String,
    /// The link user's password.
    pub link_password: String,
    /// ru's leaf-node port.
    pub leaf_port: u16,
    ru: Server,
    kg: Server,
}

impl Federation {
    /// Renders the configurations, makes the TLS files, starts both servers
    /// and waits until the link is up.
    ///
    /// # Panics
    /// When a server does not start or the link does not come up within 30 s.
    pub async fn start() -> Self {
        let id = crate::unique();
        let root = std::env::temp_dir().join(format!("nrm-federation-{id}"));
        let tls = root.join("tls");
        std::fs::create_dir_all(&tls).expect("create the federation folder");
        make_tls(&tls).await;
        let ports = free_ports(5);
        let mut federation = Self {
            subject_prefix: format!("t{id}"),
            stream_prefix: format!("T{}", id.to_ascii_uppercase()),
            link_password: crate::unique() + &crate::unique(),
            leaf_port: ports[4],
            ru: Server::new(Side::Ru, &root, ports[0], ports[1]),
            kg: Server::new(Side::Kg, &root, ports[2], ports[3]),
            root,
        };
        let sync = sync_interval_line().await;
        for side in [Side::Ru, Side::Kg] {
            let text = federation.render(side, &sync);
            let server = federation.server(side);
            std::fs::create_dir_all(&server.dir).expect("create a country's folder");
            std::fs::write(&server.conf, text).expect("write a configuration");
        }
        federation.start_server(Side::Ru).await;
        federation.start_server(Side::Kg).await;
        federation.wait_link().await;
        federation
    }

    /// The configuration of `side`, rendered from `deploy/federation`.
    fn render(&self, side: Side, sync: &str) -> String {
        let template = crate::workspace_root()
            .join("deploy/federation")
            .join(format!("{}.conf", side.code()));
        let text = std::fs::read_to_string(&template).expect("read a deploy/federation template");
        let server = self.server(side);
        let values = [
            ("__PORT__", server.port.to_string()),
            ("__HTTP_PORT__", server.http_port.to_string()),
            ("__LEAF_PORT__", self.leaf_port.to_string()),
            ("__HUB_LEAF_PORT__", self.leaf_port.to_string()),
            ("__DIR__", server.dir.display().to_string()),
            ("__TLS_DIR__", self.root.join("tls").display().to_string()),
            ("__SYNC_INTERVAL__", sync.to_owned()),
            ("__SUBJECT_PREFIX__", self.subject_prefix.clone()),
            ("__DELIVER_PREFIX__", self.deliver_prefix("kg")),
            ("__OUT_STREAM__", self.out_stream("kg")),
            ("__IN_STREAM__", self.in_stream("ru")),
            ("__LINK_PASSWORD__", self.link_password.clone()),
            ("__SERVICES_PASSWORD__", crate::unique()),
        ];
        render(&text, &values)
    }

    fn server(&self, side: Side) -> &Server {
        match side {
            Side::Ru => &self.ru,
            Side::Kg => &self.kg,
        }
    }

    fn server_mut(&mut self, side: Side) -> &mut Server {
        match side {
            Side::Ru => &mut self.ru,
            Side::Kg => &mut self.kg,
        }
    }

    /// `{stream prefix}_XB_OUT_{TO}` in ru.
    #[must_use]
    pub fn out_stream(&self, to: &str) -> String {
        format!("{}_XB_OUT_{}", self.stream_prefix, to.to_ascii_uppercase())
    }

    /// `{stream prefix}_XB_IN_{FROM}` in kg.
    #[must_use]
    pub fn in_stream(&self, from: &str) -> String {
        format!("{}_XB_IN_{}", self.stream_prefix, from.to_ascii_uppercase())
    }

    /// Where ru delivers the sourced messages of `to`'s inbound stream:
    /// `{subject prefix}.xborder.v1.{to}` (the inbound stream's
    /// `external.deliver`).
    #[must_use]
    pub fn deliver_prefix(&self, to: &str) -> String {
        format!("{}.xborder.v1.{to}", self.subject_prefix)
    }

    /// The client URL of `side` (no credentials: its services' way in).
    #[must_use]
    pub fn url(&self, side: Side) -> String {
        format!("nats://127.0.0.1:{}", self.server(side).port)
    }

    /// The bus settings of a service of `side`.
    #[must_use]
    pub fn nats_settings(&self, side: Side) -> NatsSettings {
        NatsSettings {
            url: self.url(side),
            subject_prefix: self.subject_prefix.clone(),
            stream_prefix: self.stream_prefix.clone(),
            replicas: 1,
            duplicate_window_seconds: 120,
        }
    }

    /// What `side`'s server logged so far.
    #[must_use]
    pub fn log(&self, side: Side) -> String {
        std::fs::read_to_string(self.server(side).dir.join("nats.log")).unwrap_or_default()
    }

    /// The monitoring endpoint `path` of `side` (`/leafz`), its body.
    ///
    /// # Errors
    /// When the server does not answer.
    pub async fn monitor(&self, side: Side, path: &str) -> anyhow::Result<serde_json::Value> {
        let port = self.server(side).http_port;
        let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
        stream
            .write_all(format!("GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n").as_bytes())
            .await?;
        let mut reply = Vec::new();
        tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut reply)).await??;
        let reply = String::from_utf8_lossy(&reply);
        let body = reply
            .split_once("\r\n\r\n")
            .map(|(_, body)| body)
            .ok_or_else(|| anyhow::anyhow!("no HTTP body"))?;
        Ok(serde_json::from_str(body)?)
    }

    /// How many leaf connections ru has (0 while the link is cut).
    pub async fn leaf_connections(&self) -> u64 {
        self.monitor(Side::Ru, "/leafz")
            .await
            .ok()
            .and_then(|v| v["leafnodes"].as_u64())
            .unwrap_or(0)
    }

    /// Waits until ru counts kg's leaf connection.
    ///
    /// # Panics
    /// After 30 s.
    pub async fn wait_link(&self) {
        let deadline = tokio::time::Instant::now() + START_TIMEOUT;
        while tokio::time::Instant::now() < deadline {
            if self.leaf_connections().await >= 1 {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!(
            "the leaf link did not come up within {START_TIMEOUT:?}; ru's log:\n{}\nkg's log:\n{}",
            tail(&self.log(Side::Ru)),
            tail(&self.log(Side::Kg))
        );
    }

    /// Cuts the link: stops kg's server (SIGTERM, or SIGKILL when `kill`)
    /// and waits until ru has no leaf connection.
    ///
    /// # Panics
    /// When kg's server does not end, or ru still counts a leaf after 30 s.
    pub async fn cut_link(&mut self, kill: bool) {
        self.stop_server(Side::Kg, kill).await;
        let deadline = tokio::time::Instant::now() + START_TIMEOUT;
        while self.leaf_connections().await > 0 {
            assert!(
                tokio::time::Instant::now() < deadline,
                "ru still counts a leaf connection"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Restores the link: starts kg's server again (same ports, same data)
    /// and waits until the link is up.
    pub async fn restore_link(&mut self) {
        self.start_server(Side::Kg).await;
        self.wait_link().await;
    }

    /// Starts `side`'s server and waits until it answers (JetStream ready).
    ///
    /// # Panics
    /// When it exits or is not healthy within 30 s.
    pub async fn start_server(&mut self, side: Side) {
        let binary = nats_server();
        let server = self.server_mut(side);
        assert!(server.child.is_none(), "{} already runs", side.code());
        let child = Command::new(&binary)
            .arg("-c")
            .arg(&server.conf)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .unwrap_or_else(|e| panic!("start {}: {e}", binary.display()));
        server.child = Some(child);
        let deadline = tokio::time::Instant::now() + START_TIMEOUT;
        loop {
            if let Some(status) = self
                .server_mut(side)
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                panic!(
                    "nats-server of {} exited ({status}):\n{}",
                    side.code(),
                    tail(&self.log(side))
                );
            }
            if self
                .monitor(side, "/healthz?js-enabled-only=true")
                .await
                .is_ok_and(|v| v["status"] == "ok")
            {
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "nats-server of {} not healthy within {START_TIMEOUT:?}:\n{}",
                side.code(),
                tail(&self.log(side))
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Stops `side`'s server: SIGTERM (SIGKILL when `kill`), then waits for it.
    ///
    /// # Panics
    /// When it does not end within 30 s.
    pub async fn stop_server(&mut self, side: Side, kill: bool) {
        let Some(mut child) = self.server_mut(side).child.take() else {
            return;
        };
        if let Some(pid) = child.id() {
            let signal = if kill { "-KILL" } else { "-TERM" };
            let _ = Command::new("kill").arg(signal).arg(pid.to_string()).status().await;
        }
        tokio::time::timeout(START_TIMEOUT, child.wait())
            .await
            .expect("nats-server did not end")
            .expect("wait for nats-server");
    }

    /// Starts one more nats-server that tries to join ru as a leaf node:
    /// `nats-leaf://{userinfo}127.0.0.1:{leaf port}` (`userinfo` empty, or
    /// `user:password@`), over TLS with the link's CA, presenting the link's
    /// leaf certificate only when `client_cert`. Ends when dropped.
    ///
    /// # Panics
    /// When it cannot be started.
    pub async fn stray_leaf(&self, userinfo: &str, client_cert: bool) -> Child {
        let id = crate::unique();
        let dir = self.root.join(format!("stray-{id}"));
        std::fs::create_dir_all(&dir).expect("create a stray leaf's folder");
        let tls = self.root.join("tls");
        let cert = if client_cert {
            format!(
                "cert_file: \"{}\"\n        key_file: \"{}\"",
                tls.join("ru-kg-leaf.pem").display(),
                tls.join("ru-kg-leaf.key").display()
            )
        } else {
            String::new()
        };
        let conf = format!(
            "server_name: stray-{id}\nlisten: 127.0.0.1:{port}\njetstream {{ store_dir: \"{store}\", domain: kg }}\n\
             leafnodes {{ remotes: [ {{ url: \"nats-leaf://{userinfo}127.0.0.1:{leaf}\"\n      \
             tls {{ ca_file: \"{ca}\"\n        {cert} }} }} ] }}\n",
            port = free_ports(1)[0],
            store = dir.join("jetstream").display(),
            leaf = self.leaf_port,
            ca = tls.join("ca.pem").display(),
        );
        let path = dir.join("stray.conf");
        std::fs::write(&path, conf).expect("write a stray leaf's configuration");
        Command::new(nats_server())
            .arg("-c")
            .arg(&path)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("start a stray leaf")
    }
}

impl Drop for Federation {
    fn drop(&mut self) {
        for server in [&mut self.ru, &mut self.kg] {
            if let Some(child) = server.child.as_mut() {
                let _ = child.start_kill();
            }
        }
        if std::env::var("NRM_KEEP_FEDERATION").is_ok_and(|v| v == "1") {
            eprintln!("federation kept in {}", self.root.display());
        } else {
            let _ = std::fs::remove_dir_all(&self.root);
        }
    }
}

impl Server {
    fn new(side: Side, root: &Path, port: u16, http_port: u16) -> Self {
        let dir = root.join(side.code());
        Self {
            side,
            conf: root.join(format!("{}.conf", side.code())),
            dir,
            port,
            http_port,
            child: None,
        }
    }
}

impl std::fmt::Debug for Federation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Federation")
            .field("root", &self.root)
            .field("ru", &self.ru.port)
            .field("kg", &self.kg.port)
            .field("leaf_port", &self.leaf_port)
            .field("sides", &[self.ru.side, self.kg.side])
            .finish_non_exhaustive()
    }
}

/// `text` without its comment lines (they name the placeholders), each
/// placeholder replaced; a placeholder left over is a bug in the template.
///
/// # Panics
/// When a `__NAME__` placeholder has no value.
#[must_use]
pub fn render(text: &str, values: &[(&str, String)]) -> String {
    let mut out = text
        .lines()
        .filter(|line| !line.trim_start().starts_with('#'))
        .collect::<Vec<_>>()
        .join("\n");
    for (name, value) in values {
        out = out.replace(name, value);
    }
    let leftover = out
        .split("__")
        .skip(1)
        .step_by(2)
        .find(|name| !name.is_empty() && name.chars().all(|c| c.is_ascii_uppercase() || c == '_'));
    assert!(
        leftover.is_none(),
        "placeholder __{}__ left unfilled",
        leftover.unwrap_or_default()
    );
    out + "\n"
}

/// The nats-server binary the project uses.
#[must_use]
pub fn nats_server() -> PathBuf {
    if let Ok(path) = std::env::var("NRM_NATS_SERVER")
        && !path.is_empty()
    {
        return PathBuf::from(path);
    }
    std::env::var_os("PATH")
        .and_then(|paths| {
            std::env::split_paths(&paths)
                .map(|dir| dir.join("nats-server"))
                .find(|p| p.is_file())
        })
        .unwrap_or_else(|| PathBuf::from("/usr/sbin/nats-server"))
}

/// The server's version, for example `2.9.10`.
pub async fn nats_server_version() -> String {
    let out = Command::new(nats_server())
        .arg("--version")
        .output()
        .await
        .expect("nats-server --version");
    let text = String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    text.split_whitespace()
        .find_map(|word| {
            let v = word.trim_start_matches('v');
            v.starts_with(|c: char| c.is_ascii_digit()).then(|| v.to_owned())
        })
        .unwrap_or_default()
}

/// `sync_interval: always` on 2.10 and later, a comment before (DESIGN.md §7).
async fn sync_interval_line() -> String {
    let version = nats_server_version().await;
    if nrm_kernel::bus::version_at_least(&version, 2, 10) {
        "sync_interval: always".into()
    } else {
        format!("# sync_interval: always -- not known to nats-server {version}")
    }
}

/// `n` distinct free loopback ports.
fn free_ports(n: usize) -> Vec<u16> {
    let listeners: Vec<_> = (0..n)
        .map(|_| std::net::TcpListener::bind("127.0.0.1:0").expect("bind a free port"))
        .collect();
    listeners
        .iter()
        .map(|l| l.local_addr().expect("local address").port())
        .collect()
}

/// The link's CA and its hub and leaf certificates (`ru-kg-hub.pem`,
/// `ru-kg-leaf.pem`, `ca.pem`, with their keys) in `dir`, made as a user
/// makes them: `nrmctl xborder tls --dir DIR --name ru-kg`.
async fn make_tls(dir: &Path) {
    let status = Command::new(crate::binary("nrmctl"))
        .args(["xborder", "tls", "--dir"])
        .arg(dir)
        .args(["--name", "ru-kg"])
        .stdout(Stdio::null())
        .status()
        .await
        .expect("run nrmctl xborder tls");
    assert!(status.success(), "nrmctl xborder tls failed");
}

/// The last 40 lines of a log.
fn tail(log: &str) -> String {
    let lines: Vec<_> = log.lines().collect();
    lines[lines.len().saturating_sub(40)..].join("\n")
}
