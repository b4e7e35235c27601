//! Consents cannot be self-granted or forged (issue 9): recorded by an agency
//! holding the case, never by the agency it lets in, for a person
//! identification knows, with the child flag identification's and the
//! attestation on the event; withdrawn only by the recording agency or the
//! coordinator; ended by itself at its expiry, exactly as on withdrawal;
//! listed for the agencies holding the case; a consent recorded before all
//! this is upgraded at start (its recording agency, its expiry and its
//! timer). Real services, real NATS and
//! PostgreSQL; every refusal writes nothing but its audit entry.

#![allow(clippy::unwrap_used)] // Test code: a failed unwrap is a failed test.

use std::time::{Duration, Instant};

use nrm_e2e::consent::{assert_refused, record_before_issue_9};
use nrm_e2e::{ReferralApp, TestApp, authorized, bad_fields, person, report_request, token};
use nrm_kernel::auth::Role;
use nrm_proto::identification::v1 as idpb;
use nrm_proto::referral::v1 as pb;
use tonic::Code;
use tonic_types::StatusExt as _;

const MVD: &str = "kg-mvd";
const MSD: &str = "kg-msd";
const MOH: &str = "kg-moh";
const NGO: &str = "kg-ngo-tenir";
const OTHER_NGO: &str = "kg-ngo-other";

fn police() -> String {
    token(MVD, Role::Police, "officer-17")
}

fn msd() -> String {
    token(MSD, Role::Msd, "social-worker-4")
}

fn ngo() -> String {
    token(NGO, Role::Ngo, "case-worker-9")
}

fn other_ngo() -> String {
    token(OTHER_NGO, Role::Ngo, "case-worker-3")
}

fn coordinator() -> String {
    token("kg-nrm", Role::Coordinator, "coordinator-1")
}

fn rid() -> String {
    uuid::Uuid::now_v7().to_string()
}

fn precondition(status: &tonic::Status) -> String {
    assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}");
    status
        .get_details_precondition_failure()
        .expect("precondition details")
        .violations[0]
        .r#type
        .clone()
}

/// Reports a person as `reporter`; waits until the referral service knows
/// them; returns (case ID, person ID).
async fn reported(id: &TestApp, app: &ReferralApp, reporter: &str, child: bool) -> (String, String) {
    let unique = uuid::Uuid::new_v4().simple().to_string()[..7].to_ascii_uppercase();
    let mut request = report_request(&rid(), person(&format!("Aigul {unique}"), &format!("AC{unique}"), ""));
    if child {
        request.child = true;
        request.age_years = Some(15);
    }
    // The police unit handles the case, whoever reports it.
    request.competent_authority = MVD.into();
    let reported = id
        .client
        .clone()
        .report_presumed_victim(authorized(request, reporter))
        .await
        .unwrap()
        .into_inner();
    // A child is presumed a victim from the report on.
    let status = if child {
        idpb::CaseStatus::Presumed
    } else {
        idpb::CaseStatus::Reported
    };
    app.wait_for_person(&reported.person_id, status as i32).await;
    (reported.case_id, reported.person_id)
}

fn consent_request(case_id: &str, person_id: &str, recipient: &str) -> pb::RecordConsentRequest {
    pb::RecordConsentRequest {
        request_id: rid(),
        person_id: person_id.to_owned(),
        case_id: case_id.to_owned(),
        given_by: pb::ConsentGiver::Person as i32,
        recipient_agency: recipient.to_owned(),
        purposes: vec![pb::ServiceKind::Psychological as i32],
        data_categories: vec![pb::DataCategory::Name as i32],
        ..Default::default()
    }
}

async fn record(
    app: &ReferralApp,
    request: pb::RecordConsentRequest,
    as_: &str,
) -> Result<pb::RecordConsentResponse, tonic::Status> {
    app.client
        .clone()
        .record_consent(authorized(request, as_))
        .await
        .map(tonic::Response::into_inner)
}

