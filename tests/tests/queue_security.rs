//! The bank's security rules on the queue: TLS (checked with `openssl s_client`, and a
//! request parked on a TLS connection answered when its worker retires), users who must AUTH
//! and keep to their rights and queue patterns, AUTH's failure limits, jobs that only their
//! user completes, peer authentication on a Unix socket, protected mode, and the user kept
//! across a hand-over.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::os::unix::net::UnixStream;
use std::sync::Arc;
use std::time::Duration;

use forkpool_testkit::pki::{TestPki, Validity};
use forkpool_testkit::security::{
    auth, gen_token, refusal_line, s_client, server_with_users, TlsLines, WithUsers,
};
use forkpool_testkit::{
    connect, connect_from, metric, request_line, tool, wait_until, Server, Signal,
};

const WAIT: Duration = Duration::from_secs(20);
const AUTH_REQUIRED: &str = "ERR denied authentication required";

/// A server whose queue has users: `alice` (write, queues alice and alice.*), `reader`
/// (read), `admin` (write, every queue); with `extra` settings.
fn queue_with_users(extra: &[&str]) -> WithUsers {
    server_with_users("queues = [\"alice\", \"alice.*\"]\n", extra)
}

/// A new connection to `q`'s queue authenticated as `user` with `token`.
fn connect_as(q: &WithUsers, user: &str, token: &str) -> TcpStream {
    let mut conn = connect(q.server.queue_addr());
    assert_eq!(auth(&mut conn, user, token), format!("OK {user}"));
    conn
}

/// Sends each of `requests` and expects `reply` to each.
fn expect_each(conn: &mut TcpStream, requests: &[&str], reply: &str) {
    for request in requests {
        assert_eq!(request_line(conn, request), reply, "{request}");
    }
}

/// A request of each verb that needs `write`.
const WRITES: [&str; 7] = [
    "PUT jobs 0 x",
    "PUT_NOWAIT jobs x",
    "GET jobs 1",
    "GET_NOWAIT jobs",
    "DONE 1",
    "JOIN jobs 1",
    "CONFIG jobs maxsize 3",
];

/// Splits `JOB <id> <payload>` and returns the id.
fn job_id(line: &str) -> u64 {
    let rest = line
        .strip_prefix("JOB ")
        .unwrap_or_else(|| panic!("expected a job, got {line:?}"));
    let (id, _) = rest.split_once(' ').expect("JOB <id> <payload>");
    id.parse().expect("a numeric id")
}

/// One figure of `STATS <queue>` as `conn`'s user sees it.
fn stat(conn: &mut TcpStream, queue: &str, field: &str) -> u64 {
    let line = request_line(conn, &format!("STATS {queue}"));
    line.split(' ')
        .find_map(|f| f.strip_prefix(field)?.strip_prefix('=')?.parse().ok())
        .unwrap_or_else(|| panic!("no {field} in {line}"))
}

