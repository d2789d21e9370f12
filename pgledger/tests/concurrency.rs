//! Many clients at once on the PostgreSQL ledger: money is conserved and AUDIT is exact,
//! `max_accounts` is exact, racing creations of one account open it once, and a process
//! SIGKILLed in the middle of its transactions leaves nothing half-applied.

mod support;

use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

use forkpool_common::bank::{ErrorKind, Reply};
use forkpool_pgledger::{Change, LedgerOp, PgSettings};
use forkpool_testkit::wait_until;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use support::{acct, Database, Teller};

const ACCOUNTS: usize = 10;
const INITIAL: u64 = 1_000_000;

fn deposit(name: &str, amount: u64) -> LedgerOp {
    LedgerOp::Change(Change::Deposit {
        acct: acct(name),
        amount,
    })
}

fn transfer(from: &str, to: &str, amount: u64) -> LedgerOp {
    LedgerOp::Change(Change::Transfer {
        from: acct(from),
        to: acct(to),
        amount,
    })
}

fn audit(teller: &Teller) -> (u128, u64) {
    match teller.call(LedgerOp::Audit) {
        Reply::Audit { total, accounts } => (total, accounts),
        other => panic!("AUDIT answered {other:?}"),
    }
}

#[test]
fn concurrent_transfers_from_two_pools_conserve_money_exactly() {
    let Some(db) = Database::new(1000) else {
        return;
    };
    // Two pools, as two workers (or two instances) sharing the database.
    let tellers = [db.teller(), db.teller()];
    for i in 0..ACCOUNTS {
        assert_eq!(
            tellers[0].call(deposit(&format!("acct{i}"), INITIAL)),
            Reply::Ok(INITIAL)
        );
    }
    let applied = AtomicU64::new(0);
    std::thread::scope(|scope| {
        for thread in 0..8u64 {
            let teller = &tellers[(thread % 2) as usize];
            let applied = &applied;
            scope.spawn(move || {
                let mut rng = fastrand::Rng::with_seed(thread);
                for _ in 0..150 {
                    let from = rng.usize(..ACCOUNTS);
                    // Neighbouring pairs in both directions: the lock order is what keeps
                    // these from deadlocking.
                    let to = (from + 1 + rng.usize(..2)) % ACCOUNTS;
                    let op = transfer(
                        &format!("acct{from}"),
                        &format!("acct{to}"),
                        rng.u64(1..100),
                    );
                    match teller.call(op) {
                        Reply::OkPair(..) => _ = applied.fetch_add(1, Relaxed),
                        other => panic!("transfer answered {other:?}"),
                    }
                }
            });
        }
    });
    assert_eq!(applied.load(Relaxed), 8 * 150);
    let expected = (u128::from(INITIAL) * ACCOUNTS as u128, ACCOUNTS as u64);
    assert_eq!(audit(&tellers[0]), expected);
    assert_eq!(audit(&tellers[1]), expected);
    assert_eq!(
        db.psql("SELECT SUM(balance), COUNT(*) FROM accounts"),
        format!("{}|{}", expected.0, expected.1)
    );
    // Every change wrote its id once (none pruned yet: fewer than the pruning interval).
    assert_eq!(
        db.psql("SELECT COUNT(*) FROM applied_requests"),
        (ACCOUNTS + 8 * 150).to_string()
    );
}

#[test]
fn max_accounts_is_exact_under_concurrent_creation() {
    const CAPACITY: u64 = 10;
    let Some(db) = Database::new(CAPACITY) else {
        return;
    };
    let tellers = [db.teller(), db.teller()];
    let (opened, full) = (AtomicU64::new(0), AtomicU64::new(0));
    std::thread::scope(|scope| {
        for thread in 0..8 {
            let (teller, opened, full) = (&tellers[thread % 2], &opened, &full);
            scope.spawn(move || {
                for k in 0..5 {
                    match teller.call(deposit(&format!("t{thread}k{k}"), 1)) {
                        Reply::Ok(1) => _ = opened.fetch_add(1, Relaxed),
                        Reply::Err {
                            kind: ErrorKind::LedgerFull,
                            ..
                        } => _ = full.fetch_add(1, Relaxed),
                        other => panic!("deposit answered {other:?}"),
                    }
                }
            });
        }
    });
    assert_eq!(opened.load(Relaxed), CAPACITY);
    assert_eq!(full.load(Relaxed), 40 - CAPACITY);
    assert_eq!(audit(&tellers[0]), (u128::from(CAPACITY), CAPACITY));
    assert_eq!(
        db.psql("SELECT accounts FROM ledger_capacity"),
        CAPACITY.to_string()
    );
}

#[test]
fn racing_deposits_open_a_new_account_once() {
    let Some(db) = Database::new(100) else {
        return;
    };
    let tellers = [db.teller(), db.teller()];
    std::thread::scope(|scope| {
        for thread in 0..8 {
            let teller = &tellers[thread % 2];
            scope.spawn(move || {
                for _ in 0..10 {
                    let reply = teller.call(deposit("fresh", 3));
                    assert!(matches!(reply, Reply::Ok(_)), "{reply:?}");
                }
            });
        }
    });
    assert_eq!(audit(&tellers[0]), (8 * 10 * 3, 1));
    assert_eq!(db.psql("SELECT accounts FROM ledger_capacity"), "1");
}

