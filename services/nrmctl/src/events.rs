//! `events watch`: an ordered, ephemeral JetStream consumer that prints each
//! event commit as one JSON line, with every event's payload decoded from
//! its `payload_type` through the descriptor pool.

use std::pin::pin;

use anyhow::{Context, Result};
use async_nats::HeaderMap;
use async_nats::jetstream::{self, consumer::DeliverPolicy, consumer::pull::OrderedConfig};
use futures::StreamExt;
use prost_reflect::{DescriptorPool, DynamicMessage, Value as ProtoValue};
use serde_json::{Map, Value, json};

use crate::cli::WatchArgs;
use crate::output::{bytes_to_json, descriptor_pool, dynamic_to_json, emit};

/// The message type of every body on the bus.
const COMMIT_TYPE: &str = "nrm.common.v1.EventCommit";

/// Watches the stream until Ctrl-C, the end of the stream, or `--count`
/// messages.
///
/// # Errors
/// When NATS cannot be reached, the stream does not exist, or the consumer
/// fails.
pub async fn watch(args: WatchArgs) -> Result<()> {
    let pool = descriptor_pool()?;
    let client = async_nats::connect(&args.nats_url)
        .await
        .with_context(|| format!("cannot connect to NATS at {}", args.nats_url))?;
    let stream = jetstream::new(client)
        .get_stream(&args.stream)
        .await
        .with_context(|| format!("cannot open the JetStream stream {}", args.stream))?;
    let config = OrderedConfig {
        filter_subject: args.subject.clone().unwrap_or_default(),
        deliver_policy: if args.from_start {
            DeliverPolicy::All
        } else {
            DeliverPolicy::New
        },
        ..OrderedConfig::default()
    };
    let mut messages = stream
        .create_consumer(config)
        .await
        .context("creating the consumer")?
        .messages()
        .await
        .context("subscribing")?;
    let mut ctrl_c = pin!(tokio::signal::ctrl_c());
    let mut seen: u64 = 0;
    while args.count.is_none_or(|count| seen < count) {
        let message = tokio::select! {
            _ = &mut ctrl_c => break,
            next = messages.next() => match next {
                None => break,
                Some(message) => message.context("receiving from JetStream")?,
            },
        };
        let stream_sequence = message.info().map(|info| info.stream_sequence).ok();
        let line = render(
            &pool,
            stream_sequence,
            message.subject.as_str(),
            message.headers.as_ref(),
            &message.payload,
        );
        emit(&format!("{line}\n"))?;
        seen += 1;
    }
    Ok(())
}

