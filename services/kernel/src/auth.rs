//! Authentication: every RPC carries `authorization: Bearer <JWT>` naming the
//! caller's agency, role and (pseudonymous) officer. The verified caller
//! becomes the actor of every event the call appends.
//!
//! Tokens are HS256 JWTs signed with `NRM_AUTH__JWT_SECRET`; `nrmctl token
//! mint` makes development tokens with the same key. What each role may do is
//! decided by each service with [`Role`] (the full permission matrix grows
//! with the services).

use std::fmt;
use std::str::FromStr;
use std::sync::Arc;

use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Serialize};

use crate::error::AppError;
use crate::store::Actor;

/// A role in the referral mechanism.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Role {
    /// Police (anti-trafficking units): report, screen, decide.
    Police,
    /// Prosecutors: report, screen, decide.
    Prosecutor,
    /// Border service: report, screen.
    BorderService,
    /// NGOs: report presumed victims.
    Ngo,
    /// Hotlines: report presumed victims, and nothing more.
    Hotline,
    /// IOM offices: report; repatriation.
    Iom,
    /// Consulates (MFA): repatriation.
    Consulate,
    /// Ministry of Social Development.
    Msd,
    /// Ministry of Health.
    Moh,
    /// Shelters and crisis centres.
    Shelter,
    /// National coordinator: sees every case.
    Coordinator,
    /// Auditors: read the audit trail, and nothing else.
    Auditor,
    /// Operators of the deployment: parked items, refilling the bus; no case data.
    Operator,
}

impl Role {
    /// Every role, for help texts.
    pub const ALL: [Role; 13] = [
        Role::Police,
        Role::Prosecutor,
        Role::BorderService,
        Role::Ngo,
        Role::Hotline,
        Role::Iom,
        Role::Consulate,
        Role::Msd,
        Role::Moh,
        Role::Shelter,
        Role::Coordinator,
        Role::Auditor,
        Role::Operator,
    ];

    /// The role's code in tokens and events.
    #[must_use]
    pub const fn as_str(self) -> &'static str {
        match self {
            Role::Police => "police",
            Role::Prosecutor => "prosecutor",
            Role::BorderService => "border_service",
            Role::Ngo => "ngo",
            Role::Hotline => "hotline",
            Role::Iom => "iom",
            Role::Consulate => "consulate",
            Role::Msd => "msd",
            Role::Moh => "moh",
            Role::Shelter => "shelter",
            Role::Coordinator => "coordinator",
            Role::Auditor => "auditor",
            Role::Operator => "operator",
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Role {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Role::ALL
            .into_iter()
            .find(|r| r.as_str() == s)
            .ok_or_else(|| format!("unknown role; one of: {}", Role::ALL.map(Role::as_str).join(", ")))
    }
}

/// The claims of a Köpür token.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Claims {
    /// Pseudonymous officer ID.
    pub sub: String,
    /// Agency code.
    pub agency: String,
    /// Role code.
    pub role: String,
    /// Issuer.
    pub iss: String,
    /// Issued at (seconds since the epoch).
    pub iat: i64,
    /// Expiry (seconds since the epoch).
    pub exp: i64,
}

/// The verified caller of an RPC.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    /// The caller as it is recorded on events.
    pub actor: Actor,
    /// The caller's role.
    pub role: Role,
}

impl Caller {
    /// Fails with `PERMISSION_DENIED` unless the caller has one of `roles`.
    ///
    /// # Errors
    /// [`AppError::PermissionDenied`] naming the action.
    pub fn require(&self, action: &str, roles: &[Role]) -> Result<(), AppError> {
        if roles.contains(&self.role) {
            Ok(())
        } else {
            Err(AppError::PermissionDenied(format!(
                "role {} may not {action}; allowed: {}",
                self.role,
                roles.iter().map(|r| r.as_str()).collect::<Vec<_>>().join(", ")
            )))
        }
    }
}

/// Verifies bearer tokens.
#[derive(Clone)]
pub struct Authenticator {
    key: Arc<DecodingKey>,
    validation: Arc<Validation>,
}

impl fmt::Debug for Authenticator {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Authenticator(..)")
    }
}

impl Authenticator {
    /// Verifies tokens signed with `secret` and issued by `issuer`.
    #[must_use]
    pub fn new(secret: &SecretString, issuer: &str) -> Self {
        let mut validation = Validation::new(Algorithm::HS256);
        validation.set_issuer(&[issuer]);
        validation.set_required_spec_claims(&["exp", "iss", "sub"]);
        validation.leeway = 30;
        Self {
            key: Arc::new(DecodingKey::from_secret(secret.expose_secret().as_bytes())),
            validation: Arc::new(validation),
        }
    }

