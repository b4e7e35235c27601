//! The permission matrix, called: every RPC of every service as every role,
//! in and out of scope, against the three real services on the real NATS and
//! PostgreSQL. Each answer is checked against `nrm_kernel::permissions`:
//!
//! - a role outside the RPC's row gets `PERMISSION_DENIED`;
//! - a role in the row, calling on a record its agency stands in a scope to,
//!   is let through: any answer but `PERMISSION_DENIED`, `UNAUTHENTICATED` or
//!   `INVALID_ARGUMENT` (the requests are valid, so the call reached the rule
//!   it names, whatever the domain then says);
//! - the same role of an agency that stands in no scope to the record gets
//!   `PERMISSION_DENIED`, or (lists) a list without the record.
//!
//! Each call gets a world of its own (a case, a consent, an accepted referral,
//! a shelter with a hold), so that one call's effect (a redirect, a
//! withdrawal) never changes another call's standing.

#![allow(clippy::unwrap_used)] // Test code: a failed unwrap is a failed test.

use std::future::Future;
use std::time::Duration;

use futures::StreamExt as _;
use nrm_e2e::{ReferralApp, ShelterApp, TestApp, authorized, person, report_request, token, unique};
use nrm_kernel::auth::Role;
use nrm_kernel::permissions::{self, MATRIX, Permission, Scope};
use nrm_proto::common::v1 as common;
use nrm_proto::identification::v1 as id;
use nrm_proto::referral::v1 as rf;
use nrm_proto::shelter::v1 as sh;
use tonic::{Code, Status};

use common::audit_service_client::AuditServiceClient;
use common::operator_service_client::OperatorServiceClient;
use id::identification_service_client::IdentificationServiceClient;
use rf::referral_service_client::ReferralServiceClient;
use sh::shelter_service_client::ShelterServiceClient;

const REGION: &str = "KG-C";

fn rid() -> String {
    uuid::Uuid::now_v7().to_string()
}

fn now_plus(seconds: i64) -> prost_types::Timestamp {
    let since = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap();
    prost_types::Timestamp {
        seconds: i64::try_from(since.as_secs()).unwrap() + seconds,
        nanos: 0,
    }
}

/// An agency of a role.
#[derive(Debug, Clone)]
struct Agency {
    code: String,
    role: Role,
}

impl Agency {
    fn new(code: String, role: Role) -> Self {
        Self { code, role }
    }

    fn token(&self) -> String {
        token(&self.code, self.role, "officer-1")
    }
}

fn coordinator() -> Agency {
    Agency::new("kg-coordinator".into(), Role::Coordinator)
}

/// The three services on one NATS subject space.
struct System {
    identification: TestApp,
    referral: ReferralApp,
    shelter: ShelterApp,
}

impl System {
    async fn start() -> Self {
        let identification = TestApp::spawn().await;
        let referral = ReferralApp::spawn_beside(&identification).await;
        let mut shelter_settings = nrm_e2e::shelter_settings();
        shelter_settings.common.nats = identification.settings.common.nats.clone();
        let shelter = ShelterApp::spawn_with(shelter_settings).await;
        Self {
            identification,
            referral,
            shelter,
        }
    }

    fn id(&self) -> IdentificationServiceClient<tonic::transport::Channel> {
        self.identification.client.clone()
    }

    fn rf(&self) -> ReferralServiceClient<tonic::transport::Channel> {
        self.referral.client.clone()
    }

    fn sh(&self) -> ShelterServiceClient<tonic::transport::Channel> {
        self.shelter.client.clone()
    }

