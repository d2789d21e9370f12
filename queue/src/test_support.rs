//! What the crate's own tests share: names, opening a store that a forked child of another
//! test may briefly hold, a snapshot of the whole state, and running an operation in a child
//! killed at a crash point.

use std::path::Path;
use std::time::{Duration, Instant};

use nix::sys::wait::{waitpid, WaitStatus};
use nix::unistd::{fork, ForkResult};

use crate::crash::arm;
use crate::layout::{hdr, j, job_state, q, w};
use crate::{Party, QueueName, Store, StoreError, StoreOptions};

/// How long a test waits for a store that a forked child of another test holds.
const HELD_TIMEOUT: Duration = Duration::from_secs(10);

pub(crate) fn name(s: &str) -> QueueName {
    QueueName::new(s.as_bytes()).expect("test queue names are valid")
}

pub(crate) fn party(conn: u64) -> Party {
    Party { conn }
}

/// This process's pid, as a wake set lists it.
pub(crate) fn me() -> i32 {
    forkpool_shm::my_pid()
}

pub(crate) fn small() -> StoreOptions {
    StoreOptions {
        max_queues: 4,
        max_jobs: 16,
        max_payload: 40,
        max_waiters: 8,
        ..StoreOptions::default()
    }
}

/// Opens a store, waiting while a child forked by another test (which inherited this
/// process's descriptors) still holds the file's flock or path guard.
pub(crate) fn open_when_free(path: &Path, options: &StoreOptions) -> Result<Store, StoreError> {
    when_free(|| Store::open(path, options))
}

/// Runs `open` (a store's opening) again while a forked child of another test holds the
/// file's flock or path guard.
pub(crate) fn when_free(
    mut open: impl FnMut() -> Result<Store, StoreError>,
) -> Result<Store, StoreError> {
    let deadline = Instant::now() + HELD_TIMEOUT;
    loop {
        match open() {
            Err(StoreError::Locked { .. } | StoreError::PathInUse { .. })
                if Instant::now() < deadline =>
            {
                std::thread::sleep(Duration::from_millis(1));
            }
            result => return result,
        }
    }
}

impl Store {
    /// Every queue's figures and ready list (ids), and every waiter's state and job: the
    /// whole observable state, for before/after comparisons.
    pub(crate) fn snapshot(&self) -> String {
        let g = *self.region.geometry();
        let mut out = String::new();
        for qi in 0..self.region.get(hdr::QUEUE_COUNT) {
            let mut ready = Vec::new();
            let mut link = self.region.get(g.queue(qi, q::READY_HEAD));
            while link != 0 && ready.len() <= g.max_jobs as usize {
                ready.push(self.region.get(g.job(link - 1, j::ID)));
                link = self.region.get(g.job(link - 1, j::NEXT));
            }
            out += &format!(
                "{:?} {:?} {ready:?}\n",
                self.queue_name(qi),
                self.queue_stats(qi)
            );
        }
        for i in 0..self.region.get(hdr::WAITERS_HIGH) {
            let f = |field| self.region.get(g.waiter(i, field));
            out += &format!("waiter {i}: {} {}\n", f(w::STATE), f(w::JOB));
        }
        out
    }

    /// What a cold start would make of the state now: per queue its maxsize, counters and
    /// ready ids in order, the jobs handed out first (a cold start puts them back at the
    /// head, oldest first).
    pub(crate) fn durable_view(&self) -> String {
        let g = *self.region.geometry();
        let field = |job: u64, f| self.region.get(g.job(job, f));
        let mut out = String::new();
        for qi in 0..self.region.get(hdr::QUEUE_COUNT) {
            let mut held: Vec<u64> = (0..self.region.get(hdr::JOBS_HIGH))
                .filter(|&job| {
                    field(job, j::STATE) == job_state::RESERVED && field(job, j::QUEUE) == qi
                })
                .map(|job| field(job, j::ID))
                .collect();
            held.sort_unstable();
            let mut ready = held;
            let mut link = self.region.get(g.queue(qi, q::READY_HEAD));
            while link != 0 && ready.len() <= g.max_jobs as usize {
                ready.push(field(link - 1, j::ID));
                link = field(link - 1, j::NEXT);
            }
            let stats = self.queue_stats(qi);
            out += &format!(
                "{:?} maxsize={} put={} done={} ready={ready:?}\n",
                self.queue_name(qi),
                stats.maxsize,
                stats.put,
                stats.done,
            );
        }
        out
    }

    /// The consistency check of the cold start, on the live state.
    pub(crate) fn check(&self) {
        if let Err(finding) = crate::validate::check(&self.region) {
            panic!("inconsistent store: {finding}\n{}", self.snapshot());
        }
    }
}

/// Exits the child if the operation unwinds (a bug), so a child never returns to the harness.
struct ExitOnUnwind;

impl Drop for ExitOnUnwind {
    fn drop(&mut self) {
        // SAFETY: _exit is async-signal-safe and never returns.
        unsafe { libc::_exit(99) }
    }
}

/// Runs `op` in a forked child with crash point `k` armed (0 = none); returns its exit code
/// (CRASH_STATUS if it died at the point, 0 if `op` returned true).
pub(crate) fn run_in_child(store: &Store, k: u32, op: &dyn Fn(&Store) -> bool) -> i32 {
    // SAFETY: the child runs `arm`, the store operation and `_exit`, and never returns into
    // the test harness. The operation may allocate: glibc's malloc is reset in the child of
    // fork (its atfork handlers), and no other lock of this process is taken.
    match unsafe { fork() }.expect("fork") {
        ForkResult::Child => {
            let guard = ExitOnUnwind;
            arm(k);
            let ok = op(store);
            std::mem::forget(guard);
            // SAFETY: as above.
            unsafe { libc::_exit(if ok { 0 } else { 1 }) }
        }
        ForkResult::Parent { child } => match waitpid(child, None).expect("waitpid") {
            WaitStatus::Exited(_, code) => code,
            other => panic!("child ended unexpectedly: {other:?}"),
        },
    }
}
