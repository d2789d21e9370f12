#!/usr/bin/env python3
"""Peer comparison of forkpool's echo: forkpool (default workers, --workers 1, 2), the tokio
baseline, redis-server ECHO and the C floor, measured in one run, servers interleaved, every
case repeated (the median is reported). Run through bench/compare.sh, which builds everything.

Two independent clients:
  * forkpool-bench (checks every reply, reports the server's CPU with --server-pid) drives the
    line servers: forkpool, tokio, C floor;
  * redis-benchmark (`ECHO hello`, or a 16 KiB argument) drives redis-server and, because the
    uppercase echo of a RESP request is a valid RESP reply, the line servers too. Its server CPU
    is read here from /proc/<pid>/task/*/schedstat (nanoseconds) of the whole process tree.

Environment: REPEAT (3), DURATION seconds per run (2), WARMUP (0.5), QUICK=1 (one repeat,
1 s runs, fewer cases), OUT (bench/results), SVG (docs/bench-cpu.svg), SKIP_DIAG=1.
Writes OUT/compare-<time>.json and .md (the tables of docs/BENCHMARKS.md) and the SVG plot;
`compare.py --replot OUT/compare-<time>.json` redraws the plot from a results file.
"""
import json
import os
import platform
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time

from proctree import cpu_ns, tree


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUICK = os.environ.get("QUICK") == "1"
REPEAT = int(os.environ.get("REPEAT", "1" if QUICK else "3"))
DURATION = float(os.environ.get("DURATION", "1" if QUICK else "2"))
WARMUP = float(os.environ.get("WARMUP", "0.3" if QUICK else "0.5"))
OUT = os.environ.get("OUT", os.path.join(ROOT, "bench", "results"))
SVG = os.environ.get("SVG", os.path.join(ROOT, "docs", "bench-cpu.svg"))
CPUS = os.cpu_count() or 1

FP_SERVER = os.path.join(ROOT, "target/release/forkpool-server")
FP_BENCH = os.path.join(ROOT, "target/release/forkpool-bench")
TOKIO = os.path.join(ROOT, "bench/tokio-echo/target/release/tokio-echo")
C_FLOOR = os.path.join(ROOT, "target/bench/c-echo")

KIB = 1024

# (connections, pipeline, size[, text[, rate]]) driven by forkpool-bench: text is "mixed" (one
# character in eight multi-byte UTF-8, the default) or "ascii" (what the ASCII-only C floor
# answers right: the like-for-like case), rate an open-loop request rate (latency measured
# from when each request was due), None for the closed loop. Skipped, and why (also in the
# .md): 1,000 x 16 x 16 KiB keeps 256 MiB in flight and measures socket buffers, not the
# server; 10,000 connections run only 16 B x pipeline 1 (their cost is the connection count,
# and each 10,000-connection run spends seconds connecting).
LINE_CASES = [
    (1, 1, 16), (1, 16, 16), (1, 1, 16 * KIB), (1, 16, 16 * KIB),
    (50, 1, 16), (50, 16, 16), (50, 1, 16 * KIB), (50, 16, 16 * KIB),
    (50, 1, 16 * KIB, "ascii"), (50, 16, 16 * KIB, "ascii"),
    (1000, 1, 16), (1000, 16, 16), (1000, 1, 16 * KIB), (1000, 1, 16 * KIB, "ascii"),
    (10000, 1, 16),
    # Latency below saturation: every server has CPU to spare, so p99 is the server's own.
    (50, 1, 16, "mixed", 50000), (50, 1, 16, "mixed", 100000),
]
# redis-benchmark cases (it has no duration: -n is sized from the previous repeat's rate).
RESP_CASES = [
    (1, 1, 16), (50, 1, 16), (50, 16, 16), (1000, 1, 16), (1000, 16, 16),
    (50, 1, 16 * KIB), (10000, 1, 16),
]
# Servers under redis-benchmark. forkpool-w1 too: with one worker, like redis, forkpool leaves
# redis-benchmark's single thread a core of its own.
RESP_NAMES = ["redis", "forkpool", "forkpool-w1", "tokio", "c-floor"]
if QUICK:
    LINE_CASES = [(1, 1, 16), (50, 1, 16), (50, 16, 16), (50, 1, 16 * KIB), (50, 1, 16 * KIB, "ascii"),
                  (1000, 1, 16), (50, 1, 16, "mixed", 50000)]
    RESP_CASES = [(50, 1, 16), (50, 16, 16)]

