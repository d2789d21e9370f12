//! Model-based property test: random operation sequences give the same replies and balances
//! on the ledger and on a plain `BTreeMap` model of the specification. A small capacity makes
//! `ledger-full` common; amounts cluster at the edges (0, 1, 2^63-1, above).

use std::collections::BTreeMap;

use forkpool_ledger::{AccountName, Audit, Ledger, LedgerOptions, OpError, MAX_AMOUNT};
use proptest::prelude::*;

const NAMES: [&str; 7] = ["a", "b", "c", "d", "e", "Alice", "alice"];
const CAPACITY: u64 = 4;

#[derive(Debug, Clone)]
enum Op {
    Deposit(usize, u64),
    Withdraw(usize, u64),
    Transfer(usize, usize, u64),
    Balance(usize),
    Audit,
}

#[derive(Debug, PartialEq, Eq)]
enum Reply {
    One(Result<u64, OpError>),
    Two(Result<(u64, u64), OpError>),
    Audit(Audit),
}

/// The specification, written as plainly as possible.
#[derive(Default)]
struct Model(BTreeMap<usize, u64>);

fn valid(amount: u64) -> Result<(), OpError> {
    if amount == 0 || amount > MAX_AMOUNT {
        Err(OpError::BadAmount)
    } else {
        Ok(())
    }
}

impl Model {
    fn credit(&self, acct: usize, amount: u64) -> Result<u64, OpError> {
        match self.0.get(&acct) {
            Some(&b) if b + amount > MAX_AMOUNT => Err(OpError::Overflow),
            Some(&b) => Ok(b + amount),
            None if self.0.len() as u64 >= CAPACITY => Err(OpError::LedgerFull),
            None => Ok(amount),
        }
    }

    fn apply(&mut self, op: &Op) -> Reply {
        match *op {
            Op::Deposit(a, amount) => Reply::One(valid(amount).and_then(|()| {
                let new = self.credit(a, amount)?;
                self.0.insert(a, new);
                Ok(new)
            })),
            Op::Withdraw(a, amount) => Reply::One(valid(amount).and_then(|()| {
                let b = *self.0.get(&a).ok_or(OpError::NoSuchAccount)?;
                let new = b.checked_sub(amount).ok_or(OpError::InsufficientFunds)?;
                self.0.insert(a, new);
                Ok(new)
            })),
            Op::Transfer(from, to, amount) => Reply::Two(valid(amount).and_then(|()| {
                if from == to {
                    return Err(OpError::SameAccount);
                }
                let b = *self.0.get(&from).ok_or(OpError::NoSuchAccount)?;
                let from_new = b.checked_sub(amount).ok_or(OpError::InsufficientFunds)?;
                let to_new = self.credit(to, amount)?;
                self.0.insert(from, from_new);
                self.0.insert(to, to_new);
                Ok((from_new, to_new))
            })),
            Op::Balance(a) => Reply::One(self.0.get(&a).copied().ok_or(OpError::NoSuchAccount)),
            Op::Audit => Reply::Audit(Audit {
                total: self.0.values().map(|&b| u128::from(b)).sum(),
                accounts: self.0.len() as u64,
            }),
        }
    }
}

fn apply(ledger: &Ledger, names: &[AccountName], op: &Op) -> Reply {
    match *op {
        Op::Deposit(a, amount) => Reply::One(ledger.deposit(&names[a], amount)),
        Op::Withdraw(a, amount) => Reply::One(ledger.withdraw(&names[a], amount)),
        Op::Transfer(f, t, amount) => Reply::Two(ledger.transfer(&names[f], &names[t], amount)),
        Op::Balance(a) => Reply::One(ledger.balance(&names[a])),
        Op::Audit => Reply::Audit(ledger.audit().expect("audit")),
    }
}

fn amount() -> impl Strategy<Value = u64> {
    prop_oneof![
        4 => 1u64..200,
        1 => Just(0u64),
        1 => Just(MAX_AMOUNT),
        1 => Just(MAX_AMOUNT - 1),
        1 => Just(MAX_AMOUNT + 1),
        1 => (MAX_AMOUNT / 2)..=MAX_AMOUNT,
        1 => Just(u64::MAX),
    ]
}

fn op() -> impl Strategy<Value = Op> {
    let acct = 0..NAMES.len();
    prop_oneof![
        3 => (acct.clone(), amount()).prop_map(|(a, m)| Op::Deposit(a, m)),
        2 => (acct.clone(), amount()).prop_map(|(a, m)| Op::Withdraw(a, m)),
        3 => (acct.clone(), acct.clone(), amount()).prop_map(|(f, t, m)| Op::Transfer(f, t, m)),
        1 => acct.prop_map(Op::Balance),
        1 => Just(Op::Audit),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    #[test]
    fn ledger_matches_the_model(ops in prop::collection::vec(op(), 1..60)) {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("ledger.bin");
        let options = LedgerOptions {
            max_accounts: CAPACITY,
            stripes: 2,
            intent_records: 2,
            ..LedgerOptions::default()
        };
        let names: Vec<AccountName> =
            NAMES.iter().map(|n| AccountName::new(n.as_bytes()).expect("name")).collect();
        let mut model = Model::default();
        {
            let ledger = Ledger::open(&path, &options).expect("open");
            for op in &ops {
                prop_assert_eq!(apply(&ledger, &names, op), model.apply(op), "op {:?}", op);
            }
        }
        // Persistence: the reopened file holds the model's balances.
        let ledger = Ledger::open(&path, &options).expect("reopen");
        for (i, name) in names.iter().enumerate() {
            prop_assert_eq!(ledger.balance(name), model.apply(&Op::Balance(i)).one());
        }
        prop_assert_eq!(Reply::Audit(ledger.audit().expect("audit")), model.apply(&Op::Audit));
    }
}

impl Reply {
    fn one(self) -> Result<u64, OpError> {
        match self {
            Reply::One(r) => r,
            other => panic!("not a one-balance reply: {other:?}"),
        }
    }
}
