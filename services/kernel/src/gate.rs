//! The gate every call passes before any handler runs: a tower layer around
//! the whole gRPC server (health and reflection excepted). It
//!
//! - verifies the bearer token (`UNAUTHENTICATED` otherwise),
//! - finds the RPC's row in the permission matrix and refuses a role that is
//!   not in it (`PERMISSION_DENIED`; an RPC without a row is refused too),
//! - hands the handler the verified [`CallContext`] with its [`Permit`], which
//!   the application checks against the record once it has loaded it,
//! - writes the audit entry of every refused attempt: refused here, or
//!   refused by the application (`PERMISSION_DENIED`, `FAILED_PRECONDITION`),
//!   with what the attempt concerned as the application recorded it
//!   ([`CallContext::concerns`]): parsed IDs only, never the request's text.
//!
//! - admits at most [`Admission::limit`] calls at once: a call beyond it
//!   waits its turn up to [`Admission::wait`], then is refused `UNAVAILABLE`
//!   ([`AppError::Overloaded`]) before anything of it runs. Past what the
//!   machine can do, the excess is refused at once and the rest served at
//!   full speed, instead of every call waiting out the database pool and
//!   failing. Health and reflection are never held back.
//!
//! A handler cannot forget the check: the caller reaches it only through
//! [`context`].

use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use futures::future::BoxFuture;
use sqlx::PgPool;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tonic::metadata::MetadataMap;
use tonic::{Code, Request, Status};
use uuid::Uuid;

use crate::audit::{self, Entry, Outcome};
use crate::auth::Authenticator;
use crate::command::CallContext;
use crate::error::AppError;
use crate::grpc::CORRELATION_ID;
use crate::permissions;
use crate::store::Actor;

/// RPCs every caller reaches without a token: health and reflection.
const OPEN: [&str; 4] = [
    "/grpc.health.v1.Health/Check",
    "/grpc.health.v1.Health/Watch",
    "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
    "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
];

/// What a request path is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Path {
    /// Health or reflection.
    Open(&'static str),
    /// An RPC of the matrix: its service and method.
    Rpc(&'static str, &'static str),
    /// Anything else; the caller's text is never repeated.
    Unknown,
}

impl Path {
    /// Classifies `path` (`/nrm.shelter.v1.ShelterService/HoldBed`).
    #[must_use]
    pub fn of(path: &str) -> Path {
        if let Some(open) = OPEN.iter().find(|p| **p == path) {
            return Path::Open(open);
        }
        let Some((service, method)) = path.strip_prefix('/').and_then(|p| p.split_once('/')) else {
            return Path::Unknown;
        };
        permissions::MATRIX
            .iter()
            .find(|p| p.part.is_none() && p.service == service && p.method == method)
            .map_or(Path::Unknown, |p| Path::Rpc(p.service, p.method))
    }

    /// The path as telemetry may name it: a known one, or `unknown`.
    #[must_use]
    pub fn label(path: &str) -> String {
        match Path::of(path) {
            Path::Open(p) => p.to_owned(),
            Path::Rpc(service, method) => format!("/{service}/{method}"),
            Path::Unknown => "unknown".to_owned(),
        }
    }
}

/// The verified caller of a call that passed the gate.
///
/// # Errors
/// `INTERNAL` when the request did not pass the gate (a server built
/// without it): nothing is served unchecked.
pub fn context<T>(request: &Request<T>) -> Result<CallContext, Status> {
    request
        .extensions()
        .get::<CallContext>()
        .cloned()
        .ok_or_else(|| AppError::Internal("call did not pass the gate".into()).into())
}

/// The actor of a call without a valid token.
fn unauthenticated() -> Actor {
    Actor {
        agency: "-".into(),
        role: "-".into(),
        officer: "-".into(),
    }
}

/// How many calls the gate lets in at once, and how long one more waits.
#[derive(Debug, Clone)]
pub struct Admission {
    permits: Arc<Semaphore>,
    limit: usize,
    wait: Duration,
}

