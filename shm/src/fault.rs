//! Surviving a shared file that shrinks under its mapping.
//!
//! A `MAP_SHARED` mapping raises SIGBUS at the instruction that touches a page the file no
//! longer has (someone truncated it) or cannot read (an I/O error on a damaged disk). By
//! default that kills the process: for the ledger, the master (whose hung-worker check reads
//! lock holders from the mapping) and with it every worker. This module installs one
//! process-wide SIGBUS handler and keeps a registry of the address ranges of live
//! [`crate::Mapping`]s:
//!
//! * a fault raised by the kernel at an address inside a registered range is answered by
//!   mapping a private, zero-filled page over the faulting page (`MAP_FIXED`), so the
//!   instruction completes on harmless memory, and by counting the fault against the range.
//!   The owner of the mapping reads the count after each operation, discards the
//!   operation's result and marks the file failed (the ledger's `Health`); nothing in the
//!   handler reports or decides;
//! * any other SIGBUS (outside every range, or sent by a process) keeps the default
//!   behaviour: the handler resets SIGBUS to `SIG_DFL` and raises it again, so the process
//!   dies of SIGBUS as it would have without us.
//!
//! The handler touches only this module's statics (atomics, lock-free) and calls `mmap`,
//! `sigaction` and `raise`, which are plain system calls (glibc's `mmap` is a direct syscall
//! wrapper taking no lock, like the async-signal-safe `sigaction` and `raise`); it saves and
//! restores `errno`. Everything else happens in normal context.

use std::io;
use std::sync::atomic::Ordering::{Acquire, Relaxed, Release};
use std::sync::atomic::{fence, AtomicBool, AtomicU32, AtomicU64, AtomicUsize};
use std::sync::Once;

/// Most shared mappings one process can have registered at once (the server has one; a test
/// suite opens a few at a time per test thread, and runs a thread per CPU).
const MAX_RANGES: usize = 256;

/// One registered address range. Written only by the thread that holds the entry (`taken`),
/// read by the signal handler under a sequence lock: `seq` is odd while `start` and `len`
/// change, so a handler never pairs one registration's start with another's length.
struct Range {
    taken: AtomicBool,
    seq: AtomicU32,
    start: AtomicUsize,
    len: AtomicUsize,
    /// Faults answered inside this range since it was registered.
    faults: AtomicU64,
}

// A `const` item (not a `static`) so the array below may repeat it: each element is a fresh,
// separate value.
#[allow(clippy::declare_interior_mutable_const)]
const FREE_RANGE: Range = Range {
    taken: AtomicBool::new(false),
    seq: AtomicU32::new(0),
    start: AtomicUsize::new(0),
    len: AtomicUsize::new(0),
    faults: AtomicU64::new(0),
};

static RANGES: [Range; MAX_RANGES] = [FREE_RANGE; MAX_RANGES];
/// The system page size, read once at installation (the handler cannot call sysconf).
static PAGE_SIZE: AtomicUsize = AtomicUsize::new(0);
static INSTALL: Once = Once::new();
/// Set if installing the handler failed (then no range can be registered).
static INSTALL_FAILED: AtomicBool = AtomicBool::new(false);

/// A registered range; unregistered on drop, which must happen before the range is unmapped.
#[derive(Debug)]
pub(crate) struct Watch {
    index: usize,
}

impl Watch {
    /// Registers `[start, start + len)`, a live `MAP_SHARED` mapping of a file, installing the
    /// SIGBUS handler on first use. Fails if the handler cannot be installed or the registry
    /// is full.
    ///
    /// # Safety
    /// The range stays mapped until the Watch is dropped, and every byte of it is accessed
    /// only as [`crate::Plain`] types: the handler may replace any of its pages with zeros.
    pub(crate) unsafe fn register(start: *const u8, len: usize) -> io::Result<Watch> {
        install()?;
        let index = RANGES
            .iter()
            .position(|r| {
                r.taken
                    .compare_exchange(false, true, Acquire, Relaxed)
                    .is_ok()
            })
            .ok_or_else(|| {
                io::Error::new(
                    io::ErrorKind::OutOfMemory,
                    format!("more than {MAX_RANGES} shared mappings in one process"),
                )
            })?;
        let range = &RANGES[index];
        range.faults.store(0, Relaxed);
        write_locked(range, start as usize, len);
        Ok(Watch { index })
    }

