//! The file format: one fixed-size region of `repr(C)` structs with no pointers, every field
//! an atomic (or the mutex), so any process that maps the file can use it in place.
//!
//! ```text
//! offset 0           header page (4 KiB): immutable geometry + checksum (bytes 0..64),
//!                    account count, the allocation lock and its journal
//! off_stripes        `stripes` x Stripe (128 B): lock word + running total of the stripe
//! off_intents        `intents` x Intent (128 B): the pool of undo/intent records
//! off_slots          `table_slots` x Slot (96 B): open-addressing table of accounts
//! ```
//! Each region starts on a page boundary so `msync` ranges never straddle two regions.
//! Integers in the immutable header are little-endian; the live fields use native order
//! (the header records the platform's mutex size, and the format is for one machine).

use std::sync::atomic::{AtomicU32, AtomicU64};

use forkpool_shm::{LockWord, Plain, MUTEX_BYTES};

pub(crate) const MAGIC: [u8; 8] = *b"FPLEDGR\x01";
/// Bump on any change of layout, hashing or record semantics.
pub(crate) const LAYOUT_VERSION: u32 = 1;
pub(crate) const PAGE: u64 = forkpool_shm::PAGE;
pub(crate) const HEADER_BYTES: u64 = PAGE;
/// Bytes 0..FIXED_BYTES of the header are written once at creation and checksummed.
pub(crate) const FIXED_BYTES: usize = 64;

/// Slot tags. A live slot's tag is the name's hash with bit 0 cleared and bit 1 set, so it is
/// never FREE or TOMB and carries the stripe and home index of the account.
pub(crate) const FREE: u64 = 0;
/// A slot that held an account whose creation was rolled back. It is never FREE again (that
/// would cut the probe chains that ran past it) but may be reused by a new account.
pub(crate) const TOMB: u64 = 1;

pub(crate) fn live_tag(hash: u64) -> u64 {
    (hash & !1) | 2
}

pub(crate) fn is_live(tag: u64) -> bool {
    tag & 2 != 0
}

/// Entry/journal states.
pub(crate) const IDLE: u64 = 0;
pub(crate) const ACTIVE: u64 = 1;

/// The live part of the header page, starting at offset 0 of the mapping.
#[repr(C)]
pub(crate) struct Header {
    /// Immutable, checksummed geometry (see `Geometry::encode`); only read via `pread`.
    pub(crate) fixed: [u8; FIXED_BYTES],
    /// Number of live accounts. Changed only under the allocation lock; recomputed from the
    /// table at every cold start.
    pub(crate) count: AtomicU64,
    /// Locks repaired after their holder died, over the file's life (statistics only).
    pub(crate) recoveries: AtomicU64,
    _pad: [u64; 6],
    /// Serialises account creation and un-creation (taken after any stripe, never before).
    pub(crate) alloc: LockWord,
    /// Undo journal of the allocation lock's critical section (one holder at a time).
    pub(crate) journal: AllocJournal,
    _pad2: [u64; 4],
    /// The redo log's shared state (`--fsync always`; set up by every cold start).
    pub(crate) wal: WalState,
}

/// Where the redo log stands, shared by every process (see `durable.rs`). Changed under the
/// `append` lock, except `durable` and `flushed`, which only the holder of `flush` raises.
#[repr(C, align(64))]
pub(crate) struct WalState {
    /// Serialises appends; taken last, after any stripe or the allocation lock.
    pub(crate) append: LockWord,
    /// Held by the one process flushing the log.
    pub(crate) flush: LockWord,
    /// Held by the one process writing a checkpoint.
    pub(crate) checkpoint: LockWord,
    /// LSN of the next record; every record below it is written.
    pub(crate) next_lsn: AtomicU64,
    /// Every record up to this LSN is on stable storage.
    pub(crate) durable: AtomicU64,
    /// Bumped after `durable` moves: the futex word flush waiters sleep on.
    pub(crate) flushed: AtomicU32,
    _pad: u32,
    /// The segment (0/1) appends go to, and the offset of the next record in it.
    pub(crate) active: AtomicU64,
    pub(crate) end: AtomicU64,
    /// LSN of the last switch record (the other segment holds the records before it).
    pub(crate) switch_lsn: AtomicU64,
    /// The segment of the installed checkpoint's position: the other one is free to reuse.
    pub(crate) checkpoint_log: AtomicU64,
    /// The log's life (see `redo.rs`).
    pub(crate) epoch: AtomicU64,
    /// The append in progress: its LSN (0: none), offset and intent record, for the repair
    /// of an appender that died holding `append`.
    pub(crate) appending_lsn: AtomicU64,
    pub(crate) appending_offset: AtomicU64,
    pub(crate) appending_intent: AtomicU64,
}

