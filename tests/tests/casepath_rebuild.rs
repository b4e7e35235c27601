//! Issue 11: rebuild equals live. The full scenario in ru and kg, and in kg
//! two more persons (one with a referral waiting for MoH's answer, one
//! undecided): every path (as the coordinator lists them), the inboxes and
//! the statistics captured; then the read models dropped (every `cp_*`
//! table emptied, casepath's checkpoints deleted) and casepath started
//! again on its database; once it has caught up with the four streams
//! (a positive signal: every checkpoint at its stream's end), everything
//! is asked again and compared. Times that run to "now" (the last step's
//! `spent`, an open stage's `spent`, the inbox's `time_left` and `as_of`)
//! are left out of the comparison; everything else must be equal.
//!
//! Then `nrmctl ops rebuild` against casepath (the operator's
//! RebuildReadModels, while casepath runs) says every read model came out
//! equal.

#![allow(clippy::unwrap_used)] // Test code: a failed unwrap is a failed test.

use nrm_e2e::casepath::{Countries, Country, Walk};
use nrm_e2e::{binary, issuer_key_path};
use nrm_kernel::auth::Role;
use nrm_proto::casepath::v1 as cp;
use nrm_proto::referral::v1 as rf;

/// Everything casepath answers the coordinator and the agencies, without
/// the times that run to now.
#[derive(Debug, PartialEq)]
struct Views {
    paths: Vec<cp::Path>,
    summaries: Vec<cp::PathSummary>,
    inboxes: Vec<Vec<cp::InboxItem>>,
    statistics: cp::Statistics,
}

fn steady_path(mut path: cp::Path) -> cp::Path {
    if let Some(last) = path.steps.last_mut() {
        last.spent = None;
    }
    for span in &mut path.stages {
        if span.left_at.is_none() {
            span.spent = None;
        }
    }
    for item in &mut path.waiting {
        item.time_left = None;
    }
    path
}

/// `at`: the moment the statistics' period is counted around, the same for
/// the live capture and the rebuilt one (the period is echoed back).
async fn capture(country: &Country, at: chrono::DateTime<chrono::Utc>) -> Views {
    let coordinator = country.caller(Role::Coordinator);
    let summaries = country.casepath.all_paths(&coordinator).await;
    let mut paths = Vec::new();
    for summary in &summaries {
        for role in [Role::Coordinator, Role::Police, Role::Msd, Role::Iom, Role::Shelter] {
            if let Ok(path) = country.casepath.path(&summary.person_id, &country.caller(role)).await {
                paths.push(steady_path(path));
            }
        }
    }
    let mut inboxes = Vec::new();
    for role in [Role::Coordinator, Role::Police, Role::Msd, Role::Moh] {
        let mut items = country
            .casepath
            .inbox(&country.caller(role), cp::ListInboxRequest::default())
            .await;
        for item in &mut items {
            item.time_left = None;
        }
        inboxes.push(items);
    }
    let statistics = country
        .casepath
        .statistics(
            &coordinator,
            cp::GetStatisticsRequest {
                from: Some(nrm_kernel::validate::timestamp(at - chrono::Duration::days(3))),
                to: Some(nrm_kernel::validate::timestamp(at + chrono::Duration::days(1))),
                publishable: false,
                min_cell: 0,
            },
        )
        .await
        .unwrap();
    Views {
        paths,
        summaries,
        inboxes,
        statistics,
    }
}

