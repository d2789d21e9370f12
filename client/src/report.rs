//! The run's figures: one serialisable [`Report`], its text rendering, and the exit status it
//! implies (see `--help`).

use serde::Serialize;

use crate::book::Book;
use crate::load::Text;
use crate::stats::{Counters, LatencySummary};

/// Every figure of a run; `--json` prints exactly this.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub mode: &'static str,
    pub addr: String,
    pub connections: usize,
    pub pipeline: usize,
    pub threads: usize,
    /// Echo line size in bytes (echo mode).
    pub size: Option<usize>,
    /// What the echo lines are made of (echo mode).
    pub text: Option<Text>,
    /// Open-loop rate in requests/s, None in the closed loop.
    pub rate: Option<f64>,
    pub seed: u64,
    pub warmup_s: f64,
    /// Length of the measured window.
    pub window_s: f64,
    /// Replies received in the measured window (the throughput and latency figures are
    /// theirs); `counters.replies` counts every reply checked.
    pub requests: u64,
    pub requests_per_sec: f64,
    pub mb_per_sec_sent: f64,
    pub mb_per_sec_received: f64,
    pub latency: LatencySummary,
    pub counters: Counters,
    /// The client's own CPU (all threads) during the window.
    pub client_cpu_us: f64,
    pub client_cpu_us_per_request: f64,
    /// `--server-pid`, every one given.
    pub server_pid: Vec<u32>,
    /// Processes in the server's tree (trees) at the end of the window.
    pub server_processes: Option<usize>,
    pub server_cpu_us: Option<f64>,
    pub server_cpu_us_per_request: Option<f64>,
    /// The first wrong replies, printable.
    pub mismatch_samples: Vec<String>,
    pub bank: Option<BankReport>,
    /// Why the exit status is what it is.
    pub verdict: String,
    pub exit_code: i32,
}

/// Bank mode's bookkeeping and audit.
#[derive(Debug, Clone, Serialize)]
pub struct BankReport {
    pub accounts: usize,
    pub opening_balance: u64,
    /// AUDIT before the run, and after opening the accounts.
    pub before_total: u128,
    pub before_accounts: u64,
    pub opening_total: u128,
    pub book: Book,
    /// Operations whose outcome is unknown and could change the total.
    pub unknown_ops: u64,
    /// Opening total + acknowledged deposits - acknowledged withdrawals.
    pub expected_total: i128,
    pub audit_total: Option<u128>,
    pub audit_accounts: Option<u64>,
    /// audit_total - expected_total.
    pub difference: Option<i128>,
    /// The difference lies within what the unknown operations can explain.
    pub audit_ok: Option<bool>,
    pub audit_error: Option<String>,
}

/// Exit statuses.
pub const EXIT_CLEAN: i32 = 0;
pub const EXIT_WRONG: i32 = 1;
pub const EXIT_DEGRADED: i32 = 3;

/// The exit status and the reason, from the figures.
/// With `closes_are_errors` (`--no-reconnect`), a clean close by the server degrades the run.
pub fn judge(
    requests: u64,
    counters: &Counters,
    bank: Option<&BankReport>,
    closes_are_errors: bool,
) -> (i32, String) {
    let mut wrong = Vec::new();
    if counters.mismatches > 0 {
        wrong.push(format!("{} wrong replies", counters.mismatches));
    }
    if let Some(BankReport {
        audit_ok: Some(false),
        difference: Some(d),
        ..
    }) = bank
    {
        wrong.push(format!("AUDIT differs from the expected total by {d}"));
    }
    if !wrong.is_empty() {
        return (EXIT_WRONG, format!("FAILED: {}", wrong.join(", ")));
    }
    let mut degraded = Vec::new();
    if counters.network_errors() > 0 {
        degraded.push(format!("{} network errors", counters.network_errors()));
    }
    if closes_are_errors && counters.closed > 0 {
        degraded.push(format!(
            "{} connections closed by the server (--no-reconnect)",
            counters.closed
        ));
    }
    if requests == 0 {
        degraded.push("no request completed in the window".to_string());
    }
    if let Some(BankReport {
        audit_error: Some(e),
        ..
    }) = bank
    {
        degraded.push(format!("no closing AUDIT ({e})"));
    }
    if !degraded.is_empty() {
        return (EXIT_DEGRADED, format!("DEGRADED: {}", degraded.join(", ")));
    }
    (
        EXIT_CLEAN,
        "OK: every reply checked and correct".to_string(),
    )
}

