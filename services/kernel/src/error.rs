//! The application error every service returns, and its one mapping to gRPC.
//!
//! Each variant carries a message that is safe to show the caller: codes and
//! IDs only, never a value the caller sent (which could be personal data).
//! Internal detail goes to the log at the place the error is mapped, never to
//! the caller.

use std::collections::HashMap;

use tonic::Code;
use tonic_types::{ErrorDetails, StatusExt};

/// Domain of the `google.rpc.ErrorInfo` attached to every error.
const ERROR_DOMAIN: &str = "kopur.nrm";

/// The pause an overloaded service asks of its callers before they retry.
const RETRY_OVERLOADED: std::time::Duration = std::time::Duration::from_millis(500);

/// One invalid request field: its path (`personal.documents[0].number`) and
/// what is wrong with it, without repeating the value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldViolation {
    /// Path of the field in the request message.
    pub field: String,
    /// What a valid value looks like.
    pub description: String,
}

impl FieldViolation {
    /// A violation of `field`.
    pub fn new(field: impl Into<String>, description: impl Into<String>) -> Self {
        Self {
            field: field.into(),
            description: description.into(),
        }
    }
}

/// Collects field violations while a request is parsed, so that the caller
/// learns every offending field at once.
#[derive(Debug, Default)]
pub struct Violations(Vec<FieldViolation>);

impl Violations {
    /// An empty collection.
    #[must_use]
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a violation.
    pub fn push(&mut self, violation: FieldViolation) {
        self.0.push(violation);
    }

    /// Adds a violation of `field`.
    pub fn add(&mut self, field: impl Into<String>, description: impl Into<String>) {
        self.0.push(FieldViolation::new(field, description));
    }

    /// Keeps the value of a parse, or records its violation.
    pub fn check<T>(&mut self, result: Result<T, FieldViolation>) -> Option<T> {
        match result {
            Ok(value) => Some(value),
            Err(violation) => {
                self.0.push(violation);
                None
            }
        }
    }

    /// `Ok(value)` when nothing was violated.
    ///
    /// # Errors
    /// [`AppError::InvalidArgument`] with every violation collected.
    pub fn finish<T>(self, value: impl FnOnce() -> T) -> Result<T, AppError> {
        if self.0.is_empty() {
            Ok(value())
        } else {
            Err(AppError::InvalidArgument(self.0))
        }
    }

    /// The `INVALID_ARGUMENT` error of what was collected.
    #[must_use]
    pub fn into_error(self) -> AppError {
        AppError::InvalidArgument(self.0)
    }

    /// True when nothing was violated so far.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// What went wrong with a command or query, independent of the transport.
#[derive(Debug, thiserror::Error)]
pub enum AppError {
    /// The request has invalid fields. → `INVALID_ARGUMENT` with `BadRequest`.
    #[error("invalid request: {} field(s) violated", .0.len())]
    InvalidArgument(Vec<FieldViolation>),
    /// No token, or a token that does not verify. → `UNAUTHENTICATED`.
    #[error("unauthenticated: {0}")]
    Unauthenticated(&'static str),
    /// The caller's role may not do this. → `PERMISSION_DENIED`.
    #[error("permission denied: {0}")]
    PermissionDenied(String),
    /// The addressed aggregate does not exist. → `NOT_FOUND`.
    #[error("{kind} {id} not found")]
    NotFound {
        /// Kind of the aggregate (`case`, `referral`, …).
        kind: &'static str,
        /// Its ID.
        id: String,
    },
    /// The stream moved on since the caller read it. → `ABORTED`.
    #[error("version conflict on {stream_id}: expected {expected}, found {actual}")]
    Conflict {
        /// The stream written to.
        stream_id: String,
        /// The version the caller expected.
        expected: u64,
        /// The version the stream has.
        actual: u64,
    },
    /// The command does not fit the aggregate's state. → `FAILED_PRECONDITION`
    /// with a `PreconditionFailure` naming the rule.
    #[error("{message}")]
    FailedPrecondition {
        /// A stable code for the rule (`NOT_SCREENED`, `ALREADY_DECIDED`, …).
        reason: &'static str,
        /// The aggregate concerned.
        subject: String,
        /// A sentence for the caller.
        message: String,
    },
    /// The request ID was used before for a different command. → `ALREADY_EXISTS`.
    #[error("request_id was already used for a different command")]
    RequestIdReused,
    /// The store or the bus cannot be reached. → `UNAVAILABLE` (retry with the same request ID).
    #[error("unavailable: {0}")]
    Unavailable(String),
    /// The service already serves as many calls as it may at once (or
    /// holds as many request bodies as its budget allows, or as many
    /// refusals waiting for their audit entry) and none came free in time;
    /// nothing of the call ran, nothing was audited. → `UNAVAILABLE` with
    /// `ErrorInfo` `OVERLOADED` and a `RetryInfo` (retry with the same request ID).
    #[error("overloaded")]
    Overloaded,
    /// The caller holds as many of something as one caller may.
    /// → `RESOURCE_EXHAUSTED` with `ErrorInfo` `reason`.
    #[error("{message}")]
    ResourceExhausted {
        /// A stable code for the limit (`TOO_MANY_WATCHES`).
        reason: &'static str,
        /// A fixed sentence naming what, never whom.
        message: &'static str,
    },
    /// A bug or an unexpected failure; detail stays in the log. → `INTERNAL`.
    #[error("internal error: {0}")]
    Internal(String),
}

impl AppError {
    /// An `INVALID_ARGUMENT` error with a single violation.
    pub fn invalid(field: impl Into<String>, description: impl Into<String>) -> Self {
        Self::InvalidArgument(vec![FieldViolation::new(field, description)])
    }

