# PostgreSQL, a primary (node 1) and a streaming replica (node 2) on 127.0.0.1, trust auth on
# loopback like the single server. Ports KEEL_POSTGRES_REPLICA_PORT (default 30070) and 30071.
# Replication is synchronous (synchronous_standby_names '*', synchronous_commit on): a COMMIT
# returns once the replica has the WAL on disk, so the replica holds every acknowledged write.
# PostgreSQL does not fail over by itself (production runs Patroni or the like): `servers
# failover postgres-replica` promotes the replica and, like Patroni's synchronous mode, lets
# the new primary commit alone until a replica is back; `revive` of the old primary
# re-clones it as the new primary's replica (pg_basebackup).
# shellcheck source=_cluster.sh
source "$here/servers.d/_cluster.sh"
PGR_PORT="${KEEL_POSTGRES_REPLICA_PORT:-30070}"
CLUSTER_NODES=2
SRV_START_TIMEOUT=90
pgr_port() { echo $((PGR_PORT + $1 - 1)); }
pg_bin() { ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1; }
srv_install() { apt_install postgresql; }
pgr_sql() { "$(pg_bin)/psql" -h 127.0.0.1 -p "$(pgr_port "$1")" -U postgres -d postgres -Atqc "$2"; }
pgr_is_primary() { [ "$(pgr_sql "$1" 'select pg_is_in_recovery()' 2>/dev/null)" = f ]; }
pgr_other() { echo $((3 - $1)); }
node_launch() {
    local n="$1" bin d data other
    bin="$(pg_bin)"; d="$(node_dir "$n")"; data="$d/data"; other="$(pgr_other "$n")"
    mkdir -p "$d"; chown postgres "$SRV_DIR" "$d"
    if [ -f "$data/PG_VERSION" ] && [ ! -f "$data/standby.signal" ] && pgr_is_primary "$other"; then
        # A former primary while the other node took over: it would be a second primary.
        rm -rf "$data"
    fi
    if [ ! -f "$data/PG_VERSION" ]; then
        # A new cluster only when neither node has data (asking the other node whether it is
        # primary would initdb an empty second primary whenever it is slow to answer).
        if [ "$n" = 1 ] && [ ! -f "$(node_dir "$other")/data/PG_VERSION" ]; then
            runuser -u postgres -- "$bin/initdb" -D "$data" -A trust -U postgres --no-sync >>"$d/server.log" 2>&1
        else
            pgr_clone "$n" || return 1
        fi
    fi
    node_run "$n" runuser -u postgres -- "$bin/postgres" -D "$data" -h 127.0.0.1 -p "$(pgr_port "$n")" \
        -k "$d" -c max_connections=100 -c shared_buffers=64MB -c wal_level=replica \
        -c hot_standby=on -c wal_keep_size=256MB -c "cluster_name=keel$n" \
        -c "primary_conninfo=host=127.0.0.1 port=$(pgr_port "$other") user=postgres application_name=keel$n"
}
# pgr_clone N: node N's data as a replica of the other node, by pg_basebackup, retried (bounded:
# 20 attempts, about 2 min). --checkpoint=fast: the default spread checkpoint paces itself over
# checkpoint_completion_target x checkpoint_timeout (up to 4.5 min), and right after a promotion
# it queues behind the end-of-recovery checkpoint (23 s here; past CI's 300 s bound once).
# Retried: a primary just promoted may still refuse or drop the replication
# connection ("server closed the connection unexpectedly" was seen once), and a failed attempt
# leaves a partial directory that must go before the next.
pgr_clone() {
    local n="$1" other bin d data attempt
    other="$(pgr_other "$n")"; bin="$(pg_bin)"; d="$(node_dir "$n")"; data="$d/data"
    for attempt in $(seq 1 20); do
        if node_ready "$other" 2>/dev/null && pgr_is_primary "$other"; then
            rm -rf "$data"
            if PGCONNECT_TIMEOUT=5 timeout 120 runuser -u postgres -- "$bin/pg_basebackup" \
                -h 127.0.0.1 -p "$(pgr_port "$other")" -U postgres -D "$data" -R -X stream \
                --checkpoint=fast --no-sync >>"$d/server.log" 2>&1; then
                return 0
            fi
            echo "servers: pg_basebackup of node $n from node $other failed (attempt $attempt)" >>"$d/server.log"
        fi
        sleep "$(( attempt < 5 ? 1 : 5 ))"
    done
    rm -rf "$data"
    echo "servers: cannot clone $SRV_NAME node $n from node $other (not a primary accepting" \
        "replication connections after 20 attempts; see $d/server.log)" >&2
    return 1
}
node_ready() { "$(pg_bin)/pg_isready" -q -h 127.0.0.1 -p "$(pgr_port "$1")" -U postgres -d postgres; }
pgr_primary() {
    local n
    for n in 1 2; do pgr_is_primary "$n" && { echo "$n"; return 0; }; done
    return 1
}
cluster_ready() {
    local primary
    primary="$(pgr_primary)" || return 1
    [ "$(pgr_sql "$primary" "select count(*) from pg_stat_replication where state = 'streaming'")" = 1 ] || return 1
    # Synchronous again once a replica streams (after a failover the primary ran alone).
    if [ "$(pgr_sql "$primary" 'show synchronous_standby_names')" != '*' ]; then
        pgr_sql "$primary" "alter system set synchronous_standby_names = '*'" &&
            pgr_sql "$primary" 'select pg_reload_conf()' >/dev/null
    fi
}
srv_start_node() {
    [ -n "$(node_pid "$1" || true)" ] || node_launch "$1"
    cluster_wait_node "$1" && { for _ in $(seq 1 120); do cluster_ready && return 0; sleep 0.25; done; }
}
srv_leader() { pgr_primary; }
srv_failover() {
    local n replica=""
    for n in 1 2; do  # the live node still in recovery
        node_ready "$n" 2>/dev/null && [ "$(pgr_sql "$n" 'select pg_is_in_recovery()')" = t ] && replica=$n
    done
    [ -n "$replica" ] || { echo "servers: no live replica of $SRV_NAME to promote" >&2; return 1; }
    pgr_sql "$replica" "alter system set synchronous_standby_names = ''" >/dev/null
    pgr_sql "$replica" 'select pg_reload_conf()' >/dev/null
    pgr_sql "$replica" 'select pg_promote(true, 30)' >/dev/null
    echo "$replica"
}
srv_url() {
    echo "postgresql://postgres@127.0.0.1:$(pgr_port 1),127.0.0.1:$(pgr_port 2)/postgres?target_session_attrs=read-write"
}
# The replica is cloned from the primary: start them one after the other.
srv_launch() {
    local first=1
    [ -f "$(node_dir 2)/data/PG_VERSION" ] && [ ! -f "$(node_dir 2)/data/standby.signal" ] && first=2
    [ -n "$(node_pid "$first" || true)" ] || node_launch "$first"
    cluster_wait_node "$first" || return 1
    [ -n "$(node_pid "$(pgr_other "$first")" || true)" ] || node_launch "$(pgr_other "$first")"
}
