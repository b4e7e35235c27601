//! A person identified abroad comes home: what the handover of their return,
//! as it crossed the border (`nrm.repatriation.v1.CrossBorderReturn`), makes
//! of a case here. Pure: the country, the competent authority and the time
//! arrive as arguments.
//!
//! The case takes the shape of a report so that everything that reads cases
//! (the case view, the agencies holding it, duplicate detection, erasure)
//! reads it unchanged: the agency that received the person at the handover
//! is its reporting agency, this country's competent authority handles it,
//! and its status is IDENTIFIED (decided abroad, by `identified_by`). Only
//! what the person let cross is used; the identifiers are limited again to
//! the consented groups (identity: name, date of birth, documents; contact:
//! phone, address), whatever the message holds.

use nrm_proto::common::v1 as common;
use nrm_proto::identification::v1 as pb;
use nrm_proto::repatriation::v1 as rp;
use prost_types::Timestamp;

/// This deployment, as a handover needs it.
#[derive(Debug, Clone, Copy)]
pub struct Here<'a> {
    /// This country's code (lower case, `kg`).
    pub country: &'a str,
    /// The agency code of the competent authority that handles cases opened
    /// on a return (police or a prosecutor).
    pub competent_authority: &'a str,
    /// The agencies here that receive persons at a handover, comma-separated
    /// (`kg-iom`): the one a return names becomes the case's reporting
    /// agency (a case holder). Any other name that crossed, typed abroad, is
    /// kept as information only, and the competent authority reports.
    pub receivers: &'a str,
}

/// What a handover opens: the case (IDs, sealed identifiers and matches still
/// to be filled in by the application) and the identifiers to seal.
#[derive(Debug, Clone, PartialEq)]
pub struct Homecoming {
    /// The case's report: `case_id`, `person_id`, `personal` and
    /// `matching_case_ids` empty.
    pub report: pb::PresumedVictimReported,
    /// Where it comes from.
    pub abroad: pb::IdentifiedAbroad,
    /// The identifiers that crossed, limited to the consented groups (empty
    /// when none were shared).
    pub identifiers: common::PersonalIdentifiers,
}

/// Why a crossing message opens no case (it is malformed or misdirected).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refused {
    /// The return names no return ID, or one that is not a UUID.
    #[error("the crossing return has no valid return ID")]
    ReturnId,
    /// The return is not from the partner it came from, or not for here.
    #[error("the crossing return names other countries than its link")]
    Countries,
}

