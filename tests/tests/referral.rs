//! The referral service over gRPC, beside a real identification service,
//! against real NATS and PostgreSQL.

#![allow(clippy::unwrap_used)] // Test code: a failed unwrap is a failed test.

use std::time::Duration;

use nrm_e2e::consent::assert_refused;
use nrm_e2e::{ReferralApp, ShelterFeed, TestApp, authorized, bad_fields, person, report_request, token};
use nrm_kernel::auth::Role;
use nrm_proto::common::v1::CommandResult;
use nrm_proto::identification::v1 as idpb;
use nrm_proto::referral::v1 as pb;
use nrm_proto::shelter::v1 as shelter;
use tonic::Code;
use tonic_types::StatusExt as _;

const MVD: &str = "kg-mvd";
const MSD: &str = "kg-msd";
const MOH: &str = "kg-moh";
const NGO: &str = "kg-ngo-tenir";

fn police() -> String {
    token(MVD, Role::Police, "officer-17")
}

fn msd() -> String {
    token(MSD, Role::Msd, "social-worker-4")
}

fn moh() -> String {
    token(MOH, Role::Moh, "doctor-2")
}

fn ngo() -> String {
    token(NGO, Role::Ngo, "case-worker-9")
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

/// Reports a person (police), screens and decides; returns (case ID, person ID).
async fn identified_person(id: &TestApp, decision: Option<idpb::Decision>, child: bool) -> (String, String) {
    let mut client = id.client.clone();
    // Identifiers of a person of their own (the same identifiers twice would be flagged as a duplicate).
    let unique = uuid::Uuid::new_v4().simple().to_string()[..7].to_ascii_uppercase();
    let mut request = report_request(&rid(), person(&format!("Aigul {unique}"), &format!("AC{unique}"), ""));
    if child {
        request.child = true;
        request.age_years = Some(15);
    }
    let reported = client
        .report_presumed_victim(authorized(request, &police()))
        .await
        .unwrap()
        .into_inner();
    if let Some(decision) = decision {
        client
            .complete_screening(authorized(
                idpb::CompleteScreeningRequest {
                    request_id: rid(),
                    case_id: reported.case_id.clone(),
                    expected_version: 1,
                    indicators: vec![idpb::Indicator::DocumentsRetained as i32],
                },
                &police(),
            ))
            .await
            .unwrap();
        client
            .decide_identification(authorized(
                idpb::DecideIdentificationRequest {
                    request_id: rid(),
                    case_id: reported.case_id.clone(),
                    expected_version: 2,
                    decision: decision as i32,
                    reason: idpb::NotIdentifiedReason::InsufficientIndicators as i32,
                    non_punishment: decision == idpb::Decision::Identified,
                    best_interests_assessed: child,
                },
                &police(),
            ))
            .await
            .unwrap();
    }
    (reported.case_id, reported.person_id)
}

fn consent_request(
    case_id: &str,
    person_id: &str,
    agency: &str,
    purposes: &[pb::ServiceKind],
) -> pb::RecordConsentRequest {
    pb::RecordConsentRequest {
        request_id: rid(),
        person_id: person_id.to_owned(),
        case_id: case_id.to_owned(),
        given_by: pb::ConsentGiver::Person as i32,
        recipient_agency: agency.to_owned(),
        purposes: purposes.iter().map(|p| *p as i32).collect(),
        data_categories: vec![pb::DataCategory::Name as i32],
        ..Default::default()
    }
}

async fn consent(
    app: &ReferralApp,
    case_id: &str,
    person_id: &str,
    agency: &str,
    purposes: &[pb::ServiceKind],
) -> String {
    app.client
        .clone()
        .record_consent(authorized(
            consent_request(case_id, person_id, agency, purposes),
            &police(),
        ))
        .await
        .unwrap()
        .into_inner()
        .consent_id
}

fn referral_request(
    case_id: &str,
    person_id: &str,
    agency: &str,
    services: &[pb::ServiceKind],
    urgency: pb::Urgency,
    consent_id: &str,
) -> pb::CreateReferralRequest {
    let shelter_need = services.contains(&pb::ServiceKind::Shelter).then(|| pb::ShelterNeed {
        category: shelter::BedCategory::Women as i32,
        region: "KG-C".into(),
    });
    pb::CreateReferralRequest {
        request_id: rid(),
        person_id: person_id.to_owned(),
        case_id: case_id.to_owned(),
        receiving_agency: agency.to_owned(),
        services: services.iter().map(|s| *s as i32).collect(),
        urgency: urgency as i32,
        consent_id: consent_id.to_owned(),
        shelter_need,
    }
}

async fn refer(app: &ReferralApp, request: pb::CreateReferralRequest) -> pb::CreateReferralResponse {
    app.client
        .clone()
        .create_referral(authorized(request, &police()))
        .await
        .unwrap()
        .into_inner()
}

async fn get(app: &ReferralApp, referral_id: &str, token: &str) -> Result<pb::Referral, tonic::Status> {
    app.client
        .clone()
        .get_referral(authorized(
            pb::GetReferralRequest {
                referral_id: referral_id.to_owned(),
            },
            token,
        ))
        .await
        .map(tonic::Response::into_inner)
}

fn accept(referral_id: &str, version: u64) -> pb::AcceptReferralRequest {
    pb::AcceptReferralRequest {
        request_id: rid(),
        referral_id: referral_id.to_owned(),
        expected_version: version,
    }
}

fn decline(referral_id: &str, version: u64) -> pb::DeclineReferralRequest {
    pb::DeclineReferralRequest {
        request_id: rid(),
        referral_id: referral_id.to_owned(),
        expected_version: version,
        reason: pb::DeclineReason::NoCapacity as i32,
    }
}

async fn inbox(app: &ReferralApp, token: &str, request: pb::ListInboxRequest) -> pb::ListInboxResponse {
    app.client
        .clone()
        .list_inbox(authorized(request, token))
        .await
        .unwrap()
        .into_inner()
}

/// Polls the inbox until `done` holds (the inbox is a projection, a little behind).
async fn wait_for_inbox(
    app: &ReferralApp,
    token: &str,
    request: pb::ListInboxRequest,
    done: impl Fn(&[pb::Referral]) -> bool,
) -> Vec<pb::Referral> {
    for _ in 0..200 {
        let page = inbox(app, token, request.clone()).await;
        if done(&page.referrals) {
            return page.referrals;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("the inbox did not reach the expected state within 10 s");
}

/// Polls a referral until `done` holds.
async fn wait_for_referral(app: &ReferralApp, referral_id: &str, done: impl Fn(&pb::Referral) -> bool) -> pb::Referral {
    for _ in 0..200 {
        let referral = get(app, referral_id, &coordinator()).await.unwrap();
        if done(&referral) {
            return referral;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("referral {referral_id} did not reach the expected state within 10 s");
}

#[tokio::test]
async fn a_person_is_referred_accepted_declined_redirected_served_and_closed_with_a_plan() {
    let id = TestApp::spawn().await;
    let app = ReferralApp::spawn_beside(&id).await;
    let (case_id, person_id) = identified_person(&id, Some(idpb::Decision::Identified), false).await;
    app.wait_for_person(&person_id, idpb::CaseStatus::Identified as i32)
        .await;

    let to_msd = consent(
        &app,
        &case_id,
        &person_id,
        MSD,
        &[
            pb::ServiceKind::Shelter,
            pb::ServiceKind::Psychological,
            pb::ServiceKind::Legal,
        ],
    )
    .await;
    let to_moh = consent(&app, &case_id, &person_id, MOH, &[pb::ServiceKind::Medical]).await;
    let to_ngo = consent(&app, &case_id, &person_id, NGO, &[pb::ServiceKind::Medical]).await;

    let before = chrono::Utc::now().timestamp();
    let shelter_referral = refer(
        &app,
        referral_request(
            &case_id,
            &person_id,
            MSD,
            &[pb::ServiceKind::Shelter, pb::ServiceKind::Psychological],
            pb::Urgency::Urgent,
            &to_msd,
        ),
    )
    .await;
    let due = shelter_referral.answer_due_at.unwrap().seconds;
    assert!((before + 86_400..=before + 86_402).contains(&due), "urgent: 24 h");
    let medical = refer(
        &app,
        referral_request(
            &case_id,
            &person_id,
            MOH,
            &[pb::ServiceKind::Medical],
            pb::Urgency::Normal,
            &to_moh,
        ),
    )
    .await;
    assert!(
        medical.answer_due_at.unwrap().seconds >= before + 259_200,
        "normal: 72 h"
    );

    // MSD accepts; a retry of the same request answers the same, replayed.
    let mut client = app.client.clone();
    let acceptance = accept(&shelter_referral.referral_id, 1);
    let accepted = client
        .accept_referral(authorized(acceptance.clone(), &msd()))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(accepted.version, 2);
    let again = client
        .accept_referral(authorized(acceptance, &msd()))
        .await
        .unwrap()
        .into_inner();
    assert!(again.replayed);
    assert_eq!(again.event_ids, accepted.event_ids);

    // MoH declines with a reason and sends it on to an NGO, under the NGO's consent.
    client
        .decline_referral(authorized(decline(&medical.referral_id, 1), &moh()))
        .await
        .unwrap();
    let declined = get(&app, &medical.referral_id, &police()).await.unwrap();
    assert_eq!(declined.status, pb::ReferralStatus::Declined as i32);
    assert_eq!(declined.decline_reason, pb::DeclineReason::NoCapacity as i32);
    let redirected = client
        .redirect_referral(authorized(
            pb::RedirectReferralRequest {
                request_id: rid(),
                referral_id: medical.referral_id.clone(),
                expected_version: 2,
                receiving_agency: NGO.into(),
                consent_id: to_ngo.clone(),
            },
            &moh(),
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(redirected.version, 3);
    let view = get(&app, &medical.referral_id, &ngo()).await.unwrap();
    assert_eq!(view.status, pb::ReferralStatus::Redirected as i32);
    assert_eq!(
        (view.receiving_agency.as_str(), view.consent_id.as_str()),
        (NGO, to_ngo.as_str())
    );
    assert!(view.answer_due_at.unwrap().seconds > due, "a new answer deadline");
    // MoH is no longer party to it.
    assert_eq!(
        get(&app, &medical.referral_id, &moh()).await.unwrap_err().code(),
        Code::PermissionDenied
    );
    client
        .accept_referral(authorized(accept(&medical.referral_id, 3), &ngo()))
        .await
        .unwrap();

    // The rehabilitation plan, kept by MSD while it has the accepted referral
    // under an active consent: a goal, a follow-up, met (once).
    let goal = client
        .add_plan_goal(authorized(
            pb::AddPlanGoalRequest {
                request_id: rid(),
                person_id: person_id.clone(),
                kind: pb::GoalKind::Housing as i32,
                due_at: Some(prost_types::Timestamp {
                    seconds: chrono::Utc::now().timestamp() + 90 * 86_400,
                    nanos: 0,
                }),
            },
            &msd(),
        ))
        .await
        .unwrap()
        .into_inner();
    client
        .record_follow_up(authorized(
            pb::RecordFollowUpRequest {
                request_id: rid(),
                person_id: person_id.clone(),
                goal_id: goal.goal_id.clone(),
                followed_up_at: Some(prost_types::Timestamp {
                    seconds: chrono::Utc::now().timestamp(),
                    nanos: 0,
                }),
                status_code: "ON_TRACK".into(),
            },
            &msd(),
        ))
        .await
        .unwrap();
    let met = |request_id: String| pb::MarkGoalMetRequest {
        request_id,
        person_id: person_id.clone(),
        goal_id: goal.goal_id.clone(),
    };
    client.mark_goal_met(authorized(met(rid()), &msd())).await.unwrap();
    let tables = app.tables();
    let before = tables.snapshot().await;
    let twice = client.mark_goal_met(authorized(met(rid()), &msd())).await.unwrap_err();
    assert_eq!(precondition(&twice), "GOAL_ALREADY_MET");
    assert_refused(
        &tables,
        &before,
        "MarkGoalMet:refused",
        Some(&person_id),
        "marking a goal met twice",
    )
    .await;
    let plan = client
        .get_plan(authorized(
            pb::GetPlanRequest {
                person_id: person_id.clone(),
            },
            &coordinator(),
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(plan.version, 3);
    assert!(plan.goals[0].met);
    assert_eq!(plan.goals[0].follow_ups.len(), 1);
    assert!(plan.goals[0].follow_ups[0].ends_with(" ON_TRACK"));
    let status = client
        .get_plan(authorized(
            pb::GetPlanRequest {
                person_id: person_id.clone(),
            },
            &police(),
        ))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied);
    // Nor may MoH, which has no accepted referral for the person.
    let status = client
        .get_plan(authorized(
            pb::GetPlanRequest {
                person_id: person_id.clone(),
            },
            &moh(),
        ))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied);

    // MSD delivers a service and closes with an outcome.
    client
        .record_service_delivered(authorized(
            pb::RecordServiceDeliveredRequest {
                request_id: rid(),
                referral_id: shelter_referral.referral_id.clone(),
                expected_version: 2,
                kind: pb::ServiceKind::Psychological as i32,
                delivered_at: Some(prost_types::Timestamp {
                    seconds: chrono::Utc::now().timestamp() - 60,
                    nanos: 0,
                }),
                provider: "MSD-PSY-BISHKEK".into(),
            },
            &msd(),
        ))
        .await
        .unwrap();
    client
        .close_referral(authorized(
            pb::CloseReferralRequest {
                request_id: rid(),
                referral_id: shelter_referral.referral_id.clone(),
                expected_version: 3,
                outcome: pb::ReferralOutcome::ServicesCompleted as i32,
            },
            &msd(),
        ))
        .await
        .unwrap();
    let closed = get(&app, &shelter_referral.referral_id, &msd()).await.unwrap();
    assert_eq!(closed.status, pb::ReferralStatus::Closed as i32);
    assert_eq!(closed.services_delivered, [pb::ServiceKind::Psychological as i32]);
    assert_eq!(closed.outcome, pb::ReferralOutcome::ServicesCompleted as i32);
    assert_eq!(closed.referring_agency, MVD);
    assert_eq!(closed.version, 4);
    // Another agency may not read it.
    assert_eq!(
        get(&app, &shelter_referral.referral_id, &moh())
            .await
            .unwrap_err()
            .code(),
        Code::PermissionDenied
    );

    // The inboxes: MSD sees its closed referral, the NGO the redirected one.
    let msd_inbox = wait_for_inbox(&app, &msd(), pb::ListInboxRequest::default(), |r| {
        r.len() == 1 && r[0].status == pb::ReferralStatus::Closed as i32
    })
    .await;
    assert_eq!(msd_inbox[0].referral_id, shelter_referral.referral_id);
    let ngo_inbox = wait_for_inbox(&app, &ngo(), pb::ListInboxRequest::default(), |r| {
        r.len() == 1 && r[0].status == pb::ReferralStatus::Accepted as i32
    })
    .await;
    assert_eq!(ngo_inbox[0].referral_id, medical.referral_id);
    assert!(
        inbox(&app, &moh(), pb::ListInboxRequest::default())
            .await
            .referrals
            .is_empty()
    );

    // Every commit reached NATS; the acceptance carries the shelter need for the shelter service.
    let stream = app.stream_name("referral");
    let mut messages = Vec::new();
    for _ in 0..200 {
        messages = nrm_e2e::messages(&app.jetstream, &stream).await;
        if messages.len() >= 14 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // 3 consents, 2 referrals, accept, decline, redirect, accept, delivered, closed, goal, follow-up, met.
    assert_eq!(messages.len(), 14);
    let acceptance = messages
        .iter()
        .map(|m| <nrm_proto::common::v1::EventCommit as prost::Message>::decode(m.payload.as_ref()).unwrap())
        .find(|c| c.events[0].event_type == "ReferralAccepted")
        .unwrap();
    let event = <pb::ReferralEvent as prost::Message>::decode(acceptance.events[0].payload.as_slice()).unwrap();
    let Some(pb::referral_event::Event::ReferralAccepted(accepted)) = event.event else {
        panic!("expected ReferralAccepted");
    };
    assert_eq!(accepted.shelter_need.unwrap().region, "KG-C");

    // Every consent, referral and plan call lists under the person
    // (`nrmctl audit person`); only the inbox, of many persons, names none,
    // and a role the gate refuses before the request is read (police and
    // MoH asking for the plan).
    let person: uuid::Uuid = person_id.parse().unwrap();
    let unlisted: Vec<String> = sqlx::query_scalar(
        "SELECT DISTINCT action FROM audit_log
         WHERE person_id IS DISTINCT FROM $1 AND action NOT LIKE 'ListInbox%'
           AND NOT (action = 'GetPlan:denied' AND agency IN ($2, $3)) ORDER BY action",
    )
    .bind(person)
    .bind(MVD)
    .bind(MOH)
    .fetch_all(&app.pool)
    .await
    .unwrap();
    assert!(unlisted.is_empty(), "audited without the person: {unlisted:?}");
    let listed: Vec<String> =
        sqlx::query_scalar("SELECT DISTINCT action FROM audit_log WHERE person_id = $1 ORDER BY action")
            .bind(person)
            .fetch_all(&app.pool)
            .await
            .unwrap();
    for action in [
        "RecordConsent",
        "CreateReferral",
        "AcceptReferral",
        "CloseReferral",
        "DeclineReferral",
        "RedirectReferral",
        "RecordServiceDelivered",
        "AddPlanGoal",
        "RecordFollowUp",
        "MarkGoalMet",
        "MarkGoalMet:refused",
        "GetReferral:denied",
    ] {
        assert!(
            listed.iter().any(|a| a == action),
            "{action} not under the person: {listed:?}"
        );
    }
    app.stop().await;
    id.stop().await;
}

#[tokio::test]
async fn refused_referrals_answer_with_a_clear_reason_and_write_nothing() {
    let id = TestApp::spawn().await;
    let app = ReferralApp::spawn_beside(&id).await;
    let (case_id, person_id) = identified_person(&id, None, false).await;
    let (rejected_case, rejected_person) = identified_person(&id, Some(idpb::Decision::NotIdentified), false).await;
    let (child_case, child_person) = identified_person(&id, None, true).await;
    // Assistance does not wait for formal identification: a reported person can be referred.
    app.wait_for_person(&person_id, idpb::CaseStatus::Reported as i32).await;
    app.wait_for_person(&rejected_person, idpb::CaseStatus::NotIdentified as i32)
        .await;
    app.wait_for_person(&child_person, idpb::CaseStatus::Presumed as i32)
        .await;
    let to_msd = consent(&app, &case_id, &person_id, MSD, &[pb::ServiceKind::Psychological]).await;
    let rejected_to_msd = consent(
        &app,
        &rejected_case,
        &rejected_person,
        MSD,
        &[pb::ServiceKind::Psychological],
    )
    .await;
    let referral = refer(
        &app,
        referral_request(
            &case_id,
            &person_id,
            MSD,
            &[pb::ServiceKind::Psychological],
            pb::Urgency::Normal,
            &to_msd,
        ),
    )
    .await;
    let mut client = app.client.clone();
    client
        .decline_referral(authorized(decline(&referral.referral_id, 1), &msd()))
        .await
        .unwrap();
    let tables = app.tables();
    let mut before = tables.snapshot().await;

    // Accept after decline.
    let status = client
        .accept_referral(authorized(accept(&referral.referral_id, 2), &msd()))
        .await
        .unwrap_err();
    assert_eq!(precondition(&status), "NOT_AWAITING_ANSWER");
    before = assert_refused(
        &tables,
        &before,
        "AcceptReferral:refused",
        Some(&referral.referral_id),
        "accepting a declined referral",
    )
    .await;
    // A referral to an agency the consent does not name.
    let status = client
        .create_referral(authorized(
            referral_request(
                &case_id,
                &person_id,
                MOH,
                &[pb::ServiceKind::Psychological],
                pb::Urgency::Normal,
                &to_msd,
            ),
            &police(),
        ))
        .await
        .unwrap_err();
    assert_eq!(precondition(&status), "NO_CONSENT");
    before = assert_refused(
        &tables,
        &before,
        "CreateReferral:refused",
        Some(&person_id),
        "a referral to an agency the consent does not name",
    )
    .await;
    // A service the consent does not cover.
    let status = client
        .create_referral(authorized(
            referral_request(
                &case_id,
                &person_id,
                MSD,
                &[pb::ServiceKind::Legal],
                pb::Urgency::Normal,
                &to_msd,
            ),
            &police(),
        ))
        .await
        .unwrap_err();
    assert_eq!(precondition(&status), "NO_CONSENT");
    before = assert_refused(
        &tables,
        &before,
        "CreateReferral:refused",
        Some(&person_id),
        "a referral for a service the consent does not cover",
    )
    .await;
    // An unknown person.
    let status = client
        .create_referral(authorized(
            referral_request(
                &rid(),
                &rid(),
                MSD,
                &[pb::ServiceKind::Psychological],
                pb::Urgency::Normal,
                &to_msd,
            ),
            &police(),
        ))
        .await
        .unwrap_err();
    assert_eq!(precondition(&status), "UNKNOWN_PERSON");
    before = assert_refused(
        &tables,
        &before,
        "CreateReferral:refused",
        None,
        "a referral of an unknown person",
    )
    .await;
    // A person found not identified (the default policy refuses).
    let status = client
        .create_referral(authorized(
            referral_request(
                &rejected_case,
                &rejected_person,
                MSD,
                &[pb::ServiceKind::Psychological],
                pb::Urgency::Normal,
                &rejected_to_msd,
            ),
            &police(),
        ))
        .await
        .unwrap_err();
    assert_eq!(precondition(&status), "NOT_IDENTIFIED");
    before = assert_refused(
        &tables,
        &before,
        "CreateReferral:refused",
        Some(&rejected_person),
        "a referral of a person found not identified",
    )
    .await;
    // A child's own consent (identification knows the person is a child).
    let status = client
        .record_consent(authorized(
            consent_request(&child_case, &child_person, MSD, &[pb::ServiceKind::Shelter]),
            &police(),
        ))
        .await
        .unwrap_err();
    assert_eq!(precondition(&status), "CHILD_NEEDS_GUARDIAN");
    before = assert_refused(
        &tables,
        &before,
        "RecordConsent:refused",
        Some(&child_person),
        "a child's own consent",
    )
    .await;
    // The wrong agency, a stale version, an unknown referral, an unknown consent, bad fields.
    let status = client
        .decline_referral(authorized(decline(&referral.referral_id, 2), &moh()))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied);
    before = assert_refused(
        &tables,
        &before,
        "DeclineReferral:denied",
        Some(&referral.referral_id),
        "a decline by an agency the referral is not for",
    )
    .await;
    let status = client
        .accept_referral(authorized(accept(&referral.referral_id, 1), &msd()))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Aborted);
    tables
        .assert_unchanged_since(&before, "an acceptance at a stale expected version")
        .await;
    let status = client
        .accept_referral(authorized(accept(&rid(), 1), &msd()))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::NotFound);
    tables
        .assert_unchanged_since(&before, "accepting an unknown referral")
        .await;
    let status = client
        .withdraw_consent(authorized(
            pb::WithdrawConsentRequest {
                request_id: rid(),
                consent_id: rid(),
            },
            &police(),
        ))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::NotFound);
    tables
        .assert_unchanged_since(&before, "withdrawing an unknown consent")
        .await;
    let mut bad = referral_request(
        "case",
        &person_id,
        "kg msd",
        &[pb::ServiceKind::Shelter],
        pb::Urgency::Unspecified,
        &to_msd,
    );
    bad.shelter_need = None;
    bad.request_id = String::new();
    let status = client.create_referral(authorized(bad, &police())).await.unwrap_err();
    assert_eq!(
        bad_fields(&status),
        ["request_id", "case_id", "receiving_agency", "urgency", "shelter_need"]
    );
    tables.assert_unchanged_since(&before, "an invalid referral").await;
    let status = client
        .record_follow_up(authorized(
            pb::RecordFollowUpRequest {
                request_id: rid(),
                person_id: person_id.clone(),
                goal_id: rid(),
                followed_up_at: None,
                status_code: "on track".into(),
            },
            &msd(),
        ))
        .await
        .unwrap_err();
    assert_eq!(bad_fields(&status), ["followed_up_at", "status_code"]);
    tables.assert_unchanged_since(&before, "an invalid follow-up").await;
    // A role that may not refer.
    let status = client
        .create_referral(authorized(
            referral_request(
                &case_id,
                &person_id,
                MSD,
                &[pb::ServiceKind::Psychological],
                pb::Urgency::Normal,
                &to_msd,
            ),
            &token("kg-shelter-1", Role::Shelter, "operator-1"),
        ))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied);
    assert_refused(
        &tables,
        &before,
        "CreateReferral:denied",
        Some(""),
        "a referral by a role that may not refer",
    )
    .await;
    app.stop().await;
    id.stop().await;
}

#[tokio::test]
async fn a_not_identified_person_is_referred_when_policy_allows() {
    let id = TestApp::spawn().await;
    let mut settings = nrm_e2e::referral_settings(&id.settings);
    settings.referral.allow_not_identified = true;
    let app = ReferralApp::spawn_with(settings).await;
    let (case_id, person_id) = identified_person(&id, Some(idpb::Decision::NotIdentified), false).await;
    app.wait_for_person(&person_id, idpb::CaseStatus::NotIdentified as i32)
        .await;
    let to_msd = consent(&app, &case_id, &person_id, MSD, &[pb::ServiceKind::Legal]).await;
    let created = refer(
        &app,
        referral_request(
            &case_id,
            &person_id,
            MSD,
            &[pb::ServiceKind::Legal],
            pb::Urgency::Normal,
            &to_msd,
        ),
    )
    .await;
    assert_eq!(created.result.unwrap().version, 1);
    app.stop().await;
    id.stop().await;
}

async fn overdue_events(app: &ReferralApp, referral_id: &str) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM events WHERE stream_id = $1 AND event_type = 'ReferralOverdue'")
        .bind(format!("referral-{referral_id}"))
        .fetch_one(&app.pool)
        .await
        .unwrap()
}

#[tokio::test]
async fn an_unanswered_referral_is_escalated_once_even_across_a_restart() {
    let id = TestApp::spawn().await;
    let mut settings = nrm_e2e::referral_settings(&id.settings);
    settings.referral.urgent_deadline_seconds = 2;
    let app = ReferralApp::spawn_with(settings).await;
    let (case_id, person_id) = identified_person(&id, Some(idpb::Decision::Identified), false).await;
    app.wait_for_person(&person_id, idpb::CaseStatus::Identified as i32)
        .await;
    let to_msd = consent(&app, &case_id, &person_id, MSD, &[pb::ServiceKind::Psychological]).await;
    let urgent = || {
        referral_request(
            &case_id,
            &person_id,
            MSD,
            &[pb::ServiceKind::Psychological],
            pb::Urgency::Urgent,
            &to_msd,
        )
    };
    let waiting = refer(&app, urgent()).await;
    let answered = refer(&app, urgent()).await;
    app.client
        .clone()
        .accept_referral(authorized(accept(&answered.referral_id, 1), &msd()))
        .await
        .unwrap();

    // The service stops while the deadline passes, and starts again on the same database.
    let due = waiting.answer_due_at.unwrap().seconds;
    let settings = app.halt().await;
    while chrono::Utc::now().timestamp() <= due {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let app = ReferralApp::spawn_with(settings).await;
    let overdue = wait_for_referral(&app, &waiting.referral_id, |r| r.overdue).await;
    assert_eq!(overdue.status, pb::ReferralStatus::Pending as i32);
    let overdue_only = || pb::ListInboxRequest {
        overdue_only: true,
        ..Default::default()
    };
    let escalated = wait_for_inbox(&app, &coordinator(), overdue_only(), |r| !r.is_empty()).await;
    assert_eq!(escalated.len(), 1, "only the unanswered referral is escalated");
    assert_eq!(escalated[0].referral_id, waiting.referral_id);
    let msd_overdue = wait_for_inbox(
        &app,
        &msd(),
        pb::ListInboxRequest {
            overdue_only: true,
            ..Default::default()
        },
        |r| r.len() == 1,
    )
    .await;
    assert_eq!(msd_overdue[0].referral_id, waiting.referral_id);

    // A deadline passing while the service runs fires too.
    let later = refer(&app, urgent()).await;
    wait_for_referral(&app, &later.referral_id, |r| r.overdue).await;

    // Restarted again: nothing fires twice. No timer is left unfired (none
    // could fire again), and once the restarted service is quiescent every
    // table is as before the restart.
    let unfired = |app: &ReferralApp| {
        let pool = app.pool.clone();
        async move {
            sqlx::query_scalar::<_, i64>("SELECT count(*) FROM timers WHERE fired_at IS NULL")
                .fetch_one(&pool)
                .await
                .unwrap()
        }
    };
    let before = app.tables().snapshot().await;
    assert_eq!(unfired(&app).await, 0);
    let app = app.restart().await;
    app.tables()
        .assert_unchanged_since(&before, "a restart after every deadline fired")
        .await;
    assert_eq!(overdue_events(&app, &waiting.referral_id).await, 1);
    assert_eq!(overdue_events(&app, &later.referral_id).await, 1);
    assert_eq!(overdue_events(&app, &answered.referral_id).await, 0);
    assert_eq!(app.count_events(Some("ReferralOverdue")).await, 2);
    assert_eq!(unfired(&app).await, 0);
    app.stop().await;
    id.stop().await;
}

#[tokio::test]
async fn withdrawing_consent_cancels_open_referrals_in_the_same_transaction_and_refuses_new_ones() {
    let id = TestApp::spawn().await;
    let app = ReferralApp::spawn_beside(&id).await;
    let (case_id, person_id) = identified_person(&id, Some(idpb::Decision::Identified), false).await;
    app.wait_for_person(&person_id, idpb::CaseStatus::Identified as i32)
        .await;
    let services = [pb::ServiceKind::Psychological, pb::ServiceKind::Legal];
    let to_msd = consent(&app, &case_id, &person_id, MSD, &services).await;
    let request = || referral_request(&case_id, &person_id, MSD, &services, pb::Urgency::Normal, &to_msd);
    let pending = refer(&app, request()).await;
    let accepted = refer(&app, request()).await;
    let declined = refer(&app, request()).await;
    let mut client = app.client.clone();
    client
        .accept_referral(authorized(accept(&accepted.referral_id, 1), &msd()))
        .await
        .unwrap();
    client
        .decline_referral(authorized(decline(&declined.referral_id, 1), &msd()))
        .await
        .unwrap();

    let withdrawal = pb::WithdrawConsentRequest {
        request_id: rid(),
        consent_id: to_msd.clone(),
    };
    let result: CommandResult = client
        .withdraw_consent(authorized(withdrawal.clone(), &police()))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(result.event_ids.len(), 3, "the withdrawal and two cancellations");
    for referral_id in [&pending.referral_id, &accepted.referral_id] {
        assert_eq!(
            get(&app, referral_id, &police()).await.unwrap().status,
            pb::ReferralStatus::Cancelled as i32
        );
    }
    assert_eq!(
        get(&app, &declined.referral_id, &police()).await.unwrap().status,
        pb::ReferralStatus::Declined as i32
    );
    // One transaction wrote them all.
    let transactions: i64 = sqlx::query_scalar(
        "SELECT count(DISTINCT xmin::text) FROM events WHERE event_type IN ('ConsentWithdrawn', 'ReferralCancelled')",
    )
    .fetch_one(&app.pool)
    .await
    .unwrap();
    assert_eq!(transactions, 1);
    let reason: Vec<u8> =
        sqlx::query_scalar("SELECT payload FROM events WHERE event_type = 'ReferralCancelled' LIMIT 1")
            .fetch_one(&app.pool)
            .await
            .unwrap();
    let event = <pb::ReferralEvent as prost::Message>::decode(reason.as_slice()).unwrap();
    assert!(
        matches!(event.event, Some(pb::referral_event::Event::ReferralCancelled(c)) if c.reason == "CONSENT_WITHDRAWN")
    );
    let timers: i64 = sqlx::query_scalar("SELECT count(*) FROM timers")
        .fetch_one(&app.pool)
        .await
        .unwrap();
    assert_eq!(timers, 0, "no answer is awaited any more");

    // The retry replays; a new referral under the consent is refused.
    let again = client
        .withdraw_consent(authorized(withdrawal, &police()))
        .await
        .unwrap()
        .into_inner();
    assert!(again.replayed);
    let tables = app.tables();
    let before = tables.snapshot().await;
    let status = client
        .create_referral(authorized(request(), &police()))
        .await
        .unwrap_err();
    assert_eq!(precondition(&status), "NO_CONSENT");
    let before = assert_refused(
        &tables,
        &before,
        "CreateReferral:refused",
        Some(&person_id),
        "a referral under a withdrawn consent",
    )
    .await;
    let status = client
        .withdraw_consent(authorized(
            pb::WithdrawConsentRequest {
                request_id: rid(),
                consent_id: to_msd.clone(),
            },
            &police(),
        ))
        .await
        .unwrap_err();
    assert_eq!(precondition(&status), "ALREADY_WITHDRAWN");
    assert_refused(
        &tables,
        &before,
        "WithdrawConsent:refused",
        Some(&to_msd),
        "withdrawing a consent twice",
    )
    .await;
    app.stop().await;
    id.stop().await;
}

async fn counts(app: &ReferralApp) -> (i64, i64) {
    (
        app.count_events(Some("BedHoldRecorded")).await,
        app.count_events(Some("NoBedRecorded")).await,
    )
}

/// Waits until the shelter answers reaction has applied every message of the
/// shelter stream (its checkpoint at the stream's last sequence), and the
/// service is quiescent.
async fn wait_for_shelter_answers(app: &ReferralApp) {
    let stream = app.stream_name("shelter");
    for _ in 0..200 {
        let last = app
            .jetstream
            .get_stream(&stream)
            .await
            .unwrap()
            .info()
            .await
            .unwrap()
            .state
            .last_sequence;
        let at: Option<i64> = sqlx::query_scalar(
            "SELECT stream_sequence FROM projection_checkpoints WHERE projection = 'referral_shelter_answers'",
        )
        .fetch_optional(&app.pool)
        .await
        .unwrap();
        if at.is_some_and(|at| u64::try_from(at).unwrap() >= last) {
            app.tables().wait_until_quiescent().await;
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("the shelter answers were not applied within 10 s");
}

#[tokio::test]
async fn bed_holds_and_missing_beds_are_recorded_on_the_referral_once() {
    let id = TestApp::spawn().await;
    let app = ReferralApp::spawn_beside(&id).await;
    let (case_id, person_id) = identified_person(&id, Some(idpb::Decision::Identified), false).await;
    app.wait_for_person(&person_id, idpb::CaseStatus::Identified as i32)
        .await;
    let services = [pb::ServiceKind::Shelter];
    let to_msd = consent(&app, &case_id, &person_id, MSD, &services).await;
    let held = refer(
        &app,
        referral_request(&case_id, &person_id, MSD, &services, pb::Urgency::Urgent, &to_msd),
    )
    .await;
    let unplaced = refer(
        &app,
        referral_request(&case_id, &person_id, MSD, &services, pb::Urgency::Urgent, &to_msd),
    )
    .await;

    let mut feed = ShelterFeed::new(&app.settings.nats).await;
    let shelter_id = rid();
    let hold_id = rid();
    let bed_held = shelter::shelter_event::Event::BedHeld(shelter::BedHeld {
        shelter_id: shelter_id.clone(),
        hold_id: hold_id.clone(),
        category: shelter::BedCategory::Women as i32,
        referral_id: held.referral_id.clone(),
        expires_at: Some(prost_types::Timestamp {
            seconds: chrono::Utc::now().timestamp() + 86_400,
            nanos: 0,
        }),
        region: "KG-C".into(),
        holder_agency: "kg-msd".into(),
    });
    let no_bed = shelter::shelter_event::Event::NoBedAvailable(shelter::NoBedAvailable {
        referral_id: unplaced.referral_id.clone(),
        region: "KG-C".into(),
        category: shelter::BedCategory::Women as i32,
        nearest_regions_with_beds: vec!["KG-GB".into(), "KG-T".into()],
    });
    feed.publish("shelter", &shelter_id, std::slice::from_ref(&bed_held))
        .await;
    feed.publish("placement", &unplaced.referral_id, std::slice::from_ref(&no_bed))
        .await;

    let view = wait_for_referral(&app, &held.referral_id, |r| !r.hold_id.is_empty()).await;
    assert_eq!(
        (view.shelter_id.as_str(), view.hold_id.as_str()),
        (shelter_id.as_str(), hold_id.as_str())
    );
    let view = wait_for_referral(&app, &unplaced.referral_id, |r| !r.nearest_regions_with_beds.is_empty()).await;
    assert_eq!(view.nearest_regions_with_beds, ["KG-GB", "KG-T"]);
    wait_for_shelter_answers(&app).await;
    assert_eq!(counts(&app).await, (1, 1));

    // The same answers published again (a shelter service retrying, as new
    // commits) record nothing on the referrals: only the reaction's
    // bookkeeping moves on (its checkpoint, and the last version it saw of
    // each shelter aggregate).
    let before = app.tables().snapshot().await;
    feed.publish("shelter", &shelter_id, std::slice::from_ref(&bed_held))
        .await;
    feed.publish("placement", &unplaced.referral_id, std::slice::from_ref(&no_bed))
        .await;
    wait_for_shelter_answers(&app).await;
    app.tables()
        .assert_changed_only_since(
            &before,
            &["projection_checkpoints", "projection_versions"],
            "the same answers published again",
        )
        .await;
    assert_eq!(counts(&app).await, (1, 1));

    // A restart: the reaction goes on after its checkpoint, nothing changes.
    let before = app.tables().snapshot().await;
    let app = app.restart().await;
    wait_for_shelter_answers(&app).await;
    app.tables()
        .assert_unchanged_since(&before, "a restart of the referral service")
        .await;
    assert_eq!(counts(&app).await, (1, 1));

    // Without its checkpoint the reaction starts again from the stream's
    // first message: a hold already recorded is not recorded again, only the
    // checkpoint is written anew.
    let before = app.tables().snapshot().await;
    let settings = app.halt().await;
    let pool = sqlx::PgPool::connect_with(nrm_kernel::db::connect_options(&settings.database).unwrap())
        .await
        .unwrap();
    sqlx::query("DELETE FROM projection_checkpoints WHERE projection = 'referral_shelter_answers'")
        .execute(&pool)
        .await
        .unwrap();
    pool.close().await;
    let app = ReferralApp::spawn_with(settings).await;
    wait_for_shelter_answers(&app).await;
    app.tables()
        .assert_changed_only_since(
            &before,
            &["projection_checkpoints"],
            "the shelter answers applied again without a checkpoint",
        )
        .await;
    assert_eq!(counts(&app).await, (1, 1));
    feed.drop_all().await;
    app.stop().await;
    id.stop().await;
}

#[tokio::test]
async fn the_inbox_pages_with_a_token_bound_to_its_filters() {
    let id = TestApp::spawn().await;
    let app = ReferralApp::spawn_beside(&id).await;
    let (case_id, person_id) = identified_person(&id, None, false).await;
    app.wait_for_person(&person_id, idpb::CaseStatus::Reported as i32).await;
    let services = [pb::ServiceKind::Social];
    let to_msd = consent(&app, &case_id, &person_id, MSD, &services).await;
    let mut created = Vec::new();
    for urgency in [pb::Urgency::Normal, pb::Urgency::Urgent, pb::Urgency::Normal] {
        let referral = refer(
            &app,
            referral_request(&case_id, &person_id, MSD, &services, urgency, &to_msd),
        )
        .await;
        created.push(referral.referral_id);
    }
    wait_for_inbox(&app, &msd(), pb::ListInboxRequest::default(), |r| r.len() == 3).await;

    let first = inbox(
        &app,
        &msd(),
        pb::ListInboxRequest {
            page_size: 2,
            ..Default::default()
        },
    )
    .await;
    assert_eq!(first.referrals.len(), 2);
    assert!(!first.next_page_token.is_empty());
    let second = inbox(
        &app,
        &msd(),
        pb::ListInboxRequest {
            page_size: 2,
            page_token: first.next_page_token.clone(),
            ..Default::default()
        },
    )
    .await;
    assert_eq!(second.referrals.len(), 1);
    assert!(second.next_page_token.is_empty());
    let mut seen: Vec<String> = first
        .referrals
        .iter()
        .chain(&second.referrals)
        .map(|r| r.referral_id.clone())
        .collect();
    assert_eq!(seen[0], created[2], "newest first");
    seen.sort();
    created.sort();
    assert_eq!(seen, created);

    // Filters narrow; a token made for other filters is refused.
    let urgent = inbox(
        &app,
        &msd(),
        pb::ListInboxRequest {
            urgency: pb::Urgency::Urgent as i32,
            status: pb::ReferralStatus::Pending as i32,
            ..Default::default()
        },
    )
    .await;
    assert_eq!(urgent.referrals.len(), 1);
    let status = app
        .client
        .clone()
        .list_inbox(authorized(
            pb::ListInboxRequest {
                page_size: 2,
                page_token: first.next_page_token,
                urgency: pb::Urgency::Urgent as i32,
                ..Default::default()
            },
            &msd(),
        ))
        .await
        .unwrap_err();
    assert_eq!(bad_fields(&status), ["page_token"]);
    // Another agency's inbox is its own.
    assert!(
        inbox(&app, &moh(), pb::ListInboxRequest::default())
            .await
            .referrals
            .is_empty()
    );
    app.stop().await;
    id.stop().await;
}

#[tokio::test]
async fn a_plan_goal_racing_the_withdrawal_of_its_consent_waits_for_it_and_is_refused() {
    let id = TestApp::spawn().await;
    let app = ReferralApp::spawn_beside(&id).await;
    let (case_id, person_id) = identified_person(&id, Some(idpb::Decision::Identified), false).await;
    app.wait_for_person(&person_id, idpb::CaseStatus::Identified as i32)
        .await;
    let services = [pb::ServiceKind::Psychological];
    let to_msd = consent(&app, &case_id, &person_id, MSD, &services).await;
    let referral = refer(
        &app,
        referral_request(&case_id, &person_id, MSD, &services, pb::Urgency::Normal, &to_msd),
    )
    .await;
    let mut client = app.client.clone();
    client
        .accept_referral(authorized(accept(&referral.referral_id, 1), &msd()))
        .await
        .unwrap();

    // A withdrawal under way: the consent's row held as its transaction
    // holds it, by the test's own backend.
    let mut withdrawal = app.pool.begin().await.unwrap();
    let holder: i32 = sqlx::query_scalar("SELECT pg_backend_pid()")
        .fetch_one(&mut *withdrawal)
        .await
        .unwrap();
    sqlx::query("SELECT 1 FROM consents WHERE consent_id = $1::uuid FOR UPDATE")
        .bind(&to_msd)
        .execute(&mut *withdrawal)
        .await
        .unwrap();
    let events_before: i64 = sqlx::query_scalar("SELECT count(*) FROM events")
        .fetch_one(&app.pool)
        .await
        .unwrap();
    // MSD adds a goal to the person's plan, relying on that consent.
    let goal = tokio::spawn({
        let mut client = app.client.clone();
        let person_id = person_id.clone();
        async move {
            client
                .add_plan_goal(authorized(
                    pb::AddPlanGoalRequest {
                        request_id: rid(),
                        person_id,
                        kind: pb::GoalKind::Housing as i32,
                        due_at: None,
                    },
                    &msd(),
                ))
                .await
        }
    });
    // It waits for the withdrawal (it does not read the consent as it was).
    nrm_e2e::eventually(
        "the goal's command waits on the consent's row",
        Duration::from_secs(10),
        || async { (nrm_e2e::blocked_by(&app.pool, holder).await >= 1).then_some(()) },
    )
    .await;
    sqlx::query("UPDATE consents SET withdrawn = true WHERE consent_id = $1::uuid")
        .bind(&to_msd)
        .execute(&mut *withdrawal)
        .await
        .unwrap();
    withdrawal.commit().await.unwrap();
    // Then it sees the consent withdrawn: refused, nothing written.
    let refused = goal.await.unwrap().expect_err("a goal under a withdrawn consent");
    assert_eq!(refused.code(), Code::PermissionDenied, "{refused:?}");
    let events_after: i64 = sqlx::query_scalar("SELECT count(*) FROM events")
        .fetch_one(&app.pool)
        .await
        .unwrap();
    assert_eq!(events_after, events_before, "nothing of the refused goal was written");
    app.stop().await;
    id.stop().await;
}
