//! Hostile clients and odd operator moves found in review: a client that never pauses, a
//! client that never reads, a worker signalled directly, a flood of idle status connections,
//! bytes held back at a close, a start that fails after creating the pid file.

use std::io::{Read, Write};
use std::net::TcpListener;
use std::time::{Duration, Instant};

use forkpool_testkit::{http_request, log_phrase, request_line, wait_until, Server, Signal};
use nix::sys::signal::kill;

#[test]
fn a_bank_client_that_never_pauses_does_not_starve_its_neighbours() {
    let server = Server::builder()
        .args(["--workers", "1", "--worker-timeout", "2"])
        .start();
    let flood = server.connect_bank();
    let mut flood_reader = flood.try_clone().expect("clone the stream");
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let reader_stop = std::sync::Arc::clone(&stop);
    let reader = std::thread::spawn(move || {
        let mut buf = vec![0u8; 1 << 16];
        while !reader_stop.load(std::sync::atomic::Ordering::Relaxed) {
            if matches!(flood_reader.read(&mut buf), Ok(0) | Err(_)) {
                break;
            }
        }
    });
    let writer_stop = std::sync::Arc::clone(&stop);
    let writer = std::thread::spawn(move || {
        let chunk = b"PING\n".repeat(16 * 1024);
        let mut flood = flood;
        while !writer_stop.load(std::sync::atomic::Ordering::Relaxed) {
            if flood.write_all(&chunk).is_err() {
                break;
            }
        }
    });
    server.wait_log(log_phrase::ACCEPTED_BANK, Duration::from_secs(5));
    let mut slowest = Duration::ZERO;
    for _ in 0..10 {
        let started = Instant::now();
        let mut probe = server.connect_bank();
        assert_eq!(request_line(&mut probe, "PING"), "PONG");
        slowest = slowest.max(started.elapsed());
    }
    let probing_ended = Instant::now();
    // Keep the flood going past the worker timeout: its heartbeat must go on.
    wait_until("three seconds of flood", Duration::from_secs(5), || {
        (probing_ended.elapsed() >= Duration::from_secs(3)).then_some(())
    });
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    drop(server.connect_bank());
    assert!(
        !server.output().contains(log_phrase::NO_HEARTBEAT),
        "a busy worker was taken for a hung one:\n{}",
        server.output()
    );
    assert!(
        slowest < Duration::from_secs(1),
        "a neighbour waited {slowest:?}"
    );
    drop(server);
    let _ = (writer.join(), reader.join());
}

#[test]
fn a_worker_terminated_directly_gets_a_successor_and_cannot_outlive_the_graceful_timeout() {
    let server = Server::builder()
        .args([
            "--workers",
            "1",
            "--graceful-timeout",
            "1",
            "--output-limit",
            "65536",
        ])
        .start();
    let worker = server.wait_workers(1, Duration::from_secs(5))[0];
    // A client that sends and never reads: its replies can never all be delivered.
    let mut stubborn = server.connect_echo();
    stubborn
        .set_write_timeout(Some(Duration::from_millis(300)))
        .expect("set a write timeout");
    let chunk = vec![b'x'; 64 * 1024];
    while stubborn.write(&chunk).is_ok() {}
    kill(worker, Signal::SIGTERM).expect("signal the worker directly");
    // Its slot gets a successor, which serves new connections.
    wait_until("a successor", Duration::from_secs(5), || {
        server
            .workers()
            .iter()
            .any(|pid| *pid != worker)
            .then_some(())
    });
    for i in 0..10 {
        let mut stream = server.connect_echo();
        assert_eq!(
            request_line(&mut stream, &format!("next {i}")),
            format!("NEXT {i}")
        );
    }
    // The stuck drain ends by the deadline, however stubborn the client.
    wait_until("the old worker to be gone", Duration::from_secs(5), || {
        (!server.workers().contains(&worker)).then_some(())
    });
}

#[test]
fn the_status_page_survives_a_flood_of_idle_connections() {
    let status_port = TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port");
    let server = Server::builder()
        .args(["--status-addr", &status_port.to_string()])
        .start();
    let idle: Vec<_> = (0..80)
        .map(|_| std::net::TcpStream::connect(status_port).expect("connect to the status page"))
        .collect();
    let (code, body) = http_request(status_port, "GET", "/status");
    assert_eq!(code, 200);
    assert!(body.contains("live workers"), "{body}");
    drop(idle);
    drop(server);
}

#[test]
fn a_held_back_utf8_byte_goes_back_when_the_server_closes_an_idle_connection() {
    let server = Server::builder().args(["--idle-timeout", "0.5"]).start();
    let mut stream = server.connect_echo();
    stream.write_all(b"abc\xc3").expect("send");
    let mut reply = Vec::new();
    stream.read_to_end(&mut reply).expect("a clean close");
    assert_eq!(reply, b"ABC\xc3".to_vec());
}

#[test]
fn a_failed_start_leaves_no_pid_file_and_names_its_cause_once() {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let pid_file = dir.path().join("forkpool.pid");
    let taken = TcpListener::bind("127.0.0.1:0").expect("bind a port");
    let addr = taken.local_addr().expect("local address");
    let mut server = Server::builder()
        .args([
            "--echo-addr",
            &addr.to_string(),
            "--pid-file",
            pid_file.to_str().expect("UTF-8 path"),
        ])
        .spawn();
    assert!(!server.wait_exit(Duration::from_secs(10)).success());
    assert!(!pid_file.exists(), "the failed start left its pid file");
    let line = server
        .output_lines()
        .into_iter()
        .find(|line| line.starts_with("forkpool-server:"))
        .expect("one error line");
    assert_eq!(line.matches("os error").count(), 1, "{line}");
}