async fn withdraw(app: &ReferralApp, consent_id: &str, as_: &str) -> Result<(), tonic::Status> {
    app.client
        .clone()
        .withdraw_consent(authorized(
            pb::WithdrawConsentRequest {
                request_id: rid(),
                consent_id: consent_id.to_owned(),
            },
            as_,
        ))
        .await
        .map(|_| ())
}

async fn list(app: &ReferralApp, person_id: &str, as_: &str) -> Result<Vec<pb::ConsentView>, tonic::Status> {
    app.client
        .clone()
        .list_consents(authorized(
            pb::ListConsentsRequest {
                person_id: person_id.to_owned(),
            },
            as_,
        ))
        .await
        .map(|r| r.into_inner().consents)
}

/// The `ConsentRecorded` event of `consent_id`, as stored.
async fn recorded_event(app: &ReferralApp, consent_id: &str) -> pb::ConsentRecorded {
    let payload: Vec<u8> = sqlx::query_scalar("SELECT payload FROM events WHERE stream_id = $1 AND version = 1")
        .bind(format!("consent-{consent_id}"))
        .fetch_one(&app.pool)
        .await
        .unwrap();
    match <pb::ReferralEvent as prost::Message>::decode(payload.as_slice())
        .unwrap()
        .event
    {
        Some(pb::referral_event::Event::ConsentRecorded(recorded)) => recorded,
        other => panic!("expected ConsentRecorded, got {other:?}"),
    }
}

#[tokio::test]
async fn a_consent_is_recorded_by_an_agency_holding_the_case_never_by_the_one_it_lets_in() {
    let id = TestApp::spawn().await;
    let app = ReferralApp::spawn_beside(&id).await;
    // The NGO reported this person: it holds the case.
    let (case_id, person_id) = reported(&id, &app, &ngo(), false).await;
    let tables = app.tables();
    let before = tables.snapshot().await;

    // The NGO grants itself.
    let status = record(&app, consent_request(&case_id, &person_id, NGO), &ngo())
        .await
        .unwrap_err();
    assert_eq!(precondition(&status), "SELF_GRANT");
    let before = assert_refused(
        &tables,
        &before,
        "RecordConsent:refused",
        Some(&person_id),
        "a recipient granting itself",
    )
    .await;
    // The MSD, which the consent would let in, may not record consents at all.
    let status = record(&app, consent_request(&case_id, &person_id, MSD), &msd())
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied);
    let before = assert_refused(
        &tables,
        &before,
        "RecordConsent:denied",
        Some(""),
        "the recipient recording its own consent",
    )
    .await;
    // Another NGO holds no part of this case.
    let status = record(&app, consent_request(&case_id, &person_id, MSD), &other_ngo())
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied);
    let before = assert_refused(
        &tables,
        &before,
        "RecordConsent:denied",
        Some(&person_id),
        "an agency that does not hold the case",
    )
    .await;
    // A person identification never reported.
    let unknown = rid();
    let status = record(&app, consent_request(&rid(), &unknown, MSD), &police())
        .await
        .unwrap_err();
    assert_eq!(precondition(&status), "UNKNOWN_PERSON");
    assert!(
        !status.message().contains(&unknown),
        "the caller's text is not repeated"
    );
    assert_refused(
        &tables,
        &before,
        "RecordConsent:refused",
        Some(&unknown),
        "a consent of an unknown person",
    )
    .await;

    // The holder records it; the event names who recorded and who attests it.
    let consent_id = record(&app, consent_request(&case_id, &person_id, MSD), &ngo())
        .await
        .unwrap()
        .consent_id;
    let event = recorded_event(&app, &consent_id).await;
    assert_eq!(event.recorded_by_agency, NGO);
    let attestation = event.attestation.unwrap();
    assert_eq!(attestation.attesting_officer, "case-worker-9");
    assert!(attestation.guardian_ref.is_empty() && attestation.best_interests_decision_ref.is_empty());
    assert!(!event.child);
    app.stop().await;
    id.stop().await;
}

