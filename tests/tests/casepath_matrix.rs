//! casepath's rows of the permission matrix, swept against the casepath
//! binary: every RPC of `CasepathService` as every role, in scope (a record
//! the caller's agency stands in) and out of it (another agency of the same
//! role), allowed or refused exactly as `nrm_kernel::permissions::MATRIX`
//! says. The read models are seeded by SQL, as the projections fill them;
//! which parts of a path each role then sees is tests/tests/casepath_query.rs
//! and tests/tests/casepath_roles.rs.

#![allow(clippy::unwrap_used)] // Test code: a failed unwrap is a failed test.

use chrono::{Datelike as _, Months, NaiveTime, TimeDelta, Utc};
use nrm_e2e::casepath_seed::{CaseSeed, Casepath, Client, insert_step, referral, step};
use nrm_e2e::{authorized, token};
use nrm_kernel::auth::Role;
use nrm_kernel::permissions::{self, MATRIX, Permission, Scope};
use nrm_kernel::validate::timestamp;
use nrm_proto::casepath::v1 as pb;
use pb::{PathPart as P, StepKind as K};
use sqlx::PgPool;
use tonic::Code;
use uuid::Uuid;

/// A person the agency `me` (of `role`) stands to: it holds the case, is the
/// competent authority, received the referral, or operates the shelter.
async fn person_for(pool: &PgPool, role: Role, me: &str) -> Uuid {
    let person = Uuid::now_v7();
    let now = Utc::now();
    let (reporting, authority) = match role {
        Role::Prosecutor => ("kg-mvd", me),
        Role::Police | Role::BorderService | Role::Ngo | Role::Hotline | Role::Iom | Role::Consulate => {
            (me, "kg-prosecutor")
        }
        _ => ("kg-mvd", "kg-prosecutor"),
    };
    let mut case = CaseSeed::new(person, leak(reporting), leak(authority), now - TimeDelta::hours(3));
    case.waiting_since = Some(case.reported_at);
    case.insert(pool).await;
    insert_step(
        pool,
        step(case.case_id, P::Identification, K::Reported, case.reported_at, 1),
    )
    .await;
    let receiver = if matches!(role, Role::Msd | Role::Moh) {
        me
    } else {
        "kg-msd"
    };
    let to = referral(
        pool,
        person,
        "kg-mvd",
        receiver,
        None,
        "pending",
        now - TimeDelta::hours(2),
        Some(now + TimeDelta::hours(20)),
    )
    .await;
    insert_step(
        pool,
        step(to, P::Referrals, K::ReferralSent, now - TimeDelta::hours(2), 2),
    )
    .await;
    if role == Role::Shelter {
        let (shelter, hold) = (Uuid::now_v7(), Uuid::now_v7());
        sqlx::query(
            "INSERT INTO cp_shelters (shelter_id, code, region, operator_agency) VALUES ($1, 'SH-1', 'KG-C', $2)",
        )
        .bind(shelter)
        .bind(me)
        .execute(pool)
        .await
        .unwrap();
        sqlx::query(
            "INSERT INTO cp_holds (hold_id, shelter_id, referral_id, holder_agency, category, held_at, status)
             VALUES ($1, $2, $3, 'kg-msd', 1, $4, 'held')",
        )
        .bind(hold)
        .bind(shelter)
        .bind(to)
        .bind(now - TimeDelta::hours(1))
        .execute(pool)
        .await
        .unwrap();
        insert_step(pool, step(hold, P::Shelter, K::BedHeld, now - TimeDelta::hours(1), 3)).await;
    }
    person
}

fn leak(s: &str) -> &'static str {
    Box::leak(s.to_owned().into_boxed_str())
}