impl Admission {
    /// At most `limit` calls at once (at least one); a call beyond waits up to `wait`.
    #[must_use]
    pub fn new(limit: usize, wait: Duration) -> Self {
        let limit = limit.max(1);
        Self {
            permits: Arc::new(Semaphore::new(limit)),
            limit,
            wait,
        }
    }

    /// The calls let in at once.
    #[must_use]
    pub const fn limit(&self) -> usize {
        self.limit
    }

    /// How long a call beyond the limit waits for its turn.
    #[must_use]
    pub const fn wait(&self) -> Duration {
        self.wait
    }

    /// A turn for one call of `rpc` (held until its response), or
    /// [`AppError::Overloaded`] when none came free within [`Admission::wait`].
    ///
    /// # Errors
    /// [`AppError::Overloaded`].
    pub async fn enter(&self, rpc: &'static str) -> Result<OwnedSemaphorePermit, AppError> {
        if let Ok(permit) = self.permits.clone().try_acquire_owned() {
            return Ok(permit);
        }
        match tokio::time::timeout(self.wait, self.permits.clone().acquire_owned()).await {
            Ok(Ok(permit)) => Ok(permit),
            // Timed out (or closed, which this gate never does).
            _ => {
                metrics::counter!("nrm_calls_shed_total", "rpc" => rpc).increment(1);
                Err(AppError::Overloaded { limit: self.limit })
            }
        }
    }
}

/// Verifies and admits calls, and audits refusals in `pool`.
#[derive(Debug, Clone)]
pub struct Gate {
    auth: Authenticator,
    pool: PgPool,
    admission: Admission,
}

impl Gate {
    /// A gate verifying with `auth`, auditing in `pool`, letting calls in by `admission`.
    #[must_use]
    pub fn new(auth: Authenticator, pool: PgPool, admission: Admission) -> Self {
        Self { auth, pool, admission }
    }

    /// The tower layer of this gate.
    #[must_use]
    pub fn layer(self) -> GateLayer {
        GateLayer(Arc::new(self))
    }

    /// The context of a call to `service`/`method` with `headers`.
    ///
    /// # Errors
    /// `UNAUTHENTICATED` or `PERMISSION_DENIED`, after auditing the attempt.
    async fn admit(
        &self,
        headers: &http::HeaderMap,
        service: &'static str,
        method: &'static str,
    ) -> Result<CallContext, Status> {
        let metadata = MetadataMap::from_headers(headers.clone());
        let correlation_id = metadata
            .get(CORRELATION_ID)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<Uuid>().ok())
            .unwrap_or_else(Uuid::now_v7);
        let caller = match self.auth.verify(&metadata).await {
            Ok(caller) => caller,
            Err(refused) => {
                metrics::counter!("nrm_grpc_errors_total", "code" => "Unauthenticated").increment(1);
                self.audit(&unauthenticated(), method, Outcome::Unauthenticated, "")
                    .await;
                return Err(refused.into());
            }
        };
        match permissions::permit(service, method, None, caller.role) {
            Ok(permit) => Ok(CallContext::new(caller, correlation_id, permit)),
            Err(refused) => {
                metrics::counter!("nrm_grpc_errors_total", "code" => "PermissionDenied").increment(1);
                tracing::warn!(rpc = method, role = %caller.role, "refused by the permission matrix");
                self.audit(&caller.actor, method, Outcome::Denied, "").await;
                Err(refused.into())
            }
        }
    }

    /// Audits a refused attempt; a failure to audit is logged (the call is
    /// refused anyway).
    async fn audit(&self, actor: &Actor, method: &str, outcome: Outcome, subject: &str) {
        self.audit_with(actor, method, outcome, subject, None).await;
    }

    /// As [`Gate::audit`], with the person the attempt concerned.
    async fn audit_with(&self, actor: &Actor, method: &str, outcome: Outcome, subject: &str, person: Option<Uuid>) {
        let action = format!("{method}:{}", outcome.as_str());
        let entry = Entry {
            person_id: person,
            ..Entry::new(actor, &action, subject, "refused").outcome(outcome)
        };
        let written = async {
            let mut conn = self.pool.acquire().await?;
            audit::append(&mut conn, &entry).await
        }
        .await;
        if let Err(e) = written {
            tracing::error!(error = %e, rpc = method, "could not audit a refused call");
        }
    }
}

