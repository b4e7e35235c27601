//! Validating constructors: from a request's fields to a domain command,
//! with every offending field named (all at once). Descriptions say what a
//! valid value looks like and never repeat the value sent: it may be a name,
//! a document number or a phone.
//!
//! What needs the deployment's configuration (whether the citizenship is a
//! partner country) or the return's state is decided later, by the
//! application and the aggregate.

use chrono::{DateTime, NaiveDate, Utc};
use nrm_kernel::error::{AppError, FieldViolation, Violations};
use nrm_kernel::ids::ReturnId;
use nrm_kernel::validate::{self, enum_list, enum_value, required_enum, to_datetime};
use nrm_proto::common::v1 as common;
use nrm_proto::identification::v1::ExploitationForm;
use nrm_proto::repatriation::v1 as pb;
use prost_types::Timestamp;

use super::{Command, NAME};

/// Tolerated clock skew of a caller's "when it happened" times.
const SKEW_SECONDS: i64 = 300;

/// A country code: two ASCII letters, lower-cased (`kg`).
///
/// # Errors
/// A violation of `field`.
pub fn country(field: &str, text: &str) -> Result<String, FieldViolation> {
    let code = text.trim().to_ascii_lowercase();
    if code.is_empty() {
        return Err(FieldViolation::new(
            field,
            "is required: an ISO 3166-1 alpha-2 country code such as KG",
        ));
    }
    if code.len() != 2 || !code.chars().all(|c| c.is_ascii_lowercase()) {
        return Err(FieldViolation::new(
            field,
            "must be an ISO 3166-1 alpha-2 country code: two letters",
        ));
    }
    Ok(code)
}

pub use nrm_kernel::validate::agency;

/// A coded reference (a case ID, a file or form number, a pseudonymous
/// officer ID): 1–64 letters, digits, `-`, `_`, `.`, `/` or `:`; never a name.
///
/// # Errors
/// A violation of `field`.
pub fn reference(field: &str, text: &str) -> Result<String, FieldViolation> {
    coded(field, text, 64, "a coded reference (letters, digits, - _ . / :)", |c| {
        c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '/' | ':')
    })
}

fn coded(
    field: &str,
    text: &str,
    max: usize,
    what: &str,
    allowed: impl Fn(char) -> bool,
) -> Result<String, FieldViolation> {
    let text = text.trim();
    if text.is_empty() {
        return Err(FieldViolation::new(field, format!("is required: {what}")));
    }
    if text.len() > max || !text.chars().all(allowed) {
        return Err(FieldViolation::new(
            field,
            format!("must be {what}, at most {max} characters"),
        ));
    }
    Ok(text.to_owned())
}

/// A required time, as given.
fn time(field: &str, t: Option<&Timestamp>, v: &mut Violations) -> Option<(Timestamp, DateTime<Utc>)> {
    match t {
        None => {
            v.add(field, "is required");
            None
        }
        Some(t) => match to_datetime(t) {
            Some(at) => Some((*t, at)),
            None => {
                v.add(field, "is not a valid time");
                None
            }
        },
    }
}

/// A required time that has passed ("when it happened").
fn past(field: &str, t: Option<&Timestamp>, now: DateTime<Utc>, v: &mut Violations) -> Option<Timestamp> {
    let (t, at) = time(field, t, v)?;
    if at > now + chrono::Duration::seconds(SKEW_SECONDS) {
        v.add(field, "must not be in the future");
        return None;
    }
    Some(t)
}

/// The fields every command on an existing return carries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    /// The client request ID.
    pub request_id: String,
    /// The return.
    pub return_id: ReturnId,
    /// The version the caller read.
    pub expected_version: u64,
}

fn target(request_id: &str, return_id: &str, expected_version: u64, v: &mut Violations) -> Option<Target> {
    let request_id = v.check(validate::request_id(request_id));
    let return_id = v.check(ReturnId::parse("return_id", return_id));
    let expected_version = v.check(validate::expected_version(NAME, expected_version));
    Some(Target {
        request_id: request_id?,
        return_id: return_id?,
        expected_version: expected_version?,
    })
}

