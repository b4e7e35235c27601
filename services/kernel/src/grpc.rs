//! What every RPC of every service does around its application call: the
//! caller comes from the gate ([`crate::gate::context`]), which verified it
//! and checked the permission matrix; on the way out errors are counted and
//! mapped to `tonic::Status`.

use tonic::{Response, Status};

use crate::error::AppError;

/// Metadata key of the correlation ID a caller may send.
pub const CORRELATION_ID: &str = "x-correlation-id";

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
