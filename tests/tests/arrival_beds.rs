//! A shelter need on arrival holds a bed at home (issue 10, item 3), against
//! real NATS and PostgreSQL: the home country's repatriation stream is
//! played here (commits of `nrm.repatriation.v1.RepatriationEvent` built
//! with prost and published with the headers the kernel's relay sets), and
//! the shelter service's arrivals reaction holds one bed per announced
//! return with a shelter need and an arrival time, in the arrival point's
//! region and the profile's category, for the returns agency (kg-iom);
//! exactly once under redelivery and a replay, released when the return
//! halts, `NoBedAvailable` when no bed is free.

#![allow(clippy::unwrap_used)] // Test code: a failed unwrap is a failed test.

use std::collections::HashMap;
use std::time::Duration;

use chrono::{DateTime, Utc};
use nrm_e2e::beds::approve;
use nrm_e2e::{ShelterApp, authorized, token, unique};
use nrm_kernel::auth::Role;
use nrm_kernel::bus::{self, Bus};
use nrm_kernel::store::EventMetadata;
use nrm_kernel::validate;
use nrm_proto::common::v1::{AgeBand, CommittedEvent, EventCommit, Gender};
use nrm_proto::repatriation::v1 as rp;
use nrm_proto::shelter::v1 as pb;
use pb::BedCategory::{Children, Men, Women};
use prost::Message as _;
use rp::repatriation_event::Event as ReturnEvent;
use rp::{ArrivalNeed, ReturnStatus};
use tonic::Code;
use uuid::Uuid;

const OPERATOR: &str = "kg-ngo-sezim";
const RETURNS_AGENCY: &str = "kg-iom";
const PAYLOAD_TYPE: &str = "nrm.repatriation.v1.RepatriationEvent";
/// The arrivals reaction's checkpoint.
const REACTION: &str = "shelter_arrivals";

fn operator() -> String {
    token(OPERATOR, Role::Ngo, "officer-1")
}

fn kg_iom() -> String {
    token(RETURNS_AGENCY, Role::Iom, "iom-officer-1")
}

fn rid() -> String {
    Uuid::now_v7().to_string()
}

/// A whole second, `hours` from now (timestamps compare exactly).
fn in_hours(hours: i64) -> DateTime<Utc> {
    let t = Utc::now() + chrono::Duration::hours(hours);
    DateTime::from_timestamp(t.timestamp(), 0).unwrap()
}

/// The home country's repatriation service, as the shelter service sees it
/// on the bus: each return a stream `return-<id>` on the subject
/// `{prefix}.repatriation.v1.return.<id>`, one message per commit.
struct ReturnFeed {
    bus: Bus,
    versions: HashMap<String, u64>,
}

/// What a test says of a return; the rest of the snapshot follows.
#[derive(Clone)]
struct Return {
    return_id: String,
    status: ReturnStatus,
    needs: Vec<ArrivalNeed>,
    arrival_at: Option<DateTime<Utc>>,
    arrival_point: &'static str,
    gender: Gender,
    age_band: AgeBand,
}

impl Return {
    /// A woman of 25-34 who needs shelter, arriving at `point` in two days.
    fn needing_shelter(point: &'static str) -> Self {
        Self {
            return_id: rid(),
            status: ReturnStatus::ItineraryBooked,
            needs: vec![ArrivalNeed::Medical, ArrivalNeed::Shelter],
            arrival_at: Some(in_hours(48)),
            arrival_point: point,
            gender: Gender::Female,
            age_band: AgeBand::AgeBand2534,
        }
    }

    fn snapshot(&self, origin_version: u64) -> rp::CrossBorderReturn {
        rp::CrossBorderReturn {
            return_id: self.return_id.clone(),
            from_country: "ru".into(),
            to_country: "kg".into(),
            status: self.status as i32,
            origin_version,
            shared_fields: vec![rp::SharedField::Profile as i32, rp::SharedField::Needs as i32],
            gender: self.gender as i32,
            age_band: self.age_band as i32,
            needs: self.needs.iter().map(|n| *n as i32).collect(),
            arrival_at: self.arrival_at.map(validate::timestamp),
            arrival_point_kind: if self.arrival_point.len() == 3 {
                rp::ArrivalPointKind::Airport as i32
            } else {
                rp::ArrivalPointKind::BorderPost as i32
            },
            arrival_point: self.arrival_point.into(),
            halt_reason: if self.status == ReturnStatus::Halted {
                rp::HaltReason::RiskFound as i32
            } else {
                0
            },
            ..Default::default()
        }
    }
}

