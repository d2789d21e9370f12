//! Supervision: dead workers are reaped and replaced, the master's death takes the workers
//! with it, and start-up failures are one clear line and a non-zero exit.

use std::io::Read;
use std::net::TcpListener;
use std::time::{Duration, Instant};

use forkpool_testkit::{
    http_request, is_alive, log_phrase, process_state, request_line, wait_until, Server, Signal,
};
use nix::sys::signal::kill;

#[test]
fn a_killed_worker_is_reaped_and_replaced_by_one_that_serves() {
    let server = Server::start();
    let before = server.wait_workers(2, Duration::from_secs(5));
    let victim = before[0];
    let killed_at = Instant::now();
    kill(victim, Signal::SIGKILL).expect("kill a worker");
    // Reaped: the pid disappears (a zombie would still show in /proc with state Z).
    wait_until(
        "the killed worker to be reaped",
        Duration::from_secs(2),
        || process_state(victim).is_none().then_some(()),
    );
    let after = wait_until("a replacement worker", Duration::from_secs(5), || {
        let workers = server.workers();
        (workers.len() == 2 && !workers.contains(&victim)).then_some(workers)
    });
    let replaced_in = killed_at.elapsed();
    assert!(after.iter().any(|pid| !before.contains(pid)));
    assert!(
        server
            .workers()
            .iter()
            .all(|pid| process_state(*pid) != Some('Z')),
        "no zombie children"
    );
    // Every connection is served, whichever slot it hashes to (also the replaced one's).
    for i in 0..40 {
        let mut stream = server.connect_echo();
        assert_eq!(
            request_line(&mut stream, &format!("after {i}")),
            format!("AFTER {i}")
        );
    }
    eprintln!("worker replaced {replaced_in:?} after SIGKILL");
}

#[test]
fn workers_killed_again_and_again_are_replaced_without_backoff() {
    let server = Server::start();
    for _ in 0..10 {
        let workers = server.wait_workers(2, Duration::from_secs(5));
        wait_until("every worker ready", Duration::from_secs(5), || {
            let started = server
                .output_lines()
                .iter()
                .filter(|line| line.contains("serving"))
                .count();
            (started >= 2).then_some(())
        });
        kill(workers[0], Signal::SIGKILL).expect("kill a worker");
        wait_until(
            "the killed worker to be reaped",
            Duration::from_secs(2),
            || process_state(workers[0]).is_none().then_some(()),
        );
    }
    server.wait_workers(2, Duration::from_secs(5));
    let mut stream = server.connect_echo();
    assert_eq!(request_line(&mut stream, "still serving"), "STILL SERVING");
}

#[test]
fn killing_the_master_takes_every_worker_with_it() {
    let server = Server::start();
    let workers = server.wait_workers(2, Duration::from_secs(5));
    server.signal(Signal::SIGKILL);
    wait_until(
        "every worker to exit after the master's death",
        Duration::from_secs(3),
        || workers.iter().all(|pid| !is_alive(*pid)).then_some(()),
    );
}

#[test]
fn an_address_in_use_is_a_clear_error_with_no_child_left() {
    let taken = TcpListener::bind("127.0.0.1:0").expect("bind a port");
    let addr = taken.local_addr().expect("local address");
    let mut server = Server::builder()
        .args(["--echo-addr", &addr.to_string()])
        .spawn();
    let status = server.wait_exit(Duration::from_secs(10));
    assert!(!status.success());
    let output = server.output();
    assert!(
        output.contains(&format!("cannot listen on {addr}")) && output.contains("in use"),
        "unclear error: {output}"
    );
    assert!(!output.contains("panicked"), "{output}");
    assert!(
        !output.contains(log_phrase::WORKER_STARTED),
        "a worker was forked: {output}"
    );
}

#[test]
fn a_second_server_on_the_same_port_is_refused_not_joined() {
    let first = Server::start();
    let mut second = Server::builder()
        .args(["--echo-addr", &first.echo_addr().to_string()])
        .spawn();
    assert!(!second.wait_exit(Duration::from_secs(10)).success());
    assert!(second.output().contains("in use"), "{}", second.output());
}

#[test]
fn bad_settings_are_one_clear_line_and_a_failure() {
    let cases: &[(&[&str], &str)] = &[
        (&["--workers", "0"], "workers"),
        (&["--echo-addr", "localhost"], "invalid value 'localhost'"),
        (&["--graceful-timeout=-3"], "graceful_timeout"),
        (
            &["--config", "/nonexistent/forkpool.toml"],
            "cannot read config file /nonexistent/forkpool.toml",
        ),
    ];
    for (args, expected) in cases {
        let mut server = Server::builder().args(args.iter().copied()).spawn();
        let output = server.wait_refused(&format!("{args:?}"));
        assert!(
            output.contains(expected),
            "{args:?}: expected {expected:?} in {output}"
        );
    }
}

