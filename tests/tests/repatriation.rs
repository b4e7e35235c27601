//! The repatriation service over gRPC, against real NATS and PostgreSQL, in
//! one country at a time: the destination country's return from opening to
//! handover with every step from the consent on crossing sealed; refusals
//! (out of order, bad input, halts too late, other agencies) that write
//! nothing but their audit entry; and the home country's incoming return
//! built once from sealed snapshots fed twice and out of order. (The two
//! countries joined by a leaf link are the integrator's test.)

#![allow(clippy::unwrap_used)] // Test code: a failed unwrap is a failed test.

use std::time::Duration;

use nrm_e2e::repatriation::{CountryKeys, RepatriationApp, repatriation_settings};
use nrm_e2e::{authorized, bad_fields, canary, messages, token};
use nrm_kernel::auth::Role;
use nrm_kernel::ids::ReturnId;
use nrm_kernel::validate::timestamp;
use nrm_proto::common::v1 as common;
use nrm_proto::repatriation::v1 as pb;
use nrm_proto::repatriation::v1::repatriation_service_client::RepatriationServiceClient;
use pb::{ArrivalNeed, HaltReason, ReturnStatus, SharedField};
use tonic::transport::Channel;
use tonic::{Code, Status};
use tonic_types::StatusExt as _;
use uuid::Uuid;

type Client = RepatriationServiceClient<Channel>;

const IOM: &str = "ru-iom";
const CONSULATE: &str = "kg-consulate-moscow";

fn iom() -> String {
    token(IOM, Role::Iom, "iom-officer-1")
}

fn consulate() -> String {
    token(CONSULATE, Role::Consulate, "consul-1")
}

fn rid() -> String {
    Uuid::now_v7().to_string()
}

fn now() -> prost_types::Timestamp {
    timestamp(chrono::Utc::now())
}

fn in_days(days: i64) -> prost_types::Timestamp {
    timestamp(chrono::Utc::now() + chrono::Duration::days(days))
}

fn reason(status: &Status) -> String {
    assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}");
    status
        .get_details_precondition_failure()
        .expect("precondition details")
        .violations[0]
        .r#type
        .clone()
}

fn open_request(citizenship: &str) -> pb::OpenReturnRequest {
    pb::OpenReturnRequest {
        request_id: rid(),
        citizenship: citizenship.into(),
        identifiers: Some(canary::identifiers()),
        gender: common::Gender::Female as i32,
        age_band: common::AgeBand::AgeBand1824 as i32,
        form_of_exploitation: "EXPLOITATION_FORM_LABOUR".into(),
        country_of_exploitation: "RU".into(),
        foreign_reference: "RU-MVD-2026/118".into(),
        identified_by: "ru-mvd".into(),
        consulate_agency: CONSULATE.into(),
    }
}

/// A return being walked through its steps: its ID and the version last answered.
struct Walk {
    id: String,
    version: u64,
}

impl Walk {
    /// Opens a return for a Kyrgyz citizen (the canary person) as IOM.
    async fn open(c: &mut Client) -> Self {
        let opened = c
            .open_return(authorized(open_request("KG"), &iom()))
            .await
            .unwrap()
            .into_inner();
        let result = opened.result.unwrap();
        assert_eq!(result.aggregate_id, opened.return_id);
        assert_eq!(result.version, 1);
        Self {
            id: opened.return_id,
            version: 1,
        }
    }

    fn took(&mut self, answer: Result<tonic::Response<common::CommandResult>, Status>) -> Result<u64, Status> {
        let result = answer?.into_inner();
        assert_eq!(result.aggregate_id, self.id);
        self.version = result.version;
        Ok(result.version)
    }

    async fn consent(&mut self, c: &mut Client, by: &str, shared: &[SharedField]) -> Result<u64, Status> {
        let req = pb::RecordReturnConsentRequest {
            request_id: rid(),
            return_id: self.id.clone(),
            expected_version: self.version,
            informed_consent_to_return: true,
            shared_fields: shared.iter().map(|f| *f as i32).collect(),
            consent_to_reintegration_referral: true,
            attested_by: "iom-officer-1".into(),
            consent_form_ref: "FORM-2026-7".into(),
        };
        let answer = c.record_return_consent(authorized(req, by)).await;
        self.took(answer)
    }

    async fn risk(&mut self, c: &mut Client, safe: bool, needs: &[ArrivalNeed]) -> Result<u64, Status> {
        let interpreting = needs.contains(&ArrivalNeed::Interpretation);
        let req = pb::RecordRiskAssessmentRequest {
            request_id: rid(),
            return_id: self.id.clone(),
            expected_version: self.version,
            safe_to_return: safe,
            family_involvement: pb::FamilyInvolvement::Suspected as i32,
            needs: needs.iter().map(|n| *n as i32).collect(),
            interpretation_language: if interpreting { "ky".into() } else { String::new() },
        };
        let answer = c.record_risk_assessment(authorized(req, &iom())).await;
        self.took(answer)
    }

    async fn request_document(&mut self, c: &mut Client) -> Result<u64, Status> {
        let req = pb::RequestTravelDocumentRequest {
            request_id: rid(),
            return_id: self.id.clone(),
            expected_version: self.version,
        };
        let answer = c.request_travel_document(authorized(req, &iom())).await;
        self.took(answer)
    }

    async fn document(&mut self, c: &mut Client, issued: bool) -> Result<u64, Status> {
        let req = pb::RecordTravelDocumentRequest {
            request_id: rid(),
            return_id: self.id.clone(),
            expected_version: self.version,
            issued,
            document_number: if issued { canary::PASSPORT.into() } else { String::new() },
            valid_until: issued.then(|| in_days(30)),
        };
        let answer = c.record_travel_document(authorized(req, &consulate())).await;
        self.took(answer)
    }

    async fn book(&mut self, c: &mut Client) -> Result<u64, Status> {
        let req = pb::BookItineraryRequest {
            request_id: rid(),
            return_id: self.id.clone(),
            expected_version: self.version,
            departure_at: Some(in_days(2)),
            arrival_at: Some(timestamp(
                chrono::Utc::now() + chrono::Duration::days(2) + chrono::Duration::hours(4),
            )),
            carrier: "KC 210".into(),
            arrival_point_kind: pb::ArrivalPointKind::Airport as i32,
            arrival_point: "FRU".into(),
        };
        let answer = c.book_itinerary(authorized(req, &iom())).await;
        self.took(answer)
    }

    async fn escort(&mut self, c: &mut Client) -> Result<u64, Status> {
        let req = pb::AssignEscortRequest {
            request_id: rid(),
            return_id: self.id.clone(),
            expected_version: self.version,
            escort_officer: "escort-3".into(),
            escort_agency: IOM.into(),
        };
        let answer = c.assign_escort(authorized(req, &iom())).await;
        self.took(answer)
    }

