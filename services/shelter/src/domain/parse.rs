//! Validating constructors: from a request's fields to domain values, with
//! every offending field named. Descriptions say what a valid value looks
//! like and never repeat the value sent (an address is personal-safety data).

use nrm_kernel::error::{AppError, FieldViolation, Violations};
use nrm_kernel::validate;
use nrm_proto::shelter::v1 as pb;

/// Most characters of a shelter code.
const MAX_CODE: usize = 32;
/// Most characters of an address.
const MAX_ADDRESS: usize = 300;
/// Most beds of one category in one shelter.
pub const MAX_BEDS: u32 = 10_000;
/// Longest hold: 7 days.
pub const MAX_HOLD_MINUTES: u32 = 7 * 24 * 60;

/// An ISO 3166-2 region code (`KG-O`, `KG-GB`), upper-cased: two letters, a
/// hyphen, one to three letters or digits.
///
/// # Errors
/// A violation of `field`.
pub fn region(field: &str, text: &str) -> Result<String, FieldViolation> {
    if let Some(code) = validate::region_code(text) {
        Ok(code)
    } else if text.trim().is_empty() {
        Err(FieldViolation::new(
            field,
            "is required: an ISO 3166-2 region code such as KG-O",
        ))
    } else {
        Err(FieldViolation::new(
            field,
            "must be an ISO 3166-2 region code such as KG-O or KG-GB",
        ))
    }
}

/// A shelter code: 1–32 letters, digits and hyphens.
///
/// # Errors
/// A violation of `code`.
pub fn code(text: &str) -> Result<String, FieldViolation> {
    let text = text.trim();
    if text.is_empty() || text.len() > MAX_CODE || !text.chars().all(|c| c.is_ascii_alphanumeric() || c == '-') {
        return Err(FieldViolation::new(
            "code",
            "must be 1-32 letters, digits and hyphens (a code, not a name that gives the place away)",
        ));
    }
    Ok(text.to_owned())
}

/// A street address: at most 300 characters; may be empty.
///
/// # Errors
/// A violation of `address`.
pub fn address(text: &str) -> Result<String, FieldViolation> {
    let text = text.trim();
    if text.chars().count() > MAX_ADDRESS {
        return Err(FieldViolation::new("address", "must be at most 300 characters"));
    }
    Ok(text.to_owned())
}

/// A bed category: known, not `UNSPECIFIED`.
///
/// # Errors
/// A violation of `field`.
pub fn category(field: &str, value: i32) -> Result<pb::BedCategory, FieldViolation> {
    validate::required_enum(field, value)
}

/// An optional bed category filter: `UNSPECIFIED` means every category.
///
/// # Errors
/// A violation of `field` for an unknown value.
pub fn category_filter(field: &str, value: i32) -> Result<Option<pb::BedCategory>, FieldViolation> {
    if value == 0 {
        Ok(None)
    } else {
        category(field, value).map(Some)
    }
}

/// A number of beds: at most 10000.
///
/// # Errors
/// A violation of `field`.
pub fn beds(field: &str, value: u32) -> Result<u32, FieldViolation> {
    if value > MAX_BEDS {
        Err(FieldViolation::new(field, "must be at most 10000"))
    } else {
        Ok(value)
    }
}

/// How long a hold lasts: 0 means `default`; at most 7 days (10080 minutes).
///
/// # Errors
/// A violation of `hold_minutes`.
pub fn hold_minutes(value: u32, default: u32) -> Result<u32, FieldViolation> {
    match value {
        0 => Ok(default),
        v if v > MAX_HOLD_MINUTES => Err(FieldViolation::new(
            "hold_minutes",
            "must be at most 10080 (7 days); 0 for the default",
        )),
        v => Ok(v),
    }
}

/// A validated `RegisterShelter` request.
#[derive(Debug, Clone, PartialEq)]
pub struct Registration {
    /// The client request ID.
    pub request_id: String,
    /// The shelter's code.
    pub code: String,
    /// Its region, upper-cased.
    pub region: String,
    /// The address in the clear (sealed before it is stored); may be empty.
    pub address: String,
    /// Beds per category, each category once.
    pub capacity: Vec<pb::BedCapacity>,
    /// Services on site, each once.
    pub services: Vec<i32>,
    /// Wheelchair accessible.
    pub wheelchair_accessible: bool,
}

/// Validates a registration, naming every offending field.
///
/// # Errors
/// `INVALID_ARGUMENT` with every violation.
pub fn registration(req: &pb::RegisterShelterRequest) -> Result<Registration, AppError> {
    let mut v = Violations::new();
    let request_id = v.check(validate::request_id(&req.request_id));
    let code = v.check(code(&req.code));
    let region = v.check(region("region", &req.region));
    let address = v.check(address(&req.address));
    if req.capacity.is_empty() {
        v.add("capacity", "is required: the beds of at least one category");
    }
    let mut capacity: Vec<pb::BedCapacity> = Vec::with_capacity(req.capacity.len());
    for (i, entry) in req.capacity.iter().enumerate() {
        let category = v.check(category(&format!("capacity[{i}].category"), entry.category));
        let beds = v.check(beds(&format!("capacity[{i}].beds"), entry.beds));
        if let (Some(category), Some(beds)) = (category, beds) {
            if capacity.iter().any(|c| c.category == category as i32) {
                v.add(format!("capacity[{i}].category"), "is repeated");
            } else {
                capacity.push(pb::BedCapacity {
                    category: category as i32,
                    beds,
                });
            }
        }
    }
    let services = validate::enum_list::<pb::OnSiteService>("services", &req.services, &mut v);
    v.finish(|| Registration {
        request_id: request_id.unwrap_or_default(),
        code: code.unwrap_or_default(),
        region: region.unwrap_or_default(),
        address: address.unwrap_or_default(),
        capacity,
        services,
        wheelchair_accessible: req.wheelchair_accessible,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn regions_look_like_iso_3166_2_codes() {
        assert_eq!(region("region", " kg-gb ").unwrap(), "KG-GB");
        assert_eq!(region("region", "KZ-75").unwrap(), "KZ-75");
        for bad in ["", "KG", "KGZ-O", "KG-ABCD", "K1-O", "KG_O", "KG-"] {
            assert!(region("region", bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn a_bad_registration_names_every_field() {
        let req = pb::RegisterShelterRequest {
            request_id: String::new(),
            code: "Osh crisis centre".into(),
            region: "Osh".into(),
            address: "x".repeat(301),
            capacity: vec![
                pb::BedCapacity { category: 0, beds: 3 },
                pb::BedCapacity {
                    category: pb::BedCategory::Women as i32,
                    beds: 10_001,
                },
            ],
            services: vec![99],
            wheelchair_accessible: false,
        };
        let Err(AppError::InvalidArgument(violations)) = registration(&req) else {
            panic!("expected violations");
        };
        let fields: Vec<_> = violations.iter().map(|v| v.field.as_str()).collect();
        assert_eq!(
            fields,
            [
                "request_id",
                "code",
                "region",
                "address",
                "capacity[0].category",
                "capacity[1].beds",
                "services[0]"
            ]
        );
        assert!(violations.iter().all(|v| !v.description.contains("xxx")));
    }

    #[test]
    fn hold_minutes_default_and_limit() {
        assert_eq!(hold_minutes(0, 1440).unwrap(), 1440);
        assert_eq!(hold_minutes(10_080, 1440).unwrap(), 10_080);
        assert!(hold_minutes(10_081, 1440).is_err());
    }
}
