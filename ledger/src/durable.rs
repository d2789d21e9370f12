//! `--fsync always` by group commit: every change appends a redo record to a log shared by
//! all processes, and a reply waits until a flush covers its record; one flush covers every
//! record appended before it, however many processes appended them.
//!
//! * **Append** (the commit point of an operation, under its stripe locks): under the
//!   `append` lock (taken last, after any stripe or the allocation lock), write the record at
//!   the end of the active segment, publish the new end and LSN, set the intent record's
//!   `commit`. A process that dies holding `append` is repaired by the next holder: the
//!   record is in the log (and the operation committed) exactly if it is whole at the
//!   recorded offset. A stripe repairer takes `append` first (`settle_appends`), so it never
//!   undoes an operation that the log holds.
//! * **Flush** ([`Ledger::flush`]): one process at a time (`flush` lock, `try_lock`) reads the
//!   end under `append`, `fdatasync`s the segment(s), raises `durable` and wakes every waiter
//!   (futex on `flushed`); the others sleep on the futex and find their LSN covered.
//! * **Checkpoint** ([`Ledger::checkpoint`]): once the active segment is half full, switch to
//!   the other one (a switch record) if the installed checkpoint no longer needs it, then
//!   copy every account under all stripe locks (nothing in flight), write the copy to a temp
//!   file, flush it, rename it over the checkpoint, flush the directory. The segment before
//!   the switch is free once the rename is durable.
//! * **Cold start** (`rebuild`): the mapped table is never trusted after a power loss (page
//!   writeback has no order): the checkpoint's accounts, then the log's records up to the
//!   last whole one, are written into an emptied table; a damaged record that a later one
//!   proves durable refuses the start before anything is written. Then a new checkpoint
//!   with a new epoch starts the log afresh.
//!
//! The argument (ordering, crash points, what each flush covers) is in docs/LEDGER.md.

use std::io;
use std::sync::atomic::Ordering::{AcqRel, Acquire, Relaxed, Release};
use std::time::Duration;

use forkpool_shm::{futex_wait, futex_wake_all, Acquired, LockWord, LogStore};

use crate::crash_point;
use crate::health::FileFault;
use crate::layout::{is_live, WalState, FREE, IDLE};
use crate::redo::{self, Body, Checkpoint, Record, MAX_RECORD};
use crate::{AccountName, Ledger, LedgerError, LockId, OpError};

/// How long a flush waiter sleeps on the futex before it looks again (a flusher that died
/// never wakes it).
const FLUSH_WAIT: Duration = Duration::from_millis(50);

/// The redo log of a ledger under `--fsync always`.
pub(crate) struct Wal {
    pub(crate) store: Box<dyn LogStore>,
}

/// A checkpoint whose image is taken, not yet installed; holds the `checkpoint` lock.
pub(crate) struct PendingCheckpoint<'a> {
    _held: WalGuard<'a>,
    wal: &'a Wal,
    image: Checkpoint,
}

/// A held lock of the log's shared state; unlocks on drop.
pub(crate) struct WalGuard<'a>(&'a LockWord);

impl Drop for WalGuard<'_> {
    fn drop(&mut self) {
        self.0.unlock();
    }
}

impl Ledger {
    fn wal_state(&self) -> &WalState {
        &self.region.header().wal
    }

    /// LSN of the last record appended: a reply given now depends on nothing later. 0 when
    /// there is no log (`--fsync never`).
    pub fn appended_lsn(&self) -> u64 {
        match self.wal {
            Some(_) => self.wal_state().next_lsn.load(Acquire).saturating_sub(1),
            None => 0,
        }
    }

    /// Every record up to this LSN is on stable storage (with no log: every LSN, `u64::MAX`).
    pub fn durable_lsn(&self) -> u64 {
        match self.wal {
            Some(_) => self.wal_state().durable.load(Acquire),
            None => u64::MAX,
        }
    }

    /// Refuses an operation (before it changes anything) when the active segment could not
    /// hold a record of every operation that may be in flight: `LogFull` until a checkpoint
    /// frees the other segment.
    pub(crate) fn check_log_room(&self) -> Result<(), OpError> {
        let Some(wal) = &self.wal else {
            return Ok(());
        };
        let end = self.wal_state().end.load(Relaxed);
        if end + self.log_headroom() > wal.store.segment_bytes() {
            return Err(OpError::LogFull);
        }
        Ok(())
    }

