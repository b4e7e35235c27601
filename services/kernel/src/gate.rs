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
//! - admits at most [`Admission::limit`] calls at once (after verifying the
//!   token, which needs no database): a call beyond it waits its turn up to
//!   [`Admission::wait`], then is refused `UNAVAILABLE`
//!   ([`AppError::Overloaded`]) before anything of it runs. Past what the
//!   service can do, the excess is refused and the rest served at full
//!   speed, instead of every call waiting out the database pool and
//!   failing. An admitted call runs in a task of its own holding its turn,
//!   so a client that goes away frees the turn only once the call's work
//!   (and its connection) is done. Health and reflection are never held
//!   back.
//! - reads a request's body only for a call it admits, and only within a
//!   process-wide budget of bytes ([`Gate::new`]) of which one caller
//!   (agency and officer ID) holds at most two whole bodies across all
//!   their streams: a body that finds no room within [`Admission::wait`]
//!   is refused [`AppError::Overloaded`] too, and one past its caller's
//!   share at once.
//! - verifies the token, decides, and audits a refusal decided on the
//!   headers in a task of its own (the body stays outside it), so that a
//!   client that resets its stream meanwhile cannot take the entry back.
//!   A caller without a valid token waits for its refusal's turn in a lane
//!   of a quarter of the limit; a caller with a valid token, who is
//!   accountable for the attempt, waits for a turn like a call let in, so a
//!   flood of anonymous refusals cannot shed an insider's denied attempt,
//!   and holds at most a quarter of the limit's turns (at least one) with
//!   refusals at once, so that one caller's denied calls cannot take the
//!   turns of everybody else. A refusal shed from its lane or past its
//!   caller's share is answered [`AppError::Overloaded`], as any shed
//!   call, and is not audited (nothing of it ran: it is counted, and one
//!   past its share logged with the caller's IDs and the RPC).
//!
//! A handler cannot forget the check: the caller reaches it only through
//! [`context`].

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use futures::future::BoxFuture;
use http_body_util::{BodyExt as _, Full};
use sqlx::PgPool;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinError;
use tonic::body::Body;
use tonic::metadata::MetadataMap;
use tonic::{Code, Request, Status};
use tracing::Instrument as _;
use uuid::Uuid;

use crate::audit::{self, Entry, Outcome};
use crate::auth::{Authenticator, Caller};
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

/// Longest a request's body may take to arrive before the call waits for
/// its turn: a caller that sends headers and no body holds no turn, and
/// not for ever anything else.
const BODY_DEADLINE: Duration = Duration::from_secs(10);

/// Largest request body read: tonic's default limit of a decoded message
/// (4 MiB) and its frame's five bytes.
const BODY_LIMIT: usize = 4 * 1024 * 1024 + 5;

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
    /// At most `limit` calls at once (at least one: 0 is refused when the
    /// settings are read, [`crate::settings::ServerSettings::calls_in_flight`]);
    /// a call beyond waits up to `wait`.
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
                metrics::counter!("nrm_grpc_errors_total", "code" => "Unavailable").increment(1);
                Err(AppError::Overloaded)
            }
        }
    }
}

/// The bytes of request bodies held before their call has its turn: read,
/// or being read. A process-wide budget, so that many streams over many
/// connections cannot make the service buffer 4 MiB each; a body that
/// arrives in no bytes (headers only) holds nothing.
#[derive(Debug, Clone)]
struct Bodies {
    bytes: Arc<Semaphore>,
    wait: Duration,
    /// Each caller's share of the budget: at most [`SHARE`] bytes across
    /// all their streams, so that one caller cannot fill the budget.
    shares: Shares,
}

/// The most bytes of bodies one caller (agency and officer ID) may have
/// held at once: two whole bodies.
const SHARE: usize = 2 * BODY_LIMIT;

impl Bodies {
    /// Room for `budget` bytes (at least one whole body); a chunk that finds
    /// none waits up to `wait`.
    fn new(budget: usize, wait: Duration) -> Self {
        let budget = budget.clamp(BODY_LIMIT, Semaphore::MAX_PERMITS);
        Self {
            bytes: Arc::new(Semaphore::new(budget)),
            wait,
            shares: Shares::new(SHARE),
        }
    }

