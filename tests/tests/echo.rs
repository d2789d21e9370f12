//! The echo service over real TCP: every line comes back uppercased, in order, whatever its
//! encoding, length or ending.

use std::collections::HashSet;
use std::io::{Read, Write};
use std::time::Duration;

use forkpool_common::codec::uppercase_line;
use forkpool_testkit::{exchange, log_phrase, read_line, request_line, wait_until, Server};

fn upper(bytes: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    uppercase_line(bytes, &mut out);
    out
}

#[test]
fn a_line_comes_back_uppercased_like_from_nc() {
    let server = Server::start();
    let mut stream = server.connect_echo();
    assert_eq!(
        request_line(&mut stream, "hello, world 42"),
        "HELLO, WORLD 42"
    );
    assert_eq!(request_line(&mut stream, "again"), "AGAIN");
}

#[test]
fn unicode_is_uppercased_as_python_does() {
    let server = Server::start();
    let replies = exchange(
        server.connect_echo(),
        "straße\nǆ\n你好，世界\nσς ﬃ ΐ\nÉcole ñ\n".as_bytes(),
    );
    assert_eq!(
        String::from_utf8(replies).expect("valid UTF-8 comes back valid"),
        "STRASSE\nǄ\n你好，世界\nΣΣ FFI \u{399}\u{308}\u{301}\nÉCOLE Ñ\n"
    );
}

#[test]
fn invalid_utf8_bytes_come_back_unchanged_and_ascii_is_uppercased() {
    let server = Server::start();
    let request = b"ab\xffcd\xc3(\xe9t\n\xf0\x9f\x98 x\xc3\xa9\n\x80\x00nul\n";
    let replies = exchange(server.connect_echo(), request);
    assert_eq!(
        replies,
        b"AB\xffCD\xc3(\xe9T\n\xf0\x9f\x98 X\xc3\x89\n\x80\x00NUL\n".to_vec()
    );
}

#[test]
fn crlf_endings_are_kept() {
    let server = Server::start();
    let replies = exchange(server.connect_echo(), b"one\r\ntwo\nthree\r\n");
    assert_eq!(replies, b"ONE\r\nTWO\nTHREE\r\n".to_vec());
}

#[test]
fn ten_thousand_pipelined_lines_are_answered_in_order() {
    let server = Server::start();
    let request: Vec<u8> = (0..10_000)
        .flat_map(|i| format!("line {i} ß\n").into_bytes())
        .collect();
    let replies = exchange(server.connect_echo(), &request);
    let expected: Vec<u8> = (0..10_000)
        .flat_map(|i| format!("LINE {i} SS\n").into_bytes())
        .collect();
    assert_eq!(replies.len(), expected.len());
    assert!(
        replies == expected,
        "replies differ from the expected order"
    );
}

#[test]
fn an_unterminated_last_line_is_answered_then_the_server_closes() {
    let server = Server::start();
    // exchange() half-closes after sending and reads until the server's EOF.
    assert_eq!(exchange(server.connect_echo(), b"hello"), b"HELLO".to_vec());
    assert_eq!(exchange(server.connect_echo(), b"a\nb"), b"A\nB".to_vec());
    assert_eq!(exchange(server.connect_echo(), b""), b"".to_vec());
}

#[test]
fn a_ten_mib_line_streams_through_in_bounded_memory() {
    let server = Server::builder().args(["--workers", "1"]).start();
    let worker = server.wait_workers(1, Duration::from_secs(5))[0];
    let before_kib = status_kib(worker, "VmHWM:");
    let line: Vec<u8> = "abcdéfghß"
        .bytes()
        .cycle()
        .take(10 * 1024 * 1024)
        .chain([b'\n'])
        .collect();
    let replies = exchange(server.connect_echo(), &line);
    assert_eq!(replies.len(), upper(&line).len());
    assert!(replies == upper(&line), "the long line came back altered");
    // The worker never held the line: its peak resident memory grew by far less than the
    // line (what it does hold is one read buffer and its uppercase).
    let grown_kib = status_kib(worker, "VmHWM:").saturating_sub(before_kib);
    assert!(
        grown_kib < 4 * 1024,
        "worker peak RSS grew {grown_kib} KiB for a 10 MiB line: the line was buffered"
    );
}

