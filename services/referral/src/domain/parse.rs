//! Validating constructors: from a request's fields to domain values, with
//! every offending field named. Descriptions say what a valid value looks
//! like and never repeat the value sent.

use chrono::{DateTime, Utc};
use nrm_kernel::error::{AppError, FieldViolation, Violations};
use nrm_kernel::ids::{CaseId, ConsentId, GoalId, PersonId, ReferralId};
use nrm_kernel::validate::{self, enum_list, enum_value, request_id, required_enum, timestamp, to_datetime};
use nrm_proto::referral::v1 as pb;
use nrm_proto::shelter::v1 as shelter;
use prost_types::Timestamp;

use super::referral;

/// Tolerated clock skew of a caller's "when it happened" times.
const SKEW_SECONDS: i64 = 300;

pub use nrm_kernel::validate::agency;

/// A non-empty list of services.
fn services(field: &str, values: &[i32], v: &mut Violations) -> Vec<i32> {
    if values.is_empty() {
        v.add(field, "is required: at least one service");
    }
    enum_list::<pb::ServiceKind>(field, values, v)
}

/// A required time that has passed ("when it happened").
fn past_time(field: &str, t: Option<&Timestamp>, now: DateTime<Utc>, v: &mut Violations) -> Option<Timestamp> {
    match t.map(|t| (t, to_datetime(t))) {
        None => {
            v.add(field, "is required");
            None
        }
        Some((_, None)) => {
            v.add(field, "is not a valid time");
            None
        }
        Some((_, Some(at))) if at > now + chrono::Duration::seconds(SKEW_SECONDS) => {
            v.add(field, "must not be in the future");
            None
        }
        Some((t, Some(_))) => Some(*t),
    }
}

/// An optional time that must lie ahead.
fn future_time(field: &str, t: Option<&Timestamp>, now: DateTime<Utc>, v: &mut Violations) -> Option<Timestamp> {
    let t = t?;
    match to_datetime(t) {
        None => {
            v.add(field, "is not a valid time");
            None
        }
        Some(at) if at <= now => {
            v.add(field, "must be in the future");
            None
        }
        Some(_) => Some(*t),
    }
}

/// An ISO 3166-2 region code such as `KG-O` or `KG-GB`, upper-cased.
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
            "must be an ISO 3166-2 region code such as KG-O",
        ))
    }
}

/// A coded status: 2–32 capital letters or underscores (`ON_TRACK`).
///
/// # Errors
/// A violation of `field`.
pub fn status_code(field: &str, text: &str) -> Result<String, FieldViolation> {
    if (2..=32).contains(&text.len()) && text.chars().all(|c| c.is_ascii_uppercase() || c == '_') {
        Ok(text.to_owned())
    } else {
        Err(FieldViolation::new(
            field,
            "must be a code of 2-32 capital letters or underscores, such as ON_TRACK",
        ))
    }
}

/// A provider code (an organisation, never a person's name).
///
/// # Errors
/// A violation of `field`.
pub fn provider(field: &str, text: &str) -> Result<String, FieldViolation> {
    nrm_kernel::validate::code(field, text, "a provider code", "")
}

/// A coded reference (a guardian, a decision, who took it): 1-64 letters,
/// digits, `-`, `_`, `.` or `:`, never a name.
///
/// # Errors
/// A violation of `field`.
pub fn reference(field: &str, text: &str) -> Result<String, FieldViolation> {
    if text.is_empty() {
        return Err(FieldViolation::new(
            field,
            "is required: a coded reference, never a name",
        ));
    }
    if text.len() > 64
        || !text
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | ':'))
    {
        return Err(FieldViolation::new(
            field,
            "must be a coded reference: 1-64 letters, digits, '-', '_', '.' or ':' (never a name)",
        ));
    }
    Ok(text.to_owned())
}

