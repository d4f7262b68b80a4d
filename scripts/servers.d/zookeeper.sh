# ZooKeeper 3.8 (Debian zookeeper) as a plain java process (not systemd), standalone, with its
# config and data under $SRV_DIR. Client port KEEL_ZOOKEEPER_PORT (default 21810). tickTime is
# 500 ms so sessions may be as short as 1 s (tests expire leases quickly); admin server off.
ZK_PORT="${KEEL_ZOOKEEPER_PORT:-21810}"
# shellcheck source=_zookeeper.sh
source "$here/servers.d/_zookeeper.sh"
srv_install() { apt_install zookeeper default-jre-headless; }
srv_launch() {
    mkdir -p "$SRV_DIR/data"
    cat > "$SRV_DIR/zoo.cfg" <<CFG
tickTime=500
minSessionTimeout=1000
maxSessionTimeout=60000
dataDir=$SRV_DIR/data
clientPort=$ZK_PORT
clientPortAddress=127.0.0.1
admin.enableServer=false
4lw.commands.whitelist=ruok,srvr,stat
maxClientCnxns=0
CFG
    zk_log4j "$SRV_DIR"
    launch java -Xmx256m -Dzookeeper.log.dir="$SRV_DIR" -Dlog4j.configuration="file:$SRV_DIR/log4j.properties" \
        -cp "$(zk_classpath "$SRV_DIR")" org.apache.zookeeper.server.ZooKeeperServerMain "$SRV_DIR/zoo.cfg"
}
srv_ready() {
    { exec 3<>"/dev/tcp/127.0.0.1/$ZK_PORT"; } 2>/dev/null || return 1
    printf ruok >&3
    local answer
    answer="$(timeout 2 cat <&3 2>/dev/null || true)"
    exec 3<&- 3>&-
    [ "$answer" = imok ]
}
srv_url() { echo "zookeeper://127.0.0.1:$ZK_PORT"; }
