//! The permission matrix: every RPC of every service, and for each role that
//! may call it, the records it may call it on (its scopes). This table is the
//! one place the rule is written; every call is checked against it twice:
//!
//! 1. by the gate ([`crate::gate`]) before the handler runs: a role that is
//!    not in the RPC's row is refused there, whatever it asks;
//! 2. by the application once it has loaded the record the call concerns,
//!    with [`Permit::check`]: the caller's agency must stand in one of its
//!    scopes to that record (the agency that made it, the agencies holding the
//!    case, the agency a referral or hold is for, the shelter's operator, an
//!    agency with an accepted referral under an active consent).
//!
//! `nrmctl permissions` prints [`markdown`], and the README reproduces it.
//! Some rows are parts of an RPC rather than RPCs (`GetCase` with personal
//! data): the application asks for them with [`permit`].

use std::fmt;

use crate::auth::Role;
use crate::error::AppError;

/// Which records of an RPC a role may call it on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Scope {
    /// Any record (and creating a new one).
    Any,
    /// Records the caller's agency made: the case it reported, the referral
    /// it sent, the consent it recorded; for lists, the caller's own.
    OwnAgency,
    /// Records of a case the caller's agency holds: it reported the case or
    /// is the competent authority handling it.
    CaseHolders,
    /// The caller's agency is the competent authority handling the case
    /// (the formal decision is its alone).
    CompetentAuthority,
    /// The referral, or the bed hold, is for the caller's agency.
    Addressee,
    /// The shelter is operated by the caller's agency.
    ShelterOperator,
    /// The caller's agency has an accepted referral for the person under an
    /// active consent (and reads only the consented categories).
    Consented,
}

impl Scope {
    /// The scope as the matrix prints it.
    #[must_use]
    pub const fn as_str(self) -> &'static str {
        match self {
            Scope::Any => "any",
            Scope::OwnAgency => "own agency",
            Scope::CaseHolders => "case holders",
            Scope::CompetentAuthority => "competent authority",
            Scope::Addressee => "addressee",
            Scope::ShelterOperator => "shelter operator",
            Scope::Consented => "consented",
        }
    }
}

impl fmt::Display for Scope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One row of the matrix: an RPC (or a part of one) and who may call it.
#[derive(Debug)]
pub struct Permission {
    /// Full gRPC service name (`nrm.shelter.v1.ShelterService`).
    pub service: &'static str,
    /// Method name (`HoldBed`).
    pub method: &'static str,
    /// A part of the RPC with its own row (`personal data`), or none.
    pub part: Option<&'static str>,
    /// What the RPC does, for the printed matrix.
    pub summary: &'static str,
    /// The roles that may call it, each with the records it may call it on.
    pub grants: &'static [(Role, &'static [Scope])],
}

impl Permission {
    /// The scopes of `role`, if it may call the RPC at all.
    #[must_use]
    pub fn scopes(&self, role: Role) -> Option<&'static [Scope]> {
        self.grants.iter().find(|(r, _)| *r == role).map(|(_, s)| *s)
    }

    /// `Service/Method` (and ` (part)`), as the matrix prints it.
    #[must_use]
    pub fn name(&self) -> String {
        let short = self.service.rsplit('.').next().unwrap_or(self.service);
        match self.part {
            Some(part) => format!("{short}/{} ({part})", self.method),
            None => format!("{short}/{}", self.method),
        }
    }
}

/// Identification service.
pub const IDENTIFICATION: &str = "nrm.identification.v1.IdentificationService";
/// Referral service.
pub const REFERRAL: &str = "nrm.referral.v1.ReferralService";
/// Shelter capacity service.
pub const SHELTER: &str = "nrm.shelter.v1.ShelterService";
/// Repatriation service.
pub const REPATRIATION: &str = "nrm.repatriation.v1.RepatriationService";
/// casepath: paths, inboxes, statistics.
pub const CASEPATH: &str = "nrm.casepath.v1.CasepathService";
/// The operator's service, served by every service.
pub const OPERATOR: &str = "nrm.common.v1.OperatorService";
/// The auditor's service, served by every service.
pub const AUDIT: &str = "nrm.common.v1.AuditService";

/// Part of `GetCase`: the person's identifiers.
pub const PERSONAL_DATA: &str = "personal data";

