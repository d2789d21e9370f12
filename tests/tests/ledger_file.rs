//! The ledger file as hostile input, against the real binary: a file truncated, overwritten,
//! deleted or replaced under a running server fails the bank (ERR internal, logged once,
//! shown on the status page), never a process; damaged recovery structures refuse the start and leave the
//! file untouched; odd ledger paths fail at once with one line naming the cause; temp files
//! of interrupted creations are removed by the next start.

use std::fs;
use std::net::TcpStream;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use forkpool_testkit::{
    assert_internal, http_request, is_alive, metric, one_error_line, refused_at_start,
    request_line, tool, truncate_file, wait_until, Server, Signal,
};
use nix::sys::signal::kill;
use nix::unistd::Pid;

const WAIT: Duration = Duration::from_secs(10);
/// Capacity of the ledgers made here (a small file is quick to copy and craft).
const CAPACITY: &str = "10";

fn ledger_of(server: &Server) -> PathBuf {
    server.data_dir().path().join("ledger.bin")
}

/// Waits for the one error line about `path` and returns it.
fn wait_for_the_error(server: &Server, path: &Path) -> String {
    server.wait_error_about(path, WAIT)
}

/// Checks that the error about `path` was logged exactly once.
#[track_caller]
fn logged_once(server: &Server, path: &Path) {
    let errors = server.errors_about(path);
    assert_eq!(errors.len(), 1, "{}", server.output());
}

/// The bank answers `ERR internal` to every request that touches the ledger, on an existing
/// and on a new connection; PING still answers; echo serves on.
fn bank_fails_echo_serves(server: &Server, bank: &mut TcpStream) {
    for request in [
        "DEPOSIT alice 1",
        "WITHDRAW alice 1",
        "TRANSFER alice bob 1",
    ] {
        assert_internal(&request_line(bank, request));
    }
    assert_internal(&request_line(bank, "BALANCE alice"));
    assert_internal(&request_line(bank, "AUDIT"));
    assert_eq!(request_line(bank, "PING"), "PONG");
    let mut fresh = server.connect_bank();
    assert_internal(&request_line(&mut fresh, "DEPOSIT carol 5"));
    let mut echo = server.connect_echo();
    assert_eq!(request_line(&mut echo, "still here"), "STILL HERE");
}

/// The status page and the metrics show the ledger as failed.
fn status_shows_failed(server: &Server) {
    let page = server.metrics();
    assert_eq!(metric(&page, "forkpool_ledger_failed"), 1.0, "{page}");
    let (code, table) = http_request(server.status_addr(), "GET", "/status");
    assert_eq!(code, 200);
    assert!(table.contains("ledger: FAILED"), "{table}");
}

/// A server with a status page and a small ledger (plus `args`), and a bank connection on
/// which each of `transcript`'s requests got its reply.
fn running(args: &[&str], transcript: &[(&str, &str)]) -> (Server, TcpStream, PathBuf) {
    let server = Server::builder()
        .args(["--status-addr", "127.0.0.1:0", "--max-accounts", CAPACITY])
        .args(args.iter().copied())
        .start();
    let mut bank = server.connect_bank();
    for (request, reply) in transcript {
        assert_eq!(request_line(&mut bank, request), *reply);
    }
    let ledger = ledger_of(&server);
    (server, bank, ledger)
}

// ---------------------------------------------------------------------------------------
// Finding 1: a truncated file
// ---------------------------------------------------------------------------------------

#[test]
fn truncating_the_ledger_under_an_idle_server_fails_the_bank_not_a_process() {
    let (server, mut bank, ledger) = running(&[], &[("DEPOSIT alice 100", "OK 100")]);
    let workers = server.wait_workers(2, WAIT);
    truncate_file(&ledger, 4096);
    // Idle: the master's periodic inspection finds it.
    let error = wait_for_the_error(&server, &ledger);
    assert!(error.contains("4096 bytes"), "{error}");
    bank_fails_echo_serves(&server, &mut bank);
    status_shows_failed(&server);
    assert!(is_alive(server.pid));
    assert_eq!(server.workers(), workers, "no worker died or was replaced");
    logged_once(&server, &ledger);
}

