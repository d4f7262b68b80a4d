# ZooKeeper 3.8 with TLS only (Netty, secureClientPort, client certificates required), one
# standalone server on 127.0.0.1: port KEEL_ZOOKEEPER_TLS_PORT (default 30069). Clients log in
# with the digest scheme (Keel's zookeeper backend puts a digest ACL on what it creates);
# certificates from tests/tls_certs.py in $KEEL_TLS_DIR, read as PEM (ZooKeeper 3.6+).
# shellcheck source=_tls.sh
source "$here/servers.d/_tls.sh"
# shellcheck source=_zookeeper.sh
source "$here/servers.d/_zookeeper.sh"
ZKT_PORT="${KEEL_ZOOKEEPER_TLS_PORT:-30069}"
srv_install() { apt_install zookeeper default-jre-headless; }
srv_launch() {
    tls_files
    mkdir -p "$SRV_DIR/data"
    # ZooKeeper's PEM key store is one file: the private key and the certificate chain.
    cat "$TLS_DIR/server.key" "$TLS_DIR/server.pem" > "$SRV_DIR/server-keystore.pem"
    cat > "$SRV_DIR/zoo.cfg" <<CFG
tickTime=500
minSessionTimeout=1000
maxSessionTimeout=60000
dataDir=$SRV_DIR/data
secureClientPort=$ZKT_PORT
secureClientPortAddress=127.0.0.1
serverCnxnFactory=org.apache.zookeeper.server.NettyServerCnxnFactory
ssl.keyStore.location=$SRV_DIR/server-keystore.pem
ssl.keyStore.type=PEM
ssl.trustStore.location=$TLS_DIR/ca.pem
ssl.trustStore.type=PEM
ssl.clientAuth=need
ssl.hostnameVerification=false
admin.enableServer=false
4lw.commands.whitelist=ruok,srvr
maxClientCnxns=0
CFG
    zk_log4j "$SRV_DIR"
    launch java -Xmx192m -Dzookeeper.log.dir="$SRV_DIR" -Dlog4j.configuration="file:$SRV_DIR/log4j.properties" \
        -cp "$(zk_classpath "$SRV_DIR")" org.apache.zookeeper.server.ZooKeeperServerMain "$SRV_DIR/zoo.cfg"
}
srv_ready() { tls_probe "$ZKT_PORT" 72756f6b; }  # "ruok"
srv_url() {
    echo "zookeeper+tls://keel:keel-tls-pw@localhost:$ZKT_PORT?ca=$TLS_DIR/ca.pem&cert=$TLS_DIR/client.pem&key=$TLS_DIR/client.key"
}
