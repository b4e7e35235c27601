//! The event-sourcing kernel shared by every Köpür service: what a service
//! needs around its pure aggregates to be durable, reachable and accountable.
//!
//! # Layout
//! - [`ids`]: typed UUIDv7 identifiers, one registry of kinds.
//! - [`error`]: the transport-agnostic application error and its single
//!   mapping to `tonic::Status` (with `google.rpc.BadRequest` details).
//! - [`validate`]: request fields every service checks: request IDs,
//!   expected versions, enum values, region codes, timestamps.
//! - [`settings`]: typed settings from `NRM_*` environment variables.
//! - [`db`]: connecting, creating and migrating a service's own database.
//! - [`store`]: the PostgreSQL event store: optimistic appends, outbox rows and
//!   idempotent command records in one transaction.
//! - [`bus`]: NATS JetStream: server checks, streams created and verified, the
//!   wire format of published commits.
//! - [`relay`]: moves outbox rows to JetStream, exactly once downstream, in
//!   version order per aggregate; refills the bus from the store.
//! - [`retry`]: the one retry policy, and which errors are transient.
//! - [`operator`]: the operator's service every service serves: parked
//!   items, retries, refilling the bus.
//! - [`auditor`]: the auditor's service every service serves: the audit
//!   chain verified, entries listed by person or subject.
//! - [`paging`]: AIP-158 page sizes and filter-bound page tokens.
//! - [`projection`]: durable consumers that write a read model and their
//!   position in one transaction.
//! - [`seal`]: per-person keys, sealing of personal data, crypto-shredding, and
//!   keyed hashes for duplicate detection.
//! - [`auth`]: bearer JWTs naming agency, role and officer.
//! - [`command`]: idempotent commands: the call context, request keys and
//!   fingerprints, replaying and recording a command's answer.
//! - [`grpc`]: around every RPC: the call context from the request, errors
//!   counted and mapped on the way out.
//! - [`telemetry`]: JSON logs, OpenTelemetry, W3C trace context in gRPC
//!   metadata and event headers.
//! - [`server`]: gRPC plumbing every service shares: health, reflection,
//!   metrics endpoint, graceful shutdown.
//! - [`service`]: how every service starts: common settings, the kit of
//!   store, bus, auth, listeners and background tasks, and `main`.
//! - [`timers`]: durable deadlines that fire exactly once.
//! - [`audit`]: the tamper-evident access log: entries chained by hash,
//!   appended in the caller's transaction, verified.
//! - [`xborder`]: across the border: country codes, each country's key
//!   pair, the partners of this deployment, sealing what crosses (HPKE).

pub mod audit;
pub mod auditor;
pub mod auth;
pub mod bus;
pub mod command;
pub mod db;
pub mod error;
pub mod gate;
pub mod grpc;
pub mod ids;
pub mod operator;
pub mod paging;
pub mod permissions;
pub mod projection;
pub mod relay;
pub mod retry;
pub mod seal;
pub mod server;
pub mod service;
pub mod settings;
pub mod store;
pub mod telemetry;
pub mod timers;
pub mod validate;
pub mod xborder;

pub use error::{AppError, FieldViolation};
