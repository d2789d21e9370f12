//! The ledger file's mapping with typed access to the structs of `layout.rs`: the stripes,
//! intent records and slots at the offsets of a geometry validated against the file. The
//! mapping itself, and the argument that reading these structs in place is sound, are
//! `forkpool_shm::Mapping`'s; this module has no `unsafe`.

use std::fs::File;
use std::io;

use forkpool_shm::Mapping;

use crate::layout::{
    Geometry, Header, Intent, Slot, Stripe, INTENT_BYTES, SLOT_BYTES, STRIPE_BYTES,
};

/// A `MAP_SHARED` read-write mapping of a whole ledger file.
pub(crate) struct Region {
    mapping: Mapping,
    geometry: Geometry,
}

impl Region {
    /// Maps `file`, whose length the caller has checked to be `geometry.file_size`.
    pub(crate) fn map(file: &File, geometry: Geometry) -> io::Result<Region> {
        let mapping = Mapping::map(file, geometry.file_size)?;
        Ok(Region { mapping, geometry })
    }

    pub(crate) fn geometry(&self) -> &Geometry {
        &self.geometry
    }

    /// Whether any access to the mapping, by this process, found the file shorter than the
    /// mapping or unreadable (a SIGBUS answered with a zero page): what was read since may be
    /// zeros instead of the file's contents.
    pub(crate) fn faulted(&self) -> bool {
        self.mapping.faulted()
    }

    pub(crate) fn header(&self) -> &Header {
        self.mapping.at(0)
    }

    /// Stripe `i`; `i` must be below the stripe count (callers mask it).
    pub(crate) fn stripe(&self, i: u32) -> &Stripe {
        assert!(i < self.geometry.stripes, "stripe index out of range");
        self.mapping
            .at(self.geometry.off_stripes + u64::from(i) * STRIPE_BYTES)
    }

    /// Intent record `i`; `i` must be below the pool size.
    pub(crate) fn intent(&self, i: u32) -> &Intent {
        assert!(i < self.geometry.intents, "intent index out of range");
        self.mapping
            .at(self.geometry.off_intents + u64::from(i) * INTENT_BYTES)
    }

    /// Slot `i`, or None if `i` (e.g. read from an intent record) is out of range.
    pub(crate) fn slot(&self, i: u64) -> Option<&Slot> {
        (i < self.geometry.table_slots)
            .then(|| self.mapping.at(self.geometry.off_slots + i * SLOT_BYTES))
    }
}