/// The case a crossing return opens here: `None` unless the return was
/// handed over (every earlier step opens nothing).
///
/// `from` is the partner whose stream the message came on; `now` is when the
/// case opens.
///
/// # Errors
/// [`Refused`] when the return is malformed or not from `from` to `here`.
pub fn handover(
    ret: &rp::CrossBorderReturn,
    from: &str,
    here: Here<'_>,
    now: Timestamp,
) -> Result<Option<Homecoming>, Refused> {
    if uuid::Uuid::parse_str(&ret.return_id).is_err() {
        return Err(Refused::ReturnId);
    }
    if !ret.from_country.eq_ignore_ascii_case(from) || !ret.to_country.eq_ignore_ascii_case(here.country) {
        return Err(Refused::Countries);
    }
    if ret.status != rp::ReturnStatus::HandedOver as i32 {
        return Ok(None);
    }
    let shared = |field: rp::SharedField| ret.shared_fields.contains(&(field as i32));
    let profile = shared(rp::SharedField::Profile);
    let gender = known::<common::Gender>(ret.gender).filter(|_| profile);
    let age_band = known::<common::AgeBand>(ret.age_band).filter(|_| profile);
    let child = age_band
        .is_some_and(|band| band == common::AgeBand::AgeBand011 as i32 || band == common::AgeBand::AgeBand1217 as i32);
    let consent = ret
        .steps
        .iter()
        .find(|step| step.status_after == rp::ReturnStatus::Consented as i32);
    let received_by = if ret.received_by.is_empty() {
        here.competent_authority
    } else {
        ret.received_by.as_str()
    };
    // Who holds the case here is this country's rule, never the other's.
    let reporting_agency = if here.receivers.split(',').map(str::trim).any(|r| r == received_by) {
        received_by
    } else {
        here.competent_authority
    };
    let report = pb::PresumedVictimReported {
        reporting_agency: reporting_agency.to_owned(),
        // The case's times count from the handover, not from when the
        // message came through (after a link cut, much later).
        reported_at: Some(ret.handed_over_at.unwrap_or(now)),
        found_country: from.to_ascii_uppercase(),
        country_of_exploitation: if profile {
            ret.country_of_exploitation.to_ascii_uppercase()
        } else {
            String::new()
        },
        exploitation_forms: if profile {
            exploitation_form(&ret.form_of_exploitation)
                .map(|f| f as i32)
                .into_iter()
                .collect()
        } else {
            Vec::new()
        },
        child,
        gender: gender.unwrap_or_default(),
        age_band: age_band.unwrap_or(common::AgeBand::Unknown as i32),
        citizenship: here.country.to_ascii_uppercase(),
        status: pb::CaseStatus::Identified as i32,
        competent_authority: here.competent_authority.to_owned(),
        ..Default::default()
    };
    let needs = if shared(rp::SharedField::Needs) {
        ret.needs
            .iter()
            .copied()
            .filter(|n| known::<rp::ArrivalNeed>(*n).is_some())
            .collect()
    } else {
        Vec::new()
    };
    let abroad = pb::IdentifiedAbroad {
        from_country: from.to_ascii_lowercase(),
        foreign_reference: ret.foreign_reference.clone(),
        identified_by: ret.identified_by.clone(),
        return_id: ret.return_id.clone(),
        origin_version: ret.origin_version,
        received_by: received_by.to_owned(),
        handed_over_at: ret.handed_over_at,
        consent_to_reintegration_referral: ret.consent_to_reintegration_referral,
        shared_fields: ret
            .shared_fields
            .iter()
            .copied()
            .filter(|f| known::<rp::SharedField>(*f).is_some())
            .collect(),
        consent_recorded_by: consent.map(|s| s.agency.clone()).unwrap_or_default(),
        consent_recorded_at: consent.and_then(|s| s.at),
        needs,
        arrival_point: ret.arrival_point.clone(),
    };
    let crossed = ret.identifiers.clone().unwrap_or_default();
    let identity = shared(rp::SharedField::Identity);
    let contact = shared(rp::SharedField::Contact);
    let identifiers = common::PersonalIdentifiers {
        full_name: if identity { crossed.full_name } else { String::new() },
        date_of_birth: if identity { crossed.date_of_birth } else { String::new() },
        documents: if identity { crossed.documents } else { Vec::new() },
        phone: if contact { crossed.phone } else { String::new() },
        address: if contact { crossed.address } else { String::new() },
    };
    Ok(Some(Homecoming {
        report,
        abroad,
        identifiers,
    }))
}

/// `value` when it is a specified value of `E`.
fn known<E: TryFrom<i32>>(value: i32) -> Option<i32> {
    (value != 0 && E::try_from(value).is_ok()).then_some(value)
}