SKIPPED = [
    "forkpool-bench: 1,000 connections x pipeline 16 x 16 KiB (256 MiB in flight: measures "
    "socket buffers, not the server)",
    "forkpool-bench: 10,000 connections with pipeline 16 or 16 KiB (the 10,000 case is about "
    "the connection count; each run spends seconds connecting)",
    "redis-benchmark: pipeline 16 with 16 KiB, and 1 connection x pipeline 16 (covered by "
    "forkpool-bench; redis-benchmark's single client thread is the bottleneck there)",
    "redis under forkpool-bench: it speaks RESP, not lines; redis ratios use redis-benchmark",
]


def log(*args):
    print(*args, file=sys.stderr, flush=True)


# ---------------------------------------------------------------- processes and /proc

def rss_kib(pid):
    total = 0
    for p in tree(pid):
        try:
            with open(f"/proc/{p}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1])
        except OSError:
            pass
    return total


class Server:
    """A server under test: started in its own session, its port read from its first line."""

    def __init__(self, name, argv, port_re, resp_ok=True, line_ok=True, env=None):
        self.name, self.argv, self.port_re = name, argv, port_re
        self.resp_ok, self.line_ok, self.env = resp_ok, line_ok, env
        self.proc = None
        self.port = None

    def start(self):
        self.proc = subprocess.Popen(
            self.argv, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
            start_new_session=True, env=dict(os.environ, **(self.env or {})))
        if self.port_re is None:  # redis: fixed port given in argv, poll it
            self.port = int(self.argv[self.argv.index("--port") + 1])
            deadline = time.time() + 10
            while time.time() < deadline:
                try:
                    socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                    break
                except OSError:
                    time.sleep(0.05)
        else:
            line = self.proc.stdout.readline()
            m = re.search(self.port_re, line)
            if not m:
                raise RuntimeError(f"{self.name}: no address in {line!r}")
            self.port = int(m.group(1))
            self.first_line = line
        # Drain stdout so a chatty server never blocks.
        subprocess.Popen(["cat"], stdin=self.proc.stdout, stdout=subprocess.DEVNULL)
        time.sleep(0.3)
        return self

    @property
    def pid(self):
        return self.proc.pid

    def stop(self):
        if self.proc and self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.proc.wait()


def servers(datadir):
    fp = lambda name, extra, tag: Server(  # noqa: E731
        name, [FP_SERVER, "--echo-addr", "127.0.0.1:0", "--bank-addr", "127.0.0.1:0",
               "--ledger", os.path.join(datadir, f"ledger-{tag}.bin")] + extra,
        r"echo=[^ ]+:(\d+)", env={"RUST_LOG": "warn"})
    out = {"forkpool": fp("forkpool", [], "default"), "forkpool-w1": fp("forkpool-w1", ["--workers", "1"], "w1")}
    if CPUS != 2:  # the default already is 2 workers on a 2-CPU machine
        out["forkpool-w2"] = fp("forkpool-w2", ["--workers", "2"], "w2")
    out["tokio"] = Server("tokio", [TOKIO, "127.0.0.1:0"], r"listening on [^ ]+:(\d+)")
    out["c-floor"] = Server("c-floor", [C_FLOOR, "127.0.0.1:0", str(CPUS)], r"listening on [^ ]+:(\d+)")
    out["redis"] = Server("redis", ["redis-server", "--port", str(free_port()), "--bind", "127.0.0.1",
                                    "--save", "", "--appendonly", "no", "--maxclients", "20000",
                                    "--protected-mode", "no", "--logfile", ""],
                          None, line_ok=False)
    return out


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


# ---------------------------------------------------------------- the two clients

def run_fpbench(server, mode, c, p, size, text="mixed", rate=None, extra=()):
    cmd = [FP_BENCH, mode, "--addr", f"127.0.0.1:{server.port}", "-c", str(c), "-P", str(p),
           "-d", str(DURATION), "--warmup", str(WARMUP), "--server-pid", str(server.pid), "--json"]
    if mode == "echo":
        cmd += ["--size", str(size), "--text", text]
    if rate is not None:
        cmd += ["--rate", str(rate)]
    if c >= 1000:
        cmd += ["--timeout", "10"]
    cmd += list(extra)
    return fpbench_summary(cmd, server.name)


def fpbench_summary(cmd, label):
    """Runs a forkpool-bench --json command; its figures, or None if it printed no report."""
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=DURATION + WARMUP + 120)
    try:
        j = json.loads(r.stdout)
    except ValueError:
        log(f"  {label}: forkpool-bench failed ({r.returncode}): {r.stderr.strip()[:300]}")
        return None
    return {
        "rps": j["requests_per_sec"], "p50_us": j["latency"]["p50_us"], "p99_us": j["latency"]["p99_us"],
        "cpu_us": j["server_cpu_us_per_request"], "mismatches": j["counters"]["mismatches"],
        "errors": sum(j["counters"][k] for k in ("connect_errors", "resets", "closed", "timeouts")),
        "exit": r.returncode, "requests": j["requests"], "counters": j["counters"],
    }


