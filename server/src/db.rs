//! A worker's PostgreSQL ledger: its pool of database connections (a `PgBank`, started after
//! the fork, on threads of its own), the tickets that tie each request to the connection
//! waiting for its reply, and the `mio::Waker` that brings completions back to the event loop.
//!
//! Connection keys are reused as soon as a connection closes, so a request is known by a
//! ticket unique in this worker; a session that goes away while its request is in flight
//! forgets the ticket ([`Pending`]'s `Drop`), and the reply, when it comes, is dropped.
//!
//! A session does not know its connection's key: it submits, and the worker, which drives
//! one connection at a time, [`DbBank::claim`]s what was submitted for the connection it
//! just drove (every drive of a connection ends in the worker's `settle`, which claims).

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::io;

use forkpool_common::bank::Reply;
use forkpool_pgledger::{LedgerOp, PgBank, PgSettings, PgStats};
use mio::Waker;

/// The worker's database pool and the requests in flight on it.
pub struct DbBank {
    bank: PgBank,
    next_ticket: Cell<u64>,
    /// Tickets submitted while a connection was driven, not yet claimed for it.
    unclaimed: RefCell<Vec<u64>>,
    /// The connection (its key in the worker's slab) waiting for each claimed ticket.
    waiting: RefCell<HashMap<u64, usize>>,
}

impl std::fmt::Debug for DbBank {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DbBank")
            .field("in_flight", &self.waiting.borrow().len())
            .finish_non_exhaustive()
    }
}

/// A request submitted for a connection and not answered yet. Dropped unanswered (its
/// connection closed), it is forgotten: its reply goes nowhere.
#[derive(Debug)]
pub struct Pending {
    db: &'static DbBank,
    ticket: u64,
}

impl Drop for Pending {
    fn drop(&mut self) {
        self.db.waiting.borrow_mut().remove(&self.ticket);
        self.db.unclaimed.borrow_mut().retain(|&t| t != self.ticket);
    }
}

impl DbBank {
    /// Starts the pool (it connects in the background); each completion wakes the worker's
    /// loop through `waker` (the loop's one waker: mio allows one per poll).
    pub fn start(settings: PgSettings, waker: &'static Waker) -> io::Result<DbBank> {
        let wake = Box::new(move || {
            if let Err(e) = waker.wake() {
                log::error!("cannot wake the worker for a ledger reply: {e}");
            }
        });
        Ok(DbBank {
            bank: PgBank::start(settings, wake)?,
            next_ticket: Cell::new(0),
            unclaimed: RefCell::default(),
            waiting: RefCell::default(),
        })
    }

    /// Queues `op` for the connection being driven; never blocks.
    pub fn submit(&'static self, op: LedgerOp) -> Pending {
        let ticket = self.next_ticket.get();
        self.next_ticket.set(ticket + 1);
        self.unclaimed.borrow_mut().push(ticket);
        self.bank.submit(ticket, op);
        Pending { db: self, ticket }
    }

    /// The requests submitted since the last claim are connection `conn`'s.
    pub fn claim(&self, conn: usize) {
        let mut waiting = self.waiting.borrow_mut();
        for ticket in self.unclaimed.borrow_mut().drain(..) {
            waiting.insert(ticket, conn);
        }
    }

    /// The replies that came back, each with the key of the connection waiting for it
    /// (replies for connections gone are dropped here). The caller then drops the
    /// connection's [`Pending`], which is a no-op.
    pub fn completions(&self) -> Vec<(usize, Reply)> {
        let mut waiting = self.waiting.borrow_mut();
        self.bank
            .completions()
            .into_iter()
            .filter_map(|(ticket, reply)| Some((waiting.remove(&ticket)?, reply)))
            .collect()
    }

    /// The pool's figures (requests of connections gone count as in flight until their
    /// reply comes: they still occupy the pool).
    pub fn stats(&self) -> PgStats {
        self.bank.stats()
    }
}