#[test]
fn queue_users_must_auth_and_keep_to_their_rights_and_queues() {
    let q = queue_with_users(&[]);
    let mut conn = connect(q.server.queue_addr());
    // Unauthenticated: PING and QUIT only, and nothing is created.
    assert_eq!(request_line(&mut conn, "PING"), "PONG");
    expect_each(&mut conn, &WRITES, AUTH_REQUIRED);
    expect_each(&mut conn, &["STATS jobs", "QUEUES"], AUTH_REQUIRED);
    let mut admin = connect_as(&q, "admin", &q.admin);
    assert_eq!(
        request_line(&mut admin, "QUEUES"),
        "OK 0",
        "no queue was created"
    );
    assert!(request_line(&mut admin, "PUT jobs 0 for admin").starts_with("OK "));
    assert!(request_line(&mut admin, "PUT alice.mail 0 for alice").starts_with("OK "));
    // Read: STATS and QUEUES only.
    assert_eq!(auth(&mut conn, "reader", &q.reader), "OK reader");
    assert_eq!(stat(&mut conn, "jobs", "depth"), 1);
    assert_eq!(request_line(&mut conn, "QUEUES"), "OK 2 jobs alice.mail");
    expect_each(&mut conn, &WRITES, "ERR denied user reader may only read");
    // Write within the user's queues: alice and alice.*.
    assert_eq!(auth(&mut conn, "alice", &q.alice), "OK alice");
    assert_eq!(request_line(&mut conn, "QUEUES"), "OK 1 alice.mail");
    let id = job_id(&request_line(&mut conn, "GET_NOWAIT alice.mail"));
    assert_eq!(request_line(&mut conn, &format!("DONE {id}")), "OK");
    assert_eq!(request_line(&mut conn, "JOIN alice.mail 1000"), "OK");
    assert_eq!(request_line(&mut conn, "CONFIG alice maxsize 2"), "OK");
    for queue in ["jobs", "alicex", "bob.alice", "Alice"] {
        for request in [
            format!("PUT {queue} 0 x"),
            format!("GET_NOWAIT {queue}"),
            format!("STATS {queue}"),
            format!("CONFIG {queue} maxsize 1"),
        ] {
            assert_eq!(
                request_line(&mut conn, &request),
                format!("ERR denied not allowed to use queue {queue}"),
            );
        }
    }
    // Nothing a denial touched changed (CONFIG alice created alice).
    assert_eq!(
        request_line(&mut admin, "QUEUES"),
        "OK 3 jobs alice.mail alice"
    );
    assert_eq!(stat(&mut admin, "jobs", "depth"), 1);
    assert_eq!(stat(&mut admin, "alice", "maxsize"), 2);
    // A wrong token logs the connection out.
    let wrong = "0123456789abcdef0123456789abcdef";
    assert_eq!(
        auth(&mut conn, "alice", wrong),
        "ERR denied invalid user or token"
    );
    assert_eq!(request_line(&mut conn, "QUEUES"), AUTH_REQUIRED);
    assert_eq!(request_line(&mut conn, "QUIT"), "BYE");
    let metrics = q.server.metrics();
    assert_eq!(metric(&metrics, "forkpool_queue_denied_total"), 33.0);
    assert_eq!(
        metric(&metrics, "forkpool_queue_auth_total{result=\"accepted\"}"),
        3.0
    );
    assert_eq!(
        metric(&metrics, "forkpool_queue_auth_total{result=\"failed\"}"),
        1.0
    );
}

#[test]
fn every_malformed_auth_gets_its_error_and_never_the_token_back() {
    let q = queue_with_users(&[]);
    let mut conn = connect(q.server.queue_addr());
    let long = "t".repeat(300);
    let cases = [
        ("AUTH", "ERR bad-request usage: AUTH <user> <token>"),
        ("AUTH alice", "ERR bad-request usage: AUTH <user> <token>"),
        (
            "AUTH alice secret extra",
            "ERR bad-request usage: AUTH <user> <token>",
        ),
        (
            "AUTH al/ice secret",
            "ERR bad-request invalid user name 'al/ice'",
        ),
        (
            "AUTH alice s\u{7f}cret",
            "ERR bad-request invalid token: the token contains a byte outside printable ASCII",
        ),
        (
            &format!("AUTH alice {long}"),
            "ERR bad-request invalid token: the token is 300 bytes long",
        ),
        ("AUTH ghost secret", "ERR denied invalid user or token"),
    ];
    for (line, expected) in cases {
        let reply = request_line(&mut conn, line);
        assert!(reply.starts_with(expected), "{line:?}: {reply:?}");
        assert!(!reply.contains("cret") && !reply.contains("ttt"), "{reply}");
    }
    // Two failures so far (the last one and none of the malformed): one more is allowed.
    assert_eq!(auth(&mut conn, "alice", &q.alice), "OK alice");
    assert_eq!(request_line(&mut conn, "PING"), "PONG");
    // Without users, AUTH is refused as by the bank.
    let open = Server::start();
    let mut conn = connect(open.queue_addr());
    assert_eq!(
        request_line(&mut conn, "AUTH alice secret"),
        "ERR denied no users are configured on this server"
    );
    assert!(request_line(&mut conn, "PUT free 0 x").starts_with("OK "));
}

