//! The tamper-evident audit trail: who did what to which aggregate (and
//! person), when, why, and with what outcome.
//!
//! Every entry is numbered without gaps (`seq`) and chained by hash to the
//! one before it: `hash` is SHA-256 over a canonical encoding of the entry
//! and `prev_hash`, the hash of the entry before (32 zero bytes for the
//! first). A trigger numbers and hashes every insert, whoever writes it, under
//! the lock of a one-row chain head (kernel migration
//! `20260101000005_kernel_audit_chain.sql`); the table refuses UPDATE, DELETE
//! and TRUNCATE. [`verify`] recomputes the chain here, in Rust, independently
//! of the database's functions, and names the first entry that was changed,
//! removed or reordered.
//!
//! What it does not guarantee: someone with the rights to disable triggers
//! (a superuser, the table's owner) can rewrite every entry from the changed
//! one on, with fresh hashes, and move the head. Only a head recorded outside
//! the database (an [`Anchor`]: a seq and its hash, as `nrmctl audit verify`
//! prints them) reveals that.

use chrono::{DateTime, Utc};
use futures::TryStreamExt as _;
use sha2::{Digest, Sha256};
use sqlx::{PgConnection, PgPool, Row};
use uuid::Uuid;

use crate::store::Actor;

/// The `prev_hash` of the first entry.
pub const GENESIS: [u8; 32] = [0; 32];

/// How an audited call ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Outcome {
    /// Done (or read) as asked.
    Ok,
    /// Refused: the caller's role may not.
    Denied,
    /// Refused: no valid token.
    Unauthenticated,
    /// Refused by a rule of the domain (`FAILED_PRECONDITION`).
    Refused,
}

impl Outcome {
    /// The code stored in `audit_log.outcome`.
    #[must_use]
    pub const fn as_str(self) -> &'static str {
        match self {
            Outcome::Ok => "ok",
            Outcome::Denied => "denied",
            Outcome::Unauthenticated => "unauthenticated",
            Outcome::Refused => "refused",
        }
    }
}

/// One entry to append: IDs and codes only, never personal data.
#[derive(Debug, Clone, Copy)]
pub struct Entry<'a> {
    /// Who (agency, role, pseudonymous officer).
    pub actor: &'a Actor,
    /// What was done (the RPC, the reaction).
    pub action: &'a str,
    /// The aggregate (or other thing) concerned.
    pub subject_id: &'a str,
    /// The person whose records were read or changed, when known.
    pub person_id: Option<Uuid>,
    /// Why.
    pub purpose: &'a str,
    /// How it ended.
    pub outcome: Outcome,
}

impl<'a> Entry<'a> {
    /// An entry of `actor` doing `action` to `subject_id` for `purpose`,
    /// with no person and the outcome [`Outcome::Ok`].
    #[must_use]
    pub const fn new(actor: &'a Actor, action: &'a str, subject_id: &'a str, purpose: &'a str) -> Self {
        Self {
            actor,
            action,
            subject_id,
            person_id: None,
            purpose,
            outcome: Outcome::Ok,
        }
    }

    /// The same entry, concerning `person_id`.
    #[must_use]
    pub const fn person(mut self, person_id: Uuid) -> Self {
        self.person_id = Some(person_id);
        self
    }

    /// The same entry, ended with `outcome`.
    #[must_use]
    pub const fn outcome(mut self, outcome: Outcome) -> Self {
        self.outcome = outcome;
        self
    }
}

/// Appends `entry` in the caller's transaction (one statement). The entry's
/// seq and hashes are set by the database; the chain head stays locked until
/// the transaction ends, so keep audited transactions short.
///
/// # Errors
/// When the database fails; the surrounding transaction then fails too.
pub async fn append(conn: &mut PgConnection, entry: &Entry<'_>) -> Result<(), sqlx::Error> {
    sqlx::query(
        "INSERT INTO audit_log (agency, role, officer, action, subject_id, person_id, purpose, outcome)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
    )
    .bind(&entry.actor.agency)
    .bind(&entry.actor.role)
    .bind(&entry.actor.officer)
    .bind(entry.action)
    .bind(entry.subject_id)
    .bind(entry.person_id)
    .bind(entry.purpose)
    .bind(entry.outcome.as_str())
    .execute(conn)
    .await?;
    Ok(())
}

