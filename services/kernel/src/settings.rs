//! Settings shared by every service, read from `NRM_*` environment variables
//! with `__` for nesting (`NRM_DATABASE__URL` is `database.url`). Defaults
//! live here and in the README; secrets are wrapped so they never print.

use std::fmt;
use std::net::SocketAddr;
use std::str::FromStr;

use figment::Figment;
use figment::providers::Env;
use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;

/// Reads `T` from the `NRM_*` environment.
///
/// # Errors
/// Names the variable that is missing or malformed.
pub fn from_env<T: for<'de> Deserialize<'de>>() -> Result<T, Box<figment::Error>> {
    Figment::new()
        .merge(Env::prefixed("NRM_").split("__"))
        .extract()
        .map_err(Box::new)
}

/// Where the service listens and how many calls it serves at once
/// (flattened: `NRM_GRPC_ADDR`, `NRM_METRICS_ADDR`, …).
#[derive(Debug, Clone, Deserialize)]
pub struct ServerSettings {
    /// gRPC address (`NRM_GRPC_ADDR`, default `127.0.0.1:50051`; port 0 picks a free one).
    #[serde(default = "default_grpc_addr")]
    pub grpc_addr: SocketAddr,
    /// Prometheus `/metrics` address (`NRM_METRICS_ADDR`, default `127.0.0.1:9464`).
    #[serde(default = "default_metrics_addr")]
    pub metrics_addr: SocketAddr,
    /// Calls served at once (`NRM_MAX_CALLS_IN_FLIGHT`, default: half the
    /// database pool, see [`ServerSettings::calls_in_flight`]); health and
    /// reflection are not counted.
    #[serde(default)]
    pub max_calls_in_flight: Option<usize>,
    /// How long a call beyond that limit waits for its turn before it is
    /// refused `UNAVAILABLE` with nothing done (`NRM_CALL_QUEUE_MS`, default
    /// 1000); as long waits a refusal for its turn to be audited, and a
    /// request body for room in the gate's budget of bodies.
    #[serde(default = "default_call_queue_ms")]
    pub call_queue_ms: u64,
}

impl Default for ServerSettings {
    fn default() -> Self {
        Self {
            grpc_addr: default_grpc_addr(),
            metrics_addr: default_metrics_addr(),
            max_calls_in_flight: None,
            call_queue_ms: default_call_queue_ms(),
        }
    }
}

const fn default_call_queue_ms() -> u64 {
    1000
}

impl ServerSettings {
    /// The calls served at once with a pool of `pool_size` connections: as
    /// configured, or half the pool (at least one), so that the other half
    /// stays for the service's background work (relay, projections, timers,
    /// listeners) and calls never wait out the pool for a connection.
    ///
    /// # Errors
    /// When `NRM_MAX_CALLS_IN_FLIGHT` is 0 (a service that serves nothing).
    pub fn calls_in_flight(&self, pool_size: u32) -> Result<usize, &'static str> {
        match self.max_calls_in_flight {
            Some(0) => Err("NRM_MAX_CALLS_IN_FLIGHT must be at least 1 (unset: half the database pool)"),
            Some(n) => Ok(n),
            None => Ok(usize::try_from(pool_size / 2).unwrap_or(usize::MAX).max(1)),
        }
    }
}

fn default_grpc_addr() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 50051))
}

fn default_metrics_addr() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 9464))
}

/// The service's own PostgreSQL database.
#[derive(Clone, Deserialize)]
pub struct DatabaseSettings {
    /// Server URL without a database name (`NRM_DATABASE__URL`, default
    /// `postgres://nrm@127.0.0.1:15432`).
    #[serde(default = "default_database_url")]
    pub url: String,
    /// The service's database (`NRM_DATABASE__NAME`, default: the service's
    /// name); created when missing.
    #[serde(default)]
    pub name: String,
    /// Pool size (`NRM_DATABASE__MAX_CONNECTIONS`, default 16).
    #[serde(default = "default_max_connections")]
    pub max_connections: u32,
}

impl Default for DatabaseSettings {
    fn default() -> Self {
        Self {
            url: default_database_url(),
            name: String::new(),
            max_connections: default_max_connections(),
        }
    }
}

fn default_database_url() -> String {
    "postgres://nrm@127.0.0.1:15432".into()
}

fn default_max_connections() -> u32 {
    16
}

impl fmt::Debug for DatabaseSettings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let server = sqlx::postgres::PgConnectOptions::from_str(&self.url)
            .map(|o| format!("{}@{}:{}", o.get_username(), o.get_host(), o.get_port()))
            .unwrap_or_else(|_| "<unparseable url>".into());
        f.debug_struct("DatabaseSettings")
            .field("server", &server)
            .field("name", &self.name)
            .field("max_connections", &self.max_connections)
            .finish()
    }
}