    /// Room for `len` more bytes of a body of `rpc`, added to `held`.
    ///
    /// # Errors
    /// [`AppError::Overloaded`] when none came free within the wait.
    async fn take(&self, len: usize, held: &mut Room, actor: &ActorKey, rpc: &'static str) -> Result<(), AppError> {
        // The caller's own share first: when it is full, the caller waits
        // for nobody else, and is shed at once.
        if !self.shares.take(actor, len, &mut held._share) {
            tracing::warn!(
                agency = %actor.0,
                officer = %actor.1,
                rpc,
                "a caller's share of the body budget is full: shed"
            );
            metrics::counter!("nrm_calls_shed_total", "rpc" => rpc).increment(1);
            metrics::counter!("nrm_grpc_errors_total", "code" => "Unavailable").increment(1);
            return Err(AppError::Overloaded);
        }
        // `len` is at most BODY_LIMIT, checked before.
        let n = u32::try_from(len).unwrap_or(u32::MAX);
        let permit = match self.bytes.clone().try_acquire_many_owned(n) {
            Ok(permit) => permit,
            Err(_) => match tokio::time::timeout(self.wait, self.bytes.clone().acquire_many_owned(n)).await {
                Ok(Ok(permit)) => permit,
                _ => {
                    metrics::counter!("nrm_calls_shed_total", "rpc" => rpc).increment(1);
                    metrics::counter!("nrm_grpc_errors_total", "code" => "Unavailable").increment(1);
                    return Err(AppError::Overloaded);
                }
            },
        };
        match &mut held._budget {
            Some(held) => held.merge(permit),
            None => held._budget = Some(permit),
        }
        Ok(())
    }

    /// Bytes left in the budget.
    #[cfg(test)]
    fn available(&self) -> usize {
        self.bytes.available_permits()
    }
}

/// Who a verified caller is, for their share of the gate: agency and
/// officer ID (IDs only).
type ActorKey = (String, String);

/// The key of `actor`.
fn key(actor: &Actor) -> ActorKey {
    (actor.agency.clone(), actor.officer.clone())
}

/// Per-caller shares of something the gate holds for callers (bytes of
/// bodies being read, turns of refusals): at most `cap` units per actor
/// across all their streams. Only actors holding some are kept, so the
/// map never holds more entries than units are held.
#[derive(Debug, Clone)]
struct Shares {
    held: Arc<Mutex<HashMap<ActorKey, usize>>>,
    cap: usize,
}

impl Shares {
    fn new(cap: usize) -> Self {
        Self {
            held: Arc::new(Mutex::new(HashMap::new())),
            cap: cap.max(1),
        }
    }

    /// `n` more units for `actor`, added to `held`; `false` (and nothing
    /// taken) when that would pass the actor's cap.
    fn take(&self, actor: &ActorKey, n: usize, held: &mut Option<Share>) -> bool {
        let mut map = self.held.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let now = map.get(actor).copied().unwrap_or(0);
        if now.saturating_add(n) > self.cap {
            return false;
        }
        map.insert(actor.clone(), now + n);
        drop(map);
        match held {
            Some(share) => share.n += n,
            None => {
                *held = Some(Share {
                    shares: self.clone(),
                    actor: actor.clone(),
                    n,
                });
            }
        }
        true
    }

    /// Units `actor` holds now.
    #[cfg(test)]
    fn of(&self, actor: &ActorKey) -> usize {
        self.held.lock().unwrap().get(actor).copied().unwrap_or(0)
    }

    /// Actors holding any.
    #[cfg(test)]
    fn actors(&self) -> usize {
        self.held.lock().unwrap().len()
    }
}

/// Units of one actor's share, given back when dropped (the entry goes
/// when the actor holds none).
#[derive(Debug)]
struct Share {
    shares: Shares,
    actor: ActorKey,
    n: usize,
}

