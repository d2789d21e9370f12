//! The cold start: with the file's exclusive flock held and before any fork, check the file
//! (`validate.rs`, read-only), re-initialise the lock, roll back the journal, and end
//! everything the previous run's connections held: waits are dropped, handed-out jobs go back
//! to the head of their queues (at-least-once delivery), then every queue is settled.
//! Each of those steps is a journaled transaction, so a cold start that dies is followed by
//! another that finishes the work.

use std::sync::atomic::Ordering::Relaxed;

use crate::error::StoreError;
use crate::layout::hdr;
use crate::{Store, WakeSet};

impl Store {
    pub(crate) fn cold_start(&self) -> Result<(), StoreError> {
        self.check_contents()?;
        // SAFETY: cold start: this process holds the file's exclusive flock (so no other
        // `Store::open` maps it) and has not forked yet, so nobody uses the lock.
        unsafe { self.region.lock().init() }.map_err(|source| StoreError::Io {
            path: self.path.clone(),
            action: "initialise lock",
            source,
        })?;
        let undone = self.region.roll_back();
        if undone > 0 {
            self.region.word(hdr::RECOVERIES).fetch_add(1, Relaxed);
            log::warn!(
                "queue store {}: rolled back an interrupted operation ({undone} writes)",
                self.path.display()
            );
        }
        let mut wakes = WakeSet::default();
        self.release_owners(|_| true, &mut wakes);
        let queues = self.region.get(hdr::QUEUE_COUNT);
        log::info!(
            "queue store {}: opened, {queues} queues",
            self.path.display()
        );
        Ok(())
    }

    /// The read-only check of `validate.rs`; a fault while reading (the file shrank
    /// meanwhile) refuses the file too.
    fn check_contents(&self) -> Result<(), StoreError> {
        let checked = crate::validate::check(&self.region);
        if self.region.faulted() {
            return Err(StoreError::Truncated {
                path: self.path.clone(),
                actual: self.file.metadata().map_or(0, |m| m.len()),
                expected: self.region.geometry().file_size,
            });
        }
        checked.map_err(|finding| StoreError::Damaged {
            path: self.path.clone(),
            finding,
        })
    }
}
