//! The robust, process-shared pthread mutex that lives inside a shared file mapping, the pid
//! of its holder next to it, the wait hook called while blocked, and this process's pid.
//!
//! This module does not know what the locks protect: repairing the state after `EOWNERDEAD`
//! is the caller's job, and the caller must call [`LockWord::consistent`] before unlocking
//! such a lock (unlocking without it makes the mutex `ENOTRECOVERABLE` for good).
//!
//! The contract every owner of a file keeps (the ledger does): a file's
//! lock words are initialised ([`LockWord::init`]) by the process that creates or recovers
//! the file, before it shares the file with any other process; every other process that uses
//! them got the file from that process or from one that got it so (forked workers, and an
//! upgrade's successor master, which adopts the file from its predecessor without
//! initialising anything). The safe methods rely on it.

use std::cell::UnsafeCell;
use std::io;
use std::sync::atomic::{AtomicI32, AtomicUsize, Ordering};
use std::sync::Once;
use std::time::Duration;

/// How long one `pthread_mutex_timedlock` call waits before the wait hook runs again.
pub const LOCK_WAIT_SLICE: Duration = Duration::from_millis(100);

/// The hook called every [`LOCK_WAIT_SLICE`] while a lock is contended (0 = none).
static WAIT_HOOK: AtomicUsize = AtomicUsize::new(0);

/// This process's pid, cached; reset to 0 in a forked child by an atfork handler.
static MY_PID: AtomicI32 = AtomicI32::new(0);
static ATFORK: Once = Once::new();

/// Sets (or clears) the function called every [`LOCK_WAIT_SLICE`] while this process waits
/// for a lock (or for a resource its caller polls, such as the ledger's intent records), e.g.
/// to keep heartbeating to the master while a
/// SIGSTOPped worker holds the lock. Process-wide; a forked child inherits it. The hook must
/// not take any lock of a shared file.
pub fn set_wait_hook(hook: Option<fn()>) {
    WAIT_HOOK.store(hook.map_or(0, |f| f as usize), Ordering::Release);
}

pub fn run_wait_hook() {
    let raw = WAIT_HOOK.load(Ordering::Acquire);
    if raw != 0 {
        // SAFETY: the only non-zero values ever stored in WAIT_HOOK are `fn()` pointers cast
        // to usize by set_wait_hook, and fn pointers and usize have the same size on every
        // platform Rust supports for this crate (Linux).
        let hook: fn() = unsafe { std::mem::transmute::<usize, fn()>(raw) };
        hook();
    }
}

extern "C" fn forget_pid_in_child() {
    MY_PID.store(0, Ordering::Relaxed);
}

/// Registers the atfork handler that keeps [`my_pid`] right in forked children. Idempotent.
pub fn register_atfork() {
    ATFORK.call_once(|| {
        // SAFETY: the handler only stores to an atomic, which is async-signal-safe, as a
        // child handler of a multi-threaded parent must be; the other two are null.
        let rc = unsafe { libc::pthread_atfork(None, None, Some(forget_pid_in_child)) };
        if rc != 0 {
            log::warn!("shared memory: pthread_atfork failed ({rc}); pids are not cached");
        }
    });
}

/// This process's pid (cached; the atfork handler resets the cache in children; without the
/// handler registered the cache is never filled).
pub fn my_pid() -> i32 {
    let cached = MY_PID.load(Ordering::Relaxed);
    if cached != 0 {
        return cached;
    }
    // Pids fit in i32 (pid_max is at most 2^22).
    let pid = std::process::id() as i32;
    if ATFORK.is_completed() {
        MY_PID.store(pid, Ordering::Relaxed);
    }
    pid
}

/// Whether a process with this pid exists (a zombie counts as existing until reaped).
pub fn pid_alive(pid: i32) -> bool {
    use nix::errno::Errno;
    use nix::sys::signal::kill;
    use nix::unistd::Pid;
    !matches!(kill(Pid::from_raw(pid), None), Err(Errno::ESRCH))
}

/// How a lock was obtained.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Acquired {
    /// The previous holder unlocked normally.
    Clean,
    /// The previous holder died holding it: repair, then [`LockWord::consistent`].
    OwnerDied,
}

/// The mutex is `ENOTRECOVERABLE` (or otherwise unusable).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NotRecoverable;

/// A robust process-shared mutex and the pid of its current holder, in the shared mapping.
#[repr(C, align(64))]
pub struct LockWord {
    mutex: UnsafeCell<libc::pthread_mutex_t>,
    /// Pid of the process holding the mutex (0 = none), for supervisors: set right after
    /// acquiring, cleared right before releasing, so it may briefly read 0 while held or name
    /// a holder that just died.
    holder: AtomicI32,
}

// SAFETY: the cell is only touched through the pthread mutex functions, which are made for
// concurrent use from any thread (of any process, the mutex being process-shared).
unsafe impl Sync for LockWord {}

/// Size of a pthread mutex on this platform, recorded in the file header.
pub const MUTEX_BYTES: u32 = std::mem::size_of::<libc::pthread_mutex_t>() as u32;
const _: () = assert!(std::mem::size_of::<LockWord>() == 64);

