//! Model-based property test, as `ledger/tests/model.rs` for the shared-memory ledger: random
//! request sequences get the same replies from the PostgreSQL ledger as from a plain
//! `BTreeMap` model of the specification. A small capacity makes `ledger-full` common;
//! amounts cluster at the edges (0, 1, 2^63-1, above).

mod support;

use std::collections::BTreeMap;

use forkpool_common::bank::{AccountName, ErrorKind, ProtocolError, Reply, MAX_AMOUNT};
use forkpool_pgledger::{Change, LedgerOp};
use proptest::prelude::*;
use support::{Database, Teller};

const NAMES: [&str; 7] = ["a", "b", "c", "d", "e", "Alice", "alice"];
const CAPACITY: u64 = 4;

/// The specification, written as plainly as possible.
#[derive(Default)]
struct Model(BTreeMap<AccountName, u64>);

fn valid(amount: u64) -> Result<u64, ErrorKind> {
    if amount == 0 || amount > MAX_AMOUNT {
        Err(ErrorKind::BadAmount)
    } else {
        Ok(amount)
    }
}

impl Model {
    fn credit(&self, acct: &AccountName, amount: u64) -> Result<u64, ErrorKind> {
        match self.0.get(acct) {
            Some(&b) if b + amount > MAX_AMOUNT => Err(ErrorKind::Overflow),
            Some(&b) => Ok(b + amount),
            None if self.0.len() as u64 >= CAPACITY => Err(ErrorKind::LedgerFull),
            None => Ok(amount),
        }
    }

    fn apply(&mut self, op: &LedgerOp) -> Reply {
        let outcome = match *op {
            LedgerOp::Change(Change::Deposit { acct, amount }) => {
                valid(amount).and_then(|amount| {
                    let new = self.credit(&acct, amount)?;
                    self.0.insert(acct, new);
                    Ok(Reply::Ok(new))
                })
            }
            LedgerOp::Change(Change::Withdraw { acct, amount }) => {
                valid(amount).and_then(|amount| {
                    let b = *self.0.get(&acct).ok_or(ErrorKind::NoSuchAccount)?;
                    let new = b.checked_sub(amount).ok_or(ErrorKind::InsufficientFunds)?;
                    self.0.insert(acct, new);
                    Ok(Reply::Ok(new))
                })
            }
            LedgerOp::Change(Change::Transfer { from, to, amount }) => {
                valid(amount).and_then(|amount| {
                    if from == to {
                        return Err(ErrorKind::SameAccount);
                    }
                    let b = *self.0.get(&from).ok_or(ErrorKind::NoSuchAccount)?;
                    let from_new = b.checked_sub(amount).ok_or(ErrorKind::InsufficientFunds)?;
                    let to_new = self.credit(&to, amount)?;
                    self.0.insert(from, from_new);
                    self.0.insert(to, to_new);
                    Ok(Reply::OkPair(from_new, to_new))
                })
            }
            LedgerOp::Balance { acct } => self
                .0
                .get(&acct)
                .map(|&b| Reply::Ok(b))
                .ok_or(ErrorKind::NoSuchAccount),
            LedgerOp::Audit => Ok(Reply::Audit {
                total: self.0.values().map(|&b| u128::from(b)).sum(),
                accounts: self.0.len() as u64,
            }),
        };
        outcome.unwrap_or_else(|kind| ProtocolError::refusal(kind, &op.request(), CAPACITY).into())
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

fn name() -> impl Strategy<Value = AccountName> {
    (0..NAMES.len()).prop_map(|i| NAMES[i].parse().expect("valid name"))
}

fn op() -> impl Strategy<Value = LedgerOp> {
    prop_oneof![
        3 => (name(), amount())
            .prop_map(|(acct, amount)| LedgerOp::Change(Change::Deposit { acct, amount })),
        2 => (name(), amount())
            .prop_map(|(acct, amount)| LedgerOp::Change(Change::Withdraw { acct, amount })),
        3 => (name(), name(), amount())
            .prop_map(|(from, to, amount)| LedgerOp::Change(Change::Transfer { from, to, amount })),
        1 => name().prop_map(|acct| LedgerOp::Balance { acct }),
        1 => Just(LedgerOp::Audit),
    ]
}

#[test]
fn pg_ledger_matches_the_model() {
    let Some(db) = Database::new(CAPACITY) else {
        return;
    };
    let teller = Teller::start(db.settings.clone());
    let config = ProptestConfig {
        cases: 48,
        ..ProptestConfig::default()
    };
    proptest!(config, |(ops in prop::collection::vec(op(), 1..60))| {
        // Each case starts from an empty ledger.
        db.psql(
            "TRUNCATE accounts, applied_requests; \
             UPDATE ledger_capacity SET accounts = 0",
        );
        let mut model = Model::default();
        for op in &ops {
            prop_assert_eq!(teller.call(*op), model.apply(op), "op {:?}", op);
        }
        prop_assert_eq!(teller.call(LedgerOp::Audit), model.apply(&LedgerOp::Audit));
    });
}
