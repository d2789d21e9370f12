//! Two forkpool instances sharing one PostgreSQL ledger (the same database): clients spread
//! over both move money at random among a fixed set of accounts, and at the end AUDIT, asked
//! of either instance, is exactly the opening total and every account holds its opening
//! balance plus every acknowledged transfer; the same while workers of both instances are
//! SIGKILLed every ~100 ms; and `forkpool-bench bank` spreading its connections over both
//! itself, and through HAProxy in front of both.
//! Its own test binary: its PostgreSQL cluster serves only these tests.

use std::io::{BufRead, BufReader, ErrorKind, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering::SeqCst};
use std::time::{Duration, Instant};

use forkpool_testkit::haproxy::{Haproxy, SendProxy, Service};
use forkpool_testkit::pg::{self, PgCluster};
use forkpool_testkit::{
    bench_json, json_field, json_number, log_phrase, request_line, subset_reaching, wait_until,
    Rng, Server, Signal, Transfer,
};
use nix::sys::signal::kill;
use nix::unistd::Pid;

/// Accounts the clients move money between.
const ACCOUNTS: usize = 100;
/// Concurrent clients, each on its own connection, spread evenly over the instances.
const CLIENTS: usize = 8;
/// Opening balance of every account (plus its index). Balances dwarf amounts, so no
/// transfer is ever refused for lack of funds.
const OPENING_BALANCE: u64 = 1_000_000_000;
/// Largest amount of one transfer: large random amounts make a lost transfer stand out.
const MAX_TRANSFER: u64 = 1_000_000;
/// How long a client waits for one reply before declaring the server stuck.
const REPLY_TIMEOUT: Duration = Duration::from_secs(20);
const WAIT: Duration = Duration::from_secs(30);

/// Two instances on one fresh database of this binary's cluster, with `args`; `None` when
/// PostgreSQL is not installed (a failure under `CI`). Started one after the other: the
/// first creates the schema, the second finds it.
fn two_instances(args: &[&str]) -> Option<(&'static PgCluster, Vec<Server>)> {
    let cluster = pg::postgres()?;
    let url = cluster.url(&cluster.new_database());
    let instances = (0..2)
        .map(|_| {
            Server::builder()
                .args(["--ledger", url.as_str(), "--workers", "2"])
                .args(args.iter().copied())
                .start()
        })
        .collect();
    Some((cluster, instances))
}

fn account_name(index: usize) -> String {
    format!("acct-{index:02}")
}

/// Opens every account through `bank` (one instance: the other sees them, the database is
/// the same) and returns the opening balances.
fn open_accounts(bank: &mut TcpStream) -> Vec<u64> {
    (0..ACCOUNTS)
        .map(|index| {
            let balance = OPENING_BALANCE + index as u64;
            let request = format!("DEPOSIT {} {balance}", account_name(index));
            assert_eq!(request_line(bank, &request), format!("OK {balance}"));
            balance
        })
        .collect()
}

/// What one client saw.
#[derive(Debug, Default)]
struct Tally {
    /// Transfers answered `OK`.
    acked: Vec<Transfer>,
    /// Transfers whose connection dropped before the reply: applied or not (one per drop).
    unknown: Vec<Transfer>,
}

/// A client's connection, with a reply timeout.
struct Connection {
    reader: BufReader<TcpStream>,
    writer: TcpStream,
}

impl Connection {
    /// Connects to `addr`, retrying while a killed worker's slot waits for its replacement.
    fn open(addr: SocketAddr) -> Connection {
        let stream = wait_until("a connection to the bank", REPLY_TIMEOUT, || {
            TcpStream::connect_timeout(&addr, REPLY_TIMEOUT).ok()
        });
        stream
            .set_read_timeout(Some(REPLY_TIMEOUT))
            .expect("set a read timeout");
        stream.set_nodelay(true).expect("set TCP_NODELAY");
        let writer = stream.try_clone().expect("clone the stream");
        Connection {
            reader: BufReader::new(stream),
            writer,
        }
    }

