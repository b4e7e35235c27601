//! What crosses the border after a step: the return as it stands, limited to
//! the fields the person consented to share.
//!
//! Always (the announcement's purpose: who is coming is known by the
//! return's ID, when, where, and how far it got): the IDs and countries,
//! the status and version, the consent's scope and the reintegration
//! consent, the itinerary, the escort's agency, the coded references, the
//! handover and every step. By consent group:
//! - `SHARED_FIELD_IDENTITY`: full name, date of birth, documents (the
//!   certificate of return among them once issued);
//! - `SHARED_FIELD_CONTACT`: phone and address;
//! - `SHARED_FIELD_PROFILE`: gender, age band, form and country of exploitation;
//! - `SHARED_FIELD_NEEDS`: the needs on arrival, the interpretation language
//!   and the family's involvement;
//! - `SHARED_FIELD_RISK`: the assessment's outcome.
//!
//! After the person withdrew the consent the last message says only that
//! the return halted, why, and its steps: no field of the person at all.

use nrm_proto::common::v1::PersonalIdentifiers;
use nrm_proto::repatriation::v1 as pb;
use pb::SharedField;

use super::Return;

/// The identifiers `identity` and `contact` let cross, or `None` when
/// neither is shared (or nothing is left).
#[must_use]
pub fn limit_identifiers(all: &PersonalIdentifiers, identity: bool, contact: bool) -> Option<PersonalIdentifiers> {
    let mut out = PersonalIdentifiers::default();
    if identity {
        out.full_name.clone_from(&all.full_name);
        out.date_of_birth.clone_from(&all.date_of_birth);
        out.documents.clone_from(&all.documents);
    }
    if contact {
        out.phone.clone_from(&all.phone);
        out.address.clone_from(&all.address);
    }
    (out != PersonalIdentifiers::default()).then_some(out)
}

/// The snapshot of `state` (an outgoing return, after a step) for its home
/// country: `steps` are every step so far, `identifiers` the person's (with
/// the certificate of return, once issued), opened here.
#[must_use]
pub fn snapshot(
    state: &Return,
    steps: &[pb::Step],
    identifiers: Option<&PersonalIdentifiers>,
) -> pb::CrossBorderReturn {
    let mut out = pb::CrossBorderReturn {
        return_id: state.opened.as_ref().map(|o| o.return_id.clone()).unwrap_or_default(),
        from_country: state.from_country().to_owned(),
        to_country: state.to_country().to_owned(),
        status: state.status as i32,
        origin_version: state.version,
        halt_reason: state.halted.map_or(0, |h| h.reason),
        steps: steps.to_vec(),
        ..Default::default()
    };
    if state.consent_withdrawn() {
        return out;
    }
    if let Some(consent) = &state.consent {
        out.shared_fields.clone_from(&consent.shared_fields);
        out.consent_to_reintegration_referral = consent.consent_to_reintegration_referral;
    }
    out.identifiers = identifiers.and_then(|all| {
        limit_identifiers(
            all,
            state.shares(SharedField::Identity),
            state.shares(SharedField::Contact),
        )
    });
    if let Some(opened) = state.opened.as_ref() {
        if state.shares(SharedField::Profile) {
            out.gender = opened.gender;
            out.age_band = opened.age_band;
            out.form_of_exploitation.clone_from(&opened.form_of_exploitation);
            out.country_of_exploitation.clone_from(&opened.country_of_exploitation);
        }
        out.foreign_reference.clone_from(&opened.foreign_reference);
        out.identified_by.clone_from(&opened.identified_by);
        out.consulate_agency.clone_from(&opened.consulate_agency);
    }
    if let Some(risk) = &state.risk {
        if state.shares(SharedField::Needs) {
            out.family_involvement = risk.family_involvement;
            out.needs.clone_from(&risk.needs);
            out.interpretation_language.clone_from(&risk.interpretation_language);
        }
        if state.shares(SharedField::Risk) {
            out.risk_shared = true;
            out.safe_to_return = risk.safe_to_return;
        }
    }
    if let Some(itinerary) = &state.itinerary {
        out.departure_at = itinerary.departure_at;
        out.arrival_at = itinerary.arrival_at;
        out.carrier.clone_from(&itinerary.carrier);
        out.arrival_point_kind = itinerary.arrival_point_kind;
        out.arrival_point.clone_from(&itinerary.arrival_point);
    }
    if let Some(escort) = &state.escort {
        out.escort_agency.clone_from(&escort.escort_agency);
    }
    if let Some(handover) = &state.handed_over {
        out.received_by.clone_from(&handover.received_by);
        out.handed_over_at = handover.handed_over_at;
    }
    out
}
