//! Multi-process stress: forked children transfer money at random among 100 accounts while
//! the parent SIGKILLs them at random moments and forks replacements. Every AUDIT, during the
//! chaos and after it, must show exactly the money put in, and no lock may stay stuck.
//!
//! Children only run ledger operations (no allocation) and never return to the harness.

use std::sync::mpsc;
use std::time::{Duration, Instant};

use forkpool_ledger::{AccountName, Audit, Ledger, LedgerOptions};
use nix::sys::signal::{kill, Signal};
use nix::sys::wait::waitpid;
use nix::unistd::{fork, ForkResult, Pid};

const ACCOUNTS: usize = 100;
const INITIAL: u64 = 1_000;
const CHILDREN: usize = 3;
const CHAOS: Duration = Duration::from_millis(1500);
/// Kills the chaos runs to, whatever the time it takes.
const MIN_KILLS: usize = 100;

/// xorshift64: no allocation, good enough to pick accounts.
fn next(state: &mut u64) -> u64 {
    *state ^= *state << 13;
    *state ^= *state >> 7;
    *state ^= *state << 17;
    *state
}

fn spawn_transferrer(ledger: &Ledger, names: &[AccountName], seed: u64) -> Pid {
    // SAFETY: the child only runs ledger operations on memory prepared before the fork (no
    // allocation, no locks of the parent's other threads) and never leaves the loop except by
    // being killed; `_exit` guards the impossible return path.
    match unsafe { fork() }.expect("fork") {
        ForkResult::Child => {
            let mut rng = seed | 1;
            loop {
                let from = (next(&mut rng) % ACCOUNTS as u64) as usize;
                let to = (next(&mut rng) % ACCOUNTS as u64) as usize;
                let amount = next(&mut rng) % 50 + 1;
                // Errors (insufficient funds, same account) are part of the load.
                let _ = ledger.transfer(&names[from], &names[to], amount);
                if next(&mut rng) & 15 == 0 {
                    let _ = ledger.deposit(&names[from], 0); // bad-amount: touches nothing
                }
            }
            #[allow(unreachable_code)] // documents the contract should the loop ever end
            // SAFETY: _exit is async-signal-safe.
            unsafe {
                libc::_exit(0)
            }
        }
        ForkResult::Parent { child } => child,
    }
}

/// AUDIT in a helper thread with a deadline, so a stuck lock fails the test instead of
/// hanging it.
fn audit_within(ledger: &'static Ledger, limit: Duration) -> Audit {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(ledger.audit());
    });
    rx.recv_timeout(limit)
        .expect("AUDIT finished in time (no lock stuck)")
        .expect("audit")
}

#[test]
fn money_is_conserved_while_workers_are_killed_at_random() {
    let dir = tempfile::tempdir().expect("tempdir");
    let options = LedgerOptions {
        max_accounts: 256,
        stripes: 8,
        intent_records: 8,
        ..LedgerOptions::default()
    };
    let path = dir.path().join("ledger.bin");
    // Leaked so the audit helper thread may borrow it; the file is in our tempdir.
    let ledger: &'static Ledger = Box::leak(Box::new(Ledger::open(&path, &options).expect("open")));
    let names: Vec<AccountName> = (0..ACCOUNTS)
        .map(|i| AccountName::new(format!("acct-{i}").as_bytes()).expect("name"))
        .collect();
    for name in &names {
        ledger.deposit(name, INITIAL).expect("fund");
    }
    let expected = Audit {
        total: u128::from(INITIAL) * ACCOUNTS as u128,
        accounts: ACCOUNTS as u64,
    };

    let mut rng = 0x9e37_79b9_7f4a_7c15u64;
    let mut children: Vec<Pid> = (0..CHILDREN)
        .map(|i| spawn_transferrer(ledger, &names, i as u64 + 1))
        .collect();
    let (mut kills, mut audits) = (0, 0);
    // At least CHAOS long and MIN_KILLS kills, however slow the machine is.
    let start = Instant::now();
    while start.elapsed() < CHAOS || kills < MIN_KILLS {
        std::thread::sleep(Duration::from_micros(next(&mut rng) % 5_000 + 500));
        let victim = (next(&mut rng) % CHILDREN as u64) as usize;
        kill(children[victim], Signal::SIGKILL).expect("kill");
        waitpid(children[victim], None).expect("reap");
        kills += 1;
        children[victim] = spawn_transferrer(ledger, &names, next(&mut rng));
        if kills % 10 == 0 {
            assert_eq!(
                audit_within(ledger, Duration::from_secs(5)),
                expected,
                "audit during chaos"
            );
            audits += 1;
        }
    }
    for child in children {
        kill(child, Signal::SIGKILL).expect("kill");
        waitpid(child, None).expect("reap");
    }
    assert_eq!(
        audit_within(ledger, Duration::from_secs(5)),
        expected,
        "final audit"
    );
    let sum: u128 = names
        .iter()
        .map(|n| u128::from(ledger.balance(n).expect("every account still exists")))
        .sum();
    assert_eq!(sum, expected.total, "balances add up to the audit");
    eprintln!("stress: {kills} kills, {audits} audits during the chaos, total exact");
}
