//! No personal data in the referral service's telemetry, whatever is typed.
//!
//! This file is its own test process so that it can capture every log line
//! and span at debug level. A canary (name, document number, phone,
//! address, date of birth, a name written as a code, in Cyrillic, after a
//! UUID, very long) is pasted into every string field of every RPC of
//! `nrm.referral.v1.ReferralService` and of the kernel's `OperatorService`
//! and `AuditService` as the referral service serves them, one field at a
//! time and all at once, into `x-correlation-id` and the trace state, and
//! into paths no RPC has; by callers of every standing (holding the case,
//! outside it, the addressee, the coordinator, refused roles, no token, a
//! forged token). No log line, span, error (message, details, metadata) or
//! metric holds any canary, and every error class was reached.

#![allow(clippy::unwrap_used)] // Test code: a failed unwrap is a failed test.

use std::future::Future;
use std::time::Duration;

use nrm_e2e::canary::{self, Caller, ERROR_CODES, Field, NAME, PASSPORT, Sweep};
use nrm_e2e::{ReferralApp, TestApp, authorized, fields, report_request, token};
use nrm_kernel::auth::Role;
use nrm_kernel::permissions;
use nrm_proto::common::v1 as common;
use nrm_proto::referral::v1 as pb;
use tonic::{Code, Status};

use common::audit_service_client::AuditServiceClient;
use common::operator_service_client::OperatorServiceClient;

const MVD: &str = "kg-mvd";
const MSD: &str = "kg-msd";

fn police() -> String {
    token(MVD, Role::Police, "officer-9")
}

fn msd() -> String {
    token(MSD, Role::Msd, "social-worker-1")
}

fn coordinator() -> String {
    token("kg-coordinator", Role::Coordinator, "coord-1")
}

fn rid() -> String {
    uuid::Uuid::now_v7().to_string()
}

fn ago(seconds: i64) -> prost_types::Timestamp {
    let now = chrono::Utc::now().timestamp();
    prost_types::Timestamp {
        seconds: now - seconds,
        nanos: 0,
    }
}

/// `client.method(request)` as a sweep's call.
macro_rules! via {
    ($client:expr, $method:ident) => {
        |request| {
            let mut client = $client.clone();
            async move { client.$method(request).await }
        }
    };
}

