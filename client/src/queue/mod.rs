//! `forkpool-bench queue`: producers and consumers against a queue server (forkpool's,
//! beanstalkd or redis, through `wire`), every job tagged (`tag`) and booked (`jobs`), one
//! thread per connection (`roles`), and the figures (`report`). This module runs one run:
//! start the threads, sample CPU at the window's edges, merge and judge.

mod jobs;
mod report;
mod roles;
mod tag;
mod wire;

use std::sync::atomic::AtomicUsize;
use std::time::{Duration, Instant};

use anyhow::Context;

use crate::args::QueueArgs;
use crate::cpu::{client_cpu, find_tree, Tree};
use crate::stats::micros_per;
pub use report::QueueReport;
use roles::{consumer, producer, Outcome, Shared};
use wire::{connect, Role, Target};

/// Runs `forkpool-bench queue`.
pub fn run(args: &QueueArgs) -> anyhow::Result<QueueReport> {
    let s = args.settings()?;
    let target = Target {
        protocol: s.protocol,
        addr: s.addr,
        queue: s.queue.clone(),
        size: s.size,
        timeout: s.timeout,
    };
    // One connection set up as a consumer first: an address that refuses, or a server that
    // speaks another protocol, is a start failure (exit 2), not a run of errors.
    connect(&target, Role::Consumer)
        .with_context(|| format!("cannot start a {} session at {}", s.protocol.name(), s.addr))?;
    let pids = &s.server_pids;
    let server_tree = (!pids.is_empty())
        .then(|| find_tree(pids).with_context(|| format!("--server-pid {pids:?}")))
        .transpose()?;
    let book = jobs::JobBook::new(s.producers, s.backlog);
    let start = Instant::now();
    let window_start = start + s.warmup;
    let window_end = window_start + s.window;
    let shared = Shared {
        target: &target,
        book: &book,
        start,
        window_start,
        window_end,
        // Time for the jobs still queued, and for a GET's own wait (beanstalkd's 1 s).
        deadline: window_end + s.timeout + Duration::from_secs(1),
        producers_done: AtomicUsize::new(0),
        producers: s.producers,
    };
    let (mut total, cpu, server) = std::thread::scope(|scope| {
        let shared = &shared;
        let mut handles: Vec<_> = (0..s.producers)
            .map(|p| scope.spawn(move || producer(p, shared)))
            .collect();
        handles.extend((0..s.consumers).map(|_| scope.spawn(move || consumer(shared))));
        std::thread::sleep(window_start.saturating_duration_since(Instant::now()));
        let cpu0 = client_cpu();
        let server0 = server_tree.as_ref().map(Tree::sample);
        std::thread::sleep(window_end.saturating_duration_since(Instant::now()));
        let cpu1 = client_cpu();
        let server1 = server_tree.as_ref().map(Tree::sample);
        let mut total = Outcome::default();
        for h in handles {
            let out = h
                .join()
                .map_err(|_| anyhow::anyhow!("a client thread panicked"))?;
            total.counters += out.counters;
            total.latencies.merge(&out.latencies);
            total.samples.extend(out.samples);
        }
        anyhow::Ok((total, cpu1.saturating_sub(cpu0), server0.zip(server1)))
    })?;
    let secs = s.window.as_secs_f64();
    let jobs = total.counters.completed;
    let per_job = |d: Duration| micros_per(d, jobs);
    let book = book.summary();
    let (exit_code, verdict) = report::judge(jobs, &total.counters, &book);
    total.samples.truncate(crate::workload::MAX_SAMPLES);
    Ok(QueueReport {
        mode: "queue",
        protocol: s.protocol,
        addr: s.addr.to_string(),
        queue: s.queue,
        producers: s.producers,
        consumers: s.consumers,
        size: s.size,
        backlog: s.backlog,
        seed: s.seed,
        warmup_s: s.warmup.as_secs_f64(),
        window_s: secs,
        jobs,
        jobs_per_sec: jobs as f64 / secs,
        latency: total.latencies.summary(),
        counters: total.counters,
        book,
        client_cpu_us: cpu.as_secs_f64() * 1e6,
        client_cpu_us_per_job: per_job(cpu),
        server_pid: s.server_pids.clone(),
        server_processes: server.map(|(_, end)| end.processes),
        server_cpu_us: server.map(|(a, b)| b.cpu.saturating_sub(a.cpu).as_secs_f64() * 1e6),
        server_cpu_us_per_job: server.map(|(a, b)| per_job(b.cpu.saturating_sub(a.cpu))),
        mismatch_samples: total.samples,
        verdict,
        exit_code,
    })
}
