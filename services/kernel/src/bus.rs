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
        if !self.is_connected() {
            return Err(BusError::JetStream("not connected to NATS".into()));
        }
        let name = self.stream_name(context);
        match self.jetstream.get_stream(&name).await {
            Ok(stream) => Ok(stream),
            Err(e)
                if matches!(e.kind(), jetstream::context::GetStreamErrorKind::JetStream(err)
                    if err.error_code() == jetstream::ErrorCode::STREAM_NOT_FOUND) =>
            {
                Err(BusError::NoStream(name))
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
            storage: stream::StorageType::File,
            retention: stream::RetentionPolicy::Limits,
            num_replicas: self.settings.replicas,
            duplicate_window: Duration::from_secs(self.settings.duplicate_window_seconds),
            description: Some(format!("Köpür {context} events")),
            ..Default::default()
        };
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
        let checks: [(&str, bool); 5] = [
            ("subjects", applied.subjects == wanted.subjects),
            ("storage", applied.storage == wanted.storage),
            ("retention", applied.retention == wanted.retention),
            ("num_replicas", applied.num_replicas == wanted.num_replicas),
            ("duplicate_window", applied.duplicate_window == wanted.duplicate_window),
        ];
        if let Some((field, _)) = checks.iter().find(|(_, same)| !same) {
            return Err(BusError::ConfigMismatch {
                what: "stream",
                name: wanted.name,
                server_version: self.server_version(),
                difference: (*field).to_owned(),
            });
        }
        Ok(stream)
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
        let state = stream
            .get_info()
            .await
            .map_err(|e| BusError::JetStream(e.to_string()))?
            .state;
        if state.messages == 0 {
            return Ok(Self {
                messages: None,
                remaining: 0,
                last: state.last_sequence,
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
            last: state.last_sequence,
        })
    }

    /// The next message, or `None` once every message held at the start was
    /// delivered.
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
                if message.info().is_ok_and(|i| i.stream_sequence >= self.last) {
                    self.remaining = 0;
                }
                Ok(Some(message))
            }
        }
    }
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
