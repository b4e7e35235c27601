//! No personal data in the shelter service's telemetry, whatever is typed,
//! and never a shelter's address.
//!
//! This file is its own test process so that it can capture every log line
//! and span at debug level. The shelter is registered with a canary address
//! and read back (the audited `GetShelter`); then a canary (name, document
//! number, phone, address, date of birth, a name written as a code, in
//! Cyrillic, after a UUID, very long) is pasted into every string field of
//! every RPC of `nrm.shelter.v1.ShelterService` and of the kernel's
//! `OperatorService` and `AuditService` as the shelter service serves them,
//! one field at a time and all at once, into `x-correlation-id` and the
//! trace state, and into paths no RPC has; by callers of every standing (the
//! operator, the agency a bed is held for, another agency, the coordinator,
//! refused roles, no token, a forged token). No log line, span, error
//! (message, details, metadata), metric or audit entry holds any canary, and
//! every error class was reached.

#![allow(clippy::unwrap_used)] // Test code: a failed unwrap is a failed test.

use std::time::Duration;

use nrm_e2e::beds::{ReferralFeed, accepted_referral, approve};
use nrm_e2e::canary::{self, ADDRESS, Caller, ERROR_CODES, NAME, PASSPORT, Sweep};
use nrm_e2e::{ShelterApp, authorized, fields, token, unique};
use nrm_kernel::auth::Role;
use nrm_kernel::permissions;
use nrm_proto::common::v1 as common;
use nrm_proto::shelter::v1 as pb;
use tonic::Code;

use common::audit_service_client::AuditServiceClient;
use common::operator_service_client::OperatorServiceClient;

const OPERATOR: &str = "kg-ngo-sezim";
const MSD: &str = "kg-msd";

fn operator() -> String {
    token(OPERATOR, Role::Ngo, "officer-1")
}

fn msd() -> String {
    token(MSD, Role::Msd, "officer-2")
}

fn rid() -> String {
    uuid::Uuid::now_v7().to_string()
}

/// `client.method(request)` as a sweep's call.
macro_rules! via {
    ($client:expr, $method:ident) => {
        |request| {
            let mut client = $client.clone();
            async move { client.$method(request).await }
        }
    };
}

fn registration(address: &str) -> pb::RegisterShelterRequest {
    pb::RegisterShelterRequest {
        request_id: rid(),
        code: format!("CC-{}", &unique()[..6]),
        region: "KG-O".into(),
        address: address.to_owned(),
        capacity: vec![
            pb::BedCapacity {
                category: pb::BedCategory::Women as i32,
                beds: 10,
            },
            pb::BedCapacity {
                category: pb::BedCategory::Men as i32,
                beds: 4,
            },
        ],
        services: vec![pb::OnSiteService::Psychological as i32],
        wheelchair_accessible: true,
    }
}

/// A shelter with a canary address, a bed held for one accepted referral
/// and one to be admitted, and a referral accepted with no bed held yet.
struct World {
    shelter_id: String,
    hold_id: String,
    admitted_hold_id: String,
    referral_id: String,
}

impl World {
    async fn build(app: &ShelterApp, feed: &mut ReferralFeed) -> Self {
        let mut client = app.client.clone();
        let shelter_id = client
            .register_shelter(authorized(registration(ADDRESS), &operator()))
            .await
            .unwrap()
            .into_inner()
            .shelter_id;
        approve(app, &shelter_id).await;
        let mut hold = async |referral_id: &str| {
            client
                .hold_bed(authorized(
                    pb::HoldBedRequest {
                        request_id: rid(),
                        shelter_id: shelter_id.clone(),
                        category: pb::BedCategory::Women as i32,
                        referral_id: referral_id.to_owned(),
                        hold_minutes: 600,
                    },
                    &msd(),
                ))
                .await
                .unwrap()
                .into_inner()
                .hold_id
        };
        let first = accepted_referral(app, feed, MSD, &rid()).await;
        let hold_id = hold(&first).await;
        let second = accepted_referral(app, feed, MSD, &rid()).await;
        let admitted_hold_id = hold(&second).await;
        let referral_id = accepted_referral(app, feed, MSD, &rid()).await;
        Self {
            shelter_id,
            hold_id,
            admitted_hold_id,
            referral_id,
        }
    }
}

