//! Issue 11: publishable statistics. Eight persons reported in one
//! country (six women, two men), and one anonymous notification (a woman)
//! filed by an NGO for an adult who did not consent to a referral. The raw
//! statistics count all nine exactly; the publishable ones (k = 5, a whole
//! month) suppress the small cell (the two men) and its complement (the
//! women: with the total shown they would give the men away), keep the
//! headline totals right, and give no suppressed count away. The
//! notification is counted, and is in no inbox and no path. `nrmctl stats
//! --publishable --csv` prints the same, and says what it is.
//!
//! Then the insider review's re-identifications, each shown closed on a
//! casepath whose read models are seeded by SQL (as the projections fill
//! them, and their per-person facts derived as a rebuild derives them):
//! (a) a small cell among zeros beside its total; (b) a month of one
//! person; (c) periods that differ by less than a month; (d) a rare
//! citizenship named; (e) the anonymous count as the headline total minus
//! the persons; (f) the samples of a time; (g) a request for k = 1; (h) a
//! median to the millisecond; (i) a CSV that does not say it is not for
//! publication. Every answer is checked by one checker,
//! [`assert_publishable`], against the exact answer of the same period.

#![allow(clippy::unwrap_used)] // Test code: a failed unwrap is a failed test.

use std::collections::BTreeMap;

use chrono::{DateTime, Datelike as _, TimeDelta, TimeZone as _, Utc};
use nrm_e2e::casepath::{Country, rid};
use nrm_e2e::casepath_seed::{CaseSeed, Casepath, derive_facts, referral};
use nrm_e2e::{authorized, bad_fields, binary, issuer_key_path, token};
use nrm_kernel::auth::Role;
use nrm_kernel::validate::timestamp;
use nrm_proto::casepath::v1 as cp;
use nrm_proto::common::v1::{AgeBand, Gender};
use nrm_proto::identification::v1 as idpb;
use sqlx::PgPool;
use uuid::Uuid;

/// The cells of one dimension, value → (count, suppressed).
fn dimension(stats: &cp::Statistics, name: &str) -> BTreeMap<String, (u64, bool)> {
    stats
        .counts
        .iter()
        .filter(|c| c.dimension == name)
        .map(|c| (c.value.clone(), (c.count, c.suppressed)))
        .collect()
}

/// The first of the month of `t`, 00:00:00Z; `months` later.
fn month_of(t: DateTime<Utc>, months: u32) -> DateTime<Utc> {
    let first = Utc.with_ymd_and_hms(t.year(), t.month(), 1, 0, 0, 0).unwrap();
    first.checked_add_months(chrono::Months::new(months)).unwrap()
}

/// The first of `month` of `year`, 00:00:00Z.
fn month(year: i32, month: u32) -> DateTime<Utc> {
    Utc.with_ymd_and_hms(year, month, 1, 0, 0, 0).unwrap()
}

fn request(from: DateTime<Utc>, to: DateTime<Utc>, publishable: bool) -> cp::GetStatisticsRequest {
    cp::GetStatisticsRequest {
        from: Some(timestamp(from)),
        to: Some(timestamp(to)),
        publishable,
        min_cell: 0,
    }
}

const DAY: i64 = 86_400;
const OPEN: [&str; 2] = ["citizenship", "country_of_exploitation"];
/// The dimensions whose cells each unit is in exactly one of.
const PARTITIONS: [&str; 6] = [
    "stage",
    "gender",
    "age_band",
    "citizenship",
    "country_of_exploitation",
    "notification",
];

