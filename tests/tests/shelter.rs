//! The shelter service over gRPC, against real NATS and PostgreSQL: never
//! over-booked, holds that expire by themselves, refusals that write nothing
//! but their audit entry, a sealed address, and beds held for accepted
//! referrals. (`beds.rs`: which referrals a bed is held for, and releases.)

#![allow(clippy::unwrap_used)] // Test code: a failed unwrap is a failed test.

use std::time::Duration;

use nrm_e2e::beds::{
    NEED_REGION, ReferralFeed, accepted_referral, accepted_referral_for, approve, assert_only_audited,
    wait_followed as wait_placed,
};
use nrm_e2e::{ShelterApp, authorized, bad_fields, token, unique};
use nrm_kernel::auth::Role;
use nrm_proto::shelter::v1 as pb;
use pb::BedCategory::{Children, Men, Women};
use prost::Message as _;
use tonic::Code;
use tonic_types::StatusExt as _;
use uuid::Uuid;

const OPERATOR: &str = "kg-ngo-sezim";

/// The shelter's operator (an NGO running a crisis centre).
fn operator() -> String {
    token(OPERATOR, Role::Ngo, "officer-1")
}

/// A social worker of another agency.
fn msd() -> String {
    token("kg-msd", Role::Msd, "officer-2")
}

fn coordinator() -> String {
    token("kg-coordinator", Role::Coordinator, "officer-3")
}

fn rid() -> String {
    Uuid::now_v7().to_string()
}

fn reason(status: &tonic::Status) -> String {
    assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}");
    status
        .get_details_precondition_failure()
        .expect("precondition details")
        .violations[0]
        .r#type
        .clone()
}

fn registration(region: &str, capacity: &[(pb::BedCategory, u32)], address: &str) -> pb::RegisterShelterRequest {
    pb::RegisterShelterRequest {
        request_id: rid(),
        code: format!("CC-{}", &unique()[..6]),
        region: region.to_owned(),
        address: address.to_owned(),
        capacity: capacity
            .iter()
            .map(|(category, beds)| pb::BedCapacity {
                category: *category as i32,
                beds: *beds,
            })
            .collect(),
        services: vec![pb::OnSiteService::Psychological as i32],
        wheelchair_accessible: true,
    }
}

/// Registers a shelter and has the coordinator approve it.
async fn register(app: &ShelterApp, region: &str, capacity: &[(pb::BedCategory, u32)]) -> String {
    let shelter_id = app
        .client
        .clone()
        .register_shelter(authorized(
            registration(region, capacity, "Street 1, house 2"),
            &operator(),
        ))
        .await
        .expect("register")
        .into_inner()
        .shelter_id;
    approve(app, &shelter_id).await;
    shelter_id
}

fn hold_request(shelter_id: &str, category: pb::BedCategory, referral_id: &str) -> pb::HoldBedRequest {
    pb::HoldBedRequest {
        request_id: rid(),
        shelter_id: shelter_id.to_owned(),
        category: category as i32,
        referral_id: referral_id.to_owned(),
        hold_minutes: 60,
    }
}

/// MSD holds a bed for a referral accepted a moment ago.
async fn hold(
    app: &ShelterApp,
    feed: &mut ReferralFeed,
    shelter_id: &str,
    category: pb::BedCategory,
) -> pb::HoldBedResponse {
    let referral_id = accepted_referral_for(app, feed, "kg-msd", &rid(), category).await;
    app.client
        .clone()
        .hold_bed(authorized(hold_request(shelter_id, category, &referral_id), &msd()))
        .await
        .expect("hold a bed")
        .into_inner()
}

async fn free_capacity(app: &ShelterApp, region: &str, category: pb::BedCategory) -> Vec<pb::FreeCapacity> {
    app.client
        .clone()
        .list_free_capacity(authorized(
            pb::ListFreeCapacityRequest {
                region: region.to_owned(),
                category: category as i32,
            },
            &msd(),
        ))
        .await
        .expect("list free capacity")
        .into_inner()
        .entries
}

