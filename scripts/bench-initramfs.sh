#!/usr/bin/env bash
# The minimal OS's size: the static agent, then the initramfs packed with
# Debian's kernel modules, the mkfs tools and busybox, against the 32 MiB
# (compressed) target. A throwaway agent.toml and key stand in for real ones.
set -euo pipefail
cd "$(dirname "$0")/.."
musl=x86_64-unknown-linux-musl
target=${CARGO_TARGET_DIR:-target}
scripts/fetch-kernel.sh >/dev/null
kdir=${KILN_CACHE:-.cache}/kernel
kver=$(cat "$kdir/version")
cargo build -q --release --target "$musl" -p kiln-agent
cargo build -q --release -p kiln-initramfs
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
ssh-keygen -q -t ed25519 -N "" -f "$work/agent_key"
cat >"$work/agent.toml" <<CFG
[[servers]]
address = "10.0.2.2:2222"
key = "/etc/kiln/agent_key"
host_key = "$(cut -d' ' -f1-2 "$work/agent_key.pub")"
spool = "/spool"
CFG
cat >"$work/initramfs.toml" <<CFG
agent = "$PWD/$target/$musl/release/kiln-agent"
agent_config = "agent.toml"
kernel_modules = "$PWD/$kdir/lib/modules/$kver"

[[files]]
src = "agent_key"
dest = "/etc/kiln/agent_key"
mode = 0o600
CFG
start=$(date +%s.%N)
"$target/release/kiln-initramfs" --config "$work/initramfs.toml" --out "$work/initramfs.img" >/dev/null
end=$(date +%s.%N)
agent=$(stat -c %s "$target/$musl/release/kiln-agent")
size=$(stat -c %s "$work/initramfs.img")
limit=$((32 << 20))
printf '%-28s %12s\n' "static kiln-agent" "$agent bytes"
printf '%-28s %12s  (%.1f MiB, target < 32 MiB: %s)\n' "initramfs (zstd)" "$size bytes" \
	"$(awk -v s="$size" 'BEGIN { print s / 1048576 }')" "$([ "$size" -lt "$limit" ] && echo met || echo MISSED)"
printf '%-28s %12.2f s\n' "pack time" "$(awk -v a="$start" -v b="$end" 'BEGIN { print b - a }')"
