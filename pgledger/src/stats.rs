//! The pool's counters for `--status-addr`: connections, requests in flight, errors, retries,
//! and a latency histogram with fixed buckets. Atomics written by the pool's thread, read by
//! anyone; a snapshot is not one instant (each counter is read on its own).

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

/// Upper bounds of the latency buckets (submission to completion), in microseconds; one more
/// bucket counts everything slower.
pub const LATENCY_BUCKETS_US: [u64; 14] = [
    250, 500, 1_000, 2_500, 5_000, 10_000, 25_000, 50_000, 100_000, 250_000, 500_000, 1_000_000,
    2_500_000, 5_000_000,
];

/// A snapshot of the pool's state.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PgStats {
    /// Connections the pool is configured to open.
    pub connections: u64,
    /// Connections open right now.
    pub connections_up: u64,
    /// Requests submitted and not yet completed (queued or being served).
    pub in_flight: u64,
    /// Requests completed.
    pub completed: u64,
    /// Failed connection attempts, broken connections and database errors.
    pub errors: u64,
    /// Transactions tried again after a serialization failure, a deadlock or a lost race.
    pub retries: u64,
    /// Requests answered `ERR unavailable`.
    pub unavailable: u64,
    /// Requests whose commit outcome was unknown and was then read back from the database.
    pub resolved: u64,
    /// Requests per latency bucket: `latency[i]` counts those at most
    /// `LATENCY_BUCKETS_US[i]` µs, the last entry those slower than every bound.
    pub latency: Vec<u64>,
    /// The latencies of all completed requests added up, in µs (a histogram's `_sum`).
    pub latency_sum_us: u64,
}

/// The live counters behind [`PgStats`].
#[derive(Debug, Default)]
pub(crate) struct Counters {
    pub(crate) connections_up: AtomicU64,
    pub(crate) submitted: AtomicU64,
    pub(crate) completed: AtomicU64,
    pub(crate) errors: AtomicU64,
    pub(crate) retries: AtomicU64,
    pub(crate) unavailable: AtomicU64,
    pub(crate) resolved: AtomicU64,
    latency: [AtomicU64; LATENCY_BUCKETS_US.len() + 1],
    latency_sum_us: AtomicU64,
}

impl Counters {
    pub(crate) fn bump(counter: &AtomicU64) {
        counter.fetch_add(1, Relaxed);
    }

    /// Counts one completion that took `took`.
    pub(crate) fn completed_in(&self, took: Duration) {
        let micros = u64::try_from(took.as_micros()).unwrap_or(u64::MAX);
        let bucket = LATENCY_BUCKETS_US
            .iter()
            .position(|&bound| micros <= bound)
            .unwrap_or(LATENCY_BUCKETS_US.len());
        self.latency[bucket].fetch_add(1, Relaxed);
        self.latency_sum_us.fetch_add(micros, Relaxed);
        self.completed.fetch_add(1, Relaxed);
    }

    pub(crate) fn snapshot(&self, connections: usize) -> PgStats {
        let completed = self.completed.load(Relaxed);
        PgStats {
            connections: connections as u64,
            connections_up: self.connections_up.load(Relaxed),
            in_flight: self.submitted.load(Relaxed).saturating_sub(completed),
            completed,
            errors: self.errors.load(Relaxed),
            retries: self.retries.load(Relaxed),
            unavailable: self.unavailable.load(Relaxed),
            resolved: self.resolved.load(Relaxed),
            latency: self.latency.iter().map(|c| c.load(Relaxed)).collect(),
            latency_sum_us: self.latency_sum_us.load(Relaxed),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn latencies_land_in_the_first_bucket_that_holds_them() {
        let counters = Counters::default();
        counters.completed_in(Duration::from_micros(250));
        counters.completed_in(Duration::from_micros(251));
        counters.completed_in(Duration::from_secs(60));
        let stats = counters.snapshot(4);
        assert_eq!(stats.latency[0], 1);
        assert_eq!(stats.latency[1], 1);
        assert_eq!(stats.latency[LATENCY_BUCKETS_US.len()], 1);
        assert_eq!(stats.completed, 3);
        assert_eq!(stats.latency_sum_us, 250 + 251 + 60_000_000);
        assert_eq!(stats.connections, 4);
    }
}
