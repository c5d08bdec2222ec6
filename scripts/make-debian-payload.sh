#!/usr/bin/env bash
# Builds the Debian sample payload: a small bootable bookworm root made with
# mmdebstrap from Debian's packages (kernel, systemd, sshd, GRUB for UEFI and
# BIOS, sudo, networkd answering DHCP on any wired NIC), as a tar.zst.
#
# Cached outside the clone, keyed by this script's own hash, so it is built
# once per machine and again only when this recipe changes:
#   $KILN_PAYLOAD_CACHE (default /var/cache/kiln)/debian-bookworm-<hash>.tar.zst
# Prints the payload's path on its last line. About 5 minutes when cold.
#
# KILN_DEBIAN_MIRROR overrides the mirror (default: the one apt uses here).
set -euo pipefail

script="$(readlink -f "${BASH_SOURCE[0]}")"
cache="${KILN_PAYLOAD_CACHE:-/var/cache/kiln}"
recipe=$(sha256sum "$script" | cut -c1-16)
out="$cache/debian-bookworm-$recipe.tar.zst"

if [ -s "$out" ]; then
  echo "$out"
  exit 0
fi

for tool in mmdebstrap zstd flock; do
  command -v "$tool" >/dev/null || { echo "make-debian-payload: $tool is missing: run scripts/install-deps.sh" >&2; exit 1; }
done
[ "$(id -u)" -eq 0 ] || { echo "make-debian-payload: mmdebstrap needs root here (it runs in root mode)" >&2; exit 1; }

mkdir -p "$cache"
# Tests and the demo may ask at once: one builds, the others wait for it.
exec 9>"$cache/debian-bookworm.lock"
flock 9
if [ -s "$out" ]; then
  echo "$out"
  exit 0
fi

mirror="${KILN_DEBIAN_MIRROR:-}"
if [ -z "$mirror" ]; then
  mirror=$(grep -rhoE '^(URIs:|deb) +https?://[^ ]+/debian/?( |$)' /etc/apt/sources.list /etc/apt/sources.list.d/ 2>/dev/null \
    | grep -oE 'https?://[^ ]+' | head -n1 || true)
  mirror="${mirror:-http://deb.debian.org/debian}"
fi

packages=(
  linux-image-amd64 initramfs-tools zstd  # kernel and its initramfs
  systemd-sysv udev dbus                  # init, device links by UUID, logind's bus
  openssh-server sudo                     # log in as the job's user
  grub-efi-amd64-bin grub-pc-bin grub2-common  # loaders kiln installs, update-grub
  e2fsprogs dosfstools                    # fsck for the root and the ESP at boot
  iproute2
)

tmp="$out.partial"
trap 'rm -f "$tmp"' EXIT
echo "make-debian-payload: mmdebstrap bookworm from $mirror into $out" >&2
started=$SECONDS
# The essential hook names the root's file system type for initramfs-tools
# before the kernel's initramfs is made, so the initramfs carries fsck.ext4
# whatever fstab kiln writes later, and the agent need not remake it (see the
# README: Initramfs).
mmdebstrap --variant=minbase --mode=root --format=tar \
  --include="$(IFS=,; echo "${packages[*]}")" \
  --dpkgopt='path-exclude=/usr/share/man/*' \
  --dpkgopt='path-exclude=/usr/share/doc/*' \
  --dpkgopt='path-include=/usr/share/doc/*/copyright' \
  --dpkgopt='path-exclude=/usr/share/locale/*' \
  --essential-hook='mkdir -p "$1/etc/initramfs-tools/conf.d" && printf "FSTYPE=ext4\n" > "$1/etc/initramfs-tools/conf.d/fstype"' \
  --customize-hook='printf "debian\n" > "$1/etc/hostname"' \
  --customize-hook='mkdir -p "$1/etc/default/grub.d" && printf "GRUB_TIMEOUT=1\nGRUB_DISABLE_OS_PROBER=true\n" > "$1/etc/default/grub.d/timeout.cfg"' \
  --customize-hook='mkdir -p "$1/etc/systemd/network" && printf "[Match]\nName=en* eth*\n\n[Network]\nDHCP=yes\n" > "$1/etc/systemd/network/50-dhcp.network"' \
  --customize-hook='chroot "$1" systemctl enable systemd-networkd.service' \
  --customize-hook='rm -f "$1"/var/cache/apt/*.bin "$1"/var/lib/apt/lists/*_Packages' \
  bookworm - "$mirror" | zstd -q -T0 -6 -o "$tmp"
mv "$tmp" "$out"
trap - EXIT
echo "make-debian-payload: built in $((SECONDS - started)) s, $(du -h "$out" | cut -f1)" >&2
echo "$out"
