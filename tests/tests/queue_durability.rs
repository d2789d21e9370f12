//! The queue store under `--fsync always` against the real binary: the system-call order
//! shows that no queue reply (PUT's and DONE's `OK`, a GET's `JOB`, also one handed to a
//! parked GET by another connection's PUT) leaves before the `fdatasync` that covers its log
//! record; jobs survive a SIGKILL of the whole process group and a restart; a restart with
//! `--fsync never` after `always`, and back, keeps every job. (The power-loss simulation is
//! the queue crate's `sim_tests.rs`.)

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use forkpool_testkit::{
    check_reply_order_except, connect, fsync_trace_wrapper, read_line, replies_in, request_line,
    tool, wait_until, Server, Signal,
};
use nix::sys::signal::killpg;

const JOBS: u64 = 12;
const WAIT: Duration = Duration::from_secs(30);

fn stats(addr: SocketAddr, queue: &str) -> String {
    request_line(&mut connect(addr), &format!("STATS {queue}"))
}

#[test]
fn no_queue_reply_is_written_before_the_fdatasync_that_covers_it() {
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
    let mut conn = connect(server.queue_addr());
    for i in 0..JOBS {
        assert!(request_line(&mut conn, &format!("PUT q 0 job {i}")).starts_with("OK "));
    }
    for _ in 0..JOBS {
        let line = request_line(&mut conn, "GET q 1000");
        let id = line.split(' ').nth(1).expect("JOB <id> <payload>");
        assert_eq!(request_line(&mut conn, &format!("DONE {id}")), "OK");
    }
    // A GET parked on one connection, served by a PUT on another: the hand-off.
    let mut getter = connect(server.queue_addr());
    getter.set_read_timeout(Some(WAIT)).expect("a read timeout");
    std::io::Write::write_all(&mut getter, b"GET handed 0\n").expect("send GET");
    wait_until("the GET parked", WAIT, || {
        stats(server.queue_addr(), "handed")
            .contains("getters=1")
            .then_some(())
    });
    let put = request_line(&mut conn, "PUT handed 0 to the parked getter");
    assert!(put.starts_with("OK "), "{put}");
    assert!(read_line(&mut getter).ends_with(" to the parked getter"));
    drop((conn, getter));
    server.signal(Signal::SIGTERM);
    assert!(server.wait_exit(WAIT).success());
    let replies = 3 * JOBS as usize + 2;
    let text = wait_until("the trace of every reply", WAIT, || {
        let text = std::fs::read_to_string(&trace).ok()?;
        (replies_in(&text) >= replies).then_some(text)
    });
    // The hand-off PUT's own OK depends on its records only: it may leave before the
    // getter's claim (appended meanwhile by the getter's connection) is flushed.
    let checked = check_reply_order_except(&text, &[&format!("\"{put}\\n\"")]);
    assert!(checked > replies - 2, "{checked} replies checked");
}

/// Every job of queue `q` still there: takes them all (without DONE) and returns their
/// payloads; the connection is dropped, so they go back to the queue.
fn payloads(addr: SocketAddr) -> BTreeSet<String> {
    let mut conn = connect(addr);
    let mut found = BTreeSet::new();
    loop {
        let line = request_line(&mut conn, "GET_NOWAIT q");
        if line.starts_with("ERR empty ") {
            break;
        }
        let payload = line.splitn(3, ' ').nth(2).expect("JOB <id> <payload>");
        found.insert(payload.to_string());
    }
    drop(conn);
    wait_until("the jobs back in the queue", WAIT, || {
        stats(addr, "q").contains(" in_flight=0 ").then_some(())
    });
    found
}

fn start(dir: &Arc<tempfile::TempDir>, fsync: &str) -> Server {
    Server::builder()
        .data_dir(Arc::clone(dir))
        .args(["--fsync", fsync, "--workers", "2"])
        .start()
}

fn stop(mut server: Server) {
    server.signal(Signal::SIGTERM);
    assert!(server.wait_exit(WAIT).success());
}

#[test]
fn jobs_survive_sigkill_of_everything_and_restarts_switching_the_fsync_policy() {
    let dir = Arc::new(tempfile::tempdir().expect("a temporary directory"));
    let mut server = start(&dir, "always");
    let mut producer = connect(server.queue_addr());
    for i in 0..JOBS {
        assert!(request_line(&mut producer, &format!("PUT q 0 job {i}")).starts_with("OK "));
    }
    // Four fetched, two of them done; the other two are held when everything dies.
    let mut consumer = connect(server.queue_addr());
    let mut done = BTreeSet::new();
    for k in 0..4 {
        let line = request_line(&mut consumer, "GET q 1000");
        let mut parts = line.splitn(3, ' ').skip(1);
        let (id, payload) = (parts.next(), parts.next());
        if k % 2 == 0 {
            let id = id.expect("an id");
            assert_eq!(request_line(&mut consumer, &format!("DONE {id}")), "OK");
            done.insert(payload.expect("a payload").to_string());
        }
    }
    let expected: BTreeSet<String> = (0..JOBS)
        .map(|i| format!("job {i}"))
        .filter(|p| !done.contains(p))
        .collect();
    killpg(server.pid, Signal::SIGKILL).expect("SIGKILL the process group");
    server.wait_exit(WAIT);
    drop((producer, consumer));

    let server = start(&dir, "always");
    let line = stats(server.queue_addr(), "q");
    assert!(
        line.contains(&format!("depth={} ", expected.len())) && line.contains(" done=2 "),
        "after SIGKILL and restart: {line}"
    );
    assert_eq!(payloads(server.queue_addr()), expected, "after SIGKILL");
    stop(server);

    let server = start(&dir, "never");
    assert_eq!(payloads(server.queue_addr()), expected, "always -> never");
    assert!(
        !dir.path().join("queue.bin.ckpt").exists(),
        "under never the queue store's log is removed"
    );
    let mut conn = connect(server.queue_addr());
    assert!(request_line(&mut conn, "PUT q 0 under never").starts_with("OK "));
    drop(conn);
    stop(server);

    let server = start(&dir, "always");
    let mut expected = expected;
    expected.insert("under never".into());
    assert_eq!(payloads(server.queue_addr()), expected, "never -> always");
    assert!(dir.path().join("queue.bin.ckpt").exists());
    stop(server);
}