/// Retries `call` until it succeeds (events take a moment to cross the bus).
async fn eventually<T, F, Fut>(what: &str, mut call: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, Status>>,
{
    let mut last = None;
    for _ in 0..400 {
        match call().await {
            Ok(value) => return value,
            Err(status) => last = Some(status),
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("{what} did not happen within 20 s: {last:?}");
}

/// What the sweep is aimed at: an adult's and a child's case, a consent,
/// a pending and an accepted referral, a plan goal.
struct World {
    case_id: String,
    person_id: String,
    child_case_id: String,
    child_person_id: String,
    consent_id: String,
    pending_id: String,
    accepted_id: String,
    goal_id: String,
}

async fn report(id: &TestApp, child: bool) -> (String, String) {
    let mut request = report_request(&rid(), canary::identifiers());
    if child {
        request.child = true;
        request.age_years = Some(15);
    }
    let reported = id
        .client
        .clone()
        .report_presumed_victim(authorized(request, &police()))
        .await
        .unwrap()
        .into_inner();
    (reported.case_id, reported.person_id)
}

fn consent(case_id: &str, person_id: &str, agency: &str) -> pb::RecordConsentRequest {
    pb::RecordConsentRequest {
        request_id: rid(),
        person_id: person_id.to_owned(),
        case_id: case_id.to_owned(),
        given_by: pb::ConsentGiver::Person as i32,
        recipient_agency: agency.to_owned(),
        purposes: vec![
            pb::ServiceKind::Psychological as i32,
            pb::ServiceKind::Social as i32,
            pb::ServiceKind::Shelter as i32,
        ],
        data_categories: vec![
            pb::DataCategory::Name as i32,
            pb::DataCategory::DateOfBirth as i32,
            pb::DataCategory::Address as i32,
        ],
        ..Default::default()
    }
}

fn referral(w: &World, services: &[pb::ServiceKind]) -> pb::CreateReferralRequest {
    pb::CreateReferralRequest {
        request_id: rid(),
        person_id: w.person_id.clone(),
        case_id: w.case_id.clone(),
        receiving_agency: MSD.into(),
        services: services.iter().map(|s| *s as i32).collect(),
        urgency: pb::Urgency::Normal as i32,
        consent_id: w.consent_id.clone(),
        shelter_need: services.contains(&pb::ServiceKind::Shelter).then(|| pb::ShelterNeed {
            category: nrm_proto::shelter::v1::BedCategory::Women as i32,
            region: "KG-C".into(),
        }),
    }
}

impl World {
    async fn build(id: &TestApp, rf: &ReferralApp) -> Self {
        let (case_id, person_id) = report(id, false).await;
        let (child_case_id, child_person_id) = report(id, true).await;
        let mut client = rf.client.clone();
        let consent_id = eventually("the referral service learns the person", || {
            let mut client = client.clone();
            let request = consent(&case_id, &person_id, MSD);
            async move {
                Ok(client
                    .record_consent(authorized(request, &police()))
                    .await?
                    .into_inner()
                    .consent_id)
            }
        })
        .await;
        eventually("the referral service learns the child", || {
            let mut client = client.clone();
            let mut request = consent(&child_case_id, &child_person_id, MSD);
            request.given_by = pb::ConsentGiver::Guardian as i32;
            request.guardian_ref = "guardian-1".into();
            async move { client.record_consent(authorized(request, &police())).await }
        })
        .await;
        let mut world = Self {
            case_id,
            person_id,
            child_case_id,
            child_person_id,
            consent_id,
            pending_id: String::new(),
            accepted_id: String::new(),
            goal_id: String::new(),
        };
        let create = |services: &[pb::ServiceKind]| authorized(referral(&world, services), &police());
        let pending = create(&[pb::ServiceKind::Psychological]);
        let accepted = create(&[pb::ServiceKind::Social]);
        world.pending_id = client.create_referral(pending).await.unwrap().into_inner().referral_id;
        world.accepted_id = client.create_referral(accepted).await.unwrap().into_inner().referral_id;
        client
            .accept_referral(authorized(
                pb::AcceptReferralRequest {
                    request_id: rid(),
                    referral_id: world.accepted_id.clone(),
                    expected_version: 1,
                },
                &msd(),
            ))
            .await
            .unwrap();
        world.goal_id = client
            .add_plan_goal(authorized(
                pb::AddPlanGoalRequest {
                    request_id: rid(),
                    person_id: world.person_id.clone(),
                    kind: pb::GoalKind::Housing as i32,
                    due_at: Some(ago(-30 * 86_400)),
                },
                &coordinator(),
            ))
            .await
            .unwrap()
            .into_inner()
            .goal_id;
        world
    }
}

/// The callers of the referral service's own RPCs.
fn callers() -> Vec<Caller> {
    vec![
        Caller::with("police holding the case", &police()),
        Caller::with(
            "police outside the case",
            &token("kg-mvd-osh", Role::Police, "officer-3"),
        ),
        Caller::with("MSD, the addressee", &msd()),
        Caller::with("the coordinator", &coordinator()),
        Caller::refused(
            "an auditor",
            Some(format!("Bearer {}", token("kg-audit", Role::Auditor, "a-1"))),
        ),
        Caller::refused(
            "a token whose claims are canaries",
            Some(format!("Bearer {}", token(NAME, Role::Police, PASSPORT))),
        ),
        Caller::refused("no token", None),
        Caller::refused("a canary as the token", Some(format!("Bearer {NAME}"))),
        Caller::refused("a canary as the scheme", Some(format!("{PASSPORT} x"))),
    ]
}

/// The callers of the kernel's services as the referral service serves them.
fn kernel_callers() -> Vec<Caller> {
    vec![
        Caller::with("the operator", &token("kg-ops", Role::Operator, "ops-1")),
        Caller::with("the auditor", &token("kg-audit", Role::Auditor, "auditor-1")),
        Caller::with("police", &police()),
        Caller::refused("no token", None),
        Caller::refused("a canary as the token", Some(format!("Bearer {PASSPORT}"))),
    ]
}

#[allow(clippy::too_many_lines)] // One sweep, RPC after RPC.
async fn sweep_referral_rpcs(sweep: &mut Sweep, rf: &ReferralApp, w: &World) {
    let c = rf.client.clone();
    let unknown = uuid::Uuid::now_v7().to_string();

    // Reads first, while the world is as built.
    sweep
        .rpc(
            "ListConsents",
            &[
                ("the adult", &|| pb::ListConsentsRequest {
                    person_id: w.person_id.clone(),
                }),
                ("an unknown person", &|| pb::ListConsentsRequest {
                    person_id: unknown.clone(),
                }),
            ],
            &fields!(pb::ListConsentsRequest: person_id),
            via!(c, list_consents),
        )
        .await;
    sweep
        .rpc(
            "GetReferral",
            &[
                ("the pending referral", &|| pb::GetReferralRequest {
                    referral_id: w.pending_id.clone(),
                }),
                ("an unknown referral", &|| pb::GetReferralRequest {
                    referral_id: unknown.clone(),
                }),
            ],
            &fields!(pb::GetReferralRequest: referral_id),
            via!(c, get_referral),
        )
        .await;
    sweep
        .rpc(
            "GetPlan",
            &[
                ("the adult", &|| pb::GetPlanRequest {
                    person_id: w.person_id.clone(),
                }),
                ("an unknown person", &|| pb::GetPlanRequest {
                    person_id: unknown.clone(),
                }),
            ],
            &fields!(pb::GetPlanRequest: person_id),
            via!(c, get_plan),
        )
        .await;
    sweep
        .rpc(
            "ListInbox",
            &[("the first page", &|| pb::ListInboxRequest {
                page_size: 5,
                ..Default::default()
            })],
            &fields!(pb::ListInboxRequest: page_token),
            via!(c, list_inbox),
        )
        .await;

    // Consents.
    let child = |given_by: pb::ConsentGiver| {
        let mut request = consent(&w.child_case_id, &w.child_person_id, MSD);
        request.given_by = given_by as i32;
        request
    };
    sweep
        .rpc(
            "RecordConsent",
            &[
                ("the adult, by the person", &|| {
                    consent(&w.case_id, &w.person_id, "kg-moh")
                }),
                ("the child, by a guardian", &|| pb::RecordConsentRequest {
                    guardian_ref: "guardian-1".into(),
                    ..child(pb::ConsentGiver::Guardian)
                }),
                ("the child, by a best-interests decision", &|| {
                    pb::RecordConsentRequest {
                        best_interests_decision_ref: "bid-2024-7".into(),
                        best_interests_decided_by: "kg-court-osh".into(),
                        ..child(pb::ConsentGiver::BestInterestsDecision)
                    }
                }),
                ("the child, by the child", &|| child(pb::ConsentGiver::Person)),
                ("an unknown person", &|| consent(&unknown, &unknown, MSD)),
            ],
            &fields!(pb::RecordConsentRequest: request_id, person_id, case_id, recipient_agency, guardian_ref,
                best_interests_decision_ref, best_interests_decided_by),
            via!(c, record_consent),
        )
        .await;

    // Referrals.
    let region: Field<pb::CreateReferralRequest> = ("shelter_need.region", |r, v| {
        r.shelter_need.get_or_insert_with(Default::default).region = v.to_owned();
    });
    let mut create_fields =
        fields!(pb::CreateReferralRequest: request_id, person_id, case_id, receiving_agency, consent_id).to_vec();
    create_fields.push(region);
    sweep
        .rpc(
            "CreateReferral",
            &[
                ("under the consent", &|| referral(w, &[pb::ServiceKind::Psychological])),
                ("a shelter bed", &|| referral(w, &[pb::ServiceKind::Shelter])),
                ("to an agency the consent does not cover", &|| {
                    pb::CreateReferralRequest {
                        receiving_agency: "kg-ngo-other".into(),
                        ..referral(w, &[pb::ServiceKind::Psychological])
                    }
                }),
                ("under an unknown consent", &|| pb::CreateReferralRequest {
                    consent_id: unknown.clone(),
                    ..referral(w, &[pb::ServiceKind::Psychological])
                }),
            ],
            &create_fields,
            via!(c, create_referral),
        )
        .await;
    sweep
        .rpc(
            "RecordServiceDelivered",
            &[
                ("the accepted referral", &|| pb::RecordServiceDeliveredRequest {
                    request_id: rid(),
                    referral_id: w.accepted_id.clone(),
                    expected_version: 2,
                    kind: pb::ServiceKind::Social as i32,
                    delivered_at: Some(ago(60)),
                    provider: "kg-msd-centre-1".into(),
                }),
                ("an unknown referral", &|| pb::RecordServiceDeliveredRequest {
                    request_id: rid(),
                    referral_id: unknown.clone(),
                    expected_version: 2,
                    kind: pb::ServiceKind::Social as i32,
                    delivered_at: Some(ago(60)),
                    provider: "kg-msd-centre-1".into(),
                }),
            ],
            &fields!(pb::RecordServiceDeliveredRequest: request_id, referral_id, provider),
            via!(c, record_service_delivered),
        )
        .await;
    let target = |referral_id: &str| (rid(), referral_id.to_owned());
    sweep
        .rpc(
            "DeclineReferral",
            &[
                ("the pending referral", &|| {
                    let (request_id, referral_id) = target(&w.pending_id);
                    pb::DeclineReferralRequest {
                        request_id,
                        referral_id,
                        expected_version: 1,
                        reason: pb::DeclineReason::NoCapacity as i32,
                    }
                }),
                ("an unknown referral", &|| {
                    let (request_id, referral_id) = target(&unknown);
                    pb::DeclineReferralRequest {
                        request_id,
                        referral_id,
                        expected_version: 1,
                        reason: pb::DeclineReason::NoCapacity as i32,
                    }
                }),
            ],
            &fields!(pb::DeclineReferralRequest: request_id, referral_id),
            via!(c, decline_referral),
        )
        .await;
    sweep
        .rpc(
            "RedirectReferral",
            &[
                ("the pending referral", &|| pb::RedirectReferralRequest {
                    request_id: rid(),
                    referral_id: w.pending_id.clone(),
                    expected_version: 2,
                    receiving_agency: "kg-moh".into(),
                    consent_id: w.consent_id.clone(),
                }),
                ("an unknown referral", &|| pb::RedirectReferralRequest {
                    request_id: rid(),
                    referral_id: unknown.clone(),
                    expected_version: 2,
                    receiving_agency: "kg-moh".into(),
                    consent_id: w.consent_id.clone(),
                }),
            ],
            &fields!(pb::RedirectReferralRequest: request_id, referral_id, receiving_agency, consent_id),
            via!(c, redirect_referral),
        )
        .await;
    sweep
        .rpc(
            "AcceptReferral",
            &[
                ("the pending referral", &|| pb::AcceptReferralRequest {
                    request_id: rid(),
                    referral_id: w.pending_id.clone(),
                    expected_version: 1,
                }),
                ("an unknown referral", &|| pb::AcceptReferralRequest {
                    request_id: rid(),
                    referral_id: unknown.clone(),
                    expected_version: 1,
                }),
            ],
            &fields!(pb::AcceptReferralRequest: request_id, referral_id),
            via!(c, accept_referral),
        )
        .await;

    // The plan.
    sweep
        .rpc(
            "AddPlanGoal",
            &[
                ("the adult", &|| pb::AddPlanGoalRequest {
                    request_id: rid(),
                    person_id: w.person_id.clone(),
                    kind: pb::GoalKind::Work as i32,
                    due_at: Some(ago(-86_400)),
                }),
                ("an unknown person", &|| pb::AddPlanGoalRequest {
                    request_id: rid(),
                    person_id: unknown.clone(),
                    kind: pb::GoalKind::Work as i32,
                    due_at: Some(ago(-86_400)),
                }),
            ],
            &fields!(pb::AddPlanGoalRequest: request_id, person_id),
            via!(c, add_plan_goal),
        )
        .await;
    sweep
        .rpc(
            "RecordFollowUp",
            &[
                ("the goal", &|| pb::RecordFollowUpRequest {
                    request_id: rid(),
                    person_id: w.person_id.clone(),
                    goal_id: w.goal_id.clone(),
                    followed_up_at: Some(ago(60)),
                    status_code: "ON_TRACK".into(),
                }),
                ("an unknown goal", &|| pb::RecordFollowUpRequest {
                    request_id: rid(),
                    person_id: w.person_id.clone(),
                    goal_id: unknown.clone(),
                    followed_up_at: Some(ago(60)),
                    status_code: "ON_TRACK".into(),
                }),
            ],
            &fields!(pb::RecordFollowUpRequest: request_id, person_id, goal_id, status_code),
            via!(c, record_follow_up),
        )
        .await;
    sweep
        .rpc(
            "MarkGoalMet",
            &[
                ("the goal", &|| pb::MarkGoalMetRequest {
                    request_id: rid(),
                    person_id: w.person_id.clone(),
                    goal_id: w.goal_id.clone(),
                }),
                ("an unknown person", &|| pb::MarkGoalMetRequest {
                    request_id: rid(),
                    person_id: unknown.clone(),
                    goal_id: w.goal_id.clone(),
                }),
            ],
            &fields!(pb::MarkGoalMetRequest: request_id, person_id, goal_id),
            via!(c, mark_goal_met),
        )
        .await;

    // Last, as they end what the others act on.
    sweep
        .rpc(
            "CloseReferral",
            &[
                ("the accepted referral", &|| pb::CloseReferralRequest {
                    request_id: rid(),
                    referral_id: w.accepted_id.clone(),
                    expected_version: 2,
                    outcome: pb::ReferralOutcome::ServicesCompleted as i32,
                }),
                ("an unknown referral", &|| pb::CloseReferralRequest {
                    request_id: rid(),
                    referral_id: unknown.clone(),
                    expected_version: 2,
                    outcome: pb::ReferralOutcome::ServicesCompleted as i32,
                }),
            ],
            &fields!(pb::CloseReferralRequest: request_id, referral_id),
            via!(c, close_referral),
        )
        .await;
    sweep
        .rpc(
            "WithdrawConsent",
            &[
                ("the consent", &|| pb::WithdrawConsentRequest {
                    request_id: rid(),
                    consent_id: w.consent_id.clone(),
                }),
                ("an unknown consent", &|| pb::WithdrawConsentRequest {
                    request_id: rid(),
                    consent_id: unknown.clone(),
                }),
            ],
            &fields!(pb::WithdrawConsentRequest: request_id, consent_id),
            via!(c, withdraw_consent),
        )
        .await;
}

/// `OperatorService` and `AuditService` on `endpoint`, every field a canary.
///
/// # Panics
/// When the endpoint cannot be reached.
async fn sweep_kernel_rpcs(sweep: &mut Sweep, endpoint: &str, person_id: &str) {
    let ops = OperatorServiceClient::connect(endpoint.to_owned()).await.unwrap();
    let audit = AuditServiceClient::connect(endpoint.to_owned()).await.unwrap();
    let unknown = uuid::Uuid::now_v7().to_string();
    sweep
        .rpc(
            "ListParked",
            &[("every item", &common::ListParkedRequest::default)],
            &[],
            via!(ops, list_parked),
        )
        .await;
    sweep
        .rpc(
            "RetryParked",
            &[
                ("a timer", &|| common::RetryParkedRequest {
                    kind: common::ParkedKind::Timer as i32,
                    owner: "referral_answers".into(),
                    item_id: unknown.clone(),
                }),
                ("a message", &|| common::RetryParkedRequest {
                    kind: common::ParkedKind::Message as i32,
                    owner: "referral_persons".into(),
                    item_id: "7".into(),
                }),
            ],
            &fields!(common::RetryParkedRequest: owner, item_id),
            via!(ops, retry_parked),
        )
        .await;
    sweep
        .rpc(
            "RefillStream",
            &[("a dry run", &|| common::RefillStreamRequest { dry_run: true })],
            &[],
            via!(ops, refill_stream),
        )
        .await;
    sweep
        .rpc(
            "VerifyChain",
            &[
                ("from the start", &common::VerifyChainRequest::default),
                ("from an anchor", &|| common::VerifyChainRequest {
                    anchor_seq: 1,
                    anchor_hash: "00".repeat(32),
                }),
            ],
            &fields!(common::VerifyChainRequest: anchor_hash),
            via!(audit, verify_chain),
        )
        .await;
    sweep
        .rpc(
            "ListEntries",
            &[
                ("of the person", &|| common::ListEntriesRequest {
                    person_id: person_id.to_owned(),
                    page_size: 5,
                    ..Default::default()
                }),
                ("of a record", &|| common::ListEntriesRequest {
                    subject_id: unknown.clone(),
                    page_size: 5,
                    ..Default::default()
                }),
            ],
            &fields!(common::ListEntriesRequest: person_id, subject_id, page_token),
            via!(audit, list_entries),
        )
        .await;
}

#[tokio::test]
async fn a_canary_in_any_field_of_any_referral_rpc_reaches_no_log_span_metric_or_error() {
    let capture = canary::capture();
    let id = TestApp::spawn().await;
    let rf = ReferralApp::spawn_beside(&id).await;
    let world = World::build(&id, &rf).await;

    let mut sweep = Sweep::new(callers());
    sweep_referral_rpcs(&mut sweep, &rf, &world).await;
    let channel = tonic::transport::Endpoint::from_shared(rf.endpoint.clone())
        .unwrap()
        .connect()
        .await
        .unwrap();
    sweep.unknown_paths(&channel, permissions::REFERRAL).await;
    sweep.print("referral");

    let mut kernel = Sweep::new(kernel_callers());
    sweep_kernel_rpcs(&mut kernel, &rf.endpoint, &world.person_id).await;
    kernel.unknown_paths(&channel, permissions::OPERATOR).await;
    kernel.print("referral (operator, audit)");

    sweep
        .answers
        .assert_reached("referral", &[&[Code::Ok][..], &ERROR_CODES[..]].concat());
    kernel.answers.assert_reached(
        "referral (operator, audit)",
        &[
            Code::Ok,
            Code::InvalidArgument,
            Code::PermissionDenied,
            Code::Unauthenticated,
        ],
    );

    // Let the background work (reactions, relay, timers) log what it logs.
    tokio::time::sleep(Duration::from_secs(2)).await;
    // One recorder serves the whole process: the referral service's metrics too.
    let metrics = canary::get(&id.metrics_url).await;
    assert!(metrics.contains("nrm_grpc"), "metrics are served: {metrics}");
    canary::assert_clean(metrics.as_bytes(), "metrics");
    let logs = capture.logs();
    let text = String::from_utf8_lossy(&logs);
    assert!(
        text.contains(&world.pending_id),
        "the capture saw the referral service's spans"
    );
    assert!(text.contains("\"span\""), "span fields are in the capture");
    canary::assert_clean(&logs, "logs or spans");
    rf.stop().await;
    id.stop().await;
}
