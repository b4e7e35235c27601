//! The tamper-evident audit trail against the real PostgreSQL: the service's
//! database user cannot rewrite it, an insider who disables the triggers is
//! caught by the verification, concurrent writers leave a gapless chain; the
//! auditor's service answers the auditor only and the auditor nothing else;
//! `nrmctl audit verify` and `nrmctl audit person` as an auditor runs them.

#![allow(clippy::unwrap_used)] // Test code: a failed unwrap is a failed test.

use std::process::{Command, Output};
use std::time::Duration;

use nrm_e2e::casepath::{CasepathApp, casepath_settings};
use nrm_e2e::fixtures::{metadata, reported};
use nrm_e2e::raw::RawConnection;
use nrm_e2e::repatriation::{CountryKeys, RepatriationApp, repatriation_settings};
use nrm_e2e::{Parts, ReferralApp, ShelterApp, TestApp, authorized, binary, eventually, issuer_key_path, token};
use nrm_kernel::audit::{self, BreakKind, Entry, Outcome};
use nrm_kernel::auth::Role;
use nrm_kernel::store::{Actor, Append, Appended, AuditEntry, CommandRecord, EventStore};
use nrm_proto::common::v1::audit_service_client::AuditServiceClient;
use nrm_proto::common::v1::{ChainBreak, ListEntriesRequest, VerifyChainRequest};
use prost::Message as _;
use sqlx::PgPool;
use tonic::transport::Channel;
use uuid::Uuid;

fn officer(n: usize) -> Actor {
    Actor {
        agency: "kg-mvd".into(),
        role: "police".into(),
        officer: format!("officer-{n}"),
    }
}

/// Appends `n` entries, one transaction each.
async fn append_entries(pool: &PgPool, n: usize) {
    for i in 0..n {
        let actor = officer(i);
        let mut tx = pool.begin().await.unwrap();
        audit::append(
            &mut tx,
            &Entry::new(&actor, "GetCase", &format!("case-{i}"), "case review"),
        )
        .await
        .unwrap();
        tx.commit().await.unwrap();
    }
}

/// Runs `sql` as an insider with the rights to switch the triggers off.
async fn as_insider(pool: &PgPool, sql: &'static str) {
    let mut tx = pool.begin().await.unwrap();
    sqlx::query("SET LOCAL session_replication_role = replica")
        .execute(&mut *tx)
        .await
        .unwrap();
    sqlx::query(sql).execute(&mut *tx).await.unwrap();
    tx.commit().await.unwrap();
}

async fn broken_at(pool: &PgPool) -> Option<(i64, BreakKind)> {
    audit::verify(pool, None).await.unwrap().broken.map(|b| (b.seq, b.kind))
}

#[tokio::test]
async fn the_service_user_cannot_update_delete_or_truncate_the_audit_trail() {
    let parts = Parts::new().await;
    append_entries(&parts.pool, 2).await;
    for sql in [
        "UPDATE audit_log SET purpose = 'curiosity' WHERE seq = 1",
        "DELETE FROM audit_log WHERE seq = 2",
        "TRUNCATE audit_log",
        "UPDATE audit_chain_head SET seq = 1",
        "DELETE FROM audit_chain_head",
        "TRUNCATE audit_chain_head",
    ] {
        let refused = sqlx::query(sql).execute(&parts.pool).await.unwrap_err();
        assert!(
            refused.to_string().contains("append-only") || refused.to_string().contains("moves only"),
            "{sql}: {refused}"
        );
    }
    // A writer cannot choose its place in the chain either.
    sqlx::query(
        "INSERT INTO audit_log (agency, role, officer, action, subject_id, purpose, seq, prev_hash, hash)
         VALUES ('kg-mvd', 'police', 'officer-9', 'GetCase', 'case-9', 'x', 100, '\\x00', '\\x00')",
    )
    .execute(&parts.pool)
    .await
    .unwrap();
    let seqs: Vec<i64> = sqlx::query_scalar("SELECT seq FROM audit_log ORDER BY seq")
        .fetch_all(&parts.pool)
        .await
        .unwrap();
    assert_eq!(seqs, [1, 2, 3]);
    let verified = audit::verify(&parts.pool, None).await.unwrap();
    assert_eq!((verified.checked, verified.head_seq, verified.broken), (3, 3, None));
    parts.drop_all().await;
}

