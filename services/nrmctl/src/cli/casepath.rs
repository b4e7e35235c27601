//! The clap types of casepath's queries: `path`, `inbox`, `paths`, `stats`
//! (on `--casepath-endpoint`). Enum-valued options take the value name
//! without its prefix, in kebab-case (`--stage identified`,
//! `--kind referral`). `--from`/`--to` take a date (YYYY-MM-DD, a whole day
//! in UTC: `--to` includes its day) or an RFC 3339 time (`--to` exclusive).

use clap::{Args, Subcommand, ValueEnum};
use nrm_proto::casepath::v1::{InboxKind, Stage};

use crate::enums::EnumParser;

/// casepath's commands, flattened into the top level (`nrmctl path …`).
#[derive(Debug, Subcommand)]
pub enum CasepathCommand {
    /// A person's path as far as your role and agency see it: the steps in
    /// order with the time spent at each, the stage, what waits (audited).
    Path(PathArgs),
    /// What waits for your agency's answer, overdue first, with the time left.
    Inbox(InboxArgs),
    /// The persons' paths, coded, with filters (coordinator).
    Paths(PathsArgs),
    /// Counts and times for a period (coordinator); --publishable
    /// suppresses small cells and their complements, --csv exports them.
    Stats(StatsArgs),
}

/// `path`.
#[derive(Debug, Args)]
pub struct PathArgs {
    /// The person ID (pseudonym).
    #[arg(value_name = "PERSON_ID")]
    pub person_id: String,
    /// Print the path again whenever it changes, until Ctrl-C (with
    /// --output json: one JSON object per line).
    #[arg(long)]
    pub watch: bool,
}

/// What an inbox item waits for, on the command line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Kind {
    /// A referral to accept or decline.
    Referral,
    /// A case's formal identification decision.
    Decision,
}

impl From<Kind> for InboxKind {
    fn from(kind: Kind) -> Self {
        match kind {
            Kind::Referral => InboxKind::ReferralAnswer,
            Kind::Decision => InboxKind::IdentificationDecision,
        }
    }
}

/// `inbox`.
#[derive(Debug, Args)]
pub struct InboxArgs {
    /// The agency whose inbox (the coordinator only; anyone else gets their
    /// own) [default: your own; for the coordinator: what is overdue everywhere].
    #[arg(long, value_name = "AGENCY")]
    pub agency: Option<String>,
    /// Only this kind.
    #[arg(long, value_enum)]
    pub kind: Option<Kind>,
    /// Only what is overdue now.
    #[arg(long)]
    pub overdue: bool,
    /// Print the inbox again whenever it changes, until Ctrl-C (with
    /// --output json: one JSON object per line).
    #[arg(long, conflicts_with_all = ["page_token", "all"])]
    pub watch: bool,
    /// Paging.
    #[command(flatten)]
    pub page: Page,
}

/// Paging of a list.
#[derive(Debug, Args)]
pub struct Page {
    /// Items per page (server default 50, at most 500).
    #[arg(long, value_name = "N")]
    pub page_size: Option<u32>,
    /// Continue from this token of a previous page (same filters).
    #[arg(long, value_name = "TOKEN")]
    pub page_token: Option<String>,
    /// Follow the page tokens to the last page.
    #[arg(long)]
    pub all: bool,
}

/// `paths`.
#[derive(Debug, Args)]
pub struct PathsArgs {
    /// Only persons at this stage.
    #[arg(long, value_parser = EnumParser::<Stage>::new())]
    pub stage: Option<Stage>,
    /// Only persons with something overdue now.
    #[arg(long)]
    pub overdue: bool,
    /// Persons first reported at or after this date or time.
    #[arg(long, value_name = "DATE", value_parser = parse_from)]
    pub from: Option<prost_types::Timestamp>,
    /// Persons first reported before this time (a date: up to its end).
    #[arg(long, value_name = "DATE", value_parser = parse_to)]
    pub to: Option<prost_types::Timestamp>,
    /// Paging.
    #[command(flatten)]
    pub page: Page,
}

