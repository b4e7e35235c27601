//! The referral aggregate: one agency refers a person to another for named
//! services, under a consent; the receiver accepts or declines within a time
//! limit (or the referral is escalated as overdue); a declined referral can
//! be redirected; an accepted one records services delivered and closes with
//! an outcome. A withdrawn consent cancels it; the shelter service's answer
//! to its shelter need (a bed held, or none free) is recorded on it.

use nrm_proto::referral::v1 as pb;
use pb::referral_event::Event;
use prost_types::Timestamp;

use super::consent::Consent;
use super::{DomainError, PersonFacts, PersonStatus, add_seconds, compare};

/// Stable name of the aggregate, used in stream IDs and subjects.
pub const NAME: &str = "referral";

/// Stream ID of a referral.
#[must_use]
pub fn stream_id(referral_id: nrm_kernel::ids::ReferralId) -> String {
    format!("{NAME}-{referral_id}")
}

/// Status of a referral.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Status {
    /// No such referral.
    #[default]
    None,
    /// Awaiting the receiver's answer.
    Pending,
    /// Accepted by the receiver.
    Accepted,
    /// Declined by the receiver (may be redirected).
    Declined,
    /// Redirected to another receiver, awaiting its answer.
    Redirected,
    /// Closed with an outcome.
    Closed,
    /// Cancelled (for example because the consent was withdrawn).
    Cancelled,
}

impl Status {
    /// The protobuf status.
    #[must_use]
    pub fn to_proto(self) -> pb::ReferralStatus {
        match self {
            Status::None => pb::ReferralStatus::Unspecified,
            Status::Pending => pb::ReferralStatus::Pending,
            Status::Accepted => pb::ReferralStatus::Accepted,
            Status::Declined => pb::ReferralStatus::Declined,
            Status::Redirected => pb::ReferralStatus::Redirected,
            Status::Closed => pb::ReferralStatus::Closed,
            Status::Cancelled => pb::ReferralStatus::Cancelled,
        }
    }

    /// Awaiting the receiver's answer (pending, or redirected to a new receiver).
    #[must_use]
    pub fn awaits_answer(self) -> bool {
        matches!(self, Status::Pending | Status::Redirected)
    }

    /// Open: awaiting an answer or accepted. A withdrawn consent cancels open referrals.
    #[must_use]
    pub fn is_open(self) -> bool {
        self.awaits_answer() || self == Status::Accepted
    }
}

/// The shelter service's last answer to the shelter need.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Placement {
    /// A bed was held.
    Held(String),
    /// No bed was free; the nearest regions with one.
    NoBed(Vec<String>),
}

/// The state of one referral, folded from its events.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Referral {
    /// Number of events so far (0: the referral does not exist).
    pub version: u64,
    /// The referral as created.
    pub created: Option<pb::ReferralCreated>,
    /// Current status.
    pub status: Status,
    /// The agency that must answer (changes on redirection).
    pub receiving_agency: String,
    /// The consent the referral rests on (changes on redirection).
    pub consent_id: String,
    /// When the current receiver must have answered.
    pub answer_due_at: Option<Timestamp>,
    /// The current receiver did not answer in time; escalated.
    pub overdue: bool,
    /// Why the receiver declined.
    pub decline_reason: i32,
    /// Kinds of service delivered so far.
    pub services_delivered: Vec<i32>,
    /// How it closed.
    pub outcome: i32,
    /// The shelter of the last bed held.
    pub shelter_id: String,
    /// The last hold.
    pub hold_id: String,
    /// Every hold recorded (a hold is recorded once).
    pub holds: Vec<String>,
    /// When no bed was free: the nearest regions with one.
    pub nearest_regions_with_beds: Vec<String>,
    /// The last answer of the shelter service.
    pub placement: Option<Placement>,
}

impl Referral {
    fn id(&self) -> String {
        self.created.as_ref().map(|c| c.referral_id.clone()).unwrap_or_default()
    }

