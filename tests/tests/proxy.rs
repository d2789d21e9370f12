//! The PROXY protocol on the real server: with `--proxy-protocol` a service reads HAProxy's
//! v1 or v2 header first and serves the rest of the connection as the client it names
//! (logs, the AUTH throttle); a connection without a valid header is closed, logged and
//! counted; without the setting a PROXY line is an ordinary request line.

use std::io::{ErrorKind, Read, Write};
use std::net::{Ipv6Addr, TcpStream};
use std::path::Path;
use std::time::Duration;

use forkpool_testkit::log_phrase::{PROXY_REFUSED, THROUGH_PROXY};
use forkpool_testkit::{metric, read_line, request_line, wait_until, Server, Signal};

const WAIT: Duration = Duration::from_secs(20);

/// A server whose `services` are behind a proxy, with one worker (the AUTH throttle is per
/// worker) and its metrics.
fn proxied(services: &str, extra: &[&str]) -> Server {
    Server::builder()
        .args(["--workers", "1", "--proxy-protocol", services])
        .args(["--status-addr", "127.0.0.1:0"])
        .args(extra.iter().copied())
        .start()
}

/// A v2 PROXY header for TCP over IPv6 from `source`:`port`, with a NOOP TLV.
fn v2_header(source: Ipv6Addr, port: u16) -> Vec<u8> {
    let mut body = source.octets().to_vec();
    body.extend_from_slice(&Ipv6Addr::LOCALHOST.octets());
    body.extend_from_slice(&port.to_be_bytes());
    body.extend_from_slice(&7878u16.to_be_bytes());
    body.extend_from_slice(&[0x04, 0x00, 0x02, 0, 0]);
    let mut header = b"\r\n\r\n\0\r\nQUIT\n\x21\x21".to_vec();
    header.extend_from_slice(&u16::try_from(body.len()).expect("short").to_be_bytes());
    header.extend_from_slice(&body);
    header
}

fn v1_header(source: &str, port: u16) -> String {
    format!("PROXY TCP4 {source} 198.51.100.1 {port} 7879\r\n")
}

/// `forkpool_proxy_headers_total` of `service` and `result`.
fn headers_counted(server: &Server, service: &str, result: &str) -> f64 {
    metric(
        &server.metrics(),
        &format!("forkpool_proxy_headers_total{{service=\"{service}\",result=\"{result}\"}}"),
    )
}

/// Waits until the server has closed `stream` without a byte of reply (EOF, or a reset:
/// what a refused connection may see).
fn closed_without_reply(mut stream: TcpStream, what: &str) {
    let mut got = Vec::new();
    match stream.read_to_end(&mut got) {
        Ok(_) => {}
        Err(e) if e.kind() == ErrorKind::ConnectionReset => {}
        Err(e) => panic!("{what}: not closed: {e}"),
    }
    assert!(got.is_empty(), "{what}: replied {got:?}");
}

#[test]
fn a_v1_header_names_the_client_and_what_follows_it_is_served() {
    let server = proxied("bank", &[]);
    let mut bank = server.connect_bank();
    // The header and the first requests in one packet: nothing after the header is lost.
    let packet = format!("{}DEPOSIT alice 5\nPING\n", v1_header("192.0.2.7", 51234));
    bank.write_all(packet.as_bytes()).expect("send");
    assert_eq!(read_line(&mut bank), "OK 5");
    assert_eq!(read_line(&mut bank), "PONG");
    assert_eq!(request_line(&mut bank, "BALANCE alice"), "OK 5");
    server.wait_log(
        &format!("connection from 192.0.2.7:51234{THROUGH_PROXY}127.0.0.1"),
        WAIT,
    );
    assert_eq!(headers_counted(&server, "bank", "v1"), 1.0);
    // The echo service is not behind the proxy: a PROXY line there is text to uppercase.
    let mut echo = server.connect_echo();
    let line = v1_header("192.0.2.7", 1);
    echo.write_all(line.as_bytes()).expect("send");
    assert_eq!(
        read_line(&mut echo),
        line.to_uppercase().trim_end_matches('\n')
    );
}

#[test]
fn a_v2_header_torn_across_packets_is_read_whole() {
    let server = proxied("echo,bank", &[]);
    let client: Ipv6Addr = "2001:db8::7".parse().expect("an address");
    let header = v2_header(client, 4242);
    for (service, mut stream, request, reply) in [
        ("echo", server.connect_echo(), "hello", "HELLO"),
        ("bank", server.connect_bank(), "PING", "PONG"),
    ] {
        // Three writes with TCP_NODELAY: the signature cut, then the addresses cut, then the
        // rest of the header with the first request.
        let mut rest = [&header[..], request.as_bytes(), b"\n"].concat();
        for cut in [7, 20] {
            stream.write_all(&rest[..cut]).expect("send a piece");
            std::thread::sleep(Duration::from_millis(30));
            rest.drain(..cut);
        }
        stream.write_all(&rest).expect("send the rest");
        assert_eq!(read_line(&mut stream), reply, "{service}");
        assert_eq!(headers_counted(&server, service, "v2"), 1.0, "{service}");
    }
    server.wait_log(
        &format!("connection from [2001:db8::7]:4242{THROUGH_PROXY}"),
        WAIT,
    );
}

