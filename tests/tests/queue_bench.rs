//! `forkpool-bench queue` against a real forkpool (every job put is done, the server's CPU is
//! reported), against fake queue servers that damage, repeat or lose jobs (each one caught),
//! and against beanstalkd and redis, the peers of bench/queue.sh.

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use forkpool_testkit::{
    bench_json as json, binary, json_field as field, json_number as number, line_server, tool,
    wait_until, LineReply, Server, Signal,
};

/// A short run's flags: 4 producers and 4 consumers for `seconds`.
fn queue_args<'a>(addr: &'a str, seconds: &'a str) -> Vec<&'a str> {
    vec![
        "queue",
        "--addr",
        addr,
        "--producers",
        "4",
        "--consumers",
        "4",
        "-d",
        seconds,
        "--timeout",
        "1",
    ]
}

#[test]
fn a_short_queue_run_does_every_job_it_puts() {
    let server = Server::start();
    let addr = server.queue_addr().to_string();
    let pid = server.pid.to_string();
    let mut args = queue_args(&addr, "1");
    args.extend(["--server-pid", &pid, "--warmup", "0.1"]);
    let (report, code) = json(&args);
    assert_eq!(code, 0, "{report}");
    let put = number(&report, "put");
    assert!(number(&report, "jobs") > 100.0, "{report}");
    assert_eq!(put, number(&report, "done"), "{report}");
    assert_eq!(put, number(&report, "issued"), "{report}");
    for zero in ["missing", "redelivered", "wrong", "abandoned"] {
        assert_eq!(number(&report, zero), 0.0, "{zero}: {report}");
    }
    assert!(number(&report, "server_cpu_us_per_job") > 0.0, "{report}");
    assert!(number(&report, "p99_us") >= number(&report, "p50_us"));
    assert_eq!(field(&report, "protocol").as_str(), Some("forkpool"));
}

/// A fake forkpool queue: PUT is acknowledged, GET answered by `deliver` from the first and
/// the latest payload put (or `ERR timeout` when it gives nothing), DONE acknowledged.
fn fake_queue(
    deliver: impl Fn(&[u8], &[u8]) -> Option<Vec<u8>> + Send + Sync + 'static,
) -> SocketAddr {
    let put: Arc<Mutex<Vec<Vec<u8>>>> = Arc::default();
    line_server(move |_, line| {
        let line = line.strip_suffix(b"\n").unwrap_or(line);
        let mut put = put.lock().expect("the fake's payloads");
        let reply = if let Some(rest) = line.strip_prefix(b"PUT ") {
            // `PUT <queue> <timeout> <payload>`: the payload is after the second blank.
            let mut fields = rest.splitn(3, |&b| b == b' ');
            put.push(fields.nth(2).unwrap_or_default().to_vec());
            format!("OK {}\n", put.len()).into_bytes()
        } else if line.starts_with(b"GET ") {
            let job = match (put.first(), put.last()) {
                (Some(first), Some(last)) => deliver(first, last),
                _ => None,
            };
            match job {
                Some(payload) => [b"JOB 1 ".as_slice(), &payload, b"\n"].concat(),
                None => b"ERR timeout the wait ran out; nothing changed\n".to_vec(),
            }
        } else {
            b"OK\n".to_vec()
        };
        LineReply::Answer(reply)
    })
}

#[test]
fn a_damaged_payload_fails_the_run() {
    let addr = fake_queue(|_, last| {
        let mut job = last.to_vec();
        job[0] = if job[0] == b'9' { b'8' } else { b'9' };
        Some(job)
    })
    .to_string();
    let (report, code) = json(&queue_args(&addr, "0.5"));
    assert_eq!(code, 1, "{report}");
    assert!(number(&report, "wrong") > 0.0, "{report}");
    let samples = field(&report, "mismatch_samples").to_string();
    assert!(samples.contains("checksum does not match"), "{samples}");
}

