//! casepath's projections fed by the real services: a person reported,
//! screened and identified, a consent and a referral with a shelter need
//! accepted, the bed held by the shelter service and the person admitted, a
//! plan goal added and met; casepath (in this process, its own database)
//! follows the four context streams into its read models. Then: the rows and
//! steps are what the events said, a rebuild and a second application give
//! the same digests, and no identifier typed into the report (nor the
//! shelter's address) is anywhere in casepath's database.

#![allow(clippy::unwrap_used)] // Test code: a failed unwrap is a failed test.

#[path = "../src/casepath_ingest.rs"]
mod casepath_ingest;

use casepath_ingest::{CasepathApp, Mechanism, as_, eventually, rid, uuid};
use chrono::{DateTime, Utc};
use nrm_e2e::{authorized, person, report_request, token};
use nrm_kernel::auth::Role;
use nrm_proto::casepath::v1 as cp;
use nrm_proto::identification::v1 as id;
use nrm_proto::referral::v1 as rf;
use nrm_proto::shelter::v1 as sh;
use prost::Message as _;
use sqlx::Row as _;
use uuid::Uuid;

const POLICE: (&str, Role) = ("kg-mvd", Role::Police);
const MSD: (&str, Role) = ("kg-msd", Role::Msd);
const SHELTER: (&str, Role) = ("kg-shelter-chui", Role::Shelter);
const COORDINATOR: (&str, Role) = ("kg-coordinator", Role::Coordinator);

/// Typed into the report's identifiers and the shelter's address only.
const CANARY_NAME: &str = "Canarybek Zhyldyzovich";
const CANARY_PASSPORT: &str = "CANARY9911";
const CANARY_PHONE: &str = "+996 700 999 111";
const CANARY_ADDRESS: &str = "Kant, Canary lane 99";

/// What the flow made.
struct Flow {
    case_id: String,
    person_id: String,
    consent_id: String,
    referral_id: String,
    shelter_id: String,
    hold_id: String,
    goal_id: String,
}

