//! The identification case: a pure aggregate.
//!
//! `decide(&case, &command)` answers with the events the command causes (or
//! why it cannot happen); `evolve(case, &event)` folds an event into the
//! state. No clock, database or network in here: the time and everything
//! else a decision needs arrives in the command.
//!
//! # Layout
//! - this module: state, commands, `decide`, `evolve`, domain errors.
//! - [`parse`]: validating constructors from requests, naming offending fields.
//! - [`abroad`]: the case a return's handover opens (identified abroad).
//! - [`notification`]: the anonymous notification, its own aggregate.

pub mod abroad;
pub mod notification;
pub mod parse;

use nrm_proto::identification::v1 as pb;
use pb::identification_event::Event;
use prost_types::Timestamp;

/// Stable name of the aggregate, used in stream IDs and subjects.
pub const NAME: &str = "case";

/// Stream ID of a case.
#[must_use]
pub fn stream_id(case_id: nrm_kernel::ids::CaseId) -> String {
    format!("{NAME}-{case_id}")
}

/// The state of one case, folded from its events.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Case {
    /// Number of events so far (0: the case does not exist).
    pub version: u64,
    /// The report, as recorded.
    pub report: Option<pb::PresumedVictimReported>,
    /// Current status.
    pub status: Status,
    /// Screening done.
    pub screened: bool,
    /// Indicators found at the last screening.
    pub indicators: Vec<i32>,
    /// The last decision.
    pub decision: Option<pb::IdentificationDecided>,
    /// A decision was reopened and awaits a new one.
    pub under_review: bool,
    /// Another report seems to concern the same person.
    pub possible_duplicate: bool,
    /// The cases that seem to concern the same person.
    pub matching_case_ids: Vec<String>,
    /// The person's identifiers were erased.
    pub erased: bool,
    /// Where a case opened on a return home comes from (identified abroad).
    pub abroad: Option<pb::IdentifiedAbroad>,
}

/// Status of a case.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Status {
    /// No such case.
    #[default]
    None,
    /// Reported, not yet screened.
    Reported,
    /// Screening done (or a child): presumed a victim.
    Presumed,
    /// Formally identified.
    Identified,
    /// Formally not identified.
    NotIdentified,
}

impl Status {
    /// The protobuf status.
    #[must_use]
    pub fn to_proto(self) -> pb::CaseStatus {
        match self {
            Status::None => pb::CaseStatus::Unspecified,
            Status::Reported => pb::CaseStatus::Reported,
            Status::Presumed => pb::CaseStatus::Presumed,
            Status::Identified => pb::CaseStatus::Identified,
            Status::NotIdentified => pb::CaseStatus::NotIdentified,
        }
    }

    fn from_proto(status: i32) -> Self {
        match pb::CaseStatus::try_from(status) {
            Ok(pb::CaseStatus::Presumed) => Status::Presumed,
            Ok(pb::CaseStatus::Identified) => Status::Identified,
            Ok(pb::CaseStatus::NotIdentified) => Status::NotIdentified,
            _ => Status::Reported,
        }
    }
}

/// What a caller asks of a case.
#[derive(Debug, Clone, PartialEq)]
pub enum Command {
    /// Report a presumed victim. The application seals the identifiers and
    /// finds matching earlier cases (`matching_case_ids` of the report)
    /// before deciding.
    Report {
        /// The report with sealed identifiers and matching earlier cases.
        report: Box<pb::PresumedVictimReported>,
    },
    /// Open the case of a person identified abroad and handed over here on
    /// their return. The application seals the identifiers that crossed and
    /// finds matching earlier cases before deciding.
    OpenFromAbroad {
        /// The case as it opens, its report with sealed identifiers and
        /// matching earlier cases.
        opened: Box<pb::CaseOpenedFromAbroad>,
    },
    /// Record the screening.
    CompleteScreening {
        /// Indicators found.
        indicators: Vec<i32>,
        /// Now.
        now: Timestamp,
    },
    /// The formal decision.
    Decide {
        /// Identified or not.
        decision: pb::Decision,
        /// Required for not identified.
        reason: pb::NotIdentifiedReason,
        /// Non-punishment flag.
        non_punishment: bool,
        /// For a child: a best-interests assessment was made.
        best_interests_assessed: bool,
        /// Now.
        now: Timestamp,
        /// Length of the recovery and reflection period.
        reflection_days: u32,
    },
    /// Reopen a decision.
    RequestReview {
        /// Why.
        reason: pb::ReviewReason,
        /// Now.
        now: Timestamp,
    },
    /// Erase the person's identifiers.
    ErasePersonalData {
        /// Why.
        reason: pb::ErasureReason,
        /// Now.
        now: Timestamp,
    },
}

