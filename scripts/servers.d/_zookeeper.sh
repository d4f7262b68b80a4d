# What the ZooKeeper servers share (sourced by zookeeper.sh, zookeeper-cluster.sh and
# zookeeper-tls.sh): Debian's jars as a class path, and a log4j config that logs warnings.

# zk_classpath DIR : DIR (for log4j.properties) and the jars ZooKeeper 3.8 needs (Netty too).
zk_classpath() {
    local cp="$1:/usr/share/java/zookeeper.jar" jar
    for jar in zookeeper-jute slf4j-api slf4j-log4j12 log4j-1.2 netty-handler netty-common \
        netty-buffer netty-transport netty-codec netty-resolver netty-transport-native-epoll \
        netty-transport-native-unix-common metrics-core snappy-java commons-cli jline; do
        [ -f "/usr/share/java/$jar.jar" ] && cp="$cp:/usr/share/java/$jar.jar"
    done
    echo "$cp"
}

# zk_log4j DIR : write DIR/log4j.properties (warnings and up, to the console).
zk_log4j() {
    cat > "$1/log4j.properties" <<CFG
log4j.rootLogger=WARN, CONSOLE
log4j.appender.CONSOLE=org.apache.log4j.ConsoleAppender
log4j.appender.CONSOLE.layout=org.apache.log4j.PatternLayout
log4j.appender.CONSOLE.layout.ConversionPattern=%d{ISO8601} %-5p %c{1}: %m%n
CFG
}

