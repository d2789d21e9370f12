#!/usr/bin/env python3
"""--fsync always (group commit) against --fsync never, in one run (issue 16).

For each round, for each policy (interleaved): a fresh server (2 workers, ledger under
target/bench/fsync, the file system of the repository), then
  * forkpool-bench bank --mix transfer=100 at 50 connections and at 1 connection;
  * echo p99 at 10 connections while a 50-connection transfer load runs on the bank.
Once per run: one fdatasync of a small preallocated file on the same file system (the
probe: 64 bytes written at a random offset, then fdatasync, 400 times; median and p99),
the log's bytes per operation, and the cold start (rebuild) time with a full log (a log
filled up to the checkpoint threshold, then the whole process group SIGKILLed).
Writes bench/results/fsync-<date>.md and prints it."""

import json
import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SERVER = ROOT / "target/release/forkpool-server"
BENCH = ROOT / "target/release/forkpool-bench"
WORK = ROOT / "target/bench/fsync"
ROUNDS = int(os.environ.get("ROUNDS", "3"))
DURATION = os.environ.get("DURATION", "5")
SEGMENT = 16 << 20  # forkpool_ledger::DEFAULT_LOG_SEGMENT_BYTES


class Server:
    def __init__(self, policy, data):
        self.data = data
        args = [str(SERVER), "--fsync", policy, "--workers", "2",
                "--echo-addr", "127.0.0.1:0", "--bank-addr", "127.0.0.1:0",
                "--ledger", str(data / "ledger.bin")]
        self.proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                     start_new_session=True, text=True)
        started = time.monotonic()
        line = self.proc.stdout.readline()
        self.ready_after = time.monotonic() - started
        fields = dict(f.split("=", 1) for f in line.split()[2:])
        self.echo, self.bank = fields["echo"], fields["bank"]
        threading.Thread(target=self.proc.stdout.read, daemon=True).start()

    def stop(self, sig=signal.SIGTERM):
        os.killpg(self.proc.pid, sig)
        self.proc.wait(timeout=30)


def bench(kind, addr, connections, extra=(), duration=DURATION):
    args = [str(BENCH), kind, "--addr", addr, "-c", str(connections), "-d", duration,
            "--json", *extra]
    if kind == "bank":
        args += ["--mix", "transfer=100"]
    out = subprocess.run(args, capture_output=True, text=True, check=False)
    try:
        report = json.loads(out.stdout)
    except json.JSONDecodeError:
        sys.exit(f"forkpool-bench {' '.join(args[1:])}: no report: {out.stderr.strip()}")
    if report["exit_code"] != 0:
        sys.exit(f"forkpool-bench {kind} -c {connections}: {report['verdict']}")
    return report


def fdatasync_probe():
    with tempfile.NamedTemporaryFile(dir=WORK) as f:
        f.write(bytes(SEGMENT))
        f.flush()
        os.fsync(f.fileno())
        times = []
        for _ in range(400):
            os.pwrite(f.fileno(), os.urandom(64), random.randrange(0, SEGMENT - 64) // 8 * 8)
            t = time.perf_counter()
            os.fdatasync(f.fileno())
            times.append((time.perf_counter() - t) * 1e6)
    times.sort()
    return statistics.median(times), times[int(len(times) * 0.99)]


def fresh_dir(name):
    d = WORK / name
    subprocess.run(["rm", "-rf", str(d)], check=True)
    d.mkdir(parents=True)
    return d


def one_round(policy, results):
    server = Server(policy, fresh_dir(policy))
    try:
        r50 = bench("bank", server.bank, 50)
        r1 = bench("bank", server.bank, 1)
        box = {}
        load = threading.Thread(target=lambda: box.update(bank=bench("bank", server.bank, 50)))
        load.start()
        time.sleep(0.5)
        echo = bench("echo", server.echo, 10)
        load.join()
    finally:
        server.stop()
    results[policy].append({
        "tps50": r50["requests_per_sec"], "p50_50": r50["latency"]["p50_us"],
        "tps1": r1["requests_per_sec"], "p50_1": r1["latency"]["p50_us"],
        "echo_p99": echo["latency"]["p99_us"],
    })


def walk_log(segment):
    """(bytes, records) of the chain of records from the start of a log segment."""
    log = segment.read_bytes()
    end = records = 0
    while log[end:end + 4] == b"FPLR":
        end += int.from_bytes(log[end + 4:end + 8], "little")
        records += 1
    return end, records


def log_bytes_per_op_and_recovery():
    """Fills the first log segment to 95% of the checkpoint threshold (half a segment),
    SIGKILLs the whole process group, and times the cold start that rebuilds from it."""
    data = fresh_dir("recovery")
    server = Server("always", data)
    try:
        bench("bank", server.bank, 50, ["-n", "20000", "--warmup", "0"])
        end, records = walk_log(data / "ledger.bin.log0")
        per_op = end / records
        more = int((0.95 * SEGMENT / 2 - end) / per_op)
        bench("bank", server.bank, 50, ["-n", str(more), "--warmup", "0"], duration="120")
        end, records = walk_log(data / "ledger.bin.log0")
        assert walk_log(data / "ledger.bin.log1")[1] == 0, "no checkpoint yet"
    finally:
        server.stop(signal.SIGKILL)
    cold = Server("always", data)
    ready = cold.ready_after
    cold.stop()
    return end / records, records, end, ready


def main():
    WORK.mkdir(parents=True, exist_ok=True)
    results = {"never": [], "always": []}
    probe = fdatasync_probe()
    for _ in range(ROUNDS):
        for policy in ("never", "always"):
            one_round(policy, results)
    probe_after = fdatasync_probe()
    per_op, records, log_end, rebuild = log_bytes_per_op_and_recovery()
    med = lambda policy, key: statistics.median(r[key] for r in results[policy])
    fsync_med = statistics.median([probe[0], probe_after[0]])
    lines = [
        f"# --fsync always vs never ({time.strftime('%Y-%m-%d %H:%M')}, {ROUNDS} rounds of "
        f"{DURATION} s, medians)",
        "",
        f"fdatasync of a small file on this file system: median {probe[0]:.0f} / "
        f"{probe_after[0]:.0f} µs (before / after), p99 {probe[1]:.0f} / {probe_after[1]:.0f} µs",
        "",
        "| | never | always | always / never |",
        "| --- | --- | --- | --- |",
    ]
    for key, label in [("tps50", "transfers/s, 50 connections"),
                       ("p50_50", "p50 µs, 50 connections"),
                       ("tps1", "transfers/s, 1 connection"),
                       ("p50_1", "p50 µs, 1 connection"),
                       ("echo_p99", "echo p99 µs under a 50-connection bank load")]:
        n, a = med("never", key), med("always", key)
        lines.append(f"| {label} | {n:,.0f} | {a:,.0f} | {a / n:.2f}x |")
    budget = med("never", "p50_1") + 1.5 * fsync_med
    lines += [
        "",
        f"1-connection p50 budget (never p50 + 1.5 x fdatasync median): {budget:.0f} µs; "
        f"always p50: {med('always', 'p50_1'):.0f} µs",
        f"Log: {per_op:.1f} bytes per transfer ({records:,} records, {log_end:,} bytes); cold "
        f"start rebuilding from it after SIGKILL of the process group: {rebuild * 1000:.0f} ms "
        f"to the ready line",
        "",
        "Per round: " + json.dumps(results),
    ]
    text = "\n".join(lines) + "\n"
    out = ROOT / "bench/results" / f"fsync-{time.strftime('%Y%m%d-%H%M%S')}.md"
    out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
