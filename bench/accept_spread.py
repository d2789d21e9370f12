#!/usr/bin/env python3
"""Accept distribution: how evenly connections land on workers, and how many worker
wake-ups each accepted connection costs, for --accept reuseport and --accept shared.

Usage: bench/accept_spread.py [--server target/release/forkpool-server] [--workers 4]
                              [--connections 1000] [--rounds 3]

For each mode and round it starts the server on loopback port 0, opens N connections (paced
1 ms apart, so idle workers are asleep when each arrives, then once more as one burst), holds
them, and reads per worker: connections accepted (the server's debug log, tagged with the
worker's pid) and voluntary context switches (/proc/<pid>/status: each is one sleep in
epoll_wait that ended, i.e. one wake-up). Prints max/min spread and wake-ups per connection.
"""
import argparse
import collections
import os
import re
import socket
import subprocess
import sys
import tempfile
import threading
import time

from proctree import children


def start(server, mode, workers, datadir):
    proc = subprocess.Popen(
        [server, "--echo-addr", "127.0.0.1:0", "--bank-addr", "127.0.0.1:0",
         "--workers", str(workers), "--accept", mode,
         "--ledger", os.path.join(datadir, "ledger.bin")],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env=dict(os.environ, RUST_LOG="forkpool_server::worker=debug"),
        start_new_session=True)
    line = proc.stdout.readline()
    port = int(re.search(r"echo=[^ ]+:(\d+)", line).group(1))
    log = []
    threading.Thread(target=lambda: log.extend(proc.stderr), daemon=True).start()
    return proc, port, log


def wakeups(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("voluntary_ctxt_switches"):
                return int(line.split()[1])
    return 0


def measure(server, mode, workers, n, paced):
    with tempfile.TemporaryDirectory() as datadir:
        proc, port, log = start(server, mode, workers, datadir)
        try:
            time.sleep(0.3)  # let the workers settle into epoll_wait (measurement, not a test)
            pids = children(proc.pid)
            before = {p: wakeups(p) for p in pids}
            conns = []
            for _ in range(n):
                conns.append(socket.create_connection(("127.0.0.1", port)))
                if paced:
                    time.sleep(0.001)
            deadline = time.time() + 10
            while time.time() < deadline:
                accepted = collections.Counter(
                    m.group(1) for line in list(log)
                    if "accepted echo connection" in line
                    for m in [re.search(r"pid=(\d+)\]", line)] if m)
                if sum(accepted.values()) >= n:
                    break
                time.sleep(0.05)
            woken = sum(wakeups(p) - before[p] for p in pids)
            counts = [accepted.get(str(p), 0) for p in pids]
            for c in conns:
                c.close()
            return counts, woken / n
        finally:
            os.killpg(proc.pid, 9)
            proc.wait()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--server", default="target/release/forkpool-server")
    ap.add_argument("--workers", type=int, default=4)
    ap.add_argument("--connections", type=int, default=1000)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    print(f"{'mode':10} {'arrival':7} {'per-worker connections':28} {'max/min':>8} {'wake-ups/conn':>14}")
    for rnd in range(args.rounds):
        for mode in ("reuseport", "shared"):
            for paced in (True, False):
                counts, wake = measure(args.server, mode, args.workers, args.connections, paced)
                spread = max(counts) / max(min(counts), 1)
                print(f"{mode:10} {'paced' if paced else 'burst':7} {str(sorted(counts)):28} "
                      f"{spread:8.2f} {wake:14.2f}", flush=True)


if __name__ == "__main__":
    sys.exit(main())
