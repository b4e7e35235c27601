# shellcheck shell=bash
# Köpür — helpers shared by scripts/stack.sh and scripts/run.sh (sourced, not
# run). The sourcing script defines die().


# Close every file descriptor above 2 in the current (sub)shell, so that the
# daemons started from it do not inherit our locks: a nats-server holding
# DIR/.lock would block every later `up`.
close_fds() {
    local fd
    for fd in /proc/self/fd/*; do
        fd=${fd##*/}
        if [[ $fd =~ ^[0-9]+$ ]] && ((fd > 2)); then
            eval "exec ${fd}>&-" 2>/dev/null || true
        fi
    done
}

# port_in_use PORT [HOST]: 0 when something accepts TCP connections on
# HOST:PORT (default 127.0.0.1). A timeout counts as "in use" (something is
# there, or the port is filtered).
port_in_use() {
    local rc=0
    # shellcheck disable=SC2016 # $0 and $1 are expanded by the inner bash
    timeout 2 bash -c 'exec 3<>"/dev/tcp/$1/$0"' "$1" "${2:-127.0.0.1}" 2>/dev/null || rc=$?
    [[ $rc -eq 0 || $rc -eq 124 ]]
}

# pick_port START [TAKEN...]: first port >= START that is free and not TAKEN.
pick_port() {
    local port=$1 tries=0 t taken
    shift
    while ((tries < 500)); do
        taken=0
        for t in "$@"; do
            [[ $t == "$port" ]] && taken=1
        done
        if ((taken == 0 && port <= 65535)) && ! port_in_use "$port"; then
            echo "$port"
            return 0
        fi
        port=$((port + 1))
        tries=$((tries + 1))
    done
    die "no free port found from $1"
}

# http_get PORT PATH: body of GET http://127.0.0.1:PORT/PATH; fails unless 200.
http_get() {
    local port=$1 path=$2
    if command -v curl >/dev/null 2>&1; then
        curl -fsS --max-time 3 "http://127.0.0.1:$port$path" 2>/dev/null
        return
    fi
    local reply
    # shellcheck disable=SC2016 # $0/$1 are expanded by the inner bash
    reply=$(timeout 3 bash -c '
        exec 3<>"/dev/tcp/127.0.0.1/$0" || exit 1
        printf "GET %s HTTP/1.0\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n" "$1" >&3
        cat <&3' "$port" "$path" 2>/dev/null) || return 1
    [[ ${reply%%$'\r'*} == "HTTP/"*" 200"* ]] || return 1
    printf '%s\n' "${reply#*$'\r\n\r\n'}"
}

# alive PID [NAME]: the process exists, is not a zombie, and (when NAME is
# given) its command line mentions NAME.
alive() {
    local pid=$1 name=${2:-} state cmdline
    [[ $pid =~ ^[0-9]+$ ]] || return 1
    [[ -r /proc/$pid/stat ]] || return 1
    state=$(sed 's/^.*) //' "/proc/$pid/stat" 2>/dev/null | cut -c1) || return 1
    [[ $state != Z && -n $state ]] || return 1
    if [[ -n $name ]]; then
        cmdline=$(tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null) || return 1
        [[ $cmdline == *"$name"* ]] || return 1
    fi
}

# fill_template FILE NAME=VALUE...: the text of FILE with every __NAME__
# replaced by VALUE (comment lines included; the placeholders a later step
# fills stay as they are).
fill_template() {
    local text kv
    text=$(<"$1")
    shift
    for kv in "$@"; do
        text=${text//"__${kv%%=*}__"/"${kv#*=}"}
    done
    printf '%s\n' "$text"
}

# ensure_secret FILE [BYTES]: a random secret of BYTES (default 24) bytes,
# URL-safe base64 without padding, written once (mode 600).
ensure_secret() {
    local file=$1 bytes=${2:-24}
    [[ -s $file ]] && return 0
    (
        umask 077
        head -c "$bytes" /dev/urandom | base64 -w0 | tr '+/' '-_' | tr -d '=' >"$file.tmp"
        mv -f "$file.tmp" "$file"
    )
}