/// What one call came to: through the gate and the record check, or refused.
async fn call(
    client: &mut Client,
    row: &Permission,
    person: Uuid,
    agency: &str,
    token: &str,
) -> Result<(), tonic::Status> {
    let path = || pb::GetPathRequest {
        person_id: person.to_string(),
    };
    let inbox = || pb::ListInboxRequest {
        agency: agency.into(),
        ..Default::default()
    };
    match row.method {
        "GetPath" => client.get_path(authorized(path(), token)).await.map(drop),
        "WatchPath" => {
            let mut stream = client.watch_path(authorized(path(), token)).await?.into_inner();
            stream.message().await.map(drop)
        }
        "ListInbox" => client.list_inbox(authorized(inbox(), token)).await.map(drop),
        "WatchInbox" => {
            let mut stream = client.watch_inbox(authorized(inbox(), token)).await?.into_inner();
            stream.message().await.map(drop)
        }
        "ListPaths" => client
            .list_paths(authorized(pb::ListPathsRequest::default(), token))
            .await
            .map(drop),
        "GetStatistics" => {
            // A publishable period is whole UTC months.
            let month = Utc::now()
                .date_naive()
                .with_day(1)
                .unwrap()
                .and_time(NaiveTime::MIN)
                .and_utc();
            client
                .get_statistics(authorized(
                    pb::GetStatisticsRequest {
                        from: Some(timestamp(month - Months::new(1))),
                        to: Some(timestamp(month + Months::new(1))),
                        publishable: true,
                        min_cell: 0,
                    },
                    token,
                ))
                .await
                .map(drop)
        }
        other => panic!("the casepath matrix test has no call for {other}: add one"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_casepath_rpc_as_every_role_in_and_out_of_scope_answers_as_the_matrix_says() {
    let mut app = Casepath::start(&[]).await;
    let rows: Vec<&Permission> = MATRIX
        .iter()
        .filter(|r| r.service == permissions::CASEPATH && r.part.is_none())
        .collect();
    assert_eq!(
        rows.len(),
        6,
        "GetPath, WatchPath, ListInbox, WatchInbox, ListPaths, GetStatistics"
    );
    let (mut tried, mut allowed) = (0, 0);
    let mut failures = Vec::new();
    for row in &rows {
        for role in Role::ALL {
            let me = format!("{}-{}", role.as_str().replace('_', "-"), Uuid::now_v7().simple());
            let person = person_for(&app.pool, role, &me).await;
            let other = format!("{me}-x");
            // In scope: the caller's own agency (its inbox; a person it stands to).
            let mut cases = vec![(me.clone(), String::new(), row.scopes(role).is_some())];
            if matches!(row.method, "GetPath" | "WatchPath") && row.scopes(role).is_some() {
                // Out of scope: another agency of the role, one that stands
                // in no part of the person (the row lets every agency role
                // call; the parts decide, and none is left).
                cases.push((
                    other.clone(),
                    String::new(),
                    row.scopes(role) == Some(&[Scope::Any][..]) && role == Role::Coordinator,
                ));
            }
            if matches!(row.method, "ListInbox" | "WatchInbox") && row.scopes(role).is_some() {
                // Naming another agency's inbox: the coordinator only.
                cases.push((me.clone(), other.clone(), role == Role::Coordinator));
            }
            for (agency, named, expect) in cases {
                tried += 1;
                let token = token(&agency, role, "officer-1");
                let got = call(&mut app.client, row, person, &named, &token).await;
                let what = format!("{}/{} as {role} ({agency}, naming {named:?})", row.service, row.method);
                match (expect, got) {
                    (true, Ok(())) => allowed += 1,
                    (false, Err(s)) if s.code() == Code::PermissionDenied => {}
                    (true, Err(s)) => failures.push(format!("{what}: refused, the matrix allows it: {s:?}")),
                    (false, Err(s)) => failures.push(format!("{what}: {s:?}, expected PERMISSION_DENIED")),
                    (false, Ok(())) => failures.push(format!("{what}: let through, the matrix refuses it")),
                }
            }
        }
    }
    println!(
        "tried {tried} (casepath RPC, role, scope) calls over {} rows: {allowed} allowed, {} refused; {} disagreed",
        rows.len(),
        tried - allowed,
        failures.len()
    );
    app.stop().await;
    assert!(
        failures.is_empty(),
        "{} disagreements:\n{}",
        failures.len(),
        failures.join("\n")
    );
}
