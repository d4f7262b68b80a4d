# Shared helpers for scripts/servers. Each scripts/servers.d/NAME.sh defines:
#   srv_install   install packages if missing (idempotent)
#   srv_launch    start the server in the background; write its pid to $SRV_PID
#   srv_ready     exit 0 when it answers
#   srv_url       print the URL tests use
# and may set SRV_START_TIMEOUT (seconds, default 60), define srv_setup (runs once the server
# answers: users, policies) and, for a cluster, srv_kill_node N, srv_start_node N and
# srv_leader (see _cluster.sh).

KEEL_SERVERS_DIR="${KEEL_SERVERS_DIR:-/tmp/keel-servers}"
apt_updated=""

server_names() {
    local f names=()
    for f in "$here"/servers.d/*.sh; do
        f="$(basename "$f" .sh)"
        [ "${f#_}" = "$f" ] && names+=("$f")  # _lib, _cluster: helpers, not servers
    done
    echo "${names[*]}"
}

load_server() {
    local name="$1"
    [ -f "$here/servers.d/$name.sh" ] || { echo "servers: no server $name (have: $(server_names))" >&2; exit 2; }
    unset -f srv_install srv_launch srv_ready srv_url srv_stop srv_setup srv_kill_node \
        srv_start_node srv_leader 2>/dev/null || true
    SRV_NAME="$name"
    SRV_DIR="$KEEL_SERVERS_DIR/$name"
    SRV_LOG="$SRV_DIR/server.log"
    SRV_PID="$SRV_DIR/server.pid"
    SRV_START_TIMEOUT=60
    # shellcheck disable=SC1090
    source "$here/servers.d/$name.sh"
}

# apt_install PKG... : install Debian packages that are not installed yet.
apt_install() {
    local missing=() p
    for p in "$@"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
    done
    [ ${#missing[@]} -eq 0 ] && return 0
    # One apt at a time: several test runs (or servers starting at once) may install together,
    # and apt-get fails at once on a held dpkg lock.
    (
        flock -w 1800 9 || { echo "servers: apt lock held for 30 min" >&2; exit 1; }
        if [ -z "$apt_updated" ]; then apt-get update -qq; fi
        # policy-rc.d 101: packages must not start their own system-wide daemons; we start ours.
        printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d; chmod +x /usr/sbin/policy-rc.d
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
    ) 9>/tmp/keel-apt.lock
    apt_updated=1
}

server_pid() {
    [ -f "$SRV_PID" ] && kill -0 "$(cat "$SRV_PID")" 2>/dev/null && cat "$SRV_PID"
}

server_start() {
    local name="$1" waited=0
    srv_install
    if srv_ready 2>/dev/null; then
        if declare -f srv_setup >/dev/null; then srv_setup; fi
        return 0
    fi
    mkdir -p "$SRV_DIR"
    : > "$SRV_LOG"
    srv_launch
    while ! srv_ready 2>/dev/null; do
        sleep 0.5; waited=$((waited + 1))
        if [ $waited -ge $((SRV_START_TIMEOUT * 2)) ]; then
            echo "servers: $name did not become ready in ${SRV_START_TIMEOUT}s; its log ($SRV_LOG):" >&2
            tail -n 40 "$SRV_LOG" >&2 || true
            for f in "$SRV_DIR"/n[0-9]/server.log; do  # a cluster's nodes log apart
                [ -f "$f" ] && { echo "--- $f" >&2; tail -n 20 "$f" >&2; }
            done
            return 1
        fi
    done
    if declare -f srv_setup >/dev/null; then srv_setup; fi
}

server_stop() {
    local pid
    if declare -f srv_stop >/dev/null; then srv_stop; fi
    pid="$(server_pid || true)"
    [ -n "$pid" ] || return 0
    kill -TERM -- "-$pid" 2>/dev/null || kill -TERM "$pid" 2>/dev/null || true
    for _ in $(seq 1 40); do kill -0 "$pid" 2>/dev/null || break; sleep 0.25; done
    kill -KILL -- "-$pid" 2>/dev/null || kill -KILL "$pid" 2>/dev/null || true
    # A start right after a stop must not find the old process still holding its port or lock.
    for _ in $(seq 1 40); do kill -0 "$pid" 2>/dev/null || break; sleep 0.25; done
    rm -f "$SRV_PID"
}

# launch CMD... : run CMD in its own process group with output to the log; record its pid.
launch() {
    setsid "$@" >>"$SRV_LOG" 2>&1 < /dev/null &
    echo $! > "$SRV_PID"
}
