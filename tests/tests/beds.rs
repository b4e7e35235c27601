//! Beds only for real referrals (issue 9, item 4), against real NATS and
//! PostgreSQL: a bed is held only for an accepted referral addressed to the
//! caller's agency, at most one open hold per referral across all shelters,
//! released by itself when the referral ends; placement decides on the
//! shelters' own state; the holder learns the address, the operator who is
//! coming, never why.

#![allow(clippy::unwrap_used)] // Test code: a failed unwrap is a failed test.

use nrm_e2e::beds::{ReferralFeed, accepted_referral, approve, assert_only_audited, coordinator, wait_followed};
use nrm_e2e::{ShelterApp, authorized, token, unique};
use nrm_kernel::auth::Role;
use nrm_proto::referral::v1 as referral;
use nrm_proto::shelter::v1 as pb;
use pb::BedCategory::{Children, Women};
use tonic::Code;
use tonic_types::StatusExt as _;
use uuid::Uuid;

const OPERATOR: &str = "kg-ngo-sezim";
const MSD: &str = "kg-msd";

fn operator() -> String {
    token(OPERATOR, Role::Ngo, "officer-1")
}

fn msd() -> String {
    token(MSD, Role::Msd, "officer-2")
}

fn moh() -> String {
    token("kg-moh", Role::Moh, "doctor-1")
}

fn rid() -> String {
    Uuid::now_v7().to_string()
}

fn reason(status: &tonic::Status) -> String {
    assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}");
    status.get_details_precondition_failure().unwrap().violations[0]
        .r#type
        .clone()
}

/// Registers a shelter and has the coordinator approve it.
async fn register(app: &ShelterApp, region: &str, capacity: &[(pb::BedCategory, u32)]) -> String {
    let shelter_id = register_unapproved(app, region, capacity).await;
    approve(app, &shelter_id).await;
    shelter_id
}

async fn register_unapproved(app: &ShelterApp, region: &str, capacity: &[(pb::BedCategory, u32)]) -> String {
    app.client
        .clone()
        .register_shelter(authorized(
            pb::RegisterShelterRequest {
                request_id: rid(),
                code: format!("CC-{}", &unique()[..6]),
                region: region.to_owned(),
                address: "Secret lane 3".into(),
                capacity: capacity
                    .iter()
                    .map(|(category, beds)| pb::BedCapacity {
                        category: *category as i32,
                        beds: *beds,
                    })
                    .collect(),
                services: vec![],
                wheelchair_accessible: false,
            },
            &operator(),
        ))
        .await
        .unwrap()
        .into_inner()
        .shelter_id
}

async fn hold_as(
    app: &ShelterApp,
    who: &str,
    shelter_id: &str,
    referral_id: &str,
) -> Result<pb::HoldBedResponse, tonic::Status> {
    app.client
        .clone()
        .hold_bed(authorized(
            pb::HoldBedRequest {
                request_id: rid(),
                shelter_id: shelter_id.to_owned(),
                category: Women as i32,
                referral_id: referral_id.to_owned(),
                hold_minutes: 60,
            },
            who,
        ))
        .await
        .map(tonic::Response::into_inner)
}

/// (stream, event type) of every event of the shelter streams, in order.
async fn shelter_events(app: &ShelterApp) -> Vec<(String, String)> {
    sqlx::query_as("SELECT stream_id, event_type FROM events WHERE stream_id LIKE 'shelter-%' ORDER BY global_position")
        .fetch_all(&app.pool)
        .await
        .unwrap()
}

async fn count(app: &ShelterApp, event_type: &str) -> usize {
    shelter_events(app)
        .await
        .iter()
        .filter(|(_, t)| t == event_type)
        .count()
}

