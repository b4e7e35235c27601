//! casepath's query API against a real PostgreSQL and the casepath binary,
//! with the `cp_*` tables seeded by SQL here (as the projections would fill
//! them): each role sees exactly the parts of a path the matrix grants it
//! and no other step; an agency out of scope is refused; the inbox's order
//! and deadlines on a calendar with a public holidays file; publishable
//! statistics with a small cell and its complement suppressed and the totals
//! right; a watch that follows a seeded change and ends when the caller sees
//! nothing any more.

#![allow(clippy::unwrap_used)] // Test code: a failed unwrap is a failed test.

use std::collections::BTreeSet;
use std::time::Duration;

use chrono::{DateTime, TimeDelta, Utc};
use futures::StreamExt as _;
use nrm_e2e::casepath_seed::{
    CaseSeed, Casepath, Client, StepSeed, consent, derive_facts, insert_step, notify, notify_touched, referral, step,
};
use nrm_e2e::{authorized, bad_fields, token};
use nrm_kernel::auth::Role;
use nrm_kernel::validate::{timestamp, to_datetime};
use nrm_proto::casepath::v1 as pb;
use pb::{PathPart as P, StepKind as K};
use sqlx::PgPool;
use tonic::{Code, Status};
use uuid::Uuid;

fn t(text: &str) -> DateTime<Utc> {
    DateTime::parse_from_rfc3339(text).unwrap().with_timezone(&Utc)
}

/// A person with a record in every part, seen differently by every role.
struct Scenario {
    person: Uuid,
    case: Uuid,
    to_msd: Uuid,
    to_moh: Uuid,
    hold: Uuid,
}

async fn seed_scenario(pool: &PgPool) -> Scenario {
    let person = Uuid::now_v7();
    let ret = Uuid::now_v7();
    let mut case = CaseSeed::new(person, "kg-mvd", "kg-prosecutor", t("2026-03-02T04:00:00Z"));
    case.status = 3;
    case.return_id = Some(ret);
    case.decided_at = Some(t("2026-03-04T04:00:00Z"));
    case.insert(pool).await;
    let k_msd = consent(pool, person, case.case_id, "kg-msd").await;
    let k_moh = consent(pool, person, case.case_id, "kg-moh").await;
    let to_msd = referral(
        pool,
        person,
        "kg-mvd",
        "kg-msd",
        Some(k_msd),
        "accepted",
        t("2026-03-05T04:00:00Z"),
        None,
    )
    .await;
    let to_moh = referral(
        pool,
        person,
        "kg-mvd",
        "kg-moh",
        Some(k_moh),
        "pending",
        t("2026-03-06T04:00:00Z"),
        Some(t("2026-03-09T04:00:00Z")),
    )
    .await;
    let shelter = Uuid::now_v7();
    sqlx::query("INSERT INTO cp_shelters (shelter_id, code, region, operator_agency) VALUES ($1, 'SH-1', 'KG-C', 'kg-shelter-1')")
        .bind(shelter)
        .execute(pool)
        .await
        .unwrap();
    let hold = Uuid::now_v7();
    sqlx::query(
        "INSERT INTO cp_holds (hold_id, shelter_id, referral_id, holder_agency, category, held_at, status, admitted_at) \
         VALUES ($1, $2, $3, 'kg-msd', 1, $4, 'admitted', $5)",
    )
    .bind(hold)
    .bind(shelter)
    .bind(to_msd)
    .bind(t("2026-03-05T04:30:00Z"))
    .bind(t("2026-03-07T04:00:00Z"))
    .execute(pool)
    .await
    .unwrap();
    sqlx::query(
        "INSERT INTO cp_returns (return_id, direction, from_country, to_country, opened_by, consulate_agency, \
         foreign_reference, status, opened_at, handed_over_at) \
         VALUES ($1, 2, 'ru', 'kg', 'ru-iom', 'kg-consulate-moscow', '', 10, $2, $3)",
    )
    .bind(ret)
    .bind(t("2026-03-08T04:00:00Z"))
    .bind(t("2026-03-09T04:00:00Z"))
    .execute(pool)
    .await
    .unwrap();
    let goal = Uuid::now_v7();
    sqlx::query("INSERT INTO cp_goals (goal_id, person_id, kind, added_at) VALUES ($1, $2, 1, $3)")
        .bind(goal)
        .bind(person)
        .bind(t("2026-03-10T04:00:00Z"))
        .execute(pool)
        .await
        .unwrap();
    // An unrelated person's step must never show.
    insert_step(
        pool,
        step(
            Uuid::now_v7(),
            P::Identification,
            K::Reported,
            t("2026-03-02T05:00:00Z"),
            1,
        ),
    )
    .await;

    let c = case.case_id;
    let reported = Uuid::now_v7();
    let identified = pb::step::Detail::Identification(pb::IdentificationDetail {
        case_id: c.to_string(),
        possible_duplicate: true,
        ..pb::IdentificationDetail::default()
    });
    insert_step(
        pool,
        StepSeed {
            commit: reported,
            position: 1,
            ..step(c, P::Identification, K::Reported, t("2026-03-02T04:00:00Z"), 1)
        },
    )
    .await;
    insert_step(
        pool,
        StepSeed {
            commit: reported,
            position: 0,
            ..step(c, P::Identification, K::Found, t("2026-03-02T04:00:00Z"), 1)
        },
    )
    .await;
    insert_step(
        pool,
        step(c, P::Identification, K::Screened, t("2026-03-03T04:00:00Z"), 2),
    )
    .await;
    insert_step(
        pool,
        StepSeed {
            detail: Some(identified),
            ..step(c, P::Identification, K::Identified, t("2026-03-04T04:00:00Z"), 3)
        },
    )
    .await;
    insert_step(
        pool,
        step(k_msd, P::Consents, K::ConsentRecorded, t("2026-03-04T05:00:00Z"), 1),
    )
    .await;
    insert_step(
        pool,
        step(k_moh, P::Consents, K::ConsentRecorded, t("2026-03-04T06:00:00Z"), 2),
    )
    .await;
    insert_step(
        pool,
        step(to_msd, P::Referrals, K::ReferralSent, t("2026-03-05T04:00:00Z"), 3),
    )
    .await;
    let accepted = Uuid::now_v7();
    insert_step(
        pool,
        StepSeed {
            commit: accepted,
            ..step(to_msd, P::Referrals, K::ReferralAccepted, t("2026-03-05T05:00:00Z"), 4)
        },
    )
    .await;
    // The shelter's clock is behind: the bed held because of the acceptance
    // carries an earlier time, and must still come after it.
    insert_step(
        pool,
        StepSeed {
            cause: Some(accepted),
            ..step(hold, P::Shelter, K::BedHeld, t("2026-03-05T04:30:00Z"), 1)
        },
    )
    .await;
    insert_step(
        pool,
        step(to_moh, P::Referrals, K::ReferralSent, t("2026-03-06T04:00:00Z"), 5),
    )
    .await;
    insert_step(pool, step(hold, P::Shelter, K::Admitted, t("2026-03-07T04:00:00Z"), 2)).await;
    insert_step(
        pool,
        step(ret, P::Return, K::ReturnAnnounced, t("2026-03-08T04:00:00Z"), 1),
    )
    .await;
    insert_step(pool, step(ret, P::Return, K::HandedOver, t("2026-03-09T04:00:00Z"), 2)).await;
    insert_step(
        pool,
        step(goal, P::Plan, K::PlanGoalAdded, t("2026-03-10T04:00:00Z"), 6),
    )
    .await;
    Scenario {
        person,
        case: c,
        to_msd,
        to_moh,
        hold,
    }
}

