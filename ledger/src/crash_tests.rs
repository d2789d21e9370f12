//! Crash-point tests of recovery. A forked child runs one operation with crash point `k`
//! armed and `_exit`s there, as if SIGKILLed at that instruction (locks held, record half
//! written); the parent then reads the state, which must equal either the state before the
//! operation or the state after it (computed on a twin ledger that ran the operation
//! cleanly), and every lock must work again. `k` runs from 1 until the child completes.
//!
//! The children only call async-signal-safe code (the ledger's operations do not allocate,
//! and no logger is installed so `log` macros are inert) and `_exit` on every path.

use std::path::Path;
use std::time::{Duration, Instant};

use nix::sys::wait::waitpid;
use nix::unistd::{fork, ForkResult};

use crate::crash::CRASH_STATUS;
use crate::test_support::{acct, open_when_free, run_in_child, ExitOnUnwind};
use crate::{AccountName, Audit, Ledger, LedgerOptions, OpError};

fn options() -> LedgerOptions {
    LedgerOptions {
        max_accounts: 16,
        stripes: 4,
        // One record: after a crash the next operation must reclaim the dead one.
        intent_records: 1,
        ..LedgerOptions::default()
    }
}

/// What the tests compare: the balances of the involved accounts and the audit.
type State = (Vec<Result<u64, OpError>>, Audit);

fn state(ledger: &Ledger, accounts: &[AccountName]) -> State {
    let balances = accounts.iter().map(|a| ledger.balance(a)).collect();
    (balances, ledger.audit().expect("audit"))
}

struct Scenario<'a> {
    name: &'a str,
    setup: &'a dyn Fn(&Ledger),
    op: &'a dyn Fn(&Ledger) -> bool,
    accounts: Vec<AccountName>,
}

/// Opens a test ledger (see [`open_when_free`]).
fn open(path: &Path) -> Ledger {
    open_when_free(path, &options(), &crate::file::random_key).expect("open ledger")
}

/// The states before and after a clean run of the scenario's operation.
fn reference(dir: &Path, s: &Scenario<'_>) -> (State, State) {
    let ledger = open(&dir.join("reference.bin"));
    (s.setup)(&ledger);
    let before = state(&ledger, &s.accounts);
    assert!(
        (s.op)(&ledger),
        "{}: the operation succeeds when not killed",
        s.name
    );
    (before, state(&ledger, &s.accounts))
}

/// Checks that the state is all-before or all-after and that the ledger still works,
/// including a fresh cold start of the same file.
fn check_repaired(
    ledger: Ledger,
    path: &Path,
    s: &Scenario<'_>,
    expected: &(State, State),
    what: &str,
) {
    let seen = state(&ledger, &s.accounts);
    assert!(
        seen == expected.0 || seen == expected.1,
        "{}, {what}: half-applied state {seen:?}; before {:?}, after {:?}",
        s.name,
        expected.0,
        expected.1
    );
    assert!(
        ledger.lock_holders().is_empty(),
        "{what}: a lock is still held"
    );
    ledger
        .deposit(&acct("probe"), 1)
        .expect("the ledger still takes operations");
    let after_probe = state(&ledger, &s.accounts);
    drop(ledger);
    let reopened = open(path);
    assert_eq!(
        state(&reopened, &s.accounts),
        after_probe,
        "{what}: a cold start changes nothing"
    );
}

/// Kills the operation at every crash point in turn.
fn sweep(s: &Scenario<'_>) {
    let dir = tempfile::tempdir().expect("tempdir");
    let expected = reference(dir.path(), s);
    for k in 1.. {
        let path = dir.path().join(format!("k{k}.bin"));
        let ledger = open(&path);
        (s.setup)(&ledger);
        match run_in_child(&ledger, k, s.op) {
            0 => {
                assert!(k > 3, "{}: the operation has crash points", s.name);
                assert_eq!(
                    state(&ledger, &s.accounts),
                    expected.1,
                    "{}: clean run",
                    s.name
                );
                return;
            }
            CRASH_STATUS => {
                check_repaired(ledger, &path, s, &expected, &format!("killed at step {k}"))
            }
            code => panic!("{}: child exited {code} at step {k}", s.name),
        }
    }
}

/// Kills the operation at every crash point, then kills the first process that repairs it
/// at every crash point of the repair, then checks.
fn sweep_with_second_death(s: &Scenario<'_>, repair: &dyn Fn(&Ledger) -> bool) {
    let dir = tempfile::tempdir().expect("tempdir");
    let expected = reference(dir.path(), s);
    let mut second_deaths = 0;
    for k in 1.. {
        for j in 1.. {
            let path = dir.path().join(format!("k{k}-j{j}.bin"));
            let ledger = open(&path);
            (s.setup)(&ledger);
            match run_in_child(&ledger, k, s.op) {
                0 => {
                    assert!(second_deaths > 0, "{}: some repair was killed", s.name);
                    return;
                }
                CRASH_STATUS => {}
                code => panic!("{}: child exited {code} at step {k}", s.name),
            }
            match run_in_child(&ledger, j, repair) {
                CRASH_STATUS => {
                    second_deaths += 1;
                    let what = format!("killed at step {k}, repairer killed at step {j}");
                    check_repaired(ledger, &path, s, &expected, &what);
                }
                _ => break,
            }
        }
    }
}

#[test]
fn deposit_to_existing_account_is_all_or_nothing_at_every_crash_point() {
    let a = acct("a");
    sweep(&Scenario {
        name: "deposit existing",
        setup: &|l| assert_eq!(l.deposit(&a, 100), Ok(100)),
        op: &|l| l.deposit(&a, 5) == Ok(105),
        accounts: vec![a],
    });
}

