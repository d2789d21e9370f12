//! The queue store file as hostile input, against the real binary (as `ledger_file.rs` does
//! for the ledger): a store truncated under a running server fails the queue service (ERR
//! internal, logged once, shown in the metrics), never a process, while echo and the bank
//! serve on; odd store paths and garbage files of every size are refused at start with one
//! line and exit 1, the file byte-for-byte unchanged; a second server on the same store is
//! refused while the first runs, also once the file was deleted under it (and after a binary
//! upgrade); random byte flips
//! in a valid store either refuse the start untouched, naming what is wrong, or start a
//! server whose queues add up.

use std::fs;
use std::net::TcpStream;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use forkpool_testkit::{
    assert_internal, connect, is_alive, metric, one_error_line, queue_job, refused_at_start,
    request_line, tool, truncate_file, Rng, Server, Signal,
};

const WAIT: Duration = Duration::from_secs(10);

fn store_of(server: &Server) -> PathBuf {
    server.data_dir().path().join("queue.bin")
}

fn queue(server: &Server) -> TcpStream {
    connect(server.queue_addr())
}

/// Every queue request that touches the store answers `ERR internal`, on an existing and on
/// a new connection; PING still answers; echo and the bank serve on.
fn queue_fails_others_serve(server: &Server, conn: &mut TcpStream) {
    for request in [
        "PUT q 0 more",
        "PUT_NOWAIT q more",
        "GET_NOWAIT q",
        "GET q 100",
        "STATS q",
        "QUEUES",
        "DONE 1",
        "JOIN q 100",
        "CONFIG q maxsize 5",
    ] {
        assert_internal(&request_line(conn, request));
    }
    assert_eq!(request_line(conn, "PING"), "PONG");
    assert_internal(&request_line(&mut queue(server), "PUT fresh 0 job"));
    let mut echo = server.connect_echo();
    assert_eq!(request_line(&mut echo, "still here"), "STILL HERE");
    let mut bank = server.connect_bank();
    assert_eq!(request_line(&mut bank, "DEPOSIT alice 5"), "OK 5");
}

/// A server with a status page and a queue connection that put two jobs and holds one.
fn running(args: &[&str]) -> (Server, TcpStream, PathBuf) {
    let server = Server::builder()
        .args(["--status-addr", "127.0.0.1:0"])
        .args(args.iter().copied())
        .start();
    let mut conn = queue(&server);
    assert!(request_line(&mut conn, "PUT q 0 one").starts_with("OK "));
    assert!(request_line(&mut conn, "PUT q 0 two").starts_with("OK "));
    assert!(request_line(&mut conn, "GET q").starts_with("JOB "));
    let store = store_of(&server);
    (server, conn, store)
}

/// Checks the aftermath of a truncation: nobody died, the metrics say so, one log line.
fn nobody_died_and_it_was_said_once(server: &Server, workers: &[nix::unistd::Pid], store: &Path) {
    let page = server.metrics();
    assert_eq!(metric(&page, "forkpool_queue_failed"), 1.0, "{page}");
    assert!(is_alive(server.pid));
    assert_eq!(server.workers(), workers, "no worker died or was replaced");
    server.wait_error_about(store, WAIT);
    assert_eq!(server.errors_about(store).len(), 1, "{}", server.output());
}

#[test]
fn truncating_the_store_under_an_idle_server_fails_the_queue_not_a_process() {
    let (server, mut conn, store) = running(&[]);
    let workers = server.wait_workers(2, WAIT);
    truncate_file(&store, 4096);
    // Idle: the master's periodic inspection finds it.
    let error = server.wait_error_about(&store, WAIT);
    assert!(error.contains("4096 bytes"), "{error}");
    queue_fails_others_serve(&server, &mut conn);
    nobody_died_and_it_was_said_once(&server, &workers, &store);
}

#[test]
fn truncating_the_store_to_nothing_fails_each_queue_request_at_once() {
    let (server, mut conn, store) = running(&[]);
    let workers = server.wait_workers(2, WAIT);
    truncate_file(&store, 0);
    // At once: this request meets the missing pages (or the inspection's finding).
    assert_internal(&request_line(&mut conn, "GET_NOWAIT q"));
    queue_fails_others_serve(&server, &mut conn);
    // The held job's connection closes: its release must not kill the worker either.
    drop(conn);
    nobody_died_and_it_was_said_once(&server, &workers, &store);
}

// ---------------------------------------------------------------------------------------
// Odd paths
// ---------------------------------------------------------------------------------------