/// The callers of the shelter service's own RPCs.
fn callers() -> Vec<Caller> {
    vec![
        Caller::with("the operator", &operator()),
        Caller::with("MSD, holding a bed", &msd()),
        Caller::with("another MSD office", &token("kg-msd-osh", Role::Msd, "officer-4")),
        Caller::with(
            "the coordinator",
            &token("kg-coordinator", Role::Coordinator, "coord-1"),
        ),
        Caller::refused(
            "police",
            Some(format!("Bearer {}", token("kg-mvd", Role::Police, "officer-9"))),
        ),
        Caller::refused(
            "a token whose claims are canaries",
            Some(format!("Bearer {}", token(NAME, Role::Ngo, PASSPORT))),
        ),
        Caller::refused("no token", None),
        Caller::refused("a canary as the token", Some(format!("Bearer {ADDRESS}"))),
        Caller::refused("a canary as the scheme", Some(format!("{PASSPORT} x"))),
    ]
}

/// The callers of the kernel's services as the shelter service serves them.
fn kernel_callers() -> Vec<Caller> {
    vec![
        Caller::with("the operator", &token("kg-ops", Role::Operator, "ops-1")),
        Caller::with("the auditor", &token("kg-audit", Role::Auditor, "auditor-1")),
        Caller::with("the shelter's operator", &operator()),
        Caller::refused("no token", None),
        Caller::refused("a canary as the token", Some(format!("Bearer {PASSPORT}"))),
    ]
}

/// A request on a hold: (request ID, shelter ID, hold ID).
fn on_hold(shelter_id: &str, hold_id: &str) -> (String, String, String) {
    (rid(), shelter_id.to_owned(), hold_id.to_owned())
}