/// The NATS server and the subject space of this deployment.
#[derive(Clone, Deserialize)]
pub struct NatsSettings {
    /// `NRM_NATS__URL`, default `nats://127.0.0.1:14222`.
    #[serde(default = "default_nats_url")]
    pub url: String,
    /// First token of every subject (`NRM_NATS__SUBJECT_PREFIX`, default `nrm`).
    #[serde(default = "default_subject_prefix")]
    pub subject_prefix: String,
    /// Prefix of stream and consumer names (`NRM_NATS__STREAM_PREFIX`, default `NRM`).
    #[serde(default = "default_stream_prefix")]
    pub stream_prefix: String,
    /// Stream replicas (`NRM_NATS__REPLICAS`, default 1; 3 on a cluster).
    #[serde(default = "default_replicas")]
    pub replicas: usize,
    /// JetStream's de-duplication window of the streams the service creates
    /// (`NRM_NATS__DUPLICATE_WINDOW_SECONDS`, default 120).
    #[serde(default = "default_duplicate_window_seconds")]
    pub duplicate_window_seconds: u64,
}

impl Default for NatsSettings {
    fn default() -> Self {
        Self {
            url: default_nats_url(),
            subject_prefix: default_subject_prefix(),
            stream_prefix: default_stream_prefix(),
            replicas: default_replicas(),
            duplicate_window_seconds: default_duplicate_window_seconds(),
        }
    }
}

impl fmt::Debug for NatsSettings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NatsSettings")
            .field("url", &redacted_url(&self.url))
            .field("subject_prefix", &self.subject_prefix)
            .field("stream_prefix", &self.stream_prefix)
            .field("replicas", &self.replicas)
            .field("duplicate_window_seconds", &self.duplicate_window_seconds)
            .finish()
    }
}

/// A server URL without what may be a secret: user information (a user and
/// password, or a token) and the query.
#[must_use]
pub fn redacted_url(url: &str) -> String {
    let (scheme, rest) = url.split_once("://").unwrap_or(("", url));
    let rest = rest.rsplit_once('@').map_or(rest, |(_, host)| host);
    let rest = rest.split_once('?').map_or(rest, |(host, _)| host);
    if scheme.is_empty() {
        rest.to_owned()
    } else {
        format!("{scheme}://{rest}")
    }
}

fn default_nats_url() -> String {
    "nats://127.0.0.1:14222".into()
}

fn default_subject_prefix() -> String {
    "nrm".into()
}

fn default_stream_prefix() -> String {
    "NRM".into()
}

fn default_replicas() -> usize {
    1
}

fn default_duplicate_window_seconds() -> u64 {
    120
}

/// The outbox relay.
#[derive(Debug, Clone, Deserialize)]
pub struct RelaySettings {
    /// Publish the outbox (`NRM_RELAY__ENABLED`, default `true`). With
    /// `false` commands are still accepted and kept in the outbox, and are
    /// published once a relay runs again (for NATS maintenance, or a relay
    /// run as a separate process).
    #[serde(default = "default_true")]
    pub enabled: bool,
    /// Fault injection, for the fault suite only: the probability (0 to 1)
    /// that the process aborts after JetStream acknowledged a publish round
    /// and before its outbox rows are deleted
    /// (`NRM_RELAY__FAULT_ABORT_AFTER_ACK`, default 0: never).
    #[serde(default)]
    pub fault_abort_after_ack: f64,
}

impl Default for RelaySettings {
    fn default() -> Self {
        Self {
            enabled: true,
            fault_abort_after_ack: 0.0,
        }
    }
}

fn default_true() -> bool {
    true
}

/// Verification of bearer tokens. A service holds public keys only.
#[derive(Clone, Deserialize)]
pub struct AuthSettings {
    /// Where the public keys are, a JWK set (`NRM_AUTH__JWKS`, required):
    /// `file:///…/jwks.json` (the development issuer's), or the `jwks_uri`
    /// of an OpenID Connect provider (`https://…`).
    pub jwks: String,
    /// Expected `iss` claim (`NRM_AUTH__ISSUER`, default `kopur`).
    #[serde(default = "default_issuer")]
    pub issuer: String,
    /// Expected `aud` claim (`NRM_AUTH__AUDIENCE`, default `kopur`).
    #[serde(default = "default_audience")]
    pub audience: String,
    /// Longest lifetime (`exp` − `iat`) of a token taken
    /// (`NRM_AUTH__MAX_TOKEN_LIFETIME_SECONDS`, default 3600).
    #[serde(default = "default_max_token_lifetime_seconds")]
    pub max_token_lifetime_seconds: u64,
    /// Clock skew allowed on `exp`, `nbf` and `iat`
    /// (`NRM_AUTH__LEEWAY_SECONDS`, default 30).
    #[serde(default = "default_leeway_seconds")]
    pub leeway_seconds: u64,
    /// How often the key set is fetched again
    /// (`NRM_AUTH__JWKS_REFRESH_SECONDS`, default 300).
    #[serde(default = "default_jwks_refresh_seconds")]
    pub jwks_refresh_seconds: u64,
    /// A token with an unknown `kid` fetches the set again at most this often
    /// (`NRM_AUTH__JWKS_MIN_REFRESH_SECONDS`, default 30).
    #[serde(default = "default_jwks_min_refresh_seconds")]
    pub jwks_min_refresh_seconds: u64,
}

