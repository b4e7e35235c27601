//! The clap types of the operator's commands: `ops …`, the
//! `nrm.common.v1.OperatorService` every service serves beside its own
//! (callable by the `operator` role only).

use clap::{Args, Subcommand, ValueEnum};
use nrm_proto::common::v1::ParkedKind;

use crate::enums::EnumParser;

/// Operations: parked messages and timers, refilling a stream from its
/// store, rebuilding read models.
#[derive(Debug, Subcommand)]
pub enum OpsCommand {
    /// List the messages and timers whose handler kept failing and were parked.
    Parked(ParkedArgs),
    /// Ask for one parked message or timer to be tried again.
    Retry(RetryArgs),
    /// Compare each service's stream with its event store and publish again,
    /// in order, the commits the stream lacks.
    Refill(RefillArgs),
    /// Rebuild a service's read models from their streams while it runs and
    /// say whether each came out equal to the live one.
    ///
    /// Each read model is replayed, up to the stream position the live
    /// model had reached, into a shadow of its tables while the live one
    /// goes on; only one that came out different is then rebuilt in place,
    /// in one transaction (its runner waits for it). One line per read
    /// model: its name, stream, sequence,
    /// messages replayed, messages parked, and `equal` or
    /// `DIFFERENT (live <digest> rebuilt <digest>)` (the rebuilt model is
    /// the one kept). Asks the service at --endpoint (or the one --service
    /// names).
    ///
    /// Exit codes: 0 every read model rebuilt equal; 3 at least one was
    /// DIFFERENT (or could not be compared); 1 the call failed.
    Rebuild(RebuildArgs),
}

/// A Köpür service, reached at its global endpoint option.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Service {
    /// The identification service (--endpoint).
    Identification,
    /// The referral service (--referral-endpoint).
    Referral,
    /// The shelter service (--shelter-endpoint).
    Shelter,
    /// The repatriation service (--repatriation-endpoint).
    Repatriation,
    /// casepath (--casepath-endpoint): read models only, no stream of its own.
    Casepath,
}

impl Service {
    /// Every service, in the order answers are printed.
    pub const ALL: [Service; 5] = [
        Service::Identification,
        Service::Referral,
        Service::Shelter,
        Service::Repatriation,
        Service::Casepath,
    ];

    /// The service's name as on the command line.
    pub const fn name(self) -> &'static str {
        match self {
            Service::Identification => "identification",
            Service::Referral => "referral",
            Service::Shelter => "shelter",
            Service::Repatriation => "repatriation",
            Service::Casepath => "casepath",
        }
    }

    /// Whether the service publishes a stream of its own (casepath only reads).
    pub const fn publishes(self) -> bool {
        !matches!(self, Service::Casepath)
    }
}

/// One service, or all of them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Services {
    /// The identification service (--endpoint).
    Identification,
    /// The referral service (--referral-endpoint).
    Referral,
    /// The shelter service (--shelter-endpoint).
    Shelter,
    /// The repatriation service (--repatriation-endpoint).
    Repatriation,
    /// casepath (--casepath-endpoint).
    Casepath,
    /// Each of them (for `refill`, each that publishes a stream).
    All,
}

impl Services {
    /// The services chosen.
    pub fn list(self) -> Vec<Service> {
        match self {
            Services::Identification => vec![Service::Identification],
            Services::Referral => vec![Service::Referral],
            Services::Shelter => vec![Service::Shelter],
            Services::Repatriation => vec![Service::Repatriation],
            Services::Casepath => vec![Service::Casepath],
            Services::All => Service::ALL.to_vec(),
        }
    }

    /// The services chosen that publish a stream of their own: all of them
    /// but casepath when every service is chosen (one named is asked, and
    /// casepath answers that it publishes none).
    pub fn publishing(self) -> Vec<Service> {
        match self {
            Services::All => Service::ALL.into_iter().filter(|s| s.publishes()).collect(),
            one => one.list(),
        }
    }
}

/// `ops parked`.
#[derive(Debug, Args)]
pub struct ParkedArgs {
    /// The services to ask.
    #[arg(long, value_enum, default_value_t = Services::All)]
    pub service: Services,
}

