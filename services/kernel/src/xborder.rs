//! Across the border: country codes, each country's key pair, the partner
//! countries of this deployment, and sealing what crosses for the receiver.
//!
//! Each country runs its own deployment and holds one X25519 key pair. What
//! crosses (a `CrossBorderReturn`) is sealed with HPKE (RFC 9180) in auth
//! mode, suite X25519-HKDF-SHA256 / HKDF-SHA256 / ChaCha20-Poly1305: to the
//! receiving country's public key and authenticated by the sending
//! country's private key, so a message opens only with the key pair of the
//! partner it claims to come from. Whoever can publish on a NATS server on
//! the way (an operator, a service user, the link) and holds the receiver's
//! public key still cannot forge one. `info` is empty; the associated data of
//! [`aad`] binds the ciphertext to the sender, the receiver, the return and
//! its version: a message replayed under another return, or to another
//! country, does not open. Only the receiving country can open it; the
//! sender keeps nothing it could open again.
//!
//! Settings (`NRM_XBORDER__*`, see [`XborderSettings`]) name this country,
//! the file with its private key, and every partner with the file of its
//! public key. [`XborderSettings::load`] reads and checks them all at start.
//!
//! Key files hold one line, the 32 raw key bytes in standard base64
//! (`nrmctl xborder keygen` writes them). A key's ID is the hex of the first
//! 8 bytes of the SHA-256 of its public key: a sealed message names the key
//! it was sealed to, so a receiver that holds another key says so instead
//! of failing to open.
//!
//! No error of this module carries key material or plaintext: they name the
//! setting, the file, the key ID or the country code.

use std::fmt;
use std::path::{Path, PathBuf};

use base64::Engine as _;
use hpke::aead::ChaCha20Poly1305;
use hpke::kdf::HkdfSha256;
use hpke::kem::X25519HkdfSha256;
use hpke::{Deserializable as _, Kem as _, OpModeR, OpModeS, Serializable as _};
use serde::Deserialize;
use sha2::{Digest as _, Sha256};
use zeroize::Zeroizing;

use crate::error::FieldViolation;
use nrm_proto::repatriation::v1::SealedForCountry;

/// Payload type of the events that cross: one `CrossBorderMessage` per commit.
pub const OUTBOUND_PAYLOAD_TYPE: &str = "nrm.repatriation.v1.CrossBorderMessage";

/// First token of the associated data of every sealed message.
const AAD_DOMAIN: &str = "nrm.xborder.v1";

/// The HPKE `info` (empty: the associated data carries the context).
const INFO: &[u8] = b"";

type Kem = X25519HkdfSha256;

/// Errors of the cross-border settings, keys and sealed messages. None
/// carries key material or plaintext.
#[derive(Debug, thiserror::Error)]
pub enum XborderError {
    /// A setting is malformed.
    #[error("{setting}: {reason}")]
    Setting {
        /// The environment variable (`NRM_XBORDER__PARTNERS`, …).
        setting: &'static str,
        /// What is wrong, and what a valid value looks like.
        reason: String,
    },
    /// A key file cannot be read or does not hold a key.
    #[error("key file {path}: {reason}")]
    KeyFile {
        /// The file.
        path: PathBuf,
        /// Why (never its content).
        reason: String,
    },
    /// The message was sealed to another key than the one this country holds.
    #[error("sealed for key {sealed_for}, but this country's key is {ours}")]
    OtherKey {
        /// The key ID the message names.
        sealed_for: String,
        /// The key ID of this country's key.
        ours: String,
    },
    /// The message does not open: its ciphertext or associated data were
    /// altered, or it was sealed for another key under the same key ID.
    #[error("sealed message does not open: ciphertext or associated data altered")]
    DoesNotOpen,
    /// The sealed message is malformed (its encapsulated key is not 32 bytes).
    #[error("sealed message is malformed: {0}")]
    Malformed(&'static str),
}

/// A country: a lower-case ISO 3166-1 alpha-2 code (`ru`, `kg`). It is also
/// the country's JetStream domain.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct CountryCode(String);

impl CountryCode {
    /// Two ASCII letters; upper case is taken and lowered (`KG` is `kg`).
    ///
    /// # Errors
    /// A violation of `field` otherwise (the value is not repeated).
    pub fn parse(field: &str, s: &str) -> Result<Self, FieldViolation> {
        if s.len() == 2 && s.bytes().all(|b| b.is_ascii_alphabetic()) {
            Ok(Self(s.to_ascii_lowercase()))
        } else {
            Err(FieldViolation::new(
                field,
                "must be an ISO 3166-1 alpha-2 country code, two letters (for example kg or ru)",
            ))
        }
    }

