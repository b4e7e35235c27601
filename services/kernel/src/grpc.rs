//! What every RPC of every service does around its application call: verify
//! the caller and read the call's correlation on the way in, count errors and
//! map them to `tonic::Status` on the way out.

use tonic::{Request, Response, Status};
use uuid::Uuid;

use crate::auth::{Authenticator, Role};
use crate::command::CallContext;
use crate::error::AppError;

/// Metadata key of the correlation ID a caller may send.
pub const CORRELATION_ID: &str = "x-correlation-id";

/// The context of a call: the caller verified from its bearer token, and the
/// correlation ID from `x-correlation-id` (a new one when it is missing or not
/// a UUID).
///
/// # Errors
/// `UNAUTHENTICATED` when the token is missing or does not verify.
pub async fn call_context<T>(auth: &Authenticator, request: &Request<T>) -> Result<CallContext, Status> {
    let context = verified(auth, request).await?;
    // The operator role reaches the operator's service only, whatever agency
    // its token names: it reads no case, person, referral or shelter.
    if matches!(context.caller.role, Role::Operator | Role::Auditor) {
        metrics::counter!("nrm_grpc_errors_total", "code" => "PermissionDenied").increment(1);
        return Err(AppError::PermissionDenied(
            "the operator and auditor roles may call their own services only".into(),
        )
        .into());
    }
    Ok(context)
}

/// The context of a call to the operator's service: any verified caller (the
/// service itself checks the role, so that a refused attempt is audited).
///
/// # Errors
/// `UNAUTHENTICATED` when the token is missing or does not verify.
pub async fn operator_call_context<T>(auth: &Authenticator, request: &Request<T>) -> Result<CallContext, Status> {
    verified(auth, request).await
}

async fn verified<T>(auth: &Authenticator, request: &Request<T>) -> Result<CallContext, Status> {
    let caller = auth.verify(request.metadata()).await?;
    let correlation_id = request
        .metadata()
        .get(CORRELATION_ID)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<Uuid>().ok())
        .unwrap_or_else(Uuid::now_v7);
    Ok(CallContext { caller, correlation_id })
}

/// The response of an application call; an error is counted in
/// `nrm_grpc_errors_total` by code and mapped to its status.
///
/// # Errors
/// The status of the application's error.
pub fn reply<T>(result: Result<T, AppError>) -> Result<Response<T>, Status> {
    match result {
        Ok(value) => Ok(Response::new(value)),
        Err(err) => {
            metrics::counter!("nrm_grpc_errors_total", "code" => format!("{:?}", err.code())).increment(1);
            Err(err.into())
        }
    }
}
