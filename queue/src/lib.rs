//! forkpool's job queues: named FIFO queues of one-line jobs in one shared-memory,
//! file-backed region that every worker process maps and mutates, crash-safe and persistent,
//! with blocking get/put/join served across processes.
//!
//! * [`Store::open`] (the master, before forking: cold start) takes the path's guard (one
//!   server per store path, even once the file is deleted), creates or checks the file,
//!   takes its exclusive flock, refuses (untouched) a file whose journal or lists do not make
//!   sense (`validate.rs`), then rolls back the operation a dead process left half done,
//!   returns every job that was handed out but not done to the head of its queue, and drops
//!   every wait (no connection of the previous run is alive).
//! * Operations ([`Store::put`], [`Store::get`], [`Store::done`], [`Store::join`], ...) run
//!   under one robust process-shared lock and write only through the undo journal
//!   (`region.rs`): a process may die at any instruction; the next holder of the lock rolls
//!   the interrupted operation back, so it is applied wholly or not at all.
//! * Blocking without blocking: an operation that cannot complete parks a *waiter record* in
//!   shared memory (FIFO per queue and kind, across workers) and returns a [`Ticket`]; the
//!   operation that later makes it possible (a PUT for a parked GET, a GET for a parked PUT, the
//!   last DONE for a JOIN) serves the waiter in place (the job is handed to the waiting
//!   connection directly) and returns the processes to wake ([`WakeSet`]); the woken
//!   process collects the outcome with [`Store::claim`]. The wake-up mechanism itself is the
//!   server's: this crate does no I/O besides its file.
//! * Jobs handed to a connection are owned by (process, connection); [`Store::release`] (a
//!   connection closed) and [`Store::release_process`] (a worker died) return them to the head
//!   of their queue: at-least-once delivery.
//!
//! * Under [`FsyncPolicy::Always`] every transaction also appends a physical redo record to
//!   a log shared by all processes, flushed by group commit ([`Store::flush`]); a cold start
//!   rebuilds the file from the last checkpoint and the log (`durable.rs`, `redo.rs`).
//! * The file is hostile input: odd paths and damaged files are refused at start, untouched;
//!   a file truncated, deleted, replaced or written to under the running server fails the
//!   store for every process (`health.rs`), never a process.
//!
//! The design (layout, journal, settling, what is and is not durable) is argued in
//! `docs/QUEUE.md`. `unsafe` lives in `forkpool_shm`; here it is only the cold start's lock
//! initialisation (`recovery.rs`) and test helpers.

mod durable;
mod error;
mod file;
mod health;
mod layout;
mod ops;
mod recovery;
mod redo;
mod region;
mod validate;

use std::fmt;
use std::fs::File;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};

pub use durable::DEFAULT_LOG_SEGMENT_BYTES;
pub use error::{OpError, StoreError};
pub use forkpool_common::fsync::FsyncPolicy;
pub use forkpool_common::queue::QueueName;
pub use layout::{MAX_JOBS, MAX_PAYLOAD, MAX_QUEUES, MAX_WAITERS};
pub use ops::Cancelled;
pub use validate::Finding;

use forkpool_shm::{FilePath, FileStore, FileWatch, GuardError, LogStore, PathGuard, SharedWord};
use layout::Geometry;
use region::Region;

/// The limits of a store file and the maxsize of new queues.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoreOptions {
    /// Most queues (queues are created on first use and never deleted).
    pub max_queues: u32,
    /// Most jobs at once: ready, handed out, or waiting to enter a full queue.
    pub max_jobs: u32,
    /// Longest payload, in bytes.
    pub max_payload: u32,
    /// Most requests waiting at once (parked GET, PUT and JOIN), across all workers.
    pub max_waiters: u32,
    /// `maxsize` of a queue created on first use (0 = unbounded).
    pub default_maxsize: u64,
    /// Whether a reply may wait for its operation to be on stable storage (a redo log).
    pub fsync: FsyncPolicy,
    /// Bytes of each of the log's two segments (`--fsync always`; an existing segment keeps
    /// its size).
    pub log_segment_bytes: u64,
}

