//! Issue 11: bad input gets a clear answer. Every casepath RPC with a
//! malformed ID, page token, page size, enum value or period answers
//! INVALID_ARGUMENT naming the offending fields (google.rpc.BadRequest);
//! the canary pasted into `person_id` (a name, a passport number, a phone,
//! an address, Cyrillic) appears in no answer and no log line or span.

#![allow(clippy::unwrap_used)] // Test code: a failed unwrap is a failed test.

use futures::StreamExt as _;
use nrm_e2e::authorized;
use nrm_e2e::canary::{self, assert_clean, capture};
use nrm_e2e::casepath::{Caller, Country};
use nrm_kernel::auth::Role;
use nrm_proto::casepath::v1 as cp;
use tonic::{Code, Status};
use tonic_types::StatusExt as _;

/// The fields an INVALID_ARGUMENT names.
fn fields(status: &Status) -> Vec<String> {
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    status
        .get_details_bad_request()
        .expect("a BadRequest")
        .field_violations
        .into_iter()
        .map(|v| v.field)
        .collect()
}

/// Asserts `answer` is INVALID_ARGUMENT naming each of `named` (a field
/// name or, `a|b`, one of them) and carries no canary.
fn assert_names<T: std::fmt::Debug>(what: &str, answer: Result<T, Status>, named: &[&str]) {
    let status = answer.expect_err(what);
    let fields = fields(&status);
    for field in named {
        assert!(
            field.split('|').any(|f| fields.iter().any(|named| named == f)),
            "{what}: {field} among {fields:?}"
        );
    }
    assert_clean(format!("{status:?}").as_bytes(), what);
}

/// Spoils one field of a request.
type Mangle<R> = fn(&mut R);

#[tokio::test]
async fn every_rpc_names_the_malformed_fields_and_no_canary_leaks() {
    let logs = capture();
    let kg = Country::alone("kg", |_| {}).await;
    let coordinator = kg.caller(Role::Coordinator);
    let msd = kg.caller(Role::Msd);
    let c = kg.casepath.client.clone();
    let token = |who: &Caller| who.token();
    let mut calls = 0;

    // A person ID that is no UUID, or carries a canary.
    let mut bad_ids: Vec<String> = canary::values();
    bad_ids.extend(["".into(), "p-1".into(), format!("{}-1", uuid::Uuid::now_v7())]);
    for who in [&coordinator, &msd] {
        for id in &bad_ids {
            let request = || cp::GetPathRequest { person_id: id.clone() };
            assert_names(
                "GetPath",
                c.clone().get_path(authorized(request(), &token(who))).await,
                &["person_id"],
            );
            let watched = match c.clone().watch_path(authorized(request(), &token(who))).await {
                Err(status) => Err(status),
                Ok(stream) => match stream.into_inner().next().await {
                    Some(Err(status)) => Err(status),
                    other => Ok(format!("{other:?}")),
                },
            };
            assert_names("WatchPath", watched, &["person_id"]);
            calls += 2;
        }
    }

    // Inboxes: page token, page size, kind.
    let inbox = |f: fn(&mut cp::ListInboxRequest)| {
        let mut r = cp::ListInboxRequest::default();
        f(&mut r);
        r
    };
    let bad_inboxes: [(Mangle<cp::ListInboxRequest>, &[&str]); 4] = [
        (|r| r.page_token = "not-a-token".into(), &["page_token"]),
        (|r| r.page_token = canary::NAME.into(), &["page_token"]),
        (|r| r.page_size = 501, &["page_size"]),
        (|r| r.kind = 99, &["kind"]),
    ];
    for (make, named) in bad_inboxes {
        assert_names(
            "ListInbox",
            c.clone()
                .list_inbox(authorized(inbox(make), &token(&coordinator)))
                .await,
            named,
        );
        let watched = match c
            .clone()
            .watch_inbox(authorized(inbox(make), &token(&coordinator)))
            .await
        {
            Err(status) => Err(status),
            Ok(stream) => match stream.into_inner().next().await {
                Some(Err(status)) => Err(status),
                other => Ok(format!("{other:?}")),
            },
        };
        assert_names("WatchInbox", watched, named);
        calls += 2;
    }

    // Paths: page token, page size, stage, a period the wrong way round.
    let t = |seconds| Some(prost_types::Timestamp { seconds, nanos: 0 });
    let bad_lists: Vec<(cp::ListPathsRequest, &[&str])> = vec![
        (
            cp::ListPathsRequest {
                page_token: "%%%".into(),
                ..Default::default()
            },
            &["page_token"],
        ),
        (
            cp::ListPathsRequest {
                page_size: 100_000,
                ..Default::default()
            },
            &["page_size"],
        ),
        (
            cp::ListPathsRequest {
                stage: 77,
                ..Default::default()
            },
            &["stage"],
        ),
        (
            cp::ListPathsRequest {
                reported_from: t(1_800_000_000),
                reported_to: t(1_700_000_000),
                ..Default::default()
            },
            &["reported_from|reported_to"],
        ),
        (
            cp::ListPathsRequest {
                reported_from: Some(prost_types::Timestamp {
                    seconds: 1_700_000_000,
                    nanos: -5,
                }),
                page_token: "x".into(),
                ..Default::default()
            },
            &["reported_from", "page_token"],
        ),
    ];
    for (request, named) in bad_lists {
        assert_names(
            "ListPaths",
            c.clone().list_paths(authorized(request, &token(&coordinator))).await,
            named,
        );
        calls += 1;
    }

    // Statistics: a period missing, reversed, or unbounded.
    let bad_stats: Vec<(cp::GetStatisticsRequest, &[&str])> = vec![
        (cp::GetStatisticsRequest::default(), &["from", "to"]),
        (
            cp::GetStatisticsRequest {
                from: t(1_700_000_000),
                ..Default::default()
            },
            &["to"],
        ),
        (
            cp::GetStatisticsRequest {
                from: t(1_800_000_000),
                to: t(1_700_000_000),
                ..Default::default()
            },
            &["from|to"],
        ),
    ];
    for (request, named) in bad_stats {
        assert_names(
            "GetStatistics",
            c.clone()
                .get_statistics(authorized(request, &token(&coordinator)))
                .await,
            named,
        );
        calls += 1;
    }
    println!("{calls} malformed calls, each INVALID_ARGUMENT naming its fields");

    kg.stop(&[]).await;
    assert_clean(&logs.logs(), "the logs and spans");
}
