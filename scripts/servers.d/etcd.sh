# etcd v3 (Debian etcd-server), one member, data under $SRV_DIR. Client port KEEL_ETCD_PORT
# (default 23790), peer port KEEL_ETCD_PEER_PORT (default 23800); loopback only.
ETCD_PORT="${KEEL_ETCD_PORT:-23790}"
ETCD_PEER_PORT="${KEEL_ETCD_PEER_PORT:-23800}"
srv_install() { apt_install etcd-server curl; }
srv_launch() {
    launch etcd --name keel --data-dir "$SRV_DIR/data" \
        --listen-client-urls "http://127.0.0.1:$ETCD_PORT" \
        --advertise-client-urls "http://127.0.0.1:$ETCD_PORT" \
        --listen-peer-urls "http://127.0.0.1:$ETCD_PEER_PORT" \
        --initial-advertise-peer-urls "http://127.0.0.1:$ETCD_PEER_PORT" \
        --initial-cluster "keel=http://127.0.0.1:$ETCD_PEER_PORT" \
        --initial-cluster-state new --initial-cluster-token "keel-$ETCD_PORT"
}
srv_ready() {
    curl -sf --max-time 2 "http://127.0.0.1:$ETCD_PORT/health" 2>/dev/null | grep -q '"health":"true"'
}
srv_url() { echo "etcd://127.0.0.1:$ETCD_PORT"; }