/// `ops retry`.
#[derive(Debug, Args)]
pub struct RetryArgs {
    /// The service that parked the item.
    #[arg(long, value_enum)]
    pub service: Service,
    /// What was parked.
    #[arg(long, value_parser = EnumParser::<ParkedKind>::new())]
    pub kind: ParkedKind,
    /// The projection or reaction (a message), the timer's kind (a timer), as `ops parked` lists it.
    #[arg(long, value_name = "NAME")]
    pub owner: String,
    /// The item ID as `ops parked` lists it: the stream sequence (a message) or the timer ID (a timer).
    #[arg(long = "item", value_name = "ID")]
    pub item_id: String,
}

/// `ops refill`.
#[derive(Debug, Args)]
pub struct RefillArgs {
    /// The services whose stream is compared with their store (`all`: each
    /// that publishes one, casepath aside).
    #[arg(long, value_enum, default_value_t = Services::All)]
    pub service: Services,
    /// Only compare and count what the stream lacks; put nothing back.
    #[arg(long)]
    pub dry_run: bool,
}

/// `ops rebuild`.
#[derive(Debug, Args)]
pub struct RebuildArgs {
    /// Only the read model of this name (default: every one of the service).
    #[arg(long, value_name = "NAME")]
    pub projection: Option<String>,
    /// The service to ask, at its endpoint option (default: the one at --endpoint).
    #[arg(long, value_enum)]
    pub service: Option<Service>,
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;
    use crate::cli::{Cli, Command};

    #[test]
    fn parked_and_refill_ask_every_service_unless_told() {
        let cli = Cli::try_parse_from(["nrmctl", "ops", "parked"]).expect("valid command line");
        let Command::Ops(OpsCommand::Parked(parked)) = cli.command else {
            panic!("not ops parked");
        };
        assert_eq!(parked.service.list(), Service::ALL);
        let cli = Cli::try_parse_from(["nrmctl", "ops", "refill", "--service", "shelter"]).expect("valid command line");
        let Command::Ops(OpsCommand::Refill(refill)) = cli.command else {
            panic!("not ops refill");
        };
        assert_eq!(refill.service.list(), [Service::Shelter]);
    }

    #[test]
    fn a_rebuild_asks_one_service_for_all_or_one_read_model() {
        let cli = Cli::try_parse_from(["nrmctl", "ops", "rebuild", "--endpoint", "http://h:1"]).expect("valid");
        let Command::Ops(OpsCommand::Rebuild(rebuild)) = cli.command else {
            panic!("not ops rebuild");
        };
        assert_eq!((rebuild.projection, rebuild.service), (None, None));
        assert_eq!(cli.global.endpoint, "http://h:1");
        let cli = Cli::try_parse_from([
            "nrmctl",
            "ops",
            "rebuild",
            "--projection",
            "referral_inbox",
            "--service",
            "referral",
        ])
        .expect("valid");
        let Command::Ops(OpsCommand::Rebuild(rebuild)) = cli.command else {
            panic!("not ops rebuild");
        };
        assert_eq!(rebuild.projection.as_deref(), Some("referral_inbox"));
        assert_eq!(rebuild.service, Some(Service::Referral));
        assert!(Cli::try_parse_from(["nrmctl", "ops", "rebuild", "--service", "all"]).is_err());
    }

    #[test]
    fn a_retry_names_one_service_kind_owner_and_item() {
        let cli = Cli::try_parse_from([
            "nrmctl",
            "ops",
            "retry",
            "--service",
            "referral",
            "--kind",
            "timer",
            "--owner",
            "referral_deadline",
            "--item",
            "0190-…",
        ])
        .expect("valid command line");
        let Command::Ops(OpsCommand::Retry(retry)) = cli.command else {
            panic!("not ops retry");
        };
        assert_eq!((retry.service, retry.kind), (Service::Referral, ParkedKind::Timer));
        assert_eq!(
            (retry.owner.as_str(), retry.item_id.as_str()),
            ("referral_deadline", "0190-…")
        );
        for bad in [
            ["--service", "all", "--kind", "message"],
            ["--service", "referral", "--kind", "unspecified"],
        ] {
            let mut args = vec!["nrmctl", "ops", "retry", "--owner", "o", "--item", "1"];
            args.extend(bad);
            assert!(Cli::try_parse_from(&args).is_err(), "{bad:?} should be refused");
        }
    }
}
