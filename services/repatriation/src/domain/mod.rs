//! The return: a pure aggregate.
//!
//! `decide(&state, &command)` answers with the events a command causes (or
//! why it cannot happen); `evolve(state, &event)` folds an event into the
//! state. No clock, key or database in here: times arrive in the commands,
//! identifiers arrive sealed.
//!
//! One return, two deployments. In the destination country the return is
//! OUTGOING and walks one way:
//!
//! ```text
//! OPENED → CONSENTED → ASSESSED → DOCUMENT_REQUESTED → DOCUMENT_ISSUED
//!        → ITINERARY_BOOKED (→ ESCORT_ASSIGNED) → DEPARTED → ARRIVED → HANDED_OVER
//! ```
//!
//! The escort step is required before departure only when the assessment
//! named `ARRIVAL_NEED_ESCORT`. An assessment that finds it unsafe to return
//! halts the return in the same command (`RISK_FOUND`), as does a refused
//! travel document (`DOCUMENT_REFUSED`); `HaltReturn` halts it at any step
//! before departure. A halted or handed-over return is finished.
//!
//! In the home country the same return is INCOMING: built only from the
//! snapshots that crossed ([`Command::Announce`]), each applied once and only
//! when it is newer than the last one applied; its other commands are refused.
//!
//! # Layout
//! - this module: state, commands, `decide`, `evolve`, domain errors.
//! - [`crossing`]: what crosses the border after a step, limited to the consented fields.
//! - [`parse`]: validating constructors from requests, naming offending fields.

pub mod crossing;
pub mod parse;

use nrm_kernel::ids::ReturnId;
use nrm_proto::common::v1::SealedData;
use nrm_proto::repatriation::v1 as pb;
use pb::repatriation_event::Event;
use pb::{ArrivalNeed, Direction, HaltReason, ReturnStatus, SharedField};
use prost_types::Timestamp;

/// Stable name of the aggregate, used in stream IDs and subjects.
pub const NAME: &str = "return";

/// Stream ID of a return.
#[must_use]
pub fn stream_id(return_id: ReturnId) -> String {
    format!("{NAME}-{return_id}")
}

/// The state of one return, folded from its events.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Return {
    /// Number of events so far (0: the return does not exist here).
    pub version: u64,
    /// Opened here (outgoing) or announced by another country (incoming).
    pub direction: Direction,
    /// Where it stands.
    pub status: ReturnStatus,
    /// Outgoing: the opening, as recorded (identifiers sealed).
    pub opened: Option<pb::ReturnOpened>,
    /// Outgoing: the person's consent.
    pub consent: Option<pb::ReturnConsentRecorded>,
    /// Outgoing: the risk assessment.
    pub risk: Option<pb::RiskAssessed>,
    /// Outgoing: the travel document (its number sealed).
    pub document: Option<pb::TravelDocumentIssued>,
    /// Outgoing: the itinerary.
    pub itinerary: Option<pb::ItineraryBooked>,
    /// Outgoing: the escort.
    pub escort: Option<pb::EscortAssigned>,
    /// Outgoing: when the person left.
    pub departed_at: Option<Timestamp>,
    /// Outgoing: when the person arrived.
    pub arrived_at: Option<Timestamp>,
    /// Outgoing: the handover.
    pub handed_over: Option<pb::ReturnHandedOver>,
    /// Outgoing: why and where it halted.
    pub halted: Option<pb::ReturnHalted>,
    /// Incoming: the country that announced it.
    pub announced_by: String,
    /// Incoming: the newest snapshot applied, without identifiers.
    pub announced: Option<pb::CrossBorderReturn>,
    /// Incoming: the identifiers of the newest snapshot, sealed under this
    /// deployment's key for the return (none when none were shared).
    pub announced_identifiers: Option<SealedData>,
}

impl Return {
    /// Whether the return exists in this deployment.
    #[must_use]
    pub fn exists(&self) -> bool {
        self.version > 0
    }

