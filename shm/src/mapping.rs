//! A file mapped `MAP_SHARED` and read-write, read as [`Plain`] types at offsets checked
//! against the mapping, and one anonymous shared word ([`SharedWord`]).
//!
//! Soundness rests on three facts: a `Plain` type is valid for any bytes and is mutated only
//! through atomics or a [`crate::LockWord`], so references into memory that other processes
//! change are fine; every page stays mapped for the Mapping's lifetime (references borrow
//! it); and a page that the file no longer backs (someone shrank it) is answered by the
//! SIGBUS handler of `fault.rs` with a private zero page, valid memory again.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU32, AtomicU64};

use crate::fault::Watch;
use crate::LockWord;

/// The page size every layout on this crate assumes (offsets of synced structures are
/// multiples of it).
pub const PAGE: u64 = 4096;

/// A type that may be read in place from shared memory that other processes write.
///
/// # Safety
/// Every bit pattern is a valid value of the type (zeros included: a faulted page reads as
/// zeros), and it is mutated only through interior mutability that synchronises across
/// processes: atomics, or fields guarded by a [`LockWord`]. `repr(C)` with no padding whose
/// value matters, no pointers, no references.
pub unsafe trait Plain: Sync {}

// SAFETY: atomics are valid for any bits and synchronise across processes on shared memory.
unsafe impl Plain for AtomicU64 {}
// SAFETY: as above.
unsafe impl Plain for AtomicU32 {}
// SAFETY: the mutex bytes are only used through the pthread API under the contract of
// lock.rs (initialised before sharing); the holder is an atomic. Any bytes are a valid value
// of the C struct (pthread reports a damaged mutex as an error, which LockWord returns).
unsafe impl Plain for LockWord {}
// SAFETY: an array of Plain is Plain (no padding between elements of one type).
unsafe impl<T: Plain, const N: usize> Plain for [T; N] {}

/// A `MAP_SHARED` read-write mapping of a whole file.
pub struct Mapping {
    base: NonNull<u8>,
    len: usize,
    /// The mapping's registration with the SIGBUS handler; dropped (unregistered) before the
    /// mapping is unmapped.
    watch: Option<Watch>,
}

// SAFETY: the mapping is plain shared memory read only as `Plain` types (Sync by the trait's
// bound), so it may be used from any thread.
unsafe impl Send for Mapping {}
// SAFETY: as above.
unsafe impl Sync for Mapping {}

