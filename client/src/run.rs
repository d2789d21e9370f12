//! One run from start to report: set up (bank), start the client threads, sample CPU at the
//! edges of the measured window, show progress, collect and judge the figures.

use std::io::IsTerminal;
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

use crate::args::{
    Auth, BankArgs, EchoArgs, End, Greeting, Settings, DEFAULT_BANK_ADDR, DEFAULT_ECHO_ADDR,
};
use crate::bank_setup::{account_names, final_audit, open_accounts, Connector};
use crate::book::Book;
use crate::cpu::{client_cpu, find_tree, sample_tree, Tree, TreeSample};
use crate::driver::{self, Clock, Counting, Live, Plan};
use crate::load::{payload_pool, Rng, Text};
use crate::report::{judge, BankReport, Report};
use crate::stats::{micros_per, Counters, Latencies};
use crate::workload::{BankWorkload, EchoWorkload, Workload, MAX_SAMPLES};

/// How often the progress line is redrawn.
const PROGRESS_INTERVAL: Duration = Duration::from_secs(1);
/// How often the main thread looks whether a `--requests` run is done.
const DONE_POLL: Duration = Duration::from_millis(2);

/// What the threads measured, merged.
struct Measured<W> {
    counters: Counters,
    latencies: Latencies,
    workloads: Vec<W>,
    window: Duration,
    client_cpu: Duration,
    server: Option<(TreeSample, TreeSample)>,
}

/// Fails unless one connection to `addr` is accepted within `timeout`: an address that
/// refuses or never accepts is the same usage-class failure (exit 2) in both modes, not a run
/// counting connect errors.
fn check_reachable(addr: SocketAddr, timeout: Duration) -> anyhow::Result<()> {
    TcpStream::connect_timeout(&addr, timeout)
        .map(drop)
        .with_context(|| format!("cannot connect to {addr}"))
}

/// [`check_reachable`] for every address of the run.
fn check_all_reachable(s: &Settings) -> anyhow::Result<()> {
    s.addrs
        .iter()
        .try_for_each(|&addr| check_reachable(addr, s.timeout))
}

/// The addresses for the thread whose first connection is number `first` of the run: rotated
/// so that its connection `i` goes where the run's connection `first + i` goes
/// (`addrs[(first + i) % len]`), spreading the run's connections round-robin.
fn addrs_from(addrs: &[SocketAddr], first: usize) -> Vec<SocketAddr> {
    let mut rotated = addrs.to_vec();
    rotated.rotate_left(first % addrs.len());
    rotated
}

/// Runs `forkpool-bench echo`.
pub fn echo(args: &EchoArgs) -> anyhow::Result<Report> {
    let s = args.load.settings(DEFAULT_ECHO_ADDR)?;
    check_all_reachable(&s)?;
    let size = args.size as usize;
    let m = measure(&s, None, |t| {
        let mut rng = Rng::new(s.seed ^ (t as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15));
        EchoWorkload::new(payload_pool(&mut rng, size, args.text), rng)
    })?;
    Ok(report(&s, "echo", Some((size, args.text)), m, None))
}

/// Runs `forkpool-bench bank`.
pub fn bank(args: &BankArgs) -> anyhow::Result<Report> {
    let s = args.load.settings(DEFAULT_BANK_ADDR)?;
    check_all_reachable(&s)?;
    let greeting = args.auth.as_ref().map(Auth::greeting);
    let bank = Connector {
        addr: s.first_addr(),
        tls: s.tls.clone(),
        greeting: greeting.clone(),
        reconnect: !s.no_reconnect,
    };
    let accounts = account_names(&args.prefix, args.accounts as usize)?;
    let opening = open_accounts(&bank, &accounts, args.opening_balance, s.timeout)
        .context("bank setup failed")?;
    let m = measure(&s, greeting.map(Arc::new), |t| {
        let rng = Rng::new(s.seed ^ (t as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15));
        BankWorkload::new(accounts.clone(), args.mix.clone(), rng)
    })?;
    let mut book = Book::default();
    for w in &m.workloads {
        book += *w.book();
    }
    let audit = final_audit(&bank, s.timeout);
    let check = audit
        .as_ref()
        .ok()
        .map(|&(total, _)| book.check(opening.total, total));
    let bank = BankReport {
        accounts: accounts.len(),
        opening_balance: args.opening_balance,
        before_total: opening.before_total,
        before_accounts: opening.before_accounts,
        opening_total: opening.total,
        book,
        unknown_ops: book.unknown_ops(),
        expected_total: book.check(opening.total, opening.total).expected,
        audit_total: audit.as_ref().ok().map(|a| a.0),
        audit_accounts: audit.as_ref().ok().map(|a| a.1),
        difference: check.map(|c| c.difference),
        audit_ok: check.map(|c| c.explained),
        audit_error: audit.err().map(|e| format!("{e:#}")),
    };
    Ok(report(&s, "bank", None, m, Some(bank)))
}

