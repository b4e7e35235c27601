//! Given these events, when this command, then these events (or this error).

use super::*;
use nrm_proto::common::v1::PersonalIdentifiers;
use pb::{ArrivalNeed, FamilyInvolvement};

const T0: Timestamp = Timestamp {
    seconds: 1_790_000_000,
    nanos: 0,
};
const T1: Timestamp = Timestamp {
    seconds: 1_790_003_600,
    nanos: 0,
};

fn opened() -> Event {
    Event::ReturnOpened(pb::ReturnOpened {
        return_id: "r1".into(),
        citizenship: "kg".into(),
        from_country: "ru".into(),
        gender: 1,
        age_band: 4,
        form_of_exploitation: "EXPLOITATION_FORM_LABOUR".into(),
        country_of_exploitation: "ru".into(),
        foreign_reference: "RU-1".into(),
        identified_by: "ru-mvd".into(),
        consulate_agency: "kg-consulate-moscow".into(),
        opened_by: "ru-iom".into(),
        ..Default::default()
    })
}

fn consent(shared: &[SharedField]) -> Command {
    Command::RecordConsent(pb::ReturnConsentRecorded {
        shared_fields: shared.iter().map(|f| *f as i32).collect(),
        consent_to_reintegration_referral: true,
        attested_by: "officer-1".into(),
        consent_form_ref: "F-1".into(),
    })
}

fn assessment(safe: bool, needs: &[ArrivalNeed]) -> Command {
    Command::AssessRisk(pb::RiskAssessed {
        safe_to_return: safe,
        family_involvement: FamilyInvolvement::None as i32,
        needs: needs.iter().map(|n| *n as i32).collect(),
        interpretation_language: String::new(),
    })
}

fn issued() -> Command {
    Command::RecordDocument(Some(pb::TravelDocumentIssued {
        document: None,
        valid_until: Some(T1),
    }))
}

fn itinerary() -> Command {
    Command::BookItinerary(pb::ItineraryBooked {
        departure_at: Some(T0),
        arrival_at: Some(T1),
        carrier: "KC 210".into(),
        arrival_point_kind: pb::ArrivalPointKind::Airport as i32,
        arrival_point: "FRU".into(),
    })
}

fn escort() -> Command {
    Command::AssignEscort(pb::EscortAssigned {
        escort_officer: "esc-1".into(),
        escort_agency: "ru-iom".into(),
    })
}

fn handover(at: Timestamp) -> Command {
    Command::HandOver(pb::ReturnHandedOver {
        handed_over_at: Some(at),
        received_by: "kg-iom".into(),
    })
}

fn given(events: &[Event]) -> Return {
    events.iter().fold(Return::default(), evolve)
}

/// The history after `commands` from an opened return, each decided on the state before it.
fn walk(needs: &[ArrivalNeed], commands: &[Command]) -> Vec<Event> {
    let mut history = vec![opened()];
    let mut all = vec![consent(&[SharedField::Needs]), assessment(true, needs)];
    all.extend_from_slice(commands);
    for command in &all {
        let events = decide(&given(&history), command).expect("the command succeeds");
        history.extend(events);
    }
    history
}

fn up_to_booked(needs: &[ArrivalNeed]) -> Vec<Event> {
    walk(needs, &[Command::RequestDocument, issued(), itinerary()])
}

fn refused(state: &Return, command: &Command) -> DomainError {
    decide(state, command).expect_err("the command is refused")
}

