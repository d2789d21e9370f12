//! forkpool-bench against real servers: it checks every reply, fails on wrong ones, survives a
//! server that dies, reports the server's CPU, and its JSON carries every figure.

use std::net::{SocketAddr, TcpListener};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use forkpool_testkit::{
    bench_json as json, binary, json_field as field, json_number as number, line_server,
    log_phrase, wait_until, LineReply, Server, Signal,
};

fn bench(args: &[&str]) -> Output {
    Command::new(binary("forkpool-bench"))
        .args(args)
        .output()
        .expect("forkpool-bench runs")
}

/// A deliberately wrong echo server: it lowercases.
fn lowercasing_server() -> SocketAddr {
    line_server(|_, line| LineReply::Answer(line.to_ascii_lowercase()))
}

#[test]
fn a_short_echo_run_checks_every_reply_and_finds_none_wrong() {
    let server = Server::start();
    let addr = server.echo_addr().to_string();
    for text in ["mixed", "ascii"] {
        let (report, code) = json(&[
            "echo", "--addr", &addr, "-c", "8", "-P", "4", "-d", "1", "--size", "64", "--text",
            text,
        ]);
        assert_eq!(code, 0, "{report}");
        assert_eq!(field(&report, "text").as_str(), Some(text), "{report}");
        assert_eq!(number(&report, "mismatches"), 0.0);
        assert!(number(&report, "requests") > 100.0, "{report}");
    }
}