    /// Room kept free at the end of a segment: one record for every intent record (every
    /// operation that may be in flight), and a switch.
    fn log_headroom(&self) -> u64 {
        (u64::from(self.region.geometry().intents) + 2) * MAX_RECORD as u64
    }

    /// The commit point of a change whose new balances are written and whose before-images
    /// are in intent record `intent`. Without a log, a two-account change sets `commit = 1`
    /// (a one-account change commits by clearing its entry, as before the log existed);
    /// with one, the redo record is appended, then `commit = 1`. A log that cannot be written fails the ledger (every later request
    /// is refused; the restart rebuilds from the log, without this change).
    pub(crate) fn commit_change(
        &self,
        intent: u32,
        changes: &[(&AccountName, u64)],
    ) -> Result<(), OpError> {
        let Some(wal) = &self.wal else {
            if changes.len() > 1 {
                self.region.intent(intent).commit.store(1, Release);
            }
            return Ok(());
        };
        let accounts = changes.iter().map(|&(n, b)| (*n, b)).collect();
        let result = self.append(wal, Body::Change(accounts), Some(intent));
        if result.is_err() {
            self.region.intent(intent).commit.store(1, Release);
        }
        result.map(drop)
    }

    /// Appends one record; for a switch, moves appends to the other segment.
    fn append(&self, wal: &Wal, body: Body, intent: Option<u32>) -> Result<u64, OpError> {
        let state = self.wal_state();
        let _append = self.lock_wal(&state.append, LockId::Log)?;
        let (lsn, offset) = (state.next_lsn.load(Relaxed), state.end.load(Relaxed));
        let log = state.active.load(Relaxed) as u8;
        let switch = body == Body::Switch;
        let record = Record {
            epoch: state.epoch.load(Relaxed),
            lsn,
            durable: state.durable.load(Acquire),
            body,
        }
        .encode();
        state.appending_offset.store(offset, Relaxed);
        state
            .appending_intent
            .store(intent.map_or(u64::MAX, u64::from), Relaxed);
        state.appending_lsn.store(lsn, Release);
        crash_point();
        let written = wal.store.write_log(log, offset, &record);
        crash_point();
        if written.is_ok() {
            self.publish(lsn, offset + record.len() as u64, switch, intent);
        }
        crash_point();
        state.appending_lsn.store(0, Release);
        written.map_err(|e| self.log_failed("write to the operation log", e))?;
        Ok(lsn)
    }

    /// Makes record `lsn`, ending at `end`, part of the log. Caller holds `append`.
    fn publish(&self, lsn: u64, end: u64, switch: bool, intent: Option<u32>) {
        let state = self.wal_state();
        if switch {
            state.switch_lsn.store(lsn, Relaxed);
            state.active.store(1 - state.active.load(Relaxed), Relaxed);
            state.end.store(0, Relaxed);
        } else {
            state.end.store(end, Relaxed);
        }
        crash_point();
        state.next_lsn.store(lsn + 1, Release);
        crash_point();
        if let Some(i) = intent {
            self.region.intent(i).commit.store(1, Release);
        }
    }

    /// Takes one of the log's locks, repairing `append` if its holder died.
    fn lock_wal<'a>(&'a self, lock: &'a LockWord, id: LockId) -> Result<WalGuard<'a>, OpError> {
        match lock.lock().map_err(|_| OpError::Unrecoverable(id))? {
            Acquired::Clean => {}
            Acquired::OwnerDied => {
                if id == LockId::Log {
                    self.repair_append();
                }
                lock.consistent();
            }
        }
        Ok(WalGuard(lock))
    }

    /// The next holder of `append` after its holder died: the interrupted append happened
    /// (publish it, commit its operation) exactly if its record is whole where it was going.
    fn repair_append(&self) {
        let state = self.wal_state();
        let lsn = state.appending_lsn.load(Acquire);
        let Some(wal) = self.wal.as_ref().filter(|_| lsn != 0) else {
            return;
        };
        let intent = u32::try_from(state.appending_intent.load(Relaxed))
            .ok()
            .filter(|&i| i < self.region.geometry().intents);
        if state.next_lsn.load(Relaxed) > lsn {
            // Published; only the commit word may be missing.
            self.publish_commit(intent);
        } else {
            let offset = state.appending_offset.load(Relaxed);
            let log = state.active.load(Relaxed) as u8;
            let bytes = wal
                .store
                .read_log(log, offset, MAX_RECORD)
                .unwrap_or_default();
            if let Some((record, len)) = Record::decode(&bytes, 0)
                .filter(|(r, _)| r.lsn == lsn && r.epoch == state.epoch.load(Relaxed))
            {
                self.publish(
                    lsn,
                    offset + len as u64,
                    record.body == Body::Switch,
                    intent,
                );
            }
        }
        log::warn!(
            "ledger {}: a process died appending to the operation log (LSN {lsn}); repaired",
            self.path.display()
        );
        state.appending_lsn.store(0, Release);
    }

