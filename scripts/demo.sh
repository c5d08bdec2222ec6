#!/usr/bin/env bash
# The demo on an embedded default: a spool under demo/, the sample job and
# its payload queued, then whatever the built pieces can do with it.
set -euo pipefail
cd "$(dirname "$0")/.."
bin=target/debug
demo=demo
spool=$demo/spool
master() { "$bin/kiln-master" --spool "$spool" "$@"; }
step() { printf '\n== %s\n' "$*"; }

rm -rf "$demo"
mkdir -p "$demo/root/etc" "$demo/root/bin"
step "init a spool at $spool"
master init

step "make the sample payload (a tiny root tree) and add it"
echo "kiln sample" > "$demo/root/etc/issue"
tar -C "$demo/root" --owner=0 --group=0 -cf "$demo/sample-root.tar" .
master payload add "$demo/sample-root.tar"

step "queue the sample job (its payload hash is pinned on the way in)"
master add examples/jobs/sample.toml
grep -A1 'name = "sample-root.tar"' "$spool/jobs/sample.toml"

step "the job list, as agents will take it"
master list

step "one reaper pass (nothing to reclaim or publish yet)"
master reap

cat <<MSG

What this did: created the spool $spool, added payloads/sample-root.tar,
validated and queued jobs/sample.toml in jobs.toml, and ran one reap pass.
Agents claim jobs from this spool over SSH; watch it with:
  $bin/kiln-master --spool $spool list
  $bin/kiln-master --spool $spool serve
MSG