/// A validated consent, ready to be decided.
#[derive(Debug, Clone)]
pub struct RecordConsent {
    /// The request ID.
    pub request_id: String,
    /// The person.
    pub person_id: PersonId,
    /// The consent as it will be recorded (consent ID still empty).
    pub consent: pb::ConsentRecorded,
}

/// Validates a consent: the attestation the giver needs (a guardian's
/// reference; a best-interests decision's reference and who took it), and
/// nothing of another giver's. The request's `child` is ignored: whether the
/// person is a child is what identification knows. The recording agency and
/// the attesting officer are the caller's, filled in by the application.
///
/// # Errors
/// `INVALID_ARGUMENT` naming every offending field.
pub fn record_consent(req: &pb::RecordConsentRequest, now: DateTime<Utc>) -> Result<RecordConsent, AppError> {
    let mut v = Violations::new();
    let request_id = v.check(request_id(&req.request_id));
    let person_id = v.check(PersonId::parse("person_id", &req.person_id));
    let case_id = v.check(CaseId::parse("case_id", &req.case_id));
    let given_by = v.check(enum_value::<pb::ConsentGiver>("given_by", req.given_by, false));
    let recipient = v.check(agency("recipient_agency", &req.recipient_agency));
    if req.purposes.is_empty() {
        v.add("purposes", "is required: at least one purpose");
    }
    let purposes = enum_list::<pb::ServiceKind>("purposes", &req.purposes, &mut v);
    let data_categories = enum_list::<pb::DataCategory>("data_categories", &req.data_categories, &mut v);
    let expires_at = future_time("expires_at", req.expires_at.as_ref(), now, &mut v);
    let guardian = given_by == Some(pb::ConsentGiver::Guardian as i32);
    let decision = given_by == Some(pb::ConsentGiver::BestInterestsDecision as i32);
    let mut attested = |field: &str, text: &str, needed: bool, giver: &str| -> String {
        if needed {
            v.check(reference(field, text)).unwrap_or_default()
        } else {
            if !text.is_empty() {
                v.add(field, format!("must be empty unless given_by is {giver}"));
            }
            String::new()
        }
    };
    let attestation = pb::ConsentAttestation {
        attesting_officer: String::new(),
        guardian_ref: attested("guardian_ref", &req.guardian_ref, guardian, "GUARDIAN"),
        best_interests_decision_ref: attested(
            "best_interests_decision_ref",
            &req.best_interests_decision_ref,
            decision,
            "BEST_INTERESTS_DECISION",
        ),
        best_interests_decided_by: attested(
            "best_interests_decided_by",
            &req.best_interests_decided_by,
            decision,
            "BEST_INTERESTS_DECISION",
        ),
        // Only a consent that crossed with a return is given abroad.
        given_abroad: None,
    };
    let (Some(request_id), Some(person_id)) = (request_id, person_id) else {
        return Err(v.into_error());
    };
    v.finish(|| RecordConsent {
        request_id,
        person_id,
        consent: pb::ConsentRecorded {
            consent_id: String::new(),
            person_id: person_id.to_string(),
            case_id: case_id.map(|c| c.to_string()).unwrap_or_default(),
            given_by: given_by.unwrap_or_default(),
            recipient_agency: recipient.unwrap_or_default(),
            purposes,
            data_categories,
            expires_at,
            recorded_at: Some(timestamp(now)),
            recorded_by_agency: String::new(),
            attestation: Some(attestation),
            child: false,
        },
    })
}

/// A validated withdrawal.
#[derive(Debug, Clone)]
pub struct WithdrawConsent {
    /// The request ID.
    pub request_id: String,
    /// The consent.
    pub consent_id: ConsentId,
}

/// Validates a withdrawal.
///
/// # Errors
/// `INVALID_ARGUMENT` naming every offending field.
pub fn withdraw_consent(req: &pb::WithdrawConsentRequest) -> Result<WithdrawConsent, AppError> {
    let mut v = Violations::new();
    let request_id = v.check(request_id(&req.request_id));
    let consent_id = v.check(ConsentId::parse("consent_id", &req.consent_id));
    match (request_id, consent_id) {
        (Some(request_id), Some(consent_id)) if v.is_empty() => Ok(WithdrawConsent { request_id, consent_id }),
        _ => Err(v.into_error()),
    }
}

