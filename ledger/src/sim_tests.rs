//! Simulated power loss: the operation log's storage is a simulated disk
//! ([`forkpool_shm::sim::SimDisk`]) that keeps what was flushed and, at a power loss, an
//! arbitrary part of what was written since (each unflushed write dropped, kept, or torn at
//! 512-byte sectors; an unflushed rename done or not). Each seed runs a random workload (deposits, withdrawals, transfers, flushes,
//! checkpoints, a small log so that segments switch and fill) against a real mapped ledger,
//! cuts the power at a random storage call, scribbles over the mapped table file (which
//! recovery must not trust), recovers, and checks that the ledger holds the state after
//! some LSN at or above the last acknowledged one (so every acknowledged operation is there,
//! each other one all or nothing, and the money adds up).
//!
//! `LEDGER_SIM_SEEDS` sets the number of seeds (default 2,000), `LEDGER_SIM_SEED` runs one
//! seed (a failure prints it).

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use forkpool_shm::sim::{SimDisk, SimStore};

use crate::test_support::{acct, env_u64, scratch_dir, when_free, Rng};
use crate::{FsyncPolicy, Ledger, LedgerError, LedgerOptions, OpError};

type Balances = BTreeMap<String, u64>;

/// One workload's run: the state now, the states after every LSN, and the last
/// acknowledged LSN.
struct Run {
    state: Balances,
    states: BTreeMap<u64, Balances>,
    acked: u64,
    /// Segment switches and operations refused with `LogFull` (the coverage summary).
    switches: u64,
    log_full: u64,
}

impl Run {
    /// Records the state after the change just appended. LSNs in between were switch
    /// records, which change no account.
    fn changed(&mut self, lsn: u64, changes: &[(&str, u64)]) {
        for &(name, balance) in changes {
            self.state.insert(name.to_owned(), balance);
        }
        let last = self.states.keys().next_back().copied().unwrap_or(0);
        assert!(lsn > last, "LSN {lsn} after {last}");
        let before = self.states[&last].clone();
        self.states
            .extend((last + 1..lsn).map(|l| (l, before.clone())));
        self.switches += lsn - last - 1;
        self.states.insert(lsn, self.state.clone());
    }
}

fn options(rng: &mut Rng) -> LedgerOptions {
    LedgerOptions {
        max_accounts: 16,
        fsync: FsyncPolicy::Always,
        stripes: 4,
        intent_records: 2,
        log_segment_bytes: 4096 + rng.below(4) * 1024,
    }
}

fn open(
    path: &std::path::Path,
    opts: &LedgerOptions,
    disk: &Arc<Mutex<SimDisk>>,
) -> Result<Ledger, LedgerError> {
    when_free(|| {
        Ledger::open_keyed(
            path,
            opts,
            &|| 7,
            Some(Box::new(SimStore::new(disk.clone()))),
        )
    })
}

const NAMES: [&str; 5] = ["a", "b", "c", "d", "e"];

fn power_failed(disk: &Arc<Mutex<SimDisk>>) -> bool {
    disk.lock().unwrap_or_else(|e| e.into_inner()).dead
}

/// One random action. A checkpoint may be overtaken by further steps between its image and
/// its installation (`nested` stops the recursion). Errors of flushes and checkpoints are
/// the simulated power loss or a full disk: the caller checks the former.
fn step(ledger: &Ledger, rng: &mut Rng, run: &mut Run, disk: &Arc<Mutex<SimDisk>>, nested: bool) {
    let (x, y) = (*rng.pick(&NAMES), *rng.pick(&NAMES));
    let amount = 1 + rng.below(60);
    let outcome = match rng.below(100) {
        0..=34 => ledger.deposit(&acct(x), amount).map(|b| vec![(x, b)]),
        35..=49 => ledger.withdraw(&acct(x), amount).map(|b| vec![(x, b)]),
        50..=79 => ledger
            .transfer(&acct(x), &acct(y), amount)
            .map(|(f, t)| vec![(x, f), (y, t)]),
        80..=94 => {
            if let Ok(durable) = ledger.flush() {
                run.acked = durable;
            }
            return;
        }
        95..=97 => {
            let _ = ledger.checkpoint(rng.chance(50));
            return;
        }
        _ if nested => return,
        _ => return overtaken_checkpoint(ledger, rng, run, disk),
    };
    match outcome {
        Ok(changes) => run.changed(ledger.appended_lsn(), &changes),
        Err(OpError::LogFull) => {
            run.log_full += 1;
            let _ = ledger.checkpoint(false);
        }
        Err(_) => {}
    }
}

fn overtaken_checkpoint(ledger: &Ledger, rng: &mut Rng, run: &mut Run, disk: &Arc<Mutex<SimDisk>>) {
    if let Ok(Some(pending)) = ledger.begin_checkpoint(true) {
        for _ in 0..rng.below(12) {
            if power_failed(disk) {
                return;
            }
            step(ledger, rng, run, disk, true);
        }
        let _ = ledger.finish_checkpoint(pending);
    }
}

