//! What every gRPC command shares: a channel that sends the caller's bearer
//! token with each call, client request IDs, the current time, and the
//! summary of a `CommandResult`.

use std::time::Duration;

use anyhow::{Context, Result};
use nrm_proto::common::v1::CommandResult;
use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::Interceptor;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, Endpoint};

use crate::cli::{Global, Output, RequestId};
use crate::output::{self, print_fields, print_json};
use crate::token;

/// How long to wait for the connection to a service.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// A channel whose calls carry the caller's bearer token; every generated
/// client takes it (`ShelterServiceClient::new(channel)`).
pub type AuthChannel = InterceptedService<Channel, Bearer>;

/// Adds `authorization: Bearer …` to every call, when there is a token.
#[derive(Clone)]
pub struct Bearer(Option<MetadataValue<Ascii>>);

impl Interceptor for Bearer {
    fn call(&mut self, mut request: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(bearer) = &self.0 {
            request.metadata_mut().insert("authorization", bearer.clone());
        }
        Ok(request)
    }
}

/// Connects to `endpoint` with the token of the global options
/// (`--token`, or a self-minted one).
///
/// # Errors
/// When the token cannot be minted or is not header text, the endpoint is
/// not a URL, or the service cannot be reached.
pub async fn connect(global: &Global, endpoint: &str) -> Result<AuthChannel> {
    let bearer = token::bearer(global)?
        .map(|token| format!("Bearer {token}").parse::<MetadataValue<Ascii>>())
        .transpose()
        .context("the token is not valid header text")?
        .map(|mut value| {
            value.set_sensitive(true);
            value
        });
    let channel = Endpoint::from_shared(endpoint.to_owned())
        .with_context(|| format!("'{endpoint}' is not an endpoint URL"))?
        .connect_timeout(CONNECT_TIMEOUT)
        .connect()
        .await
        .with_context(|| format!("cannot connect to {endpoint}"))?;
    Ok(InterceptedService::new(channel, Bearer(bearer)))
}

/// The request ID given, or a fresh UUIDv7. In JSON mode stdout holds only
/// the response, so the ID to retry with goes to stderr; text output prints
/// it with the summary.
pub fn request_id(request: RequestId, output: Output) -> String {
    let request_id = request.request_id.unwrap_or_else(|| uuid::Uuid::now_v7().to_string());
    if output == Output::Json {
        eprintln!("request_id: {request_id}");
    }
    request_id
}

/// The time now, as a protobuf timestamp.
pub fn now() -> prost_types::Timestamp {
    let now = chrono::Utc::now();
    prost_types::Timestamp {
        seconds: now.timestamp(),
        nanos: i32::try_from(now.timestamp_subsec_nanos()).unwrap_or(0),
    }
}

/// Prints the answer of a command on an existing aggregate; in text the
/// aggregate ID is labelled `id_label` (`case_id`, `referral_id`, …).
///
/// # Errors
/// When stdout cannot be written.
pub fn print_result(output: Output, result: &CommandResult, id_label: &str, request_id: &str) -> Result<()> {
    match output {
        Output::Json => print_json("nrm.common.v1.CommandResult", result),
        Output::Text => print_fields(&[
            (id_label, result.aggregate_id.clone()),
            ("version", result.version.to_string()),
            ("events", output::list(result.event_ids.iter().cloned())),
            ("replayed", result.replayed.to_string()),
            ("request_id", request_id.to_owned()),
        ]),
    }
}

/// Text summary of a command that creates something: `fields` (the new IDs
/// and the like), then the result's version, whether it was replayed, and
/// the request ID.
///
/// # Errors
/// When stdout cannot be written.
pub fn print_created(mut fields: Vec<(&str, String)>, result: Option<&CommandResult>, request_id: &str) -> Result<()> {
    let result = result.cloned().unwrap_or_default();
    fields.extend([
        ("version", result.version.to_string()),
        ("replayed", result.replayed.to_string()),
        ("request_id", request_id.to_owned()),
    ]);
    print_fields(&fields)
}
