//! `RebuildReadModels` and `nrmctl ops rebuild` against a real
//! identification service: the read models rebuilt from the streams while
//! the service runs, compared with the live ones; a corrupted row found and
//! set right; commands arriving meanwhile lost by none; a rebuild goes to
//! the live model's position, not to the stream's end.

#![allow(clippy::unwrap_used)] // Test code: a failed unwrap is a failed test.

use std::process::{Command, Output};
use std::time::Duration;

use futures::StreamExt as _;
use nrm_e2e::fixtures::{append_case, case_list};
use nrm_e2e::repatriation::{CountryKeys, RepatriationApp, repatriation_settings};
use nrm_e2e::{
    Parts, ReferralApp, ShelterApp, TestApp, authorized, binary, eventually, issuer_key_path, person, report_request,
    token,
};
use nrm_identification::projections::CaseList;
use nrm_kernel::auth::{Caller, Role};
use nrm_kernel::command::CallContext;
use nrm_kernel::operator::OperatorGrpc;
use nrm_kernel::permissions;
use nrm_kernel::projection::{Outcome, ProjectionRunner};
use nrm_kernel::store::{Actor, EventStore};
use nrm_proto::common::v1 as common;
use nrm_proto::common::v1::operator_service_client::OperatorServiceClient;
use nrm_proto::common::v1::operator_service_server::OperatorService as _;
use nrm_proto::identification::v1 as pb;
use tonic::Code;
use uuid::Uuid;

const CASE_LIST: &str = "identification_case_list";
const REFERRAL_ACCESS: &str = "identification_referral_access";

fn operator() -> String {
    token("kg-ops", Role::Operator, "operator-1")
}

fn coordinator() -> String {
    token("kg-coordinator", Role::Coordinator, "coordinator-1")
}

/// `RebuildReadModels` as `who` calls it.
async fn rebuild_as(
    app: &TestApp,
    who: &str,
    projection: &str,
) -> Result<common::RebuildReadModelsResponse, tonic::Status> {
    let mut client = OperatorServiceClient::connect(app.endpoint.clone()).await.unwrap();
    client
        .rebuild_read_models(authorized(
            common::RebuildReadModelsRequest {
                projection: projection.to_owned(),
            },
            who,
        ))
        .await
        .map(tonic::Response::into_inner)
}

/// Every read model rebuilt by the operator.
async fn rebuild_all(app: &TestApp) -> Vec<common::RebuiltReadModel> {
    rebuild_at(&app.endpoint).await
}

/// Every read model of the service at `endpoint`, rebuilt by the operator.
async fn rebuild_at(endpoint: &str) -> Vec<common::RebuiltReadModel> {
    let mut client = OperatorServiceClient::connect(endpoint.to_owned()).await.unwrap();
    client
        .rebuild_read_models(authorized(common::RebuildReadModelsRequest::default(), &operator()))
        .await
        .unwrap()
        .into_inner()
        .read_models
}

fn named<'a>(models: &'a [common::RebuiltReadModel], name: &str) -> &'a common::RebuiltReadModel {
    models
        .iter()
        .find(|m| m.projection == name)
        .unwrap_or_else(|| panic!("no {name} in {models:?}"))
}

/// Reports one case with identifiers of its own; its ID.
async fn report(app: &TestApp, n: usize) -> String {
    app.client
        .clone()
        .report_presumed_victim(authorized(
            report_request(
                &format!("rebuild-{}-{n}", Uuid::now_v7()),
                person("Test Person", &format!("RB{n:07}"), ""),
            ),
            &token("kg-mvd", Role::Police, "officer-1"),
        ))
        .await
        .unwrap()
        .into_inner()
        .case_id
}

/// The case list as the coordinator reads it, by case ID.
async fn listed(app: &TestApp) -> Vec<pb::CaseSummary> {
    let mut cases = app
        .client
        .clone()
        .list_cases(authorized(
            pb::ListCasesRequest {
                page_size: 500,
                ..Default::default()
            },
            &coordinator(),
        ))
        .await
        .unwrap()
        .into_inner()
        .cases;
    cases.sort_by(|a, b| a.case_id.cmp(&b.case_id));
    cases
}