pub const DEFAULT_MAX_QUEUES: u32 = 256;
pub const DEFAULT_MAX_JOBS: u32 = 65_536;
pub const DEFAULT_MAX_PAYLOAD: u32 = 1024;
pub const DEFAULT_MAX_WAITERS: u32 = 4096;

impl Default for StoreOptions {
    fn default() -> Self {
        StoreOptions {
            max_queues: DEFAULT_MAX_QUEUES,
            max_jobs: DEFAULT_MAX_JOBS,
            max_payload: DEFAULT_MAX_PAYLOAD,
            max_waiters: DEFAULT_MAX_WAITERS,
            default_maxsize: 0,
            fsync: FsyncPolicy::Never,
            log_segment_bytes: DEFAULT_LOG_SEGMENT_BYTES,
        }
    }
}

/// Who asks: connection `conn` (unique within its process) of this process, which is the
/// process woken when the wait is served.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Party {
    pub conn: u64,
}

/// Whether an operation that cannot complete now waits or fails.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Wait,
    NoWait,
}

/// A parked request: give it to [`Store::claim`] when woken, or [`Store::cancel`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Ticket {
    index: u64,
    serial: u64,
}

/// What an operation did at once, or the ticket of its wait.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Attempt<T> {
    Now(T),
    Parked(Ticket),
}

impl<T> Attempt<T> {
    /// The same attempt with `f` applied to what was done at once.
    pub fn map<U>(self, f: impl FnOnce(T) -> U) -> Attempt<U> {
        match self {
            Attempt::Now(done) => Attempt::Now(f(done)),
            Attempt::Parked(ticket) => Attempt::Parked(ticket),
        }
    }
}

/// What a served wait got.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// A GET was handed job `id` (its payload appended to the caller's buffer).
    Job(u64),
    /// A PUT's job entered the queue as job `id`.
    Put(u64),
    /// A JOIN saw every job of its queue done.
    Joined,
}

/// The processes whose waiting connections an operation served: poke each one's wake-up
/// source. Usually empty or one.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct WakeSet {
    pids: Vec<i32>,
}

impl WakeSet {
    pub(crate) fn add(&mut self, pid: u64) {
        let Ok(pid) = i32::try_from(pid) else {
            return;
        };
        if !self.pids.contains(&pid) {
            self.pids.push(pid);
        }
    }

    pub fn is_empty(&self) -> bool {
        self.pids.is_empty()
    }

    /// The pids, in the order they were served.
    pub fn iter(&self) -> impl Iterator<Item = i32> + '_ {
        self.pids.iter().copied()
    }
}

/// One queue's figures, read under the lock (one consistent instant).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct QueueStats {
    pub maxsize: u64,
    /// Jobs ready to be fetched.
    pub depth: u64,
    /// Jobs handed out and not yet done.
    pub in_flight: u64,
    pub put: u64,
    pub done: u64,
    pub waiting_getters: u64,
    pub waiting_putters: u64,
    pub waiting_joiners: u64,
}

/// Every queue's figures summed, for the monitoring pages (see [`Store::overview`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Overview {
    pub queues: u64,
    pub depth: u64,
    pub in_flight: u64,
    pub put: u64,
    pub done: u64,
    pub waiting_getters: u64,
    pub waiting_putters: u64,
    pub waiting_joiners: u64,
    /// Operations rolled back after their process died, over the file's life.
    pub recoveries: u64,
    /// The file failed under the running server (every figure is then 0).
    pub failed: bool,
}

/// A mapped, flocked store file. Usable in forked children; `Send + Sync`.
pub struct Store {
    region: Region,
    /// Its open file description holds the exclusive flock (shared with forked children).
    file: File,
    path: PathBuf,
    default_maxsize: u64,
    /// Keeps other servers off the path while any process of ours lives.
    guard: PathGuard,
    /// 1 once the file failed under the running server, for every process (`health.rs`).
    failed: SharedWord,
    /// Notices what other processes do to the file; read by `check_file` only.
    watch: FileWatch,
}