    /// The code in lower case, as in subjects and domains: `kg`.
    #[must_use]
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The code in upper case, as in stream names: `KG`.
    #[must_use]
    pub fn upper(&self) -> String {
        self.0.to_ascii_uppercase()
    }
}

impl fmt::Display for CountryCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// The ID of a public key: hex of the first 8 bytes of its SHA-256.
fn key_id_of(public: &<Kem as hpke::Kem>::PublicKey) -> String {
    let digest = Sha256::digest(public.to_bytes().as_slice());
    digest.iter().take(8).map(|b| format!("{b:02x}")).collect()
}

fn decode_key_line(text: &str) -> Result<Zeroizing<Vec<u8>>, String> {
    let bytes = Zeroizing::new(
        base64::engine::general_purpose::STANDARD
            .decode(text.trim())
            .map_err(|_| "does not hold standard base64".to_owned())?,
    );
    if bytes.len() != 32 {
        return Err(format!("must decode to 32 bytes, not {}", bytes.len()));
    }
    Ok(bytes)
}

fn read_key_file(path: &Path) -> Result<Zeroizing<Vec<u8>>, XborderError> {
    let text = Zeroizing::new(std::fs::read_to_string(path).map_err(|e| XborderError::KeyFile {
        path: path.to_owned(),
        reason: format!("cannot be read: {}", e.kind()),
    })?);
    decode_key_line(&text).map_err(|reason| XborderError::KeyFile {
        path: path.to_owned(),
        reason,
    })
}

/// A partner country's public key: what this deployment seals to.
#[derive(Clone, PartialEq, Eq)]
pub struct PartnerKey {
    public: <Kem as hpke::Kem>::PublicKey,
    key_id: String,
}

impl PartnerKey {
    /// From the 32 raw bytes of an X25519 public key.
    ///
    /// # Errors
    /// [`XborderError::Malformed`] when the bytes are not 32 long, or are a
    /// point nothing can be sealed to (one of small order).
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, XborderError> {
        let public = <Kem as hpke::Kem>::PublicKey::from_bytes(bytes)
            .map_err(|_| XborderError::Malformed("a public key must be 32 bytes"))?;
        // A point of small order makes every shared secret zero: HPKE
        // refuses to seal to it, and that is found here, once, rather than
        // at every seal.
        hpke::single_shot_seal::<ChaCha20Poly1305, HkdfSha256, Kem>(&OpModeS::Base, &public, INFO, b"", b"")
            .map_err(|_| XborderError::Malformed("the public key is a point of small order"))?;
        let key_id = key_id_of(&public);
        Ok(Self { public, key_id })
    }

    /// From a line of standard base64 (32 bytes).
    ///
    /// # Errors
    /// [`XborderError::Malformed`] when it is not base64 of a usable key.
    pub fn from_base64(text: &str) -> Result<Self, XborderError> {
        let bytes = decode_key_line(text).map_err(|_| XborderError::Malformed("not base64 of a 32-byte key"))?;
        Self::from_bytes(&bytes)
    }

    /// Reads a public key file (one line of base64).
    ///
    /// # Errors
    /// [`XborderError::KeyFile`] naming the file and why.
    pub fn load(path: &Path) -> Result<Self, XborderError> {
        let bytes = read_key_file(path)?;
        Self::from_bytes(&bytes).map_err(|e| XborderError::KeyFile {
            path: path.to_owned(),
            reason: e.to_string(),
        })
    }

    /// The key in standard base64, as in a `.pub` file.
    #[must_use]
    pub fn to_base64(&self) -> String {
        base64::engine::general_purpose::STANDARD.encode(self.public.to_bytes().as_slice())
    }

