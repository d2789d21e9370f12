//! The bank service: carries out one parsed request against the ledger and says how it went
//! as a protocol reply. Parsing and reply formatting (the wording of every error detail
//! included) are `forkpool-common`'s; the ledger's guarantees (atomic, crash-safe) are
//! `forkpool-ledger`'s and `forkpool-pgledger`'s. The shared-memory ledger answers at once;
//! a database answers later, through the worker's [`DbBank`].

use forkpool_common::bank::{ErrorKind, ProtocolError, Reply, Request};
use forkpool_ledger::{Ledger, OpError};
use forkpool_pgledger::{Change, LedgerOp};

use crate::db::DbBank;

/// The ledger a worker's bank sessions work on, for the worker's whole life.
#[derive(Debug, Clone, Copy)]
pub enum Backend {
    /// The shared-memory ledger file, mapped by every worker.
    File(&'static Ledger),
    /// A PostgreSQL database, through this worker's pool of connections.
    Db(&'static DbBank),
}

/// Detail of the answer to AUTH on a server without users (as Redis answers AUTH without a
/// password configured): there is nobody to become.
pub const NO_USERS_DETAIL: &str = "no users are configured on this server";

/// Carries out `request`. QUIT is the caller's business (it closes the connection). AUTH is
/// answered here only for a server without users (`ERR denied`); with users, the session
/// handles AUTH (see `users::ConnAuth`) and never passes it on.
pub fn execute(ledger: &Ledger, request: &Request) -> Reply {
    let Some(op) = LedgerOp::of(request) else {
        return without_ledger(request);
    };
    let outcome = match op {
        LedgerOp::Change(Change::Deposit { acct, amount }) => {
            ledger.deposit(&acct, amount).map(Reply::Ok)
        }
        LedgerOp::Change(Change::Withdraw { acct, amount }) => {
            ledger.withdraw(&acct, amount).map(Reply::Ok)
        }
        LedgerOp::Change(Change::Transfer { from, to, amount }) => ledger
            .transfer(&from, &to, amount)
            .map(|(from, to)| Reply::OkPair(from, to)),
        LedgerOp::Balance { acct } => ledger.balance(&acct).map(Reply::Ok),
        LedgerOp::Audit => ledger.audit().map(|audit| Reply::Audit {
            total: audit.total,
            accounts: audit.accounts,
        }),
    };
    outcome.unwrap_or_else(|error| failure(ledger, request, error).into())
}

/// The reply to a request that needs no ledger (those [`LedgerOp::of`] leaves out: PING,
/// QUIT, and AUTH on a server without users), whatever the backend.
pub fn without_ledger(request: &Request) -> Reply {
    match request {
        Request::Ping => Reply::Pong,
        Request::Quit => Reply::Bye,
        Request::Auth { .. } => Reply::error(ErrorKind::Denied, NO_USERS_DETAIL),
        // Not a request for this function: refused, never carried out here.
        _ => ProtocolError::internal().into(),
    }
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