/// The allocation lock's own undo record: whoever next acquires the lock after its holder
/// died restores `old_tag` into `slot` and `old_count` into the count if `state` is ACTIVE.
#[repr(C)]
pub(crate) struct AllocJournal {
    pub(crate) state: AtomicU64,
    pub(crate) slot: AtomicU64,
    pub(crate) old_tag: AtomicU64,
    pub(crate) old_count: AtomicU64,
}

impl AllocJournal {
    /// Records the before-image of slot `slot` (its tag) and of the account count, then
    /// marks the journal active (release: the images are visible before the state).
    pub(crate) fn open(&self, slot: u64, old_tag: u64, old_count: u64) {
        use std::sync::atomic::Ordering::{Relaxed, Release};
        self.slot.store(slot, Relaxed);
        self.old_tag.store(old_tag, Relaxed);
        self.old_count.store(old_count, Relaxed);
        self.state.store(ACTIVE, Release);
    }
}

/// One lock stripe: the accounts whose hash maps here are read and written only under `lock`.
#[repr(C, align(128))]
pub(crate) struct Stripe {
    pub(crate) lock: LockWord,
    /// Sum of the stripe's balances (u128 split in two words), kept up to date by every
    /// operation and recomputed from the table by every repair, so AUDIT never scans.
    pub(crate) total_lo: AtomicU64,
    pub(crate) total_hi: AtomicU64,
}

/// An intent (undo) record, claimed for one operation by a CAS of `owner`.
#[repr(C, align(128))]
pub(crate) struct Intent {
    /// `generation << 32 | pid`; pid 0 = free. The generation makes freeing ABA-safe.
    pub(crate) owner: AtomicU64,
    /// 1 once every write of a two-entry operation is done: pending entries are then left
    /// as they are (rolled forward) instead of being undone.
    pub(crate) commit: AtomicU64,
    /// One entry per touched account; each is repaired under its own stripe's lock.
    pub(crate) entries: [Entry; 2],
}

/// The before-image of one account touched by an operation.
#[repr(C)]
pub(crate) struct Entry {
    /// ACTIVE while the before-image is valid and the account may be modified; written last
    /// (release) when set, cleared when the operation commits.
    pub(crate) state: AtomicU64,
    pub(crate) stripe: AtomicU64,
    pub(crate) slot: AtomicU64,
    /// Balance before the operation (ignored for a created account).
    pub(crate) before: AtomicU64,
    /// Non-zero if the operation created the account: the live tag it gave the slot; undoing
    /// means un-creating the slot if it still carries this tag.
    pub(crate) created: AtomicU64,
}

/// One account slot of the open-addressing (linear probing) table.
#[repr(C, align(32))]
pub(crate) struct Slot {
    pub(crate) tag: AtomicU64,
    pub(crate) balance: AtomicU64,
    pub(crate) name_len: AtomicU64,
    pub(crate) name: [AtomicU64; 8],
    _pad: u64,
}

// SAFETY (all seven): `repr(C)` structs of atomics, `LockWord`s and (the header's) bytes and
// padding that are never written through the mapping (`fixed` is written with `pwrite` at
// creation, before the file is mapped, and read with `pread`): any bytes are a valid value,
// and every change goes through an atomic or happens under the lock word that guards it.
unsafe impl Plain for Header {}
unsafe impl Plain for AllocJournal {}
unsafe impl Plain for WalState {}
unsafe impl Plain for Stripe {}
unsafe impl Plain for Intent {}
unsafe impl Plain for Entry {}
unsafe impl Plain for Slot {}

const _: () = assert!(std::mem::size_of::<Header>() <= HEADER_BYTES as usize);
const _: () = assert!(std::mem::size_of::<Stripe>() == 128);
const _: () = assert!(std::mem::size_of::<Intent>() == 128);
const _: () = assert!(std::mem::size_of::<Slot>() == 96);

pub(crate) const STRIPE_BYTES: u64 = std::mem::size_of::<Stripe>() as u64;
pub(crate) const INTENT_BYTES: u64 = std::mem::size_of::<Intent>() as u64;
pub(crate) const SLOT_BYTES: u64 = std::mem::size_of::<Slot>() as u64;