_resp_rate = {}


def run_redis_benchmark(server, c, p, size):
    arg = "hello" if size <= 16 else "x" * size
    key = (c, p, size)
    n = int(max(_resp_rate.get(key, 20000 if p == 1 else 200000) * (DURATION + WARMUP), c * 4, 2000))
    n -= n % max(c, 1)
    cmd = ["redis-benchmark", "-h", "127.0.0.1", "-p", str(server.port), "-c", str(c), "-P", str(p),
           "-n", str(n), "--csv", "ECHO", arg]
    before, t0 = cpu_ns(server.pid), time.time()
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    elapsed, used = time.time() - t0, cpu_ns(server.pid) - before
    rows = [l for l in r.stdout.splitlines() if l.startswith('"ECHO')]
    if r.returncode != 0 or not rows:
        log(f"  {server.name}: redis-benchmark failed ({r.returncode}): {(r.stderr or r.stdout).strip()[:300]}")
        return None
    f = [x.strip('"') for x in rows[-1].split('","')]
    rps = float(f[1])
    _resp_rate[key] = max(_resp_rate.get(key, 0), rps)
    # CSV: test, rps, avg, min, p50, p95, p99, max (ms). Server CPU covers the connects too:
    # redis-benchmark opens its connections inside the timed call.
    return {"rps": rps, "p50_us": float(f[4]) * 1000, "p99_us": float(f[6]) * 1000,
            "cpu_us": used / 1000 / n, "requests": n, "elapsed": elapsed, "mismatches": 0,
            "errors": 0, "exit": 0}


# ---------------------------------------------------------------- idle connections

def hold_idle(server, n, resp):
    """Server RSS with 0 and n idle connections (just connected, then after one request each),
    and the latency of a fresh client's request while they are held."""
    req, reply = (b"PING\r\n", b"+PONG\r\n") if resp else (b"hello\n", b"HELLO\n")
    time.sleep(0.5)
    base = rss_kib(server.pid)
    conns = []
    for _ in range(n):
        s = socket.socket()
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        s.connect(("127.0.0.1", server.port))
        conns.append(s)
    time.sleep(1.0)
    connected = rss_kib(server.pid)
    for s in conns:  # one request each: the buffers a served connection keeps
        s.sendall(req)
    for s in conns:
        got = b""
        while len(got) < len(reply):
            got += s.recv(64)
    time.sleep(1.0)
    served = rss_kib(server.pid)
    lat = []
    for _ in range(100):
        t0 = time.perf_counter()
        f = socket.create_connection(("127.0.0.1", server.port))
        f.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        f.sendall(req)
        got = b""
        while len(got) < len(reply):
            got += f.recv(64)
        lat.append((time.perf_counter() - t0) * 1e6)
        f.close()
    for s in conns:
        s.close()
    return {"rss0_kib": base, "rss_connected_kib": connected, "rss_served_kib": served,
            "kib_per_conn_connected": (connected - base) / n, "kib_per_conn_served": (served - base) / n,
            "fresh_p50_us": statistics.median(lat), "fresh_p99_us": sorted(lat)[98], "fresh_max_us": max(lat)}