#[tokio::test]
async fn a_childs_consent_needs_its_attestation_whatever_the_request_says() {
    let id = TestApp::spawn().await;
    let app = ReferralApp::spawn_beside(&id).await;
    let (case_id, person_id) = reported(&id, &app, &police(), true).await;
    let tables = app.tables();
    let before = tables.snapshot().await;

    // The request says an adult consents for themselves; identification knows a child.
    let mut own = consent_request(&case_id, &person_id, MSD);
    own.child = false;
    let status = record(&app, own, &police()).await.unwrap_err();
    assert_eq!(precondition(&status), "CHILD_NEEDS_GUARDIAN");
    let before = assert_refused(
        &tables,
        &before,
        "RecordConsent:refused",
        Some(&person_id),
        "a child's own consent",
    )
    .await;
    // A best-interests decision without its reference and who took it; a guardian named by name.
    let mut decision = consent_request(&case_id, &person_id, MSD);
    decision.given_by = pb::ConsentGiver::BestInterestsDecision as i32;
    let status = record(&app, decision.clone(), &police()).await.unwrap_err();
    assert_eq!(
        bad_fields(&status),
        ["best_interests_decision_ref", "best_interests_decided_by"]
    );
    let mut guardian = consent_request(&case_id, &person_id, MSD);
    guardian.given_by = pb::ConsentGiver::Guardian as i32;
    guardian.guardian_ref = "Gulnara Bekova".into();
    let status = record(&app, guardian.clone(), &police()).await.unwrap_err();
    assert_eq!(bad_fields(&status), ["guardian_ref"]);
    assert!(!status.message().contains("Gulnara"));
    tables
        .assert_unchanged_since(&before, "consents without their attestation")
        .await;

    // Attested, both are recorded, the attestation and the child flag on the event.
    guardian.guardian_ref = "GRD-2026-0042".into();
    let by_guardian = record(&app, guardian, &police()).await.unwrap().consent_id;
    let event = recorded_event(&app, &by_guardian).await;
    assert!(event.child);
    let attestation = event.attestation.unwrap();
    assert_eq!(
        (
            attestation.attesting_officer.as_str(),
            attestation.guardian_ref.as_str()
        ),
        ("officer-17", "GRD-2026-0042")
    );
    decision.request_id = rid();
    decision.best_interests_decision_ref = "BID-2026-7".into();
    decision.best_interests_decided_by = "kg-gpo:prosecutor-3".into();
    let by_decision = record(&app, decision, &police()).await.unwrap().consent_id;
    let attestation = recorded_event(&app, &by_decision).await.attestation.unwrap();
    assert_eq!(attestation.best_interests_decision_ref, "BID-2026-7");
    assert_eq!(attestation.best_interests_decided_by, "kg-gpo:prosecutor-3");
    app.stop().await;
    id.stop().await;
}

fn referral_request(case_id: &str, person_id: &str, to: &str, consent_id: &str) -> pb::CreateReferralRequest {
    pb::CreateReferralRequest {
        request_id: rid(),
        person_id: person_id.to_owned(),
        case_id: case_id.to_owned(),
        receiving_agency: to.to_owned(),
        services: vec![pb::ServiceKind::Psychological as i32],
        urgency: pb::Urgency::Normal as i32,
        consent_id: consent_id.to_owned(),
        shelter_need: None,
    }
}

