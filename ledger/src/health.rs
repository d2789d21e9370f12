//! Whether the ledger file can still be trusted while the server runs, shared by every
//! process that uses the ledger.
//!
//! The file is outside the server's control: an operator (or a damaged disk) can truncate,
//! overwrite, delete or replace it under the live mapping. These detectors feed one shared
//! state:
//!
//! * a SIGBUS inside the mapping (`forkpool_shm`'s handler), noticed right after the operation that hit it;
//! * [`Ledger::check_file`], the supervisor's periodic inspection ([`forkpool_shm::FileWatch`]:
//!   the file's size, whether the path still names the mapped inode, and writes by other
//!   processes, e.g. `cp backup ledger.bin` over it, which keeps the inode and perhaps the
//!   size);
//! * the same identity check before the flock is trusted at start (`file.rs`).
//!
//! The state lives in an anonymous shared page made by the process that opened the ledger, so
//! its forked workers see a fault found by anyone with one relaxed load per operation (the
//! ledger file's own pages are the thing being lost, so they cannot hold it). Once failed,
//! the state never returns to healthy: only a restart, which re-validates the file, does.
//! The first process to record a fault logs it (one error line naming the file).

use std::io;
use std::sync::atomic::Ordering::Relaxed;

use crate::{Ledger, OpError};
use forkpool_shm::{FileChange, SharedWord};

/// What the processes sharing a ledger know about its file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Health {
    Healthy,
    /// A fault was found; it stays until the server restarts.
    Failed(FileFault),
}

/// The shared word's value while the file is healthy (faults are 1..).
const HEALTHY: u32 = 0;

/// How the ledger file failed under the running server.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[repr(u32)]
pub enum FileFault {
    /// An access to the mapping found no page there (SIGBUS): the file was truncated, or a
    /// page could not be read from the disk. Part of what the mapping shows may be zeros.
    #[error("the ledger file was truncated or could not be read")]
    Unreadable = 1,
    /// `fstat` shows the file at another size than the ledger's.
    #[error("the ledger file changed size")]
    Resized,
    /// The path no longer exists: the file lives on only in the running server.
    #[error("the ledger file was deleted")]
    Deleted,
    /// The path now names another file than the one mapped.
    #[error("the ledger path now names another file")]
    Replaced,
    /// Another process wrote to the file or changed its size through a system call.
    #[error("the ledger file was written to by another process")]
    Written,
    /// `--fsync always`: the operation log could not be written or flushed, so nothing done
    /// since can be promised (and the mapping may show changes the log does not hold).
    #[error("the operation log could not be written or flushed")]
    LogFailed,
}

impl FileFault {
    /// Whether reads are refused too. After a deletion or replacement the mapping is intact
    /// (the kernel keeps the inode while it is mapped), so BALANCE and AUDIT still tell the
    /// truth about it; after a size change part of it may be gone.
    pub fn refuses_reads(self) -> bool {
        matches!(
            self,
            FileFault::Unreadable | FileFault::Resized | FileFault::Written | FileFault::LogFailed
        )
    }

    /// The fault whose code (`fault as u32`) is in the shared word. Only `record` writes
    /// it, so an unknown code cannot occur; it would read as the most cautious fault.
    fn from_code(code: u32) -> FileFault {
        [
            FileFault::Resized,
            FileFault::Deleted,
            FileFault::Replaced,
            FileFault::Written,
            FileFault::LogFailed,
        ]
        .into_iter()
        .find(|&fault| fault as u32 == code)
        .unwrap_or(FileFault::Unreadable)
    }
}

/// What an operation does with the file: reads may go on where writes may not.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Access {
    Read,
    Write,
}

/// The health state in its shared word: 0 while healthy, else the first fault's code.
pub(crate) struct SharedHealth {
    word: SharedWord,
}

impl SharedHealth {
    pub(crate) fn new() -> io::Result<SharedHealth> {
        Ok(SharedHealth {
            word: SharedWord::new()?,
        })
    }

    fn get(&self) -> Health {
        match self.word.get().load(Relaxed) {
            HEALTHY => Health::Healthy,
            code => Health::Failed(FileFault::from_code(code)),
        }
    }