/// Why a command cannot happen in the case's state.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DomainError {
    /// The case does not exist.
    #[error("the case does not exist")]
    NotFound,
    /// A report for this case ID exists already.
    #[error("the case was already reported")]
    AlreadyReported,
    /// Deciding before screening.
    #[error("the case must be screened before a decision")]
    NotScreened,
    /// Screening or deciding a case that is decided (and not under review).
    #[error("the case is already decided; request a review to reopen it")]
    AlreadyDecided,
    /// Reviewing a case with no decision.
    #[error("only a decided case can be reviewed")]
    NotDecided,
    /// Not identifying a child without a best-interests assessment.
    #[error("a child can be found not identified only after a best-interests assessment")]
    ChildNeedsBestInterestsAssessment,
    /// Erasing twice.
    #[error("the person's identifiers were already erased")]
    AlreadyErased,
}

impl DomainError {
    /// Stable code of the rule.
    #[must_use]
    pub const fn code(&self) -> &'static str {
        match self {
            DomainError::NotFound => "NOT_FOUND",
            DomainError::AlreadyReported => "ALREADY_REPORTED",
            DomainError::NotScreened => "NOT_SCREENED",
            DomainError::AlreadyDecided => "ALREADY_DECIDED",
            DomainError::NotDecided => "NOT_DECIDED",
            DomainError::ChildNeedsBestInterestsAssessment => "CHILD_BEST_INTERESTS_ASSESSMENT_REQUIRED",
            DomainError::AlreadyErased => "ALREADY_ERASED",
        }
    }
}

fn case_id_of(case: &Case) -> String {
    case.report.as_ref().map(|r| r.case_id.clone()).unwrap_or_default()
}

fn add_days(t: &Timestamp, days: u32) -> Timestamp {
    Timestamp {
        seconds: t.seconds + i64::from(days) * 86_400,
        nanos: t.nanos,
    }
}

/// The events `command` causes in `case`.
///
/// # Errors
/// A [`DomainError`] when the command does not fit the case's state.
pub fn decide(case: &Case, command: &Command) -> Result<Vec<Event>, DomainError> {
    if !matches!(command, Command::Report { .. } | Command::OpenFromAbroad { .. }) && case.status == Status::None {
        return Err(DomainError::NotFound);
    }
    let case_id = case_id_of(case);
    match command {
        Command::Report { report } => {
            if case.status != Status::None {
                return Err(DomainError::AlreadyReported);
            }
            let mut report = (**report).clone();
            // A child is presumed a victim until decided otherwise.
            report.status = if report.child {
                pb::CaseStatus::Presumed
            } else {
                pb::CaseStatus::Reported
            } as i32;
            // One event whether or not the person was reported before: the
            // reporter sees the same version and event count either way.
            Ok(vec![Event::PresumedVictimReported(report)])
        }
        Command::OpenFromAbroad { opened } => {
            if case.status != Status::None {
                return Err(DomainError::AlreadyReported);
            }
            let mut opened = (**opened).clone();
            // Decided abroad: identified, whatever the report says.
            if let Some(report) = opened.report.as_mut() {
                report.status = pb::CaseStatus::Identified as i32;
            }
            Ok(vec![Event::CaseOpenedFromAbroad(opened)])
        }
        Command::CompleteScreening { indicators, now } => {
            if case.decision.is_some() && !case.under_review {
                return Err(DomainError::AlreadyDecided);
            }
            Ok(vec![Event::ScreeningCompleted(pb::ScreeningCompleted {
                case_id,
                indicators: indicators.clone(),
                screened_at: Some(*now),
            })])
        }
        Command::Decide {
            decision,
            reason,
            non_punishment,
            best_interests_assessed,
            now,
            reflection_days,
        } => {
            if case.decision.is_some() && !case.under_review {
                return Err(DomainError::AlreadyDecided);
            }
            if !case.screened {
                return Err(DomainError::NotScreened);
            }
            let child = case.report.as_ref().is_some_and(|r| r.child);
            if *decision == pb::Decision::NotIdentified && child && !best_interests_assessed {
                return Err(DomainError::ChildNeedsBestInterestsAssessment);
            }
            let identified = *decision == pb::Decision::Identified;
            Ok(vec![Event::IdentificationDecided(pb::IdentificationDecided {
                case_id,
                decision: *decision as i32,
                reason: if identified {
                    pb::NotIdentifiedReason::Unspecified as i32
                } else {
                    *reason as i32
                },
                non_punishment: identified && *non_punishment,
                decided_at: Some(*now),
                reflection_period_ends_at: identified.then(|| add_days(now, *reflection_days)),
                best_interests_assessed: *best_interests_assessed,
            })])
        }
        Command::RequestReview { reason, now } => {
            if case.decision.is_none() || case.under_review {
                return Err(DomainError::NotDecided);
            }
            Ok(vec![Event::ReviewRequested(pb::ReviewRequested {
                case_id,
                reason: *reason as i32,
                requested_at: Some(*now),
            })])
        }
        Command::ErasePersonalData { reason, now } => {
            if case.erased {
                return Err(DomainError::AlreadyErased);
            }
            let person_id = case.report.as_ref().map(|r| r.person_id.clone()).unwrap_or_default();
            Ok(vec![Event::PersonalDataErased(pb::PersonalDataErased {
                case_id,
                person_id,
                erased_at: Some(*now),
                reason: *reason as i32,
            })])
        }
    }
}