#[tokio::test]
async fn a_referrals_sender_is_never_its_receiver() {
    let id = TestApp::spawn().await;
    let app = ReferralApp::spawn_beside(&id).await;
    let (case_id, person_id) = reported(&id, &app, &police(), false).await;
    let to_msd = record(&app, consent_request(&case_id, &person_id, MSD), &police())
        .await
        .unwrap()
        .consent_id;
    let mut client = app.client.clone();
    let tables = app.tables();
    let before = tables.snapshot().await;
    let status = client
        .create_referral(authorized(
            referral_request(&case_id, &person_id, MVD, &to_msd),
            &police(),
        ))
        .await
        .unwrap_err();
    assert_eq!(precondition(&status), "SENDER_IS_RECEIVER");
    assert_refused(
        &tables,
        &before,
        "CreateReferral:refused",
        Some(&person_id),
        "a referral to its sender",
    )
    .await;

    // Declined by MSD, it is not sent back to its sender either.
    let referral = client
        .create_referral(authorized(
            referral_request(&case_id, &person_id, MSD, &to_msd),
            &police(),
        ))
        .await
        .unwrap()
        .into_inner();
    client
        .decline_referral(authorized(
            pb::DeclineReferralRequest {
                request_id: rid(),
                referral_id: referral.referral_id.clone(),
                expected_version: 1,
                reason: pb::DeclineReason::BetterProvider as i32,
            },
            &msd(),
        ))
        .await
        .unwrap();
    let before = tables.snapshot().await;
    let status = client
        .redirect_referral(authorized(
            pb::RedirectReferralRequest {
                request_id: rid(),
                referral_id: referral.referral_id.clone(),
                expected_version: 2,
                receiving_agency: MVD.into(),
                consent_id: to_msd.clone(),
            },
            &msd(),
        ))
        .await
        .unwrap_err();
    assert_eq!(precondition(&status), "SENDER_IS_RECEIVER");
    assert_refused(
        &tables,
        &before,
        "RedirectReferral:refused",
        Some(&referral.referral_id),
        "a redirection to the sender",
    )
    .await;
    app.stop().await;
    id.stop().await;
}

#[tokio::test]
async fn a_consent_is_withdrawn_by_its_recording_agency_or_the_coordinator_only() {
    let id = TestApp::spawn().await;
    let app = ReferralApp::spawn_beside(&id).await;
    let (case_id, person_id) = reported(&id, &app, &police(), false).await;
    let first = record(&app, consent_request(&case_id, &person_id, MSD), &police())
        .await
        .unwrap()
        .consent_id;
    let second = record(&app, consent_request(&case_id, &person_id, MOH), &police())
        .await
        .unwrap()
        .consent_id;
    let tables = app.tables();
    let before = tables.snapshot().await;
    let status = withdraw(&app, &first, &ngo()).await.unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied);
    let before = assert_refused(
        &tables,
        &before,
        "WithdrawConsent:denied",
        Some(&first),
        "a withdrawal by a third agency",
    )
    .await;
    let status = withdraw(&app, &first, &msd()).await.unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied);
    assert_refused(
        &tables,
        &before,
        "WithdrawConsent:denied",
        Some(""),
        "a withdrawal by the recipient",
    )
    .await;

    withdraw(&app, &first, &coordinator()).await.unwrap();
    withdraw(&app, &second, &police()).await.unwrap();
    let consents = list(&app, &person_id, &police()).await.unwrap();
    assert_eq!(consents.len(), 2);
    assert!(
        consents
            .iter()
            .all(|c| c.status == pb::ConsentStatus::Withdrawn as i32 && c.ended_at.is_some())
    );
    app.stop().await;
    id.stop().await;
}

