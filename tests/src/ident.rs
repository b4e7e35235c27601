//! Helpers of the identification tests: the audit entry of a refused call,
//! reports with a competent authority, and reads with a purpose code.

use nrm_proto::identification::v1 as pb;

use crate::tables::{ServiceTables, TableSnapshot};

/// One audit entry: action, subject, purpose.
pub type AuditRow = (String, String, String);

/// The audit entries written since `before` (a snapshot of the same
/// database), oldest first.
///
/// # Panics
/// When the query fails.
pub async fn audit_since(pool: &sqlx::PgPool, before: &TableSnapshot) -> Vec<AuditRow> {
    let seen = i64::try_from(before.rows("audit_log")).unwrap_or(0);
    sqlx::query_as("SELECT action, subject_id, purpose FROM audit_log ORDER BY id OFFSET $1")
        .bind(seen)
        .fetch_all(pool)
        .await
        .expect("read the audit trail")
}

/// Asserts that a refused call wrote exactly one audit entry, `action`
/// (`GetCase:denied`) about `subject` (the parsed ID, or empty), and nothing
/// else anywhere; returns the snapshot after it, for the next refusal.
///
/// # Panics
/// When anything else was written, or the entry is not as expected.
pub async fn assert_refusal_audited(
    tables: &ServiceTables,
    before: &TableSnapshot,
    action: &str,
    subject: &str,
    what: &str,
) -> TableSnapshot {
    tables.assert_changed_only_since(before, &["audit_log"], what).await;
    let entries = audit_since(tables.pool(), before).await;
    assert_eq!(
        entries,
        [(action.to_owned(), subject.to_owned(), "refused".to_owned())],
        "{what}: one audit entry of the refusal"
    );
    tables.snapshot().await
}

/// A read of a case's identifiers for `purpose`.
#[must_use]
pub fn read_case(case_id: &str, purpose: pb::ReadPurpose) -> pb::GetCaseRequest {
    pb::GetCaseRequest {
        case_id: case_id.to_owned(),
        include_personal_data: true,
        read_purpose: purpose as i32,
        ..Default::default()
    }
}

/// A read of a case's coded fields.
#[must_use]
pub fn coded_case(case_id: &str) -> pb::GetCaseRequest {
    pb::GetCaseRequest {
        case_id: case_id.to_owned(),
        ..Default::default()
    }
}

/// An erasure of the person of `case_id` for `reason`.
#[must_use]
pub fn erase(request_id: &str, case_id: &str, reason: pb::ErasureReason) -> pb::ErasePersonalDataRequest {
    pb::ErasePersonalDataRequest {
        request_id: request_id.to_owned(),
        case_id: case_id.to_owned(),
        reason: reason as i32,
    }
}

/// [`crate::report_request`] naming `authority` as the competent authority.
#[must_use]
pub fn report_for(
    request_id: &str,
    personal: nrm_proto::common::v1::PersonalIdentifiers,
    authority: &str,
) -> pb::ReportPresumedVictimRequest {
    let mut request = crate::report_request(request_id, personal);
    request.competent_authority = authority.to_owned();
    request
}
