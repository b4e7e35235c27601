//! Authentication: every RPC carries `authorization: Bearer <JWT>` naming the
//! caller's agency, role and (pseudonymous) officer. The verified caller
//! becomes the actor of every event the call appends.
//!
//! Tokens are verified, never minted: a service holds only public keys, the
//! JWK set at `NRM_AUTH__JWKS` (an OpenID Connect provider's `jwks_uri` in
//! production; the development issuer's `jwks.json`, written by `nrmctl
//! issuer init`, under `make run`). The algorithm is the key's (EdDSA for
//! Ed25519, RS256 for RSA), never the token header's. What each role may do
//! is decided by each service with [`Role`] (the full permission matrix grows
//! with the services).

use std::collections::HashMap;
use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, PoisonError, RwLock};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use base64::Engine as _;
use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, Jwk, KeyAlgorithm, PublicKeyUse};
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde::Deserialize;
use tokio_util::sync::CancellationToken;

use crate::error::AppError;
use crate::settings::{AuthSettings, redacted_url};
use crate::store::Actor;

/// A role in the referral mechanism.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Role {
    /// Police (anti-trafficking units): report, screen, decide.
    Police,
    /// Prosecutors: report, screen, decide.
    Prosecutor,
    /// Border service: report, screen.
    BorderService,
    /// NGOs: report presumed victims.
    Ngo,
    /// Hotlines: report presumed victims, and nothing more.
    Hotline,
    /// IOM offices: report; repatriation.
    Iom,
    /// Consulates (MFA): repatriation.
    Consulate,
    /// Ministry of Social Development.
    Msd,
    /// Ministry of Health.
    Moh,
    /// Shelters and crisis centres.
    Shelter,
    /// National coordinator: sees every case.
    Coordinator,
    /// Auditors: read the audit trail, and nothing else.
    Auditor,
    /// Operators of the deployment: parked items, refilling the bus; no case data.
    Operator,
}

impl Role {
    /// Every role, for help texts.
    pub const ALL: [Role; 13] = [
        Role::Police,
        Role::Prosecutor,
        Role::BorderService,
        Role::Ngo,
        Role::Hotline,
        Role::Iom,
        Role::Consulate,
        Role::Msd,
        Role::Moh,
        Role::Shelter,
        Role::Coordinator,
        Role::Auditor,
        Role::Operator,
    ];

    /// The role's code in tokens and events.
    #[must_use]
    pub const fn as_str(self) -> &'static str {
        match self {
            Role::Police => "police",
            Role::Prosecutor => "prosecutor",
            Role::BorderService => "border_service",
            Role::Ngo => "ngo",
            Role::Hotline => "hotline",
            Role::Iom => "iom",
            Role::Consulate => "consulate",
            Role::Msd => "msd",
            Role::Moh => "moh",
            Role::Shelter => "shelter",
            Role::Coordinator => "coordinator",
            Role::Auditor => "auditor",
            Role::Operator => "operator",
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Role {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Role::ALL
            .into_iter()
            .find(|r| r.as_str() == s)
            .ok_or_else(|| format!("unknown role; one of: {}", Role::ALL.map(Role::as_str).join(", ")))
    }
}

/// The verified caller of an RPC.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    /// The caller as it is recorded on events.
    pub actor: Actor,
    /// The caller's role.
    pub role: Role,
}

impl Caller {
    /// Fails with `PERMISSION_DENIED` unless the caller has one of `roles`.
    ///
    /// # Errors
    /// [`AppError::PermissionDenied`] naming the action.
    pub fn require(&self, action: &str, roles: &[Role]) -> Result<(), AppError> {
        if roles.contains(&self.role) {
            Ok(())
        } else {
            Err(AppError::PermissionDenied(format!(
                "role {} may not {action}; allowed: {}",
                self.role,
                roles.iter().map(|r| r.as_str()).collect::<Vec<_>>().join(", ")
            )))
        }
    }
}

