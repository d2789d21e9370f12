//! In-process ledger benchmark: operations per second of a deposit/transfer mix (and of
//! deposits alone) on a temporary ledger, with 1 process and with 2 forked processes, under
//! each fsync policy.
//!
//! ```text
//! cargo run --release -p forkpool-ledger --example ledger_bench [-- SECONDS_PER_RUN]
//! ```
//! Each process does half deposits and half transfers among 10,000 accounts (16 threads of
//! neither kind: one process, one thread). The ledger file lives in a fresh directory under
//! the current directory's `target/` (the page cache of a real disk, not tmpfs), or $TMPDIR.

use std::time::{Duration, Instant};

use forkpool_ledger::{AccountName, FsyncPolicy, Ledger, LedgerOptions};
use nix::sys::wait::{waitpid, WaitStatus};
use nix::unistd::{fork, ForkResult};

const ACCOUNTS: usize = 10_000;

#[derive(Clone, Copy)]
enum Mix {
    Deposits,
    DepositTransfer,
}

fn next(state: &mut u64) -> u64 {
    *state ^= *state << 13;
    *state ^= *state >> 7;
    *state ^= *state << 17;
    *state
}

/// Runs the mix until `until`; returns the number of operations done.
fn run(ledger: &Ledger, names: &[AccountName], mix: Mix, seed: u64, until: Instant) -> u64 {
    let mut rng = seed | 1;
    let mut ops = 0u64;
    while Instant::now() < until {
        for _ in 0..256 {
            let a = (next(&mut rng) % ACCOUNTS as u64) as usize;
            let b = (next(&mut rng) % ACCOUNTS as u64) as usize;
            let transfer = matches!(mix, Mix::DepositTransfer) && next(&mut rng) & 1 == 1;
            if transfer {
                let _ = ledger.transfer(&names[a], &names[b], 1);
            } else {
                let _ = ledger.deposit(&names[a], 1);
            }
            ops += 1;
        }
        // fsync=always: the batch is made durable by one flush (a group commit of 256
        // operations of this process), and the log is checkpointed when due.
        ledger.flush().expect("flush");
        ledger.checkpoint(false).expect("checkpoint");
    }
    ops
}

/// Ops/s with `procs` processes (the parent plus `procs - 1` forked children). Children report
/// their count through the exit of a pipe write.
fn measure(ledger: &Ledger, names: &[AccountName], mix: Mix, procs: usize, secs: f64) -> f64 {
    let until = Instant::now() + Duration::from_secs_f64(secs);
    let (read_end, write_end) = nix::unistd::pipe().expect("pipe");
    let mut children = Vec::new();
    for p in 1..procs {
        // SAFETY: this example is single-threaded, so the child may do anything.
        match unsafe { fork() }.expect("fork") {
            ForkResult::Child => {
                let ops = run(ledger, names, mix, p as u64 * 7919, until);
                let _ = nix::unistd::write(&write_end, &ops.to_le_bytes());
                std::process::exit(0);
            }
            ForkResult::Parent { child } => children.push(child),
        }
    }
    drop(write_end);
    let mut total = run(ledger, names, mix, 12345, until);
    for child in children {
        let mut buf = [0u8; 8];
        nix::unistd::read(std::os::fd::AsRawFd::as_raw_fd(&read_end), &mut buf).expect("read");
        total += u64::from_le_bytes(buf);
        assert!(matches!(waitpid(child, None), Ok(WaitStatus::Exited(_, 0))));
    }
    total as f64 / secs
}

fn main() {
    let secs: f64 = std::env::args()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(2.0);
    let base = std::path::Path::new("target");
    let dir = if base.is_dir() {
        tempfile::tempdir_in(base)
    } else {
        tempfile::tempdir()
    }
    .expect("tempdir");
    let names: Vec<AccountName> = (0..ACCOUNTS)
        .map(|i| AccountName::new(format!("acct{i}").as_bytes()).expect("name"))
        .collect();
    println!(
        "ledger_bench: {ACCOUNTS} accounts, {secs} s per run, {} CPUs",
        std::thread::available_parallelism().map_or(1, |n| n.get())
    );
    for fsync in [FsyncPolicy::Never, FsyncPolicy::Always] {
        let path = dir.path().join(format!("bench-{fsync}.bin"));
        let options = LedgerOptions {
            fsync,
            ..LedgerOptions::default()
        };
        let ledger = Ledger::open(&path, &options).expect("open");
        for name in &names {
            ledger.deposit(name, 1_000_000).expect("fund");
        }
        for (label, mix) in [
            ("deposit", Mix::Deposits),
            ("deposit+transfer", Mix::DepositTransfer),
        ] {
            for procs in [1, 2] {
                let rate = measure(&ledger, &names, mix, procs, secs);
                println!(
                    "fsync={fsync:<6} {label:<17} {procs} process(es): {:>12.0} ops/s  ({:.0} ns/op per process)",
                    rate,
                    1e9 * procs as f64 / rate
                );
            }
        }
        let audit = ledger.audit().expect("audit");
        println!(
            "fsync={fsync:<6} audit: {} accounts, total {}",
            audit.accounts, audit.total
        );
    }
}
