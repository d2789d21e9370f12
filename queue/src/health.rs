//! Whether the store file can still be trusted while the server runs, shared by every
//! process that uses the store (as the ledger's `health.rs`, with one state: failed or not).
//!
//! The file is outside the server's control: an operator (or a damaged disk) can truncate,
//! overwrite, delete or replace it under the live mapping. Two detectors feed one shared
//! word:
//!
//! * a SIGBUS inside the mapping (`forkpool_shm`'s handler maps a zero page over the missing
//!   one), noticed right after the operation that hit it, whose result is discarded;
//! * [`Store::check_file`], the supervisor's periodic inspection
//!   ([`forkpool_shm::FileWatch`]: size, whether the path still names the mapped inode,
//!   writes by other processes).
//!
//! The word lives in an anonymous shared page made by the process that opened the store, so
//! its forked workers see a failure found by anyone with one relaxed load per operation (the
//! store file's own pages are the thing being lost, so they cannot hold it). Once failed,
//! every store operation answers [`OpError::FileFault`] (the protocol's `ERR internal`)
//! without touching the mapping, until a restart, which validates the file again. The first
//! process to record the failure logs it: one error line naming the file.

use std::sync::atomic::Ordering::Relaxed;

use forkpool_shm::FileChange;

use crate::{OpError, Store};

impl Store {
    /// Whether the store file failed under the running server (one relaxed load).
    pub fn failed(&self) -> bool {
        self.failed.get().load(Relaxed) != 0
    }

    /// The supervisor's periodic inspection of the file (three system calls): is it still
    /// the store's size, does the path still name the mapped file, did another process write
    /// to it? Also takes note of faults this process met in the mapping. A failure is
    /// recorded for every process and logged once. Returns whether the store has failed.
    pub fn check_file(&self) -> bool {
        self.note_access_faults();
        if self.failed() {
            return true;
        }
        let size = self.region.geometry().file_size;
        let Some(change) = self.watch.inspect(&self.file, size) else {
            return false;
        };
        let what = match change {
            FileChange::Resized { now } => format!(
                "the file is now {now} bytes, the store is {size} bytes: it was truncated or \
                 extended under the running server"
            ),
            FileChange::Deleted => format!(
                "the file was deleted under the running server (its jobs live on only in this \
                 server: copy /proc/{}/fd/{} to {} before restarting, or the restart begins an \
                 empty store)",
                std::process::id(),
                std::os::fd::AsRawFd::as_raw_fd(&self.file),
                self.watch.absolute_path().display()
            ),
            FileChange::Replaced { now } => format!(
                "the path now names another file ({now}; the server uses {})",
                self.watch.identity()
            ),
            FileChange::Written => "another process wrote to the file or changed its size \
                                    (write, truncate, a copy over it)"
                .to_string(),
        };
        self.fail(&what);
        true
    }

    /// Records the failure for every process; the process that records it first logs it.
    fn fail(&self, what: &str) {
        let first = self
            .failed
            .get()
            .compare_exchange(0, 1, Relaxed, Relaxed)
            .is_ok();
        if first {
            log::error!(
                "queue store {}: {what}; every queue request answers ERR internal until the \
                 server is restarted, which validates what the file then holds",
                self.path.display()
            );
        }
    }

    /// Records a SIGBUS that this process met in the mapping, if any.
    fn note_access_faults(&self) {
        if self.region.faulted() {
            self.fail(
                "an access to the mapping found no page there (SIGBUS): the file was truncated \
                 under the running server, or the disk failed",
            );
        }
    }

    /// Refuses an operation once the store has failed, before it touches the mapping.
    pub(crate) fn usable(&self) -> Result<(), OpError> {
        if self.failed() {
            return Err(OpError::FileFault);
        }
        Ok(())
    }

    /// Fails an operation whose reads may have met a faulted page (its result is discarded:
    /// it may have read zeros instead of the file), or whose writes the log could not take
    /// (they were rolled back).
    pub(crate) fn checked<T>(&self, result: Result<T, OpError>) -> Result<T, OpError> {
        if self.region.faulted() {
            self.note_access_faults();
            return Err(OpError::FileFault);
        }
        if self.region.log_failed() {
            return Err(OpError::LogFailed);
        }
        result
    }
}
