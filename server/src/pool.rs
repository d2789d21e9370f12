//! The pool the master supervises: its slots (places that must each have a serving worker),
//! the live worker processes, and their scoreboard cells. This module holds the bookkeeping
//! and the decisions made from it (which slot is due a worker, which worker is silent, why a
//! worker's exit counts as it does); it signals no process and forks nothing.

use std::fmt;
use std::time::{Duration, Instant};

use forkpool_pgledger::PgStats;
use nix::unistd::Pid;

use crate::process::Exit;
use crate::scoreboard::{add_db_stats, Scoreboard, ServiceTotals, WorkerCell, WorkerState};
use crate::service::ServiceKind;

/// A worker that fails on its own within this time of starting counts as a crash loop.
const CRASH_WINDOW: Duration = Duration::from_secs(10);
/// Delay before the second start of a crash-looping slot; doubles with each crash.
const FIRST_BACKOFF: Duration = Duration::from_millis(100);
/// The longest delay between two starts of a crash-looping slot.
pub const MAX_BACKOFF: Duration = Duration::from_secs(5);

/// Where a worker process is in its life, as far as its slot is concerned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WorkerPhase {
    /// Forked; has not reported ready yet.
    Starting,
    /// Ready, and the worker its slot counts on.
    Serving,
    /// Leaving while a successor serves its slot (recycled, TTOU, reload, upgrade, or
    /// terminated on its own). `killed`: the master gave up on it (overdue or silent).
    Retiring { since: Instant, killed: bool },
    /// Killed by the master for missing its heartbeats; waits to be reaped. A hang before
    /// ready counts as a crash of its slot.
    Hung { was_ready: bool },
}

impl WorkerPhase {
    /// Does the worker still stand for its slot (so the slot needs no other worker)? A hung
    /// worker does until it is reaped: its replacement starts then.
    pub fn holds_slot(self) -> bool {
        !matches!(self, WorkerPhase::Retiring { .. })
    }
}

/// Why a worker left the pool; counted per reason for `/metrics`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RestartReason {
    /// Failed on its own: a non-zero exit or a crash signal.
    Crashed,
    /// Exited with status 0 without being asked to.
    Exited,
    /// Killed by the master for missing its heartbeats.
    Hung,
    /// Killed by someone else.
    Killed,
    /// Served its `max_requests` and retired.
    Recycled,
}

impl RestartReason {
    pub const ALL: [RestartReason; 5] = [
        RestartReason::Crashed,
        RestartReason::Exited,
        RestartReason::Hung,
        RestartReason::Killed,
        RestartReason::Recycled,
    ];

