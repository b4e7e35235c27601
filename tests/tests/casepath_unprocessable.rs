//! One bad message never stalls casepath (real NATS, real PostgreSQL, the
//! service in-process with the default retry policy, whose back-off would
//! hold a stream for about 13 s). Commits are published straight onto the
//! context streams, as a newer or a faulty service would write them:
//! - an event of a variant this version does not know (oneof field 999,
//!   hand-encoded) between two good ones: the whole commit parked at its
//!   first failure (never half of it applied), the commits after it go on;
//! - an event whose required ID is malformed: parked at its first failure
//!   (attempts 1), and the good commit after it is on the path promptly;
//! - a malformed optional link (a case from abroad's return ID): the case
//!   opens, unlinked;
//! - a return naming its case in upper case and braces: linked to the
//!   case, as if typed canonically.

#![allow(clippy::unwrap_used)] // Test code: a failed unwrap is a failed test.

use std::time::Duration;

use nrm_casepath::domain::steps::{IDENTIFICATION_PAYLOAD, REPATRIATION_PAYLOAD};
use nrm_e2e::casepath::{Caller, CasepathApp, agency_of, casepath_settings, kinds};
use nrm_e2e::{authorized, token};
use nrm_kernel::auth::Role;
use nrm_kernel::bus::Bus;
use nrm_proto::casepath::v1 as cp;
use nrm_proto::common::v1 as common;
use nrm_proto::common::v1::operator_service_client::OperatorServiceClient;
use nrm_proto::common::v1::{CommittedEvent, EventCommit};
use nrm_proto::identification::v1 as id;
use nrm_proto::repatriation::v1 as rp;
use prost::Message as _;
use uuid::Uuid;

/// Well under the ~13 s a message retried through the back-off holds the
/// stream behind it.
const PROMPTLY: Duration = Duration::from_secs(3);

/// The service and a way to publish onto its context streams.
struct Harness {
    app: CasepathApp,
    bus: Bus,
}

impl Harness {
    async fn start() -> Self {
        let nats = nrm_e2e::settings().common.nats;
        let bus = Bus::connect(&nats).await.unwrap();
        // The services that own them create the streams; here, the test.
        bus.ensure_stream("identification").await.unwrap();
        bus.ensure_stream("repatriation").await.unwrap();
        let app = CasepathApp::spawn_with(casepath_settings(&nats, "kg")).await;
        Self { app, bus }
    }

    /// Publishes a commit of `payloads` onto `context`'s stream under
    /// `{aggregate}-{id}`; returns its stream sequence.
    async fn publish(
        &self,
        context: &str,
        payload_type: &str,
        aggregate: &str,
        id: &str,
        payloads: Vec<Vec<u8>>,
    ) -> u64 {
        let commit = EventCommit {
            commit_id: Uuid::now_v7().to_string(),
            stream_id: format!("{aggregate}-{id}"),
            payload_type: payload_type.to_owned(),
            events: payloads
                .into_iter()
                .enumerate()
                .map(|(i, payload)| CommittedEvent {
                    event_id: Uuid::now_v7().to_string(),
                    version: i as u64 + 1,
                    event_type: String::new(),
                    schema_version: 1,
                    recorded_at: Some(nrm_e2e::casepath::now()),
                    payload,
                })
                .collect(),
        };
        let ack = self
            .app
            .jetstream
            .publish(self.bus.subject(context, aggregate, id), commit.encode_to_vec().into())
            .await
            .unwrap()
            .await
            .unwrap();
        ack.sequence
    }

    async fn parked(&self) -> Vec<common::ParkedItem> {
        OperatorServiceClient::connect(self.app.endpoint.clone())
            .await
            .unwrap()
            .list_parked(authorized(
                common::ListParkedRequest {},
                &token("kg-ops", Role::Operator, "operator-1"),
            ))
            .await
            .unwrap()
            .into_inner()
            .items
    }
}