    /// Its ID: hex of the first 8 bytes of the SHA-256 of the key.
    #[must_use]
    pub fn key_id(&self) -> &str {
        &self.key_id
    }
}

impl fmt::Debug for PartnerKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PartnerKey").field("key_id", &self.key_id).finish()
    }
}

/// This country's key pair: what opens the messages sealed to it. Never
/// printed (its `Debug` shows the key ID only).
#[derive(Clone)]
pub struct CountryKey {
    private: <Kem as hpke::Kem>::PrivateKey,
    public: PartnerKey,
}

impl CountryKey {
    /// A new random key pair (from the operating system's generator).
    #[must_use]
    pub fn generate() -> Self {
        let (private, public) = Kem::gen_keypair();
        let key_id = key_id_of(&public);
        Self {
            private,
            public: PartnerKey { public, key_id },
        }
    }

    /// From the 32 raw bytes of an X25519 private key.
    ///
    /// # Errors
    /// [`XborderError::Malformed`] when the bytes are not 32 long.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, XborderError> {
        let private = <Kem as hpke::Kem>::PrivateKey::from_bytes(bytes)
            .map_err(|_| XborderError::Malformed("a private key must be 32 bytes"))?;
        let public = Kem::sk_to_pk(&private);
        let key_id = key_id_of(&public);
        Ok(Self {
            private,
            public: PartnerKey { public, key_id },
        })
    }

    /// Reads a private key file (one line of base64).
    ///
    /// # Errors
    /// [`XborderError::KeyFile`] naming the file and why (never its content).
    pub fn load(path: &Path) -> Result<Self, XborderError> {
        let bytes = read_key_file(path)?;
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt as _;
            if let Ok(meta) = std::fs::metadata(path)
                && meta.permissions().mode() & 0o077 != 0
            {
                tracing::warn!(path = %path.display(), "the country's private key file is readable by others than its owner");
            }
        }
        Self::from_bytes(&bytes).map_err(|e| XborderError::KeyFile {
            path: path.to_owned(),
            reason: e.to_string(),
        })
    }

    /// The private key in standard base64, as in a `.key` file: a secret.
    #[must_use]
    pub fn to_base64(&self) -> secrecy::SecretString {
        let mut bytes = Zeroizing::new([0_u8; 32]);
        self.private.write_exact(bytes.as_mut_slice());
        base64::engine::general_purpose::STANDARD
            .encode(bytes.as_slice())
            .into()
    }

    /// The public half, for the partners (the `.pub` file).
    #[must_use]
    pub fn public(&self) -> &PartnerKey {
        &self.public
    }

    /// The key's ID (that of its public half).
    #[must_use]
    pub fn key_id(&self) -> &str {
        self.public.key_id()
    }
}

impl fmt::Debug for CountryKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CountryKey").field("key_id", &self.key_id()).finish()
    }
}

/// The cross-border settings (figment key `xborder`, variables `NRM_XBORDER__*`).
#[derive(Debug, Clone, Deserialize)]
pub struct XborderSettings {
    /// This deployment's country (`NRM_XBORDER__COUNTRY`, default `kg`).
    #[serde(default = "default_country")]
    pub country: String,
    /// File with this country's X25519 private key, base64 of 32 bytes on
    /// one line (`NRM_XBORDER__PRIVATE_KEY_FILE`, default empty: this
    /// deployment opens nothing sealed).
    #[serde(default)]
    pub private_key_file: String,
    /// The partner countries, `cc=/path/to/cc.pub,…`: each one's code and
    /// the file with its public key (`NRM_XBORDER__PARTNERS`, default empty:
    /// no cross-border). A partner is sent to and received from.
    #[serde(default)]
    pub partners: String,
}

impl Default for XborderSettings {
    fn default() -> Self {
        Self {
            country: default_country(),
            private_key_file: String::new(),
            partners: String::new(),
        }
    }
}

fn default_country() -> String {
    "kg".into()
}

const COUNTRY_VAR: &str = "NRM_XBORDER__COUNTRY";
const PRIVATE_KEY_VAR: &str = "NRM_XBORDER__PRIVATE_KEY_FILE";
const PARTNERS_VAR: &str = "NRM_XBORDER__PARTNERS";

