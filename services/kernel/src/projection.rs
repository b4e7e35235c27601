//! Projections and reactions: durable JetStream consumers whose handler
//! writes its effects and its stream position in one PostgreSQL transaction,
//! and acknowledges only after the commit.
//!
//! A *projection* writes a read model through [`UnitOfWork::conn`]. A
//! *reaction* (a service acting on another service's events) appends its own
//! events through [`UnitOfWork::append`] in the same transaction as the
//! checkpoint, so a redelivered event holds no second bed and sends no second
//! escalation.
//!
//! Delivery is at-least-once (a message acknowledged in the last ~100 ms
//! before a crash comes again, and a slow handler sees redeliveries). The
//! checkpoint makes the effect exactly-once: a message at or below the stored
//! sequence changes nothing. Messages are handled one at a time in stream
//! order; a failing handler is retried in place, never skipped, so the
//! checkpoint only ever covers messages that were applied.

use std::future::Future;
use std::time::Duration;

use async_nats::jetstream::consumer::{self, AckPolicy, DeliverPolicy, pull};
use async_nats::jetstream::{self, stream::Stream};
use futures::StreamExt as _;
use prost::Message as _;
use sqlx::PgConnection;
use tokio_util::sync::CancellationToken;

use tracing::Instrument as _;

use crate::bus::{self, Bus, BusError};
use crate::store::{EventMetadata, EventStore, UnitOfWork};
use crate::telemetry;
use nrm_proto::common::v1::EventCommit;

/// A read model (or a reaction) fed by one subject filter of one stream.
pub trait Projection: Send + Sync + 'static {
    /// Stable name: the checkpoint key and the durable consumer's name.
    fn name(&self) -> &'static str;

    /// Applies one commit inside the unit of work that will also store the checkpoint.
    fn apply(
        &self,
        uow: &mut UnitOfWork,
        delivery: &Delivery,
    ) -> impl Future<Output = Result<(), anyhow::Error>> + Send;

    /// Empties the read model before a rebuild.
    fn reset(&self, conn: &mut PgConnection) -> impl Future<Output = Result<(), anyhow::Error>> + Send;
}

/// One message as a handler sees it.
#[derive(Debug, Clone)]
pub struct Delivery {
    /// Sequence of the message in its JetStream stream.
    pub stream_sequence: u64,
    /// The subject it was published on.
    pub subject: String,
    /// The commit: every event one command appended.
    pub commit: EventCommit,
    /// Correlation, causation, actor and trace context from the headers.
    pub metadata: Option<EventMetadata>,
}

/// What handling one message did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The handler ran and the checkpoint moved.
    Applied,
    /// The message was at or below the checkpoint: nothing changed.
    AlreadyApplied,
}

/// Runs one projection on one stream.
pub struct ProjectionRunner<P> {
    store: EventStore,
    bus: Bus,
    stream: Stream,
    filter_subject: String,
    projection: P,
}

impl<P: Projection> ProjectionRunner<P> {
    /// A runner for `projection`, fed by `filter_subject` of `stream`.
    pub fn new(store: EventStore, bus: Bus, stream: Stream, filter_subject: String, projection: P) -> Self {
        Self {
            store,
            bus,
            stream,
            filter_subject,
            projection,
        }
    }

    fn consumer_name(&self) -> String {
        self.bus.consumer_name(self.projection.name())
    }

    /// Creates (or finds) the durable consumer and checks that the server
    /// applied the configuration asked for.
    ///
    /// # Errors
    /// [`BusError::ConfigMismatch`] when the server's consumer differs (for
    /// example a filter the server ignored).
    pub async fn ensure_consumer(&self) -> Result<consumer::Consumer<pull::Config>, BusError> {
        let wanted = pull::Config {
            durable_name: Some(self.consumer_name()),
            filter_subject: self.filter_subject.clone(),
            deliver_policy: DeliverPolicy::All,
            ack_policy: AckPolicy::Explicit,
            ack_wait: Duration::from_secs(30),
            max_ack_pending: 1000,
            ..Default::default()
        };
        let mut consumer = self
            .stream
            .get_or_create_consumer(&self.consumer_name(), wanted.clone())
            .await
            .map_err(|e| BusError::JetStream(e.to_string()))?;
        let applied = consumer
            .info()
            .await
            .map_err(|e| BusError::JetStream(e.to_string()))?
            .config
            .clone();
        let checks = [
            ("durable_name", applied.durable_name == wanted.durable_name),
            ("filter_subject", applied.filter_subject == wanted.filter_subject),
            ("ack_policy", applied.ack_policy == wanted.ack_policy),
            ("deliver_policy", applied.deliver_policy == wanted.deliver_policy),
        ];
        if let Some((field, _)) = checks.iter().find(|(_, same)| !same) {
            return Err(BusError::ConfigMismatch {
                what: "consumer",
                name: self.consumer_name(),
                server_version: self.bus.server_version(),
                difference: (*field).to_owned(),
            });
        }
        Ok(consumer)
    }

