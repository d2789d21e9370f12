//! Ledger options: capacity, durability policy, and the sizes of the lock and intent-record
//! pools used when a new file is created.

pub use forkpool_common::fsync::{FsyncPolicy, ParseFsyncPolicyError};

/// Default `max_accounts` (the bank issue's default).
pub const DEFAULT_MAX_ACCOUNTS: u64 = 65_536;
/// Largest accepted `max_accounts` (the file would be about 3 GiB).
pub const MAX_MAX_ACCOUNTS: u64 = 1 << 24;
/// Default number of lock stripes for a new file.
pub const DEFAULT_STRIPES: u32 = 64;
/// Default number of intent records for a new file: how many operations may be in flight at
/// once across all processes (more simply wait for a free record).
pub const DEFAULT_INTENT_RECORDS: u32 = 256;

/// How to open or create a ledger.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LedgerOptions {
    /// Most accounts the ledger holds; DEPOSIT/TRANSFER to a new account beyond it fail with
    /// `ledger-full`. Must match an existing file's capacity (see `LedgerError::CapacityMismatch`).
    pub max_accounts: u64,
    /// Durability of each completed operation.
    pub fsync: FsyncPolicy,
    /// Lock stripes of a new file (a power of two, 1..=1024). An existing file keeps its own.
    pub stripes: u32,
    /// Intent records of a new file (1..=65536). An existing file keeps its own.
    pub intent_records: u32,
    /// `--fsync always`: bytes of each of the two operation log segments when they are
    /// created (existing ones keep their size).
    pub log_segment_bytes: u64,
}

/// Default size of each operation log segment (a checkpoint starts at half of one).
pub const DEFAULT_LOG_SEGMENT_BYTES: u64 = 16 << 20;

impl Default for LedgerOptions {
    fn default() -> Self {
        LedgerOptions {
            max_accounts: DEFAULT_MAX_ACCOUNTS,
            fsync: FsyncPolicy::Never,
            stripes: DEFAULT_STRIPES,
            intent_records: DEFAULT_INTENT_RECORDS,
            log_segment_bytes: DEFAULT_LOG_SEGMENT_BYTES,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fsync_policy_parses_and_prints() {
        assert_eq!("never".parse(), Ok(FsyncPolicy::Never));
        assert_eq!("Always".parse(), Ok(FsyncPolicy::Always));
        assert!("sometimes".parse::<FsyncPolicy>().is_err());
        assert_eq!(FsyncPolicy::Always.to_string(), "always");
        assert_eq!(FsyncPolicy::default().to_string(), "never");
    }
}