/// A validated command on an existing return.
#[derive(Debug, Clone, PartialEq)]
pub struct Step {
    /// Request, return, version.
    pub target: Target,
    /// What to decide.
    pub command: Command,
}

fn finish(v: Violations, target: Option<Target>, command: Option<Command>) -> Result<Step, AppError> {
    match (target, command, v.is_empty()) {
        (Some(target), Some(command), true) => Ok(Step { target, command }),
        _ => Err(v.into_error()),
    }
}

/// Checks the person's identifiers: a full name is required, the rest is
/// optional but well-formed. Returns them trimmed, or every violation.
fn identifiers(
    field: &str,
    p: Option<&common::PersonalIdentifiers>,
    now: DateTime<Utc>,
) -> Result<common::PersonalIdentifiers, Vec<FieldViolation>> {
    let Some(p) = p else {
        return Err(vec![FieldViolation::new(
            field,
            "is required: at least the person's full name",
        )]);
    };
    let mut bad = Vec::new();
    let mut out = p.clone();
    out.full_name = p.full_name.trim().to_owned();
    if out.full_name.is_empty() {
        bad.push(FieldViolation::new(format!("{field}.full_name"), "is required"));
    } else if out.full_name.chars().count() > 200 {
        bad.push(FieldViolation::new(
            format!("{field}.full_name"),
            "must be at most 200 characters",
        ));
    }
    out.date_of_birth = p.date_of_birth.trim().to_owned();
    if !out.date_of_birth.is_empty() {
        let earliest = NaiveDate::from_ymd_opt(1900, 1, 1).unwrap_or_default();
        let valid = NaiveDate::parse_from_str(&out.date_of_birth, "%Y-%m-%d")
            .ok()
            .is_some_and(|d| d <= now.date_naive() && d >= earliest);
        if !valid {
            bad.push(FieldViolation::new(
                format!("{field}.date_of_birth"),
                "must be a past date after 1900, as YYYY-MM-DD",
            ));
        }
    }
    for (i, doc) in out.documents.iter_mut().enumerate() {
        let at = format!("{field}.documents[{i}]");
        if let Err(e) = enum_value::<common::DocumentType>(&format!("{at}.type"), doc.r#type, false) {
            bad.push(e);
        }
        doc.number = doc.number.trim().to_owned();
        if let Err(e) = document_number(&format!("{at}.number"), &doc.number) {
            bad.push(e);
        }
        match country(&format!("{at}.issuing_country"), &doc.issuing_country) {
            Ok(code) => doc.issuing_country = code.to_ascii_uppercase(),
            Err(e) => bad.push(e),
        }
    }
    out.phone = p.phone.trim().to_owned();
    if !out.phone.is_empty() {
        let digits = out.phone.chars().filter(char::is_ascii_digit).count();
        if !(5..=20).contains(&digits) || !out.phone.chars().all(|c| c.is_ascii_digit() || " +()-".contains(c)) {
            bad.push(FieldViolation::new(
                format!("{field}.phone"),
                "must be a phone number: 5-20 digits, optionally with + ( ) - and spaces",
            ));
        }
    }
    out.address = p.address.trim().to_owned();
    if out.address.chars().count() > 500 {
        bad.push(FieldViolation::new(
            format!("{field}.address"),
            "must be at most 500 characters",
        ));
    }
    if bad.is_empty() { Ok(out) } else { Err(bad) }
}

/// A document number: 1–64 letters, digits, spaces or hyphens.
fn document_number(field: &str, number: &str) -> Result<(), FieldViolation> {
    if number.is_empty()
        || number.len() > 64
        || !number
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == ' ' || c == '-')
    {
        return Err(FieldViolation::new(
            field,
            "must be 1-64 letters, digits, spaces or hyphens",
        ));
    }
    Ok(())
}

