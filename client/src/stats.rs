//! What one client thread measured, and how threads' figures merge: the latency histogram and
//! the counters of completed requests, bytes and network errors.

use std::time::Duration;

use hdrhistogram::Histogram;
use serde::Serialize;

/// Highest latency the histogram records exactly (larger values are clamped), in ns.
const MAX_LATENCY_NS: u64 = 3_600_000_000_000;
/// Significant decimal digits the histogram keeps.
const SIGNIFICANT_DIGITS: u8 = 3;

/// Counters of one thread (or, merged, of the run).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Counters {
    /// Replies counted in the measured window.
    pub completed: u64,
    /// Every reply checked, warm-up and drain included.
    pub replies: u64,
    /// Replies that were wrong (echo mismatch, malformed or unexpected bank reply, bytes nobody
    /// asked for).
    pub mismatches: u64,
    /// Bytes written and read during the measured window.
    pub bytes_sent: u64,
    pub bytes_received: u64,
    /// Connections established.
    pub connects: u64,
    /// Connection attempts that failed or timed out.
    pub connect_errors: u64,
    /// Connections that failed with an error (reset, broken pipe, ...) or whose EOF cut a
    /// reply in two.
    pub resets: u64,
    /// Connections the server closed cleanly (EOF at a reply boundary), as a recycled or
    /// draining worker does. Normal operation, not a network error: the connection is reopened.
    pub closed: u64,
    /// Idempotent requests sent again on a new connection because a clean close came before
    /// their reply.
    pub retried: u64,
    /// Connections dropped because a reply took longer than --timeout.
    pub timeouts: u64,
    /// Requests still unanswered when the run's hard deadline came.
    pub abandoned: u64,
}

impl Counters {
    /// Network failures: failed connects, resets and timeouts. Clean closes are not failures.
    pub fn network_errors(&self) -> u64 {
        self.connect_errors + self.resets + self.timeouts
    }
}

impl std::ops::AddAssign for Counters {
    fn add_assign(&mut self, o: Counters) {
        self.completed += o.completed;
        self.replies += o.replies;
        self.mismatches += o.mismatches;
        self.bytes_sent += o.bytes_sent;
        self.bytes_received += o.bytes_received;
        self.connects += o.connects;
        self.connect_errors += o.connect_errors;
        self.resets += o.resets;
        self.closed += o.closed;
        self.retried += o.retried;
        self.timeouts += o.timeouts;
        self.abandoned += o.abandoned;
    }
}

/// Microseconds of `d` per one of `count` things (0 when there are none).
pub fn micros_per(d: Duration, count: u64) -> f64 {
    if count > 0 {
        d.as_secs_f64() * 1e6 / count as f64
    } else {
        0.0
    }
}

/// Latencies of the counted replies, in nanoseconds.
#[derive(Debug, Clone)]
pub struct Latencies(Histogram<u64>);

impl Default for Latencies {
    fn default() -> Self {
        Latencies(
            Histogram::new_with_bounds(1, MAX_LATENCY_NS, SIGNIFICANT_DIGITS)
                .expect("constant histogram bounds are valid"),
        )
    }
}

impl Latencies {
    /// Records one latency (clamped into the histogram's range).
    pub fn record(&mut self, ns: u64) {
        self.0.saturating_record(ns.clamp(1, MAX_LATENCY_NS));
    }

    /// Adds another thread's latencies.
    pub fn merge(&mut self, other: &Latencies) {
        self.0
            .add(&other.0)
            .expect("histograms with the same bounds always merge");
    }

    /// Percentiles in microseconds (all zero when nothing was recorded).
    pub fn summary(&self) -> LatencySummary {
        let h = &self.0;
        let us = |ns: u64| ns as f64 / 1000.0;
        if h.is_empty() {
            return LatencySummary::default();
        }
        LatencySummary {
            mean_us: h.mean() / 1000.0,
            p50_us: us(h.value_at_quantile(0.50)),
            p90_us: us(h.value_at_quantile(0.90)),
            p99_us: us(h.value_at_quantile(0.99)),
            p999_us: us(h.value_at_quantile(0.999)),
            max_us: us(h.max()),
        }
    }
}

/// The latency figures reported.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct LatencySummary {
    pub mean_us: f64,
    pub p50_us: f64,
    pub p90_us: f64,
    pub p99_us: f64,
    pub p999_us: f64,
    pub max_us: f64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_come_from_the_recorded_latencies() {
        let mut l = Latencies::default();
        for us in 1..=1000u64 {
            l.record(us * 1000);
        }
        let s = l.summary();
        let near = |got: f64, want: f64| (got - want).abs() <= want * 0.002;
        assert!(near(s.p50_us, 500.0), "{s:?}");
        assert!(near(s.p90_us, 900.0), "{s:?}");
        assert!(near(s.p99_us, 990.0), "{s:?}");
        assert!(near(s.p999_us, 999.0), "{s:?}");
        assert!(near(s.max_us, 1000.0), "{s:?}");
        assert!(near(s.mean_us, 500.5), "{s:?}");
    }

    #[test]
    fn empty_and_out_of_range_latencies_are_harmless() {
        assert_eq!(Latencies::default().summary(), LatencySummary::default());
        let mut l = Latencies::default();
        l.record(0);
        l.record(u64::MAX);
        assert!(l.summary().max_us >= MAX_LATENCY_NS as f64 / 1000.0 * 0.99);
    }

    #[test]
    fn threads_merge_by_adding() {
        let (mut a, mut b) = (Latencies::default(), Latencies::default());
        a.record(1_000);
        b.record(3_000);
        a.merge(&b);
        assert!((a.summary().mean_us - 2.0).abs() < 0.01);
        let mut c = Counters {
            completed: 1,
            timeouts: 2,
            ..Counters::default()
        };
        c += Counters {
            completed: 3,
            resets: 1,
            closed: 5,
            retried: 7,
            ..Counters::default()
        };
        assert_eq!((c.completed, c.network_errors()), (4, 3));
        assert_eq!((c.closed, c.retried), (5, 7));
    }
}