#[test]
fn truncating_the_ledger_fails_each_bank_request_even_without_the_hung_worker_check() {
    let (server, mut bank, ledger) = running(
        &["--worker-timeout", "0"],
        &[("DEPOSIT alice 100", "OK 100")],
    );
    let workers = server.wait_workers(2, WAIT);
    truncate_file(&ledger, 4096);
    // At once: this request meets the missing pages (or the inspection's finding).
    assert_internal(&request_line(&mut bank, "DEPOSIT alice 5"));
    bank_fails_echo_serves(&server, &mut bank);
    status_shows_failed(&server);
    assert!(is_alive(server.pid));
    assert_eq!(server.workers(), workers, "no worker died or was replaced");
    wait_for_the_error(&server, &ledger);
    logged_once(&server, &ledger);
}

// ---------------------------------------------------------------------------------------
// Finding 4: a deleted or replaced file
// ---------------------------------------------------------------------------------------

/// Starts a second server on `path` and checks it is refused, naming the path.
fn second_server_refused(path: &Path) {
    let mut second = Server::builder()
        .args(["--ledger", path.to_str().expect("a UTF-8 path")])
        .args(["--max-accounts", CAPACITY])
        .spawn();
    let output = second.wait_refused("a second server");
    let error = one_error_line(&output, path, "a second server");
    assert!(error.contains("locked"), "{error}");
}

#[test]
fn deleting_the_ledger_under_a_running_server_refuses_writes_and_a_second_server() {
    let (server, mut bank, ledger) = running(
        &[],
        &[("DEPOSIT alice 1000", "OK 1000"), ("DEPOSIT bob 5", "OK 5")],
    );
    fs::remove_file(&ledger).expect("delete the ledger file");
    let error = wait_for_the_error(&server, &ledger);
    assert!(
        error.contains("deleted") && error.contains("/proc/"),
        "{error}"
    );
    // Writes are refused; reads still tell the truth about the (unlinked) file.
    assert_internal(&request_line(&mut bank, "DEPOSIT alice 1"));
    assert_internal(&request_line(&mut bank, "TRANSFER alice bob 1"));
    assert_eq!(request_line(&mut bank, "BALANCE alice"), "OK 1000");
    assert_eq!(request_line(&mut bank, "AUDIT"), "OK 1005 2");
    status_shows_failed(&server);
    second_server_refused(&ledger);
    assert!(!ledger.exists(), "the refused server created no file");
    assert_eq!(request_line(&mut bank, "BALANCE bob"), "OK 5");
    logged_once(&server, &ledger);
}

#[test]
fn replacing_the_ledger_under_a_running_server_refuses_writes_and_a_second_server() {
    let (server, mut bank, ledger) = running(&[], &[("DEPOSIT alice 7", "OK 7")]);
    let copy = ledger.with_extension("new");
    fs::copy(&ledger, &copy).expect("copy the ledger");
    fs::rename(&copy, &ledger).expect("put the copy in its place");
    let error = wait_for_the_error(&server, &ledger);
    assert!(error.contains("another file"), "{error}");
    assert_internal(&request_line(&mut bank, "DEPOSIT alice 1"));
    assert_eq!(request_line(&mut bank, "BALANCE alice"), "OK 7");
    // The file at the path is not locked by anyone; the path guard still refuses.
    second_server_refused(&ledger);
    logged_once(&server, &ledger);
}

