//! Recovery: what the next holder of a lock does when the previous holder died, and the
//! cold start that re-initialises every lock and repairs every record.
//!
//! * Allocation lock: roll back its journal (restore the slot's tag and the count).
//! * Stripe `s`: undo every ACTIVE entry for `s` of every intent record (restore the
//!   before-image, or un-create a created account), unless its record has `commit` set, in
//!   which case the entry is just cleared (the operation is complete); then recompute the
//!   stripe's running total from the table. Each step needs only stripe `s` and the
//!   allocation lock (taken after it, in order), and each is idempotent, so a repairer that
//!   dies is simply followed by another.

use std::sync::atomic::Ordering::{AcqRel, Acquire, Relaxed, Release};

use crate::crash_point;
use crate::error::LedgerError;
use crate::layout::{is_live, ACTIVE, IDLE, TOMB};
use crate::{FsyncPolicy, Ledger, OpError};

impl Ledger {
    /// Rolls back the allocation journal of a holder that died. Caller holds the alloc lock.
    pub(crate) fn repair_alloc(&self) {
        let header = self.region.header();
        header.recoveries.fetch_add(1, Relaxed);
        let journal = &header.journal;
        if journal.state.load(Acquire) == ACTIVE {
            let i = journal.slot.load(Relaxed);
            let old_tag = journal.old_tag.load(Relaxed);
            if let Some(slot) = self.region.slot(i) {
                slot.tag.store(old_tag, Release);
            }
            header.count.store(journal.old_count.load(Relaxed), Relaxed);
            log::warn!(
                "ledger {}: rolled back an account allocation (slot {i}) of a dead process",
                self.path.display()
            );
            crash_point();
            journal.state.store(IDLE, Release);
        }
    }

    /// Un-creates the account in slot `i` if it still carries `tag` (the tag its creation
    /// gave it): makes it a tombstone and decrements the count, under the alloc lock and its
    /// journal. Caller holds the account's stripe, so no one else can re-create that tag.
    fn uncreate(&self, i: u64, tag: u64) -> Result<(), OpError> {
        let _alloc = self.lock_alloc()?;
        let Some(slot) = self.region.slot(i) else {
            return Ok(());
        };
        if slot.tag.load(Acquire) != tag {
            return Ok(());
        }
        let header = self.region.header();
        let count = header.count.load(Relaxed);
        header.journal.open(i, tag, count);
        crash_point();
        slot.tag.store(TOMB, Release);
        crash_point();
        header.count.store(count.saturating_sub(1), Relaxed);
        crash_point();
        header.journal.state.store(IDLE, Release);
        Ok(())
    }

    /// Repairs stripe `s` after its holder died: undoes or completes the dead operations'
    /// entries for `s`, frees records left with no entry, recomputes the stripe total.
    /// Caller holds stripe `s` (in the owner-died state).
    pub(crate) fn repair_stripe(&self, s: u32) -> Result<(), OpError> {
        self.region.header().recoveries.fetch_add(1, Relaxed);
        log::warn!(
            "ledger {}: a process died holding stripe {s}; repairing it",
            self.path.display()
        );
        self.settle_appends()?;
        self.undo_entries(s)?;
        let _alloc = self.lock_alloc()?;
        self.recount_stripe(s);
        Ok(())
    }

    /// Undoes (or, if committed, clears) every ACTIVE entry for stripe `s`.
    fn undo_entries(&self, s: u32) -> Result<(), OpError> {
        for index in 0..self.region.geometry().intents {
            let record = self.region.intent(index);
            let owner = record.owner.load(Acquire);
            let committed = record.commit.load(Acquire) == 1;
            let mut touched = false;
            for entry in &record.entries {
                if entry.state.load(Acquire) != ACTIVE || entry.stripe.load(Relaxed) != u64::from(s)
                {
                    continue;
                }
                touched = true;
                let i = entry.slot.load(Relaxed);
                let created = entry.created.load(Relaxed);
                let pid = owner as u32;
                if committed {
                    log::warn!(
                        "ledger {}: completed a committed operation of dead pid {pid} (slot {i})",
                        self.path.display()
                    );
                } else if created != 0 {
                    self.uncreate(i, created)?;
                    log::warn!(
                        "ledger {}: rolled back an account creation of dead pid {pid} (slot {i})",
                        self.path.display()
                    );
                } else if let Some(slot) = self.region.slot(i) {
                    slot.balance.store(entry.before.load(Relaxed), Relaxed);
                    log::warn!(
                        "ledger {}: rolled back a balance change of dead pid {pid} (slot {i})",
                        self.path.display()
                    );
                }
                crash_point();
                entry.clear();
                crash_point();
            }
            let all_clear = record
                .entries
                .iter()
                .all(|e| e.state.load(Acquire) != ACTIVE);
            if touched && all_clear {
                // The owner died holding stripe `s`; free its record (ABA-safe: generation).
                let _ = record
                    .owner
                    .compare_exchange(owner, owner & !0xffff_ffff, AcqRel, Relaxed);
            }
        }
        Ok(())
    }

