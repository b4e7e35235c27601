#!/usr/bin/env bash
# Köpür — make sure what `make run` and `make test` need is on this machine.
# Idempotent, and quick when everything is there (no apt call then).
#
#   nats-server              Debian's package (2.9 is the baseline; a newer
#                            one on PATH is used when present)
#   PostgreSQL server        initdb, pg_ctl, postgres from /usr/lib/postgresql/*/bin
#   rustfmt, clippy          rustup components
#   grpcurl                  optional: only a hint
#
# No protoc: proto/ compiles the .proto files with a pure-Rust compiler.
#
# Usage: scripts/deps.sh            everything
#        scripts/deps.sh --servers  nats-server and PostgreSQL only

set -euo pipefail

servers_only=0
case ${1:-} in
"") ;;
--servers) servers_only=1 ;;
*)
    echo "usage: $0 [--servers]" >&2
    exit 2
    ;;
esac

log() { printf 'deps: %s\n' "$*" >&2; }
die() {
    printf 'deps: error: %s\n' "$*" >&2
    exit 1
}

have_nats() {
    command -v nats-server >/dev/null 2>&1 || [[ -x /usr/sbin/nats-server ]]
}

have_postgres() {
    local d
    for d in /usr/lib/postgresql/*/bin; do
        [[ -x $d/initdb && -x $d/pg_ctl && -x $d/postgres ]] && return 0
    done
    return 1
}

# --- system packages -------------------------------------------------------
packages=()
have_nats || packages+=(nats-server)
have_postgres || packages+=(postgresql)

if ((${#packages[@]} > 0)); then
    if ((EUID == 0)); then
        command -v apt-get >/dev/null 2>&1 ||
            die "missing ${packages[*]} and no apt-get here: install them with your package manager"
        log "installing ${packages[*]} (apt-get update, then apt-get install)"
        export DEBIAN_FRONTEND=noninteractive
        apt-get update
        apt-get install -y "${packages[@]}"
        # Debian's postgresql package creates (and may start) its own cluster
        # "main" on port 5432; the project never uses it: scripts/stack.sh
        # runs a private cluster on its own port.
    else
        die "missing ${packages[*]}. Install them as root:
    sudo apt-get update && sudo apt-get install -y ${packages[*]}"
    fi
    have_nats || die "nats-server still missing after apt-get install"
    have_postgres || die "PostgreSQL server binaries still missing after apt-get install"
fi

((servers_only)) && exit 0

# --- Rust toolchain ----------------------------------------------------------
command -v cargo >/dev/null 2>&1 ||
    die "cargo not found: install the Rust toolchain with rustup (https://rustup.rs) and open a new shell"

components=()
cargo fmt --version >/dev/null 2>&1 || components+=(rustfmt)
cargo clippy --version >/dev/null 2>&1 || components+=(clippy)
if ((${#components[@]} > 0)); then
    command -v rustup >/dev/null 2>&1 ||
        die "missing ${components[*]} and no rustup: install them with your Rust distribution"
    log "adding Rust components ${components[*]}"
    rustup component add "${components[@]}"
fi

# --- optional tools ------------------------------------------------------------
if ! command -v grpcurl >/dev/null 2>&1; then
    log "hint: grpcurl is not installed (optional; target/release/nrmctl does the same for Köpür's services)"
fi
exit 0
