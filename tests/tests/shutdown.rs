//! Shutdown: SIGTERM drains (every request already sent is answered, queued connections are
//! served, exit 0, no child left), a second SIGTERM or a SIGQUIT stops at once, and the
//! graceful timeout bounds a drain that cannot finish.

use std::io::{Read, Write};
use std::time::{Duration, Instant};

use forkpool_testkit::{
    children_of, connect, log_phrase, read_line, request_line, wait_until, Server, Signal,
};
use nix::sys::signal::kill;

#[test]
fn sigterm_answers_every_line_already_sent_then_exits_zero() {
    let mut server = Server::start();
    let workers = server.wait_workers(2, Duration::from_secs(5));
    let stream = server.connect_echo();
    let mut reader = stream.try_clone().expect("clone the stream");
    let replies = std::thread::spawn(move || {
        let mut replies = Vec::new();
        let result = reader.read_to_end(&mut replies);
        (replies, result.map_err(|e| e.to_string()))
    });
    let burst: Vec<u8> = (0..20_000)
        .flat_map(|i| format!("burst {i}\n").into_bytes())
        .collect();
    let mut writer = stream;
    writer.write_all(&burst).expect("send the burst");
    let drain_started = Instant::now();
    server.signal(Signal::SIGTERM);
    let (replies, result) = replies.join().expect("reader thread");
    result.expect("the server closes cleanly, without a reset");
    let expected: Vec<u8> = (0..20_000)
        .flat_map(|i| format!("BURST {i}\n").into_bytes())
        .collect();
    assert_eq!(
        replies.len(),
        expected.len(),
        "every line already sent is answered"
    );
    assert!(replies == expected);
    let status = server.wait_exit(Duration::from_secs(10));
    assert!(status.success(), "master exit status {status:?}");
    eprintln!(
        "drained and exited {:?} after SIGTERM",
        drain_started.elapsed()
    );
    wait_until("no worker left", Duration::from_secs(2), || {
        workers
            .iter()
            .all(|pid| forkpool_testkit::process_state(*pid).is_none())
            .then_some(())
    });
}

#[test]
fn connections_queued_when_the_drain_begins_are_served_not_reset() {
    let mut server = Server::start();
    let workers = server.wait_workers(2, Duration::from_secs(5));
    // Stopped workers cannot accept: the kernel completes these connections into the
    // listeners' queues, where they sit when the drain starts.
    for pid in &workers {
        kill(*pid, Signal::SIGSTOP).expect("stop a worker");
    }
    let mut queued: Vec<_> = (0..20)
        .map(|i| {
            let mut stream = connect(server.echo_addr());
            stream
                .write_all(format!("queued {i}\n").as_bytes())
                .expect("send");
            stream
        })
        .collect();
    server.signal(Signal::SIGTERM);
    // The master must have closed its copies of the listeners before the workers go on.
    server.wait_log(log_phrase::DRAINING, Duration::from_secs(5));
    for pid in &workers {
        kill(*pid, Signal::SIGCONT).expect("continue a worker");
    }
    for (i, stream) in queued.iter_mut().enumerate() {
        assert_eq!(read_line(stream), format!("QUEUED {i}"));
        let mut rest = Vec::new();
        stream
            .read_to_end(&mut rest)
            .expect("a clean close after the reply");
        assert!(rest.is_empty());
    }
    assert!(server.wait_exit(Duration::from_secs(10)).success());
}

#[test]
fn a_second_sigterm_during_the_drain_stops_at_once() {
    let mut server = Server::builder().args(["--graceful-timeout", "60"]).start();
    let workers = server.wait_workers(2, Duration::from_secs(5));
    // A stopped worker cannot finish its drain.
    kill(workers[0], Signal::SIGSTOP).expect("stop a worker");
    server.signal(Signal::SIGTERM);
    server.wait_log(log_phrase::DRAINING, Duration::from_secs(5));
    server.signal(Signal::SIGTERM);
    // The stopped worker would hold a graceful drain for the whole minute: the second signal
    // kills it instead.
    assert!(server.wait_exit(Duration::from_secs(10)).success());
    assert!(server.has_logged(log_phrase::SECOND_SHUTDOWN));
    assert!(children_of(server.pid).is_empty());
    assert!(forkpool_testkit::process_state(workers[0]).is_none());
}

#[test]
fn the_graceful_timeout_kills_workers_that_do_not_finish() {
    let mut server = Server::builder().args(["--graceful-timeout", "1"]).start();
    let workers = server.wait_workers(2, Duration::from_secs(5));
    kill(workers[1], Signal::SIGSTOP).expect("stop a worker");
    let started = Instant::now();
    server.signal(Signal::SIGTERM);
    assert!(server.wait_exit(Duration::from_secs(10)).success());
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(900),
        "exited after {took:?}, before the timeout"
    );
    assert!(
        server.output().contains(log_phrase::GRACEFUL_TIMEOUT),
        "{}",
        server.output()
    );
    assert!(workers
        .iter()
        .all(|pid| forkpool_testkit::process_state(*pid).is_none()));
}

#[test]
fn sigquit_stops_at_once() {
    // A stopped worker cannot drain, so a graceful shutdown would wait the whole minute of
    // the graceful timeout for it; QUIT must not wait at all.
    let mut server = Server::builder().args(["--graceful-timeout", "60"]).start();
    let workers = server.wait_workers(2, Duration::from_secs(5));
    let mut open = server.connect_echo();
    assert_eq!(request_line(&mut open, "still here"), "STILL HERE");
    kill(workers[0], Signal::SIGSTOP).expect("stop a worker");
    server.signal(Signal::SIGQUIT);
    assert!(server.wait_exit(Duration::from_secs(10)).success());
    assert!(workers
        .iter()
        .all(|pid| forkpool_testkit::process_state(*pid).is_none()));
    let mut rest = Vec::new();
    let _ = open.read_to_end(&mut rest);
    assert!(rest.is_empty(), "no reply after the stop: {rest:?}");
}

#[test]
fn sigint_to_the_whole_process_group_drains_once() {
    // Ctrl-C signals every process of the group: the workers get SIGINT directly and
    // again (as SIGTERM) from the master; neither the master nor a worker may take that
    // for a second, "stop now" signal.
    let mut server = Server::start();
    let mut stream = server.connect_echo();
    stream.write_all(b"ctrl-c\n").expect("send");
    assert_eq!(read_line(&mut stream), "CTRL-C");
    nix::sys::signal::killpg(server.pid, Signal::SIGINT).expect("signal the group");
    assert!(server.wait_exit(Duration::from_secs(10)).success());
    let output = server.output();
    assert!(!output.contains(log_phrase::SECOND_SHUTDOWN), "{output}");
    // Workers that drained on their own signal are not "dead and replaced": that is for a
    // running pool.
    assert!(!output.contains(log_phrase::WORKER_DIED), "{output}");
}