async fn get_path(client: &mut Client, person: &str, token: &str) -> Result<pb::Path, Status> {
    client
        .get_path(authorized(
            pb::GetPathRequest {
                person_id: person.into(),
            },
            token,
        ))
        .await
        .map(tonic::Response::into_inner)
}

fn parts(path: &pb::Path) -> Vec<P> {
    path.parts.iter().map(|p| P::try_from(*p).unwrap()).collect()
}

fn signature(steps: &[pb::Step]) -> Vec<(P, K, String)> {
    steps
        .iter()
        .map(|s| {
            (
                P::try_from(s.part).unwrap(),
                K::try_from(s.kind).unwrap(),
                s.subject_id.clone(),
            )
        })
        .collect()
}

#[tokio::test]
async fn each_role_sees_exactly_the_parts_the_matrix_grants_and_no_other_step() {
    let app = Casepath::start(&[]).await;
    let mut client = app.client.clone();
    let s = seed_scenario(&app.pool).await;
    let person = s.person.to_string();

    // The coordinator: everything, in order, with durations and stages.
    let full = get_path(&mut client, &person, &token("kg-coordinator", Role::Coordinator, "c-1"))
        .await
        .unwrap();
    assert_eq!(
        parts(&full),
        vec![
            P::Person,
            P::Identification,
            P::Consents,
            P::Referrals,
            P::Shelter,
            P::Return,
            P::Plan
        ]
    );
    let kinds: Vec<K> = full.steps.iter().map(|s| K::try_from(s.kind).unwrap()).collect();
    assert_eq!(
        kinds,
        vec![
            K::Found,
            K::Reported,
            K::Screened,
            K::Identified,
            K::ConsentRecorded,
            K::ConsentRecorded,
            K::ReferralSent,
            K::ReferralAccepted,
            K::BedHeld,
            K::ReferralSent,
            K::Admitted,
            K::ReturnAnnounced,
            K::HandedOver,
            K::PlanGoalAdded,
        ],
        "ordered by time, the caused bed after its cause, ties by position"
    );
    assert_eq!(
        full.steps[2].spent,
        Some(prost_types::Duration {
            seconds: 86_400,
            nanos: 0
        })
    );
    assert!(
        full.steps.last().unwrap().spent.as_ref().unwrap().seconds > 0,
        "the last step runs to now"
    );
    assert_eq!(full.stage, pb::Stage::Reintegrating as i32);
    assert!(!full.stages.is_empty());
    assert_eq!(full.stages[0].stage, pb::Stage::Reported as i32);
    assert_eq!(full.person.as_ref().unwrap().citizenship, "kg");
    assert_eq!(full.as_of, Some(timestamp(t("2026-03-10T04:00:00Z"))));
    assert_eq!(full.waiting.len(), 1, "the referral waiting for MoH");
    assert_eq!(full.waiting[0].subject_id, s.to_moh.to_string());
    assert!(full.waiting[0].overdue);
    let dup = |p: &pb::Path| {
        p.steps
            .iter()
            .any(|s| matches!(&s.detail, Some(pb::step::Detail::Identification(d)) if d.possible_duplicate))
    };
    assert!(dup(&full));

    let (msd, moh, c) = (s.to_msd.to_string(), s.to_moh.to_string(), s.case.to_string());
    let _ = c;
    // role, agency, parts, the referrals it sees.
    let table: Vec<(Role, &str, Vec<P>, Vec<&str>)> = vec![
        (
            Role::Police,
            "kg-mvd",
            vec![P::Person, P::Identification, P::Consents, P::Referrals],
            vec![&msd, &moh],
        ),
        (
            Role::Prosecutor,
            "kg-prosecutor",
            vec![P::Person, P::Identification, P::Consents],
            vec![],
        ),
        (
            Role::Msd,
            "kg-msd",
            vec![P::Person, P::Referrals, P::Shelter, P::Return, P::Plan],
            vec![&msd],
        ),
        (Role::Moh, "kg-moh", vec![P::Referrals], vec![&moh]),
        (Role::Shelter, "kg-shelter-1", vec![P::Shelter], vec![]),
        (Role::Iom, "kg-iom", vec![P::Return], vec![]),
        (Role::Consulate, "kg-consulate-moscow", vec![P::Return], vec![]),
    ];
    println!("| role | agency | parts | steps |");
    for (role, agency, want, referrals) in &table {
        let path = get_path(&mut client, &person, &token(agency, *role, "o-1"))
            .await
            .unwrap();
        println!("| {role} | {agency} | {:?} | {} |", parts(&path), path.steps.len());
        assert_eq!(&parts(&path), want, "{role}");
        let expected: Vec<(P, K, String)> = signature(&full.steps)
            .into_iter()
            .filter(|(p, _, subject)| want.contains(p) && (*p != P::Referrals || referrals.contains(&subject.as_str())))
            .collect();
        assert_eq!(signature(&path.steps), expected, "{role}: exactly its steps");
        assert_eq!(path.person.is_some(), want.contains(&P::Person), "{role}");
        assert_eq!(
            path.stage != 0,
            want.contains(&P::Identification),
            "{role}: stage only with identification"
        );
        assert!(path.stages.is_empty(), "{role}: stages are the coordinator's");
        // The stage and `as_of` come from the steps the role sees: the last
        // of them, never a later one of a part it does not see.
        let last_seen = path
            .steps
            .iter()
            .filter_map(|s| s.at)
            .max_by_key(|t| (t.seconds, t.nanos));
        assert_eq!(path.as_of, last_seen, "{role}: as_of of its own steps");
        if !want.contains(&P::Plan) {
            assert_ne!(
                path.stage,
                pb::Stage::Reintegrating as i32,
                "{role}: not the plan's stage"
            );
        }
        assert_eq!(
            dup(&path),
            *role == Role::Prosecutor,
            "{role}: possible_duplicate is the authority's"
        );
        let waiting: Vec<&str> = path.waiting.iter().map(|w| w.subject_id.as_str()).collect();
        let want_waiting: Vec<&str> = if referrals.contains(&moh.as_str()) {
            vec![&moh]
        } else {
            vec![]
        };
        assert_eq!(waiting, want_waiting, "{role}: waiting in the parts shown");
    }
    for (role, agency) in [(Role::Auditor, "kg-audit"), (Role::Operator, "kg-ops")] {
        let refused = get_path(&mut client, &person, &token(agency, role, "o-1"))
            .await
            .unwrap_err();
        assert_eq!(refused.code(), Code::PermissionDenied, "{role}");
    }
    // An agency out of scope, and the same answer for an unknown person.
    let stranger = token("kg-mvd-osh", Role::Police, "o-2");
    let refused = get_path(&mut client, &person, &stranger).await.unwrap_err();
    assert_eq!(refused.code(), Code::PermissionDenied);
    let unknown = Uuid::now_v7().to_string();
    let refused_unknown = get_path(&mut client, &unknown, &stranger).await.unwrap_err();
    assert_eq!(refused_unknown.code(), Code::PermissionDenied);
    assert_eq!(refused.message(), refused_unknown.message(), "no oracle");
    let coordinator = token("kg-coordinator", Role::Coordinator, "c-1");
    assert_eq!(
        get_path(&mut client, &unknown, &coordinator).await.unwrap_err().code(),
        Code::NotFound
    );
    let bad = get_path(&mut client, "Aigerim Bekova", &coordinator).await.unwrap_err();
    assert_eq!(bad_fields(&bad), vec!["person_id"]);
    assert!(!bad.message().contains("Aigerim"));

    // Every answered path is audited, under the person, with its parts.
    let audited: Vec<(String, String, String)> = sqlx::query_as(
        "SELECT agency, action, purpose FROM audit_log WHERE person_id = $1 AND outcome = 'ok' ORDER BY seq",
    )
    .bind(s.person)
    .fetch_all(&app.pool)
    .await
    .unwrap();
    assert_eq!(audited.len(), 1 + table.len());
    assert_eq!(
        audited[0],
        (
            "kg-coordinator".into(),
            "GetPath".into(),
            "PATH:person+identification+consents+referrals+shelter+return+plan".into()
        )
    );
    assert!(audited.contains(&("kg-moh".into(), "GetPath".into(), "PATH:referrals".into())));
    let denied: i64 = sqlx::query_scalar("SELECT count(*) FROM audit_log WHERE person_id = $1 AND outcome = 'denied'")
        .bind(s.person)
        .fetch_one(&app.pool)
        .await
        .unwrap();
    assert_eq!(denied, 1, "the stranger's refusal, under the person");

    // Police reporting are their own competent authority by default: then
    // the reporter is never told that the person was reported before (no
    // oracle), the coordinator still is.
    sqlx::query("UPDATE cp_cases SET competent_authority = reporting_agency WHERE case_id = $1")
        .bind(s.case)
        .execute(&app.pool)
        .await
        .unwrap();
    let own = get_path(&mut client, &person, &token("kg-mvd", Role::Police, "o-1"))
        .await
        .unwrap();
    assert!(own.parts.contains(&(P::Identification as i32)));
    assert!(!dup(&own), "the reporting authority learns nothing of a duplicate");
    assert!(dup(&get_path(&mut client, &person, &coordinator).await.unwrap()));

    // The consent under MSD's accepted referral lets another agency in (as
    // one a redirected referral carried along would): MSD no longer sees
    // the person.
    let as_msd = token("kg-msd", Role::Msd, "o-1");
    assert!(get_path(&mut client, &person, &as_msd).await.unwrap().person.is_some());
    sqlx::query(
        "UPDATE cp_consents SET recipient_agency = 'kg-ngo-other'
         WHERE consent_id = (SELECT consent_id FROM cp_referrals WHERE referral_id = $1)",
    )
    .bind(s.to_msd)
    .execute(&app.pool)
    .await
    .unwrap();
    let msd_now = get_path(&mut client, &person, &as_msd).await.unwrap();
    assert!(msd_now.person.is_none(), "{msd_now:#?}");
    assert!(!msd_now.parts.contains(&(P::Plan as i32)));
    app.stop().await;
}