    /// The agency that sent the referral.
    #[must_use]
    pub fn referring_agency(&self) -> &str {
        self.created.as_ref().map_or("", |c| c.referring_agency.as_str())
    }

    fn services(&self) -> &[i32] {
        self.created.as_ref().map_or(&[], |c| c.services.as_slice())
    }

    fn urgency(&self) -> i32 {
        self.created.as_ref().map_or(0, |c| c.urgency)
    }
}

/// Time limits for an answer, by urgency.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Deadlines {
    /// Seconds to answer an urgent referral.
    pub urgent_seconds: u64,
    /// Seconds to answer a normal referral.
    pub normal_seconds: u64,
}

impl Deadlines {
    /// When a referral of `urgency` made at `now` must be answered.
    #[must_use]
    pub fn due(&self, urgency: i32, now: &Timestamp) -> Timestamp {
        let seconds = if urgency == pb::Urgency::Urgent as i32 {
            self.urgent_seconds
        } else {
            self.normal_seconds
        };
        add_seconds(now, seconds)
    }
}

/// What a caller (or a timer, or a reaction) asks of a referral.
#[derive(Debug, Clone, PartialEq)]
pub enum Command {
    /// Refer a person.
    Create {
        /// The referral, validated; `created_at` is now, `answer_due_at` is set by `decide`.
        referral: Box<pb::ReferralCreated>,
        /// What identification knows of the person (`None`: unknown).
        person: Option<PersonFacts>,
        /// The consent named.
        consent: Box<Consent>,
        /// Policy: refer persons found not identified too.
        allow_not_identified: bool,
        /// Time limits.
        deadlines: Deadlines,
    },
    /// The receiver accepts.
    Accept {
        /// The caller's agency.
        agency: String,
        /// Now.
        now: Timestamp,
    },
    /// The receiver declines.
    Decline {
        /// The caller's agency.
        agency: String,
        /// Why.
        reason: pb::DeclineReason,
        /// Now.
        now: Timestamp,
    },
    /// A declined referral is sent on to another agency (by the agency that
    /// declined it, or the national coordinator: the permission matrix decides who).
    Redirect {
        /// The new receiver.
        receiving_agency: String,
        /// The ID of the consent covering the new receiver.
        consent_id: String,
        /// That consent.
        consent: Box<Consent>,
        /// Now.
        now: Timestamp,
        /// Time limits.
        deadlines: Deadlines,
    },
    /// The answer deadline passed (a timer).
    MarkOverdue {
        /// Now.
        now: Timestamp,
    },
    /// The receiver delivered a service.
    RecordServiceDelivered {
        /// The caller's agency.
        agency: String,
        /// Which service.
        kind: pb::ServiceKind,
        /// When.
        delivered_at: Timestamp,
        /// Provider code.
        provider: String,
    },
    /// The referral is closed (by its sender, its receiver or the national
    /// coordinator: the permission matrix decides who).
    Close {
        /// How it ended.
        outcome: pb::ReferralOutcome,
        /// Now.
        now: Timestamp,
    },
    /// Cancel an open referral (consent withdrawn).
    Cancel {
        /// Why, as a code (`CONSENT_WITHDRAWN`).
        reason: String,
    },
    /// The shelter service held a bed for the referral.
    RecordBedHold {
        /// The shelter.
        shelter_id: String,
        /// The hold.
        hold_id: String,
        /// When the hold expires.
        expires_at: Option<Timestamp>,
    },
    /// The shelter service found no free bed.
    RecordNoBed {
        /// The nearest regions with a free bed.
        nearest_regions_with_beds: Vec<String>,
    },
}

fn require_receiver(referral: &Referral, agency: &str) -> Result<(), DomainError> {
    if referral.receiving_agency == agency {
        Ok(())
    } else {
        Err(DomainError::NotReceivingAgency)
    }
}

