//! The consent aggregate: a person's (or, for a child, a guardian's or a
//! best-interests decision's) consent to share with one recipient agency for
//! named purposes, until it expires or is withdrawn.

use nrm_kernel::ids::ConsentId;
use nrm_proto::referral::v1 as pb;
use pb::referral_event::Event;
use prost_types::Timestamp;

use super::{ConsentGap, DomainError, compare};

/// Stable name of the aggregate, used in stream IDs and subjects.
pub const NAME: &str = "consent";

/// Stream ID of a consent.
#[must_use]
pub fn stream_id(consent_id: ConsentId) -> String {
    format!("{NAME}-{consent_id}")
}

/// The state of one consent, folded from its events.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Consent {
    /// Number of events so far (0: the consent does not exist).
    pub version: u64,
    /// The consent as recorded.
    pub recorded: Option<pb::ConsentRecorded>,
    /// Withdrawn: nothing more is shared under it.
    pub withdrawn: bool,
}

impl Consent {
    /// Whether a referral of `person_id` to `agency` for `services` may rest
    /// on this consent at `now`.
    ///
    /// # Errors
    /// The first [`ConsentGap`] found.
    pub fn covers(&self, person_id: &str, agency: &str, services: &[i32], now: &Timestamp) -> Result<(), ConsentGap> {
        let Some(recorded) = &self.recorded else {
            return Err(ConsentGap::Unknown);
        };
        if self.withdrawn {
            return Err(ConsentGap::Withdrawn);
        }
        if recorded
            .expires_at
            .as_ref()
            .is_some_and(|expires| compare(expires, now).is_le())
        {
            return Err(ConsentGap::Expired);
        }
        if recorded.person_id != person_id {
            return Err(ConsentGap::OtherPerson);
        }
        if recorded.recipient_agency != agency {
            return Err(ConsentGap::OtherRecipient);
        }
        match services.iter().find(|s| !recorded.purposes.contains(s)) {
            Some(missing) => Err(ConsentGap::ServiceNotCovered(*missing)),
            None => Ok(()),
        }
    }
}

/// What a caller asks of a consent.
#[derive(Debug, Clone, PartialEq)]
pub enum Command {
    /// Record a consent.
    Record {
        /// The consent, validated (IDs, purposes, expiry, time of recording).
        consent: Box<pb::ConsentRecorded>,
        /// The person is a child (as the request says, or as identification knows).
        child: bool,
    },
    /// Withdraw it.
    Withdraw {
        /// Now.
        now: Timestamp,
    },
}

/// The events `command` causes in `consent`.
///
/// # Errors
/// A [`DomainError`] when the command does not fit the consent's state.
pub fn decide(consent: &Consent, command: &Command) -> Result<Vec<Event>, DomainError> {
    match command {
        Command::Record {
            consent: recorded,
            child,
        } => {
            if consent.version > 0 {
                return Err(DomainError::AlreadyExists(NAME));
            }
            if *child && recorded.given_by == pb::ConsentGiver::Person as i32 {
                return Err(DomainError::ChildNeedsGuardian);
            }
            Ok(vec![Event::ConsentRecorded((**recorded).clone())])
        }
        Command::Withdraw { now } => {
            let Some(recorded) = &consent.recorded else {
                return Err(DomainError::NotFound(NAME));
            };
            if consent.withdrawn {
                return Err(DomainError::AlreadyWithdrawn);
            }
            Ok(vec![Event::ConsentWithdrawn(pb::ConsentWithdrawn {
                consent_id: recorded.consent_id.clone(),
                person_id: recorded.person_id.clone(),
                recipient_agency: recorded.recipient_agency.clone(),
                withdrawn_at: Some(*now),
            })])
        }
    }
}