impl AuthSettings {
    /// Settings for the key set at `jwks`, every other setting its default.
    #[must_use]
    pub fn new(jwks: impl Into<String>) -> Self {
        Self {
            jwks: jwks.into(),
            issuer: default_issuer(),
            audience: default_audience(),
            max_token_lifetime_seconds: default_max_token_lifetime_seconds(),
            leeway_seconds: default_leeway_seconds(),
            jwks_refresh_seconds: default_jwks_refresh_seconds(),
            jwks_min_refresh_seconds: default_jwks_min_refresh_seconds(),
        }
    }
}

impl fmt::Debug for AuthSettings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AuthSettings")
            .field("jwks", &redacted_url(&self.jwks))
            .field("issuer", &self.issuer)
            .field("audience", &self.audience)
            .field("max_token_lifetime_seconds", &self.max_token_lifetime_seconds)
            .field("leeway_seconds", &self.leeway_seconds)
            .field("jwks_refresh_seconds", &self.jwks_refresh_seconds)
            .field("jwks_min_refresh_seconds", &self.jwks_min_refresh_seconds)
            .finish()
    }
}

fn default_issuer() -> String {
    "kopur".into()
}

fn default_audience() -> String {
    "kopur".into()
}

fn default_max_token_lifetime_seconds() -> u64 {
    3600
}

fn default_leeway_seconds() -> u64 {
    30
}

fn default_jwks_refresh_seconds() -> u64 {
    300
}

fn default_jwks_min_refresh_seconds() -> u64 {
    30
}

/// Keys for personal data.
#[derive(Debug, Clone, Deserialize)]
pub struct SealingSettings {
    /// Master key wrapping every per-person key, base64 of 32 bytes
    /// (`NRM_SEALING__MASTER_KEY`, required).
    pub master_key: SecretString,
    /// Key of the identifier hashes used to find duplicate reports, base64 of
    /// 32 bytes (`NRM_SEALING__MATCH_KEY`, required).
    pub match_key: SecretString,
}

/// Logs and traces.
#[derive(Debug, Clone, Deserialize)]
pub struct TelemetrySettings {
    /// Log filter in `tracing` syntax (`NRM_TELEMETRY__LOG`, default `info`).
    #[serde(default = "default_log")]
    pub log: String,
    /// `json` (default) or `text` (`NRM_TELEMETRY__LOG_FORMAT`).
    #[serde(default = "default_log_format")]
    pub log_format: String,
}

impl Default for TelemetrySettings {
    fn default() -> Self {
        Self {
            log: default_log(),
            log_format: default_log_format(),
        }
    }
}

fn default_log() -> String {
    "info".into()
}

fn default_log_format() -> String {
    "json".into()
}

/// Decodes a base64 key of exactly 32 bytes.
///
/// # Errors
/// Names the setting when the key is not base64 or not 32 bytes long.
pub fn decode_key(name: &str, key: &SecretString) -> Result<[u8; 32], String> {
    use base64::Engine as _;
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(key.expose_secret().trim())
        .map_err(|_| format!("{name} is not valid base64"))?;
    <[u8; 32]>::try_from(bytes.as_slice()).map_err(|_| format!("{name} must decode to 32 bytes"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_nats_url_prints_without_its_credentials() {
        let settings = NatsSettings {
            url: "nats://natsuser:natspass@10.0.0.5:4222?token=abc".into(),
            ..NatsSettings::default()
        };
        let printed = format!("{settings:?}");
        assert!(printed.contains("nats://10.0.0.5:4222"), "{printed}");
        assert!(!printed.contains("natspass") && !printed.contains("natsuser") && !printed.contains("abc"));
    }

    #[test]
    fn a_jwks_url_prints_without_its_credentials() {
        let printed = format!(
            "{:?}",
            AuthSettings::new("https://client:hunter2@idp.example/jwks?key=abc")
        );
        assert!(printed.contains("https://idp.example/jwks"), "{printed}");
        assert!(!printed.contains("hunter2") && !printed.contains("abc"), "{printed}");
    }
}