#[tokio::test]
async fn an_insider_who_switches_the_triggers_off_is_caught_by_the_verification() {
    let parts = Parts::new().await;
    let pool = &parts.pool;
    append_entries(pool, 6).await;
    assert_eq!(broken_at(pool).await, None);

    // One entry changed, then changed back.
    as_insider(pool, "UPDATE audit_log SET officer = 'officer-99' WHERE seq = 3").await;
    assert_eq!(broken_at(pool).await, Some((3, BreakKind::Changed)));
    as_insider(pool, "UPDATE audit_log SET officer = 'officer-2' WHERE seq = 3").await;
    assert_eq!(broken_at(pool).await, None);

    // Two entries exchanged (all but their seq), then exchanged back.
    let swap = "UPDATE audit_log a SET (prev_hash, hash, at, agency, role, officer, action, subject_id, person_id, purpose, outcome)
                = (SELECT b.prev_hash, b.hash, b.at, b.agency, b.role, b.officer, b.action, b.subject_id, b.person_id, b.purpose, b.outcome
                   FROM audit_log b WHERE b.seq = CASE a.seq WHEN 2 THEN 3 ELSE 2 END)
                WHERE a.seq IN (2, 3)";
    as_insider(pool, swap).await;
    assert_eq!(broken_at(pool).await, Some((2, BreakKind::Reordered)));
    as_insider(pool, swap).await;
    assert_eq!(broken_at(pool).await, None);

    // Only the contents exchanged: the hashes stay put and no longer fit.
    let contents = "UPDATE audit_log a SET (officer, subject_id)
                    = (SELECT b.officer, b.subject_id FROM audit_log b WHERE b.seq = CASE a.seq WHEN 4 THEN 5 ELSE 4 END)
                    WHERE a.seq IN (4, 5)";
    as_insider(pool, contents).await;
    assert_eq!(broken_at(pool).await, Some((4, BreakKind::Changed)));
    as_insider(pool, contents).await;

    assert_eq!(broken_at(pool).await, None);

    // The last entry removed (its head says there was one more), then one
    // from the middle.
    as_insider(pool, "DELETE FROM audit_log WHERE seq = 6").await;
    assert_eq!(broken_at(pool).await, Some((6, BreakKind::Removed)));
    as_insider(pool, "DELETE FROM audit_log WHERE seq = 4").await;
    assert_eq!(broken_at(pool).await, Some((4, BreakKind::Removed)));
    parts.drop_all().await;

    // A chain rewritten from an entry on, head and all, passes on its own;
    // only a head recorded elsewhere tells.
    let parts = Parts::new().await;
    let pool = &parts.pool;
    append_entries(pool, 4).await;
    let anchor = {
        let v = audit::verify(pool, None).await.unwrap();
        audit::Anchor {
            seq: v.head_seq,
            hash: v.head_hash,
        }
    };
    as_insider(
        pool,
        "DO $$
         DECLARE e RECORD; last BYTEA;
         BEGIN
             SELECT hash INTO last FROM audit_log WHERE seq = 1;
             FOR e IN SELECT * FROM audit_log WHERE seq > 1 ORDER BY seq LOOP
                 UPDATE audit_log SET purpose = 'rewritten', prev_hash = last,
                     hash = audit_entry_hash(e.seq, last, e.at, e.agency, e.role, e.officer, e.action,
                                             e.subject_id, e.person_id, 'rewritten', e.outcome)
                 WHERE seq = e.seq RETURNING hash INTO last;
             END LOOP;
             UPDATE audit_chain_head SET hash = last;
         END $$",
    )
    .await;
    assert_eq!(
        broken_at(pool).await,
        None,
        "a rewrite with fresh hashes holds together"
    );
    let anchored = audit::verify(pool, Some(anchor)).await.unwrap().broken.unwrap();
    assert_eq!((anchored.seq, anchored.kind), (4, BreakKind::Changed));
    parts.drop_all().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_writers_leave_a_gapless_chain_that_verifies() {
    const TASKS: usize = 8;
    const ROUNDS: usize = 50;
    let parts = Parts::new().await;
    let store = EventStore::new(parts.pool.clone());
    let writers = (0..TASKS).map(|task| {
        let store = store.clone();
        let pool = parts.pool.clone();
        let subject_prefix = parts.bus.subject("identification", "case", "");
        tokio::spawn(async move {
            let mut written = 0_i64;
            for round in 0..ROUNDS {
                let case_id = Uuid::now_v7();
                let stream_id = format!("case-{case_id}");
                match round % 3 {
                    // A command in one statement, its audit entry in the CTE.
                    0 => {
                        let events = [reported(case_id)];
                        let metadata = metadata();
                        let subject = format!("{subject_prefix}{case_id}");
                        let key = format!("kg-mvd:{case_id}");
                        store
                            .append_command(
                                &Append {
                                    stream_id: &stream_id,
                                    expected_version: 0,
                                    events: &events,
                                    metadata: &metadata,
                                    subject: &subject,
                                },
                                &Appended::plan(0, 1),
                                &CommandRecord {
                                    request_key: &key,
                                    fingerprint: b"fp",
                                    response: b"answer",
                                },
                                Some(&AuditEntry {
                                    action: "ReportPresumedVictim",
                                    subject_id: &stream_id,
                                    purpose: "command",
                                    person_id: None,
                                }),
                            )
                            .await
                            .unwrap();
                        written += 1;
                    }
                    // A read audited in its own transaction.
                    1 => {
                        let actor = officer(task);
                        let mut tx = pool.begin().await.unwrap();
                        audit::append(
                            &mut tx,
                            &Entry::new(&actor, "ReadPersonalData", &stream_id, "case review").person(case_id),
                        )
                        .await
                        .unwrap();
                        tx.commit().await.unwrap();
                        written += 1;
                    }
                    // A transaction that rolls back leaves no gap.
                    _ => {
                        let actor = officer(task);
                        let mut tx = pool.begin().await.unwrap();
                        audit::record(&mut tx, &actor, "GetCase", &stream_id, "case review")
                            .await
                            .unwrap();
                        tx.rollback().await.unwrap();
                    }
                }
            }
            written
        })
    });
    let mut expected = 0;
    for writer in futures::future::join_all(writers).await {
        expected += writer.unwrap();
    }
    let seqs: Vec<i64> = sqlx::query_scalar("SELECT seq FROM audit_log ORDER BY seq")
        .fetch_all(&parts.pool)
        .await
        .unwrap();
    assert_eq!(seqs, (1..=expected).collect::<Vec<_>>(), "gapless");
    let verified = audit::verify(&parts.pool, None).await.unwrap();
    assert_eq!(verified.broken, None);
    assert_eq!(
        (verified.checked, verified.head_seq),
        (u64::try_from(expected).unwrap(), expected)
    );
    println!("{TASKS} writers × {ROUNDS} rounds: {expected} entries chained, none lost, no gap");
    parts.drop_all().await;
}

/// Every method of `service` (full protobuf name), from the descriptor set.
fn methods(service: &str) -> Vec<String> {
    let set = prost_types::FileDescriptorSet::decode(nrm_proto::FILE_DESCRIPTOR_SET).unwrap();
    let found: Vec<String> = set
        .file
        .iter()
        .flat_map(|file| {
            let package = file.package().to_owned();
            file.service.iter().map(move |s| (package.clone(), s))
        })
        .filter(|(package, s)| format!("{package}.{}", s.name()) == service)
        .flat_map(|(_, s)| s.method.iter().map(|m| m.name().to_owned()))
        .collect();
    assert!(!found.is_empty(), "{service} has no methods");
    found
}

/// Calls `service`/`method` with an empty request as `token` (none: no
/// token); the status code it answers.
async fn call_code(channel: &Channel, service: &str, method: &str, token: Option<&str>) -> tonic::Code {
    let mut grpc = tonic::client::Grpc::new(channel.clone());
    grpc.ready().await.unwrap();
    let request = match token {
        Some(token) => authorized((), token),
        None => tonic::Request::new(()),
    };
    let path = tonic::codegen::http::uri::PathAndQuery::try_from(format!("/{service}/{method}")).unwrap();
    let answer = grpc
        .unary::<(), (), _>(request, path, tonic_prost::ProstCodec::default())
        .await;
    answer.map_or_else(|status| status.code(), |_| tonic::Code::Ok)
}

fn nrmctl(endpoints: [&str; 5], role: &str, args: &[&str]) -> Output {
    Command::new(binary("nrmctl"))
        .args(args)
        .env("NRM_ENDPOINT", endpoints[0])
        .env("NRM_REFERRAL_ENDPOINT", endpoints[1])
        .env("NRM_SHELTER_ENDPOINT", endpoints[2])
        .env("NRM_REPATRIATION_ENDPOINT", endpoints[3])
        .env("NRM_CASEPATH_ENDPOINT", endpoints[4])
        .env("NRM_ISSUER_KEY", issuer_key_path())
        .env("NRM_AGENCY", "kg-audit")
        .env("NRM_ROLE", role)
        .env("NRM_OFFICER", "auditor-1")
        .env_remove("NRM_TOKEN")
        .env_remove("NRM_OUTPUT")
        .output()
        .expect("run nrmctl")
}

fn text(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// One entry about `person` in `pool`, as a service that knows the person writes it.
async fn read_person(pool: &PgPool, person: Uuid, agency: &str, action: &str) {
    let actor = Actor {
        agency: agency.into(),
        role: "msd".into(),
        officer: "officer-7".into(),
    };
    let mut conn = pool.acquire().await.unwrap();
    audit::append(
        &mut conn,
        &Entry::new(&actor, action, &format!("referral-{person}"), "rehabilitation").person(person),
    )
    .await
    .unwrap();
}

// nrmctl runs as a blocking child process while the services answer on other threads.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_auditor_reads_the_audit_of_every_service_and_nothing_else() {
    let identification = TestApp::spawn().await;
    let referral = ReferralApp::spawn_beside(&identification).await;
    let shelter = ShelterApp::spawn().await;
    let repatriation = RepatriationApp::spawn_with(repatriation_settings(&CountryKeys::generate("kg"), &[])).await;
    let casepath = CasepathApp::spawn_with(casepath_settings(&identification.settings.nats, "kg")).await;
    let endpoints = [
        identification.endpoint.as_str(),
        referral.endpoint.as_str(),
        shelter.endpoint.as_str(),
        repatriation.endpoint.as_str(),
        casepath.endpoint.as_str(),
    ];
    let pools = [
        &identification.pool,
        &referral.pool,
        &shelter.pool,
        &repatriation.pool,
        &casepath.pool,
    ];
    let auditor = token("kg-audit", Role::Auditor, "auditor-1");
    let count = |pool: &PgPool, outcome: &'static str| {
        let pool = pool.clone();
        async move {
            sqlx::query_scalar::<_, i64>("SELECT count(*) FROM audit_log WHERE outcome = $1")
                .bind(outcome)
                .fetch_one(&pool)
                .await
                .unwrap()
        }
    };

    for (endpoint, (case_service, pool)) in endpoints.iter().zip(
        [
            "nrm.identification.v1.IdentificationService",
            "nrm.referral.v1.ReferralService",
            "nrm.shelter.v1.ShelterService",
            "nrm.repatriation.v1.RepatriationService",
            "nrm.casepath.v1.CasepathService",
        ]
        .into_iter()
        .zip(pools),
    ) {
        let channel = Channel::from_shared((*endpoint).to_owned())
            .unwrap()
            .connect()
            .await
            .unwrap();
        // The auditor reaches no case data, and not the operator's service.
        for method in methods(case_service) {
            assert_eq!(
                call_code(&channel, case_service, &method, Some(&auditor)).await,
                tonic::Code::PermissionDenied,
                "auditor calling {case_service}/{method}"
            );
        }
        let operator = "nrm.common.v1.OperatorService";
        let denied_before = count(pool, "denied").await;
        for method in methods(operator) {
            assert_eq!(
                call_code(&channel, operator, &method, Some(&auditor)).await,
                tonic::Code::PermissionDenied,
                "auditor calling {operator}/{method}"
            );
        }
        // Every other role is refused by the auditor's service, and audited.
        let service = "nrm.common.v1.AuditService";
        let audit_methods = methods(service);
        for role in Role::ALL.into_iter().filter(|r| *r != Role::Auditor) {
            let other = token("kg-mvd", role, "officer-1");
            for method in &audit_methods {
                assert_eq!(
                    call_code(&channel, service, method, Some(&other)).await,
                    tonic::Code::PermissionDenied,
                    "{role} calling {service}/{method}"
                );
            }
        }
        let refused = (Role::ALL.len() - 1) * audit_methods.len() + methods(operator).len();
        assert_eq!(
            count(pool, "denied").await - denied_before,
            i64::try_from(refused).unwrap(),
            "every refusal audited"
        );
        for method in &audit_methods {
            assert_eq!(
                call_code(&channel, service, method, None).await,
                tonic::Code::Unauthenticated
            );
            assert_eq!(
                call_code(&channel, service, method, Some(&auditor)).await,
                tonic::Code::Ok
            );
        }
        assert_eq!(
            count(pool, "unauthenticated").await,
            i64::try_from(audit_methods.len()).unwrap()
        );
    }

    // Entries about one person in all five services, listed merged by time.
    let person = Uuid::now_v7();
    read_person(&identification.pool, person, "kg-mvd", "ReadPersonalData").await;
    read_person(&referral.pool, person, "kg-msd", "GetReferral").await;
    read_person(&shelter.pool, person, "kg-shelter-1", "GetShelter").await;
    read_person(&repatriation.pool, person, "kg-iom", "GetReturn").await;
    read_person(&casepath.pool, person, "kg-coordinator", "GetPath").await;
    let listed = nrmctl(endpoints, "auditor", &["audit", "person", &person.to_string()]);
    assert!(listed.status.success(), "{}", String::from_utf8_lossy(&listed.stderr));
    let listed = text(&listed);
    let lines: Vec<&str> = listed.lines().collect();
    assert!(
        lines[0].starts_with("when") && lines[0].contains("service") && lines[0].ends_with("purpose"),
        "{listed}"
    );
    let rows: Vec<Vec<&str>> = lines[1..].iter().map(|l| l.split_whitespace().collect()).collect();
    let reads: Vec<(&str, &str, &str)> = rows
        .iter()
        .filter(|r| r[5] != "ListEntries")
        .map(|r| (r[1], r[2], r[5]))
        .collect();
    assert_eq!(
        reads,
        [
            ("identification", "kg-mvd", "ReadPersonalData"),
            ("referral", "kg-msd", "GetReferral"),
            ("shelter", "kg-shelter-1", "GetShelter"),
            ("repatriation", "kg-iom", "GetReturn"),
            ("casepath", "kg-coordinator", "GetPath"),
        ],
        "{listed}"
    );
    // The auditor's own reading is audited, about the same person, in each service.
    let own = rows
        .iter()
        .filter(|r| r[5] == "ListEntries" && r[4] == "auditor-1")
        .count();
    assert_eq!(own, 5, "{listed}");
    let times: Vec<&str> = rows.iter().map(|r| r[0]).collect();
    let mut sorted = times.clone();
    sorted.sort_unstable();
    assert_eq!(times, sorted, "merged by time");

    // Every chain holds; the heads printed can be given back.
    let verified = nrmctl(endpoints, "auditor", &["audit", "verify"]);
    assert!(
        verified.status.success(),
        "{}",
        String::from_utf8_lossy(&verified.stderr)
    );
    let verified = text(&verified);
    let rows: Vec<Vec<String>> = verified
        .lines()
        .skip(1)
        .map(|l| l.split_whitespace().map(str::to_owned).collect())
        .collect();
    assert_eq!(
        rows.iter().map(|r| (r[0].as_str(), r[3].as_str())).collect::<Vec<_>>(),
        [
            ("identification", "OK"),
            ("referral", "OK"),
            ("shelter", "OK"),
            ("repatriation", "OK"),
            ("casepath", "OK")
        ],
        "{verified}"
    );
    let heads: Vec<String> = rows.iter().map(|r| format!("{}={}", r[0], r[2])).collect();
    let mut args = vec!["audit", "verify"];
    for head in &heads {
        args.extend(["--expect-head", head.as_str()]);
    }
    let anchored = nrmctl(endpoints, "auditor", &args);
    assert!(
        anchored.status.success(),
        "{}",
        String::from_utf8_lossy(&anchored.stderr)
    );

    // Another role gets no audit from nrmctl.
    let police = nrmctl(endpoints, "police", &["audit", "verify", "--service", "shelter"]);
    assert_eq!(police.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&police.stderr).contains("PERMISSION_DENIED"),
        "{}",
        String::from_utf8_lossy(&police.stderr)
    );

    // An insider changes one entry of the referral service's trail.
    as_insider(
        &referral.pool,
        "UPDATE audit_log SET purpose = 'curiosity' WHERE seq = 2",
    )
    .await;
    let broken = nrmctl(endpoints, "auditor", &["audit", "verify"]);
    assert_eq!(broken.status.code(), Some(1));
    let out = text(&broken);
    assert!(
        out.lines()
            .any(|l| l.starts_with("referral") && l.contains("BROKEN at seq 2: changed:")),
        "{out}"
    );
    assert!(
        out.lines().any(|l| l.starts_with("shelter") && l.ends_with("OK")),
        "{out}"
    );
    assert!(
        String::from_utf8_lossy(&broken.stderr).contains("the audit chain is broken: referral"),
        "{}",
        String::from_utf8_lossy(&broken.stderr)
    );

    // The same through gRPC, as JSON would show it.
    let mut client = AuditServiceClient::connect(referral.endpoint.clone()).await.unwrap();
    let answer = client
        .verify_chain(authorized(VerifyChainRequest::default(), &auditor))
        .await
        .unwrap()
        .into_inner();
    assert!(!answer.ok);
    assert_eq!((answer.broken_seq, answer.broken), (2, ChainBreak::Changed as i32));
    let page = client
        .list_entries(authorized(
            ListEntriesRequest {
                person_id: "not a uuid".into(),
                ..Default::default()
            },
            &auditor,
        ))
        .await
        .unwrap_err();
    assert_eq!(page.code(), tonic::Code::InvalidArgument);

    casepath.stop().await;
    repatriation.stop(&[]).await;
    shelter.stop().await;
    referral.stop().await;
    identification.stop().await;
}

