//! The consent aggregate: a person's (or, for a child, a guardian's or a
//! best-interests decision's) consent to share with one recipient agency for
//! named purposes, until it expires or is withdrawn.
//!
//! A consent is recorded by an agency holding the person's case (the
//! reporting agency or the competent authority), never by the agency it lets
//! in; whether the person is a child is what identification knows; who
//! attests it is on the event. Expiry ends it exactly as a withdrawal does
//! (a `ConsentWithdrawn` with reason `EXPIRED`).

use nrm_kernel::ids::ConsentId;
use nrm_proto::referral::v1 as pb;
use pb::referral_event::Event;
use prost_types::Timestamp;

use super::{ConsentGap, DomainError, PersonFacts, compare};

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
    /// Withdrawn or expired: nothing more is shared under it.
    pub withdrawn: bool,
    /// Why it ended (`nrm.referral.v1.ConsentEndReason`), once it did.
    pub end_reason: i32,
    /// When it ended.
    pub ended_at: Option<Timestamp>,
}

impl Consent {
    /// Whether the consent is recorded, not withdrawn and not expired at `now`.
    #[must_use]
    pub fn covers_at(&self, now: &Timestamp) -> bool {
        self.recorded.is_some()
            && !self.withdrawn
            && !self
                .recorded
                .as_ref()
                .and_then(|r| r.expires_at.as_ref())
                .is_some_and(|expires| compare(expires, now).is_le())
    }

    /// The consent's status for its readers at `now`.
    #[must_use]
    pub fn status(&self, now: &Timestamp) -> pb::ConsentStatus {
        if self.recorded.is_none() {
            pb::ConsentStatus::Unspecified
        } else if self.withdrawn && self.end_reason == pb::ConsentEndReason::Expired as i32 {
            pb::ConsentStatus::Expired
        } else if self.withdrawn {
            pb::ConsentStatus::Withdrawn
        } else if self.covers_at(now) {
            pb::ConsentStatus::Active
        } else {
            // Past its expiry, its timer not fired yet.
            pb::ConsentStatus::Expired
        }
    }

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
        /// The consent, validated (IDs, purposes, expiry, time of recording),
        /// with the recording agency and the attestation (its officer is the caller's).
        consent: Box<pb::ConsentRecorded>,
        /// What identification knows of the person (`None`: unknown); the
        /// child flag and the agencies holding the case come from here.
        person: Option<PersonFacts>,
    },
    /// Withdraw it.
    Withdraw {
        /// Now.
        now: Timestamp,
    },
    /// Its expiry came (a timer): it ends as on withdrawal, reason `EXPIRED`.
    Expire {
        /// The timer's due time.
        now: Timestamp,
    },
}

/// The request fields the attestation of a consent given by `given_by` misses.
#[must_use]
pub fn missing_attestation(given_by: i32, attestation: Option<&pb::ConsentAttestation>) -> Vec<&'static str> {
    let empty = pb::ConsentAttestation::default();
    let a = attestation.unwrap_or(&empty);
    let mut missing = Vec::new();
    if given_by == pb::ConsentGiver::Guardian as i32 && a.guardian_ref.is_empty() {
        missing.push("guardian_ref");
    }
    if given_by == pb::ConsentGiver::BestInterestsDecision as i32 {
        if a.best_interests_decision_ref.is_empty() {
            missing.push("best_interests_decision_ref");
        }
        if a.best_interests_decided_by.is_empty() {
            missing.push("best_interests_decided_by");
        }
    }
    missing
}

fn ended(recorded: &pb::ConsentRecorded, now: Timestamp, reason: pb::ConsentEndReason) -> Event {
    Event::ConsentWithdrawn(pb::ConsentWithdrawn {
        consent_id: recorded.consent_id.clone(),
        person_id: recorded.person_id.clone(),
        recipient_agency: recorded.recipient_agency.clone(),
        withdrawn_at: Some(now),
        reason: reason as i32,
    })
}

/// The events `command` causes in `consent`.
///
/// # Errors
/// A [`DomainError`] when the command does not fit the consent's state.
pub fn decide(consent: &Consent, command: &Command) -> Result<Vec<Event>, DomainError> {
    match command {
        Command::Record {
            consent: recorded,
            person,
        } => {
            if consent.version > 0 {
                return Err(DomainError::AlreadyExists(NAME));
            }
            let Some(person) = person else {
                return Err(DomainError::UnknownPerson);
            };
            if person.case_id != recorded.case_id {
                return Err(DomainError::CaseMismatch);
            }
            if !person.held_by(&recorded.recorded_by_agency) {
                return Err(DomainError::NotCaseHolder);
            }
            if recorded.recipient_agency == recorded.recorded_by_agency {
                return Err(DomainError::SelfGrant);
            }
            if person.child && recorded.given_by == pb::ConsentGiver::Person as i32 {
                return Err(DomainError::ChildNeedsGuardian);
            }
            let missing = missing_attestation(recorded.given_by, recorded.attestation.as_ref());
            if !missing.is_empty() {
                return Err(DomainError::AttestationMissing(missing));
            }
            let mut recorded = (**recorded).clone();
            recorded.child = person.child;
            Ok(vec![Event::ConsentRecorded(recorded)])
        }
        Command::Withdraw { now } => {
            let Some(recorded) = &consent.recorded else {
                return Err(DomainError::NotFound(NAME));
            };
            if consent.withdrawn {
                return Err(DomainError::AlreadyWithdrawn);
            }
            Ok(vec![ended(recorded, *now, pb::ConsentEndReason::Withdrawn)])
        }
        Command::Expire { now } => {
            let Some(recorded) = &consent.recorded else {
                return Err(DomainError::NotFound(NAME));
            };
            let due = recorded
                .expires_at
                .is_some_and(|expires| compare(&expires, now).is_le());
            if consent.withdrawn || !due {
                return Ok(vec![]);
            }
            Ok(vec![ended(recorded, *now, pb::ConsentEndReason::Expired)])
        }
    }
}