#[test]
fn failed_queue_auths_close_the_connection_and_are_limited_per_peer() {
    let q = queue_with_users(&[]);
    let addr = q.server.queue_addr();
    let wrong = "00000000000000000000000000000000";
    let mut conn = connect(addr);
    for _ in 0..3 {
        assert_eq!(
            auth(&mut conn, "alice", wrong),
            "ERR denied invalid user or token"
        );
    }
    let mut rest = Vec::new();
    conn.read_to_end(&mut rest).expect("a clean close");
    assert!(rest.is_empty(), "{rest:?}");
    // Ten failures from one address (this one worker) and even the right token is refused.
    for _ in 0..3 {
        let mut conn = connect(addr);
        for _ in 0..3 {
            let _ = auth(&mut conn, "nobody", wrong);
        }
    }
    let mut conn = connect(addr);
    assert_eq!(
        auth(&mut conn, "alice", &q.alice),
        "ERR denied too many failed AUTH attempts from this address; retry later"
    );
    let mut other = connect_from(addr, [127, 0, 0, 2]);
    assert_eq!(auth(&mut other, "alice", &q.alice), "OK alice");
    let metrics = q.server.metrics();
    assert!(metric(&metrics, "forkpool_queue_auth_total{result=\"throttled\"}") >= 1.0);
    // The log is read from the server's pipe by another thread: it may come a moment later.
    wait_until("the failures to be logged with the peer", WAIT, || {
        q.server.output().contains("from 127.0.0.1").then_some(())
    });
}

#[test]
fn a_job_is_completed_only_by_its_connection_and_user() {
    let q = queue_with_users(&[]);
    let mut producer = connect_as(&q, "admin", &q.admin);
    assert!(request_line(&mut producer, "PUT alice 0 one").starts_with("OK "));
    let mut taker = connect_as(&q, "alice", &q.alice);
    let id = job_id(&request_line(&mut taker, "GET alice"));
    // Another connection, of another user or of the same one, cannot complete it.
    for (user, token) in [("admin", &q.admin), ("alice", &q.alice)] {
        let mut other = connect_as(&q, user, token);
        let reply = request_line(&mut other, &format!("DONE {id}"));
        assert!(reply.starts_with("ERR not-reserved "), "{user}: {reply}");
    }
    // The taker becomes another user: the job goes back first, the new user cannot DONE it.
    assert_eq!(auth(&mut taker, "admin", &q.admin), "OK admin");
    let reply = request_line(&mut taker, &format!("DONE {id}"));
    assert!(reply.starts_with("ERR not-reserved "), "{reply}");
    assert_eq!(stat(&mut producer, "alice", "in_flight"), 0);
    assert_eq!(stat(&mut producer, "alice", "depth"), 1);
    // Re-authenticating as the same user keeps the jobs.
    let again = job_id(&request_line(&mut taker, "GET_NOWAIT alice"));
    assert_eq!(again, id, "the same job, delivered again");
    assert_eq!(auth(&mut taker, "admin", &q.admin), "OK admin");
    assert_eq!(request_line(&mut taker, &format!("DONE {id}")), "OK");
    // A failed AUTH logs out and gives the jobs back too.
    assert!(request_line(&mut producer, "PUT alice 0 two").starts_with("OK "));
    let two = job_id(&request_line(&mut taker, "GET alice"));
    assert!(auth(&mut taker, "admin", "wrong-token").starts_with("ERR denied "));
    assert_eq!(stat(&mut producer, "alice", "in_flight"), 0);
    assert_eq!(auth(&mut taker, "admin", &q.admin), "OK admin");
    let reply = request_line(&mut taker, &format!("DONE {two}"));
    assert!(reply.starts_with("ERR not-reserved "), "{reply}");
}