    /// Sends one request and reads its reply line; `None` if the connection dropped (EOF or
    /// reset) first. No reply within REPLY_TIMEOUT fails the test: the server is stuck.
    fn ask(&mut self, request: &str) -> Option<String> {
        self.writer.write_all(request.as_bytes()).ok()?;
        let mut reply = String::new();
        match self.reader.read_line(&mut reply) {
            Ok(_) if reply.ends_with('\n') => Some(reply.trim_end().to_string()),
            Ok(_) => None,
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                panic!("no reply to {request:?} within {REPLY_TIMEOUT:?}: the server is stuck")
            }
            Err(_) => None,
        }
    }
}

/// One client: random transfers, one at a time, for as long as `more()` says. Every reply
/// must be `OK <from> <to>`; a dropped connection (a killed worker) makes its transfer
/// unknown and is replaced.
fn run_client(addr: SocketAddr, client: usize, mut more: impl FnMut() -> bool) -> Tally {
    let mut rng = Rng(client as u64 + 1);
    let mut tally = Tally::default();
    let mut connection = None;
    while more() {
        let from = rng.below(ACCOUNTS as u64) as usize;
        let to = (from + 1 + rng.below(ACCOUNTS as u64 - 1) as usize) % ACCOUNTS;
        let transfer = Transfer {
            from,
            to,
            amount: 1 + rng.below(MAX_TRANSFER),
        };
        let request = format!(
            "TRANSFER {} {} {}\n",
            account_name(from),
            account_name(to),
            transfer.amount
        );
        let open = connection.get_or_insert_with(|| Connection::open(addr));
        match open.ask(&request) {
            Some(reply) => {
                assert!(
                    is_transfer_ok(&reply),
                    "client {client}: {request:?} answered {reply:?}"
                );
                tally.acked.push(transfer);
            }
            None => {
                tally.unknown.push(transfer);
                connection = None;
            }
        }
    }
    tally
}

/// `OK <from_balance> <to_balance>`.
fn is_transfer_ok(reply: &str) -> bool {
    let Some(fields) = reply.strip_prefix("OK ") else {
        return false;
    };
    let balances: Vec<&str> = fields.split(' ').collect();
    balances.len() == 2 && balances.iter().all(|b| b.parse::<u64>().is_ok())
}

/// Runs CLIENTS clients, client `i` on instance `i % 2`, until `more` says stop, while
/// `meanwhile` runs on this thread; returns every client's tally.
fn spread_clients(
    instances: &[Server],
    more: impl Fn(usize) -> bool + Sync,
    meanwhile: impl FnOnce(),
) -> Vec<Tally> {
    let more = &more;
    std::thread::scope(|scope| {
        let clients: Vec<_> = (0..CLIENTS)
            .map(|client| {
                let addr = instances[client % instances.len()].bank_addr();
                scope.spawn(move || {
                    let mut done = 0;
                    run_client(addr, client, || {
                        done += 1;
                        more(done)
                    })
                })
            })
            .collect();
        meanwhile();
        clients
            .into_iter()
            .map(|client| client.join().expect("a client does not panic"))
            .collect()
    })
}

/// The final check, asked of both instances: AUDIT is exactly the opening total over
/// ACCOUNTS accounts; every account holds its opening balance plus every acknowledged
/// transfer plus some subset of the unknown ones that touched it (none without a kill).
/// Returns how many transfers were acknowledged.
fn check_ledger(instances: &[Server], initial: &[u64], tallies: &[Tally]) -> usize {
    let total: u128 = initial.iter().map(|&b| u128::from(b)).sum();
    let acked: Vec<&Transfer> = tallies.iter().flat_map(|t| &t.acked).collect();
    let unknown: Vec<&Transfer> = tallies.iter().flat_map(|t| &t.unknown).collect();
    for server in instances {
        let mut bank = server.connect_bank();
        assert_eq!(
            request_line(&mut bank, "AUDIT"),
            format!("OK {total} {ACCOUNTS}"),
            "AUDIT asked of instance {}",
            server.pid
        );
        for (account, &opening) in initial.iter().enumerate() {
            let reply = request_line(&mut bank, &format!("BALANCE {}", account_name(account)));
            let balance: i128 = reply
                .strip_prefix("OK ")
                .and_then(|b| b.parse().ok())
                .unwrap_or_else(|| panic!("BALANCE answered {reply:?}"));
            let expected =
                i128::from(opening) + acked.iter().map(|t| t.delta(account)).sum::<i128>();
            let difference = balance - expected;
            let candidates: Vec<i128> = unknown
                .iter()
                .map(|t| t.delta(account))
                .filter(|&d| d != 0)
                .collect();
            assert!(
                subset_reaching(&candidates, difference).is_some(),
                "{} holds {balance}, but its opening balance and the acknowledged transfers \
                 make {expected}; no subset of its transfers cut by a kill {candidates:?} \
                 explains the difference {difference}",
                account_name(account)
            );
        }
    }
    acked.len()
}