impl XborderSettings {
    /// Reads the keys and checks the settings: the country code, the
    /// private key (when set), every partner's code and public key, no
    /// partner twice and none that is this country.
    ///
    /// # Errors
    /// [`XborderError::Setting`] naming the variable, or
    /// [`XborderError::KeyFile`] naming the file.
    pub fn load(&self) -> Result<Federation, XborderError> {
        let country = CountryCode::parse(COUNTRY_VAR, self.country.trim()).map_err(|v| XborderError::Setting {
            setting: COUNTRY_VAR,
            reason: v.description,
        })?;
        let key = match self.private_key_file.trim() {
            "" => None,
            path => Some(CountryKey::load(Path::new(path))?),
        };
        let mut partners: Vec<(CountryCode, PartnerKey)> = Vec::new();
        for entry in self.partners.split(',').map(str::trim).filter(|e| !e.is_empty()) {
            let setting = |reason: String| XborderError::Setting {
                setting: PARTNERS_VAR,
                reason,
            };
            let (code, path) = entry
                .split_once('=')
                .ok_or_else(|| setting("each partner must be written cc=/path/to/cc.pub".into()))?;
            let code = CountryCode::parse(PARTNERS_VAR, code.trim()).map_err(|v| setting(v.description))?;
            if code == country {
                return Err(setting(format!("{code} is this deployment's own country")));
            }
            if partners.iter().any(|(c, _)| *c == code) {
                return Err(setting(format!("{code} is named twice")));
            }
            let path = path.trim();
            if path.is_empty() {
                return Err(setting(format!("{code} has no public key file")));
            }
            partners.push((code, PartnerKey::load(Path::new(path))?));
        }
        if !partners.is_empty() && key.is_none() {
            // What crosses is sealed with the sender's key pair too (HPKE
            // auth mode), so neither sending nor receiving works without it.
            return Err(XborderError::Setting {
                setting: PRIVATE_KEY_VAR,
                reason: "partners are set but no private key: what crosses is sealed and authenticated with this country's key pair".to_owned(),
            });
        }
        Ok(Federation { country, key, partners })
    }
}

/// This deployment among its partners: its country, its key, and each
/// partner with its public key.
#[derive(Debug, Clone)]
pub struct Federation {
    /// This deployment's country.
    pub country: CountryCode,
    /// This country's key pair, when it receives sealed messages.
    pub key: Option<CountryKey>,
    /// Each partner country and its public key, in the order of the setting.
    pub partners: Vec<(CountryCode, PartnerKey)>,
}

impl Federation {
    /// The public key of partner `cc`, if it is one.
    #[must_use]
    pub fn partner(&self, cc: &CountryCode) -> Option<&PartnerKey> {
        self.partners.iter().find(|(c, _)| c == cc).map(|(_, k)| k)
    }
}

/// The associated data of a sealed message:
/// `nrm.xborder.v1|<from>|<to>|<return_id>|<origin_version>`.
#[must_use]
pub fn aad(from: &CountryCode, to: &CountryCode, return_id: &str, origin_version: u64) -> Vec<u8> {
    format!("{AAD_DOMAIN}|{from}|{to}|{return_id}|{origin_version}").into_bytes()
}

/// Seals `plaintext` for the holder of `to`'s private key, authenticated
/// as coming from `from` (this country's key pair), bound to `aad`.
#[must_use]
pub fn seal(from: &CountryKey, to: &PartnerKey, aad: &[u8], plaintext: &[u8]) -> SealedForCountry {
    // HPKE fails to seal only to a key of small order (refused when the
    // PartnerKey was made) or past a context's message limit (one message
    // per context here), so this cannot fail.
    let mode = OpModeS::Auth((from.private.clone(), from.public.public.clone()));
    let (encapped, ciphertext) =
        hpke::single_shot_seal::<ChaCha20Poly1305, HkdfSha256, Kem>(&mode, &to.public, INFO, plaintext, aad)
            .expect("sealing to a checked X25519 public key cannot fail");
    SealedForCountry {
        key_id: to.key_id.clone(),
        encapped_key: encapped.to_bytes().to_vec(),
        ciphertext,
    }
}

