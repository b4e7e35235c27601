//! Bearer tokens: `token mint`, and the short-lived development token nrmctl
//! makes for itself when no `--token` is given but the signing key is at hand.

use std::ffi::OsStr;
use std::str::FromStr;

use anyhow::{Context, Result, bail};
use clap::builder::{PossibleValue, TypedValueParser};
use clap::error::ErrorKind;
use nrm_kernel::auth::{self, Role};
use secrecy::SecretString;

use crate::cli::{Global, MintArgs};

/// The variable holding the services' HMAC signing key.
const SECRET_VAR: &str = "NRM_AUTH__JWT_SECRET";
/// The variable naming the token issuer.
const ISSUER_VAR: &str = "NRM_AUTH__ISSUER";
/// The issuer the services expect unless configured otherwise.
const DEFAULT_ISSUER: &str = "kopur";
/// Lifetime of the token nrmctl mints for its own calls.
const SELF_MINTED_TTL_SECONDS: i64 = 300;

/// `token mint`: prints a signed token.
///
/// # Errors
/// When the signing key is not set or signing fails.
pub fn mint(args: &MintArgs) -> Result<()> {
    let Some(secret) = secret() else {
        bail!("token mint needs the signing key in {SECRET_VAR}");
    };
    let token = sign(&secret, &args.agency, args.role, &args.officer, args.ttl)?;
    crate::output::emit(&format!("{token}\n"))
}

/// The bearer token for a call: `--token`, else one minted from the
/// `--as-*` options when the signing key is set, else none.
///
/// # Errors
/// When minting fails.
pub fn bearer(global: &Global) -> Result<Option<String>> {
    if let Some(token) = global.token.as_deref().map(str::trim).filter(|t| !t.is_empty()) {
        return Ok(Some(token.to_owned()));
    }
    let Some(secret) = secret() else {
        return Ok(None);
    };
    sign(
        &secret,
        &global.as_agency,
        global.as_role,
        &global.as_officer,
        SELF_MINTED_TTL_SECONDS,
    )
    .map(Some)
}

fn secret() -> Option<SecretString> {
    std::env::var(SECRET_VAR)
        .ok()
        .filter(|s| !s.is_empty())
        .map(SecretString::from)
}

fn sign(secret: &SecretString, agency: &str, role: Role, officer: &str, ttl_seconds: i64) -> Result<String> {
    let issuer = std::env::var(ISSUER_VAR)
        .ok()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| DEFAULT_ISSUER.to_owned());
    let claims = auth::claims(&issuer, agency, role, officer, ttl_seconds);
    auth::mint(secret, &claims).context("signing the token")
}

/// Parses a role code; `-` may stand for `_` (`border-service`).
///
/// # Errors
/// A message listing the roles.
pub fn parse_role(text: &str) -> Result<Role, String> {
    Role::from_str(&text.trim().to_ascii_lowercase().replace('-', "_"))
        .map_err(|_| format!("unknown role '{}'; one of: {}", text.trim(), role_names().join(", ")))
}

/// Every role's command-line name (`border-service`), from [`Role::ALL`].
fn role_names() -> Vec<String> {
    Role::ALL.iter().map(|role| role.as_str().replace('_', "-")).collect()
}

/// The clap value parser of `--as-role` and `token mint --role`: every
/// role of the kernel is listed in `--help`, so a new role shows up there
/// by itself.
#[derive(Debug, Clone, Copy)]
pub struct RoleParser;

impl TypedValueParser for RoleParser {
    type Value = Role;

    fn parse_ref(&self, cmd: &clap::Command, arg: Option<&clap::Arg>, value: &OsStr) -> Result<Role, clap::Error> {
        let text = value
            .to_str()
            .ok_or_else(|| clap::Error::new(ErrorKind::InvalidUtf8).with_cmd(cmd))?;
        parse_role(text).map_err(|message| {
            let arg = arg.map_or_else(|| "value".to_owned(), ToString::to_string);
            clap::Error::raw(
                ErrorKind::InvalidValue,
                format!("invalid value for '{arg}': {message}\n"),
            )
            .with_cmd(cmd)
        })
    }

