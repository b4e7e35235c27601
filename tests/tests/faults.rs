//! The fault suite (issue 8): commands sent to all three services while
//! services, the relay, NATS and PostgreSQL are killed and restarted; then
//! every store, stream and read model is held against what the clients were
//! told. `make test` runs the short form; `make test-faults` the full one
//! (at least 10,000 commands and 20 faults). The seed is printed;
//! `NRM_FAULTS_SEED` repeats a run's choices.

use nrm_e2e::faults::{self, Plan};

/// Only one form at a time: both use the private stack in `target/nrm-faultenv`.
static STACK: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

async fn run(plan: Plan) {
    let _only_one = STACK.lock().await;
    let verdict = faults::run(plan).await.expect("the fault suite could not run");
    println!("{}", verdict.summary);
    assert!(
        verdict.failures.is_empty(),
        "the fault suite found broken rules: {}\n\n{}",
        verdict.failures.join("; "),
        verdict.summary
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_commands_survive_kills_and_restarts_of_every_part() {
    run(Plan::short()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "the full form takes minutes: make test-faults"]
async fn ten_thousand_commands_through_twenty_faults_lose_and_duplicate_nothing() {
    run(Plan::full()).await;
}