# ---------------------------------------------------------------- diagnosis

def strace_counts(server, pids, c, p, size, requests):
    """Syscalls per request of `pids` (strace -c -f) during a fixed forkpool-bench run."""
    out = tempfile.mktemp(prefix="strace-")
    st = subprocess.Popen(["strace", "-c", "-f", "-o", out] + sum((["-p", str(x)] for x in pids), []),
                          stderr=subprocess.DEVNULL)
    time.sleep(1.0)
    r = subprocess.run([FP_BENCH, "echo", "--addr", f"127.0.0.1:{server.port}", "-c", str(c), "-P", str(p),
                        "--size", str(size), "-n", str(requests), "--json"], capture_output=True, text=True)
    done = json.loads(r.stdout)["counters"]["replies"]
    time.sleep(0.3)
    st.send_signal(signal.SIGINT)
    st.wait()
    calls = {}
    with open(out) as f:
        for line in f:
            parts = line.split()
            if len(parts) >= 5 and parts[0][0].isdigit() and parts[-1] not in ("total",):
                # % time, seconds, usecs/call, calls, [errors], syscall
                calls[parts[-1]] = int(parts[3])
    os.unlink(out)
    return {k: v / done for k, v in sorted(calls.items(), key=lambda kv: -kv[1])}, done


def perf_stat(server, c, p, size):
    """Software counters of the server tree (perf stat -p) during a forkpool-bench run."""
    if not shutil.which("perf"):
        return None
    pids = ",".join(str(x) for x in tree(server.pid))
    pf = subprocess.Popen(["perf", "stat", "-x", ",", "-e",
                           "task-clock,context-switches,cpu-migrations,page-faults", "-p", pids],
                          stderr=subprocess.PIPE, text=True)
    time.sleep(0.5)
    r = subprocess.run([FP_BENCH, "echo", "--addr", f"127.0.0.1:{server.port}", "-c", str(c), "-P", str(p),
                        "--size", str(size), "-d", str(DURATION), "--json"], capture_output=True, text=True)
    done = json.loads(r.stdout)["counters"]["replies"]
    pf.send_signal(signal.SIGINT)
    _, err = pf.communicate()
    res = {}
    for line in err.splitlines():
        f = line.split(",")
        if len(f) > 3 and f[0].replace(".", "").isdigit():
            # task-clock is in ms: report µs of CPU per request; the rest are counts per request.
            name, value = f[2], float(f[0]) / done
            res["task-clock µs" if name == "task-clock" else name] = value * 1000 if name == "task-clock" else value
    return res or None


# ---------------------------------------------------------------- report