impl LockWord {
    /// Initialises the mutex as process-shared and robust and clears the holder, discarding
    /// whatever the bytes held (e.g. a dead owner's id after a crash).
    ///
    /// # Safety
    /// No thread of any process may use this lock concurrently, and none may hold it: the
    /// caller owns the file exclusively (e.g. its flock, before any fork), as the cold start
    /// of the module contract does.
    pub unsafe fn init(&self) -> io::Result<()> {
        let mut attr = std::mem::MaybeUninit::<libc::pthread_mutexattr_t>::uninit();
        // SAFETY: attr is a valid place for a mutexattr; it is initialised by the first call
        // and destroyed on every path; the mutex pointer is valid (it is inside the mapping
        // that `self` borrows) and unused by anyone, per this function's contract.
        unsafe {
            check(libc::pthread_mutexattr_init(attr.as_mut_ptr()))?;
            let result = (|| {
                check(libc::pthread_mutexattr_setpshared(
                    attr.as_mut_ptr(),
                    libc::PTHREAD_PROCESS_SHARED,
                ))?;
                check(libc::pthread_mutexattr_setrobust(
                    attr.as_mut_ptr(),
                    libc::PTHREAD_MUTEX_ROBUST,
                ))?;
                check(libc::pthread_mutex_init(self.mutex.get(), attr.as_ptr()))
            })();
            libc::pthread_mutexattr_destroy(attr.as_mut_ptr());
            result?;
        }
        self.holder.store(0, Ordering::Release);
        Ok(())
    }

    /// Acquires the mutex, waiting in [`LOCK_WAIT_SLICE`] slices and running the wait hook
    /// between them. Records this process as the holder.
    pub fn lock(&self) -> Result<Acquired, NotRecoverable> {
        let mutex = self.mutex.get();
        // SAFETY: `mutex` points into the live shared mapping that `self` borrows; by the
        // module contract it was initialised by `init` in the process that created or
        // recovered the file before anyone else could use it (this process is that one, one
        // it forked, or an upgrade's successor that adopted the file), so it is a valid
        // process-shared robust mutex.
        let mut rc = unsafe { libc::pthread_mutex_trylock(mutex) };
        while rc == libc::EBUSY || rc == libc::ETIMEDOUT {
            if rc == libc::ETIMEDOUT {
                run_wait_hook();
            }
            let deadline = realtime_after(LOCK_WAIT_SLICE);
            // SAFETY: as above; `deadline` is a valid timespec for the call's duration.
            rc = unsafe { libc::pthread_mutex_timedlock(mutex, &deadline) };
        }
        let acquired = match rc {
            0 => Acquired::Clean,
            libc::EOWNERDEAD => Acquired::OwnerDied,
            _ => return Err(NotRecoverable),
        };
        self.holder.store(my_pid(), Ordering::Relaxed);
        Ok(acquired)
    }

    /// Acquires the mutex if it is free, without waiting (`None`: someone holds it).
    /// Records this process as the holder when it succeeds.
    pub fn try_lock(&self) -> Result<Option<Acquired>, NotRecoverable> {
        // SAFETY: as in `lock`: a valid process-shared robust mutex inside the live mapping.
        let rc = unsafe { libc::pthread_mutex_trylock(self.mutex.get()) };
        let acquired = match rc {
            0 => Acquired::Clean,
            libc::EOWNERDEAD => Acquired::OwnerDied,
            libc::EBUSY => return Ok(None),
            _ => return Err(NotRecoverable),
        };
        self.holder.store(my_pid(), Ordering::Relaxed);
        Ok(Some(acquired))
    }

    /// Marks a mutex obtained with [`Acquired::OwnerDied`] as consistent again. Call only
    /// after the state it protects has been repaired.
    pub fn consistent(&self) {
        // SAFETY: valid initialised mutex (see `lock`), held by this thread in the
        // owner-died state, which is the precondition of pthread_mutex_consistent.
        let rc = unsafe { libc::pthread_mutex_consistent(self.mutex.get()) };
        debug_assert_eq!(rc, 0, "pthread_mutex_consistent");
    }

    /// Clears the holder and releases the mutex, which this thread holds.
    pub fn unlock(&self) {
        self.holder.store(0, Ordering::Relaxed);
        // SAFETY: valid initialised mutex (see `lock`), held by this thread.
        let rc = unsafe { libc::pthread_mutex_unlock(self.mutex.get()) };
        debug_assert_eq!(rc, 0, "pthread_mutex_unlock");
    }

    /// Pid of the recorded holder, 0 if none.
    pub fn holder(&self) -> i32 {
        self.holder.load(Ordering::Relaxed)
    }
}

fn check(rc: libc::c_int) -> io::Result<()> {
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::from_raw_os_error(rc))
    }
}

/// CLOCK_REALTIME now + `d`, the clock pthread_mutex_timedlock measures its deadline on
/// (`SystemTime` reads CLOCK_REALTIME).
fn realtime_after(d: Duration) -> libc::timespec {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    let then = now + d;
    libc::timespec {
        tv_sec: then.as_secs() as libc::time_t,
        tv_nsec: then.subsec_nanos() as libc::c_long,
    }
}