/// Parts of a casepath path (`GetPath`, `WatchPath`), one row each: who the
/// person is (coded), the identification, the consents, the referrals, the
/// beds, the return, the plan. The names match `nrm.casepath.v1.PathPart`.
pub const PATH_PARTS: [&str; 7] = [
    PATH_PERSON,
    PATH_IDENTIFICATION,
    PATH_CONSENTS,
    PATH_REFERRALS,
    PATH_SHELTER,
    PATH_RETURN,
    PATH_PLAN,
];
/// Path part: gender, age band, child, citizenship.
pub const PATH_PERSON: &str = "person";
/// Path part: the identification and its criminal-case detail.
pub const PATH_IDENTIFICATION: &str = "identification";
/// Path part: the consents.
pub const PATH_CONSENTS: &str = "consents";
/// Path part: the referrals (each: sent or received by the caller's agency).
pub const PATH_REFERRALS: &str = "referrals";
/// Path part: the beds (each: at the caller's shelter, or held for it).
pub const PATH_SHELTER: &str = "shelter";
/// Path part: the return's steps on both sides of the border.
pub const PATH_RETURN: &str = "return";
/// Path part: the rehabilitation plan.
pub const PATH_PLAN: &str = "plan";

use Role::{
    Auditor, BorderService, Consulate, Coordinator, Hotline, Iom, Moh, Msd, Ngo, Operator, Police, Prosecutor, Shelter,
};
use Scope::{Addressee, Any, CaseHolders, CompetentAuthority, Consented, OwnAgency, ShelterOperator};

const ANY: &[Scope] = &[Any];
const OWN: &[Scope] = &[OwnAgency];
const HOLDERS: &[Scope] = &[CaseHolders];
const AUTHORITY: &[Scope] = &[CompetentAuthority];
const ADDRESSEE: &[Scope] = &[Addressee];
const SENDER_OR_ADDRESSEE: &[Scope] = &[OwnAgency, Addressee];
const RECORDER: &[Scope] = &[OwnAgency];
const OPERATES: &[Scope] = &[ShelterOperator];
const CONSENTED: &[Scope] = &[Consented];
const HOLDER_OR_CONSENTED: &[Scope] = &[CaseHolders, Consented];

/// The agencies that report presumed victims and can hold a case.
const CASE_ROLES: [Role; 7] = [Police, Prosecutor, BorderService, Ngo, Hotline, Iom, Consulate];

macro_rules! grants {
    ($($role:expr => $scopes:expr),* $(,)?) => { &[$(($role, $scopes)),*] };
}