/// Starts the threads, samples CPU at the window's edges, and merges what they measured.
fn measure<W: Workload, F: Fn(usize) -> W + Sync>(
    s: &Settings,
    greeting: Option<Arc<Greeting>>,
    make: F,
) -> anyhow::Result<Measured<W>> {
    // Found now, sampled at the window's start: a scan of /proc there could take longer
    // than a short window.
    let pids = &s.server_pids;
    let server_tree = (!pids.is_empty())
        .then(|| find_tree(pids).with_context(|| format!("--server-pid {pids:?}")))
        .transpose()?;
    let start = Instant::now();
    let window_start = start + s.warmup;
    let window_end = window_start + s.end.max_window();
    let clock = Clock {
        start,
        window_start,
        window_end,
        deadline: window_end + s.timeout,
    };
    let budget = match s.end {
        End::Requests { count, .. } => Some(Arc::new(AtomicI64::new(
            i64::try_from(count).unwrap_or(i64::MAX),
        ))),
        End::After(_) => None,
    };
    let lives: Vec<Arc<Live>> = (0..s.threads).map(|_| Arc::default()).collect();
    let progress = Progress::new(s.warmup, s.end);
    std::thread::scope(|scope| {
        let handles: Vec<_> = (0..s.threads)
            .map(|t| {
                let share = |t: usize| {
                    s.connections / s.threads + usize::from(t < s.connections % s.threads)
                };
                let connections = share(t);
                let first: usize = (0..t).map(share).sum();
                let plan = Plan {
                    addrs: addrs_from(&s.addrs, first),
                    tls: s.tls.clone(),
                    connections,
                    pipeline: s.pipeline,
                    rate: s
                        .rate
                        .map(|r| r * connections as f64 / s.connections as f64),
                    timeout: s.timeout,
                    clock,
                    counting: budget.clone().map_or(Counting::Window, Counting::Budget),
                    live: lives[t].clone(),
                    reconnect: !s.no_reconnect,
                    greeting: greeting.clone(),
                };
                let make = &make;
                scope.spawn(move || driver::run(plan, make(t)))
            })
            .collect();
        let all_done = || handles.iter().all(|h| h.is_finished());
        progress.wait_until(window_start, &lives, &all_done);
        let cpu0 = client_cpu();
        let server0 = server_tree.as_ref().map(Tree::sample);
        match s.end {
            End::After(_) => progress.wait_until(window_end, &lives, &all_done),
            End::Requests { .. } => progress.wait_for(window_end, &lives, &all_done),
        }
        let ended = Instant::now();
        let cpu1 = client_cpu();
        let server1 = server_tree.as_ref().and_then(|_| sample_tree(pids).ok());
        progress.finish();
        let mut m = Measured {
            counters: Counters::default(),
            latencies: Latencies::default(),
            workloads: Vec::new(),
            window: Duration::ZERO,
            client_cpu: cpu1.saturating_sub(cpu0),
            server: server0.zip(server1),
        };
        let mut last_counted = None;
        for h in handles {
            let out = h
                .join()
                .map_err(|_| anyhow::anyhow!("a client thread panicked"))?
                .context("client thread")?;
            m.counters += out.counters;
            m.latencies.merge(&out.latencies);
            last_counted = last_counted.max(out.last_counted);
            m.workloads.push(out.workload);
        }
        m.window = match s.end {
            End::After(d) => d,
            End::Requests { .. } => last_counted
                .unwrap_or(ended)
                .min(ended)
                .saturating_duration_since(window_start),
        };
        Ok(m)
    })
}

fn report<W: Workload>(
    s: &Settings,
    mode: &'static str,
    lines: Option<(usize, Text)>,
    m: Measured<W>,
    bank: Option<BankReport>,
) -> Report {
    let secs = m.window.as_secs_f64();
    let per_second = |x: u64| if secs > 0.0 { x as f64 / secs } else { 0.0 };
    let requests = m.counters.completed;
    let per_request = |d: Duration| micros_per(d, requests);
    let (exit_code, verdict) = judge(requests, &m.counters, bank.as_ref(), s.no_reconnect);
    Report {
        mode,
        addr: s.addrs_text(),
        connections: s.connections,
        pipeline: s.pipeline,
        threads: s.threads,
        size: lines.map(|(size, _)| size),
        text: lines.map(|(_, text)| text),
        rate: s.rate,
        seed: s.seed,
        warmup_s: s.warmup.as_secs_f64(),
        window_s: secs,
        requests,
        requests_per_sec: per_second(requests),
        mb_per_sec_sent: per_second(m.counters.bytes_sent) / 1e6,
        mb_per_sec_received: per_second(m.counters.bytes_received) / 1e6,
        latency: m.latencies.summary(),
        counters: m.counters,
        client_cpu_us: m.client_cpu.as_secs_f64() * 1e6,
        client_cpu_us_per_request: per_request(m.client_cpu),
        server_pid: s.server_pids.clone(),
        server_processes: m.server.map(|(_, end)| end.processes),
        server_cpu_us: m
            .server
            .map(|(a, b)| b.cpu.saturating_sub(a.cpu).as_secs_f64() * 1e6),
        server_cpu_us_per_request: m
            .server
            .map(|(a, b)| per_request(b.cpu.saturating_sub(a.cpu))),
        mismatch_samples: m
            .workloads
            .iter()
            .flat_map(|w| w.samples().iter().cloned())
            .take(MAX_SAMPLES)
            .collect(),
        bank,
        verdict,
        exit_code,
    }
}

