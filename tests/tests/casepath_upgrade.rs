//! Issue 11: a casepath database of the version before the per-person facts
//! (its read models full), migrated to this one, gets every person's facts
//! from the records at once, equal to what the projections derive, and
//! keeps its checkpoints (no rebuild, no empty figures while it would run).

#![allow(clippy::unwrap_used)] // Test code: a failed unwrap is a failed test.

use chrono::{TimeDelta, TimeZone as _, Utc};
use nrm_e2e::casepath_seed::{CaseSeed, derive_facts, referral};
use nrm_e2e::{settings, unique, workspace_root};
use sqlx::PgPool;
use sqlx::migrate::Migrator;
use uuid::Uuid;

/// The version that added the facts.
const FACTS: i64 = 20261204000001;

/// Every row of both facts tables, as text, in person order.
async fn facts(pool: &PgPool) -> Vec<String> {
    sqlx::query_scalar(
        "SELECT 'cases|' || t::text FROM cp_person_cases t
         UNION ALL SELECT 'referrals|' || t::text FROM cp_person_referrals t ORDER BY 1",
    )
    .fetch_all(pool)
    .await
    .unwrap()
}

#[tokio::test]
async fn an_upgrade_derives_every_persons_facts_from_the_records_and_keeps_the_checkpoints() {
    let settings = settings();
    // casepath's migrations before the facts, as a directory of their own.
    let older = std::env::temp_dir().join(format!("nrm-casepath-migrations-{}", unique()));
    std::fs::create_dir_all(&older).unwrap();
    for entry in std::fs::read_dir(workspace_root().join("services/casepath/migrations")).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        let version: i64 = name.split('_').next().unwrap().parse().unwrap();
        if version < FACTS {
            std::fs::copy(&path, older.join(&name)).unwrap();
        }
    }
    let before = Migrator::new(older.as_path()).await.unwrap();
    let pool = nrm_kernel::db::connect_and_migrate(&settings.database, &before)
        .await
        .unwrap();
    std::fs::remove_dir_all(&older).unwrap();
    let exists: bool = sqlx::query_scalar("SELECT to_regclass('cp_person_cases') IS NOT NULL")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert!(!exists, "the older version has no facts");

    // Read models as the older version's projections left them: a person
    // with two cases (the later one reported first, with other forms), one
    // identified with a referral and a goal met, one with a referral only
    // (and no case).
    let at = |d: i64| Utc.with_ymd_and_hms(2026, 3, 2, 4, 0, 0).unwrap() + TimeDelta::days(d);
    let twice = Uuid::now_v7();
    let first = CaseSeed::new(twice, "kg-mvd", "kg-prosecutor", at(5));
    first.insert(&pool).await;
    let mut earlier = CaseSeed::new(twice, "kg-mvd", "kg-prosecutor", at(1));
    earlier.gender = 2;
    earlier.insert(&pool).await;
    sqlx::query("UPDATE cp_cases SET exploitation_forms = '{3,1,3}' WHERE case_id = $1")
        .bind(earlier.case_id)
        .execute(&pool)
        .await
        .unwrap();
    let identified = Uuid::now_v7();
    let mut case = CaseSeed::new(identified, "kg-mvd", "kg-prosecutor", at(2));
    case.status = 3;
    case.decided_at = Some(at(4));
    case.insert(&pool).await;
    referral(&pool, identified, "kg-mvd", "kg-msd", None, "accepted", at(3), None).await;
    sqlx::query("INSERT INTO cp_goals (goal_id, person_id, kind, added_at, met_at) VALUES ($1, $2, 1, $3, $4)")
        .bind(Uuid::now_v7())
        .bind(identified)
        .bind(at(5))
        .bind(at(9))
        .execute(&pool)
        .await
        .unwrap();
    referral(&pool, Uuid::now_v7(), "kg-mvd", "kg-msd", None, "pending", at(3), None).await;
    sqlx::query(
        "INSERT INTO projection_checkpoints (projection, stream_sequence) VALUES ('casepath_identification', 4), ('casepath_referral', 3)",
    )
    .execute(&pool)
    .await
    .unwrap();

    // The upgrade.
    pool.close().await;
    let pool = nrm_kernel::db::connect_and_migrate(&settings.database, &nrm_casepath::startup::MIGRATIONS)
        .await
        .unwrap();
    let upgraded = facts(&pool).await;
    assert_eq!(
        upgraded.len(),
        4,
        "two persons with cases, two with referrals: {upgraded:?}"
    );
    // Two cases, coded by the one reported first (gender 2), the forms of both.
    let (cases, gender, first_reported_at, forms): (i32, i32, chrono::DateTime<Utc>, Vec<i32>) = sqlx::query_as(
        "SELECT cases, gender, first_reported_at, exploitation_forms FROM cp_person_cases WHERE person_id = $1",
    )
    .bind(twice)
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!((cases, gender, first_reported_at), (2, 2, earlier.reported_at));
    assert_eq!(forms, [1, 2, 3]);
    let (flags, identified_at): (i32, Option<chrono::DateTime<Utc>>) =
        sqlx::query_as("SELECT case_flags, identified_at FROM cp_person_cases WHERE person_id = $1")
            .bind(identified)
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!((flags, identified_at), (2, Some(at(4))));
    let (flags, last_met_at): (i32, Option<chrono::DateTime<Utc>>) =
        sqlx::query_as("SELECT flags, last_met_at FROM cp_person_referrals WHERE person_id = $1")
            .bind(identified)
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!((flags, last_met_at), (16 | 512, Some(at(9))));

    // Equal to what the projections derive, and nothing to rebuild.
    derive_facts(&pool).await;
    assert_eq!(facts(&pool).await, upgraded);
    let checkpoints: Vec<(String, i64)> =
        sqlx::query_as("SELECT projection, stream_sequence FROM projection_checkpoints ORDER BY 1")
            .fetch_all(&pool)
            .await
            .unwrap();
    assert_eq!(
        checkpoints,
        [
            ("casepath_identification".to_owned(), 4),
            ("casepath_referral".to_owned(), 3)
        ]
    );
    pool.close().await;
    nrm_kernel::db::drop_database(&settings.database).await.unwrap();
}
