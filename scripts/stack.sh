#!/usr/bin/env bash
# Köpür — a private PostgreSQL cluster and a private NATS server (JetStream)
# under one folder, for `make run` (.data) and the tests (target/nrm-testenv).
# Nothing else on the machine is touched: own data folders, own free ports on
# 127.0.0.1, own unix-socket folder.
#
# Usage:
#   scripts/stack.sh up DIR      start (or reuse) the stack; prints DIR/stack.env
#   scripts/stack.sh down DIR    stop both servers, keep the data
#   scripts/stack.sh status DIR  what runs (exit 0 when both run, 3 otherwise)
#   scripts/stack.sh reset DIR   stop, then delete DIR and everything in it
#
# `up` prints the three lines of DIR/stack.env on stdout (all else goes to
# stderr), so `eval "$(scripts/stack.sh up DIR)"` works as well as sourcing
# DIR/stack.env:
#   NRM_STACK_DATABASE_URL=postgres://nrm@127.0.0.1:PGPORT
#   NRM_STACK_NATS_URL=nats://127.0.0.1:NATSPORT
#   NRM_STACK_NATS_MONITOR_URL=http://127.0.0.1:MONITORPORT
#
# Layout of DIR:
#   .lock            flock: one `up`/`down`/`reset` at a time per DIR
#   users.lock       shared flock held by users (run.sh, test.sh); `reset`
#                    refuses while one holds it
#   pgdata/          the cluster (owned by the PostgreSQL user, see below)
#   pgrun/           its unix socket
#   postgres.log     server log
#   nats.conf        generated from deploy/nats/local.conf
#   nats/            JetStream store;  nats.log, nats.pid
#   stack.env        the URLs above
#
# Root: initdb and postgres refuse to run as root (CI runs as root). As root,
# the cluster runs as `postgres` (created by Debian's package), or as a system
# user `nrm-postgres` created here when `postgres` does not exist. When that
# user cannot reach DIR (a parent folder without the x bit for it: a clone
# under /root, mode 700, or a folder made by mktemp -d), the cluster lives in
# ROOT/nrm-stack-<hash of DIR's path> instead (owned by that user, mode 700;
# its file stack-dir names DIR), and DIR holds the symlinks pgdata, pgrun and
# postgres.log to it; `reset` deletes both. ROOT is NRM_STACK_PG_FALLBACK_ROOT,
# by default /var/lib/kopur, which outlives reboots and tmp cleaners (`make
# run`'s data); scripts/test.sh and scripts/bench.sh set /tmp (throwaway
# data). Set it to '' to fail instead, with the chmod that would let the user
# reach DIR. A cluster there that DIR no longer links to (DIR was deleted
# without `reset`, and its keys and NATS data with it) is deleted when DIR is
# set up again, as it would have been inside DIR.
#
# Ports: first free from 15432 (PostgreSQL), 14222 (NATS), 18222 (NATS
# monitoring); NRM_STACK_PG_PORT, NRM_STACK_NATS_PORT, NRM_STACK_NATS_HTTP_PORT
# change the starting points. A stopped stack restarts on its previous ports
# when they are still free. NRM_NATS_SERVER picks a nats-server binary.
#
# Two countries on one machine (scripts/federation.sh) run a stack per part:
# NRM_STACK_SERVERS=pg or =nats starts only that server (default: both; `down`
# and `reset` stop whatever runs), and NRM_STACK_NATS_TEMPLATE names the NATS
# template instead of deploy/nats/local.conf (same placeholders __PORT__,
# __HTTP_PORT__, __DIR__, __SYNC_INTERVAL__; its `listen:` and `http:` lines
# as there). stack.env then holds only the URLs of what this stack runs.

set -euo pipefail

SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO_ROOT=$(cd "$SCRIPT_DIR/.." && pwd)
NATS_TEMPLATE=${NRM_STACK_NATS_TEMPLATE:-$REPO_ROOT/deploy/nats/local.conf}
STACK_SERVERS=${NRM_STACK_SERVERS:-pg nats}
case " $STACK_SERVERS " in
*" pg "* | *" nats "*) ;;
*)
    printf 'stack: error: NRM_STACK_SERVERS=%s: name pg, nats or both\n' "$STACK_SERVERS" >&2
    exit 2
    ;;
