#!/bin/sh
# Upload throughput over loopback: kiln's uploader against OpenSSH's scp and
# sftp with the same cipher (aes128-gcm@openssh.com), taking turns for a few
# rounds; prints the medians. KILN_BENCH_BYTES sets the size (default 2 GiB),
# KILN_BENCH_ROUNDS the rounds (default 3), KILN_BENCH_TOOLS which tools run
# (default kiln,scp,sftp).
set -eu
cd "$(dirname "$0")/.."
exec cargo run --quiet --release -p kiln-e2e --example bench_upload