/// A validated `OpenReturn` request; the identifiers still to be sealed.
#[derive(Debug, Clone, PartialEq)]
pub struct Opening {
    /// The client request ID.
    pub request_id: String,
    /// The coded fields (return ID, sealed identifiers, this country and the
    /// opening agency still empty).
    pub coded: pb::ReturnOpened,
    /// The person's identifiers, to be sealed.
    pub identifiers: common::PersonalIdentifiers,
}

/// Validates an `OpenReturn` request.
///
/// # Errors
/// `INVALID_ARGUMENT` naming every offending field.
pub fn open(req: &pb::OpenReturnRequest, now: DateTime<Utc>) -> Result<Opening, AppError> {
    let mut v = Violations::new();
    let request_id = v.check(validate::request_id(&req.request_id));
    let citizenship = v.check(country("citizenship", &req.citizenship));
    let identifiers = match identifiers("identifiers", req.identifiers.as_ref(), now) {
        Ok(identifiers) => Some(identifiers),
        Err(bad) => {
            bad.into_iter().for_each(|e| v.push(e));
            None
        }
    };
    let gender = v.check(enum_value::<common::Gender>("gender", req.gender, true));
    let age_band = v.check(enum_value::<common::AgeBand>("age_band", req.age_band, true));
    let form = match ExploitationForm::from_str_name(req.form_of_exploitation.trim()) {
        Some(form) if form != ExploitationForm::Unspecified => Some(form.as_str_name().to_owned()),
        _ if req.form_of_exploitation.trim().is_empty() => {
            v.add(
                "form_of_exploitation",
                "is required: an identification form of exploitation such as EXPLOITATION_FORM_LABOUR",
            );
            None
        }
        _ => {
            v.add(
                "form_of_exploitation",
                "must be the name of a form of exploitation such as EXPLOITATION_FORM_LABOUR",
            );
            None
        }
    };
    let exploited_in = v.check(country("country_of_exploitation", &req.country_of_exploitation));
    let foreign_reference = v.check(reference("foreign_reference", &req.foreign_reference));
    let identified_by = v.check(agency("identified_by", &req.identified_by));
    let consulate_agency = v.check(agency("consulate_agency", &req.consulate_agency));
    let (
        Some(request_id),
        Some(citizenship),
        Some(identifiers),
        Some(gender),
        Some(age_band),
        Some(form),
        Some(exploited_in),
        Some(foreign_reference),
        Some(identified_by),
        Some(consulate_agency),
        true,
    ) = (
        request_id,
        citizenship,
        identifiers,
        gender,
        age_band,
        form,
        exploited_in,
        foreign_reference,
        identified_by,
        consulate_agency,
        v.is_empty(),
    )
    else {
        return Err(v.into_error());
    };
    Ok(Opening {
        request_id,
        coded: pb::ReturnOpened {
            citizenship,
            gender,
            age_band,
            form_of_exploitation: form,
            country_of_exploitation: exploited_in,
            foreign_reference,
            identified_by,
            consulate_agency,
            ..Default::default()
        },
        identifiers,
    })
}

/// Validates a `RecordReturnConsent` request: the informed consent must be
/// given; the shared fields may be empty (then nothing personal crosses).
///
/// # Errors
/// `INVALID_ARGUMENT` naming every offending field.
pub fn consent(req: &pb::RecordReturnConsentRequest) -> Result<Step, AppError> {
    let mut v = Violations::new();
    let target = target(&req.request_id, &req.return_id, req.expected_version, &mut v);
    if !req.informed_consent_to_return {
        v.add(
            "informed_consent_to_return",
            "must be true: a return rests on the person's informed consent",
        );
    }
    let shared_fields = enum_list::<pb::SharedField>("shared_fields", &req.shared_fields, &mut v);
    let attested_by = v.check(reference("attested_by", &req.attested_by));
    let consent_form_ref = v.check(reference("consent_form_ref", &req.consent_form_ref));
    let command = attested_by
        .zip(consent_form_ref)
        .map(|(attested_by, consent_form_ref)| {
            Command::RecordConsent(pb::ReturnConsentRecorded {
                shared_fields,
                consent_to_reintegration_referral: req.consent_to_reintegration_referral,
                attested_by,
                consent_form_ref,
            })
        });
    finish(v, target, command)
}