/// Where the public keys come from (`NRM_AUTH__JWKS`).
#[derive(Debug)]
enum KeySource {
    /// `file:///path/jwks.json`: the development issuer's set.
    File(PathBuf),
    /// `https://…` (or `http://…`): an OpenID Connect provider's `jwks_uri`.
    Http { url: String, client: reqwest::Client },
}

/// The largest JWK set read, in bytes.
const MAX_JWKS_BYTES: usize = 1 << 20;

impl KeySource {
    fn parse(url: &str) -> Result<Self, anyhow::Error> {
        if let Some(path) = url.strip_prefix("file://") {
            if !path.starts_with('/') {
                anyhow::bail!("NRM_AUTH__JWKS: a file URL needs an absolute path (file:///…/jwks.json)");
            }
            return Ok(Self::File(PathBuf::from(path)));
        }
        if url.starts_with("https://") || url.starts_with("http://") {
            let client = reqwest::Client::builder()
                .timeout(Duration::from_secs(10))
                .build()
                .context("building the JWKS client")?;
            return Ok(Self::Http {
                url: url.to_owned(),
                client,
            });
        }
        anyhow::bail!("NRM_AUTH__JWKS must be a file://, https:// or http:// URL")
    }

    async fn fetch(&self) -> Result<Vec<u8>, anyhow::Error> {
        match self {
            Self::File(path) => {
                let path = path.clone();
                tokio::task::spawn_blocking(move || {
                    std::fs::read(&path).with_context(|| format!("reading the JWK set {}", path.display()))
                })
                .await?
            }
            Self::Http { url, client } => {
                let response = client
                    .get(url)
                    .header(http::header::ACCEPT, "application/json")
                    .send()
                    .await
                    .and_then(reqwest::Response::error_for_status)
                    .with_context(|| format!("fetching the JWK set from {}", redacted_url(url)))?;
                if response.content_length().is_some_and(|n| n > MAX_JWKS_BYTES as u64) {
                    anyhow::bail!("the JWK set at {} is too large", redacted_url(url));
                }
                let body = response.bytes().await.context("reading the JWK set")?;
                if body.len() > MAX_JWKS_BYTES {
                    anyhow::bail!("the JWK set at {} is too large", redacted_url(url));
                }
                Ok(body.to_vec())
            }
        }
    }
}

/// A public key of the set, with the one algorithm it verifies.
struct VerifyingKey {
    key: DecodingKey,
    validation: Validation,
}

/// The usable keys of a JWK set, by `kid`.
#[derive(Default)]
struct KeySet {
    keys: HashMap<String, Arc<VerifyingKey>>,
}

impl KeySet {
    /// The signing keys of `json` that this service verifies with: Ed25519
    /// (`EdDSA`) and RSA (`RS256`) keys with a `kid`, meant for signatures.
    /// Other keys (encryption keys, symmetric keys, other curves) are
    /// skipped: a symmetric key is never taken from a key set.
    fn parse(json: &[u8], validation: &Validation) -> Result<Self, anyhow::Error> {
        #[derive(Deserialize)]
        struct RawSet {
            keys: Vec<serde_json::Value>,
        }
        let raw: RawSet = serde_json::from_slice(json).context("the JWK set is not a JSON object with keys")?;
        let mut keys = HashMap::new();
        for value in raw.keys {
            let Ok(jwk) = serde_json::from_value::<Jwk>(value) else {
                continue;
            };
            let Some(kid) = jwk.common.key_id.clone().filter(|k| !k.is_empty()) else {
                continue;
            };
            if jwk
                .common
                .public_key_use
                .as_ref()
                .is_some_and(|u| *u != PublicKeyUse::Signature)
            {
                continue;
            }
            let Some(algorithm) = key_algorithm(&jwk) else {
                continue;
            };
            let Ok(key) = DecodingKey::from_jwk(&jwk) else {
                continue;
            };
            let mut validation = validation.clone();
            validation.algorithms = vec![algorithm];
            keys.insert(kid, Arc::new(VerifyingKey { key, validation }));
        }
        if keys.is_empty() {
            anyhow::bail!("the JWK set holds no usable signing key (Ed25519 or RSA, with a kid)");
        }
        Ok(Self { keys })
    }
}

