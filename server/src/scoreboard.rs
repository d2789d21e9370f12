//! The scoreboard: one cell per live worker in memory shared by the master and every worker
//! (an anonymous `MAP_SHARED` mapping made before the first fork). A worker writes its state,
//! heartbeat and counters there with relaxed atomic stores; the master reads them for hang
//! detection, `/metrics` and `/status`. Nothing on the serving path waits for anyone.

use std::num::NonZeroUsize;
use std::sync::atomic::{AtomicPtr, AtomicU64, AtomicU8, Ordering::Relaxed};
use std::time::Duration;

use forkpool_pgledger::{PgStats, LATENCY_BUCKETS_US};
use nix::sys::mman::{mmap_anonymous, MapFlags, ProtFlags};
use nix::time::{clock_gettime, ClockId};

use crate::proxy;
use crate::service::ServiceKind;

/// What a worker is doing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum WorkerState {
    Free = 0,
    Starting = 1,
    Idle = 2,
    Busy = 3,
    Draining = 4,
}

impl WorkerState {
    /// The states of a live worker.
    pub const LIVE: [WorkerState; 4] = [
        WorkerState::Starting,
        WorkerState::Idle,
        WorkerState::Busy,
        WorkerState::Draining,
    ];

    fn from_u8(value: u8) -> WorkerState {
        match value {
            1 => WorkerState::Starting,
            2 => WorkerState::Idle,
            3 => WorkerState::Busy,
            4 => WorkerState::Draining,
            _ => WorkerState::Free,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            WorkerState::Free => "free",
            WorkerState::Starting => "starting",
            WorkerState::Idle => "idle",
            WorkerState::Busy => "busy",
            WorkerState::Draining => "draining",
        }
    }
}

/// Per-service counters of one worker.
#[derive(Debug, Default)]
#[repr(C)]
pub struct ServiceCounters {
    pub open_connections: AtomicU64,
    /// Connections whose session waits for a wake-up (a blocking request, a database reply).
    pub waiting: AtomicU64,
    pub accepted: AtomicU64,
    pub requests: AtomicU64,
    pub bytes_in: AtomicU64,
    pub bytes_out: AtomicU64,
    /// Connections this worker passed to a successor while retiring.
    pub handed_over: AtomicU64,
    /// Connections this worker closed because it was replaced (a hand-over was impossible).
    pub closed_by_replacement: AtomicU64,
    /// TLS handshakes completed, and failed (a plain-text client, a distrustful one, ...).
    pub tls_handshakes: AtomicU64,
    pub tls_handshake_failures: AtomicU64,
    /// Bank AUTH outcomes, and requests denied for lack of rights or authentication.
    pub auth_accepted: AtomicU64,
    pub auth_failed: AtomicU64,
    pub auth_throttled: AtomicU64,
    pub denied: AtomicU64,
    /// PROXY headers by outcome (services behind a proxy), by [`proxy::Outcome::index`].
    pub proxy_headers: [AtomicU64; proxy::Outcome::ALL.len()],
}

/// The counters of [`ServiceCounters`] that outlive the worker (summed into totals when it
/// is reaped), as opposed to gauges like open connections.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lasting {
    Requests,
    HandedOver,
    ClosedByReplacement,
    TlsHandshakes,
    TlsHandshakeFailures,
    AuthAccepted,
    AuthFailed,
    AuthThrottled,
    Denied,
    ProxyHeaders(proxy::Outcome),
}

impl Lasting {
    pub const ALL: [Lasting; 16] = [
        Lasting::Requests,
        Lasting::HandedOver,
        Lasting::ClosedByReplacement,
        Lasting::TlsHandshakes,
        Lasting::TlsHandshakeFailures,
        Lasting::AuthAccepted,
        Lasting::AuthFailed,
        Lasting::AuthThrottled,
        Lasting::Denied,
        Lasting::ProxyHeaders(proxy::Outcome::V1),
        Lasting::ProxyHeaders(proxy::Outcome::V2),
        Lasting::ProxyHeaders(proxy::Outcome::Local),
        Lasting::ProxyHeaders(proxy::Outcome::Missing),
        Lasting::ProxyHeaders(proxy::Outcome::Malformed),
        Lasting::ProxyHeaders(proxy::Outcome::Truncated),
        Lasting::ProxyHeaders(proxy::Outcome::Timeout),
    ];

    /// Position in [`Lasting::ALL`] (and in [`ServiceTotals`]).
    fn index(self) -> usize {
        Lasting::ALL
            .iter()
            .position(|&count| count == self)
            .expect("every count is in Lasting::ALL")
    }

