//! Personal data at rest and in transit: sealed under a per-person key.
//!
//! Each person (and each shelter, whose address is personal-safety data) gets a random 256-bit key, stored only wrapped by the master
//! key (XChaCha20-Poly1305, the person ID as associated data) in the
//! `person_keys` table of the service that holds the person's identifiers.
//! Events and messages carry only [`SealedData`]. Deleting the person's key
//! makes every copy — in the event store, on the bus, in backups — unreadable:
//! that is erasure in an append-only system (crypto-shredding). The key never
//! leaves the service's database.
//!
//! Duplicate reports are found with keyed hashes ([`MatchHasher`]) of
//! normalised identifiers, so matching reveals nothing to whoever holds the
//! hashes without the match key.

use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::{XChaCha20Poly1305, XNonce};
use hmac::{Hmac, Mac};
use prost::Message as _;
use rand::RngCore as _;
use sha2::Sha256;
use sqlx::{PgConnection, Row};
use unicode_normalization::UnicodeNormalization as _;

use uuid::Uuid;

use crate::ids::{PersonId, ShelterId};
use nrm_proto::common::v1::{PersonalIdentifiers, SealedData};

const KEY_VERSION: u32 = 1;

/// Errors of sealing.
#[derive(Debug, thiserror::Error)]
pub enum SealError {
    /// The database failed.
    #[error("key store: {0}")]
    Database(#[from] sqlx::Error),
    /// A ciphertext or wrapped key does not verify: wrong key or tampering.
    #[error("sealed data of {0} do not verify")]
    Corrupt(Uuid),
}

impl From<SealError> for crate::error::AppError {
    fn from(err: SealError) -> Self {
        match err {
            // A restarting database is retryable (UNAVAILABLE), never INTERNAL.
            SealError::Database(db) => db.into(),
            corrupt @ SealError::Corrupt(_) => Self::Internal(corrupt.to_string()),
        }
    }
}

/// The master key wrapping every per-person key.
#[derive(Clone)]
pub struct MasterKey(XChaCha20Poly1305);

impl MasterKey {
    /// From 32 raw bytes.
    #[must_use]
    pub fn new(key: [u8; 32]) -> Self {
        Self(XChaCha20Poly1305::new(&key.into()))
    }
}

impl std::fmt::Debug for MasterKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("MasterKey(..)")
    }
}

/// Whose data a key seals: a person, or a shelter (whose address is
/// personal-safety data).
pub trait KeyOwner: Copy {
    /// The UUID the key is stored under.
    fn key_owner(self) -> Uuid;
}

impl KeyOwner for PersonId {
    fn key_owner(self) -> Uuid {
        self.as_uuid()
    }
}

impl KeyOwner for ShelterId {
    fn key_owner(self) -> Uuid {
        self.as_uuid()
    }
}

/// One owner's data key (a person's, or a shelter's).
pub struct DataKey {
    owner: Uuid,
    cipher: XChaCha20Poly1305,
}

fn random_nonce() -> [u8; 24] {
    let mut nonce = [0u8; 24];
    rand::rngs::OsRng.fill_bytes(&mut nonce);
    nonce
}

impl DataKey {
    /// Creates a key for `owner` and stores it wrapped, in the caller's transaction.
    ///
    /// # Errors
    /// [`SealError::Database`].
    pub async fn create(conn: &mut PgConnection, master: &MasterKey, owner: impl KeyOwner) -> Result<Self, SealError> {
        let owner_id = owner.key_owner();
        let mut key = [0u8; 32];
        rand::rngs::OsRng.fill_bytes(&mut key);
        let nonce = random_nonce();
        let aad = owner_id;
        let wrapped = master
            .0
            .encrypt(
                XNonce::from_slice(&nonce),
                Payload {
                    msg: &key,
                    aad: aad.as_bytes(),
                },
            )
            .map_err(|_| SealError::Corrupt(owner_id))?;
        sqlx::query("INSERT INTO person_keys (person_id, key_version, nonce, wrapped_key) VALUES ($1, $2, $3, $4)")
            .bind(owner_id)
            .bind(i32::try_from(KEY_VERSION).unwrap_or(1))
            .bind(nonce.as_slice())
            .bind(wrapped)
            .execute(conn)
            .await?;
        Ok(Self {
            owner: owner_id,
            cipher: XChaCha20Poly1305::new(&key.into()),
        })
    }

