#!/usr/bin/env python3
"""TLS and bank users: what they cost, against a peer under TLS in the same run.

Usage: bench/tls.sh  (builds, installs stunnel4 and openssl if missing, then runs this)
       python3 bench/tls.py [--repeat 3] [--duration 5] [--connections 50]

Echo, 16 B and 16 KiB ASCII lines, 50 connections, closed loop, forkpool-bench checking every
reply and measuring each server's CPU (its whole process tree) per request:
  - forkpool plain text and forkpool with TLS (rustls, in its workers' loops);
  - the C floor (bench/c-floor/echo.c, plain text) and the same behind stunnel (OpenSSL),
    the usual way to put TLS in front of a plain server.
Ratios: TLS over plain for each, and forkpool's TLS CPU per request over stunnel + C floor's.

Bank, 50 connections, the default mix: forkpool without users, and with a users file and
every connection authenticated (AUTH once per connection): the CPU per request ratio shows
what access control costs after the handshake (target <= 1.05).

Runs are interleaved (every configuration once per repeat, in turn) so that drift of the
machine hits all alike; medians are reported.
"""
import argparse
import json
import os
import re
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time

SERVER = "target/release/forkpool-server"
BENCH = "target/release/forkpool-bench"
FLOOR = "target/bench/c-echo"


def make_certs(d):
    """A CA and a server certificate for 127.0.0.1 / localhost (EC P-256), with openssl."""
    def run(*args):
        subprocess.run(["openssl", *args], check=True, capture_output=True)
    run("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
        "-keyout", f"{d}/ca.key", "-out", f"{d}/ca.pem", "-days", "2", "-subj", "/CN=bench CA")
    run("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
        "-keyout", f"{d}/server.key", "-out", f"{d}/server.csr", "-subj", "/CN=localhost")
    with open(f"{d}/ext", "w") as f:
        f.write("subjectAltName=DNS:localhost,IP:127.0.0.1\n")
    run("x509", "-req", "-in", f"{d}/server.csr", "-CA", f"{d}/ca.pem", "-CAkey", f"{d}/ca.key",
        "-CAcreateserial", "-out", f"{d}/server.pem", "-days", "2", "-extfile", f"{d}/ext")


class Group:
    """A process tree started in its own session (`self.proc`), killed as a whole."""

    def stop(self):
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait()


class Server(Group):
    """A process tree whose first line names its port(s)."""

    def __init__(self, argv, pattern, cwd):
        self.proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                     text=True, cwd=cwd, start_new_session=True)
        self.line = self.proc.stdout.readline()
        match = re.search(pattern, self.line)
        if not match:
            self.stop()
            sys.exit(f"tls.py: {argv[0]} did not start: {self.line!r}")
        self.port = int(match.group(1))
        self.pid = self.proc.pid

    def port_of(self, service):
        return int(re.search(service + r"=127\.0\.0\.1:(\d+)", self.line).group(1))


def forkpool(d, extra):
    return Server([os.path.abspath(SERVER), "--workers", "2", "--echo-addr", "127.0.0.1:0",
                   "--bank-addr", "127.0.0.1:0", "--ledger", f"{d}/ledger.bin", *extra],
                  r"echo=127\.0\.0\.1:(\d+)", d)


def c_floor(d):
    return Server([os.path.abspath(FLOOR), "127.0.0.1:0", "2"], r":(\d+)", d)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Tunnel(Group):
    """stunnel (TLS, OpenSSL) in front of the C floor, both children of one shell, so that
    --server-pid counts both."""

    def __init__(self, d):
        floor_port, self.port = free_port(), free_port()
        conf = f"{d}/stunnel.conf"
        with open(conf, "w") as f:
            f.write(f"foreground = yes\npid =\n[echo]\naccept = 127.0.0.1:{self.port}\n"
                    f"connect = 127.0.0.1:{floor_port}\ncert = {d}/server.pem\n"
                    f"key = {d}/server.key\n")
        script = (f"{os.path.abspath(FLOOR)} 127.0.0.1:{floor_port} 2 >/dev/null & "
                  f"stunnel4 {conf} 2>/dev/null & wait")
        self.proc = subprocess.Popen(["sh", "-c", script], start_new_session=True)
        self.pid = self.proc.pid
        deadline = time.time() + 10
        for port in (floor_port, self.port):
            while True:
                try:
                    socket.create_connection(("127.0.0.1", port), timeout=1).close()
                    break
                except OSError:
                    if time.time() > deadline:
                        self.stop()
                        sys.exit("tls.py: stunnel or the C floor did not start")
                    time.sleep(0.05)


