//! Error types of the queue store: [`StoreError`] for opening a store file (each variant names
//! the file), [`OpError`] for an operation.

use std::io;
use std::path::PathBuf;

use forkpool_common::queue::QueueErrorKind;

use crate::validate::Finding;

/// Why a store file could not be opened or created. Every variant names the file.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// A system call failed; `action` says which step (e.g. "open", "mmap").
    #[error("queue store {path}: {action} failed: {source}")]
    Io {
        path: PathBuf,
        action: &'static str,
        #[source]
        source: io::Error,
    },
    /// Creating the file found no space for it; nothing was left under the final name.
    #[error("queue store {path}: no space to create a {bytes}-byte file: {source}")]
    DiskFull {
        path: PathBuf,
        bytes: u64,
        #[source]
        source: io::Error,
    },
    /// Another open file description holds the exclusive flock (another live server).
    #[error("queue store {path} is locked by another process (is another server running on it?)")]
    Locked { path: PathBuf },
    /// Another live server holds the path's guard: it runs on this path, perhaps on a file
    /// that was deleted or replaced under it since (see `forkpool_shm::PathGuard`).
    #[error(
        "queue store {path} is locked by another running server, which holds {guard} (a \
         server keeps its store path even if the file is deleted or replaced under it)"
    )]
    PathInUse { path: PathBuf, guard: String },
    /// The path cannot name a store file (it ends in '/', or has no file name).
    #[error("queue store {path}: {reason}")]
    BadPath { path: PathBuf, reason: &'static str },
    /// The path is a symbolic link whose target does not exist. A store is not created
    /// through a link.
    #[error(
        "queue store {path} is a symbolic link to {target}, which does not exist (a store is \
         not created through a link: use the target's path, or point the link at a store file)",
        target = target.display()
    )]
    DanglingSymlink { path: PathBuf, target: PathBuf },
    /// The path names something other than a regular file.
    #[error("queue store {path} is {kind}, not a regular file")]
    NotAFile { path: PathBuf, kind: &'static str },
    /// The path kept changing while it was being opened.
    #[error(
        "queue store {path} kept changing while it was being opened ({attempts} attempts: \
         another process creates, deletes or replaces it); try again"
    )]
    Unstable { path: PathBuf, attempts: u32 },
    /// The file is shorter than its header or than the size its header describes.
    #[error("queue store {path} is truncated: {actual} bytes, expected {expected}")]
    Truncated {
        path: PathBuf,
        actual: u64,
        expected: u64,
    },
    /// The file does not start with the store's magic: it is not a queue store.
    #[error("queue store {path} is not a forkpool queue file (bad magic)")]
    BadMagic { path: PathBuf },
    #[error("queue store {path} has layout version {found}, this build reads version {expected}")]
    WrongVersion {
        path: PathBuf,
        found: u32,
        expected: u32,
    },
    /// The header does not match its checksum or describes an impossible layout.
    #[error("queue store {path} is corrupt: {detail}")]
    Corrupt { path: PathBuf, detail: String },
    /// A structure that recovery would read or produce is inconsistent: nothing was applied,
    /// the file is unchanged.
    #[error("queue store {path} is corrupt: {finding}; the file was left unchanged")]
    Damaged {
        path: PathBuf,
        #[source]
        finding: Finding,
    },
    /// The file was made on a platform whose lock words differ in size.
    #[error("queue store {path} was created on an incompatible platform: {detail}")]
    Incompatible { path: PathBuf, detail: String },
    /// The file's limits differ from the configured ones. A store is never resized in place.
    #[error(
        "queue store {path} was made with {setting} = {file}, the configuration says \
         {configured}; configure {file} or move the file away"
    )]
    LimitsMismatch {
        path: PathBuf,
        setting: &'static str,
        file: u64,
        configured: u64,
    },
    /// The options cannot describe a store.
    #[error("queue store {path}: invalid options: {detail}")]
    InvalidOptions { path: PathBuf, detail: String },
    /// The checkpoint of `--fsync always` is damaged: the log cannot be replayed over it.
    #[error("queue store {path}: its checkpoint ({path}.ckpt) is corrupt; the files were left unchanged")]
    CheckpointCorrupt { path: PathBuf },
    /// A record in the middle of the operation log is damaged (a later record proves it was
    /// durable): starting would lose acknowledged operations.
    #[error(
        "queue store {path}: the operation log is corrupt at LSN {lsn} (segment {segment}, \
         offset {offset}): a later record proves it was durable; the files were left unchanged"
    )]
    LogCorrupt {
        path: PathBuf,
        lsn: u64,
        segment: u8,
        offset: u64,
    },
    /// The store lock is unusable at the cold start.
    #[error("queue store {path}: recovery failed: {source}")]
    Recovery {
        path: PathBuf,
        #[source]
        source: OpError,
    },
}