    /// Consumes until `shutdown`, reconnecting after errors.
    pub async fn run(self, shutdown: CancellationToken) {
        let mut backoff = Duration::from_millis(200);
        while !shutdown.is_cancelled() {
            match self.consume(&shutdown).await {
                Ok(()) => return,
                Err(err) => {
                    tracing::warn!(projection = self.projection.name(), error = %err, "projection consumer failed; retrying");
                    tokio::select! {
                        () = shutdown.cancelled() => return,
                        () = tokio::time::sleep(backoff) => {}
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(10));
                }
            }
        }
    }

    async fn consume(&self, shutdown: &CancellationToken) -> Result<(), anyhow::Error> {
        let consumer = self.ensure_consumer().await?;
        let mut messages = consumer.messages().await?;
        loop {
            let next = tokio::select! {
                () = shutdown.cancelled() => return Ok(()),
                next = messages.next() => next,
            };
            let Some(message) = next else {
                anyhow::bail!("message stream ended");
            };
            let message = message?;
            let mut backoff = Duration::from_millis(100);
            loop {
                match self.handle(&message).await {
                    Ok(_) => break,
                    Err(err) => {
                        metrics::counter!("nrm_projection_errors_total", "projection" => self.projection.name())
                            .increment(1);
                        tracing::error!(projection = self.projection.name(), error = %err, "projection handler failed; retrying the same message");
                        tokio::select! {
                            () = shutdown.cancelled() => return Ok(()),
                            () = tokio::time::sleep(backoff) => {}
                        }
                        backoff = (backoff * 2).min(Duration::from_secs(10));
                    }
                }
            }
            if let Err(err) = message.ack().await {
                // The effect is committed; a redelivery will be skipped.
                tracing::warn!(projection = self.projection.name(), error = %err, "ack failed");
            }
        }
    }

    /// Applies one message unless the checkpoint already covers it. Does not acknowledge.
    ///
    /// # Errors
    /// When the message cannot be decoded, the handler fails or the database
    /// fails; nothing is written then.
    pub async fn handle(&self, message: &jetstream::Message) -> Result<Outcome, anyhow::Error> {
        let info = message
            .info()
            .map_err(|e| anyhow::anyhow!("not a JetStream message: {e}"))?;
        let stream_sequence = info.stream_sequence;
        let mut uow = self.store.begin().await?;
        let checkpoint: Option<i64> =
            sqlx::query_scalar("SELECT stream_sequence FROM projection_checkpoints WHERE projection = $1 FOR UPDATE")
                .bind(self.projection.name())
                .fetch_optional(uow.conn())
                .await?;
        let sequence = i64::try_from(stream_sequence)?;
        if checkpoint.is_some_and(|c| sequence <= c) {
            metrics::counter!("nrm_projection_redelivered_total", "projection" => self.projection.name()).increment(1);
            return Ok(Outcome::AlreadyApplied);
        }
        let delivery = Delivery {
            stream_sequence,
            subject: message.subject.to_string(),
            commit: EventCommit::decode(message.payload.as_ref())?,
            metadata: bus::metadata_from_headers(message.headers.as_ref()),
        };
        // The handler's span continues the trace of the command that caused the events.
        let span = tracing::info_span!(
            "projection.apply",
            projection = self.projection.name(),
            stream_id = %delivery.commit.stream_id,
            stream_sequence
        );
        if let Some(metadata) = &delivery.metadata {
            telemetry::continue_trace(&span, metadata);
        }
        self.projection.apply(&mut uow, &delivery).instrument(span).await?;
        sqlx::query(
            "INSERT INTO projection_checkpoints (projection, stream_sequence) VALUES ($1, $2)
             ON CONFLICT (projection) DO UPDATE SET stream_sequence = EXCLUDED.stream_sequence, updated_at = now()",
        )
        .bind(self.projection.name())
        .bind(sequence)
        .execute(uow.conn())
        .await?;
        uow.commit().await?;
        metrics::counter!("nrm_projection_applied_total", "projection" => self.projection.name()).increment(1);
        Ok(Outcome::Applied)
    }

    /// Drops the read model, its checkpoint and the durable consumer, so the
    /// next [`run`](Self::run) replays the stream from its first message.
    ///
    /// # Errors
    /// When the database or JetStream fails.
    pub async fn rebuild(&self) -> Result<(), anyhow::Error> {
        let mut tx = self.store.pool().begin().await?;
        self.projection.reset(&mut tx).await?;
        sqlx::query("DELETE FROM projection_checkpoints WHERE projection = $1")
            .bind(self.projection.name())
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        match self.stream.delete_consumer(&self.consumer_name()).await {
            Ok(_) => {}
            Err(e) if e.to_string().contains("not found") => {}
            Err(e) => return Err(e.into()),
        }
        tracing::info!(
            projection = self.projection.name(),
            "projection reset; it will replay from the start"
        );
        Ok(())
    }
}
