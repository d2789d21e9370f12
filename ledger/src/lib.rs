//! forkpool's bank ledger: account balances in one shared-memory, file-backed region that
//! every worker process maps and mutates concurrently, crash-safe and persistent.
//!
//! * [`Ledger::open`] (the master, before forking: cold start) creates or validates the file,
//!   takes its exclusive flock for the Ledger's lifetime, re-initialises every lock word and
//!   runs recovery. The forked workers use the master's `Ledger` as they inherited it.
//! * [`Ledger::adopt`] (a new master after a binary upgrade: warm attach) maps an inherited,
//!   already locked descriptor without touching locks or running recovery.
//! * Operations ([`Ledger::deposit`], [`Ledger::withdraw`], [`Ledger::transfer`],
//!   [`Ledger::balance`], [`Ledger::audit`]) are atomic and linearizable across processes. A
//!   process may die at any instruction: the next one to take the lock it held repairs the
//!   state from an undo record, so the interrupted operation is fully applied or not at all.
//!
//! * The file is hostile input: a cold start refuses (untouched) a file whose recovery
//!   structures do not make sense (`validate.rs`); a file truncated, deleted or replaced
//!   under the running server fails the ledger ([`Ledger::health`], `health.rs`) instead of
//!   a process (`forkpool_shm`'s SIGBUS handler); a path guard keeps a second server off the
//!   path even once the file is gone (`guard.rs`).
//!
//! The shared-memory building blocks that need `unsafe` (the mapping, the robust mutex, the
//! SIGBUS handler) are `forkpool_shm`'s; here `unsafe` is only the cold start's lock
//! initialisation (`recovery.rs`), the `Plain` impls of `layout.rs`, and test helpers.
//!
//! The design (layout, lock order, crash points, durability, file faults) is argued in
//! `docs/LEDGER.md`. This crate does no I/O besides its file (and the guard's socket), and
//! knows nothing of the protocol beyond [`OpError::kind`].

mod durable;
mod error;
mod file;
mod health;
mod layout;
mod name;
mod ops;
mod options;
mod recovery;
mod redo;
mod region;
mod validate;

use std::fmt;
use std::fs::File;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};

pub use error::{LedgerError, OpError};
pub use forkpool_shm::{set_wait_hook, LOCK_WAIT_SLICE};
pub use health::{FileFault, Health};
pub use name::{AccountName, MAX_ACCOUNT_LEN};
pub use options::{
    FsyncPolicy, LedgerOptions, ParseFsyncPolicyError, DEFAULT_INTENT_RECORDS,
    DEFAULT_LOG_SEGMENT_BYTES, DEFAULT_MAX_ACCOUNTS, DEFAULT_STRIPES, MAX_MAX_ACCOUNTS,
};
pub use validate::{Finding, Problem, Structure};

use forkpool_shm::{FilePath, FileWatch, GuardError, PathGuard};
use health::SharedHealth;
use region::Region;

/// Largest amount and largest balance: the protocol's (2^63-1).
pub use forkpool_common::bank::MAX_AMOUNT;
/// Most lock stripes a file may have.
pub const MAX_STRIPES: u32 = 1024;
/// Most intent records a file may have.
pub const MAX_INTENTS: u32 = 65_536;

/// One consistent snapshot of the whole ledger.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Audit {
    /// Exact sum of all balances (can exceed 2^63-1).
    pub total: u128,
    /// Number of open accounts (an emptied account stays open).
    pub accounts: u64,
}

/// Names one of the ledger's locks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LockId {
    /// A stripe lock: protects the accounts whose hash maps to it.
    Stripe(u32),
    /// The allocation lock: serialises account creation (always taken after stripes).
    Alloc,
    /// The operation log's append lock (`--fsync always`; taken last).
    Log,
}

impl fmt::Display for LockId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            LockId::Stripe(i) => write!(f, "stripe {i}"),
            LockId::Alloc => f.write_str("alloc"),
            LockId::Log => f.write_str("log"),
        }
    }
}

