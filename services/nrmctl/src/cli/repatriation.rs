//! The clap types of the repatriation service's commands: `return …`.
//!
//! A return is opened and run in the destination country (its IOM office,
//! the home country's consulate there); the home country reads it
//! (`return show`, `return list --direction incoming`).

use clap::{ArgGroup, Args, Subcommand};
use nrm_proto::common::v1::{AgeBand, DocumentType, Gender};
use nrm_proto::identification::v1::ExploitationForm;
use nrm_proto::repatriation::v1::{ArrivalNeed, Direction, FamilyInvolvement, HaltReason, ReturnStatus, SharedField};

use super::{NumberCountry, RequestId, parse_document, parse_number_country, parse_timestamp};
use crate::enums::EnumParser;

/// Returns home across a border.
#[derive(Debug, Subcommand)]
pub enum ReturnCommand {
    /// Open a return for a person of another citizenship (IOM, the consulate; prints the return ID).
    Open(Box<OpenArgs>),
    /// Record the person's informed consent to return and what the home country may receive.
    Consent(ConsentArgs),
    /// Record the risk assessment (not safe to return: the return halts).
    Assess(AssessArgs),
    /// Ask the consulate for a travel document (certificate of return).
    RequestDocument(AtArgs),
    /// The consulate's answer: the document issued, or refused (the return halts).
    Document(DocumentArgs),
    /// Book the itinerary: departure, arrival, carrier, arrival point.
    Itinerary(ItineraryArgs),
    /// Assign the escort.
    Escort(EscortArgs),
    /// Record the departure.
    Depart(TimeArgs),
    /// Record the arrival in the home country.
    Arrive(TimeArgs),
    /// Record the handover to the home country's NRM (opens its case and reintegration referral there).
    Handover(HandoverArgs),
    /// Halt a return before departure, with a coded reason.
    Halt(HaltArgs),
    /// Show one return with its step history.
    #[command(alias = "get")]
    Show(ShowArgs),
    /// List returns, newest first: outgoing ones here, or those announced to this country.
    List(ReturnListArgs),
}

/// The return and the version the caller saw.
#[derive(Debug, Args)]
pub struct ReturnAt {
    /// The return ID.
    #[arg(value_name = "RETURN_ID")]
    pub return_id: String,
    /// The return version you saw; the call fails with ABORTED when the return moved on.
    #[arg(long = "version", value_name = "N")]
    pub expected_version: u64,
}

/// `return open`.
#[derive(Debug, Args)]
pub struct OpenArgs {
    /// The person's citizenship, the home country (ISO 3166-1 alpha-2, a partner of this deployment).
    #[arg(long, value_name = "CC", help_heading = "The return")]
    pub citizenship: String,
    /// The home country's consulate that issues the travel document, e.g. kg-consulate-moscow.
    #[arg(long = "consulate", value_name = "AGENCY", help_heading = "The return")]
    pub consulate_agency: String,
    /// The authority that identified the person here (agency code), e.g. ru-mvd.
    #[arg(long, value_name = "AGENCY", help_heading = "The return")]
    pub identified_by: String,
    /// This country's reference of the person's identification (a case ID or a file reference; no names).
    #[arg(long, value_name = "REF", help_heading = "The return")]
    pub foreign_reference: String,

