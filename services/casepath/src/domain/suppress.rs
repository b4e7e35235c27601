//! Small-cell suppression of published counts, so that no group smaller
//! than `k` can be singled out from a publishable answer.
//!
//! A publishable answer (`GetStatistics` with `publishable`; `nrmctl stats
//! --publishable`) follows these rules; a non-publishable one is exact and is
//! for the coordinator's own use only.
//!
//! * **k.** `k` = the larger of the configured `min_cell` and [`FLOOR`]
//!   (3, whatever the configuration). A request may ask for a larger `k`
//!   (CTDC: 11), never a smaller one: `0 < min_cell < k` is refused with
//!   `INVALID_ARGUMENT` naming `min_cell` ([`k`]). Refused rather than
//!   raised, so a caller who asked for less is told, instead of getting
//!   figures it did not ask for.
//! * **The period** is whole calendar months in UTC: `from` and `to` at the
//!   first of a month, 00:00:00Z ([`is_month_start`]); otherwise
//!   `INVALID_ARGUMENT` naming the field. Two periods then differ by whole
//!   months, never by one person's report.
//! * **The headline total** (persons + anonymous notifications) below `k`
//!   suppresses the whole table: every cell, every total, every time
//!   (also a month with nobody, so that an empty month and a small one look
//!   alike).
//! * **In each dimension** (its cells without the total, [`suppress`]):
//!   1. primary: a cell with `0 < count < k` is suppressed;
//!   2. complementary: while the suppressed cells are exactly one, or sum to
//!      less than `k`, the smallest non-zero cell not yet suppressed is
//!      suppressed too, so that "total minus the shown cells" gives away no
//!      small number;
//!   3. when no such cell is left (say `[0, 3, 0]`: one small cell and
//!      zeros), the dimension is hidden whole, its zeros too: a shown zero
//!      beside one hidden cell says where every one of them is.
//!
//!   Zero cells are otherwise shown (a zero singles out no one).
//! * **Totals.** A dimension's total is shown when none of its cells is
//!   suppressed, or when it is the headline total (which every dimension of
//!   persons and notifications shows anyway). So the stage total (persons
//!   only) is hidden as soon as a stage cell is. The notification
//!   dimension (identified | anonymous) hides its total with its cells.
//! * **Persons and notifications.** The stage total is the `identified`
//!   cell of the notification dimension, and the headline total minus it is
//!   the anonymous count. When those cells are suppressed, so is the stage
//!   total, and the stage dimension is made to suppress cells of its own
//!   (at least two, summing to `k` or more), so that the sum of its cells
//!   does not give the persons back.
//! * **Open-ended dimensions** (citizenship, country of exploitation: a cell
//!   only for a value that occurs) show by name only the values with
//!   unsuppressed counts; every suppressed value is folded into one
//!   [`OTHER`] cell, suppressed and without a count, so no rare code is
//!   named.
//! * **Times**: a time measured on fewer than `k` samples (or in a table
//!   under `k`) is suppressed, its number of samples too ([`time_suppressed`]);
//!   a shown median or 90th percentile is rounded to whole days
//!   ([`nearest_day_ms`]), so that it is not one person's exact duration.
//!
//! What these rules do not close: figures of nested or overlapping periods
//! (a quarter and its first month) can still be differenced; publish one
//! granularity. The stage is the stage now, so two answers for one period
//! at different times differ by the persons who moved.

/// The smallest `k` a publishable answer uses, whatever the configuration.
pub const FLOOR: u32 = 3;

/// The cell an open-ended dimension folds its suppressed values into.
pub const OTHER: &str = "other";

/// The dimension whose total is persons only (not the headline total).
pub const STAGE: &str = "stage";

/// The dimension of identified persons and anonymous notifications.
pub const NOTIFICATION: &str = "notification";

/// The cell of [`NOTIFICATION`] that counts persons (the stage total).
pub const IDENTIFIED: &str = "identified";

/// One dimension as counted: its cells (value, count) and its total.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Dimension {
    /// stage, gender, citizenship, …
    pub name: String,
    /// The cells, without the total.
    pub cells: Vec<(String, u64)>,
    /// The dimension's total.
    pub total: u64,
    /// A cell only for a value that occurs (codes, not an enum).
    pub open: bool,
}