    async fn stop(self) {
        self.shelter.stop().await;
        self.referral.stop().await;
        self.identification.stop().await;
    }
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

/// A person of their own (no world's case is a duplicate of another's).
fn fresh_person() -> common::PersonalIdentifiers {
    let u = unique();
    let letters: String = u
        .chars()
        .map(|c| char::from(b'a' + (c.to_digit(16).unwrap() as u8)))
        .collect();
    person(
        &format!("Aida {letters}"),
        &format!("MX{}", u.to_ascii_uppercase()),
        "+996 555 010 203",
    )
}

/// Who stands where in a world.
#[derive(Debug, Clone)]
struct Cast {
    reporter: Agency,
    authority: Agency,
    receiver: Agency,
    operator: Agency,
}

/// A case with a consent, an accepted referral, a plan goal, and a shelter
/// with a bed held for the referral.
#[derive(Debug, Clone)]
struct World {
    cast: Cast,
    case_id: String,
    person_id: String,
    consent_id: String,
    referral_id: String,
    shelter_id: String,
    hold_id: String,
    goal_id: String,
}

impl World {
    /// The cast in which `me` stands in `scope` (or, with `None`, in none).
    fn cast(u: &str, me: &Agency, scope: Option<Scope>) -> Cast {
        let mut cast = Cast {
            reporter: Agency::new(format!("police-{u}"), Role::Police),
            authority: Agency::new(format!("police-{u}"), Role::Police),
            receiver: Agency::new(format!("msd-{u}"), Role::Msd),
            operator: Agency::new(format!("shelter-{u}"), Role::Shelter),
        };
        match scope {
            Some(Scope::CaseHolders | Scope::OwnAgency) => {
                cast.reporter = me.clone();
                if matches!(me.role, Role::Police | Role::Prosecutor) {
                    cast.authority = me.clone();
                }
            }
            // Another police unit reports; the caller's agency handles the case.
            Some(Scope::CompetentAuthority) => cast.authority = me.clone(),
            Some(Scope::Addressee | Scope::Consented) => cast.receiver = me.clone(),
            Some(Scope::ShelterOperator) => cast.operator = me.clone(),
            Some(Scope::Any) | None => {}
        }
        cast
    }