#[tokio::test]
async fn entries_are_listed_in_pages_by_subject() {
    let app = TestApp::spawn().await;
    append_entries(&app.pool, 7).await;
    for _ in 0..4 {
        let actor = officer(1);
        let mut conn = app.pool.acquire().await.unwrap();
        audit::append(
            &mut conn,
            &Entry::new(&actor, "GetCase", "case-x", "case review").outcome(Outcome::Ok),
        )
        .await
        .unwrap();
    }
    let auditor = token("kg-audit", Role::Auditor, "auditor-1");
    let mut client = AuditServiceClient::connect(app.endpoint.clone()).await.unwrap();
    let mut seen = Vec::new();
    let mut page_token = String::new();
    loop {
        let page = client
            .list_entries(authorized(
                ListEntriesRequest {
                    subject_id: "case-x".into(),
                    page_size: 3,
                    page_token: page_token.clone(),
                    ..Default::default()
                },
                &auditor,
            ))
            .await
            .unwrap()
            .into_inner();
        seen.extend(page.entries.iter().map(|e| e.seq));
        page_token = page.next_page_token;
        if page_token.is_empty() {
            break;
        }
    }
    // The auditor's own ListEntries calls name case-x as well.
    let expected: Vec<u64> =
        sqlx::query_scalar::<_, i64>("SELECT seq FROM audit_log WHERE subject_id = 'case-x' ORDER BY at, seq")
            .fetch_all(&app.pool)
            .await
            .unwrap()
            .into_iter()
            .map(|s| u64::try_from(s).unwrap())
            .collect();
    assert!(
        seen.len() >= 4 && seen.iter().all(|s| expected.contains(s)),
        "{seen:?} {expected:?}"
    );
    let first = client
        .list_entries(authorized(
            ListEntriesRequest {
                subject_id: "case-x".into(),
                page_size: 1,
                ..Default::default()
            },
            &auditor,
        ))
        .await
        .unwrap()
        .into_inner();
    let other_filters = client
        .list_entries(authorized(
            ListEntriesRequest {
                subject_id: "case-y".into(),
                page_size: 3,
                page_token: first.next_page_token,
                ..Default::default()
            },
            &auditor,
        ))
        .await
        .unwrap_err();
    assert_eq!(other_filters.code(), tonic::Code::InvalidArgument);
    app.stop().await;
}

