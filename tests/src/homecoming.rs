//! Helpers of the homecoming tests: the home country (`kg`) with its key
//! pair and a partner (`ru`); an identification service that can be stopped
//! and started again on its database; and a stand-in for the link that
//! publishes what the destination country's repatriation service sends
//! (sealed `CrossBorderMessage` commits) straight into the home country's
//! incoming stream `{STREAM_PREFIX}_XB_IN_RU`. One NATS server stands in for
//! the two countries and their leaf link: the stream here is a plain stream
//! on the outbound subjects meant for `kg`, as the sourced one would be.

use std::path::PathBuf;
use std::time::Duration;

use async_nats::HeaderMap;
use async_nats::jetstream;
use nrm_identification::config::Settings;
use nrm_identification::startup::Application;
use nrm_kernel::service::Service as _;
use nrm_kernel::store::{Actor, EventMetadata};
use nrm_kernel::xborder::{self, CountryCode, CountryKey, OUTBOUND_PAYLOAD_TYPE, XborderSettings};
use nrm_proto::common::v1::{CommittedEvent, EventCommit, PersonalIdentifiers};
use nrm_proto::identification::v1::identification_service_client::IdentificationServiceClient;
use nrm_proto::repatriation::v1 as rp;
use prost::Message as _;
use secrecy::ExposeSecret as _;
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;

use crate::{settings, unique};

/// The two countries and their keys: `kg` is here, `ru` is the partner.
pub struct Countries {
    /// `kg`.
    pub here: CountryCode,
    /// `ru`.
    pub partner: CountryCode,
    /// The home country's key pair (its private half in `kg.key`).
    pub key: CountryKey,
    /// The partner's key pair (its public half in `ru.pub`): what it seals
    /// opens here, and nothing else.
    pub partner_key: CountryKey,
    dir: PathBuf,
}