/// Everything a publishable answer must hold, checked against the exact
/// answer of the same period: no count below k (and above 0) is shown, no
/// suppressed count can be computed back from what is shown, no code with
/// a suppressed count is named, and what is shown is exact. Returns the
/// number of suppressed cells.
fn assert_publishable(public: &cp::Statistics, raw: &cp::Statistics) -> u32 {
    assert!(public.publishable && !raw.publishable);
    let k = u64::from(public.min_cell);
    assert!(k >= 5, "k is at least the configured 5: {public:#?}");
    let headline = dimension(raw, "gender")["total"].0;
    let stage_hidden = public.counts.iter().any(|c| c.dimension == "stage" && c.suppressed);
    let mut suppressed = 0;
    for cell in &public.counts {
        if cell.suppressed {
            suppressed += 1;
            assert_eq!(cell.count, 0, "a suppressed cell gives no count away: {cell:?}");
            continue;
        }
        assert_ne!(cell.value, "other", "`other` is always suppressed: {cell:?}");
        let exact = raw
            .counts
            .iter()
            .find(|c| c.dimension == cell.dimension && c.value == cell.value)
            .unwrap_or_else(|| panic!("{cell:?} is not in the exact answer"));
        assert_eq!(cell.count, exact.count, "a shown count is the exact one: {cell:?}");
        assert!(
            cell.value == "total" || cell.count == 0 || cell.count >= k,
            "a cell below k (and above 0) is suppressed: {cell:?}"
        );
        if OPEN.contains(&cell.dimension.as_str()) && cell.value != "total" {
            assert!(cell.count >= k, "only a code of k or more is named: {cell:?}");
        }
    }
    assert_eq!(public.suppressed_cells, suppressed, "{public:#?}");
    // The headline total is known when any dimension shows it.
    let headline_shown = public
        .counts
        .iter()
        .any(|c| c.value == "total" && !c.suppressed && dimension(raw, &c.dimension)["total"].0 == headline);
    let names: Vec<&str> = {
        let mut n: Vec<&str> = public.counts.iter().map(|c| c.dimension.as_str()).collect();
        n.dedup();
        n
    };
    for name in names {
        let cells = dimension(public, name);
        let (total, total_hidden) = cells["total"];
        let inner: Vec<(&String, &(u64, bool))> = cells.iter().filter(|(v, _)| *v != "total").collect();
        let hidden = inner.iter().filter(|(_, (_, s))| *s).count();
        if !OPEN.contains(&name) {
            assert_ne!(
                hidden, 1,
                "{name}: one suppressed cell is the total minus the others: {public:#?}"
            );
        }
        if PARTITIONS.contains(&name) && hidden > 0 {
            // What a reader can compute: the total minus the shown cells.
            let shown: u64 = inner.iter().filter(|(_, (_, s))| !*s).map(|(_, (n, _))| *n).sum();
            let known_total = if total_hidden {
                (dimension(raw, name)["total"].0 == headline && headline_shown).then_some(headline)
            } else {
                Some(total)
            };
            if let Some(total) = known_total {
                let rest = total - shown;
                assert!(
                    rest == 0 || rest >= k,
                    "{name}: the suppressed cells sum to {rest} < k, computable from the totals"
                );
            }
        }
    }
    // The persons (the stage) give the anonymous count as the headline minus them.
    let anonymous = dimension(public, "notification")["anonymous"];
    if anonymous.1 {
        let stage = dimension(public, "stage");
        assert!(
            stage["total"].1,
            "the persons are hidden with the anonymous count: {public:#?}"
        );
        assert!(
            stage.iter().any(|(v, (_, s))| v != "total" && *s),
            "the stage cells would sum to the persons: {public:#?}"
        );
    }
    if headline < k {
        assert!(
            public.counts.iter().all(|c| c.suppressed),
            "a table under k shows nothing: {public:#?}"
        );
    }
    for time in &public.times {
        if time.suppressed {
            assert!(
                time.samples == 0 && time.median.is_none() && time.p90.is_none(),
                "{time:?}"
            );
        } else {
            // Shown on at least k samples; their number withheld (0) while a
            // stage cell is suppressed, and the reintegration time with it.
            assert!(headline >= k, "{time:?}");
            if stage_hidden {
                assert_eq!(time.samples, 0, "{time:?}");
                assert_ne!(time.measure, "identification_to_reintegration", "{time:?}");
            } else {
                assert!(time.samples >= k, "{time:?}");
            }
            for d in [&time.median, &time.p90].into_iter().flatten() {
                assert!(
                    d.seconds % DAY == 0 && d.nanos == 0,
                    "a shown time is whole days: {time:?}"
                );
            }
        }
    }
    suppressed
}

/// A case of a new person reported at `at`, of `citizenship`; decided
/// `decided` after the report when given.
async fn case(pool: &PgPool, at: DateTime<Utc>, citizenship: &str, decided: Option<TimeDelta>) -> Uuid {
    let person = Uuid::now_v7();
    let mut c = CaseSeed::new(person, "kg-mvd", "kg-prosecutor", at);
    if let Some(d) = decided {
        c.status = 3;
        c.decided_at = Some(at + d);
    }
    c.insert(pool).await;
    sqlx::query("UPDATE cp_cases SET citizenship = $2 WHERE case_id = $1")
        .bind(c.case_id)
        .bind(citizenship)
        .execute(pool)
        .await
        .unwrap();
    person
}

/// An anonymous notification filed on `on` (a woman of 25–34, from kg,
/// exploited in ru).
async fn notification(pool: &PgPool, on: DateTime<Utc>) {
    sqlx::query(
        "INSERT INTO cp_notifications (notification_id, filed_on, found_country, country_of_exploitation, \
         exploitation_forms, gender, age_band, citizenship) VALUES ($1, $2, 'kg', 'ru', '{2}', 1, 4, 'kg')",
    )
    .bind(Uuid::now_v7())
    .bind(on)
    .execute(pool)
    .await
    .unwrap();
}

/// The exact and the publishable answer for [from, to).
async fn both(app: &Casepath, from: DateTime<Utc>, to: DateTime<Utc>) -> (cp::Statistics, cp::Statistics) {
    derive_facts(&app.pool).await;
    let coordinator = token("kg-coordinator", Role::Coordinator, "c-1");
    let mut client = app.client.clone();
    let raw = client
        .get_statistics(authorized(request(from, to, false), &coordinator))
        .await
        .unwrap()
        .into_inner();
    let public = client
        .get_statistics(authorized(request(from, to, true), &coordinator))
        .await
        .unwrap()
        .into_inner();
    assert_publishable(&public, &raw);
    (raw, public)
}

