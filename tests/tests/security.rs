//! Who may move money: TLS on both services (checked with `openssl s_client` and
//! forkpool-bench), bank users with rights, AUTH and its limits, Unix sockets with file
//! permissions and peer authentication, and protected mode.

use std::io::{Read, Write};
use std::net::SocketAddr;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use forkpool_testkit::pki::{TestPki, Validity};
use forkpool_testkit::security::{
    auth, gen_token, refusal_line, s_client, server_with_users, WithUsers,
};
use forkpool_testkit::{
    bench_json, binary, connect, connect_from, http_request, json_number, request_line, tool,
    wait_until, Server, Signal,
};

const WAIT: Duration = Duration::from_secs(20);

/// A server whose echo and bank speak TLS with `cert`.
fn tls_server(pki: &TestPki, name: &str, validity: Validity) -> Server {
    let cert = pki.issue(name, &["localhost", "127.0.0.1"], validity);
    let (cert, key) = (
        cert.cert.display().to_string(),
        cert.key.display().to_string(),
    );
    Server::builder()
        .args(["--echo-tls-cert", &cert, "--echo-tls-key", &key])
        .args(["--bank-tls-cert", &cert, "--bank-tls-key", &key])
        .args(["--status-addr", "127.0.0.1:0"])
        .start()
}

