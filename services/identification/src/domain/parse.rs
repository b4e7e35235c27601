//! Validating constructors: from a request's fields to domain values, with
//! every offending field named. Descriptions say what a valid value looks
//! like and never repeat the value sent (it may be personal data).

use chrono::{DateTime, NaiveDate, Utc};
use nrm_kernel::error::{FieldViolation, Violations};
use nrm_kernel::validate::{enum_list, enum_value, request_id, required_enum, timestamp, to_datetime};
use nrm_proto::common::v1 as common;
use nrm_proto::identification::v1 as pb;

/// ISO 3166-1 alpha-2 codes.
const COUNTRIES: &str = "AD AE AF AG AI AL AM AO AQ AR AS AT AU AW AX AZ BA BB BD BE BF BG BH BI BJ BL BM BN BO BQ BR BS BT BV BW BY BZ \
CA CC CD CF CG CH CI CK CL CM CN CO CR CU CV CW CX CY CZ DE DJ DK DM DO DZ EC EE EG EH ER ES ET FI FJ FK FM FO FR \
GA GB GD GE GF GG GH GI GL GM GN GP GQ GR GS GT GU GW GY HK HM HN HR HT HU ID IE IL IM IN IO IQ IR IS IT JE JM JO JP \
KE KG KH KI KM KN KP KR KW KY KZ LA LB LC LI LK LR LS LT LU LV LY MA MC MD ME MF MG MH MK ML MM MN MO MP MQ MR MS MT MU MV MW MX MY MZ \
NA NC NE NF NG NI NL NO NP NR NU NZ OM PA PE PF PG PH PK PL PM PN PR PS PT PW PY QA RE RO RS RU RW \
SA SB SC SD SE SG SH SI SJ SK SL SM SN SO SR SS ST SV SX SY SZ TC TD TF TG TH TJ TK TL TM TN TO TR TT TV TW TZ \
UA UG UM US UY UZ VA VC VE VG VI VN VU WF WS YE YT ZA ZM ZW";

/// An ISO 3166-1 alpha-2 country code, upper-cased.
///
/// # Errors
/// A violation of `field`.
pub fn country(field: &str, code: &str) -> Result<String, FieldViolation> {
    let upper = code.trim().to_ascii_uppercase();
    if upper.len() == 2 && COUNTRIES.split(' ').any(|c| c == upper) {
        Ok(upper)
    } else if code.trim().is_empty() {
        Err(FieldViolation::new(
            field,
            "is required: an ISO 3166-1 alpha-2 country code",
        ))
    } else {
        Err(FieldViolation::new(field, "must be an ISO 3166-1 alpha-2 country code"))
    }
}

pub use nrm_kernel::validate::agency;

/// Who reports: the reporting agency, and whether it is police or a
/// prosecutor (its own competent authority by default).
#[derive(Debug, Clone, Copy)]
pub struct Reporter<'a> {
    /// The reporting agency.
    pub agency: &'a str,
    /// Police or a prosecutor.
    pub authority: bool,
}

/// The competent authority of a report: the one named, or the reporter's
/// agency when the reporter is police or a prosecutor. Any other reporter
/// names another agency: the competent authority is told of possible
/// duplicates, which a reporter must never learn of its own report.
///
/// # Errors
/// A violation of `competent_authority` when it is malformed, missing
/// without a default, or names a reporter other than police or a prosecutor.
pub fn competent_authority(text: &str, reporter: Reporter<'_>) -> Result<String, FieldViolation> {
    match (text.is_empty(), reporter.authority) {
        (true, true) => Ok(reporter.agency.to_owned()),
        (true, false) => Err(FieldViolation::new(
            "competent_authority",
            "is required: the agency code of the police unit or prosecutor handling the case",
        )),
        (false, false) if text == reporter.agency => Err(FieldViolation::new(
            "competent_authority",
            "may not be the reporting agency: only police or a prosecutor is its own competent authority",
        )),
        (false, _) => agency("competent_authority", text),
    }
}