/// A BCP 47 language tag (`ky`, `ru-KG`, `uz-Cyrl`): a 2–3 letter language
/// and subtags of 1–8 letters or digits.
fn language(field: &str, text: &str) -> Result<String, FieldViolation> {
    let text = text.trim();
    let mut parts = text.split('-');
    let primary = parts.next().unwrap_or_default();
    let valid = (2..=3).contains(&primary.len())
        && primary.chars().all(|c| c.is_ascii_alphabetic())
        && parts.all(|p| (1..=8).contains(&p.len()) && p.chars().all(|c| c.is_ascii_alphanumeric()))
        && text.len() <= 35;
    if valid {
        Ok(text.to_owned())
    } else {
        Err(FieldViolation::new(
            field,
            "must be a BCP 47 language tag such as ky or ru-KG",
        ))
    }
}

/// Validates a `RecordRiskAssessment` request: the interpretation language
/// is given exactly when interpretation is needed.
///
/// # Errors
/// `INVALID_ARGUMENT` naming every offending field.
pub fn risk(req: &pb::RecordRiskAssessmentRequest) -> Result<Step, AppError> {
    let mut v = Violations::new();
    let target = target(&req.request_id, &req.return_id, req.expected_version, &mut v);
    let family = v.check(enum_value::<pb::FamilyInvolvement>(
        "family_involvement",
        req.family_involvement,
        false,
    ));
    let needs = enum_list::<pb::ArrivalNeed>("needs", &req.needs, &mut v);
    let interpreting = needs.contains(&(pb::ArrivalNeed::Interpretation as i32));
    let language = match (interpreting, req.interpretation_language.trim().is_empty()) {
        (true, true) => {
            v.add(
                "interpretation_language",
                "is required with ARRIVAL_NEED_INTERPRETATION",
            );
            None
        }
        (true, false) => v.check(language("interpretation_language", &req.interpretation_language)),
        (false, true) => Some(String::new()),
        (false, false) => {
            v.add(
                "interpretation_language",
                "is given only with ARRIVAL_NEED_INTERPRETATION",
            );
            None
        }
    };
    let command = family
        .zip(language)
        .map(|(family_involvement, interpretation_language)| {
            Command::AssessRisk(pb::RiskAssessed {
                safe_to_return: req.safe_to_return,
                family_involvement,
                needs,
                interpretation_language,
            })
        });
    finish(v, target, command)
}

/// Validates a `RequestTravelDocument` request.
///
/// # Errors
/// `INVALID_ARGUMENT` naming every offending field.
pub fn request_document(req: &pb::RequestTravelDocumentRequest) -> Result<Step, AppError> {
    let mut v = Violations::new();
    let target = target(&req.request_id, &req.return_id, req.expected_version, &mut v);
    finish(v, target, Some(Command::RequestDocument))
}

/// A validated `RecordTravelDocument` request: for an issued document its
/// number (still to be sealed) and validity; for a refusal, neither.
#[derive(Debug, Clone, PartialEq)]
pub struct DocumentAnswer {
    /// Request, return, version.
    pub target: Target,
    /// The number and the end of validity of an issued document; `None`: refused.
    pub issued: Option<(String, Timestamp)>,
}

