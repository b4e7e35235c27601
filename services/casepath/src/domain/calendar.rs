//! A working-day calendar: the country's UTC offset, its weekend weekdays,
//! its public holidays and its transferred working days (a Saturday worked
//! in exchange for a bridge day), read from TOML. Deadlines such as the
//! identification decision's (N working days from the report) are computed
//! here, purely.
//!
//! The file:
//! ```toml
//! utc_offset = "+06:00"
//! weekend = ["sat", "sun"]
//! holidays = ["2026-01-01", "2026-01-07"]
//! working_days = ["2026-11-14"]
//! ```
//! The built-in files are `deploy/casepath/calendars/<country>.toml`,
//! compiled in; a country without one gets Monday–Friday, no holidays, UTC.

use std::collections::BTreeSet;

use chrono::{DateTime, Datelike as _, Days, FixedOffset, NaiveDate, TimeZone as _, Utc, Weekday};
use serde::Deserialize;

/// Why a calendar could not be read (no part of the file is echoed).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CalendarError {
    /// Not TOML, or not the calendar's shape.
    #[error("the calendar is not valid TOML of the expected shape: {0}")]
    Syntax(String),
    /// `utc_offset` is not `+HH:MM` / `-HH:MM` within ±14 h.
    #[error("utc_offset must look like +06:00")]
    Offset,
    /// A weekday name other than mon, tue, wed, thu, fri, sat, sun.
    #[error("weekend names an unknown weekday")]
    Weekday,
    /// A date that is not `YYYY-MM-DD`.
    #[error("{0} holds a date that is not YYYY-MM-DD")]
    Date(&'static str),
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    #[serde(default)]
    country: Option<String>,
    #[serde(default = "utc")]
    utc_offset: String,
    #[serde(default = "default_weekend")]
    weekend: Vec<String>,
    #[serde(default)]
    holidays: Vec<String>,
    #[serde(default)]
    working_days: Vec<String>,
}

fn utc() -> String {
    "+00:00".into()
}

fn default_weekend() -> Vec<String> {
    vec!["sat".into(), "sun".into()]
}

/// A country's working days.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Calendar {
    offset: FixedOffset,
    weekend: Vec<Weekday>,
    holidays: BTreeSet<NaiveDate>,
    working_days: BTreeSet<NaiveDate>,
}

impl Default for Calendar {
    /// Monday to Friday, no holidays, UTC.
    fn default() -> Self {
        Self {
            offset: FixedOffset::east_opt(0).unwrap_or_else(|| unreachable!()),
            weekend: vec![Weekday::Sat, Weekday::Sun],
            holidays: BTreeSet::new(),
            working_days: BTreeSet::new(),
        }
    }
}

/// The built-in calendar file of `country` (lower-case ISO 3166-1 alpha-2).
#[must_use]
pub fn builtin(country: &str) -> Option<&'static str> {
    match country {
        "kg" => Some(include_str!("../../../../deploy/casepath/calendars/kg.toml")),
        "kz" => Some(include_str!("../../../../deploy/casepath/calendars/kz.toml")),
        "tj" => Some(include_str!("../../../../deploy/casepath/calendars/tj.toml")),
        "uz" => Some(include_str!("../../../../deploy/casepath/calendars/uz.toml")),
        "tm" => Some(include_str!("../../../../deploy/casepath/calendars/tm.toml")),
        "ru" => Some(include_str!("../../../../deploy/casepath/calendars/ru.toml")),
        _ => None,
    }
}

fn parse_offset(text: &str) -> Result<FixedOffset, CalendarError> {
    let (sign, rest) = match text.as_bytes().first() {
        Some(b'+') => (1, &text[1..]),
        Some(b'-') => (-1, &text[1..]),
        _ => return Err(CalendarError::Offset),
    };
    let (h, m) = rest.split_once(':').ok_or(CalendarError::Offset)?;
    let h: i32 = h.parse().map_err(|_| CalendarError::Offset)?;
    let m: i32 = m.parse().map_err(|_| CalendarError::Offset)?;
    if !(0..=14).contains(&h) || !(0..60).contains(&m) {
        return Err(CalendarError::Offset);
    }
    FixedOffset::east_opt(sign * (h * 3600 + m * 60)).ok_or(CalendarError::Offset)
}

