//! Where a person stands on the path (`nrm.casepath.v1.Stage`), from the
//! person's facts, and the time spent at each stage.
//!
//! # Precedence
//! A person is often at several places at once (sheltered while a referral
//! is pending, identified and returning). The stage is the first that holds,
//! in this order, the later steps of the path winning over the earlier:
//!
//! 1. `REINTEGRATED`: every plan goal met (at least one goal);
//! 2. `REINTEGRATING`: plan goals exist, not all met;
//! 3. `SHELTERED`: admitted to a shelter and not discharged;
//! 4. `RETURNING`: a return open, neither handed over nor halted;
//! 5. `ASSISTED`: a referral accepted and not closed;
//! 6. `REFERRED`: a referral sent (or redirected) and not answered;
//! 7. `REINTEGRATED`: referrals closed with an outcome and nothing of 3–6 open;
//! 8. `RETURNED`: handed over to the home country;
//! 9. `IDENTIFIED`: a case formally identified (here, or abroad: a case
//!    opened from abroad), whatever another case says;
//! 10. `NOT_IDENTIFIED`: decided not identified (and no case identified);
//! 11. `PRESUMED`: screened, a child, or a decision under review;
//! 12. `REPORTED`: reported, nothing more;
//! 13. `UNSPECIFIED`: nothing known.
//!
//! The same rules serve a path (replayed step by step, [`Replay`]) and the
//! lists and statistics (the counts of [`Facts`] come from the read models
//! in one set-based query).

use std::collections::HashMap;

use chrono::{DateTime, Utc};
use nrm_proto::casepath::v1::{Stage, StepKind, step};
use uuid::Uuid;

/// A person's facts as counts: what the stage is decided on.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Facts {
    /// At least one case reported.
    pub reported: bool,
    /// A case screened, of a child, or under review.
    pub presumed: bool,
    /// A case identified.
    pub identified: bool,
    /// A case decided not identified.
    pub not_identified: bool,
    /// Referrals waiting for an answer.
    pub referrals_pending: u32,
    /// Referrals accepted and not closed.
    pub referrals_accepted: u32,
    /// Referrals closed with an outcome.
    pub referrals_closed: u32,
    /// Admissions not discharged.
    pub sheltered: u32,
    /// Returns open (neither handed over nor halted).
    pub returns_open: u32,
    /// Returns handed over.
    pub handed_over: u32,
    /// Plan goals.
    pub goals: u32,
    /// Plan goals met.
    pub goals_met: u32,
}

/// What decides one rung of the precedence.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Holds {
    AllGoalsMet,
    GoalsOpen,
    Sheltered,
    ReturnOpen,
    Accepted,
    Pending,
    ClosedWithOutcome,
    HandedOver,
    Identified,
    NotIdentified,
    Presumed,
    Reported,
}

/// The precedence (see the module's documentation), first match wins.
const PRECEDENCE: [(Holds, Stage); 12] = [
    (Holds::AllGoalsMet, Stage::Reintegrated),
    (Holds::GoalsOpen, Stage::Reintegrating),
    (Holds::Sheltered, Stage::Sheltered),
    (Holds::ReturnOpen, Stage::Returning),
    (Holds::Accepted, Stage::Assisted),
    (Holds::Pending, Stage::Referred),
    (Holds::ClosedWithOutcome, Stage::Reintegrated),
    (Holds::HandedOver, Stage::Returned),
    (Holds::Identified, Stage::Identified),
    (Holds::NotIdentified, Stage::NotIdentified),
    (Holds::Presumed, Stage::Presumed),
    (Holds::Reported, Stage::Reported),
];

impl Holds {
    fn of(self, f: &Facts) -> bool {
        match self {
            Holds::AllGoalsMet => f.goals > 0 && f.goals_met >= f.goals,
            Holds::GoalsOpen => f.goals > 0,
            Holds::Sheltered => f.sheltered > 0,
            Holds::ReturnOpen => f.returns_open > 0,
            Holds::Accepted => f.referrals_accepted > 0,
            Holds::Pending => f.referrals_pending > 0,
            Holds::ClosedWithOutcome => f.referrals_closed > 0,
            Holds::HandedOver => f.handed_over > 0,
            Holds::Identified => f.identified,
            Holds::NotIdentified => f.not_identified,
            Holds::Presumed => f.presumed,
            Holds::Reported => f.reported,
        }
    }

    /// The same condition over the columns of casepath's facts query.
    fn sql(self) -> &'static str {
        match self {
            Holds::AllGoalsMet => "goals > 0 AND met >= goals",
            Holds::GoalsOpen => "goals > 0",
            Holds::Sheltered => "admitted > 0",
            Holds::ReturnOpen => "returns_open > 0",
            Holds::Accepted => "accepted > 0",
            Holds::Pending => "pending > 0",
            Holds::ClosedWithOutcome => "closed > 0",
            Holds::HandedOver => "handed_over > 0",
            Holds::Identified => "identified",
            Holds::NotIdentified => "not_identified",
            Holds::Presumed => "presumed",
            Holds::Reported => "true",
        }
    }
}