    fn counter(self, counters: &ServiceCounters) -> &AtomicU64 {
        match self {
            Lasting::Requests => &counters.requests,
            Lasting::HandedOver => &counters.handed_over,
            Lasting::ClosedByReplacement => &counters.closed_by_replacement,
            Lasting::TlsHandshakes => &counters.tls_handshakes,
            Lasting::TlsHandshakeFailures => &counters.tls_handshake_failures,
            Lasting::AuthAccepted => &counters.auth_accepted,
            Lasting::AuthFailed => &counters.auth_failed,
            Lasting::AuthThrottled => &counters.auth_throttled,
            Lasting::Denied => &counters.denied,
            Lasting::ProxyHeaders(outcome) => &counters.proxy_headers[outcome.index()],
        }
    }
}

/// The lasting counts of one service, summed over workers (live or gone).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct ServiceTotals([u64; Lasting::ALL.len()]);

impl ServiceTotals {
    /// A worker's counts for one service.
    pub fn of(counters: &ServiceCounters) -> ServiceTotals {
        ServiceTotals(Lasting::ALL.map(|count| count.counter(counters).load(Relaxed)))
    }

    pub fn get(&self, count: Lasting) -> u64 {
        self.0[count.index()]
    }

    pub fn add(&mut self, other: ServiceTotals) {
        for (mine, theirs) in self.0.iter_mut().zip(other.0) {
            *mine += theirs;
        }
    }
}

/// One worker's database pool (a PostgreSQL ledger), as it last published it: a copy of its
/// [`PgStats`], whose counters live on the pool's own thread in the worker.
#[derive(Debug, Default)]
#[repr(C)]
pub struct DbCounters {
    connections: AtomicU64,
    connections_up: AtomicU64,
    in_flight: AtomicU64,
    completed: AtomicU64,
    errors: AtomicU64,
    retries: AtomicU64,
    unavailable: AtomicU64,
    resolved: AtomicU64,
    latency: [AtomicU64; LATENCY_BUCKETS_US.len() + 1],
    latency_sum_us: AtomicU64,
}

impl DbCounters {
    /// The fields of [`PgStats`] but the latency buckets, in a fixed order (shared by
    /// `publish` and `snapshot`, so neither can forget one).
    fn scalars(&self) -> [&AtomicU64; 9] {
        [
            &self.connections,
            &self.connections_up,
            &self.in_flight,
            &self.completed,
            &self.errors,
            &self.retries,
            &self.unavailable,
            &self.resolved,
            &self.latency_sum_us,
        ]
    }

    /// Copies the worker's pool figures into its cell.
    pub fn publish(&self, stats: &PgStats) {
        let values = [
            stats.connections,
            stats.connections_up,
            stats.in_flight,
            stats.completed,
            stats.errors,
            stats.retries,
            stats.unavailable,
            stats.resolved,
            stats.latency_sum_us,
        ];
        for (counter, value) in self.scalars().into_iter().zip(values) {
            counter.store(value, Relaxed);
        }
        for (counter, value) in self.latency.iter().zip(&stats.latency) {
            counter.store(*value, Relaxed);
        }
    }

    /// The figures last published.
    pub fn snapshot(&self) -> PgStats {
        let [connections, connections_up, in_flight, completed, errors, retries, unavailable, resolved, latency_sum_us] =
            self.scalars().map(|counter| counter.load(Relaxed));
        PgStats {
            connections,
            connections_up,
            in_flight,
            completed,
            errors,
            retries,
            unavailable,
            resolved,
            latency: self.latency.iter().map(|c| c.load(Relaxed)).collect(),
            latency_sum_us,
        }
    }

    fn reset(&self) {
        for counter in self.scalars().into_iter().chain(&self.latency) {
            counter.store(0, Relaxed);
        }
    }
}

/// Adds `other`'s figures to `sum` (pools of several workers); the bucket lists are as long
/// as [`LATENCY_BUCKETS_US`] plus one, or empty in a fresh sum.
pub fn add_db_stats(sum: &mut PgStats, other: &PgStats) {
    sum.connections += other.connections;
    sum.connections_up += other.connections_up;
    sum.in_flight += other.in_flight;
    sum.completed += other.completed;
    sum.errors += other.errors;
    sum.retries += other.retries;
    sum.unavailable += other.unavailable;
    sum.resolved += other.resolved;
    sum.latency_sum_us += other.latency_sum_us;
    sum.latency
        .resize(other.latency.len().max(sum.latency.len()), 0);
    for (mine, theirs) in sum.latency.iter_mut().zip(&other.latency) {
        *mine += theirs;
    }
}

/// One worker's cell. All-zero bytes are a valid, free cell.
#[derive(Debug, Default)]
#[repr(C, align(64))]
pub struct WorkerCell {
    state: AtomicU8,
    /// CLOCK_MONOTONIC nanoseconds of the last beat.
    heartbeat_ns: AtomicU64,
    /// Wall-clock seconds since the epoch at start.
    pub started_unix: AtomicU64,
    services: [ServiceCounters; ServiceKind::ALL.len()],
    /// Its database pool, with a PostgreSQL ledger.
    pub db: DbCounters,
}

