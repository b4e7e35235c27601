#!/usr/bin/env bash
# Köpür — what `make run-federation` runs: two countries on this machine, in
# the foreground. ru is the destination country (an IOM office and kg's
# consulate there open and run returns); kg is the home country (the return
# is announced there before departure; its NRM takes the person over).
#
#   deps → cargo build --release (the services, nrmctl) → once, in
#   .data-federation: each country's X25519 key pair (`nrmctl xborder
#   keygen`), the link's TLS files (`nrmctl xborder tls`), the link password
#   → one private PostgreSQL cluster for both countries' databases
#   (ru_repatriation, kg_identification, …; scripts/stack.sh, PostgreSQL
#   only) → each country as `make run` runs one (scripts/run.sh, in its own
#   folder): its own NATS server from deploy/federation/{ru,kg}.conf (kg a
#   leaf node of ru over TLS), its services with
#     NRM_XBORDER__COUNTRY=ru|kg
#     NRM_XBORDER__PRIVATE_KEY_FILE=.data-federation/keys/<cc>.key
#     NRM_XBORDER__PARTNERS=<the other>=.data-federation/keys/<other>.pub
#   its own token issuer and sealing keys → banner → wait. Ctrl-C (or
#   SIGTERM) stops both countries, then PostgreSQL; the data stay
#   (`make reset-federation` deletes them).
#
# ru runs repatriation and casepath; kg runs identification, referral,
# shelter, repatriation and casepath (each casepath projects its own
# country's streams, with NRM_XBORDER__COUNTRY naming the country). Ports: kg's services from 50051 (as `make run`), ru's from
# 50154; NATS: ru from 14522 (monitoring 18522, leaf nodes 17422), kg from
# 14622 (18622); PostgreSQL from 15442. Each first free port from there.
#
# Files: .data-federation/{ru,kg}/ are `make run`'s .data for each country
# (logs/, nrmctl.env, issuer/, secrets/, nats.conf, nats.log, run.log);
# .data-federation/db/ the PostgreSQL cluster; keys/, tls/, link.password.
# NRM_RUN_BUILD=0 skips the build (binaries already in target/release).
# Works on Debian's nats-server 2.9.10 and on a current one (NRM_NATS_SERVER
# picks another binary); sync_interval: always only on 2.10 or later.

set -euo pipefail

SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO_ROOT=$(cd "$SCRIPT_DIR/.." && pwd)
cd "$REPO_ROOT"

DATA_DIR=.data-federation
BIN_DIR=${CARGO_TARGET_DIR:-target}/release
KEYS_DIR=$DATA_DIR/keys
TLS_DIR=$DATA_DIR/tls
LINK=ru-kg
RU_SERVICES="repatriation casepath"
KG_SERVICES="identification referral shelter repatriation casepath"
SUBJECT_PREFIX=${NRM_NATS__SUBJECT_PREFIX:-nrm}
STREAM_PREFIX=${NRM_NATS__STREAM_PREFIX:-NRM}
READY_TIMEOUT=300 # seconds, each country (run.sh waits 60 s for each service)
STOP_TIMEOUT=60   # seconds, each country

log() { printf 'federation: %s\n' "$*" >&2; }
die() {
    printf 'federation: error: %s\n' "$*" >&2
    exit 1
}
step() { printf '\n==> %s\n' "$*" >&2; }

# shellcheck source=lib.sh source-path=SCRIPTDIR
. "$SCRIPT_DIR/lib.sh"

declare -A RUN_PID=()
DB_UP=0

# --------------------------------------------------------------------------
# Once: keys, TLS, the link password

ensure_keys() {
    local cc
    mkdir -p "$KEYS_DIR"
    for cc in ru kg; do
        if [[ ! -s $KEYS_DIR/$cc.key ]]; then
            "$BIN_DIR/nrmctl" xborder keygen --country "$cc" --dir "$KEYS_DIR" >/dev/null
            log "created $cc's key pair in $KEYS_DIR ($cc.key stays with $cc; $cc.pub goes to the partner)"
        fi
    done
    if [[ ! -s $TLS_DIR/$LINK-leaf.pem ]]; then
        "$BIN_DIR/nrmctl" xborder tls --dir "$TLS_DIR" --name "$LINK" >/dev/null
        log "created the link's CA and certificates in $TLS_DIR"
    fi
    ensure_secret "$DATA_DIR/link.password"
    ensure_secret "$DATA_DIR/ru-services.password"
}

