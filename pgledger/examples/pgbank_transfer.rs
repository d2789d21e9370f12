//! Benchmark driver: random TRANSFERs through one PgBank pool from N client threads, each
//! waiting for its reply before sending the next (as N bank connections of a worker would),
//! for a fixed time; prints one line with the requests per second. `--setup` creates the
//! schema and the accounts first. `--open` sends DEPOSITs that each open a new account
//! instead (the cost of the capacity row that every creation updates). Run by
//! `bench/pgbench_transfer.sh`.
//!
//! Usage: pgbank_transfer --url URL --clients N [--connections N] [--seconds S]
//!        [--accounts N] [--setup | --open]

use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::time::{Duration, Instant};

use forkpool_common::bank::{AccountName, Reply};
use forkpool_pgledger::{Change, LedgerOp, PgSettings, Teller};

/// Balance each account starts with: far more than the run can move out of it.
const INITIAL_BALANCE: u64 = 1_000_000_000_000;
/// The benchmark ledger's capacity: never the limit.
const MAX_ACCOUNTS: u64 = 100_000_000;
/// Longest wait for one reply before the run is declared failed.
const REPLY_TIMEOUT: Duration = Duration::from_secs(30);

struct Args {
    url: String,
    clients: usize,
    connections: Option<usize>,
    seconds: u64,
    accounts: usize,
    setup: bool,
    open: bool,
}

fn parse_args() -> Result<Args, String> {
    let mut args = Args {
        url: String::new(),
        clients: 16,
        connections: None,
        seconds: 10,
        accounts: 10_000,
        setup: false,
        open: false,
    };
    let mut words = std::env::args().skip(1);
    while let Some(flag) = words.next() {
        if flag == "--setup" || flag == "--open" {
            args.setup |= flag == "--setup";
            args.open |= flag == "--open";
            continue;
        }
        let value = words.next().ok_or(format!("{flag} needs a value"))?;
        let number = || {
            value
                .parse::<usize>()
                .map_err(|_| format!("{flag}: not a number"))
        };
        match flag.as_str() {
            "--url" => args.url = value.clone(),
            "--clients" => args.clients = number()?,
            "--connections" => args.connections = Some(number()?),
            "--seconds" => args.seconds = number()? as u64,
            "--accounts" => args.accounts = number()?,
            _ => return Err(format!("unknown flag {flag}")),
        }
    }
    if args.url.is_empty() || args.clients == 0 || args.accounts < 2 {
        return Err("--url is required; --clients >= 1, --accounts >= 2".to_string());
    }
    Ok(args)
}

/// The benchmark's account names, zero-padded so that name order is number order (the
/// pgbench script builds the same names).
fn account(i: usize) -> AccountName {
    format!("a{i:06}").parse().expect("a valid account name")
}

fn setup(teller: &Teller, accounts: usize) -> Result<(), String> {
    for i in 0..accounts {
        let op = LedgerOp::Change(Change::Deposit {
            acct: account(i),
            amount: INITIAL_BALANCE,
        });
        match teller.call(op, REPLY_TIMEOUT) {
            Some(Reply::Ok(_)) => {}
            other => return Err(format!("setup deposit answered {other:?}")),
        }
    }
    Ok(())
}

fn run(args: &Args) -> Result<(), String> {
    // Room for the accounts of the setup and every one --open may create.
    let mut settings = PgSettings::from_url(&args.url, MAX_ACCOUNTS).map_err(|e| e.to_string())?;
    settings.connections = args.connections.unwrap_or(args.clients);
    settings.deadline = REPLY_TIMEOUT;
    if args.setup {
        forkpool_pgledger::prepare(&settings).map_err(|e| e.to_string())?;
    }
    let teller = Teller::start(settings.clone()).map_err(|e| e.to_string())?;
    if args.setup {
        setup(&teller, args.accounts)?;
        return Ok(());
    }
    let (stop, done, failed) = (AtomicBool::new(false), AtomicU64::new(0), AtomicU64::new(0));
    let start = Instant::now();
    std::thread::scope(|scope| {
        for client in 0..args.clients {
            let (teller, stop, done, failed) = (&teller, &stop, &done, &failed);
            scope.spawn(move || {
                let mut rng = fastrand::Rng::with_seed(client as u64);
                for k in 0.. {
                    if stop.load(Relaxed) {
                        break;
                    }
                    let op = if args.open {
                        LedgerOp::Change(Change::Deposit {
                            acct: format!("n{client}_{k}").parse().expect("a valid name"),
                            amount: 1,
                        })
                    } else {
                        let from = rng.usize(..args.accounts);
                        let to = (from + 1 + rng.usize(..args.accounts - 1)) % args.accounts;
                        LedgerOp::Change(Change::Transfer {
                            from: account(from),
                            to: account(to),
                            amount: rng.u64(1..=100),
                        })
                    };
                    match teller.call(op, REPLY_TIMEOUT) {
                        Some(Reply::OkPair(..) | Reply::Ok(_)) => done.fetch_add(1, Relaxed),
                        other => {
                            if failed.fetch_add(1, Relaxed) == 0 {
                                eprintln!("pgbank_transfer: first failure: {op:?} -> {other:?}");
                            }
                            0
                        }
                    };
                }
            });
        }
        std::thread::sleep(Duration::from_secs(args.seconds));
        stop.store(true, Relaxed);
    });
    let elapsed = start.elapsed().as_secs_f64();
    let done = done.load(Relaxed);
    let stats = teller.bank.stats();
    println!(
        "pgbank {} clients={} connections={} requests={done} failed={} seconds={elapsed:.1} \
         tps={:.0} retries={}",
        if args.open { "open" } else { "transfer" },
        args.clients,
        settings.connections,
        failed.load(Relaxed),
        done as f64 / elapsed,
        stats.retries
    );
    Ok(())
}

fn main() -> ExitCode {
    match parse_args().and_then(|args| run(&args)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("pgbank_transfer: {e}");
            ExitCode::FAILURE
        }
    }
}
