//! Simulated power loss for the queue store under `--fsync always`, as the ledger's
//! (`ledger/src/sim_tests.rs`): the log's storage is `forkpool_shm::sim::SimDisk`, which keeps
//! what was flushed and an arbitrary part of what was written since (dropped, kept, torn at
//! sectors; a rename done or not). Each seed runs a random workload (PUT, GET, DONE, releases,
//! CONFIG, flushes, checkpoints, a small log so that segments switch and fill) against a real
//! mapped store, cuts the power at a random storage call, scribbles over the mapped file
//! (which recovery must not trust), recovers, and checks that the store validates and holds
//! the state after some LSN at or above the last acknowledged one, as a cold start shows it
//! (jobs that were handed out are ready again, at the head).
//!
//! Also: a torn log tail is cut; a damaged record in the middle refuses the start and leaves
//! every file as it was.
//!
//! `QUEUE_SIM_SEEDS` sets the number of seeds (default 500), `QUEUE_SIM_SEED` runs one.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::{Arc, Mutex};

use forkpool_shm::sim::{Rng, SimDisk, SimStore};

use crate::test_support::{name, open_when_free, party, small, when_free};
use crate::{Attempt, FsyncPolicy, Mode, OpError, Store, StoreError, StoreOptions};

const QUEUES: [&str; 3] = ["a", "b", "c"];

fn options(rng: &mut Rng) -> StoreOptions {
    StoreOptions {
        fsync: FsyncPolicy::Always,
        log_segment_bytes: 14_336 + rng.below(4) * 2048,
        ..small()
    }
}

fn open(path: &Path, opts: &StoreOptions, disk: &Arc<Mutex<SimDisk>>) -> Result<Store, StoreError> {
    // A crash test's forked child may hold the path guard for a moment.
    when_free(|| Store::open_with(path, opts, Some(Box::new(SimStore::new(disk.clone())))))
}

/// One workload's run: the states after every LSN, the jobs held, the last acknowledged LSN.
struct Run {
    states: BTreeMap<u64, String>,
    held: Vec<u64>,
    acked: u64,
    switches: u64,
    log_full: u64,
}

impl Run {
    /// Records the state after the record just appended; LSNs in between were switches.
    fn changed(&mut self, store: &Store) {
        let lsn = store.appended_lsn();
        let last = self.states.keys().next_back().copied().unwrap_or(0);
        if lsn == last {
            return;
        }
        let before = self.states[&last].clone();
        self.states
            .extend((last + 1..lsn).map(|l| (l, before.clone())));
        self.switches += lsn - last - 1;
        self.states.insert(lsn, store.durable_view());
    }
}

/// One random action; errors of flushes and checkpoints are the simulated power loss.
fn step(store: &Store, rng: &mut Rng, run: &mut Run) {
    let queue = name(QUEUES[rng.below(QUEUES.len() as u64) as usize]);
    let me = party(1);
    let outcome = match rng.below(100) {
        0..=29 => {
            let payload = format!("job {}", rng.below(1000));
            store
                .put(&queue, payload.as_bytes(), me, Mode::NoWait)
                .map(drop)
        }
        30..=49 => store
            .get(&queue, me, Mode::NoWait, &mut Vec::new())
            .map(|(attempt, _)| {
                if let Attempt::Now(id) = attempt {
                    run.held.push(id);
                }
            }),
        50..=64 if !run.held.is_empty() => {
            let id = run
                .held
                .swap_remove(rng.below(run.held.len() as u64) as usize);
            store.done(id, me).map(drop)
        }
        65..=69 if !run.held.is_empty() => {
            let id = run
                .held
                .swap_remove(rng.below(run.held.len() as u64) as usize);
            store.release(id, me).map(drop)
        }
        70..=72 => store.configure(&queue, rng.below(5)).map(drop),
        73..=92 => {
            if let Ok(durable) = store.flush() {
                run.acked = durable;
            }
            return;
        }
        _ => {
            let _ = store.checkpoint(rng.chance(30));
            return;
        }
    };
    match outcome {
        Ok(()) => run.changed(store),
        Err(OpError::LogFull) => {
            run.log_full += 1;
            let _ = store.checkpoint(false);
        }
        Err(_) => {}
    }
}