/// `stats`.
#[derive(Debug, Args)]
pub struct StatsArgs {
    /// The period's first date or time (persons first reported, and
    /// anonymous notifications filed, from then on).
    #[arg(long, value_name = "DATE", value_parser = parse_from)]
    pub from: prost_types::Timestamp,
    /// The period's end (a date: up to its end; a time: exclusive).
    #[arg(long, value_name = "DATE", value_parser = parse_to)]
    pub to: prost_types::Timestamp,
    /// Suppress cells below --min-cell and the complementary cells that
    /// would reveal them. The period must then be whole calendar months
    /// (e.g. --from 2026-01-01 --to 2026-03-31); times are rounded to days.
    #[arg(long)]
    pub publishable: bool,
    /// The smallest count shown [default: the service's, 5]; the CTDC
    /// public data use 11. Below the service's own, refused.
    #[arg(long, value_name = "K")]
    pub min_cell: Option<u32>,
    /// CSV on stdout: header lines (`NOT FOR PUBLICATION` when exact;
    /// publishable, min_cell, from, to), an empty line,
    /// `dimension,value,count,suppressed` rows, an empty line, then
    /// `measure,samples,median_seconds,p90_seconds,suppressed` rows (a
    /// suppressed count or time is left empty).
    #[arg(long)]
    pub csv: bool,
}

/// `--from`: a date is its first instant in UTC.
fn parse_from(text: &str) -> Result<prost_types::Timestamp, String> {
    parse_moment(text, false)
}

/// `--to`: a date is the first instant of the next day (the day included).
fn parse_to(text: &str) -> Result<prost_types::Timestamp, String> {
    parse_moment(text, true)
}

/// A date (YYYY-MM-DD, in UTC) or an RFC 3339 time.
fn parse_moment(text: &str, end_of_day: bool) -> Result<prost_types::Timestamp, String> {
    let text = text.trim();
    let time = if let Ok(date) = chrono::NaiveDate::parse_from_str(text, "%Y-%m-%d") {
        let day = if end_of_day {
            date.succ_opt()
                .ok_or_else(|| format!("'{text}' is the last date there is"))?
        } else {
            date
        };
        day.and_hms_opt(0, 0, 0).unwrap_or_default().and_utc()
    } else {
        chrono::DateTime::parse_from_rfc3339(text)
            .map_err(|e| format!("'{text}' is neither a date like 2026-03-01 nor an RFC 3339 time: {e}"))?
            .to_utc()
    };
    Ok(prost_types::Timestamp {
        seconds: time.timestamp(),
        nanos: i32::try_from(time.timestamp_subsec_nanos()).unwrap_or(0),
    })
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;
    use crate::cli::{Cli, Command};

    fn parse(args: &[&str]) -> CasepathCommand {
        let cli = Cli::try_parse_from(std::iter::once("nrmctl").chain(args.iter().copied())).expect("valid");
        let Command::Casepath(command) = cli.command else {
            panic!("not a casepath command");
        };
        command
    }

    #[test]
    fn a_date_is_a_whole_day_and_a_time_is_exact() {
        let CasepathCommand::Stats(stats) = parse(&[
            "stats",
            "--from",
            "2026-03-01",
            "--to",
            "2026-03-31",
            "--publishable",
            "--min-cell",
            "11",
            "--csv",
        ]) else {
            panic!("not stats");
        };
        assert_eq!(stats.from.seconds, 1_772_323_200, "2026-03-01T00:00:00Z");
        assert_eq!(
            stats.to.seconds, 1_775_001_600,
            "2026-04-01T00:00:00Z: the 31st included"
        );
        assert!(stats.publishable && stats.csv);
        assert_eq!(stats.min_cell, Some(11));

        let CasepathCommand::Paths(paths) = parse(&[
            "paths",
            "--stage",
            "not-identified",
            "--to",
            "2026-03-01T06:00:00+06:00",
        ]) else {
            panic!("not paths");
        };
        assert_eq!(paths.stage, Some(Stage::NotIdentified));
        assert_eq!(paths.to.map(|t| t.seconds), Some(1_772_323_200));
    }

    #[test]
    fn inbox_and_path_take_their_filters() {
        let CasepathCommand::Inbox(inbox) = parse(&[
            "inbox",
            "--agency",
            "kg-msd",
            "--kind",
            "decision",
            "--overdue",
            "--watch",
        ]) else {
            panic!("not an inbox");
        };
        assert_eq!(inbox.agency.as_deref(), Some("kg-msd"));
        assert_eq!(inbox.kind.map(InboxKind::from), Some(InboxKind::IdentificationDecision));
        assert!(inbox.overdue && inbox.watch);
        let CasepathCommand::Path(path) = parse(&["path", "p-1", "--watch"]) else {
            panic!("not a path");
        };
        assert_eq!((path.person_id.as_str(), path.watch), ("p-1", true));
        Cli::try_parse_from(["nrmctl", "stats", "--from", "2026-03-01"]).expect_err("--to is required");
        Cli::try_parse_from(["nrmctl", "stats", "--from", "March", "--to", "2026-04-01"]).expect_err("not a date");
    }
}
