# qemu-guest-agent as in qemu-ga.sh, with commands disabled by --block-rpcs, as an operator
# locks a guest down: the tests check that callers get CommandDenied for them.
# shellcheck source=qemu-ga.sh
source "$here/servers.d/qemu-ga.sh"
QGA_BLOCKED="${KEEL_QGA_BLOCK_RPCS:-guest-exec,guest-file-open,guest-set-user-password}"
srv_launch() {
    rm -f "$QGA_SOCK"
    launch /usr/sbin/qemu-ga -m unix-listen -p "$QGA_SOCK" -t "$SRV_DIR" -f "$SRV_DIR/qga.pid" \
        --block-rpcs="$QGA_BLOCKED"
}
