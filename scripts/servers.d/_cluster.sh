# Helpers for the clusters (sourced by scripts/servers.d/*-cluster.sh): three nodes on
# 127.0.0.1, node N with its data and log under $SRV_DIR/nN, each in its own process group so
# that `servers kill NAME N` is a SIGKILL of that node alone. A cluster script defines
#   node_launch N   start node N in the background with node_run
#   node_ready N    exit 0 when node N answers
# and may define cluster_ready (the whole cluster formed: a leader, replicas in sync).
CLUSTER_NODES=3
SRV_START_TIMEOUT=120

node_dir() { echo "$SRV_DIR/n$1"; }

# node_run N CMD... : run CMD as node N (own process group, output to its log, pid recorded).
node_run() {
    local n="$1"; shift
    mkdir -p "$(node_dir "$n")"
    setsid "$@" >>"$(node_dir "$n")/server.log" 2>&1 < /dev/null &
    echo $! > "$(node_dir "$n")/pid"
}

node_pid() {
    local f
    f="$(node_dir "$1")/pid"
    [ -f "$f" ] && kill -0 "$(cat "$f")" 2>/dev/null && cat "$f"
}

srv_launch() {
    local n
    for n in $(seq 1 $CLUSTER_NODES); do
        [ -n "$(node_pid "$n" || true)" ] || node_launch "$n"
    done
}

srv_ready() {
    local n
    for n in $(seq 1 $CLUSTER_NODES); do node_ready "$n" || return 1; done
    if declare -f cluster_ready >/dev/null; then cluster_ready; fi
}

srv_kill_node() {
    local pid
    pid="$(node_pid "$1" || true)"
    [ -n "$pid" ] || { echo "servers: node $1 of $SRV_NAME is not running" >&2; return 1; }
    kill -KILL -- "-$pid" 2>/dev/null || kill -KILL "$pid"
    for _ in $(seq 1 40); do kill -0 "$pid" 2>/dev/null || break; sleep 0.05; done
    rm -f "$(node_dir "$1")/pid"
}

srv_signal_node() {
    local pid
    pid="$(node_pid "$1" || true)"
    [ -n "$pid" ] || { echo "servers: node $1 of $SRV_NAME is not running" >&2; return 1; }
    kill -"$2" -- "-$pid" 2>/dev/null || kill -"$2" "$pid"
}

srv_start_node() {
    [ -n "$(node_pid "$1" || true)" ] || node_launch "$1"
}

cluster_wait_node() {
    local waited=0
    while ! node_ready "$1" 2>/dev/null; do
        sleep 0.25; waited=$((waited + 1))
        if [ $waited -ge $((SRV_START_TIMEOUT * 4)) ]; then
            echo "servers: node $1 of $SRV_NAME not ready in ${SRV_START_TIMEOUT}s:" >&2
            tail -n 30 "$(node_dir "$1")/server.log" >&2 || true
            return 1
        fi
    done
}

srv_stop() {
    local n pid pids=()
    for n in $(seq 1 $CLUSTER_NODES); do
        pid="$(node_pid "$n" || true)"
        [ -n "$pid" ] || continue
        pids+=("$pid")
        kill -TERM -- "-$pid" 2>/dev/null || kill -TERM "$pid" 2>/dev/null || true
    done
    for pid in "${pids[@]}"; do
        for _ in $(seq 1 40); do kill -0 "$pid" 2>/dev/null || break; sleep 0.25; done
        kill -KILL -- "-$pid" 2>/dev/null || kill -KILL "$pid" 2>/dev/null || true
    done
    for n in $(seq 1 $CLUSTER_NODES); do rm -f "$(node_dir "$n")/pid"; done
}
