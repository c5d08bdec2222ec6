#!/bin/sh
# The streamed build and upload: the agent's peak RSS while it builds and
# uploads a job with 2 GiB of incompressible data (target: 96 MiB plus the
# upload window), and, on the disk it built, the streamed capture+upload
# against today's staged flow (capture to a file, then upload) in the same
# run (target: the slower of the two plus 15%). KILN_BENCH_BYTES sets the
# size. Needs root (loop devices, mounts).
set -eu
[ "$(id -u)" = 0 ] || { echo "bench-stream needs root (loop devices, mounts)" >&2; exit 1; }
cd "$(dirname "$0")/.."
cargo build --quiet --release -p kiln-agent
exec cargo run --quiet --release -p kiln-agent --example bench_stream
