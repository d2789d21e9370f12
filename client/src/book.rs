//! Bank bookkeeping: what the client knows about the money it moved, and whether the final
//! AUDIT agrees. Pure arithmetic; the network lives elsewhere.
//!
//! Only deposits and withdrawals change the ledger's total; transfers move money between
//! accounts and leave it unchanged. An operation acknowledged with `OK` certainly happened, one
//! refused with `ERR` certainly did not, and one whose connection dropped before its reply may
//! have happened or not (design note 7). So the final total must lie in
//! `expected - unknown withdrawals ..= expected + unknown deposits`; anything outside that range
//! is money created or lost.

use std::ops::AddAssign;

use forkpool_common::bank::{ErrorKind, Reply, Request};

/// How one bank reply was judged.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// `OK` (or `PONG`/`BYE`) of the expected shape.
    Applied,
    /// A refusal that the load can legitimately cause (`insufficient-funds`): nothing changed.
    Declined,
    /// An error that a correct server never gives to this load (e.g. `no-such-account` for an
    /// account the run opened): counted as a verification failure.
    Unexpected,
}

/// Sums kept by one thread (and merged at the end).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct Book {
    /// Sum of acknowledged deposits.
    pub deposited: u128,
    /// Sum of acknowledged withdrawals.
    pub withdrawn: u128,
    /// Operations acknowledged with OK.
    pub applied: u64,
    /// Operations refused with `insufficient-funds`.
    pub declined: u64,
    /// Deposits whose outcome is unknown (connection dropped before the reply), and their sum.
    pub unknown_deposits: u64,
    pub unknown_deposit_sum: u128,
    /// Withdrawals whose outcome is unknown, and their sum.
    pub unknown_withdrawals: u64,
    pub unknown_withdrawal_sum: u128,
    /// Transfers whose outcome is unknown (they cannot change the total).
    pub unknown_transfers: u64,
}

impl Book {
    /// Records the reply to `req` and says how it was judged.
    pub fn record(&mut self, req: &Request, reply: &Reply) -> Outcome {
        match (req, reply) {
            (Request::Deposit { amount, .. }, Reply::Ok(_)) => {
                self.deposited += u128::from(*amount);
                self.applied += 1;
                Outcome::Applied
            }
            (Request::Withdraw { amount, .. }, Reply::Ok(_)) => {
                self.withdrawn += u128::from(*amount);
                self.applied += 1;
                Outcome::Applied
            }
            (
                _,
                Reply::Err {
                    kind: ErrorKind::InsufficientFunds,
                    ..
                },
            ) if matches!(req, Request::Withdraw { .. } | Request::Transfer { .. }) => {
                self.declined += 1;
                Outcome::Declined
            }
            (_, Reply::Err { .. }) => Outcome::Unexpected,
            _ => {
                self.applied += 1;
                Outcome::Applied
            }
        }
    }

    /// Records a request whose reply will never come.
    pub fn record_unknown(&mut self, req: &Request) {
        match req {
            Request::Deposit { amount, .. } => {
                self.unknown_deposits += 1;
                self.unknown_deposit_sum += u128::from(*amount);
            }
            Request::Withdraw { amount, .. } => {
                self.unknown_withdrawals += 1;
                self.unknown_withdrawal_sum += u128::from(*amount);
            }
            Request::Transfer { .. } => self.unknown_transfers += 1,
            _ => {}
        }
    }

    /// Operations of unknown outcome that could change the total.
    pub fn unknown_ops(&self) -> u64 {
        self.unknown_deposits + self.unknown_withdrawals
    }

    /// Judges the final AUDIT total against `opening` (the audited total after setup).
    pub fn check(&self, opening: u128, audited: u128) -> AuditCheck {
        let expected = i128_of(opening) + i128_of(self.deposited) - i128_of(self.withdrawn);
        let difference = i128_of(audited) - expected;
        let explained = -i128_of(self.unknown_withdrawal_sum) <= difference
            && difference <= i128_of(self.unknown_deposit_sum);
        AuditCheck {
            expected,
            difference,
            explained,
        }
    }
}

