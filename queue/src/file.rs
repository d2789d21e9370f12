//! Opening (or creating) the store file, taking its flock and checking its header before
//! anything is mapped. A file that fails a check is never written to. Creation is
//! [`forkpool_shm::create_allocated`]'s (temp file, `posix_fallocate`, link into place).

use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use forkpool_shm::CreateError;

use crate::error::StoreError;
use crate::layout::{Geometry, HeaderProblem, FIXED_BYTES, HEADER_BYTES, LAYOUT_VERSION};

/// How many times [`open_locked`] opens (or creates) the file before it gives up because the
/// path keeps changing under it.
const OPEN_ATTEMPTS: u32 = 4;

fn io_err<'a>(path: &'a Path, action: &'static str) -> impl FnOnce(io::Error) -> StoreError + 'a {
    move |source| StoreError::Io {
        path: path.to_path_buf(),
        action,
        source,
    }
}

/// Opens the store file read-write, creating it (laid out as `new`) if there is none, and
/// takes its exclusive non-blocking flock. The header is not yet checked.
pub(crate) fn open_locked(path: &Path, new: &Geometry) -> Result<File, StoreError> {
    let bad = |reason| StoreError::BadPath {
        path: path.to_path_buf(),
        reason,
    };
    if path.as_os_str().as_bytes().ends_with(b"/") {
        return Err(bad("the path ends in '/'; give the path of a file"));
    }
    let name = path
        .file_name()
        .ok_or_else(|| bad("the path has no file name"))?;
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    fs::create_dir_all(&dir).map_err(io_err(path, "create its directory"))?;
    for _ in 0..OPEN_ATTEMPTS {
        let opened = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY)
            .open(path);
        let file = match opened {
            Ok(file) => file,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                create(path, &dir, name, new)?;
                continue;
            }
            Err(e) if e.raw_os_error() == Some(libc::EISDIR) => {
                return Err(StoreError::NotAFile {
                    path: path.to_path_buf(),
                })
            }
            Err(e) => return Err(io_err(path, "open")(e)),
        };
        if !file.metadata().map_err(io_err(path, "stat"))?.is_file() {
            return Err(StoreError::NotAFile {
                path: path.to_path_buf(),
            });
        }
        return match forkpool_shm::try_lock(&file) {
            Ok(true) => Ok(file),
            Ok(false) => Err(StoreError::Locked {
                path: path.to_path_buf(),
            }),
            Err(e) => Err(io_err(path, "flock")(e)),
        };
    }
    Err(StoreError::Unstable {
        path: path.to_path_buf(),
    })
}

fn create(
    path: &Path,
    dir: &Path,
    name: &std::ffi::OsStr,
    geometry: &Geometry,
) -> Result<(), StoreError> {
    let size = geometry.file_size;
    forkpool_shm::create_allocated(dir, name, size, &geometry.encode()).map_err(|e| match e {
        CreateError::DiskFull(source) => StoreError::DiskFull {
            path: path.to_path_buf(),
            bytes: size,
            source,
        },
        CreateError::TooLarge => StoreError::InvalidOptions {
            path: path.to_path_buf(),
            detail: format!("file size {size} does not fit off_t"),
        },
        CreateError::Io {
            path,
            action,
            source,
        } => StoreError::Io {
            path,
            action,
            source,
        },
    })
}

/// Reads and checks the header of an open store file against its size and the configured
/// limits (`expected`). Reads with `pread`: nothing is mapped before this succeeds.
pub(crate) fn validate(
    file: &File,
    path: &Path,
    expected: &Geometry,
) -> Result<Geometry, StoreError> {
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
        HeaderProblem::Short => StoreError::Truncated {
            path: p(),
            actual,
            expected: HEADER_BYTES,
        },
        HeaderProblem::BadMagic => StoreError::BadMagic { path: p() },
        HeaderProblem::WrongVersion(found) => StoreError::WrongVersion {
            path: p(),
            found,
            expected: LAYOUT_VERSION,
        },
        HeaderProblem::Incompatible(detail) => StoreError::Incompatible { path: p(), detail },
        HeaderProblem::Corrupt(detail) => StoreError::Corrupt { path: p(), detail },
    })?;
    if actual < geometry.file_size {
        return Err(StoreError::Truncated {
            path: p(),
            actual,
            expected: geometry.file_size,
        });
    }
    if actual > geometry.file_size {
        return Err(StoreError::Corrupt {
            path: p(),
            detail: format!(
                "{actual} bytes, but the header describes {} bytes",
                geometry.file_size
            ),
        });
    }
    let settings = [
        ("max_queues", geometry.max_queues, expected.max_queues),
        ("max_jobs", geometry.max_jobs, expected.max_jobs),
        ("max_payload", geometry.max_payload, expected.max_payload),
        ("max_waiters", geometry.max_waiters, expected.max_waiters),
    ];
    for (setting, file, configured) in settings {
        if file != configured {
            return Err(StoreError::LimitsMismatch {
                path: p(),
                setting,
                file: file.into(),
                configured: configured.into(),
            });
        }
    }
    Ok(geometry)
}
