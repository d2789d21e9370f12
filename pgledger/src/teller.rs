//! A blocking front for [`PgBank`], for tools and tests (the benchmark driver, the test
//! suites); the server uses the non-blocking API. Any number of threads may call at once: the
//! pool's wake-up hands each completion straight to the caller waiting for its ticket, so a
//! completion wakes one caller, not all of them.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::mpsc::{sync_channel, SyncSender};
use std::sync::{Arc, Mutex, OnceLock, PoisonError};
use std::time::Duration;

use forkpool_common::bank::Reply;

use crate::pool::Shared;
use crate::{LedgerOp, PgBank, PgSettings};

/// The callers waiting, by ticket, and where the completions come from.
#[derive(Default)]
struct Router {
    waiting: Mutex<HashMap<u64, SyncSender<Reply>>>,
    /// Set once the pool runs (no completion can come before the first submission).
    pool: OnceLock<Arc<Shared>>,
}

impl Router {
    fn route(&self) {
        let Some(pool) = self.pool.get() else {
            return;
        };
        let mut waiting = self.waiting.lock().unwrap_or_else(PoisonError::into_inner);
        for (ticket, reply) in pool.drain() {
            if let Some(caller) = waiting.remove(&ticket) {
                // A caller that gave up has dropped its receiver: the reply goes nowhere.
                let _ = caller.send(reply);
            }
        }
    }
}

/// A [`PgBank`] with a blocking [`Teller::call`].
pub struct Teller {
    pub bank: PgBank,
    router: Arc<Router>,
    next_ticket: AtomicU64,
}

impl Teller {
    /// Starts the pool (see [`PgBank::start`]).
    pub fn start(settings: PgSettings) -> Result<Teller, std::io::Error> {
        let router: Arc<Router> = Arc::default();
        let wake = {
            let router = Arc::clone(&router);
            Box::new(move || router.route())
        };
        let bank = PgBank::start(settings, wake)?;
        // The router is new: its cell is empty, so this always sets it.
        let _ = router.pool.set(Arc::clone(&bank.shared));
        Ok(Teller {
            bank,
            router,
            next_ticket: AtomicU64::new(0),
        })
    }

    /// Submits `op` and waits for its reply; `None` if none came within `timeout` (the
    /// reply is then dropped when it comes).
    pub fn call(&self, op: LedgerOp, timeout: Duration) -> Option<Reply> {
        let ticket = self.next_ticket.fetch_add(1, Relaxed);
        let (sender, receiver) = sync_channel(1);
        self.router
            .waiting
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(ticket, sender);
        self.bank.submit(ticket, op);
        let reply = receiver.recv_timeout(timeout).ok();
        if reply.is_none() {
            self.router
                .waiting
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .remove(&ticket);
        }
        reply
    }
}