/// What page writeback may leave of the mapped file: random bytes anywhere past the
/// immutable header.
fn scribble(path: &Path, rng: &mut Rng) {
    let Ok(mut bytes) = std::fs::read(path) else {
        return;
    };
    for _ in 0..rng.below(40) {
        let at = 64 + rng.below(bytes.len() as u64 - 64) as usize;
        bytes[at] = rng.next_u64() as u8;
    }
    std::fs::write(path, bytes).expect("scribble over the store");
}

fn power_failed(disk: &Arc<Mutex<SimDisk>>) -> bool {
    disk.lock().unwrap_or_else(|e| e.into_inner()).dead
}

fn after_power_loss(disk: &Arc<Mutex<SimDisk>>, rng: &mut Rng) -> Arc<Mutex<SimDisk>> {
    let after = disk
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .after_power_loss(rng);
    Arc::new(Mutex::new(after))
}

#[derive(Default)]
struct Tally {
    seeds: u64,
    power_failed_mid_run: u64,
    switches: u64,
    log_full: u64,
}

fn run_seed(seed: u64, tally: &mut Tally) {
    let mut rng = Rng::for_case(0x5eed_0019, seed);
    let dir = tempfile::tempdir().expect("a temporary directory");
    let path = dir.path().join("queue.bin");
    let opts = options(&mut rng);
    // The queues exist (durably) first, so that every later operation is one record.
    let setup = Arc::new(Mutex::new(SimDisk::new(
        opts.log_segment_bytes,
        u64::MAX,
        None,
    )));
    {
        let store = open(&path, &opts, &setup).expect("a new store");
        for queue in QUEUES {
            store.configure(&name(queue), 0).expect("create the queue");
        }
        store.flush().expect("flush the queues");
    }
    let fail_at = 1 + rng.below(400);
    let disk = setup
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .failing_at(fail_at);
    let disk = Arc::new(Mutex::new(disk));
    let run = match open(&path, &opts, &disk) {
        Ok(store) => {
            let mut run = Run {
                states: BTreeMap::from([(store.appended_lsn(), store.durable_view())]),
                held: Vec::new(),
                acked: store.durable_lsn(),
                switches: 0,
                log_full: 0,
            };
            for _ in 0..500 {
                if power_failed(&disk) {
                    break;
                }
                step(&store, &mut rng, &mut run);
            }
            drop(store);
            scribble(&path, &mut rng);
            Some(run)
        }
        Err(_) => None,
    };
    tally.seeds += 1;
    tally.power_failed_mid_run += u64::from(power_failed(&disk));
    let disk = after_power_loss(&disk, &mut rng);
    let store = open(&path, &opts, &disk).unwrap_or_else(|e| panic!("recovery refused: {e}"));
    store.check();
    let found = store.durable_view();
    if let Some(run) = run {
        tally.switches += run.switches;
        tally.log_full += run.log_full;
        let last = *run.states.keys().next_back().unwrap_or(&0);
        let matches = run
            .states
            .range(run.acked.min(last)..)
            .any(|(_, state)| *state == found);
        assert!(
            matches,
            "recovered\n{found}which is no state at or after the acknowledged LSN {} (last:\n{:?})",
            run.acked,
            run.states.iter().next_back()
        );
    } else {
        assert!(found.contains("put=0"), "only the empty queues: {found}");
    }
    // The recovered store works and survives a second loss of everything unflushed.
    store
        .configure(&name("a"), 7)
        .expect("a change after recovery");
    store.flush().expect("flush after recovery");
    let expected = store.durable_view();
    drop(store);
    let disk = after_power_loss(&disk, &mut rng);
    let store = open(&path, &opts, &disk).expect("second recovery");
    store.check();
    assert_eq!(store.durable_view(), expected, "the second recovery");
}

#[test]
fn every_acknowledged_operation_survives_a_simulated_power_loss() {
    let env = |key| {
        std::env::var(key)
            .ok()
            .and_then(|v: String| v.parse::<u64>().ok())
    };
    let seeds: Vec<u64> = match env("QUEUE_SIM_SEED") {
        Some(seed) => vec![seed],
        None => (0..env("QUEUE_SIM_SEEDS").unwrap_or(500)).collect(),
    };
    let mut tally = Tally::default();
    for &seed in &seeds {
        let outcome =
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| run_seed(seed, &mut tally)));
        if let Err(panic) = outcome {
            eprintln!("queue power-loss simulation failed at seed {seed} (QUEUE_SIM_SEED={seed} replays it)");
            std::panic::resume_unwind(panic);
        }
    }
    eprintln!(
        "{} seeds: the power failed mid-workload in {}; {} segment switches; {} operations \
         refused with a full log",
        tally.seeds, tally.power_failed_mid_run, tally.switches, tally.log_full
    );
    if seeds.len() >= 100 {
        assert!(
            tally.power_failed_mid_run * 2 > tally.seeds,
            "most runs lose power mid-way"
        );
        assert!(tally.switches > 0, "the log switches segments");
    }
}