/// Starts a server on the store path `path` (and `ledger`, if given) and checks that it
/// exits 1 at once with one error line naming `path` and containing `cause`, leaving no temp
/// file in `dir`.
fn refused_store(dir: &Path, path: &Path, cause: &str, wrapper: &[String], ledger: Option<&Path>) {
    let mut builder = Server::builder()
        .wrapper(wrapper.iter().cloned())
        .args(["--queue-store", path.to_str().expect("a UTF-8 path")]);
    if let Some(ledger) = ledger {
        builder = builder.args(["--ledger", ledger.to_str().expect("a UTF-8 path")]);
    }
    refused_at_start(builder, dir, path, cause);
}

#[test]
fn odd_store_paths_fail_at_once_naming_their_cause() {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let base = dir.path();
    let link = base.join("link.bin");
    std::os::unix::fs::symlink(base.join("missing").join("x"), &link).expect("make the link");
    refused_store(base, &link, "does not exist", &[], None);
    assert!(!base.join("missing").exists(), "nothing created");
    let trailing = PathBuf::from(format!("{}/newdir/", base.display()));
    refused_store(base, &trailing, "ends in '/'", &[], None);
    assert!(!base.join("newdir").exists(), "nothing created");
    let fifo = base.join("fifo.bin");
    nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600))
        .expect("make a FIFO");
    refused_store(base, &fifo, "is a FIFO, not a regular file", &[], None);
    let directory = base.join("dir.bin");
    fs::create_dir(&directory).expect("make a directory");
    refused_store(base, &directory, "is a directory", &[], None);
    let device = Path::new("/dev/null");
    refused_store(base, device, "is a character device", &[], None);
}

#[test]
fn a_store_of_another_user_fails_naming_the_cause_and_stays_unchanged() {
    let dir = tempfile::tempdir().expect("a temporary directory");
    fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o755)).expect("chmod");
    let store = dir.path().join("queue.bin");
    fs::write(&store, b"not yours").expect("write a file");
    fs::set_permissions(&store, fs::Permissions::from_mode(0o600)).expect("chmod");
    // The server runs as nobody (root may open anything); its ledger goes where it may write.
    let (wrapper, ledger): (Vec<String>, Option<PathBuf>) = if nix::unistd::geteuid().is_root() {
        let Some(runuser) = tool("runuser") else {
            return;
        };
        let open = dir.path().join("nobody");
        fs::create_dir(&open).expect("mkdir");
        fs::set_permissions(&open, fs::Permissions::from_mode(0o777)).expect("chmod");
        let wrapper = [
            runuser.display().to_string(),
            "-u".into(),
            "nobody".into(),
            "--".into(),
        ];
        (wrapper.into(), Some(open.join("ledger.bin")))
    } else {
        fs::set_permissions(&store, fs::Permissions::from_mode(0o000)).expect("chmod");
        (Vec::new(), None)
    };
    refused_store(
        dir.path(),
        &store,
        "open failed: Permission denied",
        &wrapper,
        ledger.as_deref(),
    );
    assert_eq!(fs::read(&store).expect("read"), b"not yours");
}

// ---------------------------------------------------------------------------------------
// A second server
// ---------------------------------------------------------------------------------------

/// Starts a second server (its own ledger) on `store` and checks it is refused, naming it.
fn second_server_refused(store: &Path) {
    let mut second = Server::builder()
        .args(["--queue-store", store.to_str().expect("a UTF-8 path")])
        .spawn();
    let output = second.wait_refused("a second server");
    let error = one_error_line(&output, store, "a second server");
    assert!(error.contains("locked"), "{error}");
}

#[test]
fn a_second_server_on_the_store_is_refused_while_the_first_runs() {
    let (server, mut conn, store) = running(&[]);
    second_server_refused(&store);
    assert_eq!(
        request_line(&mut conn, "GET_NOWAIT q").split(' ').nth(2),
        Some("two")
    );
    // Deleted under the first server: the path is still its own.
    fs::remove_file(&store).expect("delete the store");
    second_server_refused(&store);
    assert!(!store.exists(), "the refused server created no file");
    drop(server);
}

#[test]
fn after_an_upgrade_the_new_master_keeps_the_store_path_from_a_second_server() {
    let (mut server, conn, store) = running(&[]);
    drop(conn);
    server.upgrade_and_retire_old_master(WAIT);
    // Only the new master's generation lives now; without the file, only the path guard
    // it inherited can refuse a second server.
    fs::remove_file(&store).expect("delete the store");
    server.wait_error_about(&store, WAIT);
    second_server_refused(&store);
}

// ---------------------------------------------------------------------------------------
// Garbage
// ---------------------------------------------------------------------------------------

/// The size of a store file with these limits (`Geometry::new` in `queue/src/layout.rs`).
fn store_size(max_queues: u32, max_jobs: u32, max_payload: u32, max_waiters: u32) -> u64 {
    let round = |x: u64, to: u64| x.div_ceil(to) * to;
    let job_bytes = round(64 + u64::from(max_payload), 64);
    let off_waiters = round(4096 + u64::from(max_queues) * 256, 4096);
    let off_jobs = round(off_waiters + u64::from(max_waiters) * 128, 4096);
    round(off_jobs + u64::from(max_jobs) * job_bytes, 4096)
}