/// Waits until the read model shows `free` beds of `category` in the shelter.
async fn wait_free(app: &ShelterApp, shelter_id: &str, category: pb::BedCategory, free: u32) {
    let mut seen = None;
    for _ in 0..200 {
        seen = free_capacity(app, "", category)
            .await
            .into_iter()
            .find(|e| e.shelter_id == shelter_id)
            .map(|e| e.free);
        if seen == Some(free) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("free beds of {category:?} in {shelter_id}: {seen:?}, expected {free} within 10 s");
}

/// Event types of a stream, in order.
async fn event_types(app: &ShelterApp, stream_id: &str) -> Vec<String> {
    sqlx::query_scalar("SELECT event_type FROM events WHERE stream_id = $1 ORDER BY version")
        .bind(stream_id)
        .fetch_all(&app.pool)
        .await
        .unwrap()
}

/// The shelter events of a stream, decoded.
async fn events(app: &ShelterApp, stream_id: &str) -> Vec<pb::shelter_event::Event> {
    let payloads: Vec<Vec<u8>> = sqlx::query_scalar("SELECT payload FROM events WHERE stream_id = $1 ORDER BY version")
        .bind(stream_id)
        .fetch_all(&app.pool)
        .await
        .unwrap();
    payloads
        .iter()
        .map(|p| pb::ShelterEvent::decode(p.as_slice()).unwrap().event.unwrap())
        .collect()
}

#[tokio::test]
async fn fifty_concurrent_holds_for_the_last_three_beds_give_exactly_three() {
    let app = ShelterApp::spawn().await;
    let shelter_id = register(&app, "KG-O", &[(Women, 3)]).await;
    // Fifty referrals accepted by MSD, each without a shelter need.
    let mut feed = ReferralFeed::new(&app).await;
    let referrals: Vec<String> = (0..50).map(|_| rid()).collect();
    for referral_id in &referrals {
        feed.commit(
            referral_id,
            ReferralFeed::accepted(referral_id, &rid(), "kg-msd", Some((Women, NEED_REGION))),
        )
        .await;
    }
    wait_placed(&app, feed.publish().await).await;
    let mut tasks = Vec::new();
    for referral_id in &referrals {
        let client = app.client.clone();
        let request = hold_request(&shelter_id, Women, referral_id);
        // Fifty at once are more than the gate lets in: a shed one is sent
        // again with its request ID, as a client would.
        tasks.push(tokio::spawn(async move {
            nrm_e2e::patiently(|| {
                let (mut client, request) = (client.clone(), request.clone());
                async move { client.hold_bed(authorized(request, &msd())).await }
            })
            .await
        }));
    }
    let (mut held, mut no_bed) = (0, 0);
    for task in tasks {
        match task.await.unwrap() {
            Ok(_) => held += 1,
            Err(status) if reason(&status) == "NO_BED_FREE" => no_bed += 1,
            Err(status) => panic!("unexpected answer: {status:?}"),
        }
    }
    assert_eq!((held, no_bed), (3, 47));
    let types = event_types(&app, &format!("shelter-{shelter_id}")).await;
    assert_eq!(types.iter().filter(|t| *t == "BedHeld").count(), 3);
    assert_eq!(types.len(), 5, "registration, approval and three holds, nothing else");
    wait_free(&app, &shelter_id, Women, 0).await;
    // One expiry timer per hold; the 47 refusals left no answer, only their audit entries.
    let tables = app.tables().snapshot().await;
    assert_eq!(tables.rows("timers"), 3);
    assert_eq!(
        tables.rows("commands"),
        5,
        "the registration's answer, the approval's and three holds'"
    );
    assert_eq!(
        tables.rows("audit_log"),
        5 + 47,
        "the registration, the approval, three holds, 47 refusals"
    );
    let refused: i64 = sqlx::query_scalar("SELECT count(*) FROM audit_log WHERE action = 'HoldBed:refused'")
        .fetch_one(&app.pool)
        .await
        .unwrap();
    assert_eq!(refused, 47);
    feed.drop_all().await;
    app.stop().await;
}

#[tokio::test]
async fn an_expired_hold_frees_its_bed_without_anyone_acting() {
    let app = ShelterApp::spawn().await;
    let shelter_id = register(&app, "KG-J", &[(Women, 1)]).await;
    let mut feed = ReferralFeed::new(&app).await;
    let held = hold(&app, &mut feed, &shelter_id, Women).await;
    wait_free(&app, &shelter_id, Women, 0).await;
    let due_at: chrono::DateTime<chrono::Utc> =
        sqlx::query_scalar("SELECT due_at FROM timers WHERE kind = 'shelter.hold_expiry' AND aggregate_id = $1")
            .bind(&held.hold_id)
            .fetch_one(&app.pool)
            .await
            .unwrap();
    assert_eq!(
        due_at.timestamp(),
        held.expires_at.unwrap().seconds,
        "due when the hold expires"
    );

    // An hour is long for a test: let the clock run out.
    sqlx::query("UPDATE timers SET due_at = now() - interval '1 second' WHERE aggregate_id = $1")
        .bind(&held.hold_id)
        .execute(&app.pool)
        .await
        .unwrap();
    wait_free(&app, &shelter_id, Women, 1).await;
    let types = event_types(&app, &format!("shelter-{shelter_id}")).await;
    assert_eq!(
        types,
        ["ShelterRegistered", "ShelterApproved", "BedHeld", "HoldExpired"]
    );
    let fired: Option<chrono::DateTime<chrono::Utc>> =
        sqlx::query_scalar("SELECT fired_at FROM timers WHERE aggregate_id = $1")
            .bind(&held.hold_id)
            .fetch_one(&app.pool)
            .await
            .unwrap();
    assert!(fired.is_some());

    // The expired hold admits no one, and the bed can be held again.
    let tables = app.tables();
    let before = tables.snapshot().await;
    let status = app
        .client
        .clone()
        .admit(authorized(
            pb::AdmitRequest {
                request_id: rid(),
                shelter_id: shelter_id.clone(),
                hold_id: held.hold_id.clone(),
            },
            &operator(),
        ))
        .await
        .unwrap_err();
    assert_eq!(reason(&status), "ADMIT_WITHOUT_HOLD");
    assert_only_audited(&tables, &before, 1, "admitting on an expired hold").await;
    let again = hold(&app, &mut feed, &shelter_id, Women).await;

    // A released hold's timer is gone: it will never fire.
    app.client
        .clone()
        .release_hold(authorized(
            pb::ReleaseHoldRequest {
                request_id: rid(),
                shelter_id: shelter_id.clone(),
                hold_id: again.hold_id.clone(),
            },
            &msd(),
        ))
        .await
        .unwrap();
    let pending: i64 = sqlx::query_scalar("SELECT count(*) FROM timers WHERE aggregate_id = $1")
        .bind(&again.hold_id)
        .fetch_one(&app.pool)
        .await
        .unwrap();
    assert_eq!(pending, 0);
    wait_free(&app, &shelter_id, Women, 1).await;
    feed.drop_all().await;
    app.stop().await;
}

#[tokio::test]
async fn refused_commands_say_why_and_write_nothing() {
    let app = ShelterApp::spawn().await;
    let shelter_id = register(&app, "KG-GB", &[(Women, 2), (Children, 1)]).await;
    let mut client = app.client.clone();
    let tables = app.tables();
    let mut feed = ReferralFeed::new(&app).await;

    // Admission without a hold.
    let before = tables.snapshot().await;
    let status = client
        .admit(authorized(
            pb::AdmitRequest {
                request_id: rid(),
                shelter_id: shelter_id.clone(),
                hold_id: rid(),
            },
            &operator(),
        ))
        .await
        .unwrap_err();
    assert_eq!(reason(&status), "ADMIT_WITHOUT_HOLD");
    assert_only_audited(&tables, &before, 1, "an admission without a hold").await;

    // A hold, an admission, a discharge; the second discharge is refused.
    let referral_id = accepted_referral(&app, &mut feed, "kg-msd", &rid()).await;
    let first_hold = hold_request(&shelter_id, Women, &referral_id);
    let held = client
        .hold_bed(authorized(first_hold.clone(), &msd()))
        .await
        .unwrap()
        .into_inner();
    // A retry of the same request gets the same hold, and holds nothing more.
    let before = tables.snapshot().await;
    let again = client
        .hold_bed(authorized(first_hold, &msd()))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (again.hold_id.as_str(), again.expires_at),
        (held.hold_id.as_str(), held.expires_at)
    );
    assert!(again.result.unwrap().replayed);
    tables.assert_unchanged_since(&before, "a retried hold").await;
    // The same referral cannot hold a second bed here.
    let status = client
        .hold_bed(authorized(hold_request(&shelter_id, Women, &referral_id), &msd()))
        .await
        .unwrap_err();
    assert_eq!(reason(&status), "ALREADY_HELD");
    assert_only_audited(&tables, &before, 1, "a second hold for one referral").await;
    // Only the operator admits.
    let admit = pb::AdmitRequest {
        request_id: rid(),
        shelter_id: shelter_id.clone(),
        hold_id: held.hold_id.clone(),
    };
    let before = tables.snapshot().await;
    let status = client.admit(authorized(admit.clone(), &msd())).await.unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied);
    assert_only_audited(
        &tables,
        &before,
        1,
        "an admission by an agency that does not run the shelter",
    )
    .await;
    client.admit(authorized(admit, &operator())).await.unwrap();
    let discharge = |request_id: String| pb::DischargeRequest {
        request_id,
        shelter_id: shelter_id.clone(),
        hold_id: held.hold_id.clone(),
    };
    let first = discharge(rid());
    client.discharge(authorized(first.clone(), &operator())).await.unwrap();
    // A retry of the same request answers as the first did.
    let before = tables.snapshot().await;
    let retried = client
        .discharge(authorized(first, &operator()))
        .await
        .unwrap()
        .into_inner();
    assert!(retried.replayed);
    tables.assert_unchanged_since(&before, "a retried discharge").await;
    let status = client
        .discharge(authorized(discharge(rid()), &operator()))
        .await
        .unwrap_err();
    assert_eq!(reason(&status), "NOT_ADMITTED");
    assert_only_audited(&tables, &before, 1, "a second discharge").await;

    // Capacity below the beds taken.
    let other = hold(&app, &mut feed, &shelter_id, Children).await;
    assert!(!other.hold_id.is_empty());
    let version = events(&app, &format!("shelter-{shelter_id}")).await.len() as u64;
    let before = tables.snapshot().await;
    let status = client
        .change_capacity(authorized(
            pb::ChangeCapacityRequest {
                request_id: rid(),
                shelter_id: shelter_id.clone(),
                expected_version: version,
                category: Children as i32,
                beds: 0,
            },
            &operator(),
        ))
        .await
        .unwrap_err();
    assert_eq!(reason(&status), "CAPACITY_BELOW_OCCUPANCY");
    assert_only_audited(&tables, &before, 1, "lowering capacity below the beds taken").await;
    // A stale version is a conflict (not audited: no refusal, a retry).
    let before = tables.snapshot().await;
    let status = client
        .change_capacity(authorized(
            pb::ChangeCapacityRequest {
                request_id: rid(),
                shelter_id: shelter_id.clone(),
                expected_version: version - 1,
                category: Children as i32,
                beds: 4,
            },
            &operator(),
        ))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Aborted);
    tables
        .assert_unchanged_since(&before, "a capacity change at a stale expected version")
        .await;
    // Raising it is fine, and the read model follows.
    client
        .change_capacity(authorized(
            pb::ChangeCapacityRequest {
                request_id: rid(),
                shelter_id: shelter_id.clone(),
                expected_version: version,
                category: Children as i32,
                beds: 4,
            },
            &operator(),
        ))
        .await
        .unwrap();
    wait_free(&app, &shelter_id, Children, 3).await;
    wait_free(&app, &shelter_id, Women, 2).await;
    feed.drop_all().await;
    app.stop().await;
}

