//! The durability policy of the shared files (the bank's ledger and the queue store): the
//! `fsync` setting.

use std::fmt;
use std::str::FromStr;

/// When a completed operation is forced to stable storage.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum FsyncPolicy {
    /// Never `msync`: every completed operation is in the page cache, so it survives the death
    /// of any or all processes, but a power loss or kernel crash may lose recent operations
    /// and, since page writeback has no order, may leave a torn state (see docs/LEDGER.md and
    /// docs/QUEUE.md).
    #[default]
    Never,
    /// Log every change to a redo log and flush it by group commit (the ledger's and the
    /// queue store's `durable.rs`): an operation whose reply waited for the log's flush
    /// survives a power loss, and the cold start rebuilds the shared file from the last
    /// checkpoint and the log.
    Always,
}

/// A config string that is neither "never" nor "always".
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("fsync policy must be \"never\" or \"always\", not {0:?}")]
pub struct ParseFsyncPolicyError(pub String);

impl FromStr for FsyncPolicy {
    type Err = ParseFsyncPolicyError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.eq_ignore_ascii_case("never") {
            Ok(FsyncPolicy::Never)
        } else if s.eq_ignore_ascii_case("always") {
            Ok(FsyncPolicy::Always)
        } else {
            Err(ParseFsyncPolicyError(s.to_owned()))
        }
    }
}

impl fmt::Display for FsyncPolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            FsyncPolicy::Never => "never",
            FsyncPolicy::Always => "always",
        })
    }
}