/// The form of exploitation named abroad: identification's enum name
/// (`EXPLOITATION_FORM_LABOUR`), the name the repatriation contract shows
/// (`FORM_OF_EXPLOITATION_LABOUR`) or the bare word (`LABOUR`); any other
/// name is `OTHER`, none is none.
#[must_use]
pub fn exploitation_form(name: &str) -> Option<pb::ExploitationForm> {
    let name = name.trim().to_ascii_uppercase();
    if name.is_empty() {
        return None;
    }
    let word = name
        .strip_prefix("EXPLOITATION_FORM_")
        .or_else(|| name.strip_prefix("FORM_OF_EXPLOITATION_"))
        .unwrap_or(&name);
    Some(
        pb::ExploitationForm::from_str_name(&format!("EXPLOITATION_FORM_{word}"))
            .filter(|f| *f != pb::ExploitationForm::Unspecified)
            .unwrap_or(pb::ExploitationForm::Other),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: Timestamp = Timestamp {
        seconds: 1_790_000_000,
        nanos: 0,
    };
    const HERE: Here<'static> = Here {
        country: "kg",
        competent_authority: "kg-mvd",
        receivers: "kg-iom",
    };
    const RETURN_ID: &str = "0198a1b2-c3d4-7e5f-8a9b-0c1d2e3f4a5b";

    fn handed_over(shared: &[rp::SharedField]) -> rp::CrossBorderReturn {
        rp::CrossBorderReturn {
            return_id: RETURN_ID.into(),
            from_country: "ru".into(),
            to_country: "kg".into(),
            status: rp::ReturnStatus::HandedOver as i32,
            origin_version: 9,
            shared_fields: shared.iter().map(|f| *f as i32).collect(),
            consent_to_reintegration_referral: true,
            identifiers: Some(common::PersonalIdentifiers {
                full_name: "A Person".into(),
                date_of_birth: "2001-03-14".into(),
                documents: vec![common::IdentityDocument {
                    r#type: common::DocumentType::Passport as i32,
                    number: "AB123456".into(),
                    issuing_country: "KG".into(),
                }],
                phone: "+996 700 000 001".into(),
                address: "Somewhere 1".into(),
            }),
            gender: common::Gender::Female as i32,
            age_band: common::AgeBand::AgeBand1824 as i32,
            form_of_exploitation: "FORM_OF_EXPLOITATION_LABOUR".into(),
            country_of_exploitation: "ru".into(),
            needs: vec![rp::ArrivalNeed::Shelter as i32],
            arrival_point: "FRU".into(),
            foreign_reference: "RU-MVD-2026-0042".into(),
            identified_by: "ru-mvd".into(),
            received_by: "kg-iom".into(),
            handed_over_at: Some(NOW),
            steps: vec![
                rp::Step {
                    step: "ReturnOpened".into(),
                    status_after: rp::ReturnStatus::Opened as i32,
                    agency: "ru-iom".into(),
                    origin_version: 1,
                    ..Default::default()
                },
                rp::Step {
                    step: "ReturnConsentRecorded".into(),
                    status_after: rp::ReturnStatus::Consented as i32,
                    at: Some(Timestamp {
                        seconds: NOW.seconds - 86_400,
                        nanos: 0,
                    }),
                    agency: "ru-iom".into(),
                    origin_version: 2,
                },
            ],
            ..Default::default()
        }
    }

    #[test]
    fn only_a_handed_over_return_opens_a_case() {
        for status in [
            rp::ReturnStatus::Consented,
            rp::ReturnStatus::ItineraryBooked,
            rp::ReturnStatus::Departed,
            rp::ReturnStatus::Arrived,
            rp::ReturnStatus::Halted,
        ] {
            let mut ret = handed_over(&[rp::SharedField::Identity]);
            ret.status = status as i32;
            assert_eq!(handover(&ret, "ru", HERE, NOW), Ok(None), "{status:?}");
        }
        assert!(handover(&handed_over(&[]), "ru", HERE, NOW).unwrap().is_some());
    }

    #[test]
    fn a_receiver_typed_abroad_that_is_not_a_receiver_here_holds_nothing() {
        let mut ret = handed_over(&[rp::SharedField::Profile]);
        ret.received_by = "kg-ngo-anyone".into();
        let home = handover(&ret, "ru", HERE, NOW).unwrap().unwrap();
        assert_eq!(
            home.report.reporting_agency, "kg-mvd",
            "the competent authority reports"
        );
        assert_eq!(home.abroad.received_by, "kg-ngo-anyone", "kept as information");
    }

    #[test]
    fn the_case_is_identified_abroad_held_by_the_receiver_and_the_competent_authority() {
        let all = [
            rp::SharedField::Identity,
            rp::SharedField::Contact,
            rp::SharedField::Profile,
            rp::SharedField::Needs,
        ];
        let home = handover(&handed_over(&all), "ru", HERE, NOW).unwrap().unwrap();
        let report = home.report.clone();
        assert_eq!(report.status, pb::CaseStatus::Identified as i32);
        assert_eq!(report.reporting_agency, "kg-iom");
        assert_eq!(report.competent_authority, "kg-mvd");
        assert_eq!(report.found_country, "RU");
        assert_eq!(report.citizenship, "KG");
        assert_eq!(report.country_of_exploitation, "RU");
        assert_eq!(report.exploitation_forms, [pb::ExploitationForm::Labour as i32]);
        assert_eq!(report.gender, common::Gender::Female as i32);
        assert!(!report.child);
        assert!(report.personal.is_none(), "sealed by the application");
        let abroad = &home.abroad;
        assert_eq!(abroad.from_country, "ru");
        assert_eq!(abroad.foreign_reference, "RU-MVD-2026-0042");
        assert_eq!(abroad.identified_by, "ru-mvd");
        assert_eq!(abroad.return_id, RETURN_ID);
        assert_eq!(abroad.origin_version, 9);
        assert_eq!(abroad.received_by, "kg-iom");
        assert_eq!(abroad.consent_recorded_by, "ru-iom");
        assert!(abroad.consent_recorded_at.is_some());
        assert!(abroad.consent_to_reintegration_referral);
        assert_eq!(abroad.needs, [rp::ArrivalNeed::Shelter as i32]);
        assert_eq!(home.identifiers.full_name, "A Person");
        assert_eq!(home.identifiers.phone, "+996 700 000 001");
    }

    #[test]
    fn what_was_not_shared_is_not_used_even_when_it_crossed() {
        let home = handover(&handed_over(&[rp::SharedField::Contact]), "ru", HERE, NOW)
            .unwrap()
            .unwrap();
        assert!(home.identifiers.full_name.is_empty());
        assert!(home.identifiers.date_of_birth.is_empty());
        assert!(home.identifiers.documents.is_empty());
        assert_eq!(home.identifiers.address, "Somewhere 1");
        let report = home.report.clone();
        assert_eq!(report.gender, 0);
        assert_eq!(report.age_band, common::AgeBand::Unknown as i32);
        assert!(report.exploitation_forms.is_empty());
        assert!(report.country_of_exploitation.is_empty());
        assert!(home.abroad.needs.is_empty());

        let none = handover(&handed_over(&[]), "ru", HERE, NOW).unwrap().unwrap();
        assert_eq!(none.identifiers, common::PersonalIdentifiers::default());
    }

    #[test]
    fn a_child_age_band_makes_a_child_case() {
        let mut ret = handed_over(&[rp::SharedField::Profile]);
        ret.age_band = common::AgeBand::AgeBand1217 as i32;
        let home = handover(&ret, "ru", HERE, NOW).unwrap().unwrap();
        assert!(home.report.child);
    }

    #[test]
    fn a_misdirected_or_malformed_return_is_refused() {
        let mut ret = handed_over(&[]);
        ret.to_country = "tj".into();
        assert_eq!(handover(&ret, "ru", HERE, NOW), Err(Refused::Countries));
        assert_eq!(handover(&handed_over(&[]), "kz", HERE, NOW), Err(Refused::Countries));
        let mut ret = handed_over(&[]);
        ret.return_id = "not-a-uuid".into();
        assert_eq!(handover(&ret, "ru", HERE, NOW), Err(Refused::ReturnId));
    }

    #[test]
    fn the_receiver_defaults_to_the_competent_authority() {
        let mut ret = handed_over(&[]);
        ret.received_by.clear();
        let home = handover(&ret, "ru", HERE, NOW).unwrap().unwrap();
        assert_eq!(home.report.reporting_agency, "kg-mvd");
    }

    #[test]
    fn forms_of_exploitation_are_read_in_any_of_their_spellings() {
        assert_eq!(
            exploitation_form("EXPLOITATION_FORM_SEXUAL"),
            Some(pb::ExploitationForm::Sexual)
        );
        assert_eq!(
            exploitation_form("FORM_OF_EXPLOITATION_FORCED_BEGGING"),
            Some(pb::ExploitationForm::ForcedBegging)
        );
        assert_eq!(exploitation_form("labour"), Some(pb::ExploitationForm::Labour));
        assert_eq!(exploitation_form("SOMETHING_ELSE"), Some(pb::ExploitationForm::Other));
        assert_eq!(exploitation_form("UNSPECIFIED"), Some(pb::ExploitationForm::Other));
        assert_eq!(exploitation_form(""), None);
    }
}