    /// Whether any access to the range faulted since it was registered.
    pub(crate) fn faulted(&self) -> bool {
        RANGES[self.index].faults.load(Relaxed) != 0
    }
}

impl Drop for Watch {
    fn drop(&mut self) {
        let range = &RANGES[self.index];
        write_locked(range, 0, 0);
        range.taken.store(false, Release);
    }
}

/// Sequence-locked write of a range's bounds (by the entry's only writer).
fn write_locked(range: &Range, start: usize, len: usize) {
    let seq = range.seq.load(Relaxed);
    range.seq.store(seq.wrapping_add(1), Relaxed);
    fence(Release);
    range.start.store(start, Relaxed);
    range.len.store(len, Relaxed);
    range.seq.store(seq.wrapping_add(2), Release);
}

/// Installs the handler once per process (a forked child inherits it; `exec` resets it).
fn install() -> io::Result<()> {
    INSTALL.call_once(|| {
        // SAFETY: sysconf has no preconditions.
        let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
        PAGE_SIZE.store(usize::try_from(page).unwrap_or(4096), Relaxed);
        // SAFETY: a zeroed sigaction is a valid value to fill in; the handler has the
        // three-argument signature that SA_SIGINFO requires; the mask is initialised by
        // sigemptyset before use.
        let rc = unsafe {
            let mut action: libc::sigaction = std::mem::zeroed();
            action.sa_sigaction = on_sigbus as *const () as libc::sighandler_t;
            action.sa_flags = libc::SA_SIGINFO;
            libc::sigemptyset(&mut action.sa_mask);
            libc::sigaction(libc::SIGBUS, &action, std::ptr::null_mut())
        };
        if rc != 0 {
            INSTALL_FAILED.store(true, Relaxed);
        }
    });
    if INSTALL_FAILED.load(Relaxed) {
        return Err(io::Error::other("cannot install the SIGBUS handler"));
    }
    Ok(())
}

/// The registered range holding `addr`, read consistently under each entry's sequence lock.
fn range_holding(addr: usize) -> Option<&'static Range> {
    /// Retries of one entry whose writer is mid-update (it finishes in a few instructions).
    const SPINS: u32 = 1000;
    RANGES.iter().find(|range| {
        for _ in 0..SPINS {
            let before = range.seq.load(Acquire);
            if before % 2 == 1 {
                std::hint::spin_loop();
                continue;
            }
            let start = range.start.load(Relaxed);
            let len = range.len.load(Relaxed);
            fence(Acquire);
            if range.seq.load(Relaxed) == before {
                return start != 0 && addr >= start && addr - start < len;
            }
        }
        false
    })
}

/// Maps a private zero page over the page holding `addr`. Async-signal-safe.
fn cover_with_zero_page(addr: usize) -> bool {
    let page = PAGE_SIZE.load(Relaxed);
    let base = addr & !(page - 1);
    // SAFETY: `base` is the page-aligned start of a page inside a registered mapping (the
    // caller checked), which is live: the faulting thread is accessing it through a
    // `Mapping` that cannot be unmapped while borrowed, and a range is unregistered before it
    // is unmapped. Replacing that page changes only memory the Mapping owns and that is
    // accessed solely as `Plain` types, for which any bytes (zeros included) are valid.
    let mapped = unsafe {
        libc::mmap(
            base as *mut libc::c_void,
            page,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED,
            -1,
            0,
        )
    };
    mapped != libc::MAP_FAILED
}

/// Dies of this SIGBUS as if no handler were installed. Async-signal-safe.
fn reraise_with_default_action() {
    // SAFETY: resetting a disposition to SIG_DFL and raising a signal are async-signal-safe.
    // SIGBUS stays blocked until the handler returns, then the default action ends the
    // process (for a hardware fault, before the faulting instruction runs again).
    unsafe {
        libc::signal(libc::SIGBUS, libc::SIG_DFL);
        libc::raise(libc::SIGBUS);
    }
}