    /// Loads the key of `owner` on `db` (the pool, or a command's unit of
    /// work); `None` when it was deleted (erased).
    ///
    /// # Errors
    /// [`SealError::Corrupt`] when the wrapped key does not verify under the master key.
    pub async fn load<'c>(
        db: impl sqlx::PgExecutor<'c>,
        master: &MasterKey,
        owner: impl KeyOwner,
    ) -> Result<Option<Self>, SealError> {
        let owner_id = owner.key_owner();
        let Some(row) = sqlx::query("SELECT nonce, wrapped_key FROM person_keys WHERE person_id = $1")
            .bind(owner_id)
            .fetch_optional(db)
            .await?
        else {
            return Ok(None);
        };
        let nonce: Vec<u8> = row.get("nonce");
        let wrapped: Vec<u8> = row.get("wrapped_key");
        if nonce.len() != 24 {
            return Err(SealError::Corrupt(owner_id));
        }
        let aad = owner_id;
        let key = master
            .0
            .decrypt(
                XNonce::from_slice(&nonce),
                Payload {
                    msg: &wrapped,
                    aad: aad.as_bytes(),
                },
            )
            .map_err(|_| SealError::Corrupt(owner_id))?;
        let key: [u8; 32] = key.try_into().map_err(|_| SealError::Corrupt(owner_id))?;
        Ok(Some(Self {
            owner: owner_id,
            cipher: XChaCha20Poly1305::new(&key.into()),
        }))
    }

    /// Deletes the key of `owner`: everything sealed under it is erased.
    /// Returns whether a key was there.
    ///
    /// # Errors
    /// [`SealError::Database`].
    pub async fn shred(conn: &mut PgConnection, owner: impl KeyOwner) -> Result<bool, SealError> {
        let owner_id = owner.key_owner();
        let deleted = sqlx::query("DELETE FROM person_keys WHERE person_id = $1")
            .bind(owner_id)
            .execute(conn)
            .await?
            .rows_affected();
        Ok(deleted > 0)
    }

    /// Seals a person's identifiers.
    ///
    /// # Panics
    /// Never: encryption with a valid key cannot fail.
    #[must_use]
    pub fn seal(&self, identifiers: &PersonalIdentifiers) -> SealedData {
        let nonce = random_nonce();
        let aad = self.owner;
        let ciphertext = self
            .cipher
            .encrypt(
                XNonce::from_slice(&nonce),
                Payload {
                    msg: &identifiers.encode_to_vec(),
                    aad: aad.as_bytes(),
                },
            )
            .unwrap_or_default();
        SealedData {
            person_id: self.owner.to_string(),
            key_version: KEY_VERSION,
            nonce: nonce.to_vec(),
            ciphertext,
        }
    }

    /// Opens sealed identifiers.
    ///
    /// # Errors
    /// [`SealError::Corrupt`] when the data were not sealed under this key or were altered.
    pub fn open(&self, sealed: &SealedData) -> Result<PersonalIdentifiers, SealError> {
        if sealed.nonce.len() != 24 {
            return Err(SealError::Corrupt(self.owner));
        }
        let aad = self.owner;
        let plain = self
            .cipher
            .decrypt(
                XNonce::from_slice(&sealed.nonce),
                Payload {
                    msg: &sealed.ciphertext,
                    aad: aad.as_bytes(),
                },
            )
            .map_err(|_| SealError::Corrupt(self.owner))?;
        PersonalIdentifiers::decode(plain.as_slice()).map_err(|_| SealError::Corrupt(self.owner))
    }
}

/// Keyed hashes of normalised identifiers, for finding duplicate reports.
#[derive(Clone)]
pub struct MatchHasher(Hmac<Sha256>);

impl std::fmt::Debug for MatchHasher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("MatchHasher(..)")
    }
}

impl MatchHasher {
    /// From 32 raw bytes.
    #[must_use]
    pub fn new(key: [u8; 32]) -> Self {
        Self(<Hmac<Sha256> as Mac>::new_from_slice(&key).unwrap_or_else(|_| unreachable!("HMAC takes any key length")))
    }