/// `nrmctl stats` against `endpoint` with `args`; its standard output.
async fn nrmctl_stats(endpoint: &str, args: &[&str]) -> String {
    // Not std's: a blocking wait would stop this runtime, and casepath in it.
    let out = tokio::process::Command::new(binary("nrmctl"))
        .args([
            "--as-agency",
            "kg-coordinator",
            "--as-role",
            "coordinator",
            "--casepath-endpoint",
            endpoint,
            "stats",
        ])
        .args(args)
        .env("NRM_ISSUER_KEY", issuer_key_path())
        .env_remove("NRM_TOKEN")
        .output()
        .await
        .expect("run nrmctl");
    let stdout = String::from_utf8(out.stdout).unwrap();
    assert!(out.status.success(), "{stdout}{}", String::from_utf8_lossy(&out.stderr));
    stdout
}

#[tokio::test]
async fn small_cells_and_their_complements_are_suppressed_and_totals_stay_right() {
    let kg = Country::alone("kg", |_| {}).await;
    let police = kg.caller(Role::Police);
    let coordinator = kg.caller(Role::Coordinator);
    // A publishable period is whole months: the month(s) of this test.
    let from = month_of(chrono::Utc::now(), 0);
    let mut cases = Vec::new();
    for gender in [Gender::Female; 6].into_iter().chain([Gender::Male; 2]) {
        cases.push(
            kg.report(&police, |r| {
                r.gender = gender as i32;
                r.citizenship = "KG".into();
            })
            .await,
        );
    }
    // A notification is filed on a day (midnight UTC), never at a time.
    let notification = kg
        .id
        .client
        .clone()
        .file_anonymous_notification(authorized(
            idpb::FileAnonymousNotificationRequest {
                request_id: rid(),
                found_country: "KZ".into(),
                country_of_exploitation: "KZ".into(),
                exploitation_forms: vec![idpb::ExploitationForm::Labour as i32],
                gender: Gender::Female as i32,
                age_band: AgeBand::AgeBand2534 as i32,
                citizenship: "KG".into(),
            },
            &kg.caller(Role::Ngo).token(),
        ))
        .await
        .unwrap()
        .into_inner()
        .notification_id;
    kg.settle().await;
    let to = month_of(chrono::Utc::now(), 1);
    let period = |publishable: bool| request(from, to, publishable);

    // Raw: every count exact.
    let raw = kg.casepath.statistics(&coordinator, period(false)).await.unwrap();
    assert!(!raw.publishable && raw.suppressed_cells == 0, "{raw:#?}");
    assert_eq!(raw.min_cell, 0, "nothing suppressed");
    let gender = dimension(&raw, "gender");
    assert_eq!(gender["total"], (9, false), "{raw:#?}");
    assert_eq!(gender["GENDER_FEMALE"], (7, false), "six reported and the notification");
    assert_eq!(gender["GENDER_MALE"], (2, false));
    let counted = dimension(&raw, "notification");
    assert_eq!(counted["total"], (9, false), "{raw:#?}");
    assert_eq!(counted["identified"], (8, false));
    assert_eq!(counted["anonymous"], (1, false), "the notification is counted");
    assert_eq!(dimension(&raw, "stage")["total"], (8, false));
    assert_eq!(dimension(&raw, "citizenship")["kg"], (9, false));
    let measures: Vec<&str> = raw.times.iter().map(|t| t.measure.as_str()).collect();
    for measure in [
        "report_to_decision",
        "referral_to_answer",
        "return_opened_to_handover",
        "identification_to_reintegration",
    ] {
        assert!(measures.contains(&measure), "{measure} in {measures:?}");
    }

    // Publishable: the small cell and its complement suppressed, the
    // headline total shown.
    let public = kg.casepath.statistics(&coordinator, period(true)).await.unwrap();
    assert!(public.publishable, "{public:#?}");
    assert_eq!(public.min_cell, 5, "the configured default");
    let gender = dimension(&public, "gender");
    assert_eq!(gender["total"], (9, false), "the headline total is shown: {public:#?}");
    assert_eq!(gender["GENDER_MALE"], (0, true), "the small cell");
    assert_eq!(
        gender["GENDER_FEMALE"],
        (0, true),
        "its complement (9 - 7 would give 2 away)"
    );
    let counted = dimension(&public, "notification");
    assert_eq!(counted["anonymous"], (0, true));
    assert_eq!(counted["identified"], (0, true), "its complement");
    assert_eq!(counted["total"], (0, true), "hidden with its cells");
    assert_eq!(
        dimension(&public, "stage")["total"],
        (0, true),
        "9 - 8 persons would give the notification away"
    );
    assert_eq!(dimension(&public, "citizenship")["kg"], (9, false));
    assert_publishable(&public, &raw);
    // CTDC's k = 11 hides more: 9 < 11 is the whole table.
    let ctdc = kg
        .casepath
        .statistics(
            &coordinator,
            cp::GetStatisticsRequest {
                min_cell: 11,
                ..period(true)
            },
        )
        .await
        .unwrap();
    assert_eq!(ctdc.min_cell, 11);
    assert_eq!(dimension(&ctdc, "citizenship")["other"], (0, true), "9 < 11: {ctdc:#?}");
    assert!(!dimension(&ctdc, "citizenship").contains_key("kg"), "{ctdc:#?}");
    assert_eq!(dimension(&ctdc, "gender")["total"], (0, true), "a table of 9 < 11");
    assert_publishable(&ctdc, &raw);

    // The notification is in no inbox and no path.
    let everyone = kg.casepath.inbox(&coordinator, cp::ListInboxRequest::default()).await;
    let police_inbox = kg.casepath.inbox(&police, cp::ListInboxRequest::default()).await;
    for item in everyone.iter().chain(&police_inbox) {
        assert_ne!(item.subject_id, notification, "{item:?}");
        assert_ne!(item.person_id, notification, "{item:?}");
    }
    assert_eq!(
        police_inbox.len(),
        cases.len(),
        "the police's inbox: a decision for each reported case, nothing for the notification"
    );
    let paths = kg.casepath.all_paths(&coordinator).await;
    assert_eq!(paths.len(), cases.len(), "one path per reported person: {paths:?}");
    assert!(paths.iter().all(|p| p.person_id != notification));
    let status = kg.casepath.path(&notification, &coordinator).await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::NotFound, "{status:?}");

    // nrmctl stats --publishable --csv: what it is, then the same cells and times.
    let (from_arg, to_arg) = (from.to_rfc3339(), to.to_rfc3339());
    let csv = nrmctl_stats(
        &kg.casepath.endpoint,
        &["--publishable", "--csv", "--from", &from_arg, "--to", &to_arg],
    )
    .await;
    print!("{csv}");
    let sections: Vec<&str> = csv.split("\n\n").collect();
    assert_eq!(sections.len(), 3, "what it is, the cells, the times: {csv}");
    assert_eq!(
        sections[0],
        format!(
            "publishable,yes\nmin_cell,5\nfrom,{}\nto,{}",
            from.format("%Y-%m-%dT%H:%M:%SZ"),
            to.format("%Y-%m-%dT%H:%M:%SZ")
        )
    );
    let mut lines = sections[1].lines();
    assert_eq!(lines.next(), Some("dimension,value,count,suppressed"));
    let rows: Vec<&str> = lines.collect();
    assert_eq!(rows.len(), public.counts.len());
    for (row, cell) in rows.iter().zip(&public.counts) {
        let count = if cell.suppressed {
            String::new()
        } else {
            cell.count.to_string()
        };
        assert_eq!(
            *row,
            format!("{},{},{count},{}", cell.dimension, cell.value, cell.suppressed)
        );
    }
    assert!(rows.contains(&"gender,total,9,false") && rows.contains(&"gender,GENDER_MALE,,true"));
    let mut lines = sections[2].lines();
    assert_eq!(
        lines.next(),
        Some("measure,samples,median_seconds,p90_seconds,suppressed")
    );
    assert_eq!(lines.count(), public.times.len());

    kg.stop(&[]).await;
}