extern "C" fn on_sigbus(_signal: libc::c_int, info: *mut libc::siginfo_t, _: *mut libc::c_void) {
    // SAFETY: errno is thread-local; its location is valid for the thread's life.
    let errno = unsafe { *libc::__errno_location() };
    // SAFETY: with SA_SIGINFO the kernel passes a valid siginfo_t; si_addr is meaningful
    // for the kernel-generated (si_code > 0) SIGBUS codes, the only ones it is used for.
    let (code, addr) = unsafe { ((*info).si_code, (*info).si_addr() as usize) };
    let handled = code > 0
        && range_holding(addr).is_some_and(|range| {
            let covered = cover_with_zero_page(addr);
            if covered {
                range.faults.fetch_add(1, Relaxed);
            }
            covered
        });
    if !handled {
        reraise_with_default_action();
    }
    // SAFETY: as above.
    unsafe { *libc::__errno_location() = errno };
}

#[cfg(test)]
mod tests {
    use super::*;

    use nix::sys::signal::Signal;
    use nix::sys::wait::{waitpid, WaitStatus};
    use nix::unistd::{fork, ForkResult};

    /// Runs `body` in a forked child and returns how it ended.
    fn in_child(body: impl FnOnce()) -> WaitStatus {
        // SAFETY: the child runs `body` (memory accesses and async-signal-safe calls only,
        // no allocation) and `_exit`s; it never returns into the test harness.
        match unsafe { fork() }.expect("fork") {
            ForkResult::Child => {
                body();
                // SAFETY: _exit is async-signal-safe and never returns.
                unsafe { libc::_exit(0) }
            }
            ForkResult::Parent { child } => waitpid(child, None).expect("waitpid"),
        }
    }

    /// A shared mapping of a one-page file that is then truncated to nothing: touching it
    /// raises SIGBUS.
    fn truncated_mapping() -> (tempfile::NamedTempFile, *mut u8) {
        let file = tempfile::NamedTempFile::new().expect("temp file");
        file.as_file().set_len(4096).expect("size");
        // SAFETY: a fresh shared mapping of a 4096-byte file, chosen by the kernel.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                4096,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                std::os::fd::AsRawFd::as_raw_fd(file.as_file()),
                0,
            )
        };
        assert_ne!(ptr, libc::MAP_FAILED);
        file.as_file().set_len(0).expect("truncate");
        (file, ptr.cast())
    }

    #[test]
    fn a_fault_inside_a_registered_range_becomes_a_count_and_a_zero_page() {
        let (_file, ptr) = truncated_mapping();
        // SAFETY: the mapping lives until after the watch is dropped and is read as bytes.
        let watch = unsafe { Watch::register(ptr, 4096) }.expect("register");
        assert!(!watch.faulted());
        // SAFETY: the page is mapped (by the kernel, then by the handler's zero page).
        let byte = unsafe { std::ptr::read_volatile(ptr.add(100)) };
        assert_eq!(byte, 0);
        // SAFETY: as above; the zero page is writable and private.
        unsafe { std::ptr::write_volatile(ptr.add(100), 7) };
        assert!(watch.faulted());
        drop(watch);
        // SAFETY: the mapping made by truncated_mapping, no longer used.
        unsafe { libc::munmap(ptr.cast(), 4096) };
    }

    #[test]
    fn a_fault_outside_every_registered_range_still_kills_the_process_with_sigbus() {
        install().expect("install");
        let (_file, ptr) = truncated_mapping();
        let status = in_child(|| {
            // SAFETY: deliberately touching a page past the end of the file, unregistered.
            unsafe { std::ptr::read_volatile(ptr) };
        });
        // SAFETY: the mapping made by truncated_mapping, no longer used.
        unsafe { libc::munmap(ptr.cast(), 4096) };
        assert!(
            matches!(status, WaitStatus::Signaled(_, Signal::SIGBUS, _)),
            "{status:?}"
        );
    }

    #[test]
    fn a_sigbus_sent_by_a_process_still_kills_the_process() {
        install().expect("install");
        let status = in_child(|| {
            // SAFETY: raise is async-signal-safe.
            unsafe { libc::raise(libc::SIGBUS) };
        });
        assert!(
            matches!(status, WaitStatus::Signaled(_, Signal::SIGBUS, _)),
            "{status:?}"
        );
    }
}
