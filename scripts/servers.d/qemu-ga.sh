# qemu-guest-agent (Debian qemu-guest-agent), no VM: it listens on a unix socket in $SRV_DIR
# instead of a virtio-serial port. The agent tests and `python -m bench agent` talk to it.
QGA_SOCK="$SRV_DIR/qga.sock"
srv_install() { apt_install qemu-guest-agent; }
srv_launch() {
    rm -f "$QGA_SOCK"
    launch /usr/sbin/qemu-ga -m unix-listen -p "$QGA_SOCK" -t "$SRV_DIR" -f "$SRV_DIR/qga.pid"
}
srv_ready() {
    [ -S "$QGA_SOCK" ] && python3 - "$QGA_SOCK" <<'PY'
import json, socket, sys
# Down is an answer, not a crash: a stale socket file (refused), a hung agent (timeout),
# garbage (no JSON) all mean "not ready".
try:
    s = socket.socket(socket.AF_UNIX)
    s.settimeout(2)
    s.connect(sys.argv[1])
    s.sendall(b'\xff{"execute": "guest-sync-delimited", "arguments": {"id": 4242}}\n')
    buf = b""
    while b"\xff" not in buf or not buf.endswith(b"\n"):
        chunk = s.recv(4096)
        if not chunk:
            sys.exit(1)
        buf += chunk
    sys.exit(0 if json.loads(buf.split(b"\xff", 1)[1])["return"] == 4242 else 1)
except (OSError, ValueError, KeyError, IndexError):
    sys.exit(1)
PY
}
srv_url() { echo "qga+unix://$QGA_SOCK"; }