/// The immutable header of a store file as `queue/src/layout.rs` writes it (layout 1).
fn header(
    max_queues: u32,
    max_jobs: u32,
    max_payload: u32,
    max_waiters: u32,
    size: u64,
) -> Vec<u8> {
    let mut b = Vec::with_capacity(64);
    b.extend_from_slice(b"FPQUEUE\x01");
    b.extend_from_slice(&1u32.to_le_bytes());
    b.extend_from_slice(&40u32.to_le_bytes());
    for value in [max_queues, max_jobs, max_payload, max_waiters] {
        b.extend_from_slice(&value.to_le_bytes());
    }
    b.extend_from_slice(&size.to_le_bytes());
    b.resize(56, 0);
    let sum = b.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &x| {
        (h ^ u64::from(x)).wrapping_mul(0x0000_0100_0000_01b3)
    });
    b.extend_from_slice(&sum.to_le_bytes());
    b
}

/// Starts a server (with `args`) on a store holding `bytes` and checks it is refused with
/// `cause`, the file unchanged.
fn garbage_refused(what: &str, bytes: &[u8], cause: &str, args: &[&str]) {
    let dir = Arc::new(tempfile::tempdir().expect("a temporary directory"));
    let store = dir.path().join("queue.bin");
    fs::write(&store, bytes).expect("write the garbage");
    let mut server = Server::builder()
        .data_dir(Arc::clone(&dir))
        .args(args.iter().copied())
        .spawn();
    let output = server.wait_refused(what);
    assert_eq!(server.wait_exit(WAIT).code(), Some(1), "{what}: {output}");
    let error = one_error_line(&output, &store, what);
    assert!(
        error.contains(cause),
        "{what}: expected {cause:?} in {error}"
    );
    assert!(
        fs::read(&store).expect("read the store") == bytes,
        "{what}: the refused file was modified"
    );
}

#[test]
fn garbage_of_every_size_is_refused_untouched() {
    let mut rng = Rng(19);
    let random =
        |rng: &mut Rng, len: usize| -> Vec<u8> { (0..len).map(|_| rng.next_u64() as u8).collect() };
    garbage_refused("an empty file", b"", "truncated: 0 bytes", &[]);
    garbage_refused("one byte", b"F", "truncated: 1 bytes", &[]);
    garbage_refused(
        "half a header",
        &header(256, 4096, 1024, 4096, 0)[..40],
        "truncated",
        &[],
    );
    let mut bad_sum = header(256, 4096, 1024, 4096, 0);
    bad_sum[20] ^= 1;
    bad_sum.resize(8192, 0);
    garbage_refused("a header whose checksum fails", &bad_sum, "checksum", &[]);
    // A well-formed header describing a 16 TiB file, and one past every limit.
    let limits = (65_536, 1 << 24, 1 << 20, 1 << 20);
    let size = store_size(limits.0, limits.1, limits.2, limits.3);
    let mut huge = header(limits.0, limits.1, limits.2, limits.3, size);
    huge.resize(4096, 0);
    garbage_refused("absurd geometry", &huge, "truncated", &[]);
    let mut beyond = header(u32::MAX, u32::MAX, u32::MAX, u32::MAX, u64::MAX);
    beyond.resize(4096, 0);
    garbage_refused("limits past every maximum", &beyond, "corrupt", &[]);
    for len in [7, 64, 4095, 4096, 100_000] {
        garbage_refused("random bytes", &random(&mut rng, len), "queue", &[]);
    }
    // The right header, random bytes after it.
    let store = valid_store();
    let mut body = store[..64].to_vec();
    body.extend(random(&mut rng, store.len() - 64));
    garbage_refused(
        "a valid header over random bytes",
        &body,
        "corrupt",
        &FUZZ_ARGS,
    );
}

// ---------------------------------------------------------------------------------------
// Fuzz: byte flips in a valid store
// ---------------------------------------------------------------------------------------

/// Settings of the fuzzed store: small, so that flips land in used records often.
const FUZZ_ARGS: [&str; 6] = [
    "--queue-max-jobs",
    "64",
    "--queue-max-payload",
    "64",
    "--workers",
    "1",
];