    /// A `FAILED_PRECONDITION` error.
    pub fn precondition(reason: &'static str, subject: impl Into<String>, message: impl Into<String>) -> Self {
        Self::FailedPrecondition {
            reason,
            subject: subject.into(),
            message: message.into(),
        }
    }

    /// The gRPC code this error maps to.
    #[must_use]
    pub fn code(&self) -> Code {
        match self {
            Self::InvalidArgument(_) => Code::InvalidArgument,
            Self::Unauthenticated(_) => Code::Unauthenticated,
            Self::PermissionDenied(_) => Code::PermissionDenied,
            Self::NotFound { .. } => Code::NotFound,
            Self::Conflict { .. } => Code::Aborted,
            Self::FailedPrecondition { .. } => Code::FailedPrecondition,
            Self::RequestIdReused => Code::AlreadyExists,
            Self::Unavailable(_) | Self::Overloaded => Code::Unavailable,
            Self::ResourceExhausted { .. } => Code::ResourceExhausted,
            Self::Internal(_) => Code::Internal,
        }
    }
}

impl From<AppError> for tonic::Status {
    fn from(err: AppError) -> Self {
        let code = err.code();
        match err {
            AppError::InvalidArgument(violations) => {
                let fields: Vec<&str> = violations.iter().map(|v| v.field.as_str()).collect();
                let message = format!("invalid fields: {}", fields.join(", "));
                let details = ErrorDetails::with_bad_request(
                    violations
                        .iter()
                        .map(|v| tonic_types::FieldViolation::new(v.field.clone(), v.description.clone()))
                        .collect::<Vec<_>>(),
                );
                tonic::Status::with_error_details(code, message, details)
            }
            AppError::FailedPrecondition {
                reason,
                subject,
                message,
            } => {
                let mut details = ErrorDetails::with_precondition_failure_violation(reason, subject, message.clone());
                details.set_error_info(reason, ERROR_DOMAIN, HashMap::new());
                tonic::Status::with_error_details(code, message, details)
            }
            AppError::Conflict { .. } => {
                let message = err.to_string();
                let details = ErrorDetails::with_error_info("VERSION_CONFLICT", ERROR_DOMAIN, HashMap::new());
                tonic::Status::with_error_details(code, message, details)
            }
            AppError::Unavailable(detail) => {
                tracing::warn!(error = %detail, "dependency unavailable");
                tonic::Status::unavailable("the service cannot reach its store or bus; retry with the same request_id")
            }
            AppError::Overloaded => {
                // Not the limit: it would tell a caller how many calls to stall.
                let mut details = ErrorDetails::with_error_info("OVERLOADED", ERROR_DOMAIN, HashMap::new());
                details.set_retry_info(Some(RETRY_OVERLOADED));
                tonic::Status::with_error_details(
                    code,
                    "the service is serving as many calls as it can: nothing was done; retry in a moment with the same request_id",
                    details,
                )
            }
            AppError::ResourceExhausted { reason, message } => {
                let details = ErrorDetails::with_error_info(reason, ERROR_DOMAIN, HashMap::new());
                tonic::Status::with_error_details(code, message, details)
            }
            AppError::Internal(detail) => {
                tracing::error!(error = %detail, "internal error");
                tonic::Status::internal("internal error")
            }
            other => tonic::Status::new(code, other.to_string()),
        }
    }
}

impl From<sqlx::Error> for AppError {
    fn from(err: sqlx::Error) -> Self {
        // A restarting or unreachable PostgreSQL is retryable, never INTERNAL.
        if crate::retry::is_transient_sqlx(&err) {
            Self::Unavailable(err.to_string())
        } else {
            Self::Internal(err.to_string())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn invalid_argument_names_every_field_in_bad_request_details() {
        let status: tonic::Status = AppError::InvalidArgument(vec![
            FieldViolation::new("citizenship", "must be an ISO 3166-1 alpha-2 code"),
            FieldViolation::new("found_at", "is required"),
        ])
        .into();
        assert_eq!(status.code(), Code::InvalidArgument);
        assert!(status.message().contains("citizenship"));
        let details = status.get_details_bad_request().expect("bad request details");
        let fields: Vec<_> = details.field_violations.iter().map(|v| v.field.as_str()).collect();
        assert_eq!(fields, ["citizenship", "found_at"]);
    }

    #[test]
    fn internal_detail_never_reaches_the_caller() {
        let status: tonic::Status = AppError::Internal("db said: secret row".into()).into();
        assert_eq!(status.code(), Code::Internal);
        assert!(!status.message().contains("secret"));
    }

    #[test]
    fn an_overloaded_service_says_so_and_asks_for_a_pause() {
        let status: tonic::Status = AppError::Overloaded.into();
        assert_eq!(status.code(), Code::Unavailable);
        assert!(status.message().contains("nothing was done"));
        let details = status.get_error_details();
        assert_eq!(details.error_info().map(|i| i.reason.as_str()), Some("OVERLOADED"));
        assert_eq!(details.retry_info().and_then(|r| r.retry_delay), Some(RETRY_OVERLOADED));
    }

    #[test]
    fn precondition_carries_its_rule_code() {
        let status: tonic::Status = AppError::precondition("NOT_SCREENED", "case/1", "screen first").into();
        assert_eq!(status.code(), Code::FailedPrecondition);
        let pf = status.get_details_precondition_failure().expect("precondition details");
        assert_eq!(pf.violations[0].r#type, "NOT_SCREENED");
    }
}