impl Drop for Share {
    fn drop(&mut self) {
        let mut map = self
            .shares
            .held
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(now) = map.get_mut(&self.actor) {
            *now = now.saturating_sub(self.n);
            if *now == 0 {
                map.remove(&self.actor);
            }
        }
    }
}

/// Room a body's bytes hold until its call has its turn: in the process's
/// budget and in its caller's share.
#[derive(Debug, Default)]
struct Room {
    _budget: Option<OwnedSemaphorePermit>,
    _share: Option<Share>,
}

/// A request with its whole body read (within [`BODY_DEADLINE`], at most
/// [`BODY_LIMIT`] bytes, each chunk within the budget of `bodies`), and
/// its bytes' room in that budget; every request of these services is one
/// message.
///
/// # Errors
/// `DEADLINE_EXCEEDED` when the body did not arrive in time,
/// `RESOURCE_EXHAUSTED` when it is too large, `CANCELLED` when it broke off,
/// `UNAVAILABLE` ([`AppError::Overloaded`]) when the budget had no room.
async fn whole(
    request: http::Request<Body>,
    bodies: &Bodies,
    actor: &ActorKey,
    rpc: &'static str,
) -> Result<(http::Request<Body>, Room), Status> {
    let (parts, mut body) = request.into_parts();
    let mut held = Room::default();
    let read = async {
        let mut bytes = BytesMut::new();
        while let Some(frame) = body.frame().await {
            let Ok(frame) = frame else {
                return Err(refused_body(Status::cancelled("the request's body broke off")));
            };
            // Trailers: a request of these services carries none worth keeping.
            let Ok(data) = frame.into_data() else { continue };
            if data.is_empty() {
                continue;
            }
            if bytes.len() + data.len() > BODY_LIMIT {
                return Err(refused_body(Status::resource_exhausted(
                    "the request's message is larger than 4 MiB",
                )));
            }
            bodies
                .take(data.len(), &mut held, actor, rpc)
                .await
                .map_err(Status::from)?;
            bytes.extend_from_slice(&data);
        }
        Ok(bytes.freeze())
    };
    let bytes: Bytes = match tokio::time::timeout(BODY_DEADLINE, read).await {
        Ok(read) => read?,
        Err(_) => {
            tracing::warn!(
                agency = %actor.0,
                officer = %actor.1,
                rpc,
                "a request's body did not arrive within its deadline"
            );
            return Err(refused_body(Status::deadline_exceeded(
                "the request's body did not arrive within 10 s",
            )));
        }
    };
    Ok((http::Request::from_parts(parts, Body::new(Full::new(bytes))), held))
}

/// `status`, counted in `nrm_grpc_errors_total`.
fn refused_body(status: Status) -> Status {
    metrics::counter!("nrm_grpc_errors_total", "code" => format!("{:?}", status.code())).increment(1);
    status
}

/// A call refused on its headers: who, what to audit, and the answer.
struct Refused {
    /// Whether the caller's token verified (the actor is then known).
    authenticated: bool,
    actor: Actor,
    action: &'static str,
    outcome: Outcome,
    status: Status,
}

/// Verifies and admits calls, and audits refusals in `pool`.
#[derive(Debug, Clone)]
pub struct Gate {
    auth: Authenticator,
    pool: PgPool,
    admission: Admission,
    refusals: Admission,
    /// Each verified caller's turns of refusals at once (a quarter of the
    /// limit, at least one), so that one caller's denied calls cannot take
    /// every turn.
    refusers: Shares,
    bodies: Bodies,
    /// The tasks that verify, decide and audit refusals, which run on
    /// after their client left: a stop waits for them too.
    deciding: tokio_util::task::TaskTracker,
}

