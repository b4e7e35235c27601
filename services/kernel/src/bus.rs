//! NATS JetStream as the bus between services.
//!
//! Debian's nats-server 2.9 drops request fields it does not know without an
//! error (DESIGN.md §7), so every stream and consumer this module creates is
//! compared with what the server reports back, and any difference is an
//! error. Subjects are `{prefix}.{context}.v1.{aggregate}.{id}`: one subject
//! per aggregate instance, so the relay can ask the stream what it already
//! holds for a stream ID.

use std::sync::atomic::Ordering;
use std::time::Duration;

use async_nats::HeaderMap;
use async_nats::jetstream::{self, stream};

use crate::settings::NatsSettings;
use crate::store::{Actor, EventMetadata};
use crate::xborder::CountryCode;

/// The context whose stream holds the crossing messages.
const XB_CONTEXT: &str = "repatriation";

/// Header: the commit's stream ID.
pub const HEADER_STREAM_ID: &str = "Nrm-Stream-Id";
/// Header: the stream version after the commit.
pub const HEADER_STREAM_VERSION: &str = "Nrm-Stream-Version";
/// Header: correlation ID.
pub const HEADER_CORRELATION_ID: &str = "Nrm-Correlation-Id";
/// Header: causation ID.
pub const HEADER_CAUSATION_ID: &str = "Nrm-Causation-Id";
/// Header: acting agency.
pub const HEADER_ACTOR_AGENCY: &str = "Nrm-Actor-Agency";
/// Header: acting role.
pub const HEADER_ACTOR_ROLE: &str = "Nrm-Actor-Role";
/// Header: acting officer (pseudonymous).
pub const HEADER_ACTOR_OFFICER: &str = "Nrm-Actor-Officer";
/// Header: W3C trace parent.
pub const HEADER_TRACEPARENT: &str = "traceparent";
/// Header: W3C trace state.
pub const HEADER_TRACESTATE: &str = "tracestate";

/// Errors of the bus.
#[derive(Debug, thiserror::Error)]
pub enum BusError {
    /// Cannot connect to the server.
    #[error("cannot connect to NATS at {url}: {source}")]
    Connect {
        /// The server URL.
        url: String,
        /// Why.
        source: async_nats::ConnectError,
    },
    /// The server refused a JetStream request.
    #[error("JetStream: {0}")]
    JetStream(String),
    /// The stream does not exist (yet): its service creates it.
    #[error("stream {0} does not exist yet")]
    NoStream(String),
    /// The server created something other than what was asked for.
    #[error("NATS server {server_version} applied a different {what} configuration for {name}: {difference}")]
    ConfigMismatch {
        /// `stream` or `consumer`.
        what: &'static str,
        /// Its name.
        name: String,
        /// The server's version.
        server_version: String,
        /// The first difference found.
        difference: String,
    },
}

/// A NATS connection with JetStream, and the naming of this deployment.
#[derive(Clone, Debug)]
pub struct Bus {
    client: async_nats::Client,
    jetstream: jetstream::Context,
    settings: NatsSettings,
}

/// Which stream a sequence number counts in: its name and when the server
/// created it. A stream deleted and created again has another identity, and
/// its sequence numbers mean other messages.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamIdentity {
    /// The stream's name.
    pub name: String,
    /// Its creation time, in nanoseconds since the Unix epoch.
    pub created: i64,
}

impl StreamIdentity {
    /// The identity of a stream as the server describes it.
    #[must_use]
    pub fn of(info: &stream::Info) -> Self {
        Self {
            name: info.config.name.clone(),
            created: i64::try_from(info.created.unix_timestamp_nanos()).unwrap_or(i64::MAX),
        }
    }
}

