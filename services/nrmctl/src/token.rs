//! Bearer tokens and the development issuer: `token mint`, `issuer …`, and
//! the short-lived development token nrmctl makes for itself when no
//! `--token` is given but the issuer's private key is at hand. The key never
//! leaves this process: the services verify with the public `jwks.json`.

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use anyhow::{Context, Result};
use clap::builder::{PossibleValue, TypedValueParser};
use clap::error::ErrorKind;
use nrm_issuer::{DEFAULT_AUDIENCE, DEFAULT_ISSUER, SigningKey, TokenClaims};
use nrm_kernel::auth::Role;

use crate::cli::{Global, MintArgs};

/// The variable naming the issuer's private key.
const KEY_VAR: &str = "NRM_ISSUER_KEY";
/// Where `make run` keeps the issuer's private key (from the repository's root).
pub const DEFAULT_ISSUER_KEY: &str = ".data/issuer/signing-key.jwk";
/// The variable naming the token issuer.
const ISSUER_VAR: &str = "NRM_AUTH__ISSUER";
/// The variable naming the services' audience.
const AUDIENCE_VAR: &str = "NRM_AUTH__AUDIENCE";
/// Lifetime of the token nrmctl mints for its own calls.
const SELF_MINTED_TTL_SECONDS: i64 = 300;

/// `token mint`: prints a signed token.
///
/// # Errors
/// When the private key cannot be read.
pub fn mint(args: &MintArgs) -> Result<()> {
    let key = SigningKey::load(&args.key).with_context(|| {
        format!("token mint needs the issuer's private key ({KEY_VAR} or --key; `nrmctl issuer init` makes one)")
    })?;
    let token = sign(&key, &args.agency, args.role, &args.officer, args.ttl)?;
    crate::output::emit(&format!("{token}\n"))
}

/// The bearer token for a call: `--token`, else one minted from the
/// `--as-*` options when the issuer's private key is at hand, else none.
///
/// # Errors
/// When `NRM_ISSUER_KEY` names a key that cannot be read.
pub fn bearer(global: &Global) -> Result<Option<String>> {
    if let Some(token) = global.token.as_deref().map(str::trim).filter(|t| !t.is_empty()) {
        return Ok(Some(token.to_owned()));
    }
    let key = match std::env::var(KEY_VAR).ok().filter(|s| !s.is_empty()) {
        Some(path) => SigningKey::load(Path::new(&path)).with_context(|| format!("reading {KEY_VAR}"))?,
        None => match SigningKey::load(Path::new(DEFAULT_ISSUER_KEY)) {
            Ok(key) => key,
            Err(_) => return Ok(None),
        },
    };
    sign(
        &key,
        &global.as_agency,
        global.as_role,
        &global.as_officer,
        SELF_MINTED_TTL_SECONDS,
    )
    .map(Some)
}

fn env_or(var: &str, default: &str) -> String {
    std::env::var(var)
        .ok()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| default.to_owned())
}

fn sign(key: &SigningKey, agency: &str, role: Role, officer: &str, ttl_seconds: i64) -> Result<String> {
    let claims = TokenClaims::new(
        &env_or(ISSUER_VAR, DEFAULT_ISSUER),
        &env_or(AUDIENCE_VAR, DEFAULT_AUDIENCE),
        agency,
        role.as_str(),
        officer,
        ttl_seconds,
    );
    key.sign(&claims)
}

/// `issuer init`: a new issuer folder.
///
/// # Errors
/// When the folder holds a key already or cannot be written.
pub fn issuer_init(dir: &Path) -> Result<()> {
    let key = nrm_issuer::init(dir)?;
    print_issuer(dir, "created", &key)
}

/// `issuer rotate`: a new signing key; the old public key stays.
///
/// # Errors
/// When the folder is no issuer folder or cannot be written.
pub fn issuer_rotate(dir: &Path) -> Result<()> {
    let key = nrm_issuer::rotate(dir)?;
    print_issuer(dir, "rotated", &key)
}

/// `issuer retire`: removes an old public key.
///
/// # Errors
/// When `kid` is the signing key or not in the set.
pub fn issuer_retire(dir: &Path, kid: &str) -> Result<()> {
    nrm_issuer::retire(dir, kid)?;
    crate::output::emit(&format!("retired {kid}\n"))
}

/// `issuer keys`: the key IDs of the set.
///
/// # Errors
/// When the set cannot be read.
pub fn issuer_keys(dir: &Path) -> Result<()> {
    let kids = nrm_issuer::kids(dir)?;
    crate::output::emit(&kids.iter().map(|k| format!("{k}\n")).collect::<String>())
}

fn print_issuer(dir: &Path, what: &str, key: &SigningKey) -> Result<()> {
    let jwks: PathBuf = std::path::absolute(nrm_issuer::jwks_path(dir))?;
    crate::output::emit(&format!(
        "{what}: signing key {kid}\n  private key  {key}   (for nrmctl only: {KEY_VAR})\n  public keys  {jwks}   (for the services: NRM_AUTH__JWKS=file://{jwks})\n",
        kid = key.kid(),
        key = nrm_issuer::signing_key_path(dir).display(),
        jwks = jwks.display(),
    ))
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
        let names = role_names();
        assert!(err.ends_with(&names[names.len() - 2..].join(", ")), "{err}");
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
        let names = role_names();
        assert!(help.contains(&names[names.len() - 2..].join(", ")), "{help}");
    }
}
