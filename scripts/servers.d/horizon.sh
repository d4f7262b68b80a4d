# OpenStack Horizon (PyPI `horizon`, which pins its own Django and oslo libraries) in its own
# venv under $SRV_DIR, with Keel's Horizon plugin (src/keel/hub/horizon) and the test panel
# (tests/hub/horizon/keel_horizon_demo) enabled, logging in against the Keystone of
# scripts/servers.d/keystone.sh, served by Django's server on 127.0.0.1:KEEL_HORIZON_PORT
# (default 28180). The plugin talks to the hub at KEEL_HORIZON_HUB_PORT (default 28181), where
# the test runs one. Sources are read from this checkout (PYTHONPATH), so edits need a restart.
HORIZON_PORT="${KEEL_HORIZON_PORT:-28180}"
HORIZON_HUB_PORT="${KEEL_HORIZON_HUB_PORT:-28181}"
HORIZON_KEYSTONE_PORT="${KEEL_KEYSTONE_PORT:-25357}"
HORIZON_VENV="$SRV_DIR/venv"
HORIZON_ROOT="$(cd "$here/.." && pwd)"
SRV_START_TIMEOUT=180
srv_install() {
    apt_install curl
    mkdir -p "$SRV_DIR"
    [ -x "$HORIZON_VENV/bin/python" ] || python3 -m venv "$HORIZON_VENV"
    # The marker of a finished install (pip may have died half-way).
    [ -f "$HORIZON_VENV/.keel-installed" ] && return 0
    # Keel itself brings the plugin's imports (keel.hub's dependencies); its sources come
    # from PYTHONPATH at launch.
    "$HORIZON_VENV/bin/pip" install -q --disable-pip-version-check horizon "$HORIZON_ROOT" &&
        touch "$HORIZON_VENV/.keel-installed"
}
srv_launch() {
    local dash
    dash="$("$HORIZON_VENV/bin/python" -c \
        'import importlib.util as u; print(u.find_spec("openstack_dashboard").submodule_search_locations[0])')"
    mkdir -p "$dash/local/enabled"
    cp "$HORIZON_ROOT"/src/keel/hub/horizon/enabled/_*.py "$HORIZON_ROOT"/tests/hub/horizon/keel_horizon_demo/enabled/_*.py \
        "$dash/local/enabled/"
    cat > "$dash/local/local_settings.py" <<CFG
import os
from openstack_dashboard.settings import HORIZON_CONFIG
DEBUG = False
ALLOWED_HOSTS = ["127.0.0.1", "localhost"]
SECRET_KEY = "keel-test-horizon-not-secret"
OPENSTACK_HOST = "127.0.0.1"
OPENSTACK_KEYSTONE_URL = "http://127.0.0.1:$HORIZON_KEYSTONE_PORT/v3"
OPENSTACK_KEYSTONE_DEFAULT_ROLE = "member"
WEBSSO_ENABLED = False
SESSION_ENGINE = "django.contrib.sessions.backends.signed_cookies"
CACHES = {"default": {"BACKEND": "django.core.cache.backends.locmem.LocMemCache"}}
# Collected and compressed at launch (as Horizon's deployments do): compressing on each page
# compiles Horizon's SCSS again every time, tens of seconds per page here.
STATIC_ROOT = "$SRV_DIR/static"
COMPRESS_OFFLINE = True
COMPRESS_ENABLED = True
# Horizon's default: with the plugin nothing polls while the hub's stream is up; this is
# only the pace of the fallback while it is down (the operator's choice in docs/hub-api.md).
HORIZON_CONFIG["ajax_poll_interval"] = 2500
KEEL_HUB_URL = "http://127.0.0.1:$HORIZON_HUB_PORT"
KEEL_DEMO_ROWS = "$SRV_DIR/demo-rows.json"
LOGGING = {"version": 1, "disable_existing_loggers": False,
           "handlers": {"console": {"class": "logging.StreamHandler"}},
           "loggers": {"django": {"handlers": ["console"], "level": "WARNING"}}}
CFG
    [ -f "$SRV_DIR/demo-rows.json" ] || echo '{}' > "$SRV_DIR/demo-rows.json"
    export PYTHONPATH="$HORIZON_ROOT/src:$HORIZON_ROOT/tests/hub/horizon"
    export DJANGO_SETTINGS_MODULE=openstack_dashboard.settings
    "$HORIZON_VENV/bin/django-admin" collectstatic --noinput -v 0 >>"$SRV_LOG" 2>&1
    "$HORIZON_VENV/bin/django-admin" compress --force -v 0 >>"$SRV_LOG" 2>&1
    launch "$HORIZON_VENV/bin/django-admin" runserver --insecure --noreload "127.0.0.1:$HORIZON_PORT"
}
srv_ready() { curl -sf --max-time 5 -o /dev/null "http://127.0.0.1:$HORIZON_PORT/auth/login/"; }
srv_url() { echo "http://127.0.0.1:$HORIZON_PORT"; }