/// (b) A month holding one person: every cell, total and time suppressed,
/// her rare citizenship named nowhere.
#[tokio::test]
async fn a_month_with_one_person_publishes_nothing_but_suppressed_cells() {
    let app = Casepath::start(&[]).await;
    let (from, to) = (month(2025, 3), month(2025, 4));
    case(&app.pool, from + TimeDelta::days(9), "tm", Some(TimeDelta::hours(30))).await;
    // Others, outside the month.
    for _ in 0..6 {
        case(&app.pool, month(2025, 4), "kg", None).await;
    }
    let (raw, public) = both(&app, from, to).await;
    assert_eq!(
        dimension(&raw, "citizenship")["tm"],
        (1, false),
        "the exact answer names her"
    );
    assert_eq!(
        raw.times
            .iter()
            .find(|t| t.measure == "report_to_decision")
            .unwrap()
            .samples,
        1
    );
    assert!(
        public.counts.iter().all(|c| c.suppressed && c.count == 0),
        "{public:#?}"
    );
    assert!(public.counts.iter().all(|c| c.value != "tm"), "{public:#?}");
    assert!(
        public.times.iter().all(|t| t.suppressed && t.samples == 0),
        "{public:#?}"
    );
    assert_eq!(
        dimension(&public, "citizenship").keys().collect::<Vec<_>>(),
        ["other", "total"]
    );
    // An empty month looks the same.
    let (_, empty) = both(&app, month(2025, 1), month(2025, 2)).await;
    let shape = |s: &cp::Statistics| {
        s.counts
            .iter()
            .map(|c| (c.dimension.clone(), c.value.clone(), c.suppressed))
            .collect::<Vec<_>>()
    };
    assert_eq!(
        shape(&empty),
        shape(&public),
        "an empty month and a month of one look alike"
    );
    // Each answer is on the trail: the period, exact or publishable, k.
    let audited: Vec<(String, String, String)> = sqlx::query_as(
        "SELECT agency, subject_id, purpose FROM audit_log WHERE action = 'GetStatistics' AND outcome = 'ok' ORDER BY seq",
    )
    .fetch_all(&app.pool)
    .await
    .unwrap();
    let march = format!("statistics:{}..{}", from.to_rfc3339(), to.to_rfc3339());
    assert_eq!(
        audited[..2],
        [
            (
                "kg-coordinator".to_owned(),
                march.clone(),
                "STATISTICS:exact".to_owned()
            ),
            (
                "kg-coordinator".to_owned(),
                march,
                "STATISTICS:publishable:k=5".to_owned()
            ),
        ],
        "{audited:?}"
    );
    assert_eq!(audited.len(), 4, "{audited:?}");
    app.stop().await;
}

