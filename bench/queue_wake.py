#!/usr/bin/env python3
"""Wake-up latency of the queue service: a GET parked on one worker, a PUT sent on a
connection served by another worker, and the time from sending the PUT to reading the JOB
reply on the parked connection. Pairs whose two connections landed on the same worker are
measured too and reported apart (the PUT then serves its own worker's waiter).

Usage: bench/queue_wake.py SERVER_BINARY [ROUNDS]
Starts its own server (2 workers, loopback, a temporary store), prints the percentiles.
"""

import os
import socket
import subprocess
import sys
import tempfile
import time

import proctree


def owner(conn, workers):
    """The worker pid holding the server side of `conn` (from /proc)."""
    server_port = conn.getpeername()[1]
    client_port = conn.getsockname()[1]
    with open("/proc/net/tcp") as f:
        rows = f.read().splitlines()[1:]
    inode = None
    for row in rows:
        fields = row.split()
        local, remote = fields[1], fields[2]
        if int(local.split(":")[1], 16) == server_port and int(remote.split(":")[1], 16) == client_port:
            inode = fields[9]
    target = f"socket:[{inode}]"
    for pid in workers:
        try:
            for fd in os.listdir(f"/proc/{pid}/fd"):
                if os.readlink(f"/proc/{pid}/fd/{fd}") == target:
                    return pid
        except OSError:
            pass
    return None


def line(conn):
    data = b""
    while not data.endswith(b"\n"):
        chunk = conn.recv(4096)
        if not chunk:
            raise RuntimeError("closed")
        data += chunk
    return data


def main():
    binary = sys.argv[1]
    rounds = int(sys.argv[2]) if len(sys.argv) > 2 else 2000
    with tempfile.TemporaryDirectory() as tmp:
        server = subprocess.Popen(
            [binary, "--workers", "2", "--echo-addr", "127.0.0.1:0", "--bank-addr", "127.0.0.1:0",
             "--queue-addr", "127.0.0.1:0", "--ledger", f"{tmp}/l.bin", "--queue-store",
             f"{tmp}/q.bin", "--queue-max-jobs", "4096"],
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        try:
            ready = server.stdout.readline()
            addr = dict(f.split("=", 1) for f in ready.split() if "=" in f)["queue"]
            host, port = addr.rsplit(":", 1)
            workers = proctree.children(server.pid)
            conns = [socket.create_connection((host, int(port))) for _ in range(16)]
            for c in conns:
                c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            by_worker = {}
            for c in conns:
                by_worker.setdefault(owner(c, workers), []).append(c)
            pids = [p for p in by_worker if p is not None]
            if len(pids) < 2:
                sys.exit("all connections landed on one worker; run again")
            getter, other, same = by_worker[pids[0]][0], by_worker[pids[1]][0], by_worker[pids[0]][1]
            results = {"cross-worker": [], "same worker": []}
            for i in range(rounds):
                for kind, putter in (("cross-worker", other), ("same worker", same)):
                    getter.sendall(b"GET wake\n")
                    while True:
                        stats = (putter.sendall(b"STATS wake\n"), line(putter))[1]
                        if b"getters=1" in stats:
                            break
                    start = time.perf_counter_ns()
                    putter.sendall(b"PUT wake 0 x\n")
                    reply = line(getter)
                    elapsed = time.perf_counter_ns() - start
                    line(putter)
                    job_id = reply.split()[1]
                    getter.sendall(b"DONE " + job_id + b"\n")
                    line(getter)
                    results[kind].append(elapsed / 1000)
            for kind, samples in results.items():
                samples.sort()
                pct = lambda p: samples[min(len(samples) - 1, int(len(samples) * p))]
                print(f"{kind}: {len(samples)} wake-ups, PUT sent to JOB read: "
                      f"p50 {pct(0.5):.0f} us, p90 {pct(0.9):.0f} us, p99 {pct(0.99):.0f} us")
        finally:
            server.terminate()
            server.wait(timeout=10)


if __name__ == "__main__":
    main()
