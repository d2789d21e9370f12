//! Operating a live pool, against the real binary on loopback: TTIN/TTOU resize it, workers
//! recycle under load without a failed request, a hung worker is replaced (and a worker that
//! merely waits for a hung lock holder is not), SIGHUP reloads or refuses a config file, the
//! pid file guards against a second master, and `/metrics` and `/status` tell the truth.
//!
//! Every wait is a condition with a deadline; every server is killed by the harness's `Drop`.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use forkpool_testkit::{
    bench_json, check_with_promtool, http_request, is_alive, json_number, log_phrase, metric,
    process_state, read_line, request_line, socket_owner, wait_until, Server, Signal,
};
use nix::sys::signal::kill;
use nix::unistd::Pid;

const WAIT: Duration = Duration::from_secs(10);

/// Did the master kill `pid` for missing its heartbeats?
fn reported_hung(server: &Server, pid: Pid) -> bool {
    server
        .output()
        .contains(&format!("(pid {pid}) {}", log_phrase::NO_HEARTBEAT))
}

/// Waits until the server has answered `n` echo requests (the load is under way).
fn wait_echo_requests(server: &Server, n: f64) {
    wait_until(&format!("{n} echo requests served"), WAIT, || {
        (metric(
            &server.metrics(),
            "forkpool_requests_total{service=\"echo\"}",
        ) >= n)
            .then_some(())
    });
}

/// Starts a closed-loop echo run in the background; joining it gives (report, exit status).
fn echo_load(server: &Server, seconds: &str) -> std::thread::JoinHandle<(serde_json::Value, i32)> {
    let addr = server.echo_addr().to_string();
    let seconds = seconds.to_string();
    std::thread::spawn(move || {
        bench_json(&[
            "echo",
            "--addr",
            &addr,
            "-c",
            "8",
            "-P",
            "4",
            "-d",
            &seconds,
            "--threads",
            "2",
            // Replacing a worker must go unnoticed: a close by the server is an error.
            "--no-reconnect",
        ])
    })
}

/// A clean run: exit 0, no wrong reply, no network error, no connection closed by the server
/// (the loads run with --no-reconnect). On failure the message carries the
/// server's log too (what it did while the client saw an error).
fn assert_clean(server: &Server, report: &serde_json::Value, code: i32) {
    let failed = |what: &str| format!("{what}: {report}\nserver log:\n{}", server.output());
    assert_eq!(code, 0, "{}", failed("exit status"));
    assert_eq!(
        json_number(report, "mismatches"),
        0.0,
        "{}",
        failed("mismatches")
    );
    for key in ["connect_errors", "resets", "timeouts", "closed"] {
        assert_eq!(json_number(report, key), 0.0, "{}", failed(key));
    }
    assert!(
        json_number(report, "requests") > 0.0,
        "{}",
        failed("requests")
    );
}

#[test]
fn ttin_and_ttou_change_the_worker_count_and_never_go_below_one() {
    let server = Server::builder()
        .args(["--status-addr", "127.0.0.1:0"])
        .start();
    // One signal at a time: the kernel merges a signal sent again before it was handled. A
    // resize also replaces the workers whose sockets moved, so a bare process count can match
    // half-way through one (and let the next signal merge): wait for the pool to settle.
    server.wait_settled(2, WAIT);
    server.signal(Signal::SIGTTIN);
    server.wait_settled(3, WAIT);
    server.signal(Signal::SIGTTIN);
    server.wait_settled(4, WAIT);
    for count in [3, 2, 1] {
        server.signal(Signal::SIGTTOU);
        server.wait_settled(count, WAIT);
    }
    let last = server.workers();
    server.signal(Signal::SIGTTOU);
    wait_until("the refusal to remove the last worker", WAIT, || {
        (server.log_count("keeping the last worker") == 1).then_some(())
    });
    assert_eq!(server.workers(), last, "the last worker stays");
    let mut conn = server.connect_echo();
    assert_eq!(request_line(&mut conn, "still here"), "STILL HERE");
}