/// Every RPC of every service and who may call it on what.
pub const MATRIX: &[Permission] = &[
    // --- identification -------------------------------------------------
    Permission {
        service: IDENTIFICATION,
        method: "ReportPresumedVictim",
        part: None,
        summary: "report a presumed victim (the reporter holds the case)",
        grants: grants![Police => ANY, Prosecutor => ANY, BorderService => ANY, Ngo => ANY, Hotline => ANY,
            Iom => ANY, Consulate => ANY],
    },
    Permission {
        service: IDENTIFICATION,
        method: "CompleteScreening",
        part: None,
        summary: "record the screening",
        grants: grants![Police => HOLDERS, Prosecutor => HOLDERS, BorderService => HOLDERS],
    },
    Permission {
        service: IDENTIFICATION,
        method: "DecideIdentification",
        part: None,
        summary: "the competent authority's formal decision",
        grants: grants![Police => AUTHORITY, Prosecutor => AUTHORITY],
    },
    Permission {
        service: IDENTIFICATION,
        method: "RequestReview",
        part: None,
        summary: "reopen a decision",
        grants: grants![Police => AUTHORITY, Prosecutor => AUTHORITY, Coordinator => ANY],
    },
    Permission {
        service: IDENTIFICATION,
        method: "ErasePersonalData",
        part: None,
        summary: "erase the person's identifiers in every service (reason from a fixed list)",
        grants: grants![Police => HOLDERS, Prosecutor => HOLDERS, BorderService => HOLDERS, Ngo => HOLDERS,
            Hotline => HOLDERS, Iom => HOLDERS, Consulate => HOLDERS, Coordinator => ANY],
    },
    Permission {
        service: IDENTIFICATION,
        method: "GetCase",
        part: None,
        summary: "the coded case (no identifiers)",
        grants: grants![Police => ANY, Prosecutor => ANY, BorderService => HOLDERS, Ngo => HOLDERS,
            Hotline => HOLDERS, Iom => HOLDERS, Consulate => HOLDERS, Coordinator => ANY],
    },
    Permission {
        service: IDENTIFICATION,
        method: "GetCase",
        part: Some(PERSONAL_DATA),
        summary: "the case's identifiers (audited; the coordinator with a purpose from the fixed list)",
        grants: grants![Police => HOLDERS, Prosecutor => HOLDERS, BorderService => HOLDERS, Ngo => HOLDERS,
            Hotline => HOLDERS, Iom => HOLDERS, Consulate => HOLDERS, Coordinator => ANY],
    },
    Permission {
        service: IDENTIFICATION,
        method: "ListCases",
        part: None,
        summary: "list coded cases",
        grants: grants![Police => HOLDERS, Prosecutor => HOLDERS, BorderService => HOLDERS, Ngo => HOLDERS,
            Hotline => HOLDERS, Iom => HOLDERS, Consulate => HOLDERS, Coordinator => ANY],
    },
    Permission {
        service: IDENTIFICATION,
        method: "GetPersonalData",
        part: None,
        summary: "the identifiers a consent shares with the caller's agency (consented categories only, audited)",
        grants: grants![Msd => CONSENTED, Moh => CONSENTED, Ngo => HOLDER_OR_CONSENTED,
            Iom => HOLDER_OR_CONSENTED, Shelter => CONSENTED, Consulate => HOLDERS],
    },
    // --- referral ----------------------------------------------------------
    Permission {
        service: IDENTIFICATION,
        method: "FileAnonymousNotification",
        part: None,
        summary: "count an adult who does not consent to a referral: coded fields only, linked to nothing",
        grants: grants![Police => ANY, Prosecutor => ANY, BorderService => ANY, Ngo => ANY, Hotline => ANY,
            Iom => ANY, Consulate => ANY],
    },
    Permission {
        service: REFERRAL,
        method: "RecordConsent",
        part: None,
        summary: "record a person's consent (by an agency holding the case, never the one it lets in)",
        grants: grants![Police => HOLDERS, Prosecutor => HOLDERS, BorderService => HOLDERS, Ngo => HOLDERS,
            Hotline => HOLDERS, Iom => HOLDERS, Consulate => HOLDERS],
    },
    Permission {
        service: REFERRAL,
        method: "WithdrawConsent",
        part: None,
        summary: "withdraw a consent (the person, through the agency that recorded it)",
        grants: grants![Police => RECORDER, Prosecutor => RECORDER, BorderService => RECORDER, Ngo => RECORDER,
            Hotline => RECORDER, Iom => RECORDER, Consulate => RECORDER, Coordinator => ANY],
    },
    Permission {
        service: REFERRAL,
        method: "ListConsents",
        part: None,
        summary: "the consents of a person",
        grants: grants![Police => HOLDERS, Prosecutor => HOLDERS, BorderService => HOLDERS, Ngo => HOLDERS,
            Hotline => HOLDERS, Iom => HOLDERS, Consulate => HOLDERS, Coordinator => ANY],
    },
    Permission {
        service: REFERRAL,
        method: "CreateReferral",
        part: None,
        summary: "refer the person to another agency (under a consent for it)",
        grants: grants![Police => HOLDERS, Prosecutor => HOLDERS, BorderService => HOLDERS, Ngo => HOLDERS,
            Hotline => HOLDERS, Iom => HOLDERS, Consulate => HOLDERS],
    },
    Permission {
        service: REFERRAL,
        method: "AcceptReferral",
        part: None,
        summary: "accept a referral",
        grants: grants![Msd => ADDRESSEE, Moh => ADDRESSEE, Ngo => ADDRESSEE, Iom => ADDRESSEE,
            Shelter => ADDRESSEE],
    },
    Permission {
        service: REFERRAL,
        method: "DeclineReferral",
        part: None,
        summary: "decline a referral",
        grants: grants![Msd => ADDRESSEE, Moh => ADDRESSEE, Ngo => ADDRESSEE, Iom => ADDRESSEE,
            Shelter => ADDRESSEE],
    },
    Permission {
        service: REFERRAL,
        method: "RedirectReferral",
        part: None,
        summary: "send a declined referral on to another agency (its sender, the agency that declined it)",
        grants: grants![Police => OWN, Prosecutor => OWN, BorderService => OWN, Ngo => SENDER_OR_ADDRESSEE,
            Hotline => OWN, Iom => SENDER_OR_ADDRESSEE, Consulate => OWN, Msd => ADDRESSEE, Moh => ADDRESSEE,
            Shelter => ADDRESSEE, Coordinator => ANY],
    },
    Permission {
        service: REFERRAL,
        method: "RecordServiceDelivered",
        part: None,
        summary: "record a service delivered",
        grants: grants![Msd => ADDRESSEE, Moh => ADDRESSEE, Ngo => ADDRESSEE, Iom => ADDRESSEE,
            Shelter => ADDRESSEE],
    },
    Permission {
        service: REFERRAL,
        method: "CloseReferral",
        part: None,
        summary: "close a referral",
        grants: grants![Police => OWN, Prosecutor => OWN, BorderService => OWN, Ngo => SENDER_OR_ADDRESSEE,
            Hotline => OWN, Iom => SENDER_OR_ADDRESSEE, Consulate => OWN, Msd => ADDRESSEE, Moh => ADDRESSEE,
            Shelter => ADDRESSEE, Coordinator => ANY],
    },
    Permission {
        service: REFERRAL,
        method: "AddPlanGoal",
        part: None,
        summary: "add a goal to the rehabilitation plan",
        grants: grants![Msd => CONSENTED, Coordinator => ANY],
    },
    Permission {
        service: REFERRAL,
        method: "RecordFollowUp",
        part: None,
        summary: "record a follow-up of a plan goal",
        grants: grants![Msd => CONSENTED, Coordinator => ANY],
    },
    Permission {
        service: REFERRAL,
        method: "MarkGoalMet",
        part: None,
        summary: "mark a plan goal met",
        grants: grants![Msd => CONSENTED, Coordinator => ANY],
    },
    Permission {
        service: REFERRAL,
        method: "GetReferral",
        part: None,
        summary: "one referral (coded)",
        grants: grants![Police => OWN, Prosecutor => OWN, BorderService => OWN, Ngo => SENDER_OR_ADDRESSEE,
            Hotline => OWN, Iom => SENDER_OR_ADDRESSEE, Consulate => OWN, Msd => ADDRESSEE, Moh => ADDRESSEE,
            Shelter => ADDRESSEE, Coordinator => ANY],
    },
    Permission {
        service: REFERRAL,
        method: "GetPlan",
        part: None,
        summary: "the person's rehabilitation plan",
        grants: grants![Msd => CONSENTED, Coordinator => ANY],
    },
    Permission {
        service: REFERRAL,
        method: "ListInbox",
        part: None,
        summary: "the referrals addressed to the caller's agency (coded)",
        grants: grants![Msd => ADDRESSEE, Moh => ADDRESSEE, Ngo => ADDRESSEE, Iom => ADDRESSEE,
            Shelter => ADDRESSEE, Coordinator => ANY],
    },
    // --- shelter -------------------------------------------------------------
    Permission {
        service: SHELTER,
        method: "RegisterShelter",
        part: None,
        summary: "register a shelter (the caller's agency operates it)",
        grants: grants![Shelter => ANY, Msd => ANY, Ngo => ANY, Iom => ANY],
    },
    Permission {
        service: SHELTER,
        method: "ChangeCapacity",
        part: None,
        summary: "change a shelter's beds",
        grants: grants![Shelter => OPERATES, Msd => OPERATES, Ngo => OPERATES, Iom => OPERATES],
    },
    Permission {
        service: SHELTER,
        method: "HoldBed",
        part: None,
        summary: "hold a bed for an accepted referral addressed to the caller's agency",
        grants: grants![Msd => ADDRESSEE, Moh => ADDRESSEE, Ngo => ADDRESSEE, Iom => ADDRESSEE,
            Shelter => ADDRESSEE],
    },
    Permission {
        service: SHELTER,
        method: "ReleaseHold",
        part: None,
        summary: "release a hold",
        grants: grants![Msd => &[Addressee, ShelterOperator], Moh => ADDRESSEE, Ngo => &[Addressee, ShelterOperator],
            Iom => &[Addressee, ShelterOperator], Shelter => &[Addressee, ShelterOperator], Coordinator => ANY],
    },
    Permission {
        service: SHELTER,
        method: "Admit",
        part: None,
        summary: "admit a person who holds a bed",
        grants: grants![Shelter => OPERATES, Msd => OPERATES, Ngo => OPERATES, Iom => OPERATES],
    },
    Permission {
        service: SHELTER,
        method: "Discharge",
        part: None,
        summary: "discharge a resident",
        grants: grants![Shelter => OPERATES, Msd => OPERATES, Ngo => OPERATES, Iom => OPERATES],
    },
    Permission {
        service: SHELTER,
        method: "GetShelter",
        part: None,
        summary: "a shelter with its address (audited): its operator, an agency holding a bed there",
        grants: grants![Shelter => &[ShelterOperator, Addressee], Msd => &[ShelterOperator, Addressee],
            Moh => ADDRESSEE, Ngo => &[ShelterOperator, Addressee], Iom => &[ShelterOperator, Addressee],
            Coordinator => ANY],
    },
    Permission {
        service: SHELTER,
        method: "ListFreeCapacity",
        part: None,
        summary: "free beds by region and kind (no addresses)",
        grants: grants![Msd => ANY, Moh => ANY, Ngo => ANY, Iom => ANY, Shelter => ANY, Coordinator => ANY],
    },
    Permission {
        service: SHELTER,
        method: "ListArrivals",
        part: None,
        summary: "who is coming to a shelter: pseudonym, category, arrival window; never why",
        grants: grants![Shelter => OPERATES, Msd => OPERATES, Ngo => OPERATES, Iom => OPERATES],
    },
    Permission {
        service: SHELTER,
        method: "ApproveShelter",
        part: None,
        summary: "approve a registered shelter: only then does it take referrals",
        grants: grants![Coordinator => ANY],
    },
    // --- repatriation ---------------------------------------------------------
    // A return's holders are the agency that opened it and the consulate it
    // names (case holders). In the home country an incoming return has no
    // holders: it is shared with the country under the person's consent,
    // limited to the consented fields (consented).
    Permission {
        service: REPATRIATION,
        method: "OpenReturn",
        part: None,
        summary: "open a return for a person of a partner country (the caller's agency and the named consulate hold it)",
        grants: grants![Iom => ANY, Consulate => ANY],
    },
    Permission {
        service: REPATRIATION,
        method: "RecordReturnConsent",
        part: None,
        summary: "record the person's informed consent to return and what the home country may receive",
        grants: grants![Iom => HOLDERS, Consulate => HOLDERS],
    },
    Permission {
        service: REPATRIATION,
        method: "RecordRiskAssessment",
        part: None,
        summary: "record the risk assessment (not safe: the return halts)",
        grants: grants![Iom => HOLDERS],
    },
    Permission {
        service: REPATRIATION,
        method: "RequestTravelDocument",
        part: None,
        summary: "ask the consulate for a certificate of return",
        grants: grants![Iom => HOLDERS],
    },
    Permission {
        service: REPATRIATION,
        method: "RecordTravelDocument",
        part: None,
        summary: "the consulate's answer: the certificate of return issued (number sealed), or refused",
        grants: grants![Consulate => HOLDERS],
    },
    Permission {
        service: REPATRIATION,
        method: "BookItinerary",
        part: None,
        summary: "book the itinerary: departure, arrival, carrier, arrival point",
        grants: grants![Iom => HOLDERS],
    },
    Permission {
        service: REPATRIATION,
        method: "AssignEscort",
        part: None,
        summary: "assign the escort",
        grants: grants![Iom => HOLDERS],
    },
    Permission {
        service: REPATRIATION,
        method: "RecordDeparture",
        part: None,
        summary: "record the departure",
        grants: grants![Iom => HOLDERS],
    },
    Permission {
        service: REPATRIATION,
        method: "RecordArrival",
        part: None,
        summary: "record the arrival",
        grants: grants![Iom => HOLDERS],
    },
    Permission {
        service: REPATRIATION,
        method: "RecordHandover",
        part: None,
        summary: "record the handover to the home country's NRM",
        grants: grants![Iom => HOLDERS],
    },
    Permission {
        service: REPATRIATION,
        method: "HaltReturn",
        part: None,
        summary: "halt a return before departure, with a coded reason",
        grants: grants![Iom => HOLDERS, Consulate => HOLDERS, Coordinator => ANY],
    },
    Permission {
        service: REPATRIATION,
        method: "GetReturn",
        part: None,
        summary: "one return, coded, with its steps: its holders; an incoming return in the home country",
        grants: grants![Iom => HOLDER_OR_CONSENTED, Consulate => HOLDERS, Msd => CONSENTED, Coordinator => ANY],
    },
    Permission {
        service: REPATRIATION,
        method: "GetReturn",
        part: Some(PERSONAL_DATA),
        summary: "the person's identifiers (audited): its holders; an incoming return's shared ones in the home country",
        grants: grants![Iom => HOLDER_OR_CONSENTED, Consulate => HOLDERS, Msd => CONSENTED],
    },
    Permission {
        service: REPATRIATION,
        method: "ListReturns",
        part: None,
        summary: "returns, coded: those the caller's agency holds; the incoming ones in the home country",
        grants: grants![Iom => HOLDER_OR_CONSENTED, Consulate => HOLDERS, Msd => CONSENTED, Coordinator => ANY],
    },
    // --- casepath --------------------------------------------------------------
    Permission {
        service: CASEPATH,
        method: "GetPath",
        part: None,
        summary: "a person's path: only the parts below, each as its row says (audited); refused when the caller sees none",
        grants: grants![Police => ANY, Prosecutor => ANY, BorderService => ANY, Ngo => ANY, Hotline => ANY,
            Msd => ANY, Moh => ANY, Shelter => ANY, Iom => ANY, Consulate => ANY, Coordinator => ANY],
    },
    Permission {
        service: CASEPATH,
        method: "GetPath",
        part: Some(PATH_PERSON),
        summary: "who the person is, coded (gender, age band, child, citizenship)",
        grants: grants![Police => HOLDERS, Prosecutor => HOLDERS, BorderService => HOLDERS, Ngo => HOLDER_OR_CONSENTED,
            Hotline => HOLDERS, Iom => HOLDER_OR_CONSENTED, Consulate => HOLDERS, Msd => CONSENTED, Moh => CONSENTED,
            Shelter => CONSENTED, Coordinator => ANY],
    },
    Permission {
        service: CASEPATH,
        method: "GetPath",
        part: Some(PATH_IDENTIFICATION),
        summary: "found, reported, screened, decided, reviewed, with the criminal-case detail",
        grants: grants![Police => HOLDERS, Prosecutor => HOLDERS, BorderService => HOLDERS, Ngo => HOLDERS,
            Hotline => HOLDERS, Iom => HOLDERS, Consulate => HOLDERS, Coordinator => ANY],
    },
    Permission {
        service: CASEPATH,
        method: "GetPath",
        part: Some(PATH_CONSENTS),
        summary: "the consents recorded for the person and their end",
        grants: grants![Police => HOLDERS, Prosecutor => HOLDERS, BorderService => HOLDERS, Ngo => HOLDERS,
            Hotline => HOLDERS, Iom => HOLDERS, Consulate => HOLDERS, Coordinator => ANY],
    },
    Permission {
        service: CASEPATH,
        method: "GetPath",
        part: Some(PATH_REFERRALS),
        summary: "referrals: each one the caller's agency sent or received",
        grants: grants![Police => OWN, Prosecutor => OWN, BorderService => OWN, Ngo => SENDER_OR_ADDRESSEE,
            Hotline => OWN, Iom => SENDER_OR_ADDRESSEE, Consulate => OWN, Msd => ADDRESSEE, Moh => ADDRESSEE,
            Shelter => ADDRESSEE, Coordinator => ANY],
    },
    Permission {
        service: CASEPATH,
        method: "GetPath",
        part: Some(PATH_SHELTER),
        summary: "beds held, admission, discharge: at the caller's shelter or held for its agency; never an address, never why",
        grants: grants![Shelter => &[ShelterOperator, Addressee], Msd => &[ShelterOperator, Addressee],
            Moh => ADDRESSEE, Ngo => &[ShelterOperator, Addressee], Iom => &[ShelterOperator, Addressee],
            Coordinator => ANY],
    },
    Permission {
        service: CASEPATH,
        method: "GetPath",
        part: Some(PATH_RETURN),
        summary: "the return's steps on both sides of the border: its holders; an incoming return in the home country",
        grants: grants![Iom => HOLDER_OR_CONSENTED, Consulate => HOLDERS, Msd => CONSENTED, Coordinator => ANY],
    },
    Permission {
        service: CASEPATH,
        method: "GetPath",
        part: Some(PATH_PLAN),
        summary: "the rehabilitation plan",
        grants: grants![Msd => CONSENTED, Coordinator => ANY],
    },
    Permission {
        service: CASEPATH,
        method: "WatchPath",
        part: None,
        summary: "a person's path, live: as GetPath, part by part (audited)",
        grants: grants![Police => ANY, Prosecutor => ANY, BorderService => ANY, Ngo => ANY, Hotline => ANY,
            Msd => ANY, Moh => ANY, Shelter => ANY, Iom => ANY, Consulate => ANY, Coordinator => ANY],
    },
    Permission {
        service: CASEPATH,
        method: "ListInbox",
        part: None,
        summary: "what waits for the caller's agency's answer: referrals to it, decisions of its cases; the coordinator: any agency's",
        grants: grants![Police => AUTHORITY, Prosecutor => AUTHORITY, Msd => ADDRESSEE, Moh => ADDRESSEE,
            Ngo => ADDRESSEE, Iom => ADDRESSEE, Shelter => ADDRESSEE, Coordinator => ANY],
    },
    Permission {
        service: CASEPATH,
        method: "WatchInbox",
        part: None,
        summary: "the inbox, live",
        grants: grants![Police => AUTHORITY, Prosecutor => AUTHORITY, Msd => ADDRESSEE, Moh => ADDRESSEE,
            Ngo => ADDRESSEE, Iom => ADDRESSEE, Shelter => ADDRESSEE, Coordinator => ANY],
    },
    Permission {
        service: CASEPATH,
        method: "ListPaths",
        part: None,
        summary: "every person's path, coded, with filters",
        grants: grants![Coordinator => ANY],
    },
    Permission {
        service: CASEPATH,
        method: "GetStatistics",
        part: None,
        summary: "counts and times for a period; publishable with small cells suppressed",
        grants: grants![Coordinator => ANY],
    },
    // --- every service -------------------------------------------------------
    Permission {
        service: OPERATOR,
        method: "ListParked",
        part: None,
        summary: "parked messages and timers (no case data)",
        grants: grants![Operator => ANY],
    },
    Permission {
        service: OPERATOR,
        method: "RetryParked",
        part: None,
        summary: "retry a parked item",
        grants: grants![Operator => ANY],
    },
    Permission {
        service: OPERATOR,
        method: "RefillStream",
        part: None,
        summary: "refill the service's stream from its event store",
        grants: grants![Operator => ANY],
    },
    Permission {
        service: OPERATOR,
        method: "RebuildReadModels",
        part: None,
        summary: "rebuild the service's read models from the streams and say whether they equal the live ones",
        grants: grants![Operator => ANY],
    },
    Permission {
        service: AUDIT,
        method: "VerifyChain",
        part: None,
        summary: "verify the audit trail's hash chain",
        grants: grants![Auditor => ANY],
    },
    Permission {
        service: AUDIT,
        method: "ListEntries",
        part: None,
        summary: "audit entries (of a person, of a record)",
        grants: grants![Auditor => ANY],
    },
];