impl Bus {
    /// Connects and reads the server's version.
    ///
    /// # Errors
    /// [`BusError::Connect`] when the server cannot be reached.
    pub async fn connect(settings: &NatsSettings) -> Result<Self, BusError> {
        // The server may be down at start: the client keeps trying in the
        // background, commands are taken meanwhile and wait in the outbox.
        let client = async_nats::ConnectOptions::new()
            .name("kopur")
            .connection_timeout(Duration::from_secs(5))
            .retry_on_initial_connect()
            .max_reconnects(None)
            .event_callback(|event| async move {
                match event {
                    async_nats::Event::Connected => tracing::info!("NATS connected"),
                    async_nats::Event::Disconnected => tracing::warn!("NATS disconnected"),
                    other => tracing::info!(event = %other, "NATS event"),
                }
            })
            .connect(settings.url.as_str())
            .await
            .map_err(|source| BusError::Connect {
                url: crate::settings::redacted_url(&settings.url),
                source,
            })?;
        // With retry_on_initial_connect the first server info arrives
        // asynchronously; a server that is down is not waited for long.
        for _ in 0..20 {
            if !client.server_info().version.is_empty() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let bus = Self {
            jetstream: jetstream::new(client.clone()),
            client,
            settings: settings.clone(),
        };
        tracing::info!(server_version = %bus.server_version(), sync_always_supported = bus.supports_sync_always(), "connected to NATS");
        Ok(bus)
    }

    /// The core client.
    #[must_use]
    pub fn client(&self) -> &async_nats::Client {
        &self.client
    }

    /// The JetStream context.
    #[must_use]
    pub fn jetstream(&self) -> &jetstream::Context {
        &self.jetstream
    }

    /// The server's version string, for example `2.9.10`.
    #[must_use]
    pub fn server_version(&self) -> String {
        self.client.server_info().version
    }

    /// Whether the server is 2.10 or later (knows `sync_interval`, `filter_subjects`, …).
    #[must_use]
    pub fn supports_sync_always(&self) -> bool {
        version_at_least(&self.server_version(), 2, 10)
    }

    /// True while the connection is up.
    #[must_use]
    pub fn is_connected(&self) -> bool {
        self.client.connection_state() == async_nats::connection::State::Connected
    }

    /// How many times the client has (re)connected: a change means the
    /// server may have restarted, and lost what it had not yet written. (The
    /// client counts it as it connects, before anything is sent again.)
    #[must_use]
    pub fn connections(&self) -> u64 {
        self.client.statistics().connects.load(Ordering::SeqCst)
    }

    /// The context's stream as it is, without creating it: consumers wait
    /// for the service that owns a stream to create it (and to refill it),
    /// instead of creating an empty one in its place.
    ///
    /// # Errors
    /// [`BusError::NoStream`] while it does not exist; [`BusError::JetStream`]
    /// when JetStream cannot be asked.
    pub async fn find_stream(&self, context: &str) -> Result<stream::Stream, BusError> {
        self.find_stream_named(&self.stream_name(context)).await
    }

    /// The stream called `name` as it is, without creating it (see
    /// [`Bus::find_stream`]).
    ///
    /// # Errors
    /// [`BusError::NoStream`] while it does not exist; [`BusError::JetStream`]
    /// when JetStream cannot be asked.
    pub async fn find_stream_named(&self, name: &str) -> Result<stream::Stream, BusError> {
        if !self.is_connected() {
            return Err(BusError::JetStream("not connected to NATS".into()));
        }
        match self.jetstream.get_stream(name).await {
            Ok(stream) => Ok(stream),
            Err(e)
                if matches!(e.kind(), jetstream::context::GetStreamErrorKind::JetStream(err)
                    if err.error_code() == jetstream::ErrorCode::STREAM_NOT_FOUND) =>
            {
                Err(BusError::NoStream(name.to_owned()))
            }
            Err(e) => Err(BusError::JetStream(e.to_string())),
        }
    }

    /// Name of a context's stream: `{STREAM_PREFIX}_{CONTEXT}`.
    #[must_use]
    pub fn stream_name(&self, context: &str) -> String {
        format!("{}_{}", self.settings.stream_prefix, context.to_ascii_uppercase())
    }

    /// Subjects of a context's stream: `{prefix}.{context}.v1.>`.
    #[must_use]
    pub fn context_subjects(&self, context: &str) -> String {
        format!("{}.{context}.v1.>", self.settings.subject_prefix)
    }

    /// Subject of one aggregate instance.
    #[must_use]
    pub fn subject(&self, context: &str, aggregate: &str, id: &str) -> String {
        format!("{}.{context}.v1.{aggregate}.{id}", self.settings.subject_prefix)
    }

    /// Name of a durable consumer: `{STREAM_PREFIX}_{name}`.
    #[must_use]
    pub fn consumer_name(&self, name: &str) -> String {
        format!("{}_{}", self.settings.stream_prefix, name)
    }

    /// Creates (or finds) the context's stream and checks that the server
    /// applied the configuration asked for.
    ///
    /// # Errors
    /// [`BusError::ConfigMismatch`] when the server's stream differs;
    /// [`BusError::JetStream`] when JetStream refuses.
    pub async fn ensure_stream(&self, context: &str) -> Result<stream::Stream, BusError> {
        if !self.is_connected() {
            return Err(BusError::JetStream("not connected to NATS".into()));
        }
        let wanted = stream::Config {
            name: self.stream_name(context),
            subjects: vec![self.context_subjects(context)],
            description: Some(format!("Köpür {context} events")),
            ..self.stream_defaults()
        };
        self.create_checked(wanted).await
    }

    /// Creates (or finds) the stream `wanted` and checks that the server
    /// holds exactly that configuration in what this kernel sets: subjects,
    /// sources (name, filter, external API), storage, retention, replicas
    /// and the de-duplication window. Debian's 2.9 drops what it does not
    /// know without a word, and an existing stream is found, not updated.
    async fn create_checked(&self, wanted: stream::Config) -> Result<stream::Stream, BusError> {
        let mut stream = self
            .jetstream
            .get_or_create_stream(wanted.clone())
            .await
            .map_err(|e| BusError::JetStream(e.to_string()))?;
        let applied = stream
            .info()
            .await
            .map_err(|e| BusError::JetStream(e.to_string()))?
            .config
            .clone();
        if let Some(field) = config_difference(&wanted, &applied) {
            return Err(BusError::ConfigMismatch {
                what: "stream",
                name: wanted.name,
                server_version: self.server_version(),
                difference: field,
            });
        }
        Ok(stream)
    }

    /// Subject of the crossing messages of one return meant for country
    /// `to`: `{prefix}.repatriation.v1.outbound.{to}.{return_id}`, inside the
    /// domestic repatriation stream.
    #[must_use]
    pub fn outbound_subject(&self, to: &CountryCode, return_id: &str) -> String {
        format!(
            "{}.{XB_CONTEXT}.v1.outbound.{to}.{return_id}",
            self.settings.subject_prefix
        )
    }

    /// Every crossing message meant for `to`: `{prefix}.repatriation.v1.outbound.{to}.>`.
    #[must_use]
    pub fn outbound_filter(&self, to: &CountryCode) -> String {
        format!("{}.{XB_CONTEXT}.v1.outbound.{to}.>", self.settings.subject_prefix)
    }

    /// Every crossing message, whatever the country: `{prefix}.repatriation.v1.outbound.>`.
    #[must_use]
    pub fn outbound_filter_all(&self) -> String {
        format!("{}.{XB_CONTEXT}.v1.outbound.>", self.settings.subject_prefix)
    }

    /// Name of the outgoing stream for partner `to`: `{STREAM_PREFIX}_XB_OUT_{TO}`.
    #[must_use]
    pub fn outbound_stream_name(&self, to: &CountryCode) -> String {
        format!("{}_XB_OUT_{}", self.settings.stream_prefix, to.upper())
    }

    /// Name of the incoming stream from partner `from`: `{STREAM_PREFIX}_XB_IN_{FROM}`.
    #[must_use]
    pub fn inbound_stream_name(&self, from: &CountryCode) -> String {
        format!("{}_XB_IN_{}", self.settings.stream_prefix, from.upper())
    }

    /// Creates (or finds) the outgoing stream for partner `to`,
    /// `{STREAM_PREFIX}_XB_OUT_{TO}`: no subjects of its own, it sources the
    /// domestic `{STREAM_PREFIX}_REPATRIATION` stream filtered to
    /// [`Bus::outbound_filter`]`(to)`. One stream per partner, so that each
    /// link's permissions name its own stream alone (DESIGN.md §7). The
    /// server keeps sourcing by itself (also when the domestic stream is
    /// created later).
    ///
    /// # Errors
    /// [`BusError::ConfigMismatch`] when the server's stream differs (a
    /// 2.9 server that dropped a field, or an existing stream of another
    /// configuration); [`BusError::JetStream`] when JetStream refuses.
    pub async fn ensure_outbound_stream(&self, to: &CountryCode) -> Result<stream::Stream, BusError> {
        if !self.is_connected() {
            return Err(BusError::JetStream("not connected to NATS".into()));
        }
        let wanted = stream::Config {
            name: self.outbound_stream_name(to),
            subjects: Vec::new(),
            sources: Some(vec![stream::Source {
                name: self.stream_name(XB_CONTEXT),
                filter_subject: Some(self.outbound_filter(to)),
                ..Default::default()
            }]),
            description: Some(format!("Köpür crossing messages meant for {to}")),
            ..self.stream_defaults()
        };
        self.create_checked(wanted).await
    }

    /// Where the partner's server delivers what an incoming stream of
    /// country `here` sources: `{prefix}.xborder.v1.{here}` (the source's
    /// `external.deliver`; the server appends `.S.<random>`). Without it
    /// nats-server 2.9 delivers on `$JS.S.<random>`, the subjects of every
    /// source inside the partner's account too: a link allowed `$JS.S.>`
    /// receives, when a client of `here` subscribes there, what the
    /// partner's outgoing streams for third countries source (measured on
    /// 2.9.10, tests/tests/xborder_link.rs). The link user's subscribe list
    /// in deploy/federation names this prefix instead.
    #[must_use]
    pub fn inbound_delivery_prefix(&self, here: &CountryCode) -> String {
        format!("{}.xborder.v1.{here}", self.settings.subject_prefix)
    }

    /// Creates (or finds) the incoming stream from partner `from`,
    /// `{STREAM_PREFIX}_XB_IN_{FROM}`: it sources `{STREAM_PREFIX}_XB_OUT_{HERE}`
    /// of JetStream domain `from` (external API `$JS.{from}.API`, across the
    /// leaf-node link, deliveries on [`Bus::inbound_delivery_prefix`]`(here)`)
    /// filtered to [`Bus::outbound_filter`]`(here)`. Sourcing is durable and
    /// resumes by itself after a link cut.
    ///
    /// # Errors
    /// [`BusError::ConfigMismatch`] when the server's stream differs;
    /// [`BusError::JetStream`] when JetStream refuses.
    pub async fn ensure_inbound_stream(
        &self,
        from: &CountryCode,
        here: &CountryCode,
    ) -> Result<stream::Stream, BusError> {
        if !self.is_connected() {
            return Err(BusError::JetStream("not connected to NATS".into()));
        }
        let wanted = stream::Config {
            name: self.inbound_stream_name(from),
            subjects: Vec::new(),
            sources: Some(vec![stream::Source {
                name: self.outbound_stream_name(here),
                filter_subject: Some(self.outbound_filter(here)),
                external: Some(stream::External {
                    api_prefix: format!("$JS.{from}.API"),
                    delivery_prefix: Some(self.inbound_delivery_prefix(here)),
                }),
                ..Default::default()
            }]),
            description: Some(format!("Köpür crossing messages from {from}")),
            ..self.stream_defaults()
        };
        self.create_checked(wanted).await
    }

    /// What every stream this kernel creates shares.
    fn stream_defaults(&self) -> stream::Config {
        stream::Config {
            storage: stream::StorageType::File,
            retention: stream::RetentionPolicy::Limits,
            num_replicas: self.settings.replicas,
            duplicate_window: Duration::from_secs(self.settings.duplicate_window_seconds),
            ..Default::default()
        }
    }
}

/// How long a [`Replay`] waits for the next message before it fails (a
/// message deleted meanwhile is never delivered: the next attempt counts anew).
const REPLAY_IDLE: Duration = Duration::from_secs(5);

/// Every message a stream holds when the replay starts, in stream order,
/// through an ordered consumer (rebuilds, full comparisons with the store).
pub struct Replay {
    messages: Option<jetstream::consumer::pull::Ordered>,
    remaining: u64,
    last: u64,
}

impl Replay {
    /// Starts reading `stream` (`filter`: its subjects), bodies too unless `headers_only`.
    ///
    /// # Errors
    /// [`BusError::JetStream`] when the stream or the consumer cannot be had.
    pub async fn start(stream: &stream::Stream, filter: String, headers_only: bool) -> Result<Self, BusError> {
        Self::start_until(stream, filter, headers_only, None).await
    }

