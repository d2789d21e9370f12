//! Opening (or creating) the store file, taking its flock and checking its header before
//! anything is mapped. A file that fails a check is never written to. The path is hostile
//! input too: [`forkpool_shm::open_locked`] deals with it (dangling links, directories,
//! FIFOs, devices, races) as it does for the ledger; creation is
//! [`forkpool_shm::create_allocated`]'s (temp file, `posix_fallocate`, link into place).

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::Path;

use forkpool_shm::{CreateError, FilePath};

use crate::error::StoreError;
use crate::layout::{Geometry, HeaderProblem, FIXED_BYTES, HEADER_BYTES, LAYOUT_VERSION};

fn io_err<'a>(path: &'a Path, action: &'static str) -> impl FnOnce(io::Error) -> StoreError + 'a {
    move |source| StoreError::Io {
        path: path.to_path_buf(),
        action,
        source,
    }
}

/// Opens the store file at `target` read-write, creating it (laid out as `new`) if there is
/// none, and takes its exclusive non-blocking flock. The header is not yet checked.
pub(crate) fn open_locked(target: &FilePath, new: &Geometry) -> Result<File, StoreError> {
    let path = &target.given;
    forkpool_shm::open_locked(target, &mut || create(target, new), &|e| {
        StoreError::from_path(path, e)
    })
}

fn create(target: &FilePath, geometry: &Geometry) -> Result<(), StoreError> {
    let (path, size) = (&target.given, geometry.file_size);
    forkpool_shm::create_allocated(&target.dir, &target.name, size, &geometry.encode()).map_err(
        |e| match e {
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
        },
    )
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