#[allow(clippy::too_many_lines)]
async fn run_flow(m: &Mechanism) -> Flow {
    let mut ident = m.identification.client.clone();
    let reported = ident
        .report_presumed_victim(authorized(
            report_request(&rid(), person(CANARY_NAME, CANARY_PASSPORT, CANARY_PHONE)),
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

    let mut shelter = m.shelter.client.clone();
    let registered = shelter
        .register_shelter(authorized(
            sh::RegisterShelterRequest {
                request_id: rid(),
                code: "CHUI-CC-1".into(),
                region: "KG-C".into(),
                address: CANARY_ADDRESS.into(),
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

    let mut referral = m.referral.client.clone();
    // The referral service learns the person from identification's stream first.
    let consent = rf::RecordConsentRequest {
        request_id: rid(),
        person_id: reported.person_id.clone(),
        case_id: reported.case_id.clone(),
        given_by: rf::ConsentGiver::Person as i32,
        recipient_agency: MSD.0.into(),
        purposes: vec![rf::ServiceKind::Shelter as i32, rf::ServiceKind::Psychological as i32],
        data_categories: vec![rf::DataCategory::Name as i32],
        ..Default::default()
    };
    let consent_id = eventually("the referral service learns the person", || {
        let mut referral = referral.clone();
        let consent = consent.clone();
        async move { referral.record_consent(authorized(consent, &as_(POLICE))).await }
    })
    .await
    .into_inner()
    .consent_id;
    let request = rf::CreateReferralRequest {
        request_id: rid(),
        person_id: reported.person_id.clone(),
        case_id: reported.case_id.clone(),
        receiving_agency: MSD.0.into(),
        services: vec![rf::ServiceKind::Shelter as i32, rf::ServiceKind::Psychological as i32],
        urgency: rf::Urgency::Urgent as i32,
        consent_id: consent_id.clone(),
        shelter_need: Some(rf::ShelterNeed {
            category: sh::BedCategory::Women as i32,
            region: "KG-C".into(),
        }),
    };
    let created = eventually("the referral accepts the consent", || {
        let mut referral = referral.clone();
        let request = request.clone();
        async move { referral.create_referral(authorized(request, &as_(POLICE))).await }
    })
    .await
    .into_inner();
    referral
        .accept_referral(authorized(
            rf::AcceptReferralRequest {
                request_id: rid(),
                referral_id: created.referral_id.clone(),
                expected_version: 1,
            },
            &as_(MSD),
        ))
        .await
        .unwrap();
    // The shelter service holds a bed (reacting to the acceptance) and the
    // referral service records it (reacting to BedHeld).
    let held = eventually("a bed is held and recorded on the referral", || {
        let mut referral = referral.clone();
        let referral_id = created.referral_id.clone();
        async move {
            let r = referral
                .get_referral(authorized(rf::GetReferralRequest { referral_id }, &as_(MSD)))
                .await?
                .into_inner();
            if r.hold_id.is_empty() {
                Err(tonic::Status::not_found("no hold yet"))
            } else {
                Ok(r)
            }
        }
    })
    .await;
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
    let goal = referral
        .add_plan_goal(authorized(
            rf::AddPlanGoalRequest {
                request_id: rid(),
                person_id: reported.person_id.clone(),
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
                person_id: reported.person_id.clone(),
                goal_id: goal.goal_id.clone(),
            },
            &as_(MSD),
        ))
        .await
        .unwrap();
    Flow {
        case_id: reported.case_id,
        person_id: reported.person_id,
        consent_id,
        referral_id: created.referral_id,
        shelter_id: registered.shelter_id,
        hold_id: held.hold_id,
        goal_id: goal.goal_id,
    }
}

/// The steps of `subject` as stored: (kind, at, source, decoded step), by time.
async fn steps_of(casepath: &CasepathApp, subject: &str) -> Vec<(i32, DateTime<Utc>, String, cp::Step)> {
    steps_in(casepath, subject, "kg").await
}

/// As [`steps_of`], for steps that happened in `country`.
async fn steps_in(casepath: &CasepathApp, subject: &str, country: &str) -> Vec<(i32, DateTime<Utc>, String, cp::Step)> {
    let rows = sqlx::query(
        "SELECT kind, part, at, source, subject_id, step FROM cp_steps WHERE subject_id = $1
         ORDER BY at, stream_sequence, position",
    )
    .bind(uuid(subject))
    .fetch_all(&casepath.pool)
    .await
    .unwrap();
    rows.iter()
        .map(|r| {
            let step = cp::Step::decode(r.get::<Vec<u8>, _>("step").as_slice()).unwrap();
            let at: DateTime<Utc> = r.get("at");
            // The encoded step says what its columns say.
            assert_eq!(step.kind, r.get::<i32, _>("kind"));
            assert_eq!(step.part, r.get::<i32, _>("part"));
            assert_eq!(step.subject_id, subject);
            assert_eq!(step.at.map(|t| t.seconds), Some(at.timestamp()));
            assert!(step.spent.is_none());
            assert_eq!(step.country, country);
            (step.kind, at, r.get::<String, _>("source"), step)
        })
        .collect()
}

fn kinds(steps: &[(i32, DateTime<Utc>, String, cp::Step)]) -> Vec<cp::StepKind> {
    steps.iter().map(|s| cp::StepKind::try_from(s.0).unwrap()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[allow(clippy::too_many_lines)]
async fn casepath_follows_every_stream_into_its_read_models_and_a_rebuild_gives_the_same() {
    let m = Mechanism::start().await;
    let casepath = CasepathApp::spawn_beside(&m.base).await;
    let flow = run_flow(&m).await;
    m.wait_published().await;
    casepath.wait_caught_up().await;

    // The case: identified, nothing due, coded fields only.
    let case = sqlx::query(
        "SELECT person_id, reporting_agency, status, decision, decided_at, decision_waiting_since, reported_at,
                found_at, citizenship, exploitation_forms, possible_duplicate, erased_at
         FROM cp_cases WHERE case_id = $1",
    )
    .bind(uuid(&flow.case_id))
    .fetch_one(&casepath.pool)
    .await
    .unwrap();
    assert_eq!(case.get::<Uuid, _>("person_id"), uuid(&flow.person_id));
    assert_eq!(case.get::<String, _>("reporting_agency"), "kg-mvd");
    assert_eq!(case.get::<i32, _>("status"), id::CaseStatus::Identified as i32);
    assert_eq!(case.get::<i32, _>("decision"), id::Decision::Identified as i32);
    assert!(case.get::<Option<DateTime<Utc>>, _>("decided_at").is_some());
    assert!(case.get::<Option<DateTime<Utc>>, _>("decision_waiting_since").is_none());
    assert_eq!(
        case.get::<Vec<i32>, _>("exploitation_forms"),
        [id::ExploitationForm::Labour as i32]
    );
    assert!(!case.get::<bool, _>("possible_duplicate"));
    assert!(case.get::<Option<DateTime<Utc>>, _>("erased_at").is_none());
    let reported_at: DateTime<Utc> = case.get("reported_at");
    let found_at: DateTime<Utc> = case.get::<Option<DateTime<Utc>>, _>("found_at").unwrap();
    assert!(found_at < reported_at);

    // Its steps: found (at the time found), reported, screened, identified.
    let steps = steps_of(&casepath, &flow.case_id).await;
    assert_eq!(
        kinds(&steps),
        [
            cp::StepKind::Found,
            cp::StepKind::Reported,
            cp::StepKind::Screened,
            cp::StepKind::Identified
        ]
    );
    assert_eq!(steps[0].1, found_at);
    assert_eq!(steps[1].1, reported_at);
    assert_eq!(steps[3].1, case.get::<Option<DateTime<Utc>>, _>("decided_at").unwrap());
    assert!(steps.iter().all(|s| s.2 == "casepath_identification"));
    assert!(
        steps
            .iter()
            .all(|s| s.3.agency == "kg-mvd" && s.3.part == cp::PathPart::Identification as i32)
    );
    let Some(cp::step::Detail::Identification(screened)) = &steps[2].3.detail else {
        panic!("identification detail")
    };
    assert_eq!(screened.indicators, [id::Indicator::DocumentsRetained as i32]);

    // The consent, the referral (accepted: answered, nothing awaited) and their steps.
    let consent = sqlx::query("SELECT person_id, recipient_agency, ended_at FROM cp_consents WHERE consent_id = $1")
        .bind(uuid(&flow.consent_id))
        .fetch_one(&casepath.pool)
        .await
        .unwrap();
    assert_eq!(consent.get::<Uuid, _>("person_id"), uuid(&flow.person_id));
    assert_eq!(consent.get::<String, _>("recipient_agency"), "kg-msd");
    assert!(consent.get::<Option<DateTime<Utc>>, _>("ended_at").is_none());
    assert_eq!(
        kinds(&steps_of(&casepath, &flow.consent_id).await),
        [cp::StepKind::ConsentRecorded]
    );
    let referral = sqlx::query(
        "SELECT person_id, case_id, consent_id, referring_agency, receiving_agency, status, created_at, waiting_since,
                answered_at, accepted_at, answer_due_at
         FROM cp_referrals WHERE referral_id = $1",
    )
    .bind(uuid(&flow.referral_id))
    .fetch_one(&casepath.pool)
    .await
    .unwrap();
    assert_eq!(referral.get::<Uuid, _>("person_id"), uuid(&flow.person_id));
    assert_eq!(referral.get::<Option<Uuid>, _>("case_id"), Some(uuid(&flow.case_id)));
    assert_eq!(
        referral.get::<Option<Uuid>, _>("consent_id"),
        Some(uuid(&flow.consent_id))
    );
    assert_eq!(referral.get::<String, _>("referring_agency"), "kg-mvd");
    assert_eq!(referral.get::<String, _>("receiving_agency"), "kg-msd");
    assert_eq!(referral.get::<String, _>("status"), "accepted");
    assert!(referral.get::<Option<DateTime<Utc>>, _>("waiting_since").is_none());
    assert!(referral.get::<Option<DateTime<Utc>>, _>("answer_due_at").is_some());
    let accepted_at = referral.get::<Option<DateTime<Utc>>, _>("accepted_at").unwrap();
    assert_eq!(
        referral.get::<Option<DateTime<Utc>>, _>("answered_at"),
        Some(accepted_at)
    );
    let referral_steps = steps_of(&casepath, &flow.referral_id).await;
    assert_eq!(
        kinds(&referral_steps),
        [
            cp::StepKind::ReferralSent,
            cp::StepKind::ReferralAccepted,
            cp::StepKind::BedHeld
        ]
    );
    assert_eq!(referral_steps[0].1, referral.get::<DateTime<Utc>, _>("created_at"));
    assert_eq!(referral_steps[1].1, accepted_at);
    assert_eq!(referral_steps[1].3.agency, "kg-msd");

    // The shelter (coded: no address), the hold (for the referral, admitted) and its steps.
    let shelter = sqlx::query("SELECT code, region, operator_agency FROM cp_shelters WHERE shelter_id = $1")
        .bind(uuid(&flow.shelter_id))
        .fetch_one(&casepath.pool)
        .await
        .unwrap();
    assert_eq!(shelter.get::<String, _>("code"), "CHUI-CC-1");
    assert_eq!(shelter.get::<String, _>("operator_agency"), "kg-shelter-chui");
    let hold = sqlx::query(
        "SELECT shelter_id, referral_id, cause_commit_id, holder_agency, status, held_at, admitted_at
         FROM cp_holds WHERE hold_id = $1",
    )
    .bind(uuid(&flow.hold_id))
    .fetch_one(&casepath.pool)
    .await
    .unwrap();
    assert_eq!(hold.get::<Uuid, _>("shelter_id"), uuid(&flow.shelter_id));
    assert_eq!(
        hold.get::<Option<Uuid>, _>("referral_id"),
        Some(uuid(&flow.referral_id))
    );
    assert!(hold.get::<Option<Uuid>, _>("cause_commit_id").is_none());
    assert_eq!(hold.get::<String, _>("holder_agency"), "kg-msd");
    assert_eq!(hold.get::<String, _>("status"), "admitted");
    let admitted_at = hold.get::<Option<DateTime<Utc>>, _>("admitted_at").unwrap();
    let hold_steps = steps_of(&casepath, &flow.hold_id).await;
    assert_eq!(kinds(&hold_steps), [cp::StepKind::BedHeld, cp::StepKind::Admitted]);
    assert_eq!(hold_steps[0].1, hold.get::<DateTime<Utc>, _>("held_at"));
    assert_eq!(hold_steps[1].1, admitted_at);
    assert!(hold_steps.iter().all(|s| s.2 == "casepath_shelter"));
    let Some(cp::step::Detail::Shelter(d)) = &hold_steps[0].3.detail else {
        panic!("shelter detail")
    };
    assert_eq!((d.region.as_str(), d.holder_agency.as_str()), ("KG-C", "kg-msd"));

    // The plan goal, met.
    let goal = sqlx::query("SELECT person_id, kind, met_at FROM cp_goals WHERE goal_id = $1")
        .bind(uuid(&flow.goal_id))
        .fetch_one(&casepath.pool)
        .await
        .unwrap();
    assert_eq!(goal.get::<Uuid, _>("person_id"), uuid(&flow.person_id));
    assert_eq!(goal.get::<i32, _>("kind"), rf::GoalKind::Housing as i32);
    let met_at = goal.get::<Option<DateTime<Utc>>, _>("met_at").unwrap();
    let goal_steps = steps_of(&casepath, &flow.goal_id).await;
    assert_eq!(kinds(&goal_steps), [cp::StepKind::PlanGoalAdded, cp::StepKind::GoalMet]);
    assert_eq!(goal_steps[1].1, met_at);
    assert!(goal_steps.iter().all(|s| s.3.part == cp::PathPart::Plan as i32));

    // Nothing else was written: every step belongs to one of the flow's records.
    let subjects = [
        &flow.case_id,
        &flow.consent_id,
        &flow.referral_id,
        &flow.hold_id,
        &flow.goal_id,
    ]
    .map(|s| uuid(s));
    let stray: i64 = sqlx::query_scalar("SELECT count(*) FROM cp_steps WHERE NOT subject_id = ANY($1)")
        .bind(&subjects[..])
        .fetch_one(&casepath.pool)
        .await
        .unwrap();
    assert_eq!(stray, 0);
    let total: i64 = sqlx::query_scalar("SELECT count(*) FROM cp_steps")
        .fetch_one(&casepath.pool)
        .await
        .unwrap();
    assert_eq!(total, 4 + 1 + 3 + 2 + 2);

    // A rebuild (reset and full replay) gives the same read models.
    let live = casepath.digests().await;
    casepath.rebuild().await;
    assert_eq!(casepath.digests().await, live, "a rebuild changed a read model");
    let after: i64 = sqlx::query_scalar("SELECT count(*) FROM cp_steps")
        .fetch_one(&casepath.pool)
        .await
        .unwrap();
    assert_eq!(after, total);
    // Every event applied once more (past the runner's guards) changes nothing.
    casepath.reapply_all().await;
    assert_eq!(
        casepath.digests().await,
        live,
        "an event applied twice changed a read model"
    );
    // Written one commit at a time, or every commit of a stream in one
    // batch (each row's writes in rounds), the read models come out the same.
    casepath.reset_and_apply(false).await;
    assert_eq!(casepath.digests().await, live, "one commit at a time differs from live");
    casepath.reset_and_apply(true).await;
    assert_eq!(casepath.digests().await, live, "one batch differs from live");

    // No identifier typed into the report, and not the shelter's address,
    // anywhere in casepath's database (its tables and the kernel's).
    for canary in [CANARY_NAME, CANARY_PASSPORT, CANARY_PHONE, CANARY_ADDRESS, "Canary"] {
        let found = casepath.rows_containing(canary).await;
        assert!(found.is_empty(), "{canary} found in casepath: {found:?}");
    }
    // The scan finds what is there (it can fail).
    assert!(!casepath.rows_containing("CHUI-CC-1").await.is_empty());

    casepath.stop().await;
    m.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[allow(clippy::too_many_lines)]
async fn casepath_follows_a_return_and_passes_over_its_crossing_commits() {
    use nrm_e2e::repatriation::{CountryKeys, RepatriationApp, repatriation_settings};
    use nrm_proto::common::v1::EventCommit;
    use nrm_proto::repatriation::v1 as rp;

    // The destination country (ru) opens a return home to kg for a case of its own.
    let (ru, kg) = (CountryKeys::generate("ru"), CountryKeys::generate("kg"));
    let repatriation = RepatriationApp::spawn_with(repatriation_settings(&ru, &[&kg])).await;
    let casepath = CasepathApp::spawn_on(&repatriation.settings.common, "ru").await;
    let iom = token("ru-iom", Role::Iom, "iom-officer-1");
    let case_ref = rid();
    let mut client = repatriation.client.clone();
    let opened = client
        .open_return(authorized(
            rp::OpenReturnRequest {
                request_id: rid(),
                citizenship: "KG".into(),
                identifiers: Some(nrm_e2e::canary::identifiers()),
                gender: nrm_proto::common::v1::Gender::Female as i32,
                age_band: nrm_proto::common::v1::AgeBand::AgeBand1824 as i32,
                form_of_exploitation: "EXPLOITATION_FORM_LABOUR".into(),
                country_of_exploitation: "RU".into(),
                foreign_reference: case_ref.clone(),
                identified_by: "ru-mvd".into(),
                consulate_agency: "kg-consulate-moscow".into(),
            },
            &iom,
        ))
        .await
        .unwrap()
        .into_inner();
    // The consent: the first step that crosses (a sealed commit on the same stream).
    client
        .record_return_consent(authorized(
            rp::RecordReturnConsentRequest {
                request_id: rid(),
                return_id: opened.return_id.clone(),
                expected_version: 1,
                informed_consent_to_return: true,
                shared_fields: vec![rp::SharedField::Identity as i32, rp::SharedField::Needs as i32],
                consent_to_reintegration_referral: true,
                attested_by: "iom-officer-1".into(),
                consent_form_ref: "FORM-2026-7".into(),
            },
            &iom,
        ))
        .await
        .unwrap();
    // Both commits and the crossing one are on the stream before casepath is waited for.
    let on_stream = eventually("the return's commits and its crossing are published", || {
        let repatriation = &repatriation;
        async move {
            let commits: Vec<EventCommit> = repatriation
                .messages()
                .await
                .iter()
                .map(|m| EventCommit::decode(m.payload.as_ref()).unwrap())
                .collect();
            if commits.len() >= 3 {
                Ok(commits)
            } else {
                Err(tonic::Status::not_found("not yet"))
            }
        }
    })
    .await;
    casepath.wait_caught_up().await;

    let row = sqlx::query(
        "SELECT direction, from_country, to_country, opened_by, consulate_agency, foreign_reference, status
         FROM cp_returns WHERE return_id = $1",
    )
    .bind(uuid(&opened.return_id))
    .fetch_one(&casepath.pool)
    .await
    .unwrap();
    assert_eq!(row.get::<i32, _>("direction"), rp::Direction::Outgoing as i32);
    assert_eq!(row.get::<String, _>("from_country"), "ru");
    assert_eq!(row.get::<String, _>("to_country"), "kg");
    assert_eq!(row.get::<String, _>("opened_by"), "ru-iom");
    assert_eq!(row.get::<String, _>("consulate_agency"), "kg-consulate-moscow");
    assert_eq!(row.get::<String, _>("foreign_reference"), case_ref);
    assert_eq!(row.get::<i32, _>("status"), rp::ReturnStatus::Consented as i32);

    // Every commit of the return's own stream is kept; the crossing commit is not.
    let kept: Vec<Uuid> = sqlx::query_scalar("SELECT commit_id FROM cp_return_commits ORDER BY commit_id")
        .fetch_all(&casepath.pool)
        .await
        .unwrap();
    let mut own: Vec<Uuid> = on_stream
        .iter()
        .filter(|c| c.stream_id.starts_with("return-"))
        .map(|c| uuid(&c.commit_id))
        .collect();
    own.sort();
    assert_eq!(own.len(), 2);
    assert_eq!(kept, own);
    assert!(on_stream.iter().any(|c| c.stream_id.starts_with("xborder-")));

    let steps = steps_in(&casepath, &opened.return_id, "ru").await;
    assert_eq!(kinds(&steps), [cp::StepKind::ReturnOpened, cp::StepKind::ReturnConsent]);
    assert!(
        steps
            .iter()
            .all(|s| s.2 == "casepath_repatriation" && s.3.agency == "ru-iom")
    );
    let Some(cp::step::Detail::Return(d)) = &steps[0].3.detail else {
        panic!("return detail")
    };
    assert_eq!((d.from_country.as_str(), d.to_country.as_str()), ("ru", "kg"));

    let live = casepath.digests().await;
    casepath.rebuild().await;
    assert_eq!(casepath.digests().await, live, "a rebuild changed a read model");
    casepath.reapply_all().await;
    assert_eq!(
        casepath.digests().await,
        live,
        "an event applied twice changed a read model"
    );
    // Written one commit at a time, or every commit of a stream in one
    // batch (each row's writes in rounds), the read models come out the same.
    casepath.reset_and_apply(false).await;
    assert_eq!(casepath.digests().await, live, "one commit at a time differs from live");
    casepath.reset_and_apply(true).await;
    assert_eq!(casepath.digests().await, live, "one batch differs from live");

    for canary in nrm_e2e::canary::values() {
        let found = casepath.rows_containing(&canary).await;
        assert!(found.is_empty(), "{canary} found in casepath: {found:?}");
    }

    casepath.stop().await;
    repatriation.stop(&[&kg]).await;
}

/// A return from ru as it crosses to kg after `upto` of its steps
/// (opened, consent, risk, handover), coded only.
fn crossed(return_id: &str, upto: usize) -> nrm_proto::repatriation::v1::CrossBorderReturn {
    use nrm_proto::repatriation::v1 as rp;
    let history = [
        ("ReturnOpened", rp::ReturnStatus::Opened, "ru-iom"),
        ("ReturnConsentRecorded", rp::ReturnStatus::Consented, "ru-iom"),
        ("RiskAssessed", rp::ReturnStatus::Assessed, "ru-iom"),
        ("ReturnHandedOver", rp::ReturnStatus::HandedOver, "ru-iom"),
    ];
    let at = |i: usize| prost_types::Timestamp {
        seconds: 1_700_000_000 + i64::try_from(i).unwrap() * 3600,
        nanos: 0,
    };
    rp::CrossBorderReturn {
        return_id: return_id.to_owned(),
        from_country: "ru".into(),
        to_country: "kg".into(),
        status: history[upto - 1].1 as i32,
        origin_version: upto as u64,
        foreign_reference: "RU-MVD-2026/118".into(),
        received_by: if upto == 4 { "kg-iom".into() } else { String::new() },
        handed_over_at: (upto == 4).then(|| at(3)),
        steps: history[..upto]
            .iter()
            .enumerate()
            .map(|(i, (step, status, agency))| rp::Step {
                step: (*step).to_owned(),
                status_after: *status as i32,
                at: Some(at(i)),
                agency: (*agency).to_owned(),
                origin_version: i as u64 + 1,
            })
            .collect(),
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn at_home_each_crossed_step_is_one_step_however_often_a_snapshot_repeats_it() {
    use nrm_e2e::repatriation::{CountryKeys, RepatriationApp, repatriation_settings};
    use nrm_proto::common::v1::EventCommit;
    use nrm_proto::repatriation::v1 as rp;

    let (ru, kg) = (CountryKeys::generate("ru"), CountryKeys::generate("kg"));
    let settings = repatriation_settings(&kg, &[&ru]);
    RepatriationApp::prepare_inbound(&settings, &ru).await;
    let home = RepatriationApp::spawn_with(settings).await;
    let casepath = CasepathApp::spawn_on(&home.settings.common, "kg").await;
    let here = kg.key.public().clone();
    let return_id = Uuid::now_v7().to_string();
    // Announced after the consent (two steps), then after the handover
    // (all four, repeating the first two).
    home.publish_crossing(&ru, &here, 1, &crossed(&return_id, 2)).await;
    home.publish_crossing(&ru, &here, 2, &crossed(&return_id, 4)).await;
    eventually("the home country records both announcements", || {
        let home = &home;
        let stream_id = format!("return-{return_id}");
        async move {
            let own = home
                .messages()
                .await
                .iter()
                .map(|m| EventCommit::decode(m.payload.as_ref()).unwrap())
                .filter(|c| c.stream_id == stream_id)
                .count();
            if own == 2 {
                Ok(())
            } else {
                Err(tonic::Status::not_found("not yet"))
            }
        }
    })
    .await;
    casepath.wait_caught_up().await;

    let row = sqlx::query(
        "SELECT direction, from_country, to_country, opened_by, received_by, foreign_reference, status, handed_over_at
         FROM cp_returns WHERE return_id = $1",
    )
    .bind(uuid(&return_id))
    .fetch_one(&casepath.pool)
    .await
    .unwrap();
    assert_eq!(row.get::<i32, _>("direction"), rp::Direction::Incoming as i32);
    assert_eq!(row.get::<String, _>("from_country"), "ru");
    assert_eq!(row.get::<String, _>("to_country"), "kg");
    assert_eq!(row.get::<String, _>("opened_by"), "ru-iom");
    assert_eq!(row.get::<String, _>("received_by"), "kg-iom");
    assert_eq!(row.get::<String, _>("foreign_reference"), "RU-MVD-2026/118");
    assert_eq!(row.get::<i32, _>("status"), rp::ReturnStatus::HandedOver as i32);
    assert!(row.get::<Option<DateTime<Utc>>, _>("handed_over_at").is_some());

    let rows = sqlx::query("SELECT kind, at, step FROM cp_steps WHERE subject_id = $1 ORDER BY at, kind")
        .bind(uuid(&return_id))
        .fetch_all(&casepath.pool)
        .await
        .unwrap();
    let steps: Vec<cp::Step> = rows
        .iter()
        .map(|r| cp::Step::decode(r.get::<Vec<u8>, _>("step").as_slice()).unwrap())
        .collect();
    let kinds: Vec<_> = steps.iter().map(|s| cp::StepKind::try_from(s.kind).unwrap()).collect();
    // Four crossed steps (once each, at their own times abroad), and the
    // announcement here, once.
    assert_eq!(
        kinds,
        [
            cp::StepKind::ReturnOpened,
            cp::StepKind::ReturnConsent,
            cp::StepKind::RiskAssessed,
            cp::StepKind::HandedOver,
            cp::StepKind::ReturnAnnounced
        ]
    );
    for (i, step) in steps[..4].iter().enumerate() {
        assert_eq!(step.country, "ru");
        assert_eq!(step.agency, "ru-iom");
        assert_eq!(
            step.at.unwrap().seconds,
            1_700_000_000 + i64::try_from(i).unwrap() * 3600
        );
    }
    assert_eq!(steps[4].country, "kg");
    let Some(cp::step::Detail::Return(handed)) = &steps[3].detail else {
        panic!("return detail")
    };
    assert_eq!(handed.received_by, "kg-iom");
    assert_eq!(handed.direction, rp::Direction::Incoming as i32);

    let live = casepath.digests().await;
    casepath.rebuild().await;
    assert_eq!(casepath.digests().await, live, "a rebuild changed a read model");
    casepath.reapply_all().await;
    assert_eq!(
        casepath.digests().await,
        live,
        "an event applied twice changed a read model"
    );
    // Written one commit at a time, or every commit of a stream in one
    // batch (each row's writes in rounds), the read models come out the same.
    casepath.reset_and_apply(false).await;
    assert_eq!(casepath.digests().await, live, "one commit at a time differs from live");
    casepath.reset_and_apply(true).await;
    assert_eq!(casepath.digests().await, live, "one batch differs from live");

    casepath.stop().await;
    home.stop(&[&ru]).await;
}
