#!/usr/bin/env bash
# TLS and bank-user costs against a peer under TLS (stunnel in front of the C floor): builds
# the release binaries and the C floor, installs stunnel4 and openssl if missing, then runs
# bench/tls.py (see its docstring). About 4 minutes with the defaults.
#
#   bench/tls.sh                      # 3 interleaved repeats of 5 s
#   bench/tls.sh --repeat 5 --duration 10
set -euo pipefail
cd "$(dirname "$0")/.."

cargo build --release -p forkpool-server -p forkpool-bench
mkdir -p target/bench
cc -O3 -Wall -Wextra -o target/bench/c-echo bench/c-floor/echo.c
missing=()
for pkg in stunnel4 openssl; do
    dpkg -s "$pkg" >/dev/null 2>&1 || missing+=("$pkg")
done
if [ "${#missing[@]}" -gt 0 ]; then
    SUDO=""
    [ "$(id -u)" -eq 0 ] || SUDO=sudo
    $SUDO apt-get install -y "${missing[@]}" ||
        { $SUDO apt-get update && $SUDO apt-get install -y "${missing[@]}"; }
fi
exec python3 bench/tls.py "$@"