    async fn depart(&mut self, c: &mut Client) -> Result<u64, Status> {
        let req = pb::RecordDepartureRequest {
            request_id: rid(),
            return_id: self.id.clone(),
            expected_version: self.version,
            departed_at: Some(now()),
        };
        let answer = c.record_departure(authorized(req, &iom())).await;
        self.took(answer)
    }

    async fn arrive(&mut self, c: &mut Client) -> Result<u64, Status> {
        let req = pb::RecordArrivalRequest {
            request_id: rid(),
            return_id: self.id.clone(),
            expected_version: self.version,
            arrived_at: Some(now()),
        };
        let answer = c.record_arrival(authorized(req, &iom())).await;
        self.took(answer)
    }

    async fn hand_over(&mut self, c: &mut Client) -> Result<u64, Status> {
        let req = pb::RecordHandoverRequest {
            request_id: rid(),
            return_id: self.id.clone(),
            expected_version: self.version,
            handed_over_at: Some(now()),
            received_by: "kg-iom".into(),
        };
        let answer = c.record_handover(authorized(req, &iom())).await;
        self.took(answer)
    }

    async fn halt(&mut self, c: &mut Client, by: &str, why: HaltReason) -> Result<u64, Status> {
        let req = pb::HaltReturnRequest {
            request_id: rid(),
            return_id: self.id.clone(),
            expected_version: self.version,
            reason: why as i32,
        };
        let answer = c.halt_return(authorized(req, by)).await;
        self.took(answer)
    }

    async fn get(&self, c: &mut Client, by: &str) -> Result<pb::Return, Status> {
        let req = pb::GetReturnRequest {
            return_id: self.id.clone(),
        };
        c.get_return(authorized(req, by)).await.map(tonic::Response::into_inner)
    }
}

/// Walks a new return up to a booked itinerary, consented with `shared`,
/// assessed safe with `needs`.
async fn booked(c: &mut Client, shared: &[SharedField], needs: &[ArrivalNeed]) -> Walk {
    let mut r = Walk::open(c).await;
    r.consent(c, &iom(), shared).await.unwrap();
    r.risk(c, true, needs).await.unwrap();
    r.request_document(c).await.unwrap();
    r.document(c, true).await.unwrap();
    r.book(c).await.unwrap();
    r
}

fn identifiers(view: &pb::Return) -> Option<&common::PersonalIdentifiers> {
    match view.personal_data.as_ref()?.view.as_ref()? {
        common::personal_data_view::View::Identifiers(ids) => Some(ids),
        _ => None,
    }
}

fn withheld(view: &pb::Return) -> Option<String> {
    match view.personal_data.as_ref()?.view.as_ref()? {
        common::personal_data_view::View::Withheld(w) => Some(w.reason.clone()),
        _ => None,
    }
}

/// Every event payload in the service's store holds no canary.
async fn assert_store_clean(pool: &sqlx::PgPool) {
    let payloads: Vec<Vec<u8>> = sqlx::query_scalar("SELECT payload FROM events")
        .fetch_all(pool)
        .await
        .unwrap();
    assert!(!payloads.is_empty());
    for payload in payloads {
        canary::assert_clean(&payload, "an event in the store");
    }
}

/// Every message of `stream` holds no canary, in its body, headers or subject.
async fn assert_stream_clean(app: &RepatriationApp, stream: &str) -> usize {
    let all = messages(&app.jetstream, stream).await;
    for m in &all {
        canary::assert_clean(&m.payload, "a published message");
        canary::assert_clean(format!("{:?}", m.headers).as_bytes(), "a message's headers");
        canary::assert_clean(m.subject.as_bytes(), "a subject");
    }
    all.len()
}