#[tokio::test]
async fn bad_input_names_its_fields_and_writes_nothing() {
    let app = ShelterApp::spawn().await;
    let mut client = app.client.clone();
    let tables = app.tables();
    let before = tables.snapshot().await;
    let mut request = registration("Osh", &[(pb::BedCategory::Unspecified, 3), (Women, 10_001)], "");
    request.request_id = String::new();
    request.code = "Sunny house for women".into();
    request.address = "x".repeat(301);
    let status = client
        .register_shelter(authorized(request, &operator()))
        .await
        .unwrap_err();
    assert_eq!(
        bad_fields(&status),
        [
            "request_id",
            "code",
            "region",
            "address",
            "capacity[0].category",
            "capacity[1].beds"
        ]
    );
    assert!(!status.message().contains("xxx"), "the value is never repeated");
    tables.assert_unchanged_since(&before, "an invalid registration").await;

    let status = client
        .hold_bed(authorized(
            pb::HoldBedRequest {
                request_id: rid(),
                shelter_id: "not-a-uuid".into(),
                category: 0,
                referral_id: String::new(),
                hold_minutes: 10_081,
            },
            &msd(),
        ))
        .await
        .unwrap_err();
    assert_eq!(
        bad_fields(&status),
        ["shelter_id", "category", "referral_id", "hold_minutes"]
    );
    tables.assert_unchanged_since(&before, "an invalid hold").await;

    let status = client
        .change_capacity(authorized(
            pb::ChangeCapacityRequest {
                request_id: rid(),
                shelter_id: rid(),
                expected_version: 0,
                category: 9,
                beds: 20_000,
            },
            &operator(),
        ))
        .await
        .unwrap_err();
    assert_eq!(bad_fields(&status), ["expected_version", "category", "beds"]);
    tables
        .assert_unchanged_since(&before, "an invalid capacity change")
        .await;

    let status = client
        .release_hold(authorized(
            pb::ReleaseHoldRequest {
                request_id: String::new(),
                shelter_id: rid(),
                hold_id: "h-1".into(),
            },
            &msd(),
        ))
        .await
        .unwrap_err();
    assert_eq!(bad_fields(&status), ["request_id", "hold_id"]);
    tables.assert_unchanged_since(&before, "an invalid release").await;

    let status = client
        .list_free_capacity(authorized(
            pb::ListFreeCapacityRequest {
                region: "Osh region".into(),
                category: 42,
            },
            &msd(),
        ))
        .await
        .unwrap_err();
    assert_eq!(bad_fields(&status), ["region", "category"]);

    // A role that runs no shelters cannot register one.
    let status = client
        .register_shelter(authorized(
            registration("KG-O", &[(Women, 1)], ""),
            &token("kg-mvd", Role::Police, "officer-9"),
        ))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied);
    assert_only_audited(&tables, &before, 1, "a registration by the police").await;
    app.stop().await;
}