    fn hash(&self, domain: &str, value: &str) -> Vec<u8> {
        let mut mac = self.0.clone();
        mac.update(domain.as_bytes());
        mac.update(&[0]);
        mac.update(value.as_bytes());
        mac.finalize().into_bytes().to_vec()
    }

    /// The match keys of a person: name with date of birth, and each document.
    /// Identifiers too sparse to match on give no key.
    #[must_use]
    pub fn match_keys(&self, identifiers: &PersonalIdentifiers) -> Vec<Vec<u8>> {
        let mut keys = Vec::new();
        let name = normalise_name(&identifiers.full_name);
        let dob = identifiers.date_of_birth.trim();
        if !name.is_empty() && !dob.is_empty() {
            keys.push(self.hash("name+dob", &format!("{name}|{dob}")));
        }
        for document in &identifiers.documents {
            let number = normalise_document(&document.number);
            if number.len() >= 5 {
                keys.push(self.hash(
                    "document",
                    &format!("{}|{number}", document.issuing_country.to_ascii_uppercase()),
                ));
            }
        }
        keys
    }
}

/// Case-folded, accent-insensitive, with name parts sorted: "Aigul  Asanova"
/// and "ASANOVA Aigul" match.
#[must_use]
pub fn normalise_name(name: &str) -> String {
    let folded: String = name
        .nfkd()
        .filter(|c| !unicode_normalization::char::is_combining_mark(*c))
        .flat_map(char::to_lowercase)
        .map(|c| if c.is_alphanumeric() { c } else { ' ' })
        .collect();
    let mut parts: Vec<&str> = folded.split_whitespace().collect();
    parts.sort_unstable();
    parts.join(" ")
}

/// Upper-case letters and digits only: "ab 12-345" and "AB12345" match.
#[must_use]
pub fn normalise_document(number: &str) -> String {
    number
        .chars()
        .filter(char::is_ascii_alphanumeric)
        .map(|c| c.to_ascii_uppercase())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use nrm_proto::common::v1::IdentityDocument;

    #[test]
    fn names_match_across_order_case_and_accents() {
        assert_eq!(normalise_name("Aigül  ASANOVA"), normalise_name("asanova aigul"));
        assert_ne!(normalise_name("Aigul Asanova"), normalise_name("Aibek Asanov"));
    }

    #[test]
    fn match_keys_depend_on_the_key_and_the_normalised_identifiers() {
        let a = MatchHasher::new([1; 32]);
        let b = MatchHasher::new([2; 32]);
        let person = PersonalIdentifiers {
            full_name: "Aigul Asanova".into(),
            date_of_birth: "1999-04-02".into(),
            documents: vec![IdentityDocument {
                r#type: 1,
                number: "ac 123-4567".into(),
                issuing_country: "kg".into(),
            }],
            ..Default::default()
        };
        let same = PersonalIdentifiers {
            full_name: "ASANOVA aigul".into(),
            date_of_birth: "1999-04-02".into(),
            documents: vec![IdentityDocument {
                r#type: 1,
                number: "AC1234567".into(),
                issuing_country: "KG".into(),
            }],
            ..Default::default()
        };
        assert_eq!(a.match_keys(&person), a.match_keys(&same));
        assert_eq!(a.match_keys(&person).len(), 2);
        assert_ne!(a.match_keys(&person), b.match_keys(&person));
    }

    #[test]
    fn sealed_data_open_only_with_the_persons_key() {
        let id = PersonId::new();
        let key = DataKey {
            owner: id.as_uuid(),
            cipher: XChaCha20Poly1305::new(&[7u8; 32].into()),
        };
        let other = DataKey {
            owner: id.as_uuid(),
            cipher: XChaCha20Poly1305::new(&[8u8; 32].into()),
        };
        let identifiers = PersonalIdentifiers {
            full_name: "Canary Name".into(),
            ..Default::default()
        };
        let sealed = key.seal(&identifiers);
        assert!(!String::from_utf8_lossy(&sealed.ciphertext).contains("Canary"));
        assert_eq!(key.open(&sealed).unwrap(), identifiers);
        assert!(other.open(&sealed).is_err());
    }
}
