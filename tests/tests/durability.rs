//! `--fsync always` against the real binary: the system-call order shows that no bank reply
//! leaves before the `fdatasync` that covers its log record, a torn log tail is cut at the
//! last whole record, and a damaged record in the middle of the log refuses the start and
//! changes no file. (The power-loss simulation is the ledger crate's `sim_tests.rs`; the
//! crash, chaos and restart suites of `bank.rs` run under both policies.)

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use forkpool_testkit::{one_error_line, request_line, tool, wait_until, Server, Signal};

/// Deposits made one at a time, each acknowledged before the next.
const DEPOSITS: u64 = 20;
const TRACE_TIMEOUT: Duration = Duration::from_secs(30);

#[test]
fn no_bank_reply_is_written_before_the_fdatasync_that_covers_it() {
    let Some(strace) = tool("strace") else {
        return;
    };
    let dir = Arc::new(tempfile::tempdir().expect("a temporary directory"));
    let trace = dir.path().join("trace.txt");
    let path = |p: &Path| p.to_str().expect("a UTF-8 path").to_string();
    let mut server = Server::builder()
        .data_dir(Arc::clone(&dir))
        .wrapper([
            path(&strace),
            "-DD".into(),
            "-f".into(),
            "-qq".into(),
            "-s".into(),
            "32".into(),
            "-e".into(),
            "trace=pwrite64,fdatasync,write,sendto".into(),
            "-o".into(),
            path(&trace),
        ])
        .args(["--fsync", "always", "--workers", "1"])
        .start();
    let mut bank = server.connect_bank();
    for i in 1..=DEPOSITS {
        let expected = format!("OK {}", i * (i + 1) / 2);
        assert_eq!(request_line(&mut bank, &format!("DEPOSIT a {i}")), expected);
    }
    assert_eq!(
        request_line(&mut bank, "BALANCE a"),
        format!("OK {}", DEPOSITS * (DEPOSITS + 1) / 2)
    );
    drop(bank);
    server.signal(Signal::SIGTERM);
    assert!(server.wait_exit(TRACE_TIMEOUT).success());
    let text = wait_until("the trace of every reply", TRACE_TIMEOUT, || {
        let text = std::fs::read_to_string(&trace).ok()?;
        (replies_in(&text) > DEPOSITS as usize).then_some(text)
    });
    let checked = check_order(&text);
    assert!(checked > DEPOSITS as usize, "{checked} replies checked");
}

/// How many reply writes the trace shows.
fn replies_in(trace: &str) -> usize {
    trace.lines().filter(|line| is_reply(line)).count()
}

fn is_reply(line: &str) -> bool {
    (line.contains("sendto(") || line.contains(" write(")) && line.contains(", \"OK ")
}

/// Checks that before each reply write, an `fdatasync` that started after the last log
/// write completed has returned. Returns how many replies it checked.
fn check_order(trace: &str) -> usize {
    let mut last_log_write = None;
    // Per thread: the line where its unfinished fdatasync started.
    let mut syncing = std::collections::HashMap::new();
    let mut newest_sync_done_started_at = None;
    let mut replies = 0;
    for (i, line) in trace.lines().enumerate() {
        let thread = line.split_whitespace().next().unwrap_or_default();
        let log_write_done = (line.contains("pwrite64(") && !line.contains("<unfinished"))
            || line.contains("<... pwrite64 resumed>");
        if log_write_done {
            last_log_write = Some(i);
        } else if line.contains("fdatasync(") && line.contains("<unfinished") {
            syncing.insert(thread.to_string(), i);
        } else if line.contains("fdatasync(") && line.trim_end().ends_with("= 0") {
            newest_sync_done_started_at = newest_sync_done_started_at.max(Some(i));
        } else if line.contains("<... fdatasync resumed>") && line.trim_end().ends_with("= 0") {
            let started = syncing.remove(thread).unwrap_or(i);
            newest_sync_done_started_at = newest_sync_done_started_at.max(Some(started));
        } else if is_reply(line) {
            replies += 1;
            assert!(
                newest_sync_done_started_at > last_log_write,
                "line {}: a reply written before an fdatasync covered the log write at line \
                 {last_log_write:?}:\n{line}\n{trace}",
                i + 1
            );
        }
    }
    replies
}

/// A server under `--fsync always` that made `DEPOSITS` deposits to `a` (1, 2, 3, ...),
/// each acknowledged before the next, then stopped; returns its data directory.
fn ledger_with_deposits() -> Arc<tempfile::TempDir> {
    let mut server = Server::builder().args(["--fsync", "always"]).start();
    let mut bank = server.connect_bank();
    for i in 1..=DEPOSITS {
        assert!(request_line(&mut bank, &format!("DEPOSIT a {i}")).starts_with("OK "));
    }
    drop(bank);
    server.signal(Signal::SIGTERM);
    assert!(server.wait_exit(Duration::from_secs(10)).success());
    server.data_dir()
}

/// The offsets of the records at the start of a log segment (each starts with its magic
/// and its length).
fn record_offsets(segment: &[u8]) -> Vec<usize> {
    let mut offsets = Vec::new();
    let mut at = 0;
    while segment.get(at..at + 4) == Some(b"FPLR") {
        offsets.push(at);
        let len = u32::from_le_bytes(segment[at + 4..at + 8].try_into().expect("4 bytes"));
        at += len as usize;
    }
    offsets
}

fn files_of(dir: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    [
        "ledger.bin",
        "ledger.bin.ckpt",
        "ledger.bin.log0",
        "ledger.bin.log1",
    ]
    .iter()
    .map(|name| {
        let path = dir.join(name);
        let bytes = std::fs::read(&path).expect("read a ledger file");
        (path, bytes)
    })
    .collect()
}

/// Flips a byte in the middle of record `index` of segment 0.
fn damage_record(dir: &Path, index: usize) {
    let path = dir.join("ledger.bin.log0");
    let mut segment = std::fs::read(&path).expect("read the log");
    let offsets = record_offsets(&segment);
    assert_eq!(offsets.len(), DEPOSITS as usize, "one record per deposit");
    segment[offsets[index] + 20] ^= 0x40;
    std::fs::write(&path, segment).expect("write the log");
}

#[test]
fn a_torn_log_tail_is_cut_at_the_last_whole_record() {
    let dir = ledger_with_deposits();
    damage_record(dir.path(), DEPOSITS as usize - 1);
    let server = Server::builder()
        .data_dir(dir)
        .args(["--fsync", "always"])
        .start();
    let mut bank = server.connect_bank();
    let all_but_last = (DEPOSITS - 1) * DEPOSITS / 2;
    assert_eq!(
        request_line(&mut bank, "BALANCE a"),
        format!("OK {all_but_last}")
    );
    assert_eq!(
        request_line(&mut bank, "AUDIT"),
        format!("OK {all_but_last} 1")
    );
}

#[test]
fn a_damaged_record_in_the_middle_of_the_log_refuses_the_start_and_changes_nothing() {
    let dir = ledger_with_deposits();
    damage_record(dir.path(), 3);
    let before = files_of(dir.path());
    let mut server = Server::builder()
        .data_dir(Arc::clone(&dir))
        .args(["--fsync", "always"])
        .spawn();
    let output = server.wait_refused("a damaged record in the middle of the log");
    let ledger = dir.path().join("ledger.bin");
    let error = one_error_line(&output, &ledger, "damaged log");
    assert!(
        error.contains("damaged in the middle") && error.contains("LSN 4"),
        "{error}"
    );
    for ((path, was), (_, is)) in before.iter().zip(files_of(dir.path())) {
        assert!(*was == is, "{} changed", path.display());
    }
}
