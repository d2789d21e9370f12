//! Noticing what happens to a mapped shared file from outside the server (an operator, a
//! backup script, a damaged disk): [`FileWatch::inspect`] is a supervisor's periodic check,
//! three system calls: `fstat` of the mapped descriptor (its size), `stat` of the path (does
//! it still name the mapped inode?), and an inotify watch for `IN_MODIFY` on the inode, set
//! up by the first inspection. The server's processes only store through the mapping, which
//! raises no inotify event, so an event means another process called `write`, `truncate` or
//! the like on the file (e.g. `cp backup FILE` over it, which keeps the inode and perhaps the
//! size). What a change means (and how it is reported) is the owner's business.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use nix::sys::inotify::{AddWatchFlags, InitFlags, Inotify};

use crate::FileId;

/// A change to the mapped file, found by [`FileWatch::inspect`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FileChange {
    /// `fstat` shows the file at another size (`now` bytes) than the mapping's.
    Resized { now: u64 },
    /// The path no longer exists: the file lives on only in the running server.
    Deleted,
    /// The path now names another file (`now`) than the one mapped.
    Replaced { now: FileId },
    /// Another process wrote to the file or changed its size through a system call.
    Written,
}

/// What a supervisor needs to inspect one mapped file.
#[derive(Debug)]
pub struct FileWatch {
    /// The path made absolute, to check that it still names the mapped file.
    absolute_path: PathBuf,
    /// The mapped file's (device, inode).
    identity: FileId,
    /// Notices other processes writing to the file; made by the first inspection (closing an
    /// inotify instance costs a kernel grace period, which only the supervisor should pay).
    writes: OnceLock<Option<WriteWatch>>,
    /// The file's kind and path, for the log ("ledger data/ledger.bin").
    name: String,
}

impl FileWatch {
    /// Watches `file`, open at `path`; `what` names its kind in the log ("ledger").
    pub fn new(file: &File, path: &Path, what: &str) -> io::Result<FileWatch> {
        Ok(FileWatch {
            absolute_path: std::path::absolute(path)?,
            identity: FileId::of(&file.metadata()?),
            writes: OnceLock::new(),
            name: format!("{what} {}", path.display()),
        })
    }

    /// The mapped file's identity.
    pub fn identity(&self) -> FileId {
        self.identity
    }

    /// The path, made absolute when the file was opened.
    pub fn absolute_path(&self) -> &Path {
        &self.absolute_path
    }

    /// One inspection of `file` (the mapped one, `size` bytes long): the first change found,
    /// if any. Write events are consumed whatever else is found.
    pub fn inspect(&self, file: &File, size: u64) -> Option<FileChange> {
        let found = match file.metadata() {
            Ok(metadata) if metadata.len() != size => Some(FileChange::Resized {
                now: metadata.len(),
            }),
            Ok(_) => self.check_identity(),
            Err(e) => {
                log::debug!("{}: fstat failed: {e}", self.name);
                None
            }
        };
        let writes = self
            .writes
            .get_or_init(|| WriteWatch::new(file, &self.name));
        let written = writes.as_ref().is_some_and(WriteWatch::written);
        found.or(written.then_some(FileChange::Written))
    }

    /// Does the path still name the mapped file?
    fn check_identity(&self) -> Option<FileChange> {
        match std::fs::metadata(&self.absolute_path) {
            Ok(metadata) if FileId::of(&metadata) == self.identity => None,
            Ok(metadata) => Some(FileChange::Replaced {
                now: FileId::of(&metadata),
            }),
            Err(e)
                if e.kind() == io::ErrorKind::NotFound
                    || e.raw_os_error() == Some(libc::ENOTDIR) =>
            {
                Some(FileChange::Deleted)
            }
            // Another error (e.g. a directory made unreadable) says nothing about the file.
            Err(e) => {
                log::debug!("{}: stat failed: {e}", self.name);
                None
            }
        }
    }
}

/// Notices `write`, `truncate` and the like on the mapped file by any process (inotify
/// `IN_MODIFY` on its inode).
#[derive(Debug)]
struct WriteWatch {
    inotify: Inotify,
}

impl WriteWatch {
    /// Watches the inode open on `file`; `None` (logged) if inotify is unavailable, and the
    /// other checks go on without it.
    fn new(file: &File, name: &str) -> Option<WriteWatch> {
        let watch = || {
            let inotify = Inotify::init(InitFlags::IN_NONBLOCK | InitFlags::IN_CLOEXEC)?;
            // Through the descriptor: the very inode mapped, whatever the path names now.
            let by_fd = format!("/proc/self/fd/{}", file.as_raw_fd());
            inotify.add_watch(by_fd.as_str(), AddWatchFlags::IN_MODIFY)?;
            Ok::<_, nix::Error>(WriteWatch { inotify })
        };
        watch()
            .map_err(|e| {
                log::warn!("{name}: cannot watch the file for writes by other processes: {e}")
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