def bench(args, mode, port, extra, label):
    cmd = [BENCH, mode, "--addr", f"127.0.0.1:{port}", "-c", str(args.connections), "-d",
           str(args.duration), "--warmup", "1", "--json", *extra]
    out = subprocess.run(cmd, capture_output=True, text=True)
    try:
        report = json.loads(out.stdout)
    except json.JSONDecodeError:
        sys.exit(f"tls.py: {label}: {out.stderr.strip()}")
    if report["counters"]["mismatches"] or out.returncode != 0:
        sys.exit(f"tls.py: {label}: exit {out.returncode}: {report['verdict']}")
    return report["requests_per_sec"], report["server_cpu_us_per_request"]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--duration", type=float, default=5)
    parser.add_argument("--connections", type=int, default=50)
    args = parser.parse_args()
    d = tempfile.mkdtemp(prefix="forkpool-tls-bench-")
    make_certs(d)
    tls_client = ["--tls", "--tls-ca", f"{d}/ca.pem", "--tls-server-name", "localhost"]
    results = {}

    def record(key, value):
        results.setdefault(key, []).append(value)

    gen = subprocess.run([SERVER, "gen-token", "bencher", "--rights", "write"],
                         capture_output=True, text=True, check=True).stdout
    token = re.search(r"token: (\S+)", gen).group(1)
    with open(f"{d}/users.toml", "w") as f:
        f.write("\n".join(l for l in gen.splitlines() if not l.startswith(("token:", "#"))))
    for rep in range(args.repeat):
        for size in (16, 16384):
            lines = ["--size", str(size), "--text", "ascii", "--server-pid"]
            for name, extra in (("forkpool plain", []),
                                ("forkpool TLS", ["--echo-tls-cert", f"{d}/server.pem",
                                                  "--echo-tls-key", f"{d}/server.key"])):
                s = forkpool(d, extra)
                try:
                    client = lines + [str(s.pid)] + (tls_client if "TLS" in name else [])
                    record((name, size), bench(args, "echo", s.port, client, name))
                finally:
                    s.stop()
            floor = c_floor(d)
            try:
                record(("C floor plain", size),
                       bench(args, "echo", floor.port, lines + [str(floor.pid)], "C floor"))
            finally:
                floor.stop()
            tunnel = Tunnel(d)
            try:
                record(("stunnel + C floor TLS", size),
                       bench(args, "echo", tunnel.port, lines + [str(tunnel.pid)] + tls_client,
                             "stunnel"))
            finally:
                tunnel.stop()
        for name, extra, client in (
                ("bank, no users", [], []),
                ("bank, users + AUTH", ["--users-file", f"{d}/users.toml"],
                 ["--auth", f"bencher:{token}"])):
            s = forkpool(d, extra)
            try:
                record((name, 0), bench(args, "bank", s.port_of("bank"),
                                        ["--server-pid", str(s.pid)] + client, name))
            finally:
                s.stop()
        print(f"repeat {rep + 1} of {args.repeat} done", file=sys.stderr)
    report(results)


def report(results):
    med = {k: (statistics.median(r for r, _ in v), statistics.median(c for _, c in v))
           for k, v in results.items()}
    print(f"{'server':<24} {'size':>6} {'req/s':>10} {'cpu us/req':>11}")
    for (name, size), (rps, cpu) in sorted(med.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        print(f"{name:<24} {size:>6} {rps:>10.0f} {cpu:>11.2f}")
    print()
    for size in (16, 16384):
        fp, fpt = med[("forkpool plain", size)], med[("forkpool TLS", size)]
        cf, st = med[("C floor plain", size)], med[("stunnel + C floor TLS", size)]
        print(f"{size:>5} B: forkpool TLS/plain CPU {fpt[1] / fp[1]:.2f}x, req/s "
              f"{fpt[0] / fp[0]:.2f}x; stunnel+floor TLS/plain CPU {st[1] / cf[1]:.2f}x; "
              f"forkpool TLS vs stunnel+floor TLS: CPU {fpt[1] / st[1]:.2f}x, req/s "
              f"{fpt[0] / st[0]:.2f}x")
    plain, auth = med[("bank, no users", 0)], med[("bank, users + AUTH", 0)]
    print(f"bank with users + AUTH vs without: CPU per request {auth[1] / plain[1]:.3f}x, "
          f"req/s {auth[0] / plain[0]:.2f}x")


if __name__ == "__main__":
    main()