#[tokio::test]
async fn a_bed_is_held_only_for_an_accepted_referral_addressed_to_the_callers_agency() {
    let app = ShelterApp::spawn().await;
    let shelter_id = register(&app, "KG-O", &[(Women, 3)]).await;
    let mut feed = ReferralFeed::new(&app).await;
    let tables = app.tables();

    // A referral the service has never seen: not a "no", a "not yet".
    let unknown = rid();
    let before = tables.snapshot().await;
    let status = hold_as(&app, &msd(), &shelter_id, &unknown).await.unwrap_err();
    assert_eq!(reason(&status), "REFERRAL_NOT_ACCEPTED");
    assert!(
        !status.message().contains(&unknown),
        "the caller's text is not repeated"
    );
    assert_only_audited(&tables, &before, 1, "a hold for an unknown referral").await;
    let subject: String = sqlx::query_scalar("SELECT subject_id FROM audit_log WHERE action = 'HoldBed:refused'")
        .fetch_one(&app.pool)
        .await
        .unwrap();
    assert_eq!(subject, unknown, "the refusal is audited against the referral");

    // Created, not yet accepted.
    let pending = rid();
    feed.commit(
        &pending,
        referral::referral_event::Event::ReferralCreated(referral::ReferralCreated {
            referral_id: pending.clone(),
            person_id: rid(),
            receiving_agency: MSD.into(),
            ..Default::default()
        }),
    )
    .await;
    wait_followed(&app, feed.publish().await).await;
    let before = tables.snapshot().await;
    let status = hold_as(&app, &msd(), &shelter_id, &pending).await.unwrap_err();
    assert_eq!(reason(&status), "REFERRAL_NOT_ACCEPTED");
    assert_only_audited(&tables, &before, 1, "a hold for a pending referral").await;

    // Accepted by MSD: MoH may not hold a bed for it, the police not at all.
    let accepted = accepted_referral(&app, &mut feed, MSD, &rid()).await;
    let before = tables.snapshot().await;
    let status = hold_as(&app, &moh(), &shelter_id, &accepted).await.unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied);
    let status = hold_as(
        &app,
        &token("kg-mvd", Role::Police, "officer-9"),
        &shelter_id,
        &accepted,
    )
    .await
    .unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied);
    assert_only_audited(&tables, &before, 2, "holds by agencies the referral is not for").await;

    // MSD may, once; then the referral has its bed.
    let held = hold_as(&app, &msd(), &shelter_id, &accepted).await.unwrap();
    assert!(!held.hold_id.is_empty());
    let status = hold_as(&app, &msd(), &shelter_id, &accepted).await.unwrap_err();
    assert_eq!(reason(&status), "ALREADY_HELD");
    assert_eq!(count(&app, "BedHeld").await, 1);
    feed.drop_all().await;
    app.stop().await;
}

#[tokio::test]
async fn concurrent_holds_for_one_referral_at_two_shelters_give_exactly_one() {
    let app = ShelterApp::spawn().await;
    let first = register(&app, "KG-O", &[(Women, 5)]).await;
    let second = register(&app, "KG-GB", &[(Women, 5)]).await;
    let mut feed = ReferralFeed::new(&app).await;
    for _round in 0..3 {
        let referral_id = accepted_referral(&app, &mut feed, MSD, &rid()).await;
        let mut tasks = Vec::new();
        for i in 0..10 {
            let shelter_id = if i % 2 == 0 { first.clone() } else { second.clone() };
            let referral_id = referral_id.clone();
            let app_client = app.client.clone();
            tasks.push(tokio::spawn(async move {
                let mut client = app_client;
                client
                    .hold_bed(authorized(
                        pb::HoldBedRequest {
                            request_id: rid(),
                            shelter_id,
                            category: Women as i32,
                            referral_id,
                            hold_minutes: 60,
                        },
                        &msd(),
                    ))
                    .await
            }));
        }
        let (mut won, mut already) = (0, 0);
        for task in tasks {
            match task.await.unwrap() {
                Ok(_) => won += 1,
                Err(status) if reason(&status) == "ALREADY_HELD" => already += 1,
                Err(status) => panic!("unexpected answer: {status:?}"),
            }
        }
        assert_eq!((won, already), (1, 9));
        let open: i64 = sqlx::query_scalar("SELECT count(*) FROM open_holds WHERE referral_id = $1::uuid")
            .bind(&referral_id)
            .fetch_one(&app.pool)
            .await
            .unwrap();
        assert_eq!(open, 1);
    }
    assert_eq!(
        count(&app, "BedHeld").await,
        3,
        "one bed per referral, across both shelters"
    );
    feed.drop_all().await;
    app.stop().await;
}