fn parse_weekday(text: &str) -> Result<Weekday, CalendarError> {
    Ok(match text.to_ascii_lowercase().as_str() {
        "mon" | "monday" => Weekday::Mon,
        "tue" | "tuesday" => Weekday::Tue,
        "wed" | "wednesday" => Weekday::Wed,
        "thu" | "thursday" => Weekday::Thu,
        "fri" | "friday" => Weekday::Fri,
        "sat" | "saturday" => Weekday::Sat,
        "sun" | "sunday" => Weekday::Sun,
        _ => return Err(CalendarError::Weekday),
    })
}

fn parse_dates(field: &'static str, texts: &[String]) -> Result<BTreeSet<NaiveDate>, CalendarError> {
    texts
        .iter()
        .map(|t| NaiveDate::parse_from_str(t, "%Y-%m-%d").map_err(|_| CalendarError::Date(field)))
        .collect()
}

impl Calendar {
    /// A calendar from a TOML text.
    ///
    /// # Errors
    /// [`CalendarError`] naming what is malformed.
    pub fn from_toml(text: &str) -> Result<Self, CalendarError> {
        let file: File = toml::from_str(text).map_err(|e| CalendarError::Syntax(e.message().to_owned()))?;
        let _ = file.country;
        Ok(Self {
            offset: parse_offset(&file.utc_offset)?,
            weekend: file
                .weekend
                .iter()
                .map(|w| parse_weekday(w))
                .collect::<Result<_, _>>()?,
            holidays: parse_dates("holidays", &file.holidays)?,
            working_days: parse_dates("working_days", &file.working_days)?,
        })
    }

    /// Whether `date` (local) is a working day: a transferred working day,
    /// or a weekday that is neither weekend nor a public holiday.
    #[must_use]
    pub fn is_working_day(&self, date: NaiveDate) -> bool {
        if self.working_days.contains(&date) {
            return true;
        }
        !self.weekend.contains(&date.weekday()) && !self.holidays.contains(&date)
    }

