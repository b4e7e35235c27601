//! Typed identifiers: a UUIDv7 wrapped in one type per kind, so a case ID
//! can never be passed where a person ID is expected.

use std::fmt;
use std::str::FromStr;

use uuid::Uuid;

use crate::error::FieldViolation;

/// Declares a typed UUIDv7 identifier.
macro_rules! typed_id {
    ($(#[$doc:meta])* $name:ident, $kind:literal) => {
        $(#[$doc])*
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize)]
        #[serde(transparent)]
        pub struct $name(Uuid);

        impl $name {
            /// The kind's name, used in stream IDs and messages.
            pub const KIND: &'static str = $kind;

            /// A new, time-ordered ID.
            #[must_use]
            pub fn new() -> Self {
                Self(Uuid::now_v7())
            }

            /// Wraps an existing UUID (from storage).
            #[must_use]
            pub const fn from_uuid(id: Uuid) -> Self {
                Self(id)
            }

            /// The UUID inside.
            #[must_use]
            pub const fn as_uuid(&self) -> Uuid {
                self.0
            }

            /// Parses a request field; names the field when it is not a UUID.
            ///
            /// # Errors
            /// A [`FieldViolation`] on `field` when the text is empty or not a UUID.
            pub fn parse(field: &str, text: &str) -> Result<Self, FieldViolation> {
                if text.trim().is_empty() {
                    return Err(FieldViolation::new(field, "is required"));
                }
                Uuid::from_str(text.trim())
                    .map(Self)
                    .map_err(|_| FieldViolation::new(field, concat!("must be a ", $kind, " ID (a UUID)")))
            }
        }

        impl Default for $name {
            fn default() -> Self {
                Self::new()
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                self.0.fmt(f)
            }
        }
    };
}

typed_id!(
    /// A person known to the mechanism (pseudonymous).
    PersonId,
    "person"
);
typed_id!(
    /// An identification case.
    CaseId,
    "case"
);
typed_id!(
    /// A referral to an agency.
    ReferralId,
    "referral"
);
typed_id!(
    /// A shelter or crisis centre.
    ShelterId,
    "shelter"
);
typed_id!(
    /// A return (repatriation) case.
    ReturnId,
    "return"
);
typed_id!(
    /// A person's purpose-bound consent to share with one agency (referral context).
    ConsentId,
    "consent"
);
typed_id!(
    /// A goal of an individual rehabilitation plan (referral context).
    GoalId,
    "goal"
);
typed_id!(
    /// A bed hold in a shelter (shelter context).
    HoldId,
    "hold"
);
typed_id!(
    /// A stored event.
    EventId,
    "event"
);
typed_id!(
    /// One commit: the events one command appended, published as one message.
    CommitId,
    "commit"
);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn new_ids_are_version_7_and_ordered_in_time() {
        let a = CaseId::new();
        let b = CaseId::new();
        assert_eq!(a.as_uuid().get_version_num(), 7);
        assert!(a < b);
    }

    #[test]
    fn parse_names_the_field() {
        let err = CaseId::parse("case_id", "not-a-uuid").unwrap_err();
        assert_eq!(err.field, "case_id");
        assert!(
            CaseId::parse("case_id", "")
                .unwrap_err()
                .description
                .contains("required")
        );
        let id = CaseId::new();
        assert_eq!(CaseId::parse("case_id", &id.to_string()).unwrap(), id);
    }
}