    /// As [`Replay::start`], but only up to and including sequence `until`
    /// (when given): a message past it is neither delivered nor waited for.
    ///
    /// # Errors
    /// [`BusError::JetStream`] when the stream or the consumer cannot be had.
    pub async fn start_until(
        stream: &stream::Stream,
        filter: String,
        headers_only: bool,
        until: Option<u64>,
    ) -> Result<Self, BusError> {
        let state = stream
            .get_info()
            .await
            .map_err(|e| BusError::JetStream(e.to_string()))?
            .state;
        let last = until.map_or(state.last_sequence, |until| until.min(state.last_sequence));
        if state.messages == 0 || last == 0 || last < state.first_sequence {
            return Ok(Self {
                messages: None,
                remaining: 0,
                last,
            });
        }
        let consumer = stream
            .create_consumer(jetstream::consumer::pull::OrderedConfig {
                filter_subject: filter,
                deliver_policy: jetstream::consumer::DeliverPolicy::All,
                headers_only,
                ..Default::default()
            })
            .await
            .map_err(|e| BusError::JetStream(e.to_string()))?;
        let messages = consumer
            .messages()
            .await
            .map_err(|e| BusError::JetStream(e.to_string()))?;
        Ok(Self {
            messages: Some(messages),
            remaining: state.messages,
            last,
        })
    }