/// Why identifiers are read: a code of the fixed list, required when
/// `coded_only` (the coordinator) or when no free-text purpose is given.
/// The free text is checked for length only and never kept.
///
/// # Errors
/// A violation of `read_purpose` (or `purpose`).
pub fn read_purpose(code: i32, text: &str, coded_only: bool) -> Result<pb::ReadPurpose, FieldViolation> {
    if code != 0 {
        return pb::ReadPurpose::try_from(code)
            .map_err(|_| FieldViolation::new("read_purpose", "is not a known value"));
    }
    if coded_only {
        return Err(FieldViolation::new(
            "read_purpose",
            "is required: a purpose from the fixed list (the coordinator reads identifiers only for one)",
        ));
    }
    let text = text.trim();
    if text.is_empty() {
        return Err(FieldViolation::new(
            "read_purpose",
            "is required: a purpose from the fixed list (or a purpose text) when reading personal data",
        ));
    }
    if text.chars().count() > 200 {
        return Err(FieldViolation::new("purpose", "must be at most 200 characters"));
    }
    Ok(pb::ReadPurpose::Unspecified)
}

/// The audit trail's record of a read purpose: the code, never text.
#[must_use]
pub fn purpose_code(purpose: pb::ReadPurpose) -> &'static str {
    match purpose {
        // Given as free text only: the text is not kept.
        pb::ReadPurpose::Unspecified => "READ_PURPOSE_NOT_CODED",
        other => other.as_str_name(),
    }
}

/// A validated erasure reason.
///
/// # Errors
/// A violation of `reason`.
pub fn erasure_reason(value: i32) -> Result<pb::ErasureReason, FieldViolation> {
    required_enum::<pb::ErasureReason>("reason", value)
}

/// The age band of an age in years.
#[must_use]
pub fn age_band(age: u32) -> common::AgeBand {
    match age {
        0..=11 => common::AgeBand::AgeBand011,
        12..=17 => common::AgeBand::AgeBand1217,
        18..=24 => common::AgeBand::AgeBand1824,
        25..=34 => common::AgeBand::AgeBand2534,
        35..=49 => common::AgeBand::AgeBand3549,
        _ => common::AgeBand::AgeBand50Plus,
    }
}

/// Checks personal identifiers; returns them trimmed.
fn personal(p: &common::PersonalIdentifiers, now: DateTime<Utc>, v: &mut Violations) -> common::PersonalIdentifiers {
    let mut out = p.clone();
    out.full_name = p.full_name.trim().to_owned();
    if out.full_name.chars().count() > 200 {
        v.add("personal.full_name", "must be at most 200 characters");
    }
    if !p.date_of_birth.is_empty() {
        match NaiveDate::parse_from_str(&p.date_of_birth, "%Y-%m-%d") {
            Ok(d) if d <= now.date_naive() && d.format("%Y").to_string().as_str() >= "1900" => {}
            Ok(_) => v.add("personal.date_of_birth", "must be a past date after 1900"),
            Err(_) => v.add("personal.date_of_birth", "must be a date as YYYY-MM-DD"),
        }
    }
    for (i, doc) in p.documents.iter().enumerate() {
        if let Err(e) = enum_value::<common::DocumentType>(&format!("personal.documents[{i}].type"), doc.r#type, false)
        {
            v.push(e);
        }
        let number = doc.number.trim();
        if number.is_empty()
            || number.len() > 64
            || !number
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == ' ' || c == '-')
        {
            v.add(
                format!("personal.documents[{i}].number"),
                "must be 1-64 letters, digits, spaces or hyphens",
            );
        }
        if let Err(e) = country(
            &format!("personal.documents[{i}].issuing_country"),
            &doc.issuing_country,
        ) {
            v.push(e);
        }
    }
    if !p.phone.is_empty() {
        let digits = p.phone.chars().filter(char::is_ascii_digit).count();
        if !(5..=20).contains(&digits) || !p.phone.chars().all(|c| c.is_ascii_digit() || " +()-".contains(c)) {
            v.add(
                "personal.phone",
                "must be a phone number: 5-20 digits, optionally with + ( ) - and spaces",
            );
        }
    }
    if p.address.chars().count() > 500 {
        v.add("personal.address", "must be at most 500 characters");
    }
    out
}

