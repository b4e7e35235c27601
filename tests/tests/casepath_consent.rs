//! Issue 11: consent withdrawn for an agency: its view loses the person's
//! data within one second. MSD holds an accepted referral under the
//! person's consent, so it sees the person (coded) and the plan; the police
//! who recorded the consent withdraw it. From the WithdrawConsent answer
//! to the first answer without the person's data: a GetPath polled in a
//! loop and a WatchPath running since before. Above one second fails: this
//! is the requirement, not a benchmark.

#![allow(clippy::unwrap_used)] // Test code: a failed unwrap is a failed test.

use std::time::{Duration, Instant};

use futures::StreamExt as _;
use nrm_e2e::authorized;
use nrm_e2e::casepath::{Country, rid};
use nrm_kernel::auth::Role;
use nrm_proto::casepath::v1::{self as cp, PathPart};
use nrm_proto::referral::v1 as rf;

/// The bound.
const WITHIN: Duration = Duration::from_secs(1);

/// Whether `path` still shows the person's data: the coded person or the plan.
fn shows_the_person(path: &cp::Path) -> bool {
    path.person.is_some()
        || path.parts.contains(&(PathPart::Person as i32))
        || path.parts.contains(&(PathPart::Plan as i32))
        || path.steps.iter().any(|s| s.part == PathPart::Plan as i32)
}

#[tokio::test]
async fn a_withdrawn_consent_removes_the_person_from_the_agencys_view_within_a_second() {
    let kg = Country::alone("kg", |_| {}).await;
    let police = kg.caller(Role::Police);
    let msd = kg.caller(Role::Msd);
    let mut case = kg.report(&police, |_| {}).await;
    kg.identify(&police, &mut case).await;
    let consent_id = kg
        .consent(&police, &case, &msd.agency, &[rf::ServiceKind::Social])
        .await;
    let referral_id = kg
        .refer(&police, &case, &msd.agency, &[rf::ServiceKind::Social], &consent_id)
        .await;
    kg.accept(&msd, &referral_id).await;
    kg.referral
        .client
        .clone()
        .add_plan_goal(authorized(
            rf::AddPlanGoalRequest {
                request_id: rid(),
                person_id: case.person_id.clone(),
                kind: rf::GoalKind::Work as i32,
                due_at: None,
            },
            &msd.token(),
        ))
        .await
        .unwrap();

    // MSD sees the person and the plan (a positive signal: the projections applied it all).
    let before = kg
        .casepath
        .wait_path(&case.person_id, &msd, |p| {
            p.person.is_some() && p.steps.iter().any(|s| s.part == PathPart::Plan as i32)
        })
        .await;
    assert!(shows_the_person(&before));
    let mut watch = kg
        .casepath
        .client
        .clone()
        .watch_path(authorized(
            cp::GetPathRequest {
                person_id: case.person_id.clone(),
            },
            &msd.token(),
        ))
        .await
        .unwrap()
        .into_inner();
    let first = watch.next().await.unwrap().unwrap();
    assert!(shows_the_person(&first), "the watch starts with the path as it stands");

    // The police withdraw the consent.
    kg.referral
        .client
        .clone()
        .withdraw_consent(authorized(
            rf::WithdrawConsentRequest {
                request_id: rid(),
                consent_id: consent_id.clone(),
            },
            &police.token(),
        ))
        .await
        .unwrap();
    let withdrawn = Instant::now();

    // Updates sent, and whether the watch ended refused.
    let mut updates = 0i64;
    let mut refused = 0i64;
    let watched = async {
        loop {
            match tokio::time::timeout(Duration::from_secs(10), watch.next()).await {
                Err(_) => panic!("the watch sent nothing within 10 s of the withdrawal"),
                Ok(None) => return (withdrawn.elapsed(), "the watch ended"),
                Ok(Some(Err(status))) => {
                    assert_eq!(status.code(), tonic::Code::PermissionDenied, "{status:?}");
                    refused += 1;
                    return (withdrawn.elapsed(), "the watch ended with PERMISSION_DENIED");
                }
                Ok(Some(Ok(path))) if !shows_the_person(&path) => {
                    updates += 1;
                    return (withdrawn.elapsed(), "the watch sent a path without the person");
                }
                Ok(Some(Ok(_))) => updates += 1,
            }
        }
    };
    let polled = async {
        loop {
            match kg.casepath.path(&case.person_id, &msd).await {
                Err(status) => {
                    assert_eq!(status.code(), tonic::Code::PermissionDenied, "{status:?}");
                    return (withdrawn.elapsed(), "GetPath refused");
                }
                Ok(path) if !shows_the_person(&path) => return (withdrawn.elapsed(), "GetPath without the person"),
                Ok(_) => {
                    assert!(
                        withdrawn.elapsed() < Duration::from_secs(10),
                        "GetPath still shows the person"
                    );
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            }
        }
    };
    let ((watch_after, watch_how), (poll_after, poll_how)) = tokio::join!(watched, polled);
    println!("after the withdrawal: {poll_how} in {poll_after:?}; {watch_how} in {watch_after:?}");
    assert!(
        poll_after <= WITHIN,
        "GetPath lost the person's data only after {poll_after:?}"
    );
    assert!(
        watch_after <= WITHIN,
        "WatchPath lost the person's data only after {watch_after:?}"
    );

    // Every update the watch sent was audited before it left, and a watch
    // that ended refused left the refusal on the trail.
    let audited: Vec<(String, i64)> = sqlx::query_as(
        "SELECT outcome, count(*) FROM audit_log
         WHERE action IN ('WatchPath:update', 'WatchPath:denied') AND agency = $1 AND person_id = $2::uuid
         GROUP BY outcome ORDER BY outcome",
    )
    .bind(&msd.agency)
    .bind(&case.person_id)
    .fetch_all(&kg.casepath.pool)
    .await
    .unwrap();
    let of = |outcome: &str| audited.iter().find(|(o, _)| o == outcome).map_or(0, |(_, n)| *n);
    assert_eq!((of("ok"), of("denied")), (updates, refused), "{audited:?}");

    // And it stays so: the path as MSD sees it now, after everything settled.
    kg.settle().await;
    if let Ok(path) = kg.casepath.path(&case.person_id, &msd).await {
        assert!(!shows_the_person(&path), "{path:#?}");
    }
    // The coordinator still sees the whole path, the consent ended.
    let full = kg
        .casepath
        .path(&case.person_id, &kg.caller(Role::Coordinator))
        .await
        .unwrap();
    assert!(
        full.steps
            .iter()
            .any(|s| s.kind == cp::StepKind::ConsentEnded as i32 && s.subject_id == consent_id),
        "{full:#?}"
    );

    kg.stop(&[]).await;
}
