//! The command line: clap types only. Enum-valued options take the value
//! name without its prefix, in kebab-case (`--form forced-begging`).

use clap::{ArgGroup, Args, Parser, Subcommand, ValueEnum};
use nrm_kernel::auth::Role;
use nrm_proto::common::v1::{AgeBand, DocumentType, Gender};
use nrm_proto::identification::v1::{
    CaseStatus, Decision, ErasureReason, ExploitationForm, Indicator, MeansOfControl, NotIdentifiedReason, ReadPurpose,
    RecruiterRelationship, RecruitmentMethod, ReviewReason,
};

use crate::enums::{self, EnumParser};
use crate::token::{RoleParser, parse_ttl};

pub mod audit;
pub mod casepath;
pub mod ops;
pub mod referral;
pub mod repatriation;
pub mod shelter;
pub mod xborder;

use audit::AuditArgs;
use ops::OpsCommand;
use referral::{ConsentCommand, PlanCommand, ReferralCommand};
use repatriation::ReturnCommand;
use shelter::ShelterCommand;

/// Command-line client of Köpür, the national referral mechanism.
///
/// Calls the services over gRPC, runs the development token issuer and
/// watches the events on NATS JetStream. When no --token is given and the
/// development issuer's private key is at hand (NRM_ISSUER_KEY, default
/// .data/issuer/signing-key.jwk), nrmctl signs a five-minute token for the
/// --as-agency/--as-role/--as-officer caller itself.
#[derive(Debug, Parser)]
#[command(name = "nrmctl", version)]
pub struct Cli {
    /// Options of every command.
    #[command(flatten)]
    pub global: Global,
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// Options of every command.
#[derive(Debug, Args)]
pub struct Global {
    /// gRPC endpoint of the identification service (case, person).
    #[arg(
        long,
        global = true,
        help_heading = "Global options",
        env = "NRM_ENDPOINT",
        default_value = "http://127.0.0.1:50051"
    )]
    pub endpoint: String,

    /// gRPC endpoint of the referral service (consent, referral, plan).
    #[arg(
        long,
        global = true,
        help_heading = "Global options",
        env = "NRM_REFERRAL_ENDPOINT",
        default_value = "http://127.0.0.1:50052"
    )]
    pub referral_endpoint: String,

    /// gRPC endpoint of the shelter service (shelter).
    #[arg(
        long,
        global = true,
        help_heading = "Global options",
        env = "NRM_SHELTER_ENDPOINT",
        default_value = "http://127.0.0.1:50053"
    )]
    pub shelter_endpoint: String,

    /// gRPC endpoint of the repatriation service (return).
    #[arg(
        long,
        global = true,
        help_heading = "Global options",
        env = "NRM_REPATRIATION_ENDPOINT",
        default_value = "http://127.0.0.1:50054"
    )]
    pub repatriation_endpoint: String,

    /// gRPC endpoint of casepath (path, inbox, paths, stats).
    #[arg(
        long,
        global = true,
        help_heading = "Global options",
        env = "NRM_CASEPATH_ENDPOINT",
        default_value = "http://127.0.0.1:50055"
    )]
    pub casepath_endpoint: String,

    /// Bearer token (JWT) sent with every call.
    #[arg(
        long,
        global = true,
        help_heading = "Global options",
        env = "NRM_TOKEN",
        hide_env_values = true
    )]
    pub token: Option<String>,

    /// Agency of the self-minted token.
    #[arg(
        long,
        global = true,
        help_heading = "Global options",
        env = "NRM_AGENCY",
        default_value = "kg-mvd"
    )]
    pub as_agency: String,

    /// Role of the self-minted token.
    #[arg(long, global = true, help_heading = "Global options", env = "NRM_ROLE", default_value = "police", value_parser = RoleParser)]
    pub as_role: Role,

    /// Officer (pseudonymous ID) of the self-minted token.
    #[arg(
        long,
        global = true,
        help_heading = "Global options",
        env = "NRM_OFFICER",
        default_value = "officer-1"
    )]
    pub as_officer: String,

    /// Output: a short summary, or the response as proto3 JSON.
    #[arg(long, global = true, help_heading = "Global options", env = "NRM_OUTPUT", value_enum, default_value_t = Output::Text)]
    pub output: Output,
}