/// Backends that wait for a lock `holder` (a backend's pid) holds.
async fn waiting_for(pool: &PgPool, holder: i32) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM pg_stat_activity WHERE $1 = ANY(pg_blocking_pids(pid))")
        .bind(holder)
        .fetch_one(pool)
        .await
        .unwrap()
}

#[tokio::test]
async fn a_refusal_whose_client_resets_the_stream_while_it_is_audited_is_audited_all_the_same() {
    let app = TestApp::spawn().await;
    // No entry yet, so no connection of the service has prepared the
    // audit's INSERT: PostgreSQL parses it under a lock on audit_log,
    // which the test holds, so the refusal's entry waits before anything
    // of it is executed. A writer dropped on the reset would never send it.
    assert_eq!(app.count("audit_log").await, 0);
    let mut holder = app.pool.begin().await.unwrap();
    let holder_pid: i32 = sqlx::query_scalar("SELECT pg_backend_pid()")
        .fetch_one(&mut *holder)
        .await
        .unwrap();
    sqlx::query("LOCK TABLE audit_log IN SHARE MODE")
        .execute(&mut *holder)
        .await
        .unwrap();

    // Headers with a token that does not verify, and no body.
    let mut raw = RawConnection::open(&app.endpoint, 65_535).await;
    let (answer, mut stream) = raw
        .call(
            "/nrm.identification.v1.IdentificationService/ReportPresumedVictim",
            Some("not-a-token"),
        )
        .await;
    eventually(
        "the refusal's entry waits for the table",
        Duration::from_secs(10),
        || async { (waiting_for(&app.pool, holder_pid).await == 1).then_some(()) },
    )
    .await;
    // The client goes away while the entry is being written.
    stream.send_reset(h2::Reason::CANCEL);
    raw.round_trip().await;
    assert!(answer.await.is_err(), "the stream was reset before any answer");
    holder.rollback().await.unwrap();

    let entry = eventually("the refusal's entry", Duration::from_secs(10), || async {
        sqlx::query_as::<_, (String, String, String, String, String)>(
            "SELECT agency, role, officer, action, outcome FROM audit_log",
        )
        .fetch_optional(&app.pool)
        .await
        .unwrap()
    })
    .await;
    assert_eq!(
        entry,
        (
            "-".into(),
            "-".into(),
            "-".into(),
            "ReportPresumedVictim:unauthenticated".into(),
            "unauthenticated".into()
        )
    );
    app.stop().await;
}