/// At the level an operator runs it (`RUST_LOG` unset), a failed start prints exactly one line
/// on stderr, whichever step fails: settings, config file, listener, status listener (bound
/// after the ledger is open), ledger.
#[test]
fn a_failed_start_is_exactly_one_line_on_stderr_at_the_default_log_level() {
    let taken = TcpListener::bind("127.0.0.1:0").expect("bind a port");
    let taken = taken.local_addr().expect("local address").to_string();
    let running = Server::start();
    let ledger_in_use = running.data_dir().path().join("ledger.bin");
    let ledger_in_use = ledger_in_use.to_str().expect("UTF-8 path").to_string();
    let cases: &[(&[&str], &str)] = &[
        (&["--workers", "0"], "invalid setting workers = 0"),
        (
            &["--config", "/nonexistent/forkpool.toml"],
            "cannot read config file",
        ),
        (&["--echo-addr", &taken], "in use"),
        (&["--status-addr", &taken], "in use"),
        (&["--ledger", &ledger_in_use], "locked"),
    ];
    for (args, cause) in cases {
        let mut server = Server::builder()
            .default_log_level()
            .args(args.iter().copied())
            .spawn();
        server.wait_refused(&format!("{args:?}"));
        let stderr = server.stderr_lines();
        assert!(
            stderr.len() == 1
                && stderr[0].starts_with("forkpool-server: ")
                && stderr[0].contains(cause),
            "{args:?}: expected one line naming {cause:?} on stderr, got {stderr:#?}"
        );
        assert_eq!(server.output_lines(), stderr, "{args:?}: nothing on stdout");
    }
}

#[test]
fn a_config_file_with_an_unknown_or_malformed_setting_is_refused() {
    let dir = tempfile::tempdir().expect("a temporary directory");
    for (text, expected) in [
        ("wrokers = 2\n", "wrokers"),
        (
            "backlog = 7\nworkers = \"two\"\n",
            "line 2, key workers: invalid type: string \"two\", expected usize",
        ),
        ("echo_addr = \"127.0.0.1\"\n", "echo_addr = 127.0.0.1"),
        ("\u{0}\u{ff}garbage[[", "bad.toml"),
    ] {
        let path = dir.path().join("bad.toml");
        std::fs::write(&path, text).expect("write a config file");
        let mut server = Server::builder()
            .args(["--config", path.to_str().expect("UTF-8 path")])
            .spawn();
        let output = server.wait_refused(&format!("{text:?}"));
        assert!(
            output.contains(expected),
            "{text:?}: expected {expected:?} in {output}"
        );
    }
}

#[test]
fn settings_come_from_the_config_file_and_flags_win() {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let path = dir.path().join("forkpool.toml");
    std::fs::write(&path, "workers = 3\nidle_timeout = 0.5\n").expect("write a config file");
    let server = Server::builder()
        .args([
            "--config",
            path.to_str().expect("UTF-8 path"),
            "--workers",
            "1",
        ])
        .start();
    // The flag wins: one worker (the log line may arrive after the ready line).
    server.wait_workers(1, Duration::from_secs(5));
    server.wait_log(
        &format!("1 {}", log_phrase::WORKERS_SERVING),
        Duration::from_secs(5),
    );
    // The file's idle_timeout applies (the harness passes no flag for it): an idle
    // connection is closed by the server, which the harness's 300 s default would not do.
    let mut stream = server.connect_echo();
    assert_eq!(request_line(&mut stream, "idle soon"), "IDLE SOON");
    let mut rest = Vec::new();
    let read = stream
        .read_to_end(&mut rest)
        .expect("the server closes the idle connection");
    assert_eq!((read, rest), (0, Vec::new()), "nothing but EOF");
}

/// The review's crash loop: `max_requests + jitter` wrapped to 0 and every worker panicked
/// dividing by it, so the pool never became ready and never gave up. The bound is checked at
/// load time instead.
#[test]
fn a_jitter_beyond_its_bound_is_refused_at_start() {
    let mut server = Server::builder()
        .args([
            "--max-requests",
            "1",
            "--max-requests-jitter",
            "18446744073709551615",
        ])
        .spawn();
    assert!(!server.wait_exit(Duration::from_secs(10)).success());
    let output = server.output();
    assert!(
        output.contains("invalid setting max_requests_jitter = 18446744073709551615"),
        "{output}"
    );
    assert!(!output.contains("panicked"), "{output}");
}

/// Each retirement by `max_requests` reaches the master once, by one channel: the metrics
/// count one recycled restart per retired worker (the scoreboard's "draining" state, read
/// first, once made the count come out low).
#[test]
fn every_recycled_worker_is_counted_once() {
    const LIMIT: usize = 3;
    const RETIREMENTS: usize = 12;
    let server = Server::builder()
        .args([
            "--workers",
            "1",
            "--max-requests",
            &LIMIT.to_string(),
            "--status-addr",
            "127.0.0.1:0",
        ])
        .start();
    for round in 0..RETIREMENTS {
        let retiring = server.wait_workers(1, Duration::from_secs(10));
        for _ in 0..LIMIT {
            let mut stream = server.connect_echo();
            assert_eq!(request_line(&mut stream, "hello"), "HELLO");
        }
        wait_until(
            &format!("retirement {} to be counted", round + 1),
            Duration::from_secs(10),
            || (recycled(&server) == round + 1).then_some(()),
        );
        wait_until(
            "the retired worker to exit",
            Duration::from_secs(10),
            || (!server.workers().contains(&retiring[0])).then_some(()),
        );
    }
    assert_eq!(recycled(&server), RETIREMENTS);
}

/// `forkpool_worker_restarts_total{reason="recycled"}` from the status page.
fn recycled(server: &Server) -> usize {
    let (code, body) = http_request(server.status_addr(), "GET", "/metrics");
    assert_eq!(code, 200);
    body.lines()
        .find_map(|line| line.strip_prefix("forkpool_worker_restarts_total{reason=\"recycled\"} "))
        .and_then(|count| count.parse().ok())
        .unwrap_or_else(|| panic!("no recycled count in {body}"))
}
