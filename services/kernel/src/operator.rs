//! The operator's service (`nrm.common.v1.OperatorService`), served by every
//! service beside its own: the messages and timers the kernel parked, a
//! retry of one of them, refilling the service's stream from its event
//! store, and rebuilding the service's read models while it runs, compared
//! with the live ones. Only the `operator` role may call it; every call is
//! audited. It reads and writes kernel tables only (a rebuild: the read
//! models through their own projections); no case data leaves it.

use std::sync::Arc;

use sqlx::{PgPool, Row};
use tonic::{Request, Response, Status};
use uuid::Uuid;

use crate::audit;
use crate::bus::Bus;
use crate::error::AppError;
use crate::gate;
use crate::grpc::reply;
use crate::projection::{RebuildReport, Rebuildable};
use crate::relay;
use crate::validate;
use nrm_proto::common::v1 as pb;
use pb::operator_service_server::OperatorService;

/// The read models of a service, as registered by
/// [`crate::service::Kit::project`]: what `RebuildReadModels` rebuilds.
#[derive(Clone, Default)]
pub struct ReadModels(Arc<[Arc<dyn Rebuildable>]>);

impl ReadModels {
    /// The registry of `models`, in this order.
    #[must_use]
    pub fn new(models: Vec<Arc<dyn Rebuildable>>) -> Self {
        Self(models.into())
    }

    /// The names of the read models, in order.
    #[must_use]
    pub fn names(&self) -> Vec<&'static str> {
        self.0.iter().map(|m| m.name()).collect()
    }

    /// The read models named `name` (empty: every one).
    #[must_use]
    pub fn select(&self, name: &str) -> Vec<Arc<dyn Rebuildable>> {
        self.0
            .iter()
            .filter(|m| name.is_empty() || m.name() == name)
            .cloned()
            .collect()
    }
}

impl std::fmt::Debug for ReadModels {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list().entries(self.names()).finish()
    }
}

/// The tonic service of one service's kernel tables and stream.
#[derive(Debug, Clone)]
pub struct OperatorGrpc {
    pool: PgPool,
    bus: Bus,
    context: &'static str,
    publishes: bool,
    read_models: ReadModels,
}

impl OperatorGrpc {
    /// Serves the kernel tables in `pool` and the stream of `context` (a
    /// service that publishes; no read models until
    /// [`OperatorGrpc::with_read_models`]).
    #[must_use]
    pub fn new(pool: PgPool, bus: Bus, context: &'static str) -> Self {
        Self {
            pool,
            bus,
            context,
            publishes: true,
            read_models: ReadModels::default(),
        }
    }

    /// Whether the service has a stream of its own (`ServiceSpec.publishes`):
    /// without one, `RefillStream` has nothing to refill.
    #[must_use]
    pub fn publishing(mut self, publishes: bool) -> Self {
        self.publishes = publishes;
        self
    }

    /// The read models `RebuildReadModels` rebuilds.
    #[must_use]
    pub fn with_read_models(mut self, read_models: ReadModels) -> Self {
        self.read_models = read_models;
        self
    }

    /// Audits the call with what it concerned (`subject`: parsed values
    /// only). The gate let only the operator role through, and audited the
    /// refused attempts.
    async fn operator<T>(&self, request: &Request<T>, action: &str, subject: &str) -> Result<(), Status> {
        let ctx = gate::context(request)?;
        let mut conn = self.pool.acquire().await.map_err(AppError::from)?;
        audit::record(&mut conn, &ctx.caller.actor, action, subject, "operations")
            .await
            .map_err(AppError::from)?;
        Ok(())
    }