impl StoreError {
    /// The error for a path that does not lead to a usable store file.
    pub(crate) fn from_path(path: &std::path::Path, error: forkpool_shm::PathError) -> Self {
        use forkpool_shm::PathError;
        let path = path.to_path_buf();
        match error {
            PathError::BadPath(reason) => StoreError::BadPath { path, reason },
            PathError::DanglingSymlink { target } => StoreError::DanglingSymlink { path, target },
            PathError::NotAFile { kind } => StoreError::NotAFile { path, kind },
            PathError::Locked => StoreError::Locked { path },
            PathError::Unstable { attempts } => StoreError::Unstable { path, attempts },
            PathError::Io { action, source } => StoreError::Io {
                path,
                action,
                source,
            },
        }
    }
}

/// Why an operation failed; a failed operation changed nothing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum OpError {
    /// A non-blocking PUT on a queue holding `maxsize` ready jobs.
    #[error("the queue is full")]
    Full,
    /// A non-blocking GET on a queue with no ready job.
    #[error("the queue is empty")]
    Empty,
    /// The queue was never created (STATS, CONFIG reads).
    #[error("no such queue")]
    NoSuchQueue,
    /// DONE of a job that this connection does not hold.
    #[error("job {0} is not reserved by this connection")]
    NotReserved(u64),
    /// The payload is longer than the file's `max_payload`.
    #[error("the payload is {len} bytes, the limit (queue_max_payload) is {max}")]
    PayloadTooLong { len: usize, max: u32 },
    /// No room for another queue (`max_queues`).
    #[error("no room for another queue (max_queues is {0})")]
    TooManyQueues(u32),
    /// No free job record (`max_jobs` jobs are ready, reserved or being put).
    #[error("no room for another job (queue_max_jobs is {0})")]
    StoreFull(u32),
    /// No free waiter record (`max_waiters` requests are waiting).
    #[error("too many waiting requests (max_waiters is {0})")]
    TooManyWaiters(u32),
    /// The store lock reported `ENOTRECOVERABLE`; only a restart clears it.
    #[error("the queue store lock is not recoverable; restart the server")]
    Unrecoverable,
    /// The store file failed under the running server (a SIGBUS answered with a zero page,
    /// or the supervisor found it resized, deleted, replaced or written to; `health.rs`):
    /// nothing it would answer can be trusted; only a restart clears it.
    #[error(
        "the queue store file was truncated, deleted, replaced or written to under the running \
         server (see the log); nothing changed, and the server must be restarted"
    )]
    FileFault,
    /// The operation log (`--fsync always`) could not be written or flushed: nothing is
    /// promised any more; only a restart (which keeps what the log holds) clears it.
    #[error("the queue store's operation log failed; restart the server")]
    LogFailed,
    /// The active log segment has no room left and no checkpoint has freed the other one yet.
    #[error("the queue store's operation log is full until a checkpoint frees it; try again")]
    LogFull,
}

impl OpError {
    /// The queue protocol's error word for this error (`ERR <kind> ...`).
    pub fn kind(&self) -> QueueErrorKind {
        match self {
            OpError::Full => QueueErrorKind::Full,
            OpError::Empty => QueueErrorKind::Empty,
            OpError::NoSuchQueue => QueueErrorKind::NoSuchQueue,
            OpError::NotReserved(_) => QueueErrorKind::NotReserved,
            OpError::PayloadTooLong { .. } => QueueErrorKind::PayloadTooLong,
            OpError::TooManyQueues(_) => QueueErrorKind::TooManyQueues,
            OpError::StoreFull(_) => QueueErrorKind::StoreFull,
            OpError::TooManyWaiters(_) => QueueErrorKind::TooManyWaiters,
            OpError::Unrecoverable | OpError::FileFault | OpError::LogFailed | OpError::LogFull => {
                QueueErrorKind::Internal
            }
        }
    }
}
