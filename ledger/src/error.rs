//! Error types of the ledger: [`LedgerError`] for opening a ledger file (each variant names the
//! file), [`OpError`] for an operation (one variant per protocol word).

use std::io;
use std::path::PathBuf;

use forkpool_common::bank::ErrorKind;

use crate::validate::Finding;
use crate::{FileFault, LockId};

/// Why a ledger file could not be opened, created or adopted. Every variant names the file.
#[derive(Debug, thiserror::Error)]
pub enum LedgerError {
    /// A system call failed; `action` says which step (e.g. "open", "mmap", "fsync directory").
    #[error("ledger {path}: {action} failed: {source}")]
    Io {
        path: PathBuf,
        action: &'static str,
        #[source]
        source: io::Error,
    },
    /// Creating the file found no space for it (`posix_fallocate` returned ENOSPC/EFBIG).
    /// Nothing was left behind under the final name.
    #[error("ledger {path}: no space to create a {bytes}-byte ledger file: {source}")]
    DiskFull {
        path: PathBuf,
        bytes: u64,
        #[source]
        source: io::Error,
    },
    /// Another open file description holds the exclusive flock (normally: another live server).
    #[error("ledger {path} is locked by another process (is another server running on it?)")]
    Locked { path: PathBuf },
    /// Another live server holds the path's guard: it runs on this path, perhaps on a file
    /// that was deleted or replaced under it since (see `guard.rs`).
    #[error(
        "ledger {path} is locked by another running server, which holds {guard} (a server \
         keeps its ledger path even if the file is deleted or replaced under it)"
    )]
    PathInUse { path: PathBuf, guard: String },
    /// The path cannot name a ledger file (e.g. it ends in '/').
    #[error("ledger {path}: {reason}")]
    BadPath { path: PathBuf, reason: &'static str },
    /// The path is a symbolic link whose target does not exist. A ledger is not created
    /// through a link: create it at the target's path, or point the link at a ledger.
    #[error(
        "ledger {path} is a symbolic link to {target}, which does not exist (a ledger is not \
         created through a link: use the target's path, or point the link at a ledger file)",
        target = target.display()
    )]
    DanglingSymlink { path: PathBuf, target: PathBuf },
    /// The path names something other than a regular file.
    #[error("ledger {path} is {kind}, not a regular file")]
    NotAFile { path: PathBuf, kind: &'static str },
    /// The path kept changing (created, deleted, replaced by someone else) while it was
    /// being opened.
    #[error(
        "ledger {path} kept changing while it was being opened ({attempts} attempts: another \
         process creates, deletes or replaces it); try again"
    )]
    Unstable { path: PathBuf, attempts: u32 },
    /// The file is shorter than its header or than the size its header describes.
    #[error("ledger {path} is truncated: {actual} bytes, expected {expected}")]
    Truncated {
        path: PathBuf,
        actual: u64,
        expected: u64,
    },
    /// The file does not start with the ledger magic: it is not a ledger file (or is garbage).
    #[error("ledger {path} is not a forkpool ledger file (bad magic)")]
    BadMagic { path: PathBuf },
    /// The file was written by another layout version of this crate.
    #[error("ledger {path} has layout version {found}, this build reads version {expected}")]
    WrongVersion {
        path: PathBuf,
        found: u32,
        expected: u32,
    },
    /// The header's fields do not match its checksum, or they describe an impossible layout.
    #[error("ledger {path} is corrupt: {detail}")]
    Corrupt { path: PathBuf, detail: String },
    /// A structure that recovery would read or produce is inconsistent (see `validate.rs`):
    /// nothing was applied, the file is unchanged.
    #[error("ledger {path} is corrupt: {finding}; the file was left unchanged")]
    Damaged {
        path: PathBuf,
        #[source]
        finding: Finding,
    },
    /// The file was made on a platform whose lock words differ in size.
    #[error("ledger {path} was created on an incompatible platform: {detail}")]
    Incompatible { path: PathBuf, detail: String },
    /// The file's capacity differs from the configured `max_accounts`. A ledger is never
    /// resized in place: configure the file's capacity, or move the file away to start afresh.
    #[error(
        "ledger {path} holds at most {file} accounts but max_accounts is {configured}; \
         set max_accounts to {file} or move the file away"
    )]
    CapacityMismatch {
        path: PathBuf,
        file: u64,
        configured: u64,
    },
    /// The options cannot describe a ledger (e.g. `max_accounts` of 0).
    #[error("ledger {path}: invalid options: {detail}")]
    InvalidOptions { path: PathBuf, detail: String },
    /// The checkpoint of `--fsync always` is not whole (its checksum fails): it was
    /// installed only after it was flushed, so the disk damaged it. Nothing was changed.
    #[error(
        "ledger {path}: its checkpoint ({path}.ckpt) is damaged (checksum mismatch); nothing \
         was changed"
    )]
    CheckpointCorrupt { path: PathBuf },
    /// A record in the middle of the operation log is damaged: a later record proves it was
    /// on stable storage, so it is not a torn tail that a power loss explains. Nothing was
    /// changed; cutting the log there would lose acknowledged operations.
    #[error(
        "ledger {path}: the operation log is damaged in the middle (record LSN {lsn}, at offset \
         {offset} of {path}.log{segment}, is not whole, and a later record shows it had been \
         flushed); nothing was changed, and starting would lose acknowledged operations"
    )]
    LogCorrupt {
        path: PathBuf,
        lsn: u64,
        segment: u8,
        offset: u64,
    },
    /// A lock could not be repaired during cold-start recovery.
    #[error("ledger {path}: recovery failed: {source}")]
    Recovery {
        path: PathBuf,
        #[source]
        source: OpError,
    },
}

