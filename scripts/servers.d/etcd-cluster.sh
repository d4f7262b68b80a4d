# etcd v3, three members on 127.0.0.1 (one Raft group). Client ports KEEL_ETCD_CLUSTER_PORT
# (default 30050) and the next two; peer ports 30053-30055. Data under $SRV_DIR/nN: a killed
# member restarts with its own log and catches up from the leader.
# shellcheck source=_cluster.sh
source "$here/servers.d/_cluster.sh"
ETCDC_PORT="${KEEL_ETCD_CLUSTER_PORT:-30050}"
etcdc_port() { echo $((ETCDC_PORT + $1 - 1)); }
etcdc_peer() { echo $((ETCDC_PORT + 2 + $1)); }
srv_install() { apt_install etcd-server curl; }
node_launch() {
    local n="$1" m cluster=""
    for m in $(seq 1 $CLUSTER_NODES); do
        cluster="$cluster${cluster:+,}keel$m=http://127.0.0.1:$(etcdc_peer "$m")"
    done
    local state=new
    [ -d "$(node_dir "$n")/data/member" ] && state=existing
    mkdir -p "$(node_dir "$n")"
    node_run "$n" etcd --name "keel$n" --data-dir "$(node_dir "$n")/data" \
        --listen-client-urls "http://127.0.0.1:$(etcdc_port "$n")" \
        --advertise-client-urls "http://127.0.0.1:$(etcdc_port "$n")" \
        --listen-peer-urls "http://127.0.0.1:$(etcdc_peer "$n")" \
        --initial-advertise-peer-urls "http://127.0.0.1:$(etcdc_peer "$n")" \
        --initial-cluster "$cluster" --initial-cluster-state "$state" \
        --initial-cluster-token "keel-cluster-$ETCDC_PORT" --log-level warn
}
node_ready() {
    curl -sf --max-time 2 "http://127.0.0.1:$(etcdc_port "$1")/health" 2>/dev/null | grep -q '"health":"true"'
}
etcdc_status() {
    curl -sf --max-time 2 -X POST -d '{}' "http://127.0.0.1:$(etcdc_port "$1")/v3/maintenance/status" 2>/dev/null
}
# The member that leads the Raft group now.
srv_leader() {
    local n
    for n in $(seq 1 $CLUSTER_NODES); do
        etcdc_status "$n" | python3 -c '
import json, sys
s = json.load(sys.stdin)
sys.exit(0 if s["header"]["member_id"] == s["leader"] else 1)' 2>/dev/null && { echo "$n"; return 0; }
    done
    return 1
}
cluster_ready() { srv_leader >/dev/null; }
srv_url() {
    local n hosts=()
    for n in $(seq 1 $CLUSTER_NODES); do hosts+=("127.0.0.1:$(etcdc_port "$n")"); done
    local IFS=,
    echo "etcd://${hosts[*]}"
}