# The two NATS templates, for scripts/stack.sh: everything filled in but the
# ports, the folder and sync_interval, which stack.sh fills at each start.
write_templates() {
    local leaf_port=""
    [[ -r $DATA_DIR/leaf.port ]] && leaf_port=$(<"$DATA_DIR/leaf.port")
    if [[ -z $leaf_port ]] || port_in_use "$leaf_port"; then
        leaf_port=$(pick_port 17422)
    fi
    echo "$leaf_port" >"$DATA_DIR/leaf.port"
    LEAF_PORT=$leaf_port
    local -a values=(
        "LEAF_PORT=$leaf_port"
        "HUB_LEAF_PORT=$leaf_port"
        "TLS_DIR=$REPO_ROOT/$TLS_DIR"
        "OUT_STREAM=${STREAM_PREFIX}_XB_OUT_KG"
        "IN_STREAM=${STREAM_PREFIX}_XB_IN_RU"
        "SUBJECT_PREFIX=$SUBJECT_PREFIX"
        "DELIVER_PREFIX=$SUBJECT_PREFIX.xborder.v1.kg"
        "LINK_PASSWORD=$(<"$DATA_DIR/link.password")"
        "SERVICES_PASSWORD=$(<"$DATA_DIR/ru-services.password")"
    )
    local cc
    for cc in ru kg; do
        mkdir -p "$DATA_DIR/$cc"
        (
            umask 077
            fill_template "deploy/federation/$cc.conf" "${values[@]}" >"$DATA_DIR/$cc/nats.template"
        )
    done
}

# --------------------------------------------------------------------------
# The countries

# start_country CC SERVICES NATS_PORT NATS_HTTP_PORT: scripts/run.sh for CC
# in the background; waits until its services answer.
start_country() {
    local cc=$1 services=$2 nats_port=$3 http_port=$4 partner svc
    [[ $cc == ru ]] && partner=kg || partner=ru
    local dir=$DATA_DIR/$cc
    rm -f "$dir/nrmctl.env"
    local -a env=(
        "NRM_RUN_DATA_DIR=$dir"
        "NRM_RUN_SERVICES=$services"
        "NRM_RUN_BUILD=0"
        "NRM_RUN_FOLLOW_LOGS=0"
        "NRM_STACK_SERVERS=nats"
        "NRM_STACK_NATS_TEMPLATE=$REPO_ROOT/$dir/nats.template"
        "NRM_STACK_NATS_PORT=$nats_port"
        "NRM_STACK_NATS_HTTP_PORT=$http_port"
        "NRM_DATABASE__URL=$DATABASE_URL"
        "NRM_XBORDER__COUNTRY=$cc"
        "NRM_XBORDER__PRIVATE_KEY_FILE=$REPO_ROOT/$KEYS_DIR/$cc.key"
        "NRM_XBORDER__PARTNERS=$partner=$REPO_ROOT/$KEYS_DIR/$partner.pub"
    )
    local -a taken=()
    for svc in $services; do
        env+=("NRM_${svc^^}_DATABASE_NAME=${cc}_$svc")
        if [[ $cc == ru ]]; then
            # ru's gRPC ports from 50154, clear of kg's (make run's) 5005x.
            local port
            port=$(pick_port 50154 "${taken[@]}")
            taken+=("$port")
            env+=("NRM_${svc^^}_GRPC_ADDR=127.0.0.1:$port")
        fi
    done
    log "starting $cc ($services; log: $dir/run.log)"
    printf '\n===== %s: federation.sh starts %s =====\n' "$(date -u +%FT%TZ)" "$cc" >>"$dir/run.log"
    (
        close_fds
        # A background job here ignores SIGINT; cleanup() sends SIGTERM.
        exec env "${env[@]}" bash "$SCRIPT_DIR/run.sh" </dev/null >>"$dir/run.log" 2>&1
    ) &
    RUN_PID[$cc]=$!
    local deadline=$((SECONDS + READY_TIMEOUT))
    while [[ ! -s $dir/nrmctl.env ]]; do
        if ! alive "${RUN_PID[$cc]}"; then
            tail -n 40 "$dir/run.log" >&2
            die "$cc did not start (log: $dir/run.log)"
        fi
        ((SECONDS < deadline)) || {
            tail -n 40 "$dir/run.log" >&2
            die "$cc's services did not answer within ${READY_TIMEOUT}s (log: $dir/run.log)"
        }
        sleep 0.3
    done
}