#[tokio::test]
async fn the_rebuilt_read_models_equal_the_live_ones() {
    let mut world = Countries::start().await;
    let walked = Walk::run(&world).await;
    let kg = &world.kg;
    let police = kg.caller(Role::Police);
    let moh = kg.caller(Role::Moh);
    let waiting = kg.report(&police, |_| {}).await;
    let consent_id = kg
        .consent(&police, &waiting, &moh.agency, &[rf::ServiceKind::Medical])
        .await;
    kg.refer(&police, &waiting, &moh.agency, &[rf::ServiceKind::Medical], &consent_id)
        .await;
    kg.report(&police, |r| r.gender = nrm_proto::common::v1::Gender::Male as i32)
        .await;
    kg.settle().await;

    let at = chrono::Utc::now();
    let live_kg = capture(&world.kg, at).await;
    let live_ru = capture(&world.ru, at).await;
    assert_eq!(live_kg.summaries.len(), 3, "{:?}", live_kg.summaries);
    assert!(
        live_kg
            .paths
            .iter()
            .any(|p| p.person_id == walked.kg_case.person_id && p.steps.len() >= 20),
        "the walked path is among them"
    );
    assert!(live_kg.inboxes[3].iter().any(|i| i.agency == moh.agency), "MoH waits");

    for country in [&mut world.kg, &mut world.ru] {
        country.casepath.drop_read_models_and_restart().await;
        country.casepath.caught_up().await;
    }
    let rebuilt_kg = capture(&world.kg, at).await;
    let rebuilt_ru = capture(&world.ru, at).await;
    assert_eq!(rebuilt_kg, live_kg, "kg: rebuilt from the streams equals live");
    assert_eq!(rebuilt_ru, live_ru, "ru: rebuilt from the streams equals live");
    println!(
        "rebuilt equal: kg {} paths, {} inbox items; ru {} paths",
        live_kg.paths.len(),
        live_kg.inboxes.iter().map(Vec::len).sum::<usize>(),
        live_ru.paths.len()
    );

    // The operator's rebuild while casepath runs (`nrmctl ops rebuild`,
    // OperatorService.RebuildReadModels): every read model equal.
    // Not std's: a blocking wait would stop this runtime, and casepath in it.
    let out = tokio::process::Command::new(binary("nrmctl"))
        .args(["--as-agency", "kg-ops", "--as-role", "operator", "--endpoint"])
        .arg(&world.kg.casepath.endpoint)
        .args(["ops", "rebuild"])
        .env("NRM_ISSUER_KEY", issuer_key_path())
        .env_remove("NRM_TOKEN")
        .output()
        .await
        .expect("run nrmctl");
    let text = String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    println!("nrmctl ops rebuild:\n{text}");
    assert!(out.status.success(), "nrmctl ops rebuild: {text}");
    for (_, projection) in nrm_e2e::casepath::PROJECTIONS {
        let line = text
            .lines()
            .find(|l| l.contains(projection))
            .unwrap_or_else(|| panic!("{projection} in {text}"));
        assert!(line.contains("equal") && !line.contains("DIFFERENT"), "{line}");
    }
    assert_eq!(
        capture(&world.kg, at).await,
        live_kg,
        "and the views after it are the same"
    );

    // A view changed behind casepath's back (an insider, a bug): the shadow
    // comparison finds it, the live view is rebuilt from the streams, and
    // the next comparison is equal again.
    let changed = sqlx::query("UPDATE cp_cases SET citizenship = 'zz' WHERE case_id = (SELECT case_id FROM cp_cases ORDER BY case_id LIMIT 1)")
        .execute(&world.kg.casepath.pool)
        .await
        .unwrap()
        .rows_affected();
    assert_eq!(changed, 1);
    let rebuild = || async {
        let out = tokio::process::Command::new(binary("nrmctl"))
            .args(["--as-agency", "kg-ops", "--as-role", "operator"])
            .args(["--casepath-endpoint", &world.kg.casepath.endpoint])
            .args([
                "ops",
                "rebuild",
                "--service",
                "casepath",
                "--projection",
                "casepath_identification",
            ])
            .env("NRM_ISSUER_KEY", issuer_key_path())
            .env_remove("NRM_TOKEN")
            .output()
            .await
            .expect("run nrmctl");
        let text = String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
        (out.status.code(), text)
    };
    let (code, text) = rebuild().await;
    assert_eq!(code, Some(3), "{text}");
    assert!(text.contains("DIFFERENT"), "{text}");
    let left: i64 = sqlx::query_scalar("SELECT count(*) FROM cp_cases WHERE citizenship = 'zz'")
        .fetch_one(&world.kg.casepath.pool)
        .await
        .unwrap();
    assert_eq!(left, 0, "the live view was rebuilt from the streams");
    let (code, text) = rebuild().await;
    assert_eq!(code, Some(0), "{text}");
    assert!(text.contains("equal") && !text.contains("DIFFERENT"), "{text}");
    assert_eq!(
        capture(&world.kg, at).await,
        live_kg,
        "the views are the live ones again"
    );

    world.stop().await;
}