def med(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def fmt_case(c, p, size, text="mixed", rate=None):
    out = f"{c:,} c x P{p} x {'16 KiB' if size == 16 * KIB else f'{size} B'}"
    if text == "ascii":
        out += " ASCII"
    if rate is not None:
        out += f" at {rate // 1000:,}k req/s"
    return out


def fmt(x, digits=2):
    if x is None:
        return "-"
    if abs(x) >= 1000:
        return f"{x:,.0f}"
    return f"{x:.{digits}f}"


def summarise(samples):
    keys = ("rps", "p50_us", "p99_us", "cpu_us")
    return {k: med([s[k] for s in samples if s]) for k in keys} | {
        "runs": len([s for s in samples if s]),
        "mismatches": sum(s["mismatches"] for s in samples if s),
        "errors": sum(s["errors"] for s in samples if s)}


def table(title, cases, names, results, peers):
    lines = [f"### {title}", "",
             "| case | server | req/s | p50 µs | p99 µs | server CPU µs/req | "
             + " | ".join(f"{what} fp/{p}" for what in ("CPU", "req/s", "p99") for p in peers) + " |",
             "|---|---|---:|---:|---:|---:|" + "---:|" * (3 * len(peers))]
    for case in cases:
        fp = results.get((case, "forkpool"))
        for name in names:
            r = results.get((case, name))
            if not r:
                continue
            ratios = {"cpu_us": [], "rps": [], "p99_us": []}
            for p in peers:
                q = results.get((case, p))
                for key, column in ratios.items():
                    ok = name == "forkpool" and q and fp and q[key] and fp[key]
                    column.append(fmt(fp[key] / q[key]) if ok else "")
            note = " (ASCII only: multi-byte lines answered wrong)" if name == "c-floor" and r["mismatches"] else ""
            err = f" ({r['errors']} net errors)" if r["errors"] else ""
            lines.append(f"| {fmt_case(*case)} | {name}{note}{err} | {fmt(r['rps'])} | {fmt(r['p50_us'], 1)} | "
                         f"{fmt(r['p99_us'], 1)} | {fmt(r['cpu_us'])} | "
                         + " | ".join(" | ".join(column) for column in ratios.values()) + " |")
    return "\n".join(lines) + "\n"


def svg_plot(sections, path, title):
    """Grouped horizontal bars on a log scale: server CPU µs per request, one group per case,
    one bar per server. `sections` is a list of (client label, cases, server names, results)."""
    import math
    colours = {"forkpool": "#1f77b4", "forkpool-w1": "#7fb2e0", "forkpool-w2": "#aec7e8", "tokio": "#ff7f0e",
               "redis": "#d62728", "c-floor": "#2ca02c"}
    bar_h, gap, left, width, lo = 9, 12, 230, 520, 0.1
    values = [r["cpu_us"] for _, cases, names, res in sections for c in cases for n in names
              for r in [res.get((c, n))] if r and r["cpu_us"]]
    hi = 10 ** math.ceil(math.log10(max(values, default=1)))
    scale = lambda v: math.log10(max(v, lo) / lo) / math.log10(hi / lo) * width  # noqa: E731
    rows = sum(len([1 for n in names if res.get((c, n))]) * bar_h + gap
               for _, cases, names, res in sections for c in cases)
    legend = sorted({n for _, _, names, _ in sections for n in names}, key=list(colours).index)
    height = 70 + rows + 30 * len(sections) + 20 * len(legend)
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{left + width + 60}" height="{height}" '
           f'font-family="sans-serif" font-size="11">',
           f'<rect width="100%" height="100%" fill="white"/>',
           f'<text x="10" y="20" font-size="14" font-weight="bold">{title}</text>']
    y = 50
    decades = [lo * 10 ** i for i in range(int(round(math.log10(hi / lo))) + 1)]
    for d in decades:
        x = left + scale(d)
        out.append(f'<line x1="{x:.1f}" y1="40" x2="{x:.1f}" y2="{height - 20 * len(legend) - 10}" stroke="#ddd"/>')
        out.append(f'<text x="{x:.1f}" y="36" font-size="9" text-anchor="middle">{d:g} µs</text>')
    for client, cases, names, res in sections:
        out.append(f'<text x="10" y="{y + 12}" font-weight="bold">{client}</text>')
        y += 24
        for case in cases:
            rs = [(n, res.get((case, n))) for n in names if res.get((case, n))]
            out.append(f'<text x="{left - 8}" y="{y + len(rs) * bar_h / 2 + 4}" text-anchor="end">{fmt_case(*case)}</text>')
            for n, r in rs:
                w = scale(r["cpu_us"] or lo)
                out.append(f'<rect x="{left}" y="{y}" width="{w:.1f}" height="{bar_h - 1}" fill="{colours.get(n, "#888")}"/>')
                out.append(f'<text x="{left + w + 4:.1f}" y="{y + bar_h - 1}" font-size="9">{fmt(r["cpu_us"])}</text>')
                y += bar_h
            y += gap
    for i, n in enumerate(legend):
        out.append(f'<rect x="{left}" y="{y + 20 * i}" width="12" height="12" fill="{colours.get(n, "#888")}"/>')
        out.append(f'<text x="{left + 18}" y="{y + 20 * i + 10}">{n}</text>')
    out.append("</svg>")
    with open(path, "w") as f:
        f.write("\n".join(out) + "\n")


