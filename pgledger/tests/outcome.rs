//! A change whose `COMMIT` was sent but not answered is never answered `ERR unavailable`: the
//! pool reads the outcome back from the database. Both ways are forced here with a deferred
//! trigger that stalls the first commit (a test-only PL/pgSQL function; the ledger's own SQL
//! stays portable): the stalled commit either completes after the client gave up on it, or
//! its backend is terminated before it commits.

mod support;

use std::time::Duration;

use forkpool_common::bank::Reply;
use forkpool_pgledger::{Change, LedgerOp};
use forkpool_testkit::wait_until;
use support::{acct, Database, Teller};

/// Makes the first commit touching `applied_requests` sleep `seconds` before it commits (a
/// sequence, not rolled back with the transaction, counts the commits).
fn stall_first_commit(db: &Database, seconds: u32) {
    db.psql(&format!(
        "CREATE SEQUENCE commits;
         CREATE FUNCTION stall() RETURNS trigger LANGUAGE plpgsql AS $$
         BEGIN
             IF nextval('commits') = 1 THEN PERFORM pg_sleep({seconds}); END IF;
             RETURN NULL;
         END $$;
         CREATE CONSTRAINT TRIGGER stall AFTER INSERT ON applied_requests
             DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION stall();"
    ));
}

fn deposit(amount: u64) -> LedgerOp {
    LedgerOp::Change(Change::Deposit {
        acct: acct("a"),
        amount,
    })
}

fn balance(teller: &Teller) -> Reply {
    teller.call(LedgerOp::Balance { acct: acct("a") })
}

#[test]
fn a_commit_that_completes_after_the_deadline_is_answered_with_its_reply() {
    let Some(db) = Database::new(10) else {
        return;
    };
    let mut settings = db.settings.clone();
    settings.deadline = Duration::from_millis(300);
    let teller = Teller::start(settings);
    assert_eq!(teller.call(deposit(10)), Reply::Ok(10));
    stall_first_commit(&db, 2);
    // The deadline passes while COMMIT is pending: the request is in doubt, the pool drops
    // the connection (the stalled backend still commits) and asks again on a new one.
    assert_eq!(teller.call(deposit(1)), Reply::Ok(11));
    assert_eq!(balance(&teller), Reply::Ok(11), "applied exactly once");
    let stats = teller.stats();
    assert_eq!(stats.resolved, 1, "{stats:?}");
    assert_eq!(stats.unavailable, 0, "{stats:?}");
}

#[test]
fn a_commit_whose_backend_dies_is_applied_once_after_all() {
    let Some(db) = Database::new(10) else {
        return;
    };
    let mut settings = db.settings.clone();
    settings.deadline = Duration::from_secs(30);
    let teller = Teller::start(settings);
    assert_eq!(teller.call(deposit(10)), Reply::Ok(10));
    stall_first_commit(&db, 60);
    std::thread::scope(|scope| {
        let stalled = scope.spawn(|| teller.call(deposit(1)));
        // The backend sleeping in its COMMIT is killed: that transaction never commits, and
        // the client sees its connection break with COMMIT unanswered.
        wait_until("a commit to stall", Duration::from_secs(30), || {
            let killed = db.psql(
                "SELECT COUNT(pg_terminate_backend(pid)) FROM pg_stat_activity \
                 WHERE wait_event = 'PgSleep' AND datname = current_database()",
            );
            (killed == "1").then_some(())
        });
        // Not found on the new connection: the pool applies it there, once.
        assert_eq!(stalled.join().expect("the caller"), Reply::Ok(11));
    });
    assert_eq!(balance(&teller), Reply::Ok(11), "applied exactly once");
    let stats = teller.stats();
    assert_eq!(stats.resolved, 1, "{stats:?}");
    assert_eq!(db.psql("SELECT COUNT(*) FROM applied_requests"), "2");
}