#[test]
fn a_lowercasing_server_fails_the_run_with_mismatches_counted() {
    let addr = lowercasing_server().to_string();
    let out = bench(&["--addr", &addr, "-c", "2", "-d", "0.5"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(text.contains("wrong: expected '"), "{text}");
    let (report, code) = json(&["--addr", &addr, "-c", "2", "-d", "0.5"]);
    assert_eq!(code, 1);
    assert!(number(&report, "mismatches") > 0.0, "{report}");
    // A line without cased letters (digits, punctuation, CJK) is its own lowercase, so a
    // few replies of the lowercasing server are right; nearly all are wrong.
    let (wrong, replies) = (number(&report, "mismatches"), number(&report, "replies"));
    assert!(wrong <= replies && wrong >= 0.9 * replies, "{report}");
}

#[test]
fn a_server_killed_mid_run_ends_the_run_on_time_with_errors_counted() {
    let server = Server::start();
    let addr = server.echo_addr().to_string();
    let started = Instant::now();
    let run = std::thread::spawn(move || {
        json(&["--addr", &addr, "-c", "10", "-d", "2", "--timeout", "0.5"])
    });
    // Kill the whole server once the run is under way: its reachability check's connection
    // and all ten of the run's accepted.
    wait_until(
        "the run's connections to be accepted",
        Duration::from_secs(10),
        || {
            let accepted = server
                .output_lines()
                .iter()
                .filter(|line| line.contains(log_phrase::ACCEPTED_ECHO))
                .count();
            (accepted > 10).then_some(())
        },
    );
    let _ = nix::sys::signal::killpg(server.pid, Signal::SIGKILL);
    let (report, code) = run.join().expect("the bench thread");
    let took = started.elapsed();
    assert!(took < Duration::from_secs(4), "took {took:?}");
    assert_eq!(code, 3, "{report}");
    let errors: f64 = ["connect_errors", "resets", "closed", "timeouts"]
        .iter()
        .map(|k| number(&report, k))
        .sum();
    assert!(errors > 0.0, "{report}");
    assert_eq!(number(&report, "mismatches"), 0.0);
}

#[test]
fn server_cpu_grows_with_the_work_done() {
    let server = Server::start();
    let addr = server.echo_addr().to_string();
    let pid = server.pid.to_string();
    let cpu = |n: &str| {
        let (r, code) = json(&["--addr", &addr, "-c", "4", "-n", n, "--server-pid", &pid]);
        assert_eq!(code, 0, "{r}");
        assert!(number(&r, "server_processes") >= 2.0, "{r}");
        number(&r, "server_cpu_us")
    };
    let small = cpu("2000");
    let large = cpu("40000");
    assert!(small > 0.0, "{small}");
    assert!(
        large > 3.0 * small,
        "2000 requests: {small} us, 40000 requests: {large} us"
    );
}

#[test]
fn json_output_has_every_field() {
    let server = Server::start();
    let addr = server.echo_addr().to_string();
    let pid = server.pid.to_string();
    // Enough requests for a window of tens of milliseconds at least: the server's CPU is
    // sampled at the window's edges, and 500 requests (about 10 ms) could all be served
    // before a loaded machine ran the sampling thread.
    let (r, code) = json(&[
        "--addr",
        &addr,
        "-c",
        "2",
        "-n",
        "5000",
        "--warmup",
        "0.1",
        "--server-pid",
        &pid,
    ]);
    assert_eq!(code, 0, "{r}");
    for key in [
        "mode",
        "addr",
        "connections",
        "pipeline",
        "threads",
        "size",
        "text",
        "rate",
        "seed",
        "warmup_s",
        "window_s",
        "requests",
        "requests_per_sec",
        "mb_per_sec_sent",
        "mb_per_sec_received",
        "latency",
        "counters",
        "client_cpu_us",
        "client_cpu_us_per_request",
        "server_pid",
        "server_processes",
        "server_cpu_us",
        "server_cpu_us_per_request",
        "mismatch_samples",
        "bank",
        "verdict",
        "exit_code",
        // latency
        "mean_us",
        "p50_us",
        "p90_us",
        "p99_us",
        "p999_us",
        "max_us",
        // counters
        "completed",
        "replies",
        "mismatches",
        "bytes_sent",
        "bytes_received",
        "connects",
        "connect_errors",
        "resets",
        "closed",
        "timeouts",
        "abandoned",
    ] {
        field(&r, key);
    }
    assert_eq!(number(&r, "requests"), 5000.0);
    assert!(number(&r, "server_cpu_us_per_request") > 0.0, "{r}");
    assert!(number(&r, "p99_us") > 0.0, "{r}");
    assert!(field(&r, "bank").is_null(), "{r}");
}

#[test]
fn a_bank_run_ends_with_the_audit_matching() {
    let server = Server::start();
    let addr = server.bank_addr().to_string();
    let (r, code) = json(&[
        "bank",
        "--addr",
        &addr,
        "-c",
        "8",
        "-P",
        "4",
        "-d",
        "1",
        "--accounts",
        "20",
    ]);
    assert_eq!(code, 0, "{r}");
    assert_eq!(field(&r, "audit_ok"), true, "{r}");
    assert_eq!(field(&r, "difference"), 0, "{r}");
    assert_eq!(field(&r, "unknown_ops"), 0, "{r}");
    assert!(number(&r, "applied") > 100.0, "{r}");
}

/// An address that accepts no connection is a failure to start (exit 2, one line naming the
/// address on stderr, nothing on stdout), the same in both modes and with `--json`.
#[test]
fn an_address_that_accepts_nothing_is_the_same_start_failure_in_both_modes() {
    let refused = TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .expect("a free port")
        .to_string();
    for args in [
        &["echo", "--addr", &refused][..],
        &["bank", "--addr", &refused],
        &["echo", "--addr", &refused, "--json"],
        &["bank", "--addr", &refused, "--json"],
        &["--addr", &refused],
    ] {
        let out = bench(args);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {stderr}");
        assert!(out.stdout.is_empty(), "{args:?}: no report");
        assert_eq!(
            stderr.lines().collect::<Vec<_>>(),
            [format!(
                "forkpool-bench: cannot connect to {refused}: Connection refused (os error 111)"
            )],
            "{args:?}"
        );
    }
}

#[test]
fn an_unknown_mode_is_named_with_the_top_level_usage() {
    let out = bench(&["bogus"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("unrecognized subcommand 'bogus'")
            && stderr.contains("Usage: forkpool-bench <COMMAND>"),
        "{stderr}"
    );
}

/// `echo --help` and `bank --help` share one layout (each option's help on the line after it),
/// and the options they share read the same, but for the default address.
#[test]
fn echo_and_bank_help_share_one_layout() {
    let help = |mode: &str| {
        let out = bench(&[mode, "--help"]);
        assert!(out.status.success());
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let (echo, bank) = (help("echo"), help("bank"));
    let options = |text: &str| -> Vec<String> {
        let lines: Vec<&str> = text
            .lines()
            .skip_while(|line| *line != "Options:")
            .skip(1)
            .take_while(|line| !line.is_empty())
            .collect();
        for pair in lines.chunks(2) {
            assert!(
                pair.len() == 2
                    && pair[0].trim_start().starts_with('-')
                    && pair[1].starts_with("          "),
                "an option, then its help on the next line: {pair:?}\n{text}"
            );
        }
        lines.iter().map(|line| line.to_string()).collect()
    };
    let (echo, bank) = (options(&echo), options(&bank));
    let shared = |lines: &[String]| -> Vec<String> {
        lines
            .chunks(2)
            .filter(|pair| bank_and_echo_flag(&pair[0]))
            .flat_map(|pair| pair.iter().cloned())
            .collect()
    };
    let (echo_shared, bank_shared) = (shared(&echo), shared(&bank));
    assert_eq!(echo_shared.len(), bank_shared.len());
    for (e, b) in echo_shared.iter().zip(&bank_shared) {
        if e.contains("[default: 127.0.0.1:") {
            assert!(e.ends_with(":7878]") && b.ends_with(":7879]"), "{e} / {b}");
        } else {
            assert_eq!(e, b);
        }
    }
}

/// An option line of a flag both modes have.
fn bank_and_echo_flag(line: &str) -> bool {
    ![
        "--size",
        "--text",
        "--accounts",
        "--opening-balance",
        "--mix",
        "--prefix",
        "--auth",
    ]
    .iter()
    .any(|flag| line.contains(&format!("{flag} ")))
}

/// `requests` are the measured window's replies, `checked` every reply verified (warm-up
/// included): the report says which is which, and checked is never below requests.
#[test]
fn the_report_says_what_requests_and_checked_count() {
    let server = Server::start();
    let addr = server.echo_addr().to_string();
    let args = ["--addr", &addr, "-c", "2", "-n", "300", "--warmup", "0.3"];
    let (r, code) = json(&args);
    assert_eq!(code, 0, "{r}");
    assert_eq!(number(&r, "requests"), 300.0, "{r}");
    assert_eq!(number(&r, "completed"), 300.0, "{r}");
    assert!(number(&r, "replies") >= 300.0, "{r}");
    let out = bench(&args);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("  requests   300 in the measured window  (")
            && text.contains(
                " replies in all (warm-up and end-of-window in-flight included), 0 wrong"
            ),
        "{text}"
    );
}
