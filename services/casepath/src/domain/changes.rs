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
//! On the wire (PostgreSQL's `pg_notify`, at most 8,000 bytes) a change is
//! `<source>|<key>,<key>,…`, or `<source>|*` for all; beyond
//! [`MAX_KEYS`] keys, all.

use std::collections::{BTreeSet, HashSet};
use std::fmt::Write as _;

use uuid::Uuid;

/// The most keys a notification names; a commit that touches more touches all.
pub const MAX_KEYS: usize = 150;

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

    /// Whether a watcher interested in `interest` (`None`: in everything)
    /// should look again.
    #[must_use]
    pub fn concerns(&self, interest: Option<&HashSet<Uuid>>) -> bool {
        match (self, interest) {
            (Self::All, _) | (_, None) => true,
            (Self::Keys(keys), Some(interest)) => keys.iter().any(|k| interest.contains(k)),
        }
    }

    /// The notification's payload for a commit of `source`.
    #[must_use]
    pub fn payload(&self, source: &str) -> String {
        match self {
            Self::Keys(keys) if keys.len() <= MAX_KEYS => {
                let mut out = String::with_capacity(source.len() + 1 + keys.len() * 37);
                out.push_str(source);
                out.push('|');
                for (i, k) in keys.iter().enumerate() {
                    if i > 0 {
                        out.push(',');
                    }
                    let _ = write!(out, "{k}");
                }
                out
            }
            _ => format!("{source}|*"),
        }
    }

    /// A notification's payload read back; [`Touched::All`] for anything
    /// that is not one [`Touched::payload`] wrote.
    #[must_use]
    pub fn parse(payload: &str) -> Self {
        let Some((_, keys)) = payload.split_once('|') else {
            return Self::All;
        };
        if keys.is_empty() {
            return Self::default();
        }
        keys.split(',')
            .map(str::parse)
            .collect::<Result<BTreeSet<Uuid>, _>>()
            .map_or(Self::All, Self::Keys)
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

    fn keys(n: usize) -> Touched {
        let mut t = Touched::default();
        for _ in 0..n {
            t.key(Uuid::now_v7());
        }
        t
    }

    #[test]
    fn a_payload_reads_back_as_what_was_touched() {
        let t = keys(3);
        assert_eq!(Touched::parse(&t.payload("casepath_referral")), t);
        assert_eq!(Touched::parse(&Touched::default().payload("x")), Touched::default());
        assert_eq!(Touched::parse(&Touched::All.payload("x")), Touched::All);
    }

    #[test]
    fn too_many_keys_and_unreadable_payloads_touch_everything() {
        let many = keys(MAX_KEYS + 1);
        assert_eq!(Touched::parse(&many.payload("casepath_shelter")), Touched::All);
        let most = keys(MAX_KEYS);
        let payload = most.payload("casepath_repatriation");
        assert!(payload.len() < 8000, "within pg_notify's limit: {}", payload.len());
        assert_eq!(Touched::parse(&payload), most);
        for unreadable in ["test", "", "casepath_referral|not-a-uuid", "x|,"] {
            assert_eq!(Touched::parse(unreadable), Touched::All, "{unreadable:?}");
        }
    }

    #[test]
    fn a_watcher_looks_again_only_for_what_it_reads() {
        let (a, b) = (Uuid::now_v7(), Uuid::now_v7());
        let interest = HashSet::from([a]);
        let mut t = Touched::default();
        t.key(b);
        assert!(!t.concerns(Some(&interest)));
        assert!(t.concerns(None), "a watcher of everything looks at every change");
        t.key(a);
        assert!(t.concerns(Some(&interest)));
        assert!(Touched::All.concerns(Some(&HashSet::new())));
        assert!(!Touched::default().concerns(Some(&interest)));
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