/// Validates a `RecordTravelDocument` request.
///
/// # Errors
/// `INVALID_ARGUMENT` naming every offending field.
pub fn document(req: &pb::RecordTravelDocumentRequest, now: DateTime<Utc>) -> Result<DocumentAnswer, AppError> {
    let mut v = Violations::new();
    let target = target(&req.request_id, &req.return_id, req.expected_version, &mut v);
    let number = req.document_number.trim();
    let issued = if req.issued {
        let number = v.check(document_number("document_number", number).map(|()| number.to_owned()));
        let valid_until = match time("valid_until", req.valid_until.as_ref(), &mut v) {
            Some((_, at)) if at <= now => {
                v.add("valid_until", "must be in the future");
                None
            }
            other => other.map(|(t, _)| t),
        };
        number.zip(valid_until)
    } else {
        if !number.is_empty() {
            v.add("document_number", "is given only for an issued document");
        }
        if req.valid_until.is_some() {
            v.add("valid_until", "is given only for an issued document");
        }
        None
    };
    match (target, v.is_empty()) {
        (Some(target), true) => Ok(DocumentAnswer { target, issued }),
        _ => Err(v.into_error()),
    }
}

/// An arrival point: an IATA airport code (three letters) or a border
/// post's code (1–16 letters, digits or hyphens), upper-cased.
fn arrival_point(kind: Option<pb::ArrivalPointKind>, text: &str, v: &mut Violations) -> Option<String> {
    let code = text.trim().to_ascii_uppercase();
    let valid = match kind? {
        pb::ArrivalPointKind::Airport => code.len() == 3 && code.chars().all(|c| c.is_ascii_uppercase()),
        _ => (1..=16).contains(&code.len()) && code.chars().all(|c| c.is_ascii_alphanumeric() || c == '-'),
    };
    if valid {
        Some(code)
    } else {
        v.add(
            "arrival_point",
            "must be an IATA airport code (FRU) for an airport, or a border post's code (1-16 letters, digits, -)",
        );
        None
    }
}

/// Validates a `BookItinerary` request: departure and arrival both given,
/// the departure first.
///
/// # Errors
/// `INVALID_ARGUMENT` naming every offending field.
pub fn itinerary(req: &pb::BookItineraryRequest) -> Result<Step, AppError> {
    let mut v = Violations::new();
    let target = target(&req.request_id, &req.return_id, req.expected_version, &mut v);
    let departure = time("departure_at", req.departure_at.as_ref(), &mut v);
    let arrival = time("arrival_at", req.arrival_at.as_ref(), &mut v);
    if let (Some((_, d)), Some((_, a))) = (&departure, &arrival)
        && a <= d
    {
        v.add("arrival_at", "must be after departure_at");
    }
    let carrier = req.carrier.trim();
    if carrier.is_empty()
        || carrier.len() > 32
        || !carrier
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == ' ' || c == '-')
    {
        v.add(
            "carrier",
            "must be the carrier and flight or route: 1-32 letters, digits, spaces or hyphens (KC 210)",
        );
    }
    let kind = v.check(required_enum::<pb::ArrivalPointKind>(
        "arrival_point_kind",
        req.arrival_point_kind,
    ));
    let point = arrival_point(kind, &req.arrival_point, &mut v);
    let command = match (departure, arrival, kind, point) {
        (Some((departure_at, _)), Some((arrival_at, _)), Some(kind), Some(arrival_point)) => {
            Some(Command::BookItinerary(pb::ItineraryBooked {
                departure_at: Some(departure_at),
                arrival_at: Some(arrival_at),
                carrier: carrier.to_owned(),
                arrival_point_kind: kind as i32,
                arrival_point,
            }))
        }
        _ => None,
    };
    finish(v, target, command)
}

/// Validates an `AssignEscort` request.
///
/// # Errors
/// `INVALID_ARGUMENT` naming every offending field.
pub fn escort(req: &pb::AssignEscortRequest) -> Result<Step, AppError> {
    let mut v = Violations::new();
    let target = target(&req.request_id, &req.return_id, req.expected_version, &mut v);
    let officer = v.check(reference("escort_officer", &req.escort_officer));
    let agency = v.check(agency("escort_agency", &req.escort_agency));
    let command = officer.zip(agency).map(|(escort_officer, escort_agency)| {
        Command::AssignEscort(pb::EscortAssigned {
            escort_officer,
            escort_agency,
        })
    });
    finish(v, target, command)
}

