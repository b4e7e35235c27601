//! A person identified abroad came home: the consent and the reintegration
//! referral their case (identification's `CaseOpenedFromAbroad`) asks for.
//! Pure: IDs, the receiving agency and the time arrive as arguments; the
//! consent and referral aggregates then decide on what this makes.
//!
//! - The consent is the one the person gave abroad
//!   (`consent_to_reintegration_referral`), recorded here by this country's
//!   competent authority (it holds the case), attested by the agency abroad
//!   that took it (`ConsentGivenAbroad`), for the reintegration agency (MSD),
//!   for reintegration,
//!   letting it read the groups of identifiers the person let cross.
//! - The referral goes from the competent authority to that agency, for the
//!   same service; urgent when the person needs shelter or medical help on
//!   arrival. It asks for no bed: a shelter need on arrival already held
//!   one when the return was announced (the shelter service's arrivals
//!   reaction), and a second hold would take two beds for one person.
//! - A child's consent needs a guardian or a best-interests decision here,
//!   which nothing that crossed gives: no referral is made by itself then.

use nrm_proto::identification::v1 as idpb;
use nrm_proto::referral::v1 as pb;
use nrm_proto::repatriation::v1 as rp;
use prost_types::Timestamp;

use super::{PersonFacts, PersonStatus};

/// The consent and the referral a case from abroad makes.
#[derive(Debug, Clone, PartialEq)]
pub struct Plan {
    /// What identification's event says of the person.
    pub person: PersonFacts,
    /// The consent, its `consent_id` to be filled in.
    pub consent: pb::ConsentRecorded,
    /// The referral, its `referral_id` and `consent_id` to be filled in.
    pub referral: pb::ReferralCreated,
}

/// Why a case from abroad makes no referral by itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NoReferral {
    /// The person did not agree abroad to a reintegration referral.
    NotConsented,
    /// A child: the consent needs a guardian or a best-interests decision here.
    Child,
    /// The age did not cross (the profile was not shared): the person may
    /// be a child, whose consent is not the person's own to give.
    AgeUnknown,
}

impl NoReferral {
    /// Stable code, for logs.
    #[must_use]
    pub const fn code(self) -> &'static str {
        match self {
            NoReferral::NotConsented => "NOT_CONSENTED",
            NoReferral::Child => "CHILD_NEEDS_GUARDIAN",
            NoReferral::AgeUnknown => "AGE_UNKNOWN",
        }
    }
}

/// What the person's facts are, from identification's event itself (the
/// persons read model may not have it yet).
#[must_use]
pub fn person_facts(report: &idpb::PresumedVictimReported) -> PersonFacts {
    PersonFacts {
        case_id: report.case_id.clone(),
        status: PersonStatus::from_case_status(report.status),
        child: report.child,
        reporting_agency: report.reporting_agency.clone(),
        competent_authority: report.competent_authority.clone(),
    }
}

/// The identifier categories the groups of shared fields let through.
#[must_use]
pub fn data_categories(shared_fields: &[i32]) -> Vec<i32> {
    let shared = |f: rp::SharedField| shared_fields.contains(&(f as i32));
    let mut categories = Vec::new();
    if shared(rp::SharedField::Identity) {
        categories.extend([
            pb::DataCategory::Name,
            pb::DataCategory::DateOfBirth,
            pb::DataCategory::Documents,
        ]);
    }
    if shared(rp::SharedField::Contact) {
        categories.extend([pb::DataCategory::Phone, pb::DataCategory::Address]);
    }
    categories.into_iter().map(|c| c as i32).collect()
}

