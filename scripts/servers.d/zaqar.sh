# OpenStack Zaqar (PyPI `zaqar`), the benchmark's anchor for the hub's Zaqar API: its own venv
# under $SRV_DIR, the Redis message store (the Redis of scripts/servers.d/redis.sh, database
# 7) and the SQLAlchemy management store (SQLite), no auth (projects by X-Project-Id), served
# by gunicorn (4 workers) on 127.0.0.1:KEEL_ZAQAR_PORT (default 28182).
ZAQAR_PORT="${KEEL_ZAQAR_PORT:-28182}"
ZAQAR_REDIS_PORT="${KEEL_REDIS_PORT:-26790}"
ZAQAR_VENV="$SRV_DIR/venv"
SRV_START_TIMEOUT=90
srv_install() {
    apt_install curl
    mkdir -p "$SRV_DIR"
    [ -x "$ZAQAR_VENV/bin/python" ] || python3 -m venv "$ZAQAR_VENV"
    [ -x "$ZAQAR_VENV/bin/gunicorn" ] && [ -f "$ZAQAR_VENV/.keel-installed" ] && return 0
    "$ZAQAR_VENV/bin/pip" install -q --disable-pip-version-check zaqar gunicorn redis &&
        touch "$ZAQAR_VENV/.keel-installed"
}
srv_launch() {
    "$here/servers" start redis >>"$SRV_LOG" 2>&1
    cat > "$SRV_DIR/zaqar.conf" <<CFG
[DEFAULT]
auth_strategy =
use_stderr = true
[drivers]
transport = wsgi
message_store = redis
management_store = sqlalchemy
[drivers:message_store:redis]
uri = redis://127.0.0.1:$ZAQAR_REDIS_PORT/7
[drivers:management_store:sqlalchemy]
uri = sqlite:///$SRV_DIR/zaqar.db
[signed_url]
secret_key = keel-bench-not-secret
CFG
    cat > "$SRV_DIR/keel_zaqar_app.py" <<PY
import sys
sys.argv = sys.argv[:1]
from oslo_config import cfg
from oslo_log import log
from zaqar import bootstrap
log.register_options(cfg.CONF)
cfg.CONF(project="zaqar", args=[], default_config_files=["$SRV_DIR/zaqar.conf"])
application = bootstrap.Bootstrap(cfg.CONF).transport.app
PY
    "$ZAQAR_VENV/bin/zaqar-sql-db-manage" --config-file "$SRV_DIR/zaqar.conf" upgrade head \
        >>"$SRV_LOG" 2>&1
    launch "$ZAQAR_VENV/bin/gunicorn" --chdir "$SRV_DIR" --bind "127.0.0.1:$ZAQAR_PORT" \
        --workers 4 keel_zaqar_app:application
}
srv_ready() { curl -sf --max-time 2 -o /dev/null "http://127.0.0.1:$ZAQAR_PORT/"; }
srv_url() { echo "http://127.0.0.1:$ZAQAR_PORT"; }
