#!/usr/bin/env bash
# forkpool's bank over the wire with its ledger on PostgreSQL (issue 18), next to the floor:
# pgbench running the same transfer transaction (bench/pgbench_transfer.sql) with the same
# client count against the same cluster, one instance (2 workers); and the server's CPU per
# request next to the shared-memory ledger's at the same load. Prints a Markdown table.
# (Two instances on one database are not measured yet: forkpool-bench checks the ledger's
# total during its setup and at the end, and a second bench writing to the same database
# makes that check fail.)
#
#   bench/pg_server.sh                        # 16 and 64 clients, 10 s each, fsync on
#   CLIENTS="16" SECONDS_EACH=5 bench/pg_server.sh
#
# Each forkpool worker gets clients/2 database connections (pgbench has one per
# client). forkpool-bench opens its own accounts (bench-0 ..) and checks every reply; its
# server CPU is the process tree of each instance (--server-pid).
set -euo pipefail
cd "$(dirname "$0")/.."

CLIENTS=${CLIENTS:-"16 64"}
SECONDS_EACH=${SECONDS_EACH:-10}
ACCOUNTS=${ACCOUNTS:-10000}
PORT=5432

bin=$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -1)
[ -x "$bin/initdb" ] || { echo "pg_server.sh: install postgresql" >&2; exit 1; }
command -v jq >/dev/null || { echo "pg_server.sh: install jq" >&2; exit 1; }

cargo build --release -p forkpool-server -p forkpool-bench -p forkpool-pgledger --example pgbank_transfer
server=target/release/forkpool-server
bench=target/release/forkpool-bench
driver=target/release/examples/pgbank_transfer

root=$(mktemp -d /tmp/forkpool-pgserver-XXXXXX)
as_pg=()
if [ "$(id -u)" -eq 0 ]; then
    chown postgres: "$root"
    as_pg=(runuser -u postgres --)
fi
chmod 700 "$root"
pids=()
cleanup() {
    for pid in "${pids[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
    wait 2>/dev/null || true
    "${as_pg[@]}" "$bin/pg_ctl" stop -m immediate -D "$root/data" >/dev/null 2>&1 || true
    rm -rf "$root"
}
trap cleanup EXIT

"${as_pg[@]}" "$bin/initdb" -D "$root/data" -U postgres -A trust --no-sync >/dev/null
mkdir -p "$root/sock"
[ "${#as_pg[@]}" -eq 0 ] || chown postgres: "$root/sock"
"${as_pg[@]}" "$bin/pg_ctl" start -D "$root/data" -l "$root/postgres.log" -w -o \
    "-k $root/sock -p $PORT -c listen_addresses='' -c max_connections=300" >/dev/null
psql=("$bin/psql" -h "$root/sock" -p "$PORT" -U postgres -X -q)
"${psql[@]}" -d postgres -c "CREATE DATABASE floor" -c "CREATE DATABASE wire" >/dev/null
floor_url="postgresql:///floor?host=$root/sock&port=$PORT&user=postgres"
wire_url="postgresql:///wire?host=$root/sock&port=$PORT&user=postgres"
"$driver" --url "$floor_url" --accounts "$ACCOUNTS" --clients 8 --setup

# start_server LEDGER CONNECTIONS: starts an instance; sets PID and ADDR (its bank).
start_server() {
    local out="$root/server-$RANDOM.out"
    "$server" --workers 2 --echo-addr 127.0.0.1:0 --bank-addr 127.0.0.1:0 \
        --ledger "$1" --ledger-connections "$2" >"$out" 2>"$out.err" &
    PID=$!
    pids+=("$PID")
    for _ in $(seq 600); do
        if grep -q '^forkpool ready' "$out"; then break; fi
        sleep 0.1
    done
    ADDR=$(sed -n 's/^forkpool ready .*bank=\([^ ]*\).*/\1/p' "$out")
    [ -n "$ADDR" ] || { cat "$out.err" >&2; exit 1; }
}

# wire CLIENTS PID ADDR [PID ADDR]: transfers/s summed and server CPU µs per transfer over
# the instances, each driven by its share of the clients.
wire() {
    local clients=$1
    shift
    local share=$((clients / ($# / 2)))
    local jsons=() runs=()
    while [ $# -gt 0 ]; do
        local json="$root/bench-$1.json"
        "$bench" bank --addr "$2" -c "$share" -P 1 --mix transfer=100 --accounts "$ACCOUNTS" \
            --prefix "b$1" -d "$SECONDS_EACH" --warmup 1 --server-pid "$1" --json >"$json" &
        runs+=($!)
        jsons+=("$json")
        shift 2
    done
    wait "${runs[@]}"
    jq -s '[(map(.requests_per_sec) | add),
            ((map(.server_cpu_us) | add) / (map(.requests) | add))] | @tsv' -r "${jsons[@]}"
}

echo "| clients | pgbench TPS | forkpool transfers/s | ratio | server CPU µs/transfer, PG ledger | server CPU µs/transfer, shm ledger |"
echo "|---:|---:|---:|---:|---:|---:|"
for c in $CLIENTS; do
    "${psql[@]}" -d floor -c "VACUUM ANALYZE" >/dev/null
    floor=$("$bin/pgbench" -h "$root/sock" -p "$PORT" -U postgres -n -M prepared \
        -c "$c" -j "$c" -T "$SECONDS_EACH" -D accounts="$ACCOUNTS" \
        -f bench/pgbench_transfer.sql floor |
        sed -n 's/^tps = \([0-9.]*\).*/\1/p')
    start_server "$wire_url" $((c / 2))
    read -r one one_cpu < <(wire "$c" "$PID" "$ADDR")
    kill -TERM "$PID"; wait "$PID" || true
    start_server "$root/ledger-$c.bin" 1
    read -r _ shm_cpu < <(wire "$c" "$PID" "$ADDR")
    kill -TERM "$PID"; wait "$PID" || true
    printf "| %s | %.0f | %.0f | %.2f | %.1f | %.1f |\n" "$c" "$floor" \
        "$one" "$(awk -v a="$one" -v b="$floor" 'BEGIN { print a / b }')" "$one_cpu" "$shm_cpu"
done
