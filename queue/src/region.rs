//! The store file's mapping as words at offsets, and the undo journal that makes every
//! operation all-or-nothing across process death.
//!
//! Every write an operation makes to the shared state goes through [`Tx::set`], which first
//! appends `(offset, old value)` to the journal in the header and publishes the new length,
//! then stores. Committing empties the journal. Whoever takes the store lock after a holder
//! died (or a cold start) writes the old values back in reverse order ([`Region::roll_back`]):
//! the dead operation is undone wholly, and undoing again (a recoverer that dies too) gives
//! the same result. The only writes outside the journal are a job's payload words, written
//! while the job record is free (no one reads them until a journaled write links the job).
//!
//! Under `--fsync always` the commit is also the append of the transaction's redo record
//! (`durable.rs`): the new value of every journaled word and payload word. A record that
//! cannot be appended rolls the transaction back.

use std::fs::File;
use std::io;
use std::sync::atomic::AtomicU64;
use std::sync::atomic::Ordering::{Acquire, Relaxed, Release};

use forkpool_shm::{LockWord, Mapping, Plain};

use crate::crash_point;
use crate::durable::Wal;
use crate::layout::{hdr, Geometry, JOURNAL_CAP, JOURNAL_OFFSET, LOCK_OFFSET};

/// A `MAP_SHARED` read-write mapping of a whole store file.
pub(crate) struct Region {
    mapping: Mapping,
    geometry: Geometry,
    /// The redo log, under `--fsync always` (set once the cold start has started it).
    pub(crate) wal: Option<Wal>,
}

impl Region {
    /// Maps `file`, whose length the caller has checked to be `geometry.file_size`.
    pub(crate) fn map(file: &File, geometry: Geometry) -> io::Result<Region> {
        let mapping = Mapping::map(file, geometry.file_size)?;
        Ok(Region {
            mapping,
            geometry,
            wal: None,
        })
    }

    /// The shared object at `offset` (the log's lock words and futex word).
    pub(crate) fn at<T: Plain>(&self, offset: u64) -> &T {
        self.mapping.at(offset)
    }

    pub(crate) fn geometry(&self) -> &Geometry {
        &self.geometry
    }

    pub(crate) fn faulted(&self) -> bool {
        self.mapping.faulted()
    }

    pub(crate) fn lock(&self) -> &LockWord {
        self.mapping.at(LOCK_OFFSET)
    }

    pub(crate) fn word(&self, offset: u64) -> &AtomicU64 {
        self.mapping.at(offset)
    }

    pub(crate) fn get(&self, offset: u64) -> u64 {
        self.word(offset).load(Acquire)
    }

    /// Number of journal entries in force.
    pub(crate) fn journal_len(&self) -> u64 {
        self.get(hdr::JOURNAL_LEN)
    }

    /// Journal entry `i`: (offset, old value).
    pub(crate) fn journal_entry(&self, i: u64) -> (u64, u64) {
        let at = JOURNAL_OFFSET + i * 16;
        (self.get(at), self.get(at + 8))
    }

    /// Writes back the before-images of the journal, newest first, then empties it; returns
    /// how many entries it undid. Caller holds the lock (or owns the file at a cold start)
    /// and has validated the entries (`validate.rs`) or knows them to be this crate's.
    /// Entries naming a word no operation writes are skipped, never applied.
    pub(crate) fn roll_back(&self) -> u64 {
        let len = self.journal_len().min(JOURNAL_CAP);
        for i in (0..len).rev() {
            let (offset, old) = self.journal_entry(i);
            if self.geometry.writable(offset) {
                self.word(offset).store(old, Release);
            }
            crash_point();
        }
        self.forget_journal();
        len
    }

    /// Empties the journal: the operation's writes are final.
    pub(crate) fn forget_journal(&self) {
        self.word(hdr::JOURNAL_LEN).store(0, Release);
    }
}

/// One operation's writes, journaled. Dropped without [`Tx::commit`] (an error after some
/// writes), it rolls them back.
pub(crate) struct Tx<'a> {
    region: &'a Region,
    len: u64,
    /// Words written outside the journal (a new job's payload): first offset and count.
    fresh: Option<(u64, u64)>,
}

impl<'a> Tx<'a> {
    /// Starts an operation. Caller holds the store lock, so the journal is empty.
    pub(crate) fn begin(region: &'a Region) -> Tx<'a> {
        debug_assert_eq!(region.journal_len(), 0, "a transaction is already open");
        Tx {
            region,
            len: 0,
            fresh: None,
        }
    }

    pub(crate) fn get(&self, offset: u64) -> u64 {
        self.region.get(offset)
    }

    /// Stores `value` at `offset` after journaling the old value.
    pub(crate) fn set(&mut self, offset: u64, value: u64) {
        let word = self.region.word(offset);
        let old = word.load(Relaxed);
        if old == value {
            return;
        }
        assert!(
            self.len < JOURNAL_CAP,
            "an operation writes more than {JOURNAL_CAP} words"
        );
        let entry = JOURNAL_OFFSET + self.len * 16;
        self.region.word(entry).store(offset, Relaxed);
        self.region.word(entry + 8).store(old, Relaxed);
        self.len += 1;
        self.region.word(hdr::JOURNAL_LEN).store(self.len, Release);
        crash_point();
        word.store(value, Release);
        crash_point();
    }

    /// Stores `words` from `offset` on into a record no one can reach until a journaled write
    /// of this transaction links it: not journaled, but logged. Once per transaction.
    pub(crate) fn fill(&mut self, offset: u64, words: impl Iterator<Item = u64>) {
        debug_assert!(
            self.fresh.is_none(),
            "one unjournaled range per transaction"
        );
        let mut count = 0;
        for (k, word) in words.enumerate() {
            self.region.word(offset + 8 * k as u64).store(word, Relaxed);
            count += 1;
        }
        self.fresh = Some((offset, count));
    }

    /// Adds `delta` (wrapping) to the word at `offset`.
    pub(crate) fn add(&mut self, offset: u64, delta: u64) {
        let value = self.get(offset).wrapping_add(delta);
        self.set(offset, value);
    }

    /// Makes the operation's writes final: under a log, once its record is appended (if it
    /// cannot be, the writes are rolled back and the store refuses every later operation).
    pub(crate) fn commit(mut self) {
        if !self.region.log_writes(self.len, self.fresh) {
            return;
        }
        self.region.forget_journal();
        self.len = 0;
        crash_point();
        self.region.appended();
    }
}

impl Drop for Tx<'_> {
    fn drop(&mut self) {
        if self.len != 0 {
            self.region.roll_back();
        }
    }
}
