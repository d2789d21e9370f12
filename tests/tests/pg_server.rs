//! The server with its ledger on PostgreSQL (the bank suite itself runs against both ledgers,
//! see bank.rs): the database pool's metrics, a bad ledger URL refused at start, a worker's
//! loop serving on while one of its bank requests waits for a lock in the database, and a
//! binary upgrade (SIGUSR2) under load. The database is this test binary's throwaway cluster
//! (`forkpool_testkit::pg`), a fresh database per test.

use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::SeqCst};
use std::sync::Arc;
use std::time::Duration;

use forkpool_testkit::{
    bench_json, check_with_promtool, connect, http_request, json_field, json_number, log_phrase,
    metric, read_line, ready_pid, request_line, wait_until, LedgerKind, Server, Signal,
};

const WAIT: Duration = Duration::from_secs(20);

#[test]
fn database_pool_metrics_pass_promtool_and_count_the_requests() {
    let Some(builder) = Server::builder().ledger(LedgerKind::Postgres) else {
        return;
    };
    let server = builder
        .args(["--status-addr", "127.0.0.1:0", "--ledger-connections", "3"])
        .start();
    let requests = 25;
    let mut bank = server.connect_bank();
    for _ in 0..requests - 1 {
        assert!(request_line(&mut bank, "DEPOSIT m 5").starts_with("OK "));
    }
    assert_eq!(request_line(&mut bank, "AUDIT"), "OK 120 1");
    assert_eq!(
        request_line(&mut bank, "PING"),
        "PONG",
        "not a database request"
    );
    let page = wait_until("the pools' figures to catch up", WAIT, || {
        let page = server.metrics();
        (metric(&page, "forkpool_ledger_db_request_seconds_count") == f64::from(requests)
            && metric(&page, "forkpool_ledger_db_connections_open") == 6.0)
            .then_some(page)
    });
    // Two workers, three connections each.
    assert_eq!(metric(&page, "forkpool_ledger_db_connections"), 6.0);
    assert_eq!(metric(&page, "forkpool_ledger_db_in_flight"), 0.0);
    assert_eq!(metric(&page, "forkpool_ledger_db_unavailable_total"), 0.0);
    assert_eq!(
        metric(
            &page,
            "forkpool_ledger_db_request_seconds_bucket{le=\"+Inf\"}"
        ),
        f64::from(requests)
    );
    assert!(metric(&page, "forkpool_ledger_db_request_seconds_sum") > 0.0);
    assert!(
        !page.contains("forkpool_ledger_accounts"),
        "the file ledger's figures are not shown for a database"
    );
    check_with_promtool(&page);
    let (code, table) = http_request(server.status_addr(), "GET", "/status");
    assert_eq!(code, 200);
    assert!(
        table.contains("ledger on PostgreSQL: 6 of 6 connections open"),
        "{table}"
    );
}

#[test]
fn an_unreachable_or_bad_ledger_database_is_refused_at_start_on_one_line() {
    let Some(cluster) = forkpool_testkit::pg::postgres() else {
        return;
    };
    let missing = format!(
        "postgresql:///no_such_database?host={}&user=postgres",
        cluster.socket_dir().display()
    );
    let mut server = Server::builder().args(["--ledger", &missing]).spawn();
    let line = error_line(server.refused_to_start("a database that does not exist"));
    assert!(
        line.contains("ledger database") && line.contains("no_such_database"),
        "{line}"
    );
    let mut server = Server::builder()
        .args(["--ledger", "postgresql://u:hunter2@db/x?sslmode=require"])
        .spawn();
    let line = error_line(server.refused_to_start("sslmode=require"));
    assert!(line.contains("sslmode=require"), "{line}");
    assert!(
        !line.contains("hunter2"),
        "the password is never printed: {line}"
    );
}

/// The one line a failed start prints on stderr.
fn error_line(output: String) -> String {
    let lines: Vec<&str> = output
        .lines()
        .filter(|line| line.starts_with("forkpool-server: "))
        .collect();
    assert_eq!(lines.len(), 1, "one error line: {output}");
    lines[0].to_string()
}

#[test]
fn echo_and_ping_answer_while_a_bank_request_waits_behind_a_table_lock() {
    let Some(cluster) = forkpool_testkit::pg::postgres() else {
        return;
    };
    let database = cluster.new_database();
    // One worker: the echo lines, the PING and the stuck deposit share its event loop. The
    // ledger timeout outlasts the test: the deposit waits for the lock, it does not give up.
    let server = Server::builder()
        .args(["--ledger", &cluster.url(&database), "--workers", "1"])
        .args(["--ledger-timeout", "120"])
        .start();
    let mut stuck = server.connect_bank();
    assert_eq!(request_line(&mut stuck, "DEPOSIT slow 10"), "OK 10");
    let lock = cluster.lock_table(&database, "accounts");
    stuck
        .write_all(b"DEPOSIT slow 5\n")
        .expect("send a deposit");
    wait_until("the deposit to wait for the lock", WAIT, || {
        (cluster.workers_waiting_on_locks(&database) >= 1).then_some(())
    });
    let mut echo = server.connect_echo();
    for i in 0..100 {
        assert_eq!(
            request_line(&mut echo, &format!("while locked {i}")),
            format!("WHILE LOCKED {i}")
        );
    }
    let mut other = server.connect_bank();
    assert_eq!(request_line(&mut other, "PING"), "PONG");
    assert_eq!(
        cluster.workers_waiting_on_locks(&database),
        1,
        "the deposit still waits"
    );
    assert_unanswered(&mut stuck);
    drop(lock);
    assert_eq!(
        read_line(&mut stuck),
        "OK 15",
        "answered once the lock is gone"
    );
}

