//! Opening, creating and locking the ledger file, and validating its header before anything
//! is mapped. A file that fails validation is never written to. The path is hostile input
//! too; [`forkpool_shm::open_locked`] deals with it (dangling links, directories, FIFOs,
//! races), this module with what the ledger's file must hold.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::Path;

use forkpool_shm::{CreateError, FilePath};

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

/// Opens the ledger at `target` read-write, creating a new ledger file if there is none, and
/// takes the exclusive flock ([`forkpool_shm::open_locked`]). Returns the locked file; its
/// header is not yet validated.
pub(crate) fn open_locked(
    target: &FilePath,
    opts: &LedgerOptions,
    new_key: &dyn Fn() -> u64,
) -> Result<File, LedgerError> {
    let path = &target.given;
    forkpool_shm::open_locked(target, &mut || create(target, opts, new_key), &|e| {
        LedgerError::from_path(path, e)
    })
}

/// Takes (or, for a descriptor that already holds it, confirms) the exclusive flock.
pub(crate) fn lock_exclusive(file: &File, path: &Path) -> Result<(), LedgerError> {
    forkpool_shm::lock_exclusive(file).map_err(|e| LedgerError::from_path(path, e))
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
/// a temp file `.NAME.tmp.PID` flocked while it exists, see
/// [`forkpool_shm::remove_stale_temps`]). If
/// something appeared at the path meanwhile, this returns Ok and the caller opens whatever is
/// there (and checks it).
fn create(
    target: &FilePath,
    opts: &LedgerOptions,
    new_key: &dyn Fn() -> u64,
) -> Result<(), LedgerError> {
    let path = &target.given;
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