/// (a) Three persons, all in one stage, and ten notifications: the stage
/// dimension `[0, 3, 0, …]` is hidden whole, its total too (with the
/// total shown, the 3 would be read off it).
#[tokio::test]
async fn a_small_cell_among_zeros_hides_its_dimension_and_its_total() {
    let app = Casepath::start(&[]).await;
    let (from, to) = (month(2025, 5), month(2025, 6));
    for i in 0..3 {
        case(&app.pool, from + TimeDelta::days(i), "kg", None).await;
    }
    for i in 0..10 {
        notification(&app.pool, from + TimeDelta::days(i)).await;
    }
    let (raw, public) = both(&app, from, to).await;
    let exact = dimension(&raw, "stage");
    assert_eq!(exact["total"], (3, false));
    assert_eq!(exact["STAGE_REPORTED"], (3, false));
    assert_eq!(
        exact.values().filter(|(n, _)| *n > 0).count(),
        2,
        "one stage and the total: {exact:?}"
    );
    let stage = dimension(&public, "stage");
    assert!(
        stage.values().all(|(n, s)| *s && *n == 0),
        "hidden whole, zeros and total: {stage:?}"
    );
    assert!(
        dimension(&public, "notification").values().all(|(_, s)| *s),
        "10 anonymous and 3 identified: {public:#?}"
    );
    assert_eq!(dimension(&public, "gender")["total"], (13, false), "the headline total");
    app.stop().await;
}

/// (e) Twenty persons and one anonymous notification: neither the stage
/// total nor the sum of the stage cells gives 21 - 20 = 1 away.
#[tokio::test]
async fn the_anonymous_count_cannot_be_computed_from_the_persons() {
    let app = Casepath::start(&[]).await;
    let (from, to) = (month(2025, 6), month(2025, 7));
    for i in 0..20 {
        let decided = (i < 6).then(|| TimeDelta::hours(i + 1));
        case(&app.pool, from + TimeDelta::hours(i * 5), "kg", decided).await;
    }
    notification(&app.pool, from + TimeDelta::days(3)).await;
    let (raw, public) = both(&app, from, to).await;
    assert_eq!(dimension(&raw, "stage")["total"], (20, false));
    assert_eq!(dimension(&raw, "stage")["STAGE_IDENTIFIED"], (6, false));
    assert_eq!(dimension(&raw, "notification")["anonymous"], (1, false));
    let stage = dimension(&public, "stage");
    assert_eq!(stage["total"], (0, true), "{public:#?}");
    assert_eq!(stage["STAGE_IDENTIFIED"], (0, true), "the stage cells would sum to 20");
    assert_eq!(stage["STAGE_REPORTED"], (0, true));
    let notification = dimension(&public, "notification");
    assert!(notification.values().all(|(_, s)| *s), "{notification:?}");
    assert_eq!(dimension(&public, "gender")["total"], (21, false));
    assert_eq!(dimension(&public, "citizenship")["kg"], (21, false));
    // Without the notification, the persons are the headline and shown.
    let (_, july) = both(&app, month(2025, 7), month(2025, 8)).await;
    assert!(july.counts.iter().all(|c| c.suppressed), "an empty month");
    app.stop().await;
}

/// (d) A Turkmen among twenty Kyrgyz and seven Uzbek citizens: `tm` (and
/// its complement `uz`) are folded into an unnamed `other`.
#[tokio::test]
async fn a_rare_citizenship_is_never_named() {
    let app = Casepath::start(&[]).await;
    let (from, to) = (month(2025, 8), month(2025, 9));
    for (n, code) in [(20, "kg"), (1, "tm"), (7, "uz")] {
        for i in 0..n {
            case(&app.pool, from + TimeDelta::hours(i), code, None).await;
        }
    }
    let (raw, public) = both(&app, from, to).await;
    assert_eq!(dimension(&raw, "citizenship")["tm"], (1, false));
    let citizenship = dimension(&public, "citizenship");
    assert_eq!(
        citizenship,
        BTreeMap::from([
            ("kg".to_owned(), (20, false)),
            ("other".to_owned(), (0, true)),
            ("total".to_owned(), (28, false)),
        ])
    );
    assert!(
        public.counts.iter().all(|c| c.value != "tm" && c.value != "uz"),
        "{public:#?}"
    );
    app.stop().await;
}