impl Gate {
    /// A gate verifying with `auth`, auditing in `pool`, letting calls in
    /// by `admission`; the refusals of callers without a valid token (and
    /// their unknown RPCs) wait for their audit in a lane of a quarter of
    /// its size (at least one), those of callers with a valid token in
    /// `admission` itself, at most a quarter of the limit (at least one)
    /// per caller. Request bodies are read within a budget of twice the
    /// limit's bodies of 4 MiB (8 calls: 64 MiB), at most two bodies per
    /// caller; a chunk that finds no room waits as long as a call for its
    /// turn, one past its caller's share is shed at once.
    #[must_use]
    pub fn new(auth: Authenticator, pool: PgPool, admission: Admission) -> Self {
        let refusals = Admission::new(admission.limit / 4, admission.wait);
        let bodies = Bodies::new(
            admission.limit.saturating_mul(2).saturating_mul(BODY_LIMIT),
            admission.wait,
        );
        let refusers = Shares::new(admission.limit / 4);
        Self {
            auth,
            pool,
            admission,
            refusals,
            refusers,
            bodies,
            deciding: tokio_util::task::TaskTracker::new(),
        }
    }

    /// Waits, at most `within`, until every admitted call has ended (its
    /// turn given back): after the server stopped taking calls, so that a
    /// call whose client went away still ends before the process does.
    pub async fn drained(&self, within: Duration) -> bool {
        let all = async {
            let main = u32::try_from(self.admission.limit).unwrap_or(u32::MAX);
            let refusals = u32::try_from(self.refusals.limit).unwrap_or(u32::MAX);
            self.deciding.close();
            self.deciding.wait().await;
            let _ = self.admission.permits.acquire_many(main).await;
            let _ = self.refusals.permits.acquire_many(refusals).await;
        };
        tokio::time::timeout(within, all).await.is_ok()
    }

    /// The tower layer of this gate.
    #[must_use]
    pub fn layer(self) -> GateLayer {
        GateLayer(Arc::new(self))
    }