/// The gate as a tower layer (see [`Gate::layer`]).
#[derive(Debug, Clone)]
pub struct GateLayer(Arc<Gate>);

impl<S> tower::Layer<S> for GateLayer {
    type Service = GateService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        GateService {
            inner,
            gate: self.0.clone(),
        }
    }
}

/// The gate around the server's routes.
#[derive(Debug, Clone)]
pub struct GateService<S> {
    inner: S,
    gate: Arc<Gate>,
}

impl<S, B, R> tower::Service<http::Request<B>> for GateService<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<R>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    B: Send + 'static,
    R: Default + Send + 'static,
{
    type Response = http::Response<R>;
    type Error = S::Error;
    type Future = BoxFuture<'static, Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: http::Request<B>) -> Self::Future {
        // The clone waits for readiness; the ready one serves this call.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let gate = self.gate.clone();
        Box::pin(async move {
            let path = Path::of(request.uri().path());
            if let Path::Open(_) = path {
                return inner.call(request).await;
            }
            // Held until the response is made (for a stream: until its
            // first message may go); shed calls are counted, not audited:
            // nothing of them ran.
            let rpc = if let Path::Rpc(_, method) = path {
                method
            } else {
                "unknown"
            };
            let _turn = match gate.admission.enter(rpc).await {
                Ok(turn) => turn,
                Err(overloaded) => return Ok(Status::from(overloaded).into_http()),
            };
            let (service, method) = match path {
                Path::Rpc(service, method) => (service, method),
                Path::Open(_) | Path::Unknown => {
                    // Audited as an unknown RPC: the path is the caller's text.
                    let who = match gate
                        .auth
                        .verify(&MetadataMap::from_headers(request.headers().clone()))
                        .await
                    {
                        Ok(caller) => caller.actor,
                        Err(_) => unauthenticated(),
                    };
                    gate.audit(&who, "unknown-rpc", Outcome::Denied, "").await;
                    let refused = AppError::PermissionDenied("no permission is defined for this call".into());
                    return Ok(Status::from(refused).into_http());
                }
            };
            let ctx = match gate.admit(request.headers(), service, method).await {
                Ok(ctx) => ctx,
                Err(status) => return Ok(status.into_http()),
            };
            request.extensions_mut().insert(ctx.clone());
            let response = inner.call(request).await?;
            let outcome = match Status::from_header_map(response.headers()).map(|s| s.code()) {
                Some(Code::PermissionDenied) => Some(Outcome::Denied),
                Some(Code::FailedPrecondition) => Some(Outcome::Refused),
                _ => None,
            };
            if let Some(outcome) = outcome {
                let subject = ctx.concerned();
                gate.audit_with(&ctx.caller.actor, method, outcome, &subject, ctx.concerned_person())
                    .await;
            }
            Ok(response)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_are_named_only_when_known() {
        assert_eq!(
            Path::of("/nrm.shelter.v1.ShelterService/HoldBed"),
            Path::Rpc(permissions::SHELTER, "HoldBed")
        );
        assert_eq!(Path::of("/grpc.health.v1.Health/Check"), Path::Open(OPEN[0]));
        assert_eq!(Path::of("/grpc.health.v1.Health/Aigerim-Bekova"), Path::Unknown);
        assert_eq!(Path::of("/nrm.shelter.v1.ShelterService/Aigerim"), Path::Unknown);
        assert_eq!(Path::label("/Aigerim/Bekova"), "unknown");
        assert_eq!(Path::of(""), Path::Unknown);
    }
}