#[tokio::test]
async fn a_referral_that_ends_releases_its_held_bed_once_and_an_admitted_person_stays() {
    let app = ShelterApp::spawn().await;
    let shelter_id = register(&app, "KG-O", &[(Women, 4)]).await;
    let stream = format!("shelter-{shelter_id}");
    let mut feed = ReferralFeed::new(&app).await;
    let released = |app: &ShelterApp| {
        let pool = app.pool.clone();
        async move {
            sqlx::query_scalar::<_, String>(
                "SELECT metadata->'actor'->>'officer' FROM events WHERE event_type = 'HoldReleased' ORDER BY global_position",
            )
            .fetch_all(&pool)
            .await
            .unwrap()
        }
    };

    // Cancelled (consent withdrawn): released by the service, once.
    let cancelled = accepted_referral(&app, &mut feed, MSD, &rid()).await;
    hold_as(&app, &msd(), &shelter_id, &cancelled).await.unwrap();
    wait_followed(&app, feed.cancel(&cancelled, MSD).await).await;
    assert_eq!(released(&app).await, ["shelter.release"]);
    wait_followed(&app, feed.redeliver_last().await).await;
    assert_eq!(released(&app).await.len(), 1, "a redelivery releases nothing more");
    // And no new bed for it.
    let status = hold_as(&app, &msd(), &shelter_id, &cancelled).await.unwrap_err();
    assert_eq!(reason(&status), "REFERRAL_NOT_ACCEPTED");

    // Closed, and redirected: released too.
    let closed = accepted_referral(&app, &mut feed, MSD, &rid()).await;
    hold_as(&app, &msd(), &shelter_id, &closed).await.unwrap();
    wait_followed(&app, feed.close(&closed).await).await;
    let redirected = accepted_referral(&app, &mut feed, MSD, &rid()).await;
    hold_as(&app, &msd(), &shelter_id, &redirected).await.unwrap();
    wait_followed(&app, feed.redirect(&redirected, MSD, "kg-ngo-tirek").await).await;
    assert_eq!(released(&app).await.len(), 3);
    // The new addressee may hold a bed only once it accepts.
    let status = hold_as(
        &app,
        &token("kg-ngo-tirek", Role::Ngo, "worker-1"),
        &shelter_id,
        &redirected,
    )
    .await
    .unwrap_err();
    assert_eq!(reason(&status), "REFERRAL_NOT_ACCEPTED");

    // An admitted person is not put out when the referral closes.
    let admitted = accepted_referral(&app, &mut feed, MSD, &rid()).await;
    let held = hold_as(&app, &msd(), &shelter_id, &admitted).await.unwrap();
    app.client
        .clone()
        .admit(authorized(
            pb::AdmitRequest {
                request_id: rid(),
                shelter_id: shelter_id.clone(),
                hold_id: held.hold_id,
            },
            &operator(),
        ))
        .await
        .unwrap();
    wait_followed(&app, feed.close(&admitted).await).await;
    assert_eq!(released(&app).await.len(), 3);
    let types: Vec<String> = shelter_events(&app)
        .await
        .into_iter()
        .filter(|(s, _)| *s == stream)
        .map(|(_, t)| t)
        .collect();
    assert_eq!(types.last().map(String::as_str), Some("PersonAdmitted"));
    feed.drop_all().await;
    app.stop().await;
}

#[tokio::test]
async fn placement_finds_a_shelter_registered_a_moment_ago_every_time() {
    let app = ShelterApp::spawn().await;
    let mut feed = ReferralFeed::new(&app).await;
    for round in 0..8 {
        // Each round's only free bed is in the shelter registered just now.
        let shelter_id = register(&app, "KG-N", &[(Children, 1)]).await;
        let referral_id = rid();
        let sequence = feed.accept(&referral_id, Children, "KG-N").await;
        wait_followed(&app, sequence).await;
        let held: Vec<String> =
            sqlx::query_scalar("SELECT shelter_id::text FROM open_holds WHERE referral_id = $1::uuid")
                .bind(&referral_id)
                .fetch_all(&app.pool)
                .await
                .unwrap();
        assert_eq!(held, [shelter_id], "round {round}: the new shelter's bed is held");
    }
    let no_bed: i64 = sqlx::query_scalar("SELECT count(*) FROM events WHERE event_type = 'NoBedAvailable'")
        .fetch_one(&app.pool)
        .await
        .unwrap();
    assert_eq!(no_bed, 0, "never a stale 'no bed'");
    feed.drop_all().await;
    app.stop().await;
}