#[test]
fn after_an_upgrade_the_new_master_keeps_the_ledger_path_from_a_second_server() {
    let (mut server, mut bank, ledger) = running(&[], &[("DEPOSIT alice 3", "OK 3")]);
    drop(bank);
    server.upgrade_and_retire_old_master(WAIT);
    // Only the new master's generation lives now; without the file, only the path guard
    // it inherited can refuse a second server.
    fs::remove_file(&ledger).expect("delete the ledger file");
    wait_for_the_error(&server, &ledger);
    second_server_refused(&ledger);
    bank = server.connect_bank();
    assert_eq!(request_line(&mut bank, "BALANCE alice"), "OK 3");
}

#[test]
fn copying_a_backup_over_the_live_ledger_fails_the_bank_instead_of_reverting_it() {
    let (server, mut bank, ledger) = running(&[], &[("DEPOSIT alice 100", "OK 100")]);
    let backup = fs::read(&ledger).expect("take a backup");
    assert_eq!(request_line(&mut bank, "DEPOSIT alice 50"), "OK 150");
    // Same inode, same size: only the writes themselves give it away.
    fs::write(&ledger, &backup).expect("copy the backup over the live file");
    wait_for_the_error(&server, &ledger);
    bank_fails_echo_serves(&server, &mut bank);
    status_shows_failed(&server);
    logged_once(&server, &ledger);
}

// ---------------------------------------------------------------------------------------
// Finding 3: damaged recovery structures
// ---------------------------------------------------------------------------------------

/// A ledger file's bytes with the offsets of its structures (layout version 1 as
/// docs/LEDGER.md documents it; live fields are native-endian, here little-endian).
struct LedgerBytes {
    bytes: Vec<u8>,
    off_intents: usize,
    off_slots: usize,
    table_slots: usize,
    stripes: u64,
}

/// Offsets inside the header page, an intent record, an entry and a slot.
const JOURNAL: usize = 192;
const RECORD_BYTES: usize = 128;
const ENTRIES: usize = 16;
const ENTRY_BYTES: usize = 40;
const SLOT_BYTES: usize = 96;
const PAGE: usize = 4096;

impl LedgerBytes {
    fn new(bytes: Vec<u8>) -> LedgerBytes {
        let u32_at = |at: usize| u32::from_le_bytes(bytes[at..at + 4].try_into().expect("4"));
        let u64_at = |at: usize| u64::from_le_bytes(bytes[at..at + 8].try_into().expect("8"));
        let (stripes, intents) = (u32_at(32) as usize, u32_at(36) as usize);
        let off_intents = (PAGE + stripes * 128).div_ceil(PAGE) * PAGE;
        let off_slots = (off_intents + intents * RECORD_BYTES).div_ceil(PAGE) * PAGE;
        LedgerBytes {
            table_slots: u64_at(24) as usize,
            stripes: stripes as u64,
            bytes,
            off_intents,
            off_slots,
        }
    }

    fn get(&self, at: usize) -> u64 {
        u64::from_le_bytes(self.bytes[at..at + 8].try_into().expect("8 bytes"))
    }

    fn set(&mut self, at: usize, value: u64) {
        self.bytes[at..at + 8].copy_from_slice(&value.to_le_bytes());
    }

    fn slot(&self, i: usize) -> usize {
        self.off_slots + i * SLOT_BYTES
    }

    fn tag(&self, i: usize) -> u64 {
        self.get(self.slot(i))
    }

    /// The slot holding the account `name`.
    fn slot_of(&self, name: &str) -> usize {
        (0..self.table_slots)
            .find(|&i| {
                let at = self.slot(i);
                self.tag(i) & 2 != 0
                    && self.get(at + 16) == name.len() as u64
                    && &self.bytes[at + 24..at + 24 + name.len()] == name.as_bytes()
            })
            .unwrap_or_else(|| panic!("no account {name} in the file"))
    }

    /// The first free slot after slot `i` (cyclically).
    fn free_after(&self, i: usize) -> usize {
        (1..self.table_slots)
            .map(|k| (i + k) % self.table_slots)
            .find(|&j| self.tag(j) == 0)
            .expect("the table has a free slot")
    }

