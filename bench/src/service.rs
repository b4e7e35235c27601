//! The identification service, started in this process for the end-to-end
//! measurement: its own database, subjects and stream on the benchmark's
//! servers, a gRPC client and tokens.
//!
//! This mirrors what the test harness (`tests/src/lib.rs`) does, without
//! depending on it: the harness builds every service and changes with the
//! tests, and the benchmark needs only the identification service.

use std::time::Duration;

use anyhow::Context as _;
use base64::Engine as _;
use nrm_identification::config::{IdentificationSettings, Settings};
use nrm_identification::startup::Application;
use nrm_kernel::auth::Role;
use nrm_kernel::retry::RetryPolicy;
use nrm_kernel::service::{CommonSettings, Service as _};
use nrm_kernel::settings::{
    AuthSettings, DatabaseSettings, NatsSettings, RelaySettings, SealingSettings, ServerSettings, TelemetrySettings,
};
use nrm_proto::common::v1 as common;
use nrm_proto::identification::v1 as pb;
use nrm_proto::identification::v1::identification_service_client::IdentificationServiceClient;
use secrecy::SecretString;
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;

/// The benchmark's development issuer, once made ([`issuer`]).
static ISSUER: std::sync::OnceLock<(std::path::PathBuf, nrm_issuer::SigningKey)> = std::sync::OnceLock::new();

/// The benchmark's development issuer: a key pair made once per run, in a
/// folder of its own ([`IssuerFolder`] removes it); the services read only
/// its `jwks.json`.
///
/// # Errors
/// When the issuer folder cannot be written.
fn issuer() -> anyhow::Result<&'static (std::path::PathBuf, nrm_issuer::SigningKey)> {
    if let Some(issuer) = ISSUER.get() {
        return Ok(issuer);
    }
    let dir = std::env::temp_dir().join(format!("nrm-bench-issuer-{}", uuid::Uuid::new_v4().simple()));
    let key = nrm_issuer::init(&dir)?;
    Ok(ISSUER.get_or_init(|| (dir, key)))
}

/// Removes the issuer's folder (its private key with it), if it was made,
/// when dropped: at the end of a run, when no service of the run is left
/// to read it.
pub struct IssuerFolder;

impl Drop for IssuerFolder {
    fn drop(&mut self) {
        if let Some((dir, _)) = ISSUER.get()
            && let Err(err) = std::fs::remove_dir_all(dir)
        {
            eprintln!("bench: could not remove {}: {err}", dir.display());
        }
    }
}

/// The token settings of the benchmark's services.
///
/// # Errors
/// When the issuer folder cannot be written.
pub fn auth_settings() -> anyhow::Result<AuthSettings> {
    let (dir, _) = issuer()?;
    Ok(AuthSettings::new(format!(
        "file://{}",
        nrm_issuer::jwks_path(dir).display()
    )))
}

/// A running identification service.
pub struct Service {
    /// Its settings (database, subjects).
    pub settings: Settings,
    /// A client.
    pub client: IdentificationServiceClient<Channel>,
    shutdown: CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

impl Service {
    /// Starts the service on port 0 with a database and subjects of its own.
    ///
    /// # Errors
    /// When it cannot be built or reached.
    pub async fn start(database_url: &str, nats_url: &str) -> anyhow::Result<Self> {
        let id = uuid::Uuid::new_v4().simple().to_string()[..12].to_owned();
        let key = |b: u8| SecretString::from(base64::engine::general_purpose::STANDARD.encode([b; 32]));
        let settings = Settings {
            common: CommonSettings {
                server: ServerSettings {
                    grpc_addr: "127.0.0.1:0".parse()?,
                    metrics_addr: "127.0.0.1:0".parse()?,
                    ..ServerSettings::default()
                },
                database: DatabaseSettings {
                    url: database_url.to_owned(),
                    name: format!("bench_e2e_{id}"),
                    max_connections: 8,
                },
                nats: NatsSettings {
                    url: nats_url.to_owned(),
                    subject_prefix: format!("b{id}"),
                    stream_prefix: format!("B{}", id.to_ascii_uppercase()),
                    replicas: 1,
                    duplicate_window_seconds: 120,
                },
                relay: RelaySettings::default(),
                retry: RetryPolicy::default(),
                auth: auth_settings()?,
                telemetry: TelemetrySettings::default(),
            },
            sealing: SealingSettings {
                master_key: key(7),
                match_key: key(9),
            },
            identification: IdentificationSettings::default(),
            xborder: nrm_kernel::xborder::XborderSettings::default(),
        };
        let app = Application::build(&settings)
            .await
            .context("build the identification service")?;
        let addr = app.kit().grpc_addr()?;
        let shutdown = CancellationToken::new();
        let stop = shutdown.clone();
        let task = tokio::spawn(async move {
            if let Err(err) = app.run_until_stopped(stop).await {
                eprintln!("bench: the identification service failed: {err:#}");
            }
        });
        let client = IdentificationServiceClient::connect(format!("http://{addr}"))
            .await
            .context("connect to the identification service")?;
        Ok(Self {
            settings,
            client,
            shutdown,
            task,
        })
    }

