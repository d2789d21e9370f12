//! Lossless worker replacement: a live connection survives recycling, TTIN/TTOU, a reload
//! and a binary upgrade. These clients never reconnect, so any close, reset, missing or
//! wrong reply is a failure; the bank's total is checked to the unit.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::SeqCst};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use forkpool_testkit::{
    connect, http_request, log_phrase, read_line, request_line, socket_owner, wait_until, Server,
    Signal,
};

const WAIT: Duration = Duration::from_secs(20);
/// Long-lived clients send a request this often.
const PACE: Duration = Duration::from_millis(50);

/// What every client shares: a stop flag, the requests answered (all, and those of the
/// long-lived clients, which pace themselves), and the failures seen.
#[derive(Default)]
struct Clients {
    stop: AtomicBool,
    answered: AtomicU64,
    paced: AtomicU64,
    failures: Mutex<Vec<String>>,
}

impl Clients {
    fn fail(&self, what: String) {
        if let Ok(mut failures) = self.failures.lock() {
            failures.push(what);
        }
    }

    /// Waits until the long-lived clients have had `more` requests answered: every one of
    /// them has then lived through what happened before.
    fn wait_for(&self, more: u64) {
        let target = self.paced.load(SeqCst) + more;
        wait_until(&format!("{more} more paced answers"), WAIT, || {
            (self.paced.load(SeqCst) >= target).then_some(())
        });
    }

    fn count(&self, paced: bool) {
        self.answered.fetch_add(1, SeqCst);
        if paced {
            self.paced.fetch_add(1, SeqCst);
        }
    }
}

/// Reads exactly one line, or says why not (EOF, reset, timeout) without panicking.
fn try_read_line(stream: &mut TcpStream) -> Result<String, String> {
    let mut line = Vec::new();
    let mut byte = [0u8; 1];
    loop {
        match stream.read(&mut byte) {
            Ok(0) => return Err(format!("closed by the server after {line:?}")),
            Ok(_) if byte[0] == b'\n' => return Ok(String::from_utf8_lossy(&line).into()),
            Ok(_) => line.push(byte[0]),
            Err(e) => return Err(format!("{e} after {line:?}")),
        }
    }
}

/// One connection for the whole test: a line every PACE, each reply awaited and checked.
fn long_lived_echo(addr: SocketAddr, id: usize, clients: &Clients) {
    let mut stream = connect(addr);
    let mut n = 0u64;
    while !clients.stop.load(SeqCst) {
        let line = format!("client {id} line {n} straße");
        let sent = stream.write_all(format!("{line}\n").as_bytes());
        match sent
            .map_err(|e| e.to_string())
            .and_then(|()| try_read_line(&mut stream))
        {
            Ok(reply) if reply == line.to_uppercase() => clients.count(true),
            Ok(reply) => return clients.fail(format!("echo {id}: {line:?} got {reply:?}")),
            Err(e) => return clients.fail(format!("echo {id} request {n}: {e}")),
        }
        n += 1;
        std::thread::sleep(PACE);
    }
}

/// Connect, send ten lines at once, read ten replies, close; again and again.
fn short_lived_echo(addr: SocketAddr, id: usize, clients: &Clients) {
    let mut round = 0u64;
    while !clients.stop.load(SeqCst) {
        let mut stream = connect(addr);
        let lines: Vec<String> = (0..10).map(|i| format!("s{id} r{round} l{i} é")).collect();
        let request: String = lines.iter().map(|l| format!("{l}\n")).collect();
        if let Err(e) = stream.write_all(request.as_bytes()) {
            return clients.fail(format!("short {id} round {round}: send: {e}"));
        }
        for line in &lines {
            match try_read_line(&mut stream) {
                Ok(reply) if reply == line.to_uppercase() => clients.count(false),
                Ok(reply) => return clients.fail(format!("short {id}: {line:?} got {reply:?}")),
                Err(e) => return clients.fail(format!("short {id} round {round}: {e}")),
            }
        }
        round += 1;
    }
}