#[allow(clippy::too_many_lines)] // One sweep, RPC after RPC.
async fn sweep_shelter_rpcs(sweep: &mut Sweep, app: &ShelterApp, w: &World) {
    let c = app.client.clone();
    let unknown = uuid::Uuid::now_v7().to_string();

    // Reads first, while the world is as built.
    sweep
        .rpc(
            "GetShelter",
            &[
                ("the shelter", &|| pb::GetShelterRequest {
                    shelter_id: w.shelter_id.clone(),
                }),
                ("an unknown shelter", &|| pb::GetShelterRequest {
                    shelter_id: unknown.clone(),
                }),
            ],
            &fields!(pb::GetShelterRequest: shelter_id),
            via!(c, get_shelter),
        )
        .await;
    sweep
        .rpc(
            "ListFreeCapacity",
            &[("Osh region", &|| pb::ListFreeCapacityRequest {
                region: "KG-O".into(),
                category: pb::BedCategory::Women as i32,
            })],
            &fields!(pb::ListFreeCapacityRequest: region),
            via!(c, list_free_capacity),
        )
        .await;
    sweep
        .rpc(
            "ListArrivals",
            &[("the shelter", &|| pb::ListArrivalsRequest {
                shelter_id: w.shelter_id.clone(),
            })],
            &fields!(pb::ListArrivalsRequest: shelter_id),
            via!(c, list_arrivals),
        )
        .await;

    sweep
        .rpc(
            "RegisterShelter",
            &[("a shelter in Osh", &|| registration("Street 1, house 2"))],
            &fields!(pb::RegisterShelterRequest: request_id, code, region, address),
            via!(c, register_shelter),
        )
        .await;
    sweep
        .rpc(
            "ChangeCapacity",
            &[
                ("the shelter", &|| pb::ChangeCapacityRequest {
                    request_id: rid(),
                    shelter_id: w.shelter_id.clone(),
                    expected_version: 0,
                    category: pb::BedCategory::Men as i32,
                    beds: 5,
                }),
                ("an unknown shelter", &|| pb::ChangeCapacityRequest {
                    request_id: rid(),
                    shelter_id: unknown.clone(),
                    expected_version: 0,
                    category: pb::BedCategory::Men as i32,
                    beds: 5,
                }),
            ],
            &fields!(pb::ChangeCapacityRequest: request_id, shelter_id),
            via!(c, change_capacity),
        )
        .await;
    sweep
        .rpc(
            "ApproveShelter",
            &[
                ("the shelter", &|| pb::ApproveShelterRequest {
                    request_id: rid(),
                    shelter_id: w.shelter_id.clone(),
                    expected_version: 2,
                }),
                ("an unknown shelter", &|| pb::ApproveShelterRequest {
                    request_id: rid(),
                    shelter_id: unknown.clone(),
                    expected_version: 1,
                }),
            ],
            &fields!(pb::ApproveShelterRequest: request_id, shelter_id),
            via!(c, approve_shelter),
        )
        .await;
    let hold = |shelter_id: &str, referral_id: &str| pb::HoldBedRequest {
        request_id: rid(),
        shelter_id: shelter_id.to_owned(),
        category: pb::BedCategory::Women as i32,
        referral_id: referral_id.to_owned(),
        hold_minutes: 60,
    };
    sweep
        .rpc(
            "HoldBed",
            &[
                ("an accepted referral", &|| hold(&w.shelter_id, &w.referral_id)),
                ("an unknown referral", &|| hold(&w.shelter_id, &unknown)),
                ("an unknown shelter", &|| hold(&unknown, &w.referral_id)),
            ],
            &fields!(pb::HoldBedRequest: request_id, shelter_id, referral_id),
            via!(c, hold_bed),
        )
        .await;
    sweep
        .rpc(
            "Admit",
            &[
                ("the hold", &|| {
                    let (request_id, shelter_id, hold_id) = on_hold(&w.shelter_id, &w.admitted_hold_id);
                    pb::AdmitRequest {
                        request_id,
                        shelter_id,
                        hold_id,
                    }
                }),
                ("an unknown hold", &|| {
                    let (request_id, shelter_id, hold_id) = on_hold(&w.shelter_id, &unknown);
                    pb::AdmitRequest {
                        request_id,
                        shelter_id,
                        hold_id,
                    }
                }),
            ],
            &fields!(pb::AdmitRequest: request_id, shelter_id, hold_id),
            via!(c, admit),
        )
        .await;
    sweep
        .rpc(
            "Discharge",
            &[
                ("the admitted person", &|| {
                    let (request_id, shelter_id, hold_id) = on_hold(&w.shelter_id, &w.admitted_hold_id);
                    pb::DischargeRequest {
                        request_id,
                        shelter_id,
                        hold_id,
                    }
                }),
                ("a hold not admitted", &|| {
                    let (request_id, shelter_id, hold_id) = on_hold(&w.shelter_id, &w.hold_id);
                    pb::DischargeRequest {
                        request_id,
                        shelter_id,
                        hold_id,
                    }
                }),
            ],
            &fields!(pb::DischargeRequest: request_id, shelter_id, hold_id),
            via!(c, discharge),
        )
        .await;
    // Last, as it ends the hold the others act on.
    sweep
        .rpc(
            "ReleaseHold",
            &[
                ("the hold", &|| {
                    let (request_id, shelter_id, hold_id) = on_hold(&w.shelter_id, &w.hold_id);
                    pb::ReleaseHoldRequest {
                        request_id,
                        shelter_id,
                        hold_id,
                    }
                }),
                ("an unknown shelter", &|| {
                    let (request_id, shelter_id, hold_id) = on_hold(&unknown, &w.hold_id);
                    pb::ReleaseHoldRequest {
                        request_id,
                        shelter_id,
                        hold_id,
                    }
                }),
            ],
            &fields!(pb::ReleaseHoldRequest: request_id, shelter_id, hold_id),
            via!(c, release_hold),
        )
        .await;
}