impl LedgerError {
    /// The error for a path that does not lead to a usable ledger file.
    pub(crate) fn from_path(path: &std::path::Path, error: forkpool_shm::PathError) -> Self {
        use forkpool_shm::PathError;
        let path = path.to_path_buf();
        match error {
            PathError::BadPath(reason) => LedgerError::BadPath { path, reason },
            PathError::DanglingSymlink { target } => LedgerError::DanglingSymlink { path, target },
            PathError::NotAFile { kind } => LedgerError::NotAFile { path, kind },
            PathError::Locked => LedgerError::Locked { path },
            PathError::Unstable { attempts } => LedgerError::Unstable { path, attempts },
            PathError::Io { action, source } => LedgerError::Io {
                path,
                action,
                source,
            },
        }
    }
}

/// Why an operation failed. Every variant except [`OpError::Unrecoverable`] and
/// [`OpError::FileFault`] (both `internal`) maps one-to-one onto a bank protocol word (see
/// [`OpError::kind`]); a failed operation changed nothing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum OpError {
    #[error("no such account")]
    NoSuchAccount,
    #[error("insufficient funds")]
    InsufficientFunds,
    #[error("source and destination are the same account")]
    SameAccount,
    #[error("amount must be between 1 and 9223372036854775807")]
    BadAmount,
    #[error("the resulting balance would exceed 9223372036854775807")]
    Overflow,
    #[error("the ledger is full")]
    LedgerFull,
    /// `--fsync always`: the operation log has no room until a checkpoint frees a segment
    /// (protocol word `unavailable`); nothing changed.
    #[error("the operation log is full until the next checkpoint; nothing changed, try again")]
    LogFull,
    /// A lock reported `ENOTRECOVERABLE`: a repair failed earlier. Only a cold start (which
    /// re-initialises every lock) clears it. Never happens unless the ledger has a bug.
    #[error("ledger lock {0} is not recoverable; restart the server")]
    Unrecoverable(LockId),
    /// The ledger file failed under the running server ([`crate::Health`]): the operation
    /// was refused, or its result discarded. Nothing that was promised changed; only a
    /// restart clears it.
    #[error("{0}; nothing changed, and the server must be restarted")]
    FileFault(FileFault),
}

impl OpError {
    /// The bank protocol's error kind for this error (`ERR <kind> ...`).
    pub fn kind(&self) -> ErrorKind {
        match self {
            OpError::NoSuchAccount => ErrorKind::NoSuchAccount,
            OpError::InsufficientFunds => ErrorKind::InsufficientFunds,
            OpError::SameAccount => ErrorKind::SameAccount,
            OpError::BadAmount => ErrorKind::BadAmount,
            OpError::Overflow => ErrorKind::Overflow,
            OpError::LedgerFull => ErrorKind::LedgerFull,
            OpError::LogFull => ErrorKind::Unavailable,
            OpError::Unrecoverable(_) | OpError::FileFault(_) => ErrorKind::Internal,
        }
    }
}