/// Polls `check` every 100 ms until it holds.
///
/// # Panics
/// After `within`, naming `what`.
async fn eventually<F, Fut>(within: Duration, what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = Instant::now() + within;
    loop {
        if check().await {
            return;
        }
        assert!(Instant::now() < deadline, "{what}: not within {within:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn an_expiring_consent_ends_by_itself_as_a_withdrawal_does() {
    let id = TestApp::spawn().await;
    let app = ReferralApp::spawn_beside(&id).await;
    let (case_id, person_id) = reported(&id, &app, &police(), false).await;
    let mut request = consent_request(&case_id, &person_id, MSD);
    let expires = chrono::Utc::now().timestamp() + 8;
    request.expires_at = Some(prost_types::Timestamp {
        seconds: expires,
        nanos: 0,
    });
    let consent_id = record(&app, request, &police()).await.unwrap().consent_id;
    let mut client = app.client.clone();
    let referral = client
        .create_referral(authorized(
            referral_request(&case_id, &person_id, MSD, &consent_id),
            &police(),
        ))
        .await
        .unwrap()
        .into_inner();
    client
        .accept_referral(authorized(
            pb::AcceptReferralRequest {
                request_id: rid(),
                referral_id: referral.referral_id.clone(),
                expected_version: 1,
            },
            &msd(),
        ))
        .await
        .unwrap();
    let read = || {
        let mut identification = id.client.clone();
        let person_id = person_id.clone();
        async move {
            identification
                .get_personal_data(authorized(
                    idpb::GetPersonalDataRequest {
                        person_id,
                        purpose: "shelter intake".into(),
                        ..Default::default()
                    },
                    &msd(),
                ))
                .await
        }
    };
    // Before the expiry the MSD reads the consented identifiers.
    eventually(Duration::from_secs(6), "MSD reads under the consent", || async {
        read().await.is_ok()
    })
    .await;

    // At the expiry the timer ends the consent: a ConsentWithdrawn (EXPIRED),
    // the open referral cancelled in the same transaction.
    let get = || {
        let mut client = app.client.clone();
        let referral_id = referral.referral_id.clone();
        async move {
            client
                .get_referral(authorized(pb::GetReferralRequest { referral_id }, &police()))
                .await
                .unwrap()
                .into_inner()
        }
    };
    eventually(
        Duration::from_secs(20),
        "the referral under the expired consent ends",
        || async { get().await.status == pb::ReferralStatus::Cancelled as i32 },
    )
    .await;
    assert!(chrono::Utc::now().timestamp() >= expires, "never before the expiry");
    let payloads: Vec<Vec<u8>> =
        sqlx::query_scalar("SELECT payload FROM events WHERE event_type IN ('ConsentWithdrawn', 'ReferralCancelled') ORDER BY global_position")
            .fetch_all(&app.pool)
            .await
            .unwrap_or_default();
    let events: Vec<_> = payloads
        .iter()
        .filter_map(|p| {
            <pb::ReferralEvent as prost::Message>::decode(p.as_slice())
                .unwrap()
                .event
        })
        .collect();
    assert!(
        events
            .iter()
            .any(|e| matches!(e, pb::referral_event::Event::ConsentWithdrawn(w)
            if w.consent_id == consent_id && w.reason == pb::ConsentEndReason::Expired as i32)),
        "{events:?}"
    );
    assert!(
        events
            .iter()
            .any(|e| matches!(e, pb::referral_event::Event::ReferralCancelled(c)
            if c.referral_id == referral.referral_id && c.reason == "CONSENT_EXPIRED")),
        "{events:?}"
    );
    let transactions: i64 = sqlx::query_scalar(
        "SELECT count(DISTINCT xmin::text) FROM events WHERE event_type IN ('ConsentWithdrawn', 'ReferralCancelled')",
    )
    .fetch_one(&app.pool)
    .await
    .unwrap();
    assert_eq!(transactions, 1, "one transaction ends the consent and its referrals");
    // Audited as the system, under the person, in that same transaction.
    let person_uuid: uuid::Uuid = person_id.parse().unwrap();
    let audited: Vec<(String, String, String, String, Option<uuid::Uuid>)> = sqlx::query_as(
        "SELECT action, subject_id, agency, officer, person_id FROM audit_log
         WHERE action IN ('ConsentExpired', 'ReferralCancelled:consent_expired') ORDER BY seq",
    )
    .fetch_all(&app.pool)
    .await
    .unwrap();
    let system = |action: &str, subject: &str| {
        (
            action.to_owned(),
            subject.to_owned(),
            "system".to_owned(),
            "referral.consent_expires".to_owned(),
            Some(person_uuid),
        )
    };
    assert_eq!(
        audited,
        vec![
            system("ConsentExpired", &consent_id),
            system("ReferralCancelled:consent_expired", &referral.referral_id),
        ]
    );
    let audit_transactions: i64 = sqlx::query_scalar(
        "SELECT count(DISTINCT xmin::text) FROM (
             SELECT xmin FROM events WHERE event_type = 'ConsentWithdrawn'
             UNION ALL SELECT xmin FROM audit_log WHERE action = 'ConsentExpired') t",
    )
    .fetch_one(&app.pool)
    .await
    .unwrap();
    assert_eq!(audit_transactions, 1, "the audit entries are the timer's transaction's");

    // Identification learns it (as of a withdrawal) and the MSD reads no more.
    let consent_uuid: uuid::Uuid = consent_id.parse().unwrap();
    eventually(Duration::from_secs(10), "identification ends the access", || async {
        sqlx::query_scalar::<_, bool>("SELECT withdrawn FROM consents WHERE consent_id = $1")
            .bind(consent_uuid)
            .fetch_optional(&id.pool)
            .await
            .unwrap()
            == Some(true)
    })
    .await;
    let status = read().await.unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied);
    let consents = list(&app, &person_id, &police()).await.unwrap();
    assert_eq!(consents[0].status, pb::ConsentStatus::Expired as i32);
    // Nothing more rests on it.
    let status = client
        .create_referral(authorized(
            referral_request(&case_id, &person_id, MSD, &consent_id),
            &police(),
        ))
        .await
        .unwrap_err();
    assert_eq!(precondition(&status), "NO_CONSENT");
    app.stop().await;
    id.stop().await;
}