/// A validated referral, ready to be decided.
#[derive(Debug, Clone)]
pub struct CreateReferral {
    /// The request ID.
    pub request_id: String,
    /// The person.
    pub person_id: PersonId,
    /// The consent named.
    pub consent_id: ConsentId,
    /// The referral as it will be created (referral ID, referring agency and deadline still empty).
    pub referral: pb::ReferralCreated,
}

/// Validates a referral: services known and not repeated, a shelter need
/// exactly when a shelter is asked for.
///
/// # Errors
/// `INVALID_ARGUMENT` naming every offending field.
pub fn create_referral(req: &pb::CreateReferralRequest, now: DateTime<Utc>) -> Result<CreateReferral, AppError> {
    let mut v = Violations::new();
    let request_id = v.check(request_id(&req.request_id));
    let person_id = v.check(PersonId::parse("person_id", &req.person_id));
    let case_id = v.check(CaseId::parse("case_id", &req.case_id));
    let receiving = v.check(agency("receiving_agency", &req.receiving_agency));
    let services = services("services", &req.services, &mut v);
    let urgency = v.check(enum_value::<pb::Urgency>("urgency", req.urgency, false));
    let consent_id = v.check(ConsentId::parse("consent_id", &req.consent_id));
    let wants_shelter = req.services.contains(&(pb::ServiceKind::Shelter as i32));
    let shelter_need = match (&req.shelter_need, wants_shelter) {
        (None, true) => {
            v.add("shelter_need", "is required when services include SHELTER");
            None
        }
        (Some(_), false) => {
            v.add("shelter_need", "must be empty unless services include SHELTER");
            None
        }
        (None, false) => None,
        (Some(need), true) => {
            let category = v.check(enum_value::<shelter::BedCategory>(
                "shelter_need.category",
                need.category,
                false,
            ));
            let region = v.check(region("shelter_need.region", &need.region));
            Some(pb::ShelterNeed {
                category: category.unwrap_or_default(),
                region: region.unwrap_or_default(),
            })
        }
    };
    let (Some(request_id), Some(person_id), Some(consent_id)) = (request_id, person_id, consent_id) else {
        return Err(v.into_error());
    };
    v.finish(|| CreateReferral {
        request_id,
        person_id,
        consent_id,
        referral: pb::ReferralCreated {
            referral_id: String::new(),
            person_id: person_id.to_string(),
            case_id: case_id.map(|c| c.to_string()).unwrap_or_default(),
            referring_agency: String::new(),
            receiving_agency: receiving.unwrap_or_default(),
            services,
            urgency: urgency.unwrap_or_default(),
            consent_id: consent_id.to_string(),
            shelter_need,
            created_at: Some(timestamp(now)),
            answer_due_at: None,
        },
    })
}

/// The fields every command on an existing referral carries.
#[derive(Debug, Clone)]
pub struct Target {
    /// The request ID.
    pub request_id: String,
    /// The referral.
    pub referral_id: ReferralId,
    /// The version the caller read.
    pub expected_version: u64,
}

impl Target {
    /// Parses them, recording violations.
    pub fn parse(v: &mut Violations, request_id_text: &str, referral_id: &str, expected: u64) -> Option<Self> {
        let request_id = v.check(request_id(request_id_text));
        let referral_id = v.check(ReferralId::parse("referral_id", referral_id));
        let expected_version = v.check(validate::expected_version(referral::NAME, expected));
        Some(Self {
            request_id: request_id?,
            referral_id: referral_id?,
            expected_version: expected_version?,
        })
    }
}

/// `INVALID_ARGUMENT` naming every violation, or the target and the value.
///
/// # Errors
/// When anything was violated.
pub fn finish<T>(v: Violations, target: Option<Target>, value: Option<T>) -> Result<(Target, T), AppError> {
    match (target, value) {
        (Some(target), Some(value)) if v.is_empty() => Ok((target, value)),
        _ => Err(v.into_error()),
    }
}

