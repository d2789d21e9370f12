//! The output gate of `--fsync always`: a bank reply leaves the worker only once the ledger's
//! operation log is durable up to the last change that the reply reports or depends on.
//!
//! * [`Gate`] (per connection) holds replies in order with the LSN each one waits for: the
//!   ledger's last appended LSN when it was answered (every change it reports or read was
//!   appended before that). Replies stay in order: once one waits, those after it wait too.
//! * [`Syncer`] (per worker) is a thread, started in the worker after the fork, that flushes
//!   the log when a reply waits ([`forkpool_ledger::Ledger::flush`]: one process flushes for
//!   all, the others sleep until it is done), wakes the worker's event loop (a `mio::Waker`),
//!   and writes a checkpoint when one is due. The loop never blocks on a flush: echo and the
//!   other connections go on meanwhile.

use std::collections::VecDeque;
use std::io;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::{Condvar, Mutex};

use forkpool_ledger::{FsyncPolicy, Ledger};
use mio::{Registry, Token, Waker};

/// Replies that wait for the log to be durable, in order.
#[derive(Debug, Default)]
pub struct Gate {
    bytes: Vec<u8>,
    /// (end of a batch of replies in `bytes`, the LSN it waits for), LSNs ascending.
    marks: VecDeque<(usize, u64)>,
}

impl Gate {
    pub fn is_empty(&self) -> bool {
        self.bytes.is_empty()
    }

    pub fn len(&self) -> usize {
        self.bytes.len()
    }

    /// Holds `replies` until the log is durable up to `lsn`.
    pub fn hold(&mut self, replies: &[u8], lsn: u64) {
        self.bytes.extend_from_slice(replies);
        match self.marks.back_mut() {
            Some((end, last)) if *last == lsn => *end = self.bytes.len(),
            _ => self.marks.push_back((self.bytes.len(), lsn)),
        }
    }

    /// Takes the replies the log now covers (those up to `durable`), in order.
    pub fn release(&mut self, durable: u64) -> Vec<u8> {
        let mut end = 0;
        while let Some(&(at, lsn)) = self.marks.front() {
            if lsn > durable {
                break;
            }
            end = at;
            self.marks.pop_front();
        }
        let rest = self.bytes.split_off(end);
        for (at, _) in &mut self.marks {
            *at -= end;
        }
        std::mem::replace(&mut self.bytes, rest)
    }

    /// Takes every reply, whatever it waits for (after a synchronous flush).
    pub fn release_all(&mut self) -> Vec<u8> {
        self.marks.clear();
        std::mem::take(&mut self.bytes)
    }
}

impl std::fmt::Debug for Syncer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Syncer")
            .field("durable", &self.ledger.durable_lsn())
            .field("failed", &self.failed())
            .finish()
    }
}

/// A worker's flusher thread and what it was asked for.
pub struct Syncer {
    ledger: &'static Ledger,
    /// The highest LSN a parked reply waits for.
    wanted: Mutex<u64>,
    asked: Condvar,
    waker: Waker,
    /// A flush failed: the ledger has failed, no parked reply will ever be released.
    failed: AtomicBool,
}