#[test]
fn two_hundred_concurrent_clients_are_served_by_more_than_one_worker() {
    let server = Server::start();
    let clients: Vec<_> = (0..200)
        .map(|i| {
            let mut stream = server.connect_echo();
            stream
                .write_all(format!("client {i}\n").as_bytes())
                .expect("send");
            (i, stream)
        })
        .collect();
    for (i, mut stream) in clients {
        assert_eq!(read_line(&mut stream), format!("CLIENT {i}"));
    }
    // Each worker logs the connections it accepts, tagged with its pid.
    let pids: HashSet<String> = wait_until("200 accept log lines", Duration::from_secs(5), || {
        let accepted: Vec<String> = server
            .output_lines()
            .into_iter()
            .filter(|line| line.contains(log_phrase::ACCEPTED_ECHO))
            .collect();
        (accepted.len() >= 200).then_some(accepted)
    })
    .iter()
    .filter_map(|line| {
        line.split("pid=")
            .nth(1)?
            .split(']')
            .next()
            .map(str::to_string)
    })
    .collect();
    assert!(
        pids.len() >= 2,
        "all 200 connections landed on one worker: {pids:?}"
    );
}

#[test]
fn an_idle_connection_is_closed_after_the_idle_timeout() {
    let server = Server::builder().args(["--idle-timeout", "0.5"]).start();
    let mut stream = server.connect_echo();
    assert_eq!(request_line(&mut stream, "still here"), "STILL HERE");
    let mut rest = Vec::new();
    // The read ends with EOF once the server closes the idle connection.
    stream
        .read_to_end(&mut rest)
        .expect("a clean close, not a reset");
    assert!(rest.is_empty());
}

#[test]
fn a_client_that_does_not_read_cannot_make_the_worker_buffer_without_bound() {
    let server = Server::builder()
        .args(["--workers", "1", "--output-limit", "65536"])
        .start();
    let worker = server.wait_workers(1, Duration::from_secs(5))[0];
    let before_kib = status_kib(worker, "VmRSS:");
    let mut stream = server.connect_echo();
    stream
        .set_write_timeout(Some(Duration::from_millis(500)))
        .expect("set a write timeout");
    let chunk = vec![b'x'; 64 * 1024];
    let mut sent = 0usize;
    // Write without reading until the server stops taking input (the write times out).
    while sent < 256 * 1024 * 1024 {
        match stream.write(&chunk) {
            Ok(n) => sent += n,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
            Err(e) => panic!("write failed: {e}"),
        }
    }
    assert!(
        sent < 256 * 1024 * 1024,
        "the server kept reading from a client that never reads"
    );
    // What the worker holds is bounded by the output limit, not by what the client sent.
    let grown_kib = status_kib(worker, "VmRSS:").saturating_sub(before_kib);
    assert!(
        grown_kib < 4 * 1024,
        "worker RSS grew {grown_kib} KiB after {sent} unread bytes"
    );
    // Everything sent is still answered once the client reads.
    stream
        .shutdown(std::net::Shutdown::Write)
        .expect("half-close");
    stream
        .set_read_timeout(Some(Duration::from_secs(20)))
        .expect("set a read timeout");
    let mut replies = Vec::new();
    stream.read_to_end(&mut replies).expect("read the replies");
    assert_eq!(replies.len(), sent);
    assert!(replies.iter().all(|&b| b == b'X'));
}

#[test]
fn ipv6_loopback_is_served() {
    let server = Server::builder().args(["--echo-addr", "[::1]:0"]).start();
    assert!(server.echo_addr().is_ipv6());
    let mut stream = server.connect_echo();
    assert_eq!(request_line(&mut stream, "over v6"), "OVER V6");
}

/// A `kB` figure from `/proc/<pid>/status`.
fn status_kib(pid: nix::unistd::Pid, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("read /proc status");
    status
        .lines()
        .find_map(|line| line.strip_prefix(field))
        .and_then(|value| value.split_whitespace().next()?.parse().ok())
        .unwrap_or_else(|| panic!("{field} in /proc/{pid}/status"))
}

#[test]
fn netcat_gets_its_lines_back_uppercased_and_the_server_closes_after_eof() {
    let Some(nc) = forkpool_testkit::tool("nc") else {
        return;
    };
    let server = Server::start();
    let addr = server.echo_addr();
    let output = std::process::Command::new(nc)
        .args(["-N", &addr.ip().to_string(), &addr.port().to_string()])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .and_then(|mut child| {
            child
                .stdin
                .take()
                .expect("stdin is piped")
                .write_all("hello, world\nstraße\nno newline".as_bytes())?;
            child.wait_with_output()
        })
        .expect("nc runs");
    assert!(output.status.success());
    assert_eq!(
        String::from_utf8_lossy(&output.stdout),
        "HELLO, WORLD\nSTRASSE\nNO NEWLINE"
    );
}