    /// Gender as recorded.
    #[arg(long, value_parser = EnumParser::<Gender>::new(), help_heading = "The person")]
    pub gender: Option<Gender>,
    /// Age band.
    #[arg(long, value_name = "BAND", value_parser = EnumParser::<AgeBand>::new(), help_heading = "The person")]
    pub age_band: Option<AgeBand>,
    /// Form of exploitation.
    #[arg(long = "form", value_name = "FORM", value_parser = EnumParser::<ExploitationForm>::new(),
          help_heading = "The person")]
    pub form: Option<ExploitationForm>,
    /// Country of exploitation (ISO 3166-1 alpha-2).
    #[arg(long, value_name = "CC", help_heading = "The person")]
    pub exploitation_country: Option<String>,

    /// Full name.
    #[arg(long, help_heading = "Personal identifiers (sealed before storage)")]
    pub name: Option<String>,
    /// Date of birth, YYYY-MM-DD.
    #[arg(
        long,
        value_name = "DATE",
        help_heading = "Personal identifiers (sealed before storage)"
    )]
    pub dob: Option<String>,
    /// Passport, NUMBER:COUNTRY (repeatable).
    #[arg(long = "passport", value_name = "NUMBER:CC", value_parser = parse_number_country,
          help_heading = "Personal identifiers (sealed before storage)")]
    pub passports: Vec<NumberCountry>,
    /// National ID card, NUMBER:COUNTRY (repeatable).
    #[arg(long = "national-id", value_name = "NUMBER:CC", value_parser = parse_number_country,
          help_heading = "Personal identifiers (sealed before storage)")]
    pub national_ids: Vec<NumberCountry>,
    /// Any document, TYPE:NUMBER:COUNTRY, e.g. birth-certificate:123:KG (repeatable).
    #[arg(long = "document", value_name = "TYPE:NUMBER:CC", value_parser = parse_document,
          help_heading = "Personal identifiers (sealed before storage)")]
    pub documents: Vec<(DocumentType, NumberCountry)>,
    /// Phone number (E.164 where known).
    #[arg(long, help_heading = "Personal identifiers (sealed before storage)")]
    pub phone: Option<String>,
    /// Address.
    #[arg(long, help_heading = "Personal identifiers (sealed before storage)")]
    pub address: Option<String>,

    /// Client request ID.
    #[command(flatten)]
    pub request: RequestId,
}

/// `return consent`.
#[derive(Debug, Args)]
pub struct ConsentArgs {
    /// The return and version.
    #[command(flatten)]
    pub at: ReturnAt,
    /// The person agrees to return, having been told what it means (required by the service).
    #[arg(long = "informed")]
    pub informed_consent_to_return: bool,
    /// What the home country may receive: identity, contact, profile, needs, risk (repeatable, or
    /// comma-separated; nothing else crosses the border).
    #[arg(long = "share", value_name = "FIELDS", value_delimiter = ',',
          value_parser = EnumParser::<SharedField>::new())]
    pub shared_fields: Vec<SharedField>,
    /// The person also agrees to be referred for reintegration at home.
    #[arg(long = "reintegration")]
    pub consent_to_reintegration_referral: bool,
    /// The officer who took the consent (pseudonymous ID).
    #[arg(long, value_name = "OFFICER")]
    pub attested_by: String,
    /// The reference of the signed consent form.
    #[arg(long = "form-ref", value_name = "REF")]
    pub consent_form_ref: String,
    /// Client request ID.
    #[command(flatten)]
    pub request: RequestId,
}

/// `return assess`.
#[derive(Debug, Args)]
#[command(group(ArgGroup::new("verdict").args(["safe", "not_safe"]).required(true)))]
pub struct AssessArgs {
    /// The return and version.
    #[command(flatten)]
    pub at: ReturnAt,
    /// Safe to return.
    #[arg(long)]
    pub safe: bool,
    /// Not safe to return: the return halts (RISK_FOUND).
    #[arg(long)]
    pub not_safe: bool,
    /// Whether the family is involved in the exploitation.
    #[arg(long = "family", value_name = "INVOLVEMENT", value_parser = EnumParser::<FamilyInvolvement>::new())]
    pub family_involvement: FamilyInvolvement,
    /// Help needed on arrival: medical, shelter, escort, interpretation (repeatable, or comma-separated).
    #[arg(long = "need", value_name = "NEED", value_delimiter = ',',
          value_parser = EnumParser::<ArrivalNeed>::new())]
    pub needs: Vec<ArrivalNeed>,
    /// BCP 47 code of the language to interpret (with --need interpretation), e.g. ky.
    #[arg(long = "language", value_name = "BCP47")]
    pub interpretation_language: Option<String>,
    /// Client request ID.
    #[command(flatten)]
    pub request: RequestId,
}

