//! The referral mechanism end to end, every service as its own process
//! against the real NATS and PostgreSQL: identification, referral and shelter
//! react to each other's events over JetStream.

#![allow(clippy::unwrap_used)] // Test code: a failed unwrap is a failed test.

use std::future::Future;
use std::time::Duration;

use nrm_e2e::tables::ServiceTables;
use nrm_e2e::{ServiceProcess, authorized, drop_processes_data, person, process_env, report_request, settings, token};
use nrm_kernel::auth::Role;
use nrm_proto::common::v1::personal_data_view::View;
use nrm_proto::identification::v1 as id;
use nrm_proto::referral::v1 as rf;
use nrm_proto::shelter::v1 as sh;
use prost::Message as _;
use tonic::Code;
use tonic::transport::Channel;
use tonic_types::StatusExt as _;

use id::identification_service_client::IdentificationServiceClient;
use rf::referral_service_client::ReferralServiceClient;
use sh::shelter_service_client::ShelterServiceClient;

const POLICE: (&str, Role) = ("kg-mvd", Role::Police);
const MSD: (&str, Role) = ("kg-msd", Role::Msd);
const MOH: (&str, Role) = ("kg-moh", Role::Moh);
const NGO: (&str, Role) = ("kg-ngo-tirek", Role::Ngo);
const SHELTER: (&str, Role) = ("kg-shelter-chui", Role::Shelter);
const COORDINATOR: (&str, Role) = ("kg-coordinator", Role::Coordinator);

fn as_(who: (&str, Role)) -> String {
    token(who.0, who.1, "officer-1")
}

fn now() -> prost_types::Timestamp {
    let since = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap();
    prost_types::Timestamp {
        seconds: i64::try_from(since.as_secs()).unwrap(),
        nanos: 0,
    }
}

fn rid() -> String {
    uuid::Uuid::now_v7().to_string()
}

