//! Issue 10 end to end: one return, two countries, real servers. Two
//! nats-servers from deploy/federation (`ru` the hub, `kg` its leaf over
//! TLS, [`Federation`]), the test stack's PostgreSQL, a database of its own
//! for every service of each country. In `ru` the repatriation service
//! (partner kg, kg's public key, ru's private key); in `kg` the
//! repatriation, identification, referral and shelter services (partner
//! ru, kg's private key). Nothing is fed by hand: every message kg acts on
//! crossed the link from ru's relay.
//!
//! - A return run in ru is announced in kg before departure (who, when,
//!   where, what help; only what was consented), a bed is held at home, and
//!   the handover opens one case and one reintegration referral; both sides
//!   end with the same step history; no canary identifier in the clear in
//!   any stream of either server or in any log line.
//! - A halted return is halted on both sides with its coded reason, its bed
//!   released, no case opened; ru refuses further steps (FINISHED), kg any
//!   command (INCOMING_RETURN).
//! - The link is cut (kg's server SIGKILLed) while three returns move on
//!   in ru; when it is back, kg converges by itself, nothing lost, nothing
//!   twice.
//!
//! Waits are bounded polls on positive conditions; "exactly one" is counted
//! only after every runner in kg has applied everything before a later
//! marker (its checkpoint past the last message of its source stream).

#![allow(clippy::unwrap_used)] // Test code: a failed unwrap is a failed test.

use std::collections::BTreeSet;
use std::time::Duration;

use async_nats::jetstream;
use futures::TryStreamExt as _;
use nrm_e2e::canary::{self, assert_clean, capture};
use nrm_e2e::federation::{Federation, Side};
use nrm_e2e::ident::read_case;
use nrm_e2e::repatriation::{CountryKeys, RepatriationApp, repatriation_settings};
use nrm_e2e::{ReferralApp, ShelterApp, TestApp, authorized, messages, person, token};
use nrm_kernel::auth::Role;
use nrm_kernel::validate::timestamp;
use nrm_kernel::xborder::CountryCode;
use nrm_proto::common::v1 as common;
use nrm_proto::identification::v1 as idpb;
use nrm_proto::referral::v1 as rf;
use nrm_proto::repatriation::v1 as pb;
use nrm_proto::repatriation::v1::repatriation_service_client::RepatriationServiceClient;
use nrm_proto::shelter::v1 as sh;
use pb::{ArrivalNeed, HaltReason, ReturnStatus, SharedField};
use prost::Message as _;
use tonic::transport::Channel;
use tonic::{Code, Status};
use tonic_types::StatusExt as _;
use uuid::Uuid;

type Client = RepatriationServiceClient<Channel>;

const RU_IOM: &str = "ru-iom";
const CONSULATE: &str = "kg-consulate-moscow";
/// The NGO that runs the shelter in kg.
const OPERATOR: &str = "kg-ngo-sezim";
/// kg's repatriation reaction to what crosses from ru.
const KG_INBOUND: &str = "repatriation_inbound_ru";
/// kg's list of returns.
const KG_LIST: &str = "repatriation_return_list";
/// kg's identification runner on what crosses from ru.
const HANDOVERS: &str = "identification_homecoming_ru";
/// kg's referral reaction to cases opened from abroad.
const HOMECOMINGS: &str = "referral_homecoming";
/// kg's shelter reaction to announced returns.
const ARRIVALS: &str = "shelter_arrivals";
/// How long any positive condition may take.
const WAIT: Duration = Duration::from_secs(60);
/// The foreign reference of the returns opened here.
const REFERENCE: &str = "RU-MVD-2026/118";

fn ru_iom() -> String {
    token(RU_IOM, Role::Iom, "iom-officer-1")
}

fn consulate() -> String {
    token(CONSULATE, Role::Consulate, "consul-1")
}

fn kg_iom() -> String {
    token("kg-iom", Role::Iom, "kg-iom-1")
}

fn kg_msd() -> String {
    token("kg-msd", Role::Msd, "kg-msd-1")
}

fn kg_coordinator() -> String {
    token("kg-coordinator", Role::Coordinator, "kg-coord-1")
}

fn operator() -> String {
    token(OPERATOR, Role::Ngo, "operator-1")
}

fn rid() -> String {
    Uuid::now_v7().to_string()
}

fn now() -> prost_types::Timestamp {
    timestamp(chrono::Utc::now())
}

/// A whole second, `hours` from now (the shelter keeps microseconds).
fn in_hours(hours: i64) -> prost_types::Timestamp {
    let t = chrono::Utc::now() + chrono::Duration::hours(hours);
    prost_types::Timestamp {
        seconds: t.timestamp(),
        nanos: 0,
    }
}

fn kg() -> CountryCode {
    CountryCode::parse("country", "kg").unwrap()
}

/// The rule code of a FAILED_PRECONDITION.
fn reason(status: &Status) -> String {
    assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}");
    status
        .get_details_precondition_failure()
        .expect("precondition details")
        .violations[0]
        .r#type
        .clone()
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

/// A bounded wait: `tick` sleeps a little, and fails the test once `WAIT` is over.
struct Deadline {
    until: tokio::time::Instant,
    what: String,
}

impl Deadline {
    fn new(what: impl Into<String>) -> Self {
        Self {
            until: tokio::time::Instant::now() + WAIT,
            what: what.into(),
        }
    }