    /// Whether it was announced by another country.
    #[must_use]
    pub fn is_incoming(&self) -> bool {
        self.direction == Direction::Incoming
    }

    /// Whether nothing more happens to it.
    #[must_use]
    pub fn is_finished(&self) -> bool {
        matches!(self.status, ReturnStatus::Halted | ReturnStatus::HandedOver)
    }

    /// Incoming: the origin version of the newest snapshot applied (0: none).
    #[must_use]
    pub fn origin_version(&self) -> u64 {
        self.announced.as_ref().map_or(0, |s| s.origin_version)
    }

    /// Whether a snapshot of `origin_version` would change this incoming
    /// return (it is newer than the last one applied, or the first).
    #[must_use]
    pub fn accepts_snapshot(&self, origin_version: u64) -> bool {
        !self.exists() || (self.is_incoming() && origin_version > self.origin_version())
    }

    /// The country the person goes to (lower case).
    #[must_use]
    pub fn to_country(&self) -> &str {
        match (&self.opened, &self.announced) {
            (Some(o), _) => &o.citizenship,
            (None, Some(s)) => &s.to_country,
            (None, None) => "",
        }
    }

    /// The country the person leaves (lower case).
    #[must_use]
    pub fn from_country(&self) -> &str {
        match (&self.opened, &self.announced) {
            (Some(o), _) => &o.from_country,
            (None, Some(s)) => &s.from_country,
            (None, None) => "",
        }
    }

    /// Outgoing: the agencies holding the return, the one that opened it
    /// and the consulate named to issue the travel document.
    #[must_use]
    pub fn holders(&self) -> Vec<&str> {
        self.opened
            .as_ref()
            .map(|o| vec![o.opened_by.as_str(), o.consulate_agency.as_str()])
            .unwrap_or_default()
    }

    /// Whether the assessment asked for an escort.
    #[must_use]
    pub fn needs_escort(&self) -> bool {
        self.risk
            .as_ref()
            .is_some_and(|r| r.needs.contains(&(ArrivalNeed::Escort as i32)))
    }

    /// Whether the person consented to share `field` with the home country.
    #[must_use]
    pub fn shares(&self, field: SharedField) -> bool {
        self.consent
            .as_ref()
            .is_some_and(|c| c.shared_fields.contains(&(field as i32)))
    }

    /// Whether the person withdrew the consent (the return halted for it).
    #[must_use]
    pub fn consent_withdrawn(&self) -> bool {
        self.halted
            .as_ref()
            .is_some_and(|h| h.reason == HaltReason::ConsentWithdrawn as i32)
    }

    /// Whether the step just taken crosses the border: outgoing, after
    /// (and including) the consent.
    #[must_use]
    pub fn crosses(&self) -> bool {
        self.direction == Direction::Outgoing && self.consent.is_some()
    }
}

/// What a caller (or, for an announcement, the crossing reaction) asks of a return.
#[derive(Debug, Clone, PartialEq)]
pub enum Command {
    /// Open the return; the application sealed the identifiers.
    Open(Box<pb::ReturnOpened>),
    /// The person's informed consent to return.
    RecordConsent(pb::ReturnConsentRecorded),
    /// The risk assessment.
    AssessRisk(pb::RiskAssessed),
    /// Ask the consulate for a travel document.
    RequestDocument,
    /// The consulate's answer: the document (number sealed), or `None` for a refusal.
    RecordDocument(Option<pb::TravelDocumentIssued>),
    /// The itinerary.
    BookItinerary(pb::ItineraryBooked),
    /// The escort.
    AssignEscort(pb::EscortAssigned),
    /// The person left.
    Depart {
        /// When.
        departed_at: Timestamp,
    },
    /// The person arrived.
    Arrive {
        /// When.
        arrived_at: Timestamp,
    },
    /// The person was handed over to the home country's NRM.
    HandOver(pb::ReturnHandedOver),
    /// Halt the return before departure.
    Halt {
        /// Why.
        reason: HaltReason,
    },
    /// Home country: a snapshot that crossed the border (opened, decoded,
    /// its identifiers sealed again under this deployment's key).
    Announce {
        /// The announcing country (lower case).
        from_country: String,
        /// The snapshot, without identifiers.
        snapshot: Box<pb::CrossBorderReturn>,
        /// Its identifiers, sealed here.
        identifiers: Option<SealedData>,
    },
}