/// How responses are printed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Output {
    /// A compact human summary.
    Text,
    /// The response as proto3 JSON (field names as in the .proto files).
    Json,
}

/// The commands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Bearer tokens.
    #[command(subcommand)]
    Token(TokenCommand),
    /// The development token issuer: its key pairs and public key set.
    #[command(subcommand)]
    Issuer(IssuerCommand),
    /// Identification cases.
    #[command(subcommand)]
    Case(CaseCommand),
    /// A person's identifiers, as far as a consent covers them.
    #[command(subcommand)]
    Person(PersonCommand),
    /// Consents to share with an agency.
    #[command(subcommand)]
    Consent(ConsentCommand),
    /// Referrals to service providers.
    #[command(subcommand)]
    Referral(ReferralCommand),
    /// The individual rehabilitation plan.
    #[command(subcommand)]
    Plan(PlanCommand),
    /// Shelters, beds and holds.
    #[command(subcommand)]
    Shelter(ShelterCommand),
    /// Returns home across a border (repatriation).
    #[command(subcommand)]
    Return(ReturnCommand),
    /// casepath: paths, inboxes, statistics.
    #[command(flatten)]
    Casepath(casepath::CasepathCommand),
    /// Events on NATS JetStream.
    #[command(subcommand)]
    Events(EventsCommand),
    /// Operations (role operator): parked messages and timers, refilling a stream.
    #[command(subcommand)]
    Ops(OpsCommand),
    /// The audit trail (role auditor): chains verified, who read a person's
    /// records (`audit --person ID` is `audit person ID`).
    Audit(AuditArgs),
    /// The permission matrix: every RPC, every role, on which records.
    Permissions(PermissionsArgs),
    /// Keys for crossing the border: a country's sealing key pair, TLS for a link.
    #[command(subcommand)]
    Xborder(xborder::XborderCommand),
}

/// `permissions`.
#[derive(Debug, Args)]
pub struct PermissionsArgs {
    /// Only what this role may do, one RPC per line.
    #[arg(long, value_parser = crate::token::parse_role)]
    pub role: Option<nrm_kernel::auth::Role>,
}

/// Bearer tokens.
#[derive(Debug, Subcommand)]
pub enum TokenCommand {
    /// Print a token signed with the development issuer's private key.
    Mint(MintArgs),
}

/// The development token issuer. Its folder holds the private key
/// (signing-key.jwk, mode 600), which no service reads, and the public key
/// set (jwks.json) that the services verify with (NRM_AUTH__JWKS=file://…).
#[derive(Debug, Subcommand)]
pub enum IssuerCommand {
    /// Create the issuer folder with a fresh Ed25519 key pair.
    Init(IssuerDir),
    /// Sign with a fresh key from now on; the old public key stays in the set.
    Rotate(IssuerDir),
    /// Remove an old public key from the set: its tokens no longer verify.
    Retire(RetireArgs),
    /// List the key IDs in the set, the signing key first.
    Keys(IssuerDir),
}

/// The issuer folder.
#[derive(Debug, Args)]
pub struct IssuerDir {
    /// The issuer folder.
    #[arg(long, env = "NRM_ISSUER_DIR", default_value = ".data/issuer")]
    pub dir: std::path::PathBuf,
}

/// `issuer retire`.
#[derive(Debug, Args)]
pub struct RetireArgs {
    /// The issuer folder.
    #[command(flatten)]
    pub dir: IssuerDir,
    /// The key ID to remove.
    #[arg(long)]
    pub kid: String,
}

/// `token mint`.
#[derive(Debug, Args)]
pub struct MintArgs {
    /// Agency code, e.g. kg-mvd.
    #[arg(long)]
    pub agency: String,
    /// Role of the token.
    #[arg(long, value_parser = RoleParser)]
    pub role: Role,
    /// Pseudonymous officer ID (never a name).
    #[arg(long)]
    pub officer: String,
    /// Lifetime: 90s, 30m, 1h, 1h30m (the services refuse tokens living
    /// longer than NRM_AUTH__MAX_TOKEN_LIFETIME_SECONDS, default 1h).
    #[arg(long, default_value = "1h", value_parser = parse_ttl)]
    pub ttl: i64,
    /// The issuer's private key.
    #[arg(long, env = "NRM_ISSUER_KEY", default_value = crate::token::DEFAULT_ISSUER_KEY)]
    pub key: std::path::PathBuf,
}

