//! Where `--fsync always` keeps its durable state (the ledger's and the queue store's redo
//! logs), behind a narrow interface ([`LogStore`]) so that a test can put a simulated disk
//! in its place ([`crate::sim`], feature `sim`): two preallocated
//! log segments written at offsets and flushed, and a checkpoint replaced atomically (temp
//! file, flush, rename, flush of the directory), each step a call of its own.
//!
//! [`FileStore`] is the real one: next to the shared file `NAME`, the segments `NAME.log0` and
//! `NAME.log1` (allocated and zero-filled when created, so a flush writes data, never the
//! file's size or extent state) and the
//! checkpoint `NAME.ckpt` (written as `NAME.ckpt.tmp` first).

use std::ffi::OsString;
use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

/// The durable storage of the redo log and its checkpoint. Methods may be called from any
/// thread of any process that inherited the store.
pub trait LogStore: Send + Sync {
    /// Bytes in each of the two segments.
    fn segment_bytes(&self) -> u64;
    /// Writes `bytes` at `offset` of segment `log` (not yet durable).
    fn write_log(&self, log: u8, offset: u64, bytes: &[u8]) -> io::Result<()>;
    /// Makes every write to segment `log` so far durable (`fdatasync`).
    fn sync_log(&self, log: u8) -> io::Result<()>;
    /// Reads `len` bytes at `offset` of segment `log` (fewer at its end).
    fn read_log(&self, log: u8, offset: u64, len: usize) -> io::Result<Vec<u8>>;
    /// Writes a new checkpoint to the temp file (not yet durable, not yet in use).
    fn write_checkpoint(&self, bytes: &[u8]) -> io::Result<()>;
    /// Makes the temp file's contents durable.
    fn sync_checkpoint(&self) -> io::Result<()>;
    /// Renames the temp file over the checkpoint.
    fn install_checkpoint(&self) -> io::Result<()>;
    /// Makes the rename durable (`fsync` of the directory).
    fn sync_dir(&self) -> io::Result<()>;
    /// The current checkpoint, if there is one.
    fn read_checkpoint(&self) -> io::Result<Option<Vec<u8>>>;
}

/// The log and checkpoint files next to a shared file.
pub struct FileStore {
    segments: [File; 2],
    segment_bytes: u64,
    checkpoint: PathBuf,
    temp: PathBuf,
    dir: PathBuf,
}

/// `path` with `suffix` appended to its file name.
fn sibling(path: &Path, suffix: &str) -> PathBuf {
    let mut name = path.file_name().map(OsString::from).unwrap_or_default();
    name.push(suffix);
    path.with_file_name(name)
}

/// Allocates a new segment by writing zeros over all of it, then flushes it: blocks that
/// `posix_fallocate` only reserves are "unwritten", and the first write to each would change
/// metadata, which every `fdatasync` after it would then have to commit too.
fn fill_with_zeros(file: &File, bytes: u64) -> io::Result<()> {
    nix::fcntl::posix_fallocate(file.as_raw_fd(), 0, bytes as libc::off_t)?;
    let zeros = vec![0u8; 1 << 20];
    let mut at = 0;
    while at < bytes {
        let n = zeros.len().min((bytes - at) as usize);
        file.write_all_at(&zeros[..n], at)?;
        at += n as u64;
    }
    file.sync_all()
}

/// Whether the shared file at `path` has a checkpoint (it ran with `--fsync always`).
pub fn has_checkpoint(path: &Path) -> bool {
    sibling(path, ".ckpt").exists()
}

impl FileStore {
    /// Opens the log store of the shared file at `path`, creating each missing segment with
    /// `segment_bytes` allocated (an existing one keeps its size).
    pub fn open(path: &Path, segment_bytes: u64) -> io::Result<FileStore> {
        let open = |i: u8| -> io::Result<File> {
            let file = OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .open(sibling(path, &format!(".log{i}")))?;
            if file.metadata()?.len() == 0 {
                fill_with_zeros(&file, segment_bytes)?;
            }
            Ok(file)
        };
        let segments = [open(0)?, open(1)?];
        let sizes = [segments[0].metadata()?.len(), segments[1].metadata()?.len()];
        let dir = match path.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("."),
        };
        File::open(&dir)?.sync_all()?;
        Ok(FileStore {
            segments,
            segment_bytes: sizes[0].min(sizes[1]),
            checkpoint: sibling(path, ".ckpt"),
            temp: sibling(path, ".ckpt.tmp"),
            dir,
        })
    }

    /// Removes the store's files (a shared file that goes back to `--fsync never`).
    pub fn remove(path: &Path) -> io::Result<()> {
        for suffix in [".ckpt", ".ckpt.tmp", ".log0", ".log1"] {
            match fs::remove_file(sibling(path, suffix)) {
                Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
                _ => {}
            }
        }
        Ok(())
    }
}

impl LogStore for FileStore {
    fn segment_bytes(&self) -> u64 {
        self.segment_bytes
    }

    fn write_log(&self, log: u8, offset: u64, bytes: &[u8]) -> io::Result<()> {
        self.segments[usize::from(log)].write_all_at(bytes, offset)
    }

    fn sync_log(&self, log: u8) -> io::Result<()> {
        self.segments[usize::from(log)].sync_data()
    }

    fn read_log(&self, log: u8, offset: u64, len: usize) -> io::Result<Vec<u8>> {
        let mut buf = vec![0; len];
        let mut done = 0;
        while done < len {
            let n =
                self.segments[usize::from(log)].read_at(&mut buf[done..], offset + done as u64)?;
            if n == 0 {
                break;
            }
            done += n;
        }
        buf.truncate(done);
        Ok(buf)
    }

    fn write_checkpoint(&self, bytes: &[u8]) -> io::Result<()> {
        fs::write(&self.temp, bytes)
    }

    fn sync_checkpoint(&self) -> io::Result<()> {
        File::open(&self.temp)?.sync_all()
    }

    fn install_checkpoint(&self) -> io::Result<()> {
        fs::rename(&self.temp, &self.checkpoint)
    }

    fn sync_dir(&self) -> io::Result<()> {
        File::open(&self.dir)?.sync_all()
    }

    fn read_checkpoint(&self) -> io::Result<Option<Vec<u8>>> {
        match fs::read(&self.checkpoint) {
            Ok(bytes) => Ok(Some(bytes)),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }
}
