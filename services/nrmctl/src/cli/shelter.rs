//! The clap types of the shelter service's commands: `shelter …`.

use clap::{Args, Subcommand};
use nrm_proto::shelter::v1::{BedCapacity, BedCategory, OnSiteService};

use super::RequestId;
use crate::enums::{self, EnumParser};

/// The longest hold the service grants: 7 days.
const MAX_HOLD_MINUTES: i64 = 10_080;

/// Shelters, beds and holds.
#[derive(Debug, Subcommand)]
pub enum ShelterCommand {
    /// Register a shelter or crisis centre operated by your agency (prints the shelter ID).
    Register(RegisterArgs),
    /// Approve a registered shelter (the national coordinator): only then does it take referrals.
    Approve(ApproveArgs),
    /// Set the number of beds of one category.
    Capacity(CapacityArgs),
    /// Hold a free bed for a referral until the hold expires (prints the hold ID).
    Hold(HoldArgs),
    /// Release a hold before it expires.
    Release(HoldRefArgs),
    /// Admit the person a hold was for.
    Admit(HoldRefArgs),
    /// Discharge an admitted person.
    Discharge(HoldRefArgs),
    /// Show one shelter with its address (its operator, the coordinator, an agency holding a bed there; audited).
    Get(ShelterGetArgs),
    /// Free beds by shelter, region and category.
    Free(FreeArgs),
    /// Who is coming to a shelter you operate: hold, person pseudonym, bed, arrival window (audited).
    Arrivals(ShelterGetArgs),
}

/// `shelter register`.
#[derive(Debug, Args)]
pub struct RegisterArgs {
    /// A short code that does not give the place away, e.g. OSH-CC-2.
    #[arg(long, value_name = "CODE")]
    pub code: String,
    /// Region (ISO 3166-2), e.g. KG-O (Osh region), KG-GB (Bishkek).
    #[arg(long, value_name = "REGION")]
    pub region: String,
    /// Street address: sealed under the shelter's key, never on an event in the clear.
    #[arg(long, value_name = "TEXT")]
    pub address: Option<String>,
    /// Beds per category, e.g. women=6,children=4; categories: women, men, children, mothers-with-children
    /// (repeatable, or comma-separated).
    #[arg(long = "beds", value_name = "CATEGORY=COUNT", required = true, value_delimiter = ',',
          value_parser = parse_beds)]
    pub beds: Vec<BedCapacity>,
    /// Service available on site (repeatable, or comma-separated).
    #[arg(long = "service", value_name = "SERVICE", value_delimiter = ',',
          value_parser = EnumParser::<OnSiteService>::new())]
    pub services: Vec<OnSiteService>,
    /// The shelter is wheelchair accessible.
    #[arg(long)]
    pub accessible: bool,
    /// Client request ID.
    #[command(flatten)]
    pub request: RequestId,
}

/// `shelter approve`.
#[derive(Debug, Args)]
pub struct ApproveArgs {
    /// The shelter ID.
    #[arg(value_name = "SHELTER_ID")]
    pub shelter_id: String,
    /// The shelter version you saw; the call fails with ABORTED when the shelter moved on.
    #[arg(long = "version", value_name = "N")]
    pub expected_version: u64,
    /// Client request ID.
    #[command(flatten)]
    pub request: RequestId,
}

/// `shelter capacity`.
#[derive(Debug, Args)]
pub struct CapacityArgs {
    /// The shelter ID.
    #[arg(value_name = "SHELTER_ID")]
    pub shelter_id: String,
    /// The shelter version you saw; the call fails with ABORTED when the shelter moved on.
    #[arg(long = "version", value_name = "N")]
    pub expected_version: u64,
    /// The bed category.
    #[arg(long, value_parser = EnumParser::<BedCategory>::new())]
    pub category: BedCategory,
    /// The new number of beds of the category.
    #[arg(long, value_name = "COUNT")]
    pub beds: u32,
    /// Client request ID.
    #[command(flatten)]
    pub request: RequestId,
}

/// `shelter hold`.
#[derive(Debug, Args)]
pub struct HoldArgs {
    /// The shelter ID.
    #[arg(value_name = "SHELTER_ID")]
    pub shelter_id: String,
    /// The bed category.
    #[arg(long, value_parser = EnumParser::<BedCategory>::new())]
    pub category: BedCategory,
    /// The referral the bed is for.
    #[arg(long = "referral", value_name = "REFERRAL_ID")]
    pub referral_id: String,
    /// How long the hold lasts, 1-10080 minutes [default: the service's, 24 h unless configured].
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..=MAX_HOLD_MINUTES))]
    pub minutes: Option<u32>,
    /// Client request ID.
    #[command(flatten)]
    pub request: RequestId,
}

