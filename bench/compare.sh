#!/usr/bin/env bash
# Peer benchmarks of forkpool's echo (issue 8): builds the release binaries, the tokio baseline
# and the C floor, installs redis if missing, then runs bench/compare.py, which measures every
# server in one run, interleaved and repeated, and writes bench/results/compare-*.{md,json}
# and docs/bench-cpu.svg.
#
#   bench/compare.sh              # full run, about 20 minutes on 2 cores
#   QUICK=1 bench/compare.sh      # a few minutes: one repeat, fewer cases
#   REPEAT=5 DURATION=3 bench/compare.sh
set -euo pipefail
cd "$(dirname "$0")/.."

cargo build --release -p forkpool-server -p forkpool-bench
cargo build --release --manifest-path bench/tokio-echo/Cargo.toml
mkdir -p target/bench
cc -O3 -Wall -Wextra -o target/bench/c-echo bench/c-floor/echo.c

if ! command -v redis-server >/dev/null || ! command -v redis-benchmark >/dev/null; then
    SUDO=""
    [ "$(id -u)" -eq 0 ] || SUDO=sudo
    $SUDO apt-get install -y redis-server redis-tools ||
        { $SUDO apt-get update && $SUDO apt-get install -y redis-server redis-tools; }
fi
for tool in strace ss; do
    command -v "$tool" >/dev/null || echo "compare.sh: $tool missing: that part is skipped" >&2
done

# 10,000 connections on each side of loopback, plus listeners and pipes.
ulimit -n "$(ulimit -Hn)"
if [ "$(ulimit -n)" != unlimited ] && [ "$(ulimit -n)" -lt 20500 ]; then
    echo "compare.sh: open-file limit is $(ulimit -n); the 10,000-connection cases need about 20,500" >&2
fi

exec python3 bench/compare.py "$@"
