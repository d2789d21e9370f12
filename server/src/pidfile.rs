//! The pid file: written atomically once the master is ready, `flock`ed for the master's whole
//! life (so "locked" means "a live forkpool master", whatever pid the file names: a bare pid
//! can be reused by another process), and removed at exit.

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

use nix::unistd::Pid;

/// Why the pid file refuses the start.
#[derive(Debug, thiserror::Error)]
pub enum PidFileError {
    #[error("pid file {path} is locked: another forkpool master (pid {pid}) is running")]
    Running { path: PathBuf, pid: String },
    #[error("cannot use pid file {path}: {source}")]
    Io { path: PathBuf, source: io::Error },
}

/// A claimed pid file: its lock is held while this value (or a copy of its descriptor in
/// this process) lives.
#[derive(Debug)]
pub struct PidFile {
    path: PathBuf,
    file: File,
}

impl PidFile {
    /// Locks `path` (creating it empty if missing). A file locked by a live master refuses
    /// the start; a stale one (unlocked) is taken over.
    pub fn claim(path: &Path) -> Result<PidFile, PidFileError> {
        let io_error = |source| PidFileError::Io {
            path: path.to_path_buf(),
            source,
        };
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)
            .map_err(io_error)?;
        if !try_lock(&file).map_err(io_error)? {
            let pid = std::fs::read_to_string(path).unwrap_or_default();
            return Err(PidFileError::Running {
                path: path.to_path_buf(),
                pid: pid.trim().to_string(),
            });
        }
        Ok(PidFile {
            path: path.to_path_buf(),
            file,
        })
    }

    /// Writes `pid` in place: the file must stay the locked inode, so it is not replaced by
    /// a rename; the line is written first and the file cut after it, so a reader never sees
    /// an empty file.
    pub fn write(&mut self, pid: Pid) -> Result<(), PidFileError> {
        let line = format!("{pid}\n");
        let result = (|| {
            use std::os::unix::fs::FileExt;
            self.file.write_all_at(line.as_bytes(), 0)?;
            self.file.set_len(line.len() as u64)?;
            self.file.flush()
        })();
        result.map_err(|source| PidFileError::Io {
            path: self.path.clone(),
            source,
        })
    }

    /// During a binary upgrade: moves the file aside to `PATH.oldbin` (as nginx does), so
    /// the new master can claim `PATH`; the lock moves with the file.
    pub fn move_aside(&mut self) -> Result<(), PidFileError> {
        let oldbin = oldbin_path(&self.path);
        std::fs::rename(&self.path, &oldbin).map_err(|source| PidFileError::Io {
            path: self.path.clone(),
            source,
        })?;
        self.path = oldbin;
        Ok(())
    }

    /// A failed upgrade: moves `PATH.oldbin` back to `PATH`.
    pub fn move_back(&mut self) -> Result<(), PidFileError> {
        let Some(original) = self.path.to_str().and_then(|p| p.strip_suffix(".oldbin")) else {
            return Ok(());
        };
        let original = PathBuf::from(original);
        std::fs::rename(&self.path, &original).map_err(|source| PidFileError::Io {
            path: self.path.clone(),
            source,
        })?;
        self.path = original;
        Ok(())
    }

    /// Removes the file at exit (the lock goes with the descriptor).
    pub fn remove(self) {
        if let Err(e) = std::fs::remove_file(&self.path) {
            log::warn!("cannot remove pid file {}: {e}", self.path.display());
        }
    }

    /// In a forked worker: close the descriptor without touching the file (the lock stays
    /// with the master's descriptor).
    pub fn forget(self) {
        drop(self.file);
    }
}

fn oldbin_path(path: &Path) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(".oldbin");
    PathBuf::from(name)
}

/// Takes an exclusive non-blocking flock; `Ok(false)` if another process holds it.
#[allow(deprecated)] // nix's replacement (Flock) unlocks on drop; we keep the lock for life.
fn try_lock(file: &File) -> io::Result<bool> {
    use nix::errno::Errno;
    use nix::fcntl::{flock, FlockArg};
    match flock(file.as_raw_fd(), FlockArg::LockExclusiveNonblock) {
        Ok(()) => Ok(true),
        Err(Errno::EWOULDBLOCK) => Ok(false),
        Err(e) => Err(e.into()),
    }
}