/// Validates an acceptance.
///
/// # Errors
/// `INVALID_ARGUMENT` naming every offending field.
pub fn accept(req: &pb::AcceptReferralRequest) -> Result<Target, AppError> {
    let mut v = Violations::new();
    let target = Target::parse(&mut v, &req.request_id, &req.referral_id, req.expected_version);
    finish(v, target, Some(())).map(|(t, ())| t)
}

/// Validates a refusal: the reason is required.
///
/// # Errors
/// `INVALID_ARGUMENT` naming every offending field.
pub fn decline(req: &pb::DeclineReferralRequest) -> Result<(Target, pb::DeclineReason), AppError> {
    let mut v = Violations::new();
    let target = Target::parse(&mut v, &req.request_id, &req.referral_id, req.expected_version);
    let reason = v.check(required_enum::<pb::DeclineReason>("reason", req.reason));
    finish(v, target, reason)
}

/// Validates a redirection.
///
/// # Errors
/// `INVALID_ARGUMENT` naming every offending field.
pub fn redirect(req: &pb::RedirectReferralRequest) -> Result<(Target, (String, ConsentId)), AppError> {
    let mut v = Violations::new();
    let target = Target::parse(&mut v, &req.request_id, &req.referral_id, req.expected_version);
    let receiving = v.check(agency("receiving_agency", &req.receiving_agency));
    let consent_id = v.check(ConsentId::parse("consent_id", &req.consent_id));
    finish(v, target, receiving.zip(consent_id))
}

/// A validated service delivery.
#[derive(Debug, Clone)]
pub struct Delivery {
    /// Which service.
    pub kind: pb::ServiceKind,
    /// When.
    pub delivered_at: Timestamp,
    /// Provider code.
    pub provider: String,
}

/// Validates a service delivery.
///
/// # Errors
/// `INVALID_ARGUMENT` naming every offending field.
pub fn service_delivered(
    req: &pb::RecordServiceDeliveredRequest,
    now: DateTime<Utc>,
) -> Result<(Target, Delivery), AppError> {
    let mut v = Violations::new();
    let target = Target::parse(&mut v, &req.request_id, &req.referral_id, req.expected_version);
    let kind = v.check(required_enum::<pb::ServiceKind>("kind", req.kind));
    let delivered_at = past_time("delivered_at", req.delivered_at.as_ref(), now, &mut v);
    let provider = v.check(provider("provider", &req.provider));
    let delivery = match (kind, delivered_at, provider) {
        (Some(kind), Some(delivered_at), Some(provider)) => Some(Delivery {
            kind,
            delivered_at,
            provider,
        }),
        _ => None,
    };
    finish(v, target, delivery)
}

/// Validates a closing: the outcome is required.
///
/// # Errors
/// `INVALID_ARGUMENT` naming every offending field.
pub fn close(req: &pb::CloseReferralRequest) -> Result<(Target, pb::ReferralOutcome), AppError> {
    let mut v = Violations::new();
    let target = Target::parse(&mut v, &req.request_id, &req.referral_id, req.expected_version);
    let outcome = v.check(required_enum::<pb::ReferralOutcome>("outcome", req.outcome));
    finish(v, target, outcome)
}

/// The fields every plan command carries.
#[derive(Debug, Clone)]
pub struct PlanTarget {
    /// The request ID.
    pub request_id: String,
    /// The person whose plan it is.
    pub person_id: PersonId,
}

fn plan_target(v: &mut Violations, request_id_text: &str, person_id: &str) -> Option<PlanTarget> {
    let request_id = v.check(request_id(request_id_text));
    let person_id = v.check(PersonId::parse("person_id", person_id));
    Some(PlanTarget {
        request_id: request_id?,
        person_id: person_id?,
    })
}