/// Opens a store with its log in real files next to it, puts `n` jobs (the first one
/// creates the queue: a record of its own), flushing after each.
fn logged_store(path: &Path, n: u64) {
    let opts = StoreOptions {
        fsync: FsyncPolicy::Always,
        log_segment_bytes: 1 << 16,
        ..small()
    };
    let store = open_when_free(path, &opts).expect("a logged store");
    for k in 0..n {
        let payload = format!("job {k}");
        store
            .put(&name("a"), payload.as_bytes(), party(1), Mode::NoWait)
            .expect("put");
        store.flush().expect("flush");
    }
}

fn reopen(path: &Path) -> Result<Store, StoreError> {
    let opts = StoreOptions {
        fsync: FsyncPolicy::Always,
        log_segment_bytes: 1 << 16,
        ..small()
    };
    open_when_free(path, &opts)
}

/// The offsets of the records in a segment (a chain from 0).
fn record_offsets(log: &[u8]) -> Vec<usize> {
    let mut offsets = Vec::new();
    let mut at = 0;
    while let Some((_, len)) = crate::redo::Record::decode(log, at) {
        offsets.push(at);
        at += len;
    }
    offsets
}

#[test]
fn a_torn_log_tail_is_cut_and_the_rest_replayed() {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let path = dir.path().join("queue.bin");
    logged_store(&path, 5);
    let log = dir.path().join("queue.bin.log0");
    let mut bytes = std::fs::read(&log).expect("the log");
    let offsets = record_offsets(&bytes);
    assert_eq!(
        offsets.len(),
        6,
        "the queue's creation, then one record per PUT"
    );
    // The last record torn: half of it never reached the disk.
    let last = offsets[5];
    bytes[last + 40..last + 80].fill(0);
    std::fs::write(&log, &bytes).expect("tear the tail");
    let store = reopen(&path).expect("a torn tail is cut");
    store.check();
    assert_eq!(store.stats(&name("a")).expect("stats").depth, 4);
}

#[test]
fn a_corrupt_record_in_the_middle_refuses_the_start_and_changes_nothing() {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let path = dir.path().join("queue.bin");
    logged_store(&path, 5);
    let log = dir.path().join("queue.bin.log0");
    let mut bytes = std::fs::read(&log).expect("the log");
    let second = record_offsets(&bytes)[1];
    bytes[second + 60] ^= 0x40;
    std::fs::write(&log, &bytes).expect("damage a record");
    let files = [
        "queue.bin",
        "queue.bin.log0",
        "queue.bin.log1",
        "queue.bin.ckpt",
    ];
    let before: Vec<Vec<u8>> = files
        .iter()
        .map(|f| std::fs::read(dir.path().join(f)).expect("a file"))
        .collect();
    match reopen(&path) {
        Err(StoreError::LogCorrupt { lsn, segment, .. }) => assert_eq!((lsn, segment), (2, 0)),
        other => panic!("expected LogCorrupt, got {other:?}"),
    }
    for (file, bytes) in files.iter().zip(before) {
        assert!(
            std::fs::read(dir.path().join(file)).expect("a file") == bytes,
            "{file} was changed"
        );
    }
}

#[test]
fn going_back_to_never_keeps_the_jobs_and_removes_the_log() {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let path = dir.path().join("queue.bin");
    logged_store(&path, 3);
    let store = open_when_free(&path, &small()).expect("open under never");
    assert!(!store.is_logged());
    assert_eq!(store.stats(&name("a")).expect("stats").depth, 3);
    assert!(!dir.path().join("queue.bin.ckpt").exists());
    drop(store);
    let store = reopen(&path).expect("back to always");
    assert!(store.is_logged());
    assert_eq!(store.stats(&name("a")).expect("stats").depth, 3);
}