    /// Records `fault` unless a fault is recorded already; true if this call recorded it.
    fn record(&self, fault: FileFault) -> bool {
        self.word
            .get()
            .compare_exchange(HEALTHY, fault as u32, Relaxed, Relaxed)
            .is_ok()
    }
}

impl Ledger {
    /// What every process using this ledger knows about its file (one relaxed load).
    pub fn health(&self) -> Health {
        self.health.get()
    }

    /// The supervisor's periodic inspection of the file (three system calls,
    /// [`forkpool_shm::FileWatch::inspect`]): is it still the size of the ledger, does the
    /// path still name the mapped file, and did another process write to it? Also takes note of faults this process met in the mapping. A new fault is
    /// recorded for every process and logged once, as an error naming the file. Returns the
    /// health after the check.
    pub fn check_file(&self) -> Health {
        self.note_access_faults();
        if let Health::Failed(fault) = self.health() {
            return Health::Failed(fault);
        }
        let size = self.region.geometry().file_size;
        match self.watch.inspect(&self.file, size) {
            None => {}
            Some(FileChange::Resized { now }) => self.fail(
                FileFault::Resized,
                &format!(
                    "the file is now {now} bytes, the ledger is {size} bytes: it was truncated \
                     or extended under the running server, and will be refused at the next \
                     start; every bank request answers ERR internal until then"
                ),
            ),
            Some(FileChange::Replaced { now }) => self.fail(
                FileFault::Replaced,
                &format!(
                    "the path now names another file ({now}; the server uses {}): writes are \
                     refused until the server is restarted, which will use the file now at the \
                     path",
                    self.watch.identity()
                ),
            ),
            Some(FileChange::Deleted) => self.fail(
                FileFault::Deleted,
                &format!(
                    "the file was deleted under the running server: writes are refused until \
                     the server is restarted (reads still answer). Its data lives on only in \
                     this server: copy /proc/{}/fd/{} to {} before restarting, or the restart \
                     begins an empty ledger",
                    std::process::id(),
                    std::os::fd::AsRawFd::as_raw_fd(&self.file),
                    self.watch.absolute_path().display()
                ),
            ),
            Some(FileChange::Written) => self.fail(
                FileFault::Written,
                "another process wrote to the file or changed its size (write, truncate, a copy \
                 over it): its contents can no longer be trusted; every bank request answers \
                 ERR internal until the server is restarted, which validates what the file \
                 then holds",
            ),
        }
        self.health()
    }

    /// Records a fault for every process; the process that records it first logs it.
    pub(crate) fn fail(&self, fault: FileFault, detail: &str) {
        if self.health.record(fault) {
            log::error!("ledger {}: {detail}", self.path.display());
        }
    }

    /// Records a SIGBUS that this process met in the mapping, if any.
    fn note_access_faults(&self) {
        if self.region.faulted() {
            self.fail(
                FileFault::Unreadable,
                "an access to the mapping found no page there (SIGBUS): the file was truncated \
                 under the running server, or the disk failed; every bank request answers ERR \
                 internal until the server is restarted",
            );
        }
    }

    /// Runs one operation against the mapping, if the file's health allows this access (one
    /// relaxed load). If the operation met a fault in the mapping, its result is discarded:
    /// it may have read zeros instead of the file, so nothing it would answer can be promised.
    pub(crate) fn guarded<T>(
        &self,
        access: Access,
        operation: impl FnOnce() -> Result<T, OpError>,
    ) -> Result<T, OpError> {
        if let Health::Failed(fault) = self.health() {
            if access == Access::Write || fault.refuses_reads() {
                return Err(OpError::FileFault(fault));
            }
        }
        let result = operation();
        if self.region.faulted() {
            self.note_access_faults();
            return Err(OpError::FileFault(FileFault::Unreadable));
        }
        result
    }

    /// Reads the mapping for monitoring, unless the file's health refuses reads; `None` then,
    /// or if the read met a fault.
    pub(crate) fn monitored<T>(&self, read: impl FnOnce() -> T) -> Option<T> {
        self.guarded(Access::Read, || Ok(read())).ok()
    }
}