#[test]
fn a_job_delivered_twice_without_a_dropped_connection_fails_the_run() {
    let addr = fake_queue(|first, _| Some(first.to_vec())).to_string();
    let (report, code) = json(&queue_args(&addr, "0.5"));
    assert_eq!(code, 1, "{report}");
    assert!(number(&report, "redelivered") > 0.0, "{report}");
    assert_eq!(number(&report, "abandoned"), 0.0, "{report}");
    assert!(field(&report, "verdict")
        .as_str()
        .is_some_and(|v| v.contains("delivered again")));
}

#[test]
fn a_job_put_and_never_delivered_fails_the_run() {
    let addr = fake_queue(|_, _| None).to_string();
    let (report, code) = json(&queue_args(&addr, "0.3"));
    assert_eq!(code, 1, "{report}");
    assert!(number(&report, "missing") > 0.0, "{report}");
    assert_eq!(number(&report, "done"), 0.0, "{report}");
}

#[test]
fn a_server_speaking_another_protocol_is_a_start_failure() {
    let addr = line_server(|_, _| LineReply::Answer(b"-ERR unknown command\r\n".to_vec()));
    let addr = addr.to_string();
    let mut args = queue_args(&addr, "0.3");
    args.extend(["--protocol", "beanstalk"]);
    let out = Command::new(binary("forkpool-bench"))
        .args(&args)
        .output()
        .expect("forkpool-bench runs");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(out.stdout.is_empty());
    assert!(
        stderr.contains("cannot start a beanstalk session") && stderr.contains("-ERR unknown"),
        "{stderr}"
    );
}

/// A peer server (beanstalkd, redis-server) in its own process group, killed and reaped on
/// drop.
struct Peer {
    child: Child,
    addr: SocketAddr,
}

impl Peer {
    /// Starts `program` with `args` (in which `{port}` is a free loopback port) and waits
    /// until it accepts; None when it is not installed (outside CI).
    fn start(program: &str, args: &[&str]) -> Option<Peer> {
        let path = tool(program)?;
        let addr = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free loopback port");
        let port = addr.port().to_string();
        let child = Command::new(path)
            .args(args.iter().map(|a| a.replace("{port}", &port)))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .process_group(0)
            .spawn()
            .unwrap_or_else(|e| panic!("{program} starts: {e}"));
        let peer = Peer { child, addr };
        wait_until(
            &format!("{program} to accept"),
            Duration::from_secs(10),
            || TcpStream::connect(addr).ok(),
        );
        Some(peer)
    }
}

impl Drop for Peer {
    fn drop(&mut self) {
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        let _ = nix::sys::signal::killpg(pid, Signal::SIGKILL);
        let _ = self.child.wait();
    }
}

/// A short run against `peer` speaking `protocol`: clean, every job put done.
fn clean_run_against(peer: &Peer, protocol: &str) {
    let addr = peer.addr.to_string();
    let pid = peer.child.id().to_string();
    let mut args = queue_args(&addr, "1");
    args.extend(["--protocol", protocol, "--server-pid", &pid]);
    let (report, code) = json(&args);
    assert_eq!(code, 0, "{report}");
    assert!(number(&report, "jobs") > 100.0, "{report}");
    assert_eq!(number(&report, "put"), number(&report, "done"), "{report}");
    assert_eq!(number(&report, "server_processes"), 1.0, "{report}");
}

#[test]
fn the_same_client_drives_beanstalkd() {
    let Some(peer) = Peer::start("beanstalkd", &["-l", "127.0.0.1", "-p", "{port}"]) else {
        return;
    };
    clean_run_against(&peer, "beanstalk");
}

#[test]
fn the_same_client_drives_redis() {
    let Some(peer) = Peer::start(
        "redis-server",
        &[
            "--bind",
            "127.0.0.1",
            "--port",
            "{port}",
            "--save",
            "",
            "--appendonly",
            "no",
        ],
    ) else {
        return;
    };
    clean_run_against(&peer, "redis");
}
