//! Small-cell suppression of published counts, so that no person can be
//! singled out.
//!
//! In each dimension (its cells without the total):
//! 1. primary: a cell with `0 < count < k` is suppressed;
//! 2. complementary: while the suppressed cells are exactly one, or sum to
//!    less than `k`, the smallest non-zero cell not yet suppressed is
//!    suppressed too, so that "total minus the shown cells" reveals no small
//!    number (when no such cell is left, the dimension stays as it is).
//!
//! Totals are never suppressed; zero cells are shown (a zero singles out no
//! one). Times measured on fewer than `k` samples are suppressed
//! ([`time_suppressed`]).

/// Which cells of one dimension to suppress, given their counts (without
/// the total). `k` ≤ 1 suppresses nothing.
#[must_use]
pub fn suppress(counts: &[u64], k: u64) -> Vec<bool> {
    let mut hidden: Vec<bool> = counts.iter().map(|&c| c > 0 && c < k).collect();
    loop {
        let n = hidden.iter().filter(|h| **h).count();
        let sum: u64 = counts.iter().zip(&hidden).filter(|(_, h)| **h).map(|(c, _)| *c).sum();
        if n == 0 || (n >= 2 && sum >= k) {
            break;
        }
        let next = counts
            .iter()
            .enumerate()
            .filter(|(i, c)| **c > 0 && !hidden[*i])
            .min_by_key(|(i, c)| (**c, *i))
            .map(|(i, _)| i);
        match next {
            Some(i) => hidden[i] = true,
            None => break,
        }
    }
    hidden
}

/// Whether a time measured on `samples` is withheld.
#[must_use]
pub fn time_suppressed(samples: u64, k: u64) -> bool {
    samples < k
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_small_cell_and_the_next_smallest_are_suppressed() {
        assert_eq!(suppress(&[40, 3, 12, 7], 5), vec![false, true, false, true]);
    }

    #[test]
    fn two_small_cells_summing_to_k_need_no_complement() {
        assert_eq!(suppress(&[40, 3, 2, 9], 5), vec![false, true, true, false]);
    }

    #[test]
    fn small_cells_summing_below_k_take_the_next_smallest() {
        assert_eq!(suppress(&[40, 1, 2, 9, 30], 5), vec![false, true, true, true, false]);
    }

    #[test]
    fn zeros_are_never_suppressed_nor_used_as_complements() {
        assert_eq!(suppress(&[0, 3, 0, 20], 5), vec![false, true, false, true]);
        assert_eq!(suppress(&[0, 3, 0], 5), vec![false, true, false]);
    }

    #[test]
    fn nothing_small_nothing_suppressed() {
        assert_eq!(suppress(&[5, 6, 0], 5), vec![false, false, false]);
        assert_eq!(suppress(&[1, 2], 1), vec![false, false]);
        assert_eq!(suppress(&[], 5), Vec::<bool>::new());
    }

    #[test]
    fn times_need_k_samples() {
        assert!(time_suppressed(4, 5));
        assert!(!time_suppressed(5, 5));
    }
}