/// Identification cases.
#[derive(Debug, Subcommand)]
pub enum CaseCommand {
    /// Report a presumed victim (prints the request ID to retry with).
    Report(Box<ReportArgs>),
    /// File an anonymous notification: an adult who does not consent to
    /// being referred, counted in the statistics only (coded fields, no
    /// identifiers; never a case, never in an inbox). Prints the
    /// notification ID and the request ID to retry with.
    Notify(NotifyArgs),
    /// Record the screening against indicators (reported -> presumed).
    Screen(ScreenArgs),
    /// Record the formal identification decision.
    Decide(DecideArgs),
    /// Reopen a decision for appeal or review.
    Review(ReviewArgs),
    /// Erase the person's identifiers (crypto-shredding).
    Erase(EraseArgs),
    /// Show one case.
    Get(GetArgs),
    /// List cases.
    List(ListArgs),
}

/// The client request ID of a command.
#[derive(Debug, Args)]
pub struct RequestId {
    /// Client request ID; reuse one to retry safely [default: a fresh UUIDv7].
    #[arg(long, value_name = "ID")]
    pub request_id: Option<String>,
}

/// The case and the version the caller saw.
#[derive(Debug, Args)]
pub struct CaseAt {
    /// The case ID.
    #[arg(value_name = "CASE_ID")]
    pub case_id: String,
    /// The case version you saw; the call fails with ABORTED when the case moved on.
    #[arg(long = "version", value_name = "N")]
    pub expected_version: u64,
}

/// `case report`.
#[derive(Debug, Args)]
pub struct ReportArgs {
    /// When the person was found, RFC 3339 [default: now].
    #[arg(long, value_parser = parse_timestamp, value_name = "RFC3339", help_heading = "Where and when")]
    pub found_at: Option<prost_types::Timestamp>,
    /// Country where the person was found (ISO 3166-1 alpha-2).
    #[arg(long, value_name = "CC", help_heading = "Where and when")]
    pub found_country: Option<String>,
    /// Region or city code where the person was found (a code, not an address).
    #[arg(long, value_name = "CODE", help_heading = "Where and when")]
    pub found_region: Option<String>,
    /// Country of exploitation (ISO 3166-1 alpha-2).
    #[arg(long, value_name = "CC", help_heading = "Where and when")]
    pub exploitation_country: Option<String>,

    /// Form of exploitation (repeatable, or comma-separated).
    #[arg(long = "form", value_name = "FORM", value_delimiter = ',',
          value_parser = EnumParser::<ExploitationForm>::new(), help_heading = "Exploitation")]
    pub forms: Vec<ExploitationForm>,
    /// Means of control (repeatable, or comma-separated).
    #[arg(long = "control", value_name = "MEANS", value_delimiter = ',',
          value_parser = EnumParser::<MeansOfControl>::new(), help_heading = "Exploitation")]
    pub controls: Vec<MeansOfControl>,
    /// How the person was recruited.
    #[arg(long, value_name = "METHOD", value_parser = EnumParser::<RecruitmentMethod>::new(),
          help_heading = "Exploitation")]
    pub recruitment: Option<RecruitmentMethod>,
    /// The recruiter's relationship to the person.
    #[arg(long, value_name = "RELATIONSHIP", value_parser = EnumParser::<RecruiterRelationship>::new(),
          help_heading = "Exploitation")]
    pub recruiter: Option<RecruiterRelationship>,

    /// Under 18, or of unknown age and possibly under 18 (presumed a victim at once).
    #[arg(long, help_heading = "The person")]
    pub child: bool,
    /// Gender as recorded.
    #[arg(long, value_parser = EnumParser::<Gender>::new(), help_heading = "The person")]
    pub gender: Option<Gender>,
    /// Age in years, when known.
    #[arg(long, value_name = "YEARS", help_heading = "The person")]
    pub age: Option<u32>,
    /// Age band, when the exact age is not known.
    #[arg(long, value_name = "BAND", value_parser = EnumParser::<AgeBand>::new(), help_heading = "The person")]
    pub age_band: Option<AgeBand>,
    /// Citizenship (ISO 3166-1 alpha-2).
    #[arg(long, value_name = "CC", help_heading = "The person")]
    pub citizenship: Option<String>,

    /// Agency code of the police unit or prosecutor handling the case, e.g.
    /// kg-gpo; it holds the case and decides. Required unless you report as
    /// police or a prosecutor [default then: your own agency].
    #[arg(long, value_name = "AGENCY", help_heading = "Who handles the case")]
    pub competent_authority: Option<String>,

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