/// A lock and the pid recorded as holding it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LockHolder {
    pub lock: LockId,
    pub pid: i32,
}

/// What the monitoring pages show of a ledger (read without taking any lock).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Overview {
    pub health: Health,
    /// Total and accounts (not one consistent instant); `None` once the file's health
    /// refuses reads.
    pub audit: Option<Audit>,
    /// Locks repaired after their holder died, over the file's life; `None` as `audit`.
    pub recoveries: Option<u64>,
}

/// A mapped, flocked ledger file. Usable in forked children (no threads, no thread-locals);
/// `Send + Sync`.
pub struct Ledger {
    /// The shared mapping; everything the processes share lives in it.
    region: Region,
    /// The open file: its open file description holds the exclusive flock, released when the
    /// last descriptor sharing it (inherited by children too) is closed.
    file: File,
    /// For error messages and logs.
    path: PathBuf,
    /// Notices what other processes do to the file (size, path, writes); read by
    /// `check_file` only.
    watch: FileWatch,
    /// The durability policy in force.
    fsync: FsyncPolicy,
    /// The redo log, under `FsyncPolicy::Always`.
    wal: Option<durable::Wal>,
    /// The file's health as every process using the ledger knows it.
    health: SharedHealth,
    /// Keeps other servers off the path while any process of ours lives.
    guard: PathGuard,
}

impl fmt::Debug for Ledger {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Ledger")
            .field("path", &self.path)
            .field("capacity", &self.capacity())
            .field("fsync", &self.fsync)
            .finish()
    }
}

impl Ledger {
    /// Cold start, in the master before it forks: opens the file at `path` (creating it and
    /// its parent directory if missing), takes an exclusive non-blocking flock held for the
    /// Ledger's lifetime, validates the header (`max_accounts` must equal the file's
    /// capacity, see [`LedgerError::CapacityMismatch`]; `stripes` and `intent_records` only
    /// shape a new file), re-initialises every lock word and repairs every operation that a
    /// dead process left half done. A file that fails validation is left untouched.
    ///
    /// Only safe while no other live process maps the file; the flock guarantees that for
    /// everyone who opens the file through this function.
    ///
    /// Before touching the file it takes the path's guard (see [`LedgerError::PathInUse`])
    /// and removes temp files left by creators that died mid-creation.
    pub fn open(path: &Path, opts: &LedgerOptions) -> Result<Ledger, LedgerError> {
        Ledger::open_keyed(path, opts, &file::random_key, None)
    }

    /// [`Ledger::open`], with the hash key of a new file from `new_key` (tests make files
    /// that are the same from run to run).
    pub(crate) fn open_keyed(
        path: &Path,
        opts: &LedgerOptions,
        new_key: &dyn Fn() -> u64,
        store: Option<Box<dyn forkpool_shm::LogStore>>,
    ) -> Result<Ledger, LedgerError> {
        file::check_options(path, opts)?;
        forkpool_shm::register_atfork();
        let target = resolve(path)?;
        let guard = acquire_guard(path, &target.canonical)?;
        forkpool_shm::remove_stale_temps(&target, "ledger");
        let file = file::open_locked(&target, opts, new_key)?;
        let geometry = file::validate(&file, path, Some(opts.max_accounts))?;
        let store = match store {
            Some(store) => Some(store),
            None if opts.fsync == FsyncPolicy::Always || forkpool_shm::has_checkpoint(path) => {
                Some(open_store(path, opts.log_segment_bytes)?)
            }
            None => None,
        };
        let mut ledger = Ledger::map(file, geometry, path, opts.fsync, guard)?;
        ledger.wal = store.map(|store| durable::Wal { store });
        ledger.cold_start()?;
        if opts.fsync == FsyncPolicy::Never && ledger.wal.take().is_some() {
            ledger.leave_log()?;
        }
        Ok(ledger)
    }