/// The consent and referral that the case `opened` asks for, to
/// `reintegration_agency`, at `now`.
///
/// # Errors
/// [`NoReferral`] when the case asks for none.
pub fn plan(
    opened: &idpb::CaseOpenedFromAbroad,
    reintegration_agency: &str,
    now: Timestamp,
) -> Result<Plan, NoReferral> {
    let report = opened.report.clone().unwrap_or_default();
    let abroad = opened.identified_abroad.clone().unwrap_or_default();
    if !abroad.consent_to_reintegration_referral {
        return Err(NoReferral::NotConsented);
    }
    if report.child {
        return Err(NoReferral::Child);
    }
    let age_known = nrm_proto::common::v1::AgeBand::try_from(report.age_band).is_ok_and(|band| {
        !matches!(
            band,
            nrm_proto::common::v1::AgeBand::Unspecified | nrm_proto::common::v1::AgeBand::Unknown
        )
    });
    if !age_known {
        return Err(NoReferral::AgeUnknown);
    }
    let needs = |n: rp::ArrivalNeed| abroad.needs.contains(&(n as i32));
    // The bed on arrival is the shelter service's, held for the return
    // when it was announced (its arrivals reaction): a shelter need here
    // would make the placement hold a second bed for the same person.
    let shelter_need: Option<pb::ShelterNeed> = None;
    let services = vec![pb::ServiceKind::Reintegration as i32];
    let urgency = if needs(rp::ArrivalNeed::Shelter) || needs(rp::ArrivalNeed::Medical) {
        pb::Urgency::Urgent
    } else {
        pb::Urgency::Normal
    };
    let authority = report.competent_authority.clone();
    let consent = pb::ConsentRecorded {
        consent_id: String::new(),
        person_id: report.person_id.clone(),
        case_id: report.case_id.clone(),
        given_by: pb::ConsentGiver::Person as i32,
        recipient_agency: reintegration_agency.to_owned(),
        purposes: services.clone(),
        data_categories: data_categories(&abroad.shared_fields),
        expires_at: None,
        recorded_at: Some(now),
        recorded_by_agency: authority.clone(),
        attestation: Some(pb::ConsentAttestation {
            given_abroad: Some(pb::ConsentGivenAbroad {
                from_country: abroad.from_country.clone(),
                recorded_by: abroad.consent_recorded_by.clone(),
                recorded_at: abroad.consent_recorded_at,
                return_id: abroad.return_id.clone(),
                foreign_reference: abroad.foreign_reference.clone(),
                identified_by: abroad.identified_by.clone(),
            }),
            ..Default::default()
        }),
        child: report.child,
    };
    let referral = pb::ReferralCreated {
        referral_id: String::new(),
        person_id: report.person_id.clone(),
        case_id: report.case_id.clone(),
        referring_agency: authority,
        receiving_agency: reintegration_agency.to_owned(),
        services,
        urgency: urgency as i32,
        consent_id: String::new(),
        shelter_need,
        created_at: Some(now),
        answer_due_at: None,
    };
    Ok(Plan {
        person: person_facts(&report),
        consent,
        referral,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::consent::{self, Consent};
    use crate::domain::referral::{self, Deadlines, Referral};
    use nrm_proto::common::v1 as common;

    const NOW: Timestamp = Timestamp {
        seconds: 1_790_000_000,
        nanos: 0,
    };

    fn opened(needs: &[rp::ArrivalNeed], shared: &[rp::SharedField]) -> idpb::CaseOpenedFromAbroad {
        idpb::CaseOpenedFromAbroad {
            report: Some(idpb::PresumedVictimReported {
                case_id: "c1".into(),
                person_id: "p1".into(),
                reporting_agency: "kg-iom".into(),
                competent_authority: "kg-mvd".into(),
                gender: common::Gender::Female as i32,
                age_band: common::AgeBand::AgeBand2534 as i32,
                status: idpb::CaseStatus::Identified as i32,
                ..Default::default()
            }),
            identified_abroad: Some(idpb::IdentifiedAbroad {
                from_country: "ru".into(),
                foreign_reference: "RU-MVD-1".into(),
                identified_by: "ru-mvd".into(),
                return_id: "r1".into(),
                consent_to_reintegration_referral: true,
                shared_fields: shared.iter().map(|f| *f as i32).collect(),
                consent_recorded_by: "ru-iom".into(),
                needs: needs.iter().map(|n| *n as i32).collect(),
                ..Default::default()
            }),
        }
    }

    #[test]
    fn the_consent_and_the_referral_pass_their_aggregates_rules() {
        let plan = plan(
            &opened(&[rp::ArrivalNeed::Shelter], &[rp::SharedField::Identity]),
            "kg-msd",
            NOW,
        )
        .unwrap();
        let mut recorded = plan.consent.clone();
        recorded.consent_id = "k1".into();
        let events = consent::decide(
            &Consent::default(),
            &consent::Command::Record {
                consent: Box::new(recorded),
                person: Some(plan.person.clone()),
            },
        )
        .unwrap();
        let state = events.iter().fold(Consent::default(), consent::evolve);
        let recorded = state.recorded.clone().unwrap();
        assert_eq!(recorded.recorded_by_agency, "kg-mvd");
        assert_eq!(recorded.recipient_agency, "kg-msd");
        assert_eq!(
            recorded.data_categories,
            [
                pb::DataCategory::Name as i32,
                pb::DataCategory::DateOfBirth as i32,
                pb::DataCategory::Documents as i32
            ]
        );
        let abroad = recorded.attestation.unwrap().given_abroad.unwrap();
        assert_eq!(
            (abroad.recorded_by.as_str(), abroad.return_id.as_str()),
            ("ru-iom", "r1")
        );

        let mut created = plan.referral.clone();
        created.referral_id = "f1".into();
        created.consent_id = "k1".into();
        let events = referral::decide(
            &Referral::default(),
            &referral::Command::Create {
                referral: Box::new(created),
                person: Some(plan.person),
                consent: Box::new(state),
                allow_not_identified: false,
                deadlines: Deadlines {
                    urgent_seconds: 60,
                    normal_seconds: 120,
                },
            },
        )
        .unwrap();
        let referral = events.iter().fold(Referral::default(), referral::evolve);
        let created = referral.created.unwrap();
        assert_eq!(created.referring_agency, "kg-mvd");
        // The bed on arrival is the shelter service's hold for the return.
        assert_eq!(created.services, [pb::ServiceKind::Reintegration as i32]);
        assert_eq!(created.urgency, pb::Urgency::Urgent as i32);
        assert!(created.shelter_need.is_none());
    }

    #[test]
    fn without_needs_the_referral_is_normal_and_asks_for_reintegration_only() {
        let plan = plan(&opened(&[], &[rp::SharedField::Contact]), "kg-msd", NOW).unwrap();
        assert_eq!(plan.referral.services, [pb::ServiceKind::Reintegration as i32]);
        assert_eq!(plan.referral.urgency, pb::Urgency::Normal as i32);
        assert!(plan.referral.shelter_need.is_none());
        assert_eq!(
            plan.consent.data_categories,
            [pb::DataCategory::Phone as i32, pb::DataCategory::Address as i32]
        );
        let none = plan_of(&opened(&[], &[]));
        assert!(none.unwrap().consent.data_categories.is_empty());
    }

    fn plan_of(opened: &idpb::CaseOpenedFromAbroad) -> Result<Plan, NoReferral> {
        plan(opened, "kg-msd", NOW)
    }

    #[test]
    fn no_referral_when_the_age_did_not_cross() {
        let mut unknown = opened(&[], &[rp::SharedField::Identity]);
        if let Some(report) = unknown.report.as_mut() {
            report.age_band = common::AgeBand::Unknown as i32;
        }
        assert_eq!(plan_of(&unknown), Err(NoReferral::AgeUnknown));
    }

    #[test]
    fn no_referral_without_the_persons_consent_or_for_a_child() {
        let mut not_consented = opened(&[], &[]);
        if let Some(abroad) = not_consented.identified_abroad.as_mut() {
            abroad.consent_to_reintegration_referral = false;
        }
        assert_eq!(plan_of(&not_consented), Err(NoReferral::NotConsented));
        let mut child = opened(&[], &[]);
        if let Some(report) = child.report.as_mut() {
            report.child = true;
        }
        assert_eq!(plan_of(&child), Err(NoReferral::Child));
    }
}
