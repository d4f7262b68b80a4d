# ZooKeeper 3.8, a three-server ensemble on 127.0.0.1 (the same java launch as the single
# server). Client ports KEEL_ZOOKEEPER_CLUSTER_PORT (default 30060) and the next two; quorum
# ports 30063-30065, election ports 30066-30068. tickTime 500 ms like the single server, so
# sessions may be as short as 1 s.
# shellcheck source=_cluster.sh
source "$here/servers.d/_cluster.sh"
# shellcheck source=_zookeeper.sh
source "$here/servers.d/_zookeeper.sh"
ZKC_PORT="${KEEL_ZOOKEEPER_CLUSTER_PORT:-30060}"
zkc_port() { echo $((ZKC_PORT + $1 - 1)); }
srv_install() { apt_install zookeeper default-jre-headless; }
node_launch() {
    local n="$1" d m
    d="$(node_dir "$n")"
    mkdir -p "$d/data"
    echo "$n" > "$d/data/myid"
    {
        echo "tickTime=500"
        echo "initLimit=20"
        echo "syncLimit=10"
        echo "minSessionTimeout=1000"
        echo "maxSessionTimeout=60000"
        echo "dataDir=$d/data"
        echo "clientPort=$(zkc_port "$n")"
        echo "clientPortAddress=127.0.0.1"
        echo "admin.enableServer=false"
        echo "4lw.commands.whitelist=ruok,srvr,stat,mntr"
        echo "maxClientCnxns=0"
        for m in $(seq 1 $CLUSTER_NODES); do
            echo "server.$m=127.0.0.1:$((ZKC_PORT + 2 + m)):$((ZKC_PORT + 5 + m))"
        done
    } > "$d/zoo.cfg"
    zk_log4j "$d"
    node_run "$n" java -Xmx192m -Dzookeeper.log.dir="$d" -Dlog4j.configuration="file:$d/log4j.properties" \
        -cp "$(zk_classpath "$d")" org.apache.zookeeper.server.quorum.QuorumPeerMain "$d/zoo.cfg"
}
zkc_ask() {
    local answer
    { exec 3<>"/dev/tcp/127.0.0.1/$(zkc_port "$1")"; } 2>/dev/null || return 1
    printf '%s' "$2" >&3
    answer="$(timeout 2 cat <&3 2>/dev/null || true)"
    exec 3<&- 3>&-
    echo "$answer"
}
# A member answers "imok" as soon as it runs, even without a quorum: ready means it serves.
node_ready() { zkc_ask "$1" srvr | grep -qE '^Mode: (leader|follower)'; }
srv_leader() {
    local n
    for n in $(seq 1 $CLUSTER_NODES); do
        zkc_ask "$n" srvr 2>/dev/null | grep -q '^Mode: leader' && { echo "$n"; return 0; }
    done
    return 1
}
srv_url() {
    local n hosts=()
    for n in $(seq 1 $CLUSTER_NODES); do hosts+=("127.0.0.1:$(zkc_port "$n")"); done
    local IFS=,
    echo "zookeeper://${hosts[*]}"
}
