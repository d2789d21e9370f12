#!/usr/bin/env bash
# Echo latency on a worker whose bank requests wait on a slow database (issue 18: "a worker's
# event loop never blocks on the database"). One forkpool instance with ONE worker, its
# ledger on PostgreSQL; forkpool-bench echo in open loop (a fixed rate, latency counted from
# when each request was due, so a stalled loop shows) in three cases:
#   idle        nothing else on the server
#   bank load   forkpool-bench bank (transfers) running on the same worker
#   bank stuck  a psql session holds `LOCK TABLE accounts IN ACCESS EXCLUSIVE MODE` and
#               one transfer is sent on each of 8 bank connections: all 8 of the worker's
#               database connections wait on the lock (the script checks it in
#               pg_stat_activity before it measures); after the echo window the lock is
#               released and the 8 replies are read
# Prints a Markdown table: echo p50/p99/max, echo requests/s, and the transfers answered
# (during the echo window for the bank runs; for the stuck ones, how many had an answer
# before the lock went, and how many were OK after).
#
#   bench/pg_slow_query.sh                    # 5 s windows, echo at 2000 req/s
#   SECONDS_EACH=10 RATE=5000 bench/pg_slow_query.sh
set -euo pipefail
cd "$(dirname "$0")/.."

SECONDS_EACH=${SECONDS_EACH:-5}
RATE=${RATE:-2000}
BANK_CLIENTS=8
command -v jq >/dev/null || { echo "pg_slow_query.sh: install jq" >&2; exit 1; }
. bench/pg_cluster.sh

cargo build --release -p forkpool-server -p forkpool-bench
server=target/release/forkpool-server
bench=target/release/forkpool-bench

pids=()
cleanup() {
    for pid in "${pids[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
    wait 2>/dev/null || true
    pg_cluster_stop
}
trap cleanup EXIT

pg_cluster_start pgslow max_connections=100
"${psql[@]}" -d postgres -c "CREATE DATABASE slow" >/dev/null

out=$root/server.out
"$server" --workers 1 --echo-addr 127.0.0.1:0 --bank-addr 127.0.0.1:0 --queue-addr 127.0.0.1:0 \
    --queue-store "$root/queue.bin" \
    --ledger "$(pg_url slow)" --ledger-connections "$BANK_CLIENTS" --ledger-timeout 120 \
    >"$out" 2>"$out.err" &
pids+=($!)
for _ in $(seq 600); do
    if grep -q '^forkpool ready' "$out"; then break; fi
    sleep 0.1
done
echo_addr=$(sed -n 's/^forkpool ready .*echo=\([^ ]*\).*/\1/p' "$out")
bank_addr=$(sed -n 's/^forkpool ready .*bank=\([^ ]*\).*/\1/p' "$out")
[ -n "$bank_addr" ] || { cat "$out.err" >&2; exit 1; }

# poll WHAT SQL: waits (at most 60 s) until SQL, run on the database `slow`, prints `t`.
poll() {
    for _ in $(seq 600); do
        if [ "$("${psql[@]}" -d slow -tA -c "$2")" = t ]; then return; fi
        sleep 0.1
    done
    echo "pg_slow_query.sh: timed out waiting for $1" >&2
    exit 1
}

# bank_load SECONDS: transfers on the worker in the background (the accounts are opened by
# the first run); sets BANK (its pid) and BANK_JSON.
bank_load() {
    BANK_JSON=$root/bank-$RANDOM.json
    "$bench" bank --addr "$bank_addr" -c "$BANK_CLIENTS" --threads 1 --mix transfer=100 \
        --accounts 100 -d "$1" --timeout 120 --json >"$BANK_JSON" &
    BANK=$!
    pids+=("$BANK")
}

# echo_row CASE: measures echo; prints the start of a row (the echo columns).
echo_row() {
    local json=$root/echo-$RANDOM.json
    "$bench" echo --addr "$echo_addr" -c 4 --threads 1 --rate "$RATE" -d "$SECONDS_EACH" \
        --json >"$json"
    jq -j --arg case "$1" \
        '"| \($case) | \(.latency.p50_us | floor) | \(.latency.p99_us | floor) | \(.latency.max_us | floor) | \(.requests_per_sec | floor) | \(.counters.mismatches + .counters.timeouts) |"' \
        "$json"
}

echo "load average at the start: $(cut -d' ' -f1-3 /proc/loadavg)"
echo
echo "| case | echo p50 µs | echo p99 µs | echo max µs | echo req/s | echo wrong or timed out | transfers answered in the window | bank audit |"
echo "|---|---:|---:|---:|---:|---:|---:|---|"
echo_row "idle"
echo " | |"

# The bank run lasts the echo window plus a second on each side.
bank_load $((SECONDS_EACH + 2))
poll "the bank load to start" \
    "SELECT count(*) > 0 FROM pg_stat_activity WHERE datname = 'slow' AND state = 'active' AND application_name LIKE '% worker %'"
echo_row "bank load"
wait "$BANK" || true
jq -r '" \(.requests) | \(if .bank.audit_ok and .bank.difference == 0 then "exact" else "WRONG" end) |"' \
    "$BANK_JSON"

coproc LOCK { "${psql[@]}" -d slow; }
echo "BEGIN; LOCK TABLE accounts IN ACCESS EXCLUSIVE MODE;" >&"${LOCK[1]}"
poll "the lock" \
    "SELECT count(*) = 1 FROM pg_locks WHERE relation = 'accounts'::regclass AND mode = 'AccessExclusiveLock' AND granted"
# One transfer on each of BANK_CLIENTS connections: all of the worker's database connections
# then wait on the lock.
stuck=()
for i in $(seq "$BANK_CLIENTS"); do
    exec {fd}<>"/dev/tcp/${bank_addr%:*}/${bank_addr##*:}"
    printf 'TRANSFER bench-%d bench-0 1\n' "$i" >&"$fd"
    stuck+=("$fd")
done
poll "the worker's transfers to wait on the lock" \
    "SELECT count(*) = $BANK_CLIENTS FROM pg_stat_activity WHERE datname = 'slow' AND wait_event_type = 'Lock' AND application_name LIKE '% worker %'"
row=$(echo_row "bank stuck behind a lock")
early=0
for fd in "${stuck[@]}"; do
    if read -r -t 0 -u "$fd"; then early=$((early + 1)); fi
done
lock_pid=$LOCK_PID
printf 'COMMIT;\n\\q\n' >&"${LOCK[1]}"
wait "$lock_pid" || true
ok=0
for fd in "${stuck[@]}"; do
    read -r -t 60 -u "$fd" reply || reply="(none)"
    case $reply in OK\ *) ok=$((ok + 1)) ;; esac
    exec {fd}>&-
done
echo "$row $early of $BANK_CLIENTS until the lock went, then $ok OK | |"
echo
echo "load average at the end: $(cut -d' ' -f1-3 /proc/loadavg)"
