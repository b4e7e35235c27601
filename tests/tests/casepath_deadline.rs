//! Issue 11: an identification decision's deadline across a weekend and a
//! public holiday. casepath runs with `NRM_CASEPATH__CALENDAR_FILE` naming
//! a calendar (UTC+06:00, Saturday and Sunday off) whose one holiday is the
//! first working day after today. A case reported now is due at the end of
//! the fifth working day after today (the default of
//! `NRM_CASEPATH__DECISION_WORKING_DAYS`), in the calendar's time zone: the
//! test works the date out by hand for today's weekday, and the deciding
//! authority's inbox, the coordinator's and the path's waiting list show
//! exactly that `due_at`, not overdue; once decided, it is gone.

#![allow(clippy::unwrap_used)] // Test code: a failed unwrap is a failed test.

use chrono::{Datelike as _, Days, FixedOffset, NaiveDate, TimeZone as _, Weekday};
use nrm_e2e::casepath::{Country, time};
use nrm_kernel::auth::Role;
use nrm_proto::casepath::v1 as cp;

/// UTC+06:00, Bishkek.
fn offset() -> FixedOffset {
    FixedOffset::east_opt(6 * 3600).unwrap()
}

/// For a report on a day of `weekday`, with the holiday on the first
/// working day after it and Saturday and Sunday off: (days to the holiday,
/// days to the fifth working day). Worked out by hand, day by day:
///
/// | today | holiday | working days 1..5          | 5th   |
/// |-------|---------|----------------------------|-------|
/// | Mon   | Tue +1  | Wed Thu Fri Mon Tue        | +8    |
/// | Tue   | Wed +1  | Thu Fri Mon Tue Wed        | +8    |
/// | Wed   | Thu +1  | Fri Mon Tue Wed Thu        | +8    |
/// | Thu   | Fri +1  | Mon Tue Wed Thu Fri        | +8    |
/// | Fri   | Mon +3  | Tue Wed Thu Fri Mon        | +10   |
/// | Sat   | Mon +2  | Tue Wed Thu Fri Mon        | +9    |
/// | Sun   | Mon +1  | Tue Wed Thu Fri Mon        | +8    |
const fn by_hand(weekday: Weekday) -> (u64, u64) {
    match weekday {
        Weekday::Mon | Weekday::Tue | Weekday::Wed | Weekday::Thu => (1, 8),
        Weekday::Fri => (3, 10),
        Weekday::Sat => (2, 9),
        Weekday::Sun => (1, 8),
    }
}

#[tokio::test]
async fn a_decision_is_due_five_working_days_on_across_a_weekend_and_a_holiday() {
    let today: NaiveDate = chrono::Utc::now().with_timezone(&offset()).date_naive();
    let (to_holiday, to_fifth) = by_hand(today.weekday());
    let holiday = today + Days::new(to_holiday);
    let fifth = today + Days::new(to_fifth);
    // Due when the fifth working day ends: midnight after it, in Bishkek.
    let due = offset()
        .from_local_datetime(&(fifth + Days::new(1)).and_hms_opt(0, 0, 0).unwrap())
        .unwrap()
        .to_utc();
    let dir = std::env::temp_dir().join(format!("nrm-test-calendar-{}", nrm_e2e::unique()));
    std::fs::create_dir_all(&dir).unwrap();
    let calendar = dir.join("calendar.toml");
    std::fs::write(
        &calendar,
        format!(
            "utc_offset = \"+06:00\"\nweekend = [\"sat\", \"sun\"]\nholidays = [\"{holiday}\"]\nworking_days = []\n"
        ),
    )
    .unwrap();
    println!(
        "today {today} ({:?}), holiday {holiday}, fifth working day {fifth}, due {due}",
        today.weekday()
    );

    let kg = Country::alone("kg", |s| {
        s.casepath.calendar_file = calendar.display().to_string();
    })
    .await;
    let police = kg.caller(Role::Police);
    let coordinator = kg.caller(Role::Coordinator);
    let mut case = kg.report(&police, |_| {}).await;
    kg.settle().await;

    let decision = cp::ListInboxRequest {
        kind: cp::InboxKind::IdentificationDecision as i32,
        ..Default::default()
    };
    let mine = kg.casepath.inbox(&police, decision.clone()).await;
    assert_eq!(mine.len(), 1, "{mine:?}");
    let item = &mine[0];
    let reported = time(item.waiting_since.as_ref()).with_timezone(&offset()).date_naive();
    assert_eq!(reported, today, "the test ran across midnight in Bishkek; run it again");
    assert_eq!(item.subject_id, case.case_id);
    assert_eq!(item.person_id, case.person_id);
    assert_eq!(item.agency, police.agency, "the competent authority decides");
    assert_eq!(time(item.due_at.as_ref()), due, "{item:?}");
    assert!(!item.overdue);
    let left = item.time_left.unwrap();
    assert!(left.seconds > 0, "time left: {left:?}");

    // The coordinator names the agency, and sees the same deadline.
    let theirs = kg
        .casepath
        .inbox(
            &coordinator,
            cp::ListInboxRequest {
                agency: police.agency.clone(),
                ..decision.clone()
            },
        )
        .await;
    assert_eq!(theirs.len(), 1);
    assert_eq!(time(theirs[0].due_at.as_ref()), due);
    // Nothing is overdue yet anywhere.
    assert!(
        kg.casepath
            .inbox(
                &coordinator,
                cp::ListInboxRequest {
                    overdue_only: true,
                    ..Default::default()
                }
            )
            .await
            .is_empty()
    );
    // The path shows what waits, with the same deadline.
    let path = kg.casepath.path(&case.person_id, &police).await.unwrap();
    let waiting: Vec<_> = path
        .waiting
        .iter()
        .filter(|w| w.kind == cp::InboxKind::IdentificationDecision as i32)
        .collect();
    assert_eq!(waiting.len(), 1, "{path:#?}");
    assert_eq!(time(waiting[0].due_at.as_ref()), due);

    // Decided: nothing waits any more.
    kg.identify(&police, &mut case).await;
    kg.settle().await;
    assert!(kg.casepath.inbox(&police, decision).await.is_empty());

    kg.stop(&[]).await;
    let _ = std::fs::remove_dir_all(dir);
}