impl Syncer {
    /// Starts the worker's syncer if the ledger runs under `--fsync always` (with `never`
    /// nothing waits). `token` is the event the loop gets when replies may be released.
    pub fn start(
        ledger: &'static Ledger,
        registry: &Registry,
        token: Token,
    ) -> io::Result<Option<&'static Syncer>> {
        if ledger.fsync_policy() != FsyncPolicy::Always {
            return Ok(None);
        }
        let syncer: &'static Syncer = Box::leak(Box::new(Syncer {
            ledger,
            wanted: Mutex::new(0),
            asked: Condvar::new(),
            waker: Waker::new(registry, token)?,
            failed: AtomicBool::new(false),
        }));
        std::thread::Builder::new()
            .name("syncer".into())
            .spawn(move || syncer.run())?;
        Ok(Some(syncer))
    }

    /// The ledger whose log this syncer flushes.
    pub fn ledger(&self) -> &'static Ledger {
        self.ledger
    }

    /// Asks for the log to be durable up to `lsn` (the loop is woken when it is).
    pub fn want(&self, lsn: u64) {
        let mut wanted = self.wanted.lock().unwrap_or_else(|e| e.into_inner());
        if lsn > *wanted {
            *wanted = lsn;
            self.asked.notify_one();
        }
    }

    /// Whether a flush failed (the parked replies can never be sent).
    pub fn failed(&self) -> bool {
        self.failed.load(Relaxed)
    }

    /// Waits for a request beyond the last one served, flushes (unless another process's
    /// flush already covered it) and wakes the loop. The loop is woken for every request,
    /// flushed here or not: a reply parked while another worker's flush was under way waits
    /// for this wake, not for a flush of ours.
    fn run(&self) {
        let mut served = 0;
        loop {
            {
                let mut wanted = self.wanted.lock().unwrap_or_else(|e| e.into_inner());
                while *wanted <= served {
                    wanted = self.asked.wait(wanted).unwrap_or_else(|e| e.into_inner());
                }
                served = *wanted;
            }
            let flushed = self.ledger.flush();
            if let Err(e) = &flushed {
                log::error!("flushing the ledger's operation log failed: {e}");
                self.failed.store(true, Relaxed);
            }
            if let Err(e) = self.waker.wake() {
                log::error!("waking the event loop failed: {e}");
            }
            if flushed.is_err() {
                return;
            }
            if let Err(e) = self.ledger.checkpoint(false) {
                log::warn!("ledger checkpoint failed (the log keeps growing): {e}");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use forkpool_common::bank::AccountName;
    use forkpool_ledger::LedgerOptions;
    use mio::{Events, Poll};
    use std::time::Duration;

    /// A reply parked while another process's flush was under way: by the time the syncer
    /// looks, the log is durable past it, and the loop must still be woken.
    #[test]
    fn the_loop_is_woken_when_another_flush_already_covered_the_reply() {
        let dir = Box::leak(Box::new(
            tempfile::tempdir().expect("a temporary directory"),
        ));
        let options = LedgerOptions {
            max_accounts: 16,
            fsync: FsyncPolicy::Always,
            log_segment_bytes: 1 << 20,
            ..LedgerOptions::default()
        };
        let ledger = Ledger::open(&dir.path().join("ledger.bin"), &options).expect("a ledger");
        let ledger: &'static Ledger = Box::leak(Box::new(ledger));
        let mut poll = Poll::new().expect("poll");
        let token = Token(1);
        let syncer = Syncer::start(ledger, poll.registry(), token)
            .expect("start the syncer")
            .expect("a syncer under --fsync always");
        let mut events = Events::with_capacity(4);
        for round in 0..20 {
            let acct = AccountName::new(b"a").expect("a valid name");
            ledger.deposit(&acct, 1).expect("deposit");
            let lsn = ledger.appended_lsn();
            ledger.flush().expect("another worker's flush");
            syncer.want(lsn);
            poll.poll(&mut events, Some(Duration::from_secs(5)))
                .expect("poll");
            assert!(
                events.iter().any(|e| e.token() == token),
                "round {round}: the syncer did not wake the loop"
            );
        }
    }

    #[test]
    fn replies_leave_in_order_once_the_log_covers_them() {
        let mut gate = Gate::default();
        gate.hold(b"OK 1\n", 3);
        gate.hold(b"OK 2\n", 3);
        gate.hold(b"PONG\n", 5);
        gate.hold(b"OK 3\n", 9);
        assert_eq!(gate.release(2), b"");
        assert_eq!(gate.release(4), b"OK 1\nOK 2\n");
        assert_eq!(gate.len(), 10);
        assert_eq!(gate.release(8), b"PONG\n");
        gate.hold(b"OK 4\n", 9);
        assert_eq!(gate.release(9), b"OK 3\nOK 4\n");
        assert!(gate.is_empty());
        gate.hold(b"BYE\n", 12);
        assert_eq!(gate.release_all(), b"BYE\n");
    }
}
