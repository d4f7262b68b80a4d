# OpenStack Keystone (PyPI `keystone`) in its own venv under $SRV_DIR, SQLite database, fernet
# tokens, served by gunicorn on 127.0.0.1:KEEL_KEYSTONE_PORT (default 25357). Bootstrapped
# with an admin user (password keel-admin) in project admin, and the public endpoint.
KEYSTONE_PORT="${KEEL_KEYSTONE_PORT:-25357}"
KEYSTONE_VENV="$SRV_DIR/venv"
SRV_START_TIMEOUT=90
srv_install() {
    apt_install curl
    mkdir -p "$SRV_DIR"
    [ -x "$KEYSTONE_VENV/bin/python" ] || python3 -m venv "$KEYSTONE_VENV"
    # keystone-manage is the marker of a finished install (pip may have died half-way).
    [ -x "$KEYSTONE_VENV/bin/keystone-manage" ] && [ -x "$KEYSTONE_VENV/bin/gunicorn" ] && return 0
    "$KEYSTONE_VENV/bin/pip" install -q --disable-pip-version-check keystone gunicorn
}
keystone_conf() {
    mkdir -p "$SRV_DIR/fernet-keys" "$SRV_DIR/credential-keys"
    cat > "$SRV_DIR/keystone.conf" <<CFG
[DEFAULT]
use_stderr = true
[database]
connection = sqlite:///$SRV_DIR/keystone.db
[token]
provider = fernet
expiration = 3600
[fernet_tokens]
key_repository = $SRV_DIR/fernet-keys
[credential]
key_repository = $SRV_DIR/credential-keys
[oslo_policy]
enforce_new_defaults = true
enforce_scope = false
CFG
}
srv_launch() {
    local manage="$KEYSTONE_VENV/bin/keystone-manage --config-file $SRV_DIR/keystone.conf"
    keystone_conf
    if [ ! -f "$SRV_DIR/bootstrapped" ]; then
        {
            $manage db_sync &&
            $manage fernet_setup --keystone-user root --keystone-group root &&
            $manage credential_setup --keystone-user root --keystone-group root &&
            $manage bootstrap --bootstrap-password keel-admin \
                --bootstrap-admin-url "http://127.0.0.1:$KEYSTONE_PORT/v3/" \
                --bootstrap-public-url "http://127.0.0.1:$KEYSTONE_PORT/v3/" \
                --bootstrap-internal-url "http://127.0.0.1:$KEYSTONE_PORT/v3/" \
                --bootstrap-region-id RegionOne
        } >>"$SRV_LOG" 2>&1 && touch "$SRV_DIR/bootstrapped"
    fi
    # Keystone's oslo.config parses sys.argv on import: hide gunicorn's arguments from it.
    printf 'import sys\nsys.argv = sys.argv[:1]\nfrom keystone.wsgi.api import application\n' \
        > "$SRV_DIR/keel_keystone_app.py"
    OS_KEYSTONE_CONFIG_FILES="$SRV_DIR/keystone.conf" launch "$KEYSTONE_VENV/bin/gunicorn" \
        --chdir "$SRV_DIR" --bind "127.0.0.1:$KEYSTONE_PORT" --workers 2 --timeout 60 \
        --control-socket "$SRV_DIR/gunicorn.ctl" keel_keystone_app:application
}
srv_ready() { curl -sf --max-time 2 "http://127.0.0.1:$KEYSTONE_PORT/v3" >/dev/null 2>&1; }
srv_url() { echo "http://127.0.0.1:$KEYSTONE_PORT/v3"; }
