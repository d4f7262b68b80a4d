# etcd v3 over https only, with client certificates required (--client-cert-auth) and etcd's
# own auth on (user keel with a password, and root), one member on 127.0.0.1: client port
# KEEL_ETCD_TLS_PORT (default 30056), peer port 30057 (plain, loopback). Certificates from
# tests/tls_certs.py in $KEEL_TLS_DIR. Simple tokens live KEEL_ETCD_TLS_TOKEN_TTL seconds
# (default 3, etcd's is 300): short, so the tests see tokens expire under a coordinator.
# shellcheck source=_tls.sh
source "$here/servers.d/_tls.sh"
ETCDT_PORT="${KEEL_ETCD_TLS_PORT:-30056}"
ETCDT_USER=keel
ETCDT_PASSWORD="${KEEL_ETCD_TLS_PASSWORD:-keel-tls-pw}"
srv_install() { apt_install etcd-server etcd-client curl; }
srv_launch() {
    tls_files
    launch etcd --name keel-tls --data-dir "$SRV_DIR/data" \
        --listen-client-urls "https://127.0.0.1:$ETCDT_PORT" \
        --advertise-client-urls "https://127.0.0.1:$ETCDT_PORT" \
        --listen-peer-urls "http://127.0.0.1:$((ETCDT_PORT + 1))" \
        --initial-advertise-peer-urls "http://127.0.0.1:$((ETCDT_PORT + 1))" \
        --initial-cluster "keel-tls=http://127.0.0.1:$((ETCDT_PORT + 1))" \
        --initial-cluster-state new --initial-cluster-token "keel-tls-$ETCDT_PORT" \
        --cert-file "$TLS_DIR/server.pem" --key-file "$TLS_DIR/server.key" \
        --trusted-ca-file "$TLS_DIR/ca.pem" --client-cert-auth --auth-token simple \
        --auth-token-ttl "${KEEL_ETCD_TLS_TOKEN_TTL:-3}" \
        --log-level warn
}
etcdt_ctl() {
    ETCDCTL_API=3 timeout 20 etcdctl --endpoints "https://127.0.0.1:$ETCDT_PORT" --cacert "$TLS_DIR/ca.pem" \
        --cert "$TLS_DIR/client.pem" --key "$TLS_DIR/client.key" "$@"
}
srv_ready() {
    curl -sf --max-time 3 --cacert "$TLS_DIR/ca.pem" --cert "$TLS_DIR/client.pem" \
        --key "$TLS_DIR/client.key" "https://127.0.0.1:$ETCDT_PORT/health" 2>/dev/null | grep -q '"health":"true"'
}
srv_setup() {
    # Once auth is on, user add answers "user name is empty" without credentials: done then.
    etcdt_ctl user add "root:root-$ETCDT_PASSWORD" >/dev/null 2>&1 || return 0
    etcdt_ctl role add root >/dev/null
    etcdt_ctl user grant-role root root >/dev/null
    etcdt_ctl user add "$ETCDT_USER:$ETCDT_PASSWORD" >/dev/null
    etcdt_ctl user grant-role "$ETCDT_USER" root >/dev/null
    etcdt_ctl auth enable >/dev/null
}
srv_url() {
    echo "etcds://$ETCDT_USER:$ETCDT_PASSWORD@localhost:$ETCDT_PORT?ca=$TLS_DIR/ca.pem&cert=$TLS_DIR/client.pem&key=$TLS_DIR/client.key"
}
