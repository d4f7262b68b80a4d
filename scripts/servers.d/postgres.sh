# PostgreSQL (Debian postgresql) as a plain process of the postgres user, data under $SRV_DIR,
# on 127.0.0.1 only, trust authentication (loopback test server; no password to leak).
POSTGRES_PORT="${KEEL_POSTGRES_PORT:-25320}"
SRV_START_TIMEOUT=60
pg_bin() { ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1; }
srv_install() { apt_install postgresql; }
srv_launch() {
    local bin data="$SRV_DIR/data"
    bin="$(pg_bin)"
    chown postgres "$SRV_DIR" "$SRV_LOG"
    if [ ! -f "$data/PG_VERSION" ]; then
        runuser -u postgres -- "$bin/initdb" -D "$data" -A trust -U postgres --no-sync >>"$SRV_LOG" 2>&1
    fi
    # fsync stays on: the hub's ack-after-commit promise is what the tests check.
    setsid runuser -u postgres -- "$bin/postgres" -D "$data" -h 127.0.0.1 -p "$POSTGRES_PORT" \
        -k "$SRV_DIR" -c max_connections=200 -c shared_buffers=128MB >>"$SRV_LOG" 2>&1 < /dev/null &
    echo $! > "$SRV_PID"
}
srv_stop() {
    # Fast shutdown (SIGINT to the postmaster): SIGTERM is "smart" and waits for every client,
    # so the generic stop's SIGKILL would come first and leave postmaster.pid behind, and the
    # next start would refuse the data directory while the old postmaster's children exit.
    local pm
    pm="$(head -n 1 "$SRV_DIR/data/postmaster.pid" 2>/dev/null || true)"
    [ -n "$pm" ] || return 0
    kill -INT "$pm" 2>/dev/null || return 0
    for _ in $(seq 1 120); do kill -0 "$pm" 2>/dev/null || return 0; sleep 0.25; done
}
srv_ready() { "$(pg_bin)/pg_isready" -q -h 127.0.0.1 -p "$POSTGRES_PORT" -U postgres -d postgres; }
srv_url() { echo "postgresql://postgres@127.0.0.1:$POSTGRES_PORT/postgres"; }
