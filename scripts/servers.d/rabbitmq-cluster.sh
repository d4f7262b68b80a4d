# RabbitMQ, three nodes clustered on 127.0.0.1 (classic-config peer discovery, one shared
# Erlang cookie), every path under $SRV_DIR/nN like the single node's. AMQP ports
# KEEL_RABBITMQ_CLUSTER_PORT (default 30010) and the next two; Erlang distribution ports
# KEEL_RABBITMQ_CLUSTER_DIST_PORT (default 30020) and the next two. Quorum queues need a
# majority of the three nodes: losing one keeps every queue available.
# shellcheck source=_cluster.sh
source "$here/servers.d/_cluster.sh"
RMQC_PORT="${KEEL_RABBITMQ_CLUSTER_PORT:-30010}"
RMQC_DIST="${KEEL_RABBITMQ_CLUSTER_DIST_PORT:-30020}"
RMQC_USER=keel
RMQC_PASSWORD="${KEEL_RABBITMQ_CLUSTER_PASSWORD:-keel-cluster-pw}"

srv_install() { apt_install rabbitmq-server; }

rmqc_port() { echo $((RMQC_PORT + $1 - 1)); }
rmqc_node() { echo "keel-$(rmqc_port "$1")@localhost"; }

rmqc_env() {
    local d
    d="$(node_dir "$1")"
    RMQC_ENV=(
        HOME="$SRV_DIR/home"
        RABBITMQ_NODENAME="$(rmqc_node "$1")"
        RABBITMQ_USE_LONGNAME=false
        RABBITMQ_NODE_IP_ADDRESS=127.0.0.1
        RABBITMQ_NODE_PORT="$(rmqc_port "$1")"
        RABBITMQ_DIST_PORT=$((RMQC_DIST + $1 - 1))
        RABBITMQ_MNESIA_BASE="$d/mnesia"
        RABBITMQ_LOG_BASE="$d/log"
        RABBITMQ_FEATURE_FLAGS_FILE="$d/feature_flags"
        RABBITMQ_ENABLED_PLUGINS_FILE="$d/enabled_plugins"
        RABBITMQ_CONFIG_FILE="$d/rabbitmq.conf"
        RABBITMQ_ADVANCED_CONFIG_FILE="$d/advanced.config"
        RABBITMQ_CONF_ENV_FILE="$d/rabbitmq-env.conf"
        RABBITMQ_PID_FILE="$d/mnesia/rabbit.pid"
        RABBITMQ_LOGS=-
        ERL_EPMD_ADDRESS=127.0.0.1
        RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS="-kernel inet_dist_use_interface {127,0,0,1}"
    )
}

node_launch() {
    local n="$1" d m
    d="$(node_dir "$n")"
    mkdir -p "$SRV_DIR/home" "$d/mnesia" "$d/log"
    [ -f "$d/enabled_plugins" ] || echo '[].' > "$d/enabled_plugins"
    : > "$d/rabbitmq-env.conf"
    [ -f "$d/advanced.config" ] || echo '[].' > "$d/advanced.config"
    {
        echo "loopback_users.guest = true"
        echo "consumer_timeout = 1800000"
        echo "disk_free_limit.absolute = 50MB"
        echo "vm_memory_high_watermark.relative = 0.2"
        echo "log.console = true"
        echo "log.console.level = warning"
        echo "log.file = false"
        echo "cluster_formation.peer_discovery_backend = classic_config"
        for m in $(seq 1 $CLUSTER_NODES); do
            echo "cluster_formation.classic_config.nodes.$m = $(rmqc_node "$m")"
        done
        echo "cluster_formation.randomized_startup_delay_range.min = 0"
        echo "cluster_formation.randomized_startup_delay_range.max = 1"
        # A node that lost its peers keeps serving what it can (quorum queues need a majority).
        echo "cluster_partition_handling = pause_minority"
    } > "$d/rabbitmq.conf"
    chown -R rabbitmq:rabbitmq "$SRV_DIR"
    rmqc_env "$n"
    node_run "$n" setpriv --reuid=rabbitmq --regid=rabbitmq --init-groups env "${RMQC_ENV[@]}" \
        /usr/lib/rabbitmq/bin/rabbitmq-server
}

node_ready() {
    local port
    port="$(rmqc_port "$1")"
    [ "$(timeout 3 bash -c "exec 3<>/dev/tcp/127.0.0.1/$port && printf 'AMQP\0\0\011\001' >&3 && head -c 1 <&3 | od -An -tu1" 2>/dev/null | tr -d ' ')" = 1 ]
}

rmqc_ctl() {
    local n="$1"; shift
    rmqc_env "$n"
    timeout 60 setpriv --reuid=rabbitmq --regid=rabbitmq --init-groups env "${RMQC_ENV[@]}" \
        /usr/lib/rabbitmq/bin/rabbitmqctl -n "$(rmqc_node "$n")" -q "$@"
}

cluster_ready() {
    # Every node sees the other two running.
    [ "$(rmqc_ctl 1 eval 'length(rabbit_nodes:all_running()).' 2>/dev/null)" = "$CLUSTER_NODES" ]
}

srv_setup() {
    # A user of our own (guest is loopback-only and everyone's default).
    rmqc_ctl 1 add_user "$RMQC_USER" "$RMQC_PASSWORD" >/dev/null 2>&1 || true
    rmqc_ctl 1 set_permissions -p / "$RMQC_USER" '.*' '.*' '.*' >/dev/null
}

# The node holding the most quorum-queue leaders: the one whose loss costs an election.
# With a queue name: the node leading that queue.
srv_leader() {
    local n m best=1 most=-1 count leader
    if [ -n "${1:-}" ]; then
        for n in $(seq 1 $CLUSTER_NODES); do
            node_ready "$n" 2>/dev/null || continue
            leader="$(rmqc_ctl "$n" list_queues name leader 2>/dev/null | awk -v q="$1" '$1 == q {print $2}')"
            [ -n "$leader" ] || continue
            for m in $(seq 1 $CLUSTER_NODES); do
                [ "$leader" = "$(rmqc_node "$m")" ] && { echo "$m"; return 0; }
            done
        done
        echo "servers: no quorum queue $1 with a leader on $SRV_NAME" >&2
        return 1
    fi
    for n in $(seq 1 $CLUSTER_NODES); do
        node_ready "$n" 2>/dev/null || continue
        count="$(rmqc_ctl "$n" list_queues leader type 2>/dev/null | grep -c "$(rmqc_node "$n").*quorum" || true)"
        if [ "${count:-0}" -gt "$most" ]; then most="$count"; best="$n"; fi
    done
    echo "$best"
}

srv_url() {
    local n hosts=()
    for n in $(seq 1 $CLUSTER_NODES); do
        hosts+=("$RMQC_USER:$RMQC_PASSWORD@127.0.0.1:$(rmqc_port "$n")")
    done
    local IFS=,
    echo "rabbit://${hosts[*]}/"
}