    /// The word used in logs and in the metrics' `reason` label.
    pub fn as_str(self) -> &'static str {
        match self {
            RestartReason::Crashed => "crashed",
            RestartReason::Exited => "exited",
            RestartReason::Hung => "hung",
            RestartReason::Killed => "killed",
            RestartReason::Recycled => "recycled",
        }
    }

    /// Why a worker that held its slot ended as `exit`.
    fn of(phase: WorkerPhase, exit: Exit) -> RestartReason {
        match exit {
            _ if matches!(phase, WorkerPhase::Hung { .. }) => RestartReason::Hung,
            Exit::Code(0) => RestartReason::Exited,
            _ if exit.is_own_failure() => RestartReason::Crashed,
            _ => RestartReason::Killed,
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

impl fmt::Display for RestartReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Worker exits counted by reason.
#[derive(Debug, Default, Clone, Copy)]
pub struct RestartCounts([u64; RestartReason::ALL.len()]);

impl RestartCounts {
    pub fn get(&self, reason: RestartReason) -> u64 {
        self.0[reason.index()]
    }

    fn add(&mut self, reason: RestartReason) {
        self.0[reason.index()] += 1;
    }
}

/// One place in the pool.
#[derive(Debug)]
struct Slot {
    /// Consecutive crashes (deaths before ready, or own failures soon after start).
    crashes: u32,
    /// When to start the slot's next worker, if it has none holding it.
    start_at: Option<Instant>,
}

/// A live worker process.
#[derive(Debug)]
pub struct Worker {
    pub pid: Pid,
    pub slot: usize,
    /// Its scoreboard cell, and that cell's index (which also names its link).
    pub cell: &'static WorkerCell,
    pub cell_index: usize,
    started: Instant,
    pub phase: WorkerPhase,
}

/// What the master should do about a reaped worker.
#[derive(Debug, PartialEq, Eq)]
pub enum ExitVerdict {
    /// It had left the pool already (retired, or the pool is shutting down): nothing to do.
    Expected,
    /// It held its slot: replace it after `delay` (counted as `reason`; `crashes` in a row).
    Replace {
        reason: RestartReason,
        delay: Duration,
        crashes: u32,
    },
}

/// The slots, the workers and their scoreboard.
pub struct Pool {
    slots: Vec<Slot>,
    workers: Vec<Worker>,
    scoreboard: Scoreboard,
    restarts: RestartCounts,
    /// What workers already reaped did, per service (totals never go backwards).
    finished: [ServiceTotals; ServiceKind::ALL.len()],
    /// The counters of the database pools of workers already reaped (their gauges are 0).
    finished_db: PgStats,
}

impl Pool {
    /// A pool of `size` slots, each due a worker now; `cells` bounds the live workers
    /// (serving and retiring together).
    pub fn new(size: usize, cells: usize) -> nix::Result<Pool> {
        let mut pool = Pool {
            slots: Vec::new(),
            workers: Vec::new(),
            scoreboard: Scoreboard::new(cells)?,
            restarts: RestartCounts::default(),
            finished: [ServiceTotals::default(); ServiceKind::ALL.len()],
            finished_db: PgStats::default(),
        };
        pool.resize(size);
        Ok(pool)
    }

    /// Number of slots.
    pub fn size(&self) -> usize {
        self.slots.len()
    }

    pub fn workers(&self) -> &[Worker] {
        &self.workers
    }

    pub fn restarts(&self) -> &RestartCounts {
        &self.restarts
    }

    /// Per service, what the workers reaped so far did.
    pub fn finished(&self) -> [ServiceTotals; ServiceKind::ALL.len()] {
        self.finished
    }

    /// The database pools of every worker, live or gone, summed (a PostgreSQL ledger).
    pub fn db_stats(&self) -> PgStats {
        let mut sum = self.finished_db.clone();
        for worker in &self.workers {
            add_db_stats(&mut sum, &worker.cell.db.snapshot());
        }
        sum
    }

    /// Replaces the slots with `size` fresh ones, each due a worker now (a reload: every
    /// current worker is retired by the caller).
    pub fn resize(&mut self, size: usize) {
        let now = Instant::now();
        self.slots = (0..size).map(|_| Slot::due(now)).collect();
    }

    /// One slot more (TTIN), due a worker now.
    pub fn add_slot(&mut self) {
        self.slots.push(Slot::due(Instant::now()));
    }

    /// Removes the last slot (TTOU) and returns its index; its workers are the caller's to
    /// retire.
    pub fn remove_last_slot(&mut self) -> usize {
        self.slots.pop();
        self.slots.len()
    }

    /// Is some worker holding `slot` (see [`WorkerPhase::holds_slot`])?
    fn is_held(&self, slot: usize) -> bool {
        self.workers
            .iter()
            .any(|w| w.slot == slot && w.phase.holds_slot())
    }

    /// Does every slot have a ready worker serving it?
    pub fn all_serving(&self) -> bool {
        (0..self.slots.len()).all(|slot| {
            self.workers
                .iter()
                .any(|w| w.slot == slot && w.phase == WorkerPhase::Serving)
        })
    }

    /// Slots due a worker at `now` that no worker holds.
    pub fn due_slots(&self, now: Instant) -> Vec<usize> {
        (0..self.slots.len())
            .filter(|&slot| self.slots[slot].start_at.is_some_and(|at| now >= at))
            .filter(|&slot| !self.is_held(slot))
            .collect()
    }

    /// The earliest time a slot is due a worker.
    pub fn next_start(&self) -> Option<Instant> {
        self.slots.iter().filter_map(|slot| slot.start_at).min()
    }

    /// At shutdown: slots without a worker holding them (one just died, or is in back-off)
    /// are due one now, to drain their listener's queue; the others are due none.
    pub fn staff_empty_slots_now(&mut self) -> usize {
        let now = Instant::now();
        let mut staffed = 0;
        for index in 0..self.slots.len() {
            let empty = !self.is_held(index);
            self.slots[index].start_at = empty.then_some(now);
            staffed += usize::from(empty);
        }
        staffed
    }

    /// A free scoreboard cell for a new worker, reset, with its index; `None` if every cell
    /// is in use.
    pub fn free_cell(&self) -> Option<(usize, &'static WorkerCell)> {
        let index = (0..self.scoreboard.capacity())
            .find(|&i| !self.workers.iter().any(|w| w.cell_index == i))?;
        let cell = self.scoreboard.cell(index);
        cell.reset();
        Some((index, cell))
    }

    /// Records a worker just forked for `slot` on cell `cell_index`.
    pub fn add_worker(&mut self, pid: Pid, slot: usize, cell_index: usize) {
        self.slots[slot].start_at = None;
        self.workers.push(Worker {
            pid,
            slot,
            cell: self.scoreboard.cell(cell_index),
            cell_index,
            started: Instant::now(),
            phase: WorkerPhase::Starting,
        });
    }

    /// Starting `slot`'s worker failed: try again after `delay`.
    pub fn retry_slot(&mut self, slot: usize, delay: Duration) {
        self.slots[slot].start_at = Some(Instant::now() + delay);
    }

    pub fn worker_mut(&mut self, pid: Pid) -> Option<&mut Worker> {
        self.workers.iter_mut().find(|w| w.pid == pid)
    }

    /// Scoreboard cell `index` (for the worker forked onto it).
    pub fn cell(&self, index: usize) -> &'static WorkerCell {
        self.scoreboard.cell(index)
    }

    /// The worker told the master it serves.
    pub fn mark_ready(&mut self, pid: Pid) {
        if let Some(worker) = self.worker_mut(pid) {
            if worker.phase == WorkerPhase::Starting {
                worker.phase = WorkerPhase::Serving;
            }
        }
    }

    /// Retires `pid` if it holds its slot, making its slot due a successor now; returns
    /// whether it did (false: already retiring, or unknown).
    pub fn retire(&mut self, pid: Pid) -> bool {
        let now = Instant::now();
        let Some(worker) = self.workers.iter_mut().find(|w| w.pid == pid) else {
            return false;
        };
        if !worker.phase.holds_slot() {
            return false;
        }
        worker.phase = WorkerPhase::Retiring {
            since: now,
            killed: false,
        };
        if let Some(slot) = self.slots.get_mut(worker.slot) {
            slot.start_at = Some(now);
        }
        true
    }

    /// Counts a worker that retired after serving its `max_requests`.
    pub fn count_recycled(&mut self) {
        self.restarts.add(RestartReason::Recycled);
    }

    /// The workers holding `slot` (to retire them when the slot goes away).
    pub fn holders_of(&self, slot: usize) -> Vec<Pid> {
        self.workers
            .iter()
            .filter(|w| w.slot == slot && w.phase.holds_slot())
            .map(|w| w.pid)
            .collect()
    }

    /// Every worker holding a slot.
    pub fn holders(&self) -> Vec<Pid> {
        self.workers
            .iter()
            .filter(|w| w.phase.holds_slot())
            .map(|w| w.pid)
            .collect()
    }

    /// Retiring workers that have had more than `timeout` and were not yet given up on.
    pub fn overdue_retirees(&mut self, now: Instant, timeout: Duration) -> Vec<Pid> {
        let mut overdue = Vec::new();
        for worker in &mut self.workers {
            if let WorkerPhase::Retiring { since, killed } = &mut worker.phase {
                if !*killed && now.saturating_duration_since(*since) > timeout {
                    *killed = true;
                    overdue.push(worker.pid);
                }
            }
        }
        overdue
    }

    /// Workers silent for longer than `limit` and not yet given up on, each marked as given
    /// up on; returns (pid, slot, silence).
    pub fn silent_workers(&mut self, limit: Duration) -> Vec<(Pid, usize, Duration)> {
        let mut silent = Vec::new();
        for worker in &mut self.workers {
            let quiet = worker.cell.silence();
            if quiet <= limit {
                continue;
            }
            worker.phase = match worker.phase {
                WorkerPhase::Hung { .. } | WorkerPhase::Retiring { killed: true, .. } => continue,
                WorkerPhase::Starting => WorkerPhase::Hung { was_ready: false },
                WorkerPhase::Serving => WorkerPhase::Hung { was_ready: true },
                WorkerPhase::Retiring { since, .. } => WorkerPhase::Retiring {
                    since,
                    killed: true,
                },
            };
            silent.push((worker.pid, worker.slot, quiet));
        }
        silent
    }

    /// Removes a reaped worker and decides what its exit means. `shutting_down`: the pool
    /// is draining, so no slot is restarted.
    pub fn on_exit(
        &mut self,
        pid: Pid,
        exit: Exit,
        shutting_down: bool,
    ) -> Option<(Worker, ExitVerdict)> {
        let index = self.workers.iter().position(|w| w.pid == pid)?;
        let worker = self.workers.swap_remove(index);
        for kind in ServiceKind::ALL {
            self.finished[kind.index()].add(ServiceTotals::of(worker.cell.counters(kind)));
        }
        let gone = PgStats {
            connections: 0,
            connections_up: 0,
            in_flight: 0,
            ..worker.cell.db.snapshot()
        };
        add_db_stats(&mut self.finished_db, &gone);
        worker.cell.set_state(WorkerState::Free);
        if shutting_down || !worker.phase.holds_slot() {
            return Some((worker, ExitVerdict::Expected));
        }
        let reason = RestartReason::of(worker.phase, exit);
        self.restarts.add(reason);
        let was_ready = match worker.phase {
            WorkerPhase::Serving => true,
            WorkerPhase::Hung { was_ready } => was_ready,
            _ => false,
        };
        let own_failure = exit.is_own_failure() && worker.started.elapsed() < CRASH_WINDOW;
        let Some(slot) = self.slots.get_mut(worker.slot) else {
            // The slot went away (TTOU) after the worker last held it.
            return Some((worker, ExitVerdict::Expected));
        };
        slot.crashes = if !was_ready || own_failure {
            slot.crashes + 1
        } else {
            0
        };
        let delay = backoff(slot.crashes);
        slot.start_at = Some(Instant::now() + delay);
        let crashes = slot.crashes;
        Some((
            worker,
            ExitVerdict::Replace {
                reason,
                delay,
                crashes,
            },
        ))
    }
}

impl Slot {
    fn due(now: Instant) -> Slot {
        Slot {
            crashes: 0,
            start_at: Some(now),
        }
    }
}

/// No delay for a first crash, then 100 ms doubling up to [`MAX_BACKOFF`].
fn backoff(crashes: u32) -> Duration {
    if crashes <= 1 {
        return Duration::ZERO;
    }
    FIRST_BACKOFF
        .saturating_mul(1 << (crashes - 2).min(16))
        .min(MAX_BACKOFF)
}

#[cfg(test)]
mod tests {
    use super::*;
    use nix::sys::signal::Signal;

    fn pool(size: usize) -> Pool {
        Pool::new(size, 8).expect("map a scoreboard")
    }

    fn start(pool: &mut Pool, slot: usize, pid: i32) -> Pid {
        let pid = Pid::from_raw(pid);
        let (cell, _) = pool.free_cell().expect("a free cell");
        pool.add_worker(pid, slot, cell);
        pid
    }

    #[test]
    fn backoff_starts_at_once_then_doubles_to_a_cap() {
        let delays: Vec<u64> = (0..10).map(|n| backoff(n).as_millis() as u64).collect();
        assert_eq!(delays, [0, 0, 100, 200, 400, 800, 1600, 3200, 5000, 5000]);
    }

    #[test]
    fn a_slot_is_due_until_a_worker_holds_it_and_ready_when_it_serves() {
        let mut pool = pool(2);
        assert_eq!(pool.due_slots(Instant::now()), [0, 1]);
        let a = start(&mut pool, 0, 100);
        start(&mut pool, 1, 101);
        assert!(pool.due_slots(Instant::now()).is_empty());
        assert!(!pool.all_serving());
        pool.mark_ready(a);
        assert!(!pool.all_serving());
        pool.mark_ready(Pid::from_raw(101));
        assert!(pool.all_serving());
    }

    #[test]
    fn retiring_frees_the_slot_once_and_counts_nothing_by_itself() {
        let mut pool = pool(1);
        let a = start(&mut pool, 0, 100);
        pool.mark_ready(a);
        assert!(pool.retire(a));
        assert!(!pool.retire(a), "a second retirement is a no-op");
        assert_eq!(pool.due_slots(Instant::now()), [0]);
        let (_, verdict) = pool.on_exit(a, Exit::Code(0), false).expect("known");
        assert_eq!(verdict, ExitVerdict::Expected);
        assert!(RestartReason::ALL
            .iter()
            .all(|reason| pool.restarts().get(*reason) == 0));
    }

    #[test]
    fn a_worker_killed_after_ready_is_replaced_at_once_and_early_crashes_back_off() {
        let mut pool = pool(1);
        let a = start(&mut pool, 0, 100);
        pool.mark_ready(a);
        let (_, verdict) = pool
            .on_exit(a, Exit::Signal(Signal::SIGKILL), false)
            .expect("known");
        assert_eq!(
            verdict,
            ExitVerdict::Replace {
                reason: RestartReason::Killed,
                delay: Duration::ZERO,
                crashes: 0
            }
        );
        let mut delays = Vec::new();
        for pid in 200..203 {
            let pid = start(&mut pool, 0, pid);
            let (_, verdict) = pool.on_exit(pid, Exit::Code(1), false).expect("known");
            let ExitVerdict::Replace { reason, delay, .. } = verdict else {
                panic!("a crash is replaced");
            };
            assert_eq!(reason, RestartReason::Crashed);
            delays.push(delay);
        }
        assert_eq!(
            delays,
            [Duration::ZERO, FIRST_BACKOFF, FIRST_BACKOFF * 2],
            "crashes before ready back off"
        );
        assert_eq!(pool.restarts().get(RestartReason::Crashed), 3);
    }

    #[test]
    fn a_silent_worker_is_given_up_on_once_and_its_exit_counts_as_hung() {
        let mut pool = pool(1);
        let a = start(&mut pool, 0, 100);
        pool.mark_ready(a);
        let limit = Duration::from_secs(1);
        assert!(pool.silent_workers(limit).is_empty(), "it just beat");
        pool.workers()[0].cell.backdate(limit * 2);
        assert_eq!(pool.silent_workers(limit).len(), 1);
        assert!(pool.silent_workers(limit).is_empty(), "only once");
        assert!(
            pool.due_slots(Instant::now()).is_empty(),
            "held until reaped"
        );
        let (_, verdict) = pool
            .on_exit(a, Exit::Signal(Signal::SIGKILL), false)
            .expect("known");
        assert!(matches!(
            verdict,
            ExitVerdict::Replace {
                reason: RestartReason::Hung,
                crashes: 0,
                ..
            }
        ));
    }

    #[test]
    fn shutting_down_restarts_nothing_and_staffs_only_empty_slots() {
        let mut pool = pool(2);
        let a = start(&mut pool, 0, 100);
        pool.mark_ready(a);
        assert_eq!(pool.staff_empty_slots_now(), 1);
        assert_eq!(pool.due_slots(Instant::now()), [1]);
        let (_, verdict) = pool.on_exit(a, Exit::Code(0), true).expect("known");
        assert_eq!(verdict, ExitVerdict::Expected);
    }
}