/// `case notify`: coded fields only. A child is never only counted: report
/// the child with `case report` (the service refuses a child's age band).
#[derive(Debug, Args)]
pub struct NotifyArgs {
    /// Country where the person was found (ISO 3166-1 alpha-2).
    #[arg(long, value_name = "CC")]
    pub found_country: Option<String>,
    /// Country of exploitation (ISO 3166-1 alpha-2).
    #[arg(long, value_name = "CC")]
    pub country_of_exploitation: Option<String>,
    /// Form of exploitation (repeatable, or comma-separated; at least one).
    #[arg(long = "form", value_name = "FORM", value_delimiter = ',',
          value_parser = EnumParser::<ExploitationForm>::new())]
    pub forms: Vec<ExploitationForm>,
    /// Gender as recorded.
    #[arg(long, value_parser = EnumParser::<Gender>::new())]
    pub gender: Option<Gender>,
    /// Age band: an adult's (18-24, 25-34, 35-49, 50-plus) or unknown.
    #[arg(long, value_name = "BAND", value_parser = EnumParser::<AgeBand>::new())]
    pub age_band: Option<AgeBand>,
    /// Citizenship (ISO 3166-1 alpha-2).
    #[arg(long, value_name = "CC")]
    pub citizenship: Option<String>,

    /// Client request ID.
    #[command(flatten)]
    pub request: RequestId,
}

/// `case screen`.
#[derive(Debug, Args)]
pub struct ScreenArgs {
    /// The case and version.
    #[command(flatten)]
    pub at: CaseAt,
    /// Indicator found (repeatable, or comma-separated).
    #[arg(long = "indicator", value_name = "INDICATOR", value_delimiter = ',',
          value_parser = EnumParser::<Indicator>::new())]
    pub indicators: Vec<Indicator>,
    /// Client request ID.
    #[command(flatten)]
    pub request: RequestId,
}

/// `case decide`.
#[derive(Debug, Args)]
pub struct DecideArgs {
    /// The case and version.
    #[command(flatten)]
    pub at: CaseAt,
    /// The decision.
    #[arg(long, value_parser = EnumParser::<Decision>::new())]
    pub decision: Decision,
    /// Why not identified (required with --decision not-identified).
    #[arg(long, value_parser = EnumParser::<NotIdentifiedReason>::new())]
    pub reason: Option<NotIdentifiedReason>,
    /// Non-punishment for offences the person was compelled to commit.
    #[arg(long)]
    pub non_punishment: bool,
    /// For a child: a best-interests assessment preceded a not-identified decision.
    #[arg(long)]
    pub best_interests_assessed: bool,
    /// Client request ID.
    #[command(flatten)]
    pub request: RequestId,
}

/// `case review`.
#[derive(Debug, Args)]
pub struct ReviewArgs {
    /// The case and version.
    #[command(flatten)]
    pub at: CaseAt,
    /// Why the decision is reopened.
    #[arg(long, value_parser = EnumParser::<ReviewReason>::new())]
    pub reason: ReviewReason,
    /// Client request ID.
    #[command(flatten)]
    pub request: RequestId,
}