    /// The service's subjects: `{prefix}.identification.v1.>`.
    #[must_use]
    pub fn subjects(&self) -> String {
        format!("{}.identification.v1.>", self.settings.nats.subject_prefix)
    }

    /// Stops the service and drops its database and stream.
    pub async fn stop(self) {
        self.shutdown.cancel();
        let _ = tokio::time::timeout(Duration::from_secs(15), self.task).await;
        if let Ok(nats) = async_nats::connect(self.settings.nats.url.as_str()).await {
            let stream = format!("{}_IDENTIFICATION", self.settings.nats.stream_prefix);
            let _ = async_nats::jetstream::new(nats).delete_stream(stream).await;
        }
        if let Err(err) = nrm_kernel::db::drop_database(&self.settings.database).await {
            eprintln!("bench: could not drop {}: {err}", self.settings.database.name);
        }
    }
}

/// A bearer token for `officer` of `agency` in `role`.
///
/// # Errors
/// When the token cannot be signed.
pub fn token(agency: &str, role: Role, officer: &str) -> anyhow::Result<String> {
    let (_, key) = issuer()?;
    key.sign(&nrm_issuer::TokenClaims::new(
        nrm_issuer::DEFAULT_ISSUER,
        nrm_issuer::DEFAULT_AUDIENCE,
        agency,
        role.as_str(),
        officer,
        3600,
    ))
}

/// Adds `authorization: Bearer <token>` to a request.
///
/// # Errors
/// When the token is not valid header text.
pub fn authorized<T>(message: T, token: &str) -> anyhow::Result<tonic::Request<T>> {
    let mut request = tonic::Request::new(message);
    request
        .metadata_mut()
        .insert("authorization", format!("Bearer {token}").parse()?);
    Ok(request)
}

/// A valid report of an adult exploited in Kazakhstan, with the given identifiers.
#[must_use]
pub fn report_request(request_id: &str, personal: common::PersonalIdentifiers) -> pb::ReportPresumedVictimRequest {
    let now = chrono::Utc::now().timestamp();
    pb::ReportPresumedVictimRequest {
        request_id: request_id.to_owned(),
        found_at: Some(prost_types::Timestamp {
            seconds: now - 86_400,
            nanos: 0,
        }),
        found_country: "KZ".into(),
        found_region: "ALA".into(),
        country_of_exploitation: "KZ".into(),
        exploitation_forms: vec![pb::ExploitationForm::Labour as i32],
        means_of_control: vec![pb::MeansOfControl::DocumentRetention as i32],
        recruitment_method: pb::RecruitmentMethod::JobOffer as i32,
        recruiter_relationship: pb::RecruiterRelationship::Acquaintance as i32,
        child: false,
        gender: common::Gender::Female as i32,
        age_years: Some(24),
        age_band: 0,
        citizenship: "KG".into(),
        personal: Some(personal),
        // A police reporter handles the case itself.
        competent_authority: String::new(),
    }
}

/// Identifiers of a made-up person.
#[must_use]
pub fn person(name: &str, passport: &str, phone: &str) -> common::PersonalIdentifiers {
    common::PersonalIdentifiers {
        full_name: name.to_owned(),
        date_of_birth: "2001-03-14".into(),
        documents: vec![common::IdentityDocument {
            r#type: common::DocumentType::Passport as i32,
            number: passport.to_owned(),
            issuing_country: "KG".into(),
        }],
        phone: phone.to_owned(),
        address: "Bishkek, Chui 1".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_token_verifies_with_the_benchmark_secret() {
        let token = token("kg-mvd", Role::Police, "officer-17").unwrap();
        assert_eq!(token.split('.').count(), 3);
        let request = authorized((), &token).unwrap();
        assert!(request.metadata().get("authorization").is_some());
    }
}
