//! Printing: any response as proto3 JSON through the descriptor pool (one
//! generic path, no printer per type), text helpers, and gRPC errors with
//! their field violations.

use std::fmt::Write as _;
use std::io::Write as _;

use anyhow::{Context, Result};
use prost_reflect::{DescriptorPool, DynamicMessage, SerializeOptions};
use tonic_types::StatusExt;

/// The descriptors of every Köpür message.
///
/// # Errors
/// When the embedded descriptor set does not decode (a build problem).
pub fn descriptor_pool() -> Result<DescriptorPool> {
    DescriptorPool::decode(nrm_proto::FILE_DESCRIPTOR_SET).context("decoding the embedded descriptor set")
}

/// How messages become JSON: proto field names, enums by name, default
/// values included (so `possible_duplicate: false` shows), 64-bit integers
/// as strings as proto3 JSON wants.
fn serialize_options() -> SerializeOptions {
    SerializeOptions::new()
        .use_proto_field_name(true)
        .skip_default_fields(false)
}

/// A dynamic message as JSON.
///
/// # Errors
/// When serialization fails.
pub fn dynamic_to_json(message: &DynamicMessage) -> Result<serde_json::Value> {
    message
        .serialize_with_options(serde_json::value::Serializer, &serialize_options())
        .context("converting a message to JSON")
}

/// Encoded `bytes` of the message type `full_name` as a dynamic message.
///
/// # Errors
/// When the type is unknown or the bytes are not such a message.
pub fn decode(pool: &DescriptorPool, full_name: &str, bytes: &[u8]) -> Result<DynamicMessage> {
    let descriptor = pool
        .get_message_by_name(full_name)
        .with_context(|| format!("unknown message type {full_name}"))?;
    DynamicMessage::decode(descriptor, bytes).with_context(|| format!("decoding {full_name}"))
}

/// Encoded `bytes` of the message type `full_name` as JSON.
///
/// # Errors
/// When the type is unknown or the bytes are not such a message.
pub fn bytes_to_json(pool: &DescriptorPool, full_name: &str, bytes: &[u8]) -> Result<serde_json::Value> {
    dynamic_to_json(&decode(pool, full_name, bytes)?)
}

/// `message`, of the protobuf type `full_name`, as pretty proto3 JSON with
/// the fields in `.proto` order.
///
/// # Errors
/// When the type is unknown to the descriptor pool.
pub fn to_pretty_json(full_name: &str, message: &impl prost::Message) -> Result<String> {
    let dynamic = decode(&descriptor_pool()?, full_name, &message.encode_to_vec())?;
    let mut out = Vec::new();
    dynamic
        .serialize_with_options(&mut serde_json::Serializer::pretty(&mut out), &serialize_options())
        .with_context(|| format!("converting {full_name} to JSON"))?;
    String::from_utf8(out).context("JSON is UTF-8")
}

/// Prints `message`, of the protobuf type `full_name`, as pretty proto3 JSON.
///
/// # Errors
/// When the type is unknown to the descriptor pool, or stdout cannot be
/// written.
pub fn print_json(full_name: &str, message: &impl prost::Message) -> Result<()> {
    emit(&format!("{}\n", to_pretty_json(full_name, message)?))
}

/// Writes `text` to stdout and flushes; an error (a closed pipe) instead of
/// `println!`'s panic.
///
/// # Errors
/// When stdout cannot be written.
pub fn emit(text: &str) -> Result<()> {
    let mut out = std::io::stdout().lock();
    out.write_all(text.as_bytes())?;
    out.flush()?;
    Ok(())
}

/// Prints `label: value` lines with the values aligned.
///
/// # Errors
/// When stdout cannot be written.
pub fn print_fields(fields: &[(&str, String)]) -> Result<()> {
    let width = fields.iter().map(|(label, _)| label.len()).max().unwrap_or(0) + 1;
    let mut out = String::new();
    for (label, value) in fields {
        let _ = writeln!(out, "{:<width$} {value}", format!("{label}:"), width = width);
    }
    emit(&out)
}

/// Prints a table with a header row, columns as wide as their widest cell.
///
/// # Errors
/// When stdout cannot be written.
pub fn print_table(header: &[&str], rows: &[Vec<String>]) -> Result<()> {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for row in rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.chars().count());
        }
    }
    let line = |cells: &mut dyn Iterator<Item = &str>| {
        let mut text = String::new();
        for (cell, width) in cells.zip(&widths) {
            let _ = write!(text, "{cell:<width$}  ");
        }
        text.trim_end().to_owned()
    };
    let mut out = line(&mut header.iter().copied());
    out.push('\n');
    for row in rows {
        out.push_str(&line(&mut row.iter().map(String::as_str)));
        out.push('\n');
    }
    emit(&out)
}

/// A timestamp as RFC 3339 in UTC, `-` when absent.
pub fn time(timestamp: Option<&prost_types::Timestamp>) -> String {
    timestamp
        .and_then(|t| chrono::DateTime::from_timestamp(t.seconds, u32::try_from(t.nanos).unwrap_or(0)))
        .map_or_else(
            || "-".to_owned(),
            |t| t.to_rfc3339_opts(chrono::SecondsFormat::AutoSi, true),
        )
}

/// `text`, or `-` when empty.
pub fn or_dash(text: &str) -> String {
    if text.is_empty() {
        "-".to_owned()
    } else {
        text.to_owned()
    }
}

/// Names joined by `,`, or `-` when there are none.
pub fn list(names: impl IntoIterator<Item = String>) -> String {
    or_dash(&names.into_iter().collect::<Vec<_>>().join(","))
}

/// Prints an error to stderr: for a gRPC status its code, message, field
/// violations and failed preconditions; otherwise the error and its causes.
pub fn print_error(error: &anyhow::Error) {
    eprint!("{}", describe_error(error));
}

