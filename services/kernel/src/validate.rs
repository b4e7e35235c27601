//! Validating request fields every service has: request IDs, expected
//! versions, protobuf enum values, ISO 3166-2 region codes, and timestamps.
//!
//! Each check names the offending field in a [`FieldViolation`] whose
//! description says what a valid value looks like and never repeats the value
//! sent (it may be personal data). Callers collect violations in
//! [`Violations`] so that a request learns every offending field at once.

use chrono::{DateTime, Utc};
use prost_types::Timestamp;

use crate::error::{FieldViolation, Violations};

/// Most characters of a request ID.
pub const MAX_REQUEST_ID: usize = 128;

/// A client request ID: 1–128 printable ASCII characters.
///
/// # Errors
/// A violation of `request_id`.
pub fn request_id(text: &str) -> Result<String, FieldViolation> {
    if text.is_empty() {
        return Err(FieldViolation::new(
            "request_id",
            "is required: a client-chosen ID (a UUID is best) that makes retries safe",
        ));
    }
    if text.len() > MAX_REQUEST_ID || !text.chars().all(|c| c.is_ascii_graphic()) {
        return Err(FieldViolation::new(
            "request_id",
            "must be 1-128 printable ASCII characters",
        ));
    }
    Ok(text.to_owned())
}

/// The version of an `aggregate` (`case`, `shelter`, …) the caller read, for
/// a command that must not act on a newer one.
///
/// # Errors
/// A violation of `expected_version` when it is 0.
pub fn expected_version(aggregate: &str, version: u64) -> Result<u64, FieldViolation> {
    if version == 0 {
        Err(FieldViolation::new(
            "expected_version",
            format!("is required: the {aggregate} version you read (at least 1)"),
        ))
    } else {
        Ok(version)
    }
}

/// A value of a protobuf enum `E`, not `UNSPECIFIED` (0) unless allowed.
///
/// # Errors
/// A violation of `field` when the value is 0 and that is not allowed, or
/// when `E` has no such value.
pub fn enum_value<E: TryFrom<i32>>(field: &str, value: i32, allow_unspecified: bool) -> Result<i32, FieldViolation> {
    if value == 0 && !allow_unspecified {
        return Err(FieldViolation::new(field, "is required"));
    }
    if value != 0 && E::try_from(value).is_err() {
        return Err(FieldViolation::new(field, "is not a known value"));
    }
    Ok(value)
}

/// A required value of a protobuf enum, as the enum.
///
/// # Errors
/// As [`enum_value`] with `UNSPECIFIED` not allowed.
pub fn required_enum<E: TryFrom<i32>>(field: &str, value: i32) -> Result<E, FieldViolation> {
    enum_value::<E>(field, value, false)
        .and_then(|value| E::try_from(value).map_err(|_| FieldViolation::new(field, "is not a known value")))
}

/// A list of values of a protobuf enum: each known and specified, none
/// repeated. Violations (of `field[i]`) go to `v`; the valid values are kept.
pub fn enum_list<E: TryFrom<i32>>(field: &str, values: &[i32], v: &mut Violations) -> Vec<i32> {
    let mut out: Vec<i32> = Vec::with_capacity(values.len());
    for (i, value) in values.iter().enumerate() {
        match enum_value::<E>(&format!("{field}[{i}]"), *value, false) {
            Ok(value) if out.contains(&value) => v.add(format!("{field}[{i}]"), "is repeated"),
            Ok(value) => out.push(value),
            Err(violation) => v.push(violation),
        }
    }
    out
}

/// An agency code as tokens carry it (`kg-mvd`, `kg-consulate-moscow`):
/// 1–64 letters, digits, `-`, `_` or `.`; never a name. The one rule of
/// every service for an agency a caller names.
///
/// # Errors
/// A violation of `field` (the text itself is never quoted).
pub fn agency(field: &str, text: &str) -> Result<String, FieldViolation> {
    code(field, text, "an agency code", " such as kg-msd")
}

