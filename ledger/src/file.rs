//! Opening, creating and locking the ledger file, and validating its header before anything
//! is mapped. A file that fails validation is never written to.
//!
//! The path is hostile input too: it may be a dangling symbolic link, end in '/', name a
//! directory or a FIFO, be replaced between two system calls, or hold the temp file of a
//! creator that died. Each case either ends in a usable file or in one error that names its
//! cause; no step loops without bound.

use std::ffi::OsString;
use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use forkpool_shm::CreateError;

use crate::error::LedgerError;
use crate::health::FileId;
use crate::layout::{Geometry, HeaderProblem, FIXED_BYTES};
use crate::options::{LedgerOptions, MAX_MAX_ACCOUNTS};
use crate::{MAX_INTENTS, MAX_STRIPES};

fn io_err<'a>(path: &'a Path, action: &'static str) -> impl FnOnce(io::Error) -> LedgerError + 'a {
    move |source| LedgerError::Io {
        path: path.to_path_buf(),
        action,
        source,
    }
}

/// Checks the options that shape a new file.
pub(crate) fn check_options(path: &Path, opts: &LedgerOptions) -> Result<(), LedgerError> {
    let bad = |detail: String| {
        Err(LedgerError::InvalidOptions {
            path: path.to_path_buf(),
            detail,
        })
    };
    if opts.max_accounts == 0 || opts.max_accounts > MAX_MAX_ACCOUNTS {
        return bad(format!(
            "max_accounts must be 1..={MAX_MAX_ACCOUNTS}, not {}",
            opts.max_accounts
        ));
    }
    if !opts.stripes.is_power_of_two() || opts.stripes > MAX_STRIPES {
        return bad(format!(
            "stripes must be a power of two up to {MAX_STRIPES}, not {}",
            opts.stripes
        ));
    }
    if opts.intent_records == 0 || opts.intent_records > MAX_INTENTS {
        return bad(format!(
            "intent_records must be 1..={MAX_INTENTS}, not {}",
            opts.intent_records
        ));
    }
    Ok(())
}

/// How many times [`open_locked`] opens (or creates) the file before it gives up because the
/// path keeps changing under it.
const OPEN_ATTEMPTS: u32 = 4;

/// The ledger path as given, and what it resolves to.
#[derive(Debug)]
pub(crate) struct LedgerPath<'a> {
    /// As configured (for messages and the identity check).
    pub(crate) given: &'a Path,
    /// The directory that holds the file (and its temp files).
    dir: PathBuf,
    /// The file name in `dir`.
    name: OsString,
    /// Every symbolic link resolved: one name per file, for the path guard.
    pub(crate) canonical: PathBuf,
}

impl<'a> LedgerPath<'a> {
    /// Checks the path's form, creates its directory if missing and resolves it. A symbolic
    /// link to an existing file is followed on purpose (a deployment may point the path
    /// elsewhere); a dangling one is refused: the ledger is never created through a link.
    pub(crate) fn resolve(path: &'a Path) -> Result<LedgerPath<'a>, LedgerError> {
        let bad = |reason| LedgerError::BadPath {
            path: path.to_path_buf(),
            reason,
        };
        if path.as_os_str().as_bytes().ends_with(b"/") {
            return Err(bad(
                "the path ends in '/', so it can only name a directory; \
                            give the path of a file",
            ));
        }
        let name = path
            .file_name()
            .ok_or_else(|| bad("the path has no file name"))?
            .to_os_string();
        let dir = match path.parent() {
            Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
            _ => PathBuf::from("."),
        };
        fs::create_dir_all(&dir).map_err(io_err(path, "create its directory"))?;
        let canonical = match fs::canonicalize(path) {
            Ok(canonical) => canonical,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                refuse_dangling_link(path)?;
                fs::canonicalize(&dir)
                    .map_err(io_err(path, "resolve its directory"))?
                    .join(&name)
            }
            Err(e) => return Err(io_err(path, "resolve path")(e)),
        };
        Ok(LedgerPath {
            given: path,
            dir,
            name,
            canonical,
        })
    }

    /// `.NAME.tmp.` : the start of every temp file name of this ledger.
    fn temp_prefix(&self) -> OsString {
        forkpool_shm::temp_prefix(&self.name)
    }
}

/// A missing path that is a symbolic link: its target does not exist.
fn refuse_dangling_link(path: &Path) -> Result<(), LedgerError> {
    match fs::symlink_metadata(path) {
        Ok(metadata) if metadata.file_type().is_symlink() => Err(LedgerError::DanglingSymlink {
            path: path.to_path_buf(),
            target: fs::read_link(path).unwrap_or_default(),
        }),
        _ => Ok(()),
    }
}

