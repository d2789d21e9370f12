# A throwaway PostgreSQL cluster for the bench scripts (sourced, not run): Debian's newest
# /usr/lib/postgresql/<version>/bin, run as the postgres user when the script runs as root
# (initdb and postgres refuse root), listening on a Unix socket in a temporary directory only.
#
#   . bench/pg_cluster.sh
#   pg_cluster_start NAME [postgres -c settings...]   # e.g. max_connections=300 fsync=off
#   "${psql[@]}" -d postgres -c "CREATE DATABASE x"
#   url=$(pg_url x)
#
# Sets `bin` (the server's bin directory), `root` (the temporary directory), `sock` and
# `psql` (an array: psql reaching the cluster); `pg_cluster_stop` (run it from the script's
# EXIT trap) stops the cluster immediately and removes the directory.

PG_PORT=5432
bin=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -1)
[ -n "$bin" ] && [ -x "$bin/initdb" ] || { echo "$0: install postgresql" >&2; exit 1; }
as_pg=()
if [ "$(id -u)" -eq 0 ]; then
    as_pg=(runuser -u postgres --)
fi

pg_cluster_start() {
    local name=$1
    shift
    root=$(mktemp -d "/tmp/forkpool-$name-XXXXXX")
    [ "${#as_pg[@]}" -eq 0 ] || chown postgres: "$root"
    chmod 700 "$root"
    "${as_pg[@]}" "$bin/initdb" -D "$root/data" -U postgres -A trust --no-sync >/dev/null
    sock=$root/sock
    mkdir -p "$sock"
    [ "${#as_pg[@]}" -eq 0 ] || chown postgres: "$sock"
    local options="-k $sock -p $PG_PORT -c listen_addresses=''"
    local setting
    for setting in "$@"; do options+=" -c $setting"; done
    "${as_pg[@]}" "$bin/pg_ctl" start -D "$root/data" -l "$root/postgres.log" -w -o "$options" \
        >/dev/null
    psql=("$bin/psql" -h "$sock" -p "$PG_PORT" -U postgres -X -q)
}

pg_cluster_stop() {
    [ -n "${root:-}" ] || return 0
    "${as_pg[@]}" "$bin/pg_ctl" stop -m immediate -D "$root/data" >/dev/null 2>&1 || true
    rm -rf "$root"
}

# pg_url DATABASE: the URL forkpool's --ledger (and pgbank_transfer's --url) take.
pg_url() {
    echo "postgresql:///$1?host=$sock&port=$PG_PORT&user=postgres"
}

# pgbench_tps DATABASE CLIENTS SECONDS ACCOUNTS: pgbench running bench/pgbench_transfer.sql
# (the bank's transfer, prepared) with one connection per client; prints its TPS.
pgbench_tps() {
    "${psql[@]}" -d "$1" -c "VACUUM ANALYZE" >/dev/null
    "$bin/pgbench" -h "$sock" -p "$PG_PORT" -U postgres -n -M prepared \
        -c "$2" -j "$2" -T "$3" -D accounts="$4" -f bench/pgbench_transfer.sql "$1" |
        sed -n 's/^tps = \([0-9.]*\).*/\1/p'
}