#[test]
fn two_instances_on_one_database_conserve_money_and_keep_every_acknowledged_transfer() {
    const TRANSFERS_PER_CLIENT: usize = 150;
    let Some((_, instances)) = two_instances(&[]) else {
        return;
    };
    let initial = open_accounts(&mut instances[0].connect_bank());
    let tallies = spread_clients(&instances, |done| done <= TRANSFERS_PER_CLIENT, || ());
    let unknown: usize = tallies.iter().map(|t| t.unknown.len()).sum();
    assert_eq!(unknown, 0, "no connection may drop without a crash");
    let acked = check_ledger(&instances, &initial, &tallies);
    assert_eq!(acked, CLIENTS * TRANSFERS_PER_CLIENT);
    for server in &instances {
        server.wait_log(forkpool_testkit::log_phrase::ACCEPTED_BANK, WAIT);
    }
    eprintln!("{acked} transfers over two instances, every one in the balances, AUDIT exact");
}

#[test]
fn workers_of_both_instances_sigkilled_every_hundred_ms_lose_no_money_and_no_acknowledged_transfer()
{
    const CHAOS: Duration = Duration::from_secs(4);
    const MIN_KILLS: usize = 30;
    let Some((cluster, instances)) = two_instances(&[]) else {
        return;
    };
    let initial = open_accounts(&mut instances[0].connect_bank());
    let stop = AtomicBool::new(false);
    let mut kills = [0usize; 2];
    let tallies = spread_clients(
        &instances,
        |_| !stop.load(SeqCst),
        || {
            kill_workers_until(&instances, CHAOS, MIN_KILLS, &mut kills);
            stop.store(true, SeqCst);
        },
    );
    for server in &instances {
        server.wait_workers(2, WAIT);
    }
    // A killed worker's transaction may still commit until its backend sees the end of the
    // connection: only then are the unknown transfers settled.
    cluster.wait_dead_workers_gone();
    let acked = check_ledger(&instances, &initial, &tallies);
    let unknown: usize = tallies.iter().map(|t| t.unknown.len()).sum();
    eprintln!(
        "{kills:?} workers SIGKILLed per instance; {acked} transfers acknowledged, {unknown} \
         cut by a kill; AUDIT exact on both"
    );
    assert!(kills.iter().all(|&k| k > 0), "kills per instance {kills:?}");
    assert!(unknown > 0, "no kill hit a loaded worker");
    assert!(acked > 0, "no transfer was acknowledged");
}

/// SIGKILLs a random serving worker of a random instance every ~100 ms, for at least
/// `chaos` and `min_kills` kills, counting kills per instance. Only workers that logged
/// they serve: one killed before it is ready counts as a crash and delays its replacement
/// (back-off), which is the supervisor's business, not this test's.
fn kill_workers_until(
    instances: &[Server],
    chaos: Duration,
    min_kills: usize,
    kills: &mut [usize],
) {
    let mut rng = Rng(0xdead_beef);
    let started = Instant::now();
    while started.elapsed() < chaos || kills.iter().sum::<usize>() < min_kills {
        assert!(
            started.elapsed() < chaos * 20,
            "only {kills:?} kills in {:?}: no worker became ready to kill",
            started.elapsed()
        );
        std::thread::sleep(Duration::from_millis(50 + rng.below(100)));
        let instance = rng.below(instances.len() as u64) as usize;
        let server = &instances[instance];
        let serving = server.pids_logging("] serving");
        let candidates: Vec<Pid> = server
            .workers()
            .into_iter()
            .filter(|pid| serving.contains(pid))
            .collect();
        if candidates.is_empty() {
            continue;
        }
        let victim = candidates[rng.below(candidates.len() as u64) as usize];
        if kill(victim, Signal::SIGKILL).is_ok() {
            kills[instance] += 1;
        }
    }
}

