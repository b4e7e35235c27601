//! Issue 10, item 4: in the home country, the handover of a return opens
//! the person's case in identification (identified abroad, with the foreign
//! reference and the deciding authority) and a reintegration referral to
//! MSD, by themselves and exactly once — whatever the number of snapshots,
//! redeliveries, restarts and replays.
//!
//! Real NATS and PostgreSQL; one NATS server stands in for both countries:
//! the home country's incoming stream `{STREAM_PREFIX}_XB_IN_RU` is created
//! here as a plain stream on the outbound subjects meant for `kg`, and the
//! test publishes into it the sealed crossing commits the destination
//! country's repatriation service sends (the leaf link itself is the
//! federation test's). This file is its own process, so it captures every
//! log line and span of the services at debug level for the canary check.

#![allow(clippy::unwrap_used)] // Test code: a failed unwrap is a failed test.

use std::time::Duration;

use nrm_e2e::canary::{self, assert_clean, capture};
use nrm_e2e::homecoming::{Countries, HomeIdentification, Link, Return, home_settings, wait_for_checkpoint};
use nrm_e2e::ident::read_case;
use nrm_e2e::{ReferralApp, authorized, person, referral_settings, token};
use nrm_kernel::auth::Role;
use nrm_proto::common::v1::personal_data_view::View;
use nrm_proto::identification::v1 as pb;
use nrm_proto::referral::v1 as rf;
use nrm_proto::repatriation::v1::SharedField;
use prost::Message as _;

/// The identification runner of what crosses from `ru`.
const HANDOVERS: &str = "identification_homecoming_ru";
/// The referral reaction to cases from abroad.
const REFERRALS: &str = "referral_homecoming";

fn iom() -> String {
    token("kg-iom", Role::Iom, "iom-officer-1")
}

fn msd() -> String {
    token("kg-msd", Role::Msd, "social-worker-4")
}

fn coordinator() -> String {
    token("kg-coordinator", Role::Coordinator, "coordinator-1")
}

/// Every event of one type in a service's store, decoded with `decode`.
async fn events<T>(pool: &sqlx::PgPool, event_type: &str, decode: impl Fn(&[u8]) -> Option<T>) -> Vec<T> {
    let payloads: Vec<Vec<u8>> =
        sqlx::query_scalar("SELECT payload FROM events WHERE event_type = $1 ORDER BY global_position")
            .bind(event_type)
            .fetch_all(pool)
            .await
            .unwrap();
    payloads.iter().filter_map(|p| decode(p)).collect()
}

/// The cases opened from abroad, in order.
async fn cases(id: &HomeIdentification) -> Vec<pb::CaseOpenedFromAbroad> {
    events(
        &id.pool,
        "CaseOpenedFromAbroad",
        |p| match pb::IdentificationEvent::decode(p).ok()?.event? {
            pb::identification_event::Event::CaseOpenedFromAbroad(opened) => Some(opened),
            _ => None,
        },
    )
    .await
}

/// The cases opened for `return_id`.
async fn cases_of(id: &HomeIdentification, return_id: &str) -> Vec<pb::PresumedVictimReported> {
    cases(id)
        .await
        .into_iter()
        .filter(|c| c.identified_abroad.as_ref().unwrap().return_id == return_id)
        .map(|c| c.report.unwrap())
        .collect()
}

async fn consents(app: &ReferralApp) -> Vec<rf::ConsentRecorded> {
    events(&app.pool, "ConsentRecorded", |p| {
        match rf::ReferralEvent::decode(p).ok()?.event? {
            rf::referral_event::Event::ConsentRecorded(c) => Some(c),
            _ => None,
        }
    })
    .await
}

async fn referrals(app: &ReferralApp) -> Vec<rf::ReferralCreated> {
    events(&app.pool, "ReferralCreated", |p| {
        match rf::ReferralEvent::decode(p).ok()?.event? {
            rf::referral_event::Event::ReferralCreated(r) => Some(r),
            _ => None,
        }
    })
    .await
}

