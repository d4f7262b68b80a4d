# PostgreSQL with TLS only over TCP (hostssl, scram-sha-256 passwords, client certificates
# whose CN must be the user: clientcert=verify-full), one server on 127.0.0.1: port
# KEEL_POSTGRES_TLS_PORT (default 30075), user keel. Clients connect with
# sslmode=verify-full. Certificates from tests/tls_certs.py in $KEEL_TLS_DIR.
# shellcheck source=_tls.sh
source "$here/servers.d/_tls.sh"
PGT_PORT="${KEEL_POSTGRES_TLS_PORT:-30075}"
PGT_USER=keel
PGT_PASSWORD="${KEEL_POSTGRES_TLS_PASSWORD:-keel-tls-pw}"
pg_bin() { ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1; }
srv_install() { apt_install postgresql; }
srv_launch() {
    local bin data="$SRV_DIR/data"
    bin="$(pg_bin)"
    tls_files
    chown postgres "$SRV_DIR" "$SRV_LOG"
    if [ ! -f "$data/PG_VERSION" ]; then
        runuser -u postgres -- "$bin/initdb" -D "$data" -A trust -U postgres --no-sync >>"$SRV_LOG" 2>&1
        cat > "$data/pg_hba.conf" <<HBA
local all postgres trust
hostssl all all 127.0.0.1/32 scram-sha-256 clientcert=verify-full
HBA
    fi
    # The server's key must belong to postgres and be private to it.
    install -o postgres -m 600 "$TLS_DIR/server.key" "$SRV_DIR/server.key"
    install -o postgres -m 644 "$TLS_DIR/server.pem" "$SRV_DIR/server.pem"
    install -o postgres -m 644 "$TLS_DIR/ca.pem" "$SRV_DIR/ca.pem"
    setsid runuser -u postgres -- "$bin/postgres" -D "$data" -h 127.0.0.1 -p "$PGT_PORT" \
        -k "$SRV_DIR" -c max_connections=50 -c shared_buffers=32MB -c ssl=on \
        -c ssl_cert_file="$SRV_DIR/server.pem" -c ssl_key_file="$SRV_DIR/server.key" \
        -c ssl_ca_file="$SRV_DIR/ca.pem" -c password_encryption=scram-sha-256 \
        >>"$SRV_LOG" 2>&1 < /dev/null &
    echo $! > "$SRV_PID"
}
pgt_sql() { "$(pg_bin)/psql" -h "$SRV_DIR" -p "$PGT_PORT" -U postgres -d postgres -Atqc "$1"; }
srv_ready() { "$(pg_bin)/pg_isready" -q -h "$SRV_DIR" -p "$PGT_PORT" -U postgres -d postgres; }
srv_setup() {
    pgt_sql "do \$\$ begin if not exists (select from pg_roles where rolname = '$PGT_USER') then
        create role $PGT_USER login password '$PGT_PASSWORD'; end if; end \$\$;" >/dev/null
    pgt_sql "grant create on database postgres to $PGT_USER" >/dev/null
}
srv_url() {
    echo "postgresql://$PGT_USER:$PGT_PASSWORD@localhost:$PGT_PORT/postgres?sslmode=verify-full&sslrootcert=$TLS_DIR/ca.pem&sslcert=$TLS_DIR/client.pem&sslkey=$TLS_DIR/client.key"
}