/// The consent after `event` (events of other aggregates change nothing but the version).
#[must_use]
pub fn evolve(mut consent: Consent, event: &Event) -> Consent {
    consent.version += 1;
    match event {
        Event::ConsentRecorded(recorded) => consent.recorded = Some(recorded.clone()),
        Event::ConsentWithdrawn(ended) => {
            consent.withdrawn = true;
            consent.end_reason = ended.reason;
            consent.ended_at = ended.withdrawn_at;
        }
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
            recorded_by_agency: "kg-mvd".into(),
            attestation: Some(pb::ConsentAttestation {
                attesting_officer: "officer-17".into(),
                guardian_ref: "GRD-1".into(),
                best_interests_decision_ref: "BID-1".into(),
                best_interests_decided_by: "kg-prosecutor".into(),
                given_abroad: None,
            }),
            child: false,
        }
    }

    fn person(child: bool) -> Option<PersonFacts> {
        Some(PersonFacts {
            case_id: "c1".into(),
            status: super::super::PersonStatus::Reported,
            child,
            reporting_agency: "kg-ngo".into(),
            competent_authority: "kg-mvd".into(),
        })
    }

    fn given(events: &[Event]) -> Consent {
        events.iter().fold(Consent::default(), evolve)
    }

    fn record(given_by: pb::ConsentGiver, child: bool) -> Command {
        Command::Record {
            consent: Box::new(recorded(given_by)),
            person: person(child),
        }
    }

    #[test]
    fn an_adult_consents_for_themselves() {
        let events = decide(&Consent::default(), &record(pb::ConsentGiver::Person, false)).unwrap();
        assert_eq!(events, [Event::ConsentRecorded(recorded(pb::ConsentGiver::Person))]);
    }

    #[test]
    fn only_a_case_holder_other_than_the_recipient_records_a_known_persons_consent() {
        let with = |f: &dyn Fn(&mut pb::ConsentRecorded), person: Option<PersonFacts>| {
            let mut consent = recorded(pb::ConsentGiver::Person);
            f(&mut consent);
            decide(
                &Consent::default(),
                &Command::Record {
                    consent: Box::new(consent),
                    person,
                },
            )
        };
        // The reporting agency records as well as the competent authority.
        assert!(with(&|c| c.recorded_by_agency = "kg-ngo".into(), person(false)).is_ok());
        assert_eq!(with(&|_| {}, None), Err(DomainError::UnknownPerson));
        // The recipient recording its own consent holds no case.
        assert_eq!(
            with(&|c| c.recorded_by_agency = "kg-msd".into(), person(false)),
            Err(DomainError::NotCaseHolder)
        );
        assert_eq!(
            with(&|c| c.recorded_by_agency = "kg-iom".into(), person(false)),
            Err(DomainError::NotCaseHolder)
        );
        assert_eq!(
            with(&|c| c.recipient_agency = "kg-mvd".into(), person(false)),
            Err(DomainError::SelfGrant)
        );
        assert_eq!(
            with(&|c| c.case_id = "c2".into(), person(false)),
            Err(DomainError::CaseMismatch)
        );
    }

    #[test]
    fn the_child_flag_comes_from_identification_and_the_attestation_is_complete() {
        let events = decide(&Consent::default(), &record(pb::ConsentGiver::Guardian, true)).unwrap();
        assert!(matches!(&events[0], Event::ConsentRecorded(r) if r.child));
        let mut consent = recorded(pb::ConsentGiver::BestInterestsDecision);
        consent.attestation = Some(pb::ConsentAttestation {
            attesting_officer: "officer-17".into(),
            ..Default::default()
        });
        assert_eq!(
            decide(
                &Consent::default(),
                &Command::Record {
                    consent: Box::new(consent),
                    person: person(true),
                }
            ),
            Err(DomainError::AttestationMissing(vec![
                "best_interests_decision_ref",
                "best_interests_decided_by"
            ]))
        );
    }

    #[test]
    fn an_expiry_ends_the_consent_as_a_withdrawal_does_once_and_never_early() {
        let consent = given(&[Event::ConsentRecorded(recorded(pb::ConsentGiver::Person))]);
        assert_eq!(decide(&consent, &Command::Expire { now: NOW }), Ok(vec![]));
        let at = Timestamp {
            seconds: NOW.seconds + 3600,
            nanos: 0,
        };
        let expired = decide(&consent, &Command::Expire { now: at }).unwrap();
        assert!(matches!(&expired[0], Event::ConsentWithdrawn(w) if w.reason == pb::ConsentEndReason::Expired as i32));
        let consent = evolve(consent, &expired[0]);
        assert_eq!(consent.status(&NOW), pb::ConsentStatus::Expired);
        assert_eq!(decide(&consent, &Command::Expire { now: at }), Ok(vec![]));
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
