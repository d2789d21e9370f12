//! Every operation and every error through the public API, with exact values, the overflow
//! and ledger-full edges, and persistence across close and reopen.

use forkpool_ledger::{
    AccountName, Audit, FsyncPolicy, Ledger, LedgerError, LedgerOptions, OpError, MAX_AMOUNT,
};

fn acct(name: &str) -> AccountName {
    AccountName::new(name.as_bytes()).expect("test account names are valid")
}

fn options(max_accounts: u64) -> LedgerOptions {
    LedgerOptions {
        max_accounts,
        stripes: 8,
        intent_records: 8,
        ..LedgerOptions::default()
    }
}

fn fresh(max_accounts: u64) -> (tempfile::TempDir, Ledger) {
    let dir = tempfile::tempdir().expect("tempdir");
    let ledger = Ledger::open(&dir.path().join("ledger.bin"), &options(max_accounts))
        .expect("open a fresh ledger");
    (dir, ledger)
}

#[test]
fn deposit_opens_accounts_and_returns_new_balance() {
    let (_dir, l) = fresh(10);
    assert_eq!(l.balance(&acct("alice")), Err(OpError::NoSuchAccount));
    assert_eq!(l.deposit(&acct("alice"), 100), Ok(100));
    assert_eq!(l.deposit(&acct("alice"), 23), Ok(123));
    assert_eq!(l.balance(&acct("alice")), Ok(123));
    assert_eq!(
        l.balance(&acct("Alice")),
        Err(OpError::NoSuchAccount),
        "case-sensitive"
    );
    assert_eq!(
        l.audit(),
        Ok(Audit {
            total: 123,
            accounts: 1
        })
    );
}

#[test]
fn amounts_outside_one_to_i64_max_are_bad() {
    let (_dir, l) = fresh(10);
    let a = acct("a");
    let b = acct("b");
    for amount in [0, MAX_AMOUNT + 1, u64::MAX] {
        assert_eq!(l.deposit(&a, amount), Err(OpError::BadAmount));
        assert_eq!(l.withdraw(&a, amount), Err(OpError::BadAmount));
        assert_eq!(l.transfer(&a, &b, amount), Err(OpError::BadAmount));
    }
    assert_eq!(
        l.audit(),
        Ok(Audit {
            total: 0,
            accounts: 0
        }),
        "bad deposits open nothing"
    );
    assert_eq!(l.deposit(&a, MAX_AMOUNT), Ok(MAX_AMOUNT));
}

#[test]
fn overflow_at_i64_max_changes_nothing() {
    let (_dir, l) = fresh(10);
    let (a, b) = (acct("a"), acct("b"));
    assert_eq!(l.deposit(&a, MAX_AMOUNT - 1), Ok(MAX_AMOUNT - 1));
    assert_eq!(l.deposit(&a, 2), Err(OpError::Overflow));
    assert_eq!(l.deposit(&a, MAX_AMOUNT), Err(OpError::Overflow));
    assert_eq!(l.deposit(&a, 1), Ok(MAX_AMOUNT));
    assert_eq!(l.deposit(&b, 5), Ok(5));
    assert_eq!(l.transfer(&b, &a, 1), Err(OpError::Overflow));
    assert_eq!(l.balance(&b), Ok(5));
    assert_eq!(l.transfer(&a, &b, MAX_AMOUNT - 5), Ok((5, MAX_AMOUNT)));
    assert_eq!(l.transfer(&a, &b, 1), Err(OpError::Overflow));
    assert_eq!(l.balance(&a), Ok(5));
}

#[test]
fn audit_total_is_exact_beyond_i64_max() {
    let (_dir, l) = fresh(10);
    for name in ["a", "b", "c"] {
        assert_eq!(l.deposit(&acct(name), MAX_AMOUNT), Ok(MAX_AMOUNT));
    }
    assert_eq!(
        l.audit(),
        Ok(Audit {
            total: 3 * u128::from(MAX_AMOUNT),
            accounts: 3
        })
    );
}

#[test]
fn withdraw_errors_and_emptied_account_stays_open() {
    let (_dir, l) = fresh(10);
    let a = acct("a");
    assert_eq!(l.withdraw(&a, 1), Err(OpError::NoSuchAccount));
    assert_eq!(l.deposit(&a, 10), Ok(10));
    assert_eq!(l.withdraw(&a, 11), Err(OpError::InsufficientFunds));
    assert_eq!(l.withdraw(&a, 4), Ok(6));
    assert_eq!(l.withdraw(&a, 6), Ok(0));
    assert_eq!(l.balance(&a), Ok(0));
    assert_eq!(l.withdraw(&a, 1), Err(OpError::InsufficientFunds));
    assert_eq!(
        l.audit(),
        Ok(Audit {
            total: 0,
            accounts: 1
        })
    );
}

#[test]
fn transfer_moves_money_opens_destination_and_checks_in_order() {
    let (_dir, l) = fresh(3);
    let (a, b, c, d, ghost) = (acct("a"), acct("b"), acct("c"), acct("d"), acct("ghost"));
    // Order: bad-amount, same-account, no-such-account, insufficient-funds, overflow/full.
    assert_eq!(l.transfer(&ghost, &ghost, 0), Err(OpError::BadAmount));
    assert_eq!(l.transfer(&ghost, &ghost, 1), Err(OpError::SameAccount));
    assert_eq!(l.transfer(&ghost, &a, 1), Err(OpError::NoSuchAccount));
    assert_eq!(l.deposit(&a, 50), Ok(50));
    assert_eq!(l.transfer(&a, &a, 1), Err(OpError::SameAccount));
    assert_eq!(l.transfer(&a, &b, 51), Err(OpError::InsufficientFunds));
    assert_eq!(l.transfer(&a, &b, 20), Ok((30, 20)), "opens b");
    assert_eq!(l.transfer(&b, &a, 5), Ok((15, 35)));
    assert_eq!(
        l.transfer(&a, &c, 35),
        Ok((0, 35)),
        "opens c; a emptied stays open"
    );
    // Three accounts exist: the ledger is full.
    assert_eq!(l.transfer(&c, &d, 1), Err(OpError::LedgerFull));
    assert_eq!(l.transfer(&ghost, &d, 1), Err(OpError::NoSuchAccount));
    assert_eq!(l.transfer(&c, &d, 36), Err(OpError::InsufficientFunds));
    assert_eq!(l.balance(&d), Err(OpError::NoSuchAccount));
    assert_eq!(
        l.audit(),
        Ok(Audit {
            total: 50,
            accounts: 3
        })
    );
}

