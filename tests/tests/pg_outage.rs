//! The PostgreSQL ledger's database stops under load (`pg_ctl stop -m immediate`, as when the
//! database machine fails) and comes back: every bank reply is `OK` or `ERR unavailable`,
//! echo keeps answering meanwhile, the bank serves again by itself, and the final AUDIT is
//! exactly the sum of the acknowledged deposits. Its own test binary: the cluster it stops is
//! this binary's.

use std::io::{BufRead, BufReader, Write};
use std::net::TcpStream;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::SeqCst};
use std::time::Duration;

use forkpool_testkit::{request_line, wait_until, LedgerKind, Server};

const CLIENTS: usize = 8;
/// Longest wait for one reply: a deposit whose commit outcome became unknown is answered
/// once the database is back and can say what happened.
const REPLY_TIMEOUT: Duration = Duration::from_secs(120);
const WAIT: Duration = Duration::from_secs(120);

/// What the load clients saw, all together.
#[derive(Default)]
struct Seen {
    ok: AtomicU64,
    unavailable: AtomicU64,
}

#[test]
fn a_database_stopped_under_load_costs_only_err_unavailable_and_service_resumes() {
    let Some(builder) = Server::builder().ledger(LedgerKind::Postgres) else {
        return;
    };
    let cluster = forkpool_testkit::pg::postgres().expect("the cluster the server uses");
    let server = builder.args(["--ledger-timeout", "0.5"]).start();
    let addr = server.bank_addr();
    let (seen, stop) = (Seen::default(), AtomicBool::new(false));
    let acked: Vec<u64> = std::thread::scope(|scope| {
        let clients: Vec<_> = (0..CLIENTS)
            .map(|client| {
                let (seen, stop) = (&seen, &stop);
                scope.spawn(move || deposit_until(addr, client, seen, stop))
            })
            .collect();
        wait_until("deposits before the outage", WAIT, || {
            (seen.ok.load(SeqCst) >= 100).then_some(())
        });
        cluster.stop_immediate();
        wait_until("ERR unavailable during the outage", WAIT, || {
            (seen.unavailable.load(SeqCst) >= CLIENTS as u64).then_some(())
        });
        let mut echo = server.connect_echo();
        assert_eq!(request_line(&mut echo, "still here"), "STILL HERE");
        cluster.start();
        let before = seen.ok.load(SeqCst);
        wait_until("deposits after the database is back", WAIT, || {
            (seen.ok.load(SeqCst) >= before + 100).then_some(())
        });
        stop.store(true, SeqCst);
        clients
            .into_iter()
            .map(|client| client.join().expect("a load client does not panic"))
            .collect()
    });
    let total: u64 = acked.iter().sum();
    let accounts = acked.iter().filter(|&&n| n > 0).count();
    let mut bank = server.connect_bank();
    assert_eq!(
        request_line(&mut bank, "AUDIT"),
        format!("OK {total} {accounts}"),
        "the ledger holds exactly the acknowledged deposits"
    );
    eprintln!(
        "{total} deposits acknowledged, {} answered ERR unavailable",
        seen.unavailable.load(SeqCst)
    );
}

/// Deposits 1 into the client's own account, one request at a time, until `stop`; returns
/// how many were acknowledged. Any reply but `OK` or `ERR unavailable`, or a dropped
/// connection, fails the test.
fn deposit_until(addr: std::net::SocketAddr, client: usize, seen: &Seen, stop: &AtomicBool) -> u64 {
    let stream = TcpStream::connect(addr).expect("connect to the bank");
    stream
        .set_read_timeout(Some(REPLY_TIMEOUT))
        .expect("set a read timeout");
    let mut reader = BufReader::new(stream.try_clone().expect("clone the stream"));
    let mut writer = stream;
    let request = format!("DEPOSIT client{client} 1\n");
    let mut acked = 0;
    while !stop.load(SeqCst) {
        writer
            .write_all(request.as_bytes())
            .expect("send a deposit");
        let mut reply = String::new();
        reader.read_line(&mut reply).expect("read a reply");
        if reply.starts_with("OK ") {
            acked += 1;
            assert_eq!(reply.trim_end(), format!("OK {acked}"), "client {client}");
            seen.ok.fetch_add(1, SeqCst);
        } else if reply.starts_with("ERR unavailable ") {
            seen.unavailable.fetch_add(1, SeqCst);
        } else {
            panic!("client {client}: unexpected reply {reply:?}");
        }
    }
    acked
}
