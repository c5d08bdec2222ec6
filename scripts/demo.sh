#!/usr/bin/env bash
# The demo, end to end on this machine: a job server set up as the README
# sets one up (kiln-master init --agent-user, agent-key, OpenSSH's sshd on
# 127.0.0.1 with agent-key's drop-in), the Debian sample job queued
# (examples/jobs/debian.toml with scripts/make-debian-payload.sh's root), one
# QEMU VM that PXE-boots kiln's minimal OS, logs in as the agents' account,
# builds the job and uploads the image, the master publishing it, and the
# image booting in a fresh VM by UEFI firmware alone (OVMF, no -kernel).
# Prints what it did and how long each phase took, and ends by logging in
# to the booted image over SSH with the job's key.
#
#   scripts/demo.sh            (as root; make demo installs the packages first)
#
# KILN_QEMU_ACCEL=kvm uses KVM instead of TCG; KILN_DEMO_TIMEOUT (seconds,
# default 900) bounds the build. The job server lives in $KILN_DEMO_SERVER
# (default /run/kiln-demo): sshd chroots agents into its server/, which must be
# root's and writable by nobody else all the way up, so not under /tmp or a
# home directory. Logs, disks and the initramfs go to demo/.
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$PWD
demo=$repo/demo
base=${KILN_DEMO_SERVER:-/run/kiln-demo}
spool=$base/server/spool
keys=$base/keys
agent_user=kiln-agent
musl=x86_64-unknown-linux-musl
target=${CARGO_TARGET_DIR:-$repo/target}
accel=${KILN_QEMU_ACCEL:-tcg}
timeout=${KILN_DEMO_TIMEOUT:-900}
master_bin=$target/debug/kiln-master
agent_bin=$target/$musl/release/kiln-agent

phases=()
phase_start=$SECONDS
step() {
	printf '\n== %s\n' "$*"
}
done_phase() {
	local took=$((SECONDS - phase_start))
	phases+=("$(printf '%-34s %4ss' "$1" "$took")")
	phase_start=$SECONDS
}
master() { "$master_bin" --spool "$spool" "$@"; }
die() {
	echo "demo: $*" >&2
	exit 1
}

pids=()
cleanup() {
	for p in "${pids[@]}"; do
		kill "$p" 2>/dev/null || true
	done
	wait 2>/dev/null || true
}
trap cleanup EXIT

for tool in qemu-system-x86_64 qemu-img /usr/sbin/sshd ssh-keygen ssh zstd mmdebstrap; do
	command -v "$tool" >/dev/null || [ -x "$tool" ] || die "$tool is missing: run scripts/install-deps.sh (or make demo)"
done
[ -f /usr/share/OVMF/OVMF_CODE_4M.fd ] || die "OVMF is missing: run scripts/install-deps.sh (or make demo)"

step "build kiln-master, kiln-initramfs and the static agent ($musl)"
cargo build -q -p kiln-master -p kiln-initramfs
cargo build -q --release --target "$musl" -p kiln-agent
ls -l "$agent_bin" | awk '{ print "agent: " $5 " bytes, " $NF }'
done_phase "build"

step "fetch Debian's kernel into .cache/kernel"
kdir=$(scripts/fetch-kernel.sh | tail -n1)
kver=$(cat "$kdir/version")
echo "kernel $kver at $kdir"
done_phase "kernel"

rm -rf "$demo" "$base"
mkdir -p "$demo/sshd"
install -d -m 0755 "$base"

step "set up a job server: the spool, the agents' account, their key and sshd's drop-in"
master init --agent-user "$agent_user"
master agent-key --out "$keys" --agent-user "$agent_user" | grep -E '^(wrote|sshd -t)'
# An sshd of its own on 127.0.0.1 (the host's stays as it is), with the
# drop-in included first, as Debian's sshd_config includes sshd_config.d/*.conf.
ssh-keygen -q -t ed25519 -N '' -C kiln-demo-host -f "$demo/sshd/host_key"
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])' 2>/dev/null || echo 2222)
mkdir -p /run/sshd
cat >"$demo/sshd/sshd_config" <<EOF
Include $keys/kiln-agents.conf
ListenAddress 127.0.0.1:$port
HostKey $demo/sshd/host_key
PidFile $demo/sshd/sshd.pid
AllowUsers $agent_user
UsePAM no
PasswordAuthentication no
KbdInteractiveAuthentication no
Subsystem sftp internal-sftp
EOF
/usr/sbin/sshd -t -f "$demo/sshd/sshd_config" || die "sshd -t refuses $demo/sshd/sshd_config"
/usr/sbin/sshd -D -e -f "$demo/sshd/sshd_config" 2>"$demo/sshd/sshd.log" &
pids+=($!)
for _ in $(seq 50); do
	(echo >"/dev/tcp/127.0.0.1/$port") 2>/dev/null && break
	sleep 0.1
