#!/bin/sh
# Capture benchmark: a 4 GiB ext4 disk holding 1 GiB of mixed data,
# captured by `kiln-agent capture` and by `dd bs=4M | zstd -1 -T0` in the
# same run. Prints wall time, MB/s of logical disk and image sizes.
# Needs root (loop devices, mount). Usage: scripts/bench-capture.sh [WORKDIR]
set -eu
[ "$(id -u)" = 0 ] || { echo "SKIP: bench-capture needs root" >&2; exit 0; }
here=$(cd "$(dirname "$0")/.." && pwd)
cargo build -q --release -p kiln-agent --manifest-path "$here/Cargo.toml"
agent="$here/target/release/kiln-agent"
work=$(mktemp -d "${1:-/tmp}/kiln-bench.XXXXXX")
dev=""
cleanup() {
    mountpoint -q "$work/mnt" 2>/dev/null && umount "$work/mnt"
    [ -n "$dev" ] && losetup -d "$dev" 2>/dev/null
    rm -rf "$work"
}
trap cleanup EXIT

disk="$work/disk.img"
truncate -s 4G "$disk"
printf 'label: gpt\n,,L\n' | sfdisk -q "$disk"
dev=$(losetup -f --show -P "$disk")
partx -a "$dev" 2>/dev/null || true
mke2fs -q -F -t ext4 "${dev}p1"
mkdir "$work/mnt"
mount "${dev}p1" "$work/mnt"
# 1 GiB of mixed data: 256 MiB random, 512 MiB of text, 256 MiB of binaries.
head -c 256M /dev/urandom > "$work/mnt/random.bin"
i=0
while [ $i -lt 8 ]; do
    seq 1 9000000 | head -c 64M > "$work/mnt/text$i.log"
    i=$((i + 1))
done
for f in /usr/bin/* /usr/lib/x86_64-linux-gnu/*.so*; do
    [ -f "$f" ] || continue
    cat "$f"
done 2>/dev/null | head -c 256M > "$work/mnt/binaries.cat"
umount "$work/mnt"
partx -d "$dev" 2>/dev/null || true
losetup -d "$dev"
dev=$(losetup -f --show "$disk")
sync
echo 3 > /proc/sys/vm/drop_caches

now() { date +%s.%N; }
t0=$(now)
"$agent" capture --disk "$dev" --out "$work/kiln.raw.zst" --level 1 >/dev/null 2>&1
t1=$(now)
echo 3 > /proc/sys/vm/drop_caches
t2=$(now)
dd if="$dev" bs=4M status=none | zstd -1 -T0 -q > "$work/dd.raw.zst"
t3=$(now)

size=$(blockdev --getsize64 "$dev")
read_bytes=$(sed -n 's/^bytes_read = //p' "$work/kiln.manifest.toml")
awk -v s="$size" -v a="$t0" -v b="$t1" -v c="$t2" -v d="$t3" \
    -v ki="$(stat -c %s "$work/kiln.raw.zst")" -v di="$(stat -c %s "$work/dd.raw.zst")" -v r="$read_bytes" 'BEGIN {
    k = b - a; z = d - c
    printf "%-28s %8s %10s %14s %14s\n", "method", "seconds", "MB/s", "image bytes", "bytes read"
    printf "%-28s %8.2f %10.0f %14d %14.0f\n", "kiln-agent capture (zstd 1)", k, s / k / 1e6, ki, r
    printf "%-28s %8.2f %10.0f %14d %14.0f\n", "dd bs=4M | zstd -1 -T0", z, s / z / 1e6, di, s
    printf "speed-up %.1fx, image size ratio %.3f\n", z / k, ki / di
    printf "target: at least 3x faster with an image no larger: %s\n", (z / k >= 3 && ki <= di) ? "met" : "MISSED"
}'