#[test]
fn deposit_opening_an_account_is_all_or_nothing_at_every_crash_point() {
    let (a, other) = (acct("a"), acct("other"));
    sweep(&Scenario {
        name: "deposit new",
        setup: &|l| assert_eq!(l.deposit(&other, 1), Ok(1)),
        op: &|l| l.deposit(&a, 5) == Ok(5),
        accounts: vec![a, other],
    });
}

#[test]
fn withdraw_is_all_or_nothing_at_every_crash_point() {
    let a = acct("a");
    sweep(&Scenario {
        name: "withdraw",
        setup: &|l| assert_eq!(l.deposit(&a, 100), Ok(100)),
        op: &|l| l.withdraw(&a, 30) == Ok(70),
        accounts: vec![a],
    });
}

/// Transfers between existing accounts and to a new one. Each file has its own random hash
/// key, so whether the two accounts share a stripe (of 4) varies from file to file: over the
/// ~120 files of this test both the one-lock and the two-lock paths are crashed many times.
#[test]
fn transfer_is_all_or_nothing_at_every_crash_point() {
    let from = acct("from");
    for to in ["to", "other", "dest", "x"].map(acct) {
        sweep(&Scenario {
            name: "transfer existing",
            setup: &|l| {
                assert_eq!(l.deposit(&from, 100), Ok(100));
                assert_eq!(l.deposit(&to, 7), Ok(7));
            },
            op: &|l| l.transfer(&from, &to, 40) == Ok((60, 47)),
            accounts: vec![from, to],
        });
        sweep(&Scenario {
            name: "transfer to new",
            setup: &|l| assert_eq!(l.deposit(&from, 100), Ok(100)),
            op: &|l| l.transfer(&from, &to, 40) == Ok((60, 40)),
            accounts: vec![from, to],
        });
    }
}

#[test]
fn a_repairer_killed_during_recovery_is_repaired_in_turn() {
    let (from, to) = (acct("from"), acct("to"));
    let scenario = Scenario {
        name: "transfer to new, repairer killed",
        setup: &|l| assert_eq!(l.deposit(&from, 100), Ok(100)),
        op: &|l| l.transfer(&from, &to, 40) == Ok((60, 40)),
        accounts: vec![from, to],
    };
    // The repairer touches every stripe (AUDIT), then claims the only record (a WITHDRAW
    // that fails and so changes nothing).
    let nobody = acct("nobody");
    sweep_with_second_death(&scenario, &|l| {
        l.audit().is_ok() && l.withdraw(&nobody, 1) == Err(OpError::NoSuchAccount)
    });
    let a = acct("a");
    let deposit_new = Scenario {
        name: "deposit new, repairer killed",
        setup: &|_| {},
        op: &|l| l.deposit(&a, 5) == Ok(5),
        accounts: vec![a],
    };
    // Here the repair runs inside the claim of the only record, which its dead owner holds.
    sweep_with_second_death(&deposit_new, &|l| {
        l.withdraw(&nobody, 1) == Err(OpError::NoSuchAccount)
    });
}

/// Pid of the stopped holder for the wait hook of the test below.
static STUCK_HOLDER: std::sync::atomic::AtomicI32 = std::sync::atomic::AtomicI32::new(0);
static HOOK_CALLS: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);

/// The supervisor's part, as a wait hook: after two slices, kill the recorded holder.
fn kill_holder_after_two_slices() {
    use std::sync::atomic::Ordering::Relaxed;
    if HOOK_CALLS.fetch_add(1, Relaxed) + 1 == 2 {
        let pid = nix::unistd::Pid::from_raw(STUCK_HOLDER.load(Relaxed));
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL);
    }
}

#[test]
fn a_waiter_runs_the_wait_hook_and_the_recorded_holder_can_be_killed() {
    use std::sync::atomic::Ordering::Relaxed;
    let dir = tempfile::tempdir().expect("tempdir");
    let ledger = open(&dir.path().join("stuck.bin"));
    let a = acct("a");
    ledger.deposit(&a, 10).expect("deposit");
    let stripe = ledger.region.geometry().stripe_of(ledger.tag_of(&a));
    // SAFETY: the child takes one ledger lock and sleeps in pause() until killed.
    let child = match unsafe { fork() }.expect("fork") {
        ForkResult::Child => {
            // Lives until the process ends: an unwind would _exit.
            let _guard = ExitOnUnwind;
            let held = ledger.lock_stripe(stripe);
            std::mem::forget(held);
            loop {
                // SAFETY: pause is async-signal-safe; the child waits here to be killed.
                unsafe { libc::pause() };
            }
        }
        ForkResult::Parent { child } => child,
    };
    let deadline = Instant::now() + Duration::from_secs(5);
    while !ledger.lock_holders().contains(&crate::LockHolder {
        lock: crate::LockId::Stripe(stripe),
        pid: child.as_raw(),
    }) {
        assert!(
            Instant::now() < deadline,
            "the child never showed up as the holder"
        );
        std::thread::sleep(Duration::from_millis(1));
    }
    STUCK_HOLDER.store(child.as_raw(), Relaxed);
    crate::set_wait_hook(Some(kill_holder_after_two_slices));
    assert_eq!(
        ledger.balance(&a),
        Ok(10),
        "served once the holder is killed"
    );
    crate::set_wait_hook(None);
    assert!(HOOK_CALLS.load(Relaxed) >= 2, "the hook ran while blocked");
    waitpid(child, None).expect("reap");
    assert!(ledger.lock_holders().is_empty());
}
