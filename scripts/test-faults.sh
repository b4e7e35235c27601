#!/usr/bin/env bash
# Köpür — what `make test-faults` runs: the full fault suite (issue 8).
#   deps → cargo build --workspace --bins → cargo test -p nrm-e2e --test faults
#   -- --ignored --nocapture [ARGS]
#
# The suite starts and stops a private PostgreSQL and NATS of its own in
# target/nrm-faultenv (it kills them: it never uses the shared test stack),
# runs the three services as processes, and sends at least 10,000 commands
# while at least 20 faults are injected. Several minutes on two cores. The
# summary is printed and written to target/fault-suite-full.txt.
# NRM_FAULTS_SEED=<seed> repeats a run's choices. Extra arguments go to the
# test binary, e.g. make test-faults ARGS='--include-ignored' (both forms).
# Exit status: the first failing step's, else cargo test's.

set -euo pipefail

SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO_ROOT=$(cd "$SCRIPT_DIR/.." && pwd)
cd "$REPO_ROOT"

export RUST_BACKTRACE=1
# As root, PostgreSQL runs as the postgres user; when it cannot reach the
# clone the cluster lives under /tmp instead (see scripts/stack.sh).
export NRM_STACK_PG_FALLBACK_ROOT=${NRM_STACK_PG_FALLBACK_ROOT:-/tmp}

step() { printf '\n==> %s\n' "$*" >&2; }

step "deps (scripts/deps.sh --servers)"
bash "$SCRIPT_DIR/deps.sh" --servers

step "binaries (cargo build --workspace --bins)"
cargo build --workspace --bins

step "fault suite, full form (cargo test -p nrm-e2e --test faults -- --ignored --nocapture${*:+ $*})"
cargo test -p nrm-e2e --test faults -- --ignored --nocapture "$@"