/// `return request-document`.
#[derive(Debug, Args)]
pub struct AtArgs {
    /// The return and version.
    #[command(flatten)]
    pub at: ReturnAt,
    /// Client request ID.
    #[command(flatten)]
    pub request: RequestId,
}

/// `return document`.
#[derive(Debug, Args)]
#[command(group(ArgGroup::new("answer").args(["issued", "refused"]).required(true)))]
pub struct DocumentArgs {
    /// The return and version.
    #[command(flatten)]
    pub at: ReturnAt,
    /// The certificate of return was issued (give --number and --valid-until).
    #[arg(long, requires_all = ["document_number", "valid_until"])]
    pub issued: bool,
    /// The consulate refused it: the return halts (DOCUMENT_REFUSED).
    #[arg(long, conflicts_with_all = ["document_number", "valid_until"])]
    pub refused: bool,
    /// The certificate's number (sealed with the identifiers).
    #[arg(long = "number", value_name = "NUMBER")]
    pub document_number: Option<String>,
    /// Valid until (RFC 3339).
    #[arg(long, value_name = "RFC3339", value_parser = parse_timestamp)]
    pub valid_until: Option<prost_types::Timestamp>,
    /// Client request ID.
    #[command(flatten)]
    pub request: RequestId,
}

/// `return itinerary`.
#[derive(Debug, Args)]
#[command(group(ArgGroup::new("arrival_point").args(["airport", "border_post"]).required(true)))]
pub struct ItineraryArgs {
    /// The return and version.
    #[command(flatten)]
    pub at: ReturnAt,
    /// Departure (RFC 3339).
    #[arg(long = "departure", value_name = "RFC3339", value_parser = parse_timestamp)]
    pub departure_at: prost_types::Timestamp,
    /// Arrival (RFC 3339).
    #[arg(long = "arrival", value_name = "RFC3339", value_parser = parse_timestamp)]
    pub arrival_at: prost_types::Timestamp,
    /// Carrier and flight or route, e.g. "KC 210".
    #[arg(long, value_name = "TEXT")]
    pub carrier: String,
    /// Arrival airport, IATA code (FRU, OSS).
    #[arg(long, value_name = "IATA")]
    pub airport: Option<String>,
    /// Arrival border post (its code).
    #[arg(long, value_name = "CODE")]
    pub border_post: Option<String>,
    /// Client request ID.
    #[command(flatten)]
    pub request: RequestId,
}

/// `return escort`.
#[derive(Debug, Args)]
pub struct EscortArgs {
    /// The return and version.
    #[command(flatten)]
    pub at: ReturnAt,
    /// The escort's pseudonymous officer ID.
    #[arg(long = "officer", value_name = "OFFICER")]
    pub escort_officer: String,
    /// The escort's agency, e.g. ru-iom.
    #[arg(long = "agency", value_name = "AGENCY")]
    pub escort_agency: String,
    /// Client request ID.
    #[command(flatten)]
    pub request: RequestId,
}

/// `return depart`, `return arrive`.
#[derive(Debug, Args)]
pub struct TimeArgs {
    /// The return and version.
    #[command(flatten)]
    pub at: ReturnAt,
    /// When (RFC 3339) [default: now].
    #[arg(long = "at", value_name = "RFC3339", value_parser = parse_timestamp)]
    pub when: Option<prost_types::Timestamp>,
    /// Client request ID.
    #[command(flatten)]
    pub request: RequestId,
}

