#!/usr/bin/env python3
"""Lossless replacement: what a hand-over costs and how long a retiring worker lives.

Usage: bench/handover.py [--server target/release/forkpool-server] [--connections 2000]
                         [--rounds 3]

For each kind of replacement (HUP reload, TTOU, max_requests recycling, USR2 upgrade) it starts
the server, opens N idle echo connections that each answered one line (so every one is held
by a worker), triggers the replacement, and measures:
  - the CPU the whole process tree spent on it (master + workers, reaped ones included,
    from /proc schedstat and cutime/cstime), minus the same replacement with no connection
    open, divided by N: the CPU cost of handing one connection over;
  - the time from the signal to the exit of the last retiring worker (from the master's
    "exited after retiring ... ms after it was told" log lines; an upgrade's old workers
    are told when the new master is ready);
  - that every one of the N connections still answers, and how many were closed (must be 0).
The peer is the same replacement with no connection: the ratio printed is cost per
connection in microseconds, both figures from the same run.
"""
import argparse
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

from proctree import cpu_seconds, tree


def start(server, datadir, extra):
    proc = subprocess.Popen(
        [server, "--echo-addr", "127.0.0.1:0", "--bank-addr", "127.0.0.1:0",
         "--ledger", os.path.join(datadir, "ledger.bin")] + extra,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    line = proc.stdout.readline()
    port = int(re.search(r"echo=[^ ]+:(\d+)", line).group(1))
    pid = int(re.search(r"pid=(\d+)", line).group(1))
    log, ready = [], []
    threading.Thread(target=lambda: log.extend(proc.stderr), daemon=True).start()
    threading.Thread(target=lambda: ready.extend(proc.stdout), daemon=True).start()
    return proc, pid, port, log, ready


def retirements(log):
    return [int(m.group(1)) for line in list(log)
            for m in [re.search(r"exited (?:after retiring|during the drain).* (\d+) ms after it", line)]
            if m]


def one_run(args, kind, n):
    with tempfile.TemporaryDirectory() as datadir:
        # Recycling: one worker, retiring at the request after the N connections' first.
        extra = (["--workers", "1", "--max-requests", str(n + 1)] if kind == "recycle"
                 else ["--workers", "2"])
        proc, pid, port, log, ready = start(args.server, datadir, extra)
        try:
            conns = []
            for i in range(n):
                c = socket.create_connection(("127.0.0.1", port))
                c.sendall(f"c{i}\n".encode())
                conns.append(c)
            for i, c in enumerate(conns):
                assert c.recv(64) == f"C{i}\n".encode()
            time.sleep(0.2)
            before = cpu_seconds(pid)
            started = time.monotonic()
            if kind == "hup":
                os.kill(pid, signal.SIGHUP)
            elif kind == "ttou":
                os.kill(pid, signal.SIGTTOU)
            elif kind == "usr2":
                os.kill(pid, signal.SIGUSR2)
            else:
                extra_conn = socket.create_connection(("127.0.0.1", port))
                extra_conn.sendall(b"last\n")
                extra_conn.recv(64)
            # TTOU 2 -> 1 retires the leaving worker and slot 0's (its sockets change).
            want = {"hup": 2, "ttou": 2, "recycle": 1, "usr2": 2}[kind]
            while len(retirements(log)) < want and time.monotonic() - started < 30:
                time.sleep(0.01)
            took = max(retirements(log) or [0])
            time.sleep(0.2)
            root = pid
            if kind == "usr2":
                new = [int(m.group(1)) for line in ready
                       for m in [re.search(r"pid=(\d+)", line)] if m]
                root = new[0] if new else pid
            # The old master of an upgrade exits: its tree's CPU is read before that, and
            # the new master's added.
            spent = cpu_seconds(pid) + (cpu_seconds(root) if root != pid else 0) - before
            closed = 0
            for i, c in enumerate(conns):
                c.settimeout(5)
                try:
                    c.sendall(f"again {i}\n".encode())
                    if c.recv(64) != f"AGAIN {i}\n".encode():
                        closed += 1
                except OSError:
                    closed += 1
            for c in conns:
                c.close()
            if root != pid:
                os.kill(root, signal.SIGQUIT)
            return spent, took, closed
        finally:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--server", default="target/release/forkpool-server")
    parser.add_argument("--connections", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    print(f"{'kind':<8} {'conns':>6} {'cpu ms':>8} {'empty ms':>8} {'us/conn':>8} "
          f"{'exit ms':>8} {'closed':>6}")
    for kind in ["hup", "ttou", "recycle", "usr2"]:
        for _ in range(args.rounds):
            empty, _, _ = one_run(args, kind, 0)
            spent, took, closed = one_run(args, kind, args.connections)
            per = (spent - empty) / args.connections * 1e6
            print(f"{kind:<8} {args.connections:>6} {spent * 1e3:>8.1f} {empty * 1e3:>8.1f} "
                  f"{per:>8.1f} {took:>8} {closed:>6}")
            sys.stdout.flush()


if __name__ == "__main__":
    main()
