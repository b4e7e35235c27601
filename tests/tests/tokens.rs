//! Bearer tokens against a real identification service over gRPC: every
//! token the services must not take (expired, not yet valid, another
//! issuer or audience, `alg: none`, HS256 signed with the public key, an
//! unknown `kid`, a forged signature, too long a lifetime) is refused with
//! `UNAUTHENTICATED`, names nothing of the token, and writes to no table but
//! the audit log.

#![allow(clippy::unwrap_used)] // Test code: a failed unwrap is a failed test.

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use nrm_e2e::{TestApp, authorized, issuer_key, person, report_request, token};
use nrm_issuer::{DEFAULT_AUDIENCE, DEFAULT_ISSUER, SigningKey, TokenClaims};
use nrm_kernel::auth::Role;
use nrm_proto::identification::v1 as pb;
use tonic::Code;

fn claims() -> TokenClaims {
    TokenClaims::new(
        DEFAULT_ISSUER,
        DEFAULT_AUDIENCE,
        "kg-mvd",
        Role::Police.as_str(),
        "officer-17",
        600,
    )
}

fn b64(json: &serde_json::Value) -> String {
    URL_SAFE_NO_PAD.encode(serde_json::to_vec(json).unwrap())
}

/// Every kind of token a service must refuse, by name.
fn bad_tokens() -> Vec<(&'static str, String)> {
    let key = issuer_key();
    let now = chrono::Utc::now().timestamp();
    let signed = |claims: &TokenClaims| key.sign(claims).unwrap();
    let mut hs256 = Header::new(Algorithm::HS256);
    hs256.kid = Some(key.kid().to_owned());
    let none_header = b64(&serde_json::json!({"alg": "none", "typ": "JWT", "kid": key.kid()}));
    let mut no_kid = Header::new(Algorithm::EdDSA);
    no_kid.kid = None;
    vec![
        (
            "expired",
            signed(&TokenClaims {
                iat: now - 1_000,
                exp: now - 100,
                ..claims()
            }),
        ),
        (
            "not yet valid",
            signed(&TokenClaims {
                nbf: Some(now + 600),
                exp: now + 1_200,
                ..claims()
            }),
        ),
        (
            "wrong issuer",
            signed(&TokenClaims {
                iss: "https://idp.elsewhere.example".into(),
                ..claims()
            }),
        ),
        (
            "wrong audience",
            signed(&TokenClaims {
                aud: "another-system".into(),
                ..claims()
            }),
        ),
        (
            "lifetime too long",
            signed(&TokenClaims::new(
                DEFAULT_ISSUER,
                DEFAULT_AUDIENCE,
                "kg-mvd",
                "police",
                "officer-17",
                86_400,
            )),
        ),
        (
            "alg none",
            format!("{none_header}.{}.", b64(&serde_json::to_value(claims()).unwrap())),
        ),
        (
            "HS256 signed with the public key",
            jsonwebtoken::encode(&hs256, &claims(), &EncodingKey::from_secret(&key.public_bytes())).unwrap(),
        ),
        (
            "HS256 signed with the public JWK",
            jsonwebtoken::encode(
                &hs256,
                &claims(),
                &EncodingKey::from_secret(&serde_json::to_vec(&key.public_jwk()).unwrap()),
            )
            .unwrap(),
        ),
        ("unknown kid", SigningKey::generate().sign(&claims()).unwrap()),
        (
            "another key under the issuer's kid",
            SigningKey::generate().with_kid(key.kid()).sign(&claims()).unwrap(),
        ),
        (
            "no kid",
            jsonwebtoken::encode(&no_kid, &claims(), &key.encoding_key()).unwrap(),
        ),
        ("not a JWT", "not-a-token".into()),
    ]
}

#[tokio::test]
async fn every_bad_token_is_refused_unauthenticated_and_writes_nothing_but_the_audit() {
    let app = TestApp::spawn().await;
    let tables = app.tables();
    let before = tables.snapshot().await;
    for (what, bad) in bad_tokens() {
        let reported = app
            .client
            .clone()
            .report_presumed_victim(authorized(
                report_request(
                    &uuid::Uuid::now_v7().to_string(),
                    person("Aigul Asanova", "AC1234567", "+996 555 000 111"),
                ),
                &bad,
            ))
            .await
            .expect_err(what);
        assert_eq!(reported.code(), Code::Unauthenticated, "{what}: {reported:?}");
        for part in bad.split('.').filter(|p| p.len() > 8) {
            assert!(
                !reported.message().contains(part),
                "{what}: the answer quotes the token"
            );
        }
        let listed = app
            .client
            .clone()
            .list_cases(authorized(pb::ListCasesRequest::default(), &bad))
            .await
            .expect_err(what);
        assert_eq!(listed.code(), Code::Unauthenticated, "{what}: {listed:?}");
    }
    let missing = app
        .client
        .clone()
        .list_cases(pb::ListCasesRequest::default())
        .await
        .expect_err("no token");
    assert_eq!(missing.code(), Code::Unauthenticated);
    tables
        .assert_changed_only_since(&before, &["audit_log"], "calls with bad tokens")
        .await;

    // The issuer's own token is taken: the refusals above are the tokens'.
    app.client
        .clone()
        .report_presumed_victim(authorized(
            report_request("good-token", person("Aigul Asanova", "AC1234567", "+996 555 000 111")),
            &token("kg-mvd", Role::Police, "officer-17"),
        ))
        .await
        .expect("a good token is taken");
    app.stop().await;
}