/// `return handover`.
#[derive(Debug, Args)]
pub struct HandoverArgs {
    /// The return and version.
    #[command(flatten)]
    pub at: ReturnAt,
    /// The home country's agency that received the person, e.g. kg-iom.
    #[arg(long, value_name = "AGENCY")]
    pub received_by: String,
    /// When (RFC 3339) [default: now].
    #[arg(long = "at", value_name = "RFC3339", value_parser = parse_timestamp)]
    pub when: Option<prost_types::Timestamp>,
    /// Client request ID.
    #[command(flatten)]
    pub request: RequestId,
}

/// `return halt`.
#[derive(Debug, Args)]
pub struct HaltArgs {
    /// The return and version.
    #[command(flatten)]
    pub at: ReturnAt,
    /// Why the return halts.
    #[arg(long, value_name = "REASON", value_parser = EnumParser::<HaltReason>::new())]
    pub reason: HaltReason,
    /// Client request ID.
    #[command(flatten)]
    pub request: RequestId,
}

/// `return show`.
#[derive(Debug, Args)]
pub struct ShowArgs {
    /// The return ID.
    #[arg(value_name = "RETURN_ID")]
    pub return_id: String,
}

/// `return list`.
#[derive(Debug, Args)]
pub struct ReturnListArgs {
    /// Only returns in this status.
    #[arg(long, value_parser = EnumParser::<ReturnStatus>::new())]
    pub status: Option<ReturnStatus>,
    /// Only outgoing returns (opened here) or incoming ones (announced to this country).
    #[arg(long, value_parser = EnumParser::<Direction>::new())]
    pub direction: Option<Direction>,
    /// Returns per page (server default 50, at most 500).
    #[arg(long, value_name = "N")]
    pub page_size: Option<i32>,
    /// Continue from this token of a previous page (same filters).
    #[arg(long, value_name = "TOKEN")]
    pub page_token: Option<String>,
    /// Follow the page tokens to the last page.
    #[arg(long)]
    pub all: bool,
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;
    use crate::cli::{Cli, Command};

    fn parse(args: &[&str]) -> Result<ReturnCommand, clap::Error> {
        let mut argv = vec!["nrmctl", "return"];
        argv.extend_from_slice(args);
        Cli::try_parse_from(argv).map(|cli| match cli.command {
            Command::Return(command) => command,
            other => panic!("not a return command: {other:?}"),
        })
    }

    #[test]
    fn an_opening_reads_the_person_and_the_return() {
        let ReturnCommand::Open(open) = parse(&[
            "open",
            "--citizenship",
            "KG",
            "--consulate",
            "kg-consulate-moscow",
            "--identified-by",
            "ru-mvd",
            "--foreign-reference",
            "RU-77-123",
            "--gender",
            "female",
            "--age-band",
            "18-24",
            "--form",
            "labour",
            "--passport",
            "AC123:KG",
        ])
        .expect("valid command line") else {
            panic!("not an opening");
        };
        assert_eq!(open.citizenship, "KG");
        assert_eq!(open.form, Some(ExploitationForm::Labour));
        assert_eq!(open.age_band, Some(AgeBand::AgeBand1824));
        assert_eq!(open.passports[0].number, "AC123");
        assert!(
            parse(&["open", "--citizenship", "KG"]).is_err(),
            "the return's fields are required"
        );
    }

    #[test]
    fn a_consent_names_the_shared_fields() {
        let ReturnCommand::Consent(consent) = parse(&[
            "consent",
            "r-1",
            "--version",
            "1",
            "--informed",
            "--share",
            "profile,needs",
            "--share",
            "risk",
            "--reintegration",
            "--attested-by",
            "officer-3",
            "--form-ref",
            "F-9",
        ])
        .expect("valid command line") else {
            panic!("not a consent");
        };
        assert_eq!((consent.at.return_id.as_str(), consent.at.expected_version), ("r-1", 1));
        assert_eq!(
            consent.shared_fields,
            [SharedField::Profile, SharedField::Needs, SharedField::Risk]
        );
        assert!(consent.informed_consent_to_return && consent.consent_to_reintegration_referral);
        let err = parse(&["consent", "r-1", "--version", "1", "--share", "everything"]).expect_err("unknown field");
        assert!(
            err.to_string().contains("identity, contact, profile, needs, risk"),
            "{err}"
        );
    }

