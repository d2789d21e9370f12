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
# The cluster runs as the postgres user when this runs as root (initdb refuses root), listens
# on a Unix socket in a temporary directory, and is removed at the end.
set -euo pipefail
cd "$(dirname "$0")/.."

CLIENTS=${CLIENTS:-"16 64"}
SECONDS_EACH=${SECONDS_EACH:-10}
ACCOUNTS=${ACCOUNTS:-10000}
FSYNC=${FSYNC:-on}
PORT=5432

bin=$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -1)
[ -x "$bin/initdb" ] || { echo "pgbench_transfer.sh: install postgresql" >&2; exit 1; }

cargo build --release -p forkpool-pgledger --example pgbank_transfer
driver=target/release/examples/pgbank_transfer

root=$(mktemp -d /tmp/forkpool-pgbench-XXXXXX)
as_pg=()
if [ "$(id -u)" -eq 0 ]; then
    chown postgres: "$root"
    as_pg=(runuser -u postgres --)
fi
chmod 700 "$root"
cleanup() {
    "${as_pg[@]}" "$bin/pg_ctl" stop -m immediate -D "$root/data" >/dev/null 2>&1 || true
    rm -rf "$root"
}
trap cleanup EXIT

"${as_pg[@]}" "$bin/initdb" -D "$root/data" -U postgres -A trust --no-sync >/dev/null
mkdir -p "$root/sock"
[ "${#as_pg[@]}" -eq 0 ] || chown postgres: "$root/sock"
"${as_pg[@]}" "$bin/pg_ctl" start -D "$root/data" -l "$root/postgres.log" -w -o \
    "-k $root/sock -p $PORT -c listen_addresses='' -c max_connections=200 -c fsync=$FSYNC" >/dev/null

psql=("$bin/psql" -h "$root/sock" -p "$PORT" -U postgres -X -q)
"${psql[@]}" -d postgres -c "CREATE DATABASE bench" >/dev/null
url="postgresql:///bench?host=$root/sock&port=$PORT&user=postgres"
"$driver" --url "$url" --accounts "$ACCOUNTS" --clients 8 --setup

echo "| clients | pgbench TPS | PgBank transfers/s | ratio |"
echo "|---:|---:|---:|---:|"
for c in $CLIENTS; do
    "${psql[@]}" -d bench -c "VACUUM ANALYZE" >/dev/null
    floor=$("$bin/pgbench" -h "$root/sock" -p "$PORT" -U postgres -n -M prepared \
        -c "$c" -j "$c" -T "$SECONDS_EACH" -D accounts="$ACCOUNTS" \
        -f bench/pgbench_transfer.sql bench |
        sed -n 's/^tps = \([0-9.]*\).*/\1/p')
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