#[tokio::test]
async fn the_address_is_sealed_everywhere_and_shown_only_to_the_operator_the_coordinator_and_the_holder() {
    const CANARY: &str = "Kurmanjan Datka 77 canary-address";
    let app = ShelterApp::spawn().await;
    let shelter_id = app
        .client
        .clone()
        .register_shelter(authorized(registration("KG-O", &[(Women, 2)], CANARY), &operator()))
        .await
        .unwrap()
        .into_inner()
        .shelter_id;
    approve(&app, &shelter_id).await;
    let mut feed = ReferralFeed::new(&app).await;
    hold(&app, &mut feed, &shelter_id, Women).await;

    let get = |token: String| {
        let mut client = app.client.clone();
        let shelter_id = shelter_id.clone();
        async move {
            client
                .get_shelter(authorized(pb::GetShelterRequest { shelter_id }, &token))
                .await
                .unwrap()
                .into_inner()
        }
    };
    let own = get(operator()).await;
    assert_eq!(own.address, CANARY);
    assert_eq!(own.operator_agency, OPERATOR);
    assert_eq!(own.free[0].beds, 1);
    assert_eq!(get(coordinator()).await.address, CANARY);
    let holder = get(msd()).await;
    assert_eq!(
        holder.address, CANARY,
        "the agency a bed is held for learns where to bring the person"
    );
    assert_eq!(holder.code, own.code);
    // Another agency learns nothing, and only its attempt is written.
    let tables = app.tables();
    let before = tables.snapshot().await;
    let status = app
        .client
        .clone()
        .get_shelter(authorized(
            pb::GetShelterRequest {
                shelter_id: shelter_id.clone(),
            },
            &token("kg-moh", Role::Moh, "doctor-1"),
        ))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied);
    assert!(!status.message().contains("canary"));
    assert_only_audited(&tables, &before, 1, "MoH reading a shelter it holds no bed in").await;
    // Every read is in the audit trail as a read of the address, and so is the refused one.
    let reads: Vec<(String, String, String)> = sqlx::query_as(
        "SELECT agency, action, purpose FROM audit_log WHERE action LIKE 'ReadShelterAddress%' OR action LIKE 'GetShelter%' ORDER BY id",
    )
    .fetch_all(&app.pool)
    .await
    .unwrap();
    let read = |agency: &str, action: &str, purpose: &str| (agency.to_owned(), action.to_owned(), purpose.to_owned());
    assert_eq!(
        reads,
        [
            read(OPERATOR, "ReadShelterAddress", "shelter operator"),
            read("kg-coordinator", "ReadShelterAddress", "any"),
            read("kg-msd", "ReadShelterAddress", "bed held"),
            read("kg-moh", "GetShelter:denied", "refused"),
        ]
    );
    let subject: String = sqlx::query_scalar("SELECT subject_id FROM audit_log WHERE action = 'GetShelter:denied'")
        .fetch_one(&app.pool)
        .await
        .unwrap();
    assert_eq!(subject, shelter_id, "the refusal names the shelter asked for");

    // Not in the clear in any stored event ...
    let payloads: Vec<Vec<u8>> = sqlx::query_scalar("SELECT payload FROM events")
        .fetch_all(&app.pool)
        .await
        .unwrap();
    let shelter_events: i64 = sqlx::query_scalar("SELECT count(*) FROM events WHERE stream_id LIKE 'shelter-%'")
        .fetch_one(&app.pool)
        .await
        .unwrap();
    assert_eq!(shelter_events, 3, "registered, approved, held");
    let needle = CANARY.as_bytes();
    let contains = |hay: &[u8]| hay.windows(needle.len()).any(|w| w == needle);
    assert!(payloads.iter().all(|p| !contains(p)));
    let metadata: Vec<String> = sqlx::query_scalar("SELECT metadata::text FROM events")
        .fetch_all(&app.pool)
        .await
        .unwrap();
    assert!(metadata.iter().all(|m| !m.contains("canary")));
    // ... but sealed in the registration.
    let Some(pb::shelter_event::Event::ShelterRegistered(registered)) =
        events(&app, &format!("shelter-{shelter_id}")).await.into_iter().next()
    else {
        panic!("registration first");
    };
    let sealed = registered.address.unwrap();
    assert_eq!(sealed.person_id, shelter_id, "sealed under the shelter's own key");
    assert!(!sealed.ciphertext.is_empty());

    // ... and in no NATS message.
    let mut messages = Vec::new();
    for _ in 0..200 {
        messages = app.messages().await;
        if messages.len() >= payloads.len() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // One commit per event (with the placement stream's NoBedAvailable for the helper's referral).
    assert_eq!(messages.len(), payloads.len());
    for message in &messages {
        assert!(!contains(&message.payload));
        for (name, values) in message.headers.iter() {
            assert!(!name.to_string().contains("canary"));
            assert!(values.iter().all(|v| !v.as_str().contains("canary")));
        }
    }
    feed.drop_all().await;
    app.stop().await;
}