/// A code of an organisation or a thing (`what`, e.g. "a provider code";
/// `example` follows it when the field is missing): 1–64 letters, digits,
/// `-`, `_` or `.`, so never a person's name.
///
/// # Errors
/// A violation of `field` (the text itself is never quoted).
pub fn code(field: &str, text: &str, what: &str, example: &str) -> Result<String, FieldViolation> {
    if text.is_empty() {
        return Err(FieldViolation::new(field, format!("is required: {what}{example}")));
    }
    if text.len() > 64
        || !text
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
    {
        return Err(FieldViolation::new(
            field,
            format!("must be {what}: 1-64 letters, digits, '-', '_' or '.'"),
        ));
    }
    Ok(text.to_owned())
}

/// An ISO 3166-2 region code (`KG-O`, `KG-GB`), upper-cased: two letters, a
/// hyphen, one to three letters or digits. `None` when `text` is not one
/// (each service words its own violation).
#[must_use]
pub fn region_code(text: &str) -> Option<String> {
    let upper = text.trim().to_ascii_uppercase();
    let valid = upper.split_once('-').is_some_and(|(country, sub)| {
        country.len() == 2
            && country.chars().all(|c| c.is_ascii_uppercase())
            && (1..=3).contains(&sub.len())
            && sub.chars().all(|c| c.is_ascii_uppercase() || c.is_ascii_digit())
    });
    valid.then_some(upper)
}

/// The time as a protobuf timestamp.
#[must_use]
pub fn timestamp(t: DateTime<Utc>) -> Timestamp {
    Timestamp {
        seconds: t.timestamp(),
        nanos: i32::try_from(t.timestamp_subsec_nanos()).unwrap_or(0),
    }
}

/// The protobuf timestamp as a time, if it is one.
#[must_use]
pub fn to_datetime(t: &Timestamp) -> Option<DateTime<Utc>> {
    DateTime::from_timestamp(t.seconds, u32::try_from(t.nanos).ok()?)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A protobuf-like enum: 0 unspecified, 1 and 2 known.
    struct Kind;

    impl TryFrom<i32> for Kind {
        type Error = ();

        fn try_from(value: i32) -> Result<Self, ()> {
            if (0..=2).contains(&value) { Ok(Kind) } else { Err(()) }
        }
    }

    #[test]
    fn request_ids_are_short_printable_ascii() {
        assert_eq!(request_id("r-1").unwrap(), "r-1");
        assert!(request_id("").unwrap_err().description.starts_with("is required"));
        assert!(request_id("a b").is_err());
        assert!(request_id(&"x".repeat(129)).is_err());
    }

    #[test]
    fn expected_versions_name_the_aggregate() {
        assert_eq!(expected_version("case", 3).unwrap(), 3);
        let err = expected_version("shelter", 0).unwrap_err();
        assert_eq!(err.field, "expected_version");
        assert_eq!(
            err.description,
            "is required: the shelter version you read (at least 1)"
        );
    }

    #[test]
    fn enum_lists_name_each_bad_entry() {
        let mut v = Violations::new();
        assert_eq!(enum_list::<Kind>("kinds", &[1, 0, 1, 9, 2], &mut v), [1, 2]);
        let Err(crate::AppError::InvalidArgument(violations)) = v.finish(|| ()) else {
            panic!("expected violations");
        };
        let found: Vec<_> = violations
            .iter()
            .map(|v| (v.field.as_str(), v.description.as_str()))
            .collect();
        assert_eq!(
            found,
            [
                ("kinds[1]", "is required"),
                ("kinds[2]", "is repeated"),
                ("kinds[3]", "is not a known value")
            ]
        );
        assert!(enum_value::<Kind>("k", 0, true).is_ok());
        assert!(required_enum::<Kind>("k", 0).is_err());
    }

    #[test]
    fn regions_look_like_iso_3166_2_codes() {
        assert_eq!(region_code(" kg-gb ").as_deref(), Some("KG-GB"));
        assert_eq!(region_code("KZ-75").as_deref(), Some("KZ-75"));
        for bad in ["", "KG", "KGZ-O", "KG-ABCD", "K1-O", "KG_O", "KG-"] {
            assert!(region_code(bad).is_none(), "{bad:?}");
        }
    }

    #[test]
    fn timestamps_round_trip() {
        let now = Utc::now();
        assert_eq!(to_datetime(&timestamp(now)), Some(now));
        assert_eq!(to_datetime(&Timestamp { seconds: 0, nanos: -1 }), None);
    }
}