#[test]
fn a_hup_hands_the_authenticated_queue_connection_over_with_its_user_and_jobs() {
    let q = queue_with_users(&[]);
    let mut alice = connect_as(&q, "alice", &q.alice);
    assert!(request_line(&mut alice, "PUT alice 0 held").starts_with("OK "));
    let id = job_id(&request_line(&mut alice, "GET alice"));
    let before = q.server.workers();
    q.server.signal(Signal::SIGHUP);
    q.server.wait_log("SIGHUP: reloaded", WAIT);
    wait_until("the old worker to leave", WAIT, || {
        let now = q.server.workers();
        (!now.is_empty() && now.iter().all(|pid| !before.contains(pid))).then_some(())
    });
    // Still alice, in the new worker, holding its job.
    assert_eq!(request_line(&mut alice, &format!("DONE {id}")), "OK");
    assert!(request_line(&mut alice, "PUT alice.x 0 after").starts_with("OK "));
    assert_eq!(
        request_line(&mut alice, "PUT jobs 0 x"),
        "ERR denied not allowed to use queue jobs"
    );
    assert!(
        metric(
            &q.server.metrics(),
            "forkpool_connections_handed_over_total{service=\"queue\"}"
        ) >= 1.0
    );
    // A user removed from the file by the next reload is refused from its next request.
    let text = std::fs::read_to_string(&q.users_file).expect("read the users file");
    let kept: String = text
        .split("[[user]]")
        .filter(|entry| !entry.contains("name = \"alice\"") && !entry.trim().is_empty())
        .map(|entry| format!("[[user]]{entry}"))
        .collect();
    std::fs::write(&q.users_file, kept).expect("rewrite the users file");
    q.server.signal(Signal::SIGHUP);
    wait_until("alice to be revoked", WAIT, || {
        let reply = request_line(&mut alice, "PING");
        assert_eq!(reply, "PONG");
        let reply = request_line(&mut alice, "STATS alice");
        reply.starts_with("ERR denied ").then_some(())
    });
    assert_eq!(request_line(&mut alice, "STATS alice"), AUTH_REQUIRED);
}

#[test]
fn protected_mode_refuses_an_open_queue_beyond_loopback_unless_told() {
    let error = refusal_line(&["--queue-addr", "0.0.0.0:0"]);
    assert!(
        error.contains("the queue listens on 0.0.0.0:0")
            && error.contains("queue_open")
            && error.contains("users_file"),
        "{error}"
    );
    // bank_open is the bank's opt-out, not the queue's.
    refusal_line(&["--queue-addr", "0.0.0.0:0", "--bank-open"]);
    let server = Server::builder()
        .args(["--queue-addr", "0.0.0.0:0", "--queue-open"])
        .start();
    let port = server.queue_addr().port();
    let mut conn = connect(std::net::SocketAddr::from(([127, 0, 0, 1], port)));
    assert_eq!(request_line(&mut conn, "PING"), "PONG");
}

#[test]
fn a_unix_queue_socket_maps_a_peer_uid_to_a_user() {
    let dir = Arc::new(tempfile::tempdir().expect("a temporary directory"));
    let socket = dir.path().join("queue.sock");
    let me = nix::unistd::getuid().as_raw();
    let mut operator = gen_token("operator", "write").entry;
    operator.push_str(&format!("queues = [\"ops\"]\nuid = {me}\n"));
    let users = dir.path().join("users.toml");
    std::fs::write(&users, operator).expect("write the users file");
    let _server = Server::builder()
        .data_dir(Arc::clone(&dir))
        .args(["--queue-addr", &format!("unix:{}", socket.display())])
        .args(["--users-file", &users.display().to_string()])
        .start();
    let mut own = UnixStream::connect(&socket).expect("the owner connects");
    own.set_read_timeout(Some(WAIT)).expect("a read timeout");
    own.write_all(b"PUT_NOWAIT ops x\nPUT_NOWAIT other x\n")
        .expect("send");
    // read_line retries a read a signal interrupted.
    let mut replies = BufReader::new(own);
    let mut line = String::new();
    replies.read_line(&mut line).expect("a reply");
    assert!(line.starts_with("OK "), "{line}");
    line.clear();
    replies.read_line(&mut line).expect("a reply");
    assert_eq!(line, "ERR denied not allowed to use queue other\n");
}