/// Echo connections until every one of `workers` holds some (reuseport spreads them by
/// hash), each with the worker that serves it.
fn connections_on_every_worker(server: &Server, workers: &[Pid]) -> Vec<(TcpStream, Pid)> {
    let mut conns: Vec<(TcpStream, Pid)> = Vec::new();
    wait_until("connections on every worker", WAIT, || {
        let conn = server.connect_echo();
        let owner = wait_until("the connection's owner", WAIT, || {
            socket_owner(&conn, workers)
        });
        conns.push((conn, owner));
        workers
            .iter()
            .all(|w| conns.iter().any(|(_, o)| o == w))
            .then_some(())
    });
    conns
}

/// Each connection, whichever worker held it, goes on answering: the ones of a worker that
/// left were handed over to one that stays.
fn assert_every_connection_goes_on(conns: &mut [(TcpStream, Pid)], left: Pid, survivors: &[Pid]) {
    for (conn, owner) in conns.iter_mut() {
        assert_eq!(request_line(conn, "more"), "MORE");
        let now = socket_owner(conn, survivors);
        assert!(now.is_some(), "a connection is held by no serving worker");
        if *owner == left {
            assert_ne!(now, Some(left));
        }
    }
}

#[test]
fn a_ttoud_workers_connections_go_on_at_a_survivor_with_their_pending_replies() {
    let server = Server::start();
    let workers = server.wait_workers(2, WAIT);
    let mut conns = connections_on_every_worker(&server, &workers);
    // A request in flight on every connection (the replies are read only after TTOU), and a
    // long one that takes a while to stream back.
    let long = "x".repeat(256 * 1024);
    for (conn, _) in &mut conns {
        conn.write_all(format!("pending\n{long}\n").as_bytes())
            .expect("send");
    }
    server.signal(Signal::SIGTTOU);
    let left = wait_until("a worker to leave", WAIT, || {
        let now = server.workers();
        (now.len() == 1).then(|| workers.iter().copied().find(|w| !now.contains(w)))?
    });
    let long_upper = long.to_uppercase();
    for (conn, _) in &mut conns {
        assert_eq!(read_line(conn), "PENDING");
        assert_eq!(read_line(conn), long_upper);
    }
    let survivors = server.workers();
    assert_every_connection_goes_on(&mut conns, left, &survivors);
}

#[test]
fn a_line_begun_before_a_ttou_is_finished_by_the_successor() {
    let server = Server::start();
    let workers = server.wait_workers(2, WAIT);
    let mut conns = connections_on_every_worker(&server, &workers);
    // Half a line on every connection, echoed as it streams through: each worker has read
    // it, and all it read is answered.
    for (conn, _) in &mut conns {
        conn.write_all(b"first half, ").expect("send");
        let mut echoed = [0u8; 12];
        conn.read_exact(&mut echoed).expect("the half line's echo");
        assert_eq!(&echoed, b"FIRST HALF, ");
    }
    server.signal(Signal::SIGTTOU);
    let left = wait_until("a worker to leave", WAIT, || {
        let now = server.workers();
        (now.len() == 1).then(|| workers.iter().copied().find(|w| !now.contains(w)))?
    });
    for (conn, _) in &mut conns {
        conn.write_all(b"second half\n").expect("send");
        assert_eq!(read_line(conn), "SECOND HALF");
    }
    let survivors = server.workers();
    assert_every_connection_goes_on(&mut conns, left, &survivors);
}

#[test]
fn recycling_under_load_fails_no_request() {
    let server = Server::builder()
        .args([
            "--max-requests",
            "500",
            "--max-requests-jitter",
            "50",
            "--status-addr",
            "127.0.0.1:0",
        ])
        .start();
    let (report, code) = echo_load(&server, "3").join().expect("bench thread");
    eprintln!("recycling run: {report}");
    assert_clean(&server, &report, code);
    let page = server.metrics();
    let recycled = metric(&page, "forkpool_worker_restarts_total{reason=\"recycled\"}");
    assert!(recycled > 0.0, "{page}");
    for reason in ["crashed", "hung", "killed"] {
        let series = format!("forkpool_worker_restarts_total{{reason=\"{reason}\"}}");
        assert_eq!(metric(&page, &series), 0.0, "{page}");
    }
    eprintln!(
        "recycled {recycled} workers; client saw {} clean closes, re-sent {} requests",
        json_number(&report, "closed"),
        json_number(&report, "retried")
    );
}