#[tokio::test]
async fn free_capacity_answers_by_region_and_category() {
    let app = ShelterApp::spawn().await;
    let osh = register(&app, "KG-O", &[(Women, 2), (Children, 1)]).await;
    let bishkek = register(&app, "KG-GB", &[(Women, 3)]).await;
    let osh_men = register(&app, "kg-o", &[(Men, 1)]).await;
    wait_free(&app, &osh_men, Men, 1).await;
    wait_free(&app, &bishkek, Women, 3).await;
    wait_free(&app, &osh, Children, 1).await;

    let women_in_osh = free_capacity(&app, "KG-O", Women).await;
    assert_eq!(women_in_osh.len(), 1);
    assert_eq!(
        (women_in_osh[0].shelter_id.as_str(), women_in_osh[0].free),
        (osh.as_str(), 2)
    );
    let mut in_osh: Vec<_> = free_capacity(&app, "kg-o", pb::BedCategory::Unspecified)
        .await
        .into_iter()
        .map(|e| (e.shelter_id, e.category, e.free))
        .collect();
    in_osh.sort();
    let mut expected = vec![
        (osh.clone(), Women as i32, 2),
        (osh.clone(), Children as i32, 1),
        (osh_men.clone(), Men as i32, 1),
    ];
    expected.sort();
    assert_eq!(in_osh, expected);
    let women: Vec<_> = free_capacity(&app, "", Women)
        .await
        .into_iter()
        .map(|e| (e.region, e.free))
        .collect();
    assert_eq!(
        women,
        [("KG-GB".to_owned(), 3), ("KG-O".to_owned(), 2)],
        "most free first"
    );
    assert_eq!(free_capacity(&app, "", pb::BedCategory::Unspecified).await.len(), 4);
    assert!(free_capacity(&app, "KG-Y", Women).await.is_empty());

    // A hold shows within moments.
    let mut feed = ReferralFeed::new(&app).await;
    hold(&app, &mut feed, &bishkek, Women).await;
    wait_free(&app, &bishkek, Women, 2).await;

    feed.drop_all().await;
    app.stop().await;
}