/// The case after `event`.
#[must_use]
pub fn evolve(mut case: Case, event: &Event) -> Case {
    case.version += 1;
    match event {
        // A notification's own aggregate ([`notification`]): never on a case's stream.
        Event::AnonymousNotificationFiled(_) => {}
        Event::PresumedVictimReported(report) => {
            case.status = Status::from_proto(report.status);
            case.report = Some(report.clone());
            add_matches(&mut case, &report.matching_case_ids);
        }
        Event::CaseOpenedFromAbroad(opened) => {
            let report = opened.report.clone().unwrap_or_default();
            case.status = Status::Identified;
            // The decision is the authority's abroad (`abroad.identified_by`);
            // a review here reopens it like any other.
            case.decision = Some(pb::IdentificationDecided {
                case_id: report.case_id.clone(),
                decision: pb::Decision::Identified as i32,
                ..Default::default()
            });
            add_matches(&mut case, &report.matching_case_ids);
            case.report = Some(report);
            case.abroad.clone_from(&opened.identified_abroad);
        }
        Event::PossibleDuplicateFlagged(flagged) => add_matches(&mut case, &flagged.matching_case_ids),
        Event::ScreeningCompleted(screening) => {
            case.screened = true;
            case.indicators.clone_from(&screening.indicators);
            case.status = Status::Presumed;
        }
        Event::IdentificationDecided(decided) => {
            case.status = if decided.decision == pb::Decision::Identified as i32 {
                Status::Identified
            } else {
                Status::NotIdentified
            };
            case.decision = Some(decided.clone());
            case.under_review = false;
        }
        Event::ReviewRequested(_) => {
            case.under_review = true;
            case.status = Status::Presumed;
        }
        Event::PersonalDataErased(_) => case.erased = true,
    }
    case
}

fn add_matches(case: &mut Case, matching: &[String]) {
    for id in matching {
        if !case.matching_case_ids.contains(id) {
            case.matching_case_ids.push(id.clone());
        }
    }
    case.possible_duplicate = !case.matching_case_ids.is_empty();
}

