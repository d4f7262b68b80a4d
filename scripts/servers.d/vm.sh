# A real guest VM for the agent tests and `python -m bench agent --vm`: Debian's QEMU and
# kernel, with the host's own root shared read-only into the guest by virtme-ng (/etc, /home,
# /root, /var and /tmp are guest-only, writable; scripts/vm/guest.sh is the guest's init). Booted once and reused. Inside (scripts/vm/guest.sh),
# Keel's agent serves /dev/virtio-ports/org.keel.agent.0 and the real qemu-ga serves
# /dev/virtio-ports/org.qemu.guest_agent.0, the channel names libvirt and nova use; on the
# host both are QEMU chardev unix sockets in $SRV_DIR. KVM when a probe boot shows that it
# works here, TCG otherwise (KEEL_VM_ACCEL=kvm|tcg forces one); the choice and the boot time
# go to the log and to $SRV_DIR/boot.txt. Keel's agent runs from a Python image built at each
# boot (scripts/vm/image.sh), so the guest runs the work tree's code as it was then.
VM_ROOT="$(cd "$here/.." && pwd)"
VM_PY="${KEEL_VM_PYTHON:-$VM_ROOT/.venv/bin/python}"
KEEL_SOCK="$SRV_DIR/keel-agent.sock"
QGA_SOCK="$SRV_DIR/qga.sock"
SRV_START_TIMEOUT="${KEEL_VM_BOOT_TIMEOUT:-300}"

vm_kernel() { ls -1 /boot/vmlinuz-* 2>/dev/null | sort -V | tail -n 1; }

srv_install() {
    apt_install qemu-system-x86 linux-image-amd64 busybox-static qemu-guest-agent
    [ -x "$VM_PY" ] || { echo "vm: no Python at $VM_PY (run scripts/test once, or set KEEL_VM_PYTHON)" >&2; return 1; }
    "$VM_PY" -c 'import virtme_ng' 2>/dev/null || "$VM_PY" -m pip install -q 'virtme-ng>=1.30'
}

# vm_accel: "kvm" or "tcg", and why, on one line. KVM counts as working only if a kernel boots
# under it to its end (a panic for want of a root filesystem, a second or two with KVM): here
# /dev/kvm exists but guests hang after "Probing EDD" or QEMU aborts setting MSRs.
vm_accel() {
    case "${KEEL_VM_ACCEL:-auto}" in
        kvm | tcg) echo "$KEEL_VM_ACCEL (forced by KEEL_VM_ACCEL)"; return ;;
    esac
    if [ ! -r /dev/kvm ] || [ ! -w /dev/kvm ]; then
        echo "tcg (no usable /dev/kvm)"; return
    fi
    local probe="$SRV_DIR/kvm-probe.log"
    : > "$probe"
    timeout 10 qemu-system-x86_64 -accel kvm -cpu host -m 256 -kernel "$(vm_kernel)" \
        -append "console=ttyS0 panic=-1" -serial "file:$probe" -display none -monitor none \
        -no-reboot < /dev/null >> "$probe" 2>&1
    if grep -q "Kernel panic" "$probe"; then
        echo "kvm (a probe boot under KVM ran to its end)"
    else
        echo "tcg (a probe boot under KVM did not: $(grep -av '^$' "$probe" | tail -n 1 | tr -cd '[:print:]' | cut -c1-120))"
    fi
}

