# redis-sentinel with TLS everywhere and ACL users, on 127.0.0.1: node 1 starts as the primary,
# node 2 as its replica (TLS replication, logged in as the ACL user), three sentinels watch them
# under the name `keel` (quorum 2, down after 1 s) and are reached over TLS only, logging in to
# the servers and to each other. Every port requires the test client certificate
# (tls-auth-clients yes); the default user is off on servers and sentinels alike. Ports:
# KEEL_REDIS_SENTINEL_TLS_PORT (default 30080) and the next for the two servers, the three after
# them for the sentinels. Certificates from tests/tls_certs.py in $KEEL_TLS_DIR.
# `kill redis-sentinel-tls N` takes node N (1 or 2) of the servers; the sentinels stay up.
# shellcheck source=_cluster.sh
source "$here/servers.d/_cluster.sh"
# shellcheck source=_tls.sh
source "$here/servers.d/_tls.sh"
RSTL_PORT="${KEEL_REDIS_SENTINEL_TLS_PORT:-30080}"
RSTL_SERVERS=2
RSTL_USER=keel
RSTL_PASSWORD="${KEEL_REDIS_TLS_PASSWORD:-keel-tls-pw}"
RSTL_SENTINEL_USER=keel-sentinel
RSTL_SENTINEL_PASSWORD="${KEEL_REDIS_SENTINEL_TLS_PASSWORD:-keel-sentinel-pw}"
CLUSTER_NODES=5  # nodes 1-2: servers; 3-5: sentinels
rstl_port() { echo $((RSTL_PORT + $1 - 1)); }
srv_install() { apt_install redis-server; }
rstl_tls_conf() {
    cat <<CONF
port 0
tls-port $(rstl_port "$1")
tls-cert-file $TLS_DIR/server.pem
tls-key-file $TLS_DIR/server.key
tls-client-cert-file $TLS_DIR/client.pem
tls-client-key-file $TLS_DIR/client.key
tls-ca-cert-file $TLS_DIR/ca.pem
tls-auth-clients yes
tls-replication yes
CONF
}
node_launch() {
    local n="$1" d
    d="$(node_dir "$n")"
    mkdir -p "$d"
    tls_files >/dev/null
    if [ "$n" -le $RSTL_SERVERS ]; then
        cat > "$d/users.acl" <<ACL
user default off
user $RSTL_USER on >$RSTL_PASSWORD ~* &* +@all
ACL
        # A first start: node 2 replicates node 1. Later the sentinels rewrite the config.
        if [ ! -f "$d/redis.conf" ]; then
            {
                rstl_tls_conf "$n"
                echo "bind 127.0.0.1"
                echo "dir $d"
                echo "aclfile $d/users.acl"
                echo "appendonly yes"
                echo "appendfsync always"
                echo "save ''"
                echo "replica-announce-ip 127.0.0.1"
                echo "masteruser $RSTL_USER"
                echo "masterauth $RSTL_PASSWORD"
                [ "$n" = 2 ] && echo "replicaof 127.0.0.1 $(rstl_port 1)"
            } > "$d/redis.conf"
        fi
        node_run "$n" redis-server "$d/redis.conf" --daemonize no
    else
        if [ ! -f "$d/sentinel.conf" ]; then
            {
                rstl_tls_conf "$n"
                cat <<CONF
bind 127.0.0.1
dir $d
user default off
user $RSTL_SENTINEL_USER on >$RSTL_SENTINEL_PASSWORD allchannels +@all
sentinel sentinel-user $RSTL_SENTINEL_USER
sentinel sentinel-pass $RSTL_SENTINEL_PASSWORD
sentinel announce-ip 127.0.0.1
sentinel monitor keel 127.0.0.1 $(rstl_port 1) 2
sentinel auth-user keel $RSTL_USER
sentinel auth-pass keel $RSTL_PASSWORD
sentinel down-after-milliseconds keel 1000
sentinel failover-timeout keel 10000
sentinel parallel-syncs keel 1
CONF
            } > "$d/sentinel.conf"
        fi
        node_run "$n" redis-server "$d/sentinel.conf" --sentinel
    fi
}
rstl_cli() {
    local n="$1"; shift
    local user="$RSTL_USER" pass="$RSTL_PASSWORD"
    if [ "$n" -gt $RSTL_SERVERS ]; then user="$RSTL_SENTINEL_USER" pass="$RSTL_SENTINEL_PASSWORD"; fi
    redis-cli --tls --cacert "$TLS_DIR/ca.pem" --cert "$TLS_DIR/client.pem" --key "$TLS_DIR/client.key" \
        -h 127.0.0.1 -p "$(rstl_port "$n")" --user "$user" --pass "$pass" --no-auth-warning "$@"
}
node_ready() { rstl_cli "$1" ping 2>/dev/null | grep -q PONG; }
rstl_primary_port() { rstl_cli 3 sentinel get-master-addr-by-name keel 2>/dev/null | sed -n 2p; }
cluster_ready() {
    local primary
    primary="$(rstl_primary_port)"
    [ -n "$primary" ] || return 1
    # The replica is in sync and every sentinel knows the others.
    rstl_cli $((primary - RSTL_PORT + 1)) info replication 2>/dev/null | grep -q 'slave0:.*state=online' &&
        rstl_cli 3 sentinel master keel 2>/dev/null | grep -A1 '^num-other-sentinels$' | tail -n 1 | grep -q 2
}
# The server that is primary now (1 or 2).
srv_leader() {
    local primary
    primary="$(rstl_primary_port)"
    echo $((primary - RSTL_PORT + 1))
}
srv_url() {
    local n hosts=()
    for n in $(seq $((RSTL_SERVERS + 1)) $CLUSTER_NODES); do hosts+=("127.0.0.1:$(rstl_port "$n")"); done
    local IFS=,
    echo "rediss+sentinel://$RSTL_USER:$RSTL_PASSWORD@${hosts[*]}/keel/0?ca=$TLS_DIR/ca.pem&cert=$TLS_DIR/client.pem&key=$TLS_DIR/client.key&sentinel_username=$RSTL_SENTINEL_USER&sentinel_password=$RSTL_SENTINEL_PASSWORD"
}
