#!/bin/sh
# Deploy benchmark: a 4 GiB disk holding 1 GiB of incompressible files (GPT +
# ext4), captured by `kiln-agent capture`, published signed into a temporary
# spool (signed with the spool's own key by `ssh-keygen -Y sign`, checked by
# `kiln-master verify`), then written onto a fresh 4 GiB disk three ways in
# the same run:
#   zstd -d < image | dd bs=4M          the whole disk, zeros and all
#   bmaptool copy                       of `kiln-master export --bmap`
#   kiln-agent deploy                   signed, range-checked, read back
# Each target is a loop device on a new sparse file; the page cache is
# dropped before each run and every method ends with its data on the device.
# The three run in interleaved rounds (KILN_BENCH_ROUNDS, 3) and each one's
# best round counts. Target: kiln's deploy faster than both. Exits 1 if
# missed. Needs root (loop devices, mount, drop_caches). Usage:
# scripts/bench-deploy.sh [WORKDIR]; KILN_BENCH_DATA_MIB sets the data (1024).
set -eu
[ "$(id -u)" = 0 ] || { echo "bench-deploy needs root (loop devices, mount, drop_caches)" >&2; exit 1; }
for t in bmaptool:bmap-tools zstd:zstd sfdisk:fdisk mke2fs:e2fsprogs losetup:util-linux ssh-keygen:openssh-client; do
    command -v "${t%%:*}" >/dev/null || {
        echo "bench-deploy: ${t%%:*} is not installed (package ${t#*:}; scripts/install-deps.sh installs it)" >&2
        exit 1
    }
done
here=$(cd "$(dirname "$0")/.." && pwd)
cargo build -q --release -p kiln-agent -p kiln-master --manifest-path "$here/Cargo.toml"
agent="$here/target/release/kiln-agent"
master="$here/target/release/kiln-master"
"$agent" deploy --help >/dev/null 2>&1 || { echo "bench-deploy: $agent has no deploy subcommand" >&2; exit 1; }
data_mib=${KILN_BENCH_DATA_MIB:-1024}
rounds=${KILN_BENCH_ROUNDS:-3}

work=$(mktemp -d "${1:-/tmp}/kiln-bench-deploy.XXXXXX")
dev=""
cleanup() {
    mountpoint -q "$work/mnt" 2>/dev/null && umount "$work/mnt"
    [ -n "$dev" ] && losetup -d "$dev" 2>/dev/null
    rm -rf "$work"
}
trap cleanup EXIT
now() { date +%s.%N; }
drop_caches() { sync; echo 3 > /proc/sys/vm/drop_caches; }

# The source disk.
disk="$work/disk.img"
truncate -s 4G "$disk"
printf 'label: gpt\n,,L\n' | sfdisk -q "$disk"
dev=$(losetup -f --show -P "$disk")
partx -a "$dev" 2>/dev/null || true
mke2fs -q -F -t ext4 "${dev}p1"
mkdir "$work/mnt"
mount "${dev}p1" "$work/mnt"
i=0
while [ $i -lt $((data_mib / 64)) ]; do
    head -c 64M /dev/urandom > "$work/mnt/data$i.bin"
    i=$((i + 1))
done
umount "$work/mnt"
partx -d "$dev" 2>/dev/null || true
losetup -d "$dev"
dev=""

# Captured, then published signed into a spool of its own.
"$agent" capture --disk "$disk" --out "$work/image.raw.zst" >/dev/null 2>&1
rm -f "$disk"
spool="$work/spool"
"$master" --spool "$spool" init >/dev/null
pub="$spool/images/bench"
mkdir -p "$pub"
mv "$work/image.raw.zst" "$pub/image.raw.zst"
sed 's/^job = ""$/job = "bench"/' "$work/image.manifest.toml" > "$pub/manifest.toml"
ssh-keygen -Y sign -q -f "$spool/master/image-signing-key" -n kiln-image "$pub/manifest.toml"
field() { sed -n "s/^$1 = \"\{0,1\}\([^\"]*\)\"\{0,1\}\$/\1/p" "$pub/manifest.toml"; }
printf 'job = "bench"\ntoken = "bench"\nagent = "bench"\npublished = "%s"\nimage_size = %s\nimage_blake3 = "%s"\ndisk_size = %s\n' \
    "$(date -u +%Y-%m-%dT%H:%M:%SZ)" "$(field image_size)" "$(field image_blake3)" "$(field disk_size)" > "$pub/published.toml"
"$master" --spool "$spool" verify bench >/dev/null
"$master" --spool "$spool" signer > "$work/allowed_signers"
t0=$(now)
"$master" --spool "$spool" export bench --out "$work/export" --bmap >/dev/null 2>&1
t1=$(now)
export_s=$(echo "$t0 $t1" | awk '{ printf "%.2f", $2 - $1 }')

# One timed write onto a fresh 4 GiB disk; sets secs.
timed() {
    rm -f "$work/target.img"
    truncate -s 4G "$work/target.img"
    dev=$(losetup -f --show "$work/target.img")
    drop_caches
    a=$(now)
    "$@" >"$work/run.log" 2>&1 || { echo "bench-deploy: $* failed:" >&2; tail -5 "$work/run.log" >&2; exit 1; }
    b=$(now)
    losetup -d "$dev"
    dev=""
    secs=$(echo "$a $b" | awk '{ printf "%.2f", $2 - $1 }')
}
dd_write() { zstd -d -q < "$pub/image.raw.zst" | dd of="$dev" bs=4M iflag=fullblock conv=fsync status=none; }
bmap_write() { bmaptool copy "$work/export/bench.img.zst" "$dev"; }
kiln_write() { "$agent" deploy --image "$pub" --disk "$dev" --signers "$work/allowed_signers"; }
# Rounds of the three, interleaved so that other load on the machine falls
# on all of them alike; each method's best round counts.
best() {
    if [ -z "$1" ]; then echo "$2"; else echo "$1 $2" | awk '{ print ($2 < $1) ? $2 : $1 }'; fi
}
dd_s=""; bmap_s=""; kiln_s=""; all=""
round=1
while [ $round -le "$rounds" ]; do
    timed dd_write; dd_s=$(best "$dd_s" "$secs"); r="dd $secs"
    timed bmap_write; bmap_s=$(best "$bmap_s" "$secs"); r="$r, bmaptool $secs"
    timed kiln_write; kiln_s=$(best "$kiln_s" "$secs"); r="$r, kiln $secs"
    all="$all
  round $round: $r"
    round=$((round + 1))
done
rm -f "$work/target.img"

printf '4 GiB disk, %s MiB of incompressible data (kiln-master export --bmap took %s s)\n' "$data_mib" "$export_s"
printf 'seconds of each round:%s\n' "$all"
awk -v d="$dd_s" -v b="$bmap_s" -v k="$kiln_s" -v size=$((4 << 30)) 'BEGIN {
    printf "%-34s %8s %12s\n", "method (best round)", "seconds", "disk MB/s"
    printf "%-34s %8.2f %12.0f\n", "zstd -d | dd bs=4M conv=fsync", d, size / d / 1e6
    printf "%-34s %8.2f %12.0f\n", "bmaptool copy (export --bmap)", b, size / b / 1e6
    printf "%-34s %8.2f %12.0f\n", "kiln-agent deploy", k, size / k / 1e6
    met = (k < d && k < b)
    printf "target: kiln deploy faster than both: %s (%.2fx dd, %.2fx bmaptool)\n", met ? "met" : "MISSED", d / k, b / k
    exit met ? 0 : 1
}'
