#!/bin/busybox sh
# PID 1 of the test VM (scripts/servers.d/vm.sh), run again on every boot, on the host's root
# shared read-only over 9p: mounts what a guest needs (/etc and /home as guest-only overlays,
# /tmp and /run in memory), then runs qemu-ga and Keel's agent on the virtio-serial ports
# libvirt and nova name, each started again whenever it exits. It never returns. Keel's agent
# runs from the Python image scripts/vm/image.sh built (a virtio-blk disk, serial "keelpy").
# busybox-static's shell runs mount, modprobe, cat... as built-ins: every dynamic program
# started from the 9p root costs seconds under TCG (its loader and libraries read remotely).
PORTS=/dev/virtio-ports
RUN=/run/keel-vm
PY="$RUN/py/bin/python"
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin HOME=/root
# busybox runs its applets through /proc/self/exe: /proc first, by busybox's own path.
/bin/busybox mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null
mkdir -p /dev/pts /dev/shm
mount -t devpts devpts /dev/pts
mount -t tmpfs -o mode=0755 tmpfs /run
mount -t tmpfs -o mode=1777 tmpfs /tmp
mount -t tmpfs -o mode=1777 tmpfs /dev/shm
exec > /dev/console 2>&1 < /dev/null
echo "keel-vm: init at $(cut -d' ' -f1 /proc/uptime)s of guest time"
hostname keel-vm
for module in overlay virtio_console virtio_blk ext4; do modprobe "$module"; done
for dir in etc home root var; do
    mkdir -p "$RUN/overlay/$dir/upper" "$RUN/overlay/$dir/work"
    mount -t overlay "keel-$dir" \
        -o "lowerdir=/$dir,upperdir=$RUN/overlay/$dir/upper,workdir=$RUN/overlay/$dir/work" "/$dir"
done
mkdir -p "$RUN/py" "$PORTS"
tries=0
while [ $tries -lt 200 ]; do
    tries=$((tries + 1))
    mountpoint -q "$RUN/py" || for disk in /sys/block/vd*; do
        [ "$(cat "$disk/serial" 2>/dev/null)" = keelpy ] && mount -t ext4 -o ro "/dev/${disk##*/}" "$RUN/py"
    done
    # as udev would: /dev/virtio-ports/NAME -> /dev/vportNpM
    for port in /sys/class/virtio-ports/*; do
        name="$(cat "$port/name" 2>/dev/null)"
        [ -n "$name" ] && [ ! -e "$PORTS/$name" ] && ln -sf "../${port##*/}" "$PORTS/$name"
    done
    mountpoint -q "$RUN/py" && [ -e "$PORTS/org.keel.agent.0" ] && [ -e "$PORTS/org.qemu.guest_agent.0" ] && break
    sleep 0.1
done
mountpoint -q "$RUN/py" || echo "keel-vm: the Python image did not mount"
echo "keel-vm: guest up after $(cut -d' ' -f1 /proc/uptime)s of guest time"
cat > "$RUN/agent.toml" <<TOML
instance_id = "keel-vm"
audit_log = "$RUN/audit.log"
TOML
(
    while :; do
        /usr/sbin/qemu-ga -m virtio-serial -p "$PORTS/org.qemu.guest_agent.0" -t "$RUN"
        echo "keel-vm: qemu-ga exited with $?; starting it again"
        sleep 0.5
    done
) &
while :; do
    # The image's python must load its own libpython, not the host's over 9p (its RUNPATH).
    LD_LIBRARY_PATH="$RUN/py/lib" "$PY" -m keel.agent run \
        --connect "virtio://$PORTS/org.keel.agent.0" --config "$RUN/agent.toml" &
    echo $! > "$RUN/agent.pid"
    wait $!
    echo "keel-vm: the agent exited with $?; starting it again"
    sleep 0.2
done
