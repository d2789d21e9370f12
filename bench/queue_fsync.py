#!/usr/bin/env python3
"""The queue under --fsync always (group commit) against --fsync never, in one run (issue 19).

For each round, for each policy (interleaved): a fresh server (2 workers, data under
target/bench/queue_fsync, the file system of the repository), then 16 producer connections
(each: PUT, wait for OK, repeat) and 16 consumer connections (each: GET with a timeout, DONE,
repeat) on one queue for DURATION seconds. Every job's payload is checked when it comes back
and every DONE answered OK. Reports jobs done per second (median over rounds), and the
always/never ratio. forkpool-bench has no queue workload yet: this client is Python threads
with blocking sockets (one request in flight per connection), so the absolute figures are
the client's as much as the server's; the ratio of the two policies in the same run is the
figure. Writes bench/results/queue-fsync-<date>.md and prints it."""

import os
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SERVER = ROOT / "target/release/forkpool-server"
WORK = ROOT / "target/bench/queue_fsync"
ROUNDS = int(os.environ.get("ROUNDS", "3"))
DURATION = float(os.environ.get("DURATION", "5"))
PRODUCERS = CONSUMERS = int(os.environ.get("CONNECTIONS", "16"))


class Server:
    def __init__(self, policy, data):
        args = [str(SERVER), "--fsync", policy, "--workers", "2",
                "--echo-addr", "127.0.0.1:0", "--bank-addr", "127.0.0.1:0",
                "--queue-addr", "127.0.0.1:0", "--status-addr", "127.0.0.1:0",
                "--ledger", str(data / "ledger.bin"), "--queue-store", str(data / "queue.bin")]
        self.proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                     start_new_session=True, text=True)
        line = self.proc.stdout.readline()
        fields = dict(f.split("=", 1) for f in line.split()[2:])
        host, port = fields["queue"].rsplit(":", 1)
        self.queue = (host, int(port))
        threading.Thread(target=self.proc.stdout.read, daemon=True).start()

    def stop(self):
        os.killpg(self.proc.pid, signal.SIGTERM)
        self.proc.wait(timeout=30)


class Conn:
    def __init__(self, addr):
        self.sock = socket.create_connection(addr)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.file = self.sock.makefile("rb")

    def request(self, line):
        self.sock.sendall(line.encode() + b"\n")
        return self.file.readline().decode().rstrip("\n")


def producer(addr, index, stop, counts, failures):
    conn, n = Conn(addr), 0
    while not stop.is_set():
        reply = conn.request(f"PUT jobs 0 p{index} n{n}")
        if not reply.startswith("OK "):
            failures.append(f"PUT: {reply}")
            return
        n += 1
    counts[index] = n


def consumer(addr, index, stop, counts, failures):
    conn, n = Conn(addr), 0
    while not stop.is_set():
        reply = conn.request("GET jobs 200")
        if reply.startswith("ERR timeout"):
            continue
        parts = reply.split(" ", 3)
        if parts[0] != "JOB" or len(parts) != 4 or not parts[2].startswith("p"):
            failures.append(f"GET: {reply}")
            return
        done = conn.request(f"DONE {parts[1]}")
        if done != "OK":
            failures.append(f"DONE: {done}")
            return
        n += 1
    counts[index] = n


def one_run(policy, round_no):
    data = WORK / f"{policy}-{round_no}"
    data.mkdir(parents=True, exist_ok=True)
    for f in data.iterdir():
        f.unlink()
    server = Server(policy, data)
    stop, failures = threading.Event(), []
    put, done = [0] * PRODUCERS, [0] * CONSUMERS
    threads = [threading.Thread(target=producer, args=(server.queue, i, stop, put, failures))
               for i in range(PRODUCERS)]
    threads += [threading.Thread(target=consumer, args=(server.queue, i, stop, done, failures))
                for i in range(CONSUMERS)]
    for t in threads:
        t.start()
    time.sleep(DURATION)
    stop.set()
    for t in threads:
        t.join()
    server.stop()
    if failures:
        sys.exit(f"{policy}: {failures[0]}")
    return sum(put) / DURATION, sum(done) / DURATION


def main():
    if not SERVER.exists():
        sys.exit(f"{SERVER} is missing: run bench/queue_fsync.sh (it builds it)")
    results = {"never": [], "always": []}
    for r in range(ROUNDS):
        for policy in ("never", "always"):
            put, done = one_run(policy, r)
            results[policy].append((put, done))
            print(f"round {r + 1} {policy}: {put:.0f} PUT/s, {done:.0f} jobs done/s",
                  file=sys.stderr)
    median = {p: statistics.median(d for _, d in runs) for p, runs in results.items()}
    ratio = median["always"] / median["never"]
    stamp = time.strftime("%Y-%m-%d")
    lines = [
        f"# Queue: --fsync always vs never ({stamp})",
        "",
        f"`bench/queue_fsync.sh` (ROUNDS={ROUNDS} DURATION={DURATION:g}): {PRODUCERS} producers "
        f"(PUT) + {CONSUMERS} consumers (GET + DONE), 2 workers, one queue, "
        f"load average {os.getloadavg()[0]:.1f}.",
        "",
        "| policy | jobs done/s per round | median |",
        "| --- | --- | --- |",
    ]
    for policy, runs in results.items():
        per_round = ", ".join(f"{d:.0f}" for _, d in runs)
        lines.append(f"| {policy} | {per_round} | {median[policy]:.0f} |")
    lines += ["", f"always / never: **{ratio:.2f}x**", ""]
    report = "\n".join(lines)
    out = ROOT / "bench/results" / f"queue-fsync-{stamp}.md"
    out.write_text(report)
    print(report)


if __name__ == "__main__":
    main()