/// The matrix row of `service`/`method` (and `part`).
#[must_use]
pub fn find(service: &str, method: &str, part: Option<&str>) -> Option<&'static Permission> {
    MATRIX
        .iter()
        .find(|p| p.service == service && p.method == method && p.part == part)
}

/// What a caller in `role` may do with `service`/`method` (and `part`).
///
/// # Errors
/// [`AppError::PermissionDenied`] when the RPC has no row or the role is not
/// in it.
pub fn permit(service: &str, method: &str, part: Option<&str>, role: Role) -> Result<Permit, AppError> {
    let Some(permission) = find(service, method, part) else {
        return Err(AppError::PermissionDenied(
            "no permission is defined for this call".into(),
        ));
    };
    match permission.scopes(role) {
        Some(scopes) => Ok(Permit { permission, scopes }),
        None => Err(AppError::PermissionDenied(format!(
            "role {role} may not call {}; allowed: {}",
            permission.name(),
            permission
                .grants
                .iter()
                .map(|(r, _)| r.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        ))),
    }
}

/// How the caller's agency stands to the record a call concerns. The
/// application fills in what it knows of the record; what it leaves empty
/// admits no one.
#[derive(Debug, Default, Clone)]
pub struct Standing<'a> {
    /// The agency that made the record.
    pub owner: Option<&'a str>,
    /// The agencies holding the person's case.
    pub case_holders: Vec<&'a str>,
    /// The competent authority handling the case.
    pub competent_authority: Option<&'a str>,
    /// The agency the referral or hold is for (several: any hold at a shelter).
    pub addressees: Vec<&'a str>,
    /// The shelter's operator.
    pub shelter_operator: Option<&'a str>,
    /// Whether the caller's agency has an accepted referral for the person
    /// under an active consent (the application looked it up).
    pub consented: bool,
}