/// Opens a message sealed to `key` by the holder of `from`'s private key,
/// checking it against `aad`.
///
/// # Errors
/// [`XborderError::OtherKey`] when it names another key;
/// [`XborderError::Malformed`] when its encapsulated key is malformed;
/// [`XborderError::DoesNotOpen`] when the ciphertext or the associated data
/// were altered, or another key than `from`'s sealed it.
pub fn open(
    key: &CountryKey,
    from: &PartnerKey,
    aad: &[u8],
    sealed: &SealedForCountry,
) -> Result<Vec<u8>, XborderError> {
    if sealed.key_id != key.key_id() {
        return Err(XborderError::OtherKey {
            sealed_for: printable_key_id(&sealed.key_id),
            ours: key.key_id().to_owned(),
        });
    }
    let encapped = <Kem as hpke::Kem>::EncappedKey::from_bytes(&sealed.encapped_key)
        .map_err(|_| XborderError::Malformed("the encapsulated key must be 32 bytes"))?;
    hpke::single_shot_open::<ChaCha20Poly1305, HkdfSha256, Kem>(
        &OpModeR::Auth(from.public.clone()),
        &key.private,
        &encapped,
        INFO,
        &sealed.ciphertext,
        aad,
    )
    .map_err(|_| XborderError::DoesNotOpen)
}