fn metric(status: SocketAddr, series: &str) -> f64 {
    let (_, body) = http_request(status, "GET", "/metrics");
    body.lines()
        .find_map(|line| line.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or_else(|| panic!("no {series} in {body}"))
}

#[test]
fn both_services_speak_tls_to_openssl_and_to_forkpool_bench() {
    let Some(openssl) = tool("openssl") else {
        return;
    };
    let pki = TestPki::new();
    let server = tls_server(&pki, "server", Validity::Current);
    let ca = pki.ca_file().display().to_string();
    let trust = ["-CAfile", &ca, "-verify_hostname", "localhost"];
    let (ok, out) = s_client(
        &openssl,
        server.echo_addr(),
        &trust,
        "hello, tls ß\n".as_bytes(),
        14,
    );
    assert!(ok, "{out}");
    assert_eq!(out, "HELLO, TLS SS\n");
    let (ok, out) = s_client(
        &openssl,
        server.bank_addr(),
        &trust,
        b"PING\nDEPOSIT t 5\n",
        10,
    );
    assert!(ok, "{out}");
    assert_eq!(out, "PONG\nOK 5\n");
    for version in ["-tls1_2", "-tls1_3"] {
        let (ok, out) = s_client(
            &openssl,
            server.echo_addr(),
            &[&trust[..], &[version]].concat(),
            b"v\n",
            2,
        );
        assert!(ok && out == "V\n", "{version}: {out}");
    }
    let (report, code) = bench_json(&[
        "echo",
        "--addr",
        &server.echo_addr().to_string(),
        "--tls",
        "--tls-ca",
        &ca,
        "--tls-server-name",
        "localhost",
        "-c",
        "4",
        "-n",
        "2000",
    ]);
    assert_eq!(code, 0, "{report}");
    assert_eq!(json_number(&report, "mismatches"), 0.0, "{report}");
    let handshakes = metric(
        server.status_addr(),
        "forkpool_tls_handshakes_total{service=\"echo\"}",
    );
    assert!(handshakes >= 7.0, "{handshakes}");
}

#[test]
fn a_verifying_client_refuses_expired_wrong_host_and_self_signed_certificates() {
    let Some(openssl) = tool("openssl") else {
        return;
    };
    let pki = TestPki::new();
    let ca = pki.ca_file().display().to_string();
    let trust = ["-CAfile", &ca, "-verify_hostname", "localhost"];
    let expired = tls_server(&pki, "expired", Validity::Expired);
    let (ok, out) = s_client(&openssl, expired.echo_addr(), &trust, b"x\n", 2);
    assert!(
        !ok && out.is_empty(),
        "an expired certificate was accepted: {out}"
    );
    drop(expired);
    let other = pki.issue("other", &["other.example"], Validity::Current);
    let self_signed = pki.self_signed("self", &["localhost"]);
    for files in [other, self_signed] {
        let (cert, key) = (
            files.cert.display().to_string(),
            files.key.display().to_string(),
        );
        let server = Server::builder()
            .args(["--echo-tls-cert", &cert, "--echo-tls-key", &key])
            .start();
        let (ok, out) = s_client(&openssl, server.echo_addr(), &trust, b"x\n", 2);
        assert!(!ok && out.is_empty(), "{cert} was accepted: {out}");
    }
}

#[test]
fn a_plain_client_on_a_tls_port_and_a_tls_client_on_a_plain_port_end_cleanly() {
    let Some(openssl) = tool("openssl") else {
        return;
    };
    let pki = TestPki::new();
    let server = tls_server(&pki, "server", Validity::Current);
    let ca = pki.ca_file().display().to_string();
    // Plain text where TLS is expected: the handshake fails, the server closes.
    let mut plain = connect(server.bank_addr());
    plain.write_all(b"PING\n").expect("send");
    let mut rest = Vec::new();
    let _ = plain.read_to_end(&mut rest);
    assert!(!rest.starts_with(b"PONG"), "{rest:?}");
    wait_until("the failed handshake to be counted", WAIT, || {
        let failures = metric(
            server.status_addr(),
            "forkpool_tls_handshake_failures_total{service=\"bank\"}",
        );
        (failures >= 1.0).then_some(())
    });
    // TLS where plain text is expected: the client gives up, the server serves on.
    let plain_server = Server::start();
    let (ok, _) = s_client(
        &openssl,
        plain_server.echo_addr(),
        &["-CAfile", &ca],
        b"x\n",
        2,
    );
    assert!(!ok, "a TLS handshake with an uppercasing echo succeeded");
    let mut echo = plain_server.connect_echo();
    assert_eq!(request_line(&mut echo, "still serving"), "STILL SERVING");
    // And the TLS server still serves TLS clients.
    let trust = ["-CAfile", &ca, "-verify_hostname", "localhost"];
    let (ok, out) = s_client(&openssl, server.bank_addr(), &trust, b"PING\n", 5);
    assert!(ok && out == "PONG\n", "{out}");
}

/// The certificate a TLS service presents (its leaf, PEM), seen by `openssl s_client`.
fn presented_certificate(openssl: &Path, addr: SocketAddr, ca: &str) -> String {
    let out = Command::new(openssl)
        .args(["s_client", "-connect", &addr.to_string(), "-CAfile", ca])
        .stdin(Stdio::null())
        .output()
        .expect("openssl s_client runs");
    let text = String::from_utf8_lossy(&out.stdout);
    let start = text
        .find("-----BEGIN CERTIFICATE-----")
        .expect("a certificate");
    let end = text.find("-----END CERTIFICATE-----").expect("its end") + 25;
    text[start..end].to_string()
}

#[test]
fn a_hup_rotates_the_certificate_under_load_without_a_failed_request() {
    let Some(openssl) = tool("openssl") else {
        return;
    };
    let pki = TestPki::new();
    let first = pki.issue("first", &["localhost", "127.0.0.1"], Validity::Current);
    let live = (pki.dir().join("live.pem"), pki.dir().join("live.key"));
    std::fs::copy(&first.cert, &live.0).expect("install the first certificate");
    std::fs::copy(&first.key, &live.1).expect("install the first key");
    let server = Server::builder()
        .args(["--echo-tls-cert", &live.0.display().to_string()])
        .args(["--echo-tls-key", &live.1.display().to_string()])
        .start();
    let ca = pki.ca_file().display().to_string();
    let leaf = |path: &Path| {
        let pem = std::fs::read_to_string(path).expect("read a certificate");
        pem[..pem.find("-----END CERTIFICATE-----").expect("an end") + 25].to_string()
    };
    assert_eq!(
        presented_certificate(&openssl, server.echo_addr(), &ca),
        leaf(&first.cert)
    );
    let addr = server.echo_addr().to_string();
    let load = std::thread::spawn(move || {
        bench_json(&[
            "echo",
            "--addr",
            &addr,
            "--tls",
            "--tls-ca",
            &ca,
            "--tls-server-name",
            "localhost",
            "-c",
            "8",
            "-d",
            "3",
        ])
    });
    // A bad file first: logged, the current certificate kept.
    std::fs::write(&live.0, "not a certificate").expect("break the certificate");
    server.signal(Signal::SIGHUP);
    server.wait_log("SIGHUP: reloaded", WAIT);
    let ca = pki.ca_file().display().to_string();
    assert_eq!(
        presented_certificate(&openssl, server.echo_addr(), &ca),
        leaf(&first.cert)
    );
    let second = pki.issue("second", &["localhost", "127.0.0.1"], Validity::Current);
    std::fs::copy(&second.cert, &live.0).expect("install the second certificate");
    std::fs::copy(&second.key, &live.1).expect("install the second key");
    server.signal(Signal::SIGHUP);
    wait_until("the new certificate to be presented", WAIT, || {
        (presented_certificate(&openssl, server.echo_addr(), &ca) == leaf(&second.cert))
            .then_some(())
    });
    let (report, code) = load.join().expect("the load thread");
    assert_eq!(code, 0, "{report}");
    assert_eq!(json_number(&report, "mismatches"), 0.0, "{report}");
    for failure in ["connect_errors", "resets", "timeouts"] {
        assert_eq!(json_number(&report, failure), 0.0, "{failure}: {report}");
    }
}

/// A server whose bank has users: `alice` (write, debits alice and alice.*), `reader`
/// (read), `admin` (write, any account); with `extra` settings.
fn bank_with_users(extra: &[&str]) -> WithUsers {
    server_with_users("debit = [\"alice\", \"alice.*\"]\n", extra)
}

fn denied(reply: &str) -> bool {
    reply.starts_with("ERR denied ")
}

#[test]
fn bank_users_may_do_what_their_rights_allow_and_nothing_more() {
    let bank = bank_with_users(&[]);
    let mut conn = bank.server.connect_bank();
    // Unauthenticated: PING and QUIT only.
    assert_eq!(request_line(&mut conn, "PING"), "PONG");
    for request in [
        "BALANCE x",
        "AUDIT",
        "DEPOSIT x 1",
        "WITHDRAW x 1",
        "TRANSFER x y 1",
    ] {
        assert_eq!(
            request_line(&mut conn, request),
            "ERR denied authentication required",
            "{request}"
        );
    }
    assert_eq!(auth(&mut conn, "admin", &bank.admin), "OK admin");
    assert_eq!(request_line(&mut conn, "DEPOSIT bob 100"), "OK 100");
    assert_eq!(request_line(&mut conn, "DEPOSIT alice.savings 50"), "OK 50");
    // Read: BALANCE and AUDIT only.
    assert_eq!(auth(&mut conn, "reader", &bank.reader), "OK reader");
    assert_eq!(request_line(&mut conn, "BALANCE bob"), "OK 100");
    assert_eq!(request_line(&mut conn, "AUDIT"), "OK 150 2");
    for request in ["DEPOSIT bob 1", "WITHDRAW bob 1", "TRANSFER bob alice 1"] {
        assert!(denied(&request_line(&mut conn, request)), "{request}");
    }
    // Write with debit patterns: credit anyone, debit only alice and alice.*.
    assert_eq!(auth(&mut conn, "alice", &bank.alice), "OK alice");
    assert_eq!(request_line(&mut conn, "DEPOSIT bob 1"), "OK 101");
    assert_eq!(
        request_line(&mut conn, "TRANSFER alice.savings bob 10"),
        "OK 40 111"
    );
    assert_eq!(
        request_line(&mut conn, "TRANSFER alice.savings alice 5"),
        "OK 35 5"
    );
    assert_eq!(request_line(&mut conn, "WITHDRAW alice 5"), "OK 0");
    for request in [
        "WITHDRAW bob 1",
        "TRANSFER bob alice 1",
        "WITHDRAW alicex 1",
    ] {
        let reply = request_line(&mut conn, request);
        assert!(denied(&reply), "{request}: {reply}");
    }
    // Nothing a denial touched moved.
    assert_eq!(auth(&mut conn, "reader", &bank.reader), "OK reader");
    assert_eq!(request_line(&mut conn, "AUDIT"), "OK 146 3");
    assert_eq!(request_line(&mut conn, "BALANCE bob"), "OK 111");
    // A wrong token logs the connection out.
    assert!(denied(&auth(
        &mut conn,
        "alice",
        "0123456789abcdef0123456789abcdef"
    )));
    assert_eq!(
        request_line(&mut conn, "BALANCE bob"),
        "ERR denied authentication required"
    );
    assert_eq!(request_line(&mut conn, "QUIT"), "BYE");
    let status = bank.server.status_addr();
    assert!(metric(status, "forkpool_bank_denied_total") >= 12.0);
    assert_eq!(
        metric(status, "forkpool_bank_auth_total{result=\"accepted\"}"),
        4.0
    );
}

#[test]
fn failed_auths_close_the_connection_and_are_limited_per_peer() {
    let bank = bank_with_users(&[]);
    let wrong = "00000000000000000000000000000000";
    // Three failures on one connection close it.
    let mut conn = bank.server.connect_bank();
    for _ in 0..3 {
        assert!(denied(&auth(&mut conn, "alice", wrong)));
    }
    let mut rest = Vec::new();
    conn.read_to_end(&mut rest).expect("a clean close");
    assert!(rest.is_empty(), "{rest:?}");
    // Ten failures from one address (this one worker) and even the right token is refused.
    for _ in 0..3 {
        let mut conn = bank.server.connect_bank();
        for _ in 0..3 {
            let _ = auth(&mut conn, "nobody", wrong);
        }
    }
    let mut conn = bank.server.connect_bank();
    let reply = auth(&mut conn, "alice", &bank.alice);
    assert!(denied(&reply), "{reply}");
    // Another address is not limited.
    let other = connect_from(bank.server.bank_addr(), [127, 0, 0, 2]);
    let mut other = other;
    assert_eq!(auth(&mut other, "alice", &bank.alice), "OK alice");
    let status = bank.server.status_addr();
    assert!(metric(status, "forkpool_bank_auth_total{result=\"throttled\"}") >= 1.0);
    // The log is read from the server's pipe by another thread: it may come a moment later.
    wait_until("the failures to be logged with the peer", WAIT, || {
        bank.server
            .output()
            .contains("from 127.0.0.1")
            .then_some(())
    });
}

#[test]
fn an_unknown_user_and_a_wrong_token_take_the_same_time() {
    let bank = bank_with_users(&[]);
    let addr = bank.server.bank_addr();
    let wrong = "0123456789abcdef0123456789abcdef";
    let (mut unknown, mut wrong_token) = (Vec::new(), Vec::new());
    // Interleaved, each from its own loopback address (the per-peer limit stays away).
    for i in 0u8..120 {
        for (user, times) in [("ghost", &mut unknown), ("alice", &mut wrong_token)] {
            let local = [127, 1 + u8::from(user == "alice"), i / 200, 1 + i % 200];
            let mut conn = connect_from(addr, local);
            let started = Instant::now();
            let reply = auth(&mut conn, user, wrong);
            times.push(started.elapsed());
            assert!(denied(&reply), "{reply}");
        }
    }
    let median = |times: &mut Vec<Duration>| {
        times.sort();
        times[times.len() / 2]
    };
    let (u, w) = (median(&mut unknown), median(&mut wrong_token));
    eprintln!("median AUTH failure: unknown user {u:?}, wrong token {w:?}");
    let gap = u.abs_diff(w);
    assert!(
        gap < Duration::from_micros(500) || gap < u.max(w) / 2,
        "unknown {u:?} vs wrong token {w:?}"
    );
}

#[test]
fn a_reloaded_users_file_adds_a_user_and_revokes_one_on_its_next_request() {
    let bank = bank_with_users(&[]);
    let mut alice = bank.server.connect_bank();
    assert_eq!(auth(&mut alice, "alice", &bank.alice), "OK alice");
    assert_eq!(request_line(&mut alice, "DEPOSIT alice 7"), "OK 7");
    // The new file: alice gone, carol new.
    let carol = gen_token("carol", "read");
    let path = &bank.users_file;
    let text = std::fs::read_to_string(path).expect("read the users file");
    let kept: String = text
        .split("[[user]]")
        .filter(|entry| !entry.contains("name = \"alice\"") && !entry.trim().is_empty())
        .map(|entry| format!("[[user]]{entry}"))
        .collect();
    std::fs::write(path, format!("{kept}\n{}", carol.entry)).expect("rewrite the users file");
    bank.server.signal(Signal::SIGHUP);
    bank.server.wait_log("SIGHUP: reloaded", WAIT);
    let old = bank.server.wait_workers(1, WAIT);
    let mut carol_conn = bank.server.connect_bank();
    assert_eq!(auth(&mut carol_conn, "carol", &carol.token), "OK carol");
    assert_eq!(request_line(&mut carol_conn, "BALANCE alice"), "OK 7");
    // alice's connection lives on (handed over), but as nobody.
    let reply = request_line(&mut alice, "DEPOSIT alice 1");
    assert!(denied(&reply), "{reply}");
    assert!(denied(&auth(&mut alice, "alice", &bank.alice)));
    assert_eq!(bank.server.workers(), old);
}

#[test]
fn a_unix_socket_obeys_its_file_mode_and_maps_a_peer_uid_to_a_user() {
    let Some(runuser) = tool("runuser") else {
        return;
    };
    let Some(nc) = tool("nc") else {
        return;
    };
    let dir = Arc::new(tempfile::tempdir().expect("a temporary directory"));
    std::fs::set_permissions(
        dir.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .expect("let others reach the socket's directory");
    let socket = dir.path().join("bank.sock");
    let me = nix::unistd::getuid().as_raw();
    let mut me_user = gen_token("operator", "write").entry;
    me_user.push_str(&format!("uid = {me}\n"));
    let users = dir.path().join("users.toml");
    std::fs::write(&users, me_user).expect("write the users file");
    let start = |mode: &str| {
        Server::builder()
            .data_dir(Arc::clone(&dir))
            .args(["--bank-addr", &format!("unix:{}", socket.display())])
            .args([
                "--socket-mode",
                mode,
                "--users-file",
                &users.display().to_string(),
            ])
            .start()
    };
    let nobody_pings = || {
        let out = Command::new(&runuser)
            .args(["-u", "nobody", "--"])
            .arg(&nc)
            .args(["-N", "-U"])
            .arg(&socket)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .and_then(|mut child| {
                child.stdin.take().expect("stdin").write_all(b"PING\n")?;
                child.wait_with_output()
            })
            .expect("runuser runs nc");
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let server = start("0600");
    // The owner's uid is the operator user: no AUTH needed.
    let mut own = UnixStream::connect(&socket).expect("the owner connects");
    own.set_read_timeout(Some(WAIT)).expect("a read timeout");
    own.write_all(b"DEPOSIT ops 3\n").expect("send");
    let mut reply = [0u8; 5];
    own.read_exact(&mut reply).expect("a reply");
    assert_eq!(&reply, b"OK 3\n");
    assert_eq!(nobody_pings(), "", "nobody could connect through mode 0600");
    drop(server);
    // A second server on a live socket is refused; the first one's stale file is replaced.
    let _server = start("0666");
    assert_eq!(nobody_pings(), "PONG\n", "mode 0666 lets nobody in");
    let mut second = Server::builder()
        .args(["--bank-addr", &format!("unix:{}", socket.display())])
        .spawn();
    assert!(!second.wait_exit(WAIT).success());
    assert!(
        second.output().contains("in use by a running server"),
        "{}",
        second.output()
    );
}

#[test]
fn protected_mode_refuses_an_open_bank_beyond_loopback_unless_told() {
    let error = refusal_line(&["--bank-addr", "0.0.0.0:0"]);
    assert!(
        error.contains("bank_open") && error.contains("users_file"),
        "{error}"
    );
    let server = Server::builder()
        .args(["--bank-addr", "0.0.0.0:0", "--bank-open"])
        .start();
    let port = server.bank_addr().port();
    let mut conn = connect(SocketAddr::from(([127, 0, 0, 1], port)));
    assert_eq!(request_line(&mut conn, "PING"), "PONG");
}

#[test]
fn forkpool_bench_runs_the_bank_over_tls_as_an_authenticated_user() {
    let pki = TestPki::new();
    let cert = pki.issue("bank", &["localhost", "127.0.0.1"], Validity::Current);
    let (cert, key) = (
        cert.cert.display().to_string(),
        cert.key.display().to_string(),
    );
    let bank = bank_with_users(&["--bank-tls-cert", &cert, "--bank-tls-key", &key]);
    let addr = bank.server.bank_addr().to_string();
    let ca = pki.ca_file().display().to_string();
    let auth = format!("admin:{}", bank.admin);
    let (report, code) = bench_json(&[
        "bank",
        "--addr",
        &addr,
        "--tls",
        "--tls-ca",
        &ca,
        "--tls-server-name",
        "localhost",
        "--auth",
        &auth,
        "-c",
        "4",
        "-n",
        "2000",
        "--accounts",
        "10",
        "--no-reconnect",
    ]);
    assert_eq!(code, 0, "{report}");
    assert_eq!(
        forkpool_testkit::json_field(&report, "audit_ok"),
        true,
        "{report}"
    );
    // A reader may not move money: the run's opening deposits are denied.
    let reader = format!("reader:{}", bank.reader);
    let out = Command::new(binary("forkpool-bench"))
        .args(["bank", "--addr", &addr, "--tls", "--tls-ca", &ca])
        .args([
            "--tls-server-name",
            "localhost",
            "--auth",
            &reader,
            "-n",
            "10",
        ])
        .output()
        .expect("forkpool-bench runs");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("may only read"), "{stderr}");
}