/// `case erase`.
#[derive(Debug, Args)]
pub struct EraseArgs {
    /// The case whose person's identifiers are erased (with every case linked
    /// to it as a possible duplicate).
    #[arg(value_name = "CASE_ID")]
    pub case_id: String,
    /// Why the identifiers are erased (recorded on the event and in the audit trail).
    #[arg(long, value_name = "REASON", value_parser = EnumParser::<ErasureReason>::new())]
    pub reason: ErasureReason,
    /// Client request ID.
    #[command(flatten)]
    pub request: RequestId,
}

/// `case get`.
#[derive(Debug, Args)]
#[command(group(ArgGroup::new("why").args(["read_purpose", "purpose"]).multiple(true)))]
pub struct GetArgs {
    /// The case ID.
    #[arg(value_name = "CASE_ID")]
    pub case_id: String,
    /// Include the personal identifiers (recorded in the audit trail; needs
    /// --read-purpose, or for a case holder at least --purpose).
    #[arg(long, requires = "why")]
    pub personal: bool,
    /// Why the identifiers are read, from the fixed list: the code recorded
    /// in the audit trail (required of the coordinator).
    #[arg(long, value_name = "PURPOSE", value_parser = EnumParser::<ReadPurpose>::new())]
    pub read_purpose: Option<ReadPurpose>,
    /// Why the identifiers are read, in your words (checked, never recorded:
    /// the audit trail keeps only --read-purpose).
    #[arg(long, value_name = "TEXT")]
    pub purpose: Option<String>,
}

/// `case list`.
#[derive(Debug, Args)]
pub struct ListArgs {
    /// Only cases in this status.
    #[arg(long, value_parser = EnumParser::<CaseStatus>::new())]
    pub status: Option<CaseStatus>,
    /// Only cases reported by this agency.
    #[arg(long)]
    pub agency: Option<String>,
    /// Only cases with this form of exploitation.
    #[arg(long, value_parser = EnumParser::<ExploitationForm>::new())]
    pub form: Option<ExploitationForm>,
    /// Only cases reported at or after this time (RFC 3339).
    #[arg(long, value_name = "RFC3339", value_parser = parse_timestamp)]
    pub after: Option<prost_types::Timestamp>,
    /// Only cases reported before this time (RFC 3339).
    #[arg(long, value_name = "RFC3339", value_parser = parse_timestamp)]
    pub before: Option<prost_types::Timestamp>,
    /// Cases per page (server default 50, at most 500).
    #[arg(long, value_name = "N")]
    pub page_size: Option<i32>,
    /// Continue from this token of a previous page (same filters).
    #[arg(long, value_name = "TOKEN")]
    pub page_token: Option<String>,
    /// Follow the page tokens to the last page.
    #[arg(long)]
    pub all: bool,
}

/// A person's identifiers.
#[derive(Debug, Subcommand)]
pub enum PersonCommand {
    /// Show the identifiers the caller's agency may read under a consent
    /// (recorded in the access log).
    Get(PersonGetArgs),
}

/// `person get`.
#[derive(Debug, Args)]
#[command(group(ArgGroup::new("why").args(["read_purpose", "purpose"]).multiple(true).required(true)))]
pub struct PersonGetArgs {
    /// The person ID.
    #[arg(value_name = "PERSON_ID")]
    pub person_id: String,
    /// Why the identifiers are read, from the fixed list: the code recorded
    /// in the audit trail (required of the coordinator).
    #[arg(long, value_name = "PURPOSE", value_parser = EnumParser::<ReadPurpose>::new())]
    pub read_purpose: Option<ReadPurpose>,
    /// Why the identifiers are read, in your words (checked, never recorded:
    /// the audit trail keeps only --read-purpose).
    #[arg(long, value_name = "TEXT")]
    pub purpose: Option<String>,
}

/// Events on NATS JetStream.
#[derive(Debug, Subcommand)]
pub enum EventsCommand {
    /// Print each event commit as one JSON line, payloads decoded.
    Watch(WatchArgs),
}

