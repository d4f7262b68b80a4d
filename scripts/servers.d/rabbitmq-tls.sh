# RabbitMQ with TLS only (amqps, no plaintext listener) and a password user, one node on
# 127.0.0.1: port KEEL_RABBITMQ_TLS_PORT (default 30015), distribution port 30025. The broker
# asks for a client certificate signed by the test CA (verify_peer, fail_if_no_peer_cert);
# certificates from tests/tls_certs.py in $KEEL_TLS_DIR (default $KEEL_SERVERS_DIR/tls).
RMQT_PORT="${KEEL_RABBITMQ_TLS_PORT:-30015}"
# The single node's script with our ports; its srv_launch is replaced below.
KEEL_RABBITMQ_PORT="$RMQT_PORT" KEEL_RABBITMQ_DIST_PORT="$((RMQT_PORT + 10))" \
    source "$here/servers.d/rabbitmq.sh"
# shellcheck source=_tls.sh
source "$here/servers.d/_tls.sh"
RMQT_USER=keel
RMQT_PASSWORD="${KEEL_RABBITMQ_TLS_PASSWORD:-keel-tls-pw}"
srv_launch() {
    tls_files
    rabbit_prepare
    cat > "$SRV_DIR/rabbitmq.conf" <<CONF
listeners.tcp = none
listeners.ssl.default = 127.0.0.1:$RMQT_PORT
ssl_options.cacertfile = $TLS_DIR/ca.pem
ssl_options.certfile = $TLS_DIR/server.pem
ssl_options.keyfile = $TLS_DIR/server.key
ssl_options.verify = verify_peer
ssl_options.fail_if_no_peer_cert = true
loopback_users.guest = true
disk_free_limit.absolute = 50MB
vm_memory_high_watermark.relative = 0.2
log.console = true
log.console.level = warning
log.file = false
CONF
    rabbit_start
}
srv_ready() { tls_probe "$RMQT_PORT" 414d515000000901; }  # "AMQP\0\0\x09\x01"
srv_setup() {
    rabbit_env
    local ctl=(setpriv --reuid=rabbitmq --regid=rabbitmq --init-groups env "${RABBIT_ENV[@]}"
        /usr/lib/rabbitmq/bin/rabbitmqctl -n "keel-$RMQT_PORT@localhost" -q)
    timeout 60 "${ctl[@]}" add_user "$RMQT_USER" "$RMQT_PASSWORD" >/dev/null 2>&1 || true
    timeout 60 "${ctl[@]}" set_permissions -p / "$RMQT_USER" '.*' '.*' '.*' >/dev/null
}
srv_url() {
    echo "amqps://$RMQT_USER:$RMQT_PASSWORD@localhost:$RMQT_PORT/?ca=$TLS_DIR/ca.pem&cert=$TLS_DIR/client.pem&key=$TLS_DIR/client.key"
}
