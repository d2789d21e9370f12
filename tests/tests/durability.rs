//! `--fsync always` against the real binary: the system-call order shows that no bank reply
//! leaves before the `fdatasync` that covers its log record, a torn log tail is cut at the
//! last whole record, and a damaged record in the middle of the log refuses the start and
//! changes no file. (The power-loss simulation is the ledger crate's `sim_tests.rs`; the
//! crash, chaos and restart suites of `bank.rs` run under both policies.)

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use forkpool_testkit::{
    check_reply_order, fsync_trace_wrapper, one_error_line, replies_in, request_line, tool,
    wait_until, Server, Signal,
};

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
    let mut server = Server::builder()
        .data_dir(Arc::clone(&dir))
        .wrapper(fsync_trace_wrapper(&strace, &trace))
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
    let checked = check_reply_order(&text);
    assert!(checked > DEPOSITS as usize, "{checked} replies checked");
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