esac

PG_PORT_START=${NRM_STACK_PG_PORT:-15432}
NATS_PORT_START=${NRM_STACK_NATS_PORT:-14222}
NATS_HTTP_PORT_START=${NRM_STACK_NATS_HTTP_PORT:-18222}
PG_SUPERUSER=nrm
# Root only, when the PostgreSQL user cannot reach DIR: where the cluster goes
# (see the header). Unset: the default; set to '': no fallback.
PG_FALLBACK_ROOT_DEFAULT=/var/lib/kopur
PG_FALLBACK_ROOT=${NRM_STACK_PG_FALLBACK_ROOT-$PG_FALLBACK_ROOT_DEFAULT}
START_TIMEOUT=60 # seconds, each server

log() { printf 'stack: %s\n' "$*" >&2; }
# wants pg|nats: this stack runs that server (NRM_STACK_SERVERS).
wants() { [[ " $STACK_SERVERS " == *" $1 "* ]]; }
die() {
    printf 'stack: error: %s\n' "$*" >&2
    exit 1
}

usage() {
    sed -n '7,11p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//' >&2
    exit 2
}

# --------------------------------------------------------------------------
# Helpers (close_fds, port_in_use, pick_port, http_get, alive)

# shellcheck source=lib.sh source-path=SCRIPTDIR
. "$SCRIPT_DIR/lib.sh"

# --------------------------------------------------------------------------
# Locating the servers

find_nats() {
    if [[ -n ${NRM_NATS_SERVER:-} ]]; then
        [[ -x $NRM_NATS_SERVER ]] || die "NRM_NATS_SERVER=$NRM_NATS_SERVER is not executable"
        echo "$NRM_NATS_SERVER"
    elif command -v nats-server >/dev/null 2>&1; then
        command -v nats-server
    elif [[ -x /usr/sbin/nats-server ]]; then
        echo /usr/sbin/nats-server
    else
        return 1
    fi
}

# find_pg_bindir [MAJOR]: folder with initdb, pg_ctl and postgres; the given
# major version when asked (an existing cluster needs its own version).
find_pg_bindir() {
    local want=${1:-} d
    local -a candidates=()
    if [[ -n $want ]]; then
        candidates+=("/usr/lib/postgresql/$want/bin")
    else
        while IFS= read -r d; do
            candidates+=("$d")
        done < <(compgen -G '/usr/lib/postgresql/*/bin' | sort -V -r)
    fi
    if command -v pg_config >/dev/null 2>&1; then
        candidates+=("$(pg_config --bindir 2>/dev/null || true)")
    fi
    if command -v initdb >/dev/null 2>&1; then
        candidates+=("$(dirname "$(readlink -f "$(command -v initdb)")")")
    fi
    for d in "${candidates[@]}"; do
        [[ -n $d && -x $d/initdb && -x $d/pg_ctl && -x $d/postgres ]] || continue
        if [[ -n $want ]]; then
            local v
            v=$("$d/postgres" --version 2>/dev/null | grep -oE '[0-9]+' | head -n1 || true)
            [[ $v == "$want" ]] || continue
        fi
        echo "$d"
        return 0
    done
    return 1
}

ensure_servers_installed() {
    if find_nats >/dev/null && find_pg_bindir >/dev/null; then
        return 0
    fi
    log "nats-server or PostgreSQL missing: running scripts/deps.sh --servers"
    bash "$SCRIPT_DIR/deps.sh" --servers >&2
    find_nats >/dev/null || die "nats-server still not found"
    find_pg_bindir >/dev/null || die "PostgreSQL (initdb, pg_ctl, postgres) still not found"
}

nats_supports_sync_interval() {
    local v major minor
    v=$("$NATS_BIN" --version 2>&1 | grep -oE '[0-9]+\.[0-9]+(\.[0-9]+)?' | head -n1 || true)
    [[ -n $v ]] || {
        log "cannot read the version of $NATS_BIN; assuming < 2.10"
        return 1
    }
    IFS=. read -r major minor _ <<<"$v"
    ((major > 2 || (major == 2 && minor >= 10)))
}

