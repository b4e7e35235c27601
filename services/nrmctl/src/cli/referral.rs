//! The clap types of the referral service's commands: `consent …`,
//! `referral …` and `plan …`.

use clap::{Args, Subcommand};
use nrm_proto::referral::v1::{
    ConsentGiver, DataCategory, DeclineReason, GoalKind, ReferralOutcome, ReferralStatus, ServiceKind, Urgency,
};
use nrm_proto::shelter::v1::BedCategory;

use super::{RequestId, parse_timestamp};
use crate::enums::EnumParser;

/// Consents to share with an agency.
#[derive(Debug, Subcommand)]
pub enum ConsentCommand {
    /// Record a consent to share with one agency for named purposes (prints the consent ID).
    Record(RecordConsentArgs),
    /// Withdraw a consent: nothing more is shared, open referrals under it are cancelled.
    Withdraw(WithdrawConsentArgs),
    /// The consents of a person (for the agencies holding the case and the national coordinator).
    List(ListConsentsArgs),
}

/// `consent record`.
#[derive(Debug, Args)]
pub struct RecordConsentArgs {
    /// The person who consents (or for whom consent is given).
    #[arg(long = "person", value_name = "PERSON_ID")]
    pub person_id: String,
    /// The identification case the consent was taken in.
    #[arg(long = "case", value_name = "CASE_ID")]
    pub case_id: String,
    /// Who gave the consent (a child's own consent is refused: identification
    /// says whether the person is a child). You, the caller, attest it.
    #[arg(long, value_name = "GIVER", value_parser = EnumParser::<ConsentGiver>::new())]
    pub given_by: ConsentGiver,
    /// With `--given-by guardian`: the guardian's coded reference (never a name).
    #[arg(long, value_name = "REF")]
    pub guardian_ref: Option<String>,
    /// With `--given-by best-interests-decision`: the decision's reference.
    #[arg(long = "best-interests-decision", value_name = "REF", requires = "decided_by")]
    pub best_interests_decision: Option<String>,
    /// With `--best-interests-decision`: who took it (a coded officer or authority reference).
    #[arg(long, value_name = "REF", requires = "best_interests_decision")]
    pub decided_by: Option<String>,
    /// The agency the consent lets the data go to, e.g. kg-msd.
    #[arg(long, value_name = "AGENCY")]
    pub recipient: String,
    /// Purpose covered (repeatable, or comma-separated).
    #[arg(long = "purpose", value_name = "SERVICE", required = true, value_delimiter = ',',
          value_parser = EnumParser::<ServiceKind>::new())]
    pub purposes: Vec<ServiceKind>,
    /// Identifiers the recipient may read (repeatable, or comma-separated) [default: none].
    #[arg(long = "data", value_name = "CATEGORY", value_delimiter = ',',
          value_parser = EnumParser::<DataCategory>::new())]
    pub data_categories: Vec<DataCategory>,
    /// When the consent lapses, RFC 3339 [default: never].
    #[arg(long, value_name = "RFC3339", value_parser = parse_timestamp)]
    pub expires: Option<prost_types::Timestamp>,
    /// Client request ID.
    #[command(flatten)]
    pub request: RequestId,
}

/// `consent list`.
#[derive(Debug, Args)]
pub struct ListConsentsArgs {
    /// The person.
    #[arg(long = "person", value_name = "PERSON_ID")]
    pub person_id: String,
}

/// `consent withdraw`.
#[derive(Debug, Args)]
pub struct WithdrawConsentArgs {
    /// The consent ID.
    #[arg(value_name = "CONSENT_ID")]
    pub consent_id: String,
    /// Client request ID.
    #[command(flatten)]
    pub request: RequestId,
}

/// Referrals to service providers.
#[derive(Debug, Subcommand)]
pub enum ReferralCommand {
    /// Refer a person to an agency under a consent (prints the referral ID and answer deadline).
    Create(Box<CreateReferralArgs>),
    /// Accept a referral addressed to your agency (a shelter bed is then held, if one was asked for).
    Accept(AcceptArgs),
    /// Decline a referral addressed to your agency.
    Decline(DeclineArgs),
    /// Send a declined referral to another agency.
    Redirect(RedirectArgs),
    /// Record a service delivered under an accepted referral.
    Deliver(DeliverArgs),
    /// Close a referral with its outcome.
    Close(CloseArgs),
    /// Show one referral.
    Get(ReferralGetArgs),
    /// List the referrals addressed to your agency.
    Inbox(InboxArgs),
}