impl ReturnFeed {
    /// Creates the repatriation stream of `app`'s subject space, as the
    /// repatriation service does at start.
    async fn new(app: &ShelterApp) -> Self {
        let bus = Bus::connect(&app.settings.nats).await.unwrap();
        bus.ensure_stream("repatriation").await.unwrap();
        Self {
            bus,
            versions: HashMap::new(),
        }
    }

    /// Publishes the return as it stands now: `ReturnAnnounced` the first
    /// time, `AnnouncedStepRecorded` after; one commit, the return's next
    /// version. The stream sequence it got.
    async fn announce(&mut self, r: &Return) -> u64 {
        let version = self.versions.get(&r.return_id).copied().unwrap_or(0) + 1;
        // The origin version counts steps in the destination country (any rising number does here).
        let snapshot = r.snapshot(version + 2);
        let event = if version == 1 {
            ReturnEvent::Announced(rp::ReturnAnnounced {
                return_id: r.return_id.clone(),
                from_country: "ru".into(),
                snapshot: Some(snapshot),
                identifiers: None,
            })
        } else {
            ReturnEvent::AnnouncedStep(rp::AnnouncedStepRecorded {
                snapshot: Some(snapshot),
                identifiers: None,
            })
        };
        self.publish(&r.return_id, version, event).await
    }

    /// Publishes one commit of `event` at `version` of the return's stream,
    /// as the kernel's relay does: an `EventCommit` body, `Nats-Msg-Id` (the
    /// commit ID), the stream ID and version, and the metadata headers.
    async fn publish(&mut self, return_id: &str, version: u64, event: ReturnEvent) -> u64 {
        let event_type = match &event {
            ReturnEvent::Announced(_) => "ReturnAnnounced",
            ReturnEvent::AnnouncedStep(_) => "AnnouncedStepRecorded",
            _ => "Other",
        };
        let stream_id = format!("return-{return_id}");
        let commit_id = Uuid::now_v7().to_string();
        let body = EventCommit {
            commit_id: commit_id.clone(),
            stream_id: stream_id.clone(),
            payload_type: PAYLOAD_TYPE.into(),
            events: vec![CommittedEvent {
                event_id: rid(),
                version,
                event_type: event_type.into(),
                schema_version: 1,
                recorded_at: Some(validate::timestamp(Utc::now())),
                payload: rp::RepatriationEvent { event: Some(event) }.encode_to_vec(),
            }],
        };
        let mut headers = async_nats::HeaderMap::new();
        headers.insert("Nats-Msg-Id", commit_id.as_str());
        headers.insert(bus::HEADER_STREAM_ID, stream_id.as_str());
        headers.insert(bus::HEADER_STREAM_VERSION, version.to_string().as_str());
        bus::metadata_headers(&mut headers, &EventMetadata::system("repatriation.inbound", None));
        let sequence = self
            .bus
            .jetstream()
            .publish_with_headers(
                self.bus.subject("repatriation", "return", return_id),
                headers,
                body.encode_to_vec().into(),
            )
            .await
            .unwrap()
            .await
            .unwrap()
            .sequence;
        self.versions.insert(return_id.to_owned(), version);
        sequence
    }

    /// Publishes the last message of the stream once more, as a new message
    /// (another sequence, no de-duplication): a redelivery.
    async fn redeliver_last(&self) -> u64 {
        let stream = self
            .bus
            .jetstream()
            .get_stream(self.bus.stream_name("repatriation"))
            .await
            .unwrap();
        let last = stream
            .get_raw_message(stream.cached_info().state.last_sequence)
            .await
            .unwrap();
        let mut headers = async_nats::HeaderMap::new();
        for (name, values) in last.headers.iter() {
            if name.to_string() != "Nats-Msg-Id" {
                for value in values {
                    headers.append(name.clone(), value.as_str());
                }
            }
        }
        self.bus
            .jetstream()
            .publish_with_headers(last.subject.clone(), headers, last.payload.clone())
            .await
            .unwrap()
            .await
            .unwrap()
            .sequence
    }

    async fn drop_stream(self) {
        let _ = self
            .bus
            .jetstream()
            .delete_stream(self.bus.stream_name("repatriation"))
            .await;
    }
}