#[test]
fn a_stopped_worker_is_killed_and_replaced_within_the_timeout() {
    let server = Server::builder().args(["--worker-timeout", "1"]).start();
    let workers = server.wait_workers(2, WAIT);
    let stopped = workers[0];
    kill(stopped, Signal::SIGSTOP).expect("stop a worker");
    let started = Instant::now();
    let replaced = wait_until("the stopped worker to be replaced", WAIT, || {
        let now = server.workers();
        (now.len() == 2 && !now.contains(&stopped)).then_some(now)
    });
    let took = started.elapsed();
    eprintln!("hung worker replaced after {took:?} (--worker-timeout 1)");
    assert!(took <= Duration::from_secs(3), "took {took:?}");
    assert!(replaced.contains(&workers[1]), "the healthy worker stays");
    // Only the stopped worker was taken for a hung one (on a loaded machine a replacement
    // slow to start may be too, which is the timeout doing its job).
    wait_until("the master's report of the hung worker", WAIT, || {
        reported_hung(&server, stopped).then_some(())
    });
    assert!(!reported_hung(&server, workers[1]), "{}", server.output());
    let mut conn = server.connect_echo();
    assert_eq!(request_line(&mut conn, "alive"), "ALIVE");
}

/// Pids recorded as holding a stripe lock in a ledger file (layout version 1, see
/// docs/LEDGER.md: the header records the stripe count and the mutex size; the stripes follow
/// the 4 KiB header page, 128 bytes each, a lock word of mutex + holder pid first).
fn stripe_lock_holders(ledger: &Path) -> Vec<i32> {
    let Ok(bytes) = std::fs::read(ledger) else {
        return Vec::new();
    };
    let u32_at = |at: usize| u32::from_le_bytes(bytes[at..at + 4].try_into().expect("4 bytes"));
    let (mutex_bytes, stripes) = (u32_at(12) as usize, u32_at(32) as usize);
    (0..stripes)
        .map(|i| {
            let at = 4096 + i * 128 + mutex_bytes;
            i32::from_le_bytes(bytes[at..at + 4].try_into().expect("4 bytes"))
        })
        .filter(|&pid| pid != 0)
        .collect()
}

/// A bank connection served by `worker` (reuseport spreads connections by hash: connect
/// until one lands there).
fn bank_connection_served_by(server: &Server, worker: Pid) -> TcpStream {
    wait_until(
        &format!("a bank connection served by {worker}"),
        WAIT,
        || {
            let mut conn = server.connect_bank();
            assert_eq!(request_line(&mut conn, "PING"), "PONG");
            (socket_owner(&conn, &[worker]) == Some(worker)).then_some(conn)
        },
    )
}

/// Sends AUDIT in batches on `conn` until the connection ends. Each AUDIT takes every stripe
/// lock, lowest first, so the worker serving it holds stripe 0 most of the time.
fn audit_until_closed(conn: TcpStream) -> std::thread::JoinHandle<()> {
    const BATCH: usize = 256;
    std::thread::spawn(move || {
        let mut reader = BufReader::new(conn.try_clone().expect("clone the stream"));
        let mut writer = conn;
        let batch = "AUDIT\n".repeat(BATCH);
        let mut line = String::new();
        while writer.write_all(batch.as_bytes()).is_ok() {
            for _ in 0..BATCH {
                line.clear();
                if !matches!(reader.read_line(&mut line), Ok(n) if n > 0) {
                    return;
                }
            }
        }
    })
}