    /// The stripe of the account in slot `i` (bits 44.. of its tag).
    fn stripe_of(&self, i: usize) -> u64 {
        (self.tag(i) >> 44) & (self.stripes - 1)
    }

    /// Sets entry `entry` of intent record `record` to an active undo image.
    fn activate_entry(&mut self, record: usize, entry: usize, image: [u64; 4]) {
        let at = self.off_intents + record * RECORD_BYTES + ENTRIES + entry * ENTRY_BYTES;
        for (k, value) in image.into_iter().enumerate() {
            self.set(at + 8 + 8 * k, value);
        }
        self.set(at, 1);
    }

    /// Sets the allocation journal to an active (slot, old tag, old count).
    fn activate_journal(&mut self, slot: usize, old_tag: u64, old_count: u64) {
        self.set(JOURNAL + 8, slot as u64);
        self.set(JOURNAL + 16, old_tag);
        self.set(JOURNAL + 24, old_count);
        self.set(JOURNAL, 1);
    }
}

/// A ledger of 10 accounts holding alice = 100 and bob = 50, written by a real server that
/// then stopped gracefully.
fn alice_and_bob() -> LedgerBytes {
    let server = Server::builder().args(["--max-accounts", CAPACITY]).start();
    let mut bank = server.connect_bank();
    assert_eq!(request_line(&mut bank, "DEPOSIT alice 100"), "OK 100");
    assert_eq!(request_line(&mut bank, "DEPOSIT bob 50"), "OK 50");
    drop(bank);
    let mut server = server;
    server.signal(Signal::SIGTERM);
    assert!(server.wait_exit(WAIT).success());
    LedgerBytes::new(fs::read(ledger_of(&server)).expect("read the ledger"))
}

#[test]
fn damaged_undo_records_journal_or_table_refuse_the_start_and_stay_unchanged() {
    let valid = alice_and_bob();
    let alice = valid.slot_of("alice");
    let bob = valid.slot_of("bob");
    let mut before_too_large = LedgerBytes::new(valid.bytes.clone());
    // An active undo entry whose before-image is 2^64-1.
    before_too_large.activate_entry(0, 0, [valid.stripe_of(alice), alice as u64, u64::MAX, 0]);
    // An active journal that would resurrect a free slot holding 10^18 under bob's tag.
    let mut resurrection = LedgerBytes::new(valid.bytes.clone());
    let free = valid.free_after(bob);
    let at = resurrection.slot(free);
    resurrection.set(at + 8, 1_000_000_000_000_000_000);
    resurrection.set(at + 16, 5);
    resurrection.bytes[at + 24..at + 29].copy_from_slice(b"ghost");
    resurrection.activate_journal(free, valid.tag(bob), 2);
    // Alice twice: her slot copied to the free slot that ends her probe chain.
    let mut twice = LedgerBytes::new(valid.bytes.clone());
    let (from, to) = (valid.slot(alice), valid.slot(valid.free_after(alice)));
    twice.bytes.copy_within(from..from + SLOT_BYTES, to);
    let cases = [
        (
            "before = 2^64-1",
            before_too_large,
            "intent record 0 entry 0",
        ),
        (
            "a resurrected free slot",
            resurrection,
            "allocation journal",
        ),
        ("alice twice", twice, "alice"),
    ];
    for (what, damaged, names) in cases {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let path = dir.path().join("ledger.bin");
        fs::write(&path, &damaged.bytes).expect("write the damaged ledger");
        let mut server = Server::builder()
            .args(["--ledger", path.to_str().expect("a UTF-8 path")])
            .args(["--max-accounts", CAPACITY])
            .spawn();
        let output = server.wait_refused(what);
        let error = one_error_line(&output, &path, what);
        assert!(
            error.contains("corrupt") && error.contains(names),
            "{what}: {error}"
        );
        assert!(
            fs::read(&path).expect("read the ledger") == damaged.bytes,
            "{what}: the refused file was modified"
        );
    }
}