/// Why a command cannot happen in the return's state.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DomainError {
    /// The return does not exist.
    #[error("the return does not exist")]
    NotFound,
    /// A return with this ID exists already.
    #[error("the return was already opened")]
    AlreadyOpened,
    /// The return was announced by another country: it is read-only here.
    #[error("the return was announced by another country: its steps are recorded there")]
    IncomingReturn,
    /// A snapshot for a return that was opened here.
    #[error("the return was opened in this country: nothing is announced for it")]
    NotIncoming,
    /// The return halted or was handed over.
    #[error("the return is finished (halted or handed over)")]
    Finished,
    /// Halting after departure.
    #[error("the person has departed: the return can no longer be halted")]
    AlreadyDeparted,
    /// A step that does not come next.
    #[error("the return is at {at}: this step comes at {expected}")]
    StepOutOfOrder {
        /// Where the return is.
        at: &'static str,
        /// Where it must be for the step.
        expected: &'static str,
    },
    /// Departure without the escort the assessment asked for.
    #[error("the assessment asked for an escort: assign one before departure")]
    EscortRequired,
    /// A time before the step it follows (an arrival before the departure).
    #[error("the time is before the step it follows")]
    TimeOutOfOrder,
}

impl DomainError {
    /// Stable code of the rule.
    #[must_use]
    pub const fn code(&self) -> &'static str {
        match self {
            DomainError::NotFound => "NOT_FOUND",
            DomainError::AlreadyOpened => "ALREADY_OPENED",
            DomainError::IncomingReturn => "INCOMING_RETURN",
            DomainError::NotIncoming => "NOT_INCOMING",
            DomainError::Finished => "FINISHED",
            DomainError::AlreadyDeparted => "ALREADY_DEPARTED",
            DomainError::StepOutOfOrder { .. } => "STEP_OUT_OF_ORDER",
            DomainError::EscortRequired => "ESCORT_REQUIRED",
            DomainError::TimeOutOfOrder => "TIME_OUT_OF_ORDER",
        }
    }
}

/// A status as a short name (`DOCUMENT_ISSUED`).
#[must_use]
pub fn status_name(status: ReturnStatus) -> &'static str {
    status.as_str_name().trim_start_matches("RETURN_STATUS_")
}

fn before(a: &Timestamp, b: &Timestamp) -> bool {
    (a.seconds, a.nanos) < (b.seconds, b.nanos)
}

/// `Ok` when `state` is at `expected`.
fn at(state: &Return, expected: ReturnStatus) -> Result<(), DomainError> {
    if state.status == expected {
        Ok(())
    } else {
        Err(DomainError::StepOutOfOrder {
            at: status_name(state.status),
            expected: status_name(expected),
        })
    }
}

fn halted(reason: HaltReason, halted_at: ReturnStatus) -> Event {
    Event::Halted(pb::ReturnHalted {
        reason: reason as i32,
        halted_at: halted_at as i32,
    })
}