/// Name of the environment variable that turns [`child_transfers_until_killed`] on.
const CHILD_URL: &str = "FORKPOOL_PGLEDGER_CHILD_URL";

/// Run as a subprocess by [`killed_process_leaves_nothing_half_applied`]: transfers 1 from
/// `src` to `dst<k % 7>` one at a time, printing `k` once each is acknowledged, until killed.
#[test]
#[ignore = "a helper process of killed_process_leaves_nothing_half_applied"]
fn child_transfers_until_killed() {
    let Ok(url) = std::env::var(CHILD_URL) else {
        return;
    };
    let settings = PgSettings::from_url(&url, 1000).expect("the parent's URL");
    let teller = Teller::start(settings);
    let mut out = std::io::stdout().lock();
    for k in 0u64.. {
        let reply = teller.call(transfer("src", &format!("dst{}", k % 7), 1));
        assert!(matches!(reply, Reply::OkPair(..)), "{reply:?}");
        writeln!(out, "{k}").expect("the parent reads");
        out.flush().expect("the parent reads");
    }
}

#[test]
fn killed_process_leaves_nothing_half_applied() {
    let Some(db) = Database::new(1000) else {
        return;
    };
    let teller = db.teller();
    assert_eq!(teller.call(deposit("src", INITIAL)), Reply::Ok(INITIAL));
    let exe = std::env::current_exe().expect("the test knows its own path");
    let mut acknowledged = 0u64;
    for round in 0..6u64 {
        let mut child = Command::new(&exe)
            .args([
                "--exact",
                "child_transfers_until_killed",
                "--ignored",
                "--nocapture",
            ])
            .env(CHILD_URL, db.cluster.url(&db.name))
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("start the child");
        let mut lines = BufReader::new(child.stdout.take().expect("piped")).lines();
        // Let it acknowledge a few, then kill it right after an acknowledgement (its next
        // transfer is then in flight), a little later each round.
        let wanted = 5 + round * 7;
        let mut seen = 0;
        while seen < wanted {
            let line = lines
                .next()
                .expect("the child keeps transferring")
                .expect("a line");
            if line.parse::<u64>().is_ok() {
                seen += 1;
            }
        }
        kill(Pid::from_raw(child.id() as i32), Signal::SIGKILL).expect("kill the child");
        let _ = child.wait();
        // What it acknowledged after the lines read so far is still in the pipe.
        seen += lines
            .map_while(Result::ok)
            .filter(|line| line.parse::<u64>().is_ok())
            .count() as u64;
        acknowledged += seen;
        // Its connections are gone once the server has rolled back what they had begun.
        let applied_before = acknowledged;
        let (total, _) = audit(&teller);
        assert_eq!(
            total,
            u128::from(INITIAL),
            "round {round}: money was created or lost"
        );
        let moved: u64 = db
            .psql("SELECT COALESCE(SUM(balance), 0) FROM accounts WHERE name LIKE 'dst%'")
            .parse()
            .expect("a number");
        let src = match teller.call(LedgerOp::Balance { acct: acct("src") }) {
            Reply::Ok(balance) => balance,
            other => panic!("BALANCE answered {other:?}"),
        };
        assert_eq!(
            src + moved,
            INITIAL,
            "round {round}: a transfer was half-applied"
        );
        // Every acknowledged transfer is applied; at most the one in flight is too.
        assert!(
            (applied_before..=applied_before + 1).contains(&moved),
            "round {round}: {moved} applied, {applied_before} acknowledged"
        );
        acknowledged = moved;
        assert_eq!(
            db.psql("SELECT COUNT(*) FROM accounts"),
            db.psql("SELECT accounts FROM ledger_capacity"),
            "round {round}: the account count disagrees with the accounts"
        );
    }
    assert_eq!(teller.stats().in_flight, 0);
}

#[test]
fn answered_ids_are_pruned_and_abandoned_ones_swept() {
    let Some(db) = Database::new(10) else {
        return;
    };
    // Another pool's ids: one abandoned two days ago (swept), one recent (kept: its pool may
    // still need it).
    db.psql(
        "INSERT INTO applied_requests (origin, seq, amount, reply, applied_at) VALUES \
         (-7, 1, 1, 'OK 1', CURRENT_TIMESTAMP - INTERVAL '2 days'), (-7, 2, 1, 'OK 1', CURRENT_TIMESTAMP)",
    );
    let teller = db.teller();
    // Pruning runs after every 1,024th change (pgledger/src/pool.rs, PRUNE_EVERY).
    for k in 1..=1100u64 {
        assert_eq!(teller.call(deposit("a", 1)), Reply::Ok(k));
    }
    let origin = teller.0.bank.origin();
    let own = || -> u64 {
        db.psql(&format!(
            "SELECT COUNT(*) FROM applied_requests WHERE origin = {origin}"
        ))
        .parse()
        .expect("a count")
    };
    // The 1,024th completion deleted every answered id (on its connection, while the others
    // went on serving); the 76 after it remain.
    wait_until(
        "the answered ids to be pruned",
        Duration::from_secs(30),
        || (own() == 76).then_some(()),
    );
    assert_eq!(
        db.psql("SELECT seq FROM applied_requests WHERE origin = -7"),
        "2"
    );
}
