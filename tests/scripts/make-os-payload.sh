#!/usr/bin/env bash
# Makes a small real Linux root filesystem as a payload tar: Debian's static
# busybox with its applet links and an /sbin/init that shows, on the console,
# what a deployed machine is: its host name, the installed applications'
# markers, its users and their keys, then powers off.
#
#   tests/scripts/make-os-payload.sh OUT.tar
#
# BUSYBOX overrides the static busybox (default /bin/busybox, from busybox-static).
set -euo pipefail
out=${1:?usage: $0 OUT.tar}
busybox=${BUSYBOX:-/bin/busybox}
if ! "$busybox" --list >/dev/null 2>&1; then
	echo "$0: $busybox is not a busybox (install busybox-static)" >&2
	exit 1
fi
if ldd "$busybox" >/dev/null 2>&1; then
	echo "$0: $busybox is dynamically linked; the payload needs busybox-static" >&2
	exit 1
fi
root=$(mktemp -d)
chmod 0755 "$root"
trap 'rm -rf "$root"' EXIT
mkdir -p "$root"/{bin,sbin,etc,proc,sys,dev,tmp,root,run,home,opt,var/log,usr/bin,usr/sbin}
chmod 1777 "$root/tmp"
install -m 0755 "$busybox" "$root/bin/busybox"
for applet in $("$busybox" --list); do
	case $applet in busybox | init | linuxrc) continue ;; esac
	ln -s busybox "$root/bin/$applet"
done
cat >"$root/etc/os-release" <<'OS'
NAME="kiln test OS"
ID=kiln-test
PRETTY_NAME="kiln test OS (busybox)"
OS
printf 'root:x:0:0:root:/root:/bin/sh\n' >"$root/etc/passwd"
printf 'root:x:0:\n' >"$root/etc/group"
cat >"$root/sbin/init" <<'INIT'
#!/bin/sh
# The deployed machine's init: report what it is, then power off.
export PATH=/bin:/sbin:/usr/bin:/usr/sbin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null
[ -r /etc/hostname ] && hostname "$(cat /etc/hostname)"
say() { echo "KILN-IMAGE: $*"; }
say "booted $(. /etc/os-release && echo "$PRETTY_NAME") on $(uname -r)"
say "root $(awk '$2 == "/" { print $1, $3, $4 }' /proc/mounts)"
say "hostname $(hostname)"
for m in /opt/*/marker; do
	[ -r "$m" ] && say "app $(cat "$m")"
done
awk -F: '$3 >= 1000 { print $1, $3, $6, $7 }' /etc/passwd | while read -r name uid home shell; do
	keys=0
	[ -r "$home/.ssh/authorized_keys" ] && keys=$(grep -c . "$home/.ssh/authorized_keys")
	say "user $name uid $uid home $home shell $shell keys $keys"
done
[ -r /etc/motd ] && say "motd $(cat /etc/motd)"
[ -r /etc/kiln-step ] && say "step $(cat /etc/kiln-step)"
say "done"
sync
poweroff -f
INIT
chmod 0755 "$root/sbin/init"
# Reproducible: sorted names, fixed owner and time.
tar -C "$root" --sort=name --owner=0 --group=0 --numeric-owner --mtime=@0 -cf "$out" .
echo "$out: $(du -h "$out" | cut -f1) root filesystem with $("$busybox" --list | wc -l) busybox applets"