fn finish_plan<T>(v: Violations, target: Option<PlanTarget>, value: Option<T>) -> Result<(PlanTarget, T), AppError> {
    match (target, value) {
        (Some(target), Some(value)) if v.is_empty() => Ok((target, value)),
        _ => Err(v.into_error()),
    }
}

/// Validates a new goal: its kind, and its due time if given.
///
/// # Errors
/// `INVALID_ARGUMENT` naming every offending field.
pub fn add_goal(
    req: &pb::AddPlanGoalRequest,
    now: DateTime<Utc>,
) -> Result<(PlanTarget, (pb::GoalKind, Option<Timestamp>)), AppError> {
    let mut v = Violations::new();
    let target = plan_target(&mut v, &req.request_id, &req.person_id);
    let kind = v.check(required_enum::<pb::GoalKind>("kind", req.kind));
    let due_at = future_time("due_at", req.due_at.as_ref(), now, &mut v);
    finish_plan(v, target, kind.map(|k| (k, due_at)))
}

/// Validates a follow-up.
///
/// # Errors
/// `INVALID_ARGUMENT` naming every offending field.
pub fn follow_up(
    req: &pb::RecordFollowUpRequest,
    now: DateTime<Utc>,
) -> Result<(PlanTarget, (GoalId, Timestamp, String)), AppError> {
    let mut v = Violations::new();
    let target = plan_target(&mut v, &req.request_id, &req.person_id);
    let goal_id = v.check(GoalId::parse("goal_id", &req.goal_id));
    let at = past_time("followed_up_at", req.followed_up_at.as_ref(), now, &mut v);
    let code = v.check(status_code("status_code", &req.status_code));
    let value = match (goal_id, at, code) {
        (Some(g), Some(a), Some(c)) => Some((g, a, c)),
        _ => None,
    };
    finish_plan(v, target, value)
}

