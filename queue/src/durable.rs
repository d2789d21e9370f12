//! `--fsync always` for the queue store by group commit, as the ledger's (`ledger/src/durable.rs`,
//! argued in docs/LEDGER.md; the differences are in docs/QUEUE.md): every transaction appends a
//! physical redo record to a log shared by all processes, and a reply waits until a flush
//! covers its record; one flush covers every record appended before it.
//!
//! * **Append** ([`Region::log_writes`], the commit point of a [`crate::region::Tx`], under the
//!   store lock, which serialises appends): note the LSN and offset being appended, write the
//!   record (the new value of every word the transaction wrote) at the end of the active
//!   segment (switching to the other one first if it has no room and the installed checkpoint
//!   no longer needs the other), publish the new end and LSN, empty the undo journal. A
//!   process that dies appending is repaired by the next holder of the store lock
//!   ([`Region::settle_append`]): the transaction is kept (rolled forward) exactly if its
//!   record is whole in the log, else rolled back.
//! * **Flush** ([`Store::flush`]): one process at a time (`try_lock`) `fdatasync`s the
//!   segment(s) holding the records since the durable LSN, raises it and wakes the waiters
//!   (futex); the others sleep and find their LSN covered. It never takes the store lock.
//! * **Checkpoint** ([`Store::checkpoint`]): once the active segment is half full, under the
//!   store lock: switch segments if the installed checkpoint no longer needs the other one,
//!   copy the region's used parts; then, without the store lock: temp file, flush, rename,
//!   flush of the directory. The segment before the switch is free once the rename is durable.
//! * **Cold start** ([`Store::rebuild`]): the mapped file is never trusted after a power loss
//!   (page writeback has no order, so it may be torn): the checkpoint's image, then the
//!   log's whole records, are written over a zeroed region; a damaged record that a later
//!   one proves durable refuses the start before anything is written. After the usual cold
//!   start, a new checkpoint with a new epoch starts the log afresh ([`Store::start_log`]).

use std::io;
use std::sync::atomic::AtomicU32;
use std::sync::atomic::Ordering::{AcqRel, Acquire, Relaxed, Release};
use std::time::Duration;

use forkpool_shm::{futex_wait, futex_wake_all, Acquired, LockWord, LogStore};

use crate::crash_point;
use crate::error::{OpError, StoreError};
use crate::layout::{hdr, q, w, wal, HEADER_BYTES, JOURNAL_CAP};
use crate::redo::{self, Body, Checkpoint, Record};
use crate::region::Region;
use crate::{Store, WakeSet};

/// How long a flush waiter sleeps on the futex before it looks again (a flusher that died
/// never wakes it).
const FLUSH_WAIT: Duration = Duration::from_millis(50);
/// Default bytes of each log segment.
pub const DEFAULT_LOG_SEGMENT_BYTES: u64 = 16 << 20;

/// The redo log of a store under `--fsync always`.
pub(crate) struct Wal {
    pub(crate) store: Box<dyn LogStore>,
}

/// A held lock of the log's shared state; unlocks on drop.
struct Held<'a>(&'a LockWord);

impl Drop for Held<'_> {
    fn drop(&mut self) {
        self.0.unlock();
    }
}

/// Takes `lock` without waiting: `None` if another process holds it.
fn try_hold(lock: &LockWord) -> Result<Option<Held<'_>>, OpError> {
    match lock.try_lock().map_err(|_| OpError::Unrecoverable)? {
        None => Ok(None),
        Some(acquired) => {
            if acquired == Acquired::OwnerDied {
                lock.consistent();
            }
            Ok(Some(Held(lock)))
        }
    }
}

impl Region {
    fn log_word(&self, offset: u64) -> u64 {
        self.word(offset).load(Acquire)
    }

    fn set_log_word(&self, offset: u64, value: u64) {
        self.word(offset).store(value, Release);
    }

    fn flushed(&self) -> &AtomicU32 {
        self.at(wal::FLUSHED)
    }

    /// Bytes of the largest record one transaction appends (a full journal and a whole
    /// payload).
    pub(crate) fn max_record(&self) -> u64 {
        let payload_words = u64::from(self.geometry().max_payload).div_ceil(8);
        redo::record_bytes((JOURNAL_CAP + payload_words) as usize) as u64
    }