/// The one algorithm `jwk` verifies, from the key itself: `EdDSA` for an
/// Ed25519 key of 32 bytes, `RS256` for an RSA key; `None` for any other
/// key, or a key whose `alg` names another algorithm.
fn key_algorithm(jwk: &Jwk) -> Option<Algorithm> {
    let (algorithm, expected) = match &jwk.algorithm {
        AlgorithmParameters::OctetKeyPair(okp) => {
            let x = base64::engine::general_purpose::URL_SAFE_NO_PAD
                .decode(okp.x.trim_end_matches('='))
                .ok()?;
            if okp.curve != EllipticCurve::Ed25519 || x.len() != 32 {
                return None;
            }
            (Algorithm::EdDSA, KeyAlgorithm::EdDSA)
        }
        AlgorithmParameters::RSA(_) => (Algorithm::RS256, KeyAlgorithm::RS256),
        AlgorithmParameters::EllipticCurve(_) | AlgorithmParameters::OctetKey(_) => return None,
    };
    match jwk.common.key_algorithm {
        None => Some(algorithm),
        Some(named) if named == expected => Some(algorithm),
        Some(_) => None,
    }
}

/// The claims a service reads from a verified token (`exp`, `iss`, `aud`
/// and `nbf` are checked by the validation).
#[derive(Deserialize)]
struct VerifiedClaims {
    sub: String,
    agency: String,
    role: String,
    iat: i64,
    exp: i64,
}

/// Verifies bearer tokens: asymmetric signatures (EdDSA, RS256) against a
/// JWK set, the configured issuer and audience, and a maximum lifetime. The
/// set is cached, fetched again periodically ([`Authenticator::run_refresh`])
/// and when a token names an unknown `kid` (at most once per
/// `jwks_min_refresh_seconds`).
#[derive(Clone)]
pub struct Authenticator {
    inner: Arc<Inner>,
}

struct Inner {
    source: KeySource,
    validation: Validation,
    max_lifetime_seconds: i64,
    leeway_seconds: i64,
    refresh_every: Duration,
    min_refresh: Duration,
    keys: RwLock<Arc<KeySet>>,
    /// When the last refresh for an unknown `kid` started; held while it runs.
    last_refresh: tokio::sync::Mutex<Option<Instant>>,
    fetches: AtomicU64,
}

impl fmt::Debug for Authenticator {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Authenticator(..)")
    }
}

impl Authenticator {
    /// An authenticator with the key set of `settings.jwks`, read once now.
    ///
    /// # Errors
    /// When the settings are malformed, or a `file://` set cannot be read or
    /// holds no usable key. A set behind `https://` that cannot be fetched
    /// now is only logged: tokens are refused until it can be.
    pub async fn new(settings: &AuthSettings) -> Result<Self, anyhow::Error> {
        let source = KeySource::parse(settings.jwks.trim())?;
        let mut validation = Validation::new(Algorithm::EdDSA);
        validation.set_issuer(&[&settings.issuer]);
        validation.set_audience(&[&settings.audience]);
        validation.set_required_spec_claims(&["exp", "iss", "aud", "sub"]);
        validation.validate_exp = true;
        validation.validate_nbf = true;
        validation.leeway = settings.leeway_seconds;
        let auth = Self {
            inner: Arc::new(Inner {
                source,
                validation,
                max_lifetime_seconds: i64::try_from(settings.max_token_lifetime_seconds).unwrap_or(i64::MAX),
                leeway_seconds: i64::try_from(settings.leeway_seconds).unwrap_or(i64::MAX),
                refresh_every: Duration::from_secs(settings.jwks_refresh_seconds.max(1)),
                min_refresh: Duration::from_secs(settings.jwks_min_refresh_seconds),
                keys: RwLock::new(Arc::new(KeySet::default())),
                last_refresh: tokio::sync::Mutex::new(None),
                fetches: AtomicU64::new(0),
            }),
        };
        match auth.refresh().await {
            Ok(count) => tracing::info!(keys = count, jwks = %redacted_url(&settings.jwks), "token keys loaded"),
            Err(err) if matches!(auth.inner.source, KeySource::Http { .. }) => {
                tracing::warn!(error = %err, "token keys not loaded yet: tokens are refused until they are");
            }
            Err(err) => return Err(err),
        }
        Ok(auth)
    }

