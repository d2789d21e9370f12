//! Opening a shared file (the ledger, the queue store) by a path that is hostile input too:
//! it may be a dangling symbolic link, end in '/', name a directory, a FIFO or a device, be
//! replaced between two system calls, or hold the temp file of a creator that died. Each
//! case either ends in a usable, flocked file or in one [`PathError`] that names its cause;
//! no step loops without bound. What the file holds is the caller's business.

use std::ffi::{OsStr, OsString};
use std::fmt;
use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

/// Why a path does not lead to a usable file (the caller names the path).
#[derive(Debug)]
pub enum PathError {
    /// The path cannot name a file (it ends in '/', or has no file name).
    BadPath(&'static str),
    /// The path is a symbolic link whose target does not exist: a shared file is never
    /// created through a link.
    DanglingSymlink { target: PathBuf },
    /// The path names something other than a regular file ("a directory", "a FIFO", ...).
    NotAFile { kind: &'static str },
    /// Another open file description holds the exclusive flock (another live server).
    Locked,
    /// The path kept changing while it was being opened.
    Unstable { attempts: u32 },
    /// A system call failed; `action` says which step.
    Io {
        action: &'static str,
        source: io::Error,
    },
}

fn io_err(action: &'static str) -> impl FnOnce(io::Error) -> PathError {
    move |source| PathError::Io { action, source }
}

/// How many times [`open_locked`] opens (or creates) the file before it gives up because the
/// path keeps changing under it.
pub const OPEN_ATTEMPTS: u32 = 4;

/// A shared file's path as given, and what it resolves to.
#[derive(Debug)]
pub struct FilePath {
    /// As configured (for messages and the identity check).
    pub given: PathBuf,
    /// The directory that holds the file (and its temp files).
    pub dir: PathBuf,
    /// The file name in `dir`.
    pub name: OsString,
    /// Every symbolic link resolved: one name per file, for the path guard.
    pub canonical: PathBuf,
}

impl FilePath {
    /// Checks the path's form, creates its directory if missing and resolves it. A symbolic
    /// link to an existing file is followed on purpose (a deployment may point the path
    /// elsewhere); a dangling one is refused.
    pub fn resolve(path: &Path) -> Result<FilePath, PathError> {
        if path.as_os_str().as_bytes().ends_with(b"/") {
            return Err(PathError::BadPath(
                "the path ends in '/', so it can only name a directory; give the path of a file",
            ));
        }
        let name = path
            .file_name()
            .ok_or(PathError::BadPath("the path has no file name"))?
            .to_os_string();
        let dir = match path.parent() {
            Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
            _ => PathBuf::from("."),
        };
        fs::create_dir_all(&dir).map_err(io_err("create its directory"))?;
        let canonical = match fs::canonicalize(path) {
            Ok(canonical) => canonical,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                refuse_dangling_link(path)?;
                fs::canonicalize(&dir)
                    .map_err(io_err("resolve its directory"))?
                    .join(&name)
            }
            Err(e) => return Err(io_err("resolve path")(e)),
        };
        Ok(FilePath {
            given: path.to_path_buf(),
            dir,
            name,
            canonical,
        })
    }
}

/// A missing path that is a symbolic link: its target does not exist.
fn refuse_dangling_link(path: &Path) -> Result<(), PathError> {
    match fs::symlink_metadata(path) {
        Ok(metadata) if metadata.file_type().is_symlink() => Err(PathError::DanglingSymlink {
            target: fs::read_link(path).unwrap_or_default(),
        }),
        _ => Ok(()),
    }
}

/// Opens the file read-write, calling `create` if there is none (it makes the file at the
/// path, or returns Ok if someone else did meanwhile), and takes the exclusive non-blocking
/// flock; then checks that the path still names the locked file (it may have been replaced
/// between the open and the lock). Every race ends in a retry, at most [`OPEN_ATTEMPTS`]
/// times. Returns the locked file (what it holds is not yet checked), or `create`'s error,
/// or a [`PathError`] made the caller's by `wrap`.
pub fn open_locked<E>(
    target: &FilePath,
    create: &mut dyn FnMut() -> Result<(), E>,
    wrap: &dyn Fn(PathError) -> E,
) -> Result<File, E> {
    let path = &target.given;
    for _ in 0..OPEN_ATTEMPTS {
        let file = match open_existing(path) {
            Ok(file) => file,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                refuse_dangling_link(path).map_err(wrap)?;
                create()?;
                continue;
            }
            Err(e) => return Err(wrap(open_error(path, e))),
        };
        let metadata = file.metadata().map_err(io_err("stat")).map_err(wrap)?;
        if !metadata.file_type().is_file() {
            return Err(wrap(PathError::NotAFile {
                kind: describe(metadata.file_type()),
            }));
        }
        lock_exclusive(&file).map_err(wrap)?;
        match fs::metadata(path) {
            Ok(now) if FileId::of(&now) == FileId::of(&metadata) => return Ok(file),
            // Replaced or deleted since we opened it: the lock guards nothing; again.
            _ => continue,
        }
    }
    Err(wrap(PathError::Unstable {
        attempts: OPEN_ATTEMPTS,
    }))
}