done
(echo >"/dev/tcp/127.0.0.1/$port") 2>/dev/null || die "sshd did not start: $(tail -5 "$demo/sshd/sshd.log")"
echo "sshd on 127.0.0.1:$port (the VM reaches it as 10.0.2.2:$port), host key $(ssh-keygen -lf "$demo/sshd/host_key.pub" | awk '{print $2}')"
done_phase "job server"

step "queue the Debian job in $spool (the payload is made once, then cached)"
payload=$(scripts/make-debian-payload.sh | tail -n1)
master payload add --name debian-bookworm.tar.zst "$payload"
ssh-keygen -q -t ed25519 -N '' -C ops@kiln-demo -f "$demo/ops_key"
sed "s|^authorized_keys = .*|authorized_keys = [\"$(cat "$demo/ops_key.pub")\"]|" \
	examples/jobs/debian.toml >"$demo/debian.toml"
master add "$demo/debian.toml"
master list
done_phase "spool"

step "pack the minimal OS: the agent as /init, modules, mkfs tools, busybox, agent.toml"
cat >"$demo/agent.toml" <<EOF
poll_interval = "2s"
disk = "auto"

[[servers]]
address = "10.0.2.2:$port"
user = "$agent_user"
key = "/etc/kiln/agent_key"
host_key = "$(cat "$demo/sshd/host_key.pub")"
spool = "/spool"
EOF
cat >"$demo/initramfs.toml" <<EOF
agent = "$agent_bin"
agent_config = "agent.toml"
kernel_modules = "$kdir/lib/modules/$kver"

[[files]]
src = "$keys/kiln-agent"
dest = "/etc/kiln/agent_key"
mode = 0o600
EOF
"$target/debug/kiln-initramfs" --config "$demo/initramfs.toml" --out "$demo/initramfs.img" | tail -n 3
master pxe --out "$demo/tftp" --kernel "$kdir/vmlinuz" --initramfs "$demo/initramfs.img" \
	--cmdline "console=ttyS0,115200 panic=-1 loglevel=4 kiln.id=demo-vm"
done_phase "initramfs and PXE directory"

step "PXE-boot a VM ($accel) that builds the job; its console is $demo/build-vm.log"
qemu-img create -q -f qcow2 "$demo/build-disk.qcow2" 2G
qemu-system-x86_64 -name kiln-demo-build -accel "$accel" -m 1536 -smp 1 \
	-display none -monitor none -no-reboot -serial "file:$demo/build-vm.log" \
	-drive "file=$demo/build-disk.qcow2,format=qcow2,if=none,id=disk0" \
	-device virtio-blk-pci,drive=disk0,serial=kiln-disk0 \
	-netdev "user,id=pxe0,tftp=$demo/tftp,bootfile=boot.ipxe" \
	-device virtio-net-pci,netdev=pxe0 -boot n >"$demo/build-qemu.log" 2>&1 &
vm=$!
pids+=("$vm")
shown=0
last=""
deadline=$((SECONDS + timeout))
while [ ! -f "$spool/images/debian/published.toml" ]; do
	# The VM's status lines, as they come.
	if [ -f "$demo/build-vm.log" ]; then
		lines=$(grep -a '^kiln: ' "$demo/build-vm.log" || true)
		count=$(printf '%s' "$lines" | grep -c . || true)
		if [ "$count" -gt "$shown" ]; then
			printf '%s\n' "$lines" | tail -n +"$((shown + 1))" | sed 's/^/  vm  | /'
			shown=$count
		fi
	fi
	master reap >/dev/null
	now=$(master list | awk '$1 == "debian"')
	if [ -n "$now" ] && [ "$now" != "$last" ]; then
		echo "  spool| $now"
		last=$now
	fi
	json=$(master list --json)
	if [[ $json == *'"state": "failed"'* ]]; then
		master show debian || true
		die "the job failed; the VM's console is $demo/build-vm.log"
	fi
	kill -0 "$vm" 2>/dev/null || die "the VM stopped; its console is $demo/build-vm.log"
	[ "$SECONDS" -lt "$deadline" ] || die "no image after ${timeout}s; the VM's console is $demo/build-vm.log"
	sleep 2