    /// Warm attach, for a new master after a binary upgrade: maps the ledger open on `fd`
    /// (inherited from the old master, whose open file description already holds the flock),
    /// checking its header, WITHOUT re-initialising locks or running recovery, because live
    /// workers of the old master may be using it. `guard` is the path guard the old master
    /// passed on ([`Ledger::guard_fd`]); without one (an old master that had none) the guard
    /// is taken afresh. `path` names the file in messages and health checks. The capacity is
    /// the file's, and so is the fsync policy (`fsync` differing from it is logged).
    pub fn adopt(
        fd: OwnedFd,
        guard: Option<OwnedFd>,
        path: &Path,
        fsync: FsyncPolicy,
    ) -> Result<Ledger, LedgerError> {
        forkpool_shm::register_atfork();
        let file = File::from(fd);
        file::lock_exclusive(&file, path)?;
        let geometry = file::validate(&file, path, None)?;
        let guard = match guard {
            Some(fd) => PathGuard::inherited(fd),
            None => acquire_guard(path, &resolve(path)?.canonical)?,
        };
        // The policy is the running ledger's: a log exists (it has a checkpoint) exactly when
        // the master that started it runs `always`. Workers of both generations must agree,
        // or changes of one would be missing from the log the next cold start rebuilds from.
        let running = if forkpool_shm::has_checkpoint(path) {
            FsyncPolicy::Always
        } else {
            FsyncPolicy::Never
        };
        if running != fsync {
            log::warn!(
                "ledger {}: --fsync {fsync} asked for, but the running ledger is --fsync \
                 {running}, which a binary upgrade keeps; a restart changes it",
                path.display()
            );
        }
        let fsync = running;
        let mut ledger = Ledger::map(file, geometry, path, fsync, guard)?;
        if fsync == FsyncPolicy::Always {
            let store = open_store(path, options::DEFAULT_LOG_SEGMENT_BYTES)?;
            ledger.wal = Some(durable::Wal { store });
        }
        Ok(ledger)
    }

    /// After a cold start under `--fsync never` of a ledger that had a log: the rebuilt
    /// table is flushed, then the log's files are removed (they would be stale).
    fn leave_log(&self) -> Result<(), LedgerError> {
        let io = |action| {
            move |source| LedgerError::Io {
                path: self.path.clone(),
                action,
                source,
            }
        };
        self.file.sync_data().map_err(io("fsync"))?;
        forkpool_shm::FileStore::remove(&self.path).map_err(io("remove the operation log"))?;
        log::info!(
            "ledger {}: --fsync never: the operation log and its checkpoint were removed",
            self.path.display()
        );
        Ok(())
    }

    /// Maps a validated, locked file.
    fn map(
        file: File,
        geometry: layout::Geometry,
        path: &Path,
        fsync: FsyncPolicy,
        guard: PathGuard,
    ) -> Result<Ledger, LedgerError> {
        let io = |action| {
            move |source| LedgerError::Io {
                path: path.to_path_buf(),
                action,
                source,
            }
        };
        let region = Region::map(&file, geometry).map_err(io("mmap"))?;
        let watch = FileWatch::new(&file, path, "ledger").map_err(io("stat"))?;
        Ok(Ledger {
            region,
            watch,
            health: SharedHealth::new().map_err(io("map the shared health page"))?,
            file,
            path: path.to_path_buf(),
            fsync,
            wal: None,
            guard,
        })
    }

    /// The path the ledger was opened with.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Most accounts this ledger holds.
    pub fn capacity(&self) -> u64 {
        self.region.geometry().capacity
    }

    /// The durability policy in force.
    pub fn fsync_policy(&self) -> FsyncPolicy {
        self.fsync
    }

    /// Every lock currently recorded as held, with the holder's pid, so a supervisor can find
    /// (and kill) a stopped or hung holder. A racy snapshot: a holder may just have released.
    /// Empty once the file's health refuses reads (its lock words may be zeros then).
    pub fn lock_holders(&self) -> Vec<LockHolder> {
        self.monitored(|| {
            let geometry = self.region.geometry();
            let stripes =
                (0..geometry.stripes).map(|i| (LockId::Stripe(i), &self.region.stripe(i).lock));
            let alloc = std::iter::once((LockId::Alloc, &self.region.header().alloc));
            stripes
                .chain(alloc)
                .filter_map(|(lock, word)| {
                    let pid = word.holder();
                    (pid != 0).then_some(LockHolder { lock, pid })
                })
                .collect()
        })
        .unwrap_or_default()
    }

