//! The development token issuer: it holds Ed25519 private keys and signs
//! bearer tokens with them; the services only ever see the public JWK set
//! it writes (`NRM_AUTH__JWKS=file://…/jwks.json`). In production an OpenID
//! Connect provider takes its place.
//!
//! This crate is linked by `nrmctl`, the tests and the benchmarks, never by
//! a service: no service can mint a token.
//!
//! An issuer folder holds:
//! - `signing-key.jwk`: the current private key, a JWK (RFC 8037) with its
//!   `kid`, mode 600;
//! - `jwks.json`: the public keys, the current one first, mode 644. A
//!   rotation adds a key and keeps the older public keys, so tokens signed
//!   before it verify until they expire or the key is retired.
//!
//! # Layout
//! - [`SigningKey`]: one key pair: generate, load, save, sign.
//! - [`TokenClaims`]: the claims of a Köpür token.
//! - [`init`], [`rotate`], [`retire`]: the issuer folder.

use std::fs;
use std::io::Write as _;
use std::os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};

use anyhow::{Context as _, Result, bail};
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

/// The private key's file in an issuer folder.
pub const SIGNING_KEY_FILE: &str = "signing-key.jwk";
/// The public key set's file in an issuer folder.
pub const JWKS_FILE: &str = "jwks.json";
/// The issuer the services expect unless configured otherwise (`NRM_AUTH__ISSUER`).
pub const DEFAULT_ISSUER: &str = "kopur";
/// The audience the services expect unless configured otherwise (`NRM_AUTH__AUDIENCE`).
pub const DEFAULT_AUDIENCE: &str = "kopur";

/// The PKCS#8 v1 prefix of an Ed25519 private key (RFC 8410): the 32-byte
/// seed follows it.
const PKCS8_ED25519_PREFIX: [u8; 16] = [
    0x30, 0x2e, 0x02, 0x01, 0x00, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x04, 0x22, 0x04, 0x20,
];

/// The claims of a Köpür token.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenClaims {
    /// Issuer.
    pub iss: String,
    /// Audience: the services.
    pub aud: String,
    /// Pseudonymous officer ID.
    pub sub: String,
    /// Agency code.
    pub agency: String,
    /// Role code.
    pub role: String,
    /// Issued at (seconds since the epoch).
    pub iat: i64,
    /// Not before (seconds since the epoch).
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub nbf: Option<i64>,
    /// Expiry (seconds since the epoch).
    pub exp: i64,
}

impl TokenClaims {
    /// Claims for `officer` of `agency` in `role` (a role code such as
    /// `police`), valid for `ttl_seconds` from now.
    #[must_use]
    pub fn new(issuer: &str, audience: &str, agency: &str, role: &str, officer: &str, ttl_seconds: i64) -> Self {
        let now = chrono::Utc::now().timestamp();
        Self {
            iss: issuer.to_owned(),
            aud: audience.to_owned(),
            sub: officer.to_owned(),
            agency: agency.to_owned(),
            role: role.to_owned(),
            iat: now,
            nbf: None,
            exp: now + ttl_seconds,
        }
    }
}

/// An Ed25519 key pair and its key ID.
#[derive(Clone)]
pub struct SigningKey {
    kid: String,
    key: ed25519_dalek::SigningKey,
}

impl std::fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SigningKey")
            .field("kid", &self.kid)
            .finish_non_exhaustive()
    }
}

/// A private Ed25519 JWK as stored in `signing-key.jwk`.
#[derive(Serialize, Deserialize)]
struct PrivateJwk {
    kty: String,
    crv: String,
    x: String,
    d: String,
    kid: String,
    alg: String,
    #[serde(rename = "use")]
    use_: String,
}

impl SigningKey {
    /// A fresh key pair; its `kid` is the key's RFC 7638 thumbprint.
    #[must_use]
    pub fn generate() -> Self {
        let seed: [u8; 32] = rand::random();
        Self::from_seed(seed)
    }

