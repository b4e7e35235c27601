//! The pure aggregates of the referral context: consents, referrals and the
//! individual rehabilitation plan.
//!
//! Each aggregate has `decide(&state, &command)` (the events a command
//! causes, or why it cannot happen) and `evolve(state, &event)`. No clock,
//! database or network in here: the time, the consent a referral rests on
//! and what is known about the person arrive in the command.
//!
//! # Layout
//! - this module: the domain error, event names, time helpers.
//! - [`consent`]: a person's purpose-bound consent to share with one agency.
//! - [`referral`]: a referral from one agency to another, its answer and its services.
//! - [`plan`]: the individual rehabilitation plan of a person.
//! - [`homecoming`]: the consent and reintegration referral of a person
//!   identified abroad who came home.
//! - [`parse`]: validating constructors from requests, naming offending fields.

pub mod consent;
pub mod homecoming;
pub mod parse;
pub mod plan;
pub mod referral;

use nrm_proto::referral::v1 as pb;
use pb::referral_event::Event;
use prost_types::Timestamp;
use std::cmp::Ordering;
use std::fmt;

/// Why a consent does not let a referral go to an agency.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConsentGap {
    /// No consent with that ID was recorded.
    Unknown,
    /// The consent was withdrawn.
    Withdrawn,
    /// The consent has expired.
    Expired,
    /// The consent is another person's.
    OtherPerson,
    /// The consent names another recipient agency.
    OtherRecipient,
    /// The consent does not cover a service asked for.
    ServiceNotCovered(i32),
}

impl fmt::Display for ConsentGap {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ConsentGap::Unknown => f.write_str("no consent with this ID was recorded"),
            ConsentGap::Withdrawn => f.write_str("the consent was withdrawn"),
            ConsentGap::Expired => f.write_str("the consent has expired"),
            ConsentGap::OtherPerson => f.write_str("the consent was given for another person"),
            ConsentGap::OtherRecipient => f.write_str("the consent does not name the receiving agency"),
            ConsentGap::ServiceNotCovered(kind) => {
                let name = pb::ServiceKind::try_from(*kind).map_or("UNKNOWN", |k| k.as_str_name());
                write!(f, "the consent does not cover the service {name}")
            }
        }
    }
}

/// Why a command cannot happen in an aggregate's state.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DomainError {
    /// The addressed aggregate does not exist.
    #[error("the {0} does not exist")]
    NotFound(&'static str),
    /// The aggregate exists already.
    #[error("the {0} exists already")]
    AlreadyExists(&'static str),
    /// A child's consent given by the child.
    #[error("a child's consent must be given by a guardian or a best-interests decision")]
    ChildNeedsGuardian,
    /// The attestation the giver needs is incomplete: the request fields missing.
    #[error("the consent's attestation is incomplete")]
    AttestationMissing(Vec<&'static str>),
    /// The agency a consent lets in records it itself.
    #[error("a consent is recorded by an agency holding the case, never by the agency it lets in")]
    SelfGrant,
    /// The recording agency does not hold the person's case.
    #[error("only an agency holding the person's case may record a consent")]
    NotCaseHolder,
    /// A referral to the agency that sends it.
    #[error("a referral's sender is never its receiver")]
    SenderIsReceiver,
    /// Withdrawing twice.
    #[error("the consent was already withdrawn")]
    AlreadyWithdrawn,
    /// The consent does not allow the referral.
    #[error("no valid consent for this referral: {0}")]
    NoConsent(ConsentGap),
    /// The person is not known to the mechanism.
    #[error("the person is not known from identification")]
    UnknownPerson,
    /// The person was found not identified (and policy refuses referrals then).
    #[error("the person was found not identified")]
    NotIdentified,
    /// The case named is not the person's case.
    #[error("the case is not the person's identification case")]
    CaseMismatch,
    /// The caller's agency is not the receiving agency.
    #[error("only the receiving agency may do this")]
    NotReceivingAgency,
    /// Accepting or declining a referral that awaits no answer.
    #[error("the referral awaits no answer (it was answered, closed or cancelled)")]
    NotAwaitingAnswer,
    /// Delivering services to or closing a referral that is not accepted.
    #[error("the referral is not accepted")]
    NotAccepted,
    /// Redirecting a referral that was not declined.
    #[error("only a declined referral can be redirected")]
    NotDeclined,
    /// Redirecting to the agency that declined.
    #[error("the referral must be redirected to another agency")]
    SameAgency,
    /// Recording a service that was not asked for.
    #[error("the service was not asked for in this referral")]
    ServiceNotReferred,
    /// The goal does not belong to the plan.
    #[error("the plan has no such goal")]
    GoalNotFound,
    /// Marking a goal met twice, or following up a met goal.
    #[error("the goal was already met")]
    GoalAlreadyMet,
}

impl DomainError {
    /// Stable code of the rule.
    #[must_use]
    pub const fn code(&self) -> &'static str {
        match self {
            DomainError::NotFound(_) | DomainError::GoalNotFound => "NOT_FOUND",
            DomainError::AlreadyExists(_) => "ALREADY_EXISTS",
            DomainError::ChildNeedsGuardian => "CHILD_NEEDS_GUARDIAN",
            DomainError::AttestationMissing(_) => "ATTESTATION_MISSING",
            DomainError::SelfGrant => "SELF_GRANT",
            DomainError::NotCaseHolder => "NOT_CASE_HOLDER",
            DomainError::SenderIsReceiver => "SENDER_IS_RECEIVER",
            DomainError::AlreadyWithdrawn => "ALREADY_WITHDRAWN",
            DomainError::NoConsent(_) => "NO_CONSENT",
            DomainError::UnknownPerson => "UNKNOWN_PERSON",
            DomainError::NotIdentified => "NOT_IDENTIFIED",
            DomainError::CaseMismatch => "CASE_MISMATCH",
            DomainError::NotReceivingAgency => "NOT_RECEIVING_AGENCY",
            DomainError::NotAwaitingAnswer => "NOT_AWAITING_ANSWER",
            DomainError::NotAccepted => "NOT_ACCEPTED",
            DomainError::NotDeclined => "NOT_DECLINED",
            DomainError::SameAgency => "SAME_AGENCY",
            DomainError::ServiceNotReferred => "SERVICE_NOT_REFERRED",
            DomainError::GoalAlreadyMet => "GOAL_ALREADY_MET",
        }
    }
}

/// What the referral service knows of a person, from identification.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PersonFacts {
    /// The person's identification case.
    pub case_id: String,
    /// The case's status.
    pub status: PersonStatus,
    /// Under 18 (or possibly).
    pub child: bool,
    /// The agency that reported the case (it holds the case).
    pub reporting_agency: String,
    /// The competent authority handling the case (it holds the case; empty: none named).
    pub competent_authority: String,
}