    /// The ledger as the monitoring pages show it: health, and the lock-free figures while
    /// the file can be read. Takes no lock.
    pub fn overview(&self) -> Overview {
        let figures = self.monitored(|| (self.approximate_audit(), self.recoveries()));
        Overview {
            health: self.health(),
            audit: figures.map(|(audit, _)| audit),
            recoveries: figures.map(|(_, recoveries)| recoveries),
        }
    }

    /// The descriptor of the path guard, to hand to a new binary with the file's
    /// ([`AsRawFd`]) for [`Ledger::adopt`] (the caller clears `FD_CLOEXEC` on it).
    pub fn guard_fd(&self) -> RawFd {
        self.guard.as_raw_fd()
    }
}

/// The operation log's files next to the ledger at `path`.
fn open_store(
    path: &Path,
    segment_bytes: u64,
) -> Result<Box<dyn forkpool_shm::LogStore>, LedgerError> {
    let store =
        forkpool_shm::FileStore::open(path, segment_bytes).map_err(|source| LedgerError::Io {
            path: path.to_path_buf(),
            action: "open the operation log",
            source,
        })?;
    Ok(Box::new(store))
}

/// Takes the path guard of `canonical` for the ledger at `path`.
/// The kind of shared file the ledger is, for its path guard's name.
const GUARD_KIND: &str = "ledger";

fn resolve(path: &Path) -> Result<FilePath, LedgerError> {
    FilePath::resolve(path).map_err(|e| LedgerError::from_path(path, e))
}

fn acquire_guard(path: &Path, canonical: &Path) -> Result<PathGuard, LedgerError> {
    PathGuard::acquire(GUARD_KIND, canonical).map_err(|e| match e {
        GuardError::Held => LedgerError::PathInUse {
            path: path.to_path_buf(),
            guard: forkpool_shm::guard_name(GUARD_KIND, canonical),
        },
        GuardError::Os(source) => LedgerError::Io {
            path: path.to_path_buf(),
            action: "bind the path guard socket",
            source,
        },
    })
}

impl AsRawFd for Ledger {
    /// The descriptor holding the flock, to hand to a new binary for [`Ledger::adopt`] (the
    /// caller clears `FD_CLOEXEC` on it).
    fn as_raw_fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }
}

/// Test-only crash points: `point()` counts steps and `_exit`s at the armed one.
#[cfg(test)]
pub(crate) mod crash {
    use std::sync::atomic::{AtomicU32, Ordering};

    static TARGET: AtomicU32 = AtomicU32::new(0);
    static COUNT: AtomicU32 = AtomicU32::new(0);
    /// Exit status of a child that died at its crash point.
    pub(crate) const CRASH_STATUS: i32 = 77;

    /// Arms step `k` (1-based) in this (child) process; 0 disarms.
    pub(crate) fn arm(k: u32) {
        COUNT.store(0, Ordering::Relaxed);
        TARGET.store(k, Ordering::Relaxed);
    }

    pub(crate) fn point() {
        let target = TARGET.load(Ordering::Relaxed);
        if target != 0 && COUNT.fetch_add(1, Ordering::Relaxed) + 1 == target {
            // SAFETY: _exit is async-signal-safe and ends the process at once, as a simulated
            // SIGKILL should (no destructors, no unlocking).
            unsafe { libc::_exit(CRASH_STATUS) }
        }
    }
}

/// A step where a test may kill the process (compiled to nothing outside tests).
#[inline(always)]
pub(crate) fn crash_point() {
    #[cfg(test)]
    crash::point();
}

#[cfg(test)]
mod crash_tests;
#[cfg(test)]
mod mutation_tests;
#[cfg(test)]
mod sim_tests;
#[cfg(test)]
mod test_support;
