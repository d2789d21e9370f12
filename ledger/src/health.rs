//! Whether the ledger file can still be trusted while the server runs, shared by every
//! process that uses the ledger.
//!
//! The file is outside the server's control: an operator (or a damaged disk) can truncate,
//! overwrite, delete or replace it under the live mapping. These detectors feed one shared
//! state:
//!
//! * a SIGBUS inside the mapping (`forkpool_shm`'s handler), noticed right after the operation that hit it;
//! * [`Ledger::check_file`], the supervisor's periodic inspection: `fstat` of the mapped
//!   descriptor (its size), `stat` of the path (does it still name the mapped inode?), and an
//!   inotify watch for `IN_MODIFY` on the inode, set up by the first inspection: the ledger's processes only store through
//!   the mapping, which raises no inotify event, so an event means another process called
//!   `write`, `truncate` or the like on the file (e.g. `cp backup ledger.bin` over it, which
//!   keeps the inode and perhaps the size);
//! * the same identity check before the flock is trusted at start (`file.rs`).
//!
//! The state lives in an anonymous shared page made by the process that opened the ledger, so
//! its forked workers see a fault found by anyone with one relaxed load per operation (the
//! ledger file's own pages are the thing being lost, so they cannot hold it). Once failed,
//! the state never returns to healthy: only a restart, which re-validates the file, does.
//! The first process to record a fault logs it (one error line naming the file).

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::sync::atomic::Ordering::Relaxed;

use nix::sys::inotify::{AddWatchFlags, InitFlags, Inotify};

use crate::{Ledger, OpError};
use forkpool_shm::SharedWord;

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

/// The (device, inode) pair that identifies a file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct FileId {
    dev: u64,
    ino: u64,
}

impl FileId {
    pub(crate) fn of(metadata: &std::fs::Metadata) -> FileId {
        FileId {
            dev: metadata.dev(),
            ino: metadata.ino(),
        }
    }
}

impl std::fmt::Display for FileId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "device {:#x} inode {}", self.dev, self.ino)
    }
}

/// Notices `write`, `truncate` and the like on the mapped file by any process (inotify
/// `IN_MODIFY` on its inode).
pub(crate) struct WriteWatch {
    inotify: Inotify,
}

impl WriteWatch {
    /// Watches the inode open on `file`; `None` (logged) if inotify is unavailable, and the
    /// other checks go on without it.
    pub(crate) fn new(file: &File, path: &Path) -> Option<WriteWatch> {
        let watch = || {
            let inotify = Inotify::init(InitFlags::IN_NONBLOCK | InitFlags::IN_CLOEXEC)?;
            // Through the descriptor: the very inode mapped, whatever the path names now.
            let by_fd = format!("/proc/self/fd/{}", file.as_raw_fd());
            inotify.add_watch(by_fd.as_str(), AddWatchFlags::IN_MODIFY)?;
            Ok::<_, nix::Error>(WriteWatch { inotify })
        };
        watch()
            .map_err(|e| {
                log::warn!(
                    "ledger {}: cannot watch the file for writes by other processes: {e}",
                    path.display()
                )
            })
            .ok()
    }

    /// Whether a write was seen since the last call (consumes the events).
    fn written(&self) -> bool {
        let mut seen = false;
        while let Ok(events) = self.inotify.read_events() {
            seen |= !events.is_empty();
        }
        seen
    }
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

    /// The supervisor's periodic inspection of the file (three system calls): is it still
    /// the size of the ledger, does the path still name the mapped file, and did another
    /// process write to it (an inotify watch, set up by the first call: closing an inotify
    /// instance costs a kernel grace period, which only the supervisor's one ledger should
    /// pay)? Also takes note of faults this process met in the mapping. A new fault is
    /// recorded for every process and logged once, as an error naming the file. Returns the
    /// health after the check.
    pub fn check_file(&self) -> Health {
        self.note_access_faults();
        if let Health::Failed(fault) = self.health() {
            return Health::Failed(fault);
        }
        match self.file.metadata() {
            Ok(metadata) if metadata.len() != self.region.geometry().file_size => {
                self.fail(
                    FileFault::Resized,
                    &format!(
                        "the file is now {} bytes, the ledger is {} bytes: it was truncated or \
                         extended under the running server, and will be refused at the next \
                         start; every bank request answers ERR internal until then",
                        metadata.len(),
                        self.region.geometry().file_size
                    ),
                );
            }
            Ok(_) => self.check_identity(),
            Err(e) => log::debug!("ledger {}: fstat failed: {e}", self.path.display()),
        }
        let writes = self
            .writes
            .get_or_init(|| WriteWatch::new(&self.file, &self.path));
        if writes.as_ref().is_some_and(WriteWatch::written) {
            self.fail(
                FileFault::Written,
                "another process wrote to the file or changed its size (write, truncate, a copy \
                 over it): its contents can no longer be trusted; every bank request answers \
                 ERR internal until the server is restarted, which validates what the file \
                 then holds",
            );
        }
        self.health()
    }

    /// Does the path still name the mapped file?
    fn check_identity(&self) {
        match std::fs::metadata(&self.absolute_path) {
            Ok(metadata) if FileId::of(&metadata) == self.identity => {}
            Ok(metadata) => self.fail(
                FileFault::Replaced,
                &format!(
                    "the path now names another file ({}; the server uses {}): writes are \
                     refused until the server is restarted, which will use the file now at the \
                     path",
                    FileId::of(&metadata),
                    self.identity
                ),
            ),
            Err(e)
                if e.kind() == io::ErrorKind::NotFound
                    || e.raw_os_error() == Some(libc::ENOTDIR) =>
            {
                self.fail(
                    FileFault::Deleted,
                    &format!(
                        "the file was deleted under the running server: writes are refused \
                         until the server is restarted (reads still answer). Its data lives on \
                         only in this server: copy /proc/{}/fd/{} to {} before restarting, or \
                         the restart begins an empty ledger",
                        std::process::id(),
                        std::os::fd::AsRawFd::as_raw_fd(&self.file),
                        self.absolute_path.display()
                    ),
                );
            }
            // Another error (e.g. a directory made unreadable) says nothing about the file.
            Err(e) => log::debug!("ledger {}: stat failed: {e}", self.path.display()),
        }
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
