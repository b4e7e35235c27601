//! The anonymous notification: a pure aggregate of one event.
//!
//! An adult who does not consent to being referred is still counted: the
//! reporter files coded fields only (countries, forms of exploitation,
//! gender, age band). A notification has no person, no case, no match keys,
//! no sealed data and no time finer than the day it was filed: nothing links
//! it to a case, so it appears in the statistics and in no inbox or case list.
//! A child is never only counted: a child is reported.

use std::fmt;

use nrm_kernel::error::FieldViolation;
use nrm_proto::common::v1 as common;
use nrm_proto::identification::v1 as pb;
use pb::identification_event::Event;
use prost_types::Timestamp;
use uuid::Uuid;

/// Stable name of the aggregate, used in stream IDs and subjects.
pub const NAME: &str = "notification";

/// Seconds in a day.
const DAY: i64 = 86_400;

/// The ID of an anonymous notification (a UUIDv7). Kept here and not in the
/// kernel's registry of kinds: only this service knows the kind.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct NotificationId(Uuid);

impl NotificationId {
    /// The kind's name, used in stream IDs and messages.
    pub const KIND: &'static str = NAME;

    /// A new, time-ordered ID.
    #[must_use]
    pub fn new() -> Self {
        Self(Uuid::now_v7())
    }

    /// The UUID inside.
    #[must_use]
    pub const fn as_uuid(&self) -> Uuid {
        self.0
    }

    /// Parses a field; names it when it is not a UUID.
    ///
    /// # Errors
    /// A [`FieldViolation`] on `field` when the text is empty or not a UUID.
    pub fn parse(field: &str, text: &str) -> Result<Self, FieldViolation> {
        if text.trim().is_empty() {
            return Err(FieldViolation::new(field, "is required"));
        }
        text.trim()
            .parse::<Uuid>()
            .map(Self)
            .map_err(|_| FieldViolation::new(field, "must be a notification ID (a UUID)"))
    }
}

impl Default for NotificationId {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Display for NotificationId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// Stream ID of a notification.
#[must_use]
pub fn stream_id(id: NotificationId) -> String {
    format!("{NAME}-{id}")
}

/// The coded fields of a notification, as validated
/// ([`super::parse::notification`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Coded {
    /// ISO 3166-1 alpha-2, upper case.
    pub found_country: String,
    /// ISO 3166-1 alpha-2, upper case.
    pub country_of_exploitation: String,
    /// At least one, none unspecified, none repeated.
    pub exploitation_forms: Vec<i32>,
    /// Specified.
    pub gender: i32,
    /// Specified; a child's band is refused by [`decide`].
    pub age_band: i32,
    /// ISO 3166-1 alpha-2, upper case.
    pub citizenship: String,
}

/// The state of one notification, folded from its events.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Notification {
    /// Number of events so far (0: none filed).
    pub version: u64,
    /// The notification, as filed.
    pub filed: Option<pb::AnonymousNotificationFiled>,
}

/// What a caller asks of a notification.
#[derive(Debug, Clone, PartialEq)]
pub enum Command {
    /// File it.
    File {
        /// Its new ID.
        id: NotificationId,
        /// The coded fields.
        coded: Coded,
        /// Now (only its day is kept).
        now: Timestamp,
    },
}

/// Why a notification cannot be filed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NotificationError {
    /// A notification with this ID exists already.
    #[error("the notification was already filed")]
    AlreadyFiled,
    /// The age band is a child's: a child is reported, never only counted.
    #[error("a child is never only counted: report the child (ReportPresumedVictim)")]
    ChildMustBeReported,
}

impl NotificationError {
    /// Stable code of the rule.
    #[must_use]
    pub const fn code(&self) -> &'static str {
        match self {
            NotificationError::AlreadyFiled => "ALREADY_FILED",
            NotificationError::ChildMustBeReported => "CHILD_MUST_BE_REPORTED",
        }
    }
}

/// Whether `band` is a child's (under 18).
#[must_use]
pub fn is_child_band(band: i32) -> bool {
    band == common::AgeBand::AgeBand011 as i32 || band == common::AgeBand::AgeBand1217 as i32
}

/// Midnight UTC of the day of `t`.
#[must_use]
pub fn day_of(t: Timestamp) -> Timestamp {
    Timestamp {
        seconds: t.seconds - t.seconds.rem_euclid(DAY),
        nanos: 0,
    }
}

