//! The kernel's cross-border parts on one real NATS server: the outgoing
//! stream of a partner holds exactly what is meant for it, the streams are
//! checked against what the server keeps, and a projection on a named
//! stream applies sealed crossing messages strictly in order, once.
//! (Two servers joined by a leaf node are tested on top of these parts.)

#![allow(clippy::unwrap_used)] // Test code: a failed unwrap is a failed test.

use std::time::Duration;

use async_nats::jetstream;
use futures::StreamExt as _;
use nrm_e2e::Parts;
use nrm_e2e::fixtures::metadata;
use nrm_kernel::bus::{Bus, BusError};
use nrm_kernel::projection::{Delivery, Outcome, Projection, ProjectionRunner, Source};
use nrm_kernel::relay::{Relay, RelayConfig};
use nrm_kernel::store::{EventStore, NewEvent, UnitOfWork};
use nrm_kernel::xborder::{self, CountryCode, CountryKey, OUTBOUND_PAYLOAD_TYPE};
use nrm_proto::common::v1::EventCommit;
use nrm_proto::repatriation::v1::{CrossBorderMessage, CrossBorderReturn};
use prost::Message as _;
use sqlx::PgConnection;
use uuid::Uuid;

fn cc(code: &str) -> CountryCode {
    CountryCode::parse("country", code).unwrap()
}

/// Every message of the stream `name`, in order.
async fn stream_messages(bus: &Bus, name: &str) -> Vec<jetstream::message::StreamMessage> {
    nrm_e2e::messages(bus.jetstream(), name).await
}