/// Waits until the arrivals reaction has applied the repatriation stream up to `sequence`.
async fn wait_followed(app: &ShelterApp, sequence: u64) {
    for _ in 0..200 {
        let at: Option<i64> =
            sqlx::query_scalar("SELECT stream_sequence FROM projection_checkpoints WHERE projection = $1")
                .bind(REACTION)
                .fetch_optional(&app.pool)
                .await
                .unwrap();
        if at.is_some_and(|s| u64::try_from(s).unwrap_or(0) >= sequence) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("the arrivals reaction did not follow the repatriation stream to {sequence} within 10 s");
}

/// Registers a shelter run by [`OPERATOR`], approved by the coordinator when `approved`.
async fn register(app: &ShelterApp, region: &str, capacity: &[(pb::BedCategory, u32)], approved: bool) -> String {
    let shelter_id = app
        .client
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
        .shelter_id;
    if approved {
        approve(app, &shelter_id).await;
    }
    shelter_id
}

/// The hold the reaction made for the return: (hold, shelter).
async fn hold_of(app: &ShelterApp, return_id: &str) -> Option<(String, String)> {
    sqlx::query_as(
        "SELECT hold_id::text, shelter_id::text FROM placement_returns WHERE return_id = $1::uuid AND hold_id IS NOT NULL",
    )
    .bind(return_id)
    .fetch_optional(&app.pool)
    .await
    .unwrap()
}

/// Every `BedHeld` on the shelter streams, decoded.
async fn beds_held(app: &ShelterApp) -> Vec<pb::BedHeld> {
    let payloads: Vec<Vec<u8>> = sqlx::query_scalar(
        "SELECT payload FROM events WHERE stream_id LIKE 'shelter-%' AND event_type = 'BedHeld' ORDER BY global_position",
    )
    .fetch_all(&app.pool)
    .await
    .unwrap();
    payloads
        .iter()
        .filter_map(|p| match pb::ShelterEvent::decode(p.as_slice()).unwrap().event {
            Some(pb::shelter_event::Event::BedHeld(held)) => Some(held),
            _ => None,
        })
        .collect()
}

async fn count_events(app: &ShelterApp, event_type: &str) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM events WHERE event_type = $1")
        .bind(event_type)
        .fetch_one(&app.pool)
        .await
        .unwrap()
}

async fn arrivals(app: &ShelterApp, shelter_id: &str) -> Vec<pb::Arrival> {
    app.client
        .clone()
        .list_arrivals(authorized(
            pb::ListArrivalsRequest {
                shelter_id: shelter_id.to_owned(),
            },
            &operator(),
        ))
        .await
        .unwrap()
        .into_inner()
        .arrivals
}

