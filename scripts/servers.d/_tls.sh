# TLS helpers for the servers with TLS listeners (sourced by their scripts).
# tls_files: the test certificates (tests/tls_certs.py, made with trustme) in $TLS_DIR.
TLS_DIR="${KEEL_TLS_DIR:-$KEEL_SERVERS_DIR/tls}"
tls_files() {
    [ -f "$TLS_DIR/server.key" ] && [ -f "$TLS_DIR/ca.pem" ] && return 0
    local root py
    root="$(cd "$here/.." && pwd)"
    py="$root/.venv/bin/python"
    [ -x "$py" ] || py=python3
    "$py" "$root/tests/tls_certs.py" "$TLS_DIR"
}