/// Records one access or command in the caller's transaction: [`append`]
/// of an entry with no person and the outcome [`Outcome::Ok`].
///
/// # Errors
/// When the database fails; the surrounding transaction then fails too.
pub async fn record(
    conn: &mut PgConnection,
    actor: &Actor,
    action: &str,
    subject_id: &str,
    purpose: &str,
) -> Result<(), sqlx::Error> {
    append(conn, &Entry::new(actor, action, subject_id, purpose)).await
}

/// An entry as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredEntry {
    /// Its place in the chain, from 1.
    pub seq: i64,
    /// The hash of the entry before.
    pub prev_hash: Vec<u8>,
    /// Its own hash.
    pub hash: Vec<u8>,
    /// When it was recorded.
    pub recorded_at: DateTime<Utc>,
    /// Agency of the actor.
    pub agency: String,
    /// Role of the actor.
    pub role: String,
    /// Pseudonymous officer.
    pub officer: String,
    /// What was done.
    pub action: String,
    /// What it concerned.
    pub subject_id: String,
    /// The person concerned, when known.
    pub person_id: Option<Uuid>,
    /// Why.
    pub purpose: String,
    /// How it ended (`ok`, `denied`, `unauthenticated`).
    pub outcome: String,
}

/// The columns [`StoredEntry::from_row`] reads.
pub const COLUMNS: &str =
    "seq, prev_hash, hash, at, agency, role, officer, action, subject_id, person_id, purpose, outcome";

impl StoredEntry {
    /// An entry from a row of [`COLUMNS`].
    ///
    /// # Errors
    /// When a column is missing or of another type.
    pub fn from_row(row: &sqlx::postgres::PgRow) -> Result<Self, sqlx::Error> {
        Ok(Self {
            seq: row.try_get("seq")?,
            prev_hash: row.try_get("prev_hash")?,
            hash: row.try_get("hash")?,
            recorded_at: row.try_get("at")?,
            agency: row.try_get("agency")?,
            role: row.try_get("role")?,
            officer: row.try_get("officer")?,
            action: row.try_get("action")?,
            subject_id: row.try_get("subject_id")?,
            person_id: row.try_get("person_id")?,
            purpose: row.try_get("purpose")?,
            outcome: row.try_get("outcome")?,
        })
    }

    /// The hash the entry must have, recomputed from its fields and `prev_hash`.
    #[must_use]
    pub fn computed_hash(&self) -> [u8; 32] {
        let mut h = Sha256::new();
        h.update(b"kopur-audit-v1");
        h.update(self.seq.to_be_bytes());
        h.update(&self.prev_hash);
        h.update(self.recorded_at.timestamp_micros().to_be_bytes());
        for field in [&self.agency, &self.role, &self.officer, &self.action, &self.subject_id] {
            field_bytes(&mut h, field);
        }
        match self.person_id {
            None => h.update([0u8]),
            Some(id) => {
                h.update([1u8]);
                h.update(id.as_bytes());
            }
        }
        field_bytes(&mut h, &self.purpose);
        field_bytes(&mut h, &self.outcome);
        h.finalize().into()
    }
}

/// A text field: its UTF-8 length (4 bytes, big-endian), then its bytes.
fn field_bytes(h: &mut Sha256, field: &str) {
    h.update(u32::try_from(field.len()).unwrap_or(u32::MAX).to_be_bytes());
    h.update(field.as_bytes());
}

/// Lowercase hex of `bytes`.
#[must_use]
pub fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write as _;
    bytes.iter().fold(String::with_capacity(bytes.len() * 2), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    })
}

/// An entry's hash recorded outside the database: the chain must still
/// hold it at that seq.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Anchor {
    /// The entry's seq.
    pub seq: i64,
    /// Its hash.
    pub hash: Vec<u8>,
}

