//! The cross-border link on its own, as deploy/federation configures it:
//! two nats-servers (`ru` the hub, `kg` its leaf over TLS), the streams the
//! kernel makes for them (`Bus::ensure_outbound_stream` in ru,
//! `Bus::ensure_inbound_stream` in kg), raw messages published in ru.
//!
//! - What crosses: exactly the messages meant for kg; nothing domestic,
//!   nothing meant for a third country reaches any subscriber in kg, and the
//!   link's credentials open nothing else of ru.
//! - A link cut: kg stopped (or killed), thousands of messages published
//!   in ru meanwhile, kg started again: kg ends with each of them once.

#![allow(clippy::unwrap_used)] // Test code: a failed unwrap is a failed test.

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_nats::HeaderMap;
use async_nats::jetstream;
use futures::StreamExt as _;
use nrm_e2e::federation::{Federation, Side};
use nrm_kernel::bus::Bus;
use nrm_kernel::xborder::CountryCode;

fn cc(code: &str) -> CountryCode {
    CountryCode::parse("country", code).unwrap()
}

/// ru's and kg's buses, with ru's domestic identification and repatriation
/// streams, ru's outgoing streams for kg and for a third country (tj), and
/// kg's incoming stream from ru.
struct Sides {
    ru: Bus,
    kg: Bus,
}

impl Sides {
    async fn new(federation: &Federation) -> Self {
        let ru = Bus::connect(&federation.nats_settings(Side::Ru)).await.unwrap();
        let kg = Bus::connect(&federation.nats_settings(Side::Kg)).await.unwrap();
        ru.ensure_stream("identification").await.unwrap();
        ru.ensure_stream("repatriation").await.unwrap();
        ru.ensure_outbound_stream(&cc("kg")).await.unwrap();
        ru.ensure_outbound_stream(&cc("tj")).await.unwrap();
        kg.ensure_inbound_stream(&cc("ru"), &cc("kg")).await.unwrap();
        Self { ru, kg }
    }

    /// Publishes `body` in ru on `subject` with `Nats-Msg-Id: id`, and waits for the ack.
    async fn publish(&self, subject: String, id: &str, body: String) {
        let mut headers = HeaderMap::new();
        headers.insert("Nats-Msg-Id", id);
        self.ru
            .jetstream()
            .publish_with_headers(subject, headers, body.into())
            .await
            .unwrap()
            .await
            .unwrap();
    }

    /// Publishes the crossing messages `kg-{from}`..`kg-{to}` (exclusive),
    /// 256 in flight at a time.
    async fn publish_for_kg(&self, range: std::ops::Range<usize>) {
        let kg = cc("kg");
        let mut pending = Vec::new();
        for i in range {
            let mut headers = HeaderMap::new();
            headers.insert("Nats-Msg-Id", format!("kg-{i}").as_str());
            let subject = self.ru.outbound_subject(&kg, &format!("return-{}", i % 97));
            pending.push(
                self.ru
                    .jetstream()
                    .publish_with_headers(subject, headers, format!("kg-{i}").into())
                    .await
                    .unwrap(),
            );
            if pending.len() == 256 {
                for ack in pending.drain(..) {
                    ack.await.unwrap();
                }
            }
        }
        for ack in pending {
            ack.await.unwrap();
        }
    }

    /// How many messages kg's incoming stream holds.
    async fn inbound_count(&self) -> u64 {
        let name = self.kg.inbound_stream_name(&cc("ru"));
        let mut stream = self.kg.jetstream().get_stream(&name).await.unwrap();
        stream.info().await.unwrap().state.messages
    }