/// Everything the immutable header says, and the offsets derived from it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Geometry {
    pub(crate) capacity: u64,
    pub(crate) table_slots: u64,
    pub(crate) stripes: u32,
    pub(crate) intents: u32,
    pub(crate) hash_key: u64,
    pub(crate) off_stripes: u64,
    pub(crate) off_intents: u64,
    pub(crate) off_slots: u64,
    pub(crate) file_size: u64,
}

fn round_up(x: u64, to: u64) -> u64 {
    x.div_ceil(to) * to
}

/// Why a header cannot be used (turned into a `LedgerError` naming the file by the caller).
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum HeaderProblem {
    Short,
    BadMagic,
    WrongVersion(u32),
    Incompatible(String),
    Corrupt(String),
}

impl Geometry {
    /// The layout of a ledger with these parameters. The caller has validated them
    /// (capacity <= 2^24, stripes <= 1024 and a power of two, intents <= 65536).
    pub(crate) fn new(capacity: u64, stripes: u32, intents: u32, hash_key: u64) -> Geometry {
        // Load factor <= 1/2 keeps linear probes short and guarantees a free slot.
        let table_slots = (capacity * 2).max(16).next_power_of_two();
        let off_stripes = HEADER_BYTES;
        let off_intents = round_up(off_stripes + u64::from(stripes) * STRIPE_BYTES, PAGE);
        let off_slots = round_up(off_intents + u64::from(intents) * INTENT_BYTES, PAGE);
        let file_size = round_up(off_slots + table_slots * SLOT_BYTES, PAGE);
        Geometry {
            capacity,
            table_slots,
            stripes,
            intents,
            hash_key,
            off_stripes,
            off_intents,
            off_slots,
            file_size,
        }
    }

    /// The immutable header bytes of a new file.
    pub(crate) fn encode(&self) -> [u8; FIXED_BYTES] {
        let mut b = [0u8; FIXED_BYTES];
        b[0..8].copy_from_slice(&MAGIC);
        b[8..12].copy_from_slice(&LAYOUT_VERSION.to_le_bytes());
        b[12..16].copy_from_slice(&MUTEX_BYTES.to_le_bytes());
        b[16..24].copy_from_slice(&self.capacity.to_le_bytes());
        b[24..32].copy_from_slice(&self.table_slots.to_le_bytes());
        b[32..36].copy_from_slice(&self.stripes.to_le_bytes());
        b[36..40].copy_from_slice(&self.intents.to_le_bytes());
        b[40..48].copy_from_slice(&self.hash_key.to_le_bytes());
        b[48..56].copy_from_slice(&self.file_size.to_le_bytes());
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
        let u64_at = |i: usize| {
            let mut w = [0u8; 8];
            w.copy_from_slice(&b[i..i + 8]);
            u64::from_le_bytes(w)
        };
        let version = u32_at(8);
        if version != LAYOUT_VERSION {
            return Err(HeaderProblem::WrongVersion(version));
        }
        if u64_at(56) != checksum(&b[..56]) {
            return Err(HeaderProblem::Corrupt("header checksum mismatch".into()));
        }
        let mutex_bytes = u32_at(12);
        if mutex_bytes != MUTEX_BYTES {
            return Err(HeaderProblem::Incompatible(format!(
                "its mutexes are {mutex_bytes} bytes, this platform's are {MUTEX_BYTES}"
            )));
        }
        let (capacity, stripes, intents) = (u64_at(16), u32_at(32), u32_at(36));
        if capacity == 0 || capacity > crate::options::MAX_MAX_ACCOUNTS {
            return Err(HeaderProblem::Corrupt(format!("capacity {capacity}")));
        }
        if !stripes.is_power_of_two() || stripes > crate::MAX_STRIPES {
            return Err(HeaderProblem::Corrupt(format!("stripe count {stripes}")));
        }
        if intents == 0 || intents > crate::MAX_INTENTS {
            return Err(HeaderProblem::Corrupt(format!("intent records {intents}")));
        }
        let geometry = Geometry::new(capacity, stripes, intents, u64_at(40));
        if geometry.table_slots != u64_at(24) || geometry.file_size != u64_at(48) {
            return Err(HeaderProblem::Corrupt(
                "table size or file size disagrees with the capacity".into(),
            ));
        }
        Ok(geometry)
    }

    pub(crate) fn stripe_of(&self, tag: u64) -> u32 {
        ((tag >> 44) as u32) & (self.stripes - 1)
    }

    pub(crate) fn home_of(&self, tag: u64) -> u64 {
        (tag >> 2) & (self.table_slots - 1)
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
        let g = Geometry::new(1000, 8, 16, 42);
        assert_eq!(g.table_slots, 2048);
        assert_eq!(g.file_size % PAGE, 0);
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
}