/// The events `command` causes in `state`.
///
/// # Errors
/// A [`DomainError`] when the command does not fit the return's state.
pub fn decide(state: &Return, command: &Command) -> Result<Vec<Event>, DomainError> {
    match command {
        Command::Open(opened) => {
            if state.exists() {
                return Err(DomainError::AlreadyOpened);
            }
            Ok(vec![Event::ReturnOpened((**opened).clone())])
        }
        Command::Announce {
            from_country,
            snapshot,
            identifiers,
        } => {
            if !state.exists() {
                return Ok(vec![Event::Announced(pb::ReturnAnnounced {
                    return_id: snapshot.return_id.clone(),
                    from_country: from_country.clone(),
                    snapshot: Some((**snapshot).clone()),
                    identifiers: identifiers.clone(),
                })]);
            }
            if !state.is_incoming() {
                return Err(DomainError::NotIncoming);
            }
            // An older snapshot (or the same again) adds nothing: later ones
            // carry every earlier step.
            if !state.accepts_snapshot(snapshot.origin_version) {
                return Ok(Vec::new());
            }
            Ok(vec![Event::AnnouncedStep(pb::AnnouncedStepRecorded {
                snapshot: Some((**snapshot).clone()),
                identifiers: identifiers.clone(),
            })])
        }
        _ if !state.exists() => Err(DomainError::NotFound),
        _ if state.is_incoming() => Err(DomainError::IncomingReturn),
        _ if state.is_finished() => Err(DomainError::Finished),
        Command::Halt { reason } => match state.status {
            ReturnStatus::Departed | ReturnStatus::Arrived => Err(DomainError::AlreadyDeparted),
            status => Ok(vec![halted(*reason, status)]),
        },
        Command::RecordConsent(consent) => {
            at(state, ReturnStatus::Opened)?;
            Ok(vec![Event::ConsentRecorded(consent.clone())])
        }
        Command::AssessRisk(risk) => {
            at(state, ReturnStatus::Consented)?;
            let mut events = vec![Event::RiskAssessed(risk.clone())];
            if !risk.safe_to_return {
                events.push(halted(HaltReason::RiskFound, ReturnStatus::Assessed));
            }
            Ok(events)
        }
        Command::RequestDocument => {
            at(state, ReturnStatus::Assessed)?;
            Ok(vec![Event::TravelDocumentRequested(pb::TravelDocumentRequested {})])
        }
        Command::RecordDocument(document) => {
            at(state, ReturnStatus::DocumentRequested)?;
            Ok(vec![match document {
                Some(issued) => Event::TravelDocumentIssued(issued.clone()),
                None => halted(HaltReason::DocumentRefused, ReturnStatus::DocumentRequested),
            }])
        }
        Command::BookItinerary(itinerary) => {
            at(state, ReturnStatus::DocumentIssued)?;
            Ok(vec![Event::ItineraryBooked(itinerary.clone())])
        }
        Command::AssignEscort(escort) => {
            at(state, ReturnStatus::ItineraryBooked)?;
            Ok(vec![Event::EscortAssigned(escort.clone())])
        }
        Command::Depart { departed_at } => {
            match state.status {
                ReturnStatus::EscortAssigned => {}
                ReturnStatus::ItineraryBooked if state.needs_escort() => return Err(DomainError::EscortRequired),
                ReturnStatus::ItineraryBooked => {}
                _ => at(state, ReturnStatus::ItineraryBooked)?,
            }
            Ok(vec![Event::Departed(pb::ReturnDeparted {
                departed_at: Some(*departed_at),
            })])
        }
        Command::Arrive { arrived_at } => {
            at(state, ReturnStatus::Departed)?;
            if state.departed_at.as_ref().is_some_and(|d| before(arrived_at, d)) {
                return Err(DomainError::TimeOutOfOrder);
            }
            Ok(vec![Event::Arrived(pb::ReturnArrived {
                arrived_at: Some(*arrived_at),
            })])
        }
        Command::HandOver(handover) => {
            at(state, ReturnStatus::Arrived)?;
            let too_early = match (&handover.handed_over_at, &state.arrived_at) {
                (Some(h), Some(a)) => before(h, a),
                _ => false,
            };
            if too_early {
                return Err(DomainError::TimeOutOfOrder);
            }
            Ok(vec![Event::HandedOver(handover.clone())])
        }
    }
}