/// A key ID from a message, fit for an error text: hex, 16 characters at most.
fn printable_key_id(id: &str) -> String {
    if id.len() <= 16 && id.bytes().all(|b| b.is_ascii_hexdigit()) {
        id.to_owned()
    } else {
        "(not a key ID)".to_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cc(s: &str) -> CountryCode {
        CountryCode::parse("country", s).unwrap_or_else(|v| panic!("{v:?}"))
    }

    const PLAINTEXT: &[u8] = b"Aigul Toktogulova, 1999-03-04, passport AN1234567";

    /// The sending country's key pair of these tests.
    fn sender() -> &'static CountryKey {
        static SENDER: std::sync::OnceLock<CountryKey> = std::sync::OnceLock::new();
        SENDER.get_or_init(CountryKey::generate)
    }

    #[test]
    fn a_message_sealed_by_another_sender_does_not_open() {
        let key = CountryKey::generate();
        let aad = aad(&cc("ru"), &cc("kg"), "0190-return", 3);
        // Anyone holding kg's public key can seal to it; only ru's key pair
        // makes a message that opens as ru's.
        let forger = CountryKey::generate();
        let forged = seal(&forger, key.public(), &aad, PLAINTEXT);
        assert!(matches!(
            open(&key, sender().public(), &aad, &forged),
            Err(XborderError::DoesNotOpen)
        ));
        assert_eq!(
            open(&key, forger.public(), &aad, &forged).expect("opens as the forger's"),
            PLAINTEXT
        );
    }

    fn sealed_for(key: &CountryKey) -> (Vec<u8>, SealedForCountry) {
        let aad = aad(&cc("ru"), &cc("kg"), "0190-return", 3);
        let sealed = seal(sender(), key.public(), &aad, PLAINTEXT);
        (aad, sealed)
    }

    #[test]
    fn a_sealed_message_opens_with_the_receivers_key() {
        let key = CountryKey::generate();
        let (aad, sealed) = sealed_for(&key);
        assert_eq!(sealed.key_id, key.key_id());
        assert_eq!(sealed.encapped_key.len(), 32);
        assert!(
            !sealed.ciphertext.windows(5).any(|w| w == b"Aigul"),
            "the ciphertext must not hold the plaintext"
        );
        assert_eq!(open(&key, sender().public(), &aad, &sealed).expect("opens"), PLAINTEXT);
    }

    #[test]
    fn sealing_twice_gives_different_ciphertexts() {
        let key = CountryKey::generate();
        let (_, a) = sealed_for(&key);
        let (_, b) = sealed_for(&key);
        assert_ne!(a.encapped_key, b.encapped_key);
        assert_ne!(a.ciphertext, b.ciphertext);
    }

    #[test]
    fn another_key_does_not_open_and_says_so() {
        let key = CountryKey::generate();
        let other = CountryKey::generate();
        let (aad, sealed) = sealed_for(&key);
        let err = open(&other, sender().public(), &aad, &sealed).expect_err("another key must not open");
        assert!(matches!(err, XborderError::OtherKey { .. }), "{err:?}");
        let text = err.to_string();
        assert!(text.contains(key.key_id()) && text.contains(other.key_id()), "{text}");
    }

    #[test]
    fn another_key_under_the_same_key_id_does_not_open() {
        let key = CountryKey::generate();
        let other = CountryKey::generate();
        let (aad, mut sealed) = sealed_for(&key);
        sealed.key_id = other.key_id().to_owned();
        let err = open(&other, sender().public(), &aad, &sealed).expect_err("another key must not open");
        assert!(matches!(err, XborderError::DoesNotOpen), "{err:?}");
    }

    #[test]
    fn altered_associated_data_do_not_open() {
        let key = CountryKey::generate();
        let (_, sealed) = sealed_for(&key);
        for tampered in [
            aad(&cc("ru"), &cc("kg"), "0190-return", 4),
            aad(&cc("ru"), &cc("kg"), "0190-other", 3),
            aad(&cc("kz"), &cc("kg"), "0190-return", 3),
            aad(&cc("ru"), &cc("tj"), "0190-return", 3),
        ] {
            let err = open(&key, sender().public(), &tampered, &sealed).expect_err("altered AAD must not open");
            assert!(matches!(err, XborderError::DoesNotOpen), "{err:?}");
        }
    }

    #[test]
    fn an_altered_ciphertext_or_encapsulated_key_does_not_open() {
        let key = CountryKey::generate();
        let (aad, sealed) = sealed_for(&key);
        let mut flipped = sealed.clone();
        flipped.ciphertext[0] ^= 1;
        assert!(matches!(
            open(&key, sender().public(), &aad, &flipped),
            Err(XborderError::DoesNotOpen)
        ));
        let mut flipped = sealed.clone();
        flipped.encapped_key[0] ^= 1;
        assert!(matches!(
            open(&key, sender().public(), &aad, &flipped),
            Err(XborderError::DoesNotOpen)
        ));
        let mut short = sealed;
        short.encapped_key.pop();
        assert!(matches!(
            open(&key, sender().public(), &aad, &short),
            Err(XborderError::Malformed(_))
        ));
    }

    #[test]
    fn errors_carry_neither_key_material_nor_plaintext() {
        let key = CountryKey::generate();
        let other = CountryKey::generate();
        let (aad, sealed) = sealed_for(&key);
        let secret = secrecy::ExposeSecret::expose_secret(&other.to_base64()).to_owned();
        let mut texts = vec![
            open(&other, sender().public(), &aad, &sealed)
                .expect_err("other key")
                .to_string(),
            format!("{key:?}"),
            format!("{:?}", key.public()),
        ];
        let mut tampered = sealed.clone();
        tampered.ciphertext[3] ^= 0x40;
        texts.push(
            open(&key, sender().public(), &aad, &tampered)
                .expect_err("tampered")
                .to_string(),
        );
        for text in texts {
            assert!(!text.contains(&secret), "{text}");
            assert!(!text.contains("Aigul") && !text.contains("AN1234567"), "{text}");
        }
    }

    #[test]
    fn the_key_id_is_the_hex_of_the_first_8_bytes_of_the_public_keys_sha256() {
        let key = CountryKey::from_bytes(&[7; 32]).expect("key");
        let public = base64::engine::general_purpose::STANDARD
            .decode(key.public().to_base64())
            .expect("base64");
        let digest = Sha256::digest(&public);
        let hex: String = digest[..8].iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(key.key_id(), hex);
        assert_eq!(key.key_id().len(), 16);
        // The same bytes give the same key, through base64 as in the files.
        let again = CountryKey::from_bytes(
            &base64::engine::general_purpose::STANDARD
                .decode(secrecy::ExposeSecret::expose_secret(&key.to_base64()))
                .expect("base64"),
        )
        .expect("key");
        assert_eq!(again.key_id(), key.key_id());
        assert_eq!(
            PartnerKey::from_base64(&key.public().to_base64()).expect("pub"),
            *key.public()
        );
    }

    #[test]
    fn a_public_key_of_small_order_is_refused() {
        assert!(matches!(
            PartnerKey::from_bytes(&[0; 32]),
            Err(XborderError::Malformed(_))
        ));
        assert!(PartnerKey::from_bytes(&[9; 31]).is_err());
    }

    #[test]
    fn the_aad_names_both_countries_the_return_and_its_version() {
        assert_eq!(
            aad(&cc("ru"), &cc("kg"), "abc", 12),
            b"nrm.xborder.v1|ru|kg|abc|12".to_vec()
        );
    }

    #[test]
    fn country_codes_are_two_letters_kept_in_lower_case() {
        assert_eq!(cc("KG").as_str(), "kg");
        assert_eq!(cc("ru").upper(), "RU");
        for bad in ["", "k", "kgz", "k1", "кг", "k.", "*"] {
            let v = CountryCode::parse("to_country", bad).expect_err(bad);
            assert_eq!(v.field, "to_country");
        }
    }

    struct TempDir(PathBuf);

    impl TempDir {
        fn new() -> Self {
            let dir = std::env::temp_dir().join(format!("nrm-xborder-{}", uuid::Uuid::now_v7()));
            std::fs::create_dir_all(&dir).expect("temp dir");
            Self(dir)
        }

        fn write(&self, name: &str, text: &str) -> String {
            let path = self.0.join(name);
            std::fs::write(&path, text).expect("write");
            path.display().to_string()
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    #[test]
    fn settings_load_the_country_key_and_the_partners() {
        let dir = TempDir::new();
        let ru = CountryKey::generate();
        let tj = CountryKey::generate();
        let kg = CountryKey::generate();
        let key_file = dir.write(
            "kg.key",
            &format!("{}\n", secrecy::ExposeSecret::expose_secret(&kg.to_base64())),
        );
        let ru_pub = dir.write("ru.pub", &format!("{}\n", ru.public().to_base64()));
        let tj_pub = dir.write("tj.pub", &tj.public().to_base64());
        let settings = XborderSettings {
            country: "kg".into(),
            private_key_file: key_file,
            partners: format!("ru={ru_pub}, TJ = {tj_pub}"),
        };
        let federation = settings.load().expect("loads");
        assert_eq!(federation.country, cc("kg"));
        assert_eq!(federation.key.as_ref().map(CountryKey::key_id), Some(kg.key_id()));
        assert_eq!(federation.partners.len(), 2);
        assert_eq!(federation.partner(&cc("ru")), Some(ru.public()));
        assert_eq!(federation.partner(&cc("tj")), Some(tj.public()));
        assert_eq!(federation.partner(&cc("kz")), None);
    }

    #[test]
    fn default_settings_mean_kg_without_keys_or_partners() {
        let federation = XborderSettings::default().load().expect("loads");
        assert_eq!(federation.country, cc("kg"));
        assert!(federation.key.is_none() && federation.partners.is_empty());
    }

    #[test]
    fn bad_settings_name_the_variable_or_the_file() {
        let dir = TempDir::new();
        let good = dir.write("ru.pub", &CountryKey::generate().public().to_base64());
        let secret = "c2VjcmV0IGtleSBtYXRlcmlhbCwgMzEgYnl0ZXMh";
        let bad = dir.write("bad.key", secret);
        let missing = dir.0.join("missing.pub").display().to_string();
        let cases = [
            (
                XborderSettings {
                    country: "kgz".into(),
                    ..Default::default()
                },
                "NRM_XBORDER__COUNTRY",
            ),
            (
                XborderSettings {
                    partners: format!("ru{good}"),
                    ..Default::default()
                },
                "NRM_XBORDER__PARTNERS",
            ),
            (
                XborderSettings {
                    partners: format!("kg={good}"),
                    ..Default::default()
                },
                "own country",
            ),
            (
                XborderSettings {
                    partners: format!("ru={good},ru={good}"),
                    ..Default::default()
                },
                "twice",
            ),
            (
                XborderSettings {
                    partners: "ru=".into(),
                    ..Default::default()
                },
                "no public key file",
            ),
            (
                XborderSettings {
                    partners: format!("ru={missing}"),
                    ..Default::default()
                },
                "missing.pub",
            ),
            (
                XborderSettings {
                    private_key_file: bad.clone(),
                    ..Default::default()
                },
                "bad.key",
            ),
        ];
        for (settings, expected) in cases {
            let err = settings.load().expect_err(expected).to_string();
            assert!(err.contains(expected), "{err} should name {expected}");
            assert!(!err.contains(secret), "{err}");
        }
    }
}