    /// Whether the log could not be written or flushed (the store refuses operations).
    pub(crate) fn log_failed(&self) -> bool {
        self.wal.is_some() && self.log_word(wal::FAILED) != 0
    }

    /// Refuses new work while the active segment is nearly full and cannot be switched.
    pub(crate) fn check_log_room(&self) -> Result<(), OpError> {
        let Some(log) = &self.wal else {
            return Ok(());
        };
        let room = log.store.segment_bytes() - self.log_word(wal::END);
        let stuck = self.log_word(wal::CHECKPOINT_LOG) != self.log_word(wal::ACTIVE);
        if stuck && room < 4 * self.max_record() {
            return Err(OpError::LogFull);
        }
        Ok(())
    }

    /// The commit point of a transaction that journaled `journaled` writes and filled the
    /// `fresh` range: appends its record (no record without a log, or without writes).
    /// `false`: it could not be appended; the log has failed and the caller rolls back.
    pub(crate) fn log_writes(&self, journaled: u64, fresh: Option<(u64, u64)>) -> bool {
        let Some(log) = &self.wal else {
            return true;
        };
        if self.log_failed() {
            return false;
        }
        let fresh = fresh
            .into_iter()
            .flat_map(|(start, n)| (0..n).map(move |k| start + 8 * k));
        let offsets = (0..journaled).map(|i| self.journal_entry(i).0).chain(fresh);
        let writes: Vec<(u64, u64)> = offsets.map(|o| (o, self.get(o))).collect();
        if writes.is_empty() {
            return true;
        }
        match self.append(log, Body::Writes(writes)) {
            Ok(_) => true,
            Err(e) => {
                self.fail_log("write to the operation log", &e);
                false
            }
        }
    }

    /// Appends a record, switching segments first if the active one has no room for it.
    /// Caller holds the store lock and calls [`Region::appended`] once its writes are final.
    fn append(&self, log: &Wal, body: Body) -> io::Result<u64> {
        let len = match &body {
            Body::Writes(writes) => redo::record_bytes(writes.len()) as u64,
            Body::Switch => redo::record_bytes(0) as u64,
        };
        let switch_bytes = redo::record_bytes(0) as u64;
        if self.log_word(wal::END) + len + switch_bytes > log.store.segment_bytes() {
            if self.log_word(wal::CHECKPOINT_LOG) != self.log_word(wal::ACTIVE) {
                return Err(io::Error::other(
                    "the operation log is full: no checkpoint has freed the other segment",
                ));
            }
            self.append_one(log, Body::Switch)?;
        }
        self.append_one(log, body)
    }

    fn append_one(&self, log: &Wal, body: Body) -> io::Result<u64> {
        let (lsn, offset) = (self.log_word(wal::NEXT_LSN), self.log_word(wal::END));
        let segment = self.log_word(wal::ACTIVE) as u8;
        let switch = body == Body::Switch;
        let record = Record {
            epoch: self.log_word(wal::EPOCH),
            lsn,
            durable: self.log_word(wal::DURABLE),
            body,
        }
        .encode();
        self.set_log_word(wal::APPENDING_OFFSET, offset);
        self.set_log_word(wal::APPENDING_LSN, lsn);
        crash_point();
        if let Err(e) = log.store.write_log(segment, offset, &record) {
            self.set_log_word(wal::APPENDING_LSN, 0);
            return Err(e);
        }
        crash_point();
        self.publish(lsn, offset + record.len() as u64, switch);
        Ok(lsn)
    }

    /// Makes record `lsn`, ending at `end`, part of the log. Caller holds the store lock.
    fn publish(&self, lsn: u64, end: u64, switch: bool) {
        if switch {
            self.set_log_word(wal::SWITCH_LSN, lsn);
            self.set_log_word(wal::ACTIVE, 1 - self.log_word(wal::ACTIVE));
            self.set_log_word(wal::END, 0);
        } else {
            self.set_log_word(wal::END, end);
        }
        crash_point();
        self.set_log_word(wal::NEXT_LSN, lsn + 1);
        crash_point();
    }

    /// The append is over (the journal is empty): nothing for a repairer to decide.
    pub(crate) fn appended(&self) {
        if self.wal.is_some() {
            self.set_log_word(wal::APPENDING_LSN, 0);
        }
    }

