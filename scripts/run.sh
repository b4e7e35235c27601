#!/usr/bin/env bash
# Köpür — what `make run` runs: everything on this machine, in the foreground.
#
#   deps → cargo build --release of the services and nrmctl → private stack
#   in .data (scripts/stack.sh) → keys in .data/secrets, the development
#   token issuer in .data/issuer → the services →
#   banner → wait. Ctrl-C (or SIGTERM) stops the services (SIGTERM, up to
#   10 s each), then the stack; the data stay in .data (`make reset` deletes
#   them).
#
# Release build: the services run as they would in production, and the first
# build is the only slow one. It builds only what runs here: the package
# nrm-<name> of every entry in SERVICES, and nrmctl (not nrm-bench, nor the
# tests).
#
# As root, PostgreSQL runs as the `postgres` user; when that user cannot reach
# .data (a clone under /root, mode 700), the cluster lives in
# /var/lib/kopur/nrm-stack-<hash of .data's path>, linked from .data
# (scripts/stack.sh; `make reset` deletes it too).
#
# Each service gets:
#   NRM_GRPC_ADDR       127.0.0.1:<first free from its port in SERVICES>
#   NRM_METRICS_ADDR    127.0.0.1:<first free from 9464>
#   NRM_DATABASE__URL   the stack's PostgreSQL (postgres://nrm@127.0.0.1:PORT)
#   NRM_DATABASE__NAME  the service's name (the service creates its database)
#   NRM_NATS__URL       the stack's NATS
#   NRM_AUTH__JWKS      file://…/.data/issuer/jwks.json: the public keys of the
#                       development token issuer (`nrmctl issuer init`, made
#                       once; its private key signing-key.jwk goes to nrmctl
#                       only, never to a service)
#   NRM_SEALING__MASTER_KEY, NRM_SEALING__MATCH_KEY
#                       from .data/secrets/{master,match}.key
# Values already in the environment win: NRM_DATABASE__URL, NRM_NATS__URL,
# NRM_AUTH__JWKS and the two sealing keys for every service; NRM_GRPC_ADDR, NRM_METRICS_ADDR and
# NRM_DATABASE__NAME for the first service only; NRM_<SERVICE>_GRPC_ADDR,
# NRM_<SERVICE>_METRICS_ADDR and NRM_<SERVICE>_DATABASE_NAME (e.g.
# NRM_REFERRAL_GRPC_ADDR) for any one service.
#
# Files: .data/logs/<service>.log, .data/run/<service>.pid, .data/nrmctl.env
# (NRM_ENDPOINT, NRM_<SERVICE>_ENDPOINT for the others, NRM_ISSUER_KEY and NRM_NATS__URL for the CLI:
#  `set -a; . .data/nrmctl.env; set +a`).
# NRM_RUN_BUILD=0 skips the build (binaries already in target/release).
# NRM_RUN_DATA_DIR (default .data) puts all of the above in another folder,
# NRM_RUN_SERVICES (names, space-separated) starts only those of SERVICES:
# scripts/federation.sh runs one country per folder this way.
# NRM_RUN_FOLLOW_LOGS=0/1 turns following the logs in the terminal off/on
# (default: on when stdout is a terminal).

set -euo pipefail

SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO_ROOT=$(cd "$SCRIPT_DIR/.." && pwd)
cd "$REPO_ROOT"