/// Validates marking a goal met.
///
/// # Errors
/// `INVALID_ARGUMENT` naming every offending field.
pub fn goal_met(req: &pb::MarkGoalMetRequest) -> Result<(PlanTarget, GoalId), AppError> {
    let mut v = Violations::new();
    let target = plan_target(&mut v, &req.request_id, &req.person_id);
    let goal_id = v.check(GoalId::parse("goal_id", &req.goal_id));
    finish_plan(v, target, goal_id)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fields(err: AppError) -> Vec<String> {
        match err {
            AppError::InvalidArgument(v) => v.into_iter().map(|v| v.field).collect(),
            other => panic!("expected invalid argument, got {other:?}"),
        }
    }

    fn referral() -> pb::CreateReferralRequest {
        pb::CreateReferralRequest {
            request_id: "r-1".into(),
            person_id: uuid::Uuid::now_v7().to_string(),
            case_id: uuid::Uuid::now_v7().to_string(),
            receiving_agency: "kg-msd".into(),
            services: vec![pb::ServiceKind::Shelter as i32],
            urgency: pb::Urgency::Urgent as i32,
            consent_id: uuid::Uuid::now_v7().to_string(),
            shelter_need: Some(pb::ShelterNeed {
                category: shelter::BedCategory::Women as i32,
                region: "kg-o".into(),
            }),
        }
    }

    #[test]
    fn a_valid_referral_is_normalised() {
        let valid = create_referral(&referral(), Utc::now()).unwrap();
        assert_eq!(valid.referral.shelter_need.unwrap().region, "KG-O");
    }

    #[test]
    fn a_shelter_need_comes_exactly_with_a_shelter_service() {
        let mut req = referral();
        req.shelter_need = None;
        assert_eq!(fields(create_referral(&req, Utc::now()).unwrap_err()), ["shelter_need"]);
        let mut req = referral();
        req.services = vec![pb::ServiceKind::Medical as i32];
        assert_eq!(fields(create_referral(&req, Utc::now()).unwrap_err()), ["shelter_need"]);
        let mut req = referral();
        req.shelter_need = Some(pb::ShelterNeed {
            category: 0,
            region: "Osh, Lenin street".into(),
        });
        let err = create_referral(&req, Utc::now()).unwrap_err();
        assert!(!format!("{err:?}").contains("Lenin"));
        assert_eq!(fields(err), ["shelter_need.category", "shelter_need.region"]);
    }

    #[test]
    fn every_offending_field_of_a_referral_is_named() {
        let req = pb::CreateReferralRequest {
            services: vec![pb::ServiceKind::Medical as i32, pb::ServiceKind::Medical as i32, 99],
            receiving_agency: "kg msd".into(),
            ..Default::default()
        };
        assert_eq!(
            fields(create_referral(&req, Utc::now()).unwrap_err()),
            [
                "request_id",
                "person_id",
                "case_id",
                "receiving_agency",
                "services[1]",
                "services[2]",
                "urgency",
                "consent_id"
            ]
        );
    }

    #[test]
    fn a_consent_needs_purposes_and_a_future_expiry() {
        let req = pb::RecordConsentRequest {
            request_id: "c-1".into(),
            person_id: uuid::Uuid::now_v7().to_string(),
            case_id: uuid::Uuid::now_v7().to_string(),
            given_by: pb::ConsentGiver::Person as i32,
            recipient_agency: "kg-msd".into(),
            purposes: vec![],
            data_categories: vec![],
            expires_at: Some(timestamp(Utc::now() - chrono::Duration::hours(1))),
            ..Default::default()
        };
        assert_eq!(
            fields(record_consent(&req, Utc::now()).unwrap_err()),
            ["purposes", "expires_at"]
        );
    }

    #[test]
    fn a_consent_names_the_attestation_its_giver_needs_and_no_other() {
        let req = |given_by: pb::ConsentGiver, guardian: &str, decision: &str, by: &str| pb::RecordConsentRequest {
            request_id: "c-1".into(),
            person_id: uuid::Uuid::now_v7().to_string(),
            case_id: uuid::Uuid::now_v7().to_string(),
            given_by: given_by as i32,
            recipient_agency: "kg-msd".into(),
            purposes: vec![pb::ServiceKind::Shelter as i32],
            guardian_ref: guardian.into(),
            best_interests_decision_ref: decision.into(),
            best_interests_decided_by: by.into(),
            ..Default::default()
        };
        let check = |r: pb::RecordConsentRequest| record_consent(&r, Utc::now()).map_err(fields);
        assert_eq!(
            check(req(pb::ConsentGiver::Guardian, "", "", "")).unwrap_err(),
            ["guardian_ref"]
        );
        assert_eq!(
            check(req(pb::ConsentGiver::Guardian, "Aigul Bekova", "", "")).unwrap_err(),
            ["guardian_ref"]
        );
        assert_eq!(
            check(req(pb::ConsentGiver::BestInterestsDecision, "", "", "")).unwrap_err(),
            ["best_interests_decision_ref", "best_interests_decided_by"]
        );
        assert_eq!(
            check(req(pb::ConsentGiver::Person, "GRD-1", "", "")).unwrap_err(),
            ["guardian_ref"]
        );
        let ok = check(req(
            pb::ConsentGiver::BestInterestsDecision,
            "",
            "BID-2026-7",
            "kg-gpo:prosecutor-3",
        ))
        .unwrap();
        let attestation = ok.consent.attestation.unwrap();
        assert_eq!(attestation.best_interests_decision_ref, "BID-2026-7");
        assert_eq!(attestation.best_interests_decided_by, "kg-gpo:prosecutor-3");
    }

    #[test]
    fn codes_are_checked() {
        assert!(status_code("s", "ON_TRACK").is_ok());
        assert!(status_code("s", "on track").is_err());
        assert!(status_code("s", "A").is_err());
        assert!(region("r", "KG-GB").is_ok());
        assert!(region("r", "KGZ").is_err());
        assert!(agency("a", "kg-msd").is_ok());
        assert!(agency("a", "").is_err());
    }
}
