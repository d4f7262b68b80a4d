# Redis with TLS only (tls-port, client certificates required) and an ACL user, one server on
# 127.0.0.1: port KEEL_REDIS_TLS_PORT (default 30045). The default user is off: every
# connection logs in. Certificates from tests/tls_certs.py in $KEEL_TLS_DIR.
# shellcheck source=_tls.sh
source "$here/servers.d/_tls.sh"
REDIST_PORT="${KEEL_REDIS_TLS_PORT:-30045}"
REDIST_USER=keel
REDIST_PASSWORD="${KEEL_REDIS_TLS_PASSWORD:-keel-tls-pw}"
srv_install() { apt_install redis-server; }
redist_cli() {
    redis-cli --tls --cacert "$TLS_DIR/ca.pem" --cert "$TLS_DIR/client.pem" --key "$TLS_DIR/client.key" \
        -h 127.0.0.1 -p "$REDIST_PORT" --user "$REDIST_USER" --pass "$REDIST_PASSWORD" --no-auth-warning "$@"
}
srv_launch() {
    tls_files
    cat > "$SRV_DIR/users.acl" <<ACL
user default off
user $REDIST_USER on >$REDIST_PASSWORD ~* &* +@all
ACL
    launch redis-server --bind 127.0.0.1 --port 0 --tls-port "$REDIST_PORT" --dir "$SRV_DIR" \
        --tls-cert-file "$TLS_DIR/server.pem" --tls-key-file "$TLS_DIR/server.key" \
        --tls-ca-cert-file "$TLS_DIR/ca.pem" --tls-auth-clients yes \
        --aclfile "$SRV_DIR/users.acl" --appendonly yes --appendfsync always --save '' \
        --daemonize no
}
srv_ready() { redist_cli ping 2>/dev/null | grep -q PONG; }
srv_url() {
    echo "rediss://$REDIST_USER:$REDIST_PASSWORD@localhost:$REDIST_PORT/0?ca=$TLS_DIR/ca.pem&cert=$TLS_DIR/client.pem&key=$TLS_DIR/client.key"
}