/// One bank connection for the whole test, on two accounts of its own: every reply is
/// known in advance. Returns the balances it ended with.
fn long_lived_bank(addr: SocketAddr, id: usize, clients: &Clients) -> (u64, u64) {
    let (a, b) = (format!("h{id}a"), format!("h{id}b"));
    let mut stream = connect(addr);
    for account in [&a, &b] {
        let opened = request_line(&mut stream, &format!("DEPOSIT {account} 10"));
        assert_eq!(opened, "OK 10", "bank {id} opens {account}");
    }
    let (mut bal_a, mut bal_b) = (10u64, 10u64);
    let mut n = 0u64;
    while !clients.stop.load(SeqCst) {
        let amount = 1 + n % 7;
        let (request, expected) = match n % 3 {
            0 => {
                bal_a += amount;
                (format!("DEPOSIT {a} {amount}"), format!("OK {bal_a}"))
            }
            1 if bal_a >= amount => {
                bal_a -= amount;
                bal_b += amount;
                (
                    format!("TRANSFER {a} {b} {amount}"),
                    format!("OK {bal_a} {bal_b}"),
                )
            }
            _ if bal_b >= 1 => {
                bal_b -= 1;
                (format!("WITHDRAW {b} 1"), format!("OK {bal_b}"))
            }
            _ => (format!("BALANCE {a}"), format!("OK {bal_a}")),
        };
        let sent = stream.write_all(format!("{request}\n").as_bytes());
        match sent
            .map_err(|e| e.to_string())
            .and_then(|()| try_read_line(&mut stream))
        {
            Ok(reply) if reply == expected => clients.count(true),
            Ok(reply) => {
                clients.fail(format!(
                    "bank {id}: {request:?} got {reply:?}, not {expected:?}"
                ));
                break;
            }
            Err(e) => {
                clients.fail(format!("bank {id}: {request:?}: {e}"));
                break;
            }
        }
        n += 1;
        std::thread::sleep(PACE);
    }
    (bal_a, bal_b)
}

