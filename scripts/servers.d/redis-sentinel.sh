# Redis with Sentinel on 127.0.0.1: node 1 starts as the primary, node 2 as its replica (both
# AOF with appendfsync always, like the single server), and three sentinels watch them under
# the name `keel` (quorum 2, down after 1 s). Ports: KEEL_REDIS_SENTINEL_PORT (default 30040)
# and 30041 for the two servers, 30042-30044 for the sentinels. `kill redis-sentinel N` takes
# node N (1 or 2) of the servers; the sentinels stay up.
# shellcheck source=_cluster.sh
source "$here/servers.d/_cluster.sh"
RSNT_PORT="${KEEL_REDIS_SENTINEL_PORT:-30040}"
RSNT_SERVERS=2
CLUSTER_NODES=5  # nodes 1-2: servers; 3-5: sentinels
rsnt_port() { echo $((RSNT_PORT + $1 - 1)); }
srv_install() { apt_install redis-server; }
node_launch() {
    local n="$1" d
    d="$(node_dir "$n")"
    mkdir -p "$d"
    if [ "$n" -le $RSNT_SERVERS ]; then
        local args=(--bind 127.0.0.1 --port "$(rsnt_port "$n")" --dir "$d" --appendonly yes
            --appendfsync always --save '' --protected-mode yes --daemonize no
            --replica-announce-ip 127.0.0.1)
        # A first start: node 2 replicates node 1. Later the sentinels say who replicates whom
        # (they rewrite each server's config), so a restarted old primary rejoins as replica.
        if [ ! -f "$d/redis.conf" ]; then
            : > "$d/redis.conf"
            [ "$n" = 2 ] && echo "replicaof 127.0.0.1 $(rsnt_port 1)" >> "$d/redis.conf"
        fi
        node_run "$n" redis-server "$d/redis.conf" "${args[@]}"
    else
        if [ ! -f "$d/sentinel.conf" ]; then
            cat > "$d/sentinel.conf" <<CONF
bind 127.0.0.1
port $(rsnt_port "$n")
dir $d
sentinel announce-ip 127.0.0.1
sentinel monitor keel 127.0.0.1 $(rsnt_port 1) 2
sentinel down-after-milliseconds keel 1000
sentinel failover-timeout keel 10000
sentinel parallel-syncs keel 1
CONF
        fi
        node_run "$n" redis-server "$d/sentinel.conf" --sentinel
    fi
}
node_ready() { redis-cli -p "$(rsnt_port "$1")" ping 2>/dev/null | grep -q PONG; }
rsnt_primary_port() {
    redis-cli -p "$(rsnt_port 3)" sentinel get-master-addr-by-name keel 2>/dev/null | sed -n 2p
}
cluster_ready() {
    local primary
    primary="$(rsnt_primary_port)"
    [ -n "$primary" ] || return 1
    # The replica is in sync and every sentinel knows the others.
    redis-cli -p "$primary" info replication 2>/dev/null | grep -q 'slave0:.*state=online' &&
        redis-cli -p "$(rsnt_port 3)" sentinel master keel 2>/dev/null | grep -A1 '^num-other-sentinels$' | tail -n 1 | grep -q 2
}
# The server that is primary now (1 or 2).
srv_leader() {
    local primary
    primary="$(rsnt_primary_port)"
    echo $((primary - RSNT_PORT + 1))
}
srv_url() {
    local n hosts=()
    for n in $(seq $((RSNT_SERVERS + 1)) $CLUSTER_NODES); do hosts+=("127.0.0.1:$(rsnt_port "$n")"); done
    local IFS=,
    echo "redis+sentinel://${hosts[*]}/keel/0"
}
