//! A simulated disk for power-loss tests of the logs built on [`LogStore`] (feature `sim`,
//! for tests only): it keeps what was flushed and, at a power loss, an arbitrary part of what
//! was written since (each unflushed write dropped, kept, or torn at 512-byte sectors; an
//! unflushed rename done or not). [`Rng`] is the deterministic generator the tests drive it
//! with, so a failing seed replays exactly.

use std::io;
use std::sync::{Arc, Mutex, MutexGuard};

use crate::LogStore;

/// A deterministic generator (splitmix64): a seed replays exactly.
#[derive(Clone)]
pub struct Rng(u64);

impl Rng {
    /// The generator of case `case` of a run seeded `seed` (each case replays alone).
    pub fn for_case(seed: u64, case: u64) -> Rng {
        let mut rng = Rng(seed ^ case.wrapping_mul(0x9e37_79b9_7f4a_7c15));
        rng.next_u64();
        rng
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n.max(1)
    }

    pub fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len() as u64) as usize]
    }

    pub fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }
}

const SECTOR: usize = 512;

/// One file of the simulated disk: its contents as the system sees them, what is on the
/// platters, and the writes in between.
#[derive(Clone, Default)]
pub struct SimFile {
    current: Vec<u8>,
    durable: Vec<u8>,
    pending: Vec<(usize, Vec<u8>)>,
}

impl SimFile {
    fn write(&mut self, offset: usize, bytes: &[u8]) {
        if self.current.len() < offset + bytes.len() {
            self.current.resize(offset + bytes.len(), 0);
        }
        self.current[offset..offset + bytes.len()].copy_from_slice(bytes);
        self.pending.push((offset, bytes.to_vec()));
    }

    fn sync(&mut self) {
        self.durable = self.current.clone();
        self.pending.clear();
    }

    /// What survives a power loss: the durable bytes, then each pending write (in order)
    /// dropped, kept, or kept sector by sector at random.
    fn after_power_loss(&self, rng: &mut Rng) -> SimFile {
        let mut image = self.durable.clone();
        for (offset, bytes) in &self.pending {
            let torn = match rng.below(3) {
                0 => continue,
                1 => false,
                _ => true,
            };
            if image.len() < offset + bytes.len() {
                image.resize(offset + bytes.len(), 0);
            }
            let mut at = *offset;
            while at < offset + bytes.len() {
                let sector_end = ((at / SECTOR) + 1) * SECTOR;
                let end = sector_end.min(offset + bytes.len());
                if !torn || rng.chance(50) {
                    image[at..end].copy_from_slice(&bytes[at - offset..end - offset]);
                }
                at = end;
            }
        }
        SimFile {
            current: image.clone(),
            durable: image,
            pending: Vec::new(),
        }
    }
}

/// The names of the checkpoint directory: which file each name points at.
#[derive(Clone, Default, PartialEq)]
struct Dir {
    checkpoint: Option<usize>,
    temp: Option<usize>,
}

/// The simulated disk under one log.
#[derive(Clone)]
pub struct SimDisk {
    segments: [SimFile; 2],
    segment_bytes: u64,
    /// Checkpoint files by inode number; `dir` names them, `durable_dir` as flushed.
    files: Vec<SimFile>,
    dir: Dir,
    durable_dir: Dir,
    /// Storage calls so far, the call at which the power fails, and whether it has.
    calls: u64,
    fail_at: u64,
    pub dead: bool,
    /// Whether a checkpoint write fails now and then (a full disk), the power staying on.
    flaky: Option<Rng>,
}

impl SimDisk {
    pub fn new(segment_bytes: u64, fail_at: u64, flaky: Option<Rng>) -> SimDisk {
        let zeros = vec![0; segment_bytes as usize];
        let segment = SimFile {
            current: zeros.clone(),
            durable: zeros,
            pending: Vec::new(),
        };
        SimDisk {
            segments: [segment.clone(), segment],
            segment_bytes,
            files: Vec::new(),
            dir: Dir::default(),
            durable_dir: Dir::default(),
            calls: 0,
            fail_at,
            dead: false,
            flaky,
        }
    }