/// A counter of the status page.
fn metric(status: SocketAddr, series: &str) -> u64 {
    let (code, body) = http_request(status, "GET", "/metrics");
    assert_eq!(code, 200);
    body.lines()
        .find_map(|line| line.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or_else(|| panic!("no {series} in {body}"))
}

#[test]
fn no_client_notices_recycling_ttin_ttou_a_reload_or_an_upgrade() {
    let dir = Arc::new(tempfile::tempdir().expect("a temporary directory"));
    let config = dir.path().join("forkpool.toml");
    std::fs::write(&config, "idle_timeout = 300\n").expect("write the settings file");
    let server = Server::builder()
        .data_dir(Arc::clone(&dir))
        .args(["--workers", "3", "--max-requests", "150"])
        .args([
            "--max-requests-jitter",
            "50",
            "--status-addr",
            "127.0.0.1:0",
        ])
        .args(["--config", config.to_str().expect("UTF-8 path")])
        .start();
    let (echo, bank) = (server.echo_addr(), server.bank_addr());
    let clients = Clients::default();
    let balances = std::thread::scope(|scope| {
        for id in 0..3 {
            let clients = &clients;
            scope.spawn(move || long_lived_echo(echo, id, clients));
            scope.spawn(move || short_lived_echo(echo, id, clients));
        }
        let bankers: Vec<_> = (0..3)
            .map(|id| {
                let clients = &clients;
                scope.spawn(move || long_lived_bank(bank, id, clients))
            })
            .collect();
        clients.wait_for(40);
        server.signal(Signal::SIGTTIN);
        // Settled, not a bare count (which can match half-way through a resize and let the
        // next signal merge with this one).
        server.wait_settled(4, WAIT);
        clients.wait_for(40);
        for count in [3, 2] {
            server.signal(Signal::SIGTTOU);
            server.wait_settled(count, WAIT);
            clients.wait_for(40);
        }
        server.signal(Signal::SIGHUP);
        server.wait_log("SIGHUP: reloaded", WAIT);
        clients.wait_for(40);
        let status = server.status_addr();
        assert!(
            metric(
                status,
                "forkpool_worker_restarts_total{reason=\"recycled\"}"
            ) > 0
        );
        let handed_over = metric(
            status,
            "forkpool_connections_handed_over_total{service=\"echo\"}",
        ) + metric(
            status,
            "forkpool_connections_handed_over_total{service=\"bank\"}",
        );
        assert!(handed_over > 0, "no connection was handed over");
        for service in ["echo", "bank"] {
            let series = format!(
                "forkpool_connections_closed_by_replacement_total{{service=\"{service}\"}}"
            );
            assert_eq!(metric(status, &series), 0, "{series}");
        }
        server.signal(Signal::SIGUSR2);
        server.next_ready_line(WAIT);
        clients.wait_for(40);
        clients.stop.store(true, SeqCst);
        bankers
            .into_iter()
            .map(|banker| banker.join().expect("a bank client does not panic"))
            .collect::<Vec<_>>()
    });
    let failures = clients.failures.lock().expect("no client panicked").clone();
    assert!(failures.is_empty(), "clients noticed: {failures:#?}");
    let expected: u64 = balances.iter().map(|(a, b)| a + b).sum();
    let mut stream = connect(bank);
    assert_eq!(
        request_line(&mut stream, "AUDIT"),
        format!("OK {expected} {}", 2 * balances.len())
    );
    eprintln!(
        "{} requests answered through recycling, TTIN, 2 TTOU, HUP and USR2; balances {balances:?}",
        clients.answered.load(SeqCst)
    );
}

#[test]
fn a_connection_handed_over_mid_character_mid_line_and_with_unread_replies_goes_on() {
    let server = Server::builder().args(["--output-limit", "65536"]).start();
    let old_workers = server.wait_workers(2, WAIT);
    let mut echo = server.connect_echo();
    let mut bank = server.connect_bank();
    // Half of "é" and half of a bank line, each read by its worker.
    echo.write_all(b"abc\xc3").expect("send");
    let mut upper = [0u8; 3];
    echo.read_exact(&mut upper)
        .expect("the part that can be answered");
    assert_eq!(&upper, b"ABC");
    bank.write_all(b"DEPOSIT hal").expect("send");
    // A third client sends far more than it reads: its worker holds unsent replies.
    let mut lazy = server.connect_echo();
    let burst: Vec<u8> = (0..20_000)
        .flat_map(|i| format!("lazy line {i:05}\n").into_bytes())
        .collect();
    let writer = {
        let mut lazy = lazy.try_clone().expect("clone");
        let burst = burst.clone();
        std::thread::spawn(move || lazy.write_all(&burst).expect("send the burst"))
    };
    server.wait_log(log_phrase::ACCEPTED_BANK, WAIT);
    // A reload replaces every worker: each connection must move.
    server.signal(Signal::SIGHUP);
    wait_until("the old workers to exit", WAIT, || {
        let now = server.workers();
        (now.len() == 2 && old_workers.iter().all(|w| !now.contains(w))).then_some(now)
    });
    echo.write_all(b"\xa9def\n").expect("send");
    assert_eq!(read_line(&mut echo), "ÉDEF");
    bank.write_all(b"f 5\n").expect("send");
    assert_eq!(read_line(&mut bank), "OK 5");
    assert_eq!(request_line(&mut bank, "BALANCE half"), "OK 5");
    let mut replies = vec![0u8; burst.len()];
    lazy.read_exact(&mut replies)
        .expect("every reply of the burst");
    assert!(
        replies == burst.to_ascii_uppercase(),
        "the burst's replies differ"
    );
    writer.join().expect("the writer finishes");
    let new_workers = server.workers();
    for stream in [&echo, &bank, &lazy] {
        assert!(
            socket_owner(stream, &new_workers).is_some(),
            "held by a new worker"
        );
    }
}

#[test]
fn an_upgrade_to_a_binary_of_another_format_closes_at_a_request_boundary_losing_nothing() {
    let mut server = Server::builder()
        .env("FORKPOOL_TEST_HANDOVER_VERSION", "99")
        .start();
    let mut streams: Vec<TcpStream> = (0..6).map(|_| server.connect_echo()).collect();
    for (i, stream) in streams.iter_mut().enumerate() {
        assert_eq!(
            request_line(stream, &format!("before {i}")),
            format!("BEFORE {i}")
        );
    }
    let mut halfway = server.connect_echo();
    halfway.write_all(b"half").expect("send");
    let mut echoed = [0u8; 4];
    halfway
        .read_exact(&mut echoed)
        .expect("the half line's echo");
    server.signal(Signal::SIGUSR2);
    server.next_ready_line(WAIT);
    server.wait_log("speaks hand-over format 99", WAIT);
    // A line under way is finished first: the close waits for the request boundary.
    halfway.write_all(b" and rest\n").expect("send");
    assert_eq!(read_line(&mut halfway), " AND REST");
    streams.push(halfway);
    // The old workers could not hand over: each connection is answered to its last request
    // and closed cleanly, never reset with a request unread.
    for (i, stream) in streams.iter_mut().enumerate() {
        let mut rest = Vec::new();
        stream
            .read_to_end(&mut rest)
            .unwrap_or_else(|e| panic!("connection {i}: a clean close, not {e}"));
        assert!(rest.is_empty(), "connection {i}: {rest:?}");
    }
    assert!(server.wait_exit(WAIT).success(), "the old master drains");
    let mut fresh = server.connect_echo();
    assert_eq!(request_line(&mut fresh, "after"), "AFTER");
}