#[tokio::test]
async fn the_operator_sees_who_is_coming_and_the_holder_where_never_anyone_else() {
    let app = ShelterApp::spawn().await;
    let shelter_id = register(&app, "KG-O", &[(Women, 2)]).await;
    let mut feed = ReferralFeed::new(&app).await;
    let person_id = rid();
    let referral_id = accepted_referral(&app, &mut feed, MSD, &person_id).await;
    let held = hold_as(&app, &msd(), &shelter_id, &referral_id).await.unwrap();
    let arrivals = |who: String| {
        let mut client = app.client.clone();
        let shelter_id = shelter_id.clone();
        async move {
            client
                .list_arrivals(authorized(pb::ListArrivalsRequest { shelter_id }, &who))
                .await
                .map(tonic::Response::into_inner)
        }
    };

    let coming = arrivals(operator()).await.unwrap().arrivals;
    assert_eq!(coming.len(), 1);
    let arrival = &coming[0];
    assert_eq!(arrival.hold_id, held.hold_id);
    assert_eq!(arrival.person_id, person_id, "a pseudonym, no name");
    assert_eq!(arrival.category, Women as i32);
    assert_eq!(arrival.holder_agency, MSD);
    // Stored to the microsecond.
    assert_eq!(arrival.expires_at.unwrap().seconds, held.expires_at.unwrap().seconds);
    let held_at = arrival.held_at.unwrap();
    assert!(held_at.seconds <= arrival.expires_at.unwrap().seconds);
    let audited: i64 = sqlx::query_scalar("SELECT count(*) FROM audit_log WHERE action = 'ListArrivals'")
        .fetch_one(&app.pool)
        .await
        .unwrap();
    assert_eq!(audited, 1);

    // MSD (which runs shelters, not this one) and MoH (which runs none) see no arrivals.
    let tables = app.tables();
    let before = tables.snapshot().await;
    assert_eq!(arrivals(msd()).await.unwrap_err().code(), Code::PermissionDenied);
    assert_eq!(arrivals(moh()).await.unwrap_err().code(), Code::PermissionDenied);
    assert_only_audited(&tables, &before, 2, "arrivals asked for by other agencies").await;

    // The holder reads the address while it holds the bed, not after.
    let get = |who: String| {
        let mut client = app.client.clone();
        let shelter_id = shelter_id.clone();
        async move {
            client
                .get_shelter(authorized(pb::GetShelterRequest { shelter_id }, &who))
                .await
                .map(tonic::Response::into_inner)
        }
    };
    assert_eq!(get(msd()).await.unwrap().address, "Secret lane 3");
    let before = tables.snapshot().await;
    assert_eq!(get(moh()).await.unwrap_err().code(), Code::PermissionDenied);
    assert_only_audited(&tables, &before, 1, "an address read by an agency holding no bed there").await;
    wait_followed(&app, feed.cancel(&referral_id, MSD).await).await;
    assert_eq!(get(msd()).await.unwrap_err().code(), Code::PermissionDenied);
    assert!(arrivals(operator()).await.unwrap().arrivals.is_empty());
    feed.drop_all().await;
    app.stop().await;
}

async fn release_as(app: &ShelterApp, who: &str, shelter_id: &str, hold_id: &str) -> Result<(), tonic::Status> {
    app.client
        .clone()
        .release_hold(authorized(
            pb::ReleaseHoldRequest {
                request_id: rid(),
                shelter_id: shelter_id.to_owned(),
                hold_id: hold_id.to_owned(),
            },
            who,
        ))
        .await
        .map(|_| ())
}

async fn get_as(app: &ShelterApp, who: &str, shelter_id: &str) -> Result<pb::Shelter, tonic::Status> {
    app.client
        .clone()
        .get_shelter(authorized(
            pb::GetShelterRequest {
                shelter_id: shelter_id.to_owned(),
            },
            who,
        ))
        .await
        .map(tonic::Response::into_inner)
}