/// `referral create`.
#[derive(Debug, Args)]
pub struct CreateReferralArgs {
    /// The person referred.
    #[arg(long = "person", value_name = "PERSON_ID")]
    pub person_id: String,
    /// The person's identification case.
    #[arg(long = "case", value_name = "CASE_ID")]
    pub case_id: String,
    /// The receiving agency, e.g. kg-msd.
    #[arg(long = "to", value_name = "AGENCY")]
    pub receiving_agency: String,
    /// Service asked for (repeatable, or comma-separated).
    #[arg(long = "service", value_name = "SERVICE", required = true, value_delimiter = ',',
          value_parser = EnumParser::<ServiceKind>::new())]
    pub services: Vec<ServiceKind>,
    /// How soon the receiving agency must answer (urgent: 24 h, normal: 72 h by default).
    #[arg(long, value_parser = EnumParser::<Urgency>::new())]
    pub urgency: Urgency,
    /// The consent covering the receiving agency and every service.
    #[arg(long = "consent", value_name = "CONSENT_ID")]
    pub consent_id: String,
    /// Bed category needed.
    #[arg(long, value_name = "CATEGORY", requires = "shelter_region", value_parser = EnumParser::<BedCategory>::new(),
          help_heading = "Shelter bed (required with --service shelter)")]
    pub shelter_category: Option<BedCategory>,
    /// Region of the bed (ISO 3166-2, e.g. KG-O).
    #[arg(
        long,
        value_name = "REGION",
        requires = "shelter_category",
        help_heading = "Shelter bed (required with --service shelter)"
    )]
    pub shelter_region: Option<String>,
    /// Client request ID.
    #[command(flatten)]
    pub request: RequestId,
}

/// The referral and the version the caller saw.
#[derive(Debug, Args)]
pub struct ReferralAt {
    /// The referral ID.
    #[arg(value_name = "REFERRAL_ID")]
    pub referral_id: String,
    /// The referral version you saw; the call fails with ABORTED when the referral moved on.
    #[arg(long = "version", value_name = "N")]
    pub expected_version: u64,
}

/// `referral accept`.
#[derive(Debug, Args)]
pub struct AcceptArgs {
    /// The referral and version.
    #[command(flatten)]
    pub at: ReferralAt,
    /// Client request ID.
    #[command(flatten)]
    pub request: RequestId,
}

/// `referral decline`.
#[derive(Debug, Args)]
pub struct DeclineArgs {
    /// The referral and version.
    #[command(flatten)]
    pub at: ReferralAt,
    /// Why the referral is declined.
    #[arg(long, value_parser = EnumParser::<DeclineReason>::new())]
    pub reason: DeclineReason,
    /// Client request ID.
    #[command(flatten)]
    pub request: RequestId,
}

/// `referral redirect`.
#[derive(Debug, Args)]
pub struct RedirectArgs {
    /// The referral and version.
    #[command(flatten)]
    pub at: ReferralAt,
    /// The new receiving agency.
    #[arg(long = "to", value_name = "AGENCY")]
    pub receiving_agency: String,
    /// The consent covering the new agency and every service.
    #[arg(long = "consent", value_name = "CONSENT_ID")]
    pub consent_id: String,
    /// Client request ID.
    #[command(flatten)]
    pub request: RequestId,
}

/// `referral deliver`.
#[derive(Debug, Args)]
pub struct DeliverArgs {
    /// The referral and version.
    #[command(flatten)]
    pub at: ReferralAt,
    /// The service delivered.
    #[arg(long, value_name = "SERVICE", value_parser = EnumParser::<ServiceKind>::new())]
    pub kind: ServiceKind,
    /// Provider code (an organisation, never a person's name).
    #[arg(long, value_name = "CODE")]
    pub provider: String,
    /// When the service was delivered, RFC 3339 [default: now].
    #[arg(long = "at", value_name = "RFC3339", value_parser = parse_timestamp)]
    pub at_time: Option<prost_types::Timestamp>,
    /// Client request ID.
    #[command(flatten)]
    pub request: RequestId,
}

/// `referral close`.
#[derive(Debug, Args)]
pub struct CloseArgs {
    /// The referral and version.
    #[command(flatten)]
    pub at: ReferralAt,
    /// How the referral ended.
    #[arg(long, value_parser = EnumParser::<ReferralOutcome>::new())]
    pub outcome: ReferralOutcome,
    /// Client request ID.
    #[command(flatten)]
    pub request: RequestId,
}