    #[test]
    fn an_assessment_is_safe_or_not_safe() {
        let ReturnCommand::Assess(assess) = parse(&[
            "assess",
            "r-1",
            "--version",
            "2",
            "--safe",
            "--family",
            "none",
            "--need",
            "shelter,interpretation",
            "--language",
            "ky",
        ])
        .expect("valid command line") else {
            panic!("not an assessment");
        };
        assert!(assess.safe && !assess.not_safe);
        assert_eq!(assess.needs, [ArrivalNeed::Shelter, ArrivalNeed::Interpretation]);
        assert!(
            parse(&["assess", "r-1", "--version", "2", "--family", "none"]).is_err(),
            "no verdict"
        );
        assert!(
            parse(&[
                "assess",
                "r-1",
                "--version",
                "2",
                "--safe",
                "--not-safe",
                "--family",
                "none"
            ])
            .is_err(),
            "two verdicts"
        );
    }

    #[test]
    fn a_document_is_issued_with_a_number_or_refused() {
        assert!(
            parse(&[
                "document",
                "r-1",
                "--version",
                "4",
                "--issued",
                "--number",
                "CR-1",
                "--valid-until",
                "2027-01-31T00:00:00Z"
            ])
            .is_ok()
        );
        assert!(
            parse(&["document", "r-1", "--version", "4", "--issued", "--number", "CR-1"]).is_err(),
            "no validity"
        );
        assert!(parse(&["document", "r-1", "--version", "4", "--refused"]).is_ok());
        assert!(
            parse(&["document", "r-1", "--version", "4", "--issued"]).is_err(),
            "no number"
        );
        assert!(parse(&["document", "r-1", "--version", "4"]).is_err(), "no answer");
        assert!(
            parse(&["document", "r-1", "--version", "4", "--refused", "--number", "CR-1"]).is_err(),
            "a refused document has no number"
        );
    }

    #[test]
    fn an_itinerary_arrives_at_an_airport_or_a_border_post() {
        let ok = |point: &[&str]| {
            let mut args = vec![
                "itinerary",
                "r-1",
                "--version",
                "5",
                "--departure",
                "2026-12-10T08:00:00Z",
                "--arrival",
                "2026-12-10T13:30:00+06:00",
                "--carrier",
                "KC 210",
            ];
            args.extend_from_slice(point);
            parse(&args)
        };
        let ReturnCommand::Itinerary(itinerary) = ok(&["--airport", "FRU"]).expect("valid") else {
            panic!("not an itinerary");
        };
        assert_eq!(itinerary.arrival_at.seconds, 1_796_887_800);
        assert!(ok(&["--border-post", "KG-TORUGART"]).is_ok());
        assert!(ok(&[]).is_err(), "no arrival point");
        assert!(
            ok(&["--airport", "FRU", "--border-post", "X"]).is_err(),
            "two arrival points"
        );
    }

    #[test]
    fn halts_and_lists_take_coded_values() {
        let ReturnCommand::Halt(halt) =
            parse(&["halt", "r-1", "--version", "3", "--reason", "consent-withdrawn"]).expect("valid")
        else {
            panic!("not a halt");
        };
        assert_eq!(halt.reason, HaltReason::ConsentWithdrawn);
        let ReturnCommand::List(list) =
            parse(&["list", "--direction", "incoming", "--status", "itinerary-booked"]).expect("valid")
        else {
            panic!("not a list");
        };
        assert_eq!(list.direction, Some(Direction::Incoming));
        assert_eq!(list.status, Some(ReturnStatus::ItineraryBooked));
        assert!(
            matches!(parse(&["get", "r-1"]), Ok(ReturnCommand::Show(_))),
            "get is show"
        );
    }
}