#[test]
fn ledger_full_is_exact() {
    let (_dir, l) = fresh(37);
    for i in 0..37 {
        assert_eq!(
            l.deposit(&acct(&format!("acct{i}")), 1),
            Ok(1),
            "account {i}"
        );
    }
    assert_eq!(
        l.deposit(&acct("one-too-many"), 1),
        Err(OpError::LedgerFull)
    );
    assert_eq!(
        l.deposit(&acct("acct3"), 1),
        Ok(2),
        "existing accounts still take deposits"
    );
    assert_eq!(
        l.audit(),
        Ok(Audit {
            total: 38,
            accounts: 37
        })
    );
}

#[test]
fn balances_persist_across_close_and_reopen() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("sub/dir/ledger.bin");
    {
        let l = Ledger::open(&path, &options(100)).expect("create in a missing directory");
        l.deposit(&acct("a"), 7).expect("deposit");
        l.deposit(&acct("b"), MAX_AMOUNT).expect("deposit");
        l.transfer(&acct("b"), &acct("c"), 3).expect("transfer");
    }
    let l = Ledger::open(&path, &options(100)).expect("reopen");
    assert_eq!(l.balance(&acct("a")), Ok(7));
    assert_eq!(l.balance(&acct("b")), Ok(MAX_AMOUNT - 3));
    assert_eq!(l.balance(&acct("c")), Ok(3));
    assert_eq!(
        l.audit(),
        Ok(Audit {
            total: u128::from(MAX_AMOUNT) + 7,
            accounts: 3
        })
    );
}

#[test]
fn fsync_always_gives_the_same_results() {
    let dir = tempfile::tempdir().expect("tempdir");
    let opts = LedgerOptions {
        fsync: FsyncPolicy::Always,
        ..options(10)
    };
    let l = Ledger::open(&dir.path().join("l.bin"), &opts).expect("open");
    assert_eq!(l.deposit(&acct("a"), 10), Ok(10));
    assert_eq!(l.transfer(&acct("a"), &acct("b"), 4), Ok((6, 4)));
    assert_eq!(l.withdraw(&acct("b"), 4), Ok(0));
    assert_eq!(
        l.audit(),
        Ok(Audit {
            total: 6,
            accounts: 2
        })
    );
}

#[test]
fn second_open_of_a_ledger_in_use_is_refused_by_its_path_guard_or_its_flock() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("ledger.bin");
    let _first = Ledger::open(&path, &options(10)).expect("open");
    match Ledger::open(&path, &options(10)) {
        Err(e @ LedgerError::PathInUse { .. }) => {
            assert!(e.to_string().contains("locked"), "{e}");
        }
        other => panic!("expected PathInUse, got {other:?}"),
    }
    // Another name for the same file passes the path guard; the file's flock refuses it.
    let alias = dir.path().join("alias.bin");
    std::fs::hard_link(&path, &alias).expect("hard link");
    match Ledger::open(&alias, &options(10)) {
        Err(LedgerError::Locked { path: p }) => assert_eq!(p, alias),
        other => panic!("expected Locked, got {other:?}"),
    }
}

#[test]
fn capacity_mismatch_is_an_error_naming_both_numbers() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("ledger.bin");
    drop(Ledger::open(&path, &options(10)).expect("create"));
    let err = Ledger::open(&path, &options(20)).expect_err("capacity differs");
    assert!(matches!(
        err,
        LedgerError::CapacityMismatch {
            file: 10,
            configured: 20,
            ..
        }
    ));
    let message = err.to_string();
    assert!(
        message.contains("ledger.bin") && message.contains("10"),
        "{message}"
    );
}

#[test]
fn invalid_options_are_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("ledger.bin");
    for opts in [
        options(0),
        LedgerOptions {
            stripes: 3,
            ..options(10)
        },
        LedgerOptions {
            intent_records: 0,
            ..options(10)
        },
    ] {
        assert!(matches!(
            Ledger::open(&path, &opts),
            Err(LedgerError::InvalidOptions { .. })
        ));
    }
    assert!(!path.exists(), "nothing created for invalid options");
}

#[test]
fn lock_holders_are_empty_when_idle_and_error_kinds_are_protocol_words() {
    let (_dir, l) = fresh(10);
    l.deposit(&acct("a"), 1).expect("deposit");
    assert!(l.lock_holders().is_empty());
    let words: Vec<_> = [
        OpError::NoSuchAccount,
        OpError::InsufficientFunds,
        OpError::SameAccount,
        OpError::BadAmount,
        OpError::Overflow,
        OpError::LedgerFull,
    ]
    .iter()
    .map(|e| e.kind().as_str())
    .collect();
    assert_eq!(
        words,
        [
            "no-such-account",
            "insufficient-funds",
            "same-account",
            "bad-amount",
            "overflow",
            "ledger-full"
        ]
    );
}
