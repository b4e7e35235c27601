//! casepath's batched writes (one statement per kind of write per round,
//! the n-th write to a row in the n-th round) fed by the real services
//! with sequences whose order per row is not the order in which a round
//! runs its kinds: a referral declined, redirected to another agency and
//! accepted by it; an identification decided (not identified), reviewed
//! and decided again (identified); a bed held, the person admitted and
//! discharged; a person's identifiers erased (an erasure runs alone) between
//! the steps of another case, and a case reported for a third person after
//! it. The rows are checked field by field live, and again after the
//! streams are re-applied one commit at a time, as one batch per stream
//! and by a rebuild, whose digests must equal the live ones.

#![allow(clippy::unwrap_used)] // Test code: a failed unwrap is a failed test.

// Shared with casepath_ingest.rs, of which this test uses a part.
#[allow(dead_code)]
#[path = "../src/casepath_ingest.rs"]
mod casepath_ingest;

use casepath_ingest::{CasepathApp, Mechanism, as_, eventually, rid, uuid};
use chrono::{DateTime, Utc};
use nrm_e2e::ident::{erase, report_for};
use nrm_e2e::{authorized, person, report_request};
use nrm_kernel::auth::Role;
use nrm_proto::casepath::v1 as cp;
use nrm_proto::identification::v1 as id;
use nrm_proto::referral::v1 as rf;
use nrm_proto::shelter::v1 as sh;
use sqlx::Row as _;
use uuid::Uuid;

const POLICE: (&str, Role) = ("kg-mvd", Role::Police);
const NGO_REPORTER: (&str, Role) = ("kg-ngo-sezim", Role::Ngo);
const MSD: (&str, Role) = ("kg-msd", Role::Msd);
const MOH: (&str, Role) = ("kg-moh", Role::Moh);
const NGO: (&str, Role) = ("kg-ngo-tenir", Role::Ngo);
const SHELTER: (&str, Role) = ("kg-shelter-chui", Role::Shelter);
const COORDINATOR: (&str, Role) = ("kg-coordinator", Role::Coordinator);

/// What the sequences made.
struct Flow {
    /// Decided not identified, reviewed, decided identified.
    case_id: String,
    /// Declined by MoH, redirected to the NGO, accepted by it.
    redirected_id: String,
    /// The NGO's consent, under which the referral was redirected.
    ngo_consent_id: String,
    /// Held for the shelter referral, admitted, discharged.
    hold_id: String,
    /// The erased person's case, and its possible duplicate.
    erased_case_ids: [String; 2],
    /// A third person's case, reported after the erasure.
    later_case_id: String,
}

fn decide(case_id: &str, expected_version: u64, decision: id::Decision) -> id::DecideIdentificationRequest {
    id::DecideIdentificationRequest {
        request_id: rid(),
        case_id: case_id.to_owned(),
        expected_version,
        decision: decision as i32,
        reason: id::NotIdentifiedReason::InsufficientIndicators as i32,
        ..Default::default()
    }
}

/// Records a consent of the person's to `agency` (once the referral
/// service has learnt the person from identification's stream).
async fn consent(m: &Mechanism, case_id: &str, person_id: &str, agency: &str, purposes: &[rf::ServiceKind]) -> String {
    let request = rf::RecordConsentRequest {
        request_id: rid(),
        person_id: person_id.to_owned(),
        case_id: case_id.to_owned(),
        given_by: rf::ConsentGiver::Person as i32,
        recipient_agency: agency.to_owned(),
        purposes: purposes.iter().map(|p| *p as i32).collect(),
        data_categories: vec![rf::DataCategory::Name as i32],
        ..Default::default()
    };
    eventually("the referral service records the consent", || {
        let mut referral = m.referral.client.clone();
        let request = request.clone();
        async move { referral.record_consent(authorized(request, &as_(POLICE))).await }
    })
    .await
    .into_inner()
    .consent_id
}

