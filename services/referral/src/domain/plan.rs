//! The individual rehabilitation plan of one person (kept by MSD): goals up
//! to reintegration (housing, work, school, family, …), coded follow-ups,
//! goals met.

use nrm_proto::referral::v1 as pb;
use pb::referral_event::Event;
use prost_types::Timestamp;

use super::DomainError;

/// Stable name of the aggregate, used in stream IDs and subjects.
pub const NAME: &str = "plan";

/// Stream ID of a person's plan.
#[must_use]
pub fn stream_id(person_id: nrm_kernel::ids::PersonId) -> String {
    format!("{NAME}-{person_id}")
}

/// One goal of the plan.
#[derive(Debug, Clone, PartialEq)]
pub struct Goal {
    /// Its ID.
    pub goal_id: String,
    /// What kind of goal.
    pub kind: i32,
    /// By when.
    pub due_at: Option<Timestamp>,
    /// Met.
    pub met: bool,
    /// Follow-ups: when, and the coded status.
    pub follow_ups: Vec<(Timestamp, String)>,
}

/// The state of a plan, folded from its events.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Plan {
    /// Number of events so far (0: the person has no plan yet).
    pub version: u64,
    /// The goals, in the order they were added.
    pub goals: Vec<Goal>,
}

impl Plan {
    fn goal(&self, goal_id: &str) -> Result<&Goal, DomainError> {
        self.goals
            .iter()
            .find(|g| g.goal_id == goal_id)
            .ok_or(DomainError::GoalNotFound)
    }
}

/// What a caller asks of a plan.
#[derive(Debug, Clone, PartialEq)]
pub enum Command {
    /// Add a goal.
    AddGoal {
        /// The person.
        person_id: String,
        /// The new goal's ID.
        goal_id: String,
        /// What kind.
        kind: pb::GoalKind,
        /// By when.
        due_at: Option<Timestamp>,
        /// The person is known from identification.
        person_known: bool,
    },
    /// Record a follow-up of a goal.
    RecordFollowUp {
        /// The person.
        person_id: String,
        /// The goal.
        goal_id: String,
        /// When.
        followed_up_at: Timestamp,
        /// A coded status, for example `ON_TRACK`.
        status_code: String,
    },
    /// Mark a goal met.
    MarkGoalMet {
        /// The person.
        person_id: String,
        /// The goal.
        goal_id: String,
        /// Now.
        now: Timestamp,
    },
}

/// The events `command` causes in `plan`.
///
/// # Errors
/// A [`DomainError`] when the command does not fit the plan's state.
pub fn decide(plan: &Plan, command: &Command) -> Result<Vec<Event>, DomainError> {
    match command {
        Command::AddGoal {
            person_id,
            goal_id,
            kind,
            due_at,
            person_known,
        } => {
            if !person_known {
                return Err(DomainError::UnknownPerson);
            }
            if plan.goals.iter().any(|g| g.goal_id == *goal_id) {
                return Err(DomainError::AlreadyExists("goal"));
            }
            Ok(vec![Event::PlanGoalAdded(pb::PlanGoalAdded {
                person_id: person_id.clone(),
                goal_id: goal_id.clone(),
                kind: *kind as i32,
                due_at: *due_at,
            })])
        }
        Command::RecordFollowUp {
            person_id,
            goal_id,
            followed_up_at,
            status_code,
        } => {
            if plan.goal(goal_id)?.met {
                return Err(DomainError::GoalAlreadyMet);
            }
            Ok(vec![Event::FollowUpRecorded(pb::FollowUpRecorded {
                person_id: person_id.clone(),
                goal_id: goal_id.clone(),
                followed_up_at: Some(*followed_up_at),
                status_code: status_code.clone(),
            })])
        }
        Command::MarkGoalMet {
            person_id,
            goal_id,
            now,
        } => {
            if plan.goal(goal_id)?.met {
                return Err(DomainError::GoalAlreadyMet);
            }
            Ok(vec![Event::GoalMet(pb::GoalMet {
                person_id: person_id.clone(),
                goal_id: goal_id.clone(),
                met_at: Some(*now),
            })])
        }
    }
}

/// The plan after `event` (events of other aggregates change nothing but the version).
#[must_use]
pub fn evolve(mut plan: Plan, event: &Event) -> Plan {
    plan.version += 1;
    match event {
        Event::PlanGoalAdded(added) => plan.goals.push(Goal {
            goal_id: added.goal_id.clone(),
            kind: added.kind,
            due_at: added.due_at,
            met: false,
            follow_ups: Vec::new(),
        }),
        Event::FollowUpRecorded(follow_up) => {
            if let Some(goal) = plan.goals.iter_mut().find(|g| g.goal_id == follow_up.goal_id) {
                goal.follow_ups.push((
                    follow_up.followed_up_at.unwrap_or_default(),
                    follow_up.status_code.clone(),
                ));
            }
        }
        Event::GoalMet(met) => {
            if let Some(goal) = plan.goals.iter_mut().find(|g| g.goal_id == met.goal_id) {
                goal.met = true;
            }
        }
        _ => {}
    }
    plan
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: Timestamp = Timestamp {
        seconds: 1_790_000_000,
        nanos: 0,
    };

    fn add(goal_id: &str, person_known: bool) -> Command {
        Command::AddGoal {
            person_id: "p1".into(),
            goal_id: goal_id.into(),
            kind: pb::GoalKind::Housing,
            due_at: None,
            person_known,
        }
    }

    fn follow_up(goal_id: &str) -> Command {
        Command::RecordFollowUp {
            person_id: "p1".into(),
            goal_id: goal_id.into(),
            followed_up_at: NOW,
            status_code: "ON_TRACK".into(),
        }
    }

    fn met(goal_id: &str) -> Command {
        Command::MarkGoalMet {
            person_id: "p1".into(),
            goal_id: goal_id.into(),
            now: NOW,
        }
    }

    fn apply(plan: Plan, command: &Command) -> Plan {
        decide(&plan, command).unwrap().iter().fold(plan, evolve)
    }

    #[test]
    fn a_goal_is_added_followed_up_and_met_once() {
        let plan = apply(Plan::default(), &add("g1", true));
        let plan = apply(plan, &follow_up("g1"));
        assert_eq!(plan.goals[0].follow_ups, [(NOW, "ON_TRACK".to_owned())]);
        let plan = apply(plan, &met("g1"));
        assert!(plan.goals[0].met);
        assert_eq!(plan.version, 3);
        assert_eq!(decide(&plan, &met("g1")), Err(DomainError::GoalAlreadyMet));
        assert_eq!(decide(&plan, &follow_up("g1")), Err(DomainError::GoalAlreadyMet));
    }

    #[test]
    fn unknown_goals_and_persons_are_refused() {
        assert_eq!(decide(&Plan::default(), &met("g9")), Err(DomainError::GoalNotFound));
        assert_eq!(
            decide(&Plan::default(), &follow_up("g9")),
            Err(DomainError::GoalNotFound)
        );
        assert_eq!(
            decide(&Plan::default(), &add("g1", false)),
            Err(DomainError::UnknownPerson)
        );
    }
}
