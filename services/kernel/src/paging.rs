//! AIP-158 paging: page sizes, and opaque page tokens that carry the keyset
//! cursor (time and ID of the last item) and are bound to the filters they
//! were made for, so a token used with other filters is refused.

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use uuid::Uuid;

use crate::error::{FieldViolation, Violations};

/// Page size when none is asked for.
pub const DEFAULT_PAGE_SIZE: i32 = 50;
/// Largest page size; larger requests are cut to it.
pub const MAX_PAGE_SIZE: i32 = 500;

/// The page size to use for `requested` (0: the default), recording a
/// violation of `page_size` when it is negative.
pub fn page_size(requested: i32, v: &mut Violations) -> i32 {
    if requested < 0 {
        v.add("page_size", "must not be negative");
    }
    match requested {
        n if n <= 0 => DEFAULT_PAGE_SIZE,
        n => n.min(MAX_PAGE_SIZE),
    }
}

/// Where a page ends: the sort time and ID of its last item.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cursor {
    /// Sort time of the last item.
    pub time: DateTime<Utc>,
    /// Its ID (ties on time).
    pub id: Uuid,
}

#[derive(Debug, Serialize, Deserialize)]
struct Token {
    /// Microseconds since the epoch.
    t: i64,
    id: Uuid,
    /// Hash of the filters.
    f: String,
}

/// Page tokens of one query with one set of filters.
#[derive(Debug, Clone)]
pub struct Pager {
    filters: String,
}

impl Pager {
    /// Tokens bound to `filters`: a description of every filter and of the
    /// caller's scope (anything that changes the result set).
    #[must_use]
    pub fn new(filters: &str) -> Self {
        let hash = Sha256::digest(filters.as_bytes());
        Self {
            filters: hash.iter().take(8).map(|b| format!("{b:02x}")).collect(),
        }
    }

    /// The cursor in `token` (none for an empty token), recording a violation
    /// of `page_token` when it is not a token of ours or was made for other filters.
    pub fn cursor(&self, token: &str, v: &mut Violations) -> Option<Cursor> {
        if token.is_empty() {
            return None;
        }
        let decoded: Option<Token> = URL_SAFE_NO_PAD
            .decode(token)
            .ok()
            .and_then(|bytes| serde_json::from_slice(&bytes).ok());
        match decoded {
            Some(t) if t.f == self.filters => Some(Cursor {
                time: DateTime::from_timestamp_micros(t.t).unwrap_or_default(),
                id: t.id,
            }),
            Some(_) => {
                v.push(FieldViolation::new(
                    "page_token",
                    "was made for other filters; start again without it",
                ));
                None
            }
            None => {
                v.push(FieldViolation::new(
                    "page_token",
                    "is not a token from a previous response",
                ));
                None
            }
        }
    }

    /// The token of the page after `last` when there is more, else empty.
    #[must_use]
    pub fn next_token(&self, more: bool, last: Option<Cursor>) -> String {
        match (more, last) {
            (true, Some(c)) => URL_SAFE_NO_PAD.encode(
                serde_json::to_vec(&Token {
                    t: c.time.timestamp_micros(),
                    id: c.id,
                    f: self.filters.clone(),
                })
                .unwrap_or_default(),
            ),
            _ => String::new(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_token_round_trips_with_its_filters_only() {
        let pager = Pager::new("status=1");
        let cursor = Cursor {
            time: DateTime::from_timestamp_micros(1_790_000_000_123_456).unwrap(),
            id: Uuid::now_v7(),
        };
        let token = pager.next_token(true, Some(cursor));
        let mut v = Violations::new();
        assert_eq!(pager.cursor(&token, &mut v), Some(cursor));
        assert!(v.is_empty());
        assert_eq!(Pager::new("status=2").cursor(&token, &mut v), None);
        assert_eq!(Pager::new("x").cursor("garbage", &mut v), None);
        assert!(matches!(v.into_error(), crate::AppError::InvalidArgument(f) if f.len() == 2));
        assert!(pager.next_token(false, Some(cursor)).is_empty());
    }

    #[test]
    fn page_sizes_default_and_are_capped() {
        let mut v = Violations::new();
        assert_eq!(page_size(0, &mut v), DEFAULT_PAGE_SIZE);
        assert_eq!(page_size(10_000, &mut v), MAX_PAGE_SIZE);
        assert!(v.is_empty());
        page_size(-1, &mut v);
        assert!(!v.is_empty());
    }
}