impl fmt::Debug for Store {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Store")
            .field("path", &self.path)
            .field("geometry", self.region.geometry())
            .finish()
    }
}

impl Store {
    /// Cold start, in the master before it forks (see the crate doc). Only safe while no
    /// other live process maps the file; the flock guarantees that for everyone who opens it
    /// through this function.
    pub fn open(path: &Path, opts: &StoreOptions) -> Result<Store, StoreError> {
        Store::open_with(path, opts, None)
    }

    /// [`Store::open`] with the log's storage given (a simulated disk in tests); without one,
    /// the log's files next to the store if the policy is `always` or the store has a log.
    /// A store that had a log is rebuilt from it whatever the policy; under `never` the
    /// rebuilt file is then flushed and the log removed.
    pub(crate) fn open_with(
        path: &Path,
        opts: &StoreOptions,
        log: Option<Box<dyn LogStore>>,
    ) -> Result<Store, StoreError> {
        let expected = check_options(path, opts)?;
        forkpool_shm::register_atfork();
        let target = resolve(path)?;
        let guard = acquire_guard(path, &target.canonical)?;
        forkpool_shm::remove_stale_temps(&target, "queue store");
        let file = file::open_locked(&target, &expected)?;
        let geometry = file::validate(&file, path, &expected)?;
        let io = |action| {
            move |source| StoreError::Io {
                path: path.to_path_buf(),
                action,
                source,
            }
        };
        let log = match log {
            Some(log) => Some(log),
            None if opts.fsync == FsyncPolicy::Always || forkpool_shm::has_checkpoint(path) => {
                let store = FileStore::open(path, opts.log_segment_bytes)
                    .map_err(io("open the operation log"))?;
                Some(Box::new(store) as Box<dyn LogStore>)
            }
            None => None,
        };
        let mut store = Store::map(file, geometry, path, opts, guard)?;
        let log = log.map(|store| durable::Wal { store });
        let rebuilt = match &log {
            Some(log) => store.rebuild(log)?,
            None => None,
        };
        store.cold_start()?;
        let Some(log) = log else {
            return Ok(store);
        };
        if opts.fsync == FsyncPolicy::Never {
            store.leave_log()?;
            return Ok(store);
        }
        let (epoch, next_lsn) = rebuilt.map_or((1, 1), |(epoch, next)| (epoch + 1, next));
        store.start_log(&log, epoch, next_lsn)?;
        store.region.wal = Some(log);
        Ok(store)
    }

    /// After a cold start under `--fsync never` of a store that had a log: the rebuilt file
    /// is flushed, then the log's files are removed (they would be stale).
    fn leave_log(&self) -> Result<(), StoreError> {
        let io = |action| {
            move |source| StoreError::Io {
                path: self.path.clone(),
                action,
                source,
            }
        };
        self.file.sync_data().map_err(io("fsync"))?;
        FileStore::remove(&self.path).map_err(io("remove the operation log"))?;
        log::info!(
            "queue store {}: --fsync never: the operation log and its checkpoint were removed",
            self.path.display()
        );
        Ok(())
    }

    /// Warm attach, for a new master after a binary upgrade: maps the store open on `fd`
    /// (inherited from the old master, whose open file description holds the flock) after
    /// checking its header against `opts`, WITHOUT initialising the lock or recovering
    /// anything: the old master's workers use the store right now. `guard` is the path guard
    /// the old master passed on ([`Store::guard_fd`]); without one it is taken afresh.
    pub fn adopt(
        fd: OwnedFd,
        guard: Option<OwnedFd>,
        path: &Path,
        opts: &StoreOptions,
    ) -> Result<Store, StoreError> {
        let expected = check_options(path, opts)?;
        forkpool_shm::register_atfork();
        let file = File::from(fd);
        let geometry = file::validate(&file, path, &expected)?;
        let guard = match guard {
            Some(fd) => PathGuard::inherited(fd),
            None => acquire_guard(path, &resolve(path)?.canonical)?,
        };
        let mut store = Store::map(file, geometry, path, opts, guard)?;
        // The policy is the running store's: it has a log exactly when the master that
        // started it runs `always`, and the workers of both generations must agree.
        if forkpool_shm::has_checkpoint(path) {
            let log =
                FileStore::open(path, opts.log_segment_bytes).map_err(|source| StoreError::Io {
                    path: path.to_path_buf(),
                    action: "open the operation log",
                    source,
                })?;
            store.region.wal = Some(durable::Wal {
                store: Box::new(log),
            });
        }
        if (opts.fsync == FsyncPolicy::Always) != store.region.wal.is_some() {
            log::warn!(
                "queue store {}: --fsync {} asked for, but the running store keeps its own \
                 policy through a binary upgrade; a restart changes it",
                path.display(),
                opts.fsync
            );
        }
        Ok(store)
    }

