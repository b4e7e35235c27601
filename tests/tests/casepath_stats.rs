//! Issue 11: publishable statistics. Eight persons reported in one
//! country (six women, two men), and one anonymous notification (a woman)
//! filed by an NGO for an adult who did not consent to a referral. The raw
//! statistics count all nine exactly; the publishable ones (k = 5) suppress
//! the small cell (the two men) and its complement (the women: with the
//! total shown they would give the men away), keep every total right, and
//! give no suppressed count away. The notification is counted, and is in no
//! inbox and no path. `nrmctl stats --publishable --csv` prints the same.

#![allow(clippy::unwrap_used)] // Test code: a failed unwrap is a failed test.

use std::collections::BTreeMap;

use nrm_e2e::casepath::{Country, rid};
use nrm_e2e::{authorized, binary, issuer_key_path};
use nrm_kernel::auth::Role;
use nrm_proto::casepath::v1 as cp;
use nrm_proto::common::v1::{AgeBand, Gender};
use nrm_proto::identification::v1 as idpb;

/// The cells of one dimension, value → (count, suppressed).
fn dimension(stats: &cp::Statistics, name: &str) -> BTreeMap<String, (u64, bool)> {
    stats
        .counts
        .iter()
        .filter(|c| c.dimension == name)
        .map(|c| (c.value.clone(), (c.count, c.suppressed)))
        .collect()
}

#[tokio::test]
async fn small_cells_and_their_complements_are_suppressed_and_totals_stay_right() {
    let kg = Country::alone("kg", |_| {}).await;
    let police = kg.caller(Role::Police);
    let coordinator = kg.caller(Role::Coordinator);
    // A notification is filed on a day (midnight UTC), never at a time.
    let from = chrono::Utc::now() - chrono::Duration::days(2);
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
    let to = chrono::Utc::now() + chrono::Duration::days(1);
    let period = |publishable: bool| cp::GetStatisticsRequest {
        from: Some(nrm_kernel::validate::timestamp(from)),
        to: Some(nrm_kernel::validate::timestamp(to)),
        publishable,
        min_cell: 0,
    };

    // Raw: every count exact.
    let raw = kg.casepath.statistics(&coordinator, period(false)).await.unwrap();
    assert!(!raw.publishable && raw.suppressed_cells == 0, "{raw:#?}");
    let gender = dimension(&raw, "gender");
    assert_eq!(gender["total"], (9, false), "{raw:#?}");
    assert_eq!(gender["GENDER_FEMALE"], (7, false), "six reported and the notification");
    assert_eq!(gender["GENDER_MALE"], (2, false));
    let counted = dimension(&raw, "notification");
    assert_eq!(counted["total"], (9, false), "{raw:#?}");
    assert_eq!(counted["identified"], (8, false));
    assert_eq!(counted["anonymous"], (1, false), "the notification is counted");
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

    // Publishable: the small cell and its complement suppressed, totals shown.
    let public = kg.casepath.statistics(&coordinator, period(true)).await.unwrap();
    assert!(public.publishable, "{public:#?}");
    assert_eq!(public.min_cell, 5, "the configured default");
    let gender = dimension(&public, "gender");
    assert_eq!(gender["total"], (9, false), "a total is never suppressed: {public:#?}");
    assert_eq!(gender["GENDER_MALE"], (0, true), "the small cell");
    assert_eq!(
        gender["GENDER_FEMALE"],
        (0, true),
        "its complement (9 - 7 would give 2 away)"
    );
    let counted = dimension(&public, "notification");
    assert_eq!(counted["total"], (9, false));
    assert_eq!(counted["anonymous"], (0, true));
    assert_eq!(counted["identified"], (0, true), "its complement");
    let mut suppressed = 0;
    for cell in &public.counts {
        let (count, _) = raw
            .counts
            .iter()
            .find(|c| c.dimension == cell.dimension && c.value == cell.value)
            .map(|c| (c.count, c.suppressed))
            .unwrap_or_else(|| panic!("{cell:?} is not in the raw answer"));
        if cell.suppressed {
            suppressed += 1;
            assert_eq!(cell.count, 0, "a suppressed cell gives no count away: {cell:?}");
            assert_ne!(cell.value, "total");
        } else {
            assert_eq!(cell.count, count, "an unsuppressed count is the raw one: {cell:?}");
            assert!(
                cell.value == "total" || count == 0 || count >= 5,
                "a cell below k (and above 0) is suppressed: {cell:?}"
            );
        }
    }
    for name in ["gender", "notification", "citizenship", "age_band", "stage"] {
        let hidden = dimension(&public, name).values().filter(|(_, s)| *s).count();
        assert_ne!(
            hidden, 1,
            "{name}: one suppressed cell beside its total gives it away: {public:#?}"
        );
    }
    assert_eq!(public.suppressed_cells, suppressed, "{public:#?}");
    for time in &public.times {
        if time.samples < 5 {
            assert!(
                time.suppressed && time.median.is_none() && time.p90.is_none(),
                "{time:?}"
            );
        }
    }
    // CTDC's k = 11 hides more.
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
    assert_eq!(dimension(&ctdc, "citizenship")["kg"], (0, true), "9 < 11: {ctdc:#?}");
    assert_eq!(dimension(&ctdc, "citizenship")["total"], (9, false));

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

    // nrmctl stats --publishable --csv: the same cells and times.
    // Not std's: a blocking wait would stop this runtime, and casepath in it.
    let out = tokio::process::Command::new(binary("nrmctl"))
        .args([
            "--as-agency",
            "kg-coordinator",
            "--as-role",
            "coordinator",
            "--casepath-endpoint",
        ])
        .arg(&kg.casepath.endpoint)
        .args(["stats", "--publishable", "--csv", "--from"])
        .arg(from.to_rfc3339())
        .arg("--to")
        .arg(to.to_rfc3339())
        .env("NRM_ISSUER_KEY", issuer_key_path())
        .env_remove("NRM_TOKEN")
        .output()
        .await
        .expect("run nrmctl");
    let csv = String::from_utf8(out.stdout).unwrap();
    assert!(out.status.success(), "{csv}{}", String::from_utf8_lossy(&out.stderr));
    print!("{csv}");
    let (cells, times) = csv.split_once("\n\n").expect("two sections");
    let mut lines = cells.lines();
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
    let mut lines = times.lines();
    assert_eq!(
        lines.next(),
        Some("measure,samples,median_seconds,p90_seconds,suppressed")
    );
    assert_eq!(lines.count(), public.times.len());

    kg.stop(&[]).await;
}
