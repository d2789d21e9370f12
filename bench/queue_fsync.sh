#!/usr/bin/env bash
# The queue under --fsync always against --fsync never (issue 19): builds the release server,
# then runs bench/queue_fsync.py, which measures both policies in one run, interleaved
# (16 producers + 16 consumers), and writes bench/results/queue-fsync-*.md.
#
#   bench/queue_fsync.sh                 # 3 rounds of 5 s runs per policy, about 1 minute
#   ROUNDS=1 DURATION=3 bench/queue_fsync.sh
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release -p forkpool-server
exec python3 bench/queue_fsync.py "$@"