    async fn tick(&self) {
        assert!(
            tokio::time::Instant::now() < self.until,
            "{} not within {WAIT:?}",
            self.what
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A return run in ru: its ID, the version last answered, the arrival booked.
struct Walk {
    c: Client,
    id: String,
    version: u64,
    arrival_at: Option<prost_types::Timestamp>,
}

impl Walk {
    /// ru's IOM office opens a return for a Kyrgyz woman with `ids`.
    async fn open(c: &Client, ids: common::PersonalIdentifiers) -> Self {
        let mut c = c.clone();
        let opened = c
            .open_return(authorized(
                pb::OpenReturnRequest {
                    request_id: rid(),
                    citizenship: "KG".into(),
                    identifiers: Some(ids),
                    gender: common::Gender::Female as i32,
                    age_band: common::AgeBand::AgeBand1824 as i32,
                    form_of_exploitation: "EXPLOITATION_FORM_LABOUR".into(),
                    country_of_exploitation: "RU".into(),
                    foreign_reference: REFERENCE.into(),
                    identified_by: "ru-mvd".into(),
                    consulate_agency: CONSULATE.into(),
                },
                &ru_iom(),
            ))
            .await
            .unwrap()
            .into_inner();
        Self {
            c,
            id: opened.return_id,
            version: opened.result.unwrap().version,
            arrival_at: None,
        }
    }

    fn took(&mut self, answer: Result<tonic::Response<common::CommandResult>, Status>) -> Result<u64, Status> {
        let result = answer?.into_inner();
        assert_eq!(result.aggregate_id, self.id);
        self.version = result.version;
        Ok(result.version)
    }

    async fn consent(&mut self, shared: &[SharedField]) -> Result<u64, Status> {
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
        let answer = self.c.record_return_consent(authorized(req, &ru_iom())).await;
        self.took(answer)
    }

    async fn assess(&mut self, safe: bool, needs: &[ArrivalNeed]) -> Result<u64, Status> {
        let req = pb::RecordRiskAssessmentRequest {
            request_id: rid(),
            return_id: self.id.clone(),
            expected_version: self.version,
            safe_to_return: safe,
            family_involvement: pb::FamilyInvolvement::None as i32,
            needs: needs.iter().map(|n| *n as i32).collect(),
            interpretation_language: String::new(),
        };
        let answer = self.c.record_risk_assessment(authorized(req, &ru_iom())).await;
        self.took(answer)
    }

    async fn request_document(&mut self) -> Result<u64, Status> {
        let req = pb::RequestTravelDocumentRequest {
            request_id: rid(),
            return_id: self.id.clone(),
            expected_version: self.version,
        };
        let answer = self.c.request_travel_document(authorized(req, &ru_iom())).await;
        self.took(answer)
    }

    /// The consulate issues the certificate of return (its number is the canary document).
    async fn issue_document(&mut self) -> Result<u64, Status> {
        let req = pb::RecordTravelDocumentRequest {
            request_id: rid(),
            return_id: self.id.clone(),
            expected_version: self.version,
            issued: true,
            document_number: canary::PASSPORT.into(),
            valid_until: Some(in_hours(24 * 30)),
        };
        let answer = self.c.record_travel_document(authorized(req, &consulate())).await;
        self.took(answer)
    }

    /// Departure in two days, arrival at Manas airport (FRU) four hours later.
    async fn book(&mut self) -> Result<u64, Status> {
        let arrival_at = in_hours(52);
        let req = pb::BookItineraryRequest {
            request_id: rid(),
            return_id: self.id.clone(),
            expected_version: self.version,
            departure_at: Some(in_hours(48)),
            arrival_at: Some(arrival_at),
            carrier: "KC 210".into(),
            arrival_point_kind: pb::ArrivalPointKind::Airport as i32,
            arrival_point: "FRU".into(),
        };
        let answer = self.c.book_itinerary(authorized(req, &ru_iom())).await;
        self.arrival_at = Some(arrival_at);
        self.took(answer)
    }

    async fn escort(&mut self) -> Result<u64, Status> {
        let req = pb::AssignEscortRequest {
            request_id: rid(),
            return_id: self.id.clone(),
            expected_version: self.version,
            escort_officer: "escort-3".into(),
            escort_agency: RU_IOM.into(),
        };
        let answer = self.c.assign_escort(authorized(req, &ru_iom())).await;
        self.took(answer)
    }

    async fn depart(&mut self) -> Result<u64, Status> {
        let req = pb::RecordDepartureRequest {
            request_id: rid(),
            return_id: self.id.clone(),
            expected_version: self.version,
            departed_at: Some(now()),
        };
        let answer = self.c.record_departure(authorized(req, &ru_iom())).await;
        self.took(answer)
    }

    async fn arrive(&mut self) -> Result<u64, Status> {
        let req = pb::RecordArrivalRequest {
            request_id: rid(),
            return_id: self.id.clone(),
            expected_version: self.version,
            arrived_at: Some(now()),
        };
        let answer = self.c.record_arrival(authorized(req, &ru_iom())).await;
        self.took(answer)
    }

    async fn hand_over(&mut self) -> Result<u64, Status> {
        let req = pb::RecordHandoverRequest {
            request_id: rid(),
            return_id: self.id.clone(),
            expected_version: self.version,
            handed_over_at: Some(now()),
            received_by: "kg-iom".into(),
        };
        let answer = self.c.record_handover(authorized(req, &ru_iom())).await;
        self.took(answer)
    }

    async fn halt(&mut self, why: HaltReason) -> Result<u64, Status> {
        let req = pb::HaltReturnRequest {
            request_id: rid(),
            return_id: self.id.clone(),
            expected_version: self.version,
            reason: why as i32,
        };
        let answer = self.c.halt_return(authorized(req, &ru_iom())).await;
        self.took(answer)
    }

    /// Consented (identity, profile, needs; not the contact), assessed safe
    /// with `needs`, the document requested and issued, the itinerary booked.
    async fn booked(c: &Client, ids: common::PersonalIdentifiers, needs: &[ArrivalNeed]) -> Self {
        let mut w = Self::open(c, ids).await;
        w.consent(&[SharedField::Identity, SharedField::Profile, SharedField::Needs])
            .await
            .unwrap();
        w.assess(true, needs).await.unwrap();
        w.request_document().await.unwrap();
        w.issue_document().await.unwrap();
        w.book().await.unwrap();
        w
    }

    /// Departs, arrives and is handed over to kg-iom.
    async fn home(&mut self) {
        self.depart().await.unwrap();
        self.arrive().await.unwrap();
        self.hand_over().await.unwrap();
    }
}

/// The two countries and their services.
struct World {
    federation: Federation,
    ru_keys: CountryKeys,
    kg_keys: CountryKeys,
    /// ru's repatriation service.
    ru: RepatriationApp,
    /// kg's services.
    kg: RepatriationApp,
    id: TestApp,
    referral: ReferralApp,
    shelter: ShelterApp,
    /// kg's shelter in Chüy (FRU is there), women's beds.
    shelter_id: String,
}

impl World {
    async fn start() -> Self {
        let federation = Federation::start().await;
        let (ru_keys, kg_keys) = (CountryKeys::generate("ru"), CountryKeys::generate("kg"));
        let mut ru_settings = repatriation_settings(&ru_keys, &[&kg_keys]);
        ru_settings.common.nats = federation.nats_settings(Side::Ru);
        let mut kg_settings = repatriation_settings(&kg_keys, &[&ru_keys]);
        kg_settings.common.nats = federation.nats_settings(Side::Kg);
        let mut id_settings = nrm_e2e::settings();
        id_settings.common.nats = federation.nats_settings(Side::Kg);
        id_settings.xborder = kg_settings.xborder.clone();
        let referral_settings = nrm_e2e::referral_settings(&id_settings);
        let mut shelter_settings = nrm_e2e::shelter_settings();
        shelter_settings.common.nats = federation.nats_settings(Side::Kg);
        let names = BTreeSet::from([
            ru_settings.common.database.name.clone(),
            kg_settings.common.database.name.clone(),
            id_settings.common.database.name.clone(),
            referral_settings.common.database.name.clone(),
            shelter_settings.common.database.name.clone(),
        ]);
        assert_eq!(
            names.len(),
            5,
            "every service of each country has a database of its own"
        );

        let (ru, kg) = tokio::join!(
            RepatriationApp::spawn_with(ru_settings),
            RepatriationApp::spawn_with(kg_settings)
        );
        let (id, referral, shelter) = tokio::join!(
            TestApp::spawn_with(id_settings),
            ReferralApp::spawn_with(referral_settings),
            ShelterApp::spawn_with(shelter_settings)
        );
        let shelter_id = shelter
            .client
            .clone()
            .register_shelter(authorized(
                sh::RegisterShelterRequest {
                    request_id: rid(),
                    code: format!("CC-{}", &nrm_e2e::unique()[..6]),
                    region: "KG-C".into(),
                    address: canary::ADDRESS.into(),
                    capacity: vec![sh::BedCapacity {
                        category: sh::BedCategory::Women as i32,
                        beds: 4,
                    }],
                    services: vec![],
                    wheelchair_accessible: false,
                },
                &operator(),
            ))
            .await
            .unwrap()
            .into_inner()
            .shelter_id;
        nrm_e2e::beds::approve(&shelter, &shelter_id).await;
        Self {
            federation,
            ru_keys,
            kg_keys,
            ru,
            kg,
            id,
            referral,
            shelter,
            shelter_id,
        }
    }

    async fn ru_view(&self, id: &str) -> pb::Return {
        self.ru
            .client
            .clone()
            .get_return(authorized(
                pb::GetReturnRequest {
                    return_id: id.to_owned(),
                },
                &ru_iom(),
            ))
            .await
            .unwrap()
            .into_inner()
    }

    async fn kg_view(&self, id: &str, who: &str) -> Result<pb::Return, Status> {
        self.kg
            .client
            .clone()
            .get_return(authorized(
                pb::GetReturnRequest {
                    return_id: id.to_owned(),
                },
                who,
            ))
            .await
            .map(tonic::Response::into_inner)
    }

    async fn kg_list(&self, who: &str) -> Vec<pb::ReturnSummary> {
        self.kg
            .client
            .clone()
            .list_returns(authorized(
                pb::ListReturnsRequest {
                    direction: pb::Direction::Incoming as i32,
                    page_size: 100,
                    ..Default::default()
                },
                who,
            ))
            .await
            .unwrap()
            .into_inner()
            .returns
    }

    /// Waits until kg's IOM office sees the return with ru's status and
    /// step history; both views.
    async fn converged(&self, id: &str) -> (pb::Return, pb::Return) {
        let deadline = Deadline::new(format!("kg seeing return {id} as ru has it"));
        loop {
            let ru = self.ru_view(id).await;
            if let Ok(kg) = self.kg_view(id, &kg_iom()).await
                && kg.status == ru.status
                && kg.steps == ru.steps
            {
                return (ru, kg);
            }
            deadline.tick().await;
        }
    }

    /// Waits until every runner in kg has applied everything that ru sent
    /// so far and everything that followed from it: ru's outbox empty, kg's
    /// incoming stream holding every message of ru's outgoing one, kg's
    /// repatriation and identification past its end, the shelter past the
    /// end of kg's repatriation stream, the referral service past the end
    /// of the identification stream.
    async fn settle(&self) {
        let kg = kg();
        wait_outbox(&self.ru.pool, "ru's repatriation").await;
        let filter = self.ru.bus.outbound_filter(&kg);
        let prefix = filter.trim_end_matches('>');
        let sent = self
            .ru
            .messages()
            .await
            .iter()
            .filter(|m| m.subject.starts_with(prefix))
            .count();
        let out = self.ru.bus.outbound_stream_name(&kg);
        wait_messages(&self.ru.jetstream, &out, sent).await;
        let inbound = self.kg.bus.inbound_stream_name(&self.ru_keys.code);
        let last = wait_messages(&self.kg.jetstream, &inbound, sent).await;
        wait_checkpoint(&self.kg.pool, KG_INBOUND, last).await;
        wait_checkpoint(&self.id.pool, HANDOVERS, last).await;
        wait_outbox(&self.kg.pool, "kg's repatriation").await;
        let last = last_sequence(&self.kg.jetstream, &self.kg.stream_name()).await;
        wait_checkpoint(&self.shelter.pool, ARRIVALS, last).await;
        wait_checkpoint(&self.kg.pool, KG_LIST, last).await;
        wait_outbox(&self.id.pool, "kg's identification").await;
        let last = last_sequence(&self.id.jetstream, &self.id.stream_name()).await;
        wait_checkpoint(&self.referral.pool, HOMECOMINGS, last).await;
    }

    /// The cases kg's identification opened for `return_id`.
    async fn cases_of(&self, return_id: &str) -> Vec<idpb::CaseOpenedFromAbroad> {
        events(
            &self.id.pool,
            "CaseOpenedFromAbroad",
            |p| match idpb::IdentificationEvent::decode(p).ok()?.event? {
                idpb::identification_event::Event::CaseOpenedFromAbroad(c) => Some(c),
                _ => None,
            },
        )
        .await
        .into_iter()
        .filter(|c| c.identified_abroad.as_ref().is_some_and(|a| a.return_id == return_id))
        .collect()
    }

    async fn consents(&self) -> Vec<rf::ConsentRecorded> {
        events(
            &self.referral.pool,
            "ConsentRecorded",
            |p| match rf::ReferralEvent::decode(p).ok()?.event? {
                rf::referral_event::Event::ConsentRecorded(c) => Some(c),
                _ => None,
            },
        )
        .await
    }

    async fn referrals(&self) -> Vec<rf::ReferralCreated> {
        events(
            &self.referral.pool,
            "ReferralCreated",
            |p| match rf::ReferralEvent::decode(p).ok()?.event? {
                rf::referral_event::Event::ReferralCreated(r) => Some(r),
                _ => None,
            },
        )
        .await
    }

    /// Waits until the referral service referred the person of `case_id`.
    async fn wait_referral(&self, case_id: &str) -> rf::ReferralCreated {
        let deadline = Deadline::new(format!("a referral of case {case_id}"));
        loop {
            if let Some(r) = self.referrals().await.into_iter().find(|r| r.case_id == case_id) {
                return r;
            }
            deadline.tick().await;
        }
    }

    /// Waits until identification opened a case for `return_id`.
    async fn wait_case(&self, return_id: &str) -> idpb::CaseOpenedFromAbroad {
        let deadline = Deadline::new(format!("a case for return {return_id}"));
        loop {
            if let Some(c) = self.cases_of(return_id).await.pop() {
                return c;
            }
            deadline.tick().await;
        }
    }

    /// Every `BedHeld` of the shelter service.
    async fn beds_held(&self) -> Vec<sh::BedHeld> {
        events(&self.shelter.pool, "BedHeld", |p| {
            match sh::ShelterEvent::decode(p).ok()?.event? {
                sh::shelter_event::Event::BedHeld(held) => Some(held),
                _ => None,
            }
        })
        .await
    }

    async fn count_shelter_events(&self, event_type: &str) -> i64 {
        sqlx::query_scalar("SELECT count(*) FROM events WHERE event_type = $1")
            .bind(event_type)
            .fetch_one(&self.shelter.pool)
            .await
            .unwrap()
    }

    /// Who is coming to the shelter, as its operator sees it.
    async fn arrivals(&self) -> Vec<sh::Arrival> {
        self.shelter
            .client
            .clone()
            .list_arrivals(authorized(
                sh::ListArrivalsRequest {
                    shelter_id: self.shelter_id.clone(),
                },
                &operator(),
            ))
            .await
            .unwrap()
            .into_inner()
            .arrivals
    }

    /// The events kg's repatriation service recorded for `return_id`.
    async fn kg_events(&self, return_id: &str) -> Vec<String> {
        sqlx::query_scalar("SELECT event_type FROM events WHERE stream_id = $1 ORDER BY version")
            .bind(format!("return-{return_id}"))
            .fetch_all(&self.kg.pool)
            .await
            .unwrap()
    }

    /// The crossing messages ru recorded for `return_id`.
    async fn ru_crossings(&self, return_id: &str) -> i64 {
        sqlx::query_scalar("SELECT count(*) FROM events WHERE stream_id = $1")
            .bind(format!("xborder-kg-{return_id}"))
            .fetch_one(&self.ru.pool)
            .await
            .unwrap()
    }

    async fn stop(self) {
        let Self {
            federation,
            ru_keys,
            kg_keys,
            ru,
            kg,
            id,
            referral,
            shelter,
            ..
        } = self;
        shelter.stop().await;
        referral.stop().await;
        id.stop().await;
        kg.stop(&[&ru_keys]).await;
        ru.stop(&[&kg_keys]).await;
        drop(federation);
        for keys in [ru_keys, kg_keys] {
            if let Some(dir) = keys.private_file.parent() {
                let _ = std::fs::remove_dir_all(dir);
            }
        }
    }
}

/// Every event of `event_type` in a store, decoded with `decode`, in order.
async fn events<T>(pool: &sqlx::PgPool, event_type: &str, decode: impl Fn(&[u8]) -> Option<T>) -> Vec<T> {
    let payloads: Vec<Vec<u8>> =
        sqlx::query_scalar("SELECT payload FROM events WHERE event_type = $1 ORDER BY global_position")
            .bind(event_type)
            .fetch_all(pool)
            .await
            .unwrap();
    payloads.iter().filter_map(|p| decode(p)).collect()
}

/// Waits until a service's outbox is empty (everything it committed published).
async fn wait_outbox(pool: &sqlx::PgPool, what: &str) {
    let deadline = Deadline::new(format!("{what}'s outbox emptied"));
    loop {
        let left: i64 = sqlx::query_scalar("SELECT count(*) FROM outbox")
            .fetch_one(pool)
            .await
            .unwrap();
        if left == 0 {
            return;
        }
        deadline.tick().await;
    }
}

async fn last_sequence(js: &jetstream::Context, stream: &str) -> u64 {
    let mut stream = js.get_stream(stream).await.unwrap();
    stream.info().await.unwrap().state.last_sequence
}

/// Waits until `stream` holds at least `count` messages; its last sequence.
async fn wait_messages(js: &jetstream::Context, name: &str, count: usize) -> u64 {
    let deadline = Deadline::new(format!("{name} holding {count} messages"));
    loop {
        if let Ok(mut stream) = js.get_stream(name).await
            && let Ok(info) = stream.info().await
            && info.state.messages >= u64::try_from(count).unwrap()
        {
            return info.state.last_sequence;
        }
        deadline.tick().await;
    }
}

/// Waits until the runner `projection` has applied its stream up to `sequence`.
async fn wait_checkpoint(pool: &sqlx::PgPool, projection: &str, sequence: u64) {
    if sequence == 0 {
        return;
    }
    let wanted = i64::try_from(sequence).unwrap();
    let deadline = Deadline::new(format!("{projection} at sequence {sequence}"));
    loop {
        let at: Option<i64> =
            sqlx::query_scalar("SELECT stream_sequence FROM projection_checkpoints WHERE projection = $1")
                .bind(projection)
                .fetch_optional(pool)
                .await
                .unwrap();
        if at.is_some_and(|at| at >= wanted) {
            return;
        }
        deadline.tick().await;
    }
}

/// The `Nats-Msg-Id`s of a stream's messages, in order.
async fn message_ids(js: &jetstream::Context, stream: &str) -> Vec<String> {
    messages(js, stream)
        .await
        .iter()
        .map(|m| {
            m.headers
                .get("Nats-Msg-Id")
                .map(|v| v.as_str().to_owned())
                .unwrap_or_default()
        })
        .collect()
}

/// Every message of every stream on a server holds no canary in the clear
/// (body, headers, subject); how many messages were looked at.
async fn assert_streams_clean(js: &jetstream::Context, side: &str) -> usize {
    let names: Vec<String> = js.stream_names().try_collect().await.unwrap();
    let mut seen = 0;
    for name in names {
        for m in messages(js, &name).await {
            let what = format!("{side}'s stream {name}");
            assert_clean(&m.payload, &format!("a message of {what}"));
            assert_clean(format!("{:?}", m.headers).as_bytes(), &format!("headers in {what}"));
            assert_clean(m.subject.as_bytes(), &format!("a subject in {what}"));
            seen += 1;
        }
    }
    seen
}

#[tokio::test]
async fn a_return_is_announced_before_departure_and_handed_over_once() {
    let logs = capture();
    let world = World::start().await;
    let c = world.ru.client.clone();

    // In ru: IOM opens the return, the consent shares identity, profile and
    // needs (not the contact), safe with shelter and medical help on
    // arrival, the consulate's certificate, the itinerary, the escort.
    let mut a = Walk::booked(&c, canary::identifiers(), &[ArrivalNeed::Shelter, ArrivalNeed::Medical]).await;
    a.escort().await.unwrap();
    assert_eq!(a.version, 7);

    // In kg, before departure: announced, with what was shared.
    let (ru_view, kg_view) = world.converged(&a.id).await;
    assert_eq!(ru_view.status, ReturnStatus::EscortAssigned as i32);
    assert_eq!(ru_view.steps.len(), 7, "{:?}", ru_view.steps);
    assert_eq!(kg_view.steps, ru_view.steps, "kg sees ru's step history so far");
    // Every runner in kg past what crossed (the list, the shelter's bed).
    world.settle().await;
    for who in [kg_iom(), kg_msd(), kg_coordinator()] {
        let view = world.kg_view(&a.id, &who).await.unwrap();
        assert_eq!(view.direction, pb::Direction::Incoming as i32);
        assert_eq!(view.status, ReturnStatus::EscortAssigned as i32);
        assert_eq!((view.from_country.as_str(), view.to_country.as_str()), ("ru", "kg"));
        assert_eq!(view.arrival_at, a.arrival_at);
        assert_eq!(view.departure_at, ru_view.departure_at);
        assert_eq!((view.arrival_point.as_str(), view.carrier.as_str()), ("FRU", "KC 210"));
        assert_eq!(view.needs, [ArrivalNeed::Shelter as i32, ArrivalNeed::Medical as i32]);
        assert_eq!(view.gender, common::Gender::Female as i32);
        assert_eq!(view.steps, ru_view.steps);
        assert!(view.consent_to_reintegration_referral);
        let listed = world.kg_list(&who).await;
        let summary = listed.iter().find(|s| s.return_id == a.id).expect("listed in kg");
        assert_eq!(summary.direction, pb::Direction::Incoming as i32);
        assert_eq!(summary.status, ReturnStatus::EscortAssigned as i32);
        assert_eq!(summary.arrival_at, a.arrival_at);
        assert_eq!(summary.arrival_point, "FRU");
        assert_eq!(summary.needs, view.needs);
    }
    for who in [kg_iom(), kg_msd()] {
        let view = world.kg_view(&a.id, &who).await.unwrap();
        let ids = identifiers(&view).expect("the identity was shared with kg's IOM and MSD");
        assert_eq!(ids.full_name, canary::NAME);
        assert_eq!(ids.date_of_birth, canary::DATE_OF_BIRTH);
        assert!(ids.documents.iter().any(|d| d.number == canary::PASSPORT));
        assert!(
            ids.phone.is_empty() && ids.address.is_empty(),
            "the contact was not consented: {ids:?}"
        );
        assert_eq!(
            canary::leaks(format!("{view:?}").as_bytes()),
            ["name", "document number", "date of birth"],
            "no phone, no address anywhere in kg's view"
        );
    }
    let coded = world.kg_view(&a.id, &kg_coordinator()).await.unwrap();
    assert!(identifiers(&coded).is_none(), "the coordinator reads it coded");
    assert!(canary::leaks(format!("{coded:?}").as_bytes()).is_empty());

    // A bed at home: exactly one, in the Chüy shelter, held for the return's
    // arrival (counted after the shelter applied everything kg recorded).
    let coming = world.arrivals().await;
    assert_eq!(coming.len(), 1, "{coming:?}");
    assert_eq!(coming[0].return_id, a.id);
    assert_eq!(coming[0].holder_agency, "kg-iom");
    assert_eq!(coming[0].category, sh::BedCategory::Women as i32);
    assert_eq!(coming[0].arrival_at, a.arrival_at);
    let held = world.beds_held().await;
    assert_eq!(held.len(), 1, "one bed for the return: {held:?}");
    assert_eq!(
        (held[0].shelter_id.as_str(), held[0].region.as_str()),
        (world.shelter_id.as_str(), "KG-C")
    );
    assert!(world.cases_of(&a.id).await.is_empty(), "no case before the handover");

    // Departure, arrival and handover in ru.
    a.home().await;
    // B, the marker: handed over after A.
    let mut b = Walk::booked(&c, person("Nurlan Markerov", "AC7712345", ""), &[ArrivalNeed::Medical]).await;
    b.home().await;

    // In kg: A's case, identified abroad, and its referral to MSD; then B's
    // (so everything before it was acted on).
    let a_case = world.wait_case(&a.id).await;
    world.wait_referral(&a_case.report.as_ref().unwrap().case_id).await;
    let b_case = world.wait_case(&b.id).await;
    world.wait_referral(&b_case.report.as_ref().unwrap().case_id).await;
    world.settle().await;

    let cases = world.cases_of(&a.id).await;
    assert_eq!(cases.len(), 1, "one case for A");
    let case_id = cases[0].report.as_ref().unwrap().case_id.clone();
    let case = world
        .id
        .client
        .clone()
        .get_case(authorized(
            read_case(&case_id, idpb::ReadPurpose::VictimProtection),
            &kg_iom(),
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(case.status, idpb::CaseStatus::Identified as i32);
    assert_eq!(case.reporting_agency, "kg-iom");
    assert_eq!(case.competent_authority, "kg-mvd");
    assert_eq!(case.citizenship, "KG");
    let abroad = case.identified_abroad.clone().unwrap();
    assert_eq!(abroad.return_id, a.id);
    assert_eq!(abroad.foreign_reference, REFERENCE);
    assert_eq!(abroad.identified_by, "ru-mvd", "the deciding authority abroad");
    assert_eq!(abroad.from_country, "ru");
    assert_eq!(abroad.received_by, "kg-iom");
    assert_eq!(abroad.consent_recorded_by, RU_IOM);
    let Some(common::personal_data_view::View::Identifiers(ids)) = case.personal.and_then(|p| p.view) else {
        panic!("the agency that received the person reads what crossed");
    };
    assert_eq!(ids.full_name, canary::NAME);
    assert!(
        ids.phone.is_empty() && ids.address.is_empty(),
        "the contact never crossed"
    );

    let consents: Vec<_> = world
        .consents()
        .await
        .into_iter()
        .filter(|c| c.case_id == case_id)
        .collect();
    assert_eq!(consents.len(), 1, "one consent for A: {consents:?}");
    assert_eq!(consents[0].recipient_agency, "kg-msd");
    let referrals: Vec<_> = world
        .referrals()
        .await
        .into_iter()
        .filter(|r| r.case_id == case_id)
        .collect();
    assert_eq!(referrals.len(), 1, "one referral for A: {referrals:?}");
    let referral = &referrals[0];
    assert_eq!(referral.receiving_agency, "kg-msd");
    assert_eq!(referral.services, [rf::ServiceKind::Reintegration as i32]);
    assert_eq!(referral.consent_id, consents[0].consent_id);
    assert_eq!(world.consents().await.len(), 2, "A's and B's");
    assert_eq!(world.referrals().await.len(), 2, "A's and B's");
    // The inbox is the referral service's read model, written after the
    // event is on the stream: wait for it, then count.
    let deadline = Deadline::new("A's referral in MSD's inbox");
    let inbox = loop {
        let inbox = world
            .referral
            .client
            .clone()
            .list_inbox(authorized(rf::ListInboxRequest::default(), &kg_msd()))
            .await
            .unwrap()
            .into_inner()
            .referrals;
        if inbox.iter().any(|r| r.referral_id == referral.referral_id) {
            break inbox;
        }
        deadline.tick().await;
    };
    assert_eq!(
        inbox.iter().filter(|r| r.referral_id == referral.referral_id).count(),
        1,
        "MSD's inbox holds A's referral once"
    );
    // Still the one bed (B needs none), kept for A's arrival.
    assert_eq!(world.beds_held().await.len(), 1);
    assert_eq!(world.arrivals().await.len(), 1);

    // The same step history on both sides, from the opening to the handover.
    for w in [&a, &b] {
        let (ru_view, kg_view) = world.converged(&w.id).await;
        assert_eq!(ru_view.status, ReturnStatus::HandedOver as i32);
        assert_eq!(kg_view.status, ReturnStatus::HandedOver as i32);
        assert_eq!(kg_view.received_by, "kg-iom");
        assert_eq!(kg_view.steps, ru_view.steps);
    }
    let (ru_view, _) = world.converged(&a.id).await;
    let names: Vec<&str> = ru_view.steps.iter().map(|s| s.step.as_str()).collect();
    assert_eq!(names.len(), 10, "{names:?}");
    assert_eq!((names[0], names[9]), ("ReturnOpened", "ReturnHandedOver"), "{names:?}");
    assert_eq!(world.kg_events(&a.id).await.len(), 9, "one event per crossing message");

    // No canary in the clear: in no stream of either server, in no log line
    // or span of the services, in neither server's log.
    let ru_seen = assert_streams_clean(&world.ru.jetstream, "ru").await;
    let kg_seen = assert_streams_clean(&world.kg.jetstream, "kg").await;
    assert!(
        ru_seen >= 20 && kg_seen >= 20,
        "looked at {ru_seen} and {kg_seen} messages"
    );
    let captured = logs.logs();
    assert!(
        String::from_utf8_lossy(&captured).contains(&a.id),
        "the capture saw the services' spans"
    );
    assert_clean(&captured, "the logs");
    assert_clean(world.federation.log(Side::Ru).as_bytes(), "ru's nats-server log");
    assert_clean(world.federation.log(Side::Kg).as_bytes(), "kg's nats-server log");

    world.stop().await;
}

#[tokio::test]
async fn a_halted_return_is_halted_on_both_sides_with_its_reason() {
    let _logs = capture();
    let world = World::start().await;
    let c = world.ru.client.clone();

    // W: booked with a shelter need (a bed is held in kg), then the person
    // withdraws the consent.
    let mut w = Walk::booked(
        &c,
        person("Aigul Haltova", "AC7700001", "+996 555 000111"),
        &[ArrivalNeed::Shelter],
    )
    .await;
    let deadline = Deadline::new("a bed held for W");
    while !world.arrivals().await.iter().any(|x| x.return_id == w.id) {
        deadline.tick().await;
    }
    w.halt(HaltReason::ConsentWithdrawn).await.unwrap();
    // R: consented, then assessed unsafe: halted by the assessment.
    let mut r = Walk::open(&c, person("Bermet Riskova", "AC7700002", "")).await;
    r.consent(&[SharedField::Identity, SharedField::Profile, SharedField::Needs])
        .await
        .unwrap();
    r.assess(false, &[ArrivalNeed::Shelter]).await.unwrap();

    for (walk, why) in [(&w, HaltReason::ConsentWithdrawn), (&r, HaltReason::RiskFound)] {
        let (ru_view, kg_view) = world.converged(&walk.id).await;
        for view in [&ru_view, &kg_view] {
            assert_eq!(view.status, ReturnStatus::Halted as i32);
            assert_eq!(view.halt_reason, why as i32, "{:?}", view.halt_reason);
        }
        assert_eq!(kg_view.steps, ru_view.steps);
        assert_eq!(ru_view.steps.last().unwrap().status_after, ReturnStatus::Halted as i32);
    }
    // Withdrawn: kg keeps nothing of the person.
    let kg_w = world.kg_view(&w.id, &kg_iom()).await.unwrap();
    assert!(identifiers(&kg_w).is_none(), "{:?}", kg_w.personal_data);
    assert!(withheld(&kg_w).is_some());

    // W's bed is released, R never had one, and no case opened.
    let deadline = Deadline::new("W's bed released");
    while !world.arrivals().await.is_empty() {
        deadline.tick().await;
    }
    world.settle().await;
    assert_eq!(world.beds_held().await.len(), 1, "W's bed only");
    assert_eq!(world.count_shelter_events("HoldReleased").await, 1);
    assert!(world.arrivals().await.is_empty());
    for walk in [&w, &r] {
        assert!(world.cases_of(&walk.id).await.is_empty(), "no case for a halted return");
    }
    assert!(world.consents().await.is_empty() && world.referrals().await.is_empty());

    // ru refuses a step after the halt; kg refuses any command on the incoming return.
    assert_eq!(reason(&w.escort().await.unwrap_err()), "FINISHED");
    assert_eq!(reason(&r.request_document().await.unwrap_err()), "FINISHED");
    assert_eq!(
        reason(&r.halt(HaltReason::PersonUnavailable).await.unwrap_err()),
        "FINISHED"
    );
    let mut kg_client = world.kg.client.clone();
    for walk in [&w, &r] {
        let version = world.kg_view(&walk.id, &kg_iom()).await.unwrap().version;
        let status = kg_client
            .halt_return(authorized(
                pb::HaltReturnRequest {
                    request_id: rid(),
                    return_id: walk.id.clone(),
                    expected_version: version,
                    reason: HaltReason::PersonUnavailable as i32,
                },
                &kg_iom(),
            ))
            .await
            .unwrap_err();
        assert_eq!(reason(&status), "INCOMING_RETURN", "halt in kg");
        let status = kg_client
            .record_departure(authorized(
                pb::RecordDepartureRequest {
                    request_id: rid(),
                    return_id: walk.id.clone(),
                    expected_version: version,
                    departed_at: Some(now()),
                },
                &kg_iom(),
            ))
            .await
            .unwrap_err();
        assert_eq!(reason(&status), "INCOMING_RETURN", "departure in kg");
    }

    world.stop().await;
}

#[tokio::test]
async fn the_link_drops_and_both_sides_converge_without_anyone_acting() {
    let _logs = capture();
    let mut world = World::start().await;
    let c = world.ru.client.clone();
    let kg = kg();

    // Three returns, consented and assessed (each needs shelter), seen in kg.
    let mut walks = Vec::new();
    for (i, name) in ["Cholpon Linkova", "Dinara Linkova", "Elmira Linkova"]
        .iter()
        .enumerate()
    {
        let mut w = Walk::open(&c, person(name, &format!("AC77100{i:02}"), "")).await;
        w.consent(&[SharedField::Identity, SharedField::Profile, SharedField::Needs])
            .await
            .unwrap();
        w.assess(true, &[ArrivalNeed::Shelter]).await.unwrap();
        walks.push(w);
    }
    for w in &walks {
        world.converged(&w.id).await;
    }

    // The link drops: kg's server killed. ru goes on.
    world.federation.cut_link(true).await;
    let [one, two, three] = &mut walks[..] else {
        unreachable!()
    };
    one.request_document().await.unwrap();
    two.request_document().await.unwrap();
    three.request_document().await.unwrap();
    one.issue_document().await.unwrap();
    two.issue_document().await.unwrap();
    three.issue_document().await.unwrap();
    one.book().await.unwrap();
    two.book().await.unwrap();
    three.book().await.unwrap();
    one.escort().await.unwrap();
    three.halt(HaltReason::PersonUnavailable).await.unwrap();
    one.home().await;
    // ru's outgoing stream holds every step meant for kg; kg, cut off, is
    // where it was (its services still answer from their databases).
    wait_outbox(&world.ru.pool, "ru's repatriation").await;
    let mut sent = 0;
    for w in &walks {
        sent += world.ru_crossings(&w.id).await;
    }
    assert_eq!(
        sent,
        3 * 2 + 7 + 3 + 4,
        "three consents and assessments, then 7, 3 and 4 steps"
    );
    wait_messages(
        &world.ru.jetstream,
        &world.ru.bus.outbound_stream_name(&kg),
        usize::try_from(sent).unwrap(),
    )
    .await;
    assert_eq!(world.federation.leaf_connections().await, 0, "the link stayed down");
    for w in &walks {
        let view = world.kg_view(&w.id, &kg_iom()).await.unwrap();
        assert_eq!(view.status, ReturnStatus::Assessed as i32, "kg, cut off");
    }

    // The link is back; nobody acts. kg converges on ru's statuses and steps.
    world.federation.restore_link().await;
    for w in &walks {
        let (ru_view, kg_view) = world.converged(&w.id).await;
        assert_eq!(kg_view.steps, ru_view.steps);
    }
    let statuses: Vec<i32> = {
        let mut s = Vec::new();
        for w in &walks {
            s.push(world.ru_view(&w.id).await.status);
        }
        s
    };
    assert_eq!(
        statuses,
        [
            ReturnStatus::HandedOver,
            ReturnStatus::ItineraryBooked,
            ReturnStatus::Halted
        ]
        .map(|s| s as i32)
    );
    world.settle().await;

    // Nothing lost, nothing doubled: kg's incoming stream holds ru's
    // outgoing one message for message, and kg recorded each once.
    let out = message_ids(&world.ru.jetstream, &world.ru.bus.outbound_stream_name(&kg)).await;
    let inbound = message_ids(
        &world.kg.jetstream,
        &world.kg.bus.inbound_stream_name(&world.ru_keys.code),
    )
    .await;
    assert_eq!(
        out.iter().collect::<BTreeSet<_>>().len(),
        out.len(),
        "ru sent a message twice"
    );
    assert_eq!(
        inbound, out,
        "kg's incoming stream: every message ru sent, once, in order"
    );
    for w in &walks {
        let crossings = world.ru_crossings(&w.id).await;
        let recorded = world.kg_events(&w.id).await;
        assert_eq!(
            i64::try_from(recorded.len()).unwrap(),
            crossings,
            "kg recorded each crossing message of {} once: {recorded:?}",
            w.id
        );
    }
    let listed = world.kg_list(&kg_iom()).await;
    for (w, status) in walks.iter().zip(&statuses) {
        let summary = listed.iter().find(|s| s.return_id == w.id).unwrap();
        assert_eq!(summary.status, *status, "kg's list");
    }

    // One case and one referral, for the return handed over only.
    let case = world.wait_case(&walks[0].id).await;
    world.settle().await;
    assert_eq!(world.cases_of(&walks[0].id).await.len(), 1);
    assert!(world.cases_of(&walks[1].id).await.is_empty());
    assert!(world.cases_of(&walks[2].id).await.is_empty());
    let case_id = case.report.unwrap().case_id;
    let referrals = world.referrals().await;
    assert_eq!(referrals.len(), 1, "{referrals:?}");
    assert_eq!(referrals[0].case_id, case_id);
    assert_eq!(world.consents().await.len(), 1);

    // A bed per return that needed one, once each; the halted one's released.
    let held = world.beds_held().await;
    assert_eq!(held.len(), 3, "{held:?}");
    assert_eq!(world.count_shelter_events("HoldReleased").await, 1);
    let coming: BTreeSet<String> = world.arrivals().await.into_iter().map(|a| a.return_id).collect();
    assert_eq!(coming, BTreeSet::from([walks[0].id.clone(), walks[1].id.clone()]));

    world.stop().await;
}