/// The progress line before the first figures, e.g. `starting: 3 s warm-up, then 10 s`.
fn starting_message(warmup: Duration, end: End) -> String {
    if warmup.is_zero() {
        format!("starting: {end}")
    } else {
        format!("starting: {} s warm-up, then {end}", warmup.as_secs_f64())
    }
}

/// The live one-line display: drawn on stderr once a second, and only when stderr is a
/// terminal.
struct Progress {
    bar: Option<ProgressBar>,
    started: Instant,
}

impl Progress {
    fn new(warmup: Duration, end: End) -> Self {
        let bar = std::io::stderr().is_terminal().then(|| {
            let bar = ProgressBar::with_draw_target(None, ProgressDrawTarget::stderr());
            bar.set_style(
                ProgressStyle::with_template("{spinner} {elapsed:>4} {msg}")
                    .unwrap_or_else(|_| ProgressStyle::default_spinner()),
            );
            bar.set_message(starting_message(warmup, end));
            bar
        });
        Progress {
            bar,
            started: Instant::now(),
        }
    }

    fn update(&self, lives: &[Arc<Live>], last: &mut (Instant, u64)) {
        let Some(bar) = &self.bar else { return };
        let now = Instant::now();
        let sum = |f: fn(&Live) -> u64| lives.iter().map(|l| f(l)).sum::<u64>();
        let completed = sum(|l| l.completed.load(Ordering::Relaxed));
        let rate = (completed - last.1.min(completed)) as f64
            / now.duration_since(last.0).as_secs_f64().max(1e-9);
        *last = (now, completed);
        bar.set_message(format!(
            "{completed} requests  {rate:.0} req/s  {} wrong  {} network errors",
            sum(|l| l.mismatches.load(Ordering::Relaxed)),
            sum(|l| l.errors.load(Ordering::Relaxed)),
        ));
        bar.tick();
    }

    /// Sleeps until `t` (or until every thread is done), redrawing once a second.
    fn wait_until(&self, t: Instant, lives: &[Arc<Live>], done: &dyn Fn() -> bool) {
        let mut last = (self.started, 0);
        let mut next_draw = Instant::now() + PROGRESS_INTERVAL;
        loop {
            let now = Instant::now();
            if now >= t || done() {
                return;
            }
            if now >= next_draw {
                self.update(lives, &mut last);
                next_draw += PROGRESS_INTERVAL;
            }
            std::thread::sleep(
                t.min(next_draw)
                    .saturating_duration_since(now)
                    .min(DONE_POLL * 5),
            );
        }
    }

    /// Waits for every thread to finish (a `--requests` run), or until `cap`.
    fn wait_for(&self, cap: Instant, lives: &[Arc<Live>], done: &dyn Fn() -> bool) {
        let mut last = (self.started, 0);
        let mut next_draw = Instant::now() + PROGRESS_INTERVAL;
        while !done() && Instant::now() < cap {
            if Instant::now() >= next_draw {
                self.update(lives, &mut last);
                next_draw += PROGRESS_INTERVAL;
            }
            std::thread::sleep(DONE_POLL);
        }
    }

    fn finish(&self) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_starting_line_is_plain_words() {
        let requests = End::Requests {
            count: 50_000,
            cap: Duration::from_secs(60),
        };
        assert_eq!(
            starting_message(Duration::ZERO, End::After(Duration::from_secs(3))),
            "starting: 3 s"
        );
        assert_eq!(
            starting_message(Duration::from_millis(1500), requests),
            "starting: 1.5 s warm-up, then 50000 requests (at most 60 s)"
        );
    }

    #[test]
    fn each_thread_starts_its_addresses_where_its_first_connection_falls() {
        let addrs: Vec<SocketAddr> = ["127.0.0.1:1", "127.0.0.1:2", "127.0.0.1:3"]
            .map(|a| a.parse().expect("addr"))
            .to_vec();
        let ports = |first| -> Vec<u16> {
            addrs_from(&addrs, first)
                .iter()
                .map(SocketAddr::port)
                .collect()
        };
        assert_eq!(ports(0), [1, 2, 3]);
        assert_eq!(ports(2), [3, 1, 2]);
        assert_eq!(ports(4), [2, 3, 1]);
    }

    #[test]
    fn an_address_that_refuses_is_an_error_naming_it() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = listener.local_addr().expect("addr");
        assert!(check_reachable(addr, Duration::from_secs(2)).is_ok());
        drop(listener);
        let err = check_reachable(addr, Duration::from_secs(2)).unwrap_err();
        assert_eq!(err.to_string(), format!("cannot connect to {addr}"));
    }
}