#[test]
fn a_worker_waiting_for_a_stopped_lock_holder_is_not_killed() {
    let server = Server::builder().args(["--worker-timeout", "1"]).start();
    let ledger = server.data_dir().path().join("ledger.bin");
    let workers = server.wait_workers(2, WAIT);
    let (holder, waiter) = (workers[0], workers[1]);
    let mut waiting = bank_connection_served_by(&server, waiter);
    let auditing = audit_until_closed(bank_connection_served_by(&server, holder));
    // Stop the auditing worker until it is caught holding a stripe lock (and so stripe 0: an
    // AUDIT takes them in order); resume it when it holds none. The waiter is never stopped:
    // whatever silence it shows is the server's doing.
    wait_until(
        "the auditing worker stopped holding the ledger's locks",
        WAIT,
        || {
            kill(holder, Signal::SIGSTOP).expect("the auditing worker lives");
            wait_until("the worker to stop", WAIT, || {
                (process_state(holder)? == 'T').then_some(())
            });
            if stripe_lock_holders(&ledger).contains(&holder.as_raw()) {
                return Some(());
            }
            kill(holder, Signal::SIGCONT).expect("the auditing worker lives");
            None
        },
    );
    // The waiter's AUDIT needs stripe 0: it waits behind the stopped holder, beating, until
    // the master kills the holder; then it repairs the stripe and answers.
    let stopped_at = Instant::now();
    assert!(request_line(&mut waiting, "AUDIT").starts_with("OK "));
    eprintln!(
        "waited {:?} behind the stopped lock holder",
        stopped_at.elapsed()
    );
    assert!(
        !is_alive(holder),
        "the answer came once the holder was gone"
    );
    auditing
        .join()
        .expect("the auditing thread ends with its connection");
    assert!(is_alive(waiter), "{}", server.output());
    assert!(is_alive(waiter), "{}", server.output());
    wait_until("the master's report of the hung holder", WAIT, || {
        reported_hung(&server, holder).then_some(())
    });
    assert!(!reported_hung(&server, waiter), "{}", server.output());
    assert_eq!(request_line(&mut waiting, "PING"), "PONG");
}

/// A config file in the server's data directory.
fn write_config(server_dir: &Path, text: &str) -> String {
    let path = server_dir.join("forkpool.toml");
    std::fs::write(&path, text).expect("write the config file");
    path.display().to_string()
}

#[test]
fn hup_with_a_bad_config_changes_nothing_under_load() {
    let dir = std::sync::Arc::new(tempfile::tempdir().expect("a temporary directory"));
    let config = write_config(dir.path(), "workers = 2\nidle_timeout = 300\n");
    let server = Server::builder()
        .data_dir(dir.clone())
        .without_default("--workers")
        .args(["--config", &config, "--status-addr", "127.0.0.1:0"])
        .start();
    let before = {
        let mut w = server.wait_workers(2, WAIT);
        w.sort();
        w
    };
    let load = echo_load(&server, "2");
    wait_echo_requests(&server, 1000.0);
    write_config(dir.path(), "workers = \"many\"\n");
    server.signal(Signal::SIGHUP);
    wait_until("the reload to be refused", WAIT, || {
        (server.log_count("reload refused") == 1).then_some(())
    });
    let (report, code) = load.join().expect("bench thread");
    eprintln!("bad reload run: {report}");
    assert_clean(&server, &report, code);
    let mut after = server.workers();
    after.sort();
    assert_eq!(after, before, "the same workers serve on");
    assert_eq!(server.log_count("reload refused"), 1);
    // The refusal names the file's line and key, as at start-up.
    assert_eq!(
        server.log_count("line 1, key workers: invalid type"),
        1,
        "{}",
        server.output()
    );
}

#[test]
fn hup_with_a_good_config_replaces_the_workers_under_load() {
    let dir = std::sync::Arc::new(tempfile::tempdir().expect("a temporary directory"));
    let config = write_config(dir.path(), "workers = 2\nidle_timeout = 300\n");
    let server = Server::builder()
        .data_dir(dir.clone())
        .without_default("--workers")
        .args(["--config", &config, "--status-addr", "127.0.0.1:0"])
        .args(["--graceful-timeout", "1"])
        .start();
    let old = server.wait_workers(2, WAIT);
    let load = echo_load(&server, "4");
    wait_echo_requests(&server, 1000.0);
    write_config(dir.path(), "workers = 3\nidle_timeout = 1\n");
    server.signal(Signal::SIGHUP);
    let new = wait_until("3 new workers and the old ones gone", WAIT, || {
        let now = server.workers();
        (now.len() == 3 && now.iter().all(|w| !old.contains(w))).then_some(now)
    });
    let (report, code) = load.join().expect("bench thread");
    eprintln!("good reload run: {report}");
    assert_clean(&server, &report, code);
    // The old workers handed the bench's busy connections over: none was closed.
    assert_eq!(json_number(&report, "closed"), 0.0, "{report}");
    // idle_timeout = 1 now applies: an idle connection is closed within a couple of seconds.
    let mut idle = server.connect_echo();
    assert_eq!(request_line(&mut idle, "hi"), "HI");
    let opened = Instant::now();
    let mut rest = Vec::new();
    idle.read_to_end(&mut rest).expect("closed by the server");
    let idle_for = opened.elapsed();
    assert!(
        idle_for >= Duration::from_millis(900) && idle_for < Duration::from_secs(4),
        "closed after {idle_for:?}"
    );
    assert_eq!(server.workers().len(), 3, "{new:?}");
}