    async fn list(&self) -> Result<pb::ListParkedResponse, AppError> {
        let messages = sqlx::query(
            "SELECT projection, stream_sequence, stream_name, subject, commit_id, attempts, last_error, parked_at,
                    retry_requested
             FROM parked_messages ORDER BY parked_at, projection, stream_sequence",
        )
        .fetch_all(&self.pool)
        .await?;
        let timers = sqlx::query(
            "SELECT id, kind, aggregate_id, attempts, last_error, parked_at FROM timers
             WHERE parked_at IS NOT NULL AND fired_at IS NULL ORDER BY parked_at, id",
        )
        .fetch_all(&self.pool)
        .await?;
        let mut items = Vec::with_capacity(messages.len() + timers.len());
        for row in &messages {
            items.push(pb::ParkedItem {
                kind: pb::ParkedKind::Message as i32,
                owner: row.get("projection"),
                item_id: row.get::<i64, _>("stream_sequence").to_string(),
                source: row.get("stream_name"),
                commit_id: row
                    .get::<Option<Uuid>, _>("commit_id")
                    .map(|id| id.to_string())
                    .unwrap_or_default(),
                attempts: u32::try_from(row.get::<i32, _>("attempts")).unwrap_or(0),
                last_error: row.get("last_error"),
                parked_at: Some(validate::timestamp(row.get("parked_at"))),
                retry_requested: row.get("retry_requested"),
                subject: row.get("subject"),
            });
        }
        for row in &timers {
            items.push(pb::ParkedItem {
                kind: pb::ParkedKind::Timer as i32,
                owner: row.get("kind"),
                item_id: row.get::<Uuid, _>("id").to_string(),
                source: row.get("aggregate_id"),
                commit_id: String::new(),
                attempts: u32::try_from(row.get::<i32, _>("attempts")).unwrap_or(0),
                last_error: row.get::<Option<String>, _>("last_error").unwrap_or_default(),
                parked_at: row.get::<Option<_>, _>("parked_at").map(validate::timestamp),
                retry_requested: false,
                subject: String::new(),
            });
        }
        Ok(pb::ListParkedResponse { items })
    }

    async fn retry(&self, request: &pb::RetryParkedRequest) -> Result<pb::RetryParkedResponse, AppError> {
        let kind = pb::ParkedKind::try_from(request.kind).unwrap_or(pb::ParkedKind::Unspecified);
        // The parsed ID, never the raw text, goes into an answer.
        let (updated, id) = match kind {
            pb::ParkedKind::Message => {
                let sequence: i64 = request
                    .item_id
                    .parse()
                    .map_err(|_| AppError::invalid("item_id", "must be the stream sequence of a parked message"))?;
                let updated = sqlx::query(
                    "UPDATE parked_messages SET retry_requested = true WHERE projection = $1 AND stream_sequence = $2",
                )
                .bind(&request.owner)
                .bind(sequence)
                .execute(&self.pool)
                .await?
                .rows_affected();
                (updated, sequence.to_string())
            }
            pb::ParkedKind::Timer => {
                let id: Uuid = request
                    .item_id
                    .parse()
                    .map_err(|_| AppError::invalid("item_id", "must be the ID of a parked timer"))?;
                let updated = sqlx::query(
                    "UPDATE timers SET parked_at = NULL, attempts = 0, next_attempt_at = NULL
                     WHERE id = $1 AND kind = $2 AND parked_at IS NOT NULL AND fired_at IS NULL",
                )
                .bind(id)
                .bind(&request.owner)
                .execute(&self.pool)
                .await?
                .rows_affected();
                (updated, id.to_string())
            }
            pb::ParkedKind::Unspecified => {
                return Err(AppError::invalid(
                    "kind",
                    "must be PARKED_KIND_MESSAGE or PARKED_KIND_TIMER",
                ));
            }
        };
        if updated == 0 {
            return Err(AppError::NotFound {
                kind: "parked item",
                id,
            });
        }
        Ok(pb::RetryParkedResponse {})
    }

    async fn refill(&self, request: &pb::RefillStreamRequest) -> Result<pb::RefillStreamResponse, AppError> {
        if !self.publishes {
            return Err(AppError::precondition(
                "NO_STREAM",
                self.context,
                "this service publishes no stream",
            ));
        }
        let mode = if request.dry_run {
            relay::RefillMode::DryRun
        } else {
            relay::RefillMode::Full
        };
        let stream = self
            .bus
            .ensure_stream(self.context)
            .await
            .map_err(|e| AppError::Unavailable(e.to_string()))?;
        let report = relay::refill(&self.pool, &stream, mode).await.map_err(|e| match e {
            relay::RelayError::Database(db) => AppError::from(db),
            other => AppError::Unavailable(other.to_string()),
        })?;
        tracing::info!(
            context = self.context,
            aggregates_checked = report.aggregates_checked,
            aggregates_behind = report.aggregates_behind,
            missing = report.missing,
            requeued = report.requeued,
            dry_run = request.dry_run,
            "stream compared with the store"
        );
        Ok(pb::RefillStreamResponse {
            stream: self.bus.stream_name(self.context),
            stream_messages: report.stream_messages,
            published_commits: report.published_commits,
            aggregates_checked: report.aggregates_checked,
            aggregates_behind: report.aggregates_behind,
            requeued: report.requeued,
            missing: report.missing,
        })
    }