/// `events watch`.
#[derive(Debug, Args)]
pub struct WatchArgs {
    /// NATS server.
    #[arg(long, env = "NRM_NATS__URL", default_value = "nats://127.0.0.1:14222")]
    pub nats_url: String,
    /// JetStream stream: NRM_IDENTIFICATION, NRM_REFERRAL or NRM_SHELTER.
    #[arg(long, default_value = "NRM_IDENTIFICATION")]
    pub stream: String,
    /// Only these subjects, e.g. 'nrm.identification.v1.case.>', 'nrm.referral.v1.consent.>',
    /// 'nrm.shelter.v1.shelter.>' [default: the whole stream].
    #[arg(long)]
    pub subject: Option<String>,
    /// Start at the first message of the stream instead of new ones.
    #[arg(long)]
    pub from_start: bool,
    /// Stop after N messages.
    #[arg(long, value_name = "N")]
    pub count: Option<u64>,
}

/// A document number and its issuing country.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NumberCountry {
    /// Document number.
    pub number: String,
    /// Issuing country.
    pub country: String,
}

/// Parses `NUMBER:COUNTRY` (the number may itself contain `:`).
fn parse_number_country(text: &str) -> Result<NumberCountry, String> {
    match text.rsplit_once(':') {
        Some((number, country)) if !number.trim().is_empty() && !country.trim().is_empty() => Ok(NumberCountry {
            number: number.trim().to_owned(),
            country: country.trim().to_owned(),
        }),
        _ => Err(format!("'{text}' is not NUMBER:COUNTRY, e.g. AC1234567:KG")),
    }
}

/// Parses `TYPE:NUMBER:COUNTRY`.
fn parse_document(text: &str) -> Result<(DocumentType, NumberCountry), String> {
    let (kind, rest) = text
        .split_once(':')
        .ok_or_else(|| format!("'{text}' is not TYPE:NUMBER:COUNTRY, e.g. passport:AC1234567:KG"))?;
    Ok((enums::parse::<DocumentType>(kind)?, parse_number_country(rest)?))
}

