//! Helpers for the shelter tests: the referral service's side of the bus
//! ([`ReferralFeed`]: referral events committed to a scratch store and
//! relayed to the referral stream the shelter service follows), waiting for
//! the shelter service to have followed it, and asserting that a refusal
//! wrote nothing but its audit entry.

use std::time::Duration;

use nrm_kernel::bus::Bus;
use nrm_kernel::relay::{Relay, RelayConfig};
use nrm_kernel::settings::DatabaseSettings;
use nrm_kernel::store::{Actor, EventMetadata, EventStore, NewEvent};
use nrm_proto::referral::v1 as referral;
use nrm_proto::shelter::v1 as pb;
use prost::Message as _;
use referral::referral_event::Event;
use uuid::Uuid;

use crate::tables::{ServiceTables, TableSnapshot};
use crate::{ShelterApp, env, unique};

/// The referral service's side of the bus, played by the kernel: an event
/// store on a scratch database and a relay to the referral stream of the
/// shelter service's NATS space.
pub struct ReferralFeed {
    database: DatabaseSettings,
    store: EventStore,
    relay: Relay,
    bus: Bus,
}

/// The name an event is stored under.
fn event_type(event: &Event) -> &'static str {
    match event {
        Event::ReferralCreated(_) => "ReferralCreated",
        Event::ReferralAccepted(_) => "ReferralAccepted",
        Event::ReferralDeclined(_) => "ReferralDeclined",
        Event::ReferralRedirected(_) => "ReferralRedirected",
        Event::ReferralClosed(_) => "ReferralClosed",
        Event::ReferralCancelled(_) => "ReferralCancelled",
        _ => "Other",
    }
}

impl ReferralFeed {
    /// A feed into the referral stream of `app`'s subject space.
    ///
    /// # Panics
    /// When a server refuses.
    pub async fn new(app: &ShelterApp) -> Self {
        let database = DatabaseSettings {
            url: env().database_url.clone(),
            name: format!("test_{}", unique()),
            max_connections: 4,
        };
        let pool = nrm_kernel::db::connect_and_migrate(&database, &nrm_shelter::startup::MIGRATIONS)
            .await
            .expect("database");
        let bus = Bus::connect(&app.settings.nats).await.expect("bus");
        bus.ensure_stream("referral").await.expect("stream");
        let store = EventStore::new(pool.clone());
        let relay = Relay::new(
            pool,
            bus.clone(),
            "referral",
            store.appended_signal(),
            RelayConfig::new("nrm.referral.v1.ReferralEvent"),
        );
        Self {
            database,
            store,
            relay,
            bus,
        }
    }

    /// Commits `event` to the stream of `referral_id` (one commit), without publishing.
    ///
    /// # Panics
    /// When the store fails.
    pub async fn commit(&mut self, referral_id: &str, event: Event) {
        let stream_id = format!("referral-{referral_id}");
        let version = self.store.read_stream(&stream_id).await.expect("read").len() as u64;
        let metadata = EventMetadata {
            correlation_id: Uuid::now_v7(),
            causation_id: Uuid::now_v7(),
            actor: Actor {
                agency: "kg-msd".into(),
                role: "msd".into(),
                officer: "officer-2".into(),
            },
            traceparent: None,
            tracestate: None,
        };
        let mut uow = self.store.begin().await.expect("begin");
        uow.append(
            &stream_id,
            version,
            &[NewEvent {
                event_type: event_type(&event).into(),
                schema_version: 1,
                payload: referral::ReferralEvent { event: Some(event) }.encode_to_vec(),
            }],
            &metadata,
            &self.bus.subject("referral", "referral", referral_id),
        )
        .await
        .expect("append");
        uow.commit().await.expect("commit");
    }

