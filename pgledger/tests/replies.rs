//! Every request and refusal of the bank protocol, with its exact reply, answered the same way
//! by the PostgreSQL ledger and the shared-memory ledger; and the pool's behaviour when the
//! database cannot be reached.

mod support;

use std::time::{Duration, Instant};

use forkpool_common::bank::{parse_reply, parse_request, ErrorKind, Reply, Request};
use forkpool_pgledger::{Change, LedgerOp, PgSettings};
use support::{acct, reply_line, shm_ledger, shm_reply, Database, Teller};

/// Capacity of the ledgers of the table: small, so `ledger-full` is reached.
const CAPACITY: u64 = 4;

/// (request, exact reply), in order: each line sees the state the earlier ones left.
const CASES: &[(&str, &str)] = &[
    ("BALANCE alice", "ERR no-such-account account 'alice' does not exist"),
    ("WITHDRAW alice 1", "ERR no-such-account account 'alice' does not exist"),
    ("AUDIT", "OK 0 0"),
    ("DEPOSIT alice 100", "OK 100"),
    ("DEPOSIT alice 5", "OK 105"),
    // Names are case-sensitive: Alice is another account.
    ("BALANCE Alice", "ERR no-such-account account 'Alice' does not exist"),
    ("DEPOSIT Alice 1", "OK 1"),
    ("WITHDRAW alice 106", "ERR insufficient-funds account 'alice' holds less than the amount"),
    ("WITHDRAW alice 105", "OK 0"),
    // An emptied account stays open.
    ("BALANCE alice", "OK 0"),
    ("TRANSFER alice bob 1", "ERR insufficient-funds account 'alice' holds less than the amount"),
    ("TRANSFER nobody bob 1", "ERR no-such-account account 'nobody' does not exist"),
    ("TRANSFER Alice bob 1", "OK 0 1"),
    ("TRANSFER bob Alice 1", "OK 0 1"),
    ("DEPOSIT big 9223372036854775807", "OK 9223372036854775807"),
    ("DEPOSIT big 1", "ERR overflow the balance of account 'big' would exceed 9223372036854775807"),
    ("DEPOSIT Alice 9223372036854775806", "OK 9223372036854775807"),
    // An overflow names the account credited.
    ("TRANSFER big Alice 1", "ERR overflow the balance of account 'Alice' would exceed 9223372036854775807"),
    // The total is exact beyond 2^63-1.
    ("AUDIT", "OK 18446744073709551614 4"),
    ("DEPOSIT fifth 1", "ERR ledger-full cannot open account 'fifth': the ledger holds its limit of 4 accounts (the max_accounts setting)"),
    ("TRANSFER big fifth 1", "ERR ledger-full cannot open account 'fifth': the ledger holds its limit of 4 accounts (the max_accounts setting)"),
    // Check order: insufficient funds is decided before the destination's fate.
    ("TRANSFER bob fifth 1", "ERR insufficient-funds account 'bob' holds less than the amount"),
    ("TRANSFER big bob 7", "OK 9223372036854775800 7"),
    ("AUDIT", "OK 18446744073709551614 4"),
];

#[test]
fn both_ledgers_give_the_same_exact_replies() {
    let Some(db) = Database::new(CAPACITY) else {
        return;
    };
    let teller = db.teller();
    let (_dir, shm) = shm_ledger(CAPACITY);
    for (line, expected) in CASES {
        let request = parse_request(line.as_bytes()).expect("the table's requests parse");
        let pg = teller.line(line);
        let file = reply_line(&shm_reply(&shm, &request));
        assert_eq!(pg, *expected, "PostgreSQL ledger, {line}");
        assert_eq!(file, *expected, "shared-memory ledger, {line}");
    }
}

/// Requests the parser never produces (it rejects them first) are still refused by the
/// ledger, in the same check order as the shared-memory ledger's.
#[test]
fn amounts_and_names_the_parser_rejects_are_refused_by_the_ledger_too() {
    let Some(db) = Database::new(CAPACITY) else {
        return;
    };
    let teller = db.teller();
    let (_dir, shm) = shm_ledger(CAPACITY);
    let requests = [
        Request::Deposit {
            acct: acct("a"),
            amount: 0,
        },
        Request::Deposit {
            acct: acct("a"),
            amount: 1 << 63,
        },
        Request::Withdraw {
            acct: acct("nobody"),
            amount: 0,
        },
        // bad-amount comes before same-account.
        Request::Transfer {
            from: acct("a"),
            to: acct("a"),
            amount: 0,
        },
        // same-account is decided on the names alone, before no-such-account.
        Request::Transfer {
            from: acct("a"),
            to: acct("a"),
            amount: 1,
        },
    ];
    let expected = [
        "ERR bad-amount amount must be a whole number from 1 to 9223372036854775807",
        "ERR bad-amount amount must be a whole number from 1 to 9223372036854775807",
        "ERR bad-amount amount must be a whole number from 1 to 9223372036854775807",
        "ERR bad-amount amount must be a whole number from 1 to 9223372036854775807",
        "ERR same-account cannot transfer from account 'a' to itself",
    ];
    for (request, expected) in requests.iter().zip(expected) {
        let op = LedgerOp::of(request).expect("a ledger request");
        assert_eq!(reply_line(&teller.call(op)), expected, "{request:?}");
        assert_eq!(
            reply_line(&shm_reply(&shm, request)),
            expected,
            "{request:?}"
        );
    }
    assert_eq!(db.psql("SELECT COUNT(*) FROM accounts"), "0");
}