/// A role's permission for one RPC: the scopes it may call it on.
#[derive(Debug, Clone, Copy)]
pub struct Permit {
    permission: &'static Permission,
    scopes: &'static [Scope],
}

impl Permit {
    /// The row this permit comes from.
    #[must_use]
    pub fn permission(&self) -> &'static Permission {
        self.permission
    }

    /// The scopes the caller may call the RPC on.
    #[must_use]
    pub fn scopes(&self) -> &'static [Scope] {
        self.scopes
    }

    /// Whether the caller may call the RPC on any record (lists: everything).
    #[must_use]
    pub fn any(&self) -> bool {
        self.scopes.contains(&Scope::Any)
    }

    /// Whether `scope` is one of the caller's.
    #[must_use]
    pub fn has(&self, scope: Scope) -> bool {
        self.scopes.contains(&scope)
    }

    /// Whether `agency` stands in one of the permit's scopes to the record.
    #[must_use]
    pub fn admits(&self, agency: &str, standing: &Standing<'_>) -> bool {
        self.scopes.iter().any(|scope| match scope {
            Scope::Any => true,
            Scope::OwnAgency => standing.owner == Some(agency),
            Scope::CaseHolders => standing.case_holders.contains(&agency),
            Scope::CompetentAuthority => standing.competent_authority == Some(agency),
            Scope::Addressee => standing.addressees.contains(&agency),
            Scope::ShelterOperator => standing.shelter_operator == Some(agency),
            Scope::Consented => standing.consented,
        })
    }

    /// Fails unless `agency` stands in one of the permit's scopes.
    ///
    /// # Errors
    /// [`AppError::PermissionDenied`] naming the RPC and the scopes.
    pub fn check(&self, agency: &str, standing: &Standing<'_>) -> Result<(), AppError> {
        if self.admits(agency, standing) {
            Ok(())
        } else {
            Err(AppError::PermissionDenied(format!(
                "{} is allowed on records of: {}; the caller's agency stands in none of them to this one",
                self.permission.name(),
                self.scopes.iter().map(|s| s.as_str()).collect::<Vec<_>>().join(", ")
            )))
        }
    }
}