    /// The read models the request names (all of them when it names none),
    /// rebuilt one after the other and compared with the live ones.
    async fn rebuild(&self, request: &pb::RebuildReadModelsRequest) -> Result<pb::RebuildReadModelsResponse, AppError> {
        let name = request.projection.as_str();
        if !name.is_empty() && !plain_name(name) {
            return Err(AppError::invalid(
                "projection",
                "must be the name of a read model (lowercase letters, digits, _ and .), or empty for all",
            ));
        }
        let chosen = self.read_models.select(name);
        if chosen.is_empty() && !name.is_empty() {
            return Err(AppError::NotFound {
                kind: "projection",
                id: name.to_owned(),
            });
        }
        let mut read_models = Vec::with_capacity(chosen.len());
        for model in chosen {
            let report = model.rebuild_compare().await.map_err(|e| {
                if crate::retry::is_transient(&e) {
                    AppError::Unavailable(format!("rebuilding {}: {e:#}", model.name()))
                } else {
                    AppError::Internal(format!("rebuilding {}: {e:#}", model.name()))
                }
            })?;
            read_models.push(rebuilt(report));
        }
        Ok(pb::RebuildReadModelsResponse { read_models })
    }
}

/// The answer of one rebuild. A projection without a digest has empty
/// digests and is not `equal` (it could not be compared).
fn rebuilt(report: RebuildReport) -> pb::RebuiltReadModel {
    let equal = report.equal();
    pb::RebuiltReadModel {
        projection: report.projection.to_owned(),
        stream: report.stream,
        stream_sequence: report.stream_sequence,
        messages: report.messages,
        live_digest: report.live_digest.unwrap_or_default(),
        rebuilt_digest: report.rebuilt_digest.unwrap_or_default(),
        equal,
        parked: report.parked,
    }
}

/// A name as projections and reactions have them: short, lowercase
/// letters, digits, `_` and `.`.
fn plain_name(name: &str) -> bool {
    name.len() <= 64
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_' || c == '.')
}

#[tonic::async_trait]
impl OperatorService for OperatorGrpc {
    async fn list_parked(
        &self,
        request: Request<pb::ListParkedRequest>,
    ) -> Result<Response<pb::ListParkedResponse>, Status> {
        self.operator(&request, "ListParked", self.context).await?;
        reply(self.list().await)
    }

    async fn retry_parked(
        &self,
        request: Request<pb::RetryParkedRequest>,
    ) -> Result<Response<pb::RetryParkedResponse>, Status> {
        let subject = retried_item(self.context, request.get_ref());
        self.operator(&request, "RetryParked", &subject).await?;
        reply(self.retry(request.get_ref()).await)
    }

    async fn refill_stream(
        &self,
        request: Request<pb::RefillStreamRequest>,
    ) -> Result<Response<pb::RefillStreamResponse>, Status> {
        let subject = format!(
            "{}/{}",
            self.context,
            if request.get_ref().dry_run { "dry-run" } else { "refill" }
        );
        self.operator(&request, "RefillStream", &subject).await?;
        reply(self.refill(request.get_ref()).await)
    }

    async fn rebuild_read_models(
        &self,
        request: Request<pb::RebuildReadModelsRequest>,
    ) -> Result<Response<pb::RebuildReadModelsResponse>, Status> {
        let name = request.get_ref().projection.as_str();
        let subject = match name {
            "" => format!("{}/all", self.context),
            name if plain_name(name) => format!("{}/{name}", self.context),
            _ => format!("{}/?", self.context),
        };
        self.operator(&request, "RebuildReadModels", &subject).await?;
        reply(self.rebuild(request.get_ref()).await)
    }
}

/// What a retry concerns, for the audit trail: the context, the kind, the
/// owner when it is a plain name, and the parsed item ID; never raw text.
fn retried_item(context: &str, request: &pb::RetryParkedRequest) -> String {
    let kind = pb::ParkedKind::try_from(request.kind).map_or("unknown", |k| k.as_str_name());
    let owner = if plain_name(&request.owner) {
        request.owner.as_str()
    } else {
        "?"
    };
    let item = request
        .item_id
        .parse::<i64>()
        .map(|n| n.to_string())
        .or_else(|_| request.item_id.parse::<Uuid>().map(|u| u.to_string()))
        .unwrap_or_else(|_| "?".into());
    format!("{context}/{kind}/{owner}/{item}")
}
