//! Two forkpool instances behind the real HAProxy (Debian's package), configured like
//! `deploy/haproxy.cfg`: connections land on both, each instance names the real client of
//! every connection (PROXY v1 on echo, v2 on the bank), and an instance SIGTERMed under load
//! costs no request of clients that reconnect.

use std::io::{ErrorKind, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use forkpool_testkit::haproxy::{Haproxy, SendProxy, Service};
use forkpool_testkit::log_phrase::THROUGH_PROXY;
use forkpool_testkit::{connect, metric, read_line, wait_until, Server, Signal};

const WAIT: Duration = Duration::from_secs(30);
/// Tries to get one request answered, each on a new connection, before it counts as failed.
const TRIES_PER_REQUEST: usize = 5;

/// An instance that expects PROXY headers on both services.
fn instance() -> Server {
    Server::builder()
        .args(["--proxy-protocol", "echo,bank"])
        .args(["--status-addr", "127.0.0.1:0"])
        .start()
}

#[test]
fn connections_land_on_both_instances_which_log_the_real_client() {
    let instances = [instance(), instance()];
    let Some(haproxy) = Haproxy::start(&[
        Service {
            name: "echo",
            servers: instances.iter().map(Server::echo_addr).collect(),
            send_proxy: SendProxy::V1,
        },
        Service {
            name: "bank",
            servers: instances.iter().map(Server::bank_addr).collect(),
            send_proxy: SendProxy::V2,
        },
    ]) else {
        return;
    };
    for service in ["echo", "bank"] {
        haproxy.wait_all_up(service, WAIT);
    }
    for (service, request, reply) in [("echo", "hello", "HELLO"), ("bank", "PING", "PONG")] {
        let mut ports = Vec::new();
        for _ in 0..8 {
            let mut client = connect(haproxy.addr(service));
            client
                .write_all(format!("{request}\n").as_bytes())
                .expect("send");
            assert_eq!(read_line(&mut client), reply, "{service}");
            ports.push(client.local_addr().expect("bound").port());
        }
        // Each client's own address and port is in the log of the instance that served it.
        let served_by = |port: u16| {
            let needle = format!("connection from 127.0.0.1:{port}{THROUGH_PROXY}");
            wait_until(&format!("{service} client {port} logged"), WAIT, || {
                let found: Vec<usize> = (0..instances.len())
                    .filter(|&i| instances[i].has_logged(&needle))
                    .collect();
                (!found.is_empty()).then_some(found)
            })
        };
        let mut per_instance = [0; 2];
        for port in ports {
            let found = served_by(port);
            assert_eq!(
                found.len(),
                1,
                "{service} client {port} logged by {found:?}"
            );
            per_instance[found[0]] += 1;
        }
        assert!(
            per_instance.iter().all(|&n| n > 0),
            "{service}: connections per instance {per_instance:?}"
        );
    }
    // Every connection, HAProxy's health checks included, came with a valid header.
    for server in &instances {
        let page = server.metrics();
        for service in ["echo", "bank"] {
            for result in ["missing", "malformed", "truncated", "timeout"] {
                let series = format!(
                    "forkpool_proxy_headers_total{{service=\"{service}\",result=\"{result}\"}}"
                );
                assert_eq!(metric(&page, &series), 0.0, "{series}");
            }
        }
    }
}

/// What the load's clients saw.
#[derive(Default)]
struct Tally {
    answered: AtomicU64,
    /// Connections that ended (EOF, reset) before a request's reply: the request is sent
    /// again on a new connection.
    reconnects: AtomicU64,
    /// Requests not answered in [`TRIES_PER_REQUEST`] connections, or answered wrongly.
    failed: AtomicU64,
}

/// Sends `line` on `stream` and reads the reply; `None` if the connection ended first.
fn exchange(stream: &mut TcpStream, line: &str) -> Option<String> {
    stream.write_all(format!("{line}\n").as_bytes()).ok()?;
    let mut reply = Vec::new();
    let mut byte = [0u8; 1];
    loop {
        match std::io::Read::read(stream, &mut byte) {
            Ok(0) => return None,
            Ok(_) if byte[0] == b'\n' => return String::from_utf8(reply).ok(),
            Ok(_) => reply.push(byte[0]),
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(_) => return None,
        }
    }
}

/// One client: echo requests one at a time until `stop`, reconnecting whenever its
/// connection ends, each request sent again until answered.
fn client(id: usize, addr: SocketAddr, stop: &AtomicBool, tally: &Tally) {
    let mut stream: Option<TcpStream> = None;
    for seq in 0u64.. {
        if stop.load(Ordering::Relaxed) {
            return;
        }
        let line = format!("client {id} request {seq}");
        let mut answered = false;
        for _ in 0..TRIES_PER_REQUEST {
            let conn = match stream.as_mut() {
                Some(conn) => conn,
                None => match TcpStream::connect(addr) {
                    Ok(conn) => {
                        let _ = conn.set_read_timeout(Some(WAIT));
                        stream.insert(conn)
                    }
                    Err(_) => continue,
                },
            };
            match exchange(conn, &line) {
                Some(reply) => {
                    if reply != line.to_uppercase() {
                        tally.failed.fetch_add(1, Ordering::Relaxed);
                    }
                    answered = true;
                    break;
                }
                None => {
                    stream = None;
                    tally.reconnects.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
        if answered {
            tally.answered.fetch_add(1, Ordering::Relaxed);
        } else {
            tally.failed.fetch_add(1, Ordering::Relaxed);
        }
    }
}

#[test]
fn an_instance_sigtermed_under_load_fails_no_request_of_clients_that_reconnect() {
    let mut instances = [instance(), instance()];
    let Some(haproxy) = Haproxy::start(&[Service {
        name: "echo",
        servers: instances.iter().map(Server::echo_addr).collect(),
        send_proxy: SendProxy::V2,
    }]) else {
        return;
    };
    haproxy.wait_all_up("echo", WAIT);
    let addr = haproxy.addr("echo");
    let stop = Arc::new(AtomicBool::new(false));
    let tally = Arc::new(Tally::default());
    let clients: Vec<_> = (0..6)
        .map(|id| {
            let (stop, tally) = (Arc::clone(&stop), Arc::clone(&tally));
            std::thread::spawn(move || client(id, addr, &stop, &tally))
        })
        .collect();
    let answered_past = |count: u64| {
        wait_until(&format!("{count} requests answered"), WAIT, || {
            (tally.answered.load(Ordering::Relaxed) >= count).then_some(())
        });
    };
    answered_past(300);
    instances[0].signal(Signal::SIGTERM);
    assert!(instances[0].wait_exit(WAIT).success());
    let at_exit = tally.answered.load(Ordering::Relaxed);
    answered_past(at_exit + 300);
    stop.store(true, Ordering::Relaxed);
    for client in clients {
        client.join().expect("a client thread does not panic");
    }
    let (answered, reconnects, failed) = (
        tally.answered.load(Ordering::Relaxed),
        tally.reconnects.load(Ordering::Relaxed),
        tally.failed.load(Ordering::Relaxed),
    );
    eprintln!("{answered} answered, {reconnects} reconnects, {failed} failed");
    assert_eq!(failed, 0, "{answered} answered, {reconnects} reconnects");
    for (index, server) in instances.iter().enumerate() {
        let served = server.log_count(THROUGH_PROXY);
        assert!(served > 0, "instance {index} served no client");
    }
}