    /// After the holder of the store lock died: whether its transaction's record is in the
    /// log (published, or whole where it was going: then it is published now), so that the
    /// transaction must be kept rather than rolled back. Idempotent until
    /// [`Region::appended`].
    pub(crate) fn settle_append(&self) -> bool {
        let Some(log) = &self.wal else {
            return false;
        };
        let lsn = self.log_word(wal::APPENDING_LSN);
        if lsn == 0 {
            return false;
        }
        if self.log_word(wal::NEXT_LSN) > lsn {
            return true;
        }
        let offset = self.log_word(wal::APPENDING_OFFSET);
        let segment = self.log_word(wal::ACTIVE) as u8;
        let max = self.max_record() as usize;
        let bytes = log.store.read_log(segment, offset, max).unwrap_or_default();
        let epoch = self.log_word(wal::EPOCH);
        match Record::decode(&bytes, 0).filter(|(r, _)| r.lsn == lsn && r.epoch == epoch) {
            Some((record, len)) => {
                self.publish(lsn, offset + len as u64, record.body == Body::Switch);
                true
            }
            None => false,
        }
    }

    /// Fails the log for every process: every later operation is refused.
    fn fail_log(&self, action: &str, e: &io::Error) {
        self.set_log_word(wal::FAILED, 1);
        log::error!(
            "queue store: {action} failed: {e}; every queue request answers ERR internal until \
             the server is restarted (the restart keeps what the log holds)"
        );
    }

    /// Every word of `len` bytes from `at` (both multiples of 8).
    fn bytes(&self, at: u64, len: u64) -> Vec<u8> {
        (0..len / 8)
            .flat_map(|k| self.get(at + 8 * k).to_le_bytes())
            .collect()
    }

    /// The region's used parts and where the log goes on; caller holds the store lock (or
    /// owns the file at a cold start).
    fn image(&self) -> Checkpoint {
        let g = *self.geometry();
        let parts = [
            (0, HEADER_BYTES),
            (g.off_queues, self.get(hdr::QUEUE_COUNT) * q::WORDS * 8),
            (g.off_waiters, self.get(hdr::WAITERS_HIGH) * w::WORDS * 8),
            (g.off_jobs, self.get(hdr::JOBS_HIGH) * g.job_bytes),
        ];
        Checkpoint {
            epoch: self.log_word(wal::EPOCH),
            next_lsn: self.log_word(wal::NEXT_LSN),
            log: self.log_word(wal::ACTIVE) as u8,
            offset: self.log_word(wal::END),
            extents: parts
                .into_iter()
                .filter(|&(_, len)| len > 0)
                .map(|(at, len)| (at, self.bytes(at, len)))
                .collect(),
        }
    }

    /// Zeroes every page of `from..to` that holds a non-zero word (pages already zero are
    /// only read, so a rebuilt file is not dirtied whole).
    fn zero(&self, from: u64, to: u64) {
        let page = forkpool_shm::PAGE;
        let mut at = from;
        while at < to {
            let end = (at + page).min(to);
            let words = (at..end).step_by(8);
            if words.clone().any(|o| self.get(o) != 0) {
                words.for_each(|o| self.word(o).store(0, Relaxed));
            }
            at = end;
        }
    }
}

/// Replaces the checkpoint: temp file, flush, rename, flush of the directory.
fn install(log: &Wal, image: &Checkpoint) -> io::Result<()> {
    log.store.write_checkpoint(&image.encode())?;
    crash_point();
    log.store.sync_checkpoint()?;
    crash_point();
    log.store.install_checkpoint()?;
    crash_point();
    log.store.sync_dir()
}

impl Store {
    /// LSN of the last record appended: a reply given now depends on nothing later. 0 when
    /// there is no log (`--fsync never`).
    pub fn appended_lsn(&self) -> u64 {
        match self.region.wal {
            Some(_) => self.region.log_word(wal::NEXT_LSN).saturating_sub(1),
            None => 0,
        }
    }

    /// Every record up to this LSN is on stable storage (with no log: every LSN, `u64::MAX`).
    pub fn durable_lsn(&self) -> u64 {
        match self.region.wal {
            Some(_) => self.region.log_word(wal::DURABLE),
            None => u64::MAX,
        }
    }