fn announce(mut state: Return, snapshot: Option<&pb::CrossBorderReturn>, identifiers: Option<&SealedData>) -> Return {
    state.direction = Direction::Incoming;
    if let Some(snapshot) = snapshot {
        state.status = ReturnStatus::try_from(snapshot.status).unwrap_or(ReturnStatus::Unspecified);
        state.announced = Some(snapshot.clone());
    }
    state.announced_identifiers = identifiers.cloned();
    state
}

/// The return after `event`.
#[must_use]
pub fn evolve(mut state: Return, event: &Event) -> Return {
    state.version += 1;
    match event {
        Event::ReturnOpened(opened) => {
            state.direction = Direction::Outgoing;
            state.status = ReturnStatus::Opened;
            state.opened = Some(opened.clone());
        }
        Event::ConsentRecorded(consent) => {
            state.status = ReturnStatus::Consented;
            state.consent = Some(consent.clone());
        }
        Event::RiskAssessed(risk) => {
            state.status = ReturnStatus::Assessed;
            state.risk = Some(risk.clone());
        }
        Event::TravelDocumentRequested(_) => state.status = ReturnStatus::DocumentRequested,
        Event::TravelDocumentIssued(document) => {
            state.status = ReturnStatus::DocumentIssued;
            state.document = Some(document.clone());
        }
        Event::ItineraryBooked(itinerary) => {
            state.status = ReturnStatus::ItineraryBooked;
            state.itinerary = Some(itinerary.clone());
        }
        Event::EscortAssigned(escort) => {
            state.status = ReturnStatus::EscortAssigned;
            state.escort = Some(escort.clone());
        }
        Event::Departed(departed) => {
            state.status = ReturnStatus::Departed;
            state.departed_at = departed.departed_at;
        }
        Event::Arrived(arrived) => {
            state.status = ReturnStatus::Arrived;
            state.arrived_at = arrived.arrived_at;
        }
        Event::HandedOver(handover) => {
            state.status = ReturnStatus::HandedOver;
            state.handed_over = Some(handover.clone());
        }
        Event::Halted(halt) => {
            state.status = ReturnStatus::Halted;
            state.halted = Some(*halt);
        }
        Event::Announced(announced) => {
            state.announced_by.clone_from(&announced.from_country);
            state = announce(state, announced.snapshot.as_ref(), announced.identifiers.as_ref());
        }
        Event::AnnouncedStep(step) => {
            state = announce(state, step.snapshot.as_ref(), step.identifiers.as_ref());
        }
    }
    state
}

/// The step `event` made, as both sides see it: its name, the status it
/// left `after` in (the return after the event), when and by whom.
#[must_use]
pub fn step(after: &Return, event: &Event, at: Timestamp, agency: &str) -> pb::Step {
    pb::Step {
        step: event_type(event).to_owned(),
        status_after: after.status as i32,
        at: Some(at),
        agency: agency.to_owned(),
        origin_version: after.version,
    }
}

/// Name of an event's variant (its message's name), as stored, sent in
/// headers and shown as a step.
#[must_use]
pub fn event_type(event: &Event) -> &'static str {
    match event {
        Event::ReturnOpened(_) => "ReturnOpened",
        Event::ConsentRecorded(_) => "ReturnConsentRecorded",
        Event::RiskAssessed(_) => "RiskAssessed",
        Event::TravelDocumentRequested(_) => "TravelDocumentRequested",
        Event::TravelDocumentIssued(_) => "TravelDocumentIssued",
        Event::ItineraryBooked(_) => "ItineraryBooked",
        Event::EscortAssigned(_) => "EscortAssigned",
        Event::Departed(_) => "ReturnDeparted",
        Event::Arrived(_) => "ReturnArrived",
        Event::HandedOver(_) => "ReturnHandedOver",
        Event::Halted(_) => "ReturnHalted",
        Event::Announced(_) => "ReturnAnnounced",
        Event::AnnouncedStep(_) => "AnnouncedStepRecorded",
    }
}

#[cfg(test)]
mod tests;