/// Validates a `RecordDeparture` request.
///
/// # Errors
/// `INVALID_ARGUMENT` naming every offending field.
pub fn departure(req: &pb::RecordDepartureRequest, now: DateTime<Utc>) -> Result<Step, AppError> {
    let mut v = Violations::new();
    let target = target(&req.request_id, &req.return_id, req.expected_version, &mut v);
    let at = past("departed_at", req.departed_at.as_ref(), now, &mut v);
    finish(v, target, at.map(|departed_at| Command::Depart { departed_at }))
}

/// Validates a `RecordArrival` request.
///
/// # Errors
/// `INVALID_ARGUMENT` naming every offending field.
pub fn arrival(req: &pb::RecordArrivalRequest, now: DateTime<Utc>) -> Result<Step, AppError> {
    let mut v = Violations::new();
    let target = target(&req.request_id, &req.return_id, req.expected_version, &mut v);
    let at = past("arrived_at", req.arrived_at.as_ref(), now, &mut v);
    finish(v, target, at.map(|arrived_at| Command::Arrive { arrived_at }))
}

/// Validates a `RecordHandover` request.
///
/// # Errors
/// `INVALID_ARGUMENT` naming every offending field.
pub fn handover(req: &pb::RecordHandoverRequest, now: DateTime<Utc>) -> Result<Step, AppError> {
    let mut v = Violations::new();
    let target = target(&req.request_id, &req.return_id, req.expected_version, &mut v);
    let at = past("handed_over_at", req.handed_over_at.as_ref(), now, &mut v);
    let received_by = v.check(agency("received_by", &req.received_by));
    let command = at.zip(received_by).map(|(at, received_by)| {
        Command::HandOver(pb::ReturnHandedOver {
            handed_over_at: Some(at),
            received_by,
        })
    });
    finish(v, target, command)
}

/// Validates a `HaltReturn` request.
///
/// # Errors
/// `INVALID_ARGUMENT` naming every offending field.
pub fn halt(req: &pb::HaltReturnRequest) -> Result<Step, AppError> {
    let mut v = Violations::new();
    let target = target(&req.request_id, &req.return_id, req.expected_version, &mut v);
    let reason = v.check(required_enum::<pb::HaltReason>("reason", req.reason));
    finish(v, target, reason.map(|reason| Command::Halt { reason }))
}

/// The return ID of a query.
///
/// # Errors
/// `INVALID_ARGUMENT` naming `return_id`.
pub fn return_id(text: &str) -> Result<ReturnId, AppError> {
    ReturnId::parse("return_id", text).map_err(|v| AppError::InvalidArgument(vec![v]))
}

