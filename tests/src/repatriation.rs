//! A repatriation service in this process, with its country, its key pair
//! and its partners, and what tests need around it: country key pairs in
//! files, the crossing messages it published (opened with the partner's
//! key), and the home side's incoming stream fed by hand.
//!
//! A test plays the destination country with a [`RepatriationApp`] whose
//! partner is a country it holds the key of ([`CountryKeys`]), and reads
//! what would cross from the domestic stream; or it plays the home country
//! and feeds sealed `CrossBorderMessage` commits into the stream the
//! service reads from that partner ([`RepatriationApp::feed_inbound`]).
//! Both countries on one NATS server cannot share a subject space (their
//! domestic streams would claim the same subjects), so the link itself is
//! the integrator's two-server test.

use std::path::PathBuf;
use std::time::Duration;

use async_nats::jetstream::{self, stream};
use nrm_kernel::service::{CommonSettings, Service as _};
use nrm_kernel::xborder::{self, CountryCode, CountryKey, XborderSettings};
use nrm_proto::common::v1::{CommittedEvent, EventCommit};
use nrm_proto::repatriation::v1 as pb;
use nrm_proto::repatriation::v1::repatriation_service_client::RepatriationServiceClient;
use nrm_repatriation::config::{SealingSettings, Settings};
use prost::Message as _;
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;

use crate::tables::ServiceTables;
use crate::{Started, messages, settings, unique};

/// A country's key pair, written as `nrmctl xborder keygen` writes it.
pub struct CountryKeys {
    /// The country.
    pub code: CountryCode,
    /// Its key pair.
    pub key: CountryKey,
    /// `DIR/cc.key`.
    pub private_file: PathBuf,
    /// `DIR/cc.pub`.
    pub public_file: PathBuf,
}

impl CountryKeys {
    /// A new key pair for `code`, in a folder of its own.
    ///
    /// # Panics
    /// When the files cannot be written.
    #[must_use]
    pub fn generate(code: &str) -> Self {
        use secrecy::ExposeSecret as _;
        let dir = std::env::temp_dir().join(format!("nrm-test-xborder-{}", unique()));
        std::fs::create_dir_all(&dir).expect("key folder");
        let key = CountryKey::generate();
        let private_file = dir.join(format!("{code}.key"));
        let public_file = dir.join(format!("{code}.pub"));
        std::fs::write(&private_file, format!("{}\n", key.to_base64().expose_secret())).expect("write the key");
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt as _;
            std::fs::set_permissions(&private_file, std::fs::Permissions::from_mode(0o600)).expect("key file mode");
        }
        std::fs::write(&public_file, format!("{}\n", key.public().to_base64())).expect("write the public key");
        Self {
            code: CountryCode::parse("country", code).expect("a country code"),
            key,
            private_file,
            public_file,
        }
    }

    /// `cc=/path/to/cc.pub`, as `NRM_XBORDER__PARTNERS` names a partner.
    #[must_use]
    pub fn partner_entry(&self) -> String {
        format!("{}={}", self.code, self.public_file.display())
    }
}

/// Settings of a repatriation service of `country` (holding its private
/// key) with `partners`, its own database and subjects.
#[must_use]
pub fn repatriation_settings(country: &CountryKeys, partners: &[&CountryKeys]) -> Settings {
    let base = settings();
    Settings {
        common: CommonSettings {
            database: nrm_kernel::settings::DatabaseSettings {
                max_connections: 16,
                ..base.common.database
            },
            ..base.common
        },
        sealing: SealingSettings {
            master_key: base.sealing.master_key,
        },
        xborder: XborderSettings {
            country: country.code.to_string(),
            private_key_file: country.private_file.display().to_string(),
            partners: partners.iter().map(|p| p.partner_entry()).collect::<Vec<_>>().join(","),
        },
    }
}