/// Opens the ledger read-write, creating a new ledger file if there is none, and takes the
/// exclusive non-blocking flock; then checks that the path still names the locked file (it
/// may have been replaced between the open and the lock). Every race (another creator, a
/// file deleted or replaced meanwhile) ends in a retry, at most [`OPEN_ATTEMPTS`] times.
/// Returns the locked file; its header is not yet validated.
pub(crate) fn open_locked(
    target: &LedgerPath<'_>,
    opts: &LedgerOptions,
    new_key: &dyn Fn() -> u64,
) -> Result<File, LedgerError> {
    let path = target.given;
    for _ in 0..OPEN_ATTEMPTS {
        let file = match open_existing(path) {
            Ok(file) => file,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                refuse_dangling_link(path)?;
                create(target, opts, new_key)?;
                continue;
            }
            Err(e) => return Err(open_error(path, e)),
        };
        let metadata = file.metadata().map_err(io_err(path, "stat"))?;
        if !metadata.file_type().is_file() {
            return Err(LedgerError::NotAFile {
                path: path.to_path_buf(),
                kind: describe(metadata.file_type()),
            });
        }
        lock_exclusive(&file, path)?;
        match fs::metadata(path) {
            Ok(now) if FileId::of(&now) == FileId::of(&metadata) => return Ok(file),
            // Replaced or deleted since we opened it: the lock guards nothing; again.
            _ => continue,
        }
    }
    Err(LedgerError::Unstable {
        path: path.to_path_buf(),
        attempts: OPEN_ATTEMPTS,
    })
}

/// Opens an existing file read-write. Symbolic links are followed (see `LedgerPath`);
/// `O_NONBLOCK` keeps a FIFO or a device from blocking the open before its type is checked.
fn open_existing(path: &Path) -> io::Result<File> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY)
        .open(path)
}