impl Mapping {
    /// Maps the first `len` bytes of `file` (open read-write). A file shorter than `len` is
    /// not unsound (its missing pages read as zeros and count as a fault) but the caller
    /// should check the size first.
    pub fn map(file: &File, len: u64) -> io::Result<Mapping> {
        let len = usize::try_from(len).map_err(|_| io::Error::from(io::ErrorKind::OutOfMemory))?;
        if len == 0 {
            return Err(io::Error::from(io::ErrorKind::InvalidInput));
        }
        // SAFETY: a fresh mapping chosen by the kernel (addr null) aliases no Rust object.
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
        let mut mapping = Mapping {
            base,
            len,
            watch: None,
        };
        // SAFETY: the range is the mapping just made, unmapped only in Drop after the watch
        // is dropped; it is read only through `at`, as Plain types.
        mapping.watch = Some(unsafe { Watch::register(base.as_ptr(), len) }?);
        Ok(mapping)
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Whether any access to the mapping, by this process, found the file shorter than the
    /// mapping or unreadable (a SIGBUS answered with a zero page): what was read since may be
    /// zeros instead of the file's contents.
    pub fn faulted(&self) -> bool {
        self.watch.as_ref().is_some_and(Watch::faulted)
    }

    /// The `T` at `offset`. Panics if it does not lie inside the mapping or is misaligned:
    /// offsets come from a geometry validated against the file, so either is a bug.
    pub fn at<T: Plain>(&self, offset: u64) -> &T {
        let size = std::mem::size_of::<T>() as u64;
        assert!(
            offset
                .checked_add(size)
                .is_some_and(|end| end <= self.len as u64),
            "shared object at {offset} (+{size}) outside the {}-byte mapping",
            self.len
        );
        let ptr = self.base.as_ptr().wrapping_add(offset as usize);
        assert!(
            ptr.cast::<T>().is_aligned(),
            "shared object at {offset} misaligned"
        );
        // SAFETY: in bounds and aligned (asserted); the page is mapped for `self`'s lifetime
        // (the reference borrows self); T is Plain, so any bytes there are a valid T and
        // every mutation of it synchronises, making a shared reference sound.
        unsafe { &*ptr.cast::<T>() }
    }

    /// Synchronously writes the pages holding `obj` to the file (`msync(MS_SYNC)`). Panics
    /// if `obj` does not lie inside the mapping.
    pub fn sync<T: Plain>(&self, obj: &T) -> io::Result<()> {
        let base = self.base.as_ptr() as usize;
        let start = obj as *const T as usize;
        let size = std::mem::size_of::<T>();
        assert!(
            start >= base && start - base + size <= self.len,
            "msync of an object outside the mapping"
        );
        let page = PAGE as usize;
        let first = (start - base) / page * page;
        let end = start - base + size;
        // SAFETY: the range lies inside the mapping (asserted) and starts on a page boundary,
        // as msync requires; msync does not touch memory contents.
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

impl Drop for Mapping {
    fn drop(&mut self) {
        // Unregistered first: an address range unmapped below may be reused at once.
        drop(self.watch.take());
        // SAFETY: `base`/`len` are exactly the mapping made in `map`; no reference into it
        // can outlive `self` (they all borrow `self`).
        unsafe {
            libc::munmap(self.base.as_ptr().cast(), self.len);
        }
    }
}

/// One atomic word in an anonymous `MAP_SHARED` page: shared with every process forked after
/// it was made (e.g. the master's state for its workers), never with a file. Starts at 0.
pub struct SharedWord {
    word: NonNull<AtomicU32>,
}

// SAFETY: the word is only accessed through `&AtomicU32`, which is Sync.
unsafe impl Send for SharedWord {}
// SAFETY: as above.
unsafe impl Sync for SharedWord {}

impl SharedWord {
    pub fn new() -> io::Result<SharedWord> {
        // SAFETY: a fresh anonymous mapping chosen by the kernel aliases nothing; it is
        // zero-filled and page-aligned: a valid, aligned AtomicU32 holding 0.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                PAGE as usize,
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

    pub fn get(&self) -> &AtomicU32 {
        // SAFETY: the page is mapped for `self`'s lifetime and holds a valid AtomicU32.
        unsafe { self.word.as_ref() }
    }
}

impl Drop for SharedWord {
    fn drop(&mut self) {
        // SAFETY: exactly the page mapped in `new`; no reference into it outlives `self`.
        unsafe {
            libc::munmap(self.word.as_ptr().cast(), PAGE as usize);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::Ordering::Relaxed;

    fn two_pages() -> (tempfile::NamedTempFile, Mapping) {
        let file = tempfile::NamedTempFile::new().expect("temp file");
        file.as_file().set_len(2 * PAGE).expect("size");
        let mapping = Mapping::map(file.as_file(), 2 * PAGE).expect("map");
        (file, mapping)
    }

    #[test]
    fn a_word_written_through_the_mapping_reaches_the_file() {
        let (file, mapping) = two_pages();
        let word: &AtomicU64 = mapping.at(PAGE + 8);
        word.store(0x0102_0304_0506_0708, Relaxed);
        mapping.sync(word).expect("msync");
        let bytes = std::fs::read(file.path()).expect("read");
        assert_eq!(
            bytes[PAGE as usize + 8..][..8],
            0x0102_0304_0506_0708u64.to_ne_bytes()
        );
        assert!(!mapping.faulted());
    }

    #[test]
    #[should_panic(expected = "outside")]
    fn an_object_past_the_end_is_refused() {
        let (_file, mapping) = two_pages();
        let _: &AtomicU64 = mapping.at(2 * PAGE - 4);
    }

    #[test]
    #[should_panic(expected = "outside")]
    fn an_offset_that_overflows_is_refused() {
        let (_file, mapping) = two_pages();
        let _: &AtomicU64 = mapping.at(u64::MAX - 2);
    }

    #[test]
    #[should_panic(expected = "misaligned")]
    fn a_misaligned_object_is_refused() {
        let (_file, mapping) = two_pages();
        let _: &AtomicU64 = mapping.at(3);
    }

    #[test]
    fn a_shared_word_is_shared_with_a_forked_child() {
        let word = SharedWord::new().expect("shared word");
        // SAFETY: the child stores to an atomic and `_exit`s, nothing else.
        match unsafe { nix::unistd::fork() }.expect("fork") {
            nix::unistd::ForkResult::Child => {
                word.get().store(7, Relaxed);
                // SAFETY: _exit is async-signal-safe and never returns.
                unsafe { libc::_exit(0) }
            }
            nix::unistd::ForkResult::Parent { child } => {
                nix::sys::wait::waitpid(child, None).expect("waitpid");
            }
        }
        assert_eq!(word.get().load(Relaxed), 7);
    }
}