/// (f, h) Six decisions a few hours and minutes apart: the median and p90
/// are whole days, the samples shown (6 ≥ 5); two referral answers: their
/// samples hidden with their times.
#[tokio::test]
async fn times_are_whole_days_and_samples_below_k_are_hidden() {
    let app = Casepath::start(&[]).await;
    let (from, to) = (month(2025, 9), month(2025, 10));
    for i in 0..6 {
        let took = TimeDelta::days(2) + TimeDelta::hours(i * 3) + TimeDelta::milliseconds(1_234 * (i + 1));
        case(&app.pool, from + TimeDelta::days(i), "kg", Some(took)).await;
    }
    for _ in 0..2 {
        referral(
            &app.pool,
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
    let (raw, public) = both(&app, from, to).await;
    let measure = |s: &cp::Statistics, m: &str| s.times.iter().find(|t| t.measure == m).unwrap().clone();
    let exact = measure(&raw, "report_to_decision");
    assert_eq!(exact.samples, 6);
    assert_ne!(
        exact.median.unwrap().seconds % DAY,
        0,
        "the exact median is not whole days: {exact:?}"
    );
    let decision = measure(&public, "report_to_decision");
    assert!(!decision.suppressed && decision.samples == 6, "{decision:?}");
    assert_eq!(
        decision.median,
        Some(prost_types::Duration {
            seconds: 2 * DAY,
            nanos: 0
        }),
        "2 d 7.5 h"
    );
    assert_eq!(
        decision.p90,
        Some(prost_types::Duration {
            seconds: 3 * DAY,
            nanos: 0
        }),
        "2 d 13.5 h"
    );
    assert_eq!(measure(&raw, "referral_to_answer").samples, 2);
    let answer = measure(&public, "referral_to_answer");
    assert!(
        answer.suppressed && answer.samples == 0 && answer.median.is_none(),
        "{answer:?}"
    );
    app.stop().await;
}

/// (g) A publishable request may raise k, never lower it: 1 and 4 are
/// refused naming `min_cell`, as is 5 where 11 is configured.
#[tokio::test]
async fn a_min_cell_below_the_configured_one_is_refused() {
    let coordinator = token("kg-coordinator", Role::Coordinator, "c-1");
    let (from, to) = (month(2025, 1), month(2025, 2));
    for (configured, asked, answer) in [
        (None, 1, Err(())),
        (None, 4, Err(())),
        (None, 0, Ok(5)),
        (None, 11, Ok(11)),
        (Some("11"), 5, Err(())),
        (Some("11"), 0, Ok(11)),
    ] {
        let extra: Vec<(&str, &str)> = configured.map(|c| ("NRM_CASEPATH__MIN_CELL", c)).into_iter().collect();
        let app = Casepath::start(&extra).await;
        let mut client = app.client.clone();
        let got = client
            .get_statistics(authorized(
                cp::GetStatisticsRequest {
                    min_cell: asked,
                    ..request(from, to, true)
                },
                &coordinator,
            ))
            .await;
        match answer {
            Ok(k) => {
                let stats = got.unwrap().into_inner();
                assert!(
                    stats.publishable && stats.min_cell == k,
                    "{configured:?}, {asked}: {stats:#?}"
                );
            }
            Err(()) => assert_eq!(bad_fields(&got.unwrap_err()), ["min_cell"], "{configured:?}, {asked}"),
        }
        // The exact statistics take no k.
        let exact = client
            .get_statistics(authorized(
                cp::GetStatisticsRequest {
                    min_cell: asked,
                    ..request(from, to, false)
                },
                &coordinator,
            ))
            .await
            .unwrap()
            .into_inner();
        assert!(!exact.publishable && exact.min_cell == 0);
        app.stop().await;
    }
}

/// (c) A publishable period is whole UTC months, so two of them differ by
/// a month at least, never by one person's report; `from` and `to` are
/// named when they are not.
#[tokio::test]
async fn a_publishable_period_is_whole_utc_months() {
    let app = Casepath::start(&[]).await;
    let coordinator = token("kg-coordinator", Role::Coordinator, "c-1");
    let (jan, feb) = (month(2025, 1), month(2025, 2));
    for i in 0..12 {
        case(&app.pool, jan + TimeDelta::days(i), "kg", None).await;
    }
    // The one person [jan, feb + δ) would add.
    case(&app.pool, feb + TimeDelta::hours(5), "tm", None).await;
    let mut client = app.client.clone();
    for (from, to, named) in [
        (jan, feb + TimeDelta::hours(6), &["to"][..]),
        (jan + TimeDelta::seconds(1), feb, &["from"][..]),
        (jan + TimeDelta::days(1), feb + TimeDelta::days(1), &["from", "to"][..]),
        (jan, feb - TimeDelta::nanoseconds(1), &["to"][..]),
        // Midnight at UTC+3 is not midnight UTC.
        (
            jan - TimeDelta::hours(3),
            feb - TimeDelta::hours(3),
            &["from", "to"][..],
        ),
    ] {
        let refused = client
            .get_statistics(authorized(request(from, to, true), &coordinator))
            .await
            .unwrap_err();
        assert_eq!(bad_fields(&refused), named, "[{from}, {to})");
        // The exact statistics take any period.
        let exact = client
            .get_statistics(authorized(request(from, to, false), &coordinator))
            .await
            .unwrap()
            .into_inner();
        assert!(!exact.publishable);
    }
    let (_, january) = both(&app, jan, feb).await;
    assert_eq!(dimension(&january, "gender")["total"], (12, false));
    app.stop().await;
}

/// (i) The CSV says what it is: exact figures open with NOT FOR
/// PUBLICATION, publishable ones with `publishable,yes`, k and the period.
#[tokio::test]
async fn the_csv_says_whether_it_may_be_published() {
    let app = Casepath::start(&[]).await;
    let from = month(2025, 2);
    for i in 0..7 {
        case(&app.pool, from + TimeDelta::days(i), "kg", None).await;
    }
    derive_facts(&app.pool).await;
    let period = ["--from", "2025-02-01T00:00:00Z", "--to", "2025-03-01T00:00:00Z"];
    let exact = nrmctl_stats(&app.process.endpoint, &[&["--csv"][..], &period[..]].concat()).await;
    assert_eq!(
        exact.lines().take(5).collect::<Vec<_>>(),
        [
            "NOT FOR PUBLICATION,exact counts for internal use",
            "publishable,no",
            "min_cell,0",
            "from,2025-02-01T00:00:00Z",
            "to,2025-03-01T00:00:00Z",
        ],
        "{exact}"
    );
    let public = nrmctl_stats(
        &app.process.endpoint,
        // Dates, as the README's example: --to is the last day included.
        &[
            "--csv",
            "--publishable",
            "--min-cell",
            "7",
            "--from",
            "2025-02-01",
            "--to",
            "2025-02-28",
        ],
    )
    .await;
    assert!(
        public.starts_with("publishable,yes\nmin_cell,7\nfrom,2025-02-01T00:00:00Z\nto,2025-03-01T00:00:00Z\n\n"),
        "{public}"
    );
    assert!(!public.contains("NOT FOR PUBLICATION"), "{public}");
    assert!(public.contains("\ngender,total,7,false\n"), "{public}");
    let text = nrmctl_stats(&app.process.endpoint, &period).await;
    assert!(text.starts_with("NOT FOR PUBLICATION"), "{text}");
    app.stop().await;
}

/// A plan goal of `person`, met at `met` when given.
async fn goal(pool: &PgPool, person: Uuid, added: DateTime<Utc>, met: Option<DateTime<Utc>>) {
    sqlx::query("INSERT INTO cp_goals (goal_id, person_id, kind, added_at, met_at) VALUES ($1, $2, 1, $3, $4)")
        .bind(Uuid::now_v7())
        .bind(person)
        .bind(added)
        .bind(met)
        .execute(pool)
        .await
        .unwrap();
}

/// A bed admitted for `referral`.
async fn admitted(pool: &PgPool, referral: Uuid, at: DateTime<Utc>) {
    sqlx::query(
        "INSERT INTO cp_holds (hold_id, shelter_id, referral_id, holder_agency, category, held_at, status, \
         admitted_at) VALUES ($1, $2, $3, 'kg-ngo', 1, $4, 'admitted', $4)",
    )
    .bind(Uuid::now_v7())
    .bind(Uuid::now_v7())
    .bind(referral)
    .bind(at)
    .execute(pool)
    .await
    .unwrap();
}

/// An open return home opened for `case` (its ID as the foreign reference).
async fn return_for(pool: &PgPool, case: Uuid, at: DateTime<Utc>) {
    sqlx::query(
        "INSERT INTO cp_returns (return_id, direction, from_country, to_country, opened_by, consulate_agency, \
         foreign_reference, status, opened_at) VALUES ($1, 1, 'RU', 'KG', 'kg-mfa', 'kg-mfa', $2, 2, $3)",
    )
    .bind(Uuid::now_v7())
    .bind(case.to_string())
    .bind(at)
    .execute(pool)
    .await
    .unwrap();
}

/// The persons first reported in the period, each with what decides its
/// stage (a later case, a referral, a bed, a return, plan goals), are
/// counted once in their stage, coded by their first case; persons first
/// reported before the period (with a case in it) or after it, and their
/// referrals, goals, beds and returns, change none of the period's figures.
#[tokio::test]
async fn records_of_persons_outside_the_period_change_none_of_its_figures() {
    let app = Casepath::start(&[]).await;
    let pool = &app.pool;
    let (from, to) = (month(2025, 3), month(2025, 4));
    let day = |d: i64| from + TimeDelta::days(d);
    // In the period: assisted, with a later case (another gender, forms
    // and citizenship: the first case codes the person).
    let assisted = Uuid::now_v7();
    CaseSeed::new(assisted, "kg-mvd", "kg-prosecutor", day(1))
        .insert(pool)
        .await;
    let mut later = CaseSeed::new(assisted, "kg-mvd", "kg-prosecutor", day(40));
    later.gender = 2;
    later.insert(pool).await;
    sqlx::query("UPDATE cp_cases SET exploitation_forms = '{2,3,3}', citizenship = 'TJ' WHERE case_id = $1")
        .bind(later.case_id)
        .execute(pool)
        .await
        .unwrap();
    referral(pool, assisted, "kg-mvd", "kg-ngo", None, "accepted", day(2), None).await;
    // Reintegrated: identified, every goal met.
    let reintegrated = case(pool, day(3), "kg", Some(TimeDelta::days(2))).await;
    goal(pool, reintegrated, day(6), Some(day(10))).await;
    goal(pool, reintegrated, day(6), Some(day(12))).await;
    // Sheltered: a bed admitted for a closed referral.
    let sheltered = case(pool, day(4), "kg", None).await;
    let r = referral(pool, sheltered, "kg-mvd", "kg-ngo", None, "closed", day(5), None).await;
    admitted(pool, r, day(6)).await;
    // Returning: a return opened for the case.
    let returning = Uuid::now_v7();
    let c = CaseSeed::new(returning, "kg-mvd", "kg-prosecutor", day(5));
    c.insert(pool).await;
    return_for(pool, c.case_id, day(7)).await;
    let exact = || async { both(&app, from, to).await.0 };
    let before = exact().await;
    let stage = dimension(&before, "stage");
    assert_eq!(stage["total"], (4, false), "{stage:?}");
    for s in [
        "STAGE_ASSISTED",
        "STAGE_REINTEGRATED",
        "STAGE_SHELTERED",
        "STAGE_RETURNING",
    ] {
        assert_eq!(stage[s], (1, false), "{s}: {stage:?}");
    }
    assert_eq!(
        dimension(&before, "gender")["GENDER_FEMALE"].0,
        4,
        "coded by the first case"
    );
    assert_eq!(dimension(&before, "citizenship")["kg"].0, 4, "coded by the first case");
    let forms = dimension(&before, "exploitation_form");
    assert_eq!(forms["EXPLOITATION_FORM_LABOUR"].0, 4, "{forms:?}");
    assert_eq!(
        forms[&form_name(3)].0,
        1,
        "the later case's other form, once: {forms:?}"
    );
    let reintegration = before
        .times
        .iter()
        .find(|t| t.measure == "identification_to_reintegration")
        .unwrap();
    assert_eq!(reintegration.samples, 1);

    // First reported before the period, again in it, with every kind of record.
    let earlier = Uuid::now_v7();
    CaseSeed::new(earlier, "kg-mvd", "kg-prosecutor", from - TimeDelta::days(20))
        .insert(pool)
        .await;
    let again = CaseSeed::new(earlier, "kg-mvd", "kg-prosecutor", day(8));
    again.insert(pool).await;
    let r = referral(pool, earlier, "kg-mvd", "kg-ngo", None, "accepted", day(9), None).await;
    admitted(pool, r, day(9)).await;
    goal(pool, earlier, day(9), Some(day(11))).await;
    return_for(pool, again.case_id, day(10)).await;
    // First reported after it, with records in the period.
    let after = Uuid::now_v7();
    let c = CaseSeed::new(after, "kg-mvd", "kg-prosecutor", to + TimeDelta::days(1));
    c.insert(pool).await;
    referral(pool, after, "kg-mvd", "kg-ngo", None, "pending", day(12), None).await;
    goal(pool, after, day(12), None).await;
    return_for(pool, c.case_id, day(12)).await;
    // Records of no case at all.
    let nobody = Uuid::now_v7();
    referral(pool, nobody, "kg-mvd", "kg-ngo", None, "accepted", day(13), None).await;
    goal(pool, nobody, day(13), Some(day(14))).await;

    let with_others = exact().await;
    assert_eq!(with_others.counts, before.counts);
    // (The other times are of the records made in the period, whoever's.)
    let of_persons = |s: &cp::Statistics| {
        s.times
            .iter()
            .find(|t| t.measure == "identification_to_reintegration")
            .cloned()
    };
    assert_eq!(of_persons(&with_others), of_persons(&before));
    app.stop().await;
}

/// The name of exploitation form `f`.
fn form_name(f: i32) -> String {
    idpb::ExploitationForm::try_from(f).unwrap().as_str_name().to_owned()
}
