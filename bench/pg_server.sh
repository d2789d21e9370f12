#!/usr/bin/env bash
# forkpool's bank over the wire with its ledger on PostgreSQL (issue 18), next to the floor:
# pgbench running the same transfer transaction (bench/pgbench_transfer.sql) with the same
# client count against the same cluster. For each client count, one row per setup:
#   pgbench               the floor, one database connection per client
#   1 instance            one forkpool (2 workers, clients/2 database connections each)
#   2 instances           two forkpools on the same database (2 workers each, clients/4
#                         connections each), one forkpool-bench spreading its connections
#                         over both (--addr twice)
#   2 behind HAProxy      the same through HAProxy (TCP mode, send-proxy-v2, round robin, as
#                         deploy/haproxy.cfg and tests/tests/haproxy.rs configure it)
#   1 instance, shm       the shared-memory ledger at the same load (CPU comparison)
# with the transfers/s, the ratio to pgbench (and to the direct 2 instances for HAProxy), the
# server's CPU per transfer (every instance's process tree: workers and their database pool
# threads, not PostgreSQL's nor HAProxy's) and whether the final AUDIT was exact.
#
#   bench/pg_server.sh                        # 16 and 64 clients, 10 s each, fsync on
#   CLIENTS="16" SECONDS_EACH=5 bench/pg_server.sh
#
# forkpool-bench opens its own accounts (b<run>-0 ..), checks every reply and the audit.
set -euo pipefail
cd "$(dirname "$0")/.."

CLIENTS=${CLIENTS:-"16 64"}
SECONDS_EACH=${SECONDS_EACH:-10}
ACCOUNTS=${ACCOUNTS:-10000}

command -v jq >/dev/null || { echo "pg_server.sh: install jq" >&2; exit 1; }
command -v haproxy >/dev/null || { echo "pg_server.sh: install haproxy" >&2; exit 1; }
. bench/pg_cluster.sh

cargo build --release -p forkpool-server -p forkpool-bench -p forkpool-pgledger --example pgbank_transfer
server=target/release/forkpool-server
bench=target/release/forkpool-bench
driver=target/release/examples/pgbank_transfer

pids=()
cleanup() {
    for pid in "${pids[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
    wait 2>/dev/null || true
    pg_cluster_stop
}
trap cleanup EXIT

pg_cluster_start pgserver max_connections=300
"${psql[@]}" -d postgres -c "CREATE DATABASE floor" -c "CREATE DATABASE wire" >/dev/null
"$driver" --url "$(pg_url floor)" --accounts "$ACCOUNTS" --clients 8 --setup

# start_server LEDGER CONNECTIONS [ARGS...]: starts an instance; appends its pid to PIDS and
# its bank address to ADDRS.
PIDS=() ADDRS=()
start_server() {
    local out="$root/server-$RANDOM.out"
    "$server" --workers 2 --echo-addr 127.0.0.1:0 --bank-addr 127.0.0.1:0 --queue-addr 127.0.0.1:0 \
        --queue-store "$root/queue-$RANDOM.bin" \
        --ledger "$1" --ledger-connections "$2" "${@:3}" >"$out" 2>"$out.err" &
    local pid=$!
    pids+=("$pid")
    for _ in $(seq 600); do
        if grep -q '^forkpool ready' "$out"; then break; fi
        sleep 0.1
    done
    local addr
    addr=$(sed -n 's/^forkpool ready .*bank=\([^ ]*\).*/\1/p' "$out")
    [ -n "$addr" ] || { cat "$out.err" >&2; exit 1; }
    PIDS+=("$pid")
    ADDRS+=("$addr")
}

stop_servers() {
    kill -TERM "${PIDS[@]}" 2>/dev/null || true
    wait "${PIDS[@]}" || true
    PIDS=() ADDRS=()
}

