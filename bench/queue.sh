#!/usr/bin/env bash
# forkpool's queue service next to beanstalkd and redis (issue 19): the same client,
# `forkpool-bench queue` (one blocking connection per producer and per consumer, every job
# tagged and checked, put == done at the end), drives each server with the same load in
# turn, interleaved over ROUNDS rounds, and prints a Markdown table of the medians: jobs/s,
# put-to-done latency and the server's CPU per job (utime+stime of every process of the
# server's tree from /proc, before and after the window: the client's --server-pid), with
# the ratios forkpool/peer. The table is also written to bench/results/queue-*.md.
#
#   bench/queue.sh                               # 16 producers + 16 consumers, 10 s, 3 rounds
#   PRODUCERS=4 CONSUMERS=4 SECONDS_EACH=3 ROUNDS=1 bench/queue.sh
#   DURABLE=1 bench/queue.sh                     # every server flushes before it answers
#
# The servers, all on loopback ports, without durability to disk (the default):
# - forkpool: 2 workers, every other setting at its default (fsync never: the queue survives
#   any process death, not a power loss), a fresh queue store in a temporary directory;
# - beanstalkd (Debian's): `-l 127.0.0.1 -p PORT`, no binlog (jobs live in memory only);
# - redis-server (Debian's): `--save '' --appendonly no` (no persistence), the reliable-queue
#   pattern (LPUSH, BLMOVE to a processing list, LREM).
# With DURABLE=1, each one's flush-before-reply mode instead: forkpool `--fsync always` (group
# commit), beanstalkd `-b DIR -f 0` (binlog, fsync after every write), redis `--appendonly yes
# --appendfsync always`; all in the same temporary directory's file system.
# Each run uses a queue (tube, key) of its own. The client bounds the jobs put and not yet
# done (--backlog, 256) the same way for every server.
set -euo pipefail
cd "$(dirname "$0")/.."

PRODUCERS=${PRODUCERS:-16}
CONSUMERS=${CONSUMERS:-16}
SECONDS_EACH=${SECONDS_EACH:-10}
ROUNDS=${ROUNDS:-3}
SIZE=${SIZE:-64}
DURABLE=${DURABLE:-}

# The servers and jq, from Debian, if missing (as .ci/run installs its tools).
missing=()
for pkg in beanstalkd redis-server jq; do
    dpkg -s "$pkg" >/dev/null 2>&1 || missing+=("$pkg")
done
if [ "${#missing[@]}" -gt 0 ]; then
    if [ "$(id -u)" -eq 0 ]; then apt_get=(apt-get); else apt_get=(sudo apt-get); fi
    export DEBIAN_FRONTEND=noninteractive
    "${apt_get[@]}" update -qq
    "${apt_get[@]}" install -y -qq --no-install-recommends "${missing[@]}"
fi

cargo build --release -p forkpool-server -p forkpool-bench
server=target/release/forkpool-server
bench=target/release/forkpool-bench

root=$(mktemp -d /tmp/forkpool-queue-XXXXXX)
pids=()
cleanup() {
    for pid in "${pids[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
    wait 2>/dev/null || true
    rm -rf "$root"
}
trap cleanup EXIT