impl Anchor {
    /// `SEQ:HEX` as `nrmctl audit verify` prints the head.
    ///
    /// # Errors
    /// A description of what is malformed.
    pub fn parse(text: &str) -> Result<Self, &'static str> {
        let (seq, hash) = text.split_once(':').ok_or("must be SEQ:HASH")?;
        let seq: i64 = seq.parse().map_err(|_| "SEQ must be a number")?;
        if seq < 1 || hash.len() != 64 || !hash.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err("must be SEQ:HASH with SEQ from 1 and HASH 64 hex digits");
        }
        let hash = (0..32)
            .map(|i| u8::from_str_radix(&hash[2 * i..2 * i + 2], 16))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|_| "HASH must be hex")?;
        Ok(Self { seq, hash })
    }
}

/// How the chain is broken.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BreakKind {
    /// An entry's fields no longer give its hash, or an anchored hash differs.
    Changed,
    /// An entry is missing: a gap in the seq, or the chain ends before its head.
    Removed,
    /// An entry's `prev_hash` is not the hash of the entry before it.
    Reordered,
}

/// The first place the chain is broken.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChainBreak {
    /// The seq of the first entry that does not hold.
    pub seq: i64,
    /// How.
    pub kind: BreakKind,
    /// Why, in words (seqs and hashes only).
    pub detail: String,
}

/// What [`verify`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verification {
    /// Entries read and checked.
    pub checked: u64,
    /// The last entry's seq (0 when there is none).
    pub head_seq: i64,
    /// The last entry's hash ([`GENESIS`] when there is none).
    pub head_hash: Vec<u8>,
    /// The first break, if any.
    pub broken: Option<ChainBreak>,
}

/// Checks entries one at a time, in seq order; pure, so it is tested
/// without a database.
#[derive(Debug)]
pub struct ChainCheck {
    checked: u64,
    last_seq: i64,
    last_hash: Vec<u8>,
    anchor: Option<Anchor>,
    broken: Option<ChainBreak>,
}

impl ChainCheck {
    /// A check from the first entry, requiring `anchor` when given.
    #[must_use]
    pub fn new(anchor: Option<Anchor>) -> Self {
        Self {
            checked: 0,
            last_seq: 0,
            last_hash: GENESIS.to_vec(),
            anchor,
            broken: None,
        }
    }

    /// Whether a break was found (nothing after it is looked at).
    #[must_use]
    pub fn is_broken(&self) -> bool {
        self.broken.is_some()
    }

    fn fail(&mut self, seq: i64, kind: BreakKind, detail: String) {
        self.broken.get_or_insert(ChainBreak { seq, kind, detail });
    }

    /// Checks the next entry.
    pub fn push(&mut self, entry: &StoredEntry) {
        if self.is_broken() {
            return;
        }
        self.checked += 1;
        let expected = self.last_seq + 1;
        if entry.seq > expected {
            let last = entry.seq - 1;
            return self.fail(
                expected,
                BreakKind::Removed,
                format!(
                    "entries {expected} to {last} are missing (the next entry is {})",
                    entry.seq
                ),
            );
        }
        if entry.seq < expected {
            return self.fail(
                entry.seq,
                BreakKind::Reordered,
                format!("entry {} follows entry {}", entry.seq, self.last_seq),
            );
        }
        if entry.prev_hash != self.last_hash {
            return self.fail(
                entry.seq,
                BreakKind::Reordered,
                format!(
                    "entry {}'s prev_hash is not the hash of entry {}: entries were reordered, or entry {} rewritten with a new hash",
                    entry.seq, self.last_seq, self.last_seq
                ),
            );
        }
        if entry.computed_hash().as_slice() != entry.hash.as_slice() {
            return self.fail(
                entry.seq,
                BreakKind::Changed,
                format!("entry {}'s fields do not give its hash", entry.seq),
            );
        }
        if let Some(anchor) = &self.anchor
            && anchor.seq == entry.seq
            && anchor.hash != entry.hash
        {
            return self.fail(
                entry.seq,
                BreakKind::Changed,
                format!(
                    "entry {}'s hash {} is not the anchored {}: the chain was rewritten from there on or before",
                    entry.seq,
                    hex(&entry.hash),
                    hex(&anchor.hash)
                ),
            );
        }
        self.last_seq = entry.seq;
        self.last_hash.clone_from(&entry.hash);
    }