/// The matrix as a Markdown table: one row per RPC, one column per role,
/// each cell the role's scopes (empty: refused).
#[must_use]
pub fn markdown() -> String {
    use std::fmt::Write as _;
    let mut out = String::from("| RPC |");
    for role in Role::ALL {
        let _ = write!(out, " {role} |");
    }
    out.push_str("\n|---|");
    for _ in Role::ALL {
        out.push_str("---|");
    }
    out.push('\n');
    for permission in MATRIX {
        let _ = write!(out, "| `{}` |", permission.name());
        for role in Role::ALL {
            let cell = permission
                .scopes(role)
                .map(|s| s.iter().map(|s| s.as_str()).collect::<Vec<_>>().join(", "))
                .unwrap_or_default();
            let _ = write!(out, " {cell} |");
        }
        out.push('\n');
    }
    out
}

/// The roles that report and hold cases, for tests and help texts.
#[must_use]
pub fn case_roles() -> &'static [Role] {
    &CASE_ROLES
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_row_is_unique_and_names_each_role_once() {
        for (i, p) in MATRIX.iter().enumerate() {
            assert!(
                MATRIX[..i]
                    .iter()
                    .all(|q| (q.service, q.method, q.part) != (p.service, p.method, p.part)),
                "{} twice",
                p.name()
            );
            for (j, (role, scopes)) in p.grants.iter().enumerate() {
                assert!(!scopes.is_empty(), "{}: {role} without scope", p.name());
                assert!(
                    p.grants[..j].iter().all(|(r, _)| r != role),
                    "{}: {role} twice",
                    p.name()
                );
            }
        }
    }

    #[test]
    fn operators_and_auditors_reach_their_own_services_only() {
        for p in MATRIX {
            let own = match p.service {
                OPERATOR => Some(Role::Operator),
                AUDIT => Some(Role::Auditor),
                _ => None,
            };
            for role in [Role::Operator, Role::Auditor] {
                assert_eq!(p.scopes(role).is_some(), own == Some(role), "{} for {role}", p.name());
            }
            if let Some(own) = own {
                assert_eq!(p.grants.len(), 1, "{} is for {own} only", p.name());
            }
        }
    }

    #[test]
    fn a_permit_admits_only_its_scopes() {
        let release = permit(SHELTER, "ReleaseHold", None, Role::Ngo).unwrap();
        let holder = Standing {
            addressees: vec!["kg-ngo-1"],
            shelter_operator: Some("kg-ngo-2"),
            ..Standing::default()
        };
        assert!(release.admits("kg-ngo-1", &holder));
        assert!(release.admits("kg-ngo-2", &holder));
        assert!(!release.admits("kg-ngo-3", &holder));
        assert!(!release.admits("kg-ngo-3", &Standing::default()));
        assert!(permit(SHELTER, "ReleaseHold", None, Role::Police).is_err());
        assert!(permit(SHELTER, "NoSuchRpc", None, Role::Coordinator).is_err());
    }

    #[test]
    fn nobody_holds_a_bed_on_any_referral() {
        let row = find(SHELTER, "HoldBed", None).unwrap();
        assert!(row.grants.iter().all(|(_, scopes)| *scopes == ADDRESSEE));
    }

    #[test]
    fn every_rpc_has_a_row_and_every_row_an_rpc() {
        use prost::Message as _;
        let set = prost_types::FileDescriptorSet::decode(nrm_proto::FILE_DESCRIPTOR_SET).unwrap();
        let mut served = Vec::new();
        for file in &set.file {
            let package = file.package();
            for service in &file.service {
                for method in &service.method {
                    served.push((format!("{package}.{}", service.name()), method.name().to_owned()));
                }
            }
        }
        for (service, method) in &served {
            assert!(find(service, method, None).is_some(), "{service}/{method} has no row");
        }
        for p in MATRIX {
            assert!(
                served.iter().any(|(s, m)| s == p.service && m == p.method),
                "{} is not an RPC",
                p.name()
            );
        }
    }

    #[test]
    fn the_readme_reproduces_the_matrix() {
        let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../../README.md")).unwrap();
        let start = readme.find("<!-- permissions:begin -->\n").unwrap() + "<!-- permissions:begin -->\n".len();
        let end = readme.find("<!-- permissions:end -->").unwrap();
        assert_eq!(
            &readme[start..end],
            markdown(),
            "README.md's permission matrix differs from the code: paste `nrmctl permissions` between the markers"
        );
    }
}
