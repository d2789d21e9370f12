//! Binary upgrade (SIGUSR2) and socket activation: the listeners and the ledger pass to a new
//! master without a failed request, a failed upgrade changes nothing, and a socket handed
//! over by systemd's protocol is served.

use std::net::TcpListener;
use std::process::Command;
use std::time::Duration;

use forkpool_testkit::{
    binary, log_phrase, ready_pid, request_line, tool, wait_until, Server, Signal,
};

/// Runs forkpool-bench against `addr` in the background; returns its exit status and output.
fn bench(
    mode: &str,
    addr: std::net::SocketAddr,
    seconds: u32,
) -> std::thread::JoinHandle<(bool, String)> {
    let args: Vec<String> = [
        mode,
        "--addr",
        &addr.to_string(),
        "-c",
        "8",
        "-d",
        &seconds.to_string(),
        "--threads",
        "1",
        // An upgrade must go unnoticed: a close by the server is an error.
        "--no-reconnect",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    std::thread::spawn(move || {
        let output = Command::new(binary("forkpool-bench"))
            .args(&args)
            .output()
            .expect("forkpool-bench runs");
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
        (output.status.success(), text)
    })
}

#[test]
fn sigusr2_under_load_hands_over_to_a_new_master_without_a_failed_request() {
    let dir = std::sync::Arc::new(tempfile::tempdir().expect("a temporary directory"));
    let pid_file = dir.path().join("forkpool.pid");
    let mut server = Server::builder()
        .data_dir(dir.clone())
        .args([
            "--graceful-timeout",
            "3",
            "--pid-file",
            pid_file.to_str().expect("UTF-8 path"),
        ])
        .start();
    let old_pid = server.pid;
    let mut stream = server.connect_bank();
    assert_eq!(
        request_line(&mut stream, "DEPOSIT upgrade-witness 4242"),
        "OK 4242"
    );
    drop(stream);
    let echo_load = bench("echo", server.echo_addr(), 4);
    let bank_load = bench("bank", server.bank_addr(), 4);
    server.wait_log(log_phrase::ACCEPTED_BANK, Duration::from_secs(5));
    server.signal(Signal::SIGUSR2);
    let new_line = server.next_ready_line(Duration::from_secs(20));
    let new_pid = ready_pid(&new_line);
    assert_ne!(new_pid, old_pid, "the ready line names the new master");
    assert!(
        new_line.contains(&format!("echo={}", server.echo_addr())),
        "{new_line}"
    );
    wait_until(
        "the pid file to name the new master",
        Duration::from_secs(5),
        || {
            let text = std::fs::read_to_string(&pid_file).ok()?;
            (text.trim() == new_pid.to_string()).then_some(())
        },
    );
    assert!(
        server.wait_exit(Duration::from_secs(15)).success(),
        "the old master drains and exits 0"
    );
    for (name, load) in [("echo", echo_load), ("bank", bank_load)] {
        let (ok, output) = load.join().expect("bench thread");
        assert!(ok, "{name} load failed across the upgrade:\n{output}");
    }
    // The new master serves, on the same ledger, with the witness untouched.
    let mut stream = server.connect_bank();
    assert_eq!(
        request_line(&mut stream, "BALANCE upgrade-witness"),
        "OK 4242"
    );
    let mut echo = server.connect_echo();
    assert_eq!(request_line(&mut echo, "after upgrade"), "AFTER UPGRADE");
    assert!(!std::path::Path::new(&format!("{}.oldbin", pid_file.display())).exists());
    // The new master is not the harness's child: stop it through its pid.
    nix::sys::signal::kill(new_pid, Signal::SIGTERM).expect("signal the new master");
    wait_until(
        "the new master to exit and remove its pid file",
        Duration::from_secs(10),
        || (!pid_file.exists()).then_some(()),
    );
}

#[test]
fn a_failed_upgrade_leaves_the_old_master_serving() {
    let dir = std::sync::Arc::new(tempfile::tempdir().expect("a temporary directory"));
    let program = dir.path().join("forkpool-server");
    std::fs::copy(binary("forkpool-server"), &program).expect("copy the server binary");
    let pid_file = dir.path().join("forkpool.pid");
    let server = Server::builder()
        .data_dir(dir.clone())
        .program(program.clone())
        .args(["--pid-file", pid_file.to_str().expect("UTF-8 path")])
        .start();
    // The "new binary" on disk exits at once.
    std::fs::remove_file(&program).expect("remove the copy");
    std::fs::write(&program, "#!/bin/sh\nexit 3\n").expect("write a failing binary");
    std::fs::set_permissions(
        &program,
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .expect("make it executable");
    server.signal(Signal::SIGUSR2);
    server.wait_log(log_phrase::UPGRADE_FAILED, Duration::from_secs(10));
    let pid = std::fs::read_to_string(&pid_file).expect("the pid file is back in place");
    assert_eq!(pid.trim(), server.pid.to_string());
    let mut stream = server.connect_echo();
    assert_eq!(
        request_line(&mut stream, "still the old one"),
        "STILL THE OLD ONE"
    );
    assert_eq!(server.workers().len(), 2);
}

#[test]
fn a_socket_passed_by_systemd_socket_activate_is_served() {
    let Some(activate) = tool("systemd-socket-activate") else {
        return;
    };
    // systemd-socket-activate refuses port 0: find a free port, then hand it over.
    let port = TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port();
    let listen = format!("127.0.0.1:{port}");
    let mut server = Server::builder()
        .wrapper([
            activate.display().to_string(),
            "-l".into(),
            listen.clone(),
            "--fdname=echo".into(),
        ])
        .args(["--echo-addr", "127.0.0.1:9"])
        .spawn();
    // Like systemd, the wrapper starts the server when the first client connects; that
    // client waits in the passed socket's queue and is served by the server.
    let addr: std::net::SocketAddr = listen.parse().expect("a socket address");
    let mut first = wait_until(
        "the activation socket to listen",
        Duration::from_secs(10),
        || std::net::TcpStream::connect(addr).ok(),
    );
    first
        .set_read_timeout(Some(Duration::from_secs(20)))
        .expect("set a read timeout");
    server.wait_ready();
    assert_eq!(request_line(&mut first, "first"), "FIRST");
    assert_eq!(
        server.echo_addr().to_string(),
        listen,
        "the passed socket replaces --echo-addr"
    );
    server.wait_log("echo listens on inherited socket", Duration::from_secs(5));
    for i in 0..20 {
        let mut stream = server.connect_echo();
        assert_eq!(
            request_line(&mut stream, &format!("activated {i}")),
            format!("ACTIVATED {i}")
        );
    }
    // The bank, whose socket was not passed, binds its configured address as usual.
    let mut bank = server.connect_bank();
    assert_eq!(request_line(&mut bank, "PING"), "PONG");
}

#[test]
fn systemd_hears_ready_reloading_and_stopping_on_its_notify_socket() {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let path = dir.path().join("notify.sock");
    let socket = std::os::unix::net::UnixDatagram::bind(&path).expect("bind a notify socket");
    socket
        .set_read_timeout(Some(Duration::from_secs(20)))
        .expect("set a read timeout");
    let mut server = Server::builder()
        .env("NOTIFY_SOCKET", path.to_str().expect("UTF-8 path"))
        .start();
    let mut received = String::new();
    let mut wait_for = |state: &str| {
        let mut buf = [0u8; 512];
        while !received.contains(state) {
            let n = socket.recv(&mut buf).unwrap_or_else(|e| {
                panic!("no {state} on the notify socket ({e}); got {received:?}")
            });
            received.push_str(&String::from_utf8_lossy(&buf[..n]));
            received.push('\n');
        }
    };
    wait_for("READY=1");
    wait_for(&format!("MAINPID={}", server.pid));
    server.signal(Signal::SIGHUP);
    wait_for("RELOADING=1");
    server.signal(Signal::SIGTERM);
    wait_for("STOPPING=1");
    assert!(server.wait_exit(Duration::from_secs(10)).success());
}

/// `FORKPOOL_UPGRADE_FROM` names the master a new binary replaces and SIGTERMs once ready. Set
/// by anyone but that master (our parent, passing us the ledger), it is refused: the server
/// must not kill an arbitrary process.
#[test]
fn an_upgrade_variable_not_set_by_our_parent_is_refused() {
    let mut bystander = Command::new("sleep")
        .arg("60")
        .spawn()
        .expect("start a bystander process");
    let bystander_pid = bystander.id().to_string();
    for value in [bystander_pid.as_str(), "1", "not-a-pid"] {
        let mut server = Server::builder()
            .env("FORKPOOL_UPGRADE_FROM", value)
            .spawn();
        assert!(
            !server.wait_exit(Duration::from_secs(10)).success(),
            "{value}: the server started"
        );
        let output = server.output();
        assert!(
            output.contains(&format!("FORKPOOL_UPGRADE_FROM={value} is not the master")),
            "{output}"
        );
    }
    assert!(
        matches!(bystander.try_wait(), Ok(None)),
        "the bystander was killed"
    );
    let _ = bystander.kill();
    let _ = bystander.wait();
}