/// Nothing has arrived on `stream` yet.
fn assert_unanswered(stream: &mut TcpStream) {
    stream.set_nonblocking(true).expect("set non-blocking");
    let mut byte = [0u8; 1];
    match stream.read(&mut byte) {
        Err(e) if e.kind() == ErrorKind::WouldBlock => {}
        other => panic!("expected no reply yet, got {other:?} {byte:?}"),
    }
    stream.set_nonblocking(false).expect("set blocking");
}

/// Opening balance of the two accounts the exact client moves money between.
const EXACT_OPENING: u64 = 1_000_000;

#[test]
fn sigusr2_on_a_postgresql_ledger_hands_over_every_connection_and_loses_no_transfer() {
    let Some(builder) = Server::builder().ledger(LedgerKind::Postgres) else {
        return;
    };
    let dir = Arc::new(tempfile::tempdir().expect("a temporary directory"));
    let pid_file = dir.path().join("forkpool.pid");
    let mut server = builder
        .data_dir(dir.clone())
        // Ample for a reply in flight on a busy machine, and shorter than the bench's run:
        // a connection left behind would be closed within it, and fail it.
        .args(["--graceful-timeout", "5"])
        .args(["--pid-file", pid_file.to_str().expect("UTF-8 path")])
        .start();
    let old_pid = server.pid;
    let addr = server.bank_addr();
    let mut bank = server.connect_bank();
    for account in ["exact-a", "exact-b"] {
        assert_eq!(
            request_line(&mut bank, &format!("DEPOSIT {account} {EXACT_OPENING}")),
            format!("OK {EXACT_OPENING}")
        );
    }
    drop(bank);
    let (done, stop) = (AtomicU64::new(0), AtomicBool::new(false));
    let (report, code, transfers, new_pid) = std::thread::scope(|scope| {
        let exact = scope.spawn(|| exact_transfers(addr, &done, &stop));
        let bench = scope.spawn(|| {
            // Every connection must be handed over: a close by the server is an error.
            bench_json(&[
                "bank",
                "--addr",
                &addr.to_string(),
                "-c",
                "8",
                "-P",
                "2",
                "-d",
                "6",
                "--threads",
                "1",
                "--accounts",
                "20",
                "--no-reconnect",
            ])
        });
        server.wait_log(log_phrase::ACCEPTED_BANK, WAIT);
        wait_until("transfers before the upgrade", WAIT, || {
            (done.load(SeqCst) >= 20).then_some(())
        });
        server.signal(Signal::SIGUSR2);
        let new_pid = ready_pid(&server.next_ready_line(WAIT));
        assert_ne!(new_pid, old_pid, "the ready line names the new master");
        assert!(
            server.wait_exit(WAIT).success(),
            "the old master drains and exits 0"
        );
        let before = done.load(SeqCst);
        wait_until(
            "transfers on the same connection after the upgrade",
            WAIT,
            || (done.load(SeqCst) >= before + 20).then_some(()),
        );
        let (report, code) = bench.join().expect("the bench thread");
        stop.store(true, SeqCst);
        let transfers = exact.join().expect("the exact client does not panic");
        (report, code, transfers, new_pid)
    });
    assert_eq!(code, 0, "forkpool-bench across the upgrade: {report}");
    assert_eq!(json_field(&report, "audit_ok"), true, "{report}");
    assert_eq!(json_field(&report, "difference"), 0, "{report}");
    assert_eq!(json_field(&report, "unknown_ops"), 0, "{report}");
    assert!(json_number(&report, "applied") > 0.0, "{report}");
    // The new master serves the same ledger: every acknowledged transfer is in it.
    let mut bank = server.connect_bank();
    assert_eq!(
        request_line(&mut bank, "BALANCE exact-a"),
        format!("OK {}", EXACT_OPENING - transfers)
    );
    assert_eq!(
        request_line(&mut bank, "BALANCE exact-b"),
        format!("OK {}", EXACT_OPENING + transfers)
    );
    wait_until("the pid file to name the new master", WAIT, || {
        let text = std::fs::read_to_string(&pid_file).ok()?;
        (text.trim() == new_pid.to_string()).then_some(())
    });
    // The new master is not the harness's child: stop it through its pid.
    nix::sys::signal::kill(new_pid, Signal::SIGTERM).expect("signal the new master");
    wait_until(
        "the new master to exit and remove its pid file",
        WAIT,
        || (!pid_file.exists()).then_some(()),
    );
    eprintln!("{transfers} exact transfers on one connection across the upgrade");
}

/// Moves 1 from `exact-a` to `exact-b` over and over on one connection until `stop`,
/// checking each reply against the balances it must show; counts them in `done` and returns
/// how many there were. A dropped connection fails the test: it must be handed over.
fn exact_transfers(addr: SocketAddr, done: &AtomicU64, stop: &AtomicBool) -> u64 {
    let mut stream = connect(addr);
    let mut transfers = 0;
    while !stop.load(SeqCst) {
        transfers += 1;
        assert_eq!(
            request_line(&mut stream, "TRANSFER exact-a exact-b 1"),
            format!(
                "OK {} {}",
                EXACT_OPENING - transfers,
                EXACT_OPENING + transfers
            ),
            "transfer {transfers}"
        );
        done.store(transfers, SeqCst);
    }
    transfers
}