// ---------------------------------------------------------------------------------------
// Finding 2 and 5: odd paths
// ---------------------------------------------------------------------------------------

/// Starts a server on the ledger path `path` and checks that it exits 1 at once with one
/// error line naming `shown` and containing `cause`, leaving no temp file in `dir`.
fn refused_path(dir: &Path, path: &Path, shown: &Path, cause: &str, wrapper: &[String]) {
    let builder = Server::builder()
        .wrapper(wrapper.iter().cloned())
        .args(["--ledger", path.to_str().expect("a UTF-8 path")])
        .args(["--max-accounts", CAPACITY]);
    refused_at_start(builder, dir, shown, cause);
}

#[test]
fn a_dangling_symlink_as_the_ledger_path_fails_at_once_naming_it() {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let link = dir.path().join("link.bin");
    let target = dir.path().join("missing").join("x");
    std::os::unix::fs::symlink(&target, &link).expect("make the link");
    refused_path(dir.path(), &link, &link, "does not exist", &[]);
    assert!(!dir.path().join("missing").exists(), "nothing created");
}

#[test]
fn odd_ledger_paths_fail_at_once_naming_their_cause() {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let base = dir.path();
    let trailing = PathBuf::from(format!("{}/newdir/", base.display()));
    refused_path(base, &trailing, &trailing, "ends in '/'", &[]);
    assert!(!base.join("newdir").exists(), "nothing created");
    let fifo = base.join("fifo.bin");
    nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600))
        .expect("make a FIFO");
    refused_path(base, &fifo, &fifo, "is a FIFO, not a regular file", &[]);
    let directory = base.join("dir.bin");
    fs::create_dir(&directory).expect("make a directory");
    refused_path(base, &directory, &directory, "is a directory", &[]);
}

#[test]
fn a_ledger_the_server_may_not_open_or_create_fails_naming_the_cause() {
    let dir = tempfile::tempdir().expect("a temporary directory");
    fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o755)).expect("chmod");
    let path = dir.path().join("ledger.bin");
    fs::write(&path, b"not yours").expect("write a file");
    fs::set_permissions(&path, fs::Permissions::from_mode(0o000)).expect("chmod");
    let locked_dir = dir.path().join("read-only");
    fs::create_dir(&locked_dir).expect("mkdir");
    fs::set_permissions(&locked_dir, fs::Permissions::from_mode(0o555)).expect("chmod");
    // Root may open and create anything: run the server as nobody then.
    let wrapper: Vec<String> = if nix::unistd::geteuid().is_root() {
        let Some(setpriv) = tool("setpriv") else {
            return;
        };
        [
            setpriv.display().to_string(),
            "--reuid=65534".into(),
            "--regid=65534".into(),
            "--clear-groups".into(),
        ]
        .into()
    } else {
        Vec::new()
    };
    refused_path(
        dir.path(),
        &path,
        &path,
        "open failed: Permission denied",
        &wrapper,
    );
    let new = locked_dir.join("ledger.bin");
    let cause = "create a temp file in its directory failed: Permission denied";
    refused_path(&locked_dir, &new, &new, cause, &wrapper);
}

// ---------------------------------------------------------------------------------------
// Finding 5: temp files of interrupted creations
// ---------------------------------------------------------------------------------------

/// The temp files (`.ledger.bin.tmp.PID`) in `dir`.
fn temp_files(dir: &Path) -> Vec<PathBuf> {
    fs::read_dir(dir)
        .expect("list the directory")
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with(".ledger.bin.tmp."))
        })
        .collect()
}