    /// Fetches the key set again and replaces the cached one; returns how
    /// many keys it holds. On failure the cached set stays.
    ///
    /// # Errors
    /// When the set cannot be fetched or holds no usable key.
    pub async fn refresh(&self) -> Result<usize, anyhow::Error> {
        self.inner.fetches.fetch_add(1, Ordering::Relaxed);
        let json = self.inner.source.fetch().await?;
        let set = KeySet::parse(&json, &self.inner.validation)?;
        let count = set.keys.len();
        *self.inner.keys.write().unwrap_or_else(PoisonError::into_inner) = Arc::new(set);
        Ok(count)
    }

    /// How many times the key set was fetched (tests, diagnostics).
    #[must_use]
    pub fn fetches(&self) -> u64 {
        self.inner.fetches.load(Ordering::Relaxed)
    }

    /// Refreshes the key set every `jwks_refresh_seconds` until `stop`.
    pub async fn run_refresh(self, stop: CancellationToken) {
        loop {
            tokio::select! {
                () = stop.cancelled() => return,
                () = tokio::time::sleep(self.inner.refresh_every) => {}
            }
            if let Err(err) = self.refresh().await {
                tracing::warn!(error = %err, "token keys not refreshed; the cached ones stay");
            }
        }
    }

    fn cached(&self, kid: &str) -> Option<Arc<VerifyingKey>> {
        self.inner
            .keys
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .keys
            .get(kid)
            .cloned()
    }

    /// The key `kid`, refreshing the set once when it is unknown and the
    /// last such refresh is at least `jwks_min_refresh_seconds` old.
    async fn key(&self, kid: &str) -> Option<Arc<VerifyingKey>> {
        if let Some(key) = self.cached(kid) {
            return Some(key);
        }
        {
            let mut last = self.inner.last_refresh.lock().await;
            // Another call may have refreshed while this one waited.
            if let Some(key) = self.cached(kid) {
                return Some(key);
            }
            if last.is_none_or(|at| at.elapsed() >= self.inner.min_refresh) {
                *last = Some(Instant::now());
                if let Err(err) = self.refresh().await {
                    tracing::warn!(error = %err, "token keys not refreshed for an unknown kid");
                }
            }
        }
        self.cached(kid)
    }

