//! Creating a shared file so that no process ever sees it half made, and the exclusive flock
//! that marks a file (or a temp file) as in use. Shared by the ledger and the queue store.
//!
//! A new file is built under a temp name `.NAME.tmp.PID` in the final directory, flocked
//! while it exists (so a cleaner can tell a dead creator's temp file from a live one's),
//! fully allocated (`posix_fallocate`: a store into a hole on a full disk would SIGBUS),
//! given its header, fsynced, then linked into place (`link` never replaces a file) and its
//! directory fsynced. What the file's header says, and what its owner does with an existing
//! file, are the caller's business.

use std::ffi::OsString;
use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

/// Why a file could not be created.
#[derive(Debug)]
pub enum CreateError {
    /// `posix_fallocate` found no space (ENOSPC/EFBIG); nothing is left under the final name.
    DiskFull(io::Error),
    /// The size does not fit the platform's file offsets.
    TooLarge,
    /// A step failed: `action` names it, `path` the file it was done on.
    Io {
        path: PathBuf,
        action: &'static str,
        source: io::Error,
    },
}

/// `.NAME.tmp.` : the start of every temp file name of the file `name`.
pub fn temp_prefix(name: &std::ffi::OsStr) -> OsString {
    let mut prefix = OsString::from(".");
    prefix.push(name);
    prefix.push(".tmp.");
    prefix
}

/// Creates the file `dir/name` of `size` bytes, starting with `header` (the rest zeros), as
/// the module doc describes. If something appeared at the path meanwhile, returns Ok and
/// leaves it there: the caller opens whatever is at the path and judges it.
pub fn create_allocated(
    dir: &Path,
    name: &std::ffi::OsStr,
    size: u64,
    header: &[u8],
) -> Result<(), CreateError> {
    let io_err = |path: &Path, action| {
        let path = path.to_path_buf();
        move |source| CreateError::Io {
            path,
            action,
            source,
        }
    };
    let mut tmp_name = temp_prefix(name);
    tmp_name.push(std::process::id().to_string());
    let path = dir.join(name);
    let tmp = TempFile::create(dir.join(tmp_name), &path)?;
    let len = libc::off_t::try_from(size).map_err(|_| CreateError::TooLarge)?;
    match nix::fcntl::posix_fallocate(tmp.file.as_raw_fd(), 0, len) {
        Ok(()) => {}
        Err(e @ (nix::errno::Errno::ENOSPC | nix::errno::Errno::EFBIG)) => {
            return Err(CreateError::DiskFull(e.into()))
        }
        Err(e) => return Err(io_err(&tmp.path, "posix_fallocate")(e.into())),
    }
    tmp.file
        .write_all_at(header, 0)
        .map_err(io_err(&tmp.path, "write header"))?;
    tmp.file.sync_all().map_err(io_err(&tmp.path, "fsync"))?;
    match fs::hard_link(&tmp.path, &path) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(io_err(&path, "link into place")(e)),
    }
    drop(tmp);
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_err(dir, "fsync directory"))
}

/// Tries the exclusive flock without waiting: true if taken, false if someone holds it.
///
/// Deliberately never unlocked: the lock belongs to the open file description, which forked
/// workers share, so an explicit LOCK_UN in a worker would drop the master's lock. nix's
/// replacement (`Flock`) unlocks on drop, hence the deprecated function.
#[allow(deprecated)]
pub fn try_lock(file: &File) -> io::Result<bool> {
    use nix::errno::Errno;
    use nix::fcntl::{flock, FlockArg};
    match flock(file.as_raw_fd(), FlockArg::LockExclusiveNonblock) {
        Ok(()) => Ok(true),
        Err(Errno::EWOULDBLOCK) => Ok(false),
        Err(e) => Err(e.into()),
    }
}

/// A temp file being made into a shared file: created exclusively, flocked for its whole
/// life, removed on drop (whether it was linked into place or not).
struct TempFile {
    path: PathBuf,
    file: File,
}

impl TempFile {
    /// Creates the temp file `path` for the file `target` (named in errors).
    fn create(path: PathBuf, target: &Path) -> Result<TempFile, CreateError> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&path);
        let file = match file {
            Ok(file) => file,
            Err(source) => {
                return Err(CreateError::Io {
                    path: target.to_path_buf(),
                    action: "create a temp file in its directory",
                    source,
                })
            }
        };
        let tmp = TempFile { path, file };
        match try_lock(&tmp.file) {
            Ok(true) => Ok(tmp),
            Ok(false) => Err(CreateError::Io {
                path: tmp.path.clone(),
                action: "flock",
                source: io::ErrorKind::WouldBlock.into(),
            }),
            Err(source) => Err(CreateError::Io {
                path: tmp.path.clone(),
                action: "flock",
                source,
            }),
        }
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        if let Err(e) = fs::remove_file(&self.path) {
            log::warn!("cannot remove {}: {e}", self.path.display());
        }
    }
}