#[tokio::test]
async fn a_bed_held_for_a_referral_shows_once_as_the_shelter_records_it_or_else_as_the_referral_does() {
    let app = Casepath::start(&[]).await;
    let mut client = app.client.clone();
    let s = seed_scenario(&app.pool).await;
    // The referral service records the same bed on the referral.
    let on_referral = |hold: Uuid| {
        Some(pb::step::Detail::Referral(pb::ReferralDetail {
            referral_id: s.to_msd.to_string(),
            hold_id: hold.to_string(),
            ..pb::ReferralDetail::default()
        }))
    };
    insert_step(
        &app.pool,
        StepSeed {
            detail: on_referral(s.hold),
            ..step(s.to_msd, P::Referrals, K::BedHeld, t("2026-03-05T04:31:00Z"), 7)
        },
    )
    .await;
    let person = s.person.to_string();
    let beds = |path: &pb::Path| -> Vec<P> {
        path.steps
            .iter()
            .filter(|st| st.kind == K::BedHeld as i32)
            .map(|st| P::try_from(st.part).unwrap())
            .collect()
    };
    // Who sees the shelter's record sees that one only.
    let full = get_path(&mut client, &person, &token("kg-coordinator", Role::Coordinator, "c-1"))
        .await
        .unwrap();
    assert_eq!(beds(&full), [P::Shelter], "{full:#?}");
    // The referring police do not see the shelter part: the referral's record.
    let police = get_path(&mut client, &person, &token("kg-mvd", Role::Police, "p-1"))
        .await
        .unwrap();
    assert!(!parts(&police).contains(&P::Shelter));
    assert_eq!(beds(&police), [P::Referrals], "{police:#?}");
    // A second bed for the same referral (after a redirect) whose hold has
    // no shelter step here: its referral step shows, the first still once.
    insert_step(
        &app.pool,
        StepSeed {
            detail: on_referral(Uuid::now_v7()),
            ..step(s.to_msd, P::Referrals, K::BedHeld, t("2026-03-06T04:31:00Z"), 8)
        },
    )
    .await;
    let full = get_path(&mut client, &person, &token("kg-coordinator", Role::Coordinator, "c-1"))
        .await
        .unwrap();
    assert_eq!(beds(&full), [P::Shelter, P::Referrals], "{full:#?}");
    app.stop().await;
}

async fn inbox(client: &mut Client, req: pb::ListInboxRequest, token: &str) -> Result<pb::Inbox, Status> {
    client
        .list_inbox(authorized(req, token))
        .await
        .map(tonic::Response::into_inner)
}