    fn publish_commit(&self, intent: Option<u32>) {
        if let Some(i) = intent {
            self.region.intent(i).commit.store(1, Release);
        }
    }

    /// Before a stripe repair reads `commit` words: repairs an append interrupted by a death,
    /// so an operation whose record is in the log is kept, not undone.
    pub(crate) fn settle_appends(&self) -> Result<(), OpError> {
        if self.wal.is_some() {
            drop(self.lock_wal(&self.wal_state().append, LockId::Log)?);
        }
        Ok(())
    }

    /// Fails the ledger for every process after the log could not be written or flushed.
    fn log_failed(&self, action: &str, e: io::Error) -> OpError {
        self.fail(
            FileFault::LogFailed,
            &format!(
                "{action} failed: {e}; every bank request answers ERR internal until the server \
                 is restarted (the restart keeps what the log holds)"
            ),
        );
        OpError::FileFault(FileFault::LogFailed)
    }

    /// Makes every record appended before the call durable and returns the durable LSN.
    /// One caller at a time flushes (for everyone); the others sleep until it is done.
    pub fn flush(&self) -> Result<u64, OpError> {
        let Some(wal) = &self.wal else {
            return Ok(u64::MAX);
        };
        let state = self.wal_state();
        let target = self.appended_lsn();
        loop {
            if let crate::Health::Failed(fault) = self.health() {
                return Err(OpError::FileFault(fault));
            }
            let durable = state.durable.load(Acquire);
            if durable >= target {
                return Ok(durable);
            }
            let seen = state.flushed.load(Acquire);
            match state.flush.try_lock() {
                Ok(Some(acquired)) => {
                    if acquired == Acquired::OwnerDied {
                        state.flush.consistent();
                    }
                    let flushed = WalGuard(&state.flush);
                    self.flush_held(wal)?;
                    drop(flushed);
                }
                Ok(None) => futex_wait(&state.flushed, seen, FLUSH_WAIT),
                Err(_) => return Err(OpError::Unrecoverable(LockId::Log)),
            }
        }
    }

    /// The flush itself; caller holds the `flush` lock.
    fn flush_held(&self, wal: &Wal) -> Result<(), OpError> {
        let state = self.wal_state();
        let (upto, active, switch) = {
            let _append = self.lock_wal(&state.append, LockId::Log)?;
            (
                state.next_lsn.load(Relaxed) - 1,
                state.active.load(Relaxed) as u8,
                state.switch_lsn.load(Relaxed),
            )
        };
        let durable = state.durable.load(Acquire);
        if upto <= durable {
            return Ok(());
        }
        if switch > durable {
            // The records before the switch are in the other segment.
            wal.store
                .sync_log(1 - active)
                .map_err(|e| self.log_failed("fdatasync of the operation log", e))?;
        }
        wal.store
            .sync_log(active)
            .map_err(|e| self.log_failed("fdatasync of the operation log", e))?;
        crash_point();
        state.durable.fetch_max(upto, AcqRel);
        state.flushed.fetch_add(1, Release);
        futex_wake_all(&state.flushed);
        Ok(())
    }

    /// Writes a checkpoint if the active segment is half full (or `force`), and no other
    /// process is writing one. Returns whether it wrote one. Takes every stripe lock while it
    /// copies the accounts (a table scan); call it off any latency-critical path.
    pub fn checkpoint(&self, force: bool) -> io::Result<bool> {
        match self.begin_checkpoint(force)? {
            Some(pending) => self.finish_checkpoint(pending).map(|()| true),
            None => Ok(false),
        }
    }