impl Report {
    /// The human-readable report.
    pub fn text(&self) -> String {
        let mut s = String::new();
        let mut line = |l: String| {
            s.push_str(&l);
            s.push('\n');
        };
        let shape = match self.rate {
            Some(r) => format!("open loop at {r} req/s"),
            None => "closed loop".to_string(),
        };
        let size = match (self.size, self.text) {
            (Some(b), Some(Text::Ascii)) => format!(", {b} B ASCII lines"),
            (Some(b), _) => format!(", {b} B lines"),
            (None, _) => String::new(),
        };
        line(format!(
            "{} {}: {} connections x pipeline {}, {} threads, {shape}{size}, {:.2} s measured after {:.2} s warm-up",
            self.mode, self.addr, self.connections, self.pipeline, self.threads, self.window_s, self.warmup_s
        ));
        line(format!(
            "  requests   {} in the measured window  ({:.0} req/s, {:.2} MB/s out, {:.2} MB/s in)",
            self.requests, self.requests_per_sec, self.mb_per_sec_sent, self.mb_per_sec_received
        ));
        let l = &self.latency;
        line(format!(
            "  latency us p50 {:.1}  p90 {:.1}  p99 {:.1}  p99.9 {:.1}  max {:.1}  mean {:.1}",
            l.p50_us, l.p90_us, l.p99_us, l.p999_us, l.max_us, l.mean_us
        ));
        let server = match (self.server_cpu_us_per_request, self.server_processes) {
            (Some(per), Some(n)) => format!("server {per:.2} us/req ({n} processes), "),
            _ => String::new(),
        };
        line(format!(
            "  cpu        {server}client {:.2} us/req",
            self.client_cpu_us_per_request
        ));
        let c = &self.counters;
        line(format!(
            "  checked    {} replies in all (warm-up and end-of-window in-flight included), {} wrong",
            c.replies, c.mismatches
        ));
        line(format!(
            "  network    {} connects, {} connect errors, {} resets, {} timeouts, {} abandoned at the deadline",
            c.connects, c.connect_errors, c.resets, c.timeouts, c.abandoned
        ));
        line(format!(
            "  closes     {} clean closes by the server, {} requests sent again",
            c.closed, c.retried
        ));
        for sample in &self.mismatch_samples {
            line(format!("  wrong: {sample}"));
        }
        if let Some(b) = &self.bank {
            line(format!(
                "  bank       {} accounts; opening total {}; deposited {}, withdrawn {}; {} applied, {} declined",
                b.accounts, b.opening_total, b.book.deposited, b.book.withdrawn, b.book.applied, b.book.declined
            ));
            line(format!(
                "  unknown    {} deposits (+{}), {} withdrawals (-{}), {} transfers",
                b.book.unknown_deposits,
                b.book.unknown_deposit_sum,
                b.book.unknown_withdrawals,
                b.book.unknown_withdrawal_sum,
                b.book.unknown_transfers
            ));
            match (&b.audit_total, &b.audit_error) {
                (Some(total), _) => line(format!(
                    "  audit      {total} (expected {} -{}/+{}), difference {}: {}",
                    b.expected_total,
                    b.book.unknown_withdrawal_sum,
                    b.book.unknown_deposit_sum,
                    b.difference.unwrap_or(0),
                    if b.audit_ok == Some(true) {
                        "matches"
                    } else {
                        "MONEY CREATED OR LOST"
                    }
                )),
                (None, Some(e)) => line(format!("  audit      unavailable: {e}")),
                (None, None) => {}
            }
        }
        line(self.verdict.clone());
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wrong_replies_fail_network_errors_degrade() {
        let clean = Counters {
            completed: 10,
            ..Counters::default()
        };
        assert_eq!(judge(10, &clean, None, false).0, EXIT_CLEAN);
        assert_eq!(judge(0, &clean, None, false).0, EXIT_DEGRADED);
        let reset = Counters { resets: 1, ..clean };
        assert_eq!(
            judge(10, &reset, None, false),
            (EXIT_DEGRADED, "DEGRADED: 1 network errors".into())
        );
        let closed = Counters {
            closed: 3,
            retried: 4,
            ..clean
        };
        assert_eq!(judge(10, &closed, None, false).0, EXIT_CLEAN);
        assert_eq!(
            judge(10, &closed, None, true).0,
            EXIT_DEGRADED,
            "--no-reconnect: a close is an error"
        );
        let timeout = Counters {
            timeouts: 1,
            ..closed
        };
        assert_eq!(judge(10, &timeout, None, false).0, EXIT_DEGRADED);
        let wrong = Counters {
            mismatches: 2,
            ..reset
        };
        assert_eq!(
            judge(10, &wrong, None, false),
            (EXIT_WRONG, "FAILED: 2 wrong replies".into())
        );
    }

    #[test]
    fn an_unexplained_audit_fails() {
        let bank = BankReport {
            accounts: 2,
            opening_balance: 10,
            before_total: 0,
            before_accounts: 0,
            opening_total: 20,
            book: Book::default(),
            unknown_ops: 0,
            expected_total: 20,
            audit_total: Some(21),
            audit_accounts: Some(2),
            difference: Some(1),
            audit_ok: Some(false),
            audit_error: None,
        };
        let counters = Counters::default();
        assert_eq!(judge(5, &counters, Some(&bank), false).0, EXIT_WRONG);
        let unavailable = BankReport {
            audit_total: None,
            difference: None,
            audit_ok: None,
            audit_error: Some("refused".into()),
            ..bank
        };
        assert_eq!(
            judge(5, &counters, Some(&unavailable), false).0,
            EXIT_DEGRADED
        );
    }
}