/// The text [`print_error`] prints: `error: …` and detail lines, ending
/// with a newline.
pub fn describe_error(error: &anyhow::Error) -> String {
    let status = error.chain().find_map(|cause| cause.downcast_ref::<tonic::Status>());
    match status {
        Some(status) => describe_status(status),
        None => format!("error: {}\n", causes(error)),
    }
}

/// The error and its causes joined by `: `, skipping a cause whose text the
/// previous one already ends with (transport errors repeat themselves).
fn causes(error: &anyhow::Error) -> String {
    let mut text = String::new();
    for cause in error.chain().map(ToString::to_string) {
        if text.ends_with(&cause) {
            continue;
        }
        if !text.is_empty() {
            text.push_str(": ");
        }
        text.push_str(&cause);
    }
    text
}

/// `error: CODE: message`, one `  field: description` line per field
/// violation and one `  reason: RULE (subject)` line per failed precondition.
fn describe_status(status: &tonic::Status) -> String {
    let mut text = format!("error: {}", code_name(status.code()));
    if !status.message().is_empty() {
        let _ = write!(text, ": {}", status.message());
    }
    text.push('\n');
    if let Some(bad_request) = status.get_details_bad_request() {
        for violation in bad_request.field_violations {
            let _ = writeln!(text, "  {}: {}", violation.field, violation.description);
        }
    }
    if let Some(failure) = status.get_details_precondition_failure() {
        for violation in failure.violations {
            let _ = write!(text, "  reason: {}", violation.r#type);
            if !violation.subject.is_empty() {
                let _ = write!(text, " ({})", violation.subject);
            }
            text.push('\n');
        }
    }
    text
}

/// The code's name as in `google.rpc.Code` (`INVALID_ARGUMENT`).
fn code_name(code: tonic::Code) -> String {
    let camel = format!("{code:?}");
    let mut name = String::with_capacity(camel.len() + 4);
    for (i, c) in camel.chars().enumerate() {
        if c.is_ascii_uppercase() && i > 0 {
            name.push('_');
        }
        name.push(c.to_ascii_uppercase());
    }
    name
}

#[cfg(test)]
mod tests {
    use nrm_proto::identification::v1::{Case, CaseStatus, ExploitationForm};
    use tonic_types::{ErrorDetails, StatusExt};

    use super::*;

    #[test]
    fn a_status_shows_its_code_message_and_field_violations() {
        let mut details = ErrorDetails::new();
        details.add_bad_request_violation("found_country", "must be an ISO 3166-1 alpha-2 code");
        details.add_bad_request_violation("exploitation_forms", "name at least one form");
        let status = tonic::Status::with_error_details(tonic::Code::InvalidArgument, "invalid report", details);
        assert_eq!(
            describe_status(&status),
            "error: INVALID_ARGUMENT: invalid report\n  found_country: must be an ISO 3166-1 alpha-2 code\n  \
             exploitation_forms: name at least one form\n"
        );
        assert_eq!(
            describe_status(&tonic::Status::aborted("")),
            "error: ABORTED\n",
            "no message, no colon"
        );
        assert_eq!(code_name(tonic::Code::DeadlineExceeded), "DEADLINE_EXCEEDED");
    }

    #[test]
    fn a_failed_precondition_shows_its_rule() {
        let details =
            ErrorDetails::with_precondition_failure_violation("NO_CONSENT", "referral/r-1", "no consent covers it");
        let status =
            tonic::Status::with_error_details(tonic::Code::FailedPrecondition, "no consent covers it", details);
        assert_eq!(
            describe_status(&status),
            "error: FAILED_PRECONDITION: no consent covers it\n  reason: NO_CONSENT (referral/r-1)\n"
        );
        assert_eq!(
            describe_error(
                &anyhow::Error::new(tonic::Status::permission_denied("role police may not ListParked"))
                    .context("calling referral")
            ),
            "error: PERMISSION_DENIED: role police may not ListParked\n",
            "the status, wherever it is in the chain"
        );
    }

    #[test]
    fn messages_become_json_with_enum_names_and_defaults() {
        let case = Case {
            case_id: "c-1".into(),
            status: CaseStatus::Presumed.into(),
            version: 3,
            exploitation_forms: vec![ExploitationForm::ForcedBegging.into()],
            reported_at: Some(prost_types::Timestamp {
                seconds: 1_740_817_800,
                nanos: 0,
            }),
            ..Case::default()
        };
        let pool = descriptor_pool().expect("pool");
        let json = bytes_to_json(
            &pool,
            "nrm.identification.v1.Case",
            &prost::Message::encode_to_vec(&case),
        )
        .expect("a Case");
        assert_eq!(json["case_id"], "c-1");
        assert_eq!(json["status"], "CASE_STATUS_PRESUMED");
        assert_eq!(json["version"], "3");
        assert_eq!(json["exploitation_forms"][0], "EXPLOITATION_FORM_FORCED_BEGGING");
        assert_eq!(json["reported_at"], "2025-03-01T08:30:00Z");
        assert_eq!(json["possible_duplicate"], false);

        let pretty = to_pretty_json("nrm.identification.v1.Case", &case).expect("pretty");
        let at = |key: &str| pretty.find(&format!("\"{key}\"")).expect(key);
        assert!(at("case_id") < at("status") && at("status") < at("version"), "{pretty}");
    }

    #[test]
    fn times_print_in_utc_or_as_a_dash() {
        let t = prost_types::Timestamp {
            seconds: 1_740_817_800,
            nanos: 0,
        };
        assert_eq!(time(Some(&t)), "2025-03-01T08:30:00Z");
        assert_eq!(time(None), "-");
    }
}