impl WorkerCell {
    pub fn state(&self) -> WorkerState {
        WorkerState::from_u8(self.state.load(Relaxed))
    }

    pub fn set_state(&self, state: WorkerState) {
        self.state.store(state as u8, Relaxed);
    }

    /// Records that the worker is alive now.
    pub fn beat(&self) {
        self.heartbeat_ns.store(monotonic_ns(), Relaxed);
    }

    /// Time since the last beat.
    pub fn silence(&self) -> Duration {
        Duration::from_nanos(monotonic_ns().saturating_sub(self.heartbeat_ns.load(Relaxed)))
    }

    /// Moves the last beat `by` into the past (tests of hang detection).
    #[cfg(test)]
    pub fn backdate(&self, by: Duration) {
        let nanos = u64::try_from(by.as_nanos()).unwrap_or(u64::MAX);
        self.heartbeat_ns
            .fetch_sub(nanos.min(monotonic_ns()), Relaxed);
    }

    pub fn counters(&self, kind: ServiceKind) -> &ServiceCounters {
        &self.services[kind.index()]
    }

    /// Prepares the cell for a new worker (the master, before it forks).
    pub fn reset(&self) {
        self.db.reset();
        self.set_state(WorkerState::Starting);
        self.beat();
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        self.started_unix.store(now, Relaxed);
        for counters in &self.services {
            for counter in [
                &counters.open_connections,
                &counters.waiting,
                &counters.accepted,
                &counters.requests,
                &counters.bytes_in,
                &counters.bytes_out,
                &counters.handed_over,
                &counters.closed_by_replacement,
                &counters.tls_handshakes,
                &counters.tls_handshake_failures,
                &counters.auth_accepted,
                &counters.auth_failed,
                &counters.auth_throttled,
                &counters.denied,
            ]
            .into_iter()
            .chain(&counters.proxy_headers)
            {
                counter.store(0, Relaxed);
            }
        }
    }
}

/// The shared array of cells.
pub struct Scoreboard {
    cells: &'static [WorkerCell],
}

impl Scoreboard {
    /// Maps `capacity` zeroed cells shared with every process forked afterwards.
    pub fn new(capacity: usize) -> nix::Result<Scoreboard> {
        let bytes = capacity.max(1) * std::mem::size_of::<WorkerCell>();
        let length = NonZeroUsize::new(bytes).expect("the scoreboard has at least one cell");
        // SAFETY: a fresh anonymous mapping is private to this call until it returns; it is
        // zero-filled, page-aligned (so aligned for WorkerCell), `bytes` long, and all-zero
        // bytes are a valid WorkerCell (atomics of 0). It is never unmapped, so the
        // 'static slice stays valid for the life of the process (and of its forks, which
        // share the same pages).
        let cells = unsafe {
            let base = mmap_anonymous(
                None,
                length,
                ProtFlags::PROT_READ | ProtFlags::PROT_WRITE,
                MapFlags::MAP_SHARED,
            )?;
            std::slice::from_raw_parts(base.as_ptr().cast::<WorkerCell>(), capacity.max(1))
        };
        Ok(Scoreboard { cells })
    }

    pub fn cell(&self, index: usize) -> &'static WorkerCell {
        &self.cells[index]
    }

    pub fn capacity(&self) -> usize {
        self.cells.len()
    }
}

/// The cell of the worker running in this process, for the ledger's wait hook (a plain
/// `fn()` that cannot carry state).
static MY_CELL: AtomicPtr<WorkerCell> = AtomicPtr::new(std::ptr::null_mut());

/// Makes [`beat_from_hook`] beat on `cell` (a worker, right after fork).
pub fn set_my_cell(cell: &'static WorkerCell) {
    MY_CELL.store(std::ptr::from_ref(cell).cast_mut(), Relaxed);
}

/// Beats for this process's worker: called while it waits for a ledger lock, so a worker
/// blocked behind a stopped one is not mistaken for a hung one.
pub fn beat_from_hook() {
    let cell = MY_CELL.load(Relaxed);
    // SAFETY: the only non-null value ever stored is a &'static WorkerCell (set_my_cell).
    if let Some(cell) = unsafe { cell.as_ref() } {
        cell.beat();
    }
}

fn monotonic_ns() -> u64 {
    clock_gettime(ClockId::CLOCK_MONOTONIC).map_or(0, |t| {
        u64::try_from(t.tv_sec()).unwrap_or(0) * 1_000_000_000
            + u64::try_from(t.tv_nsec()).unwrap_or(0)
    })
}
