//! The bank service: carries out one parsed request against the shared ledger and says how
//! it went as a protocol reply. Parsing and reply formatting are `forkpool-common`'s; the
//! ledger's guarantees (atomic, crash-safe) are `forkpool-ledger`'s.

use forkpool_common::bank::{AccountName, Reply, Request};
use forkpool_ledger::{Ledger, OpError};

/// Carries out `request`. QUIT is the caller's business (it closes the connection).
pub fn execute(ledger: &Ledger, request: &Request) -> Reply {
    match *request {
        Request::Deposit { acct, amount } => {
            result(ledger.deposit(&acct, amount).map(Reply::Ok), &[acct])
        }
        Request::Withdraw { acct, amount } => {
            result(ledger.withdraw(&acct, amount).map(Reply::Ok), &[acct])
        }
        Request::Transfer { from, to, amount } => result(
            ledger
                .transfer(&from, &to, amount)
                .map(|(from, to)| Reply::OkPair(from, to)),
            &[from, to],
        ),
        Request::Balance { acct } => result(ledger.balance(&acct).map(Reply::Ok), &[acct]),
        Request::Audit => result(
            ledger.audit().map(|audit| Reply::Audit {
                total: audit.total,
                accounts: audit.accounts,
            }),
            &[],
        ),
        Request::Ping => Reply::Pong,
        Request::Quit => Reply::Bye,
    }
}

/// Turns a ledger failure into an error reply whose detail names the accounts involved.
fn result(outcome: Result<Reply, OpError>, accounts: &[AccountName]) -> Reply {
    let error = match outcome {
        Ok(reply) => return reply,
        Err(error) => error,
    };
    let first = accounts.first().map_or("", AccountName::as_str);
    let detail = match error {
        // Only the source of a transfer must exist; its destination is opened if new.
        OpError::NoSuchAccount => format!("account {first} does not exist"),
        OpError::InsufficientFunds => format!("account {first} holds less than the amount"),
        OpError::SameAccount => format!("cannot transfer from {first} to itself"),
        OpError::BadAmount => {
            "amount must be a whole number from 1 to 9223372036854775807".to_string()
        }
        OpError::Overflow => "the resulting balance would exceed 9223372036854775807".to_string(),
        OpError::LedgerFull => "the ledger has no room for another account".to_string(),
        OpError::Unrecoverable(lock) => {
            log::error!("ledger {lock} lock is unrecoverable: the ledger needs a restart");
            "the ledger cannot serve this request; nothing changed".to_string()
        }
        // Logged once, as an error, by whichever process found the fault.
        OpError::FileFault(fault) => {
            format!("{fault}: the server must be restarted; nothing changed")
        }
    };
    Reply::error(error.kind(), detail)
}
