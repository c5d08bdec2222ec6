#!/bin/sh
# Upload throughput over loopback: kiln's uploader against OpenSSH's scp and
# sftp with the same cipher (aes128-gcm@openssh.com), side by side.
# KILN_BENCH_BYTES overrides the size (default 2 GiB).
set -eu
cd "$(dirname "$0")/.."
exec cargo run --quiet --release -p kiln-e2e --example bench_upload
