//! The auditor's service (`nrm.common.v1.AuditService`), served by every
//! service beside its own: the service's audit trail, its hash chain
//! verified ([`audit::verify`]) and its entries listed by person or subject.
//! Only the `auditor` role may call it (the auditor calls nothing else: the
//! case services and the operator's service refuse it). Every call is
//! audited, a refused or unauthenticated one too, so an auditor reading the
//! audit leaves an entry of its own.

use sqlx::PgPool;
use tonic::{Request, Response, Status};
use uuid::Uuid;

use crate::audit::{self, Anchor, BreakKind, Entry, Outcome, StoredEntry};
use crate::error::{AppError, Violations};
use crate::gate;
use crate::grpc::reply;
use crate::paging::{self, Cursor, Pager};
use crate::validate;
use nrm_proto::common::v1 as pb;
use pb::audit_service_server::AuditService;

/// The purpose recorded for the auditor's own calls.
const PURPOSE: &str = "audit";

/// The tonic service of one service's audit trail.
#[derive(Debug, Clone)]
pub struct AuditGrpc {
    pool: PgPool,
    context: &'static str,
}

impl AuditGrpc {
    /// Serves the audit trail in `pool`, of the service of `context`.
    #[must_use]
    pub fn new(pool: PgPool, context: &'static str) -> Self {
        Self { pool, context }
    }

    /// Audits the call with what it concerned (`subject`, `person`: parsed
    /// values only). The gate let only the auditor through, and audited the
    /// refused and unauthenticated attempts.
    async fn auditor<T>(
        &self,
        request: &Request<T>,
        action: &str,
        subject: &str,
        person: Option<Uuid>,
    ) -> Result<(), Status> {
        let ctx = gate::context(request)?;
        let entry = Entry {
            person_id: person,
            ..Entry::new(&ctx.caller.actor, action, subject, PURPOSE).outcome(Outcome::Ok)
        };
        self.append(&entry).await
    }

    async fn append(&self, entry: &Entry<'_>) -> Result<(), Status> {
        let mut conn = self.pool.acquire().await.map_err(AppError::from)?;
        audit::append(&mut conn, entry).await.map_err(AppError::from)?;
        Ok(())
    }

    async fn verify(&self, anchor: Option<Anchor>) -> Result<pb::VerifyChainResponse, AppError> {
        let found = audit::verify(&self.pool, anchor).await?;
        let (broken_seq, broken, detail) = match &found.broken {
            None => (0, pb::ChainBreak::Unspecified, String::new()),
            Some(b) => (
                u64::try_from(b.seq).unwrap_or(0),
                match b.kind {
                    BreakKind::Changed => pb::ChainBreak::Changed,
                    BreakKind::Removed => pb::ChainBreak::Removed,
                    BreakKind::Reordered => pb::ChainBreak::Reordered,
                },
                b.detail.clone(),
            ),
        };
        if found.broken.is_some() {
            tracing::error!(
                context = self.context,
                broken_seq,
                kind = broken.as_str_name(),
                "audit chain broken"
            );
        }
        Ok(pb::VerifyChainResponse {
            entries_checked: found.checked,
            ok: found.broken.is_none(),
            broken_seq,
            broken: broken as i32,
            detail,
            head_seq: u64::try_from(found.head_seq).unwrap_or(0),
            head_hash: audit::hex(&found.head_hash),
        })
    }

