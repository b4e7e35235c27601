//! `nrmctl`, the command-line client of Köpür: calls the services over gRPC,
//! runs the development token issuer and watches the events on NATS JetStream.
//!
//! # Layout
//! - [`cli`]: the clap types.
//! - [`enums`]: protobuf enums as kebab-case names (`--form forced-begging`).
//! - [`token`]: `token mint`, `issuer …` and the self-minted development token.
//! - [`rpc`]: what every gRPC command shares: the channel with the bearer
//!   token, request IDs, command results.
//! - [`case`], [`person`]: `case …` and `person get`, the identification service.
//! - [`consent`], [`referral`], [`plan`]: the referral service.
//! - [`shelter`]: `shelter …`, the shelter service.
//! - [`repatriation`]: `return …`, the repatriation service.
//! - [`casepath`]: `path`, `inbox`, `paths`, `stats`: casepath's queries.
//! - [`events`]: `events watch`.
//! - [`ops`]: `ops …`, the operator's service on every service.
//! - [`audit`]: `audit …`, the auditor's service on every service.
//! - [`cli::xborder`]: `xborder keygen`, `xborder tls`: keys for crossing the border.
//! - [`output`]: JSON through the descriptor pool, text, errors.

use std::process::ExitCode;

use clap::Parser;

mod audit;
mod case;
mod casepath;
mod cli;
mod consent;
mod enums;
mod events;
mod ops;
mod output;
mod person;
mod plan;
mod referral;
mod repatriation;
mod rpc;
mod shelter;
mod token;

use cli::{Cli, Command, EventsCommand, IssuerCommand, TokenCommand};

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) if is_broken_pipe(&error) => ExitCode::SUCCESS,
        Err(error) => {
            output::print_error(&error);
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Token(TokenCommand::Mint(args)) => token::mint(&args),
        Command::Issuer(IssuerCommand::Init(args)) => token::issuer_init(&args.dir),
        Command::Issuer(IssuerCommand::Rotate(args)) => token::issuer_rotate(&args.dir),
        Command::Issuer(IssuerCommand::Retire(args)) => token::issuer_retire(&args.dir.dir, &args.kid),
        Command::Issuer(IssuerCommand::Keys(args)) => token::issuer_keys(&args.dir),
        Command::Case(command) => case::run(&cli.global, command).await,
        Command::Person(command) => person::run(&cli.global, command).await,
        Command::Consent(command) => consent::run(&cli.global, command).await,
        Command::Referral(command) => referral::run(&cli.global, command).await,
        Command::Plan(command) => plan::run(&cli.global, command).await,
        Command::Shelter(command) => shelter::run(&cli.global, command).await,
        Command::Return(command) => repatriation::run(&cli.global, command).await,
        Command::Casepath(command) => casepath::run(&cli.global, command).await,
        Command::Events(EventsCommand::Watch(args)) => events::watch(args).await,
        Command::Ops(command) => ops::run(&cli.global, command).await,
        Command::Permissions(args) => {
            permissions(&args);
            Ok(())
        }
        Command::Xborder(command) => cli::xborder::run(command),
        Command::Audit(args) => match args.command() {
            Some(command) => audit::run(&cli.global, command).await,
            None => Err(anyhow::anyhow!(
                "audit: name a subcommand (verify, person) or --person ID"
            )),
        },
    }
}

/// The reader of our output went away (`nrmctl … | head`): not an error.
fn is_broken_pipe(error: &anyhow::Error) -> bool {
    error
        .chain()
        .filter_map(|cause| cause.downcast_ref::<std::io::Error>())
        .any(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
}

/// Prints the permission matrix, or one role's part of it.
fn permissions(args: &cli::PermissionsArgs) {
    use nrm_kernel::permissions::{MATRIX, markdown};
    match args.role {
        None => print!("{}", markdown()),
        Some(role) => {
            for permission in MATRIX {
                if let Some(scopes) = permission.scopes(role) {
                    let scopes: Vec<_> = scopes.iter().map(|s| s.as_str()).collect();
                    println!("{:<60} {}", permission.name(), scopes.join(", "));
                }
            }
        }
    }
}