# wire CLIENTS ADDR... : one forkpool-bench run over the addresses, the CPU of every
# instance in PIDS; prints transfers/s, server CPU µs per transfer, and the audit's verdict.
run=0
wire() {
    local clients=$1
    shift
    run=$((run + 1))
    local args=()
    for addr in "$@"; do args+=(--addr "$addr"); done
    for pid in "${PIDS[@]}"; do args+=(--server-pid "$pid"); done
    "$bench" bank "${args[@]}" -c "$clients" -P 1 --mix transfer=100 --accounts "$ACCOUNTS" \
        --prefix "b$run" -d "$SECONDS_EACH" --warmup 1 --json |
        jq -r '[.requests_per_sec, .server_cpu_us_per_request,
                (if .bank.audit_ok and .bank.difference == 0 then "exact" else "WRONG" end)]
               | @tsv'
}

# haproxy_front BACKEND_ADDR...: starts HAProxy in front of the addresses (send-proxy-v2,
# round robin, PING health checks); sets FRONT to its address.
haproxy_front() {
    local port
    port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
    FRONT=127.0.0.1:$port
    {
        printf 'global\n    maxconn 2000\ndefaults\n    mode tcp\n'
        printf '    timeout connect 2s\n    timeout client 60s\n    timeout server 60s\n'
        printf '    timeout check 2s\n    retries 3\n    option redispatch 1\n'
        printf 'frontend bank\n    bind %s\n    default_backend bank\n' "$FRONT"
        printf 'backend bank\n    balance roundrobin\n    option tcp-check\n'
        printf '    tcp-check send "PING\\n"\n    tcp-check expect string PONG\n'
        printf '    default-server check inter 2s fall 2 rise 1 send-proxy-v2\n'
        local i=0
        for addr in "$@"; do printf '    server fp%d %s\n' $((i += 1)) "$addr"; done
    } >"$root/haproxy.cfg"
    haproxy -db -f "$root/haproxy.cfg" >"$root/haproxy.log" 2>&1 &
    HAPROXY=$!
    pids+=("$HAPROXY")
    for _ in $(seq 100); do
        if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then return; fi
        sleep 0.1
    done
    cat "$root/haproxy.log" >&2
    exit 1
}

row() { # clients setup tps cpu audit floor [direct]
    local vs_floor vs_direct=""
    vs_floor=$(awk -v a="$3" -v b="$6" 'BEGIN { printf "%.2f", a / b }')
    [ -z "${7:-}" ] || vs_direct=$(awk -v a="$3" -v b="$7" 'BEGIN { printf "%.2f", a / b }')
    printf "| %s | %s | %.0f | %s | %s | %s | %s |\n" "$1" "$2" "$3" "$vs_floor" "$vs_direct" \
        "$(printf %.1f "$4")" "$5"
}

echo "load average at the start: $(cut -d' ' -f1-3 /proc/loadavg)"
echo
echo "| clients | setup | transfers/s | / pgbench | / 2 direct | server CPU µs/transfer | audit |"
echo "|---:|---|---:|---:|---:|---:|---|"
for c in $CLIENTS; do
    floor=$(pgbench_tps floor "$c" "$SECONDS_EACH" "$ACCOUNTS")
    printf "| %s | pgbench | %.0f | 1.00 | | | |\n" "$c" "$floor"

    start_server "$(pg_url wire)" $((c / 2))
    read -r tps cpu audit < <(wire "$c" "${ADDRS[@]}")
    row "$c" "1 instance" "$tps" "$cpu" "$audit" "$floor"
    stop_servers

    for _ in 1 2; do start_server "$(pg_url wire)" $((c / 4)); done
    read -r direct cpu audit < <(wire "$c" "${ADDRS[@]}")
    row "$c" "2 instances" "$direct" "$cpu" "$audit" "$floor"
    stop_servers

    for _ in 1 2; do start_server "$(pg_url wire)" $((c / 4)) --proxy-protocol bank; done
    haproxy_front "${ADDRS[@]}"
    read -r tps cpu audit < <(wire "$c" "$FRONT")
    row "$c" "2 behind HAProxy" "$tps" "$cpu" "$audit" "$floor" "$direct"
    kill -TERM "$HAPROXY"
    wait "$HAPROXY" || true
    stop_servers

    start_server "$root/ledger-$c.bin" 1
    read -r tps cpu audit < <(wire "$c" "${ADDRS[@]}")
    row "$c" "1 instance, shm ledger" "$tps" "$cpu" "$audit" "$floor"
    stop_servers
done
echo
echo "load average at the end: $(cut -d' ' -f1-3 /proc/loadavg)"