    /// The next message, or `None` once every message held at the start
    /// (up to the bound, if any) was delivered.
    ///
    /// # Errors
    /// [`BusError::JetStream`] when the consumer fails.
    pub async fn next(&mut self) -> Result<Option<jetstream::Message>, BusError> {
        let Some(messages) = self.messages.as_mut() else {
            return Ok(None);
        };
        if self.remaining == 0 {
            return Ok(None);
        }
        match tokio::time::timeout(REPLAY_IDLE, futures::StreamExt::next(messages)).await {
            // Silence before every message held at the start came: fail
            // rather than take the rest as missing (or as not there).
            Err(_) => Err(BusError::JetStream(format!(
                "replay: no message for {REPLAY_IDLE:?} with {} still to come",
                self.remaining
            ))),
            Ok(None) => Err(BusError::JetStream("replay: the consumer ended".into())),
            Ok(Some(Err(e))) => Err(BusError::JetStream(e.to_string())),
            Ok(Some(Ok(message))) => {
                self.remaining -= 1;
                let info = message.info().ok().map(|i| (i.stream_sequence, i.pending));
                if let Some((sequence, pending)) = info {
                    if sequence > self.last {
                        // Past the bound (the message at it was deleted or is
                        // not among the filtered subjects): not delivered.
                        self.remaining = 0;
                        return Ok(None);
                    }
                    // At the end, or nothing more of the filtered subjects.
                    if sequence == self.last || pending == 0 {
                        self.remaining = 0;
                    }
                }
                Ok(Some(message))
            }
        }
    }
}

/// The first field in which the server's stream configuration `applied`
/// differs from `wanted`, in what this kernel sets.
fn config_difference(wanted: &stream::Config, applied: &stream::Config) -> Option<String> {
    let checks: [(&str, bool); 5] = [
        ("subjects", applied.subjects == wanted.subjects),
        ("storage", applied.storage == wanted.storage),
        ("retention", applied.retention == wanted.retention),
        ("num_replicas", applied.num_replicas == wanted.num_replicas),
        ("duplicate_window", applied.duplicate_window == wanted.duplicate_window),
    ];
    if let Some((field, _)) = checks.iter().find(|(_, same)| !same) {
        return Some((*field).to_owned());
    }
    let none = Vec::new();
    let wanted_sources = wanted.sources.as_ref().unwrap_or(&none);
    let applied_sources = applied.sources.as_ref().unwrap_or(&none);
    if wanted_sources.len() != applied_sources.len() {
        return Some(format!(
            "sources: {} asked for, {} applied",
            wanted_sources.len(),
            applied_sources.len()
        ));
    }
    for (i, (w, a)) in wanted_sources.iter().zip(applied_sources).enumerate() {
        let nonempty = |s: &Option<String>| s.clone().filter(|s| !s.is_empty());
        let external =
            |e: &Option<stream::External>| e.as_ref().map(|e| (e.api_prefix.clone(), nonempty(&e.delivery_prefix)));
        let checks = [
            ("name", w.name == a.name),
            (
                "filter_subject",
                nonempty(&w.filter_subject) == nonempty(&a.filter_subject),
            ),
            ("external", external(&w.external) == external(&a.external)),
            ("opt_start_seq", w.start_sequence == a.start_sequence),
        ];
        if let Some((field, _)) = checks.iter().find(|(_, same)| !same) {
            return Some(format!("sources[{i}].{field}"));
        }
    }
    if wanted.mirror.is_some() != applied.mirror.is_some() {
        return Some("mirror".to_owned());
    }
    None
}

/// Whether `version` (`2.9.10`, `v2.10.1-beta`) is at least `major.minor`.
#[must_use]
pub fn version_at_least(version: &str, major: u64, minor: u64) -> bool {
    let mut parts = version
        .trim_start_matches('v')
        .split(['.', '-'])
        .map(|p| p.parse::<u64>().unwrap_or(0));
    let (ma, mi) = (parts.next().unwrap_or(0), parts.next().unwrap_or(0));
    (ma, mi) >= (major, minor)
}

/// Writes event metadata into message headers (IDs and codes only).
pub fn metadata_headers(headers: &mut HeaderMap, metadata: &EventMetadata) {
    headers.insert(HEADER_CORRELATION_ID, metadata.correlation_id.to_string().as_str());
    headers.insert(HEADER_CAUSATION_ID, metadata.causation_id.to_string().as_str());
    headers.insert(HEADER_ACTOR_AGENCY, metadata.actor.agency.as_str());
    headers.insert(HEADER_ACTOR_ROLE, metadata.actor.role.as_str());
    headers.insert(HEADER_ACTOR_OFFICER, metadata.actor.officer.as_str());
    if let Some(tp) = &metadata.traceparent {
        headers.insert(HEADER_TRACEPARENT, tp.as_str());
    }
    if let Some(ts) = &metadata.tracestate {
        headers.insert(HEADER_TRACESTATE, ts.as_str());
    }
}

/// Reads event metadata back out of message headers.
#[must_use]
pub fn metadata_from_headers(headers: Option<&HeaderMap>) -> Option<EventMetadata> {
    let headers = headers?;
    let get = |name: &str| headers.get(name).map(|v| v.as_str().to_owned());
    Some(EventMetadata {
        correlation_id: get(HEADER_CORRELATION_ID)?.parse().ok()?,
        causation_id: get(HEADER_CAUSATION_ID)?.parse().ok()?,
        actor: Actor {
            agency: get(HEADER_ACTOR_AGENCY)?,
            role: get(HEADER_ACTOR_ROLE)?,
            officer: get(HEADER_ACTOR_OFFICER)?,
        },
        traceparent: get(HEADER_TRACEPARENT),
        tracestate: get(HEADER_TRACESTATE),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_compare_by_major_and_minor() {
        assert!(!version_at_least("2.9.10", 2, 10));
        assert!(version_at_least("2.10.0", 2, 10));
        assert!(version_at_least("v2.12.1-beta", 2, 10));
        assert!(!version_at_least("", 2, 10));
    }

    #[test]
    fn metadata_survives_headers() {
        let metadata = EventMetadata {
            correlation_id: uuid::Uuid::now_v7(),
            causation_id: uuid::Uuid::now_v7(),
            actor: Actor {
                agency: "kg-mvd".into(),
                role: "police".into(),
                officer: "officer-17".into(),
            },
            traceparent: Some("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01".into()),
            tracestate: None,
        };
        let mut headers = HeaderMap::new();
        metadata_headers(&mut headers, &metadata);
        assert_eq!(metadata_from_headers(Some(&headers)), Some(metadata));
    }
}