#[tokio::test]
async fn consents_recorded_before_issue_9_get_their_agency_and_expiry_at_start() {
    let id = TestApp::spawn().await;
    let app = ReferralApp::spawn_beside(&id).await;
    let (case_id, person_id) = reported(&id, &app, &police(), false).await;
    let at = |seconds| prost_types::Timestamp { seconds, nanos: 0 };
    let now = chrono::Utc::now().timestamp();
    let case = (case_id.as_str(), person_id.as_str());
    // Written as before issue 9, by the police: no recording agency on the
    // event or the row, no expiry on the row, no timer.
    let expiring = record_before_issue_9(&app, case, MSD, MVD, Some(at(now + 3))).await;
    let later = record_before_issue_9(&app, case, MOH, MVD, Some(at(now + 3600))).await;
    let open_ended = record_before_issue_9(&app, case, NGO, MVD, None).await;
    let referral = app
        .client
        .clone()
        .create_referral(authorized(
            referral_request(&case_id, &person_id, MSD, &expiring),
            &police(),
        ))
        .await
        .unwrap()
        .into_inner()
        .referral_id;

    // The service is down when the first one expires; it starts again after.
    let settings = app.halt().await;
    let wait = now + 4 - chrono::Utc::now().timestamp();
    tokio::time::sleep(Duration::from_secs(u64::try_from(wait).unwrap_or(0))).await;
    let app = ReferralApp::spawn_with(settings).await;

    let rows = |app: &ReferralApp| {
        let pool = app.pool.clone();
        async move {
            let rows: Vec<(uuid::Uuid, String, Option<chrono::DateTime<chrono::Utc>>)> =
                sqlx::query_as("SELECT consent_id, recording_agency, expires_at FROM consents ORDER BY consent_id")
                    .fetch_all(&pool)
                    .await
                    .unwrap();
            let timers: Vec<(
                String,
                chrono::DateTime<chrono::Utc>,
                Option<chrono::DateTime<chrono::Utc>>,
            )> = sqlx::query_as(
                "SELECT aggregate_id, due_at, fired_at FROM timers WHERE kind = 'referral.consent_expires'
                     ORDER BY aggregate_id",
            )
            .fetch_all(&pool)
            .await
            .unwrap();
            (rows, timers)
        }
    };
    let (consents, _) = rows(&app).await;
    let expected = |seconds| chrono::DateTime::from_timestamp(seconds, 0);
    assert_eq!(
        consents,
        vec![
            (expiring.parse().unwrap(), MVD.to_owned(), expected(now + 3)),
            (later.parse().unwrap(), MVD.to_owned(), expected(now + 3600)),
            (open_ended.parse().unwrap(), MVD.to_owned(), None),
        ],
        "the recording agency (the event's actor's) and the expiry, filled in"
    );

    // The one past its expiry ends at once, as its timer would have ended it.
    let get = || {
        let mut client = app.client.clone();
        let referral_id = referral.clone();
        async move {
            client
                .get_referral(authorized(pb::GetReferralRequest { referral_id }, &police()))
                .await
                .unwrap()
                .into_inner()
        }
    };
    eventually(
        Duration::from_secs(15),
        "the referral under the expired consent ends",
        || async { get().await.status == pb::ReferralStatus::Cancelled as i32 },
    )
    .await;
    let expired: i64 =
        sqlx::query_scalar("SELECT count(*) FROM audit_log WHERE action = 'ConsentExpired' AND subject_id = $1")
            .bind(&expiring)
            .fetch_one(&app.pool)
            .await
            .unwrap();
    assert_eq!(expired, 1, "ended on the timer's path, audited");
    let status_of =
        |consents: &[pb::ConsentView], id: &str| consents.iter().find(|c| c.consent_id == id).map(|c| c.status);
    let listed = list(&app, &person_id, &police()).await.unwrap();
    assert_eq!(status_of(&listed, &expiring), Some(pb::ConsentStatus::Expired as i32));
    assert_eq!(status_of(&listed, &later), Some(pb::ConsentStatus::Active as i32));
    assert!(listed.iter().all(|c| c.recorded_by_agency == MVD), "{listed:?}");

    // The later one has its timer, due at its expiry; the open-ended none.
    let (_, timers) = rows(&app).await;
    let pending: Vec<_> = timers.iter().filter(|(_, _, fired)| fired.is_none()).collect();
    assert_eq!(pending.len(), 1, "{timers:?}");
    assert_eq!(
        (pending[0].0.as_str(), Some(pending[0].1)),
        (later.as_str(), expected(now + 3600))
    );

    // Starting again changes nothing.
    let before = rows(&app).await;
    let app = app.restart().await;
    assert_eq!(rows(&app).await, before, "the upgrade is done once");

    // The recording agency withdraws an old consent; the recipient may not.
    let refused = withdraw(&app, &open_ended, &ngo()).await.unwrap_err();
    assert_eq!(refused.code(), Code::PermissionDenied);
    withdraw(&app, &open_ended, &police()).await.unwrap();
    withdraw(&app, &later, &police()).await.unwrap();
    let listed = list(&app, &person_id, &police()).await.unwrap();
    assert_eq!(
        status_of(&listed, &open_ended),
        Some(pb::ConsentStatus::Withdrawn as i32)
    );
    assert_eq!(status_of(&listed, &later), Some(pb::ConsentStatus::Withdrawn as i32));
    let withdrawals: Vec<(String, Option<uuid::Uuid>)> =
        sqlx::query_as("SELECT action, person_id FROM audit_log WHERE action LIKE 'WithdrawConsent%' ORDER BY seq")
            .fetch_all(&app.pool)
            .await
            .unwrap();
    let person = Some(person_id.parse::<uuid::Uuid>().unwrap());
    assert_eq!(
        withdrawals,
        vec![
            ("WithdrawConsent:denied".to_owned(), person),
            ("WithdrawConsent".to_owned(), person),
            ("WithdrawConsent".to_owned(), person),
        ],
        "listed under the person"
    );
    let (_, timers) = rows(&app).await;
    assert!(
        timers.iter().all(|(_, _, fired)| fired.is_some()),
        "the withdrawal cancels the timer: {timers:?}"
    );
    app.stop().await;
    id.stop().await;
}