/// The events `command` causes in `referral`. Timers and reactions that find
/// nothing to do get no events (they are idempotent).
///
/// # Errors
/// A [`DomainError`] when the command does not fit the referral's state.
pub fn decide(referral: &Referral, command: &Command) -> Result<Vec<Event>, DomainError> {
    if let Command::Create {
        referral: created,
        person,
        consent,
        allow_not_identified,
        deadlines,
    } = command
    {
        if referral.version > 0 {
            return Err(DomainError::AlreadyExists(NAME));
        }
        if created.referring_agency == created.receiving_agency {
            return Err(DomainError::SenderIsReceiver);
        }
        let Some(person) = person else {
            return Err(DomainError::UnknownPerson);
        };
        if person.status == PersonStatus::NotIdentified && !allow_not_identified {
            return Err(DomainError::NotIdentified);
        }
        if person.case_id != created.case_id {
            return Err(DomainError::CaseMismatch);
        }
        let now = created.created_at.unwrap_or_default();
        consent
            .covers(&created.person_id, &created.receiving_agency, &created.services, &now)
            .map_err(DomainError::NoConsent)?;
        let mut created = (**created).clone();
        created.answer_due_at = Some(deadlines.due(created.urgency, &now));
        return Ok(vec![Event::ReferralCreated(created)]);
    }
    let Some(created) = &referral.created else {
        return Err(DomainError::NotFound(NAME));
    };
    let referral_id = referral.id();
    match command {
        Command::Create { .. } => unreachable!("handled above"),
        Command::Accept { agency, now } => {
            require_receiver(referral, agency)?;
            if !referral.status.awaits_answer() {
                return Err(DomainError::NotAwaitingAnswer);
            }
            Ok(vec![Event::ReferralAccepted(pb::ReferralAccepted {
                referral_id,
                person_id: created.person_id.clone(),
                receiving_agency: referral.receiving_agency.clone(),
                shelter_need: created.shelter_need.clone(),
                accepted_at: Some(*now),
            })])
        }
        Command::Decline { agency, reason, now } => {
            require_receiver(referral, agency)?;
            if !referral.status.awaits_answer() {
                return Err(DomainError::NotAwaitingAnswer);
            }
            Ok(vec![Event::ReferralDeclined(pb::ReferralDeclined {
                referral_id,
                receiving_agency: referral.receiving_agency.clone(),
                reason: *reason as i32,
                declined_at: Some(*now),
            })])
        }
        Command::Redirect {
            receiving_agency,
            consent_id,
            consent,
            now,
            deadlines,
        } => {
            if referral.status != Status::Declined {
                return Err(DomainError::NotDeclined);
            }
            if *receiving_agency == referral.receiving_agency {
                return Err(DomainError::SameAgency);
            }
            if receiving_agency == referral.referring_agency() {
                return Err(DomainError::SenderIsReceiver);
            }
            consent
                .covers(&created.person_id, receiving_agency, referral.services(), now)
                .map_err(DomainError::NoConsent)?;
            Ok(vec![Event::ReferralRedirected(pb::ReferralRedirected {
                referral_id,
                previous_agency: referral.receiving_agency.clone(),
                receiving_agency: receiving_agency.clone(),
                consent_id: consent_id.clone(),
                answer_due_at: Some(deadlines.due(referral.urgency(), now)),
            })])
        }
        Command::MarkOverdue { now } => {
            let due = referral.answer_due_at.unwrap_or_default();
            if !referral.status.awaits_answer() || referral.overdue || compare(now, &due).is_lt() {
                return Ok(vec![]);
            }
            Ok(vec![Event::ReferralOverdue(pb::ReferralOverdue {
                referral_id,
                receiving_agency: referral.receiving_agency.clone(),
                answer_due_at: Some(due),
                escalated_at: Some(*now),
            })])
        }
        Command::RecordServiceDelivered {
            agency,
            kind,
            delivered_at,
            provider,
        } => {
            require_receiver(referral, agency)?;
            if referral.status != Status::Accepted {
                return Err(DomainError::NotAccepted);
            }
            if !referral.services().contains(&(*kind as i32)) {
                return Err(DomainError::ServiceNotReferred);
            }
            Ok(vec![Event::ServiceDelivered(pb::ServiceDelivered {
                referral_id,
                kind: *kind as i32,
                delivered_at: Some(*delivered_at),
                provider: provider.clone(),
            })])
        }
        Command::Close { outcome, now } => {
            if referral.status != Status::Accepted {
                return Err(DomainError::NotAccepted);
            }
            Ok(vec![Event::ReferralClosed(pb::ReferralClosed {
                referral_id,
                outcome: *outcome as i32,
                closed_at: Some(*now),
            })])
        }
        Command::Cancel { reason } => {
            if !referral.status.is_open() {
                return Ok(vec![]);
            }
            Ok(vec![Event::ReferralCancelled(pb::ReferralCancelled {
                referral_id,
                person_id: created.person_id.clone(),
                receiving_agency: referral.receiving_agency.clone(),
                reason: reason.clone(),
            })])
        }
        Command::RecordBedHold {
            shelter_id,
            hold_id,
            expires_at,
        } => {
            if referral.holds.contains(hold_id) {
                return Ok(vec![]);
            }
            Ok(vec![Event::BedHoldRecorded(pb::BedHoldRecorded {
                referral_id,
                shelter_id: shelter_id.clone(),
                hold_id: hold_id.clone(),
                expires_at: *expires_at,
            })])
        }
        Command::RecordNoBed {
            nearest_regions_with_beds,
        } => {
            if referral.placement.as_ref() == Some(&Placement::NoBed(nearest_regions_with_beds.clone())) {
                return Ok(vec![]);
            }
            Ok(vec![Event::NoBedRecorded(pb::NoBedRecorded {
                referral_id,
                nearest_regions_with_beds: nearest_regions_with_beds.clone(),
            })])
        }
    }
}