impl Countries {
    /// New key pairs for both, written as `nrmctl xborder keygen` writes
    /// them: `kg.key` (0600) and `ru.pub` in a folder of their own.
    ///
    /// # Panics
    /// When the files cannot be written.
    #[must_use]
    pub fn new() -> Self {
        let dir = std::env::temp_dir().join(format!("nrm-test-xborder-{}", unique()));
        std::fs::create_dir_all(&dir).expect("key folder");
        let key = CountryKey::generate();
        let partner_key = CountryKey::generate();
        let private = dir.join("kg.key");
        std::fs::write(&private, format!("{}\n", key.to_base64().expose_secret())).expect("write kg.key");
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt as _;
            std::fs::set_permissions(&private, std::fs::Permissions::from_mode(0o600)).expect("chmod kg.key");
        }
        std::fs::write(dir.join("ru.pub"), format!("{}\n", partner_key.public().to_base64())).expect("write ru.pub");
        Self {
            here: CountryCode::parse("here", "kg").expect("kg"),
            partner: CountryCode::parse("partner", "ru").expect("ru"),
            key,
            partner_key,
            dir,
        }
    }

    /// The home country's cross-border settings.
    #[must_use]
    pub fn xborder(&self) -> XborderSettings {
        XborderSettings {
            country: "kg".into(),
            private_key_file: self.dir.join("kg.key").display().to_string(),
            partners: format!("ru={}", self.dir.join("ru.pub").display()),
        }
    }

    /// Removes the key files.
    pub fn remove(self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl Default for Countries {
    fn default() -> Self {
        Self::new()
    }
}

/// Settings of the home country's identification service: a database and
/// subjects of its own, `kg` with `ru` as partner.
#[must_use]
pub fn home_settings(countries: &Countries) -> Settings {
    Settings {
        xborder: countries.xborder(),
        ..settings()
    }
}

/// An identification service that can be stopped and started again.
pub struct HomeIdentification {
    /// Its settings.
    pub settings: Settings,
    /// A client.
    pub client: IdentificationServiceClient<Channel>,
    /// A pool on its database.
    pub pool: sqlx::PgPool,
    shutdown: CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

impl HomeIdentification {
    /// Builds and starts the service with `settings`.
    ///
    /// # Panics
    /// When it cannot start.
    pub async fn spawn(settings: Settings) -> Self {
        let app = Application::build(&settings)
            .await
            .expect("build the identification service");
        let addr = app.kit().grpc_addr().expect("grpc address");
        let shutdown = CancellationToken::new();
        let running = app.run_until_stopped(shutdown.clone());
        let task = tokio::spawn(async move {
            if let Err(err) = running.await {
                panic!("identification failed: {err}");
            }
        });
        let pool = sqlx::PgPool::connect_with(nrm_kernel::db::connect_options(&settings.database).expect("options"))
            .await
            .expect("connect to the test database");
        let client = IdentificationServiceClient::connect(format!("http://{addr}"))
            .await
            .expect("connect");
        Self {
            settings,
            client,
            pool,
            shutdown,
            task,
        }
    }

    /// Stops the service, keeping its database; returns its settings.
    pub async fn halt(self) -> Settings {
        self.shutdown.cancel();
        let _ = tokio::time::timeout(Duration::from_secs(15), self.task).await;
        self.pool.close().await;
        self.settings
    }

    /// Stops the service and drops its database and stream.
    pub async fn stop(self) {
        let js = jetstream::new(
            async_nats::connect(self.settings.nats.url.as_str())
                .await
                .expect("NATS"),
        );
        let stream = format!("{}_IDENTIFICATION", self.settings.nats.stream_prefix);
        let settings = self.halt().await;
        let _ = js.delete_stream(stream).await;
        let _ = nrm_kernel::db::drop_database(&settings.database).await;
    }
}

/// One return as the destination country keeps it, and the crossing
/// messages it sends home.
#[derive(Debug, Clone)]
pub struct Return {
    /// The return as it stands after the last step (its `origin_version`).
    pub snapshot: rp::CrossBorderReturn,
    /// Crossing messages sent so far (the `xborder-kg-<id>` stream's version).
    pub sent: u64,
}

impl Return {
    /// A return of a Kyrgyz citizen from Russia, consented, with what the
    /// person let cross (`shared`), the identifiers that crossed (the
    /// destination limits them to the shared groups) and whether the person
    /// agreed to a reintegration referral.
    #[must_use]
    pub fn consented(
        shared: &[rp::SharedField],
        identifiers: Option<PersonalIdentifiers>,
        reintegration: bool,
        foreign_reference: &str,
    ) -> Self {
        use nrm_proto::common::v1 as common;
        let profile = shared.contains(&rp::SharedField::Profile);
        let needs = shared.contains(&rp::SharedField::Needs);
        let snapshot = rp::CrossBorderReturn {
            return_id: uuid::Uuid::now_v7().to_string(),
            from_country: "ru".into(),
            to_country: "kg".into(),
            shared_fields: shared.iter().map(|f| *f as i32).collect(),
            consent_to_reintegration_referral: reintegration,
            identifiers,
            gender: if profile { common::Gender::Female as i32 } else { 0 },
            age_band: if profile {
                common::AgeBand::AgeBand2534 as i32
            } else {
                0
            },
            form_of_exploitation: if profile {
                "FORM_OF_EXPLOITATION_LABOUR".into()
            } else {
                String::new()
            },
            country_of_exploitation: if profile { "ru".into() } else { String::new() },
            needs: if needs {
                vec![rp::ArrivalNeed::Shelter as i32, rp::ArrivalNeed::Medical as i32]
            } else {
                Vec::new()
            },
            foreign_reference: foreign_reference.to_owned(),
            identified_by: "ru-mvd".into(),
            ..Default::default()
        };
        let mut ret = Self { snapshot, sent: 0 };
        ret.step("ReturnOpened", rp::ReturnStatus::Opened, "ru-iom");
        ret.step("ReturnConsentRecorded", rp::ReturnStatus::Consented, "ru-iom");
        ret
    }

    /// Records a step abroad: the status, the step history and the version move on.
    pub fn step(&mut self, name: &str, status: rp::ReturnStatus, agency: &str) {
        let s = &mut self.snapshot;
        s.origin_version += 1;
        s.status = status as i32;
        s.steps.push(rp::Step {
            step: name.to_owned(),
            status_after: status as i32,
            at: Some(now()),
            agency: agency.to_owned(),
            origin_version: s.origin_version,
        });
    }

    /// Books the itinerary (arriving at Bishkek airport).
    pub fn book(&mut self) {
        self.snapshot.carrier = "KC 210".into();
        self.snapshot.arrival_point_kind = rp::ArrivalPointKind::Airport as i32;
        self.snapshot.arrival_point = "FRU".into();
        self.step("ItineraryBooked", rp::ReturnStatus::ItineraryBooked, "ru-iom");
    }

    /// Departs, arrives, and is handed over to `received_by`.
    pub fn hand_over(&mut self, received_by: &str) {
        self.step("ReturnDeparted", rp::ReturnStatus::Departed, "ru-iom");
        self.step("ReturnArrived", rp::ReturnStatus::Arrived, "ru-iom");
        self.snapshot.received_by = received_by.to_owned();
        self.snapshot.handed_over_at = Some(now());
        self.step("ReturnHandedOver", rp::ReturnStatus::HandedOver, "ru-iom");
    }

    /// The return's ID.
    #[must_use]
    pub fn id(&self) -> &str {
        &self.snapshot.return_id
    }
}

fn now() -> prost_types::Timestamp {
    nrm_kernel::validate::timestamp(chrono::Utc::now())
}

/// Stands in for the link: the home country's incoming stream from `ru`,
/// and a publisher of the destination's crossing commits into it.
pub struct Link {
    js: jetstream::Context,
    stream: String,
    subject_prefix: String,
    here: CountryCode,
    partner: CountryCode,
    /// The home country's public key (what the partner seals to).
    home_key: xborder::PartnerKey,
    /// The partner's key pair (what it seals with).
    partner_key: CountryKey,
}

impl Link {
    /// Creates `{STREAM_PREFIX}_XB_IN_RU` for the subjects of `settings`,
    /// holding every crossing message meant for `kg`.
    ///
    /// # Panics
    /// When NATS refuses.
    pub async fn new(settings: &Settings, countries: &Countries) -> Self {
        let js = jetstream::new(async_nats::connect(settings.nats.url.as_str()).await.expect("NATS"));
        let stream = format!("{}_XB_IN_RU", settings.nats.stream_prefix);
        let subject_prefix = settings.nats.subject_prefix.clone();
        js.create_stream(jetstream::stream::Config {
            name: stream.clone(),
            subjects: vec![format!("{subject_prefix}.repatriation.v1.outbound.kg.>")],
            ..Default::default()
        })
        .await
        .expect("create the incoming stream");
        Self {
            js,
            stream,
            subject_prefix,
            here: countries.here.clone(),
            partner: countries.partner.clone(),
            home_key: countries.key.public().clone(),
            partner_key: countries.partner_key.clone(),
        }
    }

    /// Sends the return as it stands now, as the destination's relay would:
    /// one commit of `xborder-kg-<id>` holding one `CrossBorderMessage`
    /// whose return is sealed for `kg`. Returns the message's sequence in
    /// the incoming stream.
    ///
    /// # Panics
    /// When NATS refuses.
    pub async fn send(&self, ret: &mut Return) -> u64 {
        ret.sent += 1;
        self.deliver(ret).await
    }

    /// Delivers the last message sent for `ret` again, as a commit of its
    /// own (a republication after the de-duplication window, or the refill
    /// of a lost stream): the same version, a new message ID.
    ///
    /// # Panics
    /// When NATS refuses.
    pub async fn deliver(&self, ret: &Return) -> u64 {
        self.deliver_altered(ret, |_| {}).await
    }

    /// As [`Self::deliver`], with the crossing message changed by `alter`
    /// after sealing (a forged or misdirected message).
    ///
    /// # Panics
    /// When NATS refuses.
    pub async fn deliver_altered(&self, ret: &Return, alter: impl FnOnce(&mut rp::CrossBorderMessage)) -> u64 {
        let snapshot = &ret.snapshot;
        let aad = xborder::aad(&self.partner, &self.here, &snapshot.return_id, snapshot.origin_version);
        let message = rp::CrossBorderMessage {
            return_id: snapshot.return_id.clone(),
            from_country: "ru".into(),
            to_country: "kg".into(),
            origin_version: snapshot.origin_version,
            sealed: Some(xborder::seal(
                &self.partner_key,
                &self.home_key,
                &aad,
                &snapshot.encode_to_vec(),
            )),
        };
        let mut message = message;
        alter(&mut message);
        let commit_id = uuid::Uuid::now_v7();
        let stream_id = format!("xborder-kg-{}", snapshot.return_id);
        let commit = EventCommit {
            commit_id: commit_id.to_string(),
            stream_id: stream_id.clone(),
            payload_type: OUTBOUND_PAYLOAD_TYPE.into(),
            events: vec![CommittedEvent {
                event_id: uuid::Uuid::now_v7().to_string(),
                version: ret.sent,
                event_type: "CrossBorderMessage".into(),
                schema_version: 1,
                recorded_at: Some(now()),
                payload: message.encode_to_vec(),
            }],
        };
        let mut headers = HeaderMap::new();
        headers.insert("Nats-Msg-Id", commit_id.to_string().as_str());
        headers.insert(nrm_kernel::bus::HEADER_STREAM_ID, stream_id.as_str());
        headers.insert(nrm_kernel::bus::HEADER_STREAM_VERSION, ret.sent.to_string().as_str());
        nrm_kernel::bus::metadata_headers(
            &mut headers,
            &EventMetadata {
                correlation_id: uuid::Uuid::now_v7(),
                causation_id: uuid::Uuid::now_v7(),
                actor: Actor {
                    agency: "ru-iom".into(),
                    role: "iom".into(),
                    officer: "iom-officer-3".into(),
                },
                traceparent: None,
                tracestate: None,
            },
        );
        let subject = format!(
            "{}.repatriation.v1.outbound.kg.{}",
            self.subject_prefix, snapshot.return_id
        );
        self.js
            .publish_with_headers(subject, headers, commit.encode_to_vec().into())
            .await
            .expect("publish")
            .await
            .expect("acknowledged")
            .sequence
    }

    /// Every message of the incoming stream.
    pub async fn messages(&self) -> Vec<jetstream::message::StreamMessage> {
        crate::messages(&self.js, &self.stream).await
    }

    /// Deletes the incoming stream.
    pub async fn remove(self) {
        let _ = self.js.delete_stream(&self.stream).await;
    }
}

/// Waits until the runner `projection` of the service on `pool` has applied
/// the incoming stream up to `sequence`.
///
/// # Panics
/// After 20 s.
pub async fn wait_for_checkpoint(pool: &sqlx::PgPool, projection: &str, sequence: u64) {
    let wanted = i64::try_from(sequence).unwrap_or(i64::MAX);
    for _ in 0..400 {
        let at: Option<i64> =
            sqlx::query_scalar("SELECT stream_sequence FROM projection_checkpoints WHERE projection = $1")
                .bind(projection)
                .fetch_optional(pool)
                .await
                .expect("checkpoint");
        if at.is_some_and(|at| at >= wanted) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("{projection} did not reach sequence {sequence} within 20 s");
}
