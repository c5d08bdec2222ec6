#!/usr/bin/env bash
# Fetches Debian's current amd64 kernel into a build cache without installing
# it on the host: `apt-get download linux-image-amd64`, follow its Depends to the
# versioned linux-image-X-amd64 package, download that and unpack it with
# `dpkg -x`. Runs `depmod -b` on the tree when kmod is present (kiln-initramfs
# reads each module's .modinfo otherwise).
#
# Stable paths afterwards (cache = $KILN_CACHE or <repo>/.cache):
#   $cache/kernel/vmlinuz               the kernel image
#   $cache/kernel/lib/modules/<ver>/    its modules
#   $cache/kernel/version               <ver>, one line
#
# Idempotent: does nothing when the kernel is already there. Prints the cache
# directory on its last line.
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cache="${KILN_CACHE:-$repo/.cache}"
dir="$cache/kernel"

have_kernel() {
  [ -s "$dir/vmlinuz" ] && [ -s "$dir/version" ] && [ -d "$dir/lib/modules/$(cat "$dir/version")" ]
}

if have_kernel; then
  echo "$dir"
  exit 0
fi

# Several test processes may ask at once: one fetches, the others wait.
mkdir -p "$cache"
exec 9>"$cache/kernel.lock"
flock 9
if have_kernel; then
  echo "$dir"
  exit 0
fi

for tool in apt-get apt-cache dpkg dpkg-deb; do
  command -v "$tool" >/dev/null || { echo "fetch-kernel: $tool is missing (Debian's dpkg/apt are needed)" >&2; exit 1; }
done

# The metapackage's Depends names the versioned image package, e.g.
# "linux-image-6.1.0-56-amd64 (= 6.1.192-2)".
depends_of_candidate() {
  apt-cache depends --no-recommends --no-suggests --no-conflicts --no-breaks \
    --no-replaces --no-enhances "$1" 2>/dev/null |
    sed -n 's/^ *Depends: *//p' | grep -E '^linux-image-[0-9].*-amd64$' | head -n1
}

real="$(depends_of_candidate linux-image-amd64 || true)"
if [ -z "$real" ]; then
  # A machine with every package installed may still have empty apt lists.
  echo "fetch-kernel: apt does not know linux-image-amd64 yet; running apt-get update" >&2
  sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  $sudo apt-get update -qq || true
  real="$(depends_of_candidate linux-image-amd64 || true)"
fi
if [ -z "$real" ]; then
  echo "fetch-kernel: apt does not know linux-image-amd64; run scripts/install-deps.sh (it runs apt-get update)" >&2
  exit 1
fi
echo "fetch-kernel: linux-image-amd64 depends on $real"

work="$(mktemp -d "$cache/kernel-fetch.XXXXXX")"
trap 'rm -rf "$work"' EXIT

# apt-get download writes into the current directory; as root it would hand
# the download to the _apt user, who cannot write into our private directory.
(cd "$work" && apt-get download -q -o APT::Sandbox::User=root linux-image-amd64 "$real" >/dev/null)
deb="$(ls "$work"/"$real"_*.deb | head -n1)"
[ -f "$deb" ] || { echo "fetch-kernel: download of $real produced no .deb in $work" >&2; exit 1; }

dpkg -x "$deb" "$work/root"
ver="${real#linux-image-}"
vmlinuz="$work/root/boot/vmlinuz-$ver"
[ -f "$vmlinuz" ] || { echo "fetch-kernel: $deb holds no boot/vmlinuz-$ver" >&2; exit 1; }
[ -d "$work/root/lib/modules/$ver" ] || { echo "fetch-kernel: $deb holds no lib/modules/$ver" >&2; exit 1; }

if command -v depmod >/dev/null || [ -x /sbin/depmod ]; then
  "$(command -v depmod || echo /sbin/depmod)" -b "$work/root" "$ver"
  echo "fetch-kernel: ran depmod on lib/modules/$ver"
else
  echo "fetch-kernel: depmod is not installed; kiln-initramfs will read .modinfo itself"
fi

# Assemble the final layout in the work dir and move it into place in one
# rename, so an interrupted fetch never leaves a half-filled cache.
mkdir -p "$work/out/lib/modules"
mv "$vmlinuz" "$work/out/vmlinuz"
mv "$work/root/lib/modules/$ver" "$work/out/lib/modules/$ver"
echo "$ver" >"$work/out/version"
rm -rf "$dir"
mv "$work/out" "$dir"
echo "fetch-kernel: $ver unpacked ($(du -sh "$dir" | cut -f1))"
echo "$dir"
