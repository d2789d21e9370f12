//! The bank service: carries out one parsed request against the shared ledger and says how
//! it went as a protocol reply. Parsing and reply formatting (the wording of every error
//! detail included) are `forkpool-common`'s; the ledger's guarantees (atomic, crash-safe) are
//! `forkpool-ledger`'s.

use forkpool_common::bank::{ErrorKind, ProtocolError, Reply, Request};
use forkpool_ledger::{Ledger, OpError};

/// Detail of the answer to AUTH on a server without users (as Redis answers AUTH without a
/// password configured): there is nobody to become.
pub const NO_USERS_DETAIL: &str = "no users are configured on this server";

/// Carries out `request`. QUIT is the caller's business (it closes the connection). AUTH is
/// answered here only for a server without users (`ERR denied`); with users, the session
/// handles AUTH (see `users::ConnAuth`) and never passes it on.
pub fn execute(ledger: &Ledger, request: &Request) -> Reply {
    let outcome = match *request {
        Request::Deposit { acct, amount } => ledger.deposit(&acct, amount).map(Reply::Ok),
        Request::Withdraw { acct, amount } => ledger.withdraw(&acct, amount).map(Reply::Ok),
        Request::Transfer { from, to, amount } => ledger
            .transfer(&from, &to, amount)
            .map(|(from, to)| Reply::OkPair(from, to)),
        Request::Balance { acct } => ledger.balance(&acct).map(Reply::Ok),
        Request::Audit => ledger.audit().map(|audit| Reply::Audit {
            total: audit.total,
            accounts: audit.accounts,
        }),
        Request::Ping => Ok(Reply::Pong),
        Request::Quit => Ok(Reply::Bye),
        Request::Auth { .. } => Ok(Reply::error(ErrorKind::Denied, NO_USERS_DETAIL)),
    };
    outcome.unwrap_or_else(|error| failure(ledger, request, error).into())
}

/// The error for a ledger failure, naming the account it is about (the wording is
/// `ProtocolError::refusal`'s, shared with every ledger backend).
fn failure(ledger: &Ledger, request: &Request, error: OpError) -> ProtocolError {
    match error {
        OpError::Unrecoverable(lock) => {
            log::error!("ledger {lock} lock is unrecoverable: the ledger needs a restart");
            ProtocolError::internal()
        }
        // Logged once, as an error, by whichever process found the fault.
        OpError::FileFault(_) => ProtocolError::new(error.kind(), error.to_string()),
        _ => ProtocolError::refusal(error.kind(), request, ledger.capacity()),
    }
}
