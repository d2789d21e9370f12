//! The output gate of `--fsync always`: a bank or queue reply leaves the worker only once the
//! operation log of its shared file (the ledger, the queue store) is durable up to the last
//! change that the reply reports or depends on.
//!
//! * [`Gate`] (per connection) holds replies in order with the LSN each one waits for: the
//!   log's last appended LSN when it was answered (every change it reports or read was
//!   appended before that). Replies stay in order: once one waits, those after it wait too.
//! * [`Syncer`] (per worker and log) is a thread, started in the worker after the fork, that
//!   flushes the log when a reply waits ([`Logged::flush`]: one process flushes for all, the
//!   others sleep until it is done), wakes the worker's event loop (one `mio::Waker` shared
//!   by the worker's syncers), and writes a checkpoint when one is due. The loop never
//!   blocks on a flush: echo and the other connections go on meanwhile.

use std::collections::VecDeque;
use std::io;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::{Condvar, Mutex};

use forkpool_ledger::Ledger;
use forkpool_queue::Store;
use mio::Waker;

/// A shared file whose changes a redo log makes durable by group commit.
pub trait Logged: Sync {
    /// What the log belongs to, for the log messages.
    fn what(&self) -> &'static str;
    /// LSN of the last record appended (a reply given now depends on nothing later).
    fn appended_lsn(&self) -> u64;
    /// Every record up to this LSN is on stable storage.
    fn durable_lsn(&self) -> u64;
    /// Makes every record appended before the call durable (one process flushes for all).
    fn flush(&self) -> Result<u64, String>;
    /// Writes a checkpoint if one is due; whether it wrote one.
    fn checkpoint(&self) -> io::Result<bool>;
}

impl Logged for Ledger {
    fn what(&self) -> &'static str {
        "the ledger"
    }

    fn appended_lsn(&self) -> u64 {
        Ledger::appended_lsn(self)
    }

    fn durable_lsn(&self) -> u64 {
        Ledger::durable_lsn(self)
    }

    fn flush(&self) -> Result<u64, String> {
        Ledger::flush(self).map_err(|e| e.to_string())
    }

    fn checkpoint(&self) -> io::Result<bool> {
        Ledger::checkpoint(self, false)
    }
}

impl Logged for Store {
    fn what(&self) -> &'static str {
        "the queue store"
    }

    fn appended_lsn(&self) -> u64 {
        Store::appended_lsn(self)
    }

    fn durable_lsn(&self) -> u64 {
        Store::durable_lsn(self)
    }

    fn flush(&self) -> Result<u64, String> {
        Store::flush(self).map_err(|e| e.to_string())
    }

    fn checkpoint(&self) -> io::Result<bool> {
        Store::checkpoint(self, false)
    }
}

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
            .field("log", &self.log.what())
            .field("durable", &self.log.durable_lsn())
            .field("failed", &self.failed())
            .finish()
    }
}

/// A worker's flusher thread for one log and what it was asked for.
pub struct Syncer {
    log: &'static dyn Logged,
    /// The highest LSN a parked reply waits for.
    wanted: Mutex<u64>,
    asked: Condvar,
    /// Wakes the worker's loop (shared by its syncers: one waker per poll).
    waker: &'static Waker,
    /// A flush failed: the log has failed, no parked reply will ever be released.
    failed: AtomicBool,
}

impl Syncer {
    /// Starts a syncer for `log` (a file under `--fsync always`: with `never` nothing waits
    /// and there is no syncer); `waker` wakes the loop when replies may be released.
    pub fn start(log: &'static dyn Logged, waker: &'static Waker) -> io::Result<&'static Syncer> {
        let syncer: &'static Syncer = Box::leak(Box::new(Syncer {
            log,
            wanted: Mutex::new(0),
            asked: Condvar::new(),
            waker,
            failed: AtomicBool::new(false),
        }));
        std::thread::Builder::new()
            .name("syncer".into())
            .spawn(move || syncer.run())?;
        Ok(syncer)
    }

    /// The log this syncer flushes.
    pub fn log(&self) -> &'static dyn Logged {
        self.log
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
            let flushed = self.log.flush();
            if let Err(e) = &flushed {
                log::error!("flushing {}'s operation log failed: {e}", self.log.what());
                self.failed.store(true, Relaxed);
            }
            if let Err(e) = self.waker.wake() {
                log::error!("waking the event loop failed: {e}");
            }
            if flushed.is_err() {
                return;
            }
            if let Err(e) = self.log.checkpoint() {
                log::warn!(
                    "checkpoint of {} failed (the log keeps growing): {e}",
                    self.log.what()
                );
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use forkpool_common::bank::AccountName;
    use forkpool_ledger::{FsyncPolicy, LedgerOptions};
    use mio::{Events, Poll, Token};
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
        let waker = Box::leak(Box::new(
            Waker::new(poll.registry(), token).expect("a waker"),
        ));
        let syncer = Syncer::start(ledger, waker).expect("start the syncer");
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