/// The stage of `facts` (see the module's precedence).
#[must_use]
pub fn stage(f: &Facts) -> Stage {
    PRECEDENCE
        .iter()
        .find(|(holds, _)| holds.of(f))
        .map_or(Stage::Unspecified, |(_, stage)| *stage)
}

/// The precedence as a SQL `CASE` giving the stage's number, over the
/// columns of casepath's facts query (`goals`, `met`, `admitted`,
/// `returns_open`, `accepted`, `pending`, `closed`, `handed_over`,
/// `identified`, `not_identified`, `presumed`; every row is reported), so
/// that statistics count stages in the database by the same rules.
#[must_use]
pub fn sql_case() -> String {
    let mut out = String::from("CASE");
    for (holds, stage) in PRECEDENCE {
        out.push_str(&format!(" WHEN {} THEN {}", holds.sql(), stage as i32));
    }
    out.push_str(" END");
    out
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Case {
    Reported,
    Presumed,
    Identified,
    NotIdentified,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Referral {
    Pending,
    Accepted,
    Closed,
    Ended,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Return {
    Open,
    HandedOver,
    Halted,
}

/// A person's facts, replayed from the steps of a path in timeline order.
#[derive(Debug, Default, Clone)]
pub struct Replay {
    cases: HashMap<Uuid, Case>,
    referrals: HashMap<Uuid, Referral>,
    admitted: HashMap<Uuid, bool>,
    returns: HashMap<Uuid, Return>,
    goals: HashMap<Uuid, bool>,
}

impl Replay {
    /// Applies one step about `subject` (`child`: the step's case is of a child).
    pub fn apply(&mut self, kind: StepKind, subject: Uuid, detail: Option<&step::Detail>, child: bool) {
        use StepKind as K;
        match kind {
            K::Found | K::Reported => {
                let initial = if child { Case::Presumed } else { Case::Reported };
                self.cases.entry(subject).or_insert(initial);
            }
            K::Screened | K::ReviewRequested => {
                self.cases.insert(subject, Case::Presumed);
            }
            K::Identified | K::CaseOpenedFromAbroad => {
                self.cases.insert(subject, Case::Identified);
            }
            K::NotIdentified => {
                self.cases.insert(subject, Case::NotIdentified);
            }
            K::ReferralSent | K::ReferralRedirected => {
                self.referrals.insert(subject, Referral::Pending);
            }
            K::ReferralAccepted => {
                self.referrals.insert(subject, Referral::Accepted);
            }
            K::ReferralDeclined | K::ReferralCancelled => {
                self.referrals.insert(subject, Referral::Ended);
            }
            K::ReferralClosed => {
                let outcome = matches!(detail, Some(step::Detail::Referral(r)) if r.outcome != 0);
                self.referrals
                    .insert(subject, if outcome { Referral::Closed } else { Referral::Ended });
            }
            K::Admitted => {
                self.admitted.insert(subject, true);
            }
            K::Discharged => {
                self.admitted.insert(subject, false);
            }
            K::ReturnOpened | K::ReturnAnnounced => {
                self.returns.entry(subject).or_insert(Return::Open);
            }
            K::HandedOver => {
                self.returns.insert(subject, Return::HandedOver);
            }
            K::ReturnHalted => {
                self.returns.insert(subject, Return::Halted);
            }
            K::PlanGoalAdded => {
                self.goals.entry(subject).or_insert(false);
            }
            K::GoalMet => {
                self.goals.insert(subject, true);
            }
            _ => {}
        }
    }

    /// The facts so far.
    #[must_use]
    pub fn facts(&self) -> Facts {
        let count = |n: usize| u32::try_from(n).unwrap_or(u32::MAX);
        let cases = || self.cases.values();
        let referrals = |r: Referral| count(self.referrals.values().filter(|v| **v == r).count());
        let returns = |r: Return| count(self.returns.values().filter(|v| **v == r).count());
        Facts {
            reported: !self.cases.is_empty(),
            presumed: cases().any(|c| *c == Case::Presumed),
            identified: cases().any(|c| *c == Case::Identified),
            not_identified: cases().any(|c| *c == Case::NotIdentified),
            referrals_pending: referrals(Referral::Pending),
            referrals_accepted: referrals(Referral::Accepted),
            referrals_closed: referrals(Referral::Closed),
            sheltered: count(self.admitted.values().filter(|a| **a).count()),
            returns_open: returns(Return::Open),
            handed_over: returns(Return::HandedOver),
            goals: count(self.goals.len()),
            goals_met: count(self.goals.values().filter(|m| **m).count()),
        }
    }
}

/// Time at one stage.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Span {
    /// The stage.
    pub stage: Stage,
    /// When the person got there.
    pub entered_at: DateTime<Utc>,
    /// When the person left it (none: still there).
    pub left_at: Option<DateTime<Utc>>,
}

/// One step as the stage needs it.
#[derive(Debug, Clone, Copy)]
pub struct Change<'a> {
    /// When.
    pub at: DateTime<Utc>,
    /// What.
    pub kind: StepKind,
    /// The record it concerns.
    pub subject: Uuid,
    /// The step's detail (a closed referral's outcome).
    pub detail: Option<&'a step::Detail>,
    /// The step's case is of a child.
    pub child: bool,
}

/// The current stage and the stages passed through, from the person's steps
/// in timeline order (all of them, whoever asks: the stage is the person's).
#[must_use]
pub fn spans(changes: &[Change<'_>]) -> (Stage, Vec<Span>) {
    let mut replay = Replay::default();
    let mut spans: Vec<Span> = Vec::new();
    let mut current = Stage::Unspecified;
    for c in changes {
        replay.apply(c.kind, c.subject, c.detail, c.child);
        let now = stage(&replay.facts());
        if now != current {
            if let Some(last) = spans.last_mut() {
                last.left_at = Some(c.at);
            }
            spans.push(Span {
                stage: now,
                entered_at: c.at,
                left_at: None,
            });
            current = now;
        }
    }
    (current, spans)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use nrm_proto::casepath::v1::ReferralDetail;

    use super::*;

    fn t(minute: i64) -> DateTime<Utc> {
        DateTime::from_timestamp(1_780_000_000 + minute * 60, 0).unwrap()
    }

    fn change(minute: i64, kind: StepKind, subject: u128) -> Change<'static> {
        Change {
            at: t(minute),
            kind,
            subject: Uuid::from_u128(subject),
            detail: None,
            child: false,
        }
    }

    #[test]
    fn a_full_path_passes_through_the_stages_in_order() {
        use StepKind as K;
        let changes = [
            change(0, K::Found, 1),
            change(0, K::Reported, 1),
            change(5, K::Screened, 1),
            change(10, K::Identified, 1),
            change(11, K::ReferralSent, 2),
            change(12, K::ReferralAccepted, 2),
            change(13, K::Admitted, 3),
            change(20, K::Discharged, 3),
            change(21, K::ReturnOpened, 4),
            change(30, K::HandedOver, 4),
            change(31, K::PlanGoalAdded, 5),
            change(40, K::GoalMet, 5),
        ];
        let (now, spans) = spans(&changes);
        assert_eq!(now, Stage::Reintegrated);
        let stages: Vec<Stage> = spans.iter().map(|s| s.stage).collect();
        assert_eq!(
            stages,
            vec![
                Stage::Reported,
                Stage::Presumed,
                Stage::Identified,
                Stage::Referred,
                Stage::Assisted,
                Stage::Sheltered,
                Stage::Assisted,
                Stage::Returning,
                Stage::Assisted,
                Stage::Reintegrating,
                Stage::Reintegrated,
            ]
        );
        assert_eq!(spans[0].left_at, Some(t(5)));
        assert_eq!(spans.last().unwrap().left_at, None);
    }

    #[test]
    fn a_child_is_presumed_from_the_report() {
        let c = Change {
            child: true,
            ..change(0, StepKind::Reported, 1)
        };
        assert_eq!(spans(&[c]).0, Stage::Presumed);
    }

    #[test]
    fn referrals_closed_with_an_outcome_and_nothing_open_is_reintegrated() {
        let closed = step::Detail::Referral(ReferralDetail {
            outcome: 1,
            ..ReferralDetail::default()
        });
        let changes = [
            change(0, StepKind::Reported, 1),
            change(1, StepKind::ReferralSent, 2),
            change(2, StepKind::ReferralAccepted, 2),
            Change {
                detail: Some(&closed),
                ..change(3, StepKind::ReferralClosed, 2)
            },
        ];
        assert_eq!(spans(&changes).0, Stage::Reintegrated);
        // Without an outcome it is not.
        let bare = [change(0, StepKind::Reported, 1), change(3, StepKind::ReferralClosed, 2)];
        assert_eq!(spans(&bare).0, Stage::Reported);
    }

    #[test]
    fn an_identified_case_wins_over_another_case_not_identified() {
        let f = Facts {
            reported: true,
            identified: true,
            not_identified: true,
            ..Facts::default()
        };
        assert_eq!(stage(&f), Stage::Identified);
        assert_eq!(stage(&Facts::default()), Stage::Unspecified);
        let halted = [
            change(0, StepKind::ReturnOpened, 4),
            change(1, StepKind::ReturnHalted, 4),
        ];
        assert_eq!(spans(&halted).0, Stage::Unspecified);
    }

    #[test]
    fn the_sql_case_follows_the_same_precedence() {
        let sql = sql_case();
        assert!(sql.starts_with("CASE WHEN goals > 0 AND met >= goals THEN 11 WHEN goals > 0 THEN 10"));
        assert!(sql.ends_with("WHEN presumed THEN 2 WHEN true THEN 1 END"));
        assert_eq!(sql.matches(" WHEN ").count(), PRECEDENCE.len());
    }

    #[test]
    fn a_pending_referral_at_a_shelter_is_sheltered() {
        let f = Facts {
            referrals_pending: 1,
            sheltered: 1,
            ..Facts::default()
        };
        assert_eq!(stage(&f), Stage::Sheltered);
    }
}