def plot_from(line, resp, line_names, path):
    svg_plot([("forkpool-bench (every reply checked)", LINE_CASES, line_names, line),
              ("redis-benchmark (ECHO)", RESP_CASES, RESP_NAMES, resp)],
             path, f"Server CPU µs per request (log scale), median of {REPEAT}")


def replot(json_path):
    """Redraws the SVG from a results file: compare.py --replot bench/results/compare-X.json"""
    j = json.load(open(json_path))
    parse = lambda d: {(eval(k.split("|")[0]), k.split("|")[1]): v for k, v in d.items()}  # noqa: E731
    line, resp = parse(j["line"]), parse(j["resp"])
    names = [n for n in ["forkpool", "forkpool-w1", "forkpool-w2", "tokio", "c-floor"] if any(k[1] == n for k in line)]
    plot_from(line, resp, names, SVG)


# ---------------------------------------------------------------- main

def main():
    os.makedirs(OUT, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    datadir = tempfile.mkdtemp(prefix="forkpool-compare-")
    all_servers = servers(datadir)
    line_names = [n for n, s in all_servers.items() if s.line_ok]
    raw = {"line": {}, "resp": {}, "bank": []}
    t_start = time.time()
    try:
        for s in all_servers.values():
            s.start()
            log(f"started {s.name} pid {s.pid} port {s.port}")
        for rep in range(REPEAT):
            log(f"--- repeat {rep + 1}/{REPEAT} ({time.time() - t_start:.0f} s)")
            for case in LINE_CASES:
                order = line_names[rep % len(line_names):] + line_names[:rep % len(line_names)]
                for name in order:
                    r = run_fpbench(all_servers[name], "echo", *case)
                    raw["line"].setdefault(f"{case}|{name}", []).append(r)
                    if r:
                        log(f"  {fmt_case(*case):24} {name:12} {r['rps']:>10,.0f} req/s  p99 {r['p99_us']:>8.0f} µs"
                            f"  cpu {r['cpu_us']:.2f} µs/req")
                if case == (50, 1, 16):  # bank TRANSFER right next to the echo case it is compared with
                    fp = all_servers["forkpool"]
                    fp_bank_port = bank_port(fp)
                    b = run_bank(fp, fp_bank_port)
                    raw["bank"].append(b)
                    if b:
                        log(f"  bank transfer=100 50 c x P1   forkpool {b['rps']:>10,.0f} req/s  cpu {b['cpu_us']:.2f} µs/req")
            for case in RESP_CASES:
                order = RESP_NAMES[rep % len(RESP_NAMES):] + RESP_NAMES[:rep % len(RESP_NAMES)]
                for name in order:
                    r = run_redis_benchmark(all_servers[name], *case)
                    raw["resp"].setdefault(f"{case}|{name}", []).append(r)
                    if r:
                        log(f"  redis-benchmark {fmt_case(*case):24} {name:10} {r['rps']:>10,.0f} req/s  "
                            f"p99 {r['p99_us']:>8.0f} µs  cpu {r['cpu_us']:.2f} µs/req")
    finally:
        for s in all_servers.values():
            s.stop()

    # Idle connections: fresh servers, one at a time.
    idle = {}
    n_idle = 1000 if QUICK else 10000
    for name in ["forkpool", "tokio", "redis", "c-floor"]:
        s = servers(datadir)[name]
        try:
            s.start()
            idle[name] = hold_idle(s, n_idle, resp=name == "redis")
            log(f"idle {name}: {idle[name]}")
        except Exception as e:  # noqa: BLE001 - report and carry on with the other servers
            log(f"idle {name}: failed: {e}")
        finally:
            s.stop()

    spread = subprocess.run([sys.executable, os.path.join(ROOT, "bench/accept_spread.py"), "--server", FP_SERVER,
                             "--rounds", "1", "--connections", "1000"], capture_output=True, text=True, cwd=ROOT)
    log(spread.stdout)

    diag = {}
    if os.environ.get("SKIP_DIAG") != "1":
        diag = diagnose(datadir)

    line = {}
    for key, samples in raw["line"].items():
        case, name = key.split("|")
        line[(eval(case), name)] = summarise(samples)
    resp = {}
    for key, samples in raw["resp"].items():
        case, name = key.split("|")
        resp[(eval(case), name)] = summarise(samples)
    bank = summarise(raw["bank"])
    result = {"when": stamp, "machine": machine(), "repeat": REPEAT, "duration_s": DURATION, "warmup_s": WARMUP,
              "line": {f"{k[0]}|{k[1]}": v for k, v in line.items()}, "resp": {f"{k[0]}|{k[1]}": v for k, v in resp.items()},
              "bank_transfer": bank, "idle": idle, "idle_connections": n_idle, "spread": spread.stdout,
              "diag": diag, "raw": raw, "elapsed_s": time.time() - t_start}
    with open(os.path.join(OUT, f"compare-{stamp}.json"), "w") as f:
        json.dump(result, f, indent=1, default=str)

    md = report(line, resp, bank, idle, n_idle, spread.stdout, diag, line_names, result)
    with open(os.path.join(OUT, f"compare-{stamp}.md"), "w") as f:
        f.write(md)
    plot_from(line, resp, line_names, SVG)
    print(md)
    log(f"wrote {OUT}/compare-{stamp}.md, .json and {SVG} in {time.time() - t_start:.0f} s")


def bank_port(fp):
    m = re.search(r"bank=[^ ]+:(\d+)", fp.first_line)
    return int(m.group(1)) if m else None


def run_bank(fp, port):
    if port is None:
        return None
    cmd = [FP_BENCH, "bank", "--addr", f"127.0.0.1:{port}", "-c", "50", "-P", "1", "--mix", "transfer=100",
           "-d", str(DURATION), "--warmup", str(WARMUP), "--server-pid", str(fp.pid), "--json"]
    return fpbench_summary(cmd, "bank")


def diagnose(datadir):
    """strace -c per request on one worker of forkpool --workers 1, the C floor and tokio."""
    if not shutil.which("strace"):
        return {}
    diag = {}
    plan = [("forkpool-w1", lambda s: [p for p in tree(s.pid) if p != s.pid]),
            ("c-floor", lambda s: [p for p in tree(s.pid) if p != s.pid]),
            ("tokio", lambda s: [int(t) for t in os.listdir(f"/proc/{s.pid}/task")])]
    for name, pids_of in plan:
        srv = servers(datadir)[name]
        if name == "c-floor":
            srv.argv[-1] = "1"
        try:
            srv.start()
            for case in [(50, 1, 16), (50, 16, 16), (50, 1, 16 * KIB)]:
                n = 20000 if case[2] == 16 else 5000
                calls, done = strace_counts(srv, pids_of(srv), *case, n)
                diag[f"{name}|{case}"] = {"per_request": calls, "replies": done}
                log(f"strace {name} {fmt_case(*case)}: " + ", ".join(f"{k} {v:.2f}" for k, v in list(calls.items())[:8]))
            ps = perf_stat(srv, 50, 1, 16)
            if ps:
                diag[f"{name}|perf"] = ps
                log(f"perf {name}: {ps}")
        except Exception as e:  # noqa: BLE001
            log(f"diagnose {name}: {e}")
        finally:
            srv.stop()
    return diag


def machine():
    model = ""
    try:
        with open("/proc/cpuinfo") as f:
            model = next((l.split(":", 1)[1].strip() for l in f if l.startswith("model name")), "")
    except OSError:
        pass
    return {"cpus": CPUS, "model": model, "kernel": platform.release(),
            "mem_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
            "redis": subprocess.run(["redis-server", "--version"], capture_output=True, text=True).stdout.strip(),
            "cc": subprocess.run(["cc", "--version"], capture_output=True, text=True).stdout.splitlines()[0],
            "rustc": subprocess.run(["rustc", "--version"], capture_output=True, text=True).stdout.strip()}


def report(line, resp, bank, idle, n_idle, spread, diag, line_names, result):
    m = result["machine"]
    md = [f"## Results of `bench/compare.sh` ({result['when']})", "",
          f"Machine: {m['cpus']} CPUs ({m['model']}), {m['mem_gib']} GiB, Linux {m['kernel']}; {m['rustc']}; "
          f"{m['cc']}; {m['redis']}. Each figure is the median of {REPEAT} runs of {DURATION:g} s "
          f"(after {WARMUP:g} s warm-up), servers interleaved; the whole run took {result['elapsed_s'] / 60:.1f} min.",
          ""]
    md.append(table("forkpool-bench as the client (every reply checked)", LINE_CASES, line_names, line,
                    ["c-floor", "tokio"]))
    md.append(table("redis-benchmark as the client (`ECHO hello`, or a 16 KiB argument)", RESP_CASES,
                    RESP_NAMES, resp, ["c-floor", "tokio", "redis"]))
    echo = line.get(((50, 1, 16), "forkpool"))
    md += ["### Bank TRANSFER over the wire vs echo (forkpool, 50 connections, pipeline 1)", "",
           "| workload | req/s | p99 µs | server CPU µs/req |", "|---|---:|---:|---:|"]
    if echo:
        md.append(f"| echo 16 B | {fmt(echo['rps'])} | {fmt(echo['p99_us'], 1)} | {fmt(echo['cpu_us'])} |")
    md.append(f"| bank `--mix transfer=100` | {fmt(bank['rps'])} | {fmt(bank['p99_us'], 1)} | {fmt(bank['cpu_us'])} |")
    if echo and bank["cpu_us"]:
        md.append(f"\nTRANSFER / echo server CPU per request: **{bank['cpu_us'] / echo['cpu_us']:.2f}** (target ≤ 1.25)\n")
    md += ["", f"### Idle connections ({n_idle:,} held; RSS summed over every process of the server)", "",
           "| server | RSS with 0 | just connected: KiB/conn | after one request each: KiB/conn | fresh client (connect + request) p50 / p99 / max µs |",
           "|---|---:|---:|---:|---:|"]
    for name, r in idle.items():
        md.append(f"| {name} | {r['rss0_kib']:,} KiB | {r['kib_per_conn_connected']:.2f} | {r['kib_per_conn_served']:.2f} "
                  f"| {r['fresh_p50_us']:.0f} / {r['fresh_p99_us']:.0f} / {r['fresh_max_us']:.0f} |")
    md += ["", "### Accept spread (`bench/accept_spread.py --rounds 1 --connections 1000`, 4 workers)", "",
           "```", spread.strip(), "```", ""]
    if diag:
        md += ["### Syscalls per request (`strace -c -f`, one worker / all tokio threads)", ""]
        for key, d in diag.items():
            if "per_request" in d:
                top = ", ".join(f"{k} {v:.2f}" for k, v in list(d["per_request"].items())[:8])
                md.append(f"- {key.replace('|', ' ')}: {top} (total {sum(d['per_request'].values()):.2f})")
            else:
                md.append(f"- {key.replace('|', ' ')} per request: " + ", ".join(f"{k} {v:.4g}" for k, v in d.items()))
        md.append("")
    md += ["### Skipped cases", ""] + [f"- {s}" for s in SKIPPED] + [""]
    return "\n".join(md)


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--replot":
        sys.exit(replot(sys.argv[2]))
    sys.exit(main())