srv_launch() {
    rm -f "$KEEL_SOCK" "$QGA_SOCK" "$SRV_DIR/boot.txt"
    local accel kernel kvm=()
    accel="$(vm_accel)"
    kernel="$(vm_kernel)"
    [ -n "$kernel" ] || { echo "vm: no kernel in /boot (linux-image-amd64)" >> "$SRV_LOG"; return 1; }
    case "$accel" in tcg*) kvm=(--disable-kvm) ;; esac
    "$here/vm/image.sh" "$SRV_DIR/keelpy.img" "$VM_PY" "$VM_ROOT/src" >> "$SRV_LOG" 2>&1
    echo "vm: booting $kernel with $accel" >> "$SRV_LOG"
    date +%s.%N > "$SRV_DIR/launched"
    export KEEL_VM_INIT="$here/vm/guest.sh"
    # x86-64-v2 without AVX: under TCG, glibc's and OpenSSL's AVX2 paths (memcpy, sha256)
    # ran at half the speed of their SSE ones here.
    export KEEL_VM_CPU="${KEEL_VM_CPU:-qemu64,+ssse3,+sse4.1,+sse4.2,+popcnt}"
    launch "$VM_PY" -m virtme.commands.run --kimg "$kernel" --mods auto --disable-microvm \
        "${kvm[@]}" --memory "${KEEL_VM_MEMORY:-1G}" --cpus "${KEEL_VM_CPUS:-2}" --name keel-vm \
        --show-boot-console \
        --qemu-opt=-nodefaults \
        --qemu-bin "$here/vm/qemu" --script-sh "true" \
        --qemu-opt=-drive --qemu-opt="if=none,id=keelpy,file=$SRV_DIR/keelpy.img,format=raw,readonly=on" \
        --qemu-opt=-device --qemu-opt=virtio-blk-pci,drive=keelpy,serial=keelpy \
        --qemu-opt=-device --qemu-opt=virtio-serial-pci,id=keelser \
        --qemu-opt=-chardev --qemu-opt="socket,id=keelagent,path=$KEEL_SOCK,server=on,wait=off" \
        --qemu-opt=-device \
        --qemu-opt=virtserialport,bus=keelser.0,chardev=keelagent,name=org.keel.agent.0 \
        --qemu-opt=-chardev --qemu-opt="socket,id=qga0,path=$QGA_SOCK,server=on,wait=off" \
        --qemu-opt=-device \
        --qemu-opt=virtserialport,bus=keelser.0,chardev=qga0,name=org.qemu.guest_agent.0
    echo "$accel" > "$SRV_DIR/accel"
}

# Ready when both agents in the guest answer a sync through the host's chardev sockets.
srv_ready() {
    [ -S "$KEEL_SOCK" ] && [ -S "$QGA_SOCK" ] && "$VM_PY" - "$KEEL_SOCK" "$QGA_SOCK" <<'PY' || return 1
import json, os, socket, sys, time
keel, qga = sys.argv[1:]
def answer(path, send, want):
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(0.5)
        s.connect(path)
        got, end = b"", time.monotonic() + 2
        while time.monotonic() < end:
            s.sendall(send)  # again: the agent may open its port after the first
            try:
                got += s.recv(65536)
            except TimeoutError:
                continue
            if want(got):
                return True
    return False
token = b"\xff\xfeKEEL" + b"S" + (4242).to_bytes(8, "big")
ack = b"\xff\xfeKEEL" + b"A" + (4242).to_bytes(8, "big")
sync = b'\xff{"execute": "guest-sync-delimited", "arguments": {"id": 4243}}\n'
ok = answer(keel, token, lambda b: ack in b) and answer(qga, sync, lambda b: b"4243" in b)
sys.exit(0 if ok else 1)
PY
    if [ ! -f "$SRV_DIR/boot.txt" ] && [ -f "$SRV_DIR/launched" ]; then
        awk -v now="$(date +%s.%N)" -v then="$(cat "$SRV_DIR/launched")" -v accel="$(cat "$SRV_DIR/accel")" \
            'BEGIN { printf "vm: both agents answered %.1f s after launch (%s)\n", now - then, accel }' \
            | tee "$SRV_DIR/boot.txt" >> "$SRV_LOG"
    fi
}

# The VM's process ended (QEMU refused to start, or the guest powered off): stop waiting.
srv_failed() { ! server_pid > /dev/null; }

srv_stop() { rm -f "$SRV_DIR/boot.txt"; }

srv_url() { echo "unix://$KEEL_SOCK qga+unix://$QGA_SOCK"; }