/// `OperatorService` and `AuditService` on `endpoint`, every field a canary.
///
/// # Panics
/// When the endpoint cannot be reached.
async fn sweep_kernel_rpcs(sweep: &mut Sweep, endpoint: &str, shelter_id: &str) {
    let ops = OperatorServiceClient::connect(endpoint.to_owned()).await.unwrap();
    let audit = AuditServiceClient::connect(endpoint.to_owned()).await.unwrap();
    let unknown = uuid::Uuid::now_v7().to_string();
    sweep
        .rpc(
            "ListParked",
            &[("every item", &common::ListParkedRequest::default)],
            &[],
            via!(ops, list_parked),
        )
        .await;
    sweep
        .rpc(
            "RetryParked",
            &[
                ("a timer", &|| common::RetryParkedRequest {
                    kind: common::ParkedKind::Timer as i32,
                    owner: "shelter_holds".into(),
                    item_id: unknown.clone(),
                }),
                ("a message", &|| common::RetryParkedRequest {
                    kind: common::ParkedKind::Message as i32,
                    owner: "shelter_placement".into(),
                    item_id: "7".into(),
                }),
            ],
            &fields!(common::RetryParkedRequest: owner, item_id),
            via!(ops, retry_parked),
        )
        .await;
    sweep
        .rpc(
            "RefillStream",
            &[("a dry run", &|| common::RefillStreamRequest { dry_run: true })],
            &[],
            via!(ops, refill_stream),
        )
        .await;
    sweep
        .rpc(
            "VerifyChain",
            &[
                ("from the start", &common::VerifyChainRequest::default),
                ("from an anchor", &|| common::VerifyChainRequest {
                    anchor_seq: 1,
                    anchor_hash: "00".repeat(32),
                }),
            ],
            &fields!(common::VerifyChainRequest: anchor_hash),
            via!(audit, verify_chain),
        )
        .await;
    sweep
        .rpc(
            "ListEntries",
            &[("of the shelter", &|| common::ListEntriesRequest {
                subject_id: shelter_id.to_owned(),
                page_size: 5,
                ..Default::default()
            })],
            &fields!(common::ListEntriesRequest: person_id, subject_id, page_token),
            via!(audit, list_entries),
        )
        .await;
}

#[tokio::test]
async fn a_canary_in_any_field_of_any_shelter_rpc_or_its_address_reaches_no_log_span_metric_or_error() {
    let capture = canary::capture();
    let mut settings = nrm_e2e::shelter_settings();
    settings.common.server.metrics_addr = canary::free_addr();
    let metrics_url = format!("http://{}/metrics", settings.common.server.metrics_addr);
    let app = ShelterApp::spawn_with(settings).await;
    let mut feed = ReferralFeed::new(&app).await;
    let world = World::build(&app, &mut feed).await;

    // The audited read: the address goes to its reader, and nowhere else.
    let read = app
        .client
        .clone()
        .get_shelter(authorized(
            pb::GetShelterRequest {
                shelter_id: world.shelter_id.clone(),
            },
            &operator(),
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(read.address, ADDRESS, "the operator reads the address");
    let audited: Vec<String> = sqlx::query_scalar("SELECT row_to_json(a)::text FROM audit_log a")
        .fetch_all(&app.pool)
        .await
        .unwrap();
    assert!(
        audited.iter().any(|row| row.contains(&world.shelter_id)),
        "the read of the shelter is audited: {audited:?}"
    );

    let mut sweep = Sweep::new(callers());
    sweep_shelter_rpcs(&mut sweep, &app, &world).await;
    let channel = tonic::transport::Endpoint::from_shared(app.endpoint.clone())
        .unwrap()
        .connect()
        .await
        .unwrap();
    sweep.unknown_paths(&channel, permissions::SHELTER).await;
    sweep.print("shelter");

    let mut kernel = Sweep::new(kernel_callers());
    sweep_kernel_rpcs(&mut kernel, &app.endpoint, &world.shelter_id).await;
    kernel.unknown_paths(&channel, permissions::AUDIT).await;
    kernel.print("shelter (operator, audit)");

    sweep
        .answers
        .assert_reached("shelter", &[&[Code::Ok][..], &ERROR_CODES[..]].concat());
    kernel.answers.assert_reached(
        "shelter (operator, audit)",
        &[
            Code::Ok,
            Code::InvalidArgument,
            Code::PermissionDenied,
            Code::Unauthenticated,
        ],
    );

    // Let the background work (placement, relay, timers) log what it logs.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let metrics = canary::get(&metrics_url).await;
    assert!(metrics.contains("nrm_grpc"), "metrics are served: {metrics}");
    canary::assert_clean(metrics.as_bytes(), "metrics");
    // The audit trail names who read which shelter, never where it is.
    let audited: Vec<String> = sqlx::query_scalar("SELECT row_to_json(a)::text FROM audit_log a")
        .fetch_all(&app.pool)
        .await
        .unwrap();
    for row in &audited {
        assert!(
            !row.to_lowercase().contains("canarystreet"),
            "an audit entry holds the address: {row}"
        );
    }
    let logs = capture.logs();
    let text = String::from_utf8_lossy(&logs);
    assert!(
        text.contains(&world.shelter_id),
        "the capture saw the shelter service's spans"
    );
    assert!(text.contains("\"span\""), "span fields are in the capture");
    canary::assert_clean(&logs, "logs or spans");
    feed.drop_all().await;
    app.stop().await;
}