    async fn build(system: &System, cast: Cast) -> Self {
        let (reporter, authority, receiver, operator) =
            (&cast.reporter, &cast.authority, &cast.receiver, &cast.operator);
        let mut request = report_request(&rid(), fresh_person());
        request.competent_authority = if reporter.code == authority.code {
            String::new()
        } else {
            authority.code.clone()
        };
        let reported = system
            .id()
            .report_presumed_victim(authorized(request, &reporter.token()))
            .await
            .unwrap_or_else(|e| panic!("report as {reporter:?}: {e:?}"))
            .into_inner();
        let (case_id, person_id) = (reported.case_id, reported.person_id);
        let consent_id = eventually("the referral service learns the person", || {
            let mut rf = system.rf();
            let request = rf::RecordConsentRequest {
                request_id: format!("consent-{case_id}"),
                person_id: person_id.clone(),
                case_id: case_id.clone(),
                given_by: rf::ConsentGiver::Person as i32,
                recipient_agency: receiver.code.clone(),
                purposes: vec![rf::ServiceKind::Psychological as i32, rf::ServiceKind::Shelter as i32],
                data_categories: vec![rf::DataCategory::Name as i32, rf::DataCategory::Phone as i32],
                ..Default::default()
            };
            let token = reporter.token();
            async move {
                Ok(rf
                    .record_consent(authorized(request, &token))
                    .await?
                    .into_inner()
                    .consent_id)
            }
        })
        .await;
        let referral_id = system
            .rf()
            .create_referral(authorized(
                rf::CreateReferralRequest {
                    request_id: rid(),
                    person_id: person_id.clone(),
                    case_id: case_id.clone(),
                    receiving_agency: receiver.code.clone(),
                    services: vec![rf::ServiceKind::Psychological as i32, rf::ServiceKind::Shelter as i32],
                    urgency: rf::Urgency::Normal as i32,
                    consent_id: consent_id.clone(),
                    // A bed may be held for it by hand; in a region with no
                    // shelter, so that placement holds none by itself.
                    shelter_need: Some(rf::ShelterNeed {
                        category: sh::BedCategory::Women as i32,
                        region: "KG-B".into(),
                    }),
                },
                &reporter.token(),
            ))
            .await
            .unwrap()
            .into_inner()
            .referral_id;
        system
            .rf()
            .accept_referral(authorized(
                rf::AcceptReferralRequest {
                    request_id: rid(),
                    referral_id: referral_id.clone(),
                    expected_version: 1,
                },
                &receiver.token(),
            ))
            .await
            .unwrap();
        // Identification learns the acceptance from the referral stream a
        // moment later: the consented reads of the world count on it.
        let referral_uuid: uuid::Uuid = referral_id.parse().unwrap();
        eventually("identification learns the accepted referral", || async {
            let state: Option<String> = sqlx::query_scalar("SELECT state FROM referrals WHERE referral_id = $1")
                .bind(referral_uuid)
                .fetch_optional(&system.identification.pool)
                .await
                .map_err(|e| Status::internal(e.to_string()))?;
            match state.as_deref() {
                Some("accepted") => Ok(()),
                _ => Err(Status::not_found("not accepted yet")),
            }
        })
        .await;
        let shelter_id = system
            .sh()
            .register_shelter(authorized(
                sh::RegisterShelterRequest {
                    request_id: rid(),
                    code: format!("MX-{}", &case_id[..8]),
                    region: REGION.into(),
                    address: "Matrix street 1".into(),
                    capacity: vec![sh::BedCapacity {
                        category: sh::BedCategory::Women as i32,
                        beds: 4,
                    }],
                    services: vec![sh::OnSiteService::Psychological as i32],
                    wheelchair_accessible: false,
                },
                &operator.token(),
            ))
            .await
            .unwrap()
            .into_inner()
            .shelter_id;
        system
            .sh()
            .approve_shelter(authorized(
                sh::ApproveShelterRequest {
                    request_id: rid(),
                    shelter_id: shelter_id.clone(),
                    expected_version: 1,
                },
                &coordinator().token(),
            ))
            .await
            .unwrap();
        let hold_id = eventually("the shelter service learns the accepted referral", || {
            let mut sh = system.sh();
            let request = sh::HoldBedRequest {
                request_id: format!("hold-{referral_id}"),
                shelter_id: shelter_id.clone(),
                category: sh::BedCategory::Women as i32,
                referral_id: referral_id.clone(),
                hold_minutes: 60,
            };
            let token = receiver.token();
            async move { Ok(sh.hold_bed(authorized(request, &token)).await?.into_inner().hold_id) }
        })
        .await;
        // The identification service's and the referral inbox's views of the
        // accepted referral follow their streams a moment later; the hold
        // above no longer waits as long (the shelter service's referrals view
        // is quick), so wait for them here: a trial must not see a lag as a refusal.
        eventually("the identification service learns the accepted referral", || {
            let mut id = system.id();
            let request = id::GetPersonalDataRequest {
                person_id: person_id.clone(),
                purpose: "victim protection".into(),
                read_purpose: id::ReadPurpose::VictimProtection as i32,
            };
            let token = receiver.token();
            async move { id.get_personal_data(authorized(request, &token)).await.map(|_| ()) }
        })
        .await;
        eventually("the receiver's inbox lists the referral", || {
            let mut rf = system.rf();
            let token = receiver.token();
            let referral_id = referral_id.clone();
            async move {
                let inbox = rf
                    .list_inbox(authorized(
                        rf::ListInboxRequest {
                            page_size: 1000,
                            ..Default::default()
                        },
                        &token,
                    ))
                    .await?
                    .into_inner();
                if inbox.referrals.iter().any(|r| r.referral_id == referral_id) {
                    Ok(())
                } else {
                    Err(Status::not_found("not listed yet"))
                }
            }
        })
        .await;
        let goal_id = system
            .rf()
            .add_plan_goal(authorized(
                rf::AddPlanGoalRequest {
                    request_id: rid(),
                    person_id: person_id.clone(),
                    kind: rf::GoalKind::Housing as i32,
                    due_at: Some(now_plus(30 * 86_400)),
                },
                &coordinator().token(),
            ))
            .await
            .unwrap()
            .into_inner()
            .goal_id;
        Self {
            cast,
            case_id,
            person_id,
            consent_id,
            referral_id,
            shelter_id,
            hold_id,
            goal_id,
        }
    }
}

/// The current version of the world's case, referral or shelter (read by
/// the coordinator), for the commands that name one.
async fn case_version(system: &System, w: &World) -> u64 {
    let request = id::GetCaseRequest {
        case_id: w.case_id.clone(),
        ..Default::default()
    };
    system
        .id()
        .get_case(authorized(request, &coordinator().token()))
        .await
        .unwrap()
        .into_inner()
        .version
}

async fn referral_version(system: &System, w: &World) -> u64 {
    let request = rf::GetReferralRequest {
        referral_id: w.referral_id.clone(),
    };
    system
        .rf()
        .get_referral(authorized(request, &coordinator().token()))
        .await
        .unwrap()
        .into_inner()
        .version
}

async fn shelter_version(system: &System, w: &World) -> u64 {
    let request = sh::GetShelterRequest {
        shelter_id: w.shelter_id.clone(),
    };
    system
        .sh()
        .get_shelter(authorized(request, &coordinator().token()))
        .await
        .unwrap()
        .into_inner()
        .version
}

/// What a call answered: refused, or let through (and, for lists, whether
/// the world's record was in the list).
#[derive(Debug)]
enum Answer {
    Through {
        listed: Option<bool>,
    },
    Refused(Status),
    /// The test's own request was invalid: it proves nothing.
    Invalid(Status),
}

fn answer<T>(result: Result<tonic::Response<T>, Status>) -> Answer {
    match result {
        Ok(_) => Answer::Through { listed: None },
        Err(status) if matches!(status.code(), Code::PermissionDenied | Code::Unauthenticated) => {
            Answer::Refused(status)
        }
        Err(status) if status.code() == Code::InvalidArgument => Answer::Invalid(status),
        Err(_) => Answer::Through { listed: None },
    }
}

fn listed(result: Result<bool, Status>) -> Answer {
    match result {
        Ok(found) => Answer::Through { listed: Some(found) },
        Err(status) => answer::<()>(Err(status)),
    }
}

/// Whether the list of `row` (all its pages) shows the world's record to
/// the bearer of `token`.
async fn list_has(system: &System, row: &Permission, w: &World, token: &str) -> Result<bool, Status> {
    let mut page_token = String::new();
    loop {
        let (found, next) = if row.method == "ListCases" {
            let page = system
                .id()
                .list_cases(authorized(
                    id::ListCasesRequest {
                        page_size: 100,
                        page_token: page_token.clone(),
                        ..Default::default()
                    },
                    token,
                ))
                .await?
                .into_inner();
            (page.cases.iter().any(|c| c.case_id == w.case_id), page.next_page_token)
        } else {
            let page = system
                .rf()
                .list_inbox(authorized(
                    rf::ListInboxRequest {
                        page_size: 100,
                        page_token: page_token.clone(),
                        ..Default::default()
                    },
                    token,
                ))
                .await?
                .into_inner();
            (
                page.referrals.iter().any(|r| r.referral_id == w.referral_id),
                page.next_page_token,
            )
        };
        if found || next.is_empty() {
            return Ok(found);
        }
        page_token = next;
    }
}

/// Waits until the list of `row` shows the world's record to the
/// coordinator (its read model follows the stream a moment later), so that
/// a list without it means the caller may not see it.
async fn caught_up(system: &System, row: &Permission, w: &World) {
    let token = coordinator().token();
    eventually("the list's read model shows the record", || async {
        match list_has(system, row, w, &token).await? {
            true => Ok(()),
            false => Err(Status::not_found("not listed yet")),
        }
    })
    .await;
}

/// Calls the RPC of `row` on `w` as `me`.
#[allow(clippy::too_many_lines)]
async fn call(system: &System, w: &World, row: &Permission, me: &Agency) -> Answer {
    let token = me.token();
    macro_rules! a {
        ($m:expr) => {
            authorized($m, &token)
        };
    }
    let part = row.part;
    match (row.service, row.method) {
        (permissions::IDENTIFICATION, "ReportPresumedVictim") => {
            let mut request = report_request(&rid(), fresh_person());
            if !matches!(me.role, Role::Police | Role::Prosecutor) {
                request.competent_authority = w.cast.authority.code.clone();
            }
            answer(system.id().report_presumed_victim(a!(request)).await)
        }
        (permissions::IDENTIFICATION, "FileAnonymousNotification") => answer(
            system
                .id()
                .file_anonymous_notification(a!(id::FileAnonymousNotificationRequest {
                    request_id: rid(),
                    found_country: "KG".into(),
                    country_of_exploitation: "RU".into(),
                    exploitation_forms: vec![id::ExploitationForm::Labour as i32],
                    gender: common::Gender::Female as i32,
                    age_band: common::AgeBand::AgeBand2534 as i32,
                    citizenship: "KG".into(),
                }))
                .await,
        ),
        (permissions::IDENTIFICATION, "CompleteScreening") => {
            let expected_version = case_version(system, w).await;
            answer(
                system
                    .id()
                    .complete_screening(a!(id::CompleteScreeningRequest {
                        request_id: rid(),
                        case_id: w.case_id.clone(),
                        expected_version,
                        indicators: vec![id::Indicator::DocumentsRetained as i32],
                    }))
                    .await,
            )
        }
        (permissions::IDENTIFICATION, "DecideIdentification") => {
            let expected_version = case_version(system, w).await;
            answer(
                system
                    .id()
                    .decide_identification(a!(id::DecideIdentificationRequest {
                        request_id: rid(),
                        case_id: w.case_id.clone(),
                        expected_version,
                        decision: id::Decision::Identified as i32,
                        ..Default::default()
                    }))
                    .await,
            )
        }
        (permissions::IDENTIFICATION, "RequestReview") => {
            let expected_version = case_version(system, w).await;
            answer(
                system
                    .id()
                    .request_review(a!(id::RequestReviewRequest {
                        request_id: rid(),
                        case_id: w.case_id.clone(),
                        expected_version,
                        reason: id::ReviewReason::NewEvidence as i32,
                    }))
                    .await,
            )
        }
        (permissions::IDENTIFICATION, "ErasePersonalData") => answer(
            system
                .id()
                .erase_personal_data(a!(id::ErasePersonalDataRequest {
                    request_id: rid(),
                    case_id: w.case_id.clone(),
                    reason: id::ErasureReason::DataSubjectRequest as i32,
                }))
                .await,
        ),
        (permissions::IDENTIFICATION, "GetCase") => {
            let request = id::GetCaseRequest {
                case_id: w.case_id.clone(),
                include_personal_data: part == Some(permissions::PERSONAL_DATA),
                purpose: if part.is_some() {
                    "victim protection".into()
                } else {
                    String::new()
                },
                read_purpose: if part.is_some() {
                    id::ReadPurpose::VictimProtection as i32
                } else {
                    0
                },
            };
            answer(system.id().get_case(a!(request)).await)
        }
        (permissions::IDENTIFICATION, "ListCases") => {
            caught_up(system, row, w).await;
            listed(list_has(system, row, w, &token).await)
        }
        (permissions::IDENTIFICATION, "GetPersonalData") => answer(
            system
                .id()
                .get_personal_data(a!(id::GetPersonalDataRequest {
                    person_id: w.person_id.clone(),
                    purpose: "victim protection".into(),
                    read_purpose: id::ReadPurpose::VictimProtection as i32,
                }))
                .await,
        ),
        (permissions::REFERRAL, "RecordConsent") => answer(
            system
                .rf()
                .record_consent(a!(rf::RecordConsentRequest {
                    request_id: rid(),
                    person_id: w.person_id.clone(),
                    case_id: w.case_id.clone(),
                    given_by: rf::ConsentGiver::Person as i32,
                    recipient_agency: format!("moh-{}", &w.case_id[..8]),
                    purposes: vec![rf::ServiceKind::Medical as i32],
                    data_categories: vec![rf::DataCategory::Name as i32],
                    ..Default::default()
                }))
                .await,
        ),
        (permissions::REFERRAL, "WithdrawConsent") => answer(
            system
                .rf()
                .withdraw_consent(a!(rf::WithdrawConsentRequest {
                    request_id: rid(),
                    consent_id: w.consent_id.clone(),
                }))
                .await,
        ),
        (permissions::REFERRAL, "ListConsents") => answer(
            system
                .rf()
                .list_consents(a!(rf::ListConsentsRequest {
                    person_id: w.person_id.clone(),
                }))
                .await,
        ),
        (permissions::REFERRAL, "CreateReferral") => answer(
            system
                .rf()
                .create_referral(a!(rf::CreateReferralRequest {
                    request_id: rid(),
                    person_id: w.person_id.clone(),
                    case_id: w.case_id.clone(),
                    receiving_agency: w.cast.receiver.code.clone(),
                    services: vec![rf::ServiceKind::Psychological as i32],
                    urgency: rf::Urgency::Normal as i32,
                    consent_id: w.consent_id.clone(),
                    shelter_need: None,
                }))
                .await,
        ),
        (
            permissions::REFERRAL,
            method @ ("AcceptReferral"
            | "DeclineReferral"
            | "RedirectReferral"
            | "RecordServiceDelivered"
            | "CloseReferral"),
        ) => {
            let expected_version = referral_version(system, w).await;
            let referral_id = w.referral_id.clone();
            let mut rf = system.rf();
            let result = match method {
                "AcceptReferral" => rf
                    .accept_referral(a!(rf::AcceptReferralRequest {
                        request_id: rid(),
                        referral_id,
                        expected_version,
                    }))
                    .await
                    .map(|_| ()),
                "DeclineReferral" => rf
                    .decline_referral(a!(rf::DeclineReferralRequest {
                        request_id: rid(),
                        referral_id,
                        expected_version,
                        reason: rf::DeclineReason::NoCapacity as i32,
                    }))
                    .await
                    .map(|_| ()),
                "RedirectReferral" => rf
                    .redirect_referral(a!(rf::RedirectReferralRequest {
                        request_id: rid(),
                        referral_id,
                        expected_version,
                        receiving_agency: format!("ngo-{}", &w.case_id[..8]),
                        consent_id: w.consent_id.clone(),
                    }))
                    .await
                    .map(|_| ()),
                "RecordServiceDelivered" => rf
                    .record_service_delivered(a!(rf::RecordServiceDeliveredRequest {
                        request_id: rid(),
                        referral_id,
                        expected_version,
                        kind: rf::ServiceKind::Psychological as i32,
                        delivered_at: Some(now_plus(-60)),
                        provider: "provider-1".into(),
                    }))
                    .await
                    .map(|_| ()),
                _ => rf
                    .close_referral(a!(rf::CloseReferralRequest {
                        request_id: rid(),
                        referral_id,
                        expected_version,
                        outcome: rf::ReferralOutcome::ServicesCompleted as i32,
                    }))
                    .await
                    .map(|_| ()),
            };
            answer(result.map(tonic::Response::new))
        }
        (permissions::REFERRAL, "AddPlanGoal") => answer(
            system
                .rf()
                .add_plan_goal(a!(rf::AddPlanGoalRequest {
                    request_id: rid(),
                    person_id: w.person_id.clone(),
                    kind: rf::GoalKind::Work as i32,
                    due_at: Some(now_plus(60 * 86_400)),
                }))
                .await,
        ),
        (permissions::REFERRAL, "RecordFollowUp") => answer(
            system
                .rf()
                .record_follow_up(a!(rf::RecordFollowUpRequest {
                    request_id: rid(),
                    person_id: w.person_id.clone(),
                    goal_id: w.goal_id.clone(),
                    followed_up_at: Some(now_plus(-60)),
                    status_code: "ON_TRACK".into(),
                }))
                .await,
        ),
        (permissions::REFERRAL, "MarkGoalMet") => answer(
            system
                .rf()
                .mark_goal_met(a!(rf::MarkGoalMetRequest {
                    request_id: rid(),
                    person_id: w.person_id.clone(),
                    goal_id: w.goal_id.clone(),
                }))
                .await,
        ),
        (permissions::REFERRAL, "GetReferral") => answer(
            system
                .rf()
                .get_referral(a!(rf::GetReferralRequest {
                    referral_id: w.referral_id.clone(),
                }))
                .await,
        ),
        (permissions::REFERRAL, "GetPlan") => answer(
            system
                .rf()
                .get_plan(a!(rf::GetPlanRequest {
                    person_id: w.person_id.clone(),
                }))
                .await,
        ),
        (permissions::REFERRAL, "ListInbox") => {
            caught_up(system, row, w).await;
            listed(list_has(system, row, w, &token).await)
        }
        (permissions::SHELTER, "RegisterShelter") => answer(
            system
                .sh()
                .register_shelter(a!(sh::RegisterShelterRequest {
                    request_id: rid(),
                    code: format!("MY-{}", unique()),
                    region: REGION.into(),
                    address: "Another street 2".into(),
                    capacity: vec![sh::BedCapacity {
                        category: sh::BedCategory::Men as i32,
                        beds: 1,
                    }],
                    services: vec![],
                    wheelchair_accessible: false,
                }))
                .await,
        ),
        (permissions::SHELTER, "ChangeCapacity") => {
            let expected_version = shelter_version(system, w).await;
            answer(
                system
                    .sh()
                    .change_capacity(a!(sh::ChangeCapacityRequest {
                        request_id: rid(),
                        shelter_id: w.shelter_id.clone(),
                        expected_version,
                        category: sh::BedCategory::Women as i32,
                        beds: 5,
                    }))
                    .await,
            )
        }
        (permissions::SHELTER, "ApproveShelter") => {
            let expected_version = shelter_version(system, w).await;
            answer(
                system
                    .sh()
                    .approve_shelter(a!(sh::ApproveShelterRequest {
                        request_id: rid(),
                        shelter_id: w.shelter_id.clone(),
                        expected_version,
                    }))
                    .await,
            )
        }
        (permissions::SHELTER, "HoldBed") => answer(
            system
                .sh()
                .hold_bed(a!(sh::HoldBedRequest {
                    request_id: rid(),
                    shelter_id: w.shelter_id.clone(),
                    category: sh::BedCategory::Women as i32,
                    referral_id: w.referral_id.clone(),
                    hold_minutes: 60,
                }))
                .await,
        ),
        (permissions::SHELTER, method @ ("ReleaseHold" | "Admit" | "Discharge")) => {
            let (request_id, shelter_id, hold_id) = (rid(), w.shelter_id.clone(), w.hold_id.clone());
            let mut sh = system.sh();
            let result = match method {
                "ReleaseHold" => {
                    sh.release_hold(a!(sh::ReleaseHoldRequest {
                        request_id,
                        shelter_id,
                        hold_id,
                    }))
                    .await
                }
                "Admit" => {
                    sh.admit(a!(sh::AdmitRequest {
                        request_id,
                        shelter_id,
                        hold_id,
                    }))
                    .await
                }
                _ => {
                    sh.discharge(a!(sh::DischargeRequest {
                        request_id,
                        shelter_id,
                        hold_id,
                    }))
                    .await
                }
            };
            answer(result)
        }
        (permissions::SHELTER, "GetShelter") => answer(
            system
                .sh()
                .get_shelter(a!(sh::GetShelterRequest {
                    shelter_id: w.shelter_id.clone(),
                }))
                .await,
        ),
        (permissions::SHELTER, "ListFreeCapacity") => answer(
            system
                .sh()
                .list_free_capacity(a!(sh::ListFreeCapacityRequest {
                    region: REGION.into(),
                    category: sh::BedCategory::Women as i32,
                }))
                .await,
        ),
        (permissions::SHELTER, "ListArrivals") => answer(
            system
                .sh()
                .list_arrivals(a!(sh::ListArrivalsRequest {
                    shelter_id: w.shelter_id.clone(),
                }))
                .await,
        ),
        (permissions::OPERATOR, method) => {
            let mut ops = OperatorServiceClient::connect(system.identification.endpoint.clone())
                .await
                .unwrap();
            let result = match method {
                "ListParked" => ops
                    .list_parked(a!(common::ListParkedRequest::default()))
                    .await
                    .map(|_| ()),
                "RetryParked" => ops
                    .retry_parked(a!(common::RetryParkedRequest {
                        kind: common::ParkedKind::Timer as i32,
                        owner: "none".into(),
                        item_id: uuid::Uuid::now_v7().to_string(),
                    }))
                    .await
                    .map(|_| ()),
                "RebuildReadModels" => ops
                    .rebuild_read_models(a!(common::RebuildReadModelsRequest {
                        projection: "identification_case_list".into(),
                    }))
                    .await
                    .map(|_| ()),
                _ => ops
                    .refill_stream(a!(common::RefillStreamRequest { dry_run: true }))
                    .await
                    .map(|_| ()),
            };
            answer(result.map(tonic::Response::new))
        }
        (permissions::AUDIT, method) => {
            let mut audit = AuditServiceClient::connect(system.identification.endpoint.clone())
                .await
                .unwrap();
            let result = match method {
                "VerifyChain" => audit
                    .verify_chain(a!(common::VerifyChainRequest::default()))
                    .await
                    .map(|_| ()),
                _ => audit
                    .list_entries(a!(common::ListEntriesRequest {
                        person_id: w.person_id.clone(),
                        ..Default::default()
                    }))
                    .await
                    .map(|_| ()),
            };
            answer(result.map(tonic::Response::new))
        }
        (service, method) => panic!("the matrix test has no call for {service}/{method}: add one"),
    }
}

/// One call to try, and what the matrix says of it.
struct Trial {
    row: &'static Permission,
    me: Agency,
    /// The scope the caller's agency stands in, or none.
    scope: Option<Scope>,
    /// Whether the matrix lets the call through.
    allowed: bool,
}

fn trials() -> Vec<Trial> {
    let mut trials = Vec::new();
    // The repatriation service's and casepath's rows have sweeps of their
    // own, against those services (tests/tests/repatriation.rs,
    // tests/tests/casepath_matrix.rs).
    for row in MATRIX
        .iter()
        .filter(|r| r.service != permissions::REPATRIATION && r.service != permissions::CASEPATH)
    {
        for role in Role::ALL {
            let u = unique();
            let me = Agency::new(format!("{}-{u}", role.as_str().replace('_', "-")), role);
            match row.scopes(role) {
                None => trials.push(Trial {
                    row,
                    me,
                    scope: None,
                    allowed: false,
                }),
                Some(scopes) => {
                    for scope in scopes {
                        trials.push(Trial {
                            row,
                            me: me.clone(),
                            scope: Some(*scope),
                            allowed: true,
                        });
                    }
                    if !scopes.contains(&Scope::Any) {
                        trials.push(Trial {
                            row,
                            me: Agency::new(format!("{}-x", me.code), role),
                            scope: None,
                            allowed: false,
                        });
                    }
                }
            }
        }
    }
    trials
}

async fn run(system: &System, trial: &Trial) -> Result<(), String> {
    let u = unique();
    let world = World::build(system, World::cast(&u, &trial.me, trial.scope)).await;
    let got = call(system, &world, trial.row, &trial.me).await;
    let what = format!(
        "{} as {} ({})",
        trial.row.name(),
        trial.me.role,
        trial.scope.map_or("no scope", Scope::as_str)
    );
    match (trial.allowed, got) {
        (_, Answer::Invalid(status)) => Err(format!("{what}: the test sent an invalid request: {status:?}")),
        (
            true,
            Answer::Through {
                listed: None | Some(true),
            },
        ) => Ok(()),
        (true, Answer::Through { listed: Some(false) }) => Err(format!("{what}: the record is missing from the list")),
        (true, Answer::Refused(status)) => Err(format!("{what}: refused, the matrix allows it: {status:?}")),
        (false, Answer::Refused(status)) if status.code() == Code::PermissionDenied => Ok(()),
        (false, Answer::Through { listed: Some(false) }) => Ok(()),
        (false, Answer::Refused(status)) => Err(format!("{what}: {status:?}, expected PERMISSION_DENIED")),
        (false, Answer::Through { .. }) => Err(format!("{what}: let through, the matrix refuses it")),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_rpc_as_every_role_in_and_out_of_scope_answers_as_the_matrix_says() {
    let system = System::start().await;
    let trials = trials();
    let failures: Vec<String> = futures::stream::iter(trials.iter())
        .map(|trial| run(&system, trial))
        .buffer_unordered(8)
        .filter_map(|r| async move { r.err() })
        .collect()
        .await;
    let allowed = trials.iter().filter(|t| t.allowed).count();
    println!(
        "tried {} (RPC, role, scope) pairs over {} matrix rows: {allowed} allowed, {} refused; {} disagreed",
        trials.len(),
        MATRIX.len(),
        trials.len() - allowed,
        failures.len()
    );
    system.stop().await;
    assert!(
        failures.is_empty(),
        "{} disagreements:\n{}",
        failures.len(),
        failures.join("\n")
    );
}