    /// Whether the store runs under `--fsync always` (has a log).
    pub fn is_logged(&self) -> bool {
        self.region.wal.is_some()
    }

    /// Makes every record appended before the call durable and returns the durable LSN.
    /// One caller at a time flushes (for everyone); the others sleep until it is done.
    pub fn flush(&self) -> Result<u64, OpError> {
        let Some(log) = &self.region.wal else {
            return Ok(u64::MAX);
        };
        let target = self.appended_lsn();
        loop {
            if self.region.log_failed() {
                return Err(OpError::LogFailed);
            }
            let durable = self.region.log_word(wal::DURABLE);
            if durable >= target {
                return Ok(durable);
            }
            let seen = self.region.flushed().load(Acquire);
            match try_hold(self.region.at(wal::FLUSH_LOCK))? {
                Some(_held) => self.flush_held(log)?,
                None => futex_wait(self.region.flushed(), seen, FLUSH_WAIT),
            }
        }
    }

    /// The flush itself; caller holds the flush lock. Records up to the LSN read first are
    /// written (they were published after their write); they lie in the active segment,
    /// or in both if a switch happened since the durable LSN.
    fn flush_held(&self, log: &Wal) -> Result<(), OpError> {
        let r = &self.region;
        let upto = r.log_word(wal::NEXT_LSN) - 1;
        let durable = r.log_word(wal::DURABLE);
        if upto <= durable {
            return Ok(());
        }
        let switch = r.log_word(wal::SWITCH_LSN);
        let active = r.log_word(wal::ACTIVE) as u8;
        let both = switch > durable || r.log_word(wal::SWITCH_LSN) != switch;
        let sync = |segment: u8| {
            log.store.sync_log(segment).map_err(|e| {
                r.fail_log("fdatasync of the operation log", &e);
                OpError::LogFailed
            })
        };
        if both {
            sync(1 - active)?;
        }
        sync(active)?;
        crash_point();
        r.word(wal::DURABLE).fetch_max(upto, AcqRel);
        r.flushed().fetch_add(1, Release);
        futex_wake_all(r.flushed());
        Ok(())
    }

    /// Writes a checkpoint if the active segment is half full (or `force`) and no other
    /// process is writing one; returns whether it wrote one. Copies the region's used parts
    /// under the store lock; call it off any latency-critical path.
    pub fn checkpoint(&self, force: bool) -> io::Result<bool> {
        let Some(log) = &self.region.wal else {
            return Ok(false);
        };
        let half = log.store.segment_bytes() / 2;
        if !force && self.region.log_word(wal::END) < half {
            return Ok(false);
        }
        let (held, image) = {
            // The store lock first, then the checkpoint lock: never the other way round.
            let mut wakes = WakeSet::default();
            let _locked = self.lock(&mut wakes).map_err(io::Error::other)?;
            let Some(held) =
                try_hold(self.region.at(wal::CHECKPOINT_LOCK)).map_err(io::Error::other)?
            else {
                return Ok(false);
            };
            let r = &self.region;
            if r.log_word(wal::END) >= half
                && r.log_word(wal::CHECKPOINT_LOG) == r.log_word(wal::ACTIVE)
            {
                let switched = r.append_one(log, Body::Switch);
                r.appended();
                switched.inspect_err(|e| r.fail_log("write to the operation log", e))?;
            }
            (held, r.image())
        };
        install(log, &image)?;
        self.region
            .set_log_word(wal::CHECKPOINT_LOG, u64::from(image.log));
        drop(held);
        Ok(true)
    }