/// The consent after `event` (events of other aggregates change nothing but the version).
#[must_use]
pub fn evolve(mut consent: Consent, event: &Event) -> Consent {
    consent.version += 1;
    match event {
        Event::ConsentRecorded(recorded) => consent.recorded = Some(recorded.clone()),
        Event::ConsentWithdrawn(_) => consent.withdrawn = true,
        _ => {}
    }
    consent
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: Timestamp = Timestamp {
        seconds: 1_790_000_000,
        nanos: 0,
    };

    fn recorded(given_by: pb::ConsentGiver) -> pb::ConsentRecorded {
        pb::ConsentRecorded {
            consent_id: "k1".into(),
            person_id: "p1".into(),
            case_id: "c1".into(),
            given_by: given_by as i32,
            recipient_agency: "kg-msd".into(),
            purposes: vec![pb::ServiceKind::Shelter as i32, pb::ServiceKind::Psychological as i32],
            data_categories: vec![],
            expires_at: Some(Timestamp {
                seconds: NOW.seconds + 3600,
                nanos: 0,
            }),
            recorded_at: Some(NOW),
        }
    }

    fn given(events: &[Event]) -> Consent {
        events.iter().fold(Consent::default(), evolve)
    }

    fn record(given_by: pb::ConsentGiver, child: bool) -> Command {
        Command::Record {
            consent: Box::new(recorded(given_by)),
            child,
        }
    }

    #[test]
    fn an_adult_consents_for_themselves() {
        let events = decide(&Consent::default(), &record(pb::ConsentGiver::Person, false)).unwrap();
        assert_eq!(events, [Event::ConsentRecorded(recorded(pb::ConsentGiver::Person))]);
    }

    #[test]
    fn a_child_consents_only_through_a_guardian_or_a_best_interests_decision() {
        assert_eq!(
            decide(&Consent::default(), &record(pb::ConsentGiver::Person, true)),
            Err(DomainError::ChildNeedsGuardian)
        );
        assert!(decide(&Consent::default(), &record(pb::ConsentGiver::Guardian, true)).is_ok());
        assert!(
            decide(
                &Consent::default(),
                &record(pb::ConsentGiver::BestInterestsDecision, true)
            )
            .is_ok()
        );
    }

    #[test]
    fn a_consent_covers_its_person_recipient_and_purposes_until_it_expires_or_is_withdrawn() {
        let consent = given(&[Event::ConsentRecorded(recorded(pb::ConsentGiver::Person))]);
        let shelter = [pb::ServiceKind::Shelter as i32];
        assert_eq!(consent.covers("p1", "kg-msd", &shelter, &NOW), Ok(()));
        assert_eq!(
            consent.covers("p2", "kg-msd", &shelter, &NOW),
            Err(ConsentGap::OtherPerson)
        );
        assert_eq!(
            consent.covers("p1", "kg-moh", &shelter, &NOW),
            Err(ConsentGap::OtherRecipient)
        );
        let medical = pb::ServiceKind::Medical as i32;
        assert_eq!(
            consent.covers("p1", "kg-msd", &[shelter[0], medical], &NOW),
            Err(ConsentGap::ServiceNotCovered(medical))
        );
        let later = Timestamp {
            seconds: NOW.seconds + 3600,
            nanos: 0,
        };
        assert_eq!(
            consent.covers("p1", "kg-msd", &shelter, &later),
            Err(ConsentGap::Expired)
        );
        assert_eq!(
            Consent::default().covers("p1", "kg-msd", &shelter, &NOW),
            Err(ConsentGap::Unknown)
        );
    }

    #[test]
    fn a_withdrawn_consent_covers_nothing_and_is_withdrawn_once() {
        let mut consent = given(&[Event::ConsentRecorded(recorded(pb::ConsentGiver::Person))]);
        let withdrawn = decide(&consent, &Command::Withdraw { now: NOW }).unwrap();
        assert!(matches!(&withdrawn[0], Event::ConsentWithdrawn(w) if w.consent_id == "k1"));
        consent = evolve(consent, &withdrawn[0]);
        assert_eq!(
            consent.covers("p1", "kg-msd", &[pb::ServiceKind::Shelter as i32], &NOW),
            Err(ConsentGap::Withdrawn)
        );
        assert_eq!(
            decide(&consent, &Command::Withdraw { now: NOW }),
            Err(DomainError::AlreadyWithdrawn)
        );
        assert_eq!(
            decide(&Consent::default(), &Command::Withdraw { now: NOW }),
            Err(DomainError::NotFound(NAME))
        );
    }

    #[test]
    fn a_consent_is_recorded_once() {
        let consent = given(&[Event::ConsentRecorded(recorded(pb::ConsentGiver::Person))]);
        assert_eq!(
            decide(&consent, &record(pb::ConsentGiver::Person, false)),
            Err(DomainError::AlreadyExists(NAME))
        );
    }
}
