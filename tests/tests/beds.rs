//! Beds only for real referrals (issue 9, item 4), against real NATS and
//! PostgreSQL: a bed is held only for an accepted referral addressed to the
//! caller's agency, at most one open hold per referral across all shelters,
//! released by itself when the referral ends; placement decides on the
//! shelters' own state; the holder learns the address, the operator who is
//! coming, never why.

#![allow(clippy::unwrap_used)] // Test code: a failed unwrap is a failed test.

use nrm_e2e::beds::{ReferralFeed, accepted_referral, assert_only_audited, wait_followed};
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

async fn register(app: &ShelterApp, region: &str, capacity: &[(pb::BedCategory, u32)]) -> String {
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