#[allow(clippy::too_many_lines)]
async fn run_sequences(m: &Mechanism) -> Flow {
    let mut ident = m.identification.client.clone();

    // Person A: reported, screened, decided not identified.
    let a = ident
        .report_presumed_victim(authorized(
            report_request(&rid(), person("Aizada Batchova", "AB1100223", "+996 700 110 022")),
            &as_(POLICE),
        ))
        .await
        .unwrap()
        .into_inner();
    ident
        .complete_screening(authorized(
            id::CompleteScreeningRequest {
                request_id: rid(),
                case_id: a.case_id.clone(),
                expected_version: 1,
                indicators: vec![id::Indicator::DocumentsRetained as i32],
            },
            &as_(POLICE),
        ))
        .await
        .unwrap();
    ident
        .decide_identification(authorized(
            decide(&a.case_id, 2, id::Decision::NotIdentified),
            &as_(POLICE),
        ))
        .await
        .unwrap();

    // Person B, reported twice (the second a possible duplicate), then erased:
    // both cases go, between A's first decision and its review.
    let b = person("Bermet Erasedova", "BE5566778", "+996 555 667 788");
    let b_first = ident
        .report_presumed_victim(authorized(report_request(&rid(), b.clone()), &as_(POLICE)))
        .await
        .unwrap()
        .into_inner();
    let b_second = ident
        .report_presumed_victim(authorized(report_for(&rid(), b, POLICE.0), &as_(NGO_REPORTER)))
        .await
        .unwrap()
        .into_inner();
    ident
        .erase_personal_data(authorized(
            erase(&rid(), &b_first.case_id, id::ErasureReason::DataSubjectRequest),
            &as_(POLICE),
        ))
        .await
        .unwrap();

    // A's review, and the decision again: identified.
    ident
        .request_review(authorized(
            id::RequestReviewRequest {
                request_id: rid(),
                case_id: a.case_id.clone(),
                expected_version: 3,
                reason: id::ReviewReason::NewEvidence as i32,
            },
            &as_(POLICE),
        ))
        .await
        .unwrap();
    ident
        .decide_identification(authorized(
            decide(&a.case_id, 4, id::Decision::Identified),
            &as_(POLICE),
        ))
        .await
        .unwrap();

    // Person C, reported after the erasure.
    let later = ident
        .report_presumed_victim(authorized(
            report_request(&rid(), person("Cholpon Laterova", "CL9988776", "+996 777 998 877")),
            &as_(POLICE),
        ))
        .await
        .unwrap()
        .into_inner();

    // A shelter with a bed for A.
    let mut shelter = m.shelter.client.clone();
    let registered = shelter
        .register_shelter(authorized(
            sh::RegisterShelterRequest {
                request_id: rid(),
                code: "CHUI-BATCH-1".into(),
                region: "KG-C".into(),
                address: "Kant, Batch lane 1".into(),
                capacity: vec![sh::BedCapacity {
                    category: sh::BedCategory::Women as i32,
                    beds: 2,
                }],
                services: vec![sh::OnSiteService::Psychological as i32],
                wheelchair_accessible: true,
            },
            &as_(SHELTER),
        ))
        .await
        .unwrap()
        .into_inner();
    shelter
        .approve_shelter(authorized(
            sh::ApproveShelterRequest {
                request_id: rid(),
                shelter_id: registered.shelter_id.clone(),
                expected_version: 1,
            },
            &as_(COORDINATOR),
        ))
        .await
        .unwrap();

    // A's referral to MoH: declined, redirected to the NGO, accepted by it.
    let medical = [rf::ServiceKind::Medical];
    let moh_consent = consent(m, &a.case_id, &a.person_id, MOH.0, &medical).await;
    let ngo_consent_id = consent(m, &a.case_id, &a.person_id, NGO.0, &medical).await;
    let mut referral = m.referral.client.clone();
    let redirected = referral
        .create_referral(authorized(
            rf::CreateReferralRequest {
                request_id: rid(),
                person_id: a.person_id.clone(),
                case_id: a.case_id.clone(),
                receiving_agency: MOH.0.into(),
                services: vec![rf::ServiceKind::Medical as i32],
                urgency: rf::Urgency::Normal as i32,
                consent_id: moh_consent,
                shelter_need: None,
            },
            &as_(POLICE),
        ))
        .await
        .unwrap()
        .into_inner();
    referral
        .decline_referral(authorized(
            rf::DeclineReferralRequest {
                request_id: rid(),
                referral_id: redirected.referral_id.clone(),
                expected_version: 1,
                reason: rf::DeclineReason::NoCapacity as i32,
            },
            &as_(MOH),
        ))
        .await
        .unwrap();
    referral
        .redirect_referral(authorized(
            rf::RedirectReferralRequest {
                request_id: rid(),
                referral_id: redirected.referral_id.clone(),
                expected_version: 2,
                receiving_agency: NGO.0.into(),
                consent_id: ngo_consent_id.clone(),
            },
            &as_(MOH),
        ))
        .await
        .unwrap();
    referral
        .accept_referral(authorized(
            rf::AcceptReferralRequest {
                request_id: rid(),
                referral_id: redirected.referral_id.clone(),
                expected_version: 3,
            },
            &as_(NGO),
        ))
        .await
        .unwrap();

    // A's referral to MSD with a shelter need: accepted, a bed held (the
    // shelter service reacting), A admitted and discharged.
    let msd_consent = consent(m, &a.case_id, &a.person_id, MSD.0, &[rf::ServiceKind::Shelter]).await;
    let to_shelter = referral
        .create_referral(authorized(
            rf::CreateReferralRequest {
                request_id: rid(),
                person_id: a.person_id.clone(),
                case_id: a.case_id.clone(),
                receiving_agency: MSD.0.into(),
                services: vec![rf::ServiceKind::Shelter as i32],
                urgency: rf::Urgency::Urgent as i32,
                consent_id: msd_consent,
                shelter_need: Some(rf::ShelterNeed {
                    category: sh::BedCategory::Women as i32,
                    region: "KG-C".into(),
                }),
            },
            &as_(POLICE),
        ))
        .await
        .unwrap()
        .into_inner();
    referral
        .accept_referral(authorized(
            rf::AcceptReferralRequest {
                request_id: rid(),
                referral_id: to_shelter.referral_id.clone(),
                expected_version: 1,
            },
            &as_(MSD),
        ))
        .await
        .unwrap();
    let hold_id = eventually("a bed is held and recorded on the referral", || {
        let mut referral = referral.clone();
        let referral_id = to_shelter.referral_id.clone();
        async move {
            let r = referral
                .get_referral(authorized(rf::GetReferralRequest { referral_id }, &as_(MSD)))
                .await?
                .into_inner();
            if r.hold_id.is_empty() {
                Err(tonic::Status::not_found("no hold yet"))
            } else {
                Ok(r.hold_id)
            }
        }
    })
    .await;
    shelter
        .admit(authorized(
            sh::AdmitRequest {
                request_id: rid(),
                shelter_id: registered.shelter_id.clone(),
                hold_id: hold_id.clone(),
            },
            &as_(SHELTER),
        ))
        .await
        .unwrap();
    shelter
        .discharge(authorized(
            sh::DischargeRequest {
                request_id: rid(),
                shelter_id: registered.shelter_id.clone(),
                hold_id: hold_id.clone(),
            },
            &as_(SHELTER),
        ))
        .await
        .unwrap();

    Flow {
        case_id: a.case_id,
        redirected_id: redirected.referral_id,
        ngo_consent_id,
        hold_id,
        erased_case_ids: [b_first.case_id, b_second.case_id],
        later_case_id: later.case_id,
    }
}

