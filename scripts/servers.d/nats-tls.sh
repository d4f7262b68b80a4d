# NATS with TLS required (client certificates verified against the test CA) and a password
# user and an nkey user, one server on 127.0.0.1: port KEEL_NATS_TLS_PORT (default 30039),
# monitoring 30029. Certificates and the nkey seeds from tests/tls_certs.py (user.nk; user.pub
# is the public key listed here) in $KEEL_TLS_DIR
# (default $KEEL_SERVERS_DIR/tls). `servers url nats-tls` gives the password user's URL.
# shellcheck source=_tls.sh
source "$here/servers.d/_tls.sh"
NATST_PORT="${KEEL_NATS_TLS_PORT:-30039}"
NATST_MONITOR=$((NATST_PORT - 10))
NATST_USER=keel
NATST_PASSWORD="${KEEL_NATS_TLS_PASSWORD:-keel-tls-pw}"
srv_install() { command -v nats-server >/dev/null || [ -x /usr/sbin/nats-server ] || apt_install nats-server; }
srv_launch() {
    tls_files
    mkdir -p "$SRV_DIR/jetstream"
    cat > "$SRV_DIR/nats.conf" <<CONF
listen: 127.0.0.1:$NATST_PORT
http: 127.0.0.1:$NATST_MONITOR
max_payload: 2MB
tls {
    cert_file: "$TLS_DIR/server.pem"
    key_file: "$TLS_DIR/server.key"
    ca_file: "$TLS_DIR/ca.pem"
    verify: true
    timeout: 2
}
authorization {
    users: [
        { user: "$NATST_USER", password: "$NATST_PASSWORD" }
        { nkey: "$(cat "$TLS_DIR/user.pub")" }
    ]
}
jetstream {
    store_dir: "$SRV_DIR/jetstream"
    max_memory_store: 64MB
    max_file_store: 1GB
}
CONF
    launch "$(command -v nats-server || echo /usr/sbin/nats-server)" -c "$SRV_DIR/nats.conf"
}
srv_ready() { curl -fsS "http://127.0.0.1:$NATST_MONITOR/healthz" 2>/dev/null | grep -q ok; }
srv_url() {
    echo "nats+tls://$NATST_USER:$NATST_PASSWORD@localhost:$NATST_PORT?ca=$TLS_DIR/ca.pem&cert=$TLS_DIR/client.pem&key=$TLS_DIR/client.key"
}