/// A valid store written by a real server that then stopped: three queues holding jobs,
/// some of them done, one handed out when it stopped (so it is ready again).
fn valid_store() -> Vec<u8> {
    let mut server = Server::builder().args(FUZZ_ARGS).start();
    let mut conn = queue(&server);
    for (queue, jobs) in [("alpha", 5), ("beta", 3), ("gamma", 4)] {
        for n in 0..jobs {
            let reply = request_line(&mut conn, &format!("PUT {queue} 0 {queue}-{n} payload"));
            assert!(reply.starts_with("OK "), "{reply}");
        }
    }
    for queue in ["alpha", "gamma"] {
        let (id, _) = queue_job(&request_line(&mut conn, &format!("GET {queue}")));
        assert_eq!(request_line(&mut conn, &format!("DONE {id}")), "OK");
    }
    assert!(request_line(&mut conn, "GET beta").starts_with("JOB "));
    assert_eq!(request_line(&mut conn, "CONFIG gamma maxsize 9"), "OK");
    drop(conn);
    server.signal(Signal::SIGTERM);
    assert!(server.wait_exit(WAIT).success());
    fs::read(store_of(&server)).expect("read the store")
}

/// The used part of the fuzzed store: the header page, then the records in use (3 queues
/// of 256 bytes from 4096; no waiter; the first 12 job records of 128 bytes after the
/// queue and waiter regions of the default max_queues = 256 and max_waiters = 4096).
fn flip_ranges() -> [(usize, usize); 3] {
    let off_waiters = 4096 + 256 * 256;
    let off_jobs = off_waiters + 4096 * 128;
    [
        (0, 4096),
        (4096, 4096 + 3 * 256),
        (off_jobs, off_jobs + 12 * 128),
    ]
}

/// A server that started on a damaged store serves consistently: each queue's counters add
/// up (put = done + depth + in flight), its depth of jobs can be fetched and done, and then
/// it is empty; a new job goes through.
fn serves_consistently(server: &Server, case: &str) {
    let mut conn = queue(server);
    let listed = request_line(&mut conn, "QUEUES");
    // OK <count> <name>...
    let names: Vec<String> = listed
        .strip_prefix("OK ")
        .unwrap_or_else(|| panic!("{case}: QUEUES: {listed}"))
        .split_whitespace()
        .skip(1)
        .map(str::to_string)
        .collect();
    for name in names {
        let stats = request_line(&mut conn, &format!("STATS {name}"));
        let field = |key: &str| -> u64 {
            stats
                .split(' ')
                .find_map(|f| f.strip_prefix(key)?.strip_prefix('=')?.parse().ok())
                .unwrap_or_else(|| panic!("{case}: no {key} in {stats}"))
        };
        let (put, done, depth) = (field("put"), field("done"), field("depth"));
        assert_eq!(field("in_flight"), 0, "{case}: {stats}");
        assert_eq!(put, done + depth, "{case}: {stats}");
        for _ in 0..depth {
            let (id, _) = queue_job(&request_line(&mut conn, &format!("GET_NOWAIT {name}")));
            assert_eq!(
                request_line(&mut conn, &format!("DONE {id}")),
                "OK",
                "{case}"
            );
        }
        let empty = request_line(&mut conn, &format!("GET_NOWAIT {name}"));
        assert!(empty.starts_with("ERR empty "), "{case}: {empty}");
    }
    let put = request_line(&mut conn, "PUT_NOWAIT fresh new job");
    assert!(
        put.starts_with("OK ") || put.starts_with("ERR full "),
        "{case}: {put}"
    );
}

/// How many flips the test tries (each a server start); `QUEUE_FUZZ_FLIPS` sets it.
fn flip_count() -> u64 {
    std::env::var("QUEUE_FUZZ_FLIPS")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(200)
}

#[test]
fn byte_flips_in_a_valid_store_refuse_it_untouched_or_serve_consistently() {
    let valid = valid_store();
    let seed = std::env::var("QUEUE_FUZZ_SEED")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(1919);
    let mut rng = Rng(seed);
    let ranges = flip_ranges();
    let (mut refused, mut served) = (0, 0);
    for case in 0..flip_count() {
        let (from, to) = ranges[rng.below(ranges.len() as u64) as usize];
        let at = from + rng.below((to - from) as u64) as usize;
        let mut bytes = valid.clone();
        bytes[at] ^= 1 << rng.below(8);
        let case = format!("seed {seed} case {case}: byte {at} flipped");
        let dir = Arc::new(tempfile::tempdir().expect("a temporary directory"));
        let store = dir.path().join("queue.bin");
        fs::write(&store, &bytes).expect("write the damaged store");
        let mut server = Server::builder()
            .data_dir(Arc::clone(&dir))
            .args(FUZZ_ARGS)
            .spawn();
        if server.wait_ready_or_exit(WAIT) {
            serves_consistently(&server, &case);
            served += 1;
        } else {
            let output = server.wait_refused(&case);
            let error = one_error_line(&output, &store, &case);
            assert!(error.contains("queue store"), "{case}: {error}");
            assert!(
                fs::read(&store).expect("read the store") == bytes,
                "{case}: the refused file was modified"
            );
            refused += 1;
        }
    }
    eprintln!("byte flips: {refused} refused untouched, {served} served consistently");
}