impl PersonFacts {
    /// The agencies holding the person's case.
    #[must_use]
    pub fn case_holders(&self) -> Vec<&str> {
        [self.reporting_agency.as_str(), self.competent_authority.as_str()]
            .into_iter()
            .filter(|a| !a.is_empty())
            .collect()
    }

    /// Whether `agency` holds the person's case.
    #[must_use]
    pub fn held_by(&self, agency: &str) -> bool {
        self.case_holders().contains(&agency)
    }
}

/// Status of a person's identification, as far as referrals care.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PersonStatus {
    /// Reported, not yet screened.
    Reported,
    /// Presumed a victim.
    Presumed,
    /// Formally identified.
    Identified,
    /// Formally not identified.
    NotIdentified,
}

impl PersonStatus {
    /// From `nrm.identification.v1.CaseStatus`.
    #[must_use]
    pub fn from_case_status(status: i32) -> Self {
        use nrm_proto::identification::v1::CaseStatus;
        match CaseStatus::try_from(status) {
            Ok(CaseStatus::Presumed) => PersonStatus::Presumed,
            Ok(CaseStatus::Identified) => PersonStatus::Identified,
            Ok(CaseStatus::NotIdentified) => PersonStatus::NotIdentified,
            _ => PersonStatus::Reported,
        }
    }
}

/// Orders two timestamps.
#[must_use]
pub fn compare(a: &Timestamp, b: &Timestamp) -> Ordering {
    (a.seconds, a.nanos).cmp(&(b.seconds, b.nanos))
}

/// `t` plus `seconds`.
#[must_use]
pub fn add_seconds(t: &Timestamp, seconds: u64) -> Timestamp {
    Timestamp {
        seconds: t.seconds.saturating_add(i64::try_from(seconds).unwrap_or(i64::MAX)),
        nanos: t.nanos,
    }
}

/// Name of an event's variant, as stored and as sent in headers.
#[must_use]
pub fn event_type(event: &Event) -> &'static str {
    match event {
        Event::ConsentRecorded(_) => "ConsentRecorded",
        Event::ConsentWithdrawn(_) => "ConsentWithdrawn",
        Event::ReferralCreated(_) => "ReferralCreated",
        Event::ReferralAccepted(_) => "ReferralAccepted",
        Event::ReferralDeclined(_) => "ReferralDeclined",
        Event::ReferralRedirected(_) => "ReferralRedirected",
        Event::ReferralOverdue(_) => "ReferralOverdue",
        Event::ServiceDelivered(_) => "ServiceDelivered",
        Event::ReferralClosed(_) => "ReferralClosed",
        Event::ReferralCancelled(_) => "ReferralCancelled",
        Event::BedHoldRecorded(_) => "BedHoldRecorded",
        Event::NoBedRecorded(_) => "NoBedRecorded",
        Event::PlanGoalAdded(_) => "PlanGoalAdded",
        Event::FollowUpRecorded(_) => "FollowUpRecorded",
        Event::GoalMet(_) => "GoalMet",
    }
}
