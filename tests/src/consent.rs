//! Shared helpers of the consent and referral tests: that a refused call
//! wrote nothing but the one audit entry the gate writes for it.

use crate::tables::{ServiceTables, TableSnapshot};

/// Asserts that a refused call (`PERMISSION_DENIED` or `FAILED_PRECONDITION`)
/// changed no table but `audit_log`, and that `audit_log` got exactly one
/// entry, for `action` (`CreateReferral:refused`, `RecordConsent:denied`)
/// about `subject` (a parsed ID, or `None` when not checked). Returns the
/// snapshot after it, for the next refusal to compare with.
///
/// # Panics
/// When anything else was written, or the audit entry is missing or another.
pub async fn assert_refused(
    tables: &ServiceTables,
    before: &TableSnapshot,
    action: &str,
    subject: Option<&str>,
    what: &str,
) -> TableSnapshot {
    tables.assert_changed_only_since(before, &["audit_log"], what).await;
    let after = tables.snapshot().await;
    let added = after.rows("audit_log").saturating_sub(before.rows("audit_log"));
    assert_eq!(added, 1, "{what}: {added} audit entries were written, not one");
    let (last, about): (String, String) =
        sqlx::query_as("SELECT action, subject_id FROM audit_log ORDER BY id DESC LIMIT 1")
            .fetch_one(tables.pool())
            .await
            .expect("read the audit log");
    assert_eq!(last, action, "{what}: the audit entry");
    if let Some(subject) = subject {
        assert_eq!(about, subject, "{what}: what the audit entry concerns");
    }
    after
}