    /// The context of a call to `path` from the caller `verified` from
    /// `metadata`, or why it is refused: decided on the headers alone, with
    /// no database and before the body is read.
    fn admit(
        &self,
        verified: Result<Caller, AppError>,
        metadata: &MetadataMap,
        path: Path,
    ) -> Result<CallContext, Refused> {
        let Path::Rpc(service, method) = path else {
            // Audited as an unknown RPC: the path is the caller's text.
            return Err(Refused {
                authenticated: verified.is_ok(),
                actor: verified.map_or_else(|_| unauthenticated(), |caller| caller.actor),
                action: "unknown-rpc",
                outcome: Outcome::Denied,
                status: AppError::PermissionDenied("no permission is defined for this call".into()).into(),
            });
        };
        let correlation_id = metadata
            .get(CORRELATION_ID)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<Uuid>().ok())
            .unwrap_or_else(Uuid::now_v7);
        let caller = match verified {
            Ok(caller) => caller,
            Err(refused) => {
                metrics::counter!("nrm_grpc_errors_total", "code" => "Unauthenticated").increment(1);
                return Err(Refused {
                    authenticated: false,
                    actor: unauthenticated(),
                    action: method,
                    outcome: Outcome::Unauthenticated,
                    status: refused.into(),
                });
            }
        };
        match permissions::permit(service, method, None, caller.role) {
            Ok(permit) => Ok(CallContext::new(caller, correlation_id, permit)),
            Err(refused) => {
                metrics::counter!("nrm_grpc_errors_total", "code" => "PermissionDenied").increment(1);
                tracing::warn!(rpc = method, role = %caller.role, "refused by the permission matrix");
                Err(Refused {
                    authenticated: true,
                    actor: caller.actor,
                    action: method,
                    outcome: Outcome::Denied,
                    status: refused.into(),
                })
            }
        }
    }

    /// Serves an admitted call of `ctx` to `method`: hands it to `inner`
    /// and audits the application's refusal.
    async fn serve<S, R>(
        &self,
        mut inner: S,
        mut request: http::Request<Body>,
        ctx: CallContext,
        method: &'static str,
    ) -> Result<http::Response<R>, S::Error>
    where
        S: tower::Service<http::Request<Body>, Response = http::Response<R>>,
    {
        request.extensions_mut().insert(ctx.clone());
        let response = inner.call(request).await?;
        let outcome = match Status::from_header_map(response.headers()).map(|s| s.code()) {
            Some(Code::PermissionDenied) => Some(Outcome::Denied),
            Some(Code::FailedPrecondition) => Some(Outcome::Refused),
            _ => None,
        };
        if let Some(outcome) = outcome {
            let subject = ctx.concerned();
            self.audit_with(&ctx.caller.actor, method, outcome, &subject, ctx.concerned_person())
                .await;
        }
        Ok(response)
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

    /// Audits `refused` (a call of `rpc` refused on its headers) and gives
    /// its answer; run by the call's own task ([`GateService`]), so that a
    /// client that resets its stream does not take the entry back. The
    /// turn is a call's when the caller's token verified (an insider's
    /// attempt is never shed by an anonymous flood), else one of the
    /// refusals' lane. A verified caller holds at most a quarter of the
    /// limit's turns with refusals at once (at least one): one more is
    /// shed before it waits for a turn, logged with the caller's IDs and
    /// the RPC. A refusal that gets no turn is answered
    /// [`AppError::Overloaded`] and is not audited (nothing of it ran; it
    /// is counted in `nrm_calls_shed_total` and `nrm_refusals_shed_total`).
    async fn refuse(&self, refused: Refused, rpc: &'static str) -> Status {
        let Refused {
            authenticated,
            actor,
            action,
            outcome,
            status,
        } = refused;
        let (lane, name) = if authenticated {
            (&self.admission, "calls")
        } else {
            (&self.refusals, "refusals")
        };
        // Counted when it ends unaudited.
        let mut unaudited = Unaudited(Some(name));
        let mut share = None;
        if authenticated && !self.refusers.take(&key(&actor), 1, &mut share) {
            unaudited.0 = Some("actor");
            tracing::warn!(
                agency = %actor.agency,
                officer = %actor.officer,
                rpc,
                "a caller's share of refusal turns is full: shed unaudited"
            );
            metrics::counter!("nrm_calls_shed_total", "rpc" => rpc).increment(1);
            metrics::counter!("nrm_grpc_errors_total", "code" => "Unavailable").increment(1);
            return AppError::Overloaded.into();
        }
        let _turn = match lane.enter(rpc).await {
            Ok(turn) => turn,
            Err(overloaded) => return overloaded.into(),
        };
        unaudited.0 = None;
        self.audit(&actor, action, outcome, "").await;
        drop(share);
        status
    }
}