async fn get_shelter(app: &ShelterApp, who: &str, shelter_id: &str) -> Result<pb::Shelter, tonic::Status> {
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

#[tokio::test]
async fn a_return_that_needs_shelter_holds_one_bed_in_its_arrival_region_for_its_window() {
    let app = ShelterApp::spawn().await;
    // Manas airport (FRU) is in Chüy: its approved women's shelter is the one.
    let chuy = register(&app, "KG-C", &[(Women, 2)], true).await;
    let _osh = register(&app, "KG-O", &[(Women, 5)], true).await;
    let _chuy_men = register(&app, "KG-C", &[(Men, 3)], true).await;
    let _unapproved = register(&app, "KG-C", &[(Women, 9)], false).await;
    let mut feed = ReturnFeed::new(&app).await;

    let mut person = Return::needing_shelter("FRU");
    let arrival_at = person.arrival_at.unwrap();
    wait_followed(&app, feed.announce(&person).await).await;
    let (hold_id, shelter_id) = hold_of(&app, &person.return_id).await.expect("a bed held");
    assert_eq!(shelter_id, chuy);
    let held = beds_held(&app).await;
    assert_eq!(held.len(), 1);
    let bed = &held[0];
    assert_eq!(bed.hold_id, hold_id);
    assert_eq!(bed.referral_id, "", "held for a return, not a referral");
    assert_eq!(bed.category, Women as i32);
    assert_eq!(bed.region, "KG-C");
    assert_eq!(bed.holder_agency, RETURNS_AGENCY);
    // The window: until a hold default (24 h) after the arrival.
    let window_end = arrival_at + chrono::Duration::minutes(1440);
    assert_eq!(bed.expires_at, Some(validate::timestamp(window_end)));

    // The operator sees who is coming (the return's ID) and when; never why.
    let coming = arrivals(&app, &chuy).await;
    assert_eq!(coming.len(), 1);
    let arrival = &coming[0];
    assert_eq!(arrival.hold_id, hold_id);
    assert_eq!(arrival.return_id, person.return_id);
    assert_eq!(arrival.person_id, "");
    assert_eq!(arrival.holder_agency, RETURNS_AGENCY);
    assert_eq!(arrival.arrival_at, Some(validate::timestamp(arrival_at)));
    assert_eq!(arrival.expires_at.unwrap().seconds, window_end.timestamp());
    // The returns agency reads the address of the shelter it holds a bed
    // at; another IOM office does not.
    assert_eq!(
        get_shelter(&app, &kg_iom(), &chuy).await.unwrap().address,
        "Secret lane 3"
    );
    let other_iom = token("kg-iom-osh", Role::Iom, "iom-officer-2");
    assert_eq!(
        get_shelter(&app, &other_iom, &chuy).await.unwrap_err().code(),
        Code::PermissionDenied
    );

    // The same commit delivered again, the same snapshot as a new commit, a
    // later snapshot with the arrival moved a day: still one hold, its
    // window as it was; the expected arrival follows the latest snapshot.
    wait_followed(&app, feed.redeliver_last().await).await;
    wait_followed(&app, feed.announce(&person).await).await;
    person.status = ReturnStatus::Departed;
    let moved = arrival_at + chrono::Duration::hours(24);
    person.arrival_at = Some(moved);
    wait_followed(&app, feed.announce(&person).await).await;
    person.status = ReturnStatus::HandedOver;
    wait_followed(&app, feed.announce(&person).await).await;
    let held = beds_held(&app).await;
    assert_eq!(held.len(), 1, "one bed for one return: {held:?}");
    assert_eq!(
        count_events(&app, "HoldReleased").await,
        0,
        "a handed-over return keeps its bed"
    );
    let coming = arrivals(&app, &chuy).await;
    assert_eq!(coming.len(), 1);
    assert_eq!(coming[0].expires_at.unwrap().seconds, window_end.timestamp());
    assert_eq!(coming[0].arrival_at, Some(validate::timestamp(moved)));

    // The operator admits the person as anyone else, by the hold.
    app.client
        .clone()
        .admit(authorized(
            pb::AdmitRequest {
                request_id: rid(),
                shelter_id: chuy.clone(),
                hold_id: hold_id.clone(),
            },
            &operator(),
        ))
        .await
        .unwrap();
    assert!(arrivals(&app, &chuy).await.is_empty(), "admitted: no longer coming");
    feed.drop_stream().await;
    app.stop().await;
}

#[tokio::test]
async fn a_halted_return_releases_its_bed() {
    let app = ShelterApp::spawn().await;
    // Dostuk border post is in the Osh region; a boy of 12-17 needs a children's bed.
    let osh = register(&app, "KG-O", &[(Children, 1), (Men, 1)], true).await;
    let mut feed = ReturnFeed::new(&app).await;
    let mut boy = Return {
        gender: Gender::Male,
        age_band: AgeBand::AgeBand1217,
        ..Return::needing_shelter("DOSTUK")
    };
    wait_followed(&app, feed.announce(&boy).await).await;
    let (hold_id, shelter_id) = hold_of(&app, &boy.return_id).await.expect("a bed held");
    assert_eq!(shelter_id, osh);
    assert_eq!(beds_held(&app).await[0].category, Children as i32);

    boy.status = ReturnStatus::Halted;
    wait_followed(&app, feed.announce(&boy).await).await;
    let released: Vec<String> =
        sqlx::query_scalar("SELECT payload FROM events WHERE event_type = 'HoldReleased' ORDER BY global_position")
            .fetch_all(&app.pool)
            .await
            .unwrap()
            .iter()
            .map(
                |p: &Vec<u8>| match pb::ShelterEvent::decode(p.as_slice()).unwrap().event {
                    Some(pb::shelter_event::Event::HoldReleased(r)) => r.hold_id,
                    other => panic!("{other:?}"),
                },
            )
            .collect();
    assert_eq!(released, [hold_id]);
    assert!(arrivals(&app, &osh).await.is_empty());
    let shelter = get_shelter(&app, &operator(), &osh).await.unwrap();
    let free = shelter.free.iter().find(|c| c.category == Children as i32).unwrap();
    assert_eq!(free.beds, 1, "the bed is free again");
    // No longer holding a bed there, the returns agency no longer reads the address.
    assert_eq!(
        get_shelter(&app, &kg_iom(), &osh).await.unwrap_err().code(),
        Code::PermissionDenied
    );
    // Halted again (a redelivery): nothing more.
    wait_followed(&app, feed.redeliver_last().await).await;
    assert_eq!(count_events(&app, "HoldReleased").await, 1);
    assert_eq!(beds_held(&app).await.len(), 1);
    feed.drop_stream().await;
    app.stop().await;
}

#[tokio::test]
async fn a_return_without_a_shelter_need_or_arrival_time_holds_no_bed() {
    let app = ShelterApp::spawn().await;
    let osh = register(&app, "KG-O", &[(Women, 3)], true).await;
    let bishkek = register(&app, "KG-GB", &[(Women, 3)], true).await;
    let mut feed = ReturnFeed::new(&app).await;
    let medical_only = Return {
        needs: vec![ArrivalNeed::Medical, ArrivalNeed::Escort],
        ..Return::needing_shelter("OSS")
    };
    // Needs not shared: the snapshot carries none.
    let needs_not_shared = Return {
        needs: vec![],
        ..Return::needing_shelter("OSS")
    };
    let not_booked = Return {
        status: ReturnStatus::Assessed,
        arrival_at: None,
        ..Return::needing_shelter("OSS")
    };
    feed.announce(&medical_only).await;
    feed.announce(&needs_not_shared).await;
    feed.announce(&not_booked).await;
    // The marker: followed after the others. Its profile is not shared
    // (women's bed by default) and its arrival point is unknown (any
    // region, most free beds first).
    let marker = Return {
        gender: Gender::Unspecified,
        age_band: AgeBand::Unspecified,
        ..Return::needing_shelter("XYZ")
    };
    let sequence = feed.announce(&marker).await;
    wait_followed(&app, sequence).await;
    let (_, shelter_id) = hold_of(&app, &marker.return_id).await.expect("the marker's bed");
    assert!([&osh, &bishkek].contains(&&shelter_id));
    let held = beds_held(&app).await;
    assert_eq!(held.len(), 1, "only the marker holds a bed: {held:?}");
    assert_eq!(held[0].category, Women as i32);
    for r in [&medical_only, &needs_not_shared, &not_booked] {
        assert_eq!(hold_of(&app, &r.return_id).await, None);
    }
    assert_eq!(count_events(&app, "NoBedAvailable").await, 0);

    // The itinerary booked later: now the return is placed (in Osh).
    let booked = Return {
        status: ReturnStatus::ItineraryBooked,
        arrival_at: Some(in_hours(10)),
        ..not_booked
    };
    wait_followed(&app, feed.announce(&booked).await).await;
    let (_, shelter_id) = hold_of(&app, &booked.return_id).await.expect("a bed once booked");
    assert_eq!(shelter_id, osh);
    feed.drop_stream().await;
    app.stop().await;
}

#[tokio::test]
async fn no_free_bed_in_the_country_is_recorded_as_no_bed_available_for_the_return() {
    let app = ShelterApp::spawn().await;
    // A service without the repatriation stream serves and its arrivals
    // reaction waits for the stream (a single-country deployment).
    let waiting = format!("{}_REPATRIATION", app.settings.nats.stream_prefix);
    for _ in 0..200 {
        let row: Option<(Option<String>, i64)> =
            sqlx::query_as("SELECT stream_name, stream_sequence FROM projection_checkpoints WHERE projection = $1")
                .bind(REACTION)
                .fetch_optional(&app.pool)
                .await
                .unwrap();
        if row.is_some() {
            assert_eq!(row, Some((Some(waiting.clone()), 0)));
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Men's beds only at home, a women's bed in Almaty (another country).
    let _osh_men = register(&app, "KG-O", &[(Men, 2)], true).await;
    let _almaty = register(&app, "KZ-75", &[(Women, 2)], true).await;
    let mut feed = ReturnFeed::new(&app).await;
    let person = Return::needing_shelter("OSS");
    wait_followed(&app, feed.announce(&person).await).await;
    wait_followed(&app, feed.announce(&person).await).await;
    assert!(beds_held(&app).await.is_empty());
    let payloads: Vec<Vec<u8>> = sqlx::query_scalar("SELECT payload FROM events WHERE stream_id = $1")
        .bind(format!("arrival-{}", person.return_id))
        .fetch_all(&app.pool)
        .await
        .unwrap();
    assert_eq!(payloads.len(), 1, "recorded once");
    let Some(pb::shelter_event::Event::NoBedAvailable(none)) =
        pb::ShelterEvent::decode(payloads[0].as_slice()).unwrap().event
    else {
        panic!("expected NoBedAvailable");
    };
    assert_eq!(none.referral_id, "");
    assert_eq!(none.region, "KG-O");
    assert_eq!(none.category, Women as i32);
    assert_eq!(none.nearest_regions_with_beds, ["KZ-75"]);
    // Published (by the relay, a moment later) on the shelter stream, on the
    // return's arrival subject.
    let subject = format!(
        "{}.shelter.v1.arrival.{}",
        app.settings.nats.subject_prefix, person.return_id
    );
    let mut published = false;
    for _ in 0..200 {
        let messages = nrm_e2e::messages(&app.jetstream, &app.stream_name("shelter")).await;
        if messages.iter().any(|m| m.subject.as_str() == subject) {
            published = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(published, "NoBedAvailable published on {subject} within 10 s");
    feed.drop_stream().await;
    app.stop().await;
}

#[tokio::test]
async fn with_no_bed_in_its_region_the_nearest_region_of_the_country_holds_it() {
    let app = ShelterApp::spawn().await;
    // Chüy is full; Bishkek is next door, Osh far away.
    let _chuy_full = register(&app, "KG-C", &[(Women, 0)], true).await;
    let _osh = register(&app, "KG-O", &[(Women, 5)], true).await;
    let bishkek = register(&app, "KG-GB", &[(Women, 1)], true).await;
    let mut feed = ReturnFeed::new(&app).await;
    let person = Return::needing_shelter("FRU");
    wait_followed(&app, feed.announce(&person).await).await;
    let (_, shelter_id) = hold_of(&app, &person.return_id).await.expect("a bed held");
    assert_eq!(shelter_id, bishkek);
    feed.drop_stream().await;
    app.stop().await;
}

#[tokio::test]
async fn a_replay_of_the_repatriation_stream_holds_no_second_bed() {
    let app = ShelterApp::spawn().await;
    register(&app, "KG-O", &[(Women, 5)], true).await;
    let mut feed = ReturnFeed::new(&app).await;
    let person = Return::needing_shelter("OSS");
    let halted = Return {
        status: ReturnStatus::Halted,
        ..Return::needing_shelter("OSS")
    };
    feed.announce(&person).await;
    feed.announce(&Return::needing_shelter("OSS")).await;
    // Placed, then halted: released.
    feed.announce(&Return {
        status: ReturnStatus::ItineraryBooked,
        ..halted.clone()
    })
    .await;
    wait_followed(&app, feed.announce(&halted).await).await;
    assert_eq!(beds_held(&app).await.len(), 3);
    assert_eq!(count_events(&app, "HoldReleased").await, 1);

    // The reaction forgets its position and the runner its per-stream
    // versions (as after a lost checkpoint): it replays the stream from the
    // first message, and only the return's own record stands between each
    // snapshot and a second bed.
    let mut tx = app.pool.begin().await.unwrap();
    sqlx::query("UPDATE projection_checkpoints SET stream_sequence = 0, commit_id = NULL WHERE projection = $1")
        .bind(REACTION)
        .execute(&mut *tx)
        .await
        .unwrap();
    sqlx::query("DELETE FROM projection_versions WHERE projection = $1")
        .bind(REACTION)
        .execute(&mut *tx)
        .await
        .unwrap();
    tx.commit().await.unwrap();
    // The marker after the replay: its bed means every earlier message was applied again.
    let marker = Return::needing_shelter("OSS");
    wait_followed(&app, feed.announce(&marker).await).await;
    assert!(hold_of(&app, &marker.return_id).await.is_some());
    assert_eq!(beds_held(&app).await.len(), 4, "one more bed: the marker's");
    assert_eq!(count_events(&app, "HoldReleased").await, 1);
    let open: i64 = sqlx::query_scalar("SELECT count(*) FROM open_holds")
        .fetch_one(&app.pool)
        .await
        .unwrap();
    assert_eq!(open, 3);
    feed.drop_stream().await;
    app.stop().await;
}