    /// The caller named by `authorization` metadata.
    ///
    /// # Errors
    /// [`AppError::Unauthenticated`] for a missing or malformed token; one
    /// with no `kid`, an unknown `kid`, an algorithm other than its key's
    /// (`none`, HS256, …) or a bad signature; one that is expired, not yet
    /// valid, issued in the future, from another issuer, for another
    /// audience or living longer than `max_token_lifetime_seconds`; or one
    /// that names no agency, no officer or an unknown role. The message names
    /// the reason, never the token's content.
    pub async fn verify(&self, metadata: &tonic::metadata::MetadataMap) -> Result<Caller, AppError> {
        let header = metadata
            .get("authorization")
            .ok_or(AppError::Unauthenticated(
                "missing authorization metadata (Bearer token)",
            ))?
            .to_str()
            .map_err(|_| AppError::Unauthenticated("authorization metadata is not text"))?;
        let token = header
            .strip_prefix("Bearer ")
            .or_else(|| header.strip_prefix("bearer "))
            .ok_or(AppError::Unauthenticated("authorization must be 'Bearer <token>'"))?
            .trim();
        let refused = |reason: &'static str| {
            tracing::debug!(reason, "token refused");
            AppError::Unauthenticated(reason)
        };
        // The header's algorithm only selects nothing: `none` and unknown
        // algorithms do not even parse, and the key decides the algorithm.
        let header = jsonwebtoken::decode_header(token)
            .map_err(|_| refused("token is malformed or names an unsupported algorithm"))?;
        let kid = header.kid.ok_or_else(|| refused("token names no key (kid)"))?;
        let key = self
            .key(&kid)
            .await
            .ok_or_else(|| refused("token is signed by an unknown key"))?;
        if !key.validation.algorithms.contains(&header.alg) {
            return Err(refused("token's algorithm is not its key's"));
        }
        let claims = jsonwebtoken::decode::<VerifiedClaims>(token, &key.key, &key.validation)
            .map_err(|_| refused("token is invalid, expired, not yet valid or not for this service"))?
            .claims;
        if claims.exp.saturating_sub(claims.iat) > self.inner.max_lifetime_seconds {
            return Err(refused("token lives longer than allowed"));
        }
        if claims.iat > chrono::Utc::now().timestamp().saturating_add(self.inner.leeway_seconds) {
            return Err(refused("token is issued in the future"));
        }
        let role = Role::from_str(&claims.role).map_err(|_| refused("token names an unknown role"))?;
        if claims.agency.is_empty() || claims.sub.is_empty() {
            return Err(refused("token lacks agency or officer"));
        }
        Ok(Caller {
            actor: Actor {
                agency: claims.agency,
                role: claims.role,
                officer: claims.sub,
            },
            role,
        })
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)] // Test code: a failed unwrap is a failed test.

    use base64::engine::general_purpose::URL_SAFE_NO_PAD;
    use jsonwebtoken::{EncodingKey, Header};
    use nrm_issuer::{SigningKey, TokenClaims, jwks};

    use super::*;

    /// A JWK set file of its own and an authenticator on it that refreshes
    /// for an unknown kid at once.
    struct Fixture {
        path: PathBuf,
        key: SigningKey,
        auth: Authenticator,
    }

    impl Fixture {
        async fn new() -> Self {
            let dir = std::env::temp_dir().join(format!("nrm-auth-test-{}", uuid::Uuid::new_v4().simple()));
            std::fs::create_dir_all(&dir).unwrap();
            let path = dir.join("jwks.json");
            let key = SigningKey::generate();
            write_set(&path, &[&key]);
            let settings = AuthSettings {
                jwks_min_refresh_seconds: 0,
                ..AuthSettings::new(format!("file://{}", path.display()))
            };
            let auth = Authenticator::new(&settings).await.unwrap();
            Self { path, key, auth }
        }

        async fn verify(&self, token: &str) -> Result<Caller, AppError> {
            self.auth.verify(&metadata(token)).await
        }
    }

    fn write_set(path: &std::path::Path, keys: &[&SigningKey]) {
        std::fs::write(path, serde_json::to_vec(&jwks(keys)).unwrap()).unwrap();
    }

    fn metadata(token: &str) -> tonic::metadata::MetadataMap {
        let mut m = tonic::metadata::MetadataMap::new();
        m.insert("authorization", format!("Bearer {token}").parse().unwrap());
        m
    }

    fn good() -> TokenClaims {
        TokenClaims::new("kopur", "kopur", "kg-mvd", "police", "officer-17", 600)
    }

    fn assert_refused(result: Result<Caller, AppError>, why: &str) {
        match result {
            Err(AppError::Unauthenticated(_)) => {}
            other => panic!("{why}: expected UNAUTHENTICATED, got {other:?}"),
        }
    }

    fn b64(json: &serde_json::Value) -> String {
        URL_SAFE_NO_PAD.encode(serde_json::to_vec(json).unwrap())
    }

    #[tokio::test]
    async fn a_token_signed_by_the_issuer_names_the_caller() {
        let f = Fixture::new().await;
        let caller = f.verify(&f.key.sign(&good()).unwrap()).await.unwrap();
        assert_eq!(caller.role, Role::Police);
        assert_eq!(caller.actor.agency, "kg-mvd");
        assert_eq!(caller.actor.officer, "officer-17");
    }

    #[tokio::test]
    async fn an_expired_token_is_refused() {
        let f = Fixture::new().await;
        let now = chrono::Utc::now().timestamp();
        let claims = TokenClaims {
            iat: now - 1000,
            exp: now - 100,
            ..good()
        };
        assert_refused(f.verify(&f.key.sign(&claims).unwrap()).await, "expired");
    }

    #[tokio::test]
    async fn a_token_not_yet_valid_is_refused() {
        let f = Fixture::new().await;
        let now = chrono::Utc::now().timestamp();
        let claims = TokenClaims {
            nbf: Some(now + 600),
            exp: now + 1200,
            ..good()
        };
        assert_refused(f.verify(&f.key.sign(&claims).unwrap()).await, "nbf in the future");
        let issued_later = TokenClaims {
            iat: now + 600,
            exp: now + 1200,
            ..good()
        };
        assert_refused(f.verify(&f.key.sign(&issued_later).unwrap()).await, "iat in the future");
    }

    #[tokio::test]
    async fn a_token_of_another_issuer_or_audience_is_refused() {
        let f = Fixture::new().await;
        let issuer = TokenClaims {
            iss: "someone-else".into(),
            ..good()
        };
        assert_refused(f.verify(&f.key.sign(&issuer).unwrap()).await, "wrong issuer");
        let audience = TokenClaims {
            aud: "another-service".into(),
            ..good()
        };
        assert_refused(f.verify(&f.key.sign(&audience).unwrap()).await, "wrong audience");
    }

    #[tokio::test]
    async fn a_token_lacking_a_required_claim_is_refused() {
        let f = Fixture::new().await;
        let mut claims = serde_json::to_value(good()).unwrap();
        for claim in ["exp", "iat", "iss", "aud", "sub", "agency", "role"] {
            let mut partial = claims.clone();
            partial.as_object_mut().unwrap().remove(claim);
            assert_refused(f.verify(&f.key.sign(&partial).unwrap()).await, claim);
        }
        claims["role"] = "mayor".into();
        assert_refused(f.verify(&f.key.sign(&claims).unwrap()).await, "unknown role");
    }

    #[tokio::test]
    async fn a_token_living_longer_than_allowed_is_refused() {
        let f = Fixture::new().await;
        let long = TokenClaims::new("kopur", "kopur", "kg-mvd", "police", "o", 3601);
        assert_refused(f.verify(&f.key.sign(&long).unwrap()).await, "lifetime");
        let max = TokenClaims::new("kopur", "kopur", "kg-mvd", "police", "o", 3600);
        assert!(f.verify(&f.key.sign(&max).unwrap()).await.is_ok());
    }

    #[tokio::test]
    async fn an_unsigned_token_alg_none_is_refused() {
        let f = Fixture::new().await;
        let header = b64(&serde_json::json!({"alg": "none", "typ": "JWT", "kid": f.key.kid()}));
        let claims = b64(&serde_json::to_value(good()).unwrap());
        assert_refused(f.verify(&format!("{header}.{claims}.")).await, "alg none");
        // The signature of a real token does not make `none` any better.
        let real = f.key.sign(&good()).unwrap();
        let signature = real.rsplit('.').next().unwrap();
        assert_refused(
            f.verify(&format!("{header}.{claims}.{signature}")).await,
            "alg none, signed",
        );
    }

    #[tokio::test]
    async fn an_hs256_token_signed_with_the_public_key_is_refused() {
        let f = Fixture::new().await;
        let mut header = Header::new(Algorithm::HS256);
        header.kid = Some(f.key.kid().to_owned());
        let public_jwk = serde_json::to_vec(&f.key.public_jwk()).unwrap();
        let set = std::fs::read(&f.path).unwrap();
        for secret in [&f.key.public_bytes()[..], &public_jwk, &set] {
            let token = jsonwebtoken::encode(&header, &good(), &EncodingKey::from_secret(secret)).unwrap();
            assert_refused(f.verify(&token).await, "HS256 with the public key");
        }
    }

    #[tokio::test]
    async fn a_token_signed_by_another_key_under_a_known_kid_is_refused() {
        let f = Fixture::new().await;
        let forger = SigningKey::generate().with_kid(f.key.kid());
        assert_refused(f.verify(&forger.sign(&good()).unwrap()).await, "wrong key");
    }

    #[tokio::test]
    async fn a_token_with_an_unknown_kid_or_none_is_refused() {
        let f = Fixture::new().await;
        let stranger = SigningKey::generate();
        assert_refused(f.verify(&stranger.sign(&good()).unwrap()).await, "unknown kid");
        let token = jsonwebtoken::encode(&Header::new(Algorithm::EdDSA), &good(), &f.key.encoding_key()).unwrap();
        assert_refused(f.verify(&token).await, "no kid");
        assert_refused(f.verify("not-a-token").await, "garbage");
        assert_refused(f.auth.verify(&tonic::metadata::MetadataMap::new()).await, "no metadata");
    }

    #[tokio::test]
    async fn old_and_new_keys_verify_after_a_rotation_and_a_retired_key_does_not() {
        let f = Fixture::new().await;
        let old_token = f.key.sign(&good()).unwrap();
        let new = SigningKey::generate();
        let new_token = new.sign(&good()).unwrap();
        assert_refused(f.verify(&new_token).await, "new kid before the set has it");
        write_set(&f.path, &[&new, &f.key]);
        let before = f.auth.fetches();
        f.verify(&new_token).await.expect("the unknown kid refreshes the set");
        assert_eq!(f.auth.fetches(), before + 1);
        f.verify(&old_token).await.expect("the old key stays until retired");
        write_set(&f.path, &[&new]);
        f.auth.refresh().await.unwrap();
        assert_refused(f.verify(&old_token).await, "retired kid");
        f.verify(&new_token).await.unwrap();
    }

    #[tokio::test]
    async fn unknown_kids_refresh_the_set_at_most_once_per_interval() {
        let dir = std::env::temp_dir().join(format!("nrm-auth-test-{}", uuid::Uuid::new_v4().simple()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("jwks.json");
        let key = SigningKey::generate();
        write_set(&path, &[&key]);
        let auth = Authenticator::new(&AuthSettings::new(format!("file://{}", path.display())))
            .await
            .unwrap();
        let after_start = auth.fetches();
        for _ in 0..5 {
            let stranger = SigningKey::generate().sign(&good()).unwrap();
            assert_refused(auth.verify(&metadata(&stranger)).await, "unknown kid");
        }
        assert_eq!(auth.fetches(), after_start + 1, "one refresh in 30 s");
    }

    #[tokio::test]
    async fn a_set_with_no_usable_key_is_refused_at_start() {
        let dir = std::env::temp_dir().join(format!("nrm-auth-test-{}", uuid::Uuid::new_v4().simple()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("jwks.json");
        // A symmetric key is never taken from a key set.
        std::fs::write(
            &path,
            r#"{"keys":[{"kty":"oct","k":"c2VjcmV0","kid":"k1","alg":"HS256"}]}"#,
        )
        .unwrap();
        let settings = AuthSettings::new(format!("file://{}", path.display()));
        assert!(Authenticator::new(&settings).await.is_err());
        assert!(Authenticator::new(&AuthSettings::new("/etc/jwks.json")).await.is_err());
    }

    #[test]
    fn roles_outside_the_list_are_denied() {
        let caller = Caller {
            actor: Actor {
                agency: "kg-moh".into(),
                role: "moh".into(),
                officer: "o".into(),
            },
            role: Role::Moh,
        };
        assert!(caller.require("decide identification", &[Role::Police]).is_err());
        assert!(caller.require("read", &[Role::Moh]).is_ok());
    }
}
