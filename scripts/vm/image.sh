#!/usr/bin/env bash
# image.sh OUT PYTHON SRC: build the guest's Python runtime as an ext4 image (mke2fs -d: no
# mount, no loop device): this machine's Python with its compiled standard library, msgspec,
# uvloop and Keel (SRC/keel, with the agent's plugin entry points). The guest mounts it read-only
# from a virtio-blk disk: Python started from the host's root shared over 9p took over a
# minute under TCG here, every file lookup a round trip to the host; from a block device the
# guest caches, seconds.
set -euo pipefail
out="$1" py="$2" src="$3"
stage="$(mktemp -d "${TMPDIR:-/tmp}/keel-vm-image.XXXXXX")"
trap 'rm -rf "$stage"' EXIT
read -r prefix ver site < <("$py" -c 'import sys, sysconfig
print(sys.base_prefix, "%d.%d" % sys.version_info[:2], sysconfig.get_paths()["purelib"])')
mkdir -p "$stage/bin" "$stage/lib"
cp -L "$prefix/bin/python$ver" "$stage/bin/python"
cp -L "$prefix"/lib/libpython"$ver".so* "$stage/lib/" 2>/dev/null || true
tar -C "$prefix/lib" -cf - --exclude="python$ver/site-packages" --exclude="python$ver/test" \
    --exclude="python$ver/idlelib" --exclude="python$ver/tkinter" --exclude="python$ver/turtledemo" \
    --exclude="python$ver/ensurepip" --exclude="python$ver/lib2to3" --exclude='*.opt-?.pyc' \
    --exclude="python$ver/config-*" "python$ver" | tar -C "$stage/lib" -xf -
dest="$stage/lib/python$ver/site-packages"
mkdir -p "$dest"
cp -a "$site"/msgspec "$site"/msgspec-*.dist-info "$dest/"
# uvloop (keel[agent]): the agent's event loop in C, where every Python call costs most.
cp -a "$site"/uvloop "$site"/uvloop-*.dist-info "$dest/"
cp -a "$src/keel" "$dest/"
find "$dest/keel" -name __pycache__ -prune -exec rm -rf {} +
dist="$(ls -d "$site"/keel-*.dist-info)"
mkdir -p "$dest/${dist##*/}"
cp "$dist/METADATA" "$dist/entry_points.txt" "$dest/${dist##*/}/"
"$py" -m compileall -q -j 0 "$dest/keel" >/dev/null
size=$(( $(du -sm "$stage" | cut -f1) * 5 / 4 + 16 ))
rm -f "$out.tmp"
mke2fs -q -t ext4 -O ^has_journal -L keelpy -d "$stage" "$out.tmp" "${size}M" > /dev/null
mv "$out.tmp" "$out"