    /// The key pair of a 32-byte seed.
    #[must_use]
    pub fn from_seed(seed: [u8; 32]) -> Self {
        let key = ed25519_dalek::SigningKey::from_bytes(&seed);
        let x = URL_SAFE_NO_PAD.encode(key.verifying_key().as_bytes());
        // RFC 7638: the required members in lexicographic order, no spaces.
        let canonical = format!(r#"{{"crv":"Ed25519","kty":"OKP","x":"{x}"}}"#);
        let kid = URL_SAFE_NO_PAD.encode(Sha256::digest(canonical.as_bytes()));
        Self { kid, key }
    }

    /// The same key pair under another key ID (tests).
    #[must_use]
    pub fn with_kid(mut self, kid: &str) -> Self {
        kid.clone_into(&mut self.kid);
        self
    }

    /// The key ID.
    #[must_use]
    pub fn kid(&self) -> &str {
        &self.kid
    }

    /// The raw 32-byte public key.
    #[must_use]
    pub fn public_bytes(&self) -> [u8; 32] {
        self.key.verifying_key().to_bytes()
    }

    /// The public key as a JWK (`kty` OKP, `crv` Ed25519, `alg` EdDSA, `use` sig).
    #[must_use]
    pub fn public_jwk(&self) -> serde_json::Value {
        serde_json::json!({
            "kty": "OKP",
            "crv": "Ed25519",
            "x": URL_SAFE_NO_PAD.encode(self.public_bytes()),
            "kid": self.kid,
            "alg": "EdDSA",
            "use": "sig",
        })
    }

    /// Reads a private key written by [`SigningKey::save`].
    ///
    /// # Errors
    /// When the file cannot be read or holds no Ed25519 private JWK.
    pub fn load(path: &Path) -> Result<Self> {
        let text = fs::read_to_string(path).with_context(|| format!("reading the signing key {}", path.display()))?;
        let jwk: PrivateJwk =
            serde_json::from_str(&text).with_context(|| format!("{} is not a private Ed25519 JWK", path.display()))?;
        if jwk.kty != "OKP" || jwk.crv != "Ed25519" {
            bail!("{} is not an Ed25519 key", path.display());
        }
        let seed = URL_SAFE_NO_PAD
            .decode(jwk.d.trim_end_matches('='))
            .ok()
            .and_then(|d| <[u8; 32]>::try_from(d.as_slice()).ok())
            .with_context(|| format!("{}: d is not 32 bytes of base64url", path.display()))?;
        let key = Self::from_seed(seed).with_kid(&jwk.kid);
        if URL_SAFE_NO_PAD.encode(key.public_bytes()) != jwk.x.trim_end_matches('=') {
            bail!("{}: x is not the public key of d", path.display());
        }
        Ok(key)
    }

    /// Writes the private key to `path`, mode 600 (replacing it atomically).
    ///
    /// # Errors
    /// When the file cannot be written.
    pub fn save(&self, path: &Path) -> Result<()> {
        let jwk = PrivateJwk {
            kty: "OKP".into(),
            crv: "Ed25519".into(),
            x: URL_SAFE_NO_PAD.encode(self.public_bytes()),
            d: URL_SAFE_NO_PAD.encode(self.key.to_bytes()),
            kid: self.kid.clone(),
            alg: "EdDSA".into(),
            use_: "sig".into(),
        };
        let text = serde_json::to_string_pretty(&jwk)?;
        write_atomically(path, text.as_bytes(), 0o600)
    }

    /// Signs `claims` with EdDSA, the header naming this key's `kid`.
    ///
    /// # Errors
    /// When the claims cannot be serialised.
    pub fn sign<T: Serialize>(&self, claims: &T) -> Result<String> {
        let mut header = Header::new(Algorithm::EdDSA);
        header.kid = Some(self.kid.clone());
        jsonwebtoken::encode(&header, claims, &self.encoding_key()).context("signing the token")
    }

    /// The key in the form `jsonwebtoken` signs with (PKCS#8 DER).
    #[must_use]
    pub fn encoding_key(&self) -> EncodingKey {
        let mut der = PKCS8_ED25519_PREFIX.to_vec();
        der.extend_from_slice(&self.key.to_bytes());
        EncodingKey::from_ed_der(&der)
    }
}

/// A JWK set of `keys`' public halves.
#[must_use]
pub fn jwks(keys: &[&SigningKey]) -> serde_json::Value {
    serde_json::json!({ "keys": keys.iter().map(|k| k.public_jwk()).collect::<Vec<_>>() })
}

/// The private key's path in the issuer folder `dir`.
#[must_use]
pub fn signing_key_path(dir: &Path) -> PathBuf {
    dir.join(SIGNING_KEY_FILE)
}

/// The public key set's path in the issuer folder `dir`.
#[must_use]
pub fn jwks_path(dir: &Path) -> PathBuf {
    dir.join(JWKS_FILE)
}

/// Creates the issuer folder `dir` (mode 700) with a fresh key pair; returns
/// the key.
///
/// # Errors
/// When `dir` already holds a signing key, or a file cannot be written.
pub fn init(dir: &Path) -> Result<SigningKey> {
    let key_path = signing_key_path(dir);
    if key_path.exists() {
        bail!(
            "{} exists already: use `nrmctl issuer rotate` for a new key",
            key_path.display()
        );
    }
    fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    fs::set_permissions(dir, fs::Permissions::from_mode(0o700))
        .with_context(|| format!("making {} private", dir.display()))?;
    let key = SigningKey::generate();
    key.save(&key_path)?;
    write_jwks(dir, &[key.public_jwk()])?;
    Ok(key)
}

/// Adds a fresh key pair to the issuer folder `dir`: it signs from now on,
/// and its public key goes first in the set, before the older ones (kept
/// until [`retire`]d). Returns the new key.
///
/// # Errors
/// When `dir` is no issuer folder, or a file cannot be written.
pub fn rotate(dir: &Path) -> Result<SigningKey> {
    SigningKey::load(&signing_key_path(dir))?;
    let mut keys = read_jwks(dir)?;
    let key = SigningKey::generate();
    keys.insert(0, key.public_jwk());
    // The set first, then the key: a token signed by the new key is never
    // out before its public key.
    write_jwks(dir, &keys)?;
    key.save(&signing_key_path(dir))?;
    Ok(key)
}

/// Removes the public key `kid` from the set in `dir`: tokens it signed no
/// longer verify once the services refresh their set.
///
/// # Errors
/// When `kid` is the current signing key or not in the set.
pub fn retire(dir: &Path, kid: &str) -> Result<()> {
    let current = SigningKey::load(&signing_key_path(dir))?;
    if current.kid() == kid {
        bail!("{kid} is the current signing key: rotate first");
    }
    let mut keys = read_jwks(dir)?;
    let before = keys.len();
    keys.retain(|k| k.get("kid").and_then(serde_json::Value::as_str) != Some(kid));
    if keys.len() == before {
        bail!("no key {kid} in {}", jwks_path(dir).display());
    }
    write_jwks(dir, &keys)
}

/// The key IDs in the set of `dir`, the current signing key first.
///
/// # Errors
/// When the set cannot be read.
pub fn kids(dir: &Path) -> Result<Vec<String>> {
    Ok(read_jwks(dir)?
        .iter()
        .filter_map(|k| k.get("kid").and_then(serde_json::Value::as_str).map(str::to_owned))
        .collect())
}

fn read_jwks(dir: &Path) -> Result<Vec<serde_json::Value>> {
    let path = jwks_path(dir);
    let text = fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    let set: serde_json::Value =
        serde_json::from_str(&text).with_context(|| format!("{} is not JSON", path.display()))?;
    set.get("keys")
        .and_then(serde_json::Value::as_array)
        .cloned()
        .with_context(|| format!("{} has no keys array", path.display()))
}

fn write_jwks(dir: &Path, keys: &[serde_json::Value]) -> Result<()> {
    let text = serde_json::to_string_pretty(&serde_json::json!({ "keys": keys }))?;
    write_atomically(&jwks_path(dir), text.as_bytes(), 0o644)
}

fn write_atomically(path: &Path, bytes: &[u8], mode: u32) -> Result<()> {
    let tmp = path.with_extension("tmp");
    let _ = fs::remove_file(&tmp);
    let mut file = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(&tmp)
        .with_context(|| format!("creating {}", tmp.display()))?;
    file.write_all(bytes)?;
    file.sync_all()?;
    drop(file);
    fs::rename(&tmp, path).with_context(|| format!("writing {}", path.display()))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)] // Test code: a failed unwrap is a failed test.

    use super::*;

    fn temp_dir() -> PathBuf {
        let dir = std::env::temp_dir().join(format!("nrm-issuer-test-{}", rand::random::<u64>()));
        fs::create_dir_all(&dir).unwrap();
        dir.join("issuer")
    }

    #[test]
    fn init_writes_a_private_key_only_its_owner_reads_and_the_public_set() {
        let dir = temp_dir();
        let key = init(&dir).unwrap();
        let mode = fs::metadata(signing_key_path(&dir)).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        assert_eq!(kids(&dir).unwrap(), vec![key.kid().to_owned()]);
        let jwks = fs::read_to_string(jwks_path(&dir)).unwrap();
        assert!(!jwks.contains("\"d\""), "{jwks}");
        let loaded = SigningKey::load(&signing_key_path(&dir)).unwrap();
        assert_eq!(loaded.kid(), key.kid());
        assert_eq!(loaded.public_bytes(), key.public_bytes());
        assert!(init(&dir).is_err(), "a second init would lose the key");
    }

    #[test]
    fn rotation_keeps_the_old_public_key_until_it_is_retired() {
        let dir = temp_dir();
        let old = init(&dir).unwrap();
        let new = rotate(&dir).unwrap();
        assert_eq!(kids(&dir).unwrap(), vec![new.kid().to_owned(), old.kid().to_owned()]);
        assert_eq!(SigningKey::load(&signing_key_path(&dir)).unwrap().kid(), new.kid());
        assert!(retire(&dir, new.kid()).is_err(), "the current key stays");
        retire(&dir, old.kid()).unwrap();
        assert_eq!(kids(&dir).unwrap(), vec![new.kid().to_owned()]);
    }

    #[test]
    fn a_signed_token_names_the_key_and_the_algorithm() {
        let key = SigningKey::generate();
        let token = key
            .sign(&TokenClaims::new("kopur", "kopur", "kg-mvd", "police", "o-1", 60))
            .unwrap();
        let header = jsonwebtoken::decode_header(&token).unwrap();
        assert_eq!(header.alg, Algorithm::EdDSA);
        assert_eq!(header.kid.as_deref(), Some(key.kid()));
    }
}