/// Waits until the stream `name` holds a message on `subject`; returns them all.
async fn wait_for_subject(bus: &Bus, name: &str, subject: &str) -> Vec<jetstream::message::StreamMessage> {
    for _ in 0..200 {
        let messages = stream_messages(bus, name).await;
        if messages.iter().any(|m| m.subject.as_str() == subject) {
            return messages;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("no message on {subject} in {name} after 10 s");
}

/// Waits until the stream `name` holds `count` messages; returns them.
async fn wait_for_count(bus: &Bus, name: &str, count: usize) -> Vec<jetstream::message::StreamMessage> {
    for _ in 0..200 {
        let messages = stream_messages(bus, name).await;
        if messages.len() >= count {
            return messages;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("fewer than {count} messages in {name} after 10 s");
}

async fn delete_streams(bus: &Bus, names: &[String]) {
    for name in names {
        let _ = bus.jetstream().delete_stream(name).await;
    }
}

/// Publishes `payload` on `subject` and waits for JetStream's acknowledgement.
async fn publish(bus: &Bus, subject: String, payload: &'static str) {
    bus.jetstream()
        .publish(subject, payload.into())
        .await
        .unwrap()
        .await
        .unwrap();
}

#[tokio::test]
async fn the_outgoing_stream_of_a_partner_holds_exactly_what_is_meant_for_it() {
    let parts = Parts::new().await;
    let bus = parts.bus.clone();
    let (kg, tj) = (cc("kg"), cc("tj"));
    bus.ensure_stream("repatriation").await.unwrap();
    let out_kg = bus.ensure_outbound_stream(&kg).await.unwrap();
    bus.ensure_outbound_stream(&tj).await.unwrap();
    // Ensured again: found as it is, and still what was asked for.
    bus.ensure_outbound_stream(&kg).await.unwrap();
    let config = out_kg.cached_info().config.clone();
    assert!(config.subjects.is_empty(), "{:?}", config.subjects);
    let sources = config.sources.unwrap();
    assert_eq!(sources.len(), 1);
    assert_eq!(sources[0].name, bus.stream_name("repatriation"));
    assert_eq!(
        sources[0].filter_subject.as_deref(),
        Some(bus.outbound_filter(&kg).as_str())
    );

    let kg_subjects: Vec<String> = (0..3)
        .map(|_| bus.outbound_subject(&kg, &Uuid::now_v7().to_string()))
        .collect();
    let tj_subjects: Vec<String> = (0..2)
        .map(|_| bus.outbound_subject(&tj, &Uuid::now_v7().to_string()))
        .collect();
    let domestic = bus.subject("repatriation", "return", &Uuid::now_v7().to_string());
    let identification = bus.subject("identification", "case", &Uuid::now_v7().to_string());
    // Interleaved: domestic events of both contexts, and crossings for both partners.
    publish(&bus, domestic.clone(), "domestic return").await;
    publish(&bus, kg_subjects[0].clone(), "for kg 1").await;
    publish(&bus, tj_subjects[0].clone(), "for tj 1").await;
    publish(&bus, identification.clone(), "domestic case").await;
    publish(&bus, kg_subjects[1].clone(), "for kg 2").await;
    publish(&bus, domestic.clone(), "domestic return again").await;
    publish(&bus, tj_subjects[1].clone(), "for tj 2").await;
    publish(&bus, kg_subjects[2].clone(), "for kg 3").await;
    // Markers, last: once a marker is there, everything published before it
    // that the source lets through is there too (sourcing keeps order).
    let kg_marker = bus.outbound_subject(&kg, "marker");
    let tj_marker = bus.outbound_subject(&tj, "marker");
    publish(&bus, kg_marker.clone(), "kg marker").await;
    publish(&bus, tj_marker.clone(), "tj marker").await;

    let held = wait_for_subject(&bus, &bus.outbound_stream_name(&kg), &kg_marker).await;
    let subjects: Vec<&str> = held.iter().map(|m| m.subject.as_str()).collect();
    let mut expected: Vec<&str> = kg_subjects.iter().map(String::as_str).collect();
    expected.push(&kg_marker);
    assert_eq!(subjects, expected, "XB_OUT_KG holds exactly the kg crossings, in order");
    let payloads: Vec<&[u8]> = held.iter().map(|m| m.payload.as_ref()).collect();
    assert_eq!(
        payloads,
        [&b"for kg 1"[..], b"for kg 2", b"for kg 3", b"kg marker"],
        "unchanged on the way"
    );

    let held = wait_for_subject(&bus, &bus.outbound_stream_name(&tj), &tj_marker).await;
    let subjects: Vec<&str> = held.iter().map(|m| m.subject.as_str()).collect();
    assert_eq!(subjects, [tj_subjects[0].as_str(), &tj_subjects[1], &tj_marker]);

    delete_streams(
        &bus,
        &[
            bus.outbound_stream_name(&kg),
            bus.outbound_stream_name(&tj),
            bus.stream_name("repatriation"),
        ],
    )
    .await;
    parts.drop_all().await;
}

#[tokio::test]
async fn a_cross_border_stream_unlike_the_one_asked_for_is_refused() {
    let parts = Parts::new().await;
    let bus = parts.bus.clone();
    let (uz, kg, ru) = (cc("uz"), cc("kg"), cc("ru"));
    // Someone made XB_OUT_UZ by hand, with another partner's filter.
    bus.jetstream()
        .create_stream(jetstream::stream::Config {
            name: bus.outbound_stream_name(&uz),
            sources: Some(vec![jetstream::stream::Source {
                name: bus.stream_name("repatriation"),
                filter_subject: Some(bus.outbound_filter(&kg)),
                ..Default::default()
            }]),
            ..Default::default()
        })
        .await
        .unwrap();
    let err = bus.ensure_outbound_stream(&uz).await.unwrap_err();
    assert!(
        matches!(&err, BusError::ConfigMismatch { difference, .. } if difference == "sources[0].filter_subject"),
        "{err}"
    );

    // The incoming stream from ru: the server keeps its external API.
    let inbound = bus.ensure_inbound_stream(&ru, &kg).await.unwrap();
    let source = &inbound.cached_info().config.sources.clone().unwrap()[0];
    assert_eq!(source.name, bus.outbound_stream_name(&kg));
    assert_eq!(
        source.filter_subject.as_deref(),
        Some(bus.outbound_filter(&kg).as_str())
    );
    assert_eq!(source.external.as_ref().unwrap().api_prefix, "$JS.ru.API");
    bus.ensure_inbound_stream(&ru, &kg).await.unwrap();
    // The same stream asked for from another partner's domain is refused.
    let err = bus.ensure_inbound_stream(&ru, &uz).await.unwrap_err();
    assert!(matches!(&err, BusError::ConfigMismatch { .. }), "{err}");

    delete_streams(&bus, &[bus.outbound_stream_name(&uz), bus.inbound_stream_name(&ru)]).await;
    parts.drop_all().await;
}

/// A read model of what crossed: each message opened with the country's
/// key, one row per message, with the stream sequence it came at.
struct Crossed {
    key: CountryKey,
}

impl Projection for Crossed {
    fn name(&self) -> &'static str {
        "xb_test_crossed"
    }

    async fn apply(&self, uow: &mut UnitOfWork, delivery: &Delivery) -> Result<(), anyhow::Error> {
        anyhow::ensure!(delivery.commit.payload_type == OUTBOUND_PAYLOAD_TYPE, "not a crossing");
        for event in &delivery.commit.events {
            let message = CrossBorderMessage::decode(event.payload.as_slice())?;
            let country = |field: &str, code: &str| {
                CountryCode::parse(field, code).map_err(|v| anyhow::anyhow!("{} {}", v.field, v.description))
            };
            let aad = xborder::aad(
                &country("from_country", &message.from_country)?,
                &country("to_country", &message.to_country)?,
                &message.return_id,
                message.origin_version,
            );
            let sealed = message
                .sealed
                .as_ref()
                .ok_or_else(|| anyhow::anyhow!("nothing sealed"))?;
            let inner =
                CrossBorderReturn::decode(xborder::open(&self.key, self.key.public(), &aad, sealed)?.as_slice())?;
            anyhow::ensure!(inner.return_id == message.return_id, "another return inside");
            sqlx::query(
                "INSERT INTO xb_test_crossed (seq, return_id, origin_version, carrier) VALUES ($1, $2, $3, $4)",
            )
            .bind(i64::try_from(delivery.stream_sequence)?)
            .bind(&message.return_id)
            .bind(i64::try_from(message.origin_version)?)
            .bind(&inner.carrier)
            .execute(uow.conn())
            .await?;
        }
        Ok(())
    }

    async fn reset(&self, conn: &mut PgConnection) -> Result<(), anyhow::Error> {
        sqlx::query("DELETE FROM xb_test_crossed").execute(conn).await?;
        Ok(())
    }
}

/// Appends crossing message `version` of `return_id` for `to`, sealed to `key`.
async fn append_crossing(
    store: &EventStore,
    bus: &Bus,
    to: &CountryCode,
    key: &CountryKey,
    return_id: &str,
    version: u64,
) {
    let ru = cc("ru");
    let inner = CrossBorderReturn {
        return_id: return_id.to_owned(),
        from_country: ru.to_string(),
        to_country: to.to_string(),
        origin_version: version,
        carrier: format!("flight {version}"),
        ..Default::default()
    };
    let message = CrossBorderMessage {
        return_id: return_id.to_owned(),
        from_country: ru.to_string(),
        to_country: to.to_string(),
        origin_version: version,
        // Sealed by the same key pair it is sealed to: this test is about
        // the streams, not who sends.
        sealed: Some(xborder::seal(
            key,
            key.public(),
            &xborder::aad(&ru, to, return_id, version),
            &inner.encode_to_vec(),
        )),
    };
    let mut uow = store.begin().await.unwrap();
    uow.append(
        &format!("xborder-{to}-{return_id}"),
        version - 1,
        &[NewEvent {
            event_type: "CrossBorderMessage".into(),
            schema_version: 1,
            payload: message.encode_to_vec(),
        }],
        &metadata(),
        &bus.outbound_subject(to, return_id),
    )
    .await
    .unwrap();
    uow.commit().await.unwrap();
}

async fn crossed(pool: &sqlx::PgPool) -> Vec<(i64, String, i64, String)> {
    sqlx::query_as("SELECT seq, return_id, origin_version, carrier FROM xb_test_crossed ORDER BY seq")
        .fetch_all(pool)
        .await
        .unwrap()
}

async fn checkpoint(pool: &sqlx::PgPool, projection: &str) -> Option<(i64, Option<String>, Option<i64>)> {
    sqlx::query_as(
        "SELECT stream_sequence, stream_name, stream_created FROM projection_checkpoints WHERE projection = $1",
    )
    .bind(projection)
    .fetch_optional(pool)
    .await
    .unwrap()
}

#[tokio::test]
async fn a_projection_on_a_named_stream_applies_sealed_crossings_in_order_once() {
    let parts = Parts::new().await;
    let bus = parts.bus.clone();
    let store = EventStore::new(parts.pool.clone());
    sqlx::query(
        "CREATE TABLE xb_test_crossed (seq BIGINT PRIMARY KEY, return_id TEXT NOT NULL, origin_version BIGINT NOT NULL, carrier TEXT NOT NULL)",
    )
    .execute(&parts.pool)
    .await
    .unwrap();
    let (kg, tj) = (cc("kg"), cc("tj"));
    let kg_key = CountryKey::generate();
    let tj_key = CountryKey::generate();
    bus.ensure_stream("repatriation").await.unwrap();
    bus.ensure_outbound_stream(&kg).await.unwrap();

    // Two returns for kg, interleaved, and one for tj between them.
    let (a, b, c) = (
        Uuid::now_v7().to_string(),
        Uuid::now_v7().to_string(),
        Uuid::now_v7().to_string(),
    );
    let plan: [(&CountryCode, &CountryKey, &str, u64); 6] = [
        (&kg, &kg_key, &a, 1),
        (&kg, &kg_key, &b, 1),
        (&tj, &tj_key, &c, 1),
        (&kg, &kg_key, &a, 2),
        (&kg, &kg_key, &a, 3),
        (&kg, &kg_key, &b, 2),
    ];
    for (to, key, return_id, version) in plan {
        append_crossing(&store, &bus, to, key, return_id, version).await;
    }
    let mut relay = Relay::new(
        parts.pool.clone(),
        bus.clone(),
        "repatriation",
        store.appended_signal(),
        RelayConfig::new(OUTBOUND_PAYLOAD_TYPE),
    );
    parts.publish_all(&mut relay).await;
    let out = bus.outbound_stream_name(&kg);
    let last = wait_for_count(&bus, &out, 5).await;
    // What the stream holds, in its order: the kg crossings, each once (the
    // relay keeps each return's versions in order, not the order of
    // commits across returns).
    let held: Vec<(String, i64)> = last
        .iter()
        .map(|m| {
            let commit = EventCommit::decode(m.payload.as_ref()).unwrap();
            let message = CrossBorderMessage::decode(commit.events[0].payload.as_slice()).unwrap();
            (message.return_id, i64::try_from(message.origin_version).unwrap())
        })
        .collect();
    let mut sorted = held.clone();
    sorted.sort();
    let mut planned: Vec<(String, i64)> = plan
        .iter()
        .filter(|(to, ..)| **to == kg)
        .map(|(_, _, id, v)| ((*id).to_owned(), i64::try_from(*v).unwrap()))
        .collect();
    planned.sort();
    assert_eq!(sorted, planned, "XB_OUT_KG holds the kg crossings only, each once");

    let source = Source::new(out.clone(), bus.outbound_filter(&kg));
    let runner = || {
        ProjectionRunner::on_source(
            EventStore::new(parts.pool.clone()),
            bus.clone(),
            source.clone(),
            Crossed { key: kg_key.clone() },
        )
    };

    // Delivered out of order: the second message first moves nothing.
    let consumer = bus
        .find_stream_named(&out)
        .await
        .unwrap()
        .create_consumer(jetstream::consumer::pull::OrderedConfig {
            filter_subject: source.filter().to_owned(),
            ..Default::default()
        })
        .await
        .unwrap();
    let mut messages = consumer.messages().await.unwrap();
    let first = messages.next().await.unwrap().unwrap();
    let second = messages.next().await.unwrap().unwrap();
    let early = runner().handle(&second).await;
    assert!(early.is_err(), "a message after a gap is not applied: {early:?}");
    assert!(crossed(&parts.pool).await.is_empty());
    assert_eq!(runner().handle(&first).await.unwrap(), Outcome::Applied);
    assert_eq!(runner().handle(&first).await.unwrap(), Outcome::AlreadyApplied);
    assert_eq!(crossed(&parts.pool).await.len(), 1);
    drop(messages);

    // The runner takes the rest from its checkpoint, in order, each once.
    let shutdown = tokio_util::sync::CancellationToken::new();
    let task = tokio::spawn(runner().run(shutdown.clone()));
    let last_sequence = i64::try_from(last.last().unwrap().sequence).unwrap();
    for _ in 0..200 {
        if checkpoint(&parts.pool, "xb_test_crossed").await.map(|c| c.0) == Some(last_sequence) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    shutdown.cancel();
    task.await.unwrap();
    let (at, stream_name, created) = checkpoint(&parts.pool, "xb_test_crossed").await.unwrap();
    assert_eq!(at, last_sequence, "the checkpoint reached the last crossing");
    assert_eq!(stream_name.as_deref(), Some(out.as_str()));
    assert!(created.is_some(), "the checkpoint keeps the stream's identity");
    let rows = crossed(&parts.pool).await;
    let sequences: Vec<i64> = rows.iter().map(|r| r.0).collect();
    assert_eq!(
        sequences,
        (1..=last_sequence).collect::<Vec<_>>(),
        "every sequence once, in order"
    );
    let got: Vec<(String, i64)> = rows.iter().map(|r| (r.1.clone(), r.2)).collect();
    assert_eq!(got, held, "the crossings in stream order");
    for return_id in [&a, &b] {
        let versions: Vec<i64> = got.iter().filter(|g| &g.0 == return_id).map(|g| g.1).collect();
        assert!(versions.is_sorted(), "{versions:?}: each return in version order");
    }
    assert!(
        rows.iter().all(|r| r.3 == format!("flight {}", r.2)),
        "opened with kg's key"
    );

    // A rebuild from the stream gives the same read model.
    runner().rebuild().await.unwrap();
    assert_eq!(crossed(&parts.pool).await, rows);

    delete_streams(&bus, &[out, bus.stream_name("repatriation")]).await;
    parts.drop_all().await;
}

/// A reaction that only counts: nothing of the inbound stream is needed here.
struct Counting;

impl Projection for Counting {
    fn name(&self) -> &'static str {
        "xb_test_inbound"
    }

    async fn apply(&self, _uow: &mut UnitOfWork, _delivery: &Delivery) -> Result<(), anyhow::Error> {
        Ok(())
    }

    async fn reset(&self, _conn: &mut PgConnection) -> Result<(), anyhow::Error> {
        Ok(())
    }
}

#[tokio::test]
async fn a_runner_on_an_inbound_source_waits_for_the_stream_then_takes_it() {
    let parts = Parts::new().await;
    let bus = parts.bus.clone();
    let (ru, kg) = (cc("ru"), cc("kg"));
    let source = Source::inbound(&bus, &ru);
    assert_eq!(source.stream(), bus.inbound_stream_name(&ru));
    assert_eq!(
        Source::context(&bus, "identification"),
        Source::new(
            bus.stream_name("identification"),
            bus.context_subjects("identification")
        )
    );
    let runner = ProjectionRunner::on_source(EventStore::new(parts.pool.clone()), bus.clone(), source, Counting);
    let shutdown = tokio_util::sync::CancellationToken::new();
    let task = tokio::spawn(runner.run(shutdown.clone()));
    // It says which stream it waits for, and creates none.
    let mut waiting = None;
    for _ in 0..200 {
        waiting = checkpoint(&parts.pool, "xb_test_inbound").await;
        if waiting.is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (at, name, created) = waiting.expect("the runner records the stream it waits for");
    assert_eq!(
        (at, name.as_deref(), created),
        (0, Some(bus.inbound_stream_name(&ru).as_str()), None)
    );
    assert!(matches!(
        bus.find_stream_named(&bus.inbound_stream_name(&ru)).await,
        Err(BusError::NoStream(_))
    ));

    bus.ensure_inbound_stream(&ru, &kg).await.unwrap();
    let mut taken = false;
    for _ in 0..200 {
        if checkpoint(&parts.pool, "xb_test_inbound")
            .await
            .is_some_and(|c| c.2.is_some())
        {
            taken = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    shutdown.cancel();
    task.await.unwrap();
    assert!(taken, "the runner took the stream once it existed");

    delete_streams(&bus, &[bus.inbound_stream_name(&ru)]).await;
    parts.drop_all().await;
}