/// One dimension as answered: `None` is a suppressed count.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Shown {
    /// The dimension's name.
    pub name: String,
    /// The cells, without the total.
    pub cells: Vec<(String, Option<u64>)>,
    /// The dimension's total.
    pub total: Option<u64>,
}

impl Shown {
    /// A dimension with every count shown (a non-publishable answer).
    #[must_use]
    pub fn exact(d: Dimension) -> Self {
        Self {
            name: d.name,
            cells: d.cells.into_iter().map(|(v, n)| (v, Some(n))).collect(),
            total: Some(d.total),
        }
    }
}

/// The `k` of a publishable answer: `requested` (0: none asked for), at
/// least the configured one and [`FLOOR`].
///
/// # Errors
/// The smallest `k` allowed, when `requested` is below it (and not 0).
pub fn k(requested: u32, configured: u32) -> Result<u32, u32> {
    let least = configured.max(FLOOR);
    match requested {
        0 => Ok(least),
        r if r < least => Err(least),
        r => Ok(r),
    }
}

/// Whether `t` is the first of a month at 00:00:00 UTC.
#[must_use]
pub fn is_month_start(t: chrono::DateTime<chrono::Utc>) -> bool {
    use chrono::{Datelike as _, Timelike as _};
    t.day() == 1 && t.hour() == 0 && t.minute() == 0 && t.second() == 0 && t.nanosecond() == 0
}

/// Which cells of one dimension to suppress, given their counts (without
/// the total): steps 1–3 of the module's rules. All `true` when the
/// dimension is hidden whole. `k` ≤ 1 suppresses nothing.
#[must_use]
pub fn suppress(counts: &[u64], k: u64) -> Vec<bool> {
    suppress_at_least(counts, k, false)
}

/// [`suppress`], and when `one` at least one non-zero cell suppressed (then
/// at least two, as always): for a dimension whose total must not be
/// computed back from its cells.
fn suppress_at_least(counts: &[u64], k: u64, one: bool) -> Vec<bool> {
    if k <= 1 && !one {
        return vec![false; counts.len()];
    }
    let mut hidden: Vec<bool> = counts.iter().map(|&c| c > 0 && c < k).collect();
    loop {
        let n = hidden.iter().filter(|h| **h).count();
        let sum: u64 = counts.iter().zip(&hidden).filter(|(_, h)| **h).map(|(c, _)| *c).sum();
        if (n == 0 && !one) || (n >= 2 && sum >= k) {
            return hidden;
        }
        let next = counts
            .iter()
            .enumerate()
            .filter(|(i, c)| **c > 0 && !hidden[*i])
            .min_by_key(|(i, c)| (**c, *i))
            .map(|(i, _)| i);
        match next {
            Some(i) => hidden[i] = true,
            // Nothing left to hide the small cells behind: hide it whole.
            None => return vec![true; counts.len()],
        }
    }
}

/// The publishable form of a table: `dimensions` with their counts,
/// `headline` (persons + anonymous notifications) and `k`, by the module's
/// rules.
#[must_use]
pub fn publish(dimensions: Vec<Dimension>, headline: u64, k: u64) -> Vec<Shown> {
    if headline < k {
        return dimensions.into_iter().map(hidden_whole).collect();
    }
    let counts = |d: &Dimension| d.cells.iter().map(|c| c.1).collect::<Vec<u64>>();
    let mut hidden: Vec<Vec<bool>> = dimensions.iter().map(|d| suppress(&counts(d), k)).collect();
    let identified_hidden = dimensions
        .iter()
        .zip(&hidden)
        .any(|(d, h)| d.name == NOTIFICATION && d.cells.iter().zip(h).any(|((v, _), h)| v == IDENTIFIED && *h));
    if identified_hidden {
        for (d, h) in dimensions.iter().zip(&mut hidden) {
            if d.name == STAGE {
                *h = suppress_at_least(&counts(d), k, true);
            }
        }
    }
    dimensions
        .into_iter()
        .zip(hidden)
        .map(|(d, h)| {
            let any = h.iter().any(|h| *h);
            let total_shown = !any || (d.total == headline && d.name != NOTIFICATION);
            let mut cells: Vec<(String, Option<u64>)> = d
                .cells
                .into_iter()
                .zip(&h)
                .filter(|(_, h)| !(d.open && **h))
                .map(|((v, n), h)| (v, (!h).then_some(n)))
                .collect();
            if d.open && any {
                cells.push((OTHER.into(), None));
            }
            Shown {
                name: d.name,
                cells,
                total: total_shown.then_some(d.total),
            }
        })
        .collect()
}