# The services, in start order: name:preferred gRPC port. One line each; the
# package is nrm-<name> (services/<name>/Cargo.toml), its binary
# target/release/<name>, its database <name>.
SERVICES=(
    identification:50051
    referral:50052
    shelter:50053
    # No partner country here (NRM_XBORDER__PARTNERS empty): it serves the
    # returns of this deployment only; `make run-federation` links two.
    repatriation:50054
    # The projections of the four streams and their queries (paths, inboxes,
    # statistics); it publishes nothing. Metrics on 9468 when all five run.
    casepath:50055
)
if [[ -n ${NRM_RUN_SERVICES:-} ]]; then
    wanted=()
    for entry in "${SERVICES[@]}"; do
        [[ " $NRM_RUN_SERVICES " == *" ${entry%%:*} "* ]] && wanted+=("$entry")
    done
    ((${#wanted[@]} > 0)) || {
        echo "run: error: NRM_RUN_SERVICES=$NRM_RUN_SERVICES names none of: ${SERVICES[*]%%:*}" >&2
        exit 1
    }
    SERVICES=("${wanted[@]}")
    unset wanted entry
fi
METRICS_PORT_START=9464
# Built besides the services' packages: the CLI the banner points to.
EXTRA_PACKAGES=(nrmctl)

DATA_DIR=${NRM_RUN_DATA_DIR:-.data}
BIN_DIR=${CARGO_TARGET_DIR:-target}/release
SECRETS_DIR=$DATA_DIR/secrets
ISSUER_DIR=$DATA_DIR/issuer
LOG_DIR=$DATA_DIR/logs
PID_DIR=$DATA_DIR/run
READY_TIMEOUT=60 # seconds, each service
STOP_TIMEOUT=10  # seconds, all services together

log() { printf 'run: %s\n' "$*" >&2; }
die() {
    printf 'run: error: %s\n' "$*" >&2
    exit 1
}
step() { printf '\n==> %s\n' "$*" >&2; }

# shellcheck source=lib.sh source-path=SCRIPTDIR
. "$SCRIPT_DIR/lib.sh"

declare -A SVC_PID=() SVC_GRPC=() SVC_METRICS=() SVC_DB=()
TAKEN_PORTS=()
STACK_UP=0
TAIL_PID=""

# --------------------------------------------------------------------------
# Keys

# ensure_key FILE: 32 random bytes, base64, created once.
ensure_key() {
    local file=$1
    [[ -s $file ]] && return 0
    (
        umask 077
        head -c 32 /dev/urandom | base64 -w0 >"$file.tmp"
        mv -f "$file.tmp" "$file"
    )
    log "created $file"
}

ensure_secrets() {
    (umask 077 && mkdir -p "$SECRETS_DIR")
    chmod 700 "$SECRETS_DIR"
    ensure_key "$SECRETS_DIR/master.key"
    ensure_key "$SECRETS_DIR/match.key"
    MASTER_KEY=${NRM_SEALING__MASTER_KEY:-$(<"$SECRETS_DIR/master.key")}
    MATCH_KEY=${NRM_SEALING__MATCH_KEY:-$(<"$SECRETS_DIR/match.key")}
}

# The development token issuer, made once: its private key stays in
# $ISSUER_DIR for nrmctl; the services get only the public jwks.json.
ensure_issuer() {
    if [[ ! -f $ISSUER_DIR/signing-key.jwk ]]; then
        "$BIN_DIR/nrmctl" issuer init --dir "$ISSUER_DIR" >/dev/null
        log "created the development token issuer in $ISSUER_DIR"
    fi
    ISSUER_KEY=$REPO_ROOT/$ISSUER_DIR/signing-key.jwk
    JWKS_URL=${NRM_AUTH__JWKS:-file://$REPO_ROOT/$ISSUER_DIR/jwks.json}
}

# env_line NAME VALUE: NAME=VALUE, quoted only when it has to be.
env_line() {
    if [[ $2 =~ ^[A-Za-z0-9_+/=:.@-]*$ ]]; then
        printf '%s=%s\n' "$1" "$2"
    else
        printf '%s=%q\n' "$1" "$2"
    fi
}

# --------------------------------------------------------------------------
# Services

# addr_port ADDR / addr_host ADDR: "host:port" → port / a host to connect to.
addr_port() { echo "${1##*:}"; }
addr_host() {
    local host=${1%:*}
    host=${host#[}
    host=${host%]}
    case $host in
    "" | 0.0.0.0 | :: | localhost) echo 127.0.0.1 ;;
    *) echo "$host" ;;
    esac
}

# A service left running by a run that was killed hard (SIGKILL): stop it.
stop_stale() {
    local name=$1 pidfile=$PID_DIR/$1.pid pid
    [[ -r $pidfile ]] || return 0
    pid=$(tr -dc '0-9' <"$pidfile")
    if alive "$pid" "$name"; then
        log "stopping $name left over from an earlier run (pid $pid)"
        kill -TERM "$pid" 2>/dev/null || true
        local deadline=$((SECONDS + STOP_TIMEOUT))
        while alive "$pid" && ((SECONDS < deadline)); do sleep 0.1; done
        alive "$pid" && kill -KILL "$pid" 2>/dev/null
    fi
    rm -f "$pidfile"
}

start_service() {
    local name=$1 entry port="" first=0 i
    for i in "${!SERVICES[@]}"; do
        entry=${SERVICES[i]}
        if [[ ${entry%%:*} == "$name" ]]; then
            port=${entry#*:}
            ((i == 0)) && first=1
        fi
    done
    [[ -n $port ]] || die "unknown service $name (not in SERVICES)"
    local bin=$BIN_DIR/$name
    [[ -x $bin ]] || die "$bin not found: does the workspace build a binary named $name?"
    stop_stale "$name"

    local upper=${name^^}
    local grpc_var=NRM_${upper}_GRPC_ADDR metrics_var=NRM_${upper}_METRICS_ADDR db_var=NRM_${upper}_DATABASE_NAME
    local grpc=${!grpc_var:-} metrics=${!metrics_var:-} db=${!db_var:-}
    if ((first)); then
        grpc=${grpc:-${NRM_GRPC_ADDR:-}}
        metrics=${metrics:-${NRM_METRICS_ADDR:-}}
        db=${db:-${NRM_DATABASE__NAME:-}}
    fi
    [[ -n $grpc ]] || grpc=127.0.0.1:$(pick_port "$port" "${TAKEN_PORTS[@]}")
    TAKEN_PORTS+=("$(addr_port "$grpc")")
    [[ -n $metrics ]] || metrics=127.0.0.1:$(pick_port "$METRICS_PORT_START" "${TAKEN_PORTS[@]}")
    TAKEN_PORTS+=("$(addr_port "$metrics")")
    db=${db:-$name}

    local logfile=$LOG_DIR/$name.log
    printf '\n===== %s: run.sh starts %s (gRPC %s, metrics %s) =====\n' \
        "$(date -u +%FT%TZ)" "$name" "$grpc" "$metrics" >>"$logfile"
    log "starting $name: gRPC $grpc, metrics $metrics, database $db (log: $logfile)"
    local -a env=(
        "NRM_GRPC_ADDR=$grpc"
        "NRM_METRICS_ADDR=$metrics"
        "NRM_DATABASE__URL=$DATABASE_URL"
        "NRM_DATABASE__NAME=$db"
        "NRM_NATS__URL=$NATS_URL"
        "NRM_AUTH__JWKS=$JWKS_URL"
        "NRM_SEALING__MASTER_KEY=$MASTER_KEY"
        "NRM_SEALING__MATCH_KEY=$MATCH_KEY"
        "RUST_LOG=${RUST_LOG:-info}"
    )
    # casepath: the country of its steps and its working-day calendar, the
    # same as repatriation's (default kg).
    [[ $name == casepath ]] && env+=("NRM_XBORDER__COUNTRY=${NRM_XBORDER__COUNTRY:-kg}")
    (
        close_fds
        # Own session: Ctrl-C reaches this script, which stops the service
        # with SIGTERM in order (a background child of a non-interactive
        # shell is no group leader, so setsid execs in place: $! is its pid).
        exec setsid env "${env[@]}" "$bin" </dev/null >>"$logfile" 2>&1
    ) &
    SVC_PID[$name]=$!
    SVC_GRPC[$name]=$grpc
    SVC_METRICS[$name]=$metrics
    SVC_DB[$name]=$db
    echo "${SVC_PID[$name]}" >"$PID_DIR/$name.pid"
}

wait_ready() {
    local name=$1 pid=${SVC_PID[$1]} host port deadline
    host=$(addr_host "${SVC_GRPC[$name]}")
    port=$(addr_port "${SVC_GRPC[$name]}")
    deadline=$((SECONDS + READY_TIMEOUT))
    while ((SECONDS < deadline)); do
        if ! alive "$pid"; then
            tail -n 30 "$LOG_DIR/$name.log" >&2
            die "$name exited during start-up (log: $LOG_DIR/$name.log)"
        fi
        if port_in_use "$port" "$host"; then
            return 0
        fi
        sleep 0.2
    done
    tail -n 30 "$LOG_DIR/$name.log" >&2
    die "$name does not answer on ${SVC_GRPC[$name]} after ${READY_TIMEOUT}s (log: $LOG_DIR/$name.log)"
}

# shellcheck disable=SC2317 # also called through the EXIT trap
stop_services() {
    local name pid deadline any
    for name in "${!SVC_PID[@]}"; do
        pid=${SVC_PID[$name]}
        if alive "$pid"; then
            log "stopping $name (pid $pid, SIGTERM)"
            kill -TERM "$pid" 2>/dev/null || true
        fi
    done
    deadline=$((SECONDS + STOP_TIMEOUT))
    while ((SECONDS < deadline)); do
        any=0
        for name in "${!SVC_PID[@]}"; do
            alive "${SVC_PID[$name]}" && any=1
        done
        ((any)) || break
        sleep 0.1
    done
    for name in "${!SVC_PID[@]}"; do
        pid=${SVC_PID[$name]}
        if alive "$pid"; then
            log "$name did not stop within ${STOP_TIMEOUT}s: SIGKILL"
            kill -KILL "$pid" 2>/dev/null || true
        fi
        wait "$pid" 2>/dev/null || true
        rm -f "$PID_DIR/$name.pid"
    done
}

# --------------------------------------------------------------------------
# Start-up and shutdown

# shellcheck disable=SC2317 # called through the EXIT trap
cleanup() {
    local rc=$?
    trap '' INT TERM HUP
    if [[ -n $TAIL_PID ]]; then
        kill "$TAIL_PID" 2>/dev/null || true
        wait "$TAIL_PID" 2>/dev/null || true
    fi
    stop_services
    if ((STACK_UP)); then
        bash "$SCRIPT_DIR/stack.sh" down "$DATA_DIR" || { ((rc)) || rc=1; }
    fi
    exit "$rc"
}

# shellcheck disable=SC2317 # called through traps
on_signal() {
    printf '\n' >&2
    log "stopping (data are kept in $DATA_DIR)"
    exit 0
}

# shellcheck disable=SC2016 # $TOKEN and `make reset` are printed, not expanded
banner() {
    local name pid_list="" first=${SERVICES[0]%%:*}
    local grpc=${SVC_GRPC[$first]}
    local bin_rel=$BIN_DIR
    printf '\n'
    printf '=================  Köpür is running  =================\n'
    printf '  %-18s %s   (superuser nrm, trust on loopback)\n' "PostgreSQL" "$DATABASE_URL"
    printf '  %-18s %s\n' "NATS (JetStream)" "$NATS_URL"
    printf '  %-18s %s\n' "NATS monitoring" "${NRM_STACK_NATS_MONITOR_URL:--}"
    for entry in "${SERVICES[@]}"; do
        name=${entry%%:*}
        printf '  %-18s gRPC %-18s metrics http://%s/metrics   database %s%s\n' \
            "$name" "${SVC_GRPC[$name]}" "${SVC_METRICS[$name]}" "${SVC_DB[$name]}" \
            "$([[ $name == casepath ]] && printf '   country %s' "${NRM_XBORDER__COUNTRY:-kg}")"
        pid_list+=" $name=${SVC_PID[$name]}"
    done
    printf '  %-18s %s   (logs/, secrets/, issuer/, nrmctl.env)\n' "Data folder" "$REPO_ROOT/$DATA_DIR"
    printf '  %-18s %s   (private key for nrmctl only; services verify with %s)\n' \
        "Token issuer" "$ISSUER_DIR/signing-key.jwk" "$JWKS_URL"
    if [[ -L $DATA_DIR/pgdata ]]; then
        printf '  %-18s %s   (linked from %s/pgdata: postgres cannot reach %s)\n' \
            "PostgreSQL data" "$(readlink "$DATA_DIR/pgdata")" "$DATA_DIR" "$DATA_DIR"
    fi
    printf '  %-18s Ctrl-C here (data kept); then `make reset` deletes all data\n' "Stop / reset"
    printf '\n  Try it:\n'
    printf '    set -a; . %s/nrmctl.env; set +a\n' "$DATA_DIR"
    printf '    TOKEN=$(%s/nrmctl token mint --agency kg-mvd --role police --officer officer-17)   # 1 h, EdDSA\n' "$bin_rel"
    printf '    grpcurl -plaintext -H "authorization: Bearer $TOKEN" %s list\n' "$grpc"
    if [[ -n ${SVC_GRPC[casepath]:-} ]]; then
        printf '    %s/nrmctl --as-agency kg-coordinator --as-role coordinator paths --all   # casepath\n' "$bin_rel"
    fi
    printf '========================================================\n'
    log "pids:$pid_list"
}

main() {
    local entry name
    step "deps (scripts/deps.sh)"
    bash "$SCRIPT_DIR/deps.sh"

    mkdir -p "$DATA_DIR"
    exec 5>>"$DATA_DIR/run.lock"
    flock -n 5 || die "another 'make run' is already running on $DATA_DIR"
    # users.lock (shared): `make reset` refuses while we run.
    exec 6>>"$DATA_DIR/users.lock"
    flock -s 6

    if [[ ${NRM_RUN_BUILD:-1} == 0 ]]; then
        step "build skipped (NRM_RUN_BUILD=0): using $BIN_DIR"
    else
        local -a build=(cargo build --release)
        for entry in "${SERVICES[@]}"; do
            build+=(-p "nrm-${entry%%:*}")
        done
        for name in "${EXTRA_PACKAGES[@]}"; do
            build+=(-p "$name")
        done
        build+=(--bins)
        step "build (${build[*]})"
        "${build[@]}"
    fi

    trap cleanup EXIT
    trap on_signal INT TERM HUP

    step "stack up ($DATA_DIR)"
    STACK_UP=1
    bash "$SCRIPT_DIR/stack.sh" up "$DATA_DIR" >/dev/null
    # shellcheck source=/dev/null
    . "$DATA_DIR/stack.env"
    DATABASE_URL=${NRM_DATABASE__URL:-$NRM_STACK_DATABASE_URL}
    NATS_URL=${NRM_NATS__URL:-$NRM_STACK_NATS_URL}

    ensure_secrets
    ensure_issuer
    mkdir -p "$LOG_DIR" "$PID_DIR"

    step "services"
    local follow=${NRM_RUN_FOLLOW_LOGS:-}
    [[ -n $follow ]] || { [[ -t 1 ]] && follow=1 || follow=0; }
    if [[ $follow == 1 ]]; then
        local -a logs=()
        for entry in "${SERVICES[@]}"; do
            logs+=("$LOG_DIR/${entry%%:*}.log")
            touch "$LOG_DIR/${entry%%:*}.log"
        done
        tail -n 0 -F "${logs[@]}" &
        TAIL_PID=$!
    fi
    for entry in "${SERVICES[@]}"; do
        start_service "${entry%%:*}"
    done
    for entry in "${SERVICES[@]}"; do
        wait_ready "${entry%%:*}"
    done

    (
        umask 077
        {
            # NRM_ENDPOINT for identification, NRM_REFERRAL_ENDPOINT,
            # NRM_SHELTER_ENDPOINT, … for every other service
            for entry in "${SERVICES[@]}"; do
                local svc=${entry%%:*} var
                var=NRM_${svc^^}_ENDPOINT
                [[ $svc == identification ]] && var=NRM_ENDPOINT
                env_line "$var" "http://$(addr_host "${SVC_GRPC[$svc]}"):$(addr_port "${SVC_GRPC[$svc]}")"
            done
            # the development issuer's private key: nrmctl mints with it
            env_line NRM_ISSUER_KEY "$ISSUER_KEY"
            # for `nrmctl events watch`
            env_line NRM_NATS__URL "$NATS_URL"
        } >"$DATA_DIR/nrmctl.env.tmp"
        mv -f "$DATA_DIR/nrmctl.env.tmp" "$DATA_DIR/nrmctl.env"
    )

    banner

    local -a pids=()
    for name in "${!SVC_PID[@]}"; do pids+=("${SVC_PID[$name]}"); done
    local rc=0
    wait -n "${pids[@]}" || rc=$?
    # Only a service that ended by itself gets here (a signal runs on_signal).
    for name in "${!SVC_PID[@]}"; do
        if ! alive "${SVC_PID[$name]}"; then
            log "$name exited on its own (status $rc); last lines of $LOG_DIR/$name.log:"
            tail -n 20 "$LOG_DIR/$name.log" >&2
        fi
    done
    exit 1
}

main "$@"