#[tokio::test]
async fn a_return_walks_every_step_and_each_one_from_the_consent_crosses_sealed_for_the_home_country() {
    let (ru, kg) = (CountryKeys::generate("ru"), CountryKeys::generate("kg"));
    let app = RepatriationApp::spawn_with(repatriation_settings(&ru, &[&kg])).await;
    let mut c = app.client.clone();
    let mut r = Walk::open(&mut c).await;
    assert!(
        app.crossings(&kg, &r.id).await.is_empty(),
        "nothing crosses before the consent"
    );
    r.consent(
        &mut c,
        &iom(),
        &[SharedField::Identity, SharedField::Profile, SharedField::Needs],
    )
    .await
    .unwrap();
    r.risk(&mut c, true, &[ArrivalNeed::Shelter, ArrivalNeed::Escort])
        .await
        .unwrap();
    r.request_document(&mut c).await.unwrap();
    r.document(&mut c, true).await.unwrap();
    r.book(&mut c).await.unwrap();
    r.escort(&mut c).await.unwrap();
    r.depart(&mut c).await.unwrap();
    r.arrive(&mut c).await.unwrap();
    assert_eq!(r.hand_over(&mut c).await.unwrap(), 10);

    let crossings = app.crossings(&kg, &r.id).await;
    assert_eq!(crossings.len(), 9, "one crossing message per step from the consent on");
    let statuses: Vec<i32> = crossings.iter().map(|(_, s)| s.status).collect();
    assert_eq!(
        statuses,
        [
            ReturnStatus::Consented,
            ReturnStatus::Assessed,
            ReturnStatus::DocumentRequested,
            ReturnStatus::DocumentIssued,
            ReturnStatus::ItineraryBooked,
            ReturnStatus::EscortAssigned,
            ReturnStatus::Departed,
            ReturnStatus::Arrived,
            ReturnStatus::HandedOver,
        ]
        .map(|s| s as i32)
    );
    for (i, (commit, snapshot)) in crossings.iter().enumerate() {
        let n = u64::try_from(i).unwrap();
        assert_eq!(commit.stream_id, format!("xborder-kg-{}", r.id));
        assert_eq!(
            commit.events[0].version,
            n + 1,
            "the crossing stream counts the messages"
        );
        assert_eq!(snapshot.origin_version, n + 2);
        assert_eq!(snapshot.steps.len(), i + 2, "every step so far");
        assert_eq!(
            (snapshot.from_country.as_str(), snapshot.to_country.as_str()),
            ("ru", "kg")
        );
    }
    let (_, last) = crossings.last().unwrap();
    let ids = last.identifiers.as_ref().expect("the identity crossed");
    assert_eq!(ids.full_name, canary::NAME);
    assert_eq!(ids.date_of_birth, canary::DATE_OF_BIRTH);
    let kinds: Vec<i32> = ids.documents.iter().map(|d| d.r#type).collect();
    assert_eq!(
        kinds,
        [
            common::DocumentType::Passport as i32,
            common::DocumentType::CertificateOfReturn as i32
        ]
    );
    assert!(
        ids.phone.is_empty() && ids.address.is_empty(),
        "the contact was not consented"
    );
    assert_eq!(last.gender, common::Gender::Female as i32);
    assert_eq!(last.needs, [ArrivalNeed::Shelter as i32, ArrivalNeed::Escort as i32]);
    assert!(!last.risk_shared && !last.safe_to_return, "the risk was not consented");
    assert_eq!(
        (last.arrival_point.as_str(), last.received_by.as_str()),
        ("FRU", "kg-iom")
    );
    assert_eq!(last.steps[0].step, "ReturnOpened");
    assert_eq!(last.steps[9].step, "ReturnHandedOver");

    // Both sides see the same step history: the destination's own view.
    let view = r.get(&mut c, &iom()).await.unwrap();
    assert_eq!(view.steps, last.steps);
    assert_eq!(view.status, ReturnStatus::HandedOver as i32);
    assert_eq!(identifiers(&view).unwrap().full_name, canary::NAME);
    let reads: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM audit_log WHERE action = 'ReadPersonalData' AND subject_id = $1 AND agency = $2",
    )
    .bind(&r.id)
    .bind(IOM)
    .fetch_one(&app.pool)
    .await
    .unwrap();
    assert_eq!(reads, 1, "the read of the identifiers is audited");

    // Sealed: no identifier in the clear, in the store or on the bus.
    assert_store_clean(&app.pool).await;
    assert!(assert_stream_clean(&app, &app.stream_name()).await >= 19);
    // The outgoing stream for kg holds exactly the crossing messages.
    let outgoing = app.bus.outbound_stream_name(&kg.code);
    let mut held = Vec::new();
    for _ in 0..400 {
        held = messages(&app.jetstream, &outgoing).await;
        if held.len() >= 9 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert_eq!(held.len(), 9, "{outgoing} sources the crossing messages for kg");
    let subject = app.bus.outbound_subject(&kg.code, &r.id);
    assert!(held.iter().all(|m| m.subject.as_str() == subject));
    app.stop(&[&kg]).await;
}

#[tokio::test]
async fn steps_out_of_order_are_refused_and_write_nothing_but_their_audit_entry() {
    let (ru, kg) = (CountryKeys::generate("ru"), CountryKeys::generate("kg"));
    let app = RepatriationApp::spawn_with(repatriation_settings(&ru, &[&kg])).await;
    let tables = app.tables(&[&kg]);
    let mut c = app.client.clone();
    let mut r = Walk::open(&mut c).await;
    let before = tables.snapshot().await;
    for (step, answer) in [
        ("assessment", r.risk(&mut c, true, &[]).await),
        ("document request", r.request_document(&mut c).await),
        ("document", r.document(&mut c, true).await),
        ("itinerary", r.book(&mut c).await),
        ("escort", r.escort(&mut c).await),
        ("departure", r.depart(&mut c).await),
        ("arrival", r.arrive(&mut c).await),
        ("handover", r.hand_over(&mut c).await),
    ] {
        let status = answer.expect_err(step);
        assert_eq!(reason(&status), "STEP_OUT_OF_ORDER", "{step}");
        assert!(status.message().contains("OPENED"), "{step}: {status:?}");
    }
    tables
        .assert_changed_only_since(&before, &["audit_log"], "steps out of order")
        .await;
    // A stale version is ABORTED, and not even audited.
    r.version = 7;
    let before = tables.snapshot().await;
    let status = r.consent(&mut c, &iom(), &[]).await.unwrap_err();
    assert_eq!(status.code(), Code::Aborted, "{status:?}");
    tables
        .assert_unchanged_since(&before, "a consent at a stale version")
        .await;
    r.version = 1;
    r.consent(&mut c, &iom(), &[]).await.unwrap();

    // The escort the assessment asked for comes before departure.
    let mut escorted = booked(&mut c, &[], &[ArrivalNeed::Escort]).await;
    let before = tables.snapshot().await;
    let status = escorted.depart(&mut c).await.unwrap_err();
    assert_eq!(reason(&status), "ESCORT_REQUIRED");
    tables
        .assert_changed_only_since(&before, &["audit_log"], "a departure without the escort")
        .await;
    escorted.escort(&mut c).await.unwrap();
    escorted.depart(&mut c).await.unwrap();
    // Without the need, the escort is optional.
    let mut plain = booked(&mut c, &[], &[ArrivalNeed::Medical]).await;
    plain.depart(&mut c).await.unwrap();
    app.stop(&[&kg]).await;
}

#[tokio::test]
async fn bad_input_names_the_fields_and_writes_nothing() {
    let (ru, kg) = (CountryKeys::generate("ru"), CountryKeys::generate("kg"));
    let app = RepatriationApp::spawn_with(repatriation_settings(&ru, &[&kg])).await;
    let tables = app.tables(&[&kg]);
    let mut c = app.client.clone();
    let mut r = Walk::open(&mut c).await;
    let before = tables.snapshot().await;

    let bad = pb::OpenReturnRequest {
        identifiers: Some(common::PersonalIdentifiers {
            full_name: String::new(),
            date_of_birth: canary::NAME.into(),
            phone: canary::ADDRESS.into(),
            ..canary::identifiers()
        }),
        form_of_exploitation: canary::CODED_NAME.into(),
        foreign_reference: canary::NAME.into(),
        consulate_agency: String::new(),
        citizenship: "Kyrgyzstan".into(),
        ..open_request("KG")
    };
    let status = c.open_return(authorized(bad, &iom())).await.unwrap_err();
    assert_eq!(
        bad_fields(&status),
        [
            "citizenship",
            "identifiers.full_name",
            "identifiers.date_of_birth",
            "identifiers.phone",
            "form_of_exploitation",
            "foreign_reference",
            "consulate_agency"
        ]
    );
    canary::assert_clean(format!("{status:?}").as_bytes(), "an INVALID_ARGUMENT answer");
    let without = pb::OpenReturnRequest {
        identifiers: None,
        ..open_request("KG")
    };
    let status = c.open_return(authorized(without, &iom())).await.unwrap_err();
    assert_eq!(bad_fields(&status), ["identifiers"]);

    let unsure = pb::RecordReturnConsentRequest {
        request_id: rid(),
        return_id: r.id.clone(),
        expected_version: 1,
        informed_consent_to_return: false,
        shared_fields: vec![SharedField::Identity as i32, 42],
        consent_to_reintegration_referral: false,
        attested_by: canary::NAME.into(),
        consent_form_ref: String::new(),
    };
    let status = c.record_return_consent(authorized(unsure, &iom())).await.unwrap_err();
    assert_eq!(
        bad_fields(&status),
        [
            "informed_consent_to_return",
            "shared_fields[1]",
            "attested_by",
            "consent_form_ref"
        ]
    );
    let backwards = pb::BookItineraryRequest {
        request_id: rid(),
        return_id: "not-a-return".into(),
        expected_version: 0,
        departure_at: Some(in_days(3)),
        arrival_at: Some(in_days(2)),
        carrier: "KC 210".into(),
        arrival_point_kind: pb::ArrivalPointKind::BorderPost as i32,
        arrival_point: "KG DOSTUK!".into(),
    };
    let status = c.book_itinerary(authorized(backwards, &iom())).await.unwrap_err();
    assert_eq!(
        bad_fields(&status),
        ["return_id", "expected_version", "arrival_at", "arrival_point"]
    );
    let get = pb::GetReturnRequest {
        return_id: canary::NAME.into(),
    };
    let status = c.get_return(authorized(get, &iom())).await.unwrap_err();
    assert_eq!(bad_fields(&status), ["return_id"]);
    tables.assert_unchanged_since(&before, "requests with bad fields").await;

    // A citizenship that is no partner, or this very country: refused, audited.
    for country in ["TJ", "ru"] {
        let status = c
            .open_return(authorized(open_request(country), &iom()))
            .await
            .unwrap_err();
        assert_eq!(reason(&status), "UNKNOWN_PARTNER", "{country}");
    }
    tables
        .assert_changed_only_since(&before, &["audit_log"], "returns to countries that are no partners")
        .await;
    // The valid consent still goes through afterwards.
    r.consent(&mut c, &iom(), &[]).await.unwrap();
    app.stop(&[&kg]).await;
}

#[tokio::test]
async fn a_return_halts_at_any_step_before_departure_and_not_after() {
    let (ru, kg) = (CountryKeys::generate("ru"), CountryKeys::generate("kg"));
    let app = RepatriationApp::spawn_with(repatriation_settings(&ru, &[&kg])).await;
    let tables = app.tables(&[&kg]);
    let mut c = app.client.clone();
    let everything = [
        SharedField::Identity,
        SharedField::Contact,
        SharedField::Profile,
        SharedField::Needs,
        SharedField::Risk,
    ];

    // The person withdraws: the return halts and the last message says only that.
    let mut withdrawn = Walk::open(&mut c).await;
    withdrawn.consent(&mut c, &iom(), &everything).await.unwrap();
    withdrawn.risk(&mut c, true, &[ArrivalNeed::Medical]).await.unwrap();
    withdrawn
        .halt(&mut c, &consulate(), HaltReason::ConsentWithdrawn)
        .await
        .unwrap();
    let crossings = app.crossings(&kg, &withdrawn.id).await;
    assert_eq!(crossings.len(), 3);
    assert!(crossings[1].1.identifiers.is_some(), "shared while consented");
    let last = &crossings[2].1;
    assert_eq!(last.status, ReturnStatus::Halted as i32);
    assert_eq!(last.halt_reason, HaltReason::ConsentWithdrawn as i32);
    assert_eq!(
        (
            last.identifiers.as_ref(),
            last.shared_fields.len(),
            last.gender,
            last.needs.len()
        ),
        (None, 0, 0, 0),
        "no personal field after the withdrawal"
    );
    assert!(last.form_of_exploitation.is_empty() && !last.risk_shared && last.interpretation_language.is_empty());
    assert_eq!(last.steps.len(), 4);
    let before = tables.snapshot().await;
    assert_eq!(
        reason(&withdrawn.request_document(&mut c).await.unwrap_err()),
        "FINISHED"
    );
    assert_eq!(
        reason(
            &withdrawn
                .halt(&mut c, &iom(), HaltReason::PersonUnavailable)
                .await
                .unwrap_err()
        ),
        "FINISHED"
    );
    tables
        .assert_changed_only_since(&before, &["audit_log"], "steps of a halted return")
        .await;

    // Halting at the last step before departure, and never after it.
    let mut late = booked(&mut c, &[], &[]).await;
    late.depart(&mut c).await.unwrap();
    for _ in 0..2 {
        let before = tables.snapshot().await;
        assert_eq!(
            reason(
                &late
                    .halt(&mut c, &iom(), HaltReason::PersonUnavailable)
                    .await
                    .unwrap_err()
            ),
            "ALREADY_DEPARTED"
        );
        tables
            .assert_changed_only_since(&before, &["audit_log"], "a halt after departure")
            .await;
        if late.version == 7 {
            late.arrive(&mut c).await.unwrap();
        }
    }
    assert_eq!(late.version, 8);
    let mut just_booked = booked(&mut c, &[], &[]).await;
    just_booked
        .halt(&mut c, &iom(), HaltReason::PersonUnavailable)
        .await
        .unwrap();
    let view = just_booked.get(&mut c, &iom()).await.unwrap();
    assert_eq!(view.status, ReturnStatus::Halted as i32);
    assert_eq!(view.halt_reason, HaltReason::PersonUnavailable as i32);

    // The coordinator may halt; before the consent nothing crosses.
    let mut early = Walk::open(&mut c).await;
    early
        .halt(
            &mut c,
            &token("ru-coordinator", Role::Coordinator, "coord-1"),
            HaltReason::PersonUnavailable,
        )
        .await
        .unwrap();
    assert!(app.crossings(&kg, &early.id).await.is_empty());

    // Not safe to return, or the document refused: halted in the same command.
    let mut unsafe_return = Walk::open(&mut c).await;
    unsafe_return
        .consent(&mut c, &iom(), &[SharedField::Risk])
        .await
        .unwrap();
    assert_eq!(unsafe_return.risk(&mut c, false, &[]).await.unwrap(), 4);
    let view = unsafe_return.get(&mut c, &iom()).await.unwrap();
    assert_eq!(
        (view.status, view.halt_reason),
        (ReturnStatus::Halted as i32, HaltReason::RiskFound as i32)
    );
    let last = app.crossings(&kg, &unsafe_return.id).await.pop().unwrap().1;
    assert!(last.risk_shared && !last.safe_to_return);
    assert_eq!(last.halt_reason, HaltReason::RiskFound as i32);
    let mut refused = Walk::open(&mut c).await;
    refused.consent(&mut c, &iom(), &[]).await.unwrap();
    refused.risk(&mut c, true, &[]).await.unwrap();
    refused.request_document(&mut c).await.unwrap();
    refused.document(&mut c, false).await.unwrap();
    let view = refused.get(&mut c, &consulate()).await.unwrap();
    assert_eq!(
        (view.status, view.halt_reason),
        (ReturnStatus::Halted as i32, HaltReason::DocumentRefused as i32)
    );
    app.stop(&[&kg]).await;
}

#[tokio::test]
async fn another_agency_can_neither_read_nor_command_a_return() {
    let (ru, kg) = (CountryKeys::generate("ru"), CountryKeys::generate("kg"));
    let app = RepatriationApp::spawn_with(repatriation_settings(&ru, &[&kg])).await;
    let tables = app.tables(&[&kg]);
    let mut c = app.client.clone();
    let mut r = Walk::open(&mut c).await;
    // Both holders act: the consulate takes the consent.
    r.consent(&mut c, &consulate(), &[SharedField::Identity]).await.unwrap();
    let before = tables.snapshot().await;

    let other_iom = token("ru-iom-kazan", Role::Iom, "iom-9");
    let other_consulate = token("tj-consulate-moscow", Role::Consulate, "consul-9");
    let msd = token("ru-msd", Role::Msd, "msd-1");
    for (who, caller) in [
        ("another IOM office", &other_iom),
        ("another consulate", &other_consulate),
        ("MSD", &msd),
    ] {
        let status = r.get(&mut c, caller).await.unwrap_err();
        assert_eq!(status.code(), Code::PermissionDenied, "{who} reads: {status:?}");
        let listed = c
            .list_returns(authorized(pb::ListReturnsRequest::default(), caller))
            .await
            .unwrap()
            .into_inner();
        assert!(listed.returns.is_empty(), "{who} lists {:?}", listed.returns);
    }
    let mut stranger = Walk {
        id: r.id.clone(),
        version: r.version,
    };
    for (who, caller) in [
        ("another IOM office", &other_iom),
        ("another consulate", &other_consulate),
    ] {
        let status = stranger
            .halt(&mut c, caller, HaltReason::PersonUnavailable)
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::PermissionDenied, "{who} halts: {status:?}");
        let status = stranger.consent(&mut c, caller, &[]).await.unwrap_err();
        assert_eq!(
            status.code(),
            Code::PermissionDenied,
            "{who} takes a consent: {status:?}"
        );
    }
    // The roles the matrix leaves out are refused by the gate.
    let police = token("ru-mvd", Role::Police, "police-1");
    assert_eq!(r.get(&mut c, &police).await.unwrap_err().code(), Code::PermissionDenied);
    let consulate_assessing = pb::RecordRiskAssessmentRequest {
        request_id: rid(),
        return_id: r.id.clone(),
        expected_version: r.version,
        safe_to_return: true,
        family_involvement: pb::FamilyInvolvement::None as i32,
        needs: Vec::new(),
        interpretation_language: String::new(),
    };
    let status = c
        .record_risk_assessment(authorized(consulate_assessing, &consulate()))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied);
    tables
        .assert_changed_only_since(&before, &["audit_log"], "callers that do not hold the return")
        .await;
    // The holders go on.
    r.risk(&mut c, true, &[]).await.unwrap();
    r.request_document(&mut c).await.unwrap();
    let before = tables.snapshot().await;
    let iom_issuing = pb::RecordTravelDocumentRequest {
        request_id: rid(),
        return_id: r.id.clone(),
        expected_version: r.version,
        issued: false,
        document_number: String::new(),
        valid_until: None,
    };
    let status = c
        .record_travel_document(authorized(iom_issuing, &iom()))
        .await
        .unwrap_err();
    assert_eq!(
        status.code(),
        Code::PermissionDenied,
        "only the consulate answers for the document"
    );
    tables
        .assert_changed_only_since(&before, &["audit_log"], "IOM answering for the consulate")
        .await;

    // The holders read the identifiers; the coordinator the coded return only.
    let held = r.get(&mut c, &consulate()).await.unwrap();
    assert_eq!(identifiers(&held).unwrap().full_name, canary::NAME);
    assert_eq!(held.consulate_agency, CONSULATE);
    let coordinator = token("ru-coordinator", Role::Coordinator, "coord-1");
    let coded = r.get(&mut c, &coordinator).await.unwrap();
    assert_eq!(withheld(&coded).as_deref(), Some("NO_ACCESS"));
    assert_eq!(coded.status, ReturnStatus::DocumentRequested as i32);
    for caller in [iom(), consulate(), coordinator] {
        let mut listed = Vec::new();
        for _ in 0..200 {
            listed = c
                .list_returns(authorized(pb::ListReturnsRequest::default(), &caller))
                .await
                .unwrap()
                .into_inner()
                .returns;
            if listed.first().is_some_and(|s| s.version == r.version) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert_eq!(listed.len(), 1);
        assert_eq!(listed[0].return_id, r.id);
        assert_eq!(listed[0].direction, pb::Direction::Outgoing as i32);
    }
    app.stop(&[&kg]).await;
}

