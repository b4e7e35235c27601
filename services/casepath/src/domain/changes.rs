//! What a commit changed, as a watcher needs to know it: the keys of the
//! rows it wrote, so that a watch of one person's path looks again only
//! when a row it reads, or may read next, changed.
//!
//! The rule that makes this safe: a write's keys are its row's primary key
//! and every column a path's read filters or joins on (`person_id`, the
//! links between records: `referral_id` of a hold, `return_id` of a return's
//! commit, a return's `foreign_reference`, a hold's `shelter_id`) and the
//! subject of every step; a path watcher's interest is its person and every
//! ID its last read filtered or joined on ([`crate::app::path`]). A change
//! that can alter the path therefore shares a key with the interest: an
//! update by key touches a row the last read found; a new row names the
//! person, or links to a record the last read found. What cannot be put
//! that way — a bed held for an arrival, found through the commits of a
//! return, which no read lists beforehand — touches [`Touched::All`], as
//! does anything that cannot be read (a notification of an older version,
//! a listener that reconnected and may have missed some).
//!
//! On the wire (PostgreSQL's `pg_notify`, at most 8,000 bytes; anyone who
//! may connect to the database may LISTEN) a change names no ID: each key
//! is a [`Token`], the first 64 bits of its HMAC-SHA-256 under the
//! database's own [`WatchKey`], so that a listener who cannot read the
//! read models learns no link between a person, a referral and a shelter.
//! The payload is `<source>|<token>,<token>,…` (16 hex digits each), or
//! `<source>|*` for all; beyond [`MAX_KEYS`] keys, all. Two keys sharing a
//! token only make a watcher look once more.

use std::collections::{BTreeSet, HashSet};
use std::fmt::Write as _;

use hmac::{Hmac, Mac};
use sha2::Sha256;
use uuid::Uuid;

/// The most keys a notification names; a commit that touches more touches all.
pub const MAX_KEYS: usize = 150;

/// A key as a notification names it.
pub type Token = u64;

/// The key of the tokens (32 bytes, kept in casepath's database).
#[derive(Clone)]
pub struct WatchKey(Hmac<Sha256>);

impl std::fmt::Debug for WatchKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("WatchKey(..)")
    }
}

impl WatchKey {
    /// From its bytes.
    #[must_use]
    pub fn new(key: &[u8]) -> Self {
        Self(<Hmac<Sha256> as Mac>::new_from_slice(key).unwrap_or_else(|_| unreachable!("HMAC takes any key length")))
    }

    /// The token of `key`.
    #[must_use]
    pub fn token(&self, key: Uuid) -> Token {
        let mut mac = self.0.clone();
        mac.update(key.as_bytes());
        let out = mac.finalize().into_bytes();
        let mut first = [0u8; 8];
        first.copy_from_slice(&out[..8]);
        u64::from_be_bytes(first)
    }

    /// The tokens of `keys`.
    #[must_use]
    pub fn tokens<'a>(&self, keys: impl IntoIterator<Item = &'a Uuid>) -> HashSet<Token> {
        keys.into_iter().map(|k| self.token(*k)).collect()
    }
}

/// What a commit changed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Touched {
    /// Anything: every watcher looks again.
    All,
    /// The rows with these keys.
    Keys(BTreeSet<Uuid>),
}

impl Default for Touched {
    fn default() -> Self {
        Self::Keys(BTreeSet::new())
    }
}

impl Touched {
    /// Adds `key`.
    pub fn key(&mut self, key: Uuid) {
        if let Self::Keys(keys) = self {
            keys.insert(key);
        }
    }

    /// Adds `key` when there is one.
    pub fn maybe(&mut self, key: Option<Uuid>) {
        if let Some(key) = key {
            self.key(key);
        }
    }

    /// Adds a text column that may hold a UUID (a foreign reference): as
    /// that UUID, or nothing when it is not one (it then equals no ID a
    /// read filters on).
    pub fn text(&mut self, text: &str) {
        self.maybe(text.trim().parse().ok());
    }

    /// Makes it touch everything.
    pub fn all(&mut self) {
        *self = Self::All;
    }

    /// The notification's payload for a commit of `source`, its keys as
    /// tokens under `key`.
    #[must_use]
    pub fn payload(&self, source: &str, key: &WatchKey) -> String {
        match self {
            Self::Keys(keys) if keys.len() <= MAX_KEYS => {
                let tokens: BTreeSet<Token> = keys.iter().map(|k| key.token(*k)).collect();
                let mut out = String::with_capacity(source.len() + 1 + tokens.len() * 17);
                out.push_str(source);
                out.push('|');
                for (i, t) in tokens.iter().enumerate() {
                    if i > 0 {
                        out.push(',');
                    }
                    let _ = write!(out, "{t:016x}");
                }
                out
            }
            _ => everything(source),
        }
    }
}