    async fn list(
        &self,
        request: &pb::ListEntriesRequest,
        person: Option<Uuid>,
        mut v: Violations,
    ) -> Result<pb::ListEntriesResponse, AppError> {
        let size = paging::page_size(request.page_size, &mut v);
        let subject = (!request.subject_id.is_empty()).then_some(request.subject_id.as_str());
        let pager = Pager::new(&format!(
            "audit;person={};subject={}",
            person.map(|p| p.to_string()).unwrap_or_default(),
            request.subject_id
        ));
        let cursor = pager.cursor(&request.page_token, &mut v);
        if !v.is_empty() {
            return Err(v.into_error());
        }
        let query = format!(
            "SELECT {} FROM audit_log
             WHERE ($1::uuid IS NULL OR person_id = $1 OR subject_id = $2)
               AND ($3::text IS NULL OR subject_id = $3)
               AND ($4::timestamptz IS NULL OR (at, seq) > ($4, $5))
             ORDER BY at, seq LIMIT $6",
            audit::COLUMNS
        );
        let rows = sqlx::query(sqlx::AssertSqlSafe(query))
            .bind(person)
            .bind(person.map(|p| p.to_string()))
            .bind(subject)
            .bind(cursor.map(|c| c.time))
            .bind(cursor.map_or(0, |c| i64::try_from(c.id.as_u64_pair().1).unwrap_or(i64::MAX)))
            .bind(i64::from(size) + 1)
            .fetch_all(&self.pool)
            .await?;
        let mut entries = rows.iter().map(StoredEntry::from_row).collect::<Result<Vec<_>, _>>()?;
        let more = entries.len() > usize::try_from(size).unwrap_or(usize::MAX);
        entries.truncate(usize::try_from(size).unwrap_or(usize::MAX));
        let last = entries.last().map(|e| Cursor {
            time: e.recorded_at,
            id: Uuid::from_u64_pair(0, u64::try_from(e.seq).unwrap_or(0)),
        });
        Ok(pb::ListEntriesResponse {
            next_page_token: pager.next_token(more, last),
            entries: entries.into_iter().map(to_pb).collect(),
        })
    }
}

fn to_pb(e: StoredEntry) -> pb::AuditEntry {
    pb::AuditEntry {
        seq: u64::try_from(e.seq).unwrap_or(0),
        recorded_at: Some(validate::timestamp(e.recorded_at)),
        agency: e.agency,
        role: e.role,
        officer: e.officer,
        action: e.action,
        subject_id: e.subject_id,
        person_id: e.person_id.map(|p| p.to_string()).unwrap_or_default(),
        purpose: e.purpose,
        outcome: e.outcome,
        hash: audit::hex(&e.hash),
    }
}

/// `subject` when it is a plain ID (letters, digits, `-_.:/`, at most 128),
/// else `?`: raw text never reaches the audit trail.
fn plain(subject: &str) -> &str {
    if subject.len() <= 128
        && subject
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | ':' | '/'))
    {
        subject
    } else {
        "?"
    }
}

#[tonic::async_trait]
impl AuditService for AuditGrpc {
    async fn verify_chain(
        &self,
        request: Request<pb::VerifyChainRequest>,
    ) -> Result<Response<pb::VerifyChainResponse>, Status> {
        self.auditor(&request, "VerifyChain", self.context, None).await?;
        let r = request.get_ref();
        let anchor = if r.anchor_seq == 0 && r.anchor_hash.is_empty() {
            None
        } else {
            let parsed = Anchor::parse(&format!("{}:{}", r.anchor_seq, r.anchor_hash.to_ascii_lowercase()))
                .map_err(|why| AppError::invalid("anchor_hash", format!("anchor_seq:anchor_hash {why}")));
            match parsed {
                Ok(anchor) => Some(anchor),
                Err(e) => return reply(Err(e)),
            }
        };
        reply(self.verify(anchor).await)
    }

    async fn list_entries(
        &self,
        request: Request<pb::ListEntriesRequest>,
    ) -> Result<Response<pb::ListEntriesResponse>, Status> {
        let r = request.get_ref();
        let mut v = Violations::new();
        let person = if r.person_id.is_empty() {
            None
        } else {
            r.person_id.parse::<Uuid>().map_or_else(
                |_| {
                    v.add("person_id", "must be a UUID");
                    None
                },
                Some,
            )
        };
        if r.subject_id.len() > 128 {
            v.add("subject_id", "must be at most 128 characters");
        }
        let subject = match (person, r.subject_id.as_str()) {
            (Some(p), "") => p.to_string(),
            (_, "") => "*".to_owned(),
            (_, s) => plain(s).to_owned(),
        };
        self.auditor(&request, "ListEntries", &subject, person).await?;
        reply(self.list(request.get_ref(), person, v).await)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_plain_ids_are_recorded_as_subjects() {
        assert_eq!(plain("referral-0190/1"), "referral-0190/1");
        assert_eq!(plain("Aigul Asanova"), "?");
        assert_eq!(plain(&"a".repeat(129)), "?");
    }
}