/// A validated report, ready to be sealed and decided.
#[derive(Debug, Clone)]
pub struct Report {
    /// The request ID.
    pub request_id: String,
    /// The coded fields (case, person and sealed data still empty).
    pub coded: pb::PresumedVictimReported,
    /// The identifiers, to be sealed.
    pub personal: common::PersonalIdentifiers,
}

/// Validates a report by `reporter` (its agency is the competent authority
/// when the request names none, for police and prosecutors only).
///
/// # Errors
/// `INVALID_ARGUMENT` naming every offending field.
pub fn report(
    req: &pb::ReportPresumedVictimRequest,
    now: DateTime<Utc>,
    reporter: Reporter<'_>,
) -> Result<Report, nrm_kernel::AppError> {
    let mut v = Violations::new();
    let request_id = v.check(request_id(&req.request_id));
    let authority = v.check(competent_authority(&req.competent_authority, reporter));
    let found_at = match req.found_at.as_ref().and_then(to_datetime) {
        None => {
            v.add("found_at", "is required: when the person was found");
            None
        }
        Some(t) if t > now + chrono::Duration::minutes(5) => {
            v.add("found_at", "must not be in the future");
            None
        }
        Some(_) => req.found_at,
    };
    let found_country = v.check(country("found_country", &req.found_country));
    let region = req.found_region.trim();
    if region.len() > 32
        || !region
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
    {
        v.add(
            "found_region",
            "must be a region code: at most 32 letters, digits, '-' or '_' (not an address)",
        );
    }
    let country_of_exploitation = v.check(country("country_of_exploitation", &req.country_of_exploitation));
    if req.exploitation_forms.is_empty() {
        v.add("exploitation_forms", "is required: at least one form of exploitation");
    }
    let forms = enum_list::<pb::ExploitationForm>("exploitation_forms", &req.exploitation_forms, &mut v);
    let means = enum_list::<pb::MeansOfControl>("means_of_control", &req.means_of_control, &mut v);
    let recruitment = v.check(enum_value::<pb::RecruitmentMethod>(
        "recruitment_method",
        req.recruitment_method,
        true,
    ));
    let relationship = v.check(enum_value::<pb::RecruiterRelationship>(
        "recruiter_relationship",
        req.recruiter_relationship,
        true,
    ));
    let gender = v.check(enum_value::<common::Gender>("gender", req.gender, false));
    let band = v.check(enum_value::<common::AgeBand>("age_band", req.age_band, true));
    let mut age_band_value = band.unwrap_or(0);
    if let Some(age) = req.age_years {
        if age > 120 {
            v.add("age_years", "must be between 0 and 120");
        } else {
            let derived = age_band(age) as i32;
            if age_band_value != 0 && age_band_value != derived {
                v.add("age_band", "does not match age_years");
            }
            age_band_value = derived;
            if age < 18 && !req.child {
                v.add("child", "must be true when age_years is under 18");
            }
            if age >= 18 && req.child {
                v.add("child", "must be false when age_years is 18 or more");
            }
        }
    }
    if req.age_years.is_none() && super::notification::is_child_band(age_band_value) && !req.child {
        v.add("child", "must be true when the age band is under 18");
    }
    if age_band_value == 0 {
        age_band_value = common::AgeBand::Unknown as i32;
    }
    let citizenship = v.check(country("citizenship", &req.citizenship));
    let personal = personal(&req.personal.clone().unwrap_or_default(), now, &mut v);
    v.finish(|| Report {
        request_id: request_id.unwrap_or_default(),
        coded: pb::PresumedVictimReported {
            found_at,
            found_country: found_country.unwrap_or_default(),
            found_region: region.to_owned(),
            country_of_exploitation: country_of_exploitation.unwrap_or_default(),
            exploitation_forms: forms,
            means_of_control: means,
            recruitment_method: recruitment.unwrap_or_default(),
            recruiter_relationship: relationship.unwrap_or_default(),
            child: req.child,
            gender: gender.unwrap_or_default(),
            age_years: req.age_years,
            age_band: age_band_value,
            citizenship: citizenship.unwrap_or_default(),
            competent_authority: authority.unwrap_or_default(),
            reported_at: Some(timestamp(now)),
            ..Default::default()
        },
        personal,
    })
}