#[test]
fn a_return_walks_from_opening_to_handover() {
    let history = walk(
        &[ArrivalNeed::Escort],
        &[
            Command::RequestDocument,
            issued(),
            itinerary(),
            escort(),
            Command::Depart { departed_at: T0 },
            Command::Arrive { arrived_at: T1 },
            handover(T1),
        ],
    );
    let statuses: Vec<ReturnStatus> = (1..=history.len()).map(|n| given(&history[..n]).status).collect();
    assert_eq!(
        statuses,
        [
            ReturnStatus::Opened,
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
    );
    let done = given(&history);
    assert_eq!(done.version, 10);
    assert!(done.is_finished());
    assert_eq!(done.holders(), ["ru-iom", "kg-consulate-moscow"]);
    assert_eq!((done.from_country(), done.to_country()), ("ru", "kg"));
    assert_eq!(
        refused(
            &done,
            &Command::Halt {
                reason: HaltReason::PersonUnavailable
            }
        ),
        DomainError::Finished
    );
    assert_eq!(refused(&done, &handover(T1)), DomainError::Finished);
}

#[test]
fn an_opening_happens_once_and_commands_need_an_opened_return() {
    let Event::ReturnOpened(o) = opened() else {
        unreachable!()
    };
    let open = Command::Open(Box::new(o));
    assert_eq!(decide(&Return::default(), &open), Ok(vec![opened()]));
    assert_eq!(refused(&given(&[opened()]), &open), DomainError::AlreadyOpened);
    assert_eq!(refused(&Return::default(), &consent(&[])), DomainError::NotFound);
    assert_eq!(
        refused(
            &Return::default(),
            &Command::Halt {
                reason: HaltReason::ConsentWithdrawn
            }
        ),
        DomainError::NotFound
    );
}

#[test]
fn every_step_out_of_order_is_refused_naming_where_the_return_is() {
    let opened_only = given(&[opened()]);
    for command in [
        assessment(true, &[]),
        Command::RequestDocument,
        issued(),
        Command::RecordDocument(None),
        itinerary(),
        escort(),
        Command::Depart { departed_at: T0 },
        Command::Arrive { arrived_at: T1 },
        handover(T1),
    ] {
        assert!(
            matches!(
                refused(&opened_only, &command),
                DomainError::StepOutOfOrder { at: "OPENED", .. }
            ),
            "{command:?}"
        );
    }
    let consented = given(&walk(&[], &[])[..2]);
    assert_eq!(
        refused(&consented, &consent(&[])),
        DomainError::StepOutOfOrder {
            at: "CONSENTED",
            expected: "OPENED"
        }
    );
    assert_eq!(
        refused(&consented, &Command::RequestDocument),
        DomainError::StepOutOfOrder {
            at: "CONSENTED",
            expected: "ASSESSED"
        }
    );
    let booked = given(&up_to_booked(&[]));
    assert_eq!(
        refused(&booked, &itinerary()),
        DomainError::StepOutOfOrder {
            at: "ITINERARY_BOOKED",
            expected: "DOCUMENT_ISSUED"
        }
    );
    assert_eq!(
        refused(&booked, &handover(T1)),
        DomainError::StepOutOfOrder {
            at: "ITINERARY_BOOKED",
            expected: "ARRIVED"
        }
    );
    assert_eq!(
        DomainError::StepOutOfOrder { at: "", expected: "" }.code(),
        "STEP_OUT_OF_ORDER"
    );
}

#[test]
fn an_unsafe_return_halts_in_the_same_command() {
    let consented = given(&walk(&[], &[])[..2]);
    let events = decide(&consented, &assessment(false, &[])).unwrap();
    assert_eq!(events.len(), 2);
    assert!(matches!(&events[0], Event::RiskAssessed(r) if !r.safe_to_return));
    assert_eq!(
        events[1],
        Event::Halted(pb::ReturnHalted {
            reason: HaltReason::RiskFound as i32,
            halted_at: ReturnStatus::Assessed as i32,
        })
    );
    let mut history = walk(&[], &[])[..2].to_vec();
    history.extend(events);
    let halted = given(&history);
    assert_eq!(halted.status, ReturnStatus::Halted);
    assert_eq!(refused(&halted, &Command::RequestDocument), DomainError::Finished);
}

#[test]
fn a_refused_document_halts_the_return() {
    let requested = given(&walk(&[], &[Command::RequestDocument]));
    let events = decide(&requested, &Command::RecordDocument(None)).unwrap();
    assert_eq!(
        events,
        [Event::Halted(pb::ReturnHalted {
            reason: HaltReason::DocumentRefused as i32,
            halted_at: ReturnStatus::DocumentRequested as i32,
        })]
    );
    let issued_events = decide(&requested, &issued()).unwrap();
    assert!(matches!(&issued_events[..], [Event::TravelDocumentIssued(_)]));
}

#[test]
fn the_escort_is_required_before_departure_only_when_the_assessment_asked_for_one() {
    let depart = Command::Depart { departed_at: T0 };
    let needs_escort = given(&up_to_booked(&[ArrivalNeed::Escort, ArrivalNeed::Medical]));
    assert!(needs_escort.needs_escort());
    assert_eq!(refused(&needs_escort, &depart), DomainError::EscortRequired);
    let escorted = given(&walk(
        &[ArrivalNeed::Escort],
        &[Command::RequestDocument, issued(), itinerary(), escort()],
    ));
    assert!(matches!(&decide(&escorted, &depart).unwrap()[..], [Event::Departed(_)]));
    let no_escort = given(&up_to_booked(&[ArrivalNeed::Shelter]));
    assert!(matches!(
        &decide(&no_escort, &depart).unwrap()[..],
        [Event::Departed(_)]
    ));
    // Optional, but allowed, without the need; and only once.
    let optional = given(&walk(&[], &[Command::RequestDocument, issued(), itinerary(), escort()]));
    assert_eq!(optional.status, ReturnStatus::EscortAssigned);
    assert!(matches!(
        refused(&optional, &escort()),
        DomainError::StepOutOfOrder { .. }
    ));
}

#[test]
fn arrival_and_handover_are_not_before_the_step_they_follow() {
    let departed = given(&walk(
        &[],
        &[
            Command::RequestDocument,
            issued(),
            itinerary(),
            Command::Depart { departed_at: T1 },
        ],
    ));
    assert_eq!(
        refused(&departed, &Command::Arrive { arrived_at: T0 }),
        DomainError::TimeOutOfOrder
    );
    let arrived = given(&walk(
        &[],
        &[
            Command::RequestDocument,
            issued(),
            itinerary(),
            Command::Depart { departed_at: T0 },
            Command::Arrive { arrived_at: T1 },
        ],
    ));
    assert_eq!(refused(&arrived, &handover(T0)), DomainError::TimeOutOfOrder);
    assert!(decide(&arrived, &handover(T1)).is_ok());
}

#[test]
fn a_return_halts_at_any_step_before_departure_and_not_after() {
    let steps = [
        Command::RequestDocument,
        issued(),
        itinerary(),
        escort(),
        Command::Depart { departed_at: T0 },
        Command::Arrive { arrived_at: T1 },
    ];
    let halt = Command::Halt {
        reason: HaltReason::PersonUnavailable,
    };
    // Opened, consented, assessed, each step before departure: halted where it stood.
    let mut before_departure = vec![given(&[opened()]), given(&walk(&[], &[])[..2])];
    before_departure.extend((0..=4).map(|n| given(&walk(&[], &steps[..n]))));
    for state in before_departure {
        let events = decide(&state, &halt).unwrap();
        assert_eq!(
            events,
            [Event::Halted(pb::ReturnHalted {
                reason: HaltReason::PersonUnavailable as i32,
                halted_at: state.status as i32,
            })],
            "at {:?}",
            state.status
        );
    }
    for n in [5, 6] {
        let state = given(&walk(&[], &steps[..n]));
        assert_eq!(
            refused(&state, &halt),
            DomainError::AlreadyDeparted,
            "at {:?}",
            state.status
        );
    }
    let mut history = vec![opened()];
    history.extend(decide(&given(&history), &halt).unwrap());
    assert_eq!(refused(&given(&history), &halt), DomainError::Finished);
}

fn snapshot(origin_version: u64, status: ReturnStatus) -> pb::CrossBorderReturn {
    pb::CrossBorderReturn {
        return_id: "r1".into(),
        from_country: "ru".into(),
        to_country: "kg".into(),
        status: status as i32,
        origin_version,
        ..Default::default()
    }
}

fn announce(origin_version: u64, status: ReturnStatus) -> Command {
    Command::Announce {
        from_country: "ru".into(),
        snapshot: Box::new(snapshot(origin_version, status)),
        identifiers: None,
    }
}

#[test]
fn an_incoming_return_takes_only_newer_snapshots_and_no_commands() {
    let first = decide(&Return::default(), &announce(2, ReturnStatus::Consented)).unwrap();
    assert!(matches!(&first[..], [Event::Announced(a)] if a.from_country == "ru"));
    let incoming = given(&first);
    assert!(incoming.is_incoming());
    assert_eq!(
        (incoming.status, incoming.origin_version()),
        (ReturnStatus::Consented, 2)
    );
    assert_eq!((incoming.from_country(), incoming.to_country()), ("ru", "kg"));
    // The same snapshot again, or an older one: nothing.
    assert_eq!(decide(&incoming, &announce(2, ReturnStatus::Consented)), Ok(vec![]));
    assert_eq!(decide(&incoming, &announce(1, ReturnStatus::Opened)), Ok(vec![]));
    let later = decide(&incoming, &announce(5, ReturnStatus::DocumentIssued)).unwrap();
    assert!(matches!(&later[..], [Event::AnnouncedStep(_)]));
    let mut history = first.clone();
    history.extend(later);
    let newer = given(&history);
    assert_eq!(
        (newer.status, newer.origin_version(), newer.version),
        (ReturnStatus::DocumentIssued, 5, 2)
    );
    for command in [
        consent(&[]),
        Command::RequestDocument,
        Command::Halt {
            reason: HaltReason::ConsentWithdrawn,
        },
    ] {
        assert_eq!(refused(&newer, &command), DomainError::IncomingReturn);
    }
    // A snapshot never lands on a return opened here.
    assert_eq!(
        refused(&given(&[opened()]), &announce(9, ReturnStatus::Arrived)),
        DomainError::NotIncoming
    );
}

fn everything() -> PersonalIdentifiers {
    PersonalIdentifiers {
        full_name: "Aigul Asanova".into(),
        date_of_birth: "1999-04-02".into(),
        documents: vec![nrm_proto::common::v1::IdentityDocument {
            r#type: 5,
            number: "CR1".into(),
            issuing_country: "KG".into(),
        }],
        phone: "+996 555 000".into(),
        address: "Osh".into(),
    }
}

/// An outgoing return assessed with `shared` consented, with a shelter need.
fn assessed_sharing(shared: &[SharedField]) -> Return {
    let mut history = vec![opened()];
    for command in [consent(shared), assessment(true, &[ArrivalNeed::Shelter])] {
        history.extend(decide(&given(&history), &command).unwrap());
    }
    given(&history)
}

#[test]
fn a_snapshot_carries_only_the_consented_fields() {
    let nothing = crossing::snapshot(&assessed_sharing(&[]), &[], Some(&everything()));
    assert_eq!(
        (nothing.identifiers.as_ref(), nothing.gender, nothing.needs.len()),
        (None, 0, 0)
    );
    assert!(!nothing.risk_shared && nothing.form_of_exploitation.is_empty());
    assert_eq!(
        (nothing.origin_version, nothing.status),
        (3, ReturnStatus::Assessed as i32)
    );
    assert_eq!(
        (nothing.from_country.as_str(), nothing.to_country.as_str()),
        ("ru", "kg")
    );
    assert_eq!(nothing.foreign_reference, "RU-1");

    let identity = crossing::snapshot(&assessed_sharing(&[SharedField::Identity]), &[], Some(&everything()));
    let ids = identity.identifiers.expect("identity crosses");
    assert_eq!((ids.full_name.as_str(), ids.documents.len()), ("Aigul Asanova", 1));
    assert!(ids.phone.is_empty() && ids.address.is_empty());

    let contact = crossing::snapshot(&assessed_sharing(&[SharedField::Contact]), &[], Some(&everything()));
    let ids = contact.identifiers.expect("contact crosses");
    assert!(ids.full_name.is_empty() && ids.documents.is_empty() && ids.date_of_birth.is_empty());
    assert_eq!(ids.address, "Osh");

    let all = crossing::snapshot(
        &assessed_sharing(&[SharedField::Profile, SharedField::Needs, SharedField::Risk]),
        &[],
        Some(&everything()),
    );
    assert_eq!(all.identifiers, None);
    assert_eq!((all.gender, all.age_band), (1, 4));
    assert_eq!(all.needs, [ArrivalNeed::Shelter as i32]);
    assert!(all.risk_shared && all.safe_to_return);
    assert!(all.consent_to_reintegration_referral);
}

#[test]
fn after_a_withdrawal_the_snapshot_says_only_that_the_return_halted() {
    let mut state = assessed_sharing(&[
        SharedField::Identity,
        SharedField::Contact,
        SharedField::Profile,
        SharedField::Needs,
        SharedField::Risk,
    ]);
    let halt = decide(
        &state,
        &Command::Halt {
            reason: HaltReason::ConsentWithdrawn,
        },
    )
    .unwrap();
    state = halt.iter().fold(state, evolve);
    let step = step(&state, &halt[0], T0, "ru-iom");
    let last = crossing::snapshot(&state, std::slice::from_ref(&step), Some(&everything()));
    assert_eq!(
        last,
        pb::CrossBorderReturn {
            return_id: "r1".into(),
            from_country: "ru".into(),
            to_country: "kg".into(),
            status: ReturnStatus::Halted as i32,
            origin_version: 4,
            halt_reason: HaltReason::ConsentWithdrawn as i32,
            steps: vec![step],
            ..Default::default()
        }
    );
    assert!(state.crosses());
    assert!(!given(&[opened()]).crosses(), "nothing crosses before the consent");
}