    /// Cold start under a log: rebuilds the region from the checkpoint and the log, if there
    /// is a checkpoint; returns its epoch and the LSN after the last whole record. Reads and
    /// checks everything before it writes anything.
    pub(crate) fn rebuild(&self, log: &Wal) -> Result<Option<(u64, u64)>, StoreError> {
        let io = |action| {
            move |source| StoreError::Io {
                path: self.path.clone(),
                action,
                source,
            }
        };
        let Some(bytes) = log
            .store
            .read_checkpoint()
            .map_err(io("read the checkpoint"))?
        else {
            return Ok(None);
        };
        let corrupt = || StoreError::CheckpointCorrupt {
            path: self.path.clone(),
        };
        let ckpt = Checkpoint::decode(&bytes).ok_or_else(corrupt)?;
        if !self.fits(&ckpt) {
            return Err(corrupt());
        }
        let size = log.store.segment_bytes() as usize;
        let logs = [
            log.store.read_log(0, 0, size).map_err(io("read the log"))?,
            log.store.read_log(1, 0, size).map_err(io("read the log"))?,
        ];
        let bad = |lsn, segment, offset| StoreError::LogCorrupt {
            path: self.path.clone(),
            lsn,
            segment,
            offset,
        };
        let replay =
            redo::scan(&ckpt, [&logs[0], &logs[1]]).map_err(|e| bad(e.lsn, e.log, e.offset))?;
        let g = *self.region.geometry();
        if let Some(&(offset, _)) = replay.writes.iter().find(|(o, _)| !g.writable(*o)) {
            return Err(bad(replay.next_lsn, 0, offset));
        }
        self.region.zero(HEADER_BYTES, g.file_size);
        for (at, bytes) in &ckpt.extents {
            for (k, chunk) in bytes.chunks_exact(8).enumerate() {
                let word = u64::from_le_bytes(chunk.try_into().expect("8 bytes"));
                self.region.word(at + 8 * k as u64).store(word, Relaxed);
            }
        }
        for &(offset, value) in &replay.writes {
            self.region.word(offset).store(value, Relaxed);
        }
        log::info!(
            "queue store {}: rebuilt from the checkpoint at LSN {} and {} logged transactions",
            self.path.display(),
            ckpt.next_lsn,
            replay.records
        );
        Ok(Some((ckpt.epoch, replay.next_lsn)))
    }

    /// Whether a checkpoint's extents lie in this file and its header is this file's.
    fn fits(&self, ckpt: &Checkpoint) -> bool {
        let g = self.region.geometry();
        let header = g.encode();
        ckpt.extents.iter().all(|(at, bytes)| {
            let len = bytes.len() as u64;
            at.is_multiple_of(8)
                && len.is_multiple_of(8)
                && at.checked_add(len).is_some_and(|end| end <= g.file_size)
                && (*at != 0 || bytes.get(..header.len()) == Some(&header[..]))
        }) && ckpt.extents.first().is_some_and(|(at, _)| *at == 0)
    }

    /// Cold start: resets the log's shared state and installs a checkpoint of the region as
    /// it is, with epoch `epoch`, from which the log starts at LSN `next_lsn`.
    pub(crate) fn start_log(&self, log: &Wal, epoch: u64, next_lsn: u64) -> Result<(), StoreError> {
        let least = 8 * self.region.max_record();
        if log.store.segment_bytes() < least {
            return Err(StoreError::InvalidOptions {
                path: self.path.clone(),
                detail: format!(
                    "each operation log segment must hold at least {least} bytes with \
                     max_payload {}, not {}",
                    self.region.geometry().max_payload,
                    log.store.segment_bytes()
                ),
            });
        }
        for lock in [wal::FLUSH_LOCK, wal::CHECKPOINT_LOCK] {
            // SAFETY: cold start: this process holds the file's exclusive flock and has not
            // forked yet, so nobody else uses the lock.
            unsafe { self.region.at::<LockWord>(lock).init() }.map_err(|source| {
                StoreError::Io {
                    path: self.path.clone(),
                    action: "initialise lock",
                    source,
                }
            })?;
        }
        let words = [
            (wal::NEXT_LSN, next_lsn),
            (wal::DURABLE, next_lsn - 1),
            (wal::ACTIVE, 0),
            (wal::END, 0),
            (wal::SWITCH_LSN, 0),
            (wal::CHECKPOINT_LOG, 0),
            (wal::EPOCH, epoch),
            (wal::APPENDING_LSN, 0),
            (wal::FAILED, 0),
        ];
        words
            .iter()
            .for_each(|&(at, value)| self.region.set_log_word(at, value));
        self.region.flushed().store(0, Relaxed);
        install(log, &self.region.image()).map_err(|source| StoreError::Io {
            path: self.path.clone(),
            action: "write the checkpoint",
            source,
        })
    }
}
