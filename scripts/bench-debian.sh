#!/usr/bin/env bash
# The Debian sample, timed: PXE power-on to the published image (with the
# time of each build phase from the manifest), and the image's first boot to
# SSH answering under UEFI (OVMF) and BIOS (SeaBIOS), each beside its target
# under TCG, then the deploy job onto a larger disk and its first boot. Runs
# tests/tests/e2e_debian.rs, which checks the images too.
set -euo pipefail
cd "$(dirname "$0")/.."
log=/tmp/kiln-bench-debian.log
start=$(date +%s)
cargo test -q -p kiln-e2e --test e2e_debian -- --nocapture >"$log" 2>&1 \
	|| { tail -n 60 "$log"; echo "bench-debian: the Debian scenario failed; full log in $log" >&2; exit 1; }
secs=$(( $(date +%s) - start ))

verdict() { [ "$1" -lt "$2" ] && echo met || echo MISSED; }
published=$(awk '/^bench: published/ { print $3 }' "$log")
printf 'debian: PXE power-on to published image: %4d s (target < 240 s: %s)\n' \
	"$published" "$(verdict "$published" 240)"
awk '/^bench: phase/ { printf "  phase %-10s %7s s\n", $3, $4 }' "$log"
for fw in Uefi Bios; do
	s=$(awk -v fw="$fw" '$1 == "bench:" && $2 == "ssh" && $3 == fw { print $4 }' "$log")
	printf 'debian: first boot to SSH, %-4s:          %4d s (target < 60 s: %s)\n' \
		"$fw" "$s" "$(verdict "$s" 60)"
done
deployed=$(awk '/^bench: deployed/ { print $3 }' "$log")
ssh_deployed=$(awk '/^bench: ssh deployed/ { print $4 }' "$log")
printf 'debian: deploy job, PXE power-on to reboot: %4d s (no target; bench-deploy.sh times the write)\n' "$deployed"
printf 'debian: deployed disk, boot to SSH, Uefi:   %4d s (target < 60 s: %s)\n' \
	"$ssh_deployed" "$(verdict "$ssh_deployed" 60)"
echo "debian: whole scenario ${secs} s; full log in $log"