# --------------------------------------------------------------------------
# State of DIR

set_paths() {
    local arg=$1 create=$2
    [[ -n $arg ]] || usage
    if [[ $create == 1 ]]; then
        mkdir -p -- "$arg"
    elif [[ ! -d $arg ]]; then
        return 1
    fi
    DIR=$(cd -- "$arg" && pwd -P)
    case $DIR in
    *[\"\'\\$'\n']*) die "the stack folder's path must not contain quotes, backslashes or newlines: $DIR" ;;
    esac
    PGDATA_DIR=$DIR/pgdata
    PGRUN_DIR=$DIR/pgrun
    PG_LOG=$DIR/postgres.log
    PG_HOME=$DIR
    # Relocated (NRM_STACK_PG_FALLBACK_ROOT): DIR holds symlinks.
    if [[ -L $PGDATA_DIR ]]; then
        PGDATA_DIR=$(readlink "$DIR/pgdata")
        PGRUN_DIR=$(readlink "$DIR/pgrun")
        PG_LOG=$(readlink "$DIR/postgres.log")
        PG_HOME=$(dirname "$PGDATA_DIR")
    fi
    NATS_CONF=$DIR/nats.conf
    NATS_PID=$DIR/nats.pid
    NATS_LOG=$DIR/nats.log
    STACK_ENV=$DIR/stack.env
}

lock_dir() {
    exec 9>>"$DIR/.lock"
    flock -w 300 9 || die "timed out waiting for $DIR/.lock (another stack.sh on this folder?)"
}

# The user PostgreSQL runs as ('' = the current user).
pg_user() {
    if ((EUID != 0)); then
        echo ""
        return
    fi
    if [[ -d $PGDATA_DIR ]]; then
        local owner
        owner=$(stat -c %U "$PGDATA_DIR")
        if [[ $owner != root && $owner != UNKNOWN ]]; then
            echo "$owner"
            return
        fi
    fi
    if id -u postgres >/dev/null 2>&1; then
        echo postgres
        return
    fi
    if ! id -u nrm-postgres >/dev/null 2>&1; then
        log "creating system user nrm-postgres (there is no 'postgres' user)"
        useradd --system --user-group --no-create-home --home-dir /nonexistent \
            --shell /usr/sbin/nologin nrm-postgres >&2
    fi
    echo nrm-postgres
}

# Run a command as the PostgreSQL user, from a folder it can read.
as_pg() {
    if [[ -n $PG_USER ]]; then
        (cd "$PG_HOME" && runuser -u "$PG_USER" -- "$@")
    else
        (cd "$PG_HOME" && "$@")
    fi
}

pg_running() {
    [[ -r $PGDATA_DIR/postmaster.pid ]] || return 1
    PG_PID=$(head -n1 "$PGDATA_DIR/postmaster.pid")
    alive "$PG_PID" postgres || return 1
    PG_PORT=$(sed -n 4p "$PGDATA_DIR/postmaster.pid")
}

nats_running() {
    [[ -r $NATS_PID ]] || return 1
    NATS_PID_NUM=$(tr -dc '0-9' <"$NATS_PID")
    alive "$NATS_PID_NUM" nats-server || return 1
    read_nats_ports
}

read_nats_ports() {
    [[ -r $NATS_CONF ]] || return 1
    NATS_PORT=$(sed -n 's/^listen: 127\.0\.0\.1:\([0-9]*\)$/\1/p' "$NATS_CONF")
    NATS_HTTP_PORT=$(sed -n 's/^http: 127\.0\.0\.1:\([0-9]*\)$/\1/p' "$NATS_CONF")
    [[ -n $NATS_PORT && -n $NATS_HTTP_PORT ]]
}

# previous_port VAR: the port recorded in stack.env for VAR, if any.
previous_port() {
    [[ -r $STACK_ENV ]] || return 0
    sed -n "s/^$1=.*:\([0-9]*\)\$/\1/p" "$STACK_ENV" | head -n1
}

# --------------------------------------------------------------------------
# PostgreSQL

pg_user_can() { (cd / && runuser -u "$PG_USER" -- test "$@"); }

# The first folder on the way to $1 that the PostgreSQL user cannot search.
first_blocking_folder() {
    local path="" part
    local -a parts
    IFS=/ read -r -a parts <<<"${1#/}"
    for part in "${parts[@]}"; do
        path=$path/$part
        if ! pg_user_can -x "$path"; then
            echo "$path"
            return 0
        fi
    done
}

# Root, and the PostgreSQL user cannot reach DIR (a parent folder is mode 700,
# e.g. under /root or made by mktemp -d): keep the cluster in
# PG_FALLBACK_ROOT/nrm-stack-<hash of DIR>, with symlinks in DIR, or fail and
# say what to chmod when PG_FALLBACK_ROOT is ''.
pg_relocate_or_die() {
    local blocked why
    blocked=$(first_blocking_folder "$DIR")
    [[ -n $blocked ]] || return 0
    why="'$blocked' is mode $(stat -c %A "$blocked")"
    if [[ -z $PG_FALLBACK_ROOT ]]; then
        die "PostgreSQL runs as '$PG_USER' (initdb and postgres refuse root) and cannot reach $DIR: $why, not searchable by that user. Run 'chmod o+x $blocked' (search only, not read), or use a stack folder elsewhere, or leave NRM_STACK_PG_FALLBACK_ROOT unset (cluster in $PG_FALLBACK_ROOT_DEFAULT) or set it to a folder for the cluster."
    fi
    if [[ -e $DIR/pgdata && ! -L $DIR/pgdata ]]; then
        die "$DIR/pgdata exists but '$PG_USER' cannot reach it ($why): run 'chmod o+x $blocked', or 'scripts/stack.sh reset $DIR'"
    fi
    local root home owner
    if [[ ! -d $PG_FALLBACK_ROOT ]]; then
        (umask 022 && mkdir -p -- "$PG_FALLBACK_ROOT") ||
            die "cannot create $PG_FALLBACK_ROOT for the PostgreSQL cluster of $DIR: set NRM_STACK_PG_FALLBACK_ROOT to a folder '$PG_USER' can reach"
    fi
    root=$(cd -- "$PG_FALLBACK_ROOT" && pwd -P)
    pg_user_can -x "$root" ||
        die "'$PG_USER' cannot reach $root either (NRM_STACK_PG_FALLBACK_ROOT): $(first_blocking_folder "$root") is mode $(stat -c %A "$(first_blocking_folder "$root")")"
    home=$root/nrm-stack-$(printf '%s' "$DIR" | sha256sum | cut -c1-12)
    [[ ! -L $home ]] || die "$home is a symlink: not keeping a cluster there"
    if [[ -e $home ]]; then
        owner=$(stat -c %U "$home")
        [[ -d $home && ($owner == root || $owner == "$PG_USER") ]] ||
            die "$home exists and is not a folder of root or '$PG_USER' (owner $owner): not keeping a cluster there"
        # Not an orphan when DIR links to it (it just lost its permissions).
        if [[ $(readlink -- "$DIR/pgdata" 2>/dev/null || true) != "$home/pgdata" ]]; then
            pg_remove_orphan "$home"
        fi
    fi
    mkdir -p -- "$home"
    chown "$PG_USER:" "$home"
    chmod 700 "$home"
    printf '%s\n' "$DIR" >"$home/stack-dir"
    ln -sfn "$home/pgdata" "$DIR/pgdata"
    ln -sfn "$home/pgrun" "$DIR/pgrun"
    ln -sfn "$home/postgres.log" "$DIR/postgres.log"
    PG_HOME=$home
    PGDATA_DIR=$home/pgdata
    PGRUN_DIR=$home/pgrun
    PG_LOG=$home/postgres.log
    log "'$PG_USER' cannot reach $DIR ($why): the cluster lives in $home (symlinks in $DIR)"
}

# pg_remove_orphan HOME: HOME (for DIR, which does not link to it) holds a
# cluster of an earlier DIR that was deleted without `reset`: its keys and
# NATS data are gone, so delete it as well rather than start with half the
# old state.
pg_remove_orphan() {
    local home=$1 was="" pid
    [[ -e $home/pgdata || -e $home/postgres.log ]] || return 0
    [[ -r $home/stack-dir ]] && was=$(<"$home/stack-dir")
    if [[ -n $was && $was != "$DIR" ]]; then
        die "$home belongs to the stack folder $was, not $DIR (same hash): move one of them"
    fi
    if [[ -r $home/pgdata/postmaster.pid ]]; then
        pid=$(head -n1 "$home/pgdata/postmaster.pid")
        if alive "$pid" postgres; then
            die "a PostgreSQL server (pid $pid) still runs from $home, the cluster of an earlier $DIR that was deleted without 'scripts/stack.sh reset': stop it ('cd / && runuser -u $(stat -c %U "$home/pgdata") -- $PG_BIN/pg_ctl -D $home/pgdata stop') and run this again"
        fi
    fi
    log "deleting the PostgreSQL cluster in $home: it belongs to an earlier $DIR, deleted without 'scripts/stack.sh reset' (its keys and NATS data went with it)"
    rm -rf -- "$home/pgdata" "$home/pgrun" "$home/postgres.log" "$home/stack-dir"
}

pg_prepare_dirs() {
    local d
    if ((EUID == 0)); then
        # DIR is ours: let the PostgreSQL user search it.
        [[ $(stat -c %a "$DIR") =~ [1357]$ ]] || chmod o+x "$DIR"
    elif [[ -d $PGDATA_DIR && ! -O $PGDATA_DIR ]]; then
        die "$PGDATA_DIR belongs to $(stat -c %U "$PGDATA_DIR") (created as root?): run this as root, or 'scripts/stack.sh reset $DIR' as root"
    fi
    if [[ -n $PG_USER ]] && ! pg_user_can -x "$PG_HOME"; then
        pg_relocate_or_die
    fi
    for d in "$PGDATA_DIR" "$PGRUN_DIR"; do
        mkdir -p "$d"
        chmod 700 "$d"
    done
    touch "$PG_LOG"
    if [[ -n $PG_USER ]]; then
        chown "$PG_USER:" "$PGDATA_DIR" "$PGRUN_DIR" "$PG_LOG"
        pg_user_can -w "$PGDATA_DIR" || die "PostgreSQL user '$PG_USER' cannot write $PGDATA_DIR"
    fi
}

# Written before every start, so a moved folder keeps working.
pg_write_conf() {
    local socket_dirs=$PGRUN_DIR
    # sun_path holds 107 bytes: "$PGRUN_DIR/.s.PGSQL.NNNNN".
    if ((${#PGRUN_DIR} + 18 > 107)); then
        log "path too long for a unix socket; PostgreSQL listens on TCP only"
        socket_dirs=""
    fi
    cat >"$PGDATA_DIR/nrm-stack.conf" <<EOF
# Written by scripts/stack.sh at every start; edits are lost.
listen_addresses = '127.0.0.1'
unix_socket_directories = '$socket_dirs'
max_connections = 200
shared_buffers = 256MB
# Durability stays on: an acknowledged command is durable (DESIGN.md §4).
fsync = on
synchronous_commit = on
full_page_writes = on
log_line_prefix = '%m [%p] %q%u@%d '
log_timezone = 'UTC'
timezone = 'UTC'
EOF
    cat >"$PGDATA_DIR/pg_hba.conf" <<'EOF'
# Written by scripts/stack.sh: development cluster, trust on loopback only.
# TYPE  DATABASE  USER  ADDRESS        METHOD
local   all       all                  trust
host    all       all   127.0.0.1/32   trust
EOF
    if [[ -n $PG_USER ]]; then
        chown "$PG_USER:" "$PGDATA_DIR/nrm-stack.conf" "$PGDATA_DIR/pg_hba.conf"
    fi
    chmod 600 "$PGDATA_DIR/nrm-stack.conf" "$PGDATA_DIR/pg_hba.conf"
}

pg_initdb() {
    if [[ -f $PGDATA_DIR/nrm-stack.conf && -f $PGDATA_DIR/PG_VERSION ]]; then
        return 0
    fi
    if [[ -n $(ls -A "$PGDATA_DIR") ]]; then
        log "removing the leftovers of an unfinished initdb in $PGDATA_DIR"
        find "$PGDATA_DIR" -mindepth 1 -delete
    fi
    local -a locale_opts=(--no-locale)
    if locale -a 2>/dev/null | grep -qiE '^c\.utf-?8$'; then
        locale_opts=(--locale=C.UTF-8)
    fi
    log "initdb $PGDATA_DIR (superuser $PG_SUPERUSER, UTF8${PG_USER:+, as user $PG_USER})"
    if ! as_pg "$PG_BIN/initdb" -D "$PGDATA_DIR" -U "$PG_SUPERUSER" --encoding=UTF8 \
        "${locale_opts[@]}" --auth-local=trust --auth-host=trust >"$DIR/initdb.log" 2>&1; then
        tail -n 20 "$DIR/initdb.log" >&2
        die "initdb failed (full output in $DIR/initdb.log)"
    fi
    printf "\ninclude = 'nrm-stack.conf'\n" >>"$PGDATA_DIR/postgresql.conf"
    pg_write_conf
}

pg_start() {
    local port=$1
    pg_write_conf
    log "starting PostgreSQL on 127.0.0.1:$port (log: $PG_LOG)"
    # -w waits until the server accepts connections; its postmaster gets its
    # own session from pg_ctl, so Ctrl-C in a terminal does not reach it.
    if ! (close_fds && as_pg "$PG_BIN/pg_ctl" -D "$PGDATA_DIR" -l "$PG_LOG" -w -t "$START_TIMEOUT" \
        -o "-p $port" start </dev/null >&2); then
        tail -n 20 "$PG_LOG" >&2
        die "PostgreSQL did not start (log: $PG_LOG)"
    fi
    pg_running || die "PostgreSQL started but its postmaster.pid is not readable"
}

pg_stop() {
    if pg_running; then
        log "stopping PostgreSQL (pid $PG_PID)"
        as_pg "$PG_BIN/pg_ctl" -D "$PGDATA_DIR" -m fast -w -t "$START_TIMEOUT" stop </dev/null >&2
    fi
}

# --------------------------------------------------------------------------
# NATS

nats_write_conf() {
    local port=$1 http_port=$2 conf sync
    [[ -r $NATS_TEMPLATE ]] || die "missing template $NATS_TEMPLATE"
    if nats_supports_sync_interval; then
        sync="sync_interval: always"
    else
        sync="# sync_interval: always -- not known to nats-server < 2.10 (DESIGN.md §7)"
    fi
    # The template's comments mention the placeholders: leave them out.
    conf=$(grep -v '^[[:space:]]*#' "$NATS_TEMPLATE")
    conf=${conf//__PORT__/"$port"}
    conf=${conf//__HTTP_PORT__/"$http_port"}
    conf=${conf//__DIR__/"$DIR"}
    conf=${conf//__SYNC_INTERVAL__/"$sync"}
    printf '# Generated by scripts/stack.sh from %s (%s).\n%s\n' \
        "${NATS_TEMPLATE#"$REPO_ROOT"/}" "$("$NATS_BIN" --version 2>&1 | head -n1)" "$conf" >"$NATS_CONF"
}

nats_start() {
    local port=$1 http_port=$2 deadline pid
    nats_write_conf "$port" "$http_port"
    mkdir -p "$DIR/nats"
    rm -f "$NATS_PID"
    log "starting NATS on 127.0.0.1:$port, monitoring 127.0.0.1:$http_port (log: $NATS_LOG)"
    # setsid: own session, so Ctrl-C in a terminal does not reach it (a
    # background child of a non-interactive shell is no group leader, so
    # setsid execs in place and $! is the server's pid).
    (
        close_fds
        cd "$DIR"
        exec setsid "$NATS_BIN" -c "$NATS_CONF" </dev/null >>"$NATS_LOG" 2>&1
    ) &
    pid=$!
    deadline=$((SECONDS + START_TIMEOUT))
    while ((SECONDS < deadline)) && alive "$pid"; do
        if port_in_use "$port" &&
            http_get "$http_port" '/healthz?js-enabled-only=true' | grep -q '"ok"'; then
            NATS_PID_NUM=$pid
            return 0
        fi
        sleep 0.2
    done
    tail -n 20 "$NATS_LOG" >&2
    if alive "$pid"; then
        kill -TERM "$pid" 2>/dev/null || true
    fi
    die "NATS did not become healthy within ${START_TIMEOUT}s (log: $NATS_LOG)"
}

nats_stop() {
    if nats_running; then
        log "stopping NATS (pid $NATS_PID_NUM)"
        kill -TERM "$NATS_PID_NUM" 2>/dev/null || true
        local deadline=$((SECONDS + 30))
        while alive "$NATS_PID_NUM" && ((SECONDS < deadline)); do
            sleep 0.1
        done
        if alive "$NATS_PID_NUM"; then
            log "NATS did not stop within 30 s: SIGKILL"
            kill -KILL "$NATS_PID_NUM" 2>/dev/null || true
        fi
    fi
    rm -f "$NATS_PID"
}

# --------------------------------------------------------------------------
# Commands

write_stack_env() {
    local tmp=$STACK_ENV.tmp.$$
    {
        if wants pg; then
            echo "NRM_STACK_DATABASE_URL=postgres://$PG_SUPERUSER@127.0.0.1:$PG_PORT"
        fi
        if wants nats; then
            echo "NRM_STACK_NATS_URL=nats://127.0.0.1:$NATS_PORT"
            echo "NRM_STACK_NATS_MONITOR_URL=http://127.0.0.1:$NATS_HTTP_PORT"
        fi
    } >"$tmp"
    mv -f "$tmp" "$STACK_ENV"
}

cmd_up() {
    set_paths "$1" 1
    lock_dir
    ensure_servers_installed
    NATS_BIN=$(find_nats)
    local pg_version=""
    [[ -r $PGDATA_DIR/PG_VERSION ]] && pg_version=$(<"$PGDATA_DIR/PG_VERSION")
    PG_BIN=$(find_pg_bindir "$pg_version") ||
        die "the cluster in $PGDATA_DIR is PostgreSQL $pg_version, whose binaries are not installed (apt-get install postgresql-$pg_version), or reset it"
    PG_USER=$(pg_user)

    local pg_up=0 nats_up=0
    if wants pg; then pg_running && pg_up=1; else pg_up=1; fi
    if wants nats; then nats_running && nats_up=1; else nats_up=1; fi
    if ((pg_up && nats_up)); then
        log "reusing the running stack in $DIR (postgres pid ${PG_PID:--}, nats pid ${NATS_PID_NUM:--})"
        write_stack_env
        cat "$STACK_ENV"
        return 0
    fi

    # One port choice at a time for all stacks of this user, held until the
    # servers listen, so two stacks started at once do not pick the same port.
    exec 8>>"${TMPDIR:-/tmp}/nrm-stack-ports.$(id -u).lock"
    flock -w 300 8 || die "timed out waiting for the port lock"

    if ((!pg_up)); then
        pg_prepare_dirs
        pg_initdb
        PG_PORT=$(pick_port "$(previous_port NRM_STACK_DATABASE_URL | grep . || echo "$PG_PORT_START")")
        pg_start "$PG_PORT"
    fi
    if ((!nats_up)); then
        local prev_nats prev_http
        prev_nats=$(previous_port NRM_STACK_NATS_URL)
        prev_http=$(previous_port NRM_STACK_NATS_MONITOR_URL)
        NATS_PORT=$(pick_port "${prev_nats:-$NATS_PORT_START}" "${PG_PORT:-}")
        NATS_HTTP_PORT=$(pick_port "${prev_http:-$NATS_HTTP_PORT_START}" "${PG_PORT:-}" "$NATS_PORT")
        nats_start "$NATS_PORT" "$NATS_HTTP_PORT"
    fi
    exec 8>&-

    write_stack_env
    log "stack up in $DIR: postgres pid ${PG_PID:--}, nats pid ${NATS_PID_NUM:--} ($("$NATS_BIN" --version 2>&1 | head -n1))"
    cat "$STACK_ENV"
}

cmd_down() {
    if ! set_paths "$1" 0; then
        log "no stack folder $1: nothing to stop"
        return 0
    fi
    lock_dir
    stop_all
    log "stack in $DIR stopped (data kept)"
}

stop_all() {
    local pg_version=""
    [[ -r $PGDATA_DIR/PG_VERSION ]] && pg_version=$(<"$PGDATA_DIR/PG_VERSION")
    PG_USER=""
    if pg_running; then
        PG_BIN=$(find_pg_bindir "$pg_version") || die "no pg_ctl for PostgreSQL $pg_version"
        PG_USER=$(pg_user)
        pg_stop
    fi
    nats_stop
}

cmd_status() {
    if ! set_paths "$1" 0; then
        echo "stack $1: no such folder (not started)"
        return 3
    fi
    local rc=0
    echo "stack $DIR:"
    if pg_running; then
        printf '  postgres  running  pid %-8s postgres://%s@127.0.0.1:%s\n' "$PG_PID" "$PG_SUPERUSER" "$PG_PORT"
    else
        printf '  postgres  stopped%s\n' "$([[ -f $PGDATA_DIR/PG_VERSION ]] && echo "  (data in $PGDATA_DIR)")"
        if wants pg; then rc=3; fi
    fi
    if nats_running; then
        local jetstream=no
        http_get "$NATS_HTTP_PORT" '/healthz?js-enabled-only=true' | grep -q '"ok"' && jetstream=ok
        printf '  nats      running  pid %-8s nats://127.0.0.1:%s  monitor http://127.0.0.1:%s  jetstream %s\n' \
            "$NATS_PID_NUM" "$NATS_PORT" "$NATS_HTTP_PORT" "$jetstream"
    else
        printf '  nats      stopped%s\n' "$([[ -d $DIR/nats ]] && echo "  (data in $DIR/nats)")"
        if wants nats; then rc=3; fi
    fi
    return "$rc"
}

cmd_reset() {
    if ! set_paths "$1" 0; then
        log "no stack folder $1: nothing to reset"
        return 0
    fi
    case $DIR in
    / | "$HOME" | "$REPO_ROOT" | "$(dirname "$REPO_ROOT")")
        die "refusing to delete $DIR"
        ;;
    esac
    if [[ -n $(ls -A "$DIR") && ! -e $DIR/.lock && ! -e $DIR/stack.env && ! -e $DIR/pgdata && ! -e $DIR/nats.conf ]]; then
        die "$DIR does not look like a stack folder (no .lock, stack.env, pgdata or nats.conf): not deleting it"
    fi
    lock_dir
    if [[ -e $DIR/users.lock ]] && ! flock -n "$DIR/users.lock" true; then
        die "something still uses the stack in $DIR (make run or a test run holds users.lock): stop it first"
    fi
    stop_all
    if [[ $PG_HOME != "$DIR" && $(basename "$PG_HOME") == nrm-stack-* ]]; then
        rm -rf -- "$PG_HOME"
        log "deleted $PG_HOME (the cluster of $DIR)"
        # The default root goes too once it is empty (not /tmp, nor a given one).
        if [[ $(dirname "$PG_HOME") == "$PG_FALLBACK_ROOT_DEFAULT" ]]; then
            rmdir -- "$PG_FALLBACK_ROOT_DEFAULT" 2>/dev/null || true
        fi
    fi
    rm -rf -- "$DIR"
    log "stack in $DIR deleted"
}

main() {
    [[ $# -eq 2 ]] || usage
    case $1 in
    up) cmd_up "$2" ;;
    down) cmd_down "$2" ;;
    status) cmd_status "$2" ;;
    reset) cmd_reset "$2" ;;
    *) usage ;;
    esac
}

main "$@"