/// Waits until the referral service has referred the person of `case_id`
/// (a positive signal that its reaction passed every earlier case).
async fn wait_for_referral(app: &ReferralApp, case_id: &str) -> rf::ReferralCreated {
    for _ in 0..400 {
        if let Some(referral) = referrals(app).await.into_iter().find(|r| r.case_id == case_id) {
            return referral;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("no referral of case {case_id} within 20 s");
}

/// Waits until identification has opened the case of `ret`.
async fn wait_for_case(id: &HomeIdentification, ret: &Return) -> pb::PresumedVictimReported {
    for _ in 0..400 {
        if let Some(case) = cases_of(id, ret.id()).await.pop() {
            return case;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("no case of return {} within 20 s", ret.id());
}

/// A return handed over: consented, booked, handed over to kg-iom; sends
/// each step's snapshot.
async fn walk(link: &Link, ret: &mut Return) -> u64 {
    link.send(ret).await;
    ret.book();
    link.send(ret).await;
    ret.hand_over("kg-iom");
    link.send(ret).await
}

fn all_shared() -> Vec<SharedField> {
    vec![
        SharedField::Identity,
        SharedField::Contact,
        SharedField::Profile,
        SharedField::Needs,
        SharedField::Risk,
    ]
}

#[tokio::test]
async fn a_handover_opens_one_identified_case_and_one_reintegration_referral_whatever_the_deliveries() {
    let logs = capture();
    let countries = Countries::new();
    let settings = home_settings(&countries);
    let link = Link::new(&settings, &countries).await;
    let mut id = HomeIdentification::spawn(settings.clone()).await;
    let mut referral = ReferralApp::spawn_with(referral_settings(&settings)).await;

    // A: everything shared, agreed to a referral; shelter and medical help on arrival.
    let mut a = Return::consented(&all_shared(), Some(canary::identifiers()), true, "RU-MVD-2026-0042");
    // Nothing opens before the handover: consented, then booked.
    link.send(&mut a).await;
    a.book();
    let booked = link.send(&mut a).await;
    wait_for_checkpoint(&id.pool, HANDOVERS, booked).await;
    assert!(cases(&id).await.is_empty(), "no case before the handover");
    let stored: i64 = sqlx::query_scalar("SELECT count(*) FROM events")
        .fetch_one(&id.pool)
        .await
        .unwrap();
    assert_eq!(stored, 0, "identification wrote nothing before the handover");

    // The handover, twice (a republication: the same version, another message ID).
    a.hand_over("kg-iom");
    link.send(&mut a).await;
    link.deliver(&a).await;
    // B: only the profile crossed (no identifiers), no referral wanted.
    let mut b = Return::consented(&[SharedField::Profile], None, false, "RU-MVD-2026-0043");
    walk(&link, &mut b).await;
    // A's handover once more, later, as a new crossing message (the same
    // origin version): past the runner's per-stream version guard, so only
    // the request key keeps it from opening a second case.
    link.send(&mut a).await;
    // C, the marker: once its referral exists, everything before it was acted on.
    // (Its profile crosses: without the age, no referral is made by itself.)
    let mut c = Return::consented(
        &[SharedField::Identity, SharedField::Profile],
        Some(person("Nurlan Markerov", "AC7712345", "")),
        true,
        "RU-MVD-2026-0044",
    );
    walk(&link, &mut c).await;
    let c_case = wait_for_case(&id, &c).await;
    wait_for_referral(&referral, &c_case.case_id).await;

    // Identification: one case per return, identified abroad, held here.
    let a_cases = cases_of(&id, a.id()).await;
    assert_eq!(a_cases.len(), 1, "one case for A, handed over three times");
    assert_eq!(cases_of(&id, b.id()).await.len(), 1);
    assert_eq!(cases(&id).await.len(), 3);
    let a_case = a_cases[0].clone();
    let mut client = id.client.clone();
    let case = client
        .get_case(authorized(
            read_case(&a_case.case_id, pb::ReadPurpose::VictimProtection),
            &iom(),
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(case.status, pb::CaseStatus::Identified as i32);
    assert_eq!(case.decision, pb::Decision::Identified as i32);
    assert_eq!(case.reporting_agency, "kg-iom");
    assert_eq!(case.competent_authority, "kg-mvd");
    assert_eq!(case.found_country, "RU");
    assert_eq!(case.citizenship, "KG");
    assert_eq!(case.exploitation_forms, [pb::ExploitationForm::Labour as i32]);
    let abroad = case.identified_abroad.clone().unwrap();
    assert_eq!(abroad.foreign_reference, "RU-MVD-2026-0042");
    assert_eq!(abroad.identified_by, "ru-mvd");
    assert_eq!(abroad.from_country, "ru");
    assert_eq!(abroad.return_id, a.id());
    assert_eq!(abroad.received_by, "kg-iom");
    assert_eq!(abroad.consent_recorded_by, "ru-iom");
    assert!(abroad.consent_to_reintegration_referral);
    let Some(View::Identifiers(identifiers)) = case.personal.and_then(|p| p.view) else {
        panic!("the agency that received the person reads the identifiers");
    };
    assert_eq!(identifiers, canary::identifiers());
    let read = pb::GetPersonalDataRequest {
        person_id: a_case.person_id.clone(),
        read_purpose: pb::ReadPurpose::VictimProtection as i32,
        ..Default::default()
    };
    let personal = client
        .get_personal_data(authorized(read.clone(), &iom()))
        .await
        .unwrap()
        .into_inner();
    assert!(matches!(personal.personal.and_then(|p| p.view), Some(View::Identifiers(i)) if i == canary::identifiers()));
    // B opened without identifiers: nothing crossed to read.
    let b_case = cases_of(&id, b.id()).await.pop().unwrap();
    let b_read = client
        .get_case(authorized(
            read_case(&b_case.case_id, pb::ReadPurpose::VictimProtection),
            &iom(),
        ))
        .await
        .unwrap()
        .into_inner();
    assert!(matches!(b_read.personal.and_then(|p| p.view), Some(View::Identifiers(i)) if i == Default::default()));
    assert_eq!(b_read.gender, nrm_proto::common::v1::Gender::Female as i32);
    // The coordinator lists them, marked as identified abroad (the list is a
    // read model: it may lag the cases by a moment).
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    let listed = loop {
        let listed = client
            .list_cases(authorized(pb::ListCasesRequest::default(), &coordinator()))
            .await
            .unwrap()
            .into_inner();
        if listed.cases.len() >= 3 || std::time::Instant::now() > deadline {
            break listed;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    };
    assert_eq!(listed.cases.len(), 3);
    assert!(
        listed
            .cases
            .iter()
            .all(|c| c.identified_abroad && c.status == pb::CaseStatus::Identified as i32)
    );

    // Referral: one consent and one referral to MSD each for A and C, none for B.
    let all_consents = consents(&referral).await;
    let all_referrals = referrals(&referral).await;
    assert_eq!(all_consents.len(), 2, "{all_consents:?}");
    assert_eq!(all_referrals.len(), 2, "{all_referrals:?}");
    assert!(
        !all_referrals.iter().any(|r| r.case_id == b_case.case_id),
        "B agreed to none"
    );
    let a_referral = all_referrals
        .iter()
        .find(|r| r.case_id == a_case.case_id)
        .unwrap()
        .clone();
    let a_consent = all_consents
        .iter()
        .find(|c| c.case_id == a_case.case_id)
        .unwrap()
        .clone();
    assert_eq!(a_referral.receiving_agency, "kg-msd");
    assert_eq!(a_referral.referring_agency, "kg-mvd");
    assert_eq!(a_referral.consent_id, a_consent.consent_id);
    // No bed asked here: the shelter service held one for the return on its announcement.
    assert_eq!(a_referral.services, [rf::ServiceKind::Reintegration as i32]);
    assert_eq!(a_referral.urgency, rf::Urgency::Urgent as i32);
    assert!(a_referral.shelter_need.is_none());
    assert_eq!(a_consent.recipient_agency, "kg-msd");
    assert_eq!(a_consent.recorded_by_agency, "kg-mvd");
    assert_eq!(a_consent.data_categories.len(), 5, "identity and contact crossed");
    let given_abroad = a_consent.attestation.unwrap().given_abroad.unwrap();
    assert_eq!(given_abroad.recorded_by, "ru-iom");
    assert_eq!(given_abroad.return_id, a.id());
    assert_eq!(given_abroad.foreign_reference, "RU-MVD-2026-0042");

    // MSD finds it in its inbox, accepts, and then reads what the consent shares.
    let mut rclient = referral.client.clone();
    for attempt in 0.. {
        let inbox = rclient
            .list_inbox(authorized(rf::ListInboxRequest::default(), &msd()))
            .await
            .unwrap()
            .into_inner();
        if inbox.referrals.iter().any(|r| r.referral_id == a_referral.referral_id) {
            break;
        }
        assert!(attempt < 400, "the referral never reached MSD's inbox");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    rclient
        .accept_referral(authorized(
            rf::AcceptReferralRequest {
                request_id: "accept-a".into(),
                referral_id: a_referral.referral_id.clone(),
                expected_version: 1,
            },
            &msd(),
        ))
        .await
        .unwrap();
    let mut shared = None;
    for _ in 0..400 {
        match client.get_personal_data(authorized(read.clone(), &msd())).await {
            Ok(answer) => {
                shared = Some(answer.into_inner());
                break;
            }
            Err(status) => assert_eq!(status.code(), tonic::Code::PermissionDenied, "{status:?}"),
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let shared = shared.expect("MSD reads the person under the consent given abroad");
    assert_eq!(shared.consent_id, a_consent.consent_id);
    assert!(matches!(shared.personal.and_then(|p| p.view), Some(View::Identifiers(i)) if i.full_name == canary::NAME));

    // The person of A asks for erasure; its case stays, its identifiers go.
    client
        .erase_personal_data(authorized(
            pb::ErasePersonalDataRequest {
                request_id: "erase-a".into(),
                case_id: a_case.case_id.clone(),
                reason: pb::ErasureReason::DataSubjectRequest as i32,
            },
            &iom(),
        ))
        .await
        .unwrap();

    // Restart both services with the reactions' positions gone (checkpoint
    // and per-stream versions, as after a crash between a command's commit
    // and its checkpoint's, or a reaction reset): both replay every message
    // from the first, and add nothing.
    let settings = id.halt().await;
    let referral_settings = referral.halt().await;
    for (pool_settings, projection) in [
        (&settings.database, HANDOVERS),
        (&referral_settings.database, REFERRALS),
    ] {
        let pool = sqlx::PgPool::connect_with(nrm_kernel::db::connect_options(pool_settings).unwrap())
            .await
            .unwrap();
        let deleted = sqlx::query("DELETE FROM projection_checkpoints WHERE projection = $1")
            .bind(projection)
            .execute(&pool)
            .await
            .unwrap()
            .rows_affected();
        assert_eq!(deleted, 1, "{projection} had a checkpoint");
        sqlx::query("DELETE FROM projection_versions WHERE projection = $1")
            .bind(projection)
            .execute(&pool)
            .await
            .unwrap();
        pool.close().await;
    }
    id = HomeIdentification::spawn(settings).await;
    referral = ReferralApp::spawn_with(referral_settings).await;
    // D, a later marker, and A's handover once more.
    link.send(&mut a).await;
    let mut d = Return::consented(
        &[SharedField::Identity, SharedField::Profile],
        Some(person("Aida Markerova", "AC7754321", "")),
        true,
        "RU-MVD-2026-0045",
    );
    walk(&link, &mut d).await;
    let d_case = wait_for_case(&id, &d).await;
    wait_for_referral(&referral, &d_case.case_id).await;
    assert_eq!(cases_of(&id, a.id()).await.len(), 1, "still one case for A");
    assert_eq!(cases(&id).await.len(), 4);
    assert_eq!(consents(&referral).await.len(), 3);
    assert_eq!(referrals(&referral).await.len(), 3);
    let erased = id
        .client
        .clone()
        .get_personal_data(authorized(read.clone(), &iom()))
        .await
        .unwrap()
        .into_inner();
    assert!(matches!(erased.personal.and_then(|p| p.view), Some(View::Erased(_))));

    // No identifier in the clear: not crossing, not in any event or
    // message of either service, not in any log line or span.
    for message in link.messages().await {
        assert_clean(&message.payload, "a crossing message");
        assert_clean(format!("{:?}", message.headers).as_bytes(), "a crossing header");
    }
    for (pool, what) in [(&id.pool, "identification"), (&referral.pool, "referral")] {
        let stored: Vec<(Vec<u8>, String)> = sqlx::query_as("SELECT payload, metadata::text FROM events")
            .fetch_all(pool)
            .await
            .unwrap();
        for (payload, metadata) in stored {
            assert_clean(&payload, &format!("a {what} event"));
            assert_clean(metadata.as_bytes(), &format!("a {what} event's metadata"));
        }
    }
    let js = referral.jetstream.clone();
    for context in ["IDENTIFICATION", "REFERRAL"] {
        for message in nrm_e2e::messages(&js, &format!("{}_{context}", id.settings.nats.stream_prefix)).await {
            assert_clean(&message.payload, &format!("a {context} message"));
            assert_clean(
                format!("{:?}", message.headers).as_bytes(),
                &format!("a {context} header"),
            );
        }
    }
    let captured = logs.logs();
    assert!(
        String::from_utf8_lossy(&captured).contains(&a_case.case_id),
        "the capture saw the services' spans"
    );
    assert_clean(&captured, "the logs");

    referral.stop().await;
    id.stop().await;
    link.remove().await;
    countries.remove();
}

#[tokio::test]
async fn a_crossing_message_that_does_not_open_here_is_parked_and_opens_nothing() {
    // Before anything logs: this process's only subscriber.
    let logs = capture();
    let countries = Countries::new();
    let mut settings = home_settings(&countries);
    settings.retry = nrm_kernel::retry::RetryPolicy {
        attempts: 2,
        first_ms: 20,
        max_ms: 50,
    };
    let link = Link::new(&settings, &countries).await;
    let id = HomeIdentification::spawn(settings).await;

    let mut forged = Return::consented(&all_shared(), Some(canary::identifiers()), true, "RU-MVD-2026-0050");
    forged.hand_over("kg-iom");
    forged.sent += 1;
    // Replayed under another return: its associated data no longer match.
    link.deliver_altered(&forged, |m| m.return_id = uuid::Uuid::now_v7().to_string())
        .await;
    // Sealed to another key than this country's.
    let other = nrm_kernel::xborder::CountryKey::generate();
    link.deliver_altered(&forged, |m| {
        let aad = nrm_kernel::xborder::aad(&countries.partner, &countries.here, &m.return_id, m.origin_version);
        m.sealed = Some(nrm_kernel::xborder::seal(
            &countries.partner_key,
            other.public(),
            &aad,
            b"not for kg",
        ));
    })
    .await;
    // Forged: sealed to this country's key, but by another key pair than
    // the partner's (anyone holding kg's public key could make this one).
    let forger = nrm_kernel::xborder::CountryKey::generate();
    link.deliver_altered(&forged, |m| {
        let aad = nrm_kernel::xborder::aad(&countries.partner, &countries.here, &m.return_id, m.origin_version);
        m.sealed = Some(nrm_kernel::xborder::seal(
            &forger,
            countries.key.public(),
            &aad,
            b"forged",
        ));
    })
    .await;
    // Meant for a third country: passed over.
    link.deliver_altered(&forged, |m| m.to_country = "tj".into()).await;
    // Then a good one, the marker.
    let mut good = Return::consented(&[SharedField::Profile], None, false, "RU-MVD-2026-0051");
    walk(&link, &mut good).await;
    wait_for_case(&id, &good).await;

    assert_eq!(cases(&id).await.len(), 1, "only the good handover opened a case");
    let parked: i64 = sqlx::query_scalar("SELECT count(*) FROM parked_messages WHERE projection = $1")
        .bind(HANDOVERS)
        .fetch_one(&id.pool)
        .await
        .unwrap();
    assert_eq!(
        parked, 3,
        "the three messages that do not open (one of them forged) wait for an operator"
    );
    let errors: Vec<String> = sqlx::query_scalar("SELECT last_error FROM parked_messages WHERE projection = $1")
        .bind(HANDOVERS)
        .fetch_all(&id.pool)
        .await
        .unwrap();
    for error in errors {
        assert_clean(error.as_bytes(), "a parked message's error");
    }
    assert_clean(&logs.logs(), "the logs");

    id.stop().await;
    link.remove().await;
    countries.remove();
}