/// `referral get`.
#[derive(Debug, Args)]
pub struct ReferralGetArgs {
    /// The referral ID.
    #[arg(value_name = "REFERRAL_ID")]
    pub referral_id: String,
}

/// `referral inbox`.
#[derive(Debug, Args)]
pub struct InboxArgs {
    /// Only referrals in this status.
    #[arg(long, value_parser = EnumParser::<ReferralStatus>::new())]
    pub status: Option<ReferralStatus>,
    /// Only referrals of this urgency.
    #[arg(long, value_parser = EnumParser::<Urgency>::new())]
    pub urgency: Option<Urgency>,
    /// Only referrals not answered in time.
    #[arg(long)]
    pub overdue: bool,
    /// Referrals per page.
    #[arg(long, value_name = "N")]
    pub page_size: Option<i32>,
    /// Continue from this token of a previous page (same filters).
    #[arg(long, value_name = "TOKEN")]
    pub page_token: Option<String>,
    /// Follow the page tokens to the last page.
    #[arg(long)]
    pub all: bool,
}

/// The individual rehabilitation plan.
#[derive(Debug, Subcommand)]
pub enum PlanCommand {
    /// Add a goal to a person's plan (prints the goal ID).
    AddGoal(AddGoalArgs),
    /// Record a follow-up on a goal.
    FollowUp(FollowUpArgs),
    /// Mark a goal as met.
    GoalMet(GoalMetArgs),
    /// Show a person's plan.
    Get(PlanGetArgs),
}

/// `plan add-goal`.
#[derive(Debug, Args)]
pub struct AddGoalArgs {
    /// The person whose plan it is.
    #[arg(long = "person", value_name = "PERSON_ID")]
    pub person_id: String,
    /// What the goal is about.
    #[arg(long, value_parser = EnumParser::<GoalKind>::new())]
    pub kind: GoalKind,
    /// When the goal should be met, RFC 3339.
    #[arg(long, value_name = "RFC3339", value_parser = parse_timestamp)]
    pub due: Option<prost_types::Timestamp>,
    /// Client request ID.
    #[command(flatten)]
    pub request: RequestId,
}

/// `plan follow-up`.
#[derive(Debug, Args)]
pub struct FollowUpArgs {
    /// The person whose plan it is.
    #[arg(long = "person", value_name = "PERSON_ID")]
    pub person_id: String,
    /// The goal followed up.
    #[arg(long = "goal", value_name = "GOAL_ID")]
    pub goal_id: String,
    /// A coded status such as ON_TRACK or AT_RISK (on-track works too); never free text about the person.
    #[arg(long, value_name = "CODE", value_parser = parse_status_code)]
    pub status: String,
    /// When the follow-up took place, RFC 3339 [default: now].
    #[arg(long, value_name = "RFC3339", value_parser = parse_timestamp)]
    pub at: Option<prost_types::Timestamp>,
    /// Client request ID.
    #[command(flatten)]
    pub request: RequestId,
}

/// `plan goal-met`.
#[derive(Debug, Args)]
pub struct GoalMetArgs {
    /// The person whose plan it is.
    #[arg(long = "person", value_name = "PERSON_ID")]
    pub person_id: String,
    /// The goal met.
    #[arg(long = "goal", value_name = "GOAL_ID")]
    pub goal_id: String,
    /// Client request ID.
    #[command(flatten)]
    pub request: RequestId,
}

/// `plan get`.
#[derive(Debug, Args)]
pub struct PlanGetArgs {
    /// The person whose plan it is.
    #[arg(value_name = "PERSON_ID")]
    pub person_id: String,
}

