//! The order of a timeline: steps come from several streams, delivered in
//! any order and recorded with their own times (clocks of different
//! services and countries). A path shows them by their time, but never a
//! step before a step of the commit that caused it (its `causation_id` is
//! that commit's ID): a caused step whose own time is earlier is placed
//! right after its cause. Equal times are ordered by (stream sequence,
//! position in the commit), and a caused step always after its cause.
//! Some steps follow another at the same time by their nature, not by a
//! recorded cause: a case opened on a handover is dated at the handover
//! (in another service and stream), and comes after it ([`Ordering::after_peers`]).
//! Steps still equal are ordered by commit ID, so that every read gives the
//! same order.

use std::collections::HashMap;

use chrono::{DateTime, Utc};
use uuid::Uuid;

/// What ordering needs to know of a step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ordering {
    /// The step's own time.
    pub at: DateTime<Utc>,
    /// The commit it came in.
    pub commit_id: Uuid,
    /// The commit that caused that one, if any.
    pub causation_id: Option<Uuid>,
    /// Its place in its stream.
    pub stream_sequence: i64,
    /// Its place in its commit.
    pub position: i32,
    /// It comes after the other steps of its time (a case opened on a
    /// handover, dated at it).
    pub after_peers: bool,
}

/// The indices of `steps` in timeline order.
#[must_use]
pub fn order(steps: &[Ordering]) -> Vec<usize> {
    // The latest (effective time, depth) of each commit's steps.
    let mut by_commit: HashMap<Uuid, Vec<usize>> = HashMap::new();
    for (i, s) in steps.iter().enumerate() {
        by_commit.entry(s.commit_id).or_default().push(i);
    }
    let mut keys: Vec<Option<(DateTime<Utc>, u32)>> = vec![None; steps.len()];
    for i in 0..steps.len() {
        key_of(i, steps, &by_commit, &mut keys, 0);
    }
    let mut indices: Vec<usize> = (0..steps.len()).collect();
    indices.sort_by_key(|&i| {
        let (at, depth) = keys[i].unwrap_or((steps[i].at, 0));
        let s = &steps[i];
        (at, s.after_peers, depth, s.stream_sequence, s.position, s.commit_id, i)
    });
    indices
}

/// The effective time of step `i` (its own, or later when its cause is
/// later) and its causal depth; a cycle (which a correct history never has)
/// or a chain deeper than the steps is cut.
fn key_of(
    i: usize,
    steps: &[Ordering],
    by_commit: &HashMap<Uuid, Vec<usize>>,
    keys: &mut Vec<Option<(DateTime<Utc>, u32)>>,
    depth: usize,
) -> (DateTime<Utc>, u32) {
    if let Some(k) = keys[i] {
        return k;
    }
    let own = (steps[i].at, 0);
    let step = steps[i];
    let cause = step
        .causation_id
        .filter(|c| *c != step.commit_id)
        .and_then(|c| by_commit.get(&c));
    let key = match cause {
        Some(causes) if depth < steps.len() => {
            // Provisional value breaks cycles.
            keys[i] = Some(own);
            let latest = causes
                .iter()
                .map(|&j| key_of(j, steps, by_commit, keys, depth + 1))
                .max()
                .unwrap_or(own);
            (own.0.max(latest.0), latest.1 + 1)
        }
        _ => own,
    };
    keys[i] = Some(key);
    key
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn t(minute: i64) -> DateTime<Utc> {
        DateTime::from_timestamp(1_780_000_000 + minute * 60, 0).unwrap()
    }

    fn step(minute: i64, commit: u128, cause: Option<u128>, seq: i64, pos: i32) -> Ordering {
        Ordering {
            at: t(minute),
            commit_id: Uuid::from_u128(commit),
            causation_id: cause.map(Uuid::from_u128),
            stream_sequence: seq,
            position: pos,
            after_peers: false,
        }
    }

    #[test]
    fn steps_are_ordered_by_their_own_times_whatever_the_input_order() {
        let steps = [
            step(30, 3, None, 1, 0),
            step(10, 1, None, 9, 0),
            step(20, 2, None, 5, 0),
        ];
        assert_eq!(order(&steps), vec![1, 2, 0]);
    }

    #[test]
    fn a_caused_step_never_comes_before_its_cause() {
        // The bed (commit 2, caused by commit 1) carries an earlier clock.
        let steps = [
            step(5, 2, Some(1), 1, 0),
            step(10, 1, None, 7, 0),
            step(7, 3, None, 2, 0),
        ];
        assert_eq!(order(&steps), vec![2, 1, 0]);
    }

    #[test]
    fn a_caused_step_at_the_same_time_follows_its_cause_even_with_a_lower_sequence() {
        let steps = [step(10, 2, Some(1), 1, 0), step(10, 1, None, 50, 0)];
        assert_eq!(order(&steps), vec![1, 0]);
    }

    #[test]
    fn causes_chain_and_ties_fall_back_to_sequence_and_position() {
        let steps = [
            step(1, 3, Some(2), 1, 0),
            step(2, 2, Some(1), 1, 0),
            step(9, 1, None, 4, 1),
            step(9, 1, None, 4, 0),
        ];
        assert_eq!(order(&steps), vec![3, 2, 1, 0]);
    }

    #[test]
    fn a_cycle_does_not_hang() {
        let steps = [step(1, 1, Some(2), 1, 0), step(2, 2, Some(1), 2, 0)];
        assert_eq!(order(&steps).len(), 2);
    }

    #[test]
    fn a_step_after_its_peers_follows_the_others_of_its_time_whatever_its_sequence() {
        // A case opened on a handover (commit 1, sequence 1) and the
        // handover (commit 2, sequence 9, another stream), at the same time.
        let mut opened = step(10, 1, None, 1, 0);
        opened.after_peers = true;
        let steps = [opened, step(10, 2, None, 9, 0), step(11, 3, None, 0, 0)];
        assert_eq!(order(&steps), vec![1, 0, 2]);
    }

    #[test]
    fn equal_steps_are_ordered_by_commit_whatever_the_input_order() {
        let a = step(10, 7, None, 3, 0);
        let b = step(10, 5, None, 3, 0);
        assert_eq!(order(&[a, b]), vec![1, 0]);
        assert_eq!(order(&[b, a]), vec![0, 1]);
    }

    #[test]
    fn a_cause_outside_the_path_changes_nothing() {
        let steps = [step(2, 2, Some(99), 1, 0), step(1, 1, None, 2, 0)];
        assert_eq!(order(&steps), vec![1, 0]);
    }
}