/// A snapshot of return `id` as `ru` would send it at `origin_version`.
fn snapshot(id: &str, origin_version: u64, status: ReturnStatus, personal: bool) -> pb::CrossBorderReturn {
    let steps = (1..=origin_version)
        .map(|v| pb::Step {
            step: if v == 1 {
                "ReturnOpened".into()
            } else {
                format!("Step{v}")
            },
            status_after: i32::try_from(v.min(10)).unwrap(),
            at: Some(now()),
            agency: IOM.into(),
            origin_version: v,
        })
        .collect();
    pb::CrossBorderReturn {
        return_id: id.into(),
        from_country: "ru".into(),
        to_country: "kg".into(),
        status: status as i32,
        origin_version,
        shared_fields: if personal {
            vec![SharedField::Identity as i32, SharedField::Needs as i32]
        } else {
            Vec::new()
        },
        identifiers: personal.then(|| common::PersonalIdentifiers {
            phone: String::new(),
            address: String::new(),
            ..canary::identifiers()
        }),
        needs: if personal {
            vec![ArrivalNeed::Shelter as i32]
        } else {
            Vec::new()
        },
        arrival_point: "FRU".into(),
        foreign_reference: "RU-MVD-2026/118".into(),
        steps,
        ..Default::default()
    }
}

