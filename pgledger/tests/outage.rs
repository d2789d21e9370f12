//! PostgreSQL stopped (`pg_ctl stop -m immediate`) under load and started again: every reply
//! is `OK` or `ERR unavailable`, service resumes by itself, and the final AUDIT equals the
//! initial money plus the acknowledged deposits exactly (so no `ERR unavailable` was sent for
//! a deposit that took effect, and no `OK` for one that did not).
//!
//! Alone in its test binary: it stops the binary's cluster.

mod support;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::time::Duration;

use forkpool_common::bank::{ErrorKind, Reply};
use forkpool_pgledger::{Change, LedgerOp};
use forkpool_testkit::wait_until;
use support::{acct, Database, Teller};

const ACCOUNTS: usize = 8;
const INITIAL: u64 = 1_000_000;
const CLIENTS: u64 = 6;
/// How long the test waits for each phase (load seen, outage seen, recovery seen).
const PHASE_TIMEOUT: Duration = Duration::from_secs(60);

/// What the clients saw.
#[derive(Default)]
struct Tally {
    ok: AtomicU64,
    unavailable: AtomicU64,
    deposited: AtomicU64,
}

fn client(teller: &Teller, seed: u64, stop: &AtomicBool, tally: &Tally) {
    let mut rng = fastrand::Rng::with_seed(seed);
    while !stop.load(Relaxed) {
        let from = rng.usize(..ACCOUNTS);
        let amount = rng.u64(1..10);
        let deposit = rng.bool();
        let op = if deposit {
            LedgerOp::Change(Change::Deposit {
                acct: acct(&format!("acct{from}")),
                amount,
            })
        } else {
            LedgerOp::Change(Change::Transfer {
                from: acct(&format!("acct{from}")),
                to: acct(&format!("acct{}", (from + 1) % ACCOUNTS)),
                amount,
            })
        };
        match teller.call(op) {
            Reply::Ok(_) | Reply::OkPair(..) => {
                tally.ok.fetch_add(1, Relaxed);
                if deposit {
                    tally.deposited.fetch_add(amount, Relaxed);
                }
            }
            Reply::Err {
                kind: ErrorKind::Unavailable,
                ..
            } => _ = tally.unavailable.fetch_add(1, Relaxed),
            other => panic!("{op:?} answered {other:?}"),
        }
    }
}

#[test]
fn an_immediate_stop_loses_no_acknowledged_change_and_service_resumes() {
    let Some(db) = Database::new(100) else {
        return;
    };
    let mut settings = db.settings.clone();
    settings.deadline = Duration::from_millis(500);
    let teller = Teller::start(settings);
    for i in 0..ACCOUNTS {
        let op = LedgerOp::Change(Change::Deposit {
            acct: acct(&format!("acct{i}")),
            amount: INITIAL,
        });
        assert_eq!(teller.call(op), Reply::Ok(INITIAL));
    }
    let (stop, tally) = (AtomicBool::new(false), Tally::default());
    let (stop, tally) = (&stop, &tally);
    std::thread::scope(|scope| {
        for seed in 0..CLIENTS {
            let teller = &teller;
            scope.spawn(move || client(teller, seed, stop, tally));
        }
        let ok_after = |count: u64| {
            let target = tally.ok.load(Relaxed) + count;
            move || (tally.ok.load(Relaxed) >= target).then_some(())
        };
        wait_until("changes under load", PHASE_TIMEOUT, ok_after(200));
        db.cluster.stop_immediate();
        wait_until("ERR unavailable during the outage", PHASE_TIMEOUT, || {
            (tally.unavailable.load(Relaxed) >= CLIENTS).then_some(())
        });
        db.cluster.start();
        wait_until("service to resume", PHASE_TIMEOUT, ok_after(200));
        stop.store(true, Relaxed);
    });
    let expected =
        u128::from(INITIAL) * ACCOUNTS as u128 + u128::from(tally.deposited.load(Relaxed));
    assert_eq!(
        teller.call(LedgerOp::Audit),
        Reply::Audit {
            total: expected,
            accounts: ACCOUNTS as u64
        }
    );
    let stats = teller.stats();
    assert_eq!(stats.in_flight, 0, "{stats:?}");
    assert!(stats.connections_up >= 1, "{stats:?}");
    eprintln!(
        "outage: {} ok, {} unavailable, {} resolved after an unanswered COMMIT",
        tally.ok.load(Relaxed),
        tally.unavailable.load(Relaxed),
        stats.resolved
    );
}
