//! The shared mappings: the ledger file (`mmap(MAP_SHARED)`, typed access to the structs of
//! `layout.rs`, `msync`) and an anonymous shared word that the processes forked from the
//! mapping one share besides the file ([`SharedWord`]). `unsafe` code lives here, in
//! `lock.rs` and in `fault.rs` (and `recovery.rs` calls `LockWord::init`, an `unsafe fn`).
//!
//! Soundness rests on two facts: every byte of a mapping is covered by atomics or by the
//! pthread mutex (interior mutability shared with other processes is therefore fine, and any
//! bytes are valid values), and every page of the mapping stays mapped for the Region's
//! lifetime. The file is `file_size` bytes when it is mapped (checked before); if someone
//! shrinks it later, touching a page past its new end raises SIGBUS, which `fault.rs` answers
//! by mapping a private zero page there, so the access completes on valid memory and the
//! ledger learns that the file failed.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::ptr::NonNull;
use std::sync::atomic::AtomicU32;

use crate::fault::Watch;
use crate::layout::{Geometry, Header, Intent, Slot, Stripe};

/// A `MAP_SHARED` read-write mapping of a whole ledger file.
pub(crate) struct Region {
    base: NonNull<u8>,
    geometry: Geometry,
    /// The mapping's registration with the SIGBUS handler; dropped (unregistered) before the
    /// mapping is unmapped.
    watch: Option<Watch>,
}

// SAFETY: the mapping is plain shared memory accessed only through atomics and the
// process-shared mutexes, so it may be used from any thread.
unsafe impl Send for Region {}
// SAFETY: as above: all access through `&` goes through atomics or the mutex API.
unsafe impl Sync for Region {}

impl Region {
    /// Maps `file`, whose length the caller has checked to be `geometry.file_size`.
    pub(crate) fn map(file: &File, geometry: Geometry) -> io::Result<Region> {
        let len = usize::try_from(geometry.file_size)
            .map_err(|_| io::Error::from(io::ErrorKind::OutOfMemory))?;
        // SAFETY: a fresh mapping chosen by the kernel (addr null) aliases no Rust object;
        // the fd is open read-write; the length was validated against the file size.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                file.as_raw_fd(),
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let base = NonNull::new(ptr.cast::<u8>()).ok_or_else(io::Error::last_os_error)?;
        let mut region = Region {
            base,
            geometry,
            watch: None,
        };
        region.watch = Some(Watch::register(base.as_ptr(), len)?);
        Ok(region)
    }

    pub(crate) fn geometry(&self) -> &Geometry {
        &self.geometry
    }

    /// Whether any access to the mapping, by this process, found the file shorter than the
    /// mapping or unreadable (a SIGBUS answered with a zero page): what was read since may be
    /// zeros instead of the file's contents.
    pub(crate) fn faulted(&self) -> bool {
        self.watch.as_ref().is_some_and(Watch::faulted)
    }

    /// # Safety
    /// `offset + size_of::<T>() <= file_size`, and `offset` is aligned for `T`.
    unsafe fn at<T>(&self, offset: u64) -> &T {
        // SAFETY: per this function's contract the object lies inside the live mapping and
        // is aligned (the mapping is page-aligned and every offset is a multiple of the
        // type's alignment); T is made only of atomics/UnsafeCell, valid for any bytes the
        // file may hold (all-zero or otherwise), so producing a shared reference is sound.
        unsafe { &*self.base.as_ptr().add(offset as usize).cast::<T>() }
    }

    pub(crate) fn header(&self) -> &Header {
        // SAFETY: the header fits in the first page (static assertion in layout.rs).
        unsafe { self.at(0) }
    }

    /// Stripe `i`; `i` must be below the stripe count (callers mask it).
    pub(crate) fn stripe(&self, i: u32) -> &Stripe {
        assert!(i < self.geometry.stripes, "stripe index out of range");
        let offset = self.geometry.off_stripes + u64::from(i) * crate::layout::STRIPE_BYTES;
        // SAFETY: in range (asserted), 128-byte aligned (page-aligned region, 128-byte items).
        unsafe { self.at(offset) }
    }

    /// Intent record `i`; `i` must be below the pool size.
    pub(crate) fn intent(&self, i: u32) -> &Intent {
        assert!(i < self.geometry.intents, "intent index out of range");
        let offset = self.geometry.off_intents + u64::from(i) * crate::layout::INTENT_BYTES;
        // SAFETY: in range (asserted), 128-byte aligned.
        unsafe { self.at(offset) }
    }

    /// Slot `i`, or None if `i` (e.g. read from an intent record) is out of range.
    pub(crate) fn slot(&self, i: u64) -> Option<&Slot> {
        if i >= self.geometry.table_slots {
            return None;
        }
        let offset = self.geometry.off_slots + i * crate::layout::SLOT_BYTES;
        // SAFETY: in range (checked), 32-byte aligned (page-aligned region, 96-byte items).
        Some(unsafe { self.at(offset) })
    }

    /// Synchronously writes the pages holding `obj` to the file (`msync(MS_SYNC)`).
    pub(crate) fn sync<T>(&self, obj: &T) -> io::Result<()> {
        let base = self.base.as_ptr() as usize;
        let start = obj as *const T as usize;
        let page = crate::layout::PAGE as usize;
        let first = (start - base) / page * page;
        let end = start - base + std::mem::size_of::<T>();
        // SAFETY: the range lies inside the mapping (obj is a reference into it) and starts
        // on a page boundary, as msync requires; msync does not touch memory contents.
        let rc = unsafe {
            libc::msync(
                self.base.as_ptr().add(first).cast(),
                end - first,
                libc::MS_SYNC,
            )
        };
        if rc == 0 {
            Ok(())
        } else {
            Err(io::Error::last_os_error())
        }
    }
}

impl Drop for Region {
    fn drop(&mut self) {
        // Unregistered first: an address range unmapped below may be reused at once.
        drop(self.watch.take());
        // SAFETY: `base`/`file_size` are exactly the mapping made in `map`; no reference into
        // it can outlive `self` (they all borrow `self`).
        unsafe {
            libc::munmap(self.base.as_ptr().cast(), self.geometry.file_size as usize);
        }
    }
}

/// One atomic word in an anonymous `MAP_SHARED` page: shared with every process forked after
/// it was made (the master's state for its workers), never with the file. Starts at 0.
pub(crate) struct SharedWord {
    word: NonNull<AtomicU32>,
}

// SAFETY: the word is only accessed through `&AtomicU32`, which is Sync.
unsafe impl Send for SharedWord {}
// SAFETY: as above.
unsafe impl Sync for SharedWord {}

impl SharedWord {
    pub(crate) fn new() -> io::Result<SharedWord> {
        // SAFETY: a fresh anonymous mapping chosen by the kernel aliases nothing; it is
        // zero-filled and page-aligned: a valid, aligned AtomicU32 holding 0.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                crate::layout::PAGE as usize,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let word = NonNull::new(ptr.cast::<AtomicU32>()).ok_or_else(io::Error::last_os_error)?;
        Ok(SharedWord { word })
    }

    pub(crate) fn get(&self) -> &AtomicU32 {
        // SAFETY: the page is mapped for `self`'s lifetime and holds a valid AtomicU32.
        unsafe { self.word.as_ref() }
    }
}

impl Drop for SharedWord {
    fn drop(&mut self) {
        // SAFETY: exactly the page mapped in `new`; no reference into it outlives `self`.
        unsafe {
            libc::munmap(self.word.as_ptr().cast(), crate::layout::PAGE as usize);
        }
    }
}