/// Parses an RFC 3339 time.
fn parse_timestamp(text: &str) -> Result<prost_types::Timestamp, String> {
    let time = chrono::DateTime::parse_from_rfc3339(text.trim())
        .map_err(|e| format!("'{text}' is not an RFC 3339 time like 2025-03-01T14:30:00Z: {e}"))?;
    Ok(prost_types::Timestamp {
        seconds: time.timestamp(),
        nanos: i32::try_from(time.timestamp_subsec_nanos()).unwrap_or(0),
    })
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    use super::*;

    #[test]
    fn the_command_line_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn a_report_reads_repeated_and_comma_separated_enums() {
        let cli = Cli::try_parse_from([
            "nrmctl",
            "case",
            "report",
            "--form",
            "labour,forced_begging",
            "--form",
            "sexual",
            "--passport",
            "AC123:KG",
            "--document",
            "birth-certificate:B-1:KZ",
            "--found-at",
            "2025-03-01T14:30:00+06:00",
            "--output",
            "json",
        ])
        .expect("valid command line");
        assert_eq!(cli.global.output, Output::Json);
        let Command::Case(CaseCommand::Report(report)) = cli.command else {
            panic!("not a report");
        };
        assert_eq!(
            report.forms,
            [
                ExploitationForm::Labour,
                ExploitationForm::ForcedBegging,
                ExploitationForm::Sexual
            ]
        );
        assert_eq!(report.passports[0].number, "AC123");
        assert_eq!(report.documents[0].0, DocumentType::BirthCertificate);
        assert_eq!(report.found_at.map(|t| t.seconds), Some(1_740_817_800));
    }

    #[test]
    fn a_wrong_enum_name_lists_the_valid_names() {
        let err = Cli::try_parse_from(["nrmctl", "case", "list", "--status", "closed"]).expect_err("unknown status");
        let text = err.to_string();
        assert!(
            text.contains("reported, presumed, identified, not-identified"),
            "{text}"
        );
    }

    #[test]
    fn screening_takes_the_case_and_the_version_seen() {
        let cli = Cli::try_parse_from([
            "nrmctl",
            "case",
            "screen",
            "c-1",
            "--version",
            "3",
            "--indicator",
            "isolation",
        ])
        .expect("valid command line");
        let Command::Case(CaseCommand::Screen(screen)) = cli.command else {
            panic!("not a screening");
        };
        assert_eq!((screen.at.case_id.as_str(), screen.at.expected_version), ("c-1", 3));
        assert_eq!(screen.indicators, [Indicator::Isolation]);
    }

    #[test]
    fn a_notification_reads_its_coded_fields() {
        let cli = Cli::try_parse_from([
            "nrmctl",
            "case",
            "notify",
            "--found-country",
            "KG",
            "--country-of-exploitation",
            "RU",
            "--form",
            "labour,sexual",
            "--gender",
            "female",
            "--age-band",
            "25-34",
            "--citizenship",
            "KG",
            "--request-id",
            "n-1",
        ])
        .expect("valid command line");
        let Command::Case(CaseCommand::Notify(notify)) = cli.command else {
            panic!("not a notification");
        };
        assert_eq!(notify.forms, [ExploitationForm::Labour, ExploitationForm::Sexual]);
        assert_eq!(notify.age_band, Some(AgeBand::AgeBand2534));
        assert_eq!(notify.gender, Some(Gender::Female));
        assert_eq!(notify.country_of_exploitation.as_deref(), Some("RU"));
        assert_eq!(notify.request.request_id.as_deref(), Some("n-1"));
    }

    #[test]
    fn a_report_names_the_competent_authority() {
        let cli = Cli::try_parse_from([
            "nrmctl",
            "--as-role",
            "ngo",
            "case",
            "report",
            "--competent-authority",
            "kg-gpo",
        ])
        .expect("valid command line");
        let Command::Case(CaseCommand::Report(report)) = cli.command else {
            panic!("not a report");
        };
        assert_eq!(report.competent_authority.as_deref(), Some("kg-gpo"));
    }

    #[test]
    fn erasure_needs_a_reason_from_the_fixed_list() {
        let cli = Cli::try_parse_from(["nrmctl", "case", "erase", "c-1", "--reason", "data-subject-request"])
            .expect("valid command line");
        let Command::Case(CaseCommand::Erase(erase)) = cli.command else {
            panic!("not an erasure");
        };
        assert_eq!(erase.reason, ErasureReason::DataSubjectRequest);

        let missing = Cli::try_parse_from(["nrmctl", "case", "erase", "c-1"]).expect_err("no reason");
        assert!(missing.to_string().contains("--reason"), "{missing}");
        let unknown =
            Cli::try_parse_from(["nrmctl", "case", "erase", "c-1", "--reason", "because"]).expect_err("free text");
        assert!(
            unknown
                .to_string()
                .contains("data-subject-request, consent-withdrawn, retention-expired"),
            "{unknown}"
        );
    }

    #[test]
    fn personal_data_are_read_with_a_coded_or_a_worded_purpose() {
        let cli = Cli::try_parse_from([
            "nrmctl",
            "case",
            "get",
            "c-1",
            "--personal",
            "--read-purpose",
            "oversight",
        ])
        .expect("a coded purpose is enough");
        let Command::Case(CaseCommand::Get(get)) = cli.command else {
            panic!("not a case get");
        };
        assert!(get.personal);
        assert_eq!(get.read_purpose, Some(ReadPurpose::Oversight));
        assert_eq!(get.purpose, None);

        Cli::try_parse_from(["nrmctl", "case", "get", "c-1", "--personal", "--purpose", "review"])
            .expect("a case holder may still give words only");
        Cli::try_parse_from(["nrmctl", "case", "get", "c-1", "--personal"]).expect_err("no purpose at all");
        Cli::try_parse_from(["nrmctl", "case", "get", "c-1"]).expect("the coded case needs no purpose");

        let cli = Cli::try_parse_from(["nrmctl", "person", "get", "p-1", "--read-purpose", "victim-protection"])
            .expect("a coded purpose is enough");
        let Command::Person(PersonCommand::Get(get)) = cli.command else {
            panic!("not a person get");
        };
        assert_eq!(get.read_purpose, Some(ReadPurpose::VictimProtection));
        Cli::try_parse_from(["nrmctl", "person", "get", "p-1"]).expect_err("no purpose at all");
    }
}