#[test]
fn temp_files_of_dead_creators_are_removed_at_start_and_a_locked_one_is_kept() {
    let dir = std::sync::Arc::new(tempfile::tempdir().expect("a temporary directory"));
    let temp = |pid: u32| dir.path().join(format!(".ledger.bin.tmp.{pid}"));
    let mut dead = std::process::Command::new("true")
        .spawn()
        .expect("run true");
    let dead_pid = dead.id();
    dead.wait().expect("reap it");
    // A creator that died; one whose pid now belongs to another (live) process; and one
    // whose creator lives and holds its lock.
    let mut sleeper = std::process::Command::new("sleep")
        .arg("60")
        .spawn()
        .expect("run sleep");
    let (stale, reused, locked) = (temp(dead_pid), temp(sleeper.id()), temp(std::process::id()));
    for path in [&stale, &reused, &locked] {
        fs::write(path, vec![0u8; 1 << 20]).expect("write a temp file");
    }
    let held = fs::File::open(&locked).expect("open the locked one");
    #[allow(deprecated)] // nix's Flock would unlock on drop; this lock lives to the end
    nix::fcntl::flock(
        std::os::fd::AsRawFd::as_raw_fd(&held),
        nix::fcntl::FlockArg::LockExclusiveNonblock,
    )
    .expect("lock it");
    let server = Server::builder()
        .data_dir(std::sync::Arc::clone(&dir))
        .args(["--max-accounts", CAPACITY])
        .start();
    assert_eq!(
        temp_files(dir.path()),
        vec![locked.clone()],
        "{}",
        server.output()
    );
    assert_eq!(server.log_count("left by an interrupted creation"), 2);
    drop(held);
    let _ = sleeper.kill();
    let _ = sleeper.wait();
}

#[test]
fn a_creation_interrupted_by_sigterm_leaves_no_temp_file_once_the_server_starts_again() {
    let Some(strace) = tool("strace") else {
        return;
    };
    let dir = std::sync::Arc::new(tempfile::tempdir().expect("a temporary directory"));
    // strace holds the creator right after its 201 MB posix_fallocate.
    let mut creating = Server::builder()
        .data_dir(std::sync::Arc::clone(&dir))
        .wrapper([
            strace.display().to_string(),
            "-f".into(),
            "-qq".into(),
            "-o".into(),
            "/dev/null".into(),
            "-e".into(),
            "trace=fallocate".into(),
            "-e".into(),
            "inject=fallocate:delay_exit=60000000".into(),
        ])
        .args(["--max-accounts", "1000000"])
        .spawn();
    let temp = wait_until("the temp file to be allocated", WAIT, || {
        temp_files(dir.path())
            .into_iter()
            .find(|p| fs::metadata(p).is_ok_and(|m| m.len() > 0))
    });
    let creator: i32 = temp
        .extension()
        .and_then(|pid| pid.to_str()?.parse().ok())
        .expect("the temp file name ends in the creator's pid");
    let creator = Pid::from_raw(creator);
    kill(creator, Signal::SIGTERM).expect("SIGTERM the creator");
    // Killing the tracer lets the creator run on into its SIGTERM.
    creating.signal(Signal::SIGKILL);
    creating.wait_exit(WAIT);
    wait_until("the creator to exit", WAIT, || {
        (!is_alive(creator)).then_some(())
    });
    drop(creating);
    // Killed mid-creation, the creator left its temp file (the finding); a master that
    // handles SIGTERM already then would have finished the file first.
    let left = temp_files(dir.path());
    assert!(left.is_empty() || left == vec![temp.clone()], "{left:?}");
    // A finished 1,000,000-account ledger is not this test's subject.
    let _ = fs::remove_file(dir.path().join("ledger.bin"));
    let server = Server::builder()
        .data_dir(std::sync::Arc::clone(&dir))
        .args(["--max-accounts", CAPACITY])
        .start();
    assert!(temp_files(dir.path()).is_empty(), "{}", server.output());
    assert_eq!(
        server.log_count("left by an interrupted creation"),
        left.len(),
        "{}",
        server.output()
    );
    let mut bank = server.connect_bank();
    assert_eq!(request_line(&mut bank, "DEPOSIT a 1"), "OK 1");
}