/// The holds of a referral, as (shelter stream, hold ID).
async fn holds_of(app: &ShelterApp, referral_id: &str) -> Vec<(String, String)> {
    let rows: Vec<(String, Vec<u8>)> =
        sqlx::query_as("SELECT stream_id, payload FROM events WHERE event_type = 'BedHeld' ORDER BY global_position")
            .fetch_all(&app.pool)
            .await
            .unwrap();
    rows.into_iter()
        .filter_map(
            |(stream_id, payload)| match pb::ShelterEvent::decode(payload.as_slice()).unwrap().event {
                Some(pb::shelter_event::Event::BedHeld(h)) if h.referral_id == referral_id => {
                    Some((stream_id, h.hold_id))
                }
                _ => None,
            },
        )
        .collect()
}

#[tokio::test]
async fn an_accepted_referral_gets_a_bed_in_its_region_once_even_when_redelivered() {
    let app = ShelterApp::spawn().await;
    let small = register(&app, "KG-O", &[(Women, 1)]).await;
    let large = register(&app, "KG-O", &[(Women, 2)]).await;
    let elsewhere = register(&app, "KG-GB", &[(Women, 5)]).await;
    wait_free(&app, &small, Women, 1).await;
    wait_free(&app, &large, Women, 2).await;
    wait_free(&app, &elsewhere, Women, 5).await;

    let mut feed = ReferralFeed::new(&app).await;
    let referral_id = rid();
    let sequence = feed.accept(&referral_id, Women, "KG-O").await;
    wait_placed(&app, sequence).await;
    let holds = holds_of(&app, &referral_id).await;
    assert_eq!(holds.len(), 1);
    assert_eq!(
        holds[0].0,
        format!("shelter-{large}"),
        "the shelter of the region with most beds free"
    );
    wait_free(&app, &large, Women, 1).await;
    // The hold expires like any other.
    let timers: i64 = sqlx::query_scalar("SELECT count(*) FROM timers WHERE aggregate_id = $1 AND fired_at IS NULL")
        .bind(&holds[0].1)
        .fetch_one(&app.pool)
        .await
        .unwrap();
    assert_eq!(timers, 1);
    // The hold is recorded as the reaction's, caused by the referral commit.
    let actor: String =
        sqlx::query_scalar("SELECT metadata->'actor'->>'officer' FROM events WHERE event_type = 'BedHeld'")
            .fetch_one(&app.pool)
            .await
            .unwrap();
    assert_eq!(actor, "shelter.placement");

    // The same message again (a redelivery the checkpoint does not cover): no second bed.
    let sequence = feed.redeliver_last().await;
    assert_eq!(sequence, 2);
    wait_placed(&app, sequence).await;
    assert_eq!(holds_of(&app, &referral_id).await.len(), 1);
    let placements: i64 = sqlx::query_scalar("SELECT count(*) FROM events WHERE stream_id LIKE 'placement-%'")
        .fetch_one(&app.pool)
        .await
        .unwrap();
    assert_eq!(placements, 0);

    // The BedHeld reaches NATS for the referral service to record.
    let mut published = false;
    for _ in 0..200 {
        published = app.messages().await.iter().any(|m| {
            nrm_proto::common::v1::EventCommit::decode(m.payload.as_ref())
                .unwrap()
                .events
                .iter()
                .any(|e| e.event_type == "BedHeld")
        });
        if published {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(published);
    feed.drop_all().await;
    app.stop().await;
}

#[tokio::test]
async fn with_no_bed_free_in_the_region_no_bed_available_names_the_nearest_regions_with_one() {
    let app = ShelterApp::spawn().await;
    let full = register(&app, "KG-O", &[(Women, 1)]).await;
    let mut feed = ReferralFeed::new(&app).await;
    hold(&app, &mut feed, &full, Women).await;
    let regions = [
        ("KG-Y", Women, 1),
        ("KG-GO", Women, 2),
        ("KG-GB", Women, 1),
        ("KG-T", Women, 0),    // no bed free
        ("KG-J", Children, 3), // beds, but not for women
    ];
    let mut last = String::new();
    for (region, category, beds) in regions {
        last = register(&app, region, &[(category, beds)]).await;
    }
    wait_free(&app, &last, Children, 3).await;
    wait_free(&app, &full, Women, 0).await;

    let referral_id = rid();
    let sequence = feed.accept(&referral_id, Women, "KG-O").await;
    wait_placed(&app, sequence).await;
    assert!(holds_of(&app, &referral_id).await.is_empty());
    let placement = events(&app, &format!("placement-{referral_id}")).await;
    assert_eq!(placement.len(), 1);
    let pb::shelter_event::Event::NoBedAvailable(no_bed) = &placement[0] else {
        panic!("expected NoBedAvailable, got {placement:?}");
    };
    assert_eq!(no_bed.region, "KG-O");
    assert_eq!(no_bed.category, Women as i32);
    assert_eq!(no_bed.nearest_regions_with_beds, ["KG-GO", "KG-GB", "KG-Y"]);

    // Published on the placement subject for the referral service.
    let subject = format!(
        "{}.shelter.v1.placement.{referral_id}",
        app.settings.nats.subject_prefix
    );
    let mut seen = false;
    for _ in 0..200 {
        seen = app.messages().await.iter().any(|m| m.subject.as_str() == subject);
        if seen {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(seen, "NoBedAvailable on {subject}");

    // Redelivered: no second NoBedAvailable.
    let sequence = feed.redeliver_last().await;
    wait_placed(&app, sequence).await;
    assert_eq!(events(&app, &format!("placement-{referral_id}")).await.len(), 1);
    feed.drop_all().await;
    app.stop().await;
}

#[tokio::test]
async fn only_the_agency_a_bed_is_held_for_the_operator_or_the_coordinator_may_release_it() {
    let app = ShelterApp::spawn().await;
    let shelter_id = register(&app, "KG-O", &[(pb::BedCategory::Women, 2)]).await;
    // MSD holds a bed.
    let mut feed = ReferralFeed::new(&app).await;
    let held = hold(&app, &mut feed, &shelter_id, pb::BedCategory::Women).await;
    let release = |who: String| {
        let mut client = app.client.clone();
        let request = pb::ReleaseHoldRequest {
            request_id: rid(),
            shelter_id: shelter_id.clone(),
            hold_id: held.hold_id.clone(),
        };
        async move { client.release_hold(authorized(request, &who)).await }
    };
    let stream_id = format!("shelter-{shelter_id}");
    let tables = app.tables();
    let before = tables.snapshot().await;
    // Another agency that may hold beds may not release MSD's hold.
    let status = release(token("kg-moh", Role::Moh, "doctor-1")).await.unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied);
    assert_only_audited(&tables, &before, 1, "MoH releasing MSD's hold").await;
    // The police hold no beds: the matrix refuses them at the gate.
    let before = tables.snapshot().await;
    let status = release(token("kg-mvd", Role::Police, "officer-9")).await.unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied);
    assert_only_audited(&tables, &before, 1, "the police releasing a hold").await;
    // MSD may.
    release(msd()).await.expect("the holder releases its hold");
    assert_eq!(
        event_types(&app, &stream_id).await.last().map(String::as_str),
        Some("HoldReleased")
    );
    // The operator may release any hold of its shelter.
    let second = hold(&app, &mut feed, &shelter_id, pb::BedCategory::Women).await;
    app.client
        .clone()
        .release_hold(authorized(
            pb::ReleaseHoldRequest {
                request_id: rid(),
                shelter_id: shelter_id.clone(),
                hold_id: second.hold_id,
            },
            &operator(),
        ))
        .await
        .expect("the operator releases a hold");
    feed.drop_all().await;
    app.stop().await;
}