/// The error for a failed open, naming what the path is when it is not a file.
fn open_error(path: &Path, e: io::Error) -> LedgerError {
    match fs::metadata(path) {
        Ok(metadata) if !metadata.file_type().is_file() => LedgerError::NotAFile {
            path: path.to_path_buf(),
            kind: describe(metadata.file_type()),
        },
        _ => io_err(path, "open")(e),
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

/// Removes the temp files that creators of this ledger left when they died mid-creation
/// (`.NAME.tmp.PID`, possibly hundreds of MB). A creator holds an exclusive flock on its
/// temp file from creating it to removing it, so a temp file nobody has locked belongs to a
/// dead creator, whatever process now has the pid in its name (pids are reused). Called with
/// the path guard held, so no other creator of this ledger is running.
pub(crate) fn remove_stale_temps(target: &LedgerPath<'_>) {
    let prefix = target.temp_prefix();
    let entries = match fs::read_dir(&target.dir) {
        Ok(entries) => entries,
        Err(e) => {
            log::warn!(
                "ledger {}: cannot list {} for stale temp files: {e}",
                target.given.display(),
                target.dir.display()
            );
            return;
        }
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(pid) = name
            .as_bytes()
            .strip_prefix(prefix.as_bytes())
            .and_then(|pid| std::str::from_utf8(pid).ok())
            .and_then(|pid| pid.parse::<u32>().ok())
            .and_then(|pid| i32::try_from(pid).ok())
        else {
            continue;
        };
        let path = entry.path();
        match remove_if_abandoned(&path) {
            Ok(Some(bytes)) => log::info!(
                "ledger {}: removed {} ({bytes} bytes), left by an interrupted creation \
                 (pid {pid}, {})",
                target.given.display(),
                path.display(),
                if forkpool_shm::pid_alive(pid) {
                    "now another process"
                } else {
                    "no longer running"
                }
            ),
            Ok(None) => log::warn!(
                "ledger {}: left {} in place: a live process (pid {pid}) holds its lock",
                target.given.display(),
                path.display()
            ),
            Err(e) => log::warn!(
                "ledger {}: cannot remove the stale temp file {}: {e}",
                target.given.display(),
                path.display()
            ),
        }
    }
}

/// Removes `path` if it is a regular file nobody holds a flock on; returns its size then.
fn remove_if_abandoned(path: &Path) -> io::Result<Option<u64>> {
    let file = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(path)?;
    let metadata = file.metadata()?;
    if !metadata.file_type().is_file() || !forkpool_shm::try_lock(&file)? {
        return Ok(None);
    }
    // Still the file we locked (not a new one of a live creator that reused the name)?
    if fs::symlink_metadata(path).map(|now| FileId::of(&now)).ok() != Some(FileId::of(&metadata)) {
        return Ok(None);
    }
    fs::remove_file(path)?;
    Ok(Some(metadata.len()))
}

/// Takes (or, for a descriptor that already holds it, confirms) the exclusive flock.
///
/// Deliberately never unlocked (see [`forkpool_shm::try_lock`]).
pub(crate) fn lock_exclusive(file: &File, path: &Path) -> Result<(), LedgerError> {
    match forkpool_shm::try_lock(file) {
        Ok(true) => Ok(()),
        Ok(false) => Err(LedgerError::Locked {
            path: path.to_path_buf(),
        }),
        Err(e) => Err(io_err(path, "flock")(e)),
    }
}

/// Reads and checks the header of an open ledger file against its size (and, if given, the
/// configured capacity). Reads with `pread`: nothing is mapped before this succeeds.
pub(crate) fn validate(
    file: &File,
    path: &Path,
    max_accounts: Option<u64>,
) -> Result<Geometry, LedgerError> {
    let p = || path.to_path_buf();
    let actual = file.metadata().map_err(io_err(path, "stat"))?.len();
    let mut bytes = [0u8; FIXED_BYTES];
    let mut got = 0;
    while got < FIXED_BYTES {
        match file.read_at(&mut bytes[got..], got as u64) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(io_err(path, "read header")(e)),
        }
    }
    let geometry = Geometry::decode(&bytes[..got]).map_err(|problem| match problem {
        HeaderProblem::Short => LedgerError::Truncated {
            path: p(),
            actual,
            expected: crate::layout::HEADER_BYTES,
        },
        HeaderProblem::BadMagic => LedgerError::BadMagic { path: p() },
        HeaderProblem::WrongVersion(found) => LedgerError::WrongVersion {
            path: p(),
            found,
            expected: crate::layout::LAYOUT_VERSION,
        },
        HeaderProblem::Incompatible(detail) => LedgerError::Incompatible { path: p(), detail },
        HeaderProblem::Corrupt(detail) => LedgerError::Corrupt { path: p(), detail },
    })?;
    if actual < geometry.file_size {
        return Err(LedgerError::Truncated {
            path: p(),
            actual,
            expected: geometry.file_size,
        });
    }
    if actual > geometry.file_size {
        return Err(LedgerError::Corrupt {
            path: p(),
            detail: format!(
                "{actual} bytes, but the header describes {} bytes",
                geometry.file_size
            ),
        });
    }
    if let Some(configured) = max_accounts {
        if configured != geometry.capacity {
            return Err(LedgerError::CapacityMismatch {
                path: p(),
                file: geometry.capacity,
                configured,
            });
        }
    }
    Ok(geometry)
}

/// Creates a new, fully allocated ledger file at the path ([`forkpool_shm::create_allocated`]:
/// a temp file `.NAME.tmp.PID` flocked while it exists, see [`remove_stale_temps`]). If
/// something appeared at the path meanwhile, this returns Ok and the caller opens whatever is
/// there (and checks it).
fn create(
    target: &LedgerPath<'_>,
    opts: &LedgerOptions,
    new_key: &dyn Fn() -> u64,
) -> Result<(), LedgerError> {
    let path = target.given;
    let geometry = Geometry::new(
        opts.max_accounts,
        opts.stripes,
        opts.intent_records,
        new_key(),
    );
    let size = geometry.file_size;
    forkpool_shm::create_allocated(&target.dir, &target.name, size, &geometry.encode()).map_err(
        |e| match e {
            CreateError::DiskFull(source) => LedgerError::DiskFull {
                path: path.to_path_buf(),
                bytes: size,
                source,
            },
            CreateError::TooLarge => LedgerError::InvalidOptions {
                path: path.to_path_buf(),
                detail: format!("file size {size} does not fit off_t"),
            },
            CreateError::Io {
                path,
                action,
                source,
            } => LedgerError::Io {
                path,
                action,
                source,
            },
        },
    )
}

/// A per-file random hash key (from the kernel's CSPRNG via /dev/urandom; time and pid if
/// that fails, since the key only spreads accounts and is not a secret that must hold).
pub(crate) fn random_key() -> u64 {
    let mut b = [0u8; 8];
    let from_urandom = File::open("/dev/urandom").and_then(|f| f.read_exact_at(&mut b, 0));
    if from_urandom.is_ok() {
        return u64::from_ne_bytes(b);
    }
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    nanos ^ (u64::from(std::process::id()) << 32)
}
