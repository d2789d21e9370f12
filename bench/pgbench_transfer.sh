#!/usr/bin/env bash
# The PostgreSQL ledger's floor (issue 18): pgbench running the bank's transfer transaction
# (bench/pgbench_transfer.sql: the same statements PgBank sends, prepared) against a throwaway
# cluster, next to PgBank's own transfers through one pool (pgledger/examples/pgbank_transfer.rs)
# at the same client counts, and the ratio, as a Markdown table; then the rate of account
# creation through PgBank (DEPOSITs that each open an account).
#
#   bench/pgbench_transfer.sh                     # 16 and 64 clients, 10 s each
#   CLIENTS="16 64" SECONDS_EACH=20 bench/pgbench_transfer.sh
#   FSYNC=off bench/pgbench_transfer.sh           # take the disk out of the comparison
#
# The cluster (bench/pg_cluster.sh) runs as the postgres user when this runs as root, listens
# on a Unix socket in a temporary directory, and is removed at the end.
set -euo pipefail
cd "$(dirname "$0")/.."

CLIENTS=${CLIENTS:-"16 64"}
SECONDS_EACH=${SECONDS_EACH:-10}
ACCOUNTS=${ACCOUNTS:-10000}
FSYNC=${FSYNC:-on}
. bench/pg_cluster.sh

cargo build --release -p forkpool-pgledger --example pgbank_transfer
driver=target/release/examples/pgbank_transfer

trap pg_cluster_stop EXIT
pg_cluster_start pgbench max_connections=200 "fsync=$FSYNC"
"${psql[@]}" -d postgres -c "CREATE DATABASE bench" >/dev/null
url=$(pg_url bench)
"$driver" --url "$url" --accounts "$ACCOUNTS" --clients 8 --setup

echo "| clients | pgbench TPS | PgBank transfers/s | ratio |"
echo "|---:|---:|---:|---:|"
for c in $CLIENTS; do
    floor=$(pgbench_tps bench "$c" "$SECONDS_EACH" "$ACCOUNTS")
    "${psql[@]}" -d bench -c "VACUUM ANALYZE" >/dev/null
    ours=$("$driver" --url "$url" --accounts "$ACCOUNTS" --clients "$c" --seconds "$SECONDS_EACH" |
        sed -n 's/.* tps=\([0-9]*\).*/\1/p')
    ratio=$(awk -v a="$ours" -v b="$floor" 'BEGIN { printf "%.2f", a / b }')
    printf "| %s | %.0f | %s | %s |\n" "$c" "$floor" "$ours" "$ratio"
done

# Account creation: every one updates the single capacity row, so creations are serialised.
echo
for c in $CLIENTS; do
    "$driver" --url "$url" --accounts "$ACCOUNTS" --clients "$c" --seconds "$SECONDS_EACH" --open
done
