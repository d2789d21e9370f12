#!/usr/bin/env bash
# --fsync always against --fsync never over the wire (issue 16): builds the release binaries,
# then runs bench/fsync.py, which measures both policies in one run, interleaved, and writes
# bench/results/fsync-*.md.
#
#   bench/fsync.sh                 # 3 rounds of 5 s runs, about 6 minutes on 2 cores
#   ROUNDS=1 DURATION=3 bench/fsync.sh
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release -p forkpool-server -p forkpool-bench
exec python3 bench/fsync.py "$@"