fn ident(event: id::identification_event::Event) -> Vec<u8> {
    id::IdentificationEvent { event: Some(event) }.encode_to_vec()
}

fn report(case_id: &str, person_id: &str) -> id::PresumedVictimReported {
    id::PresumedVictimReported {
        case_id: case_id.to_owned(),
        person_id: person_id.to_owned(),
        reporting_agency: "kg-mvd".into(),
        competent_authority: "kg-prosecutor".into(),
        reported_at: Some(nrm_e2e::casepath::now()),
        found_country: "kg".into(),
        citizenship: "kg".into(),
        country_of_exploitation: "ru".into(),
        status: id::CaseStatus::Reported as i32,
        ..Default::default()
    }
}

/// A payload of a variant no version here knows (oneof field 999, as a
/// newer service would write one), hand-encoded.
fn unknown_variant() -> Vec<u8> {
    let mut payload = Vec::new();
    prost::encoding::encode_key(999, prost::encoding::WireType::LengthDelimited, &mut payload);
    prost::encoding::encode_varint(2, &mut payload);
    payload.extend_from_slice(&[0x08, 0x01]);
    payload
}

fn coordinator() -> Caller {
    agency_of("kg", Role::Coordinator)
}

#[tokio::test]
async fn an_unknown_event_is_skipped_a_malformed_one_parked_at_once_and_the_commits_after_them_go_on() {
    let h = Harness::start().await;
    let ids = || (Uuid::now_v7().to_string(), Uuid::now_v7().to_string());

    // casepath is following the stream.
    let (case_1, person_1) = ids();
    let pv = id::identification_event::Event::PresumedVictimReported;
    h.publish(
        "identification",
        IDENTIFICATION_PAYLOAD,
        "case",
        &case_1,
        vec![ident(pv(report(&case_1, &person_1)))],
    )
    .await;
    h.app
        .wait_path(&person_1, &coordinator(), |p| !p.steps.is_empty())
        .await;

    // An unknown variant between two good events of one commit.
    let (case_2, person_2) = ids();
    let unknown = h
        .publish(
            "identification",
            IDENTIFICATION_PAYLOAD,
            "case",
            &case_2,
            vec![
                ident(pv(report(&case_2, &person_2))),
                unknown_variant(),
                ident(id::identification_event::Event::ScreeningCompleted(
                    id::ScreeningCompleted {
                        case_id: case_2.clone(),
                        indicators: vec![1],
                        screened_at: Some(nrm_e2e::casepath::now()),
                    },
                )),
            ],
        )
        .await;
    // A required ID that is not one.
    let malformed = h
        .publish(
            "identification",
            IDENTIFICATION_PAYLOAD,
            "case",
            &Uuid::now_v7().to_string(),
            vec![ident(id::identification_event::Event::ScreeningCompleted(
                id::ScreeningCompleted {
                    case_id: "CASE-not-a-uuid".into(),
                    ..Default::default()
                },
            ))],
        )
        .await;
    // A good commit after it, whose optional link (the return) is malformed.
    let (case_3, person_3) = ids();
    h.publish(
        "identification",
        IDENTIFICATION_PAYLOAD,
        "case",
        &case_3,
        vec![ident(id::identification_event::Event::CaseOpenedFromAbroad(
            id::CaseOpenedFromAbroad {
                report: Some(report(&case_3, &person_3)),
                identified_abroad: Some(id::IdentifiedAbroad {
                    from_country: "ru".into(),
                    return_id: "RET-not-a-uuid".into(),
                    handed_over_at: Some(nrm_e2e::casepath::now()),
                    ..Default::default()
                }),
            },
        ))],
    )
    .await;

    // Both on the path promptly: nothing waited behind the bad messages.
    let path_3 = h
        .app
        .wait_path_within(&person_3, &coordinator(), PROMPTLY, |p| !p.steps.is_empty())
        .await;
    assert_eq!(kinds(&path_3), [cp::StepKind::CaseOpenedFromAbroad]);
    // Nothing of the commit with the unknown event: not half of a command.
    let half = h
        .app
        .client
        .clone()
        .get_path(authorized(
            cp::GetPathRequest {
                person_id: person_2.clone(),
            },
            &coordinator().token(),
        ))
        .await;
    assert_eq!(
        half.map(|p| p.into_inner().steps.len()).unwrap_or_else(|s| {
            assert_eq!(s.code(), tonic::Code::NotFound, "{s:?}");
            0
        }),
        0,
        "no step of the commit with the unknown event"
    );
    let return_of_3: Option<Uuid> = sqlx::query_scalar("SELECT return_id FROM cp_cases WHERE case_id = $1::uuid")
        .bind(&case_3)
        .fetch_one(&h.app.pool)
        .await
        .unwrap();
    assert_eq!(return_of_3, None, "a malformed link is stored as absent");

    // Both bad commits are parked, each at its first failure, saying why
    // without repeating what they carried.
    let parked = h.parked().await;
    assert_eq!(parked.len(), 2, "{parked:?}");
    for item in &parked {
        assert_eq!(item.kind, common::ParkedKind::Message as i32);
        assert_eq!(item.owner, "casepath_identification");
        assert_eq!(item.attempts, 1, "{item:?}");
    }
    let of = |sequence: u64| {
        parked
            .iter()
            .find(|i| i.item_id == sequence.to_string())
            .unwrap_or_else(|| panic!("{sequence} not parked: {parked:?}"))
    };
    assert!(of(unknown).last_error.contains("does not know"), "{:?}", of(unknown));
    let item = of(malformed);
    assert!(item.last_error.contains("case_id"), "{}", item.last_error);
    assert!(!item.last_error.contains("CASE-not-a-uuid"), "{}", item.last_error);
    h.app.stop().await;
}

