//! Opening, creating and locking the ledger file, and validating its header before anything
//! is mapped. A file that fails validation is never written to.

use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use crate::error::LedgerError;
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

/// Opens `path` read-write, creating a new ledger file if there is none, and takes the
/// exclusive non-blocking flock. Returns the locked file; its header is not yet validated.
pub(crate) fn open_locked(path: &Path, opts: &LedgerOptions) -> Result<File, LedgerError> {
    let file = loop {
        match OpenOptions::new().read(true).write(true).open(path) {
            Ok(file) => break file,
            Err(e) if e.kind() == io::ErrorKind::NotFound => create(path, opts)?,
            Err(e) => return Err(io_err(path, "open")(e)),
        }
    };
    lock_exclusive(&file, path)?;
    Ok(file)
}

/// Takes (or, for a descriptor that already holds it, confirms) the exclusive flock.
///
/// Deliberately never unlocked: the lock belongs to the open file description, which forked
/// workers share, so an explicit LOCK_UN in a worker would drop the master's lock. nix's
/// replacement (`Flock`) unlocks on drop, hence the deprecated function.
#[allow(deprecated)]
pub(crate) fn lock_exclusive(file: &File, path: &Path) -> Result<(), LedgerError> {
    use nix::errno::Errno;
    use nix::fcntl::{flock, FlockArg};
    match flock(file.as_raw_fd(), FlockArg::LockExclusiveNonblock) {
        Ok(()) => Ok(()),
        Err(Errno::EWOULDBLOCK) => Err(LedgerError::Locked {
            path: path.to_path_buf(),
        }),
        Err(e) => Err(io_err(path, "flock")(e.into())),
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

/// Creates a new, fully allocated ledger file at `path`: temp file in the same directory,
/// `posix_fallocate`, header, fsync, link into place (never replacing a file someone else
/// created meanwhile), fsync the directory. Returns Ok also when another process won the race.
fn create(path: &Path, opts: &LedgerOptions) -> Result<(), LedgerError> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    fs::create_dir_all(&dir).map_err(io_err(&dir, "create directory"))?;
    let name = path
        .file_name()
        .ok_or_else(|| LedgerError::InvalidOptions {
            path: path.to_path_buf(),
            detail: "the ledger path has no file name".into(),
        })?;
    let mut tmp_name = std::ffi::OsString::from(".");
    tmp_name.push(name);
    tmp_name.push(format!(".tmp.{}", std::process::id()));
    let tmp = dir.join(tmp_name);
    // A stale temp file of a dead process that had our pid: ours to replace.
    let _ = fs::remove_file(&tmp);
    let result = write_new(&tmp, path, opts);
    let _ = fs::remove_file(&tmp);
    result?;
    File::open(&dir)
        .and_then(|d| d.sync_all())
        .map_err(io_err(&dir, "fsync directory"))
}

fn write_new(tmp: &Path, path: &Path, opts: &LedgerOptions) -> Result<(), LedgerError> {
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(tmp)
        .map_err(io_err(tmp, "create"))?;
    let geometry = Geometry::new(
        opts.max_accounts,
        opts.stripes,
        opts.intent_records,
        random_key(),
    );
    let size = geometry.file_size;
    let len = libc::off_t::try_from(size).map_err(|_| LedgerError::InvalidOptions {
        path: path.to_path_buf(),
        detail: format!("file size {size} does not fit off_t"),
    })?;
    // Real blocks, not a sparse file: a store into a hole on a full disk would SIGBUS.
    match nix::fcntl::posix_fallocate(file.as_raw_fd(), 0, len) {
        Ok(()) => {}
        Err(e @ (nix::errno::Errno::ENOSPC | nix::errno::Errno::EFBIG)) => {
            return Err(LedgerError::DiskFull {
                path: path.to_path_buf(),
                bytes: size,
                source: e.into(),
            })
        }
        Err(e) => return Err(io_err(tmp, "posix_fallocate")(e.into())),
    }
    file.write_all_at(&geometry.encode(), 0)
        .map_err(io_err(tmp, "write header"))?;
    file.sync_all().map_err(io_err(tmp, "fsync"))?;
    match fs::hard_link(tmp, path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok(()),
        Err(e) => Err(io_err(path, "link into place")(e)),
    }
}

/// A per-file random hash key (from the kernel's CSPRNG via /dev/urandom; time and pid if
/// that fails, since the key only spreads accounts and is not a secret that must hold).
fn random_key() -> u64 {
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