#[test]
fn the_pid_file_names_the_master_refuses_a_second_and_is_removed_at_exit() {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let pid_file = dir.path().join("forkpool.pid");
    let pid_arg = pid_file.display().to_string();
    let mut server = Server::builder().args(["--pid-file", &pid_arg]).start();
    let written = std::fs::read_to_string(&pid_file).expect("the pid file exists once ready");
    assert_eq!(written.trim(), server.pid.to_string());

    let mut second = Server::builder().args(["--pid-file", &pid_arg]).spawn();
    let status = second.wait_exit(WAIT);
    assert!(!status.success(), "a second master must not start");
    assert!(second.output().contains("is locked"), "{}", second.output());
    assert_eq!(
        std::fs::read_to_string(&pid_file)
            .expect("still there")
            .trim(),
        server.pid.to_string()
    );

    server.signal(Signal::SIGTERM);
    assert!(server.wait_exit(WAIT).success());
    assert!(!pid_file.exists(), "the pid file is removed at exit");
}

#[test]
fn a_stale_pid_file_is_taken_over() {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let pid_file = dir.path().join("forkpool.pid");
    let mut dead = Command::new("true").spawn().expect("run true");
    let dead_pid = dead.id();
    dead.wait().expect("reap it");
    std::fs::write(&pid_file, format!("{dead_pid}\n")).expect("write a stale pid file");
    let server = Server::builder()
        .args(["--pid-file", &pid_file.display().to_string()])
        .start();
    let written = std::fs::read_to_string(&pid_file).expect("the pid file exists");
    assert_eq!(written.trim(), server.pid.to_string());
}

#[test]
fn metrics_pass_promtool_and_count_the_requests_sent() {
    let server = Server::builder()
        .args(["--status-addr", "127.0.0.1:0"])
        .start();
    let workers = server.wait_workers(2, WAIT);
    let (echo_lines, bank_lines) = (37, 11);
    for _ in 0..3 {
        let mut conn = server.connect_echo();
        for i in 0..echo_lines / 3 {
            assert_eq!(
                request_line(&mut conn, &format!("line {i}")),
                format!("LINE {i}")
            );
        }
    }
    let mut conn = server.connect_echo();
    for _ in 0..echo_lines % 3 {
        assert_eq!(request_line(&mut conn, "x"), "X");
    }
    let mut bank = server.connect_bank();
    for _ in 0..bank_lines {
        assert!(request_line(&mut bank, "DEPOSIT m 5").starts_with("OK "));
    }
    let page = wait_until("the counters to catch up", WAIT, || {
        let page = server.metrics();
        (metric(&page, "forkpool_requests_total{service=\"echo\"}") == echo_lines as f64
            && metric(&page, "forkpool_requests_total{service=\"bank\"}") == bank_lines as f64)
            .then_some(page)
    });
    assert_eq!(metric(&page, "forkpool_ledger_accounts"), 1.0);
    assert_eq!(
        metric(&page, "forkpool_ledger_total_balance"),
        5.0 * bank_lines as f64
    );
    assert_eq!(
        metric(&page, "forkpool_workers{state=\"idle\"}")
            + metric(&page, "forkpool_workers{state=\"busy\"}"),
        2.0
    );

    check_with_promtool(&page);

    let (code, table) = http_request(server.status_addr(), "GET", "/status");
    assert_eq!(code, 200, "{table}");
    for w in &workers {
        let rows = table
            .lines()
            .filter(|l| l.split_whitespace().nth(1) == Some(&w.to_string()))
            .count();
        assert_eq!(rows, 1, "one row for worker {w}:\n{table}");
    }
    assert_eq!(http_request(server.status_addr(), "GET", "/nope").0, 404);
    assert_eq!(
        http_request(server.status_addr(), "POST", "/metrics").0,
        405
    );
}
