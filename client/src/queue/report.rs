//! The figures of a queue run: one serialisable [`QueueReport`] (what `--json` prints), its
//! text rendering, and the exit status they imply.

use serde::Serialize;

use super::jobs::JobSummary;
use super::roles::QueueCounters;
use crate::args::Protocol;
use crate::report::{EXIT_CLEAN, EXIT_DEGRADED, EXIT_WRONG};
use crate::stats::LatencySummary;

/// Every figure of a queue run.
#[derive(Debug, Clone, Serialize)]
pub struct QueueReport {
    pub mode: &'static str,
    pub protocol: Protocol,
    pub addr: String,
    pub queue: String,
    pub producers: usize,
    pub consumers: usize,
    /// Payload bytes per job.
    pub size: usize,
    pub backlog: u64,
    pub seed: u64,
    pub warmup_s: f64,
    pub window_s: f64,
    /// Jobs whose DONE was acknowledged in the measured window.
    pub jobs: u64,
    pub jobs_per_sec: f64,
    /// From the PUT being sent to the DONE being acknowledged.
    pub latency: LatencySummary,
    pub counters: QueueCounters,
    /// Every job of the run, warm-up and drain included.
    pub book: JobSummary,
    pub client_cpu_us: f64,
    pub client_cpu_us_per_job: f64,
    pub server_pid: Vec<u32>,
    pub server_processes: Option<usize>,
    pub server_cpu_us: Option<f64>,
    pub server_cpu_us_per_job: Option<f64>,
    /// The first wrong replies or payloads, printable.
    pub mismatch_samples: Vec<String>,
    pub verdict: String,
    pub exit_code: i32,
}

/// The exit status and its reason.
pub fn judge(jobs: u64, c: &QueueCounters, book: &JobSummary) -> (i32, String) {
    let mut wrong = Vec::new();
    if c.wrong > 0 {
        wrong.push(format!("{} wrong replies or payloads", c.wrong));
    }
    if book.redelivered > c.abandoned {
        wrong.push(format!(
            "{} jobs delivered again, {} explained by dropped consumer connections",
            book.redelivered, c.abandoned
        ));
    }
    let lost_explained = c.abandoned > 0 || c.network_errors() > 0;
    if book.missing > 0 && !lost_explained {
        wrong.push(format!("{} jobs put and never done", book.missing));
    }
    if !wrong.is_empty() {
        return (EXIT_WRONG, format!("FAILED: {}", wrong.join(", ")));
    }
    let mut degraded = Vec::new();
    if c.network_errors() > 0 {
        degraded.push(format!("{} network errors", c.network_errors()));
    }
    if book.missing > 0 {
        degraded.push(format!(
            "{} jobs put and never done after {} abandoned by dropped connections",
            book.missing, c.abandoned
        ));
    }
    if jobs == 0 {
        degraded.push("no job done in the window".to_string());
    }
    if !degraded.is_empty() {
        return (EXIT_DEGRADED, format!("DEGRADED: {}", degraded.join(", ")));
    }
    (
        EXIT_CLEAN,
        "OK: every job checked, every job put was done".to_string(),
    )
}

impl QueueReport {
    /// The human-readable report.
    pub fn text(&self) -> String {
        let l = &self.latency;
        let c = &self.counters;
        let b = &self.book;
        let server = match (self.server_cpu_us_per_job, self.server_processes) {
            (Some(per), Some(n)) => format!("server {per:.2} us/job ({n} processes), "),
            _ => String::new(),
        };
        let mut lines = vec![
            format!(
                "queue {} {} '{}': {} producers + {} consumers, {} B payloads, backlog {}, {:.2} s measured after {:.2} s warm-up",
                self.protocol.name(), self.addr, self.queue, self.producers, self.consumers,
                self.size, self.backlog, self.window_s, self.warmup_s
            ),
            format!("  jobs       {} done in the measured window  ({:.0} jobs/s)", self.jobs, self.jobs_per_sec),
            format!(
                "  latency us put to done: p50 {:.1}  p90 {:.1}  p99 {:.1}  p99.9 {:.1}  max {:.1}  mean {:.1}",
                l.p50_us, l.p90_us, l.p99_us, l.p999_us, l.max_us, l.mean_us
            ),
            format!("  cpu        {server}client {:.2} us/job", self.client_cpu_us_per_job),
            format!(
                "  book       {} issued, {} put, {} unknown, {} refused; {} done, {} delivered again, {} never done",
                b.issued, b.put, b.put_unknown, b.put_refused, b.done, b.redelivered, b.missing
            ),
            format!(
                "  network    {} connects, {} connect errors, {} resets, {} closes, {} timeouts, {} jobs abandoned",
                c.connects, c.connect_errors, c.resets, c.closed, c.timeouts, c.abandoned
            ),
        ];
        lines.extend(
            self.mismatch_samples
                .iter()
                .map(|s| format!("  wrong: {s}")),
        );
        lines.push(self.verdict.clone());
        lines.iter().map(|l| format!("{l}\n")).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lost_or_doubled_jobs_fail_unless_a_dropped_connection_explains_them() {
        let clean = QueueCounters::default();
        let book = JobSummary {
            put: 10,
            done: 10,
            ..JobSummary::default()
        };
        assert_eq!(judge(10, &clean, &book).0, EXIT_CLEAN);
        assert_eq!(judge(0, &clean, &book).0, EXIT_DEGRADED);
        let missing = JobSummary { missing: 1, ..book };
        assert_eq!(judge(10, &clean, &missing).0, EXIT_WRONG);
        let dropped = QueueCounters {
            abandoned: 1,
            closed: 1,
            ..clean
        };
        assert_eq!(judge(10, &dropped, &missing).0, EXIT_DEGRADED);
        let again = JobSummary {
            redelivered: 1,
            ..book
        };
        assert_eq!(judge(10, &clean, &again).0, EXIT_WRONG);
        assert_eq!(judge(10, &dropped, &again).0, EXIT_CLEAN);
        let damaged = QueueCounters { wrong: 1, ..clean };
        assert_eq!(
            judge(10, &damaged, &book),
            (EXIT_WRONG, "FAILED: 1 wrong replies or payloads".into())
        );
    }
}
