//! Shared helpers of the consent and referral tests: that a refused call
//! wrote nothing but the one audit entry the gate writes for it; a consent
//! written as the service wrote it before issue 9.

use nrm_kernel::store::{Actor, EventMetadata, EventStore, NewEvent};
use nrm_proto::referral::v1 as pb;
use prost::Message as _;
use uuid::Uuid;

use crate::ReferralApp;
use crate::tables::{ServiceTables, TableSnapshot};

/// Writes a consent of `person_id` (case `case_id`) for `recipient` as the
/// referral service did before issue 9, recorded by an officer of
/// `recording_agency`: a `ConsentRecorded` without `recorded_by_agency` (the
/// agency is only on the event's metadata) and a `consents` row with no
/// recording agency and no expiry, and no expiry timer. Returns its ID.
///
/// # Panics
/// When the store fails.
pub async fn record_before_issue_9(
    app: &ReferralApp,
    (case_id, person_id): (&str, &str),
    recipient: &str,
    recording_agency: &str,
    expires_at: Option<prost_types::Timestamp>,
) -> String {
    let consent_id = Uuid::now_v7();
    let recorded = pb::ConsentRecorded {
        consent_id: consent_id.to_string(),
        person_id: person_id.to_owned(),
        case_id: case_id.to_owned(),
        given_by: pb::ConsentGiver::Person as i32,
        recipient_agency: recipient.to_owned(),
        purposes: vec![pb::ServiceKind::Psychological as i32],
        data_categories: vec![pb::DataCategory::Name as i32],
        expires_at,
        recorded_at: Some(prost_types::Timestamp {
            seconds: chrono::Utc::now().timestamp(),
            nanos: 0,
        }),
        ..Default::default()
    };
    let event = NewEvent {
        event_type: "ConsentRecorded".into(),
        schema_version: 1,
        payload: pb::ReferralEvent {
            event: Some(pb::referral_event::Event::ConsentRecorded(recorded)),
        }
        .encode_to_vec(),
    };
    let metadata = EventMetadata {
        correlation_id: Uuid::now_v7(),
        causation_id: Uuid::now_v7(),
        actor: Actor {
            agency: recording_agency.to_owned(),
            role: "police".into(),
            officer: "officer-17".into(),
        },
        traceparent: None,
        tracestate: None,
    };
    let subject = format!("{}.referral.v1.consent.{consent_id}", app.settings.nats.subject_prefix);
    let store = EventStore::new(app.pool.clone());
    let mut uow = store.begin().await.expect("begin");
    uow.append(&format!("consent-{consent_id}"), 0, &[event], &metadata, &subject)
        .await
        .expect("append the consent");
    sqlx::query("INSERT INTO consents (consent_id, person_id, recipient_agency, withdrawn) VALUES ($1, $2, $3, false)")
        .bind(consent_id)
        .bind(person_id.parse::<Uuid>().expect("person ID"))
        .bind(recipient)
        .execute(uow.conn())
        .await
        .expect("insert the consent's row");
    uow.commit().await.expect("commit");
    consent_id.to_string()
}

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