    /// Waits until kg's incoming stream holds at least `n` messages (`within` at most).
    async fn wait_inbound(&self, n: u64, within: Duration) -> u64 {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            let count = self.inbound_count().await;
            if count >= n || tokio::time::Instant::now() >= deadline {
                return count;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    /// Every message of kg's incoming stream.
    async fn inbound(&self) -> Vec<jetstream::message::StreamMessage> {
        nrm_e2e::messages(self.kg.jetstream(), &self.kg.inbound_stream_name(&cc("ru"))).await
    }
}

/// The `Nats-Msg-Id` of a stored message.
fn msg_id(message: &jetstream::message::StreamMessage) -> String {
    message
        .headers
        .get("Nats-Msg-Id")
        .map(|v| v.as_str().to_owned())
        .unwrap_or_default()
}

/// Everything a subscriber on `>` in kg receives: subject, headers, body.
#[derive(Clone, Default)]
struct Spy(Arc<Mutex<Vec<String>>>);

impl Spy {
    async fn start(url: &str) -> (Self, async_nats::Client) {
        let client = async_nats::connect(url).await.unwrap();
        let mut all = client.subscribe(">").await.unwrap();
        client.flush().await.unwrap();
        let spy = Self::default();
        let seen = spy.0.clone();
        tokio::spawn(async move {
            while let Some(message) = all.next().await {
                let headers = message.headers.as_ref().map(|h| format!("{h:?}")).unwrap_or_default();
                let body = String::from_utf8_lossy(&message.payload);
                seen.lock()
                    .unwrap()
                    .push(format!("{} {headers} {body}", message.subject));
            }
        });
        (spy, client)
    }

    fn seen(&self) -> Vec<String> {
        self.0.lock().unwrap().clone()
    }

    /// Waits until a message containing `marker` was received.
    async fn wait_for(&self, marker: &str) {
        for _ in 0..400 {
            if self.seen().iter().any(|m| m.contains(marker)) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        panic!("the spy in kg never saw {marker}");
    }
}

#[tokio::test]
async fn only_what_is_meant_for_kg_crosses_the_link() {
    let mut federation = Federation::start().await;
    let sides = Sides::new(&federation).await;
    let (spy, spy_client) = Spy::start(&federation.url(Side::Kg)).await;
    // Also a subscriber on exactly ru's domestic subjects, as its services use them.
    let mut domestic = spy_client
        .subscribe(format!("{}.>", federation.subject_prefix))
        .await
        .unwrap();
    spy_client.flush().await.unwrap();

    let (kg, tj) = (cc("kg"), cc("tj"));
    for i in 0..20 {
        let case = format!("case-{i}");
        sides
            .publish(
                sides.ru.subject("identification", "case", &case),
                &format!("case-{i}"),
                format!("domestic-secret-{i}"),
            )
            .await;
        sides
            .publish(
                sides.ru.outbound_subject(&tj, &format!("return-tj-{i}")),
                &format!("tj-{i}"),
                format!("tj-secret-{i}"),
            )
            .await;
        sides
            .publish(
                sides.ru.outbound_subject(&kg, &format!("return-kg-{i}")),
                &format!("kg-{i}"),
                format!("kg-{i}"),
            )
            .await;
    }
    let tj_out = sides.ru.outbound_stream_name(&tj);
    let mut tj_stream = sides.ru.jetstream().get_stream(&tj_out).await.unwrap();
    for _ in 0..400 {
        if tj_stream.info().await.unwrap().state.messages == 20 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert_eq!(
        tj_stream.info().await.unwrap().state.messages,
        20,
        "ru's outgoing stream for tj holds tj's messages (so they were there to leak)"
    );

    // The marker comes last: once kg holds it, everything before it had its chance to cross.
    sides
        .publish(
            sides.ru.outbound_subject(&kg, "return-marker"),
            "kg-marker",
            "kg-marker".into(),
        )
        .await;
    assert_eq!(sides.wait_inbound(21, Duration::from_secs(30)).await, 21);
    spy.wait_for("kg-marker").await;

    let inbound = sides.inbound().await;
    let ids: Vec<String> = inbound.iter().map(msg_id).collect();
    let mut expected: Vec<String> = (0..20).map(|i| format!("kg-{i}")).collect();
    expected.push("kg-marker".into());
    assert_eq!(
        ids, expected,
        "kg's incoming stream holds exactly the kg messages, in order"
    );
    assert!(
        inbound
            .iter()
            .all(|m| m.subject.starts_with(&sides.ru.outbound_filter(&kg).replace('>', ""))),
        "and only on kg's outbound subjects"
    );

    // No message of ru's domestic streams or meant for tj, by body or by
    // subject. What a link needs on 2.9 and later alike: the replies to
    // consumer creations ($JSC.R.<random>), for kg's own sourcing consumer;
    // ru's servers answer their own sourcing inside the same account on the
    // same kind of subject, and those answers (stream names, filters,
    // sequence numbers; never a message) can reach a subscriber in kg
    // (deploy/federation/README.md). Everything else is refused.
    let seen = spy.seen();
    let secrets: Vec<&String> = seen
        .iter()
        .filter(|m| m.contains("domestic-secret") || m.contains("tj-secret"))
        .collect();
    assert!(
        secrets.is_empty(),
        "ru's messages reached a subscriber on > in kg: {secrets:#?}"
    );
    let foreign: Vec<&String> = seen
        .iter()
        .filter(|m| !m.starts_with("$JSC.R."))
        .filter(|m| m.contains(".identification.") || m.contains(".outbound.tj.") || m.contains("return-tj-"))
        .collect();
    assert!(foreign.is_empty(), "reached a subscriber on > in kg: {foreign:#?}");
    let control = seen
        .iter()
        .filter(|m| m.starts_with("$JSC.R.") && !m.contains(&federation.out_stream("kg")))
        .count();
    eprintln!("kg saw {control} answer(s) to ru's own consumer creations (metadata, no message)");

    // The subscriber on every subject of the services saw what crossed for
    // kg (kg's server shows sourced messages under their own subject), and
    // nothing else.
    let mut domestic_seen = Vec::new();
    while let Ok(Some(message)) = tokio::time::timeout(Duration::from_millis(10), domestic.next()).await {
        domestic_seen.push(message.subject.to_string());
    }
    let kg_prefix = sides.ru.outbound_filter(&kg).replace('>', "");
    assert!(
        domestic_seen.iter().all(|subject| subject.starts_with(&kg_prefix)),
        "a subscriber on {}.> in kg saw more than what ru sent kg: {domestic_seen:?}",
        federation.subject_prefix
    );

    // The link's credentials open nothing as a client connection: the user
    // takes leaf connections only.
    let refused = async_nats::ConnectOptions::with_user_and_password("kg".into(), federation.link_password.clone())
        .connect(federation.url(Side::Ru))
        .await
        .map(|_| ())
        .expect_err("a client connection with the link's credentials");
    assert_eq!(
        refused.kind(),
        async_nats::ConnectErrorKind::AuthorizationViolation,
        "{refused}"
    );

    // Through the link itself (the only way kg reaches ru), a kg client can
    // neither read ru's domestic stream nor consume from the outgoing
    // stream of a third country, nor write into ru: the link's allow lists
    // (which ru's server hands to kg's server at connect, and which kg's
    // server applies) let none of these requests cross. (On nats-server
    // before 2.11.16/2.12.7/2.14.0 ru's server does not check them again on
    // arrival: see deploy/federation/README.md.)
    let domestic_stream = sides.ru.stream_name("identification");
    let forbidden = [
        format!("$JS.ru.API.CONSUMER.CREATE.{domestic_stream}"),
        format!(
            "$JS.ru.API.CONSUMER.CREATE.{domestic_stream}.spy.{}",
            sides.ru.context_subjects("identification")
        ),
        format!(
            "$JS.ru.API.CONSUMER.CREATE.{tj_out}.spy.{}",
            sides.ru.outbound_filter(&tj)
        ),
        format!("$JS.ru.API.CONSUMER.DURABLE.CREATE.{tj_out}.spy"),
        format!("$JS.ru.API.STREAM.INFO.{domestic_stream}"),
        format!("$JS.ru.API.STREAM.MSG.GET.{domestic_stream}"),
        format!("$JS.ru.API.DIRECT.GET.{domestic_stream}"),
        "$JS.ru.API.STREAM.NAMES".to_owned(),
    ];
    let kg_client = async_nats::ConnectOptions::new()
        .request_timeout(Some(Duration::from_secs(1)))
        .connect(federation.url(Side::Kg))
        .await
        .unwrap();
    let request = format!(
        r#"{{"seq":1,"config":{{"deliver_subject":"{}.S.spy"}}}}"#,
        federation.deliver_prefix("kg")
    );
    for subject in &forbidden {
        let answer = kg_client.request(subject.clone(), request.clone().into()).await;
        let kind = answer.as_ref().err().map(async_nats::RequestError::kind);
        assert!(
            matches!(
                kind,
                Some(async_nats::RequestErrorKind::TimedOut | async_nats::RequestErrorKind::NoResponders)
            ),
            "{subject} was answered: {answer:?}"
        );
    }
    kg_client
        .publish(
            sides.ru.subject("identification", "case", "forged"),
            "forged-in-kg".into(),
        )
        .await
        .unwrap();
    kg_client.flush().await.unwrap();

    // After all that the link still carries what it should.
    federation.wait_link().await;
    sides
        .publish(
            sides.ru.outbound_subject(&kg, "return-after"),
            "kg-after",
            "kg-after".into(),
        )
        .await;
    assert_eq!(sides.wait_inbound(22, Duration::from_secs(30)).await, 22);
    let mut domestic = sides.ru.jetstream().get_stream(&domestic_stream).await.unwrap();
    let info = domestic.info().await.unwrap();
    assert_eq!(
        (info.state.messages, info.state.consumer_count),
        (20, 0),
        "ru's domestic stream: its own 20 messages, no consumer made from kg"
    );
    let mut tj_stream = sides.ru.jetstream().get_stream(&tj_out).await.unwrap();
    assert_eq!(tj_stream.info().await.unwrap().state.consumer_count, 0, "{tj_out}");
    federation.stop_server(Side::Kg, false).await;
}

/// kg goes away (`kill`: SIGKILL, else SIGTERM), `backlog` messages are
/// published in ru meanwhile, kg comes back: its incoming stream ends with
/// every message once, in order.
async fn a_link_cut(kill: bool, backlog: usize) {
    let mut federation = Federation::start().await;
    let sides = Sides::new(&federation).await;
    sides.publish_for_kg(0..5).await;
    assert_eq!(sides.wait_inbound(5, Duration::from_secs(30)).await, 5);

    federation.cut_link(kill).await;
    sides.publish_for_kg(5..5 + backlog).await;
    let restarted = Instant::now();
    federation.restore_link().await;
    let total = u64::try_from(5 + backlog).unwrap();
    let count = sides.wait_inbound(total, Duration::from_secs(60)).await;
    let caught_up = restarted.elapsed();
    assert_eq!(count, total, "kg's incoming stream after the cut");
    // A marker published after the catch-up arrives after it, and nothing
    // of the backlog comes again in between.
    sides
        .publish(
            sides.ru.outbound_subject(&cc("kg"), "return-marker"),
            "kg-marker",
            "kg-marker".into(),
        )
        .await;
    assert_eq!(sides.wait_inbound(total + 1, Duration::from_secs(30)).await, total + 1);
    let inbound = sides.inbound().await;
    let ids: Vec<String> = inbound.iter().map(msg_id).collect();
    let mut expected: Vec<String> = (0..5 + backlog).map(|i| format!("kg-{i}")).collect();
    expected.push("kg-marker".into());
    let distinct: BTreeSet<&String> = ids.iter().collect();
    assert_eq!(distinct.len(), ids.len(), "a message crossed twice");
    assert_eq!(ids, expected, "every message once, in ru's order");
    let sources: BTreeSet<String> = inbound
        .iter()
        .filter_map(|m| m.headers.get("Nats-Stream-Source").map(|v| v.as_str().to_owned()))
        .collect();
    assert_eq!(
        sources.len(),
        inbound.len(),
        "each stored message names a distinct source sequence"
    );
    eprintln!(
        "link cut ({}): {backlog} messages published meanwhile, all in kg {caught_up:.1?} after kg's restart (leaf reconnect included)",
        if kill { "SIGKILL" } else { "SIGTERM" }
    );
    federation.stop_server(Side::Kg, false).await;
}

#[tokio::test]
async fn a_link_cut_loses_nothing_and_doubles_nothing() {
    a_link_cut(false, 2_000).await;
}

#[tokio::test]
async fn a_killed_home_server_catches_up_without_duplicates() {
    a_link_cut(true, 2_000).await;
}

/// Waits until ru's log holds more than `before` lines containing `text`.
async fn wait_log(federation: &Federation, text: &str, before: usize) {
    let deadline = Instant::now() + Duration::from_secs(15);
    while federation.log(Side::Ru).matches(text).count() <= before {
        assert!(
            Instant::now() < deadline,
            "ru's log never said {text:?}:\n{}",
            federation.log(Side::Ru)
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

#[tokio::test]
async fn the_leaf_port_takes_only_the_link_user_with_the_links_certificate() {
    let federation = Federation::start().await;
    let password = federation.link_password.clone();
    let cases = [
        // The link's credentials without the client certificate: TLS refuses it.
        (format!("kg:{password}@"), false, "TLS leafnode handshake error"),
        // The certificate without credentials: not the services' user either
        // (no_auth_user takes ordinary client connections only).
        (String::new(), true, "authentication error"),
        // The certificate with a wrong password.
        ("kg:not-the-password@".to_owned(), true, "authentication error"),
        // The certificate and the services' user.
        ("services:whatever@".to_owned(), true, "authentication error"),
    ];
    for (userinfo, cert, refusal) in cases {
        let before = federation.log(Side::Ru).matches(refusal).count();
        let stray = federation.stray_leaf(&userinfo, cert).await;
        wait_log(&federation, refusal, before).await;
        assert_eq!(
            federation.leaf_connections().await,
            1,
            "only kg's link ({userinfo:?}, certificate: {cert})"
        );
        drop(stray);
    }
}
