//! Error types of the ledger: [`LedgerError`] for opening a ledger file (each variant names the
//! file), [`OpError`] for an operation (one variant per protocol word).

use std::io;
use std::path::PathBuf;

use forkpool_common::bank::ErrorKind;

use crate::LockId;

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
    /// A lock could not be repaired during cold-start recovery.
    #[error("ledger {path}: recovery failed: {source}")]
    Recovery {
        path: PathBuf,
        #[source]
        source: OpError,
    },
}

/// Why an operation failed. Every variant except [`OpError::Unrecoverable`] maps one-to-one
/// onto a bank protocol word (see [`OpError::kind`]); a failed operation changed nothing.
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
    /// A lock reported `ENOTRECOVERABLE`: a repair failed earlier. Only a cold start (which
    /// re-initialises every lock) clears it. Never happens unless the ledger has a bug.
    #[error("ledger lock {0} is not recoverable; restart the server")]
    Unrecoverable(LockId),
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
            OpError::Unrecoverable(_) => ErrorKind::Internal,
        }
    }
}