/// Opens an existing file read-write. Symbolic links are followed (see `FilePath`);
/// `O_NONBLOCK` keeps a FIFO or a device from blocking the open before its type is checked.
fn open_existing(path: &Path) -> io::Result<File> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY)
        .open(path)
}

/// The error for a failed open, naming what the path is when it is not a file.
fn open_error(path: &Path, e: io::Error) -> PathError {
    match fs::metadata(path) {
        Ok(metadata) if !metadata.file_type().is_file() => PathError::NotAFile {
            kind: describe(metadata.file_type()),
        },
        _ => io_err("open")(e),
    }
}

/// "a directory", "a FIFO", ...: what a path that is not a regular file is.
fn describe(file_type: fs::FileType) -> &'static str {
    use std::os::unix::fs::FileTypeExt;
    if file_type.is_dir() {
        "a directory"
    } else if file_type.is_fifo() {
        "a FIFO"
    } else if file_type.is_socket() {
        "a socket"
    } else if file_type.is_char_device() {
        "a character device"
    } else if file_type.is_block_device() {
        "a block device"
    } else {
        "not a regular file"
    }
}

/// Takes (or, for a descriptor that already holds it, confirms) the exclusive flock.
///
/// Deliberately never unlocked (see [`crate::try_lock`]).
pub fn lock_exclusive(file: &File) -> Result<(), PathError> {
    match crate::try_lock(file) {
        Ok(true) => Ok(()),
        Ok(false) => Err(PathError::Locked),
        Err(e) => Err(io_err("flock")(e)),
    }
}

/// Removes the temp files that creators of the file `target` left when they died
/// mid-creation (`.NAME.tmp.PID`, possibly hundreds of MB). A creator holds an exclusive
/// flock on its temp file from creating it to removing it (`create.rs`), so a temp file
/// nobody has locked belongs to a dead creator, whatever process now has the pid in its name
/// (pids are reused). Call it with the path guard held, so that no other creator of this
/// file is running. `what` names the file's kind in the log ("ledger", "queue store").
pub fn remove_stale_temps(target: &FilePath, what: &str) {
    let prefix = crate::temp_prefix(&target.name);
    let given = target.given.display();
    let entries = match fs::read_dir(&target.dir) {
        Ok(entries) => entries,
        Err(e) => {
            log::warn!(
                "{what} {given}: cannot list {} for stale temp files: {e}",
                target.dir.display()
            );
            return;
        }
    };
    for entry in entries.flatten() {
        let Some(pid) = temp_pid(&entry.file_name(), &prefix) else {
            continue;
        };
        let path = entry.path();
        match remove_if_abandoned(&path) {
            Ok(Some(bytes)) => log::info!(
                "{what} {given}: removed {} ({bytes} bytes), left by an interrupted creation \
                 (pid {pid}, {})",
                path.display(),
                if crate::pid_alive(pid) {
                    "now another process"
                } else {
                    "no longer running"
                }
            ),
            Ok(None) => log::warn!(
                "{what} {given}: left {} in place: a live process (pid {pid}) holds its lock",
                path.display()
            ),
            Err(e) => log::warn!(
                "{what} {given}: cannot remove the stale temp file {}: {e}",
                path.display()
            ),
        }
    }
}

/// The creator's pid in the temp file name `name` (`PREFIX` then the pid), if it is one.
fn temp_pid(name: &OsStr, prefix: &OsStr) -> Option<i32> {
    name.as_bytes()
        .strip_prefix(prefix.as_bytes())
        .and_then(|pid| std::str::from_utf8(pid).ok())
        .and_then(|pid| pid.parse::<u32>().ok())
        .and_then(|pid| i32::try_from(pid).ok())
}

/// Removes `path` if it is a regular file nobody holds a flock on; returns its size then.
fn remove_if_abandoned(path: &Path) -> io::Result<Option<u64>> {
    let file = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(path)?;
    let metadata = file.metadata()?;
    if !metadata.file_type().is_file() || !crate::try_lock(&file)? {
        return Ok(None);
    }
    // Still the file we locked (not a new one of a live creator that reused the name)?
    if fs::symlink_metadata(path).map(|now| FileId::of(&now)).ok() != Some(FileId::of(&metadata)) {
        return Ok(None);
    }
    fs::remove_file(path)?;
    Ok(Some(metadata.len()))
}

/// The (device, inode) pair that identifies a file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FileId {
    dev: u64,
    ino: u64,
}

impl FileId {
    pub fn of(metadata: &fs::Metadata) -> FileId {
        FileId {
            dev: metadata.dev(),
            ino: metadata.ino(),
        }
    }
}

impl fmt::Display for FileId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "device {:#x} inode {}", self.dev, self.ino)
    }
}