/// A refusal not (yet) handed to its audit: counted in
/// `nrm_refusals_shed_total{lane}` when dropped so.
struct Unaudited(Option<&'static str>);

impl Drop for Unaudited {
    fn drop(&mut self) {
        if let Some(lane) = self.0 {
            metrics::counter!("nrm_refusals_shed_total", "lane" => lane).increment(1);
        }
    }
}

/// Logs that the task of a call to `rpc` ended without its answer: only
/// that, never the panic's message, which could carry request data.
fn task_failed(rpc: &'static str, failed: &JoinError) {
    if failed.is_panic() {
        tracing::error!(rpc, "a call's task panicked");
    } else {
        tracing::error!(rpc, "a call's task was cancelled");
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

impl<S, R> tower::Service<http::Request<Body>> for GateService<S>
where
    S: tower::Service<http::Request<Body>, Response = http::Response<R>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    R: Default + Send + 'static,
{
    type Response = http::Response<R>;
    type Error = S::Error;
    type Future = BoxFuture<'static, Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<Body>) -> Self::Future {
        // The clone waits for readiness; the ready one serves this call.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let gate = self.gate.clone();
        Box::pin(async move {
            let path = Path::of(request.uri().path());
            let rpc = match path {
                Path::Open(_) => return inner.call(request).await,
                Path::Rpc(_, method) => method,
                Path::Unknown => "unknown",
            };
            // Who calls, and whether the matrix lets them, from the headers
            // alone (no database, no body): a refusal neither reads the
            // body; its audit entry is written while it holds a turn (an
            // anonymous caller's in the refusals' lane, so that a flood of
            // them takes no turn of the calls that may run). Shed calls
            // are counted, not audited: nothing of them ran.
            let metadata = MetadataMap::from_headers(request.headers().clone());
            // Verifying (which may wait for the key set), deciding and
            // auditing a refusal run in a task of their own, so that a
            // client that resets its stream meanwhile cannot leave a
            // refusal unaudited; the body stays here.
            // A refusal is said at once, so that its unread body is let go
            // before it waits for its turn and its audit.
            let (refusing, refused) = tokio::sync::oneshot::channel::<()>();
            let decided = gate.deciding.spawn({
                let gate = gate.clone();
                async move {
                    let verified = gate.auth.verify(&metadata).await;
                    match gate.admit(verified, &metadata, path) {
                        Ok(ctx) => Ok(ctx),
                        Err(denied) => {
                            let _ = refusing.send(());
                            Err(gate.refuse(denied, rpc).await)
                        }
                    }
                }
                .in_current_span()
            });
            // Nothing of a refused call's body is read.
            let request = if refused.await.is_ok() {
                drop(request);
                None
            } else {
                Some(request)
            };
            let ctx = match decided.await {
                Ok(Ok(ctx)) => ctx,
                Ok(Err(status)) => return Ok(status.into_http()),
                Err(failed) => {
                    task_failed(rpc, &failed);
                    return Ok(Status::from(AppError::Internal("the call's task failed".into())).into_http());
                }
            };
            let Some(request) = request else {
                return Ok(Status::from(AppError::Internal("a refused call was let in".into())).into_http());
            };
            // The whole request before the turn, so that a body that never
            // comes holds none; its bytes count in the budget until then.
            let (request, body_room) = match whole(request, &gate.bodies, &key(&ctx.caller.actor), rpc).await {
                Ok(read) => read,
                Err(status) => return Ok(status.into_http()),
            };
            let turn = match gate.admission.enter(rpc).await {
                Ok(turn) => turn,
                Err(overloaded) => return Ok(Status::from(overloaded).into_http()),
            };
            drop(body_room);
            // The call runs in a task of its own that holds the turn until
            // it ends (for a stream: until its first message may go), even
            // when its client goes away: its transaction ends and its
            // connection is back in the pool before another call takes
            // the turn, and a command whose client left still completes.
            let served = tokio::spawn(
                async move {
                    let _turn = turn;
                    gate.serve(inner, request, ctx, rpc).await
                }
                .in_current_span(),
            );
            match served.await {
                Ok(response) => response,
                Err(failed) => {
                    task_failed(rpc, &failed);
                    Ok(Status::from(AppError::Internal("the call's task failed".into())).into_http())
                }
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_call_beyond_the_limit_waits_its_turn_and_is_let_in_when_one_comes_free() {
        let admission = Admission::new(1, Duration::from_secs(1));
        let first = admission.enter("ReportPresumedVictim").await.unwrap();
        let waiting = tokio::spawn({
            let admission = admission.clone();
            async move { admission.enter("ReportPresumedVictim").await.map(drop) }
        });
        tokio::time::sleep(Duration::from_millis(900)).await;
        assert!(!waiting.is_finished(), "it waits while the turn is taken");
        drop(first);
        assert!(waiting.await.unwrap().is_ok(), "the freed turn is its");
    }

    #[tokio::test(start_paused = true)]
    async fn a_call_beyond_the_limit_is_refused_once_its_wait_is_over() {
        let admission = Admission::new(1, Duration::from_millis(200));
        let _first = admission.enter("ReportPresumedVictim").await.unwrap();
        let started = tokio::time::Instant::now();
        let refused = admission.enter("ReportPresumedVictim").await;
        assert!(matches!(refused, Err(AppError::Overloaded)));
        assert_eq!(started.elapsed(), Duration::from_millis(200));
    }

    fn who(agency: &str, officer: &str) -> ActorKey {
        (agency.to_owned(), officer.to_owned())
    }

    #[tokio::test(start_paused = true)]
    async fn one_caller_filling_its_share_is_shed_at_once_and_another_is_read() {
        // A budget of many bodies; each caller may hold two.
        let bodies = Bodies::new(16 * BODY_LIMIT, Duration::from_millis(200));
        let flooder = who("kg-mvd", "officer-17");
        let stalled: Vec<_> = (0..2)
            .map(|_| {
                let (bodies, flooder) = (bodies.clone(), flooder.clone());
                tokio::spawn(async move {
                    whole(request(BODY_LIMIT - 5, false), &bodies, &flooder, "HoldBed")
                        .await
                        .map(drop)
                })
            })
            .collect();
        for _ in 0..1000 {
            if bodies.shares.of(&flooder) == 2 * (BODY_LIMIT - 5) {
                break;
            }
            tokio::task::yield_now().await;
        }
        assert_eq!(bodies.shares.of(&flooder), 2 * (BODY_LIMIT - 5));
        // Its third body passes its share: shed at once, though the budget has room.
        let started = tokio::time::Instant::now();
        let shed = whole(request(11, true), &bodies, &flooder, "HoldBed")
            .await
            .map(drop)
            .unwrap_err();
        assert_eq!(shed.code(), Code::Unavailable);
        assert_eq!(started.elapsed(), Duration::ZERO, "it waits for nobody");
        assert_eq!(bodies.shares.of(&flooder), 2 * (BODY_LIMIT - 5), "nothing more taken");
        // Another officer is read at once.
        let other = who("kg-mvd", "officer-18");
        let (_, room) = whole(request(BODY_LIMIT, true), &bodies, &other, "HoldBed")
            .await
            .unwrap();
        assert_eq!(bodies.shares.of(&other), BODY_LIMIT);
        drop(room);
        assert_eq!(bodies.shares.actors(), 1, "an actor holding nothing is forgotten");
        for call in stalled {
            call.abort();
            let _ = call.await;
        }
        assert_eq!(bodies.shares.actors(), 0);
        assert_eq!(bodies.available(), 16 * BODY_LIMIT);
    }

    #[test]
    fn a_share_is_taken_up_to_its_cap_and_given_back() {
        let shares = Shares::new(2);
        let a = who("kg-mvd", "officer-17");
        let (mut one, mut two, mut three) = (None, None, None);
        assert!(shares.take(&a, 1, &mut one));
        assert!(shares.take(&a, 1, &mut two));
        assert!(!shares.take(&a, 1, &mut three), "over its cap");
        assert!(three.is_none());
        assert!(
            shares.take(&who("kg-mvd", "officer-18"), 2, &mut three),
            "another's own share"
        );
        drop((one, two, three));
        assert_eq!(shares.actors(), 0);
    }

    /// A request of `rpc` whose body yields `chunk` and then, unless
    /// `ends`, nothing more for ever (a client that stalls).
    fn request(chunk: usize, ends: bool) -> http::Request<Body> {
        use futures::StreamExt as _;
        let data = (chunk > 0)
            .then(|| Ok::<_, std::convert::Infallible>(http_body::Frame::data(Bytes::from(vec![7u8; chunk]))));
        let rest = if ends {
            futures::stream::empty().boxed()
        } else {
            futures::stream::pending().boxed()
        };
        let body = http_body_util::StreamBody::new(futures::stream::iter(data).chain(rest));
        http::Request::new(Body::new(body))
    }

    #[tokio::test(start_paused = true)]
    async fn a_body_finds_no_room_while_others_fill_the_budget_and_is_refused_overloaded_after_the_wait() {
        let bodies = Bodies::new(BODY_LIMIT, Duration::from_millis(200));
        // Almost the whole budget, held by a body that never ends.
        let stalled = tokio::spawn({
            let bodies = bodies.clone();
            async move {
                whole(
                    request(BODY_LIMIT - 10, false),
                    &bodies,
                    &who("kg-mvd", "officer-17"),
                    "HoldBed",
                )
                .await
                .map(drop)
            }
        });
        for _ in 0..1000 {
            if bodies.available() <= 10 {
                break;
            }
            tokio::task::yield_now().await;
        }
        assert_eq!(
            bodies.available(),
            10,
            "the stalled body holds the room of what it sent"
        );
        let started = tokio::time::Instant::now();
        let refused = whole(request(11, true), &bodies, &who("kg-mvd", "officer-17"), "HoldBed")
            .await
            .map(drop)
            .unwrap_err();
        assert_eq!(refused.code(), Code::Unavailable);
        assert_eq!(
            started.elapsed(),
            Duration::from_millis(200),
            "it waited for room first"
        );
        assert!(!stalled.is_finished(), "the stalled body still holds its room");
        // A body that fits is read at once.
        let (_, room) = whole(request(10, true), &bodies, &who("kg-mvd", "officer-17"), "HoldBed")
            .await
            .unwrap();
        assert_eq!(bodies.available(), 0);
        drop(room);
        assert_eq!(bodies.available(), 10, "its room is given back");
        stalled.abort();
        let _ = stalled.await;
        assert_eq!(bodies.available(), BODY_LIMIT, "so is the stalled one's, once it ends");
    }

    #[tokio::test(start_paused = true)]
    async fn headers_without_a_body_hold_no_room_in_the_budget() {
        let bodies = Bodies::new(BODY_LIMIT, Duration::from_millis(200));
        let silent: Vec<_> = (0..64)
            .map(|_| {
                let bodies = bodies.clone();
                tokio::spawn(async move {
                    whole(request(0, false), &bodies, &who("kg-mvd", "officer-17"), "HoldBed")
                        .await
                        .map(drop)
                })
            })
            .collect();
        tokio::task::yield_now().await;
        let started = tokio::time::Instant::now();
        let (read, room) = whole(
            request(BODY_LIMIT, true),
            &bodies,
            &who("kg-mvd", "officer-17"),
            "HoldBed",
        )
        .await
        .unwrap();
        assert_eq!(started.elapsed(), Duration::ZERO, "a whole body found the whole budget");
        assert_eq!(read.into_body().collect().await.unwrap().to_bytes().len(), BODY_LIMIT);
        drop(room);
        for call in silent {
            let late = call.await.unwrap().unwrap_err();
            assert_eq!(late.code(), Code::DeadlineExceeded, "a body that never came");
        }
    }

    #[tokio::test]
    async fn a_body_larger_than_4_mib_is_refused_without_taking_more_room_than_that() {
        let bodies = Bodies::new(4 * BODY_LIMIT, Duration::from_millis(200));
        let refused = whole(
            request(BODY_LIMIT + 1, true),
            &bodies,
            &who("kg-mvd", "officer-17"),
            "HoldBed",
        )
        .await
        .map(drop)
        .unwrap_err();
        assert_eq!(refused.code(), Code::ResourceExhausted);
        assert_eq!(bodies.available(), 4 * BODY_LIMIT);
    }

    #[test]
    fn a_panicking_call_is_logged_without_its_message() {
        #[derive(Clone, Default)]
        struct Captured(Arc<std::sync::Mutex<Vec<u8>>>);
        impl std::io::Write for Captured {
            fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
                self.0.lock().unwrap().extend_from_slice(buf);
                Ok(buf.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let runtime = tokio::runtime::Builder::new_current_thread().build().unwrap();
        let failed = runtime.block_on(async {
            // A panic whose message formats what the request held.
            let name = "Aigerim Bekova";
            tokio::spawn(async move { panic!("no bed for {name}") })
                .await
                .unwrap_err()
        });
        let captured = Captured::default();
        let writer = captured.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_writer(move || writer.clone())
            .with_ansi(false)
            .finish();
        tracing::subscriber::with_default(subscriber, || task_failed("HoldBed", &failed));
        let logged = String::from_utf8(captured.0.lock().unwrap().clone()).unwrap();
        assert!(logged.contains("a call's task panicked"), "{logged}");
        assert!(logged.contains("HoldBed"), "{logged}");
        assert!(
            !logged.contains("Aigerim"),
            "the panic's message is not logged: {logged}"
        );
    }

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