/// The referral after `event` (events of other aggregates change nothing but the version).
#[must_use]
pub fn evolve(mut referral: Referral, event: &Event) -> Referral {
    referral.version += 1;
    match event {
        Event::ReferralCreated(created) => {
            referral.status = Status::Pending;
            referral.receiving_agency.clone_from(&created.receiving_agency);
            referral.consent_id.clone_from(&created.consent_id);
            referral.answer_due_at = created.answer_due_at;
            referral.created = Some(created.clone());
        }
        Event::ReferralAccepted(_) => referral.status = Status::Accepted,
        Event::ReferralDeclined(declined) => {
            referral.status = Status::Declined;
            referral.decline_reason = declined.reason;
        }
        Event::ReferralRedirected(redirected) => {
            referral.status = Status::Redirected;
            referral.receiving_agency.clone_from(&redirected.receiving_agency);
            referral.consent_id.clone_from(&redirected.consent_id);
            referral.answer_due_at = redirected.answer_due_at;
            referral.overdue = false;
            referral.decline_reason = pb::DeclineReason::Unspecified as i32;
        }
        Event::ReferralOverdue(_) => referral.overdue = true,
        Event::ServiceDelivered(delivered) if !referral.services_delivered.contains(&delivered.kind) => {
            referral.services_delivered.push(delivered.kind);
        }
        Event::ReferralClosed(closed) => {
            referral.status = Status::Closed;
            referral.outcome = closed.outcome;
        }
        Event::ReferralCancelled(_) => referral.status = Status::Cancelled,
        Event::BedHoldRecorded(hold) => {
            referral.shelter_id.clone_from(&hold.shelter_id);
            referral.hold_id.clone_from(&hold.hold_id);
            referral.holds.push(hold.hold_id.clone());
            referral.placement = Some(Placement::Held(hold.hold_id.clone()));
        }
        Event::NoBedRecorded(none) => {
            referral
                .nearest_regions_with_beds
                .clone_from(&none.nearest_regions_with_beds);
            referral.placement = Some(Placement::NoBed(none.nearest_regions_with_beds.clone()));
        }
        _ => {}
    }
    referral
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::ConsentGap;

    const NOW: Timestamp = Timestamp {
        seconds: 1_790_000_000,
        nanos: 0,
    };
    const DEADLINES: Deadlines = Deadlines {
        urgent_seconds: 86_400,
        normal_seconds: 259_200,
    };

    fn consent(agency: &str, purposes: &[pb::ServiceKind]) -> Consent {
        crate::domain::consent::evolve(
            Consent::default(),
            &Event::ConsentRecorded(pb::ConsentRecorded {
                consent_id: format!("k-{agency}"),
                person_id: "p1".into(),
                case_id: "c1".into(),
                given_by: pb::ConsentGiver::Person as i32,
                recipient_agency: agency.into(),
                purposes: purposes.iter().map(|p| *p as i32).collect(),
                ..Default::default()
            }),
        )
    }

    fn person(status: PersonStatus) -> Option<PersonFacts> {
        Some(PersonFacts {
            case_id: "c1".into(),
            status,
            child: false,
            reporting_agency: "kg-mvd".into(),
            competent_authority: String::new(),
        })
    }

    fn request(agency: &str, services: &[pb::ServiceKind]) -> pb::ReferralCreated {
        pb::ReferralCreated {
            referral_id: "r1".into(),
            person_id: "p1".into(),
            case_id: "c1".into(),
            referring_agency: "kg-mvd".into(),
            receiving_agency: agency.into(),
            services: services.iter().map(|s| *s as i32).collect(),
            urgency: pb::Urgency::Urgent as i32,
            consent_id: format!("k-{agency}"),
            shelter_need: None,
            created_at: Some(NOW),
            answer_due_at: None,
        }
    }

    fn create(status: PersonStatus, consent: Consent, allow_not_identified: bool) -> Command {
        Command::Create {
            referral: Box::new(request("kg-msd", &[pb::ServiceKind::Psychological])),
            person: person(status),
            consent: Box::new(consent),
            allow_not_identified,
            deadlines: DEADLINES,
        }
    }

    fn given(events: &[Event]) -> Referral {
        events.iter().fold(Referral::default(), evolve)
    }

    fn created() -> Event {
        decide(
            &Referral::default(),
            &create(
                PersonStatus::Presumed,
                consent("kg-msd", &[pb::ServiceKind::Psychological]),
                false,
            ),
        )
        .unwrap()
        .remove(0)
    }

    fn accept(agency: &str) -> Command {
        Command::Accept {
            agency: agency.into(),
            now: NOW,
        }
    }

    fn decline(agency: &str) -> Command {
        Command::Decline {
            agency: agency.into(),
            reason: pb::DeclineReason::NoCapacity,
            now: NOW,
        }
    }

    fn one(referral: &Referral, command: &Command) -> Event {
        let mut events = decide(referral, command).unwrap();
        assert_eq!(events.len(), 1);
        events.remove(0)
    }

    #[test]
    fn a_referral_under_a_covering_consent_is_created_with_its_answer_deadline() {
        let Event::ReferralCreated(c) = created() else {
            panic!("expected ReferralCreated");
        };
        assert_eq!(c.answer_due_at.unwrap().seconds, NOW.seconds + 86_400);
        let referral = given(&[Event::ReferralCreated(c)]);
        assert_eq!(referral.status, Status::Pending);
        assert!(referral.status.awaits_answer());
    }

    #[test]
    fn assistance_does_not_wait_for_identification_but_not_identified_follows_policy() {
        let c = || consent("kg-msd", &[pb::ServiceKind::Psychological]);
        for status in [PersonStatus::Reported, PersonStatus::Presumed, PersonStatus::Identified] {
            assert!(decide(&Referral::default(), &create(status, c(), false)).is_ok());
        }
        assert_eq!(
            decide(&Referral::default(), &create(PersonStatus::NotIdentified, c(), false)),
            Err(DomainError::NotIdentified)
        );
        assert!(decide(&Referral::default(), &create(PersonStatus::NotIdentified, c(), true)).is_ok());
    }

    #[test]
    fn a_referral_to_its_own_sender_is_refused() {
        let mut command = create(
            PersonStatus::Identified,
            consent("kg-mvd", &[pb::ServiceKind::Psychological]),
            false,
        );
        if let Command::Create { referral, .. } = &mut command {
            referral.receiving_agency = "kg-mvd".into();
        }
        assert_eq!(
            decide(&Referral::default(), &command),
            Err(DomainError::SenderIsReceiver)
        );
    }

    #[test]
    fn an_unknown_person_or_a_missing_consent_refuses_the_referral() {
        let mut command = create(
            PersonStatus::Identified,
            consent("kg-msd", &[pb::ServiceKind::Psychological]),
            false,
        );
        if let Command::Create { person, .. } = &mut command {
            *person = None;
        }
        assert_eq!(decide(&Referral::default(), &command), Err(DomainError::UnknownPerson));
        assert_eq!(
            decide(
                &Referral::default(),
                &create(
                    PersonStatus::Identified,
                    consent("kg-moh", &[pb::ServiceKind::Psychological]),
                    false
                )
            ),
            Err(DomainError::NoConsent(ConsentGap::OtherRecipient))
        );
        assert_eq!(
            decide(
                &Referral::default(),
                &create(PersonStatus::Identified, Consent::default(), false)
            ),
            Err(DomainError::NoConsent(ConsentGap::Unknown))
        );
    }

    #[test]
    fn only_the_receiver_answers_and_only_once() {
        let referral = given(&[created()]);
        assert_eq!(
            decide(&referral, &accept("kg-moh")),
            Err(DomainError::NotReceivingAgency)
        );
        let declined = given(&[created(), one(&referral, &decline("kg-msd"))]);
        assert_eq!(declined.decline_reason, pb::DeclineReason::NoCapacity as i32);
        assert_eq!(
            decide(&declined, &accept("kg-msd")),
            Err(DomainError::NotAwaitingAnswer)
        );
        let accepted = given(&[created(), one(&referral, &accept("kg-msd"))]);
        assert_eq!(
            decide(&accepted, &decline("kg-msd")),
            Err(DomainError::NotAwaitingAnswer)
        );
    }

    #[test]
    fn a_declined_referral_is_redirected_under_a_consent_for_the_new_agency_never_to_its_sender() {
        let referral = given(&[created()]);
        let declined_event = one(&referral, &decline("kg-msd"));
        let declined = given(&[created(), declined_event.clone()]);
        let redirect = |_by: &str, to: &str, consent: Consent| Command::Redirect {
            receiving_agency: to.into(),
            consent_id: format!("k-{to}"),
            consent: Box::new(consent),
            now: NOW,
            deadlines: DEADLINES,
        };
        let ngo = || consent("kg-ngo-1", &[pb::ServiceKind::Psychological]);
        assert_eq!(
            decide(
                &declined,
                &redirect("kg-msd", "kg-mvd", consent("kg-mvd", &[pb::ServiceKind::Psychological]))
            ),
            Err(DomainError::SenderIsReceiver)
        );
        assert_eq!(
            decide(&referral, &redirect("kg-mvd", "kg-ngo-1", ngo())),
            Err(DomainError::NotDeclined)
        );
        assert_eq!(
            decide(
                &declined,
                &redirect("kg-mvd", "kg-msd", consent("kg-msd", &[pb::ServiceKind::Psychological]))
            ),
            Err(DomainError::SameAgency)
        );
        assert_eq!(
            decide(&declined, &redirect("kg-mvd", "kg-ngo-2", ngo())),
            Err(DomainError::NoConsent(ConsentGap::OtherRecipient))
        );
        let redirected_event = one(&declined, &redirect("kg-mvd", "kg-ngo-1", ngo()));
        let redirected = given(&[created(), declined_event, redirected_event]);
        assert_eq!(redirected.status, Status::Redirected);
        assert_eq!(redirected.receiving_agency, "kg-ngo-1");
        assert_eq!(redirected.consent_id, "k-kg-ngo-1");
        assert!(decide(&redirected, &accept("kg-ngo-1")).is_ok());
        assert_eq!(
            decide(&redirected, &accept("kg-msd")),
            Err(DomainError::NotReceivingAgency)
        );
    }

    #[test]
    fn an_unanswered_referral_is_marked_overdue_once_and_never_early() {
        let referral = given(&[created()]);
        let early = decide(&referral, &Command::MarkOverdue { now: NOW }).unwrap();
        assert!(early.is_empty());
        let due = add_seconds(&NOW, 86_400);
        let overdue_event = one(&referral, &Command::MarkOverdue { now: due });
        let overdue = given(&[created(), overdue_event]);
        assert!(overdue.overdue);
        assert!(decide(&overdue, &Command::MarkOverdue { now: due }).unwrap().is_empty());
        let accepted = given(&[created(), one(&referral, &accept("kg-msd"))]);
        assert!(
            decide(&accepted, &Command::MarkOverdue { now: due })
                .unwrap()
                .is_empty()
        );
    }

    #[test]
    fn services_are_delivered_and_the_referral_closed_only_once_accepted() {
        let referral = given(&[created()]);
        let deliver = |kind: pb::ServiceKind| Command::RecordServiceDelivered {
            agency: "kg-msd".into(),
            kind,
            delivered_at: NOW,
            provider: "MSD-PSY-1".into(),
        };
        let close = Command::Close {
            outcome: pb::ReferralOutcome::ServicesCompleted,
            now: NOW,
        };
        assert_eq!(
            decide(&referral, &deliver(pb::ServiceKind::Psychological)),
            Err(DomainError::NotAccepted)
        );
        assert_eq!(decide(&referral, &close), Err(DomainError::NotAccepted));
        let accepted_event = one(&referral, &accept("kg-msd"));
        let accepted = given(&[created(), accepted_event.clone()]);
        assert_eq!(
            decide(&accepted, &deliver(pb::ServiceKind::Medical)),
            Err(DomainError::ServiceNotReferred)
        );
        let delivered = one(&accepted, &deliver(pb::ServiceKind::Psychological));
        let closed_event = one(&accepted, &close);
        let closed = given(&[created(), accepted_event, delivered, closed_event]);
        assert_eq!(closed.status, Status::Closed);
        assert_eq!(closed.services_delivered, [pb::ServiceKind::Psychological as i32]);
        assert_eq!(closed.outcome, pb::ReferralOutcome::ServicesCompleted as i32);
    }

    #[test]
    fn cancelling_affects_only_open_referrals() {
        let cancel = Command::Cancel {
            reason: "CONSENT_WITHDRAWN".into(),
        };
        let referral = given(&[created()]);
        let cancelled_event = one(&referral, &cancel);
        let cancelled = given(&[created(), cancelled_event]);
        assert_eq!(cancelled.status, Status::Cancelled);
        assert!(decide(&cancelled, &cancel).unwrap().is_empty());
        assert_eq!(
            decide(&cancelled, &accept("kg-msd")),
            Err(DomainError::NotAwaitingAnswer)
        );
    }

    #[test]
    fn a_bed_hold_or_no_bed_is_recorded_once() {
        let referral = given(&[created()]);
        let hold = Command::RecordBedHold {
            shelter_id: "s1".into(),
            hold_id: "h1".into(),
            expires_at: Some(NOW),
        };
        let held = given(&[created(), one(&referral, &hold)]);
        assert_eq!((held.shelter_id.as_str(), held.hold_id.as_str()), ("s1", "h1"));
        assert!(decide(&held, &hold).unwrap().is_empty());
        let none = Command::RecordNoBed {
            nearest_regions_with_beds: vec!["KG-C".into()],
        };
        let no_bed = evolve(held.clone(), &one(&held, &none));
        assert_eq!(no_bed.nearest_regions_with_beds, ["KG-C"]);
        assert!(decide(&no_bed, &none).unwrap().is_empty());
        assert_eq!(decide(&Referral::default(), &hold), Err(DomainError::NotFound(NAME)));
    }
}
