//! The file format: one fixed-size region of 64-bit words, so that every field has an offset
//! and the undo journal (`journal.rs`) can protect any write by recording `(offset, old)`.
//!
//! ```text
//! offset 0       header page: immutable geometry + checksum (bytes 0..64), the store lock
//!                (64..128), live words (128..256), the undo journal (256..1792), the redo
//!                log's shared state under `--fsync always` (2048..2264, see `durable.rs`)
//! off_queues     `max_queues` x queue record (32 words)
//! off_waiters    `max_waiters` x waiter record (16 words)
//! off_jobs       `max_jobs` x job record (8 words + the payload, rounded up to 64 bytes)
//! ```
//! Every region starts on a page boundary. Links between records are `index + 1`, 0 meaning
//! none, so a zero-filled file is a valid empty store (no initialisation pass over a file of
//! tens of MB): free job and waiter records are the free list plus every record at or above a
//! high-water mark. Integers in the immutable header are little-endian; the live words use
//! native order (the format is for one machine, like the ledger's).

use forkpool_shm::{MUTEX_BYTES, PAGE};

pub(crate) const MAGIC: [u8; 8] = *b"FPQUEUE\x01";
/// Bump on any change of layout or record semantics.
pub(crate) const LAYOUT_VERSION: u32 = 1;
pub(crate) const FIXED_BYTES: usize = 64;
pub(crate) const HEADER_BYTES: u64 = PAGE;

/// Offset of the store's one lock word.
pub(crate) const LOCK_OFFSET: u64 = 64;

/// The live words of the header (offsets).
pub(crate) mod hdr {
    /// Number of journal entries in force (0 = no operation in progress).
    pub(crate) const JOURNAL_LEN: u64 = 128;
    /// The sequence that numbers jobs and waits.
    pub(crate) const NEXT_SEQ: u64 = 136;
    /// Operations rolled back after their process died, over the file's life.
    pub(crate) const RECOVERIES: u64 = 144;
    /// Head (index + 1) of the list of freed job records.
    pub(crate) const FREE_JOBS: u64 = 152;
    /// Job records at or above this index were never used.
    pub(crate) const JOBS_HIGH: u64 = 160;
    /// Head (index + 1) of the list of freed waiter records.
    pub(crate) const FREE_WAITERS: u64 = 168;
    /// Waiter records at or above this index were never used.
    pub(crate) const WAITERS_HIGH: u64 = 176;
    /// Number of queues created (records 0..count are in use; queues are never deleted).
    pub(crate) const QUEUE_COUNT: u64 = 184;
    /// First word past the live words: journal entries start here.
    pub(crate) const END: u64 = 256;
}

/// The undo journal: `JOURNAL_CAP` entries of two words (offset, old value).
pub(crate) const JOURNAL_OFFSET: u64 = hdr::END;
pub(crate) const JOURNAL_CAP: u64 = 96;
const _: () = assert!(JOURNAL_OFFSET + JOURNAL_CAP * 16 <= HEADER_BYTES);

/// The redo log's shared state (`durable.rs`): reset by every cold start, never journaled
/// nor logged (a checkpoint's copy of them is ignored).
pub(crate) mod wal {
    /// Lock held by the one process that flushes (`try_lock`).
    pub(crate) const FLUSH_LOCK: u64 = 2048;
    /// Lock held by the one process that writes a checkpoint.
    pub(crate) const CHECKPOINT_LOCK: u64 = 2112;
    /// LSN the next record gets.
    pub(crate) const NEXT_LSN: u64 = 2176;
    /// Every record up to this LSN is on stable storage.
    pub(crate) const DURABLE: u64 = 2184;
    /// The segment appended to (0/1) and the offset of its end.
    pub(crate) const ACTIVE: u64 = 2192;
    pub(crate) const END: u64 = 2200;
    /// LSN of the last switch record.
    pub(crate) const SWITCH_LSN: u64 = 2208;
    /// The segment where the installed checkpoint's log starts.
    pub(crate) const CHECKPOINT_LOG: u64 = 2216;
    pub(crate) const EPOCH: u64 = 2224;
    /// The record being appended (0 = none) and where: a process that dies appending is
    /// repaired by the next holder of the store lock.
    pub(crate) const APPENDING_LSN: u64 = 2232;
    pub(crate) const APPENDING_OFFSET: u64 = 2240;
    /// Bumped (a futex word, 32 bits) after every flush: flush waiters sleep on it.
    pub(crate) const FLUSHED: u64 = 2248;
    /// Non-zero once the log could not be written or flushed: the store refuses operations.
    pub(crate) const FAILED: u64 = 2256;
}
const _: () = assert!(JOURNAL_OFFSET + JOURNAL_CAP * 16 <= wal::FLUSH_LOCK);
const _: () = assert!(wal::FAILED + 8 <= HEADER_BYTES);