/// A running repatriation service.
pub struct RepatriationApp {
    /// Its settings (database, subjects, country).
    pub settings: Settings,
    /// `http://127.0.0.1:port`.
    pub endpoint: String,
    /// A client.
    pub client: RepatriationServiceClient<Channel>,
    /// A pool on its database, for checking what was written.
    pub pool: sqlx::PgPool,
    /// JetStream on the test's NATS.
    pub jetstream: jetstream::Context,
    /// The bus as the service names things.
    pub bus: nrm_kernel::bus::Bus,
    shutdown: CancellationToken,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl RepatriationApp {
    /// Builds and starts a repatriation service with `settings`.
    ///
    /// # Panics
    /// When the service cannot start.
    pub async fn spawn_with(settings: Settings) -> Self {
        let app = nrm_repatriation::startup::Application::build(&settings)
            .await
            .expect("build the repatriation service");
        let addr = app.kit().grpc_addr().expect("grpc address");
        let bus = app.kit().bus().clone();
        let Started {
            endpoint,
            pool,
            jetstream,
            shutdown,
            task,
        } = Started::run(addr, &settings.database, &settings.nats.url, |stop| {
            app.run_until_stopped(stop)
        })
        .await;
        let client = RepatriationServiceClient::connect(endpoint.clone())
            .await
            .expect("connect");
        Self {
            settings,
            endpoint,
            client,
            pool,
            jetstream,
            bus,
            shutdown,
            task: Some(task),
        }
    }

    /// The service's country.
    ///
    /// # Panics
    /// Never with settings from [`repatriation_settings`].
    #[must_use]
    pub fn country(&self) -> CountryCode {
        CountryCode::parse("country", &self.settings.xborder.country).expect("a country code")
    }

    /// Name of the domestic repatriation stream.
    #[must_use]
    pub fn stream_name(&self) -> String {
        self.bus.stream_name("repatriation")
    }

    /// Every message of the domestic stream so far.
    pub async fn messages(&self) -> Vec<jetstream::message::StreamMessage> {
        messages(&self.jetstream, &self.stream_name()).await
    }

    /// Waits until the outbox is empty (every commit published) and returns
    /// the domestic stream's messages.
    ///
    /// # Panics
    /// After 10 s.
    pub async fn published(&self) -> Vec<jetstream::message::StreamMessage> {
        for _ in 0..400 {
            let left: i64 = sqlx::query_scalar("SELECT count(*) FROM outbox")
                .fetch_one(&self.pool)
                .await
                .expect("count the outbox");
            if left == 0 {
                return self.messages().await;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        panic!("the outbox did not empty within 10 s");
    }

    /// This service's own country key pair (from its settings' key file).
    ///
    /// # Panics
    /// When the file does not load.
    #[must_use]
    pub fn own_key(&self) -> CountryKey {
        CountryKey::load(std::path::Path::new(&self.settings.xborder.private_key_file)).expect("the country key")
    }

    /// The crossing commits published for `to` about `return_id`, in order,
    /// each with its message opened with `to`'s key.
    ///
    /// # Panics
    /// When one does not decode or open.
    pub async fn crossings(&self, to: &CountryKeys, return_id: &str) -> Vec<(EventCommit, pb::CrossBorderReturn)> {
        let subject = self.bus.outbound_subject(&to.code, return_id);
        let mut out = Vec::new();
        for message in self.published().await {
            if message.subject.as_str() != subject {
                continue;
            }
            let commit = EventCommit::decode(message.payload.as_ref()).expect("an EventCommit");
            let snapshot = open_commit(&commit, &to.key, self.own_key().public());
            out.push((commit, snapshot));
        }
        out
    }

    /// Every table of the service's database; `partners` are the countries
    /// it receives from (one reaction each).
    #[must_use]
    pub fn tables(&self, partners: &[&CountryKeys]) -> ServiceTables {
        let names: Vec<String> = std::iter::once("repatriation_return_list".to_owned())
            .chain(partners.iter().map(|p| format!("repatriation_inbound_{}", p.code)))
            .collect();
        let names: Vec<&str> = names.iter().map(String::as_str).collect();
        ServiceTables::new(self.pool.clone(), self.jetstream.clone(), "repatriation", &names)
    }

    /// Plays partner `from` sending to this (home) country: creates the
    /// domestic stream and, in place of the incoming stream from `from`
    /// (which sources `from`'s outgoing stream across a leaf link), a stream
    /// of the same name sourcing the crossing subjects for this country from
    /// the domestic stream, where [`RepatriationApp::publish_crossing`] puts
    /// them. Call before the service starts, so that the service finds the
    /// stream there.
    ///
    /// # Panics
    /// When JetStream refuses.
    pub async fn prepare_inbound(settings: &Settings, from: &CountryKeys) {
        let bus = nrm_kernel::bus::Bus::connect(&settings.nats).await.expect("bus");
        bus.ensure_stream("repatriation").await.expect("the domestic stream");
        let here = CountryCode::parse("country", &settings.xborder.country).expect("a country code");
        bus.jetstream()
            .create_stream(stream::Config {
                name: bus.inbound_stream_name(&from.code),
                sources: Some(vec![stream::Source {
                    name: bus.stream_name("repatriation"),
                    filter_subject: Some(bus.outbound_filter(&here)),
                    ..Default::default()
                }]),
                ..Default::default()
            })
            .await
            .expect("the stand-in incoming stream");
    }

    /// Publishes one crossing commit (as `from`'s relay would have, and as it
    /// arrives here by sourcing): version `version` of the return's crossing
    /// stream, carrying `snapshot` sealed for this country's key, under a
    /// new message ID (so a repeat is really delivered again).
    ///
    /// # Panics
    /// When JetStream refuses.
    pub async fn publish_crossing(
        &self,
        sender: &CountryKeys,
        here_key: &xborder::PartnerKey,
        version: u64,
        snapshot: &pb::CrossBorderReturn,
    ) {
        let from = &sender.code;
        let here = self.country();
        let aad = xborder::aad(from, &here, &snapshot.return_id, snapshot.origin_version);
        let message = pb::CrossBorderMessage {
            return_id: snapshot.return_id.clone(),
            from_country: from.to_string(),
            to_country: here.to_string(),
            origin_version: snapshot.origin_version,
            sealed: Some(xborder::seal(&sender.key, here_key, &aad, &snapshot.encode_to_vec())),
        };
        self.publish_raw(&snapshot.return_id, version, message.encode_to_vec())
            .await;
    }

    /// Publishes a crossing commit whose one event's payload is `payload`.
    ///
    /// # Panics
    /// When JetStream refuses.
    pub async fn publish_raw(&self, return_id: &str, version: u64, payload: Vec<u8>) {
        let here = self.country();
        let commit_id = uuid::Uuid::now_v7().to_string();
        let stream_id = format!("xborder-{here}-{return_id}");
        let commit = EventCommit {
            commit_id: commit_id.clone(),
            stream_id: stream_id.clone(),
            payload_type: xborder::OUTBOUND_PAYLOAD_TYPE.into(),
            events: vec![CommittedEvent {
                event_id: uuid::Uuid::now_v7().to_string(),
                version,
                event_type: "CrossBorderMessage".into(),
                schema_version: 1,
                recorded_at: None,
                payload,
            }],
        };
        let mut headers = async_nats::HeaderMap::new();
        headers.insert("Nats-Msg-Id", commit_id.as_str());
        headers.insert(nrm_kernel::bus::HEADER_STREAM_ID, stream_id.as_str());
        headers.insert(nrm_kernel::bus::HEADER_STREAM_VERSION, version.to_string().as_str());
        self.jetstream
            .publish_with_headers(
                self.bus.outbound_subject(&here, return_id),
                headers,
                commit.encode_to_vec().into(),
            )
            .await
            .expect("publish")
            .await
            .expect("acknowledged");
    }

    /// Waits until the incoming stream from `from` holds `count` messages.
    ///
    /// # Panics
    /// After 10 s.
    pub async fn wait_inbound(&self, from: &CountryKeys, count: usize) {
        let name = self.bus.inbound_stream_name(&from.code);
        for _ in 0..400 {
            if messages(&self.jetstream, &name).await.len() >= count {
                return;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        panic!("{name} holds fewer than {count} messages after 10 s");
    }

    /// Stops the service and drops its database and streams.
    pub async fn stop(mut self, partners: &[&CountryKeys]) {
        self.shutdown.cancel();
        if let Some(task) = self.task.take() {
            let _ = tokio::time::timeout(Duration::from_secs(15), task).await;
        }
        self.pool.close().await;
        let mut streams = vec![self.stream_name()];
        for partner in partners {
            streams.push(self.bus.outbound_stream_name(&partner.code));
            streams.push(self.bus.inbound_stream_name(&partner.code));
        }
        for stream in streams {
            let _ = self.jetstream.delete_stream(stream).await;
        }
        let _ = nrm_kernel::db::drop_database(&self.settings.database).await;
    }
}

impl Drop for RepatriationApp {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

/// The snapshot in a crossing commit, opened with `key`.
///
/// # Panics
/// When the commit holds other than one crossing message, or it does not open.
#[must_use]
pub fn open_commit(commit: &EventCommit, key: &CountryKey, from_key: &xborder::PartnerKey) -> pb::CrossBorderReturn {
    assert_eq!(commit.events.len(), 1, "one crossing message per commit");
    let event = &commit.events[0];
    assert_eq!(event.event_type, "CrossBorderMessage");
    let message = pb::CrossBorderMessage::decode(event.payload.as_slice()).expect("a CrossBorderMessage");
    let from = CountryCode::parse("from", &message.from_country).expect("from");
    let to = CountryCode::parse("to", &message.to_country).expect("to");
    let aad = xborder::aad(&from, &to, &message.return_id, message.origin_version);
    let plain = xborder::open(key, from_key, &aad, message.sealed.as_ref().expect("sealed")).expect("it opens");
    let snapshot = pb::CrossBorderReturn::decode(plain.as_slice()).expect("a CrossBorderReturn");
    assert_eq!(snapshot.origin_version, message.origin_version);
    assert_eq!(snapshot.return_id, message.return_id);
    snapshot
}