    /// The verdict, given the chain head the database keeps (`None`: the
    /// head row is missing).
    #[must_use]
    pub fn finish(mut self, head: Option<(i64, Vec<u8>)>) -> Verification {
        if !self.is_broken() {
            match head {
                None => self.fail(
                    self.last_seq + 1,
                    BreakKind::Removed,
                    "the chain head (audit_chain_head) is missing".into(),
                ),
                Some((seq, _)) if seq > self.last_seq => self.fail(
                    self.last_seq + 1,
                    BreakKind::Removed,
                    format!(
                        "the chain ends at entry {} but its head is entry {seq}: the last entries were removed",
                        self.last_seq
                    ),
                ),
                Some((seq, hash)) if seq < self.last_seq || hash != self.last_hash => self.fail(
                    seq.min(self.last_seq),
                    BreakKind::Changed,
                    format!(
                        "the chain head (entry {seq}) does not match the last entry ({})",
                        self.last_seq
                    ),
                ),
                Some(_) => {}
            }
        }
        if !self.is_broken()
            && let Some(anchor) = &self.anchor
            && anchor.seq > self.last_seq
        {
            let (seq, last) = (anchor.seq, self.last_seq);
            self.fail(
                last + 1,
                BreakKind::Removed,
                format!("the anchored entry {seq} is past the end of the chain (entry {last})"),
            );
        }
        Verification {
            checked: self.checked,
            head_seq: self.last_seq,
            head_hash: self.last_hash,
            broken: self.broken,
        }
    }
}