# env_of CC NAME: the value of NAME in CC's nrmctl.env or stack.env.
env_of() {
    sed -n "s/^$2=//p" "$DATA_DIR/$1/nrmctl.env" "$DATA_DIR/$1/stack.env" 2>/dev/null | head -n1
}

# The link: kg's leaf connection as ru's monitoring counts it.
link_state() {
    local monitor port
    monitor=$(env_of ru NRM_STACK_NATS_MONITOR_URL)
    port=${monitor##*:}
    if http_get "$port" /leafz | grep -q '"leafnodes": *[1-9]'; then
        echo "up (kg is a leaf node of ru, TLS)"
    else
        echo "not up yet (see $DATA_DIR/kg/nats.log)"
    fi
}

# shellcheck disable=SC2016 # $(...) in the examples is printed, not expanded
banner() {
    local deadline=$((SECONDS + 20)) link
    link=$(link_state)
    while [[ $link == not* ]] && ((SECONDS < deadline)); do
        sleep 0.5
        link=$(link_state)
    done
    local nrmctl=$BIN_DIR/nrmctl
    printf '\n'
    printf '=========  Köpür: two countries on this machine  =========\n'
    printf '  ru  destination country: IOM office, consulate (JetStream domain ru)\n'
    printf '      %-16s %s   monitoring %s   leaf nodes 127.0.0.1:%s (TLS)\n' "NATS" \
        "$(env_of ru NRM_STACK_NATS_URL)" "$(env_of ru NRM_STACK_NATS_MONITOR_URL)" "$LEAF_PORT"
    printf '      %-16s gRPC %s\n' "repatriation" "$(env_of ru NRM_REPATRIATION_ENDPOINT)"
    printf '      %-16s gRPC %s\n' "casepath" "$(env_of ru NRM_CASEPATH_ENDPOINT)"
    printf '      %-16s %s/   (logs/, nrmctl.env, issuer/)\n' "data" "$DATA_DIR/ru"
    printf '  kg  home country: IOM, MSD, shelters, the coordinator (JetStream domain kg)\n'
    printf '      %-16s %s   monitoring %s\n' "NATS" \
        "$(env_of kg NRM_STACK_NATS_URL)" "$(env_of kg NRM_STACK_NATS_MONITOR_URL)"
    printf '      %-16s gRPC %s\n' "identification" "$(env_of kg NRM_ENDPOINT)"
    printf '      %-16s gRPC %s\n' "referral" "$(env_of kg NRM_REFERRAL_ENDPOINT)"
    printf '      %-16s gRPC %s\n' "shelter" "$(env_of kg NRM_SHELTER_ENDPOINT)"
    printf '      %-16s gRPC %s\n' "repatriation" "$(env_of kg NRM_REPATRIATION_ENDPOINT)"
    printf '      %-16s gRPC %s\n' "casepath" "$(env_of kg NRM_CASEPATH_ENDPOINT)"
    printf '      %-16s %s/\n' "data" "$DATA_DIR/kg"
    printf '  %-20s %s\n' "the link" "$link"
    printf '  %-20s %s   (databases ru_repatriation, kg_identification, kg_referral, …)\n' \
        "PostgreSQL" "$DATABASE_URL"
    printf '  %-20s %s/{ru,kg}.key|.pub   TLS: %s/   link user kg: %s/link.password\n' \
        "keys" "$KEYS_DIR" "$TLS_DIR" "$DATA_DIR"
    printf '  %-20s Ctrl-C here (data kept); then `make reset-federation` deletes all data\n' "stop / reset"
    printf '\n  Try it (README: "Two countries: make run-federation"):\n'
    printf '    ru() { (set -a; . %s/ru/nrmctl.env; set +a; exec %s "$@"); }\n' "$DATA_DIR" "$nrmctl"
    printf '    kg() { (set -a; . %s/kg/nrmctl.env; set +a; exec %s "$@"); }\n' "$DATA_DIR" "$nrmctl"
    printf '    IOM="--as-agency ru-iom --as-role iom --as-officer iom-7"\n'
    printf '    ru $IOM return open --citizenship KG --consulate kg-consulate-moscow \\\n'
    printf '        --identified-by ru-mvd --foreign-reference RU-77-0042 --gender female --age-band 18-24 \\\n'
    printf '        --form labour --exploitation-country RU --name "A. Example" --passport AC1234567:KG\n'
    printf '    ru $IOM return consent RETURN_ID --version 1 --informed --share profile,needs,risk \\\n'
    printf '        --reintegration --attested-by iom-7 --form-ref RU-F-12\n'
    printf '    kg --as-agency kg-iom --as-role iom --as-officer iom-1 return list --direction incoming\n'
    printf '    kg --as-agency kg-coordinator --as-role coordinator --as-officer coord-1 paths --all\n'
    printf '==========================================================\n'
    log "pids: ru run.sh=${RUN_PID[ru]} kg run.sh=${RUN_PID[kg]}"
}

# --------------------------------------------------------------------------
# Start-up and shutdown

# shellcheck disable=SC2317 # called through the EXIT trap
cleanup() {
    local rc=$? cc deadline
    trap '' INT TERM HUP
    for cc in kg ru; do
        [[ -n ${RUN_PID[$cc]:-} ]] || continue
        if alive "${RUN_PID[$cc]}"; then
            log "stopping $cc"
            kill -TERM "${RUN_PID[$cc]}" 2>/dev/null || true
        fi
    done
    for cc in kg ru; do
        [[ -n ${RUN_PID[$cc]:-} ]] || continue
        deadline=$((SECONDS + STOP_TIMEOUT))
        while alive "${RUN_PID[$cc]}" && ((SECONDS < deadline)); do sleep 0.2; done
        if alive "${RUN_PID[$cc]}"; then
            log "$cc did not stop within ${STOP_TIMEOUT}s (its log: $DATA_DIR/$cc/run.log)"
            ((rc)) || rc=1
        fi
        wait "${RUN_PID[$cc]}" 2>/dev/null || true
    done
    if ((DB_UP)); then
        NRM_STACK_SERVERS=pg bash "$SCRIPT_DIR/stack.sh" down "$DATA_DIR/db" || { ((rc)) || rc=1; }
    fi
    exit "$rc"
}

# shellcheck disable=SC2317 # called through traps
on_signal() {
    printf '\n' >&2
    log "stopping both countries (data are kept in $DATA_DIR)"
    exit 0
}

main() {
    step "deps (scripts/deps.sh)"
    bash "$SCRIPT_DIR/deps.sh"

    mkdir -p "$DATA_DIR"
    exec 5>>"$DATA_DIR/run.lock"
    flock -n 5 || die "another 'make run-federation' is already running on $DATA_DIR"

    if [[ ${NRM_RUN_BUILD:-1} == 0 ]]; then
        step "build skipped (NRM_RUN_BUILD=0): using $BIN_DIR"
    else
        local -a build=(cargo build --release --bins -p nrmctl)
        local svc
        for svc in $KG_SERVICES $RU_SERVICES; do
            [[ " ${build[*]} " == *" nrm-$svc "* ]] || build+=(-p "nrm-$svc")
        done
        step "build (${build[*]})"
        "${build[@]}"
    fi

    trap cleanup EXIT
    trap on_signal INT TERM HUP

    step "keys and the link's TLS ($KEYS_DIR, $TLS_DIR; made once)"
    ensure_keys
    write_templates

    step "PostgreSQL for both countries ($DATA_DIR/db)"
    DB_UP=1
    NRM_STACK_SERVERS=pg NRM_STACK_PG_PORT=${NRM_STACK_PG_PORT:-15442} \
        bash "$SCRIPT_DIR/stack.sh" up "$DATA_DIR/db" >/dev/null
    DATABASE_URL=$(sed -n 's/^NRM_STACK_DATABASE_URL=//p' "$DATA_DIR/db/stack.env")
    [[ -n $DATABASE_URL ]] || die "no PostgreSQL URL in $DATA_DIR/db/stack.env"

    step "ru: NATS (the link's hub) and $RU_SERVICES"
    start_country ru "$RU_SERVICES" 14522 18522
    step "kg: NATS (a leaf node of ru) and $KG_SERVICES"
    start_country kg "$KG_SERVICES" 14622 18622

    banner

    local rc=0
    wait -n "${RUN_PID[ru]}" "${RUN_PID[kg]}" || rc=$?
    # Only a country that ended by itself gets here (a signal runs on_signal).
    local cc
    for cc in ru kg; do
        if ! alive "${RUN_PID[$cc]}"; then
            log "$cc ended on its own (status $rc); last lines of $DATA_DIR/$cc/run.log:"
            tail -n 20 "$DATA_DIR/$cc/run.log" >&2
        fi
    done
    exit 1
}

main "$@"
