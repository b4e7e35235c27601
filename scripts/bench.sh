#!/usr/bin/env bash
# Köpür — what `make bench` runs:
#   deps → cargo build --release -p nrm-bench → private stack in
#   target/nrm-benchenv → target/release/nrm-bench [ARGS] → stack down.
#
# nrm-bench measures, on one PostgreSQL, the kernel's append path (1, 8, 32
# clients) beside pgbench inserting the same rows (the raw ceiling), takes
# the kernel's path apart at the highest client count, and times a gRPC
# report until its event is on NATS; then runs the shelter service in-process
# for bed holds at 8 and 32 clients, a race of 32 clients for 50 beds (must
# not over-book), ListFreeCapacity over 200 shelters, and accepted referral
# (ReferralAccepted published by a kernel relay) → BedHeld on NATS at 100/s;
# then the relay's catch-up after an outage (10,000 commits spread over many
# aggregates, and concentrated on 100) and a projection runner's catch-up
# (rebuild, live, after an outage). `--only relay,projection` (or
# NRM_BENCH_ONLY) runs some sections; NRM_BENCH_CATCHUP_COMMITS and
# NRM_BENCH_CATCHUP_HOT_AGGREGATES size the catch-up backlogs.
# It prints a markdown table and writes it
# to bench/results/<UTC date-time>.md and bench/results/latest.md.
#
# Arguments go to nrm-bench (`make bench ARGS='--seconds 5'`; see
# `target/release/nrm-bench --help`); the same settings can come from the
# environment: NRM_BENCH_SECONDS, NRM_BENCH_WARMUP, NRM_BENCH_CLIENTS,
# NRM_BENCH_PAYLOAD_BYTES, NRM_BENCH_DIAGNOSE_SECONDS, NRM_BENCH_E2E_REPORTS,
# NRM_BENCH_E2E_CONCURRENCY, NRM_BENCH_RESULTS_DIR, NRM_BENCH_PGBENCH,
# NRM_BENCH_SHELTER_SECONDS, NRM_BENCH_SHELTER_CLIENTS, NRM_BENCH_RACE_BEDS,
# NRM_BENCH_RACE_CLIENTS, NRM_BENCH_SHELTERS, NRM_BENCH_CAPACITY_CALLS,
# NRM_BENCH_PLACEMENT_RATE, NRM_BENCH_PLACEMENT_SECONDS.
# When NRM_TEST_DATABASE_URL and NRM_TEST_NATS_URL are both set already,
# those servers are used and no private stack is started.

set -euo pipefail

SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO_ROOT=$(cd "$SCRIPT_DIR/.." && pwd)
cd "$REPO_ROOT"

BENCHENV=target/nrm-benchenv
# As root, PostgreSQL runs as the postgres user; when it cannot reach the
# clone, the cluster lives under /tmp instead (see scripts/stack.sh).
export NRM_STACK_PG_FALLBACK_ROOT=${NRM_STACK_PG_FALLBACK_ROOT:-/tmp}

step() { printf '\n==> %s\n' "$*" >&2; }

step "deps (scripts/deps.sh)"
bash "$SCRIPT_DIR/deps.sh"

step "build (cargo build --release -p nrm-bench)"
cargo build --release -p nrm-bench

STACK_STARTED=0
# shellcheck disable=SC2317 # called through the EXIT trap
teardown() {
    local rc=$?
    trap '' INT TERM HUP
    if ((STACK_STARTED)); then
        step "stack down ($BENCHENV)"
        bash "$SCRIPT_DIR/stack.sh" down "$BENCHENV" || { ((rc)) || rc=1; }
    fi
    exit "$rc"
}
trap teardown EXIT
trap 'exit 130' INT
trap 'exit 143' TERM
trap 'exit 129' HUP

if [[ -n ${NRM_TEST_DATABASE_URL:-} && -n ${NRM_TEST_NATS_URL:-} ]]; then
    step "using the given servers: NRM_TEST_DATABASE_URL=$NRM_TEST_DATABASE_URL NRM_TEST_NATS_URL=$NRM_TEST_NATS_URL"
else
    step "stack up ($BENCHENV)"
    STACK_STARTED=1
    bash "$SCRIPT_DIR/stack.sh" up "$BENCHENV" >/dev/null
    # shellcheck source=/dev/null
    . "$BENCHENV/stack.env"
    export NRM_TEST_DATABASE_URL=$NRM_STACK_DATABASE_URL
    export NRM_TEST_NATS_URL=$NRM_STACK_NATS_URL
fi

BENCH_BIN=${CARGO_TARGET_DIR:-target}/release/nrm-bench
step "bench ($BENCH_BIN${*:+ $*})"
"$BENCH_BIN" "$@"