    /// Maps a checked, locked file.
    fn map(
        file: File,
        geometry: Geometry,
        path: &Path,
        opts: &StoreOptions,
        guard: PathGuard,
    ) -> Result<Store, StoreError> {
        let io = |action| {
            move |source| StoreError::Io {
                path: path.to_path_buf(),
                action,
                source,
            }
        };
        Ok(Store {
            region: Region::map(&file, geometry).map_err(io("mmap"))?,
            watch: FileWatch::new(&file, path, "queue store").map_err(io("stat"))?,
            failed: SharedWord::new().map_err(io("map the shared health page"))?,
            file,
            path: path.to_path_buf(),
            default_maxsize: opts.default_maxsize,
            guard,
        })
    }

    /// The path guard's descriptor, to hand to a new binary with the store.
    pub fn guard(&self) -> BorrowedFd<'_> {
        self.guard.as_fd()
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Longest payload this store takes.
    pub fn max_payload(&self) -> u32 {
        self.region.geometry().max_payload
    }

    /// Pid recorded as holding the store lock (0 = none), for a supervisor hunting a stopped
    /// holder.
    pub fn lock_holder(&self) -> i32 {
        if self.failed() {
            return 0;
        }
        self.region.lock().holder()
    }
}

impl AsRawFd for Store {
    /// The descriptor holding the flock, to hand to a new binary for [`Store::adopt`] (the
    /// caller clears `FD_CLOEXEC` on it).
    fn as_raw_fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }
}

impl AsFd for Store {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.file.as_fd()
    }
}

/// The kind of shared file a store is, for its path guard's name.
const GUARD_KIND: &str = "queue";

fn resolve(path: &Path) -> Result<FilePath, StoreError> {
    FilePath::resolve(path).map_err(|e| StoreError::from_path(path, e))
}

fn acquire_guard(path: &Path, canonical: &Path) -> Result<PathGuard, StoreError> {
    PathGuard::acquire(GUARD_KIND, canonical).map_err(|e| match e {
        GuardError::Held => StoreError::PathInUse {
            path: path.to_path_buf(),
            guard: forkpool_shm::guard_name(GUARD_KIND, canonical),
        },
        GuardError::Os(source) => StoreError::Io {
            path: path.to_path_buf(),
            action: "bind the path guard socket",
            source,
        },
    })
}

fn check_options(path: &Path, opts: &StoreOptions) -> Result<Geometry, StoreError> {
    let limits = [
        ("max_queues", opts.max_queues, MAX_QUEUES),
        ("max_jobs", opts.max_jobs, MAX_JOBS),
        ("max_payload", opts.max_payload, MAX_PAYLOAD),
        ("max_waiters", opts.max_waiters, MAX_WAITERS),
    ];
    for (name, value, max) in limits {
        if value == 0 || value > max {
            return Err(StoreError::InvalidOptions {
                path: path.to_path_buf(),
                detail: format!("{name} must be 1..={max}, not {value}"),
            });
        }
    }
    Ok(Geometry::new(
        opts.max_queues,
        opts.max_jobs,
        opts.max_payload,
        opts.max_waiters,
    ))
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
mod ops_tests;
#[cfg(test)]
mod sim_tests;
#[cfg(test)]
mod test_support;