/// A dimension with nothing shown: every cell and the total suppressed, an
/// open-ended one's values all folded into [`OTHER`].
fn hidden_whole(d: Dimension) -> Shown {
    let cells = if d.open {
        vec![(OTHER.to_owned(), None)]
    } else {
        d.cells.into_iter().map(|(v, _)| (v, None)).collect()
    };
    Shown {
        name: d.name,
        cells,
        total: None,
    }
}

/// Whether a time measured on `samples` is withheld (with its number of
/// samples), in a table of `headline` persons and notifications.
#[must_use]
pub fn time_suppressed(samples: u64, headline: u64, k: u64) -> bool {
    samples < k || headline < k
}

/// `ms` milliseconds rounded to the nearest whole day (half a day up), in
/// milliseconds.
#[must_use]
pub fn nearest_day_ms(ms: i64) -> i64 {
    const DAY: i64 = 86_400_000;
    let days = ms.div_euclid(DAY) + i64::from(ms.rem_euclid(DAY) >= DAY / 2);
    days.saturating_mul(DAY)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dim(name: &str, cells: &[(&str, u64)], total: u64, open: bool) -> Dimension {
        Dimension {
            name: name.into(),
            cells: cells.iter().map(|(v, n)| ((*v).to_owned(), *n)).collect(),
            total,
            open,
        }
    }

    fn find<'a>(shown: &'a [Shown], name: &str) -> &'a Shown {
        shown.iter().find(|d| d.name == name).unwrap()
    }

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
    fn zeros_are_neither_suppressed_nor_used_as_complements() {
        assert_eq!(suppress(&[0, 3, 0, 20], 5), vec![false, true, false, true]);
    }

    #[test]
    fn a_small_cell_among_zeros_hides_the_dimension_whole() {
        assert_eq!(suppress(&[0, 3, 0], 5), vec![true, true, true]);
        assert_eq!(
            suppress(&[2, 1, 0], 5),
            vec![true, true, true],
            "3 < 5 with nothing left"
        );
    }

    #[test]
    fn nothing_small_nothing_suppressed() {
        assert_eq!(suppress(&[5, 6, 0], 5), vec![false, false, false]);
        assert_eq!(suppress(&[1, 2], 1), vec![false, false]);
        assert_eq!(suppress(&[], 5), Vec::<bool>::new());
    }

    #[test]
    fn k_is_at_least_the_configured_one_and_a_smaller_request_is_refused() {
        assert_eq!(k(0, 5), Ok(5));
        assert_eq!(k(11, 5), Ok(11));
        assert_eq!(k(5, 5), Ok(5));
        assert_eq!(k(1, 5), Err(5));
        assert_eq!(k(4, 5), Err(5));
        assert_eq!(k(0, 1), Ok(FLOOR), "a configuration below the floor");
        assert_eq!(k(2, 0), Err(FLOOR));
    }

    #[test]
    fn a_period_starts_and_ends_at_the_first_of_a_month_utc() {
        let t = |s: &str| chrono::DateTime::parse_from_rfc3339(s).unwrap().to_utc();
        assert!(is_month_start(t("2026-01-01T00:00:00Z")));
        assert!(is_month_start(t("2026-03-01T03:00:00+03:00")), "the same instant");
        assert!(!is_month_start(t("2026-01-01T00:00:00+03:00")));
        assert!(!is_month_start(t("2026-01-02T00:00:00Z")));
        assert!(!is_month_start(t("2026-01-01T00:00:00.001Z")));
        assert!(!is_month_start(t("2026-01-01T00:00:01Z")));
    }

    #[test]
    fn a_table_under_k_shows_nothing() {
        let shown = publish(
            vec![
                dim("stage", &[("A", 1), ("B", 0)], 1, false),
                dim("gender", &[("F", 0), ("M", 1)], 1, false),
                dim("citizenship", &[("tm", 1)], 1, true),
            ],
            1,
            5,
        );
        for d in &shown {
            assert_eq!(d.total, None, "{d:?}");
            assert!(d.cells.iter().all(|c| c.1.is_none()), "{d:?}");
        }
        assert_eq!(find(&shown, "citizenship").cells, vec![(OTHER.to_owned(), None)]);
        assert_eq!(
            find(&shown, "stage").cells.len(),
            2,
            "an enum's cells are listed, suppressed"
        );
    }

    #[test]
    fn a_total_other_than_the_headline_is_hidden_with_any_of_its_cells() {
        // 3 persons (all in one stage) and 10 notifications.
        let shown = publish(
            vec![
                dim("stage", &[("A", 0), ("B", 3), ("C", 0)], 3, false),
                dim("gender", &[("F", 13), ("M", 0)], 13, false),
            ],
            13,
            5,
        );
        let stage = find(&shown, "stage");
        assert_eq!(stage.total, None);
        assert!(stage.cells.iter().all(|c| c.1.is_none()), "hidden whole: {stage:?}");
        assert_eq!(find(&shown, "gender").total, Some(13), "the headline total");
        // A suppressed cell beside the headline total keeps the total.
        let shown = publish(vec![dim("gender", &[("F", 10), ("M", 2), ("O", 6)], 18, false)], 18, 5);
        assert_eq!(shown[0].total, Some(18));
        assert_eq!(
            shown[0].cells,
            vec![("F".into(), Some(10)), ("M".into(), None), ("O".into(), None)]
        );
    }

    #[test]
    fn hidden_anonymous_notifications_hide_the_persons_in_every_dimension() {
        // 20 persons and 1 notification: 21 - 20 would give the 1 away.
        let shown = publish(
            vec![
                dim("stage", &[("A", 14), ("B", 6), ("C", 0)], 20, false),
                dim("notification", &[("identified", 20), ("anonymous", 1)], 21, false),
                dim("gender", &[("F", 21)], 21, false),
            ],
            21,
            5,
        );
        let notification = find(&shown, "notification");
        assert_eq!(notification.total, None);
        assert!(notification.cells.iter().all(|c| c.1.is_none()));
        let stage = find(&shown, "stage");
        assert_eq!(stage.total, None, "the stage total is the persons");
        assert_eq!(
            stage.cells,
            vec![("A".into(), None), ("B".into(), None), ("C".into(), Some(0))],
            "the stage cells would sum to the persons"
        );
        assert_eq!(find(&shown, "gender").total, Some(21));
    }

    #[test]
    fn no_anonymous_notification_leaves_the_stages_alone() {
        let shown = publish(
            vec![
                dim("stage", &[("A", 14), ("B", 6)], 20, false),
                dim("notification", &[("identified", 20), ("anonymous", 0)], 20, false),
            ],
            20,
            5,
        );
        assert_eq!(find(&shown, "stage").total, Some(20));
        assert_eq!(
            find(&shown, "stage").cells,
            vec![("A".into(), Some(14)), ("B".into(), Some(6))]
        );
        assert_eq!(find(&shown, "notification").total, Some(20));
    }

    #[test]
    fn rare_codes_are_folded_into_other_and_never_named() {
        let shown = publish(
            vec![dim("citizenship", &[("kg", 20), ("tm", 1), ("uz", 7)], 28, true)],
            28,
            5,
        );
        assert_eq!(
            shown[0].cells,
            vec![("kg".into(), Some(20)), (OTHER.into(), None)],
            "tm (1) and its complement uz (7) are not named"
        );
        assert_eq!(shown[0].total, Some(28));
        let shown = publish(vec![dim("citizenship", &[("kg", 20), ("uz", 7)], 27, true)], 27, 5);
        assert_eq!(shown[0].cells, vec![("kg".into(), Some(20)), ("uz".into(), Some(7))]);
    }

    #[test]
    fn times_need_k_samples_and_a_table_of_k() {
        assert!(time_suppressed(4, 100, 5));
        assert!(!time_suppressed(5, 100, 5));
        assert!(time_suppressed(5, 4, 5));
    }

    #[test]
    fn times_are_rounded_to_the_nearest_day() {
        const DAY: i64 = 86_400_000;
        assert_eq!(nearest_day_ms(0), 0);
        assert_eq!(nearest_day_ms(DAY / 2 - 1), 0);
        assert_eq!(nearest_day_ms(DAY / 2), DAY);
        assert_eq!(nearest_day_ms(3 * DAY + 12_345_678), 3 * DAY);
        assert_eq!(nearest_day_ms(3 * DAY - 1), 3 * DAY);
        assert_eq!(nearest_day_ms(-DAY / 4), 0);
    }
}