#[tokio::test]
async fn a_return_naming_its_case_in_upper_case_with_braces_is_linked_to_it() {
    let h = Harness::start().await;
    let (case_id, person_id) = (Uuid::now_v7().to_string(), Uuid::now_v7().to_string());
    h.publish(
        "identification",
        IDENTIFICATION_PAYLOAD,
        "case",
        &case_id,
        vec![ident(id::identification_event::Event::PresumedVictimReported(report(
            &case_id, &person_id,
        )))],
    )
    .await;
    let return_id = Uuid::now_v7().to_string();
    let opened = rp::RepatriationEvent {
        event: Some(rp::repatriation_event::Event::ReturnOpened(rp::ReturnOpened {
            return_id: return_id.clone(),
            citizenship: "TJ".into(),
            foreign_reference: format!("{{{}}}", case_id.to_uppercase()),
            opened_by: "kg-iom".into(),
            consulate_agency: "tj-consulate-bishkek".into(),
            ..Default::default()
        })),
    };
    h.publish(
        "repatriation",
        REPATRIATION_PAYLOAD,
        "return",
        &return_id,
        vec![opened.encode_to_vec()],
    )
    .await;
    let path = h
        .app
        .wait_path(&person_id, &coordinator(), |p| {
            kinds(p).contains(&cp::StepKind::ReturnOpened)
        })
        .await;
    assert_eq!(
        kinds(&path),
        [cp::StepKind::Found, cp::StepKind::Reported, cp::StepKind::ReturnOpened]
    );
    let (stored, case): (String, Option<Uuid>) =
        sqlx::query_as("SELECT foreign_reference, foreign_case FROM cp_returns WHERE return_id = $1::uuid")
            .bind(&return_id)
            .fetch_one(&h.app.pool)
            .await
            .unwrap();
    assert_eq!(stored, case_id);
    // The case PostgreSQL derives from the reference, which the path's,
    // the inbox's and the figures' links go by.
    assert_eq!(case.map(|c| c.to_string()), Some(case_id));
    h.app.stop().await;
}