/// The payload of a change of `source` that touched everything.
#[must_use]
pub fn everything(source: &str) -> String {
    format!("{source}|*")
}

/// A change as a watcher receives it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    /// Anything may have changed.
    All,
    /// The rows of these tokens.
    Tokens(BTreeSet<Token>),
}

impl Change {
    /// A notification's payload read back; [`Change::All`] for anything
    /// that is not one [`Touched::payload`] wrote.
    #[must_use]
    pub fn parse(payload: &str) -> Self {
        let Some((_, tokens)) = payload.split_once('|') else {
            return Self::All;
        };
        if tokens.is_empty() {
            return Self::Tokens(BTreeSet::new());
        }
        tokens
            .split(',')
            .map(|t| {
                if t.len() == 16 {
                    Token::from_str_radix(t, 16).ok()
                } else {
                    None
                }
            })
            .collect::<Option<BTreeSet<Token>>>()
            .map_or(Self::All, Self::Tokens)
    }

    /// Whether a watcher interested in `interest` (`None`: in everything)
    /// should look again.
    #[must_use]
    pub fn concerns(&self, interest: Option<&HashSet<Token>>) -> bool {
        match (self, interest) {
            (Self::All, _) | (_, None) => true,
            (Self::Tokens(tokens), Some(interest)) => tokens.iter().any(|t| interest.contains(t)),
        }
    }
}

/// A write that knows the keys it touches (see the module's rule).
pub trait Touches {
    /// Adds the write's keys to `touched`.
    fn touch(&self, touched: &mut Touched);
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn key() -> WatchKey {
        WatchKey::new(&[7; 32])
    }

    fn keys(n: usize) -> (Touched, Vec<Uuid>) {
        let mut t = Touched::default();
        let ids: Vec<Uuid> = (0..n).map(|_| Uuid::now_v7()).collect();
        for id in &ids {
            t.key(*id);
        }
        (t, ids)
    }

    #[test]
    fn a_payload_reads_back_as_the_tokens_of_what_was_touched_and_names_no_id() {
        let (t, ids) = keys(3);
        let payload = t.payload("casepath_referral", &key());
        for id in &ids {
            assert!(!payload.contains(&id.to_string()), "{payload}");
            assert!(!payload.contains(&id.simple().to_string()), "{payload}");
        }
        assert_eq!(
            Change::parse(&payload),
            Change::Tokens(key().tokens(&ids).into_iter().collect())
        );
        assert_eq!(
            Change::parse(&Touched::default().payload("x", &key())),
            Change::Tokens(BTreeSet::new())
        );
        assert_eq!(Change::parse(&Touched::All.payload("x", &key())), Change::All);
    }

    #[test]
    fn another_key_gives_other_tokens() {
        let id = Uuid::now_v7();
        assert_eq!(key().token(id), key().token(id));
        assert_ne!(key().token(id), WatchKey::new(&[8; 32]).token(id));
    }

    #[test]
    fn too_many_keys_and_unreadable_payloads_touch_everything() {
        let (many, _) = keys(MAX_KEYS + 1);
        assert_eq!(Change::parse(&many.payload("casepath_shelter", &key())), Change::All);
        let (most, ids) = keys(MAX_KEYS);
        let payload = most.payload("casepath_repatriation", &key());
        assert!(payload.len() < 8000, "within pg_notify's limit: {}", payload.len());
        assert_eq!(
            Change::parse(&payload),
            Change::Tokens(key().tokens(&ids).into_iter().collect())
        );
        for unreadable in ["test", "", "casepath_referral|not-hex", "x|,", "x|abc"] {
            assert_eq!(Change::parse(unreadable), Change::All, "{unreadable:?}");
        }
    }

    #[test]
    fn a_watcher_looks_again_only_for_what_it_reads() {
        let (a, b) = (Uuid::now_v7(), Uuid::now_v7());
        let interest = key().tokens([&a]);
        let mut t = Touched::default();
        t.key(b);
        let change = |t: &Touched| Change::parse(&t.payload("s", &key()));
        assert!(!change(&t).concerns(Some(&interest)));
        assert!(
            change(&t).concerns(None),
            "a watcher of everything looks at every change"
        );
        t.key(a);
        assert!(change(&t).concerns(Some(&interest)));
        assert!(Change::All.concerns(Some(&HashSet::new())));
        assert!(!change(&Touched::default()).concerns(Some(&interest)));
    }

    #[test]
    fn a_reference_is_a_key_only_when_it_is_a_uuid() {
        let a = Uuid::now_v7();
        let mut t = Touched::default();
        t.text(&format!(" {a} "));
        t.text("KG-2026-001");
        assert_eq!(t, Touched::Keys(BTreeSet::from([a])));
        t.all();
        t.key(a);
        assert_eq!(t, Touched::All, "all stays all");
    }
}
