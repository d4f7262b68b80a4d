# TLS helpers for the servers with TLS listeners (sourced by their scripts).
# tls_files: the test certificates (tests/tls_certs.py, made with trustme) and NATS nkey seeds
# in $TLS_DIR.
TLS_DIR="${KEEL_TLS_DIR:-$KEEL_SERVERS_DIR/tls}"
tls_files() {
    # tests/tls_certs.py itself returns at once when every file is there, and makes the whole set
    # otherwise (a partial or older set would leave a server on a CA the tests then replace).
    local root py
    root="$(cd "$here/.." && pwd)"
    py="$root/.venv/bin/python"
    [ -x "$py" ] || py=python3
    "$py" "$root/tests/tls_certs.py" "$TLS_DIR"
}

# tls_probe PORT [HEX-TO-SEND] : exit 0 when PORT completes a TLS handshake with the test client
# certificate (and, given bytes to send, answers them with at least one byte).
tls_probe() {
    python3 - "$TLS_DIR" "$@" <<'PY' 2>/dev/null
import socket, ssl, sys
tls_dir, port = sys.argv[1], int(sys.argv[2])
ctx = ssl.create_default_context(cafile=f"{tls_dir}/ca.pem")
ctx.load_cert_chain(f"{tls_dir}/client.pem", f"{tls_dir}/client.key")
with socket.create_connection(("127.0.0.1", port), timeout=2) as raw:
    with ctx.wrap_socket(raw, server_hostname="127.0.0.1") as s:
        if len(sys.argv) > 3:
            s.sendall(bytes.fromhex(sys.argv[3]))
            sys.exit(0 if s.recv(1) else 1)
PY
}