/// Queue record fields (word indexes).
pub(crate) mod q {
    pub(crate) const NAME_LEN: u64 = 0;
    /// Eight words of name bytes (NAME..NAME+8).
    pub(crate) const NAME: u64 = 1;
    /// Most READY jobs before PUT waits; 0 = unbounded.
    pub(crate) const MAXSIZE: u64 = 9;
    pub(crate) const READY_HEAD: u64 = 10;
    pub(crate) const READY_TAIL: u64 = 11;
    /// READY jobs (the queue's depth).
    pub(crate) const DEPTH: u64 = 12;
    /// RESERVED jobs (fetched, not yet done).
    pub(crate) const RESERVED: u64 = 13;
    /// Jobs ever put (PENDING ones count once they enter the queue).
    pub(crate) const PUT_TOTAL: u64 = 14;
    pub(crate) const DONE_TOTAL: u64 = 15;
    /// Waiter lists: one (head, tail, count) triple per [`crate::store::WaitKind`].
    pub(crate) const WAITERS: u64 = 16;
    pub(crate) const WORDS: u64 = 32;
}

/// Waiter record fields.
pub(crate) mod w {
    pub(crate) const STATE: u64 = 0;
    pub(crate) const KIND: u64 = 1;
    pub(crate) const QUEUE: u64 = 2;
    pub(crate) const PREV: u64 = 3;
    pub(crate) const NEXT: u64 = 4;
    /// (Word 5 is unused.) The waiting process (woken when the wait is served) and its connection.
    pub(crate) const OWNER_PID: u64 = 6;
    pub(crate) const OWNER_CONN: u64 = 7;
    /// Unique per wait (from NEXT_SEQ): a ticket naming a recycled record is stale.
    pub(crate) const SERIAL: u64 = 8;
    /// The job: a PUT's PENDING job, or the job a served GET was handed.
    pub(crate) const JOB: u64 = 9;
    pub(crate) const WORDS: u64 = 16;
}

/// Job record fields; the payload follows in words from `PAYLOAD`.
pub(crate) mod j {
    pub(crate) const STATE: u64 = 0;
    pub(crate) const QUEUE: u64 = 1;
    pub(crate) const ID: u64 = 2;
    pub(crate) const NEXT: u64 = 3;
    pub(crate) const OWNER_PID: u64 = 4;
    pub(crate) const OWNER_CONN: u64 = 5;
    pub(crate) const LEN: u64 = 6;
    pub(crate) const PAYLOAD: u64 = 8;
}

/// Job states.
pub(crate) mod job_state {
    pub(crate) const FREE: u64 = 0;
    /// Put by a PUT that waits for room: not in the queue yet, owned by its waiter.
    pub(crate) const PENDING: u64 = 1;
    /// In its queue's READY list.
    pub(crate) const READY: u64 = 2;
    /// Handed to a connection (owner words), waiting for its DONE.
    pub(crate) const RESERVED: u64 = 3;
}

/// Waiter states.
pub(crate) mod waiter_state {
    pub(crate) const FREE: u64 = 0;
    /// In its queue's list for its kind.
    pub(crate) const WAITING: u64 = 1;
    /// Out of the list: what it waited for happened; its worker collects the outcome.
    pub(crate) const SERVED: u64 = 2;
}