/// Retries `call` until it succeeds (events take a moment to cross the bus).
async fn eventually<T, F, Fut>(what: &str, mut call: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, tonic::Status>>,
{
    let mut last = None;
    for _ in 0..300 {
        match call().await {
            Ok(value) => return value,
            Err(status) => last = Some(status),
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("{what} did not happen within 15 s: {last:?}");
}

/// Waits until the free-capacity read model shows `beds` free women's beds in
/// KG-C: it follows the shelter stream a moment later (longer on a busy machine).
async fn wait_for_free_women_beds(shelter: &ShelterServiceClient<Channel>, beds: u32, what: &str) {
    eventually(what, || {
        let mut shelter = shelter.clone();
        async move {
            let free = shelter
                .list_free_capacity(authorized(
                    sh::ListFreeCapacityRequest {
                        region: "KG-C".into(),
                        category: sh::BedCategory::Women as i32,
                    },
                    &as_(MSD),
                ))
                .await?
                .into_inner();
            match free.entries.iter().map(|e| e.free).sum::<u32>() {
                n if n == beds => Ok(()),
                n => Err(tonic::Status::failed_precondition(format!("{n} free"))),
            }
        }
    })
    .await;
}

fn precondition(status: &tonic::Status) -> String {
    assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}");
    status.get_details_precondition_failure().unwrap().violations[0]
        .r#type
        .clone()
}

struct System {
    base: nrm_identification::config::Settings,
    identification: ServiceProcess,
    referral: ServiceProcess,
    shelter: ServiceProcess,
}

impl System {
    fn start(referral_extra: &[(&str, &str)]) -> Self {
        let base = settings();
        let identification = ServiceProcess::start("identification", process_env(&base, "identification", &[]));
        let referral = ServiceProcess::start("referral", process_env(&base, "referral", referral_extra));
        let shelter = ServiceProcess::start(
            "shelter",
            process_env(&base, "shelter", &[("NRM_SHELTER__TIMER_POLL_MS", "100")]),
        );
        Self {
            base,
            identification,
            referral,
            shelter,
        }
    }

    async fn identification(&self) -> IdentificationServiceClient<Channel> {
        IdentificationServiceClient::new(self.identification.channel().await)
    }

    async fn referral(&self) -> ReferralServiceClient<Channel> {
        ReferralServiceClient::new(self.referral.channel().await)
    }

    async fn shelter(&self) -> ShelterServiceClient<Channel> {
        ShelterServiceClient::new(self.shelter.channel().await)
    }

    /// Every table of the referral process's database.
    async fn referral_tables(&self) -> ServiceTables {
        let mut database = self.base.database.clone();
        database.name = format!("{}_referral", self.base.database.name);
        ServiceTables::referral(&database, &self.base.nats.url).await
    }

    /// Reports, screens and identifies a person; returns (case_id, person_id).
    async fn identified_person(&self) -> (String, String) {
        let mut ident = self.identification().await;
        let reported = ident
            .report_presumed_victim(authorized(
                report_request(&rid(), person("Aigul Asanova", "AC1234567", "+996 555 000 111")),
                &as_(POLICE),
            ))
            .await
            .unwrap()
            .into_inner();
        ident
            .complete_screening(authorized(
                id::CompleteScreeningRequest {
                    request_id: rid(),
                    case_id: reported.case_id.clone(),
                    expected_version: 1,
                    indicators: vec![id::Indicator::DocumentsRetained as i32],
                },
                &as_(POLICE),
            ))
            .await
            .unwrap();
        ident
            .decide_identification(authorized(
                id::DecideIdentificationRequest {
                    request_id: rid(),
                    case_id: reported.case_id.clone(),
                    expected_version: 2,
                    decision: id::Decision::Identified as i32,
                    ..Default::default()
                },
                &as_(POLICE),
            ))
            .await
            .unwrap();
        (reported.case_id, reported.person_id)
    }

    /// Records a consent once the referral service knows the person (it
    /// learns of it from identification's stream, a moment after the report).
    async fn consent(&self, case_id: &str, person_id: &str, agency: &str, purposes: &[rf::ServiceKind]) -> String {
        let referral = self.referral().await;
        let request = || rf::RecordConsentRequest {
            // A fresh request ID each time: a refusal is the answer of its ID.
            request_id: rid(),
            person_id: person_id.to_owned(),
            case_id: case_id.to_owned(),
            given_by: rf::ConsentGiver::Person as i32,
            recipient_agency: agency.to_owned(),
            purposes: purposes.iter().map(|p| *p as i32).collect(),
            data_categories: vec![rf::DataCategory::Name as i32, rf::DataCategory::Phone as i32],
            ..Default::default()
        };
        eventually("the referral service learns the person", || {
            let mut referral = referral.clone();
            let request = request();
            async move {
                referral
                    .record_consent(authorized(request, &as_(POLICE)))
                    .await
                    .map(|r| r.into_inner().consent_id)
            }
        })
        .await
    }

    /// Creates a referral once the referral service knows the person.
    async fn refer(&self, request: rf::CreateReferralRequest) -> rf::CreateReferralResponse {
        let mut referral = self.referral().await;
        eventually("the referral service learns the person", || {
            let mut referral = referral.clone();
            let request = request.clone();
            async move { referral.create_referral(authorized(request, &as_(POLICE))).await }
        })
        .await;
        // The first success is the answer; a retry with the same request ID replays it.
        referral
            .create_referral(authorized(request, &as_(POLICE)))
            .await
            .unwrap()
            .into_inner()
    }

    async fn get_referral(&self, referral_id: &str, who: (&str, Role)) -> rf::Referral {
        self.referral()
            .await
            .get_referral(authorized(
                rf::GetReferralRequest {
                    referral_id: referral_id.to_owned(),
                },
                &as_(who),
            ))
            .await
            .unwrap()
            .into_inner()
    }

    async fn stop(self) {
        let base = self.base.clone();
        drop(self);
        drop_processes_data(&base, &["identification", "referral", "shelter"]).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_person_goes_from_report_to_shelter_services_and_closure_across_all_services() {
    let system = System::start(&[]);
    let (case_id, person_id) = system.identified_person().await;

    // A shelter in Chüy with two women's beds.
    let mut shelter = system.shelter().await;
    let registered = shelter
        .register_shelter(authorized(
            sh::RegisterShelterRequest {
                request_id: rid(),
                code: "CHUI-CC-1".into(),
                region: "KG-C".into(),
                address: "Kant, secret street 7".into(),
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
    // The coordinator approves it: only then does it take referrals.
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
    // Placement decides on the shelters' own state: no need to wait for the
    // free-capacity read model before the referral is accepted.

    // Consent for MSD and MoH; urgent referral to MSD with a shelter need, normal one to MoH.
    let msd_consent = system
        .consent(
            &case_id,
            &person_id,
            MSD.0,
            &[
                rf::ServiceKind::Shelter,
                rf::ServiceKind::Psychological,
                rf::ServiceKind::Legal,
            ],
        )
        .await;
    let moh_consent = system
        .consent(&case_id, &person_id, MOH.0, &[rf::ServiceKind::Medical])
        .await;
    let ngo_consent = system
        .consent(&case_id, &person_id, NGO.0, &[rf::ServiceKind::Medical])
        .await;
    let to_msd = system
        .refer(rf::CreateReferralRequest {
            request_id: rid(),
            person_id: person_id.clone(),
            case_id: case_id.clone(),
            receiving_agency: MSD.0.into(),
            services: vec![
                rf::ServiceKind::Shelter as i32,
                rf::ServiceKind::Psychological as i32,
                rf::ServiceKind::Legal as i32,
            ],
            urgency: rf::Urgency::Urgent as i32,
            consent_id: msd_consent.clone(),
            shelter_need: Some(rf::ShelterNeed {
                category: sh::BedCategory::Women as i32,
                region: "KG-C".into(),
            }),
        })
        .await;
    let to_moh = system
        .refer(rf::CreateReferralRequest {
            request_id: rid(),
            person_id: person_id.clone(),
            case_id: case_id.clone(),
            receiving_agency: MOH.0.into(),
            services: vec![rf::ServiceKind::Medical as i32],
            urgency: rf::Urgency::Normal as i32,
            consent_id: moh_consent.clone(),
            shelter_need: None,
        })
        .await;

    // MSD sees it in its inbox (coded fields only) and accepts.
    let mut referral = system.referral().await;
    let inbox = eventually("the referral reaches MSD's inbox", || {
        let mut referral = referral.clone();
        async move {
            let inbox = referral
                .list_inbox(authorized(rf::ListInboxRequest::default(), &as_(MSD)))
                .await?
                .into_inner();
            if inbox.referrals.is_empty() {
                Err(tonic::Status::not_found("empty inbox"))
            } else {
                Ok(inbox)
            }
        }
    })
    .await;
    assert_eq!(inbox.referrals[0].referral_id, to_msd.referral_id);
    referral
        .accept_referral(authorized(
            rf::AcceptReferralRequest {
                request_id: rid(),
                referral_id: to_msd.referral_id.clone(),
                expected_version: 1,
            },
            &as_(MSD),
        ))
        .await
        .unwrap();

    // The shelter service holds a bed (reacting to ReferralAccepted), and the
    // referral service records it (reacting to BedHeld).
    let held = eventually("a bed is held and recorded on the referral", || async {
        let r = system.get_referral(&to_msd.referral_id, MSD).await;
        if r.hold_id.is_empty() {
            Err(tonic::Status::not_found("no hold yet"))
        } else {
            Ok(r)
        }
    })
    .await;
    assert_eq!(held.shelter_id, registered.shelter_id);
    // The free-capacity read model follows the shelter stream a moment later.
    wait_for_free_women_beds(&shelter, 1, "the held bed no longer shows as free").await;

    // MSD now reads the identifiers the consent covers.
    let ident = system.identification().await;
    let personal = eventually("MSD may read the consented identifiers", || {
        let mut ident = ident.clone();
        let person_id = person_id.clone();
        async move {
            ident
                .get_personal_data(authorized(
                    id::GetPersonalDataRequest {
                        person_id,
                        purpose: "shelter placement".into(),
                        ..Default::default()
                    },
                    &as_(MSD),
                ))
                .await
        }
    })
    .await
    .into_inner();
    let Some(View::Identifiers(identifiers)) = personal.personal.unwrap().view else {
        panic!("identifiers");
    };
    assert_eq!(identifiers.full_name, "Aigul Asanova");
    assert!(identifiers.documents.is_empty());

    // The shelter admits; MSD records services, a plan goal met, and closes.
    shelter
        .admit(authorized(
            sh::AdmitRequest {
                request_id: rid(),
                shelter_id: registered.shelter_id.clone(),
                hold_id: held.hold_id.clone(),
            },
            &as_(SHELTER),
        ))
        .await
        .unwrap();
    let version = system.get_referral(&to_msd.referral_id, MSD).await.version;
    let delivered = referral
        .record_service_delivered(authorized(
            rf::RecordServiceDeliveredRequest {
                request_id: rid(),
                referral_id: to_msd.referral_id.clone(),
                expected_version: version,
                kind: rf::ServiceKind::Psychological as i32,
                delivered_at: Some(now()),
                provider: "MSD-PSY-BISHKEK".into(),
            },
            &as_(MSD),
        ))
        .await
        .unwrap()
        .into_inner();
    let goal = referral
        .add_plan_goal(authorized(
            rf::AddPlanGoalRequest {
                request_id: rid(),
                person_id: person_id.clone(),
                kind: rf::GoalKind::Housing as i32,
                due_at: None,
            },
            &as_(MSD),
        ))
        .await
        .unwrap()
        .into_inner();
    referral
        .mark_goal_met(authorized(
            rf::MarkGoalMetRequest {
                request_id: rid(),
                person_id: person_id.clone(),
                goal_id: goal.goal_id.clone(),
            },
            &as_(MSD),
        ))
        .await
        .unwrap();
    referral
        .close_referral(authorized(
            rf::CloseReferralRequest {
                request_id: rid(),
                referral_id: to_msd.referral_id.clone(),
                expected_version: delivered.version,
                outcome: rf::ReferralOutcome::ServicesCompleted as i32,
            },
            &as_(MSD),
        ))
        .await
        .unwrap();
    let closed = system.get_referral(&to_msd.referral_id, MSD).await;
    assert_eq!(closed.status, rf::ReferralStatus::Closed as i32);

    // MoH declines with a reason; the referrer redirects to an NGO, which accepts.
    referral
        .decline_referral(authorized(
            rf::DeclineReferralRequest {
                request_id: rid(),
                referral_id: to_moh.referral_id.clone(),
                expected_version: 1,
                reason: rf::DeclineReason::NoCapacity as i32,
            },
            &as_(MOH),
        ))
        .await
        .unwrap();
    let tables = system.referral_tables().await;
    let before = tables.snapshot().await;
    let accept_declined = referral
        .accept_referral(authorized(
            rf::AcceptReferralRequest {
                request_id: rid(),
                referral_id: to_moh.referral_id.clone(),
                expected_version: 2,
            },
            &as_(MOH),
        ))
        .await
        .unwrap_err();
    assert_eq!(precondition(&accept_declined), "NOT_AWAITING_ANSWER");
    // The refusal is audited, and nothing else written.
    tables
        .assert_changed_only_since(&before, &["audit_log"], "accepting a declined referral")
        .await;
    referral
        .redirect_referral(authorized(
            rf::RedirectReferralRequest {
                request_id: rid(),
                referral_id: to_moh.referral_id.clone(),
                expected_version: 2,
                receiving_agency: NGO.0.into(),
                consent_id: ngo_consent,
            },
            &as_(POLICE),
        ))
        .await
        .unwrap();
    referral
        .accept_referral(authorized(
            rf::AcceptReferralRequest {
                request_id: rid(),
                referral_id: to_moh.referral_id.clone(),
                expected_version: 3,
            },
            &as_(NGO),
        ))
        .await
        .unwrap();

    // A second MoH referral, accepted; MoH reads; then the person withdraws consent for MoH.
    let moh_again = system
        .refer(rf::CreateReferralRequest {
            request_id: rid(),
            person_id: person_id.clone(),
            case_id: case_id.clone(),
            receiving_agency: MOH.0.into(),
            services: vec![rf::ServiceKind::Medical as i32],
            urgency: rf::Urgency::Urgent as i32,
            consent_id: moh_consent.clone(),
            shelter_need: None,
        })
        .await;
    referral
        .accept_referral(authorized(
            rf::AcceptReferralRequest {
                request_id: rid(),
                referral_id: moh_again.referral_id.clone(),
                expected_version: 1,
            },
            &as_(MOH),
        ))
        .await
        .unwrap();
    let moh_read = || {
        let mut ident = ident.clone();
        let person_id = person_id.clone();
        async move {
            ident
                .get_personal_data(authorized(
                    id::GetPersonalDataRequest {
                        person_id,
                        purpose: "treatment".into(),
                        ..Default::default()
                    },
                    &as_(MOH),
                ))
                .await
        }
    };
    eventually("MoH may read after accepting", moh_read).await;
    referral
        .withdraw_consent(authorized(
            rf::WithdrawConsentRequest {
                request_id: rid(),
                consent_id: moh_consent.clone(),
            },
            &as_(POLICE),
        ))
        .await
        .unwrap();
    let cancelled = system.get_referral(&moh_again.referral_id, MOH).await;
    assert_eq!(cancelled.status, rf::ReferralStatus::Cancelled as i32);
    let mut denied = None;
    for _ in 0..300 {
        if let Err(status) = moh_read().await {
            denied = Some(status);
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(denied.expect("MoH loses access").code(), Code::PermissionDenied);
    let before = tables.snapshot().await;
    let refused = referral
        .create_referral(authorized(
            rf::CreateReferralRequest {
                request_id: rid(),
                person_id: person_id.clone(),
                case_id: case_id.clone(),
                receiving_agency: MOH.0.into(),
                services: vec![rf::ServiceKind::Medical as i32],
                urgency: rf::Urgency::Normal as i32,
                consent_id: moh_consent,
                shelter_need: None,
            },
            &as_(POLICE),
        ))
        .await
        .unwrap_err();
    assert_eq!(precondition(&refused), "NO_CONSENT");
    tables
        .assert_changed_only_since(&before, &["audit_log"], "a referral under a withdrawn consent")
        .await;
    tables.close().await;
    system.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unanswered_referral_is_escalated_once_even_when_the_referral_service_restarts_while_it_waits() {
    let mut system = System::start(&[("NRM_REFERRAL__URGENT_DEADLINE_SECONDS", "3")]);
    let (case_id, person_id) = system.identified_person().await;
    let consent = system
        .consent(&case_id, &person_id, MSD.0, &[rf::ServiceKind::Psychological])
        .await;
    let created = system
        .refer(rf::CreateReferralRequest {
            request_id: rid(),
            person_id: person_id.clone(),
            case_id,
            receiving_agency: MSD.0.into(),
            services: vec![rf::ServiceKind::Psychological as i32],
            urgency: rf::Urgency::Urgent as i32,
            consent_id: consent,
            shelter_need: None,
        })
        .await;

    // The referral service dies (SIGKILL) while the deadline runs, and comes back after it passed.
    let due = created.answer_due_at.unwrap().seconds;
    system.referral.kill();
    while std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
        <= u64::try_from(due).unwrap()
    {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    system.referral = system.referral.kill_and_restart();

    let escalated = eventually("the overdue referral reaches the coordinator", || async {
        let inbox = system
            .referral()
            .await
            .list_inbox(authorized(
                rf::ListInboxRequest {
                    overdue_only: true,
                    ..Default::default()
                },
                &as_(COORDINATOR),
            ))
            .await?
            .into_inner();
        if inbox.referrals.is_empty() {
            Err(tonic::Status::not_found("nothing overdue yet"))
        } else {
            Ok(inbox)
        }
    })
    .await;
    assert_eq!(escalated.referrals.len(), 1);
    assert_eq!(escalated.referrals[0].referral_id, created.referral_id);
    assert!(escalated.referrals[0].overdue);

    // Exactly one escalation on the bus, also after another SIGKILL and
    // restart: once the restarted service is quiescent (its outbox empty, no
    // due timer unfired) and no timer is left unfired at all, nothing more
    // can be published.
    system.referral = system.referral.kill_and_restart();
    let tables = system.referral_tables().await;
    tables.wait_until_quiescent().await;
    let unfired: i64 = sqlx::query_scalar("SELECT count(*) FROM timers WHERE fired_at IS NULL")
        .fetch_one(tables.pool())
        .await
        .unwrap();
    assert_eq!(unfired, 0, "no deadline is left to fire");
    tables.close().await;
    let nats = async_nats::connect(system.base.nats.url.as_str()).await.unwrap();
    let js = async_nats::jetstream::new(nats);
    let messages = nrm_e2e::messages(&js, &format!("{}_REFERRAL", system.base.nats.stream_prefix)).await;
    let overdue = messages
        .iter()
        .filter_map(|m| nrm_proto::common::v1::EventCommit::decode(m.payload.as_ref()).ok())
        .flat_map(|c| c.events)
        .filter(|e| e.event_type == "ReferralOverdue")
        .count();
    assert_eq!(overdue, 1);
    system.stop().await;
}