/// The steps of `subject`: (kind, at), in the order they happened.
async fn steps_of(casepath: &CasepathApp, subject: &str) -> Vec<(cp::StepKind, DateTime<Utc>)> {
    sqlx::query("SELECT kind, at FROM cp_steps WHERE subject_id = $1 ORDER BY at, stream_sequence, position")
        .bind(uuid(subject))
        .fetch_all(&casepath.pool)
        .await
        .unwrap()
        .iter()
        .map(|r| (cp::StepKind::try_from(r.get::<i32, _>("kind")).unwrap(), r.get("at")))
        .collect()
}

fn kinds(steps: &[(cp::StepKind, DateTime<Utc>)]) -> Vec<cp::StepKind> {
    steps.iter().map(|s| s.0).collect()
}

/// The rows the sequences wrote are what the last step of each said
/// (`when` names the way they were written).
#[allow(clippy::too_many_lines)]
async fn assert_rows(casepath: &CasepathApp, flow: &Flow, when: &str) {
    // Decided twice, reviewed in between: the last decision stands.
    let case = sqlx::query(
        "SELECT status, decision, decided_at, decision_waiting_since, erased_at FROM cp_cases WHERE case_id = $1",
    )
    .bind(uuid(&flow.case_id))
    .fetch_one(&casepath.pool)
    .await
    .unwrap();
    let steps = steps_of(casepath, &flow.case_id).await;
    assert_eq!(
        kinds(&steps),
        [
            cp::StepKind::Found,
            cp::StepKind::Reported,
            cp::StepKind::Screened,
            cp::StepKind::NotIdentified,
            cp::StepKind::ReviewRequested,
            cp::StepKind::Identified
        ],
        "{when}: the case's steps"
    );
    assert_eq!(
        case.get::<i32, _>("status"),
        id::CaseStatus::Identified as i32,
        "{when}: the case's status"
    );
    assert_eq!(
        case.get::<i32, _>("decision"),
        id::Decision::Identified as i32,
        "{when}: the case's decision"
    );
    assert_eq!(
        case.get::<Option<DateTime<Utc>>, _>("decision_waiting_since"),
        None,
        "{when}: the case still waits for a decision"
    );
    let decided_at = case.get::<Option<DateTime<Utc>>, _>("decided_at");
    assert_eq!(
        decided_at,
        Some(steps[5].1),
        "{when}: decided_at is not the last decision's"
    );
    assert!(steps[3].1 < steps[5].1, "{when}: the two decisions at one time");
    assert_eq!(
        case.get::<Option<DateTime<Utc>>, _>("erased_at"),
        None,
        "{when}: another person's erasure reached the case"
    );

    // Declined, redirected, accepted by the new agency.
    let referral = sqlx::query(
        "SELECT receiving_agency, consent_id, status, waiting_since, answered_at, accepted_at, answer_due_at
         FROM cp_referrals WHERE referral_id = $1",
    )
    .bind(uuid(&flow.redirected_id))
    .fetch_one(&casepath.pool)
    .await
    .unwrap();
    let steps = steps_of(casepath, &flow.redirected_id).await;
    assert_eq!(
        kinds(&steps),
        [
            cp::StepKind::ReferralSent,
            cp::StepKind::ReferralDeclined,
            cp::StepKind::ReferralRedirected,
            cp::StepKind::ReferralAccepted
        ],
        "{when}: the referral's steps"
    );
    assert_eq!(
        referral.get::<String, _>("status"),
        "accepted",
        "{when}: the referral's status"
    );
    assert_eq!(
        referral.get::<String, _>("receiving_agency"),
        NGO.0,
        "{when}: the referral's receiving agency"
    );
    assert_eq!(
        referral.get::<Option<Uuid>, _>("consent_id"),
        Some(uuid(&flow.ngo_consent_id)),
        "{when}: the referral's consent"
    );
    assert_eq!(
        referral.get::<Option<DateTime<Utc>>, _>("waiting_since"),
        None,
        "{when}: the referral still waits for an answer"
    );
    assert_eq!(
        referral.get::<Option<DateTime<Utc>>, _>("accepted_at"),
        Some(steps[3].1),
        "{when}: the referral's accepted_at"
    );
    // The first answer was the decline.
    assert_eq!(
        referral.get::<Option<DateTime<Utc>>, _>("answered_at"),
        Some(steps[1].1),
        "{when}: the referral's answered_at"
    );
    assert!(
        referral.get::<Option<DateTime<Utc>>, _>("answer_due_at").is_some(),
        "{when}: the referral's answer_due_at"
    );

    // Held, admitted, discharged.
    let hold = sqlx::query("SELECT status, held_at, admitted_at, discharged_at FROM cp_holds WHERE hold_id = $1")
        .bind(uuid(&flow.hold_id))
        .fetch_one(&casepath.pool)
        .await
        .unwrap();
    let steps = steps_of(casepath, &flow.hold_id).await;
    assert_eq!(
        kinds(&steps),
        [cp::StepKind::BedHeld, cp::StepKind::Admitted, cp::StepKind::Discharged],
        "{when}: the hold's steps"
    );
    assert_eq!(
        hold.get::<String, _>("status"),
        "discharged",
        "{when}: the hold's status"
    );
    assert_eq!(hold.get::<DateTime<Utc>, _>("held_at"), steps[0].1, "{when}: held_at");
    assert_eq!(
        hold.get::<Option<DateTime<Utc>>, _>("admitted_at"),
        Some(steps[1].1),
        "{when}: the hold's admitted_at"
    );
    assert_eq!(
        hold.get::<Option<DateTime<Utc>>, _>("discharged_at"),
        Some(steps[2].1),
        "{when}: the hold's discharged_at"
    );

    // The erased person's cases (reported before): erased; the case reported
    // after the erasure: not.
    let mut erased_at = Vec::new();
    for case_id in &flow.erased_case_ids {
        let at: Option<DateTime<Utc>> = sqlx::query_scalar("SELECT erased_at FROM cp_cases WHERE case_id = $1")
            .bind(uuid(case_id))
            .fetch_one(&casepath.pool)
            .await
            .unwrap();
        let at = at.unwrap_or_else(|| panic!("{when}: the erased person's case {case_id} has no erased_at"));
        let steps = steps_of(casepath, case_id).await;
        assert_eq!(
            steps.last().map(|s| s.0),
            Some(cp::StepKind::PersonalDataErased),
            "{when}: the erased case's last step"
        );
        erased_at.push(at);
    }
    let later = sqlx::query("SELECT reported_at, erased_at FROM cp_cases WHERE case_id = $1")
        .bind(uuid(&flow.later_case_id))
        .fetch_one(&casepath.pool)
        .await
        .unwrap();
    assert!(
        erased_at
            .iter()
            .all(|at| *at < later.get::<DateTime<Utc>, _>("reported_at")),
        "{when}: the later case was reported before the erasure"
    );
    assert_eq!(
        later.get::<Option<DateTime<Utc>>, _>("erased_at"),
        None,
        "{when}: the case reported after the erasure is marked erased"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rows_writes_in_one_batch_land_in_stream_order_whatever_their_kind() {
    let m = Mechanism::start().await;
    let casepath = CasepathApp::spawn_beside(&m.base).await;
    let flow = run_sequences(&m).await;
    m.wait_published().await;
    casepath.wait_caught_up().await;
    assert_rows(&casepath, &flow, "live").await;

    let live = casepath.digests().await;
    casepath.reset_and_apply(false).await;
    assert_rows(&casepath, &flow, "one commit at a time").await;
    assert_eq!(casepath.digests().await, live, "one commit at a time differs from live");
    casepath.reset_and_apply(true).await;
    assert_rows(&casepath, &flow, "one batch per stream").await;
    assert_eq!(casepath.digests().await, live, "one batch per stream differs from live");
    casepath.rebuild().await;
    assert_rows(&casepath, &flow, "rebuilt").await;
    assert_eq!(casepath.digests().await, live, "a rebuild differs from live");

    casepath.stop().await;
    m.stop().await;
}
