//! Two forkpool instances behind the real HAProxy (Debian's package), configured like
//! `deploy/haproxy.cfg`: connections land on both, each instance names the real client of
//! every connection (PROXY v1 on echo, v2 on the bank), and an instance SIGTERMed under load
//! costs no request of clients that reconnect.

use std::io::{ErrorKind, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use forkpool_testkit::haproxy::{Haproxy, SendProxy, Service};
use forkpool_testkit::log_phrase::THROUGH_PROXY;
use forkpool_testkit::pki::{TestPki, Validity};
use forkpool_testkit::{connect, metric, read_line, tool, wait_until, Server, Signal};

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

/// `forkpool_proxy_headers_total{service, result}` of `server`.
fn headers_counted(server: &Server, service: &str, result: &str) -> f64 {
    metric(
        &server.metrics(),
        &format!("forkpool_proxy_headers_total{{service=\"{service}\",result=\"{result}\"}}"),
    )
}

/// Every connection of `service` came with a valid header (health checks included).
fn no_header_refused(server: &Server, service: &str) {
    for result in ["missing", "malformed", "truncated", "timeout"] {
        assert_eq!(
            headers_counted(server, service, result),
            0.0,
            "{service} {result}"
        );
    }
}

/// Which of `instances` logged the client at `port` through the proxy (waits for one).
fn served_by(instances: &[Server], port: u16) -> Vec<usize> {
    let needle = format!("connection from 127.0.0.1:{port}{THROUGH_PROXY}");
    wait_until(&format!("client {port} logged"), WAIT, || {
        let found: Vec<usize> = (0..instances.len())
            .filter(|&i| instances[i].has_logged(&needle))
            .collect();
        (!found.is_empty()).then_some(found)
    })
}

/// Opens `count` connections to `addr`, each sending `request` and checking `reply`;
/// checks that each landed on exactly one of `instances`, which logged the client's own
/// address, and that each instance got at least one.
fn spread_over(instances: &[Server], addr: SocketAddr, count: usize, request: &str, reply: &str) {
    let mut per_instance = vec![0; instances.len()];
    for _ in 0..count {
        let mut client = connect(addr);
        client
            .write_all(format!("{request}\n").as_bytes())
            .expect("send");
        assert_eq!(read_line(&mut client), reply, "{request}");
        let port = client.local_addr().expect("bound").port();
        let found = served_by(instances, port);
        assert_eq!(found.len(), 1, "client {port} logged by {found:?}");
        per_instance[found[0]] += 1;
    }
    assert!(
        per_instance.iter().all(|&n| n > 0),
        "connections per instance {per_instance:?}"
    );
}

#[test]
fn connections_land_on_both_instances_which_log_the_real_client() {
    let instances = [instance(), instance()];
    let Some(haproxy) = Haproxy::start(&[
        Service {
            name: "echo",
            servers: instances.iter().map(Server::echo_addr).collect(),
            send_proxy: SendProxy::V1,
            tls_ca: None,
        },
        Service {
            name: "bank",
            servers: instances.iter().map(Server::bank_addr).collect(),
            send_proxy: SendProxy::V2,
            tls_ca: None,
        },
    ]) else {
        return;
    };
    for service in ["echo", "bank"] {
        haproxy.wait_all_up(service, WAIT);
    }
    for (service, request, reply) in [("echo", "hello", "HELLO"), ("bank", "PING", "PONG")] {
        spread_over(&instances, haproxy.addr(service), 8, request, reply);
        for server in &instances {
            no_header_refused(server, service);
        }
    }
}

#[test]
fn over_tls_the_header_comes_before_the_handshake() {
    let pki = TestPki::new();
    let cert = pki.issue("instance", &["localhost"], Validity::Current);
    let (cert, key) = (
        cert.cert.display().to_string(),
        cert.key.display().to_string(),
    );
    let instances = [(); 2].map(|()| {
        Server::builder()
            .args(["--proxy-protocol", "bank"])
            .args(["--bank-tls-cert", &cert, "--bank-tls-key", &key])
            .args(["--status-addr", "127.0.0.1:0"])
            .start()
    });
    let Some(haproxy) = Haproxy::start(&[Service {
        name: "bank",
        servers: instances.iter().map(Server::bank_addr).collect(),
        send_proxy: SendProxy::V2,
        tls_ca: Some(pki.ca_file().to_path_buf()),
    }]) else {
        return;
    };
    haproxy.wait_all_up("bank", WAIT);
    spread_over(&instances, haproxy.addr("bank"), 8, "PING", "PONG");
    for server in &instances {
        no_header_refused(server, "bank");
        let page = server.metrics();
        let handshakes = metric(&page, "forkpool_tls_handshakes_total{service=\"bank\"}");
        let failures = metric(
            &page,
            "forkpool_tls_handshake_failures_total{service=\"bank\"}",
        );
        assert!(
            handshakes > 0.0 && failures == 0.0,
            "{handshakes} {failures}"
        );
    }
}

/// deploy/haproxy.cfg passes haproxy's own check (`haproxy -c`), with its CA file and admin
/// socket moved to a temporary directory.
#[test]
fn the_deploy_example_is_a_valid_haproxy_configuration() {
    let Some(binary) = tool("haproxy") else {
        return;
    };
    let pki = TestPki::new();
    let example = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/haproxy.cfg");
    let text = std::fs::read_to_string(&example).expect("deploy/haproxy.cfg exists");
    let dir = tempfile::tempdir().expect("a temporary directory");
    let text = text
        .replace(
            "/etc/haproxy/forkpool-ca.pem",
            &pki.ca_file().display().to_string(),
        )
        .replace("/run/haproxy/", &format!("{}/", dir.path().display()));
    let config = dir.path().join("haproxy.cfg");
    std::fs::write(&config, text).expect("write the copy");
    let out = Command::new(binary)
        .arg("-c")
        .arg("-f")
        .arg(&config)
        .output()
        .expect("haproxy -c runs");
    let said = String::from_utf8_lossy(&[out.stdout, out.stderr].concat()).into_owned();
    assert!(out.status.success(), "{said}");
    assert!(!said.contains("[WARNING]"), "{said}");
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
        tls_ca: None,
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