/// Parses a follow-up status code: 2-32 capital letters or underscores
/// (`ON_TRACK`); lower case and `-` are accepted and converted.
fn parse_status_code(text: &str) -> Result<String, String> {
    let code = text.trim().to_ascii_uppercase().replace('-', "_");
    if (2..=32).contains(&code.len()) && code.chars().all(|c| c.is_ascii_uppercase() || c == '_') {
        Ok(code)
    } else {
        Err(format!(
            "'{text}' is not a status code: 2-32 letters or underscores, such as ON_TRACK"
        ))
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;
    use crate::cli::{Cli, Command};

    fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
        Cli::try_parse_from(std::iter::once("nrmctl").chain(args.iter().copied()))
    }

    #[test]
    fn a_consent_reads_repeated_and_comma_separated_purposes_and_data() {
        let cli = parse(&[
            "consent",
            "record",
            "--person",
            "p-1",
            "--case",
            "c-1",
            "--given-by",
            "best-interests-decision",
            "--best-interests-decision",
            "BID-2026-7",
            "--decided-by",
            "kg-gpo:prosecutor-3",
            "--recipient",
            "kg-msd",
            "--purpose",
            "shelter,psychological",
            "--purpose",
            "legal",
            "--data",
            "name,date-of-birth",
            "--expires",
            "2030-01-01T00:00:00Z",
        ])
        .expect("valid command line");
        let Command::Consent(ConsentCommand::Record(consent)) = cli.command else {
            panic!("not a consent");
        };
        assert_eq!(consent.given_by, ConsentGiver::BestInterestsDecision);
        assert_eq!(consent.best_interests_decision.as_deref(), Some("BID-2026-7"));
        assert_eq!(consent.decided_by.as_deref(), Some("kg-gpo:prosecutor-3"));
        assert_eq!(consent.guardian_ref, None);
        assert_eq!(
            consent.purposes,
            [ServiceKind::Shelter, ServiceKind::Psychological, ServiceKind::Legal]
        );
        assert_eq!(consent.data_categories, [DataCategory::Name, DataCategory::DateOfBirth]);
        assert_eq!(consent.expires.map(|t| t.seconds), Some(1_893_456_000));
        assert!(
            parse(&[
                "consent",
                "record",
                "--person",
                "p",
                "--case",
                "c",
                "--given-by",
                "person",
                "--recipient",
                "a"
            ])
            .is_err(),
            "a consent names at least one purpose"
        );
        assert!(
            parse(&[
                "consent",
                "record",
                "--person",
                "p",
                "--case",
                "c",
                "--given-by",
                "best-interests-decision",
                "--best-interests-decision",
                "BID-1",
                "--recipient",
                "a",
                "--purpose",
                "legal"
            ])
            .is_err(),
            "a best-interests decision names who took it"
        );
        assert!(parse(&["consent", "list", "--person", "p-1"]).is_ok());
    }

    #[test]
    fn a_shelter_need_takes_both_category_and_region() {
        let base = [
            "referral",
            "create",
            "--person",
            "p-1",
            "--case",
            "c-1",
            "--to",
            "kg-msd",
            "--service",
            "shelter,psychological",
            "--urgency",
            "urgent",
            "--consent",
            "k-1",
        ];
        let with = |extra: &[&'static str]| parse(&[&base[..], extra].concat());
        let cli = with(&[
            "--shelter-category",
            "mothers-with-children",
            "--shelter-region",
            "KG-O",
        ])
        .expect("valid command line");
        let Command::Referral(ReferralCommand::Create(create)) = cli.command else {
            panic!("not a referral");
        };
        assert_eq!(create.urgency, Urgency::Urgent);
        assert_eq!(create.shelter_category, Some(BedCategory::MothersWithChildren));
        assert_eq!(create.shelter_region.as_deref(), Some("KG-O"));
        assert!(with(&["--shelter-category", "women"]).is_err(), "no region");
        assert!(with(&["--shelter-region", "KG-O"]).is_err(), "no category");
    }

    #[test]
    fn commands_on_a_referral_take_its_id_and_version() {
        let cli = parse(&[
            "referral",
            "decline",
            "r-1",
            "--version",
            "2",
            "--reason",
            "no-capacity",
        ])
        .expect("valid command line");
        let Command::Referral(ReferralCommand::Decline(decline)) = cli.command else {
            panic!("not a decline");
        };
        assert_eq!(
            (decline.at.referral_id.as_str(), decline.at.expected_version),
            ("r-1", 2)
        );
        assert_eq!(decline.reason, DeclineReason::NoCapacity);
        assert!(
            parse(&["referral", "accept", "r-1"]).is_err(),
            "the version is required"
        );
    }

    #[test]
    fn status_codes_are_upper_snake_case() {
        assert_eq!(parse_status_code("ON_TRACK"), Ok("ON_TRACK".to_owned()));
        assert_eq!(parse_status_code("at-risk"), Ok("AT_RISK".to_owned()));
        for bad in ["", "A", "on track", "ON-TRACK-2", &"X".repeat(33)] {
            assert!(parse_status_code(bad).is_err(), "{bad:?} should be refused");
        }
    }
}