    /// The first half of a checkpoint: the switch (if due) and the image. Operations may go
    /// on before [`Ledger::finish_checkpoint`] installs it.
    pub(crate) fn begin_checkpoint(
        &self,
        force: bool,
    ) -> io::Result<Option<PendingCheckpoint<'_>>> {
        let Some(wal) = &self.wal else {
            return Ok(None);
        };
        let state = self.wal_state();
        let half = wal.store.segment_bytes() / 2;
        if !force && state.end.load(Relaxed) < half {
            return Ok(None);
        }
        let locked = state.checkpoint.try_lock().map_err(|_| unrecoverable())?;
        if locked.is_none() {
            return Ok(None);
        }
        let held = WalGuard(&state.checkpoint);
        let needs_switch = {
            let end = state.end.load(Relaxed);
            end >= half && state.checkpoint_log.load(Relaxed) == state.active.load(Relaxed)
        };
        if needs_switch {
            self.append(wal, Body::Switch, None)
                .map_err(|e| io::Error::other(e.to_string()))?;
        }
        let image = self.image().map_err(|e| io::Error::other(e.to_string()))?;
        Ok(Some(PendingCheckpoint {
            _held: held,
            wal,
            image,
        }))
    }

    /// Installs a checkpoint begun by [`Ledger::begin_checkpoint`]; the segment before its
    /// position is free from then on.
    pub(crate) fn finish_checkpoint(&self, pending: PendingCheckpoint<'_>) -> io::Result<()> {
        self.install(pending.wal, &pending.image)?;
        let log = u64::from(pending.image.log);
        self.wal_state().checkpoint_log.store(log, Relaxed);
        Ok(())
    }

    /// Every account and where the log goes on, with nothing in flight (all stripes held).
    fn image(&self) -> Result<Checkpoint, OpError> {
        let _all = self.lock_all_stripes()?;
        let state = self.wal_state();
        let _append = self.lock_wal(&state.append, LockId::Log)?;
        Ok(Checkpoint {
            epoch: state.epoch.load(Relaxed),
            next_lsn: state.next_lsn.load(Relaxed),
            log: state.active.load(Relaxed) as u8,
            offset: state.end.load(Relaxed),
            accounts: self.live_accounts(),
        })
    }

    fn live_accounts(&self) -> Vec<(AccountName, u64)> {
        (0..self.region.geometry().table_slots)
            .filter_map(|i| self.region.slot(i))
            .filter(|slot| is_live(slot.tag.load(Acquire)))
            .filter_map(|slot| {
                let words = slot.name.each_ref().map(|w| w.load(Relaxed));
                let name = crate::name::from_words(slot.name_len.load(Relaxed), &words)?;
                Some((name, slot.balance.load(Relaxed)))
            })
            .collect()
    }

    /// Replaces the checkpoint: temp file, flush, rename, flush of the directory.
    fn install(&self, wal: &Wal, image: &Checkpoint) -> io::Result<()> {
        wal.store.write_checkpoint(&image.encode())?;
        crash_point();
        wal.store.sync_checkpoint()?;
        crash_point();
        wal.store.install_checkpoint()?;
        crash_point();
        wal.store.sync_dir()
    }

    /// Cold start under a log: rebuilds the table from the checkpoint and the log, if there
    /// is a checkpoint; returns its epoch and the LSN after the last whole record. Reads and
    /// checks everything before it writes anything.
    pub(crate) fn rebuild(&self, wal: &Wal) -> Result<Option<(u64, u64)>, LedgerError> {
        let io = |action| {
            move |source| LedgerError::Io {
                path: self.path.clone(),
                action,
                source,
            }
        };
        let Some(bytes) = wal
            .store
            .read_checkpoint()
            .map_err(io("read the checkpoint"))?
        else {
            return Ok(None);
        };
        let ckpt = Checkpoint::decode(&bytes).ok_or_else(|| LedgerError::CheckpointCorrupt {
            path: self.path.clone(),
        })?;
        let size = wal.store.segment_bytes() as usize;
        let logs = [
            wal.store.read_log(0, 0, size).map_err(io("read the log"))?,
            wal.store.read_log(1, 0, size).map_err(io("read the log"))?,
        ];
        let replay =
            redo::scan(&ckpt, [&logs[0], &logs[1]]).map_err(|bad| LedgerError::LogCorrupt {
                path: self.path.clone(),
                lsn: bad.lsn,
                segment: bad.log,
                offset: bad.offset,
            })?;
        self.empty_table();
        let changes = replay.changes.iter().flatten();
        for (name, balance) in ckpt.accounts.iter().chain(changes) {
            self.restore(name, *balance)?;
        }
        log::info!(
            "ledger {}: rebuilt from the checkpoint at LSN {} and {} logged changes",
            self.path.display(),
            ckpt.next_lsn,
            replay.changes.len()
        );
        Ok(Some((ckpt.epoch, replay.next_lsn)))
    }

    fn empty_table(&self) {
        for i in 0..self.region.geometry().table_slots {
            if let Some(slot) = self.region.slot(i) {
                slot.tag.store(FREE, Relaxed);
                slot.balance.store(0, Relaxed);
                slot.name_len.store(0, Relaxed);
                slot.name.iter().for_each(|w| w.store(0, Relaxed));
            }
        }
    }

    /// Sets `name`'s balance, creating the account in its first free slot if new (cold
    /// start only: no lock, no record).
    fn restore(&self, name: &AccountName, balance: u64) -> Result<(), LedgerError> {
        let geometry = *self.region.geometry();
        let tag = self.tag_of(name);
        let words = crate::name::words(name);
        let mut i = geometry.home_of(tag);
        for _ in 0..geometry.table_slots {
            let slot = self
                .region
                .slot(i)
                .expect("slot indexes are masked to the table size");
            let t = slot.tag.load(Relaxed);
            if t == FREE {
                slot.name_len.store(crate::name::stored_len(name), Relaxed);
                slot.name
                    .iter()
                    .zip(words)
                    .for_each(|(w, n)| w.store(n, Relaxed));
                slot.tag.store(tag, Relaxed);
            }
            if t == FREE || slot.holds(tag, name, &words) {
                slot.balance.store(balance, Relaxed);
                return Ok(());
            }
            i = (i + 1) & (geometry.table_slots - 1);
        }
        Err(LedgerError::Corrupt {
            path: self.path.clone(),
            detail: "the checkpoint and the log hold more accounts than the table".into(),
        })
    }

    /// Cold start: resets the log's shared state and installs a checkpoint of the table as
    /// it is, with epoch `epoch`, from which the log starts at LSN `next_lsn`.
    pub(crate) fn start_log(
        &self,
        wal: &Wal,
        epoch: u64,
        next_lsn: u64,
    ) -> Result<(), LedgerError> {
        let least = 4 * self.log_headroom();
        if wal.store.segment_bytes() < least {
            return Err(LedgerError::InvalidOptions {
                path: self.path.clone(),
                detail: format!(
                    "each operation log segment must hold at least {least} bytes with {} intent \
                     records, not {}",
                    self.region.geometry().intents,
                    wal.store.segment_bytes()
                ),
            });
        }
        let state = self.wal_state();
        for lock in [&state.append, &state.flush, &state.checkpoint] {
            // SAFETY: cold start (see `cold_start`): nobody else maps the file yet.
            unsafe { lock.init() }.map_err(|source| LedgerError::Io {
                path: self.path.clone(),
                action: "initialise lock",
                source,
            })?;
        }
        let words = [
            (&state.next_lsn, next_lsn),
            (&state.durable, next_lsn - 1),
            (&state.active, 0),
            (&state.end, 0),
            (&state.switch_lsn, 0),
            (&state.checkpoint_log, 0),
            (&state.epoch, epoch),
            (&state.appending_lsn, 0),
        ];
        words.iter().for_each(|(w, v)| w.store(*v, Relaxed));
        state.flushed.store(0, Relaxed);
        let image = Checkpoint {
            epoch,
            next_lsn,
            log: 0,
            offset: 0,
            accounts: self.live_accounts(),
        };
        self.install(wal, &image).map_err(|source| LedgerError::Io {
            path: self.path.clone(),
            action: "write the checkpoint",
            source,
        })
    }
}

/// Resets every intent record and the allocation journal (a rebuilt table has no operation
/// in flight).
pub(crate) fn forget_records(ledger: &Ledger) {
    for index in 0..ledger.region.geometry().intents {
        let record = ledger.region.intent(index);
        record
            .entries
            .iter()
            .for_each(|e| e.state.store(IDLE, Relaxed));
    }
    ledger.region.header().journal.state.store(IDLE, Relaxed);
}

fn unrecoverable() -> io::Error {
    io::Error::other("the checkpoint lock is not recoverable")
}