#[test]
fn a_connection_without_a_valid_header_is_closed_logged_and_counted() {
    let server = proxied("bank", &[]);
    let too_long = [&b"PROXY "[..], &[b'x'; 200]].concat();
    for (result, bytes) in [
        ("missing", &b"PING\n"[..]),
        ("missing", b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03"),
        (
            "malformed",
            b"PROXY TCP4 192.0.2.7 198.51.100.1 51234\r\nPING\n",
        ),
        (
            "malformed",
            b"PROXY TCP6 192.0.2.7 198.51.100.1 1 2\r\nPING\n",
        ),
        ("malformed", b"\r\n\r\n\0\r\nQUIT\n\x31\x11\x00\x0c"),
        ("malformed", &too_long),
    ] {
        let before = headers_counted(&server, "bank", result);
        let mut bank = server.connect_bank();
        bank.write_all(bytes).expect("send");
        closed_without_reply(bank, &format!("{bytes:?}"));
        assert_eq!(
            headers_counted(&server, "bank", result),
            before + 1.0,
            "{bytes:?}"
        );
    }
    // Cut short by the client's EOF.
    let mut bank = server.connect_bank();
    bank.write_all(b"PROXY TCP4 192.0.2.").expect("send");
    bank.shutdown(std::net::Shutdown::Write)
        .expect("half-close");
    closed_without_reply(bank, "a truncated header");
    assert_eq!(headers_counted(&server, "bank", "truncated"), 1.0);
    server.wait_log(&format!("{PROXY_REFUSED}truncated)"), WAIT);
    server.wait_log(&format!("{PROXY_REFUSED}missing)"), WAIT);
    // Silent: closed once the header's time is up (5 s), and counted.
    let silent = server.connect_bank();
    silent
        .set_read_timeout(Some(WAIT))
        .expect("set a read timeout");
    closed_without_reply(silent, "a silent connection");
    assert_eq!(headers_counted(&server, "bank", "timeout"), 1.0);
    // The worker serves on.
    let mut bank = server.connect_bank();
    bank.write_all(format!("{}PING\n", v1_header("192.0.2.9", 1)).as_bytes())
        .expect("send");
    assert_eq!(read_line(&mut bank), "PONG");
}

#[test]
fn without_the_setting_a_proxy_line_is_an_ordinary_bad_request() {
    let server = Server::builder().start();
    let mut bank = server.connect_bank();
    let reply = request_line(&mut bank, v1_header("192.0.2.7", 51234).trim_end());
    assert!(reply.starts_with("ERR unknown-command "), "{reply}");
    assert_eq!(
        request_line(&mut bank, "PING"),
        "PONG",
        "the connection goes on"
    );
    assert!(!server.has_logged(THROUGH_PROXY));
}

#[test]
fn the_auth_throttle_counts_the_client_behind_the_proxy_not_the_proxy() {
    let users = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/users.toml");
    let server = proxied("bank", &["--users-file", &users.display().to_string()]);
    let auth = |client: &str, port: u16| {
        let mut bank = server.connect_bank();
        bank.write_all(v1_header(client, port).as_bytes())
            .expect("send the header");
        request_line(&mut bank, "AUTH alice not-the-token")
    };
    // Ten failures from one client (a connection closes after three)...
    for attempt in 0..10 {
        let reply = auth("192.0.2.1", 40000 + attempt);
        assert_eq!(
            reply, "ERR denied invalid user or token",
            "attempt {attempt}"
        );
    }
    // ... throttle that client, and only it: all of them come from the proxy's address.
    let reply = auth("192.0.2.1", 40010);
    assert!(
        reply.starts_with("ERR denied too many failed AUTH"),
        "{reply}"
    );
    assert_eq!(
        auth("192.0.2.2", 40011),
        "ERR denied invalid user or token",
        "another client behind the same proxy is not throttled"
    );
    server.wait_log(
        "AUTH as alice from 192.0.2.1 refused: too many failures",
        WAIT,
    );
    let mut bank = server.connect_bank();
    bank.write_all(v1_header("192.0.2.2", 1).as_bytes())
        .expect("send the header");
    assert_eq!(
        request_line(&mut bank, "AUTH alice example-alice-token"),
        "OK alice"
    );
}

#[test]
fn a_connection_handed_over_to_another_worker_keeps_its_real_client() {
    let users = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/users.toml");
    let server = proxied("bank", &["--users-file", &users.display().to_string()]);
    let before = server.wait_settled(1, WAIT);
    let mut bank = server.connect_bank();
    bank.write_all(format!("{}PING\n", v1_header("192.0.2.5", 1)).as_bytes())
        .expect("send");
    assert_eq!(read_line(&mut bank), "PONG");
    // A reload replaces the worker: the connection moves to its successor.
    server.signal(Signal::SIGHUP);
    wait_until("the worker replaced", WAIT, || {
        let now = server.wait_settled(1, WAIT);
        (now != before).then_some(())
    });
    assert_eq!(
        request_line(&mut bank, "AUTH alice not-the-token"),
        "ERR denied invalid user or token"
    );
    server.wait_log("AUTH as alice from 192.0.2.5 failed", WAIT);
    let handed_over = metric(
        &server.metrics(),
        "forkpool_connections_handed_over_total{service=\"bank\"}",
    );
    assert_eq!(handed_over, 1.0);
}
