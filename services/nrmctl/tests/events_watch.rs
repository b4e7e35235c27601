//! `nrmctl events watch` against a real NATS JetStream server (ignored by
//! default: start one, e.g. `nats-server -js -p 14222`, then
//! `NRM_NATS__URL=nats://127.0.0.1:14222 cargo test -p nrmctl -- --ignored`).
//! Each run uses its own stream and subject prefix.

use async_nats::HeaderMap;
use nrm_proto::common::v1::{CommittedEvent, EventCommit};
use nrm_proto::identification::v1::{
    ExploitationForm, IdentificationEvent, PresumedVictimReported, identification_event,
};
use prost::Message;

fn nats_url() -> String {
    std::env::var("NRM_NATS__URL").unwrap_or_else(|_| "nats://127.0.0.1:14222".into())
}

fn commit(case_id: &str, version: u64) -> EventCommit {
    let event = IdentificationEvent {
        event: Some(identification_event::Event::PresumedVictimReported(
            PresumedVictimReported {
                case_id: case_id.into(),
                exploitation_forms: vec![ExploitationForm::Labour.into()],
                ..PresumedVictimReported::default()
            },
        )),
    };
    EventCommit {
        commit_id: format!("commit-{version}"),
        stream_id: format!("case-{case_id}"),
        payload_type: "nrm.identification.v1.IdentificationEvent".into(),
        events: vec![CommittedEvent {
            event_id: format!("event-{version}"),
            version,
            event_type: "PresumedVictimReported".into(),
            schema_version: 1,
            recorded_at: Some(prost_types::Timestamp {
                seconds: 1_740_817_800,
                nanos: 0,
            }),
            payload: event.encode_to_vec(),
        }],
    }
}

#[tokio::test]
#[ignore = "needs NATS JetStream at NRM_NATS__URL (default nats://127.0.0.1:14222)"]
async fn watch_prints_each_commit_with_headers_and_decoded_payloads() {
    let url = nats_url();
    let client = async_nats::connect(&url).await.expect("NATS");
    let js = async_nats::jetstream::new(client);
    let tag = uuid::Uuid::now_v7().simple().to_string();
    let prefix = format!("t{tag}");
    let stream = format!("T{tag}_IDENTIFICATION");
    js.create_stream(async_nats::jetstream::stream::Config {
        name: stream.clone(),
        subjects: vec![format!("{prefix}.identification.v1.>")],
        ..Default::default()
    })
    .await
    .expect("stream");
    for (case, version) in [("a", 1), ("b", 1), ("a", 2)] {
        let mut headers = HeaderMap::new();
        headers.insert("Nrm-Stream-Version", version.to_string().as_str());
        headers.insert("Nats-Msg-Id", format!("commit-{case}-{version}").as_str());
        js.publish_with_headers(
            format!("{prefix}.identification.v1.case.{case}"),
            headers,
            commit(case, version).encode_to_vec().into(),
        )
        .await
        .expect("publish")
        .await
        .expect("ack");
    }

    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_nrmctl"))
        .args(["events", "watch", "--nats-url", &url, "--stream", &stream])
        .args(["--subject", &format!("{prefix}.identification.v1.case.a")])
        .args(["--from-start", "--count", "2"])
        .output()
        .await
        .expect("nrmctl runs");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let lines: Vec<serde_json::Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|line| serde_json::from_str(line).expect("one JSON object a line"))
        .collect();
    assert_eq!(lines.len(), 2);
    assert_eq!(lines[0]["stream_sequence"], 1);
    assert_eq!(lines[1]["stream_sequence"], 3, "only case a");
    assert_eq!(lines[1]["headers"]["Nrm-Stream-Version"], "2");
    let event = &lines[0]["commit"]["events"][0];
    assert_eq!(event["recorded_at"], "2025-03-01T08:30:00Z");
    assert_eq!(
        event["payload"]["presumed_victim_reported"]["exploitation_forms"][0],
        "EXPLOITATION_FORM_LABOUR"
    );

    js.delete_stream(&stream).await.expect("clean up");
}