    /// The end of the `n`th working day after the local day of `start`
    /// (the start's own day does not count, whatever it is), in UTC; `n` = 0:
    /// the end of the start's own day. "End" is the local midnight that
    /// follows the day.
    #[must_use]
    pub fn add_working_days(&self, start: DateTime<Utc>, n: u32) -> DateTime<Utc> {
        let mut day = start.with_timezone(&self.offset).date_naive();
        let mut left = n;
        // Bounded: a calendar always has working days in any 400 days
        // (at most 7 weekdays are weekend; holidays are finite).
        let mut guard = 0u32;
        while left > 0 && guard < 100_000 {
            day = day.checked_add_days(Days::new(1)).unwrap_or(day);
            if self.is_working_day(day) {
                left -= 1;
            }
            guard += 1;
        }
        let end = day.checked_add_days(Days::new(1)).unwrap_or(day);
        let midnight = end.and_hms_opt(0, 0, 0).unwrap_or_default();
        self.offset
            .from_local_datetime(&midnight)
            .single()
            .map_or(start, |t| t.with_timezone(&Utc))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn at(text: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(text).unwrap().with_timezone(&Utc)
    }

    fn kg_like() -> Calendar {
        Calendar::from_toml(
            r#"
            utc_offset = "+06:00"
            weekend = ["sat", "sun"]
            holidays = ["2026-03-09", "2026-12-31", "2027-01-01", "2027-01-07"]
            working_days = ["2026-03-14"]
            "#,
        )
        .unwrap()
    }

    #[test]
    fn five_working_days_span_a_weekend() {
        let cal = Calendar::default();
        // Wed 2026-03-04 → Thu, Fri, Mon, Tue, Wed: the end of Wed 2026-03-11.
        assert_eq!(
            cal.add_working_days(at("2026-03-04T10:00:00Z"), 5),
            at("2026-03-12T00:00:00Z")
        );
    }

    #[test]
    fn a_public_holiday_is_skipped_in_local_time() {
        let cal = kg_like();
        // Thu 2026-03-05 10:00 local (04:00Z): Fri 6, Mon 9 holiday, Tue 10,
        // Wed 11, Thu 12, Fri 13: the end of Fri 13 local = 18:00Z on the 13th.
        assert_eq!(
            cal.add_working_days(at("2026-03-05T04:00:00Z"), 5),
            at("2026-03-13T18:00:00Z")
        );
    }

    #[test]
    fn a_transferred_saturday_counts() {
        let cal = kg_like();
        // Thu 2026-03-12: Fri 13, Sat 14 (worked), Mon 16.
        assert_eq!(
            cal.add_working_days(at("2026-03-12T04:00:00Z"), 3),
            at("2026-03-16T18:00:00Z")
        );
        assert!(cal.is_working_day(NaiveDate::from_ymd_opt(2026, 3, 14).unwrap()));
        assert!(!cal.is_working_day(NaiveDate::from_ymd_opt(2026, 3, 15).unwrap()));
    }

    #[test]
    fn a_start_on_a_holiday_counts_from_the_next_working_day() {
        let cal = kg_like();
        // Mon 2026-03-09 (holiday): Tue 10 is the first.
        assert_eq!(
            cal.add_working_days(at("2026-03-09T05:00:00Z"), 1),
            at("2026-03-10T18:00:00Z")
        );
    }

    #[test]
    fn the_local_day_decides_not_the_utc_one() {
        let cal = kg_like();
        // 2026-03-05T20:00Z is Fri 6 at 02:00 local: Mon 9 is a holiday, Tue 10.
        assert_eq!(
            cal.add_working_days(at("2026-03-05T20:00:00Z"), 1),
            at("2026-03-10T18:00:00Z")
        );
    }

    #[test]
    fn year_end_holidays_carry_into_the_new_year() {
        let cal = kg_like();
        // Wed 2026-12-30: Thu 31 holiday, Fri 1 holiday, Mon 4, Tue 5, Wed 6, Thu 7 holiday, Fri 8.
        assert_eq!(
            cal.add_working_days(at("2026-12-30T04:00:00Z"), 4),
            at("2027-01-08T18:00:00Z")
        );
    }

    #[test]
    fn zero_days_is_the_end_of_the_start_day() {
        let cal = Calendar::default();
        assert_eq!(
            cal.add_working_days(at("2026-03-07T10:00:00Z"), 0),
            at("2026-03-08T00:00:00Z")
        );
    }

    #[test]
    fn malformed_files_are_refused() {
        assert_eq!(Calendar::from_toml("utc_offset = \"6\""), Err(CalendarError::Offset));
        assert_eq!(Calendar::from_toml("weekend = [\"fun\"]"), Err(CalendarError::Weekday));
        assert_eq!(
            Calendar::from_toml("holidays = [\"2026-13-01\"]"),
            Err(CalendarError::Date("holidays"))
        );
        assert!(matches!(
            Calendar::from_toml("holidays = 3"),
            Err(CalendarError::Syntax(_))
        ));
        assert!(matches!(Calendar::from_toml("nope = 1"), Err(CalendarError::Syntax(_))));
    }

    #[test]
    fn kyrgyzstans_2026_is_as_the_production_calendar_has_it() {
        let cal = Calendar::from_toml(builtin("kg").unwrap()).unwrap();
        let day = |m, d| NaiveDate::from_ymd_opt(2026, m, d).unwrap();
        // Off: the New Year holidays as extended, Orozo Ait, the May holidays.
        for (m, d) in [(1, 2), (1, 9), (1, 12), (3, 20), (5, 4), (5, 8), (8, 31)] {
            assert!(!cal.is_working_day(day(m, d)), "2026-{m:02}-{d:02} is off");
        }
        // Worked: a holiday kept as a working day, and the Mondays after a
        // holiday on a weekend (no longer moved).
        for (m, d) in [(1, 13), (2, 23), (3, 9), (3, 23), (11, 9)] {
            assert!(cal.is_working_day(day(m, d)), "2026-{m:02}-{d:02} is worked");
        }
    }

    #[test]
    fn every_builtin_calendar_parses() {
        for country in ["kg", "kz", "tj", "uz", "tm", "ru"] {
            let text = builtin(country).unwrap();
            let cal = Calendar::from_toml(text).unwrap_or_else(|e| panic!("{country}: {e}"));
            assert!(
                !cal.is_working_day(NaiveDate::from_ymd_opt(2027, 1, 1).unwrap()),
                "{country}"
            );
        }
        assert!(builtin("fr").is_none());
    }
}