/// The case list once it holds `count` cases.
async fn listed_when(app: &TestApp, count: usize) -> Vec<pb::CaseSummary> {
    eventually(
        &format!("the case list holds {count} cases"),
        Duration::from_secs(30),
        || async {
            let cases = listed(app).await;
            (cases.len() == count).then_some(cases)
        },
    )
    .await
}

/// Changes one row of the case list behind the projection's back.
async fn corrupt(app: &TestApp, case_id: &str) {
    let changed = sqlx::query("UPDATE case_list SET citizenship = 'XX' WHERE case_id = $1")
        .bind(case_id.parse::<Uuid>().unwrap())
        .execute(&app.pool)
        .await
        .unwrap()
        .rows_affected();
    assert_eq!(changed, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_read_model_rebuilt_while_the_service_runs_equals_the_live_one() {
    let app = TestApp::spawn().await;
    for n in 0..3 {
        report(&app, n).await;
    }
    let before = listed_when(&app, 3).await;

    let models = rebuild_all(&app).await;
    let names: Vec<&str> = models.iter().map(|m| m.projection.as_str()).collect();
    assert_eq!(
        names,
        [CASE_LIST, REFERRAL_ACCESS],
        "every read model, none of the reactions"
    );
    for model in &models {
        assert!(model.equal, "{model:?}");
        assert_eq!(model.live_digest.len(), 64, "{model:?}");
        assert_eq!(model.live_digest, model.rebuilt_digest, "{model:?}");
        assert_eq!(model.parked, 0, "{model:?}");
    }
    let cases = named(&models, CASE_LIST);
    assert_eq!(cases.stream, app.stream_name());
    assert_eq!((cases.stream_sequence, cases.messages), (3, 3), "{cases:?}");
    // The referral stream does not exist here: nothing replayed, the empty model.
    let access = named(&models, REFERRAL_ACCESS);
    assert_eq!((access.stream_sequence, access.messages), (0, 0), "{access:?}");

    assert_eq!(listed(&app).await, before, "the case list answers the same");

    // One read model by name; an unknown name, or one that is no name at all.
    let one = rebuild_as(&app, &operator(), CASE_LIST).await.unwrap().read_models;
    assert_eq!(one.len(), 1);
    assert!(one[0].equal && one[0].projection == CASE_LIST, "{one:?}");
    let unknown = rebuild_as(&app, &operator(), "no_such_model").await.unwrap_err();
    assert_eq!(unknown.code(), Code::NotFound);
    assert_eq!(unknown.message(), "projection no_such_model not found");
    let bad = rebuild_as(&app, &operator(), "Robert'); DROP").await.unwrap_err();
    assert_eq!(bad.code(), Code::InvalidArgument);
    assert!(bad.message().contains("projection"), "{bad:?}");
    assert!(!bad.message().contains("Robert"), "the raw text is not echoed");

    // Only the operator: the gate refuses another role.
    let refused = rebuild_as(&app, &coordinator(), "").await.unwrap_err();
    assert_eq!(refused.code(), Code::PermissionDenied);

    // Audited: the operator's calls, with what they concerned.
    let audited: Vec<String> = sqlx::query_scalar(
        "SELECT subject_id FROM audit_log WHERE action = 'RebuildReadModels' AND role = 'operator' ORDER BY id",
    )
    .fetch_all(&app.pool)
    .await
    .unwrap();
    assert!(audited.contains(&"identification/all".to_owned()), "{audited:?}");
    assert!(audited.contains(&format!("identification/{CASE_LIST}")), "{audited:?}");
    app.stop().await;
}

/// The read models of referral, shelter and repatriation: registered,
/// rebuilt, compared through their digests (referral's persons hold the
/// cases reported to identification).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_read_models_of_every_service_are_rebuilt_and_compared() {
    let app = TestApp::spawn().await;
    let referral = ReferralApp::spawn_beside(&app).await;
    let shelter = ShelterApp::spawn().await;
    let (kg, ru) = (CountryKeys::generate("kg"), CountryKeys::generate("ru"));
    let repatriation = RepatriationApp::spawn_with(repatriation_settings(&kg, &[&ru])).await;
    for n in 0..2 {
        let reported = app
            .client
            .clone()
            .report_presumed_victim(authorized(
                report_request(
                    &format!("services-{}-{n}", Uuid::now_v7()),
                    person("Test Person", &format!("RS{n:07}"), ""),
                ),
                &token("kg-mvd", Role::Police, "officer-1"),
            ))
            .await
            .unwrap()
            .into_inner();
        referral.wait_for_person(&reported.person_id, reported.status).await;
    }

    let models = rebuild_at(&referral.endpoint).await;
    let names: Vec<&str> = models.iter().map(|m| m.projection.as_str()).collect();
    assert_eq!(names, ["referral_persons", "referral_inbox"], "no reactions");
    assert!(models.iter().all(|m| m.equal), "{models:?}");
    let persons = named(&models, "referral_persons");
    assert_eq!((persons.stream_sequence, persons.messages), (2, 2), "{persons:?}");
    assert_ne!(persons.live_digest, named(&models, "referral_inbox").live_digest);

    let models = rebuild_at(&shelter.endpoint).await;
    let names: Vec<&str> = models.iter().map(|m| m.projection.as_str()).collect();
    assert_eq!(names, ["shelter_free_capacity", "shelter_referrals"], "no reactions");
    assert!(models.iter().all(|m| m.equal), "{models:?}");

    let models = rebuild_at(&repatriation.endpoint).await;
    let names: Vec<&str> = models.iter().map(|m| m.projection.as_str()).collect();
    assert_eq!(names, ["repatriation_return_list"], "no reactions");
    assert!(models.iter().all(|m| m.equal), "{models:?}");

    repatriation.stop(&[&ru]).await;
    shelter.stop().await;
    referral.stop().await;
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_corrupted_row_is_found_different_and_set_right_by_the_rebuild() {
    let app = TestApp::spawn().await;
    let mut ids = Vec::new();
    for n in 0..3 {
        ids.push(report(&app, n).await);
    }
    let before = listed_when(&app, 3).await;
    corrupt(&app, &ids[1]).await;
    let corrupted = listed(&app).await;
    assert_ne!(corrupted, before, "the list shows the corrupted row");

    let models = rebuild_all(&app).await;
    let cases = named(&models, CASE_LIST);
    assert!(!cases.equal, "{cases:?}");
    assert_ne!(cases.live_digest, cases.rebuilt_digest);
    assert!(named(&models, REFERRAL_ACCESS).equal, "the other model is untouched");
    assert_eq!(listed(&app).await, before, "the row is right again");

    let again = rebuild_all(&app).await;
    assert!(again.iter().all(|m| m.equal), "{again:?}");
    assert_eq!(
        named(&again, CASE_LIST).live_digest,
        cases.rebuilt_digest,
        "the rebuilt model is the one kept"
    );
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commands_arriving_during_rebuilds_are_all_in_the_read_model_afterwards() {
    let app = TestApp::spawn().await;
    for n in 0..5 {
        report(&app, n).await;
    }
    listed_when(&app, 5).await;

    const MORE: usize = 40;
    let reporter = {
        let client = app.client.clone();
        tokio::spawn(async move {
            for n in 5..5 + MORE {
                client
                    .clone()
                    .report_presumed_victim(authorized(
                        report_request(
                            &format!("during-{}-{n}", Uuid::now_v7()),
                            person("Test Person", &format!("RD{n:07}"), ""),
                        ),
                        &token("kg-mvd", Role::Police, "officer-1"),
                    ))
                    .await
                    .unwrap();
            }
        })
    };
    let mut during = 0;
    let mut positions = Vec::new();
    while !reporter.is_finished() {
        let models = rebuild_all(&app).await;
        let cases = named(&models, CASE_LIST);
        assert!(cases.equal, "a rebuild while commands arrive: {cases:?}");
        positions.push(cases.stream_sequence);
        if !reporter.is_finished() {
            during += 1;
        }
    }
    reporter.await.unwrap();
    assert!(during >= 1, "at least one rebuild ran while commands arrived");
    assert!(positions.windows(2).all(|w| w[0] <= w[1]), "{positions:?}");

    // The positive signal: the list counts every case.
    let all = listed_when(&app, 5 + MORE).await;
    assert_eq!(all.len(), 5 + MORE);
    let models = rebuild_all(&app).await;
    let cases = named(&models, CASE_LIST);
    assert!(cases.equal, "{cases:?}");
    assert_eq!(cases.stream_sequence, u64::try_from(5 + MORE).unwrap());
    assert_eq!(listed(&app).await, all);
    app.stop().await;
}

/// The rebuild replays to the live model's checkpoint, not to the stream's
/// end: the model was applied up to the second of three messages.
#[tokio::test]
async fn a_rebuild_goes_to_the_checkpoint_not_to_the_end_of_the_stream() {
    let parts = Parts::new().await;
    let store = EventStore::new(parts.pool.clone());
    for _ in 0..3 {
        append_case(&parts, &store, Uuid::now_v7()).await;
    }
    parts.publish_all(&mut parts.relay(&store)).await;
    let runner = ProjectionRunner::new(store.clone(), parts.bus.clone(), "identification", CaseList);
    let consumer = parts
        .stream
        .create_consumer(async_nats::jetstream::consumer::pull::Config {
            ack_policy: async_nats::jetstream::consumer::AckPolicy::None,
            ..Default::default()
        })
        .await
        .unwrap();
    let mut messages = consumer.messages().await.unwrap();
    for _ in 0..2 {
        let message = messages.next().await.unwrap().unwrap();
        assert_eq!(runner.handle(&message).await.unwrap(), Outcome::Applied);
    }
    let live = case_list(&parts.pool).await;
    assert_eq!(live.len(), 2);

    let report = runner.rebuild_compare().await.unwrap();
    assert_eq!((report.stream_sequence, report.messages), (2, 2), "{report:?}");
    assert!(report.equal(), "{report:?}");
    assert_eq!(case_list(&parts.pool).await, live);

    // A corrupted row: different, and the rebuilt model is kept.
    sqlx::query("UPDATE case_list SET status = 99")
        .execute(&parts.pool)
        .await
        .unwrap();
    let report = runner.rebuild_compare().await.unwrap();
    assert!(!report.equal(), "{report:?}");
    assert_eq!(case_list(&parts.pool).await, live);

    // The third message is applied after the rebuild, as the checkpoint says.
    let third = messages.next().await.unwrap().unwrap();
    assert_eq!(runner.handle(&third).await.unwrap(), Outcome::Applied);
    assert_eq!(case_list(&parts.pool).await.len(), 3);
    parts.drop_all().await;
}

/// A service without a stream of its own (casepath) has nothing to refill.
#[tokio::test]
async fn refill_on_a_service_that_publishes_no_stream_is_a_failed_precondition() {
    let parts = Parts::new().await;
    let operator = OperatorGrpc::new(parts.pool.clone(), parts.bus.clone(), "casepath").publishing(false);
    let caller = Caller {
        actor: Actor {
            agency: "kg-ops".into(),
            role: "operator".into(),
            officer: "operator-1".into(),
        },
        role: Role::Operator,
    };
    let permit = permissions::permit(permissions::OPERATOR, "RefillStream", None, Role::Operator).unwrap();
    let mut request = tonic::Request::new(common::RefillStreamRequest { dry_run: false });
    request
        .extensions_mut()
        .insert(CallContext::new(caller, Uuid::now_v7(), permit));
    let refused = operator.refill_stream(request).await.unwrap_err();
    assert_eq!(refused.code(), Code::FailedPrecondition);
    assert_eq!(refused.message(), "this service publishes no stream");
    parts.drop_all().await;
}

fn nrmctl(app: &TestApp, role: &str, args: &[&str]) -> Output {
    Command::new(binary("nrmctl"))
        .args(args)
        .env("NRM_ISSUER_KEY", issuer_key_path())
        .env("NRM_AGENCY", "kg-ops")
        .env("NRM_ROLE", role)
        .env("NRM_OFFICER", "operator-1")
        .env_remove("NRM_ENDPOINT")
        .env_remove("NRM_TOKEN")
        .env_remove("NRM_OUTPUT")
        .arg("--endpoint")
        .arg(&app.endpoint)
        .output()
        .expect("run nrmctl")
}

/// The data rows of the table nrmctl printed, split on whitespace.
fn rows(text: &str) -> Vec<Vec<String>> {
    text.lines()
        .skip(1)
        .filter(|line| !line.trim().is_empty())
        .map(|line| line.split_whitespace().map(str::to_owned).collect())
        .collect()
}

// nrmctl runs as a blocking child process while the service answers on other threads.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nrmctl_ops_rebuild_says_equal_or_different_with_its_exit_code() {
    let app = TestApp::spawn().await;
    let mut ids = Vec::new();
    for n in 0..2 {
        ids.push(report(&app, n).await);
    }
    listed_when(&app, 2).await;

    let equal = nrmctl(&app, "operator", &["ops", "rebuild"]);
    let text = String::from_utf8_lossy(&equal.stdout).into_owned();
    assert_eq!(
        equal.status.code(),
        Some(0),
        "{text}{}",
        String::from_utf8_lossy(&equal.stderr)
    );
    assert_eq!(
        text.lines().next().unwrap().split_whitespace().collect::<Vec<_>>(),
        [
            "projection",
            "stream",
            "stream_sequence",
            "messages",
            "parked",
            "result"
        ],
        "{text}"
    );
    let table = rows(&text);
    assert_eq!(table.len(), 2, "{text}");
    assert_eq!(
        table[0],
        [CASE_LIST, &app.stream_name(), "2", "2", "0", "equal"],
        "{text}"
    );
    assert_eq!(table[1][0], REFERRAL_ACCESS, "{text}");
    assert_eq!(table[1].last().unwrap(), "equal", "{text}");

    corrupt(&app, &ids[0]).await;
    let different = nrmctl(&app, "operator", &["ops", "rebuild"]);
    let text = String::from_utf8_lossy(&different.stdout).into_owned();
    let errors = String::from_utf8_lossy(&different.stderr).into_owned();
    assert_eq!(different.status.code(), Some(3), "{text}{errors}");
    let line = text.lines().find(|l| l.starts_with(CASE_LIST)).unwrap();
    assert!(line.contains("DIFFERENT (live "), "{text}");
    assert!(line.contains(" rebuilt "), "{text}");
    assert!(
        text.lines()
            .any(|l| l.starts_with(REFERRAL_ACCESS) && l.ends_with("equal")),
        "{text}"
    );
    assert_eq!(
        errors,
        format!("1 of 2 read models differ from their rebuild: {CASE_LIST}\n")
    );

    // Set right by that rebuild: one model by name, equal again; JSON too.
    let one = nrmctl(
        &app,
        "operator",
        &["--output", "json", "ops", "rebuild", "--projection", CASE_LIST],
    );
    assert_eq!(one.status.code(), Some(0), "{}", String::from_utf8_lossy(&one.stderr));
    let json: serde_json::Value = serde_json::from_slice(&one.stdout).unwrap();
    let models = json["read_models"].as_array().unwrap();
    assert_eq!(models.len(), 1, "{json}");
    assert_eq!(models[0]["projection"], CASE_LIST, "{json}");
    assert_eq!(models[0]["equal"], true, "{json}");

    let unknown = nrmctl(&app, "operator", &["ops", "rebuild", "--projection", "nope"]);
    assert_eq!(unknown.status.code(), Some(1));
    assert_eq!(
        String::from_utf8_lossy(&unknown.stderr),
        "error: NOT_FOUND: projection nope not found\n"
    );

    let refused = nrmctl(&app, "police", &["ops", "rebuild"]);
    assert_eq!(refused.status.code(), Some(1));
    let errors = String::from_utf8_lossy(&refused.stderr);
    assert!(
        errors.starts_with("error: PERMISSION_DENIED: permission denied: role police may not "),
        "{errors}"
    );
    assert!(refused.stdout.is_empty());
    app.stop().await;
}