    /// Counts a storage call; the one at `fail_at` and every later one fail (the power is out).
    fn call(&mut self) -> io::Result<()> {
        self.calls += 1;
        if self.calls >= self.fail_at {
            self.dead = true;
        }
        if self.dead {
            return Err(io::Error::other("simulated power loss"));
        }
        Ok(())
    }

    /// The same disk, whose power fails at its `fail_at`th storage call from now.
    pub fn failing_at(&self, fail_at: u64) -> SimDisk {
        SimDisk {
            calls: 0,
            fail_at,
            ..self.clone()
        }
    }

    /// The disk as the next boot finds it. A name whose change was not flushed points at
    /// the old or the new file.
    pub fn after_power_loss(&self, rng: &mut Rng) -> SimDisk {
        let pick = |rng: &mut Rng, old: Option<usize>, new: Option<usize>| {
            if rng.chance(50) {
                old
            } else {
                new
            }
        };
        let dir = Dir {
            checkpoint: pick(rng, self.durable_dir.checkpoint, self.dir.checkpoint),
            temp: pick(rng, self.durable_dir.temp, self.dir.temp),
        };
        SimDisk {
            segments: [
                self.segments[0].after_power_loss(rng),
                self.segments[1].after_power_loss(rng),
            ],
            segment_bytes: self.segment_bytes,
            files: self.files.iter().map(|f| f.after_power_loss(rng)).collect(),
            durable_dir: dir.clone(),
            dir,
            calls: 0,
            fail_at: u64::MAX,
            dead: false,
            flaky: None,
        }
    }
}

/// A [`LogStore`] over a shared [`SimDisk`].
pub struct SimStore(Arc<Mutex<SimDisk>>);

impl SimStore {
    /// The view of `disk` that a ledger or a store writes through.
    pub fn new(disk: Arc<Mutex<SimDisk>>) -> SimStore {
        SimStore(disk)
    }

    fn disk(&self) -> MutexGuard<'_, SimDisk> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl LogStore for SimStore {
    fn segment_bytes(&self) -> u64 {
        self.disk().segment_bytes
    }

    fn write_log(&self, log: u8, offset: u64, bytes: &[u8]) -> io::Result<()> {
        let mut disk = self.disk();
        disk.call()?;
        disk.segments[usize::from(log)].write(offset as usize, bytes);
        Ok(())
    }

    fn sync_log(&self, log: u8) -> io::Result<()> {
        let mut disk = self.disk();
        disk.call()?;
        disk.segments[usize::from(log)].sync();
        Ok(())
    }

    fn read_log(&self, log: u8, offset: u64, len: usize) -> io::Result<Vec<u8>> {
        let disk = self.disk();
        let current = &disk.segments[usize::from(log)].current;
        let start = (offset as usize).min(current.len());
        Ok(current[start..(start + len).min(current.len())].to_vec())
    }

    fn write_checkpoint(&self, bytes: &[u8]) -> io::Result<()> {
        let mut disk = self.disk();
        disk.call()?;
        if disk.flaky.as_mut().is_some_and(|rng| rng.chance(20)) {
            return Err(io::ErrorKind::StorageFull.into());
        }
        let mut file = SimFile::default();
        file.write(0, bytes);
        disk.files.push(file);
        disk.dir.temp = Some(disk.files.len() - 1);
        Ok(())
    }

    fn sync_checkpoint(&self) -> io::Result<()> {
        let mut disk = self.disk();
        disk.call()?;
        let temp = disk.dir.temp.ok_or(io::ErrorKind::NotFound)?;
        disk.files[temp].sync();
        Ok(())
    }

    fn install_checkpoint(&self) -> io::Result<()> {
        let mut disk = self.disk();
        disk.call()?;
        disk.dir.checkpoint = Some(disk.dir.temp.take().ok_or(io::ErrorKind::NotFound)?);
        Ok(())
    }

    fn sync_dir(&self) -> io::Result<()> {
        let mut disk = self.disk();
        disk.call()?;
        disk.durable_dir = disk.dir.clone();
        Ok(())
    }

    fn read_checkpoint(&self) -> io::Result<Option<Vec<u8>>> {
        let disk = self.disk();
        Ok(disk.dir.checkpoint.map(|i| disk.files[i].current.clone()))
    }
}