/// Name of an event's variant, as stored and as sent in headers.
#[must_use]
pub fn event_type(event: &Event) -> &'static str {
    match event {
        Event::PresumedVictimReported(_) => "PresumedVictimReported",
        Event::PossibleDuplicateFlagged(_) => "PossibleDuplicateFlagged",
        Event::ScreeningCompleted(_) => "ScreeningCompleted",
        Event::IdentificationDecided(_) => "IdentificationDecided",
        Event::ReviewRequested(_) => "ReviewRequested",
        Event::PersonalDataErased(_) => "PersonalDataErased",
        Event::CaseOpenedFromAbroad(_) => "CaseOpenedFromAbroad",
        Event::AnonymousNotificationFiled(_) => "AnonymousNotificationFiled",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: Timestamp = Timestamp {
        seconds: 1_790_000_000,
        nanos: 0,
    };

    fn report(child: bool) -> pb::PresumedVictimReported {
        pb::PresumedVictimReported {
            case_id: "c1".into(),
            person_id: "p1".into(),
            child,
            ..Default::default()
        }
    }

    fn given(events: &[Event]) -> Case {
        events.iter().fold(Case::default(), evolve)
    }

    fn reported(child: bool) -> Event {
        let mut r = report(child);
        r.status = if child {
            pb::CaseStatus::Presumed
        } else {
            pb::CaseStatus::Reported
        } as i32;
        Event::PresumedVictimReported(r)
    }

    fn screened() -> Event {
        Event::ScreeningCompleted(pb::ScreeningCompleted {
            case_id: "c1".into(),
            indicators: vec![pb::Indicator::DocumentsRetained as i32],
            screened_at: Some(NOW),
        })
    }

    fn decide_cmd(decision: pb::Decision, best_interests_assessed: bool) -> Command {
        Command::Decide {
            decision,
            reason: pb::NotIdentifiedReason::InsufficientIndicators,
            non_punishment: true,
            best_interests_assessed,
            now: NOW,
            reflection_days: 30,
        }
    }

    #[test]
    fn an_adult_is_reported_and_a_child_is_presumed_at_once() {
        let adult = decide(
            &Case::default(),
            &Command::Report {
                report: Box::new(report(false)),
            },
        )
        .unwrap();
        assert_eq!(adult.len(), 1);
        assert_eq!(given(&adult).status, Status::Reported);

        let child = decide(
            &Case::default(),
            &Command::Report {
                report: Box::new(report(true)),
            },
        )
        .unwrap();
        assert_eq!(given(&child).status, Status::Presumed);
    }

    #[test]
    fn a_matching_earlier_case_flags_a_possible_duplicate_in_the_one_report_event() {
        let mut matching = report(false);
        matching.matching_case_ids = vec!["c0".into()];
        let events = decide(
            &Case::default(),
            &Command::Report {
                report: Box::new(matching),
            },
        )
        .unwrap();
        assert_eq!(
            events.len(),
            1,
            "a duplicate looks like any other report to its reporter"
        );
        let case = given(&events);
        assert!(case.possible_duplicate);
        assert_eq!(case.matching_case_ids, ["c0"]);
        // Streams written before still fold their flag event.
        let old = given(&[
            reported(false),
            Event::PossibleDuplicateFlagged(pb::PossibleDuplicateFlagged {
                case_id: "c1".into(),
                matching_case_ids: vec!["c0".into()],
            }),
        ]);
        assert_eq!(old.matching_case_ids, ["c0"]);
    }

    #[test]
    fn deciding_before_screening_is_refused() {
        let case = given(&[reported(false)]);
        assert_eq!(
            decide(&case, &decide_cmd(pb::Decision::Identified, false)),
            Err(DomainError::NotScreened)
        );
        // A child is presumed at once, but still needs screening before a decision.
        let child = given(&[reported(true)]);
        assert_eq!(
            decide(&child, &decide_cmd(pb::Decision::Identified, false)),
            Err(DomainError::NotScreened)
        );
    }

    #[test]
    fn identification_opens_the_reflection_period_and_records_non_punishment() {
        let case = given(&[reported(false), screened()]);
        let events = decide(&case, &decide_cmd(pb::Decision::Identified, false)).unwrap();
        let Event::IdentificationDecided(decided) = &events[0] else {
            panic!("expected a decision");
        };
        assert_eq!(
            decided.reflection_period_ends_at.unwrap().seconds,
            NOW.seconds + 30 * 86_400
        );
        assert!(decided.non_punishment);
        assert_eq!(decided.reason, pb::NotIdentifiedReason::Unspecified as i32);
        assert_eq!(
            given(&[reported(false), screened(), events[0].clone()]).status,
            Status::Identified
        );
    }

    #[test]
    fn deciding_twice_is_refused_until_a_review_reopens_the_case() {
        let decided = decide(
            &given(&[reported(false), screened()]),
            &decide_cmd(pb::Decision::NotIdentified, false),
        )
        .unwrap()
        .remove(0);
        let case = given(&[reported(false), screened(), decided.clone()]);
        assert_eq!(case.status, Status::NotIdentified);
        assert_eq!(
            decide(&case, &decide_cmd(pb::Decision::Identified, false)),
            Err(DomainError::AlreadyDecided)
        );
        let review = decide(
            &case,
            &Command::RequestReview {
                reason: pb::ReviewReason::AppealByPerson,
                now: NOW,
            },
        )
        .unwrap()
        .remove(0);
        let reopened = given(&[reported(false), screened(), decided, review]);
        assert!(reopened.under_review);
        assert!(decide(&reopened, &decide_cmd(pb::Decision::Identified, false)).is_ok());
    }

    #[test]
    fn a_child_is_not_identified_only_after_a_best_interests_assessment() {
        let case = given(&[reported(true), screened()]);
        assert_eq!(
            decide(&case, &decide_cmd(pb::Decision::NotIdentified, false)),
            Err(DomainError::ChildNeedsBestInterestsAssessment)
        );
        assert!(decide(&case, &decide_cmd(pb::Decision::NotIdentified, true)).is_ok());
    }

    fn opened_from_abroad() -> pb::CaseOpenedFromAbroad {
        let mut report = report(false);
        report.status = pb::CaseStatus::Reported as i32;
        report.matching_case_ids = vec!["c0".into()];
        pb::CaseOpenedFromAbroad {
            report: Some(report),
            identified_abroad: Some(pb::IdentifiedAbroad {
                from_country: "ru".into(),
                foreign_reference: "RU-MVD-1".into(),
                identified_by: "ru-mvd".into(),
                ..Default::default()
            }),
        }
    }

    #[test]
    fn a_case_opened_from_abroad_is_identified_once_and_can_be_reviewed_here() {
        let command = Command::OpenFromAbroad {
            opened: Box::new(opened_from_abroad()),
        };
        let events = decide(&Case::default(), &command).unwrap();
        assert_eq!(events.len(), 1);
        let case = given(&events);
        assert_eq!(case.status, Status::Identified);
        assert_eq!(case.report.as_ref().unwrap().status, pb::CaseStatus::Identified as i32);
        assert_eq!(case.abroad.as_ref().unwrap().identified_by, "ru-mvd");
        assert_eq!(case.matching_case_ids, ["c0"]);
        assert_eq!(decide(&case, &command), Err(DomainError::AlreadyReported));
        // Decided abroad: not decided again here without a review.
        assert_eq!(
            decide(&case, &decide_cmd(pb::Decision::NotIdentified, false)),
            Err(DomainError::AlreadyDecided)
        );
        let review = decide(
            &case,
            &Command::RequestReview {
                reason: pb::ReviewReason::NewEvidence,
                now: NOW,
            },
        )
        .unwrap();
        assert_eq!(given(&[events[0].clone(), review[0].clone()]).status, Status::Presumed);
        // Its person can be erased like any other.
        assert!(
            decide(
                &case,
                &Command::ErasePersonalData {
                    reason: pb::ErasureReason::DataSubjectRequest,
                    now: NOW
                }
            )
            .is_ok()
        );
    }

    #[test]
    fn commands_on_a_missing_case_are_not_found_and_erasure_happens_once() {
        assert_eq!(
            decide(
                &Case::default(),
                &Command::ErasePersonalData {
                    reason: pb::ErasureReason::DataSubjectRequest,
                    now: NOW
                }
            ),
            Err(DomainError::NotFound)
        );
        let erased = decide(
            &given(&[reported(false)]),
            &Command::ErasePersonalData {
                reason: pb::ErasureReason::DataSubjectRequest,
                now: NOW,
            },
        )
        .unwrap()
        .remove(0);
        let case = given(&[reported(false), erased]);
        assert_eq!(
            decide(
                &case,
                &Command::ErasePersonalData {
                    reason: pb::ErasureReason::DataSubjectRequest,
                    now: NOW
                }
            ),
            Err(DomainError::AlreadyErased)
        );
    }
}
