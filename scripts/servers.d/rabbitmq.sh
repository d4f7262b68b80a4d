# RabbitMQ (Debian rabbitmq-server) as a plain process on 127.0.0.1, run as the `rabbitmq`
# user with every path (mnesia, logs, feature flags, plugins, config, Erlang cookie) under
# $SRV_DIR, a node name of its own and its Erlang distribution port moved off the default, so
# several nodes (and the system one, if any) never collide. Durable queues and persistent
# messages live in $SRV_DIR/mnesia, so `restart` keeps them (the broker-restart tests count).
RABBITMQ_PORT="${KEEL_RABBITMQ_PORT:-25720}"
# The Erlang default (AMQP port + 20000) lands in Linux's ephemeral range (32768-60999), where
# an outbound connection may hold it ("dist_port_already_used"); 10000 below stays out of it.
RABBITMQ_DIST="${KEEL_RABBITMQ_DIST_PORT:-$((RABBITMQ_PORT - 10000))}"
SRV_START_TIMEOUT=90

srv_install() { apt_install rabbitmq-server; }

rabbit_env() {
    # The environment the node runs with (an array: one value has spaces). Erlang's
    # distribution port and epmd listen on loopback only, like the AMQP port.
    RABBIT_ENV=(
        HOME="$SRV_DIR/home"
        RABBITMQ_NODENAME="keel-$RABBITMQ_PORT@localhost"
        RABBITMQ_USE_LONGNAME=false
        RABBITMQ_NODE_IP_ADDRESS=127.0.0.1
        RABBITMQ_NODE_PORT="$RABBITMQ_PORT"
        RABBITMQ_DIST_PORT="$RABBITMQ_DIST"
        RABBITMQ_MNESIA_BASE="$SRV_DIR/mnesia"
        RABBITMQ_LOG_BASE="$SRV_DIR/log"
        RABBITMQ_FEATURE_FLAGS_FILE="$SRV_DIR/feature_flags"
        RABBITMQ_ENABLED_PLUGINS_FILE="$SRV_DIR/enabled_plugins"
        RABBITMQ_CONFIG_FILE="$SRV_DIR/rabbitmq.conf"
        RABBITMQ_ADVANCED_CONFIG_FILE="$SRV_DIR/advanced.config"
        RABBITMQ_CONF_ENV_FILE="$SRV_DIR/rabbitmq-env.conf"
        RABBITMQ_PID_FILE="$SRV_DIR/mnesia/rabbit.pid"
        RABBITMQ_LOGS=-
        ERL_EPMD_ADDRESS=127.0.0.1
        RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS="-kernel inet_dist_use_interface {127,0,0,1}"
    )
}

# The node's directories and the files it wants beside its config (rabbitmq-tls.sh too).
rabbit_prepare() {
    mkdir -p "$SRV_DIR/home" "$SRV_DIR/mnesia" "$SRV_DIR/log"
    [ -f "$SRV_DIR/enabled_plugins" ] || echo '[].' > "$SRV_DIR/enabled_plugins"
    : > "$SRV_DIR/rabbitmq-env.conf"
    [ -f "$SRV_DIR/advanced.config" ] || echo '[].' > "$SRV_DIR/advanced.config"
}

# Start the node as the rabbitmq user, every path under $SRV_DIR.
rabbit_start() {
    chown -R rabbitmq:rabbitmq "$SRV_DIR"
    rabbit_env
    launch setpriv --reuid=rabbitmq --regid=rabbitmq --init-groups env "${RABBIT_ENV[@]}" \
        /usr/lib/rabbitmq/bin/rabbitmq-server
}

srv_launch() {
    rabbit_prepare
    # consumer_timeout: the broker closes a channel whose delivery stays unacknowledged this
    # long (the delivery goes back to the queue). Keel acks calls when they start and bounds
    # them by their deadline; the default 30 minutes is kept on purpose and stated here.
    cat > "$SRV_DIR/rabbitmq.conf" <<CONF
loopback_users.guest = true
consumer_timeout = 1800000
disk_free_limit.absolute = 50MB
vm_memory_high_watermark.relative = 0.6
log.console = true
log.console.level = warning
log.file = false
CONF
    rabbit_start
}

srv_ready() {
    # An AMQP protocol header must be answered by a connection.start method frame (type 1):
    # the listener opens only once the node has booted. Cheaper than rabbitmq-diagnostics.
    [ "$(timeout 3 bash -c "exec 3<>/dev/tcp/127.0.0.1/$RABBITMQ_PORT && printf 'AMQP\0\0\011\001' >&3 && head -c 1 <&3 | od -An -tu1" 2>/dev/null | tr -d ' ')" = 1 ]
}

srv_url() { echo "rabbit://guest:guest@127.0.0.1:$RABBITMQ_PORT/"; }