    fn possible_values(&self) -> Option<Box<dyn Iterator<Item = PossibleValue> + '_>> {
        Some(Box::new(role_names().into_iter().map(PossibleValue::new)))
    }
}

/// Parses a lifetime such as `90s`, `30m`, `8h`, `1d`, `2w` or `1h30m` into
/// seconds.
///
/// # Errors
/// A message saying what is wrong: no unit, unknown unit, zero, overflow.
pub fn parse_ttl(text: &str) -> Result<i64, String> {
    let usage = "use a number and a unit, like 90s, 30m, 8h, 1d, 2w or 1h30m";
    let text = text.trim();
    if text.is_empty() {
        return Err(format!("empty lifetime; {usage}"));
    }
    let mut total: i64 = 0;
    let mut rest = text;
    while !rest.is_empty() {
        let digits = rest.find(|c: char| !c.is_ascii_digit()).unwrap_or(rest.len());
        if digits == 0 {
            return Err(format!("'{text}' is not a lifetime; {usage}"));
        }
        let number: i64 = rest[..digits].parse().map_err(|_| format!("'{text}' is too long"))?;
        rest = &rest[digits..];
        let unit_len = rest.find(|c: char| c.is_ascii_digit()).unwrap_or(rest.len());
        let unit = match &rest[..unit_len] {
            "s" => 1,
            "m" => 60,
            "h" => 3_600,
            "d" => 86_400,
            "w" => 604_800,
            "" => return Err(format!("'{text}' lacks a unit; {usage}")),
            other => return Err(format!("unknown unit '{other}' in '{text}'; {usage}")),
        };
        rest = &rest[unit_len..];
        total = number
            .checked_mul(unit)
            .and_then(|seconds| total.checked_add(seconds))
            .ok_or_else(|| format!("'{text}' is too long"))?;
    }
    if total == 0 {
        return Err(format!("'{text}' is zero; a token must live a while"));
    }
    Ok(total)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lifetimes_with_one_or_more_units_are_seconds() {
        assert_eq!(parse_ttl("90s"), Ok(90));
        assert_eq!(parse_ttl("30m"), Ok(1_800));
        assert_eq!(parse_ttl("8h"), Ok(28_800));
        assert_eq!(parse_ttl("1d"), Ok(86_400));
        assert_eq!(parse_ttl("2w"), Ok(1_209_600));
        assert_eq!(parse_ttl("1h30m"), Ok(5_400));
        assert_eq!(parse_ttl(" 1d12h "), Ok(129_600));
    }

    #[test]
    fn lifetimes_without_units_or_with_unknown_units_are_refused() {
        for bad in [
            "",
            "8",
            "h",
            "8x",
            "8 h",
            "-1h",
            "1.5h",
            "0m",
            "99999999999999999999s",
            "9223372036854775807w",
        ] {
            assert!(parse_ttl(bad).is_err(), "{bad:?} should be refused");
        }
    }

    #[test]
    fn roles_accept_dashes_for_underscores() {
        assert_eq!(parse_role("border-service"), Ok(Role::BorderService));
        assert_eq!(parse_role("Police"), Ok(Role::Police));
        assert_eq!(parse_role("operator"), Ok(Role::Operator));
        let err = parse_role("mayor").expect_err("no such role");
        assert!(err.contains("border-service"), "{err}");
        assert!(err.ends_with("coordinator, auditor, operator"), "{err}");
    }

    #[test]
    fn the_help_lists_every_role_of_the_kernel() {
        use clap::CommandFactory;

        let mut cli = crate::cli::Cli::command();
        let help = cli
            .find_subcommand_mut("token")
            .and_then(|token| token.find_subcommand_mut("mint"))
            .expect("token mint")
            .render_help()
            .to_string();
        for role in role_names() {
            assert!(help.contains(&role), "{role} missing from:\n{help}");
        }
        let help = crate::cli::Cli::command().render_long_help().to_string();
        assert!(help.contains("coordinator, auditor, operator"), "{help}");
    }
}