/// Most of each setting a file may have.
pub const MAX_QUEUES: u32 = 65_536;
pub const MAX_JOBS: u32 = 1 << 24;
pub const MAX_PAYLOAD: u32 = 1 << 20;
pub const MAX_WAITERS: u32 = 1 << 20;

/// Everything the immutable header says, and the offsets derived from it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Geometry {
    pub(crate) max_queues: u32,
    pub(crate) max_jobs: u32,
    pub(crate) max_payload: u32,
    pub(crate) max_waiters: u32,
    pub(crate) off_queues: u64,
    pub(crate) off_waiters: u64,
    pub(crate) off_jobs: u64,
    pub(crate) job_bytes: u64,
    pub(crate) file_size: u64,
}

fn round_up(x: u64, to: u64) -> u64 {
    x.div_ceil(to) * to
}

/// Why a header cannot be used (the caller names the file).
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum HeaderProblem {
    Short,
    BadMagic,
    WrongVersion(u32),
    Incompatible(String),
    Corrupt(String),
}

impl Geometry {
    /// The layout of a store with these limits, which the caller has checked against the
    /// `MAX_*` constants.
    pub(crate) fn new(max_queues: u32, max_jobs: u32, max_payload: u32, max_waiters: u32) -> Self {
        let job_bytes = round_up((j::PAYLOAD * 8) + u64::from(max_payload), 64);
        let off_queues = HEADER_BYTES;
        let off_waiters = round_up(off_queues + u64::from(max_queues) * q::WORDS * 8, PAGE);
        let off_jobs = round_up(off_waiters + u64::from(max_waiters) * w::WORDS * 8, PAGE);
        let file_size = round_up(off_jobs + u64::from(max_jobs) * job_bytes, PAGE);
        Geometry {
            max_queues,
            max_jobs,
            max_payload,
            max_waiters,
            off_queues,
            off_waiters,
            off_jobs,
            job_bytes,
            file_size,
        }
    }

    /// The largest number of the job and wait sequence (`hdr::NEXT_SEQ`): the largest job
    /// id, `max_seq * max_jobs + max_jobs - 1`, fits a u64.
    pub(crate) fn max_seq(&self) -> u64 {
        u64::MAX / u64::from(self.max_jobs) - 1
    }

    /// Offset of word `field` of queue `i`.
    pub(crate) fn queue(&self, i: u64, field: u64) -> u64 {
        debug_assert!(i < u64::from(self.max_queues) && field < q::WORDS);
        self.off_queues + (i * q::WORDS + field) * 8
    }

    /// Offset of word `field` of waiter `i`.
    pub(crate) fn waiter(&self, i: u64, field: u64) -> u64 {
        debug_assert!(i < u64::from(self.max_waiters) && field < w::WORDS);
        self.off_waiters + (i * w::WORDS + field) * 8
    }

    /// Offset of word `field` of job `i` (payload words included).
    pub(crate) fn job(&self, i: u64, field: u64) -> u64 {
        debug_assert!(i < u64::from(self.max_jobs) && field * 8 < self.job_bytes);
        self.off_jobs + i * self.job_bytes + field * 8
    }

    /// Whether `offset` is a word an operation may write (and so the journal may name): a
    /// live header word or a word of a record, 8-byte aligned.
    pub(crate) fn writable(&self, offset: u64) -> bool {
        offset.is_multiple_of(8)
            && ((hdr::NEXT_SEQ..hdr::END).contains(&offset)
                || (self.off_queues..self.file_size).contains(&offset))
    }

    /// The immutable header bytes of a new file.
    pub(crate) fn encode(&self) -> [u8; FIXED_BYTES] {
        let mut b = [0u8; FIXED_BYTES];
        b[0..8].copy_from_slice(&MAGIC);
        b[8..12].copy_from_slice(&LAYOUT_VERSION.to_le_bytes());
        b[12..16].copy_from_slice(&MUTEX_BYTES.to_le_bytes());
        b[16..20].copy_from_slice(&self.max_queues.to_le_bytes());
        b[20..24].copy_from_slice(&self.max_jobs.to_le_bytes());
        b[24..28].copy_from_slice(&self.max_payload.to_le_bytes());
        b[28..32].copy_from_slice(&self.max_waiters.to_le_bytes());
        b[32..40].copy_from_slice(&self.file_size.to_le_bytes());
        let sum = checksum(&b[..56]);
        b[56..64].copy_from_slice(&sum.to_le_bytes());
        b
    }

