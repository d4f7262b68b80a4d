# NATS, three servers in one cluster on 127.0.0.1 with JetStream on each (the meta group and
# every stream at three replicas elect their leaders by Raft). Client ports
# KEEL_NATS_CLUSTER_PORT (default 30030) and the next two; route ports 30033-30035 and
# monitoring ports 30036-30038 (KEEL_NATS_CLUSTER_PORT + 3.. and + 6..). Stores under
# $SRV_DIR/nN, so a restarted server catches up from the others.
# shellcheck source=_cluster.sh
source "$here/servers.d/_cluster.sh"
NATSC_PORT="${KEEL_NATS_CLUSTER_PORT:-30030}"
natsc_port() { echo $((NATSC_PORT + $1 - 1)); }
natsc_route() { echo $((NATSC_PORT + 2 + $1)); }
natsc_monitor() { echo $((NATSC_PORT + 5 + $1)); }
srv_install() { command -v nats-server >/dev/null || [ -x /usr/sbin/nats-server ] || apt_install nats-server; }
node_launch() {
    local n="$1" d m routes=""
    d="$(node_dir "$n")"
    mkdir -p "$d/jetstream"
    for m in $(seq 1 $CLUSTER_NODES); do
        [ "$m" = "$n" ] || routes="$routes${routes:+, }nats-route://127.0.0.1:$(natsc_route "$m")"
    done
    cat > "$d/nats.conf" <<CONF
server_name: keel-n$n
listen: 127.0.0.1:$(natsc_port "$n")
http: 127.0.0.1:$(natsc_monitor "$n")
max_payload: 2MB
jetstream {
    store_dir: "$d/jetstream"
    max_memory_store: 128MB
    max_file_store: 2GB
}
cluster {
    name: keel
    listen: 127.0.0.1:$(natsc_route "$n")
    routes: [ $routes ]
}
CONF
    node_run "$n" "$(command -v nats-server || echo /usr/sbin/nats-server)" -c "$d/nats.conf"
}
node_ready() { curl -fsS "http://127.0.0.1:$(natsc_monitor "$1")/healthz" 2>/dev/null | grep -q ok; }
cluster_ready() {
    # The JetStream meta group has a leader (streams can be created at three replicas).
    curl -fsS "http://127.0.0.1:$(natsc_monitor 1)/jsz" 2>/dev/null | grep -q '"leader"'
}
# The server leading the JetStream meta group (streams' leaders are asked of JetStream).
srv_leader() {
    local n leader
    leader="$(curl -fsS "http://127.0.0.1:$(natsc_monitor 1)/jsz" 2>/dev/null \
        | python3 -c 'import json,sys; print(json.load(sys.stdin)["meta_cluster"]["leader"])' 2>/dev/null)"
    for n in $(seq 1 $CLUSTER_NODES); do
        [ "$leader" = "keel-n$n" ] && { echo "$n"; return 0; }
    done
    echo 1
}
srv_url() {
    local n hosts=()
    for n in $(seq 1 $CLUSTER_NODES); do hosts+=("127.0.0.1:$(natsc_port "$n")"); done
    local IFS=,
    echo "nats://${hosts[*]}"
}