async fn events_of(app: &RepatriationApp, id: &str) -> Vec<String> {
    sqlx::query_scalar("SELECT event_type FROM events WHERE stream_id = $1 ORDER BY version")
        .bind(format!("return-{id}"))
        .fetch_all(&app.pool)
        .await
        .unwrap()
}

#[tokio::test]
async fn the_home_country_builds_an_incoming_return_once_from_the_newest_snapshot() {
    let (ru, kg) = (CountryKeys::generate("ru"), CountryKeys::generate("kg"));
    let mut settings = repatriation_settings(&kg, &[&ru]);
    // A message that will never open is parked after two quick attempts.
    settings.common.retry = nrm_kernel::retry::RetryPolicy {
        attempts: 2,
        first_ms: 10,
        max_ms: 50,
    };
    RepatriationApp::prepare_inbound(&settings, &ru).await;
    let home = RepatriationApp::spawn_with(settings).await;
    let tables = home.tables(&[&ru]);
    let here = kg.key.public().clone();
    let (a, b, w) = (
        ReturnId::new().to_string(),
        ReturnId::new().to_string(),
        ReturnId::new().to_string(),
    );
    let a1 = snapshot(&a, 2, ReturnStatus::Consented, true);
    let a2 = snapshot(&a, 6, ReturnStatus::ItineraryBooked, true);
    // Each twice, the older one again after the newer.
    for (version, s) in [(1, &a1), (2, &a2), (1, &a1), (2, &a2)] {
        home.publish_crossing(&ru, &here, version, s).await;
    }
    // The newer first: the older one adds nothing.
    let b1 = snapshot(&b, 2, ReturnStatus::Consented, false);
    let b2 = snapshot(&b, 3, ReturnStatus::Assessed, false);
    home.publish_crossing(&ru, &here, 2, &b2).await;
    home.publish_crossing(&ru, &here, 1, &b1).await;
    // Shared, then withdrawn.
    let w1 = snapshot(&w, 3, ReturnStatus::Assessed, true);
    let mut w2 = snapshot(&w, 4, ReturnStatus::Halted, false);
    w2.halt_reason = HaltReason::ConsentWithdrawn as i32;
    home.publish_crossing(&ru, &here, 1, &w1).await;
    home.publish_crossing(&ru, &here, 2, &w2).await;
    // Sealed for another key, and no message at all: parked, nothing stuck behind them.
    let stranger = CountryKeys::generate("kg");
    let x = ReturnId::new().to_string();
    home.publish_crossing(
        &ru,
        stranger.key.public(),
        1,
        &snapshot(&x, 2, ReturnStatus::Consented, true),
    )
    .await;
    let y = ReturnId::new().to_string();
    home.publish_raw(&y, 1, b"not a crossing message".to_vec()).await;
    let z = ReturnId::new().to_string();
    home.publish_crossing(&ru, &here, 1, &snapshot(&z, 2, ReturnStatus::Consented, false))
        .await;
    home.wait_inbound(&ru, 11).await;
    tables.wait_until_quiescent().await;

    assert_eq!(events_of(&home, &a).await, ["ReturnAnnounced", "AnnouncedStepRecorded"]);
    assert_eq!(events_of(&home, &b).await, ["ReturnAnnounced"]);
    assert_eq!(events_of(&home, &w).await, ["ReturnAnnounced", "AnnouncedStepRecorded"]);
    assert_eq!(events_of(&home, &z).await, ["ReturnAnnounced"]);
    assert!(events_of(&home, &x).await.is_empty() && events_of(&home, &y).await.is_empty());
    let parked: Vec<(String, String)> =
        sqlx::query_as("SELECT projection, last_error FROM parked_messages ORDER BY stream_sequence")
            .fetch_all(&home.pool)
            .await
            .unwrap();
    assert_eq!(parked.len(), 2, "{parked:?}");
    for (projection, error) in &parked {
        assert_eq!(projection, "repatriation_inbound_ru");
        canary::assert_clean(error.as_bytes(), "a parked message's error");
    }

    let mut c = home.client.clone();
    let kg_iom = token("kg-iom", Role::Iom, "kg-iom-1");
    let kg_msd = token("kg-msd", Role::Msd, "kg-msd-1");
    let walk_a = Walk {
        id: a.clone(),
        version: 2,
    };
    for caller in [&kg_iom, &kg_msd] {
        let view = walk_a.get(&mut c, caller).await.unwrap();
        assert_eq!(view.direction, pb::Direction::Incoming as i32);
        assert_eq!(view.status, ReturnStatus::ItineraryBooked as i32);
        assert_eq!(view.steps, a2.steps, "the steps as they crossed");
        assert_eq!((view.from_country.as_str(), view.to_country.as_str()), ("ru", "kg"));
        assert_eq!(view.opened_by, IOM);
        assert_eq!(view.needs, [ArrivalNeed::Shelter as i32]);
        assert_eq!(identifiers(&view).unwrap().full_name, canary::NAME);
    }
    let coordinator = token("kg-coordinator", Role::Coordinator, "kg-coord-1");
    let coded = walk_a.get(&mut c, &coordinator).await.unwrap();
    assert_eq!(withheld(&coded).as_deref(), Some("NO_ACCESS"));
    let walk_b = Walk {
        id: b.clone(),
        version: 1,
    };
    let view_b = walk_b.get(&mut c, &kg_iom).await.unwrap();
    assert_eq!((view_b.status, view_b.steps.len()), (ReturnStatus::Assessed as i32, 3));
    assert_eq!(withheld(&view_b).as_deref(), Some("NOT_SHARED"));
    // Withdrawn: halted, why, and what was shared is gone (its key deleted).
    let view_w = Walk {
        id: w.clone(),
        version: 2,
    }
    .get(&mut c, &kg_iom)
    .await
    .unwrap();
    assert_eq!(
        (view_w.status, view_w.halt_reason),
        (ReturnStatus::Halted as i32, HaltReason::ConsentWithdrawn as i32)
    );
    assert_eq!(withheld(&view_w).as_deref(), Some("NOT_SHARED"));
    let keys: i64 = sqlx::query_scalar("SELECT count(*) FROM person_keys")
        .fetch_one(&home.pool)
        .await
        .unwrap();
    assert_eq!(keys, 1, "a's key only: b shared nothing, w's key was deleted");
    // Another consulate, or a shelter, sees nothing of it.
    let outsider = token("kg-consulate-moscow", Role::Consulate, "consul-1");
    assert_eq!(
        walk_a.get(&mut c, &outsider).await.unwrap_err().code(),
        Code::PermissionDenied
    );

    // Read-only here: its steps are recorded in ru.
    let before = tables.snapshot().await;
    let mut walk_a = walk_a;
    let status = walk_a
        .halt(&mut c, &kg_iom, HaltReason::PersonUnavailable)
        .await
        .unwrap_err();
    assert_eq!(reason(&status), "INCOMING_RETURN");
    let status = walk_a.consent(&mut c, &kg_iom, &[]).await.unwrap_err();
    assert_eq!(reason(&status), "INCOMING_RETURN");
    tables
        .assert_changed_only_since(&before, &["audit_log"], "commands on an incoming return")
        .await;

    // The announcements, as MSD lists them.
    let listed = c
        .list_returns(authorized(
            pb::ListReturnsRequest {
                direction: pb::Direction::Incoming as i32,
                ..Default::default()
            },
            &kg_msd,
        ))
        .await
        .unwrap()
        .into_inner();
    let mut ids: Vec<&str> = listed.returns.iter().map(|s| s.return_id.as_str()).collect();
    ids.sort_unstable();
    let mut expected = vec![a.as_str(), b.as_str(), w.as_str(), z.as_str()];
    expected.sort_unstable();
    assert_eq!(ids, expected);
    let listed_a = listed.returns.iter().find(|s| s.return_id == a).unwrap();
    assert_eq!(
        (listed_a.status, listed_a.arrival_point.as_str()),
        (ReturnStatus::ItineraryBooked as i32, "FRU")
    );
    let paged = c
        .list_returns(authorized(
            pb::ListReturnsRequest {
                page_size: 3,
                ..Default::default()
            },
            &kg_iom,
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(paged.returns.len(), 3);
    let rest = c
        .list_returns(authorized(
            pb::ListReturnsRequest {
                page_size: 3,
                page_token: paged.next_page_token.clone(),
                ..Default::default()
            },
            &kg_iom,
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(rest.returns.len(), 1);
    assert!(rest.next_page_token.is_empty());

    // What was shared is sealed again here: no identifier in the clear.
    assert_store_clean(&home.pool).await;
    assert_stream_clean(&home, &home.stream_name()).await;
    home.stop(&[&ru]).await;
}

#[tokio::test]
async fn health_and_reflection_name_the_repatriation_service() {
    use tonic_reflection::pb::v1::ServerReflectionRequest;
    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;

    let (ru, kg) = (CountryKeys::generate("ru"), CountryKeys::generate("kg"));
    let app = RepatriationApp::spawn_with(repatriation_settings(&ru, &[&kg])).await;
    let serving = tonic_health::pb::health_check_response::ServingStatus::Serving as i32;
    let mut status = 0;
    for _ in 0..200 {
        status = nrm_e2e::health(&app.endpoint, nrm_repatriation::startup::SERVICE_NAME).await;
        if status == serving {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(status, serving);
    let channel = Channel::from_shared(app.endpoint.clone())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut client = ServerReflectionClient::new(channel);
    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut responses = client
        .server_reflection_info(futures::stream::iter([request]))
        .await
        .unwrap()
        .into_inner();
    let response = responses.message().await.unwrap().expect("a response");
    let Some(MessageResponse::ListServicesResponse(list)) = response.message_response else {
        panic!("a list of services");
    };
    let mut names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
    names.sort();
    assert_eq!(
        names,
        [
            "grpc.health.v1.Health",
            "grpc.reflection.v1.ServerReflection",
            "grpc.reflection.v1alpha.ServerReflection",
            "nrm.common.v1.AuditService",
            "nrm.common.v1.OperatorService",
            "nrm.repatriation.v1.RepatriationService"
        ]
    );
    app.stop(&[&kg]).await;
}

/// What a call of the sweep was told.
enum Answer {
    /// Past the permission checks (whatever the domain then said); for a
    /// list, whether the world's return was on it; for the identifiers,
    /// whether they were shown.
    Through(Option<bool>),
    Refused(Status),
    /// The sweep's own request was invalid: it proves nothing.
    Invalid(Status),
}

fn answer<T>(result: Result<tonic::Response<T>, Status>) -> Answer {
    match result {
        Ok(_) => Answer::Through(None),
        Err(status) if matches!(status.code(), Code::PermissionDenied | Code::Unauthenticated) => {
            Answer::Refused(status)
        }
        Err(status) if status.code() == Code::InvalidArgument => Answer::Invalid(status),
        Err(_) => Answer::Through(None),
    }
}

/// Calls `row`'s RPC on return `id` (at version 1) as `caller`.
async fn call_row(c: &mut Client, row: &nrm_kernel::permissions::Permission, id: &str, caller: &str) -> Answer {
    let (id, v) = (id.to_owned(), 1);
    match row.method {
        "OpenReturn" => answer(c.open_return(authorized(open_request("KG"), caller)).await),
        "RecordReturnConsent" => answer(
            c.record_return_consent(authorized(
                pb::RecordReturnConsentRequest {
                    request_id: rid(),
                    return_id: id,
                    expected_version: v,
                    informed_consent_to_return: true,
                    shared_fields: Vec::new(),
                    consent_to_reintegration_referral: false,
                    attested_by: "officer-1".into(),
                    consent_form_ref: "F-1".into(),
                },
                caller,
            ))
            .await,
        ),
        "RecordRiskAssessment" => answer(
            c.record_risk_assessment(authorized(
                pb::RecordRiskAssessmentRequest {
                    request_id: rid(),
                    return_id: id,
                    expected_version: v,
                    safe_to_return: true,
                    family_involvement: pb::FamilyInvolvement::None as i32,
                    needs: Vec::new(),
                    interpretation_language: String::new(),
                },
                caller,
            ))
            .await,
        ),
        "RequestTravelDocument" => answer(
            c.request_travel_document(authorized(
                pb::RequestTravelDocumentRequest {
                    request_id: rid(),
                    return_id: id,
                    expected_version: v,
                },
                caller,
            ))
            .await,
        ),
        "RecordTravelDocument" => answer(
            c.record_travel_document(authorized(
                pb::RecordTravelDocumentRequest {
                    request_id: rid(),
                    return_id: id,
                    expected_version: v,
                    issued: true,
                    document_number: "CR 1".into(),
                    valid_until: Some(in_days(30)),
                },
                caller,
            ))
            .await,
        ),
        "BookItinerary" => answer(
            c.book_itinerary(authorized(
                pb::BookItineraryRequest {
                    request_id: rid(),
                    return_id: id,
                    expected_version: v,
                    departure_at: Some(in_days(2)),
                    arrival_at: Some(in_days(3)),
                    carrier: "KC 210".into(),
                    arrival_point_kind: pb::ArrivalPointKind::Airport as i32,
                    arrival_point: "FRU".into(),
                },
                caller,
            ))
            .await,
        ),
        "AssignEscort" => answer(
            c.assign_escort(authorized(
                pb::AssignEscortRequest {
                    request_id: rid(),
                    return_id: id,
                    expected_version: v,
                    escort_officer: "escort-1".into(),
                    escort_agency: IOM.into(),
                },
                caller,
            ))
            .await,
        ),
        "RecordDeparture" => answer(
            c.record_departure(authorized(
                pb::RecordDepartureRequest {
                    request_id: rid(),
                    return_id: id,
                    expected_version: v,
                    departed_at: Some(now()),
                },
                caller,
            ))
            .await,
        ),
        "RecordArrival" => answer(
            c.record_arrival(authorized(
                pb::RecordArrivalRequest {
                    request_id: rid(),
                    return_id: id,
                    expected_version: v,
                    arrived_at: Some(now()),
                },
                caller,
            ))
            .await,
        ),
        "RecordHandover" => answer(
            c.record_handover(authorized(
                pb::RecordHandoverRequest {
                    request_id: rid(),
                    return_id: id,
                    expected_version: v,
                    handed_over_at: Some(now()),
                    received_by: "kg-iom".into(),
                },
                caller,
            ))
            .await,
        ),
        "HaltReturn" => answer(
            c.halt_return(authorized(
                pb::HaltReturnRequest {
                    request_id: rid(),
                    return_id: id,
                    expected_version: v,
                    reason: HaltReason::PersonUnavailable as i32,
                },
                caller,
            ))
            .await,
        ),
        "GetReturn" => {
            let got = c
                .get_return(authorized(pb::GetReturnRequest { return_id: id }, caller))
                .await;
            match (row.part, got) {
                (Some(_), Ok(view)) => Answer::Through(Some(identifiers(view.get_ref()).is_some())),
                (_, got) => answer(got),
            }
        }
        "ListReturns" => {
            let mut page_token = String::new();
            loop {
                let page = c
                    .list_returns(authorized(
                        pb::ListReturnsRequest {
                            page_size: 500,
                            page_token: page_token.clone(),
                            ..Default::default()
                        },
                        caller,
                    ))
                    .await;
                match page {
                    Ok(page) => {
                        let page = page.into_inner();
                        if page.returns.iter().any(|s| s.return_id == id) {
                            return Answer::Through(Some(true));
                        }
                        if page.next_page_token.is_empty() {
                            return Answer::Through(Some(false));
                        }
                        page_token = page.next_page_token;
                    }
                    Err(status) => return answer::<()>(Err(status)),
                }
            }
        }
        other => panic!("the repatriation sweep has no call for {other}: add one"),
    }
}

/// Opens a return in `ru` held by `opener` (IOM) and `consulate`, and
/// waits until the list shows it.
async fn outgoing_world(ru: &RepatriationApp, opener: &str, consulate: &str) -> String {
    let mut c = ru.client.clone();
    let request = pb::OpenReturnRequest {
        consulate_agency: consulate.into(),
        ..open_request("KG")
    };
    let opened = c
        .open_return(authorized(request, &token(opener, Role::Iom, "officer-1")))
        .await
        .unwrap()
        .into_inner();
    let id = opened.return_id;
    let coordinator = token("ru-coordinator", Role::Coordinator, "coord-1");
    for _ in 0..400 {
        let row = nrm_kernel::permissions::find(nrm_kernel::permissions::REPATRIATION, "ListReturns", None).unwrap();
        if matches!(
            call_row(&mut c, row, &id, &coordinator).await,
            Answer::Through(Some(true))
        ) {
            return id;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("return {id} not listed within 10 s");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_repatriation_rpc_as_every_role_in_and_out_of_scope_answers_as_the_matrix_says() {
    use futures::StreamExt as _;
    use nrm_kernel::permissions::{MATRIX, REPATRIATION, Scope};

    let (ru_keys, kg_keys) = (CountryKeys::generate("ru"), CountryKeys::generate("kg"));
    let ru = RepatriationApp::spawn_with(repatriation_settings(&ru_keys, &[&kg_keys])).await;
    // The home country, with one incoming return (the consented scope).
    let kg_settings = repatriation_settings(&kg_keys, &[&ru_keys]);
    RepatriationApp::prepare_inbound(&kg_settings, &ru_keys).await;
    let kg = RepatriationApp::spawn_with(kg_settings).await;
    let incoming = ReturnId::new().to_string();
    kg.publish_crossing(
        &ru_keys,
        kg_keys.key.public(),
        1,
        &snapshot(&incoming, 2, ReturnStatus::Consented, true),
    )
    .await;
    kg.wait_inbound(&ru_keys, 1).await;
    kg.tables(&[&ru_keys]).wait_until_quiescent().await;

    struct Trial {
        row: &'static nrm_kernel::permissions::Permission,
        role: Role,
        scope: Option<Scope>,
        allowed: bool,
    }
    let mut trials = Vec::new();
    for row in MATRIX.iter().filter(|p| p.service == REPATRIATION) {
        for role in Role::ALL {
            match row.scopes(role) {
                None => trials.push(Trial {
                    row,
                    role,
                    scope: None,
                    allowed: false,
                }),
                Some(scopes) => {
                    for scope in scopes {
                        trials.push(Trial {
                            row,
                            role,
                            scope: Some(*scope),
                            allowed: true,
                        });
                    }
                    if !scopes.contains(&Scope::Any) {
                        trials.push(Trial {
                            row,
                            role,
                            scope: None,
                            allowed: false,
                        });
                    }
                }
            }
        }
    }
    let (ru_app, kg_app) = (ru, kg);
    let (ru, kg, incoming) = (&ru_app, &kg_app, &incoming);
    let run = |trial: &'static Trial| async move {
        let u = nrm_e2e::unique();
        let me = format!("{}-{u}", trial.role.as_str().replace('_', "-"));
        let caller = token(&me, trial.role, "officer-1");
        let (app, id) = match trial.scope {
            // An incoming return is the home country's, under the person's consent.
            Some(Scope::Consented) => (kg, incoming.clone()),
            Some(Scope::CaseHolders) if trial.role == Role::Iom => {
                (ru, outgoing_world(ru, &me, &format!("kg-consulate-{u}")).await)
            }
            Some(Scope::CaseHolders) if trial.role == Role::Consulate => {
                (ru, outgoing_world(ru, &format!("ru-iom-{u}"), &me).await)
            }
            _ => (
                ru,
                outgoing_world(ru, &format!("ru-iom-{u}"), &format!("kg-consulate-{u}")).await,
            ),
        };
        let mut c = app.client.clone();
        let got = call_row(&mut c, trial.row, &id, &caller).await;
        let what = format!(
            "{} as {} ({})",
            trial.row.name(),
            trial.role,
            trial.scope.map_or("no scope", Scope::as_str)
        );
        match (trial.allowed, got) {
            (_, Answer::Invalid(status)) => Err(format!("{what}: the sweep sent an invalid request: {status:?}")),
            (true, Answer::Through(None | Some(true))) => Ok(()),
            (true, Answer::Through(Some(false))) => Err(format!("{what}: not listed, or identifiers withheld")),
            (true, Answer::Refused(status)) => Err(format!("{what}: refused, the matrix allows it: {status:?}")),
            (false, Answer::Refused(status)) if status.code() == Code::PermissionDenied => Ok(()),
            (false, Answer::Through(Some(false))) => Ok(()),
            (false, Answer::Refused(status)) => Err(format!("{what}: {status:?}, expected PERMISSION_DENIED")),
            (false, Answer::Through(_)) => Err(format!("{what}: let through, the matrix refuses it")),
        }
    };
    let trials: &'static [Trial] = Vec::leak(trials);
    let failures: Vec<String> = futures::stream::iter(trials.iter())
        .map(run)
        .buffer_unordered(8)
        .filter_map(|r| async move { r.err() })
        .collect()
        .await;
    println!(
        "tried {} (RPC, role, scope) triples over the repatriation rows: {} allowed; {} disagreed",
        trials.len(),
        trials.iter().filter(|t| t.allowed).count(),
        failures.len()
    );
    assert!(
        failures.is_empty(),
        "{} disagreements:\n{}",
        failures.len(),
        failures.join("\n")
    );
    kg_app.stop(&[&ru_keys]).await;
    ru_app.stop(&[&kg_keys]).await;
}