#[tokio::test]
async fn the_inbox_puts_the_most_overdue_first_with_deadlines_on_the_calendar_with_its_holiday() {
    let dir = std::env::temp_dir().join(format!("nrm-calendar-{}", nrm_e2e::unique()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("calendar.toml");
    std::fs::write(
        &file,
        "utc_offset = \"+06:00\"\nweekend = [\"sat\", \"sun\"]\nholidays = [\"2026-03-09\"]\n",
    )
    .unwrap();
    let app = Casepath::start(&[("NRM_CASEPATH__CALENDAR_FILE", file.to_str().unwrap())]).await;
    let mut client = app.client.clone();
    let pool = &app.pool;
    // Thursday 5 March, 10:00 local: Fri 6, (Mon 9 a holiday), Tue 10, Wed 11,
    // Thu 12, Fri 13: due at the end of Friday 13 local.
    let mut a = CaseSeed::new(Uuid::now_v7(), "kg-mvd", "kg-prosecutor", t("2026-03-05T04:00:00Z"));
    a.waiting_since = Some(t("2026-03-05T04:00:00Z"));
    a.insert(pool).await;
    // Friday 6 March: Tue 10 … Mon 16 (the weekend and the holiday skipped).
    let mut b = CaseSeed::new(Uuid::now_v7(), "kg-mvd", "kg-prosecutor", t("2026-03-06T04:00:00Z"));
    b.waiting_since = Some(t("2026-03-06T04:00:00Z"));
    b.insert(pool).await;
    // Waiting since now: not due yet.
    let mut fresh = CaseSeed::new(Uuid::now_v7(), "kg-mvd", "kg-prosecutor", Utc::now());
    fresh.waiting_since = Some(Utc::now());
    fresh.insert(pool).await;
    // Another authority's, and a decided one: never in this inbox.
    let mut other = CaseSeed::new(Uuid::now_v7(), "kg-mvd", "kg-mvd", t("2026-03-01T04:00:00Z"));
    other.waiting_since = Some(t("2026-03-01T04:00:00Z"));
    other.insert(pool).await;
    CaseSeed::new(Uuid::now_v7(), "kg-mvd", "kg-prosecutor", t("2026-03-01T04:00:00Z"))
        .insert(pool)
        .await;
    // Referrals: one to the prosecutor (its inbox scope is decisions only), two to MSD.
    let person = Uuid::now_v7();
    let to_prosecutor = referral(
        pool,
        person,
        "kg-mvd",
        "kg-prosecutor",
        None,
        "pending",
        t("2026-03-01T04:00:00Z"),
        Some(t("2026-03-02T04:00:00Z")),
    )
    .await;
    let late = referral(
        pool,
        person,
        "kg-mvd",
        "kg-msd",
        None,
        "pending",
        t("2026-03-10T04:00:00Z"),
        Some(t("2026-03-11T04:00:00Z")),
    )
    .await;
    let soon = referral(
        pool,
        person,
        "kg-mvd",
        "kg-msd",
        None,
        "pending",
        Utc::now(),
        Some(Utc::now() + TimeDelta::hours(72)),
    )
    .await;
    referral(
        pool,
        person,
        "kg-mvd",
        "kg-msd",
        None,
        "cancelled",
        t("2026-03-10T04:00:00Z"),
        None,
    )
    .await;

    let prosecutor = token("kg-prosecutor", Role::Prosecutor, "p-1");
    let got = inbox(&mut client, pb::ListInboxRequest::default(), &prosecutor)
        .await
        .unwrap();
    let subjects: Vec<String> = got.items.iter().map(|i| i.subject_id.clone()).collect();
    assert_eq!(
        subjects,
        vec![a.case_id.to_string(), b.case_id.to_string(), fresh.case_id.to_string()]
    );
    assert_eq!(
        got.items[0].due_at,
        Some(timestamp(t("2026-03-13T18:00:00Z"))),
        "the holiday is skipped"
    );
    assert_eq!(
        got.items[1].due_at,
        Some(timestamp(t("2026-03-16T18:00:00Z"))),
        "weekend and holiday skipped"
    );
    assert!(got.items[0].overdue && got.items[1].overdue && !got.items[2].overdue);
    assert!(got.items[0].time_left.unwrap().seconds < 0 && got.items[2].time_left.unwrap().seconds > 0);
    assert!(
        got.items
            .iter()
            .all(|i| i.kind == pb::InboxKind::IdentificationDecision as i32)
    );

    // Paging: one at a time, in the same order.
    let mut seen = Vec::new();
    let mut page_token = String::new();
    loop {
        let page = inbox(
            &mut client,
            pb::ListInboxRequest {
                page_size: 1,
                page_token: page_token.clone(),
                ..Default::default()
            },
            &prosecutor,
        )
        .await
        .unwrap();
        seen.extend(page.items.iter().map(|i| i.subject_id.clone()));
        if page.next_page_token.is_empty() {
            break;
        }
        page_token = page.next_page_token;
    }
    assert_eq!(seen, subjects);
    let overdue = inbox(
        &mut client,
        pb::ListInboxRequest {
            overdue_only: true,
            ..Default::default()
        },
        &prosecutor,
    )
    .await
    .unwrap();
    assert_eq!(overdue.items.len(), 2);

    let msd = token("kg-msd", Role::Msd, "m-1");
    let got = inbox(&mut client, pb::ListInboxRequest::default(), &msd).await.unwrap();
    let subjects: Vec<String> = got.items.iter().map(|i| i.subject_id.clone()).collect();
    assert_eq!(
        subjects,
        vec![late.to_string(), soon.to_string()],
        "referrals only, the overdue one first"
    );
    assert_eq!(got.items[0].services, vec![1, 2]);

    // The coordinator: a named agency's inbox, or what is overdue everywhere.
    let coordinator = token("kg-coordinator", Role::Coordinator, "c-1");
    let named = inbox(
        &mut client,
        pb::ListInboxRequest {
            agency: "kg-prosecutor".into(),
            ..Default::default()
        },
        &coordinator,
    )
    .await
    .unwrap();
    assert_eq!(
        named.items.len(),
        4,
        "the coordinator sees both kinds of the prosecutor's"
    );
    let everywhere = inbox(&mut client, pb::ListInboxRequest::default(), &coordinator)
        .await
        .unwrap();
    assert_eq!(everywhere.items.len(), 5, "overdue: 3 decisions and 2 referrals");
    assert!(everywhere.items.iter().all(|i| i.overdue));
    let order: Vec<String> = everywhere.items.iter().map(|i| i.subject_id.clone()).collect();
    assert_eq!(
        order,
        vec![
            to_prosecutor.to_string(),
            other.case_id.to_string(),
            late.to_string(),
            a.case_id.to_string(),
            b.case_id.to_string()
        ],
        "most overdue first"
    );

    // Refusals.
    let refused = inbox(
        &mut client,
        pb::ListInboxRequest {
            agency: "kg-msd".into(),
            ..Default::default()
        },
        &prosecutor,
    )
    .await
    .unwrap_err();
    assert_eq!(refused.code(), Code::PermissionDenied);
    let bad = inbox(
        &mut client,
        pb::ListInboxRequest {
            page_size: 501,
            page_token: "nope".into(),
            ..Default::default()
        },
        &prosecutor,
    )
    .await
    .unwrap_err();
    assert_eq!(bad_fields(&bad), vec!["page_size", "page_token"]);
    let shelter = inbox(
        &mut client,
        pb::ListInboxRequest::default(),
        &token("kg-iom", Role::Consulate, "x"),
    )
    .await
    .unwrap_err();
    assert_eq!(shelter.code(), Code::PermissionDenied, "a role without the row");
    // Not an agency code: named, and never written anywhere.
    let typed = inbox(
        &mut client,
        pb::ListInboxRequest {
            agency: "Aigerim Bekova".into(),
            ..Default::default()
        },
        &prosecutor,
    )
    .await
    .unwrap_err();
    assert_eq!(bad_fields(&typed), vec!["agency"]);
    assert!(!typed.message().contains("Aigerim"));
    // Every answered inbox is on the trail with whose it was, and the refusal
    // with the inbox asked for.
    let trail: Vec<(String, String, String, String)> = sqlx::query_as(
        "SELECT agency, split_part(action, ':', 1), subject_id, outcome FROM audit_log
         WHERE action IN ('ListInbox', 'ListInbox:denied') ORDER BY seq",
    )
    .fetch_all(&app.pool)
    .await
    .unwrap();
    assert!(
        trail.contains(&(
            "kg-prosecutor".into(),
            "ListInbox".into(),
            "inbox:kg-prosecutor".into(),
            "ok".into()
        )),
        "{trail:?}"
    );
    assert!(
        trail.contains(&(
            "kg-coordinator".into(),
            "ListInbox".into(),
            "inbox:*".into(),
            "ok".into()
        )),
        "{trail:?}"
    );
    assert!(
        trail.contains(&(
            "kg-prosecutor".into(),
            "ListInbox".into(),
            "inbox:another-agency".into(),
            "denied".into()
        )),
        "{trail:?}"
    );
    // The coordinator may name any agency; a code-shaped text that is no
    // agency casepath knows (a name typed in) is not kept on the trail.
    let coordinator = token("kg-coordinator", Role::Coordinator, "c-1");
    inbox(
        &mut client,
        pb::ListInboxRequest {
            agency: "Aigerim.Bekova".into(),
            ..Default::default()
        },
        &coordinator,
    )
    .await
    .unwrap();
    let last: String =
        sqlx::query_scalar("SELECT subject_id FROM audit_log WHERE action = 'ListInbox' ORDER BY seq DESC LIMIT 1")
            .fetch_one(&app.pool)
            .await
            .unwrap();
    assert_eq!(last, "inbox:unknown-agency");
    let leaked: i64 = sqlx::query_scalar("SELECT count(*) FROM audit_log WHERE audit_log::text LIKE '%Aigerim%'")
        .fetch_one(&app.pool)
        .await
        .unwrap();
    assert_eq!(leaked, 0);
    app.stop().await;
    let _ = std::fs::remove_dir_all(dir);
}

fn cell(stats: &pb::Statistics, dimension: &str, value: &str) -> (u64, bool) {
    stats
        .counts
        .iter()
        .find(|c| c.dimension == dimension && c.value == value)
        .map(|c| (c.count, c.suppressed))
        .unwrap_or_else(|| panic!("no cell {dimension}={value}"))
}

#[tokio::test]
async fn publishable_statistics_suppress_a_small_cell_and_its_complement_and_keep_the_totals() {
    let app = Casepath::start(&[]).await;
    let mut client = app.client.clone();
    let pool = &app.pool;
    let from = t("2025-01-01T00:00:00Z");
    let to = t("2025-02-01T00:00:00Z");
    // 22 persons in January: 12 female, 3 male, 7 other; 6 decided 1..6 h after the report.
    for (i, gender) in std::iter::repeat_n(1, 12)
        .chain(std::iter::repeat_n(2, 3))
        .chain(std::iter::repeat_n(3, 7))
        .enumerate()
    {
        let at = from + TimeDelta::hours(i64::try_from(i).unwrap() * 10);
        let mut c = CaseSeed::new(Uuid::now_v7(), "kg-mvd", "kg-prosecutor", at);
        c.gender = gender;
        if i < 6 {
            c.status = 3;
            c.decided_at = Some(at + TimeDelta::hours(i64::try_from(i).unwrap() + 1));
        }
        c.insert(pool).await;
    }
    // Outside the period.
    CaseSeed::new(Uuid::now_v7(), "kg-mvd", "kg-prosecutor", t("2025-02-01T00:00:00Z"))
        .insert(pool)
        .await;
    // Two anonymous notifications in January (female), one in March.
    for filed in ["2025-01-10T00:00:00Z", "2025-01-11T00:00:00Z", "2025-03-01T00:00:00Z"] {
        sqlx::query(
            "INSERT INTO cp_notifications (notification_id, filed_on, found_country, country_of_exploitation, \
             exploitation_forms, gender, age_band, citizenship) VALUES ($1, $2, 'kg', 'ru', '{2,2,1}', 1, 4, 'kg')",
        )
        .bind(Uuid::now_v7())
        .bind(t(filed))
        .execute(pool)
        .await
        .unwrap();
    }
    // Two referrals answered: too few samples to publish their time.
    for _ in 0..2 {
        referral(
            pool,
            Uuid::now_v7(),
            "kg-mvd",
            "kg-msd",
            None,
            "accepted",
            from + TimeDelta::days(3),
            None,
        )
        .await;
    }
    derive_facts(pool).await;
    let coordinator = token("kg-coordinator", Role::Coordinator, "c-1");
    let ask = |publishable: bool| pb::GetStatisticsRequest {
        from: Some(timestamp(from)),
        to: Some(timestamp(to)),
        publishable,
        min_cell: 0,
    };
    let raw = client
        .get_statistics(authorized(ask(false), &coordinator))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(cell(&raw, "gender", "GENDER_FEMALE"), (14, false));
    assert_eq!(cell(&raw, "gender", "GENDER_MALE"), (3, false));
    assert_eq!(cell(&raw, "gender", "GENDER_OTHER"), (7, false));
    assert_eq!(cell(&raw, "gender", "total"), (24, false));
    assert_eq!(cell(&raw, "notification", "identified"), (22, false));
    assert_eq!(cell(&raw, "notification", "anonymous"), (2, false));
    assert_eq!(cell(&raw, "stage", "total"), (22, false));
    assert_eq!(cell(&raw, "stage", "STAGE_IDENTIFIED"), (6, false));
    assert_eq!(cell(&raw, "stage", "STAGE_REPORTED"), (16, false));
    assert_eq!(
        cell(&raw, "exploitation_form", "EXPLOITATION_FORM_LABOUR"),
        (24, false),
        "once per person and form"
    );
    assert_eq!(cell(&raw, "exploitation_form", "EXPLOITATION_FORM_SEXUAL"), (2, false));
    assert_eq!(raw.suppressed_cells, 0);
    let decision = raw.times.iter().find(|m| m.measure == "report_to_decision").unwrap();
    assert_eq!(decision.samples, 6);
    assert_eq!(
        decision.median,
        Some(prost_types::Duration {
            seconds: 12_600,
            nanos: 0
        }),
        "3.5 h"
    );
    assert_eq!(
        decision.p90,
        Some(prost_types::Duration {
            seconds: 19_800,
            nanos: 0
        }),
        "5.5 h"
    );

    let published = client
        .get_statistics(authorized(ask(true), &coordinator))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(published.min_cell, 5);
    assert_eq!(cell(&published, "gender", "GENDER_MALE"), (0, true), "the small cell");
    assert_eq!(cell(&published, "gender", "GENDER_OTHER"), (0, true), "its complement");
    assert_eq!(cell(&published, "gender", "GENDER_FEMALE"), (14, false));
    assert_eq!(cell(&published, "gender", "GENDER_UNKNOWN"), (0, false), "zeros stay");
    assert_eq!(
        cell(&published, "gender", "total"),
        (24, false),
        "the headline total is shown"
    );
    assert_eq!(cell(&published, "notification", "anonymous"), (0, true));
    assert_eq!(cell(&published, "notification", "identified"), (0, true));
    assert_eq!(
        cell(&published, "notification", "total"),
        (0, true),
        "hidden with its cells"
    );
    assert_eq!(
        cell(&published, "stage", "total"),
        (0, true),
        "24 - 22 persons would give the notifications away"
    );
    let answer = published
        .times
        .iter()
        .find(|m| m.measure == "referral_to_answer")
        .unwrap();
    assert!(answer.suppressed && answer.median.is_none() && answer.samples == 0);
    assert!(
        !published
            .times
            .iter()
            .find(|m| m.measure == "report_to_decision")
            .unwrap()
            .suppressed
    );
    assert_eq!(
        published.suppressed_cells as usize,
        published.counts.iter().filter(|c| c.suppressed).count()
    );
    // k = 11 (the CTDC's): the 7 is small now too.
    let strict = client
        .get_statistics(authorized(
            pb::GetStatisticsRequest {
                min_cell: 11,
                ..ask(true)
            },
            &coordinator,
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(cell(&strict, "gender", "GENDER_OTHER"), (0, true));
    assert!(strict.times.iter().all(|m| m.suppressed));

    let bad = client
        .get_statistics(authorized(
            pb::GetStatisticsRequest {
                from: Some(timestamp(to)),
                to: Some(timestamp(from)),
                ..ask(true)
            },
            &coordinator,
        ))
        .await
        .unwrap_err();
    assert_eq!(bad_fields(&bad), vec!["to"]);
    let bad = client
        .get_statistics(authorized(pb::GetStatisticsRequest::default(), &coordinator))
        .await
        .unwrap_err();
    assert_eq!(bad_fields(&bad), vec!["from", "to"]);
    let refused = client
        .get_statistics(authorized(ask(true), &token("kg-mvd", Role::Police, "p")))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::PermissionDenied);

    // The list of paths: newest first, filtered by stage, paged.
    let list = |stage: pb::Stage, page_token: String| pb::ListPathsRequest {
        stage: stage as i32,
        reported_from: Some(timestamp(from)),
        reported_to: Some(timestamp(to)),
        page_size: 4,
        page_token,
        ..Default::default()
    };
    let mut all = Vec::new();
    let mut page_token = String::new();
    loop {
        let page = client
            .list_paths(authorized(list(pb::Stage::Unspecified, page_token), &coordinator))
            .await
            .unwrap()
            .into_inner();
        all.extend(page.paths);
        if page.next_page_token.is_empty() {
            break;
        }
        page_token = page.next_page_token;
    }
    assert_eq!(all.len(), 22);
    let times: Vec<DateTime<Utc>> = all
        .iter()
        .map(|p| to_datetime(p.first_reported_at.as_ref().unwrap()).unwrap())
        .collect();
    assert!(times.windows(2).all(|w| w[0] > w[1]), "newest first");
    let identified = client
        .list_paths(authorized(list(pb::Stage::Identified, String::new()), &coordinator))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(identified.paths.len(), 4);
    assert!(identified.paths.iter().all(|p| p.stage == pb::Stage::Identified as i32));
    app.stop().await;
}

async fn next(stream: &mut tonic::Streaming<pb::Path>) -> Result<pb::Path, Status> {
    tokio::time::timeout(Duration::from_secs(10), stream.next())
        .await
        .expect("an answer within 10 s")
        .expect("the stream is open")
}

#[tokio::test]
async fn a_watch_follows_a_change_and_ends_when_the_caller_sees_nothing_any_more() {
    let app = Casepath::start(&[("NRM_CASEPATH__WATCH_INTERVAL_MS", "50")]).await;
    let mut client = app.client.clone();
    let pool = &app.pool;
    let person = Uuid::now_v7();
    let case = CaseSeed::new(person, "kg-mvd", "kg-prosecutor", t("2026-03-02T04:00:00Z"));
    case.insert(pool).await;
    let k = consent(pool, person, case.case_id, "kg-msd").await;
    let r = referral(
        pool,
        person,
        "kg-mvd",
        "kg-msd",
        Some(k),
        "accepted",
        t("2026-03-05T04:00:00Z"),
        None,
    )
    .await;
    insert_step(
        pool,
        step(r, P::Referrals, K::ReferralSent, t("2026-03-05T04:00:00Z"), 1),
    )
    .await;
    insert_step(
        pool,
        step(r, P::Referrals, K::ReferralAccepted, t("2026-03-05T05:00:00Z"), 2),
    )
    .await;

    let msd = token("kg-msd", Role::Msd, "m-1");
    let mut stream = client
        .watch_path(authorized(
            pb::GetPathRequest {
                person_id: person.to_string(),
            },
            &msd,
        ))
        .await
        .unwrap()
        .into_inner();
    let first = next(&mut stream).await.unwrap();
    assert_eq!(parts(&first), vec![P::Person, P::Referrals]);
    assert_eq!(first.steps.len(), 2);
    let opened: i64 =
        sqlx::query_scalar("SELECT count(*) FROM audit_log WHERE person_id = $1 AND action = 'WatchPath'")
            .bind(person)
            .fetch_one(pool)
            .await
            .unwrap();
    assert_eq!(opened, 1, "the opening of the watch is audited");

    // The listener's connection is cut (as when PostgreSQL restarts): it
    // comes back by itself, and the change still arrives.
    let listening = "SELECT pid FROM pg_stat_activity WHERE datname = current_database() AND query ILIKE 'LISTEN%'";
    let before: Vec<i32> = sqlx::query_scalar(listening).fetch_all(pool).await.unwrap();
    assert_eq!(before.len(), 1, "one listener per service");
    sqlx::query("SELECT pg_terminate_backend($1)")
        .bind(before[0])
        .execute(pool)
        .await
        .unwrap();
    let mut back = false;
    for _ in 0..200 {
        let now: Vec<i32> = sqlx::query_scalar(listening).fetch_all(pool).await.unwrap();
        if now.len() == 1 && now[0] != before[0] {
            back = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(back, "the listener reconnected within 10 s");

    // A service delivered: the step arrives.
    insert_step(
        pool,
        step(r, P::Referrals, K::ServiceDelivered, t("2026-03-06T04:00:00Z"), 3),
    )
    .await;
    notify(pool).await;
    let second = next(&mut stream).await.unwrap();
    assert_eq!(second.steps.len(), 3);
    assert_eq!(second.steps[2].kind, K::ServiceDelivered as i32);

    // The consent ends: the person's data leave MSD's view.
    sqlx::query("UPDATE cp_consents SET ended_at = now(), end_reason = 1 WHERE consent_id = $1")
        .bind(k)
        .execute(pool)
        .await
        .unwrap();
    notify(pool).await;
    let third = next(&mut stream).await.unwrap();
    assert_eq!(parts(&third), vec![P::Referrals], "no person part without the consent");
    assert!(third.person.is_none());

    // The referral goes to another agency: MSD sees nothing any more.
    sqlx::query("UPDATE cp_referrals SET receiving_agency = 'kg-msd-osh' WHERE referral_id = $1")
        .bind(r)
        .execute(pool)
        .await
        .unwrap();
    notify(pool).await;
    let end = next(&mut stream).await.unwrap_err();
    assert_eq!(end.code(), Code::PermissionDenied);
    let closed = tokio::time::timeout(Duration::from_secs(5), stream.next())
        .await
        .expect("the stream ends");
    assert!(closed.is_none());

    // A token that expires ends the watch with UNAUTHENTICATED.
    let short = nrm_e2e::issuer_key()
        .sign(&nrm_issuer::TokenClaims::new(
            nrm_issuer::DEFAULT_ISSUER,
            nrm_issuer::DEFAULT_AUDIENCE,
            "kg-mvd",
            Role::Police.as_str(),
            "p-1",
            2,
        ))
        .unwrap();
    let mut stream = client
        .watch_path(authorized(
            pb::GetPathRequest {
                person_id: person.to_string(),
            },
            &short,
        ))
        .await
        .unwrap()
        .into_inner();
    assert!(next(&mut stream).await.is_ok());
    let expired = next(&mut stream).await.unwrap_err();
    assert_eq!(expired.code(), Code::Unauthenticated);

    // The inbox, live: a new referral to MSD appears.
    let mut inbox = client
        .watch_inbox(authorized(pb::ListInboxRequest::default(), &msd))
        .await
        .unwrap()
        .into_inner();
    let first = tokio::time::timeout(Duration::from_secs(10), inbox.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert!(first.items.is_empty());
    let new = referral(
        pool,
        person,
        "kg-mvd",
        "kg-msd",
        None,
        "pending",
        Utc::now(),
        Some(Utc::now() + TimeDelta::hours(24)),
    )
    .await;
    notify(pool).await;
    let second = tokio::time::timeout(Duration::from_secs(10), inbox.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    let ids: BTreeSet<String> = second.items.iter().map(|i| i.subject_id.clone()).collect();
    assert_eq!(ids, BTreeSet::from([new.to_string()]));
    // Both answers are on the trail, the update as such.
    let audited: Vec<String> = sqlx::query_scalar(
        "SELECT action FROM audit_log WHERE agency = 'kg-msd' AND action LIKE 'WatchInbox%' ORDER BY seq",
    )
    .fetch_all(pool)
    .await
    .unwrap();
    assert_eq!(audited, ["WatchInbox", "WatchInbox:update"]);
    app.stop().await;
}

#[tokio::test]
async fn a_path_watch_looks_again_only_for_a_change_of_its_own_records() {
    let app = Casepath::start(&[("NRM_CASEPATH__WATCH_INTERVAL_MS", "1")]).await;
    let mut client = app.client.clone();
    let pool = &app.pool;
    // Two people, each with a case and a referral.
    let mut referrals = Vec::new();
    let mut persons = Vec::new();
    for _ in 0..2 {
        let person = Uuid::now_v7();
        let case = CaseSeed::new(person, "kg-mvd", "kg-prosecutor", t("2026-03-02T04:00:00Z"));
        case.insert(pool).await;
        let r = referral(
            pool,
            person,
            "kg-mvd",
            "kg-msd",
            None,
            "accepted",
            t("2026-03-05T04:00:00Z"),
            None,
        )
        .await;
        insert_step(
            pool,
            step(r, P::Referrals, K::ReferralSent, t("2026-03-05T04:00:00Z"), 1),
        )
        .await;
        persons.push(person);
        referrals.push(r);
    }
    let (a, other) = (persons[0], referrals[1]);
    let coordinator = token("kg-coordinator", Role::Coordinator, "c-1");
    let mut stream = client
        .watch_path(authorized(
            pb::GetPathRequest {
                person_id: a.to_string(),
            },
            &coordinator,
        ))
        .await
        .unwrap()
        .into_inner();
    let first = next(&mut stream).await.unwrap();
    let before = first.steps.len();

    // A step of A's referral is written, but the change announced touches
    // only the other person's referral: A's watch does not look again (had
    // it looked, it would send the path with this one step more)…
    insert_step(
        pool,
        step(
            referrals[0],
            P::Referrals,
            K::ReferralAccepted,
            t("2026-03-05T05:00:00Z"),
            2,
        ),
    )
    .await;
    notify_touched(pool, &[other, persons[1]]).await;
    // (time for a watcher that looked at every change to send its answer)
    tokio::time::sleep(Duration::from_millis(300)).await;
    // …until a change touches its own records: then it sees both steps.
    insert_step(
        pool,
        step(
            referrals[0],
            P::Referrals,
            K::ServiceDelivered,
            t("2026-03-06T04:00:00Z"),
            3,
        ),
    )
    .await;
    notify_touched(pool, &[referrals[0]]).await;
    let second = next(&mut stream).await.unwrap();
    assert_eq!(
        second.steps.len(),
        before + 2,
        "the first update comes with A's own change, carrying both new steps"
    );

    // A new record of A's (found by the person, unknown to the last read)
    // wakes it too: the change names the person.
    let later = referral(pool, a, "kg-mvd", "kg-msd", None, "pending", Utc::now(), None).await;
    insert_step(pool, step(later, P::Referrals, K::ReferralSent, Utc::now(), 4)).await;
    notify_touched(pool, &[later, a]).await;
    let third = next(&mut stream).await.unwrap();
    assert_eq!(third.steps.len(), before + 3);
    app.stop().await;
}

#[tokio::test]
async fn a_path_watch_lets_go_of_the_person_when_the_consent_lapses_with_nothing_else_changing() {
    let app = Casepath::start(&[]).await;
    let mut client = app.client.clone();
    let pool = &app.pool;
    let person = Uuid::now_v7();
    let case = CaseSeed::new(person, "kg-mvd", "kg-prosecutor", t("2026-03-02T04:00:00Z"));
    case.insert(pool).await;
    let k = consent(pool, person, case.case_id, "kg-msd").await;
    let r = referral(
        pool,
        person,
        "kg-mvd",
        "kg-msd",
        Some(k),
        "accepted",
        t("2026-03-05T04:00:00Z"),
        None,
    )
    .await;
    insert_step(
        pool,
        step(r, P::Referrals, K::ReferralSent, t("2026-03-05T04:00:00Z"), 1),
    )
    .await;
    // The consent lapses two seconds from now; no change is written or
    // notified after the watch opens.
    sqlx::query("UPDATE cp_consents SET expires_at = now() + interval '2 seconds' WHERE consent_id = $1")
        .bind(k)
        .execute(pool)
        .await
        .unwrap();
    let msd = token("kg-msd", Role::Msd, "m-1");
    let mut stream = client
        .watch_path(authorized(
            pb::GetPathRequest {
                person_id: person.to_string(),
            },
            &msd,
        ))
        .await
        .unwrap()
        .into_inner();
    let first = next(&mut stream).await.unwrap();
    assert!(first.person.is_some(), "the consent is in force");
    let lapsed = next(&mut stream).await.unwrap();
    assert!(
        lapsed.person.is_none(),
        "the person's data leave MSD's view when the consent lapses"
    );
    assert_eq!(parts(&lapsed), vec![P::Referrals]);
    app.stop().await;
}

/// The next answer of an inbox watch, within `bound`.
async fn next_inbox(stream: &mut tonic::Streaming<pb::Inbox>, bound: Duration) -> pb::Inbox {
    tokio::time::timeout(bound, stream.next())
        .await
        .unwrap_or_else(|_| panic!("an answer within {bound:?}"))
        .expect("the stream is open")
        .unwrap()
}

#[tokio::test]
async fn an_inbox_watch_pushes_an_item_that_becomes_overdue_without_any_other_change() {
    let app = Casepath::start(&[]).await;
    let client = app.client.clone();
    let msd = token("kg-msd", Role::Msd, "m-1");
    // An answer due in two seconds; written without a change notification,
    // and nothing else writes to this database.
    let due = Utc::now() + TimeDelta::seconds(2);
    let waiting = referral(
        &app.pool,
        Uuid::now_v7(),
        "kg-mvd",
        "kg-msd",
        None,
        "pending",
        Utc::now(),
        Some(due),
    )
    .await;
    let watch = |overdue_only: bool| {
        let mut client = client.clone();
        let msd = msd.clone();
        async move {
            client
                .watch_inbox(authorized(
                    pb::ListInboxRequest {
                        overdue_only,
                        ..pb::ListInboxRequest::default()
                    },
                    &msd,
                ))
                .await
                .unwrap()
                .into_inner()
        }
    };
    let (mut all, mut overdue) = (watch(false).await, watch(true).await);
    let first = next_inbox(&mut all, Duration::from_secs(10)).await;
    assert_eq!(first.items.len(), 1);
    assert!(!first.items[0].overdue);
    assert!(next_inbox(&mut overdue, Duration::from_secs(10)).await.items.is_empty());
    // Pushed once the due time has passed (due in 2 s; 3 s of slack).
    let pushed = next_inbox(&mut all, Duration::from_secs(5)).await;
    assert_eq!(pushed.items.len(), 1);
    assert_eq!(pushed.items[0].subject_id, waiting.to_string());
    assert!(pushed.items[0].overdue, "{pushed:?}");
    assert!(Utc::now() >= due);
    let listed = next_inbox(&mut overdue, Duration::from_secs(5)).await;
    assert_eq!(listed.items.len(), 1, "an overdue-only watch lists it once overdue");
    assert!(listed.items[0].overdue);
    app.stop().await;
}

/// One officer holds at most `NRM_CASEPATH__MAX_WATCHES_PER_OFFICER`
/// watches at once: one more is refused `RESOURCE_EXHAUSTED` (and neither
/// queried nor audited), another officer of the agency is not held back,
/// and a watch its client ends gives its turn back.
#[tokio::test]
async fn an_officer_holds_at_most_the_configured_number_of_watches() {
    let app = Casepath::start(&[("NRM_CASEPATH__MAX_WATCHES_PER_OFFICER", "2")]).await;
    let mut client = app.client.clone();
    let msd = token("kg-msd", Role::Msd, "msd-1");
    let colleague = token("kg-msd", Role::Msd, "msd-2");
    let open = |client: &mut pb::casepath_service_client::CasepathServiceClient<tonic::transport::Channel>,
                who: &String| {
        let mut client = client.clone();
        let request = authorized(pb::ListInboxRequest::default(), who);
        async move { client.watch_inbox(request).await.map(tonic::Response::into_inner) }
    };
    let audited = || async {
        sqlx::query_scalar::<_, i64>("SELECT count(*) FROM audit_log WHERE agency = 'kg-msd' AND action = 'WatchInbox'")
            .fetch_one(&app.pool)
            .await
            .unwrap()
    };
    let mut first = open(&mut client, &msd).await.unwrap();
    let mut second = open(&mut client, &msd).await.unwrap();
    next_inbox(&mut first, Duration::from_secs(10)).await;
    next_inbox(&mut second, Duration::from_secs(10)).await;
    let refused = open(&mut client, &msd).await.expect_err("a third watch is refused");
    assert_eq!(refused.code(), Code::ResourceExhausted, "{refused:?}");
    assert_eq!(audited().await, 2, "the refused watch read nothing");
    let mut theirs = open(&mut client, &colleague).await.unwrap();
    next_inbox(&mut theirs, Duration::from_secs(10)).await;
    // The client ends one: its turn comes back once the watch sees it gone.
    drop(first);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let mut again = loop {
        match open(&mut client, &msd).await {
            Ok(stream) => break stream,
            Err(status) => {
                assert_eq!(status.code(), Code::ResourceExhausted);
                assert!(tokio::time::Instant::now() < deadline, "the ended watch kept its turn");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    };
    next_inbox(&mut again, Duration::from_secs(10)).await;
    drop((second, theirs, again));
    app.stop().await;
}