    /// The caller named by `authorization` metadata.
    ///
    /// # Errors
    /// [`AppError::Unauthenticated`] for a missing, malformed, expired or
    /// wrongly signed token, or an unknown role.
    pub fn verify(&self, metadata: &tonic::metadata::MetadataMap) -> Result<Caller, AppError> {
        let header = metadata
            .get("authorization")
            .ok_or(AppError::Unauthenticated(
                "missing authorization metadata (Bearer token)",
            ))?
            .to_str()
            .map_err(|_| AppError::Unauthenticated("authorization metadata is not text"))?;
        let token = header
            .strip_prefix("Bearer ")
            .or_else(|| header.strip_prefix("bearer "))
            .ok_or(AppError::Unauthenticated("authorization must be 'Bearer <token>'"))?;
        let data = jsonwebtoken::decode::<Claims>(token.trim(), &self.key, &self.validation)
            .map_err(|_| AppError::Unauthenticated("token is invalid or expired"))?;
        let claims = data.claims;
        let role =
            Role::from_str(&claims.role).map_err(|_| AppError::Unauthenticated("token names an unknown role"))?;
        if claims.agency.is_empty() || claims.sub.is_empty() {
            return Err(AppError::Unauthenticated("token lacks agency or officer"));
        }
        Ok(Caller {
            actor: Actor {
                agency: claims.agency,
                role: claims.role,
                officer: claims.sub,
            },
            role,
        })
    }
}

/// Signs a token (development tokens, tests).
///
/// # Errors
/// When signing fails (never with an HMAC key).
pub fn mint(secret: &SecretString, claims: &Claims) -> Result<String, jsonwebtoken::errors::Error> {
    jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        claims,
        &EncodingKey::from_secret(secret.expose_secret().as_bytes()),
    )
}

/// Claims for `officer` of `agency` in `role`, valid for `ttl_seconds` from now.
#[must_use]
pub fn claims(issuer: &str, agency: &str, role: Role, officer: &str, ttl_seconds: i64) -> Claims {
    let now = chrono::Utc::now().timestamp();
    Claims {
        sub: officer.to_owned(),
        agency: agency.to_owned(),
        role: role.as_str().to_owned(),
        iss: issuer.to_owned(),
        iat: now,
        exp: now + ttl_seconds,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn metadata(token: &str) -> tonic::metadata::MetadataMap {
        let mut m = tonic::metadata::MetadataMap::new();
        m.insert("authorization", format!("Bearer {token}").parse().unwrap());
        m
    }

    #[test]
    fn a_minted_token_names_the_caller() {
        let secret = SecretString::from("dev-secret-dev-secret-dev-secret");
        let token = mint(&secret, &claims("kopur", "kg-mvd", Role::Police, "officer-17", 60)).unwrap();
        let caller = Authenticator::new(&secret, "kopur").verify(&metadata(&token)).unwrap();
        assert_eq!(caller.role, Role::Police);
        assert_eq!(caller.actor.agency, "kg-mvd");
        assert_eq!(caller.actor.officer, "officer-17");
    }

    #[test]
    fn wrong_key_expired_or_missing_tokens_are_refused() {
        let secret = SecretString::from("dev-secret-dev-secret-dev-secret");
        let other = SecretString::from("another-secret-another-secret-xx");
        let auth = Authenticator::new(&secret, "kopur");
        let forged = mint(&other, &claims("kopur", "kg-mvd", Role::Police, "o", 60)).unwrap();
        assert!(matches!(
            auth.verify(&metadata(&forged)),
            Err(AppError::Unauthenticated(_))
        ));
        let expired = mint(&secret, &claims("kopur", "kg-mvd", Role::Police, "o", -3600)).unwrap();
        assert!(matches!(
            auth.verify(&metadata(&expired)),
            Err(AppError::Unauthenticated(_))
        ));
        assert!(matches!(
            auth.verify(&tonic::metadata::MetadataMap::new()),
            Err(AppError::Unauthenticated(_))
        ));
    }

    #[test]
    fn roles_outside_the_list_are_denied() {
        let caller = Caller {
            actor: Actor {
                agency: "kg-moh".into(),
                role: "moh".into(),
                officer: "o".into(),
            },
            role: Role::Moh,
        };
        assert!(caller.require("decide identification", &[Role::Police]).is_err());
        assert!(caller.require("read", &[Role::Moh]).is_ok());
    }
}
