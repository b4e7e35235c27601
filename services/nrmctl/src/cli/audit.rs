//! The clap types of the auditor's commands: `audit …`, the
//! `nrm.common.v1.AuditService` every service serves beside its own
//! (callable by the `auditor` role only).

use clap::{Args, Subcommand};
use nrm_kernel::audit::Anchor;

use crate::cli::ops::{Service, Services};

/// The audit trail (role auditor): each service's hash chain, and who read or
/// changed a person's records.
#[derive(Debug, Subcommand)]
pub enum AuditCommand {
    /// Walk each service's audit chain and recompute every hash: OK, or the
    /// first entry changed, removed or reordered (exit code 1). Prints each
    /// chain's head (SEQ:HASH): record it elsewhere and pass it back with
    /// --expect-head to detect a chain rewritten from an earlier entry on.
    Verify(VerifyArgs),
    /// List who read or changed a person's records, from every service,
    /// oldest first.
    Person(PersonArgs),
}

/// `audit`: a subcommand, or `--person ID` for `audit person ID`.
#[derive(Debug, Args)]
#[command(
    args_conflicts_with_subcommands = true,
    subcommand_required = false,
    arg_required_else_help = true
)]
pub struct AuditArgs {
    /// What to do.
    #[command(subcommand)]
    pub command: Option<AuditCommand>,
    /// Who read or changed this person's records (as `audit person ID`).
    #[arg(long, value_name = "PERSON_ID")]
    pub person: Option<uuid::Uuid>,
}

impl AuditArgs {
    /// The subcommand meant.
    #[must_use]
    pub fn command(self) -> Option<AuditCommand> {
        self.command.or(self.person.map(|person_id| {
            AuditCommand::Person(PersonArgs {
                person_id,
                service: Services::All,
            })
        }))
    }
}

/// `audit verify`.
#[derive(Debug, Args)]
pub struct VerifyArgs {
    /// The services whose chain is verified.
    #[arg(long, value_enum, default_value_t = Services::All)]
    pub service: Services,
    /// A head printed by an earlier `audit verify`: that service's chain must
    /// still hold this hash at this seq. Once per service.
    #[arg(long, value_name = "SERVICE=SEQ:HASH", value_parser = parse_expected_head)]
    pub expect_head: Vec<(Service, Anchor)>,
}

/// `audit person`.
#[derive(Debug, Args)]
pub struct PersonArgs {
    /// The person's ID (UUID).
    #[arg(value_name = "PERSON_ID")]
    pub person_id: uuid::Uuid,
    /// The services asked.
    #[arg(long, value_enum, default_value_t = Services::All)]
    pub service: Services,
}

/// `SERVICE=SEQ:HASH`.
fn parse_expected_head(text: &str) -> Result<(Service, Anchor), String> {
    let (service, anchor) = text
        .split_once('=')
        .ok_or("must be SERVICE=SEQ:HASH (e.g. identification=42:<64 hex digits>)")?;
    let service = Service::ALL.into_iter().find(|s| s.name() == service).ok_or_else(|| {
        let names: Vec<&str> = Service::ALL.iter().map(|s| s.name()).collect();
        format!("unknown service '{service}'; one of {}", names.join(", "))
    })?;
    let anchor = Anchor::parse(&anchor.to_ascii_lowercase()).map_err(str::to_owned)?;
    Ok((service, anchor))
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;
    use crate::cli::{Cli, Command};

    #[test]
    fn verify_takes_expected_heads_per_service() {
        let hash = "ab".repeat(32);
        let head = format!("referral=12:{hash}");
        let cli =
            Cli::try_parse_from(["nrmctl", "audit", "verify", "--expect-head", &head]).expect("valid command line");
        let Command::Audit(args) = cli.command else {
            panic!("not audit");
        };
        let Some(AuditCommand::Verify(verify)) = args.command() else {
            panic!("not audit verify");
        };
        assert_eq!(verify.service.list(), Service::ALL);
        assert_eq!(verify.expect_head.len(), 1);
        assert_eq!(verify.expect_head[0].0, Service::Referral);
        assert_eq!(verify.expect_head[0].1.seq, 12);
        for bad in ["12:ab", "police=1:00", &format!("referral={hash}")] {
            assert!(
                Cli::try_parse_from(["nrmctl", "audit", "verify", "--expect-head", bad]).is_err(),
                "{bad}"
            );
        }
    }

    #[test]
    fn person_takes_a_uuid() {
        assert!(Cli::try_parse_from(["nrmctl", "audit", "person", "0190a0b0-0000-7000-8000-000000000001"]).is_ok());
        assert!(Cli::try_parse_from(["nrmctl", "audit", "person", "Aigul"]).is_err());
        let person = "0190a0b0-0000-7000-8000-000000000001";
        let cli = Cli::try_parse_from(["nrmctl", "audit", "--person", person]).expect("audit --person");
        let Command::Audit(args) = cli.command else {
            panic!("not audit");
        };
        let Some(AuditCommand::Person(listed)) = args.command() else {
            panic!("--person is audit person");
        };
        assert_eq!(listed.person_id.to_string(), person);
        assert!(Cli::try_parse_from(["nrmctl", "audit", "--person", "Aigul"]).is_err());
    }
}