/// One message as a line of JSON, keys in the documented order. A body
/// that does not decode is reported in an `error` field instead of stopping
/// the watch.
fn render(
    pool: &DescriptorPool,
    stream_sequence: Option<u64>,
    subject: &str,
    headers: Option<&HeaderMap>,
    body: &[u8],
) -> String {
    let headers = headers.map_or_else(|| json!({}), headers_json);
    let (commit, error) = match decode_commit(pool, body) {
        Ok(commit) => (commit, None),
        Err(error) => (Value::Null, Some(json!(format!("{error:#}")))),
    };
    let mut line = format!(
        r#"{{"stream_sequence":{},"subject":{},"headers":{headers},"commit":{commit}"#,
        json!(stream_sequence),
        json!(subject),
    );
    if let Some(error) = error {
        line.push_str(&format!(r#","error":{error}"#));
    }
    line.push('}');
    line
}

/// Headers as an object; a header with several values becomes an array.
fn headers_json(headers: &HeaderMap) -> Value {
    let mut object = Map::new();
    for (name, values) in headers.iter() {
        let mut values = values
            .iter()
            .map(|v| Value::String(v.as_str().to_owned()))
            .collect::<Vec<_>>();
        let value = if values.len() == 1 {
            values.remove(0)
        } else {
            Value::Array(values)
        };
        object.insert(name.to_string(), value);
    }
    Value::Object(object)
}

/// An `EventCommit` as JSON with each event's `payload` replaced by the
/// decoded message of the commit's `payload_type` (left as base64, with a
/// `payload_error`, when it does not decode).
fn decode_commit(pool: &DescriptorPool, body: &[u8]) -> Result<Value> {
    let descriptor = pool
        .get_message_by_name(COMMIT_TYPE)
        .with_context(|| format!("{COMMIT_TYPE} is not in the descriptor set"))?;
    let commit = DynamicMessage::decode(descriptor, body).context("the body is not an EventCommit")?;
    let payload_type = match commit.get_field_by_name("payload_type").as_deref() {
        Some(ProtoValue::String(name)) => name.clone(),
        _ => String::new(),
    };
    let payloads: Vec<Vec<u8>> = match commit.get_field_by_name("events").as_deref() {
        Some(ProtoValue::List(events)) => events
            .iter()
            .map(|event| {
                event
                    .as_message()
                    .and_then(|e| e.get_field_by_name("payload"))
                    .and_then(|p| p.as_bytes().map(|b| b.to_vec()))
                    .unwrap_or_default()
            })
            .collect(),
        _ => Vec::new(),
    };
    let mut json = dynamic_to_json(&commit)?;
    if let Some(Value::Array(events)) = json.get_mut("events") {
        for (event, payload) in events.iter_mut().zip(&payloads) {
            match bytes_to_json(pool, &payload_type, payload) {
                Ok(decoded) => {
                    event["payload"] = decoded;
                }
                Err(error) => {
                    event["payload_error"] = json!(format!("{error:#}"));
                }
            }
        }
    }
    Ok(json)
}

#[cfg(test)]
mod tests {
    use nrm_proto::common::v1::{CommittedEvent, EventCommit};
    use nrm_proto::identification::v1::{IdentificationEvent, Indicator, ScreeningCompleted, identification_event};
    use nrm_proto::referral::v1::{DeclineReason, ReferralDeclined, ReferralEvent, referral_event};
    use nrm_proto::shelter::v1::{BedCategory, BedHeld, ShelterEvent, shelter_event};
    use prost::Message;

    use super::*;

    fn commit(payload_type: &str, payload: Vec<u8>) -> Vec<u8> {
        EventCommit {
            commit_id: "commit-1".into(),
            stream_id: "case-1".into(),
            payload_type: payload_type.into(),
            events: vec![CommittedEvent {
                event_id: "event-1".into(),
                version: 2,
                event_type: "ScreeningCompleted".into(),
                schema_version: 1,
                recorded_at: None,
                payload,
            }],
        }
        .encode_to_vec()
    }

    #[test]
    fn a_commit_prints_with_its_payloads_decoded() {
        let event = IdentificationEvent {
            event: Some(identification_event::Event::ScreeningCompleted(ScreeningCompleted {
                case_id: "case-1".into(),
                indicators: vec![Indicator::Isolation.into()],
                screened_at: None,
            })),
        };
        let body = commit("nrm.identification.v1.IdentificationEvent", event.encode_to_vec());
        let mut headers = HeaderMap::new();
        headers.insert("Nrm-Stream-Version", "2");
        let pool = descriptor_pool().expect("pool");
        let text = render(
            &pool,
            Some(7),
            "nrm.identification.v1.case.case-1",
            Some(&headers),
            &body,
        );
        assert!(text.starts_with(r#"{"stream_sequence":7,"subject":"#), "{text}");
        let line: Value = serde_json::from_str(&text).expect("JSON");
        assert_eq!(line["stream_sequence"], 7);
        assert_eq!(line["headers"]["Nrm-Stream-Version"], "2");
        assert_eq!(line["commit"]["commit_id"], "commit-1");
        let payload = &line["commit"]["events"][0]["payload"];
        assert_eq!(payload["screening_completed"]["case_id"], "case-1");
        assert_eq!(payload["screening_completed"]["indicators"][0], "INDICATOR_ISOLATION");
    }

    #[test]
    fn an_anonymous_notification_decodes_like_any_identification_event() {
        use nrm_proto::common::v1::{AgeBand, Gender};
        use nrm_proto::identification::v1::{AnonymousNotificationFiled, ExploitationForm};
        let event = IdentificationEvent {
            event: Some(identification_event::Event::AnonymousNotificationFiled(
                AnonymousNotificationFiled {
                    notification_id: "notification-1".into(),
                    filed_on: Some(prost_types::Timestamp {
                        seconds: 1_772_582_400,
                        nanos: 0,
                    }),
                    found_country: "KG".into(),
                    country_of_exploitation: "RU".into(),
                    exploitation_forms: vec![ExploitationForm::Labour.into()],
                    gender: Gender::Female.into(),
                    age_band: AgeBand::AgeBand2534.into(),
                    citizenship: "KG".into(),
                },
            )),
        };
        let body = commit("nrm.identification.v1.IdentificationEvent", event.encode_to_vec());
        let pool = descriptor_pool().expect("pool");
        let line: Value = serde_json::from_str(&render(&pool, None, "s", None, &body)).expect("JSON");
        let payload = &line["commit"]["events"][0]["payload"]["anonymous_notification_filed"];
        assert_eq!(payload["notification_id"], "notification-1", "{line}");
        assert_eq!(payload["age_band"], "AGE_BAND_25_34");
        assert_eq!(payload["exploitation_forms"][0], "EXPLOITATION_FORM_LABOUR");
        assert_eq!(payload["filed_on"], "2026-03-04T00:00:00Z");
    }

    #[test]
    fn referral_and_shelter_payloads_decode_by_their_payload_type() {
        let pool = descriptor_pool().expect("pool");
        let event = ReferralEvent {
            event: Some(referral_event::Event::ReferralDeclined(ReferralDeclined {
                referral_id: "referral-1".into(),
                receiving_agency: "kg-msd".into(),
                reason: DeclineReason::NoCapacity.into(),
                declined_at: None,
            })),
        };
        let body = commit("nrm.referral.v1.ReferralEvent", event.encode_to_vec());
        let line: Value = serde_json::from_str(&render(&pool, None, "s", None, &body)).expect("JSON");
        let payload = &line["commit"]["events"][0]["payload"];
        assert_eq!(payload["referral_declined"]["reason"], "DECLINE_REASON_NO_CAPACITY");

        let event = ShelterEvent {
            event: Some(shelter_event::Event::BedHeld(BedHeld {
                shelter_id: "shelter-1".into(),
                hold_id: "hold-1".into(),
                category: BedCategory::Women.into(),
                referral_id: "referral-1".into(),
                expires_at: None,
                region: "KG-O".into(),
                holder_agency: "kg-msd".into(),
            })),
        };
        let body = commit("nrm.shelter.v1.ShelterEvent", event.encode_to_vec());
        let line: Value = serde_json::from_str(&render(&pool, None, "s", None, &body)).expect("JSON");
        let payload = &line["commit"]["events"][0]["payload"];
        assert_eq!(payload["bed_held"]["hold_id"], "hold-1");
        assert_eq!(payload["bed_held"]["category"], "BED_CATEGORY_WOMEN");
    }

    #[test]
    fn undecodable_bodies_and_payloads_are_reported_not_fatal() {
        let pool = descriptor_pool().expect("pool");
        let line: Value = serde_json::from_str(&render(&pool, None, "s", None, b"\xff\xff\xff")).expect("JSON");
        assert!(line["commit"].is_null());
        assert!(line["error"].is_string());

        let body = commit("nrm.nowhere.v1.Unknown", vec![1, 2, 3]);
        let line: Value = serde_json::from_str(&render(&pool, None, "s", None, &body)).expect("JSON");
        let event = &line["commit"]["events"][0];
        assert_eq!(event["payload"], "AQID", "left as base64");
        assert!(
            event["payload_error"]
                .as_str()
                .is_some_and(|e| e.contains("unknown message type"))
        );
    }
}
