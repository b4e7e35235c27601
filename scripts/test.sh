#!/usr/bin/env bash
# Köpür — what `make test` (and so CI) runs:
#   deps → cargo fmt --check → cargo clippy -D warnings → private stack in
#   target/nrm-testenv → cargo build --bins → cargo test --workspace
#   --no-fail-fast [ARGS] → stack down.
#
# Extra arguments go to `cargo test --workspace`, e.g.
#   make test ARGS='-p nrm-kernel -- --nocapture'
# When NRM_TEST_DATABASE_URL and NRM_TEST_NATS_URL are both set already, the
# tests use those servers and no private stack is started.
# Exit status: the first failing step's, else cargo test's.

set -euo pipefail

SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO_ROOT=$(cd "$SCRIPT_DIR/.." && pwd)
cd "$REPO_ROOT"

TESTENV=target/nrm-testenv
export RUST_BACKTRACE=1
# As root, PostgreSQL runs as the postgres user; when it cannot reach the
# clone (e.g. a parent folder made by mktemp -d, mode 700), the test cluster
# lives under /tmp instead of failing (see scripts/stack.sh).
export NRM_STACK_PG_FALLBACK_ROOT=${NRM_STACK_PG_FALLBACK_ROOT:-/tmp}

step() { printf '\n==> %s\n' "$*" >&2; }

step "deps (scripts/deps.sh)"
bash "$SCRIPT_DIR/deps.sh"

step "format check (cargo fmt --all -- --check)"
cargo fmt --all -- --check

step "lint (cargo clippy --workspace --all-targets -- -D warnings)"
cargo clippy --workspace --all-targets -- -D warnings

STACK_STARTED=0
# shellcheck disable=SC2317 # called through the EXIT trap
teardown() {
    local rc=$?
    trap '' INT TERM HUP
    if ((STACK_STARTED)); then
        step "stack down ($TESTENV)"
        # Another `make test` may share the stack (it holds users.lock too):
        # the last one out stops it.
        if flock -x -n 7; then
            bash "$SCRIPT_DIR/stack.sh" down "$TESTENV" || { ((rc)) || rc=1; }
        else
            echo "test: another test run still uses $TESTENV: leaving the stack up" >&2
        fi
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
    step "stack up ($TESTENV)"
    mkdir -p "$TESTENV"
    exec 7>>"$TESTENV/users.lock"
    flock -s 7
    STACK_STARTED=1
    bash "$SCRIPT_DIR/stack.sh" up "$TESTENV"
    # shellcheck source=/dev/null
    . "$TESTENV/stack.env"
    export NRM_TEST_DATABASE_URL=$NRM_STACK_DATABASE_URL
    export NRM_TEST_NATS_URL=$NRM_STACK_NATS_URL
    export NRM_TEST_NATS_MONITOR_URL=$NRM_STACK_NATS_MONITOR_URL
fi

# The end-to-end tests run the service and nrmctl binaries as a user would;
# `cargo test` builds a package's binaries only for that package's own tests.
step "binaries (cargo build --workspace --bins)"
cargo build --workspace --bins

step "tests (cargo test --workspace --no-fail-fast${*:+ $*})"
rc=0
cargo test --workspace --no-fail-fast "$@" || rc=$?
exit "$rc"