/// `shelter release`, `shelter admit`, `shelter discharge`.
#[derive(Debug, Args)]
pub struct HoldRefArgs {
    /// The shelter ID.
    #[arg(value_name = "SHELTER_ID")]
    pub shelter_id: String,
    /// The hold ID.
    #[arg(long = "hold", value_name = "HOLD_ID")]
    pub hold_id: String,
    /// Client request ID.
    #[command(flatten)]
    pub request: RequestId,
}

/// `shelter get`, `shelter arrivals`.
#[derive(Debug, Args)]
pub struct ShelterGetArgs {
    /// The shelter ID.
    #[arg(value_name = "SHELTER_ID")]
    pub shelter_id: String,
}

/// `shelter free`.
#[derive(Debug, Args)]
pub struct FreeArgs {
    /// Only this region (ISO 3166-2) [default: every region].
    #[arg(long, value_name = "REGION")]
    pub region: Option<String>,
    /// Only this bed category.
    #[arg(long, value_parser = EnumParser::<BedCategory>::new())]
    pub category: Option<BedCategory>,
}

/// Parses `CATEGORY=COUNT` (`women=6`, `mothers-with-children=2`).
fn parse_beds(text: &str) -> Result<BedCapacity, String> {
    let (category, count) = text
        .split_once('=')
        .ok_or_else(|| format!("'{text}' is not CATEGORY=COUNT, e.g. women=6"))?;
    let category = enums::parse::<BedCategory>(category)?;
    let beds = count
        .trim()
        .parse::<u32>()
        .map_err(|_| format!("'{}' in '{text}' is not a number of beds", count.trim()))?;
    Ok(BedCapacity {
        category: category.into(),
        beds,
    })
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;
    use crate::cli::{Cli, Command};

    fn beds(category: BedCategory, beds: u32) -> BedCapacity {
        BedCapacity {
            category: category.into(),
            beds,
        }
    }

    #[test]
    fn beds_are_category_equals_count() {
        assert_eq!(parse_beds("women=6"), Ok(beds(BedCategory::Women, 6)));
        assert_eq!(
            parse_beds(" mothers_with_children = 2 "),
            Ok(beds(BedCategory::MothersWithChildren, 2))
        );
        assert_eq!(parse_beds("children=0"), Ok(beds(BedCategory::Children, 0)));
        for bad in [
            "women",
            "women=",
            "women=-1",
            "women=six",
            "=6",
            "robots=6",
            "unspecified=1",
        ] {
            assert!(parse_beds(bad).is_err(), "{bad:?} should be refused");
        }
        let err = parse_beds("robots=6").expect_err("unknown category");
        assert!(err.contains("women, men, children, mothers-with-children"), "{err}");
    }

    #[test]
    fn a_registration_reads_repeated_and_comma_separated_beds_and_services() {
        let cli = Cli::try_parse_from([
            "nrmctl",
            "shelter",
            "register",
            "--code",
            "OSH-CC-2",
            "--region",
            "KG-O",
            "--beds",
            "women=6,children=4",
            "--beds",
            "men=2",
            "--service",
            "medical,psychological",
            "--accessible",
        ])
        .expect("valid command line");
        let Command::Shelter(ShelterCommand::Register(register)) = cli.command else {
            panic!("not a registration");
        };
        assert_eq!(
            register.beds,
            [
                beds(BedCategory::Women, 6),
                beds(BedCategory::Children, 4),
                beds(BedCategory::Men, 2)
            ]
        );
        assert_eq!(
            register.services,
            [OnSiteService::Medical, OnSiteService::Psychological]
        );
        assert!(register.accessible);
        assert!(
            Cli::try_parse_from(["nrmctl", "shelter", "register", "--code", "X-1", "--region", "KG-O"]).is_err(),
            "beds are required"
        );
    }

    #[test]
    fn arrivals_name_one_shelter() {
        let cli = Cli::try_parse_from(["nrmctl", "shelter", "arrivals", "s-1"]).expect("valid command line");
        let Command::Shelter(ShelterCommand::Arrivals(args)) = cli.command else {
            panic!("not arrivals");
        };
        assert_eq!(args.shelter_id, "s-1");
        assert!(Cli::try_parse_from(["nrmctl", "shelter", "arrivals"]).is_err());
    }

    #[test]
    fn holds_last_at_most_a_week() {
        let hold = |minutes: &str| {
            Cli::try_parse_from([
                "nrmctl",
                "shelter",
                "hold",
                "s-1",
                "--category",
                "women",
                "--referral",
                "r-1",
                "--minutes",
                minutes,
            ])
        };
        assert!(hold("10080").is_ok());
        assert!(hold("10081").is_err());
        assert!(hold("0").is_err());
    }
}