# A port free right now on loopback.
free_port() {
    python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

# wait_port PORT: until something accepts on 127.0.0.1:PORT (at most 10 s).
wait_port() {
    for _ in $(seq 100); do
        if (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; then return 0; fi
        sleep 0.1
    done
    echo "queue.sh: nothing listens on port $1" >&2
    exit 1
}

if [ -n "$DURABLE" ]; then
    durability="durable (each server flushes before it replies)"
    forkpool_durable=(--fsync always)
    beanstalk_durable=(-b "$root/binlog" -f 0)
    redis_durable=(--appendonly yes --appendfsync always --dir "$root")
    mkdir -p "$root/binlog"
else
    durability="not durable"
    forkpool_durable=()
    beanstalk_durable=()
    redis_durable=(--appendonly no)
fi

"$server" --workers 2 --echo-addr 127.0.0.1:0 --bank-addr 127.0.0.1:0 \
    --queue-addr 127.0.0.1:0 --ledger "$root/ledger.bin" --queue-store "$root/queue.bin" \
    "${forkpool_durable[@]}" >"$root/forkpool.out" 2>"$root/forkpool.err" &
pids+=($!)
forkpool_pid=$!
for _ in $(seq 600); do
    if grep -q '^forkpool ready' "$root/forkpool.out"; then break; fi
    sleep 0.1
done
forkpool_addr=$(sed -n 's/^forkpool ready .*queue=\([^ ]*\).*/\1/p' "$root/forkpool.out")
[ -n "$forkpool_addr" ] || { cat "$root/forkpool.err" >&2; exit 1; }

beanstalk_port=$(free_port)
beanstalkd -l 127.0.0.1 -p "$beanstalk_port" "${beanstalk_durable[@]}" &
pids+=($!)
beanstalk_pid=$!
redis_port=$(free_port)
redis-server --bind 127.0.0.1 --port "$redis_port" --save '' "${redis_durable[@]}" \
    --daemonize no --loglevel warning >"$root/redis.log" 2>&1 &
pids+=($!)
redis_pid=$!
wait_port "$beanstalk_port"
wait_port "$redis_port"

# run NAME PROTOCOL ADDR PID ROUND: one measured run; its JSON goes to $root/NAME-ROUND.json.
run() {
    local json="$root/$1-$5.json"
    local code=0
    "$bench" queue --protocol "$2" --addr "$3" --server-pid "$4" \
        --producers "$PRODUCERS" --consumers "$CONSUMERS" --size "$SIZE" \
        -d "$SECONDS_EACH" --warmup 1 --json >"$json" || code=$?
    jq -r --arg n "$1" '"\($n): \(.jobs_per_sec | floor) jobs/s, server \(.server_cpu_us_per_job * 100 | floor / 100) us/job, p99 \(.latency.p99_us | floor) us: \(.verdict)"' "$json" >&2
    if [ "$code" -ne 0 ]; then
        echo "queue.sh: forkpool-bench against $1 exited $code" >&2
        exit 1
    fi
}

echo "load before: $(uptime)" >&2
for round in $(seq "$ROUNDS"); do
    run forkpool forkpool "$forkpool_addr" "$forkpool_pid" "$round"
    run beanstalkd beanstalk "127.0.0.1:$beanstalk_port" "$beanstalk_pid" "$round"
    run redis redis "127.0.0.1:$redis_port" "$redis_pid" "$round"
done
load_after=$(uptime)
echo "load after: $load_after" >&2

# median NAME FIELD: the median over the rounds of a JSON field (a jq path).
median() {
    jq -s "map($2) | sort | .[length / 2 | floor]" "$root/$1"-*.json
}

results="bench/results/queue-$(date +%Y%m%d-%H%M%S).md"
{
    echo "$PRODUCERS producers + $CONSUMERS consumers, $SIZE B payloads, ${SECONDS_EACH} s x $ROUNDS rounds (medians), $durability; load after: ${load_after#*load average: }"
    echo
    echo "| server | jobs/s | server CPU µs/job | p50 µs | p99 µs | forkpool/server jobs/s | forkpool/server CPU per job |"
    echo "|---|---:|---:|---:|---:|---:|---:|"
    f_jobs=$(median forkpool .jobs_per_sec)
    f_cpu=$(median forkpool .server_cpu_us_per_job)
    for name in forkpool beanstalkd redis; do
        jobs=$(median "$name" .jobs_per_sec)
        cpu=$(median "$name" .server_cpu_us_per_job)
        printf "| %s | %.0f | %.1f | %.0f | %.0f | %.2f | %.2f |\n" "$name" "$jobs" "$cpu" \
            "$(median "$name" .latency.p50_us)" "$(median "$name" .latency.p99_us)" \
            "$(awk -v a="$f_jobs" -v b="$jobs" 'BEGIN { print a / b }')" \
            "$(awk -v a="$f_cpu" -v b="$cpu" 'BEGIN { print a / b }')"
    done
} | tee "$results"