    /// Parses and checks the first bytes of a file (at most FIXED_BYTES are looked at).
    pub(crate) fn decode(bytes: &[u8]) -> Result<Geometry, HeaderProblem> {
        if bytes.len() >= 8 && bytes[0..8] != MAGIC {
            return Err(HeaderProblem::BadMagic);
        }
        let b: &[u8; FIXED_BYTES] = bytes
            .get(..FIXED_BYTES)
            .and_then(|s| s.try_into().ok())
            .ok_or(HeaderProblem::Short)?;
        let u32_at = |i: usize| u32::from_le_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
        let version = u32_at(8);
        if version != LAYOUT_VERSION {
            return Err(HeaderProblem::WrongVersion(version));
        }
        let mut sum = [0u8; 8];
        sum.copy_from_slice(&b[56..64]);
        if u64::from_le_bytes(sum) != checksum(&b[..56]) {
            return Err(HeaderProblem::Corrupt("header checksum mismatch".into()));
        }
        let mutex_bytes = u32_at(12);
        if mutex_bytes != MUTEX_BYTES {
            return Err(HeaderProblem::Incompatible(format!(
                "its mutexes are {mutex_bytes} bytes, this platform's are {MUTEX_BYTES}"
            )));
        }
        let limits = [
            ("max_queues", u32_at(16), MAX_QUEUES),
            ("max_jobs", u32_at(20), MAX_JOBS),
            ("max_payload", u32_at(24), MAX_PAYLOAD),
            ("max_waiters", u32_at(28), MAX_WAITERS),
        ];
        for (name, value, max) in limits {
            if value == 0 || value > max {
                return Err(HeaderProblem::Corrupt(format!("{name} {value}")));
            }
        }
        let geometry = Geometry::new(u32_at(16), u32_at(20), u32_at(24), u32_at(28));
        let mut size = [0u8; 8];
        size.copy_from_slice(&b[32..40]);
        if geometry.file_size != u64::from_le_bytes(size) {
            return Err(HeaderProblem::Corrupt(
                "the file size disagrees with the limits".into(),
            ));
        }
        Ok(geometry)
    }
}

/// FNV-1a over the header bytes.
fn checksum(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_round_trips_and_rejects_damage() {
        let g = Geometry::new(8, 100, 1000, 16);
        assert_eq!(g.file_size % PAGE, 0);
        assert_eq!(g.job_bytes % 64, 0);
        let bytes = g.encode();
        assert_eq!(Geometry::decode(&bytes), Ok(g));
        assert_eq!(Geometry::decode(&bytes[..30]), Err(HeaderProblem::Short));
        let mut bad = bytes;
        bad[0] ^= 1;
        assert_eq!(Geometry::decode(&bad), Err(HeaderProblem::BadMagic));
        let mut bad = bytes;
        bad[8] = 9;
        assert_eq!(Geometry::decode(&bad), Err(HeaderProblem::WrongVersion(9)));
        let mut bad = bytes;
        bad[17] ^= 1;
        assert!(matches!(
            Geometry::decode(&bad),
            Err(HeaderProblem::Corrupt(_))
        ));
    }

    #[test]
    fn only_live_words_and_records_are_writable() {
        let g = Geometry::new(2, 2, 8, 2);
        assert!(!g.writable(0));
        assert!(!g.writable(LOCK_OFFSET));
        assert!(!g.writable(hdr::JOURNAL_LEN));
        assert!(g.writable(hdr::NEXT_SEQ));
        assert!(!g.writable(JOURNAL_OFFSET));
        assert!(g.writable(g.job(1, j::STATE)));
        assert!(!g.writable(g.job(1, j::STATE) + 4));
        assert!(!g.writable(g.file_size));
    }
}