/// A queue speaking TLS: a round trip with `openssl s_client`, a plain client refused, and a
/// GET parked on a TLS connection when its worker retires answered `ERR shutting-down` (a
/// TLS session cannot move to the successor) and the connection closed, its job given back.
#[test]
fn the_queue_speaks_tls_and_a_parked_tls_get_is_answered_when_its_worker_retires() {
    let Some(openssl) = tool("openssl") else {
        return;
    };
    let pki = TestPki::new();
    let cert = pki.issue("queue", &["localhost", "127.0.0.1"], Validity::Current);
    let (cert, key) = (
        cert.cert.display().to_string(),
        cert.key.display().to_string(),
    );
    let q = queue_with_users(&["--queue-tls-cert", &cert, "--queue-tls-key", &key]);
    let addr = q.server.queue_addr();
    let ca = pki.ca_file().display().to_string();
    let trust = ["-CAfile", &ca, "-verify_hostname", "localhost"];
    let input = format!("PING\nAUTH admin {}\nPUT t 0 over tls\n", q.admin);
    let (ok, out) = s_client(&openssl, addr, &trust, input.as_bytes(), 18);
    assert!(ok, "{out}");
    assert!(out.starts_with("PONG\nOK admin\nOK "), "{out}");
    // Plain text on the TLS port: no reply.
    let mut plain = connect(addr);
    plain.write_all(b"PING\n").expect("send");
    let mut rest = Vec::new();
    let _ = plain.read_to_end(&mut rest);
    assert!(!rest.starts_with(b"PONG"), "{rest:?}");

    let mut consumer = TlsLines::connect(&openssl, addr, &trust);
    assert_eq!(
        consumer.request(&format!("AUTH admin {}", q.admin), WAIT),
        "OK admin"
    );
    let held = job_id(&consumer.request("GET t", WAIT));
    consumer.send("GET empty");
    let mut observer = TlsLines::connect(&openssl, addr, &trust);
    assert_eq!(
        observer.request(&format!("AUTH reader {}", q.reader), WAIT),
        "OK reader"
    );
    wait_until("the TLS getter to park", WAIT, || {
        let line = observer.request("STATS empty", WAIT);
        line.contains(" getters=1 ").then_some(())
    });
    drop(observer);
    q.server.signal(Signal::SIGHUP);
    let answer = consumer.next_line(WAIT).expect("an answer, not silence");
    assert!(answer.starts_with("ERR shutting-down "), "{answer}");
    assert_eq!(consumer.next_line(WAIT), None, "then the connection closes");
    // The job it held went back to the head of its queue.
    let mut admin = TlsLines::connect(&openssl, addr, &trust);
    assert_eq!(
        admin.request(&format!("AUTH admin {}", q.admin), WAIT),
        "OK admin"
    );
    // (The client may see the close before the worker has dropped the connection.)
    wait_until("the held job to go back", WAIT, || {
        let line = admin.request("STATS t", WAIT);
        line.contains(" in_flight=0 ").then_some(())
    });
    let again = admin.request("GET_NOWAIT t", WAIT);
    assert_eq!(job_id(&again), held, "{again}");
    let metrics = q.server.metrics();
    assert!(metric(&metrics, "forkpool_tls_handshakes_total{service=\"queue\"}") >= 3.0);
}