/// The review's address harvest: an agency with some accepted referral
/// (MoH, a medical one) walks the shelters holding and releasing beds to
/// read their addresses. A referral that asked for no shelter holds
/// nothing, one that did holds its category only, and at most
/// `MAX_HOLDS_PER_REFERRAL` times.
#[tokio::test]
async fn no_address_harvest_a_bed_only_for_a_shelter_need_of_its_category_and_a_few_times() {
    let app = ShelterApp::spawn().await;
    let shelters = [
        register(&app, "KG-O", &[(Women, 3), (Children, 2)]).await,
        register(&app, "KG-GB", &[(Women, 3)]).await,
        register(&app, "KG-C", &[(Women, 3)]).await,
        register(&app, "KG-N", &[(Women, 3)]).await,
    ];
    let mut feed = ReferralFeed::new(&app).await;
    let tables = app.tables();

    // A medical referral to MoH, accepted: it asked for no shelter.
    let medical = rid();
    let person = Uuid::now_v7();
    feed.commit(
        &medical,
        referral::referral_event::Event::ReferralCreated(referral::ReferralCreated {
            referral_id: medical.clone(),
            person_id: person.to_string(),
            receiving_agency: "kg-moh".into(),
            services: vec![referral::ServiceKind::Medical as i32],
            ..Default::default()
        }),
    )
    .await;
    let sequence = feed
        .send(
            &medical,
            ReferralFeed::accepted(&medical, &person.to_string(), "kg-moh", None),
        )
        .await;
    wait_followed(&app, sequence).await;
    let before = tables.snapshot().await;
    for shelter_id in &shelters {
        let status = hold_as(&app, &moh(), shelter_id, &medical).await.unwrap_err();
        assert_eq!(reason(&status), "NO_SHELTER_NEED");
        assert_eq!(
            get_as(&app, &moh(), shelter_id).await.unwrap_err().code(),
            Code::PermissionDenied
        );
    }
    assert_only_audited(&tables, &before, 8, "holds and address reads for a medical referral").await;
    let listed: i64 =
        sqlx::query_scalar("SELECT count(*) FROM audit_log WHERE person_id = $1 AND action = 'HoldBed:refused'")
            .bind(person)
            .fetch_one(&app.pool)
            .await
            .unwrap();
    assert_eq!(listed, 4, "the refusals list under the referral's person");

    // A shelter referral for a woman's bed: not a child's bed.
    let person = Uuid::now_v7();
    let referral_id = accepted_referral(&app, &mut feed, MSD, &person.to_string()).await;
    let before = tables.snapshot().await;
    let status = app
        .client
        .clone()
        .hold_bed(authorized(
            pb::HoldBedRequest {
                request_id: rid(),
                shelter_id: shelters[0].clone(),
                category: Children as i32,
                referral_id: referral_id.clone(),
                hold_minutes: 60,
            },
            &msd(),
        ))
        .await
        .unwrap_err();
    assert_eq!(reason(&status), "CATEGORY_MISMATCH");
    assert_only_audited(&tables, &before, 1, "a hold of another category").await;

    // Hold and release, shelter after shelter: the referral's holds run out
    // (the refused holds above counted none).
    for shelter_id in &shelters[..3] {
        let held = hold_as(&app, &msd(), shelter_id, &referral_id).await.unwrap();
        assert_eq!(get_as(&app, &msd(), shelter_id).await.unwrap().address, "Secret lane 3");
        release_as(&app, &msd(), shelter_id, &held.hold_id).await.unwrap();
        assert_eq!(
            get_as(&app, &msd(), shelter_id).await.unwrap_err().code(),
            Code::PermissionDenied,
            "no address once the hold is released"
        );
    }
    let before = tables.snapshot().await;
    let status = hold_as(&app, &msd(), &shelters[3], &referral_id).await.unwrap_err();
    assert_eq!(reason(&status), "HOLD_LIMIT");
    assert_only_audited(&tables, &before, 1, "a hold past the limit").await;
    assert_eq!(
        get_as(&app, &msd(), &shelters[3]).await.unwrap_err().code(),
        Code::PermissionDenied
    );
    // The operator and the coordinator read it.
    assert_eq!(
        get_as(&app, &operator(), &shelters[3]).await.unwrap().address,
        "Secret lane 3"
    );
    assert_eq!(
        get_as(&app, &coordinator(), &shelters[3]).await.unwrap().address,
        "Secret lane 3"
    );

    // Every hold and release lists under the referral's person.
    let actions: Vec<String> = sqlx::query_scalar(
        "SELECT action FROM audit_log WHERE person_id = $1 AND action IN ('HoldBed', 'ReleaseHold') ORDER BY id",
    )
    .bind(person)
    .fetch_all(&app.pool)
    .await
    .unwrap();
    assert_eq!(
        actions,
        [
            "HoldBed",
            "ReleaseHold",
            "HoldBed",
            "ReleaseHold",
            "HoldBed",
            "ReleaseHold"
        ]
    );
    feed.drop_all().await;
    app.stop().await;
}