#[test]
fn the_database_refuses_balances_and_amounts_out_of_range() {
    let Some(db) = Database::new(CAPACITY) else {
        return;
    };
    db.psql("INSERT INTO accounts (name, balance) VALUES ('x', 0)");
    for sql in [
        "UPDATE accounts SET balance = -1 WHERE name = 'x'",
        "INSERT INTO applied_requests (origin, seq, amount, reply) VALUES (1, 1, 0, 'OK 0')",
        "UPDATE ledger_capacity SET accounts = max_accounts + 1",
    ] {
        let outcome = std::process::Command::new(db.cluster.program("psql"))
            .args(db.cluster.client_args())
            .args(["--no-psqlrc", "--set=ON_ERROR_STOP=1", "--dbname", &db.name])
            .args(["--command", sql])
            .output()
            .expect("run psql");
        assert!(!outcome.status.success(), "{sql} was accepted");
        let message = String::from_utf8_lossy(&outcome.stderr);
        assert!(
            message.contains("violates check constraint"),
            "{sql}: {message}"
        );
    }
}

#[test]
fn a_changed_capacity_or_a_newer_schema_is_refused_at_start() {
    let Some(db) = Database::new(CAPACITY) else {
        return;
    };
    let mut other = db.settings.clone();
    other.max_accounts = CAPACITY + 1;
    let refused = forkpool_pgledger::prepare(&other).expect_err("capacity differs");
    assert!(
        refused
            .to_string()
            .contains("holds at most 4 accounts but max_accounts is 5"),
        "{refused}"
    );
    // Preparing again with the same settings is a no-op.
    forkpool_pgledger::prepare(&db.settings).expect("prepare is idempotent");
    db.psql("UPDATE forkpool_schema SET version = 99");
    let refused = forkpool_pgledger::prepare(&db.settings).expect_err("newer schema");
    let message = refused.to_string();
    assert!(
        message.contains("schema version 99, newer than this binary's 1"),
        "{message}"
    );
    assert_eq!(message.lines().count(), 1, "{message}");
    // A running pool refuses to serve it too.
    let teller = db.teller();
    let reply = teller.call(LedgerOp::Audit);
    assert!(
        matches!(&reply, Reply::Err { kind: ErrorKind::Unavailable, detail } if detail.contains("schema version 99")),
        "{reply:?}"
    );
}

#[test]
fn an_unreachable_database_answers_unavailable_within_the_deadline() {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let url = format!(
        "postgresql:///nowhere?host={}&user=nobody",
        dir.path().display()
    );
    let mut settings = PgSettings::from_url(&url, CAPACITY).expect("a valid URL");
    settings.deadline = Duration::from_millis(300);
    settings.connections = 2;
    let teller = Teller::start(settings);
    for _ in 0..3 {
        let start = Instant::now();
        let op = LedgerOp::Change(Change::Deposit {
            acct: acct("a"),
            amount: 1,
        });
        let reply = teller.call(op);
        let took = start.elapsed();
        let line = reply_line(&reply);
        assert!(
            line.starts_with("ERR unavailable the ledger database did not answer within 300 ms"),
            "{line}"
        );
        assert!(line.ends_with("nothing changed"), "{line}");
        // The reply parses as the protocol's (clients know the word).
        let request = Request::Deposit {
            acct: acct("a"),
            amount: 1,
        };
        assert_eq!(parse_reply(&request, line.as_bytes()), Ok(reply));
        // Bounded by the deadline (plus scheduling slack on a busy machine, never the
        // reconnection back-off's whole second).
        assert!(took < Duration::from_secs(5), "took {took:?}");
    }
    let stats = teller.stats();
    assert_eq!(stats.connections_up, 0);
    assert_eq!(stats.unavailable, 3);
    assert_eq!(stats.in_flight, 0);
    assert!(stats.errors >= 1, "{stats:?}");
}