done
kill "$vm" 2>/dev/null || true
master list
done_phase "PXE boot, build, upload, publish"

step "boot the published image under UEFI (OVMF, no -kernel); its console is $demo/image-vm.log"
image=$spool/images/debian/image.raw.zst
manifest=$spool/images/debian/manifest.toml
"$agent_bin" verify "$image" --manifest "$manifest" 2>&1 | tail -n 1
zstd -d -q -f "$image" -o "$demo/debian.raw"
cp /usr/share/OVMF/OVMF_VARS_4M.fd "$demo/ovmf-vars.fd"
ssh_port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])' 2>/dev/null || echo 2223)
qemu-system-x86_64 -name kiln-demo-image -accel "$accel" -m 1024 -smp 1 \
	-display none -monitor none -serial "file:$demo/image-vm.log" \
	-drive "if=pflash,format=raw,unit=0,readonly=on,file=/usr/share/OVMF/OVMF_CODE_4M.fd" \
	-drive "if=pflash,format=raw,unit=1,file=$demo/ovmf-vars.fd" \
	-drive "file=$demo/debian.raw,format=raw,if=none,id=disk0" \
	-device virtio-blk-pci,drive=disk0 \
	-netdev "user,id=net0,hostfwd=tcp:127.0.0.1:$ssh_port-:22" \
	-device virtio-net-pci,netdev=net0 >"$demo/image-qemu.log" 2>&1 &
vm=$!
pids+=("$vm")
image_ssh() {
	ssh -i "$demo/ops_key" -p "$ssh_port" -o BatchMode=yes -o StrictHostKeyChecking=no \
		-o UserKnownHostsFile=/dev/null -o ConnectTimeout=10 -o LogLevel=ERROR ops@127.0.0.1 "$@"
}
deadline=$((SECONDS + 400))
until image_ssh true 2>/dev/null; do
	kill -0 "$vm" 2>/dev/null || die "the image VM stopped early; its console is $demo/image-vm.log"
	[ "$SECONDS" -lt "$deadline" ] || die "the image did not answer SSH in 400s; see $demo/image-vm.log"
	sleep 2
done
grep -a -m1 'Welcome to' "$demo/image-vm.log" | sed 's/^/  image| /' || true
done_phase "boot the image to SSH"

cat <<MSG

What this did: made the spool $spool with kiln-master init
--agent-user $agent_user, the agents' key and sshd drop-in with kiln-master
agent-key ($keys), started sshd on 127.0.0.1:$port with it as the job server,
queued the Debian job, PXE-booted a VM into kiln's minimal OS (kernel $kver,
$demo/initramfs.img), which logged in as $agent_user (chrooted, SFTP only),
claimed the job, built it on its virtio disk (GRUB for UEFI and BIOS,
the root by UUID, generalized) and uploaded the image; the master verified
and published it; then the image booted in a fresh VM from its own GRUB under
OVMF, and sshd answered with host keys made at its first boot.

  image:     $image
  manifest:  $manifest
  job log:   $spool/images/debian/job.log
  log in:    ssh -i $demo/ops_key -p $ssh_port ops@127.0.0.1 (while the demo runs)
  watch the spool in the TUI:
    $master_bin --spool $spool tui

Time per phase:
MSG
printf '  %s\n' "${phases[@]}"
echo "  total                              $(printf '%4s' "$SECONDS")s"

step "log in to the booted image over SSH as ops, with the job's key"
echo "\$ ssh ops@kiln-debian hostname; systemctl is-system-running"
image_ssh 'hostname; systemctl is-system-running --wait' || true