/// Walks the whole chain in seq order, in one read-only snapshot, and
/// compares its end with the chain head (and `anchor`, when given).
///
/// # Errors
/// When the database fails.
pub async fn verify(pool: &PgPool, anchor: Option<Anchor>) -> Result<Verification, sqlx::Error> {
    let mut tx = pool.begin().await?;
    sqlx::query("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
        .execute(&mut *tx)
        .await?;
    let mut check = ChainCheck::new(anchor);
    {
        let query = format!("SELECT {COLUMNS} FROM audit_log ORDER BY seq");
        let mut rows = sqlx::query(sqlx::AssertSqlSafe(query)).fetch(&mut *tx);
        while let Some(row) = rows.try_next().await? {
            check.push(&StoredEntry::from_row(&row)?);
            if check.is_broken() {
                break;
            }
        }
    }
    let head: Option<(i64, Vec<u8>)> = sqlx::query_as("SELECT seq, hash FROM audit_chain_head")
        .fetch_optional(&mut *tx)
        .await?;
    tx.commit().await?;
    Ok(check.finish(head))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(seq: i64, prev_hash: &[u8]) -> StoredEntry {
        let mut e = StoredEntry {
            seq,
            prev_hash: prev_hash.to_vec(),
            hash: Vec::new(),
            recorded_at: DateTime::from_timestamp_micros(1_740_817_800_123_456).unwrap_or_default(),
            agency: "kg-mvd".into(),
            role: "police".into(),
            officer: "officer-1".into(),
            action: "ReadPersonalData".into(),
            subject_id: "case-1".into(),
            person_id: Some(Uuid::from_u128(0x0190_a0b0_0000_7000_8000_0000_0000_0001)),
            purpose: "case review".into(),
            outcome: "ok".into(),
        };
        e.hash = e.computed_hash().to_vec();
        e
    }

    fn chain(n: i64) -> Vec<StoredEntry> {
        let mut out: Vec<StoredEntry> = Vec::new();
        for seq in 1..=n {
            let prev = out.last().map_or(GENESIS.to_vec(), |e| e.hash.clone());
            let mut e = entry(seq, &prev);
            e.subject_id = format!("case-{seq}");
            e.hash = e.computed_hash().to_vec();
            out.push(e);
        }
        out
    }

    fn check(entries: &[StoredEntry], head: Option<(i64, Vec<u8>)>) -> Verification {
        let mut c = ChainCheck::new(None);
        entries.iter().for_each(|e| c.push(e));
        c.finish(head)
    }

    fn head(entries: &[StoredEntry]) -> Option<(i64, Vec<u8>)> {
        entries.last().map(|e| (e.seq, e.hash.clone()))
    }

    #[test]
    fn the_hash_is_the_one_postgresql_computes() {
        // SELECT encode(audit_entry_hash(1, decode(repeat('00',32),'hex'), '2025-03-01T08:30:00.123456Z',
        //   'kg-mvd','police','officer-1','ReadPersonalData','case-1',
        //   '0190a0b0-0000-7000-8000-000000000001', 'case review', 'ok'), 'hex');
        assert_eq!(
            hex(&entry(1, &GENESIS).computed_hash()),
            "3647acae3aa67b5698d7f09cc72783496001a1c87135d34ae3a65dea8d840297"
        );
    }

    #[test]
    fn an_intact_chain_verifies_and_names_its_head() {
        let entries = chain(5);
        let v = check(&entries, head(&entries));
        assert_eq!((v.checked, v.head_seq, v.broken), (5, 5, None));
        assert_eq!(v.head_hash, entries[4].hash);
        let empty = check(&[], Some((0, GENESIS.to_vec())));
        assert_eq!((empty.checked, empty.broken), (0, None));
    }

    #[test]
    fn a_changed_entry_is_named() {
        let mut entries = chain(5);
        entries[2].purpose = "curiosity".into();
        let broken = check(&entries, head(&entries)).broken.unwrap();
        assert_eq!((broken.seq, broken.kind), (3, BreakKind::Changed));
    }

    #[test]
    fn a_removed_entry_is_named_in_the_middle_and_at_the_end() {
        let mut entries = chain(5);
        let full_head = head(&entries);
        entries.remove(1);
        let broken = check(&entries, full_head.clone()).broken.unwrap();
        assert_eq!((broken.seq, broken.kind), (2, BreakKind::Removed));
        let mut entries = chain(5);
        entries.pop();
        let broken = check(&entries, full_head).broken.unwrap();
        assert_eq!((broken.seq, broken.kind), (5, BreakKind::Removed));
        assert_eq!(check(&[], None).broken.unwrap().kind, BreakKind::Removed);
    }

    #[test]
    fn swapped_entries_are_named() {
        let mut entries = chain(5);
        let h = head(&entries);
        // The rows of 2 and 3 exchanged but for their seq.
        let (two, three) = (entries[1].clone(), entries[2].clone());
        entries[1] = StoredEntry { seq: 2, ..three };
        entries[2] = StoredEntry { seq: 3, ..two };
        let broken = check(&entries, h).broken.unwrap();
        assert_eq!((broken.seq, broken.kind), (2, BreakKind::Reordered));
    }

    #[test]
    fn an_anchor_reveals_a_rewritten_chain() {
        let entries = chain(4);
        let anchor = Anchor {
            seq: 2,
            hash: entries[1].hash.clone(),
        };
        let mut c = ChainCheck::new(Some(anchor.clone()));
        entries.iter().for_each(|e| c.push(e));
        assert_eq!(c.finish(head(&entries)).broken, None);

        // Entry 2 changed and everything from it on re-hashed: only the anchor tells.
        let mut rewritten = chain(1);
        for seq in 2..=4 {
            let mut e = entry(seq, &rewritten[rewritten.len() - 1].hash);
            e.purpose = "rewritten".into();
            e.hash = e.computed_hash().to_vec();
            rewritten.push(e);
        }
        assert_eq!(check(&rewritten, head(&rewritten)).broken, None);
        let mut c = ChainCheck::new(Some(anchor));
        rewritten.iter().for_each(|e| c.push(e));
        let broken = c.finish(head(&rewritten)).broken.unwrap();
        assert_eq!((broken.seq, broken.kind), (2, BreakKind::Changed));
    }

    #[test]
    fn anchors_parse_as_printed() {
        let text = format!("7:{}", "ab".repeat(32));
        assert_eq!(
            Anchor::parse(&text),
            Ok(Anchor {
                seq: 7,
                hash: vec![0xab; 32]
            })
        );
        for bad in ["7", "x:ab", "0:00", &format!("7:{}", "zz".repeat(32))] {
            assert!(Anchor::parse(bad).is_err(), "{bad}");
        }
    }
}
