//! Issue 11, the full scenario: one person across all four services and
//! both countries (ru and kg on two nats-servers joined by the leaf link,
//! [`Countries`]), and the national coordinator's path in each: every step
//! in order, with the time spent at each.
//!
//! ru: the police report and identify; ru's IOM office opens the return
//! for that case (`foreign_reference` = ru's case ID) and runs it to the
//! handover. kg: the case opened from abroad, the consent and the
//! reintegration referral (by themselves), MSD accepts, the bed held for
//! the arrival, admitted, a service delivered, a plan goal, the goal met.
//! The walk takes each step only once the one before is seen where it
//! matters ([`Walk`]), so the order of the timeline is known exactly.

#![allow(clippy::unwrap_used)] // Test code: a failed unwrap is a failed test.

use nrm_e2e::casepath::{Countries, Country, Walk, duration, kinds, time};
use nrm_kernel::auth::Role;
use nrm_proto::casepath::v1::{self as cp, Stage, StepKind as K};

/// Asserts the durations: each step's `spent` is the time to the next
/// step, none is negative, and together (but the last, which runs to now)
/// they add up to the time from the first step to the last.
fn assert_durations(path: &cp::Path, country: &str) {
    let steps = &path.steps;
    assert!(steps.len() >= 2, "{country}: {steps:?}");
    let mut total = std::time::Duration::ZERO;
    for (i, step) in steps.iter().enumerate() {
        let spent = duration(step.spent.as_ref())
            .unwrap_or_else(|| panic!("{country}: step {i} ({:?}) has no or a negative spent", step.kind));
        if let Some(next) = steps.get(i + 1) {
            let gap = (time(next.at.as_ref()) - time(step.at.as_ref()))
                .to_std()
                .unwrap_or_else(|_| panic!("{country}: step {} is before step {i}", i + 1));
            assert_eq!(spent, gap, "{country}: step {i} ({:?}) lasts until the next", step.kind);
            total += spent;
        }
    }
    let first = time(steps[0].at.as_ref());
    let last = time(steps[steps.len() - 1].at.as_ref());
    assert_eq!(total, (last - first).to_std().unwrap(), "{country}: the spans add up");
}

/// `person_id`'s path as `country`'s coordinator sees it.
async fn coordinators_path(country: &Country, person_id: &str) -> cp::Path {
    country
        .casepath
        .path(person_id, &country.caller(Role::Coordinator))
        .await
        .unwrap()
}

#[tokio::test]
async fn the_coordinators_path_shows_every_step_in_order_in_both_countries() {
    let world = Countries::start().await;
    let walked = Walk::run(&world).await;

    // ru: the identification, then the return run there.
    let ru_path = coordinators_path(&world.ru, &walked.ru_case.person_id).await;
    let expected_ru = [
        K::Found,
        K::Reported,
        K::Screened,
        K::Identified,
        K::ReturnOpened,
        K::ReturnConsent,
        K::RiskAssessed,
        K::DocumentRequested,
        K::DocumentIssued,
        K::ItineraryBooked,
        K::EscortAssigned,
        K::Departed,
        K::Arrived,
        K::HandedOver,
    ];
    assert_eq!(kinds(&ru_path), expected_ru, "ru's path: {ru_path:#?}");
    assert_durations(&ru_path, "ru");
    assert!(ru_path.steps.iter().all(|s| s.country == "ru"), "{ru_path:#?}");
    assert_eq!(ru_path.stage, Stage::Returned as i32, "{ru_path:#?}");
    assert!(ru_path.person.is_some() && !ru_path.stages.is_empty());
    let return_steps: Vec<_> = ru_path
        .steps
        .iter()
        .filter(|s| s.part == cp::PathPart::Return as i32)
        .collect();
    assert!(
        return_steps.iter().all(|s| s.subject_id == walked.return_id),
        "every return step is the return's"
    );

    // kg: the return as it crossed (each step as recorded in ru), the bed
    // held when the need was announced, then everything at home.
    let kg_path = coordinators_path(&world.kg, &walked.kg_case.person_id).await;
    let expected_kg = [
        K::ReturnOpened,
        K::ReturnConsent,
        K::ReturnAnnounced,
        K::RiskAssessed,
        K::DocumentRequested,
        K::DocumentIssued,
        K::ItineraryBooked,
        K::BedHeld,
        K::EscortAssigned,
        K::Departed,
        K::Arrived,
        K::HandedOver,
        K::CaseOpenedFromAbroad,
        K::ConsentRecorded,
        K::ReferralSent,
        K::ReferralAccepted,
        K::Admitted,
        K::ServiceDelivered,
        K::PlanGoalAdded,
        K::GoalMet,
    ];
    assert_eq!(kinds(&kg_path), expected_kg, "kg's path: {kg_path:#?}");
    assert_durations(&kg_path, "kg");
    let subject = |kind: K| {
        kg_path
            .steps
            .iter()
            .find(|s| s.kind == kind as i32)
            .map(|s| s.subject_id.clone())
            .unwrap()
    };
    assert_eq!(subject(K::CaseOpenedFromAbroad), walked.kg_case.case_id);
    assert_eq!(subject(K::ReferralAccepted), walked.referral_id);
    assert_eq!(subject(K::ConsentRecorded), walked.consent_id);
    assert_eq!(subject(K::BedHeld), walked.hold_id);
    assert_eq!(subject(K::Admitted), walked.hold_id);
    assert_eq!(subject(K::GoalMet), walked.goal_id);
    assert_eq!(subject(K::HandedOver), walked.return_id);
    // The return's steps happened in ru; the rest at home.
    for step in &kg_path.steps {
        let abroad = step.part == cp::PathPart::Return as i32 && step.kind != K::ReturnAnnounced as i32;
        assert_eq!(step.country, if abroad { "ru" } else { "kg" }, "{step:?}");
    }
    assert!(kg_path.person.is_some());
    assert_eq!(kg_path.person.as_ref().unwrap().citizenship, "KG");
    assert!(
        !kg_path.stages.is_empty(),
        "the coordinator sees the time spent at each stage"
    );
    println!(
        "ru: {} steps, kg: {} steps; kg stage {:?}",
        ru_path.steps.len(),
        kg_path.steps.len(),
        Stage::try_from(kg_path.stage)
    );

    world.stop().await;
}