/// Totals here stay far below 2^127 (at most a million accounts of 2^63-1 each).
fn i128_of(x: u128) -> i128 {
    i128::try_from(x).unwrap_or(i128::MAX)
}

impl AddAssign for Book {
    fn add_assign(&mut self, o: Book) {
        self.deposited += o.deposited;
        self.withdrawn += o.withdrawn;
        self.applied += o.applied;
        self.declined += o.declined;
        self.unknown_deposits += o.unknown_deposits;
        self.unknown_deposit_sum += o.unknown_deposit_sum;
        self.unknown_withdrawals += o.unknown_withdrawals;
        self.unknown_withdrawal_sum += o.unknown_withdrawal_sum;
        self.unknown_transfers += o.unknown_transfers;
    }
}

/// The verdict on the final AUDIT.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AuditCheck {
    /// Opening total plus acknowledged deposits minus acknowledged withdrawals.
    pub expected: i128,
    /// Audited total minus `expected`.
    pub difference: i128,
    /// Whether the operations of unknown outcome can account for `difference` (always true
    /// when it is zero).
    pub explained: bool,
}

#[cfg(test)]
mod tests {
    use super::*;
    use forkpool_common::bank::AccountName;

    fn a(name: &str) -> AccountName {
        name.parse().expect("valid name")
    }

    fn deposit(amount: u64) -> Request {
        Request::Deposit {
            acct: a("x"),
            amount,
        }
    }

    fn withdraw(amount: u64) -> Request {
        Request::Withdraw {
            acct: a("x"),
            amount,
        }
    }

    fn transfer(amount: u64) -> Request {
        Request::Transfer {
            from: a("x"),
            to: a("y"),
            amount,
        }
    }

    #[test]
    fn acknowledged_deposits_and_withdrawals_move_the_expected_total() {
        let mut book = Book::default();
        assert_eq!(book.record(&deposit(50), &Reply::Ok(50)), Outcome::Applied);
        assert_eq!(book.record(&withdraw(20), &Reply::Ok(30)), Outcome::Applied);
        assert_eq!(
            book.record(&transfer(5), &Reply::OkPair(25, 5)),
            Outcome::Applied
        );
        let check = book.check(1000, 1030);
        assert_eq!(
            check,
            AuditCheck {
                expected: 1030,
                difference: 0,
                explained: true
            }
        );
        assert!(!book.check(1000, 1031).explained);
        assert!(!book.check(1000, 1029).explained);
    }

    #[test]
    fn insufficient_funds_is_a_legitimate_refusal_other_errors_are_not() {
        let mut book = Book::default();
        let broke = Reply::error(ErrorKind::InsufficientFunds, "no");
        assert_eq!(book.record(&withdraw(5), &broke), Outcome::Declined);
        assert_eq!(book.record(&transfer(5), &broke), Outcome::Declined);
        assert_eq!(book.record(&deposit(5), &broke), Outcome::Unexpected);
        let missing = Reply::error(ErrorKind::NoSuchAccount, "no");
        assert_eq!(book.record(&withdraw(5), &missing), Outcome::Unexpected);
        assert_eq!((book.declined, book.withdrawn), (2, 0));
    }

    #[test]
    fn unknown_operations_widen_the_accepted_range_only_as_far_as_they_reach() {
        let mut book = Book::default();
        book.record_unknown(&deposit(7));
        book.record_unknown(&withdraw(3));
        book.record_unknown(&transfer(100));
        assert_eq!(book.unknown_ops(), 2);
        assert_eq!(book.unknown_transfers, 1);
        for audited in [97, 100, 104, 107] {
            assert!(book.check(100, audited).explained, "{audited}");
        }
        assert!(!book.check(100, 96).explained);
        assert!(!book.check(100, 108).explained);
        assert_eq!(book.check(100, 108).difference, 8);
    }

    #[test]
    fn books_merge_by_adding() {
        let mut a = Book::default();
        a.record(&deposit(1), &Reply::Ok(1));
        let mut b = Book::default();
        b.record(&deposit(2), &Reply::Ok(3));
        b.record_unknown(&withdraw(4));
        a += b;
        assert_eq!(
            (a.deposited, a.applied, a.unknown_withdrawal_sum),
            (3, 2, 4)
        );
    }
}
