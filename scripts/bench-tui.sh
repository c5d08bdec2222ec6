#!/bin/sh
# The operator's console on a spool of 10,000 jobs and 200 agents: time to
# read the spool, time per frame, the reaper's pass and peak memory.
# Usage: scripts/bench-tui.sh [JOBS [AGENTS]]
set -eu
cd "$(dirname "$0")/.."
exec cargo run --quiet --release -p kiln-master --example tui_bench -- "${1:-10000}" "${2:-200}"