/// Runs random steps until the power fails (or 400 steps), recording every state.
fn workload(ledger: &Ledger, rng: &mut Rng, disk: &Arc<Mutex<SimDisk>>) -> Run {
    let mut run = Run {
        state: Balances::new(),
        states: BTreeMap::from([(ledger.appended_lsn(), Balances::new())]),
        acked: ledger.durable_lsn(),
        switches: 0,
        log_full: 0,
    };
    for _ in 0..400 {
        if power_failed(disk) {
            break;
        }
        step(ledger, rng, &mut run, disk, false);
    }
    run
}

/// Every account's balance as the ledger reports it, checked against AUDIT.
fn balances(ledger: &Ledger) -> Balances {
    let found: Balances = ["a", "b", "c", "d", "e", "z"]
        .iter()
        .filter_map(|&n| ledger.balance(&acct(n)).ok().map(|b| (n.to_owned(), b)))
        .collect();
    let audit = ledger.audit().expect("audit after recovery");
    assert_eq!(audit.accounts, found.len() as u64, "AUDIT's account count");
    let total: u128 = found.values().map(|&b| u128::from(b)).sum();
    assert_eq!(audit.total, total, "AUDIT equals the sum of the balances");
    found
}

/// What the seeds went through, for the summary.
#[derive(Default)]
struct Tally {
    seeds: u64,
    power_failed_mid_run: u64,
    switches: u64,
    log_full: u64,
}

/// One seed: workload, power loss, recovery, checks; adds what it went through to `tally`.
fn run_seed(seed: u64, tally: &mut Tally) {
    let mut rng = Rng::for_case(0x5eed_0016, seed);
    let dir = scratch_dir();
    let path = dir.path().join("ledger.bin");
    let opts = options(&mut rng);
    let fail_at = 1 + rng.below(300);
    let flaky = rng.chance(25).then(|| Rng::for_case(seed, 1));
    let disk = Arc::new(Mutex::new(SimDisk::new(
        opts.log_segment_bytes,
        fail_at,
        flaky,
    )));
    let run = match open(&path, &opts, &disk) {
        Ok(ledger) => {
            let run = workload(&ledger, &mut rng, &disk);
            // Once the first checkpoint is installed, the table is never read again.
            scribble(&path, &mut rng);
            run
        }
        // The power failed before the new ledger's first checkpoint: its table is as new.
        Err(_) => Run {
            state: Balances::new(),
            states: BTreeMap::from([(0, Balances::new())]),
            acked: 0,
            switches: 0,
            log_full: 0,
        },
    };
    tally.seeds += 1;
    tally.power_failed_mid_run += u64::from(power_failed(&disk));
    tally.switches += run.switches;
    tally.log_full += run.log_full;
    let after = disk
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .after_power_loss(&mut rng);
    let disk = Arc::new(Mutex::new(after));
    let ledger = open(&path, &opts, &disk).unwrap_or_else(|e| panic!("recovery refused: {e}"));
    let found = balances(&ledger);
    let matches: Vec<u64> = run
        .states
        .range(run.acked.min(*run.states.keys().next_back().unwrap_or(&0))..)
        .filter(|(_, state)| **state == found)
        .map(|(&lsn, _)| lsn)
        .collect();
    assert!(
        !matches.is_empty(),
        "recovered {found:?}, which is no state at or after the acknowledged LSN {} (last {:?})",
        run.acked,
        run.states.iter().next_back()
    );
    // The recovered ledger works and survives a second loss of everything unflushed.
    ledger
        .deposit(&acct("z"), 5)
        .expect("deposit after recovery");
    ledger.flush().expect("flush after recovery");
    let mut expected = found;
    expected.insert("z".into(), 5 + expected.get("z").copied().unwrap_or(0));
    drop(ledger);
    let after = disk
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .after_power_loss(&mut rng);
    let ledger = open(&path, &opts, &Arc::new(Mutex::new(after))).expect("second recovery");
    assert_eq!(balances(&ledger), expected, "the second recovery");
}

/// What page writeback may leave of the mapped table: random bytes anywhere past the
/// immutable header.
fn scribble(path: &std::path::Path, rng: &mut Rng) {
    let Ok(mut bytes) = std::fs::read(path) else {
        return;
    };
    for _ in 0..rng.below(20) {
        let at = 64 + rng.below(bytes.len() as u64 - 64) as usize;
        bytes[at] = rng.next_u64() as u8;
    }
    std::fs::write(path, bytes).expect("scribble over the table");
}

#[test]
fn every_acknowledged_operation_survives_a_simulated_power_loss() {
    let seeds: Vec<u64> = match env_u64("LEDGER_SIM_SEED") {
        Some(seed) => vec![seed],
        None => (0..env_u64("LEDGER_SIM_SEEDS").unwrap_or(2_000)).collect(),
    };
    let mut tally = Tally::default();
    for &seed in &seeds {
        let outcome =
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| run_seed(seed, &mut tally)));
        if let Err(panic) = outcome {
            eprintln!(
                "power-loss simulation failed at seed {seed} (LEDGER_SIM_SEED={seed} replays it)"
            );
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
        assert!(
            tally.switches > 0 && tally.log_full > 0,
            "the log switches and fills"
        );
    }
}