/// The filters of `ListReturns`: a status and a direction (0: any).
///
/// # Errors
/// Violations of `status` and `direction` go to `v`.
pub fn list_filters(req: &pb::ListReturnsRequest, v: &mut Violations) -> (i32, i32) {
    let status = v.check(enum_value::<pb::ReturnStatus>("status", req.status, true));
    let direction = v.check(enum_value::<pb::Direction>("direction", req.direction, true));
    (status.unwrap_or(0), direction.unwrap_or(0))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn now() -> DateTime<Utc> {
        DateTime::from_timestamp(1_790_000_000, 0).unwrap_or_default()
    }

    fn fields(err: AppError) -> Vec<String> {
        match err {
            AppError::InvalidArgument(v) => v.into_iter().map(|v| v.field).collect(),
            other => panic!("expected INVALID_ARGUMENT, got {other:?}"),
        }
    }

    fn open_request() -> pb::OpenReturnRequest {
        pb::OpenReturnRequest {
            request_id: "r-1".into(),
            citizenship: "KG".into(),
            identifiers: Some(common::PersonalIdentifiers {
                full_name: " Aigul Asanova ".into(),
                date_of_birth: "1999-04-02".into(),
                ..Default::default()
            }),
            gender: common::Gender::Female as i32,
            age_band: common::AgeBand::AgeBand2534 as i32,
            form_of_exploitation: "EXPLOITATION_FORM_LABOUR".into(),
            country_of_exploitation: "RU".into(),
            foreign_reference: "RU-MVD-2026/118".into(),
            identified_by: "ru-mvd".into(),
            consulate_agency: "kg-consulate-moscow".into(),
        }
    }

    #[test]
    fn an_opening_is_lower_cased_and_trimmed() {
        let opening = open(&open_request(), now()).unwrap();
        assert_eq!(opening.coded.citizenship, "kg");
        assert_eq!(opening.coded.country_of_exploitation, "ru");
        assert_eq!(opening.identifiers.full_name, "Aigul Asanova");
    }

    #[test]
    fn an_opening_names_every_bad_field_and_never_the_value() {
        let req = pb::OpenReturnRequest {
            request_id: String::new(),
            citizenship: "KGZ".into(),
            identifiers: Some(common::PersonalIdentifiers {
                full_name: String::new(),
                date_of_birth: "02.04.1999".into(),
                phone: "call me".into(),
                documents: vec![common::IdentityDocument {
                    r#type: 0,
                    number: "AC 12345".into(),
                    issuing_country: "Kyrgyzstan".into(),
                }],
                ..Default::default()
            }),
            gender: 99,
            form_of_exploitation: "FORM_OF_EXPLOITATION_LABOUR".into(),
            identified_by: "ru mvd".into(),
            ..open_request()
        };
        let err = open(&req, now()).unwrap_err();
        let status: tonic::Status = AppError::InvalidArgument(match &err {
            AppError::InvalidArgument(v) => v.clone(),
            _ => Vec::new(),
        })
        .into();
        assert!(!format!("{status:?}").contains("call me"));
        assert_eq!(
            fields(err),
            [
                "request_id",
                "citizenship",
                "identifiers.full_name",
                "identifiers.date_of_birth",
                "identifiers.documents[0].type",
                "identifiers.documents[0].issuing_country",
                "identifiers.phone",
                "gender",
                "form_of_exploitation",
                "identified_by",
            ]
        );
        let without = pb::OpenReturnRequest {
            identifiers: None,
            ..open_request()
        };
        assert_eq!(fields(open(&without, now()).unwrap_err()), ["identifiers"]);
    }

    #[test]
    fn consent_must_be_informed_and_shared_fields_may_be_empty() {
        let req = pb::RecordReturnConsentRequest {
            request_id: "r-2".into(),
            return_id: ReturnId::new().to_string(),
            expected_version: 1,
            informed_consent_to_return: true,
            shared_fields: Vec::new(),
            consent_to_reintegration_referral: false,
            attested_by: "officer-7".into(),
            consent_form_ref: "FORM-1".into(),
        };
        assert!(matches!(consent(&req).unwrap().command, Command::RecordConsent(c) if c.shared_fields.is_empty()));
        let refused = pb::RecordReturnConsentRequest {
            informed_consent_to_return: false,
            shared_fields: vec![1, 1, 9],
            expected_version: 0,
            ..req
        };
        assert_eq!(
            fields(consent(&refused).unwrap_err()),
            [
                "expected_version",
                "informed_consent_to_return",
                "shared_fields[1]",
                "shared_fields[2]"
            ]
        );
    }

    #[test]
    fn interpretation_language_goes_with_the_interpretation_need() {
        let req = pb::RecordRiskAssessmentRequest {
            request_id: "r-3".into(),
            return_id: ReturnId::new().to_string(),
            expected_version: 2,
            safe_to_return: true,
            family_involvement: pb::FamilyInvolvement::None as i32,
            needs: vec![pb::ArrivalNeed::Interpretation as i32],
            interpretation_language: String::new(),
        };
        assert_eq!(fields(risk(&req).unwrap_err()), ["interpretation_language"]);
        let with = pb::RecordRiskAssessmentRequest {
            interpretation_language: "ky".into(),
            ..req.clone()
        };
        assert!(risk(&with).is_ok());
        let stray = pb::RecordRiskAssessmentRequest {
            needs: Vec::new(),
            family_involvement: 0,
            interpretation_language: "ky".into(),
            ..req
        };
        assert_eq!(
            fields(risk(&stray).unwrap_err()),
            ["family_involvement", "interpretation_language"]
        );
    }

    #[test]
    fn a_document_is_issued_with_a_number_and_a_future_validity_or_refused_without() {
        let base = pb::RecordTravelDocumentRequest {
            request_id: "r-4".into(),
            return_id: ReturnId::new().to_string(),
            expected_version: 4,
            issued: true,
            document_number: "CR 0001".into(),
            valid_until: Some(validate::timestamp(now() + chrono::Duration::days(30))),
        };
        assert!(document(&base, now()).unwrap().issued.is_some());
        let stale = pb::RecordTravelDocumentRequest {
            document_number: String::new(),
            valid_until: Some(validate::timestamp(now() - chrono::Duration::days(1))),
            ..base.clone()
        };
        assert_eq!(
            fields(document(&stale, now()).unwrap_err()),
            ["document_number", "valid_until"]
        );
        let refused = pb::RecordTravelDocumentRequest {
            issued: false,
            ..base.clone()
        };
        assert_eq!(
            fields(document(&refused, now()).unwrap_err()),
            ["document_number", "valid_until"]
        );
        let refused = pb::RecordTravelDocumentRequest {
            issued: false,
            document_number: String::new(),
            valid_until: None,
            ..base
        };
        assert_eq!(document(&refused, now()).unwrap().issued, None);
    }

    #[test]
    fn an_itinerary_departs_before_it_arrives_at_a_known_kind_of_point() {
        let req = pb::BookItineraryRequest {
            request_id: "r-5".into(),
            return_id: ReturnId::new().to_string(),
            expected_version: 5,
            departure_at: Some(validate::timestamp(now())),
            arrival_at: Some(validate::timestamp(now() + chrono::Duration::hours(4))),
            carrier: "KC 210".into(),
            arrival_point_kind: pb::ArrivalPointKind::Airport as i32,
            arrival_point: "fru".into(),
        };
        assert!(matches!(itinerary(&req).unwrap().command, Command::BookItinerary(i) if i.arrival_point == "FRU"));
        let bad = pb::BookItineraryRequest {
            arrival_at: Some(validate::timestamp(now() - chrono::Duration::hours(1))),
            arrival_point: "FRUNZE".into(),
            carrier: String::new(),
            ..req.clone()
        };
        assert_eq!(
            fields(itinerary(&bad).unwrap_err()),
            ["arrival_at", "carrier", "arrival_point"]
        );
        let missing = pb::BookItineraryRequest {
            departure_at: None,
            arrival_at: None,
            arrival_point_kind: 0,
            ..req
        };
        assert_eq!(
            fields(itinerary(&missing).unwrap_err()),
            ["departure_at", "arrival_at", "arrival_point_kind"]
        );
    }

    #[test]
    fn steps_in_time_are_not_in_the_future_and_halts_have_a_reason() {
        let id = ReturnId::new().to_string();
        let later = Some(validate::timestamp(now() + chrono::Duration::hours(1)));
        let departure = pb::RecordDepartureRequest {
            request_id: "r-6".into(),
            return_id: id.clone(),
            expected_version: 6,
            departed_at: later,
        };
        assert_eq!(
            fields(super::departure(&departure, now()).unwrap_err()),
            ["departed_at"]
        );
        let handover = pb::RecordHandoverRequest {
            request_id: "r-7".into(),
            return_id: "nope".into(),
            expected_version: 8,
            handed_over_at: None,
            received_by: String::new(),
        };
        assert_eq!(
            fields(super::handover(&handover, now()).unwrap_err()),
            ["return_id", "handed_over_at", "received_by"]
        );
        let halt = pb::HaltReturnRequest {
            request_id: "r-8".into(),
            return_id: id,
            expected_version: 2,
            reason: 0,
        };
        assert_eq!(fields(super::halt(&halt).unwrap_err()), ["reason"]);
    }
}