    /// Recomputes stripe `s`'s total from its live slots. Caller holds stripe `s` and the
    /// alloc lock (so no tag of the stripe changes meanwhile).
    fn recount_stripe(&self, s: u32) {
        let geometry = *self.region.geometry();
        let total: u128 = (0..geometry.table_slots)
            .filter_map(|i| self.region.slot(i))
            .filter(|slot| {
                let tag = slot.tag.load(Acquire);
                is_live(tag) && geometry.stripe_of(tag) == s
            })
            .map(|slot| u128::from(slot.balance.load(Relaxed)))
            .sum();
        self.store_total(s, total);
    }

    /// Cold start: with the exclusive flock held and before any fork, check every structure
    /// recovery reads and the state it would leave (read-only: a bad file is refused
    /// untouched), re-initialise every lock, repair every record, recompute the count and the
    /// stripe totals.
    ///
    /// With an operation log that has a checkpoint, the table is rebuilt from them instead
    /// (`durable.rs`): after a power loss the mapped table may be torn, so it is not read.
    /// Under `--fsync always` a new checkpoint then starts the log afresh.
    pub(crate) fn cold_start(&self) -> Result<(), LedgerError> {
        let rebuilt = match &self.wal {
            Some(wal) => self.rebuild(wal)?,
            None => None,
        };
        if rebuilt.is_none() {
            self.check_contents()?;
        } else {
            crate::durable::forget_records(self);
        }
        let header = self.region.header();
        for s in 0..self.region.geometry().stripes {
            // SAFETY: cold start: this process holds the exclusive flock (so no other
            // `Ledger::open` maps the file) and has not forked workers yet. A process that
            // maps the file without the flock is an upgrade's successor (`Ledger::adopt`),
            // which exists only once this master handed it the locked descriptor, after its
            // cold start. Nobody uses these locks.
            unsafe { self.region.stripe(s).lock.init() }.map_err(|source| LedgerError::Io {
                path: self.path.clone(),
                action: "initialise lock",
                source,
            })?;
        }
        // SAFETY: as above.
        unsafe { header.alloc.init() }.map_err(|source| LedgerError::Io {
            path: self.path.clone(),
            action: "initialise lock",
            source,
        })?;
        let recovery = |source| LedgerError::Recovery {
            path: self.path.clone(),
            source,
        };
        if header.journal.state.load(Acquire) == ACTIVE {
            let _alloc = self.lock_alloc().map_err(recovery)?;
            self.repair_alloc();
        }
        for s in 0..self.region.geometry().stripes {
            let _stripe = self.lock_stripe(s).map_err(recovery)?;
            self.undo_entries(s).map_err(recovery)?;
        }
        for index in 0..self.region.geometry().intents {
            let record = self.region.intent(index);
            record.commit.store(0, Relaxed);
            let owner = record.owner.load(Relaxed);
            record.owner.store(owner & !0xffff_ffff, Release);
        }
        let geometry = *self.region.geometry();
        let mut totals = vec![0u128; geometry.stripes as usize];
        let mut count = 0u64;
        for i in 0..geometry.table_slots {
            let Some(slot) = self.region.slot(i) else {
                continue;
            };
            let tag = slot.tag.load(Relaxed);
            if is_live(tag) {
                count += 1;
                totals[geometry.stripe_of(tag) as usize] += u128::from(slot.balance.load(Relaxed));
            }
        }
        header.count.store(count, Relaxed);
        for (s, total) in totals.into_iter().enumerate() {
            self.store_total(s as u32, total);
        }
        if let (Some(wal), FsyncPolicy::Always) = (&self.wal, self.fsync) {
            let (epoch, next_lsn) = rebuilt.unwrap_or((0, 1));
            self.start_log(wal, epoch + 1, next_lsn)?;
        }
        log::info!(
            "ledger {}: opened, {count} of {} accounts",
            self.path.display(),
            geometry.capacity
        );
        Ok(())
    }

    /// The read-only check of everything recovery will read and produce (`validate.rs`); a
    /// fault while reading (the file shrank meanwhile) refuses the file too.
    fn check_contents(&self) -> Result<(), LedgerError> {
        let checked = crate::validate::check(&self.region);
        if self.region.faulted() {
            return Err(LedgerError::Truncated {
                path: self.path.clone(),
                actual: self.file.metadata().map_or(0, |m| m.len()),
                expected: self.region.geometry().file_size,
            });
        }
        checked.map_err(|finding| LedgerError::Damaged {
            path: self.path.clone(),
            finding,
        })
    }
}