/// The events `command` causes in `notification`.
///
/// # Errors
/// A [`NotificationError`] when it is filed already or concerns a child.
pub fn decide(notification: &Notification, command: &Command) -> Result<Vec<Event>, NotificationError> {
    match command {
        Command::File { id, coded, now } => {
            if notification.filed.is_some() {
                return Err(NotificationError::AlreadyFiled);
            }
            if is_child_band(coded.age_band) {
                return Err(NotificationError::ChildMustBeReported);
            }
            Ok(vec![Event::AnonymousNotificationFiled(
                pb::AnonymousNotificationFiled {
                    notification_id: id.to_string(),
                    filed_on: Some(day_of(*now)),
                    found_country: coded.found_country.clone(),
                    country_of_exploitation: coded.country_of_exploitation.clone(),
                    exploitation_forms: coded.exploitation_forms.clone(),
                    gender: coded.gender,
                    age_band: coded.age_band,
                    citizenship: coded.citizenship.clone(),
                },
            )])
        }
    }
}

/// The notification after `event` (events of cases leave it as it is, but
/// for the version: they never are on a notification's stream).
#[must_use]
pub fn evolve(mut notification: Notification, event: &Event) -> Notification {
    notification.version += 1;
    if let Event::AnonymousNotificationFiled(filed) = event {
        notification.filed = Some(filed.clone());
    }
    notification
}

#[cfg(test)]
mod tests {
    use super::*;

    fn coded(age_band: common::AgeBand) -> Coded {
        Coded {
            found_country: "KG".into(),
            country_of_exploitation: "RU".into(),
            exploitation_forms: vec![pb::ExploitationForm::Labour as i32],
            gender: common::Gender::Female as i32,
            age_band: age_band as i32,
            citizenship: "KG".into(),
        }
    }

    /// 2026-03-04T15:16:17.5Z.
    const NOW: Timestamp = Timestamp {
        seconds: 1_772_637_377,
        nanos: 500_000_000,
    };

    fn file(id: NotificationId, age_band: common::AgeBand) -> Command {
        Command::File {
            id,
            coded: coded(age_band),
            now: NOW,
        }
    }

    #[test]
    fn a_notification_is_one_event_with_coded_fields_and_the_day_only() {
        let id = NotificationId::new();
        let events = decide(&Notification::default(), &file(id, common::AgeBand::AgeBand2534)).unwrap();
        let [Event::AnonymousNotificationFiled(filed)] = events.as_slice() else {
            panic!("one AnonymousNotificationFiled, got {events:?}");
        };
        assert_eq!(filed.notification_id, id.to_string());
        // 2026-03-04T00:00:00Z.
        assert_eq!(
            filed.filed_on,
            Some(Timestamp {
                seconds: 1_772_582_400,
                nanos: 0
            })
        );
        assert_eq!(filed.found_country, "KG");
        assert_eq!(filed.country_of_exploitation, "RU");
        assert_eq!(filed.age_band, common::AgeBand::AgeBand2534 as i32);
        let state = events.iter().fold(Notification::default(), evolve);
        assert_eq!(state.version, 1);
        assert_eq!(state.filed.as_ref(), Some(filed));
    }

    #[test]
    fn an_unknown_age_is_counted() {
        assert!(
            decide(
                &Notification::default(),
                &file(NotificationId::new(), common::AgeBand::Unknown)
            )
            .is_ok()
        );
    }

    #[test]
    fn a_child_is_reported_never_only_counted() {
        for band in [common::AgeBand::AgeBand011, common::AgeBand::AgeBand1217] {
            let err = decide(&Notification::default(), &file(NotificationId::new(), band)).unwrap_err();
            assert_eq!(err, NotificationError::ChildMustBeReported);
            assert_eq!(err.code(), "CHILD_MUST_BE_REPORTED");
        }
    }

    #[test]
    fn a_notification_is_filed_once() {
        let id = NotificationId::new();
        let command = file(id, common::AgeBand::AgeBand50Plus);
        let given = decide(&Notification::default(), &command)
            .unwrap()
            .iter()
            .fold(Notification::default(), evolve);
        assert_eq!(decide(&given, &command), Err(NotificationError::AlreadyFiled));
    }

    #[test]
    fn the_day_is_midnight_utc_also_before_1970() {
        assert_eq!(
            day_of(Timestamp { seconds: -1, nanos: 5 }),
            Timestamp {
                seconds: -DAY,
                nanos: 0
            }
        );
        assert_eq!(day_of(Timestamp { seconds: DAY, nanos: 0 }).seconds, DAY);
    }

    #[test]
    fn notification_ids_are_version_7_and_parse_back() {
        let id = NotificationId::new();
        assert_eq!(id.as_uuid().get_version_num(), 7);
        assert_eq!(NotificationId::parse("notification_id", &id.to_string()).unwrap(), id);
        assert!(NotificationId::parse("notification_id", "x").is_err());
        assert_eq!(stream_id(id), format!("notification-{id}"));
    }
}