/// The review's fake shelter: a registered shelter takes no referral until
/// the coordinator approved it.
#[tokio::test]
async fn a_shelter_takes_no_referral_until_the_coordinator_approves_it() {
    let app = ShelterApp::spawn().await;
    let fake = register_unapproved(&app, "KG-O", &[(Women, 10_000)]).await;
    let real = register(&app, "KG-O", &[(Women, 1)]).await;
    let mut feed = ReferralFeed::new(&app).await;
    let tables = app.tables();

    // Placement sends the referral to the approved shelter, not the bigger fake one.
    let placed = rid();
    let sequence = feed.accept(&placed, Women, "KG-O").await;
    wait_followed(&app, sequence).await;
    let holds: Vec<String> = sqlx::query_scalar("SELECT shelter_id::text FROM open_holds WHERE referral_id = $1::uuid")
        .bind(&placed)
        .fetch_all(&app.pool)
        .await
        .unwrap();
    assert_eq!(holds, std::slice::from_ref(&real));

    // No hold by hand, no listing.
    let referral_id = accepted_referral(&app, &mut feed, MSD, &rid()).await;
    let before = tables.snapshot().await;
    let status = hold_as(&app, &msd(), &fake, &referral_id).await.unwrap_err();
    assert_eq!(reason(&status), "SHELTER_NOT_APPROVED");
    assert_only_audited(&tables, &before, 1, "a hold at an unapproved shelter").await;
    let listed = |app: &ShelterApp| {
        let mut client = app.client.clone();
        async move {
            client
                .list_free_capacity(authorized(
                    pb::ListFreeCapacityRequest {
                        region: "KG-O".into(),
                        category: Women as i32,
                    },
                    &msd(),
                ))
                .await
                .unwrap()
                .into_inner()
                .entries
                .into_iter()
                .map(|e| e.shelter_id)
                .collect::<Vec<_>>()
        }
    };
    // The real shelter's one bed is held: it is listed with none free; the fake is not listed.
    assert!(!listed(&app).await.contains(&fake));

    // Only the coordinator approves, once.
    let approve_as = |who: String, version: u64| {
        let mut client = app.client.clone();
        let fake = fake.clone();
        async move {
            client
                .approve_shelter(authorized(
                    pb::ApproveShelterRequest {
                        request_id: rid(),
                        shelter_id: fake,
                        expected_version: version,
                    },
                    &who,
                ))
                .await
        }
    };
    assert_eq!(
        approve_as(operator(), 1).await.unwrap_err().code(),
        Code::PermissionDenied
    );
    assert_eq!(approve_as(msd(), 1).await.unwrap_err().code(), Code::PermissionDenied);
    approve_as(coordinator(), 1).await.unwrap();
    assert_eq!(
        reason(&approve_as(coordinator(), 2).await.unwrap_err()),
        "ALREADY_APPROVED"
    );
    hold_as(&app, &msd(), &fake, &referral_id).await.unwrap();
    for _ in 0..200 {
        if listed(&app).await.contains(&fake) {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert!(listed(&app).await.contains(&fake), "listed once approved");
    feed.drop_all().await;
    app.stop().await;
}

/// The review's lagging read model: a referral declined by A, redirected to
/// B and accepted by B may still read "declined, receiving A" here. B then
/// hears "not yet" (retry), never a final-looking "denied"; "denied" only
/// for a referral accepted by another agency. And when the placement
/// reaction saw the referral end before the read model did, no bed.
#[tokio::test]
async fn a_lagging_referral_view_answers_not_yet_and_never_holds_for_an_ended_referral() {
    let app = ShelterApp::spawn().await;
    let shelter_id = register(&app, "KG-O", &[(Women, 3)]).await;
    let mut feed = ReferralFeed::new(&app).await;
    let referral_id = accepted_referral(&app, &mut feed, MSD, &rid()).await;
    let set = |agency: &'static str, state: &'static str| {
        let pool = app.pool.clone();
        let referral_id = referral_id.clone();
        async move {
            sqlx::query("UPDATE shelter_referrals SET receiving_agency = $2, state = $3 WHERE referral_id = $1::uuid")
                .bind(referral_id)
                .bind(agency)
                .bind(state)
                .execute(&pool)
                .await
                .unwrap();
        }
    };
    // Behind: still "declined by kg-ngo-a".
    set("kg-ngo-a", "declined").await;
    let status = hold_as(&app, &msd(), &shelter_id, &referral_id).await.unwrap_err();
    assert_eq!(reason(&status), "REFERRAL_NOT_ACCEPTED");
    set("kg-ngo-a", "redirected").await;
    let status = hold_as(&app, &msd(), &shelter_id, &referral_id).await.unwrap_err();
    assert_eq!(reason(&status), "REFERRAL_NOT_ACCEPTED");
    // Accepted by another agency: that is final.
    set("kg-ngo-a", "accepted").await;
    let status = hold_as(&app, &msd(), &shelter_id, &referral_id).await.unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied);
    // Caught up: MSD holds.
    set(MSD, "accepted").await;
    let held = hold_as(&app, &msd(), &shelter_id, &referral_id).await.unwrap();
    release_as(&app, &msd(), &shelter_id, &held.hold_id).await.unwrap();

    // The placement reaction has seen the cancellation, the read model not yet.
    sqlx::query("UPDATE placement_referrals SET ended = true, version = version + 1 WHERE referral_id = $1::uuid")
        .bind(&referral_id)
        .execute(&app.pool)
        .await
        .unwrap();
    let status = hold_as(&app, &msd(), &shelter_id, &referral_id).await.unwrap_err();
    assert_eq!(reason(&status), "REFERRAL_NOT_ACCEPTED");
    feed.drop_all().await;
    app.stop().await;
}

/// The upgrade: referrals accepted before the referrals view existed (its
/// table empty, no checkpoint) are learnt from the referral stream by the
/// view's own runner, so they can hold a bed.
#[tokio::test]
async fn referrals_accepted_before_the_view_existed_can_hold_a_bed_after_the_upgrade() {
    let app = ShelterApp::spawn().await;
    let shelter_id = register(&app, "KG-O", &[(Women, 3)]).await;
    let mut feed = ReferralFeed::new(&app).await;
    let referral_id = accepted_referral(&app, &mut feed, MSD, &rid()).await;
    let (settings, pool) = (app.settings.clone(), app.pool.clone());
    // The service stops (its database and streams stay) ...
    drop(app);
    tokio::time::sleep(std::time::Duration::from_secs(1)).await;
    // ... and the deploy starts with the view empty and never run.
    sqlx::query("TRUNCATE shelter_referrals").execute(&pool).await.unwrap();
    sqlx::query("DELETE FROM projection_checkpoints WHERE projection = 'shelter_referrals'")
        .execute(&pool)
        .await
        .unwrap();
    let app = ShelterApp::spawn_with(settings).await;
    let mut held = None;
    for _ in 0..200 {
        match hold_as(&app, &msd(), &shelter_id, &referral_id).await {
            Ok(h) => {
                held = Some(h);
                break;
            }
            Err(status) => assert_eq!(reason(&status), "REFERRAL_NOT_ACCEPTED"),
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert!(held.is_some(), "the referral accepted before the upgrade holds a bed");
    pool.close().await;
    feed.drop_all().await;
    app.stop().await;
}