/// A validated anonymous notification: the request ID and the coded fields.
#[derive(Debug, Clone)]
pub struct AnonymousNotification {
    /// The request ID.
    pub request_id: String,
    /// The coded fields.
    pub coded: super::notification::Coded,
}

/// Validates an anonymous notification: countries as a report's, at least
/// one form of exploitation (none unspecified or repeated), gender and age
/// band specified. A child's band is valid input, refused by the domain
/// (`CHILD_MUST_BE_REPORTED`).
///
/// # Errors
/// `INVALID_ARGUMENT` naming every offending field.
pub fn notification(req: &pb::FileAnonymousNotificationRequest) -> Result<AnonymousNotification, nrm_kernel::AppError> {
    let mut v = Violations::new();
    let request_id = v.check(request_id(&req.request_id));
    let found_country = v.check(country("found_country", &req.found_country));
    let country_of_exploitation = v.check(country("country_of_exploitation", &req.country_of_exploitation));
    if req.exploitation_forms.is_empty() {
        v.add("exploitation_forms", "is required: at least one form of exploitation");
    }
    let forms = enum_list::<pb::ExploitationForm>("exploitation_forms", &req.exploitation_forms, &mut v);
    let gender = v.check(enum_value::<common::Gender>("gender", req.gender, false));
    let age_band = match enum_value::<common::AgeBand>("age_band", req.age_band, false) {
        Ok(band) => Some(band),
        Err(_) if req.age_band == 0 => {
            v.add(
                "age_band",
                "is required: an adult age band (18 and over) or AGE_BAND_UNKNOWN",
            );
            None
        }
        Err(e) => {
            v.push(e);
            None
        }
    };
    let citizenship = v.check(country("citizenship", &req.citizenship));
    v.finish(|| AnonymousNotification {
        request_id: request_id.unwrap_or_default(),
        coded: super::notification::Coded {
            found_country: found_country.unwrap_or_default(),
            country_of_exploitation: country_of_exploitation.unwrap_or_default(),
            exploitation_forms: forms,
            gender: gender.unwrap_or_default(),
            age_band: age_band.unwrap_or_default(),
            citizenship: citizenship.unwrap_or_default(),
        },
    })
}

/// Validated screening indicators.
///
/// # Errors
/// `INVALID_ARGUMENT` naming every offending indicator.
pub fn indicators(values: &[i32], v: &mut Violations) -> Vec<i32> {
    enum_list::<pb::Indicator>("indicators", values, v)
}

/// A validated decision.
///
/// # Errors
/// `INVALID_ARGUMENT` when the decision is missing, a not-identified decision
/// has no reason, or non-punishment is set without identification.
pub fn decision(req: &pb::DecideIdentificationRequest, v: &mut Violations) -> (pb::Decision, pb::NotIdentifiedReason) {
    let decision = v
        .check(required_enum::<pb::Decision>("decision", req.decision))
        .unwrap_or(pb::Decision::Unspecified);
    let reason = v
        .check(enum_value::<pb::NotIdentifiedReason>("reason", req.reason, true))
        .and_then(|r| pb::NotIdentifiedReason::try_from(r).ok())
        .unwrap_or(pb::NotIdentifiedReason::Unspecified);
    if decision == pb::Decision::NotIdentified && reason == pb::NotIdentifiedReason::Unspecified {
        v.add("reason", "is required when the decision is NOT_IDENTIFIED");
    }
    if decision == pb::Decision::NotIdentified && req.non_punishment {
        v.add("non_punishment", "can be set only with an IDENTIFIED decision");
    }
    (decision, reason)
}