#[tokio::test]
async fn a_withdrawal_beside_a_firing_expiry_takes_the_timer_row_first() {
    let id = TestApp::spawn().await;
    let app = ReferralApp::spawn_beside(&id).await;
    let (case_id, person_id) = reported(&id, &app, &police(), false).await;
    let mut request = consent_request(&case_id, &person_id, MSD);
    request.expires_at = Some(prost_types::Timestamp {
        seconds: chrono::Utc::now().timestamp() + 3600,
        nanos: 0,
    });
    let consent_id = record(&app, request, &police()).await.unwrap().consent_id;
    // Stand in for the expiry timer as it fires: its row locked, then the
    // consent's next version appended, in one transaction.
    let mut firing = app.pool.begin().await.unwrap();
    sqlx::query("SELECT id FROM timers WHERE kind = 'referral.consent_expires' AND aggregate_id = $1 FOR UPDATE")
        .bind(&consent_id)
        .fetch_one(&mut *firing)
        .await
        .unwrap();
    let withdrawal = tokio::spawn({
        let client = app.client.clone();
        let consent_id = consent_id.clone();
        async move {
            client
                .clone()
                .withdraw_consent(authorized(
                    pb::WithdrawConsentRequest {
                        request_id: rid(),
                        consent_id,
                    },
                    &police(),
                ))
                .await
        }
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    // The withdrawal waits for the timer row before it appends: the
    // timer's append goes through at once (no deadlock, no abort).
    sqlx::query("SET LOCAL lock_timeout = '3s'")
        .execute(&mut *firing)
        .await
        .unwrap();
    sqlx::query(
        "INSERT INTO events (event_id, stream_id, version, event_type, schema_version, payload, metadata)
         VALUES ($1, $2, 2, 'ConsentWithdrawn', 1, '', '{}')",
    )
    .bind(uuid::Uuid::now_v7())
    .bind(format!("consent-{consent_id}"))
    .execute(&mut *firing)
    .await
    .expect("the firing timer appends while the withdrawal waits for its row");
    assert!(!withdrawal.is_finished(), "the withdrawal waits for the timer row");
    // The timer's transaction goes back; the withdrawal then goes through.
    firing.rollback().await.unwrap();
    withdrawal.await.unwrap().expect("withdrawn");
    let listed = list(&app, &person_id, &police()).await.unwrap();
    assert_eq!(listed[0].status, pb::ConsentStatus::Withdrawn as i32);
    app.stop().await;
    id.stop().await;
}

#[tokio::test]
async fn the_agencies_holding_a_case_list_its_consents_and_no_one_else() {
    let id = TestApp::spawn().await;
    let app = ReferralApp::spawn_beside(&id).await;
    let (case_id, person_id) = reported(&id, &app, &police(), false).await;
    let consent_id = record(&app, consent_request(&case_id, &person_id, MSD), &police())
        .await
        .unwrap()
        .consent_id;
    let consents = list(&app, &person_id, &police()).await.unwrap();
    assert_eq!(consents.len(), 1);
    let view = &consents[0];
    assert_eq!(view.consent_id, consent_id);
    assert_eq!(view.recipient_agency, MSD);
    assert_eq!(view.purposes, [pb::ServiceKind::Psychological as i32]);
    assert_eq!(view.data_categories, [pb::DataCategory::Name as i32]);
    assert_eq!(view.recorded_by_agency, MVD);
    assert_eq!(view.attestation.as_ref().unwrap().attesting_officer, "officer-17");
    assert_eq!(view.status, pb::ConsentStatus::Active as i32);
    assert_eq!(list(&app, &person_id, &coordinator()).await.unwrap().len(), 1);

    let tables = app.tables();
    let before = tables.snapshot().await;
    let status = list(&app, &person_id, &other_ngo()).await.unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied);
    let before = assert_refused(
        &tables,
        &before,
        "ListConsents:denied",
        Some(&person_id),
        "a list by an agency that does not hold the case",
    )
    .await;
    let status = list(&app, &person_id, &msd()).await.unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied);
    assert_refused(
        &tables,
        &before,
        "ListConsents:denied",
        Some(""),
        "a list by the recipient",
    )
    .await;
    app.stop().await;
    id.stop().await;
}
