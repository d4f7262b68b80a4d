# Redis (Debian redis-server), no persistence files outside $SRV_DIR, AOF on so that a
# restart keeps what was acknowledged (appendfsync always: the broker-restart tests count).
REDIS_PORT="${KEEL_REDIS_PORT:-26790}"
srv_install() { apt_install redis-server; }
srv_launch() {
    launch redis-server --bind 127.0.0.1 --port "$REDIS_PORT" --dir "$SRV_DIR" \
        --appendonly yes --appendfsync always --save '' --protected-mode yes --daemonize no \
        --enable-debug-command local
}
srv_ready() { redis-cli -p "$REDIS_PORT" ping 2>/dev/null | grep -q PONG; }
srv_url() { echo "redis://127.0.0.1:$REDIS_PORT/0"; }