    /// Publishes everything committed so far; the stream's last sequence.
    ///
    /// # Panics
    /// When the outbox does not empty within 10 s.
    pub async fn publish(&mut self) -> u64 {
        for _ in 0..400 {
            self.relay.publish_round().await.expect("relay round");
            let left: i64 = sqlx::query_scalar("SELECT count(*) FROM outbox")
                .fetch_one(self.store.pool())
                .await
                .expect("outbox");
            if left == 0 {
                return self.last_sequence().await;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        panic!("the referral commits were not published");
    }

    /// Commits and publishes `event`; the stream's last sequence.
    pub async fn send(&mut self, referral_id: &str, event: Event) -> u64 {
        self.commit(referral_id, event).await;
        self.publish().await
    }

    /// `ReferralAccepted` of `referral_id` for `person_id` by `agency`, with a shelter need when given.
    #[must_use]
    pub fn accepted(referral_id: &str, person_id: &str, agency: &str, need: Option<(pb::BedCategory, &str)>) -> Event {
        Event::ReferralAccepted(referral::ReferralAccepted {
            referral_id: referral_id.to_owned(),
            person_id: person_id.to_owned(),
            receiving_agency: agency.to_owned(),
            shelter_need: need.map(|(category, region)| referral::ShelterNeed {
                category: category as i32,
                region: region.to_owned(),
            }),
            accepted_at: None,
        })
    }

    /// Commits and publishes `ReferralAccepted` with a shelter need, by kg-msd.
    pub async fn accept(&mut self, referral_id: &str, category: pb::BedCategory, region: &str) -> u64 {
        let person_id = Uuid::now_v7().to_string();
        self.send(
            referral_id,
            Self::accepted(referral_id, &person_id, "kg-msd", Some((category, region))),
        )
        .await
    }

    /// Commits and publishes `ReferralCancelled` (consent withdrawn).
    pub async fn cancel(&mut self, referral_id: &str, agency: &str) -> u64 {
        self.send(
            referral_id,
            Event::ReferralCancelled(referral::ReferralCancelled {
                referral_id: referral_id.to_owned(),
                person_id: String::new(),
                receiving_agency: agency.to_owned(),
                reason: "CONSENT_WITHDRAWN".into(),
            }),
        )
        .await
    }

    /// Commits and publishes `ReferralClosed`.
    pub async fn close(&mut self, referral_id: &str) -> u64 {
        self.send(
            referral_id,
            Event::ReferralClosed(referral::ReferralClosed {
                referral_id: referral_id.to_owned(),
                outcome: referral::ReferralOutcome::ServicesCompleted as i32,
                closed_at: None,
            }),
        )
        .await
    }

    /// Commits and publishes `ReferralRedirected` from `from` to `to`.
    pub async fn redirect(&mut self, referral_id: &str, from: &str, to: &str) -> u64 {
        self.send(
            referral_id,
            Event::ReferralRedirected(referral::ReferralRedirected {
                referral_id: referral_id.to_owned(),
                previous_agency: from.to_owned(),
                receiving_agency: to.to_owned(),
                consent_id: String::new(),
                answer_due_at: None,
            }),
        )
        .await
    }

    /// Publishes the last message of the referral stream once more, as a
    /// new message (another sequence, no de-duplication): a redelivery.
    ///
    /// # Panics
    /// When JetStream fails.
    pub async fn redeliver_last(&self) -> u64 {
        let stream = self
            .bus
            .jetstream()
            .get_stream(self.bus.stream_name("referral"))
            .await
            .expect("stream");
        let last = stream
            .get_raw_message(stream.cached_info().state.last_sequence)
            .await
            .expect("last message");
        let mut headers = async_nats::HeaderMap::new();
        for (name, values) in last.headers.iter() {
            if name.to_string() != "Nats-Msg-Id" {
                for value in values {
                    headers.append(name.clone(), value.as_str());
                }
            }
        }
        self.bus
            .jetstream()
            .publish_with_headers(last.subject.clone(), headers, last.payload.clone())
            .await
            .expect("publish")
            .await
            .expect("ack")
            .sequence
    }

    async fn last_sequence(&self) -> u64 {
        let mut stream = self
            .bus
            .jetstream()
            .get_stream(self.bus.stream_name("referral"))
            .await
            .expect("stream");
        stream.info().await.expect("stream info").state.last_sequence
    }

    /// Drops the scratch database.
    pub async fn drop_all(self) {
        self.store.pool().close().await;
        let _ = nrm_kernel::db::drop_database(&self.database).await;
    }
}

/// The region of the shelter need [`accepted_referral`] names: no test
/// registers a shelter there, so placement holds nothing for it.
pub const NEED_REGION: &str = "KG-B";

/// Waits until the shelter service has followed the referral stream up to
/// `sequence`: its referrals read model and its placement reaction both.
///
/// # Panics
/// After 10 s.
pub async fn wait_followed(app: &ShelterApp, sequence: u64) {
    for _ in 0..200 {
        let at: Vec<i64> = sqlx::query_scalar(
            "SELECT stream_sequence FROM projection_checkpoints
             WHERE projection IN ('shelter_placement', 'shelter_referrals')",
        )
        .fetch_all(&app.pool)
        .await
        .expect("checkpoint");
        if at.len() == 2 && at.iter().all(|s| u64::try_from(*s).unwrap_or(0) >= sequence) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("the shelter service did not follow the referral stream to {sequence} within 10 s");
}

/// Publishes an accepted referral with a shelter need for a woman's bed in
/// [`NEED_REGION`] (where no shelter is: placement holds nothing, nobody but
/// the caller holds a bed for it) for `agency` and waits until the shelter
/// service knows it; its referral ID.
pub async fn accepted_referral(app: &ShelterApp, feed: &mut ReferralFeed, agency: &str, person_id: &str) -> String {
    accepted_referral_for(app, feed, agency, person_id, pb::BedCategory::Women).await
}

/// As [`accepted_referral`], with a shelter need for a bed of `category`.
pub async fn accepted_referral_for(
    app: &ShelterApp,
    feed: &mut ReferralFeed,
    agency: &str,
    person_id: &str,
    category: pb::BedCategory,
) -> String {
    let referral_id = Uuid::now_v7().to_string();
    let sequence = feed
        .send(
            &referral_id,
            ReferralFeed::accepted(&referral_id, person_id, agency, Some((category, NEED_REGION))),
        )
        .await;
    wait_followed(app, sequence).await;
    referral_id
}

/// The national coordinator's token.
#[must_use]
pub fn coordinator() -> String {
    crate::token("kg-coordinator", nrm_kernel::auth::Role::Coordinator, "coordinator-1")
}

/// The coordinator approves the shelter just registered (version 1).
///
/// # Panics
/// When the service refuses.
pub async fn approve(app: &ShelterApp, shelter_id: &str) {
    app.client
        .clone()
        .approve_shelter(crate::authorized(
            pb::ApproveShelterRequest {
                request_id: Uuid::now_v7().to_string(),
                shelter_id: shelter_id.to_owned(),
                expected_version: 1,
            },
            &coordinator(),
        ))
        .await
        .expect("approve the shelter");
}

/// Asserts that since `before` nothing was written but `refusals` audit entries.
///
/// # Panics
/// Naming what changed.
pub async fn assert_only_audited(tables: &ServiceTables, before: &TableSnapshot, refusals: usize, what: &str) {
    tables.assert_changed_only_since(before, &["audit_log"], what).await;
    let after = tables.snapshot().await;
    assert_eq!(
        after.rows("audit_log"),
        before.rows("audit_log") + refusals,
        "{what}: {refusals} audit entr(ies) of the refusal"
    );
}
