#!/usr/bin/env bash
# Installs what building and testing kiln needs, idempotently: Debian packages
# and the Rust musl target. Safe to run again; does nothing when all is present.
set -euo pipefail

packages=(
  openssh-server openssh-client   # test sshd on 127.0.0.1, ssh-keygen
  e2fsprogs dosfstools fdisk mtools util-linux  # mke2fs, mkfs.vfat, sfdisk, partx, losetup
  zstd cpio tmux                  # capture baseline, initramfs checks, TUI test
  qemu-system-x86 qemu-utils ipxe-qemu  # the VM harness
  busybox-static musl-tools       # initramfs userland, static agent
  ovmf seabios                    # boot published images by firmware alone (UEFI, BIOS)
  bmap-tools                      # `bmaptool copy` of exported images (tests, make bench)
  mmdebstrap                      # the Debian sample payload (scripts/make-debian-payload.sh)
)

missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done

if [ ${#missing[@]} -gt 0 ]; then
  echo "install-deps: installing ${missing[*]}"
  sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  export DEBIAN_FRONTEND=noninteractive
  $sudo apt-get update -qq
  $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# bookworm's qemu-system-x86 breaks a newer (backported) qemu-utils, and apt
# removes it to install QEMU: pair qemu-img with the QEMU it now has.
if ! command -v qemu-img >/dev/null; then
  echo "install-deps: installing qemu-utils to go with qemu-system-x86"
  sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  export DEBIAN_FRONTEND=noninteractive
  $sudo apt-get install -y -qq --no-install-recommends qemu-utils >/dev/null
fi

if command -v rustup >/dev/null && ! rustup target list --installed | grep -qx x86_64-unknown-linux-musl; then
  echo "install-deps: adding the x86_64-unknown-linux-musl target"
  rustup target add x86_64-unknown-linux-musl
fi