#[test]
fn forkpool_bench_bank_given_both_addresses_spreads_its_connections_and_audits_exact() {
    let Some((_, instances)) = two_instances(&[]) else {
        return;
    };
    let addrs: Vec<String> = instances
        .iter()
        .map(|server| server.bank_addr().to_string())
        .collect();
    let pids: Vec<String> = instances
        .iter()
        .map(|server| server.pid.to_string())
        .collect();
    let report = exact_bank_run(&[
        "--addr",
        &addrs[0],
        "--addr",
        &addrs[1],
        "--server-pid",
        &pids[0],
        "--server-pid",
        &pids[1],
    ]);
    assert_eq!(json_field(&report, "addr"), &addrs.join(","), "{report}");
    // Two masters and their two workers each, measured together.
    assert!(json_number(&report, "server_processes") >= 6.0, "{report}");
    assert!(json_number(&report, "server_cpu_us") > 0.0, "{report}");
    // Round robin: four of the eight load connections on each instance (the setup's and
    // the audit's come on top, on the first).
    for server in &instances {
        assert!(
            server.log_count(log_phrase::ACCEPTED_BANK) >= 4,
            "{}",
            server.output()
        );
    }
    let mut bank = instances[1].connect_bank();
    assert_eq!(
        request_line(&mut bank, "AUDIT"),
        format!(
            "OK {} {}",
            json_field(&report, "audit_total"),
            json_field(&report, "audit_accounts")
        ),
        "the second instance audits the same ledger"
    );
}

#[test]
fn forkpool_bench_bank_through_haproxy_in_front_of_two_instances_audits_exact() {
    let Some((_, instances)) = two_instances(&["--proxy-protocol", "bank"]) else {
        return;
    };
    let Some(haproxy) = Haproxy::start(&[Service {
        name: "bank",
        servers: instances.iter().map(Server::bank_addr).collect(),
        send_proxy: SendProxy::V2,
        tls_ca: None,
    }]) else {
        return;
    };
    haproxy.wait_all_up("bank", WAIT);
    let addr = haproxy.addr("bank").to_string();
    let report = exact_bank_run(&["--addr", &addr]);
    // HAProxy spreads these connections over both instances (round robin): each one
    // audits the one database and finds the total the bench checked.
    let audit = format!(
        "OK {} {}",
        json_field(&report, "audit_total"),
        json_field(&report, "audit_accounts")
    );
    for _ in 0..4 {
        let mut bank = forkpool_testkit::connect(haproxy.addr("bank"));
        assert_eq!(request_line(&mut bank, "AUDIT"), audit);
    }
    eprintln!(
        "forkpool-bench bank through HAProxy: {} operations applied, {audit} exact",
        json_number(&report, "applied")
    );
}

/// A short `forkpool-bench bank` run (8 connections, pipeline 4, 2 s, 20 accounts) with
/// `targets` (addresses, server pids): it must exit 0 with its audit exact and no operation of
/// unknown outcome. Returns its JSON report.
fn exact_bank_run(targets: &[&str]) -> serde_json::Value {
    let load = ["-c", "8", "-P", "4", "-d", "2", "--accounts", "20"];
    let args: Vec<&str> = std::iter::once("bank")
        .chain(targets.iter().copied())
        .chain(load)
        .collect();
    let (report, code) = bench_json(&args);
    assert_eq!(code, 0, "{report}");
    assert_eq!(json_field(&report, "audit_ok"), true, "{report}");
    assert_eq!(json_field(&report, "difference"), 0, "{report}");
    assert_eq!(json_field(&report, "unknown_ops"), 0, "{report}");
    assert!(json_number(&report, "applied") > 100.0, "{report}");
    report
}