/// A validated review reason.
///
/// # Errors
/// A violation of `reason`.
pub fn review_reason(value: i32) -> Result<pb::ReviewReason, FieldViolation> {
    required_enum::<pb::ReviewReason>("reason", value)
}

#[cfg(test)]
mod tests {
    use super::*;

    const POLICE: Reporter<'static> = Reporter {
        agency: "kg-mvd",
        authority: true,
    };
    const NGO: Reporter<'static> = Reporter {
        agency: "kg-ngo-sezim",
        authority: false,
    };

    fn valid() -> pb::ReportPresumedVictimRequest {
        pb::ReportPresumedVictimRequest {
            request_id: "r-1".into(),
            found_at: Some(timestamp(Utc::now() - chrono::Duration::days(1))),
            found_country: "kz".into(),
            found_region: "ALA".into(),
            country_of_exploitation: "KZ".into(),
            exploitation_forms: vec![pb::ExploitationForm::Labour as i32],
            gender: common::Gender::Female as i32,
            age_years: Some(24),
            citizenship: "KG".into(),
            ..Default::default()
        }
    }

    fn fields(err: nrm_kernel::AppError) -> Vec<String> {
        match err {
            nrm_kernel::AppError::InvalidArgument(v) => v.into_iter().map(|v| v.field).collect(),
            other => panic!("expected invalid argument, got {other:?}"),
        }
    }

    #[test]
    fn a_valid_report_is_normalised() {
        let r = report(&valid(), Utc::now(), POLICE).unwrap();
        assert_eq!(r.coded.found_country, "KZ");
        assert_eq!(r.coded.age_band, common::AgeBand::AgeBand1824 as i32);
    }

    #[test]
    fn every_offending_field_is_named_and_values_are_not_echoed() {
        let mut req = valid();
        req.request_id = String::new();
        req.citizenship = "Kyrgyzstan".into();
        req.exploitation_forms = vec![99];
        req.age_years = Some(15);
        req.personal = Some(common::PersonalIdentifiers {
            date_of_birth: "02.04.1999".into(),
            phone: "call me".into(),
            ..Default::default()
        });
        let err = report(&req, Utc::now(), POLICE).unwrap_err();
        let text = format!("{err:?}");
        assert!(!text.contains("Kyrgyzstan") && !text.contains("call me"));
        assert_eq!(
            fields(err),
            [
                "request_id",
                "exploitation_forms[0]",
                "child",
                "citizenship",
                "personal.date_of_birth",
                "personal.phone"
            ]
        );
    }

    #[test]
    fn the_competent_authority_defaults_for_police_and_is_required_otherwise() {
        let r = report(&valid(), Utc::now(), POLICE).unwrap();
        assert_eq!(r.coded.competent_authority, "kg-mvd");
        assert_eq!(
            fields(report(&valid(), Utc::now(), NGO).unwrap_err()),
            ["competent_authority"]
        );
        let mut req = valid();
        req.competent_authority = "kg-prosecutor".into();
        assert_eq!(
            report(&req, Utc::now(), NGO).unwrap().coded.competent_authority,
            "kg-prosecutor"
        );
        // An NGO never names itself (it would learn of duplicates of its own report).
        req.competent_authority = NGO.agency.into();
        let err = report(&req, Utc::now(), NGO).unwrap_err();
        assert_eq!(fields(err), ["competent_authority"]);
        req.competent_authority = "kg-mvd".into();
        assert_eq!(
            report(&req, Utc::now(), POLICE).unwrap().coded.competent_authority,
            "kg-mvd"
        );
        req.competent_authority = "Aigul Asanova".into();
        let err = report(&req, Utc::now(), POLICE).unwrap_err();
        assert!(!format!("{err:?}").contains("Asanova"));
        assert_eq!(fields(err), ["competent_authority"]);
    }

    #[test]
    fn the_coordinator_reads_only_for_a_coded_purpose() {
        assert!(read_purpose(0, "looking", true).is_err());
        assert_eq!(
            read_purpose(pb::ReadPurpose::Oversight as i32, "", true).unwrap(),
            pb::ReadPurpose::Oversight
        );
        assert_eq!(
            read_purpose(0, "case review", false).unwrap(),
            pb::ReadPurpose::Unspecified
        );
        assert!(read_purpose(0, " ", false).is_err());
        assert!(read_purpose(99, "", false).is_err());
        assert_eq!(purpose_code(pb::ReadPurpose::CaseReview), "READ_PURPOSE_CASE_REVIEW");
    }

    #[test]
    fn found_at_is_required_and_not_in_the_future() {
        let mut req = valid();
        req.found_at = None;
        assert_eq!(fields(report(&req, Utc::now(), POLICE).unwrap_err()), ["found_at"]);
        req.found_at = Some(timestamp(Utc::now() + chrono::Duration::days(2)));
        assert_eq!(fields(report(&req, Utc::now(), POLICE).unwrap_err()), ["found_at"]);
    }

    fn notification_request() -> pb::FileAnonymousNotificationRequest {
        pb::FileAnonymousNotificationRequest {
            request_id: "n-1".into(),
            found_country: "kg".into(),
            country_of_exploitation: "RU".into(),
            exploitation_forms: vec![pb::ExploitationForm::Labour as i32],
            gender: common::Gender::Female as i32,
            age_band: common::AgeBand::AgeBand2534 as i32,
            citizenship: "KG".into(),
        }
    }

    #[test]
    fn a_valid_notification_is_normalised() {
        let n = notification(&notification_request()).unwrap();
        assert_eq!(n.request_id, "n-1");
        assert_eq!(n.coded.found_country, "KG");
        assert_eq!(n.coded.exploitation_forms, [pb::ExploitationForm::Labour as i32]);
        assert_eq!(n.coded.age_band, common::AgeBand::AgeBand2534 as i32);
    }

    #[test]
    fn every_offending_notification_field_is_named_and_values_are_not_echoed() {
        let req = pb::FileAnonymousNotificationRequest {
            request_id: String::new(),
            found_country: "Aigul Asanova".into(),
            country_of_exploitation: String::new(),
            exploitation_forms: vec![],
            gender: 0,
            age_band: 0,
            citizenship: "XX".into(),
        };
        let err = notification(&req).unwrap_err();
        assert!(!format!("{err:?}").contains("Asanova"));
        assert_eq!(
            fields(err),
            [
                "request_id",
                "found_country",
                "country_of_exploitation",
                "exploitation_forms",
                "gender",
                "age_band",
                "citizenship"
            ]
        );
        let mut req = notification_request();
        req.exploitation_forms = vec![pb::ExploitationForm::Labour as i32, 0, 99];
        req.age_band = 42;
        req.gender = 42;
        assert_eq!(
            fields(notification(&req).unwrap_err()),
            ["exploitation_forms[1]", "exploitation_forms[2]", "gender", "age_band"]
        );
    }

    #[test]
    fn a_child_band_is_valid_input_for_the_domain_to_refuse() {
        let mut req = notification_request();
        req.age_band = common::AgeBand::AgeBand1217 as i32;
        assert!(notification(&req).is_ok());
        req.age_band = common::AgeBand::Unknown as i32;
        assert!(notification(&req).is_ok());
    }

    #[test]
    fn not_identified_needs_a_reason_and_excludes_non_punishment() {
        let mut v = Violations::new();
        decision(
            &pb::DecideIdentificationRequest {
                decision: pb::Decision::NotIdentified as i32,
                non_punishment: true,
                ..Default::default()
            },
            &mut v,
        );
        assert_eq!(fields(v.finish(|| ()).unwrap_err()), ["reason", "non_punishment"]);
    }
}
