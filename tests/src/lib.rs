//! The integration-test harness: builds the real binaries, starts `forkpool-server` on
//! ephemeral loopback ports, waits for its ready line, and inspects its processes in `/proc`.
//!
//! A [`Server`] owns its process group: dropping it (also when a test panics) SIGKILLs the
//! master and every worker and reaps the master, so no test leaks a process. Waiting is
//! always [`wait_until`] a condition with a deadline, never a sleep.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

pub mod haproxy;
pub mod pg;
pub mod pki;
pub mod queue_history;
pub mod queue_model;
pub mod security;

pub use nix::sys::signal::Signal;
use nix::sys::signal::{kill, killpg};
use nix::unistd::Pid;

/// How long [`Server::wait_exit`] waits for the output pipes to close after the exit.
const OUTPUT_END_TIMEOUT: Duration = Duration::from_secs(2);
/// How long a server that refuses to start may take to exit.
const REFUSAL_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a server may take to print its ready line.
pub const START_TIMEOUT: Duration = Duration::from_secs(20);

/// Polls `check` every few milliseconds until it returns `Some`, or panics after `timeout`
/// saying what was awaited (and what `check` last saw, via `describe`).
pub fn wait_until<T>(what: &str, timeout: Duration, mut check: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(value) = check() {
            return value;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// The path of a workspace binary, built on first use (a fresh `cargo test --workspace`
/// does not build other packages' binaries for this crate's tests).
pub fn binary(name: &str) -> PathBuf {
    static BUILT: OnceLock<PathBuf> = OnceLock::new();
    let dir = BUILT.get_or_init(build_binaries);
    dir.join(name)
}

fn build_binaries() -> PathBuf {
    if let Some(dir) = std::env::var_os("FORKPOOL_BIN_DIR") {
        return PathBuf::from(dir);
    }
    // This test executable lives in <target>/<profile>/deps/.
    let exe = std::env::current_exe().expect("the test knows its own path");
    let profile_dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("test executables live in <target>/<profile>/deps")
        .to_path_buf();
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR")).join("../Cargo.toml");
    let mut build = Command::new(env!("CARGO"));
    build
        .args([
            "build",
            "--quiet",
            "-p",
            "forkpool-server",
            "-p",
            "forkpool-bench",
        ])
        .arg("--manifest-path")
        .arg(&manifest);
    if profile_dir
        .file_name()
        .is_some_and(|name| name == "release")
    {
        build.arg("--release");
    }
    if let Some(target) = profile_dir.parent() {
        build.env("CARGO_TARGET_DIR", target);
    }
    let output = build
        .output()
        .expect("cargo can be run to build the binaries");
    assert!(
        output.status.success(),
        "building the binaries failed:\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    profile_dir
}

/// Fragments of the server's log lines that tests wait for or check the absence of. Each one
/// appears in a log call of the server's source (`log_phrases_are_the_servers` checks it),
/// so a change of wording breaks that test instead of silently weakening another.
pub mod log_phrase {
    /// A worker took a connection of the service (debug level): `accepted echo connection`.
    const ACCEPTED: &str = "accepted {} connection";
    pub const ACCEPTED_ECHO: &str = "accepted echo connection";
    pub const ACCEPTED_BANK: &str = "accepted bank connection";
    /// The master starts a drain (SIGTERM/SIGINT).
    pub const DRAINING: &str = "draining: waiting up to";
    /// A worker starts its drain: `draining 1 connections`.
    const WORKER_DRAINS: &str = "draining {} connections";
    pub const WORKER_DRAINING_ONE: &str = "draining 1 connections";
    /// The master's pool is complete (`N workers serving`), logged before the ready line.
    pub const WORKERS_SERVING: &str = "workers serving";
    /// The master took a second TERM/INT for "stop now".
    pub const SECOND_SHUTDOWN: &str = "second shutdown signal";
    /// A worker of a running pool died and is replaced.
    pub const WORKER_DIED: &str = "died: ";
    /// The master forked a worker (`worker N started (pid P)`).
    pub const WORKER_STARTED: &str = " started (pid ";
    /// The master killed a worker for missing its heartbeats.
    pub const NO_HEARTBEAT: &str = "sent no heartbeat";
    /// The drain ran out of time.
    pub const GRACEFUL_TIMEOUT: &str = "graceful timeout: killing";
    /// A USR2 upgrade did not complete.
    pub const UPGRADE_FAILED: &str = "upgrade failed";
    /// A connection of a service behind a proxy got its PROXY header naming the client
    /// (debug level): `connection from 192.0.2.7:51234 through proxy 127.0.0.1`.
    pub const THROUGH_PROXY: &str = " through proxy ";
    /// A connection of a service behind a proxy had no valid PROXY header and was closed:
    /// `PROXY header refused (missing): ...`.
    pub const PROXY_REFUSED: &str = "PROXY header refused (";
    /// Every phrase as it stands in the server's source, for the check against it.
    pub const ALL: [&str; 12] = [
        WORKER_DRAINS,
        THROUGH_PROXY,
        PROXY_REFUSED,
        ACCEPTED,
        DRAINING,
        WORKERS_SERVING,
        SECOND_SHUTDOWN,
        WORKER_DIED,
        WORKER_STARTED,
        NO_HEARTBEAT,
        GRACEFUL_TIMEOUT,
        UPGRADE_FAILED,
    ];
}

/// Where a test server's bank keeps its accounts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LedgerKind {
    /// The shared-memory ledger file, in the server's data directory (the default).
    File,
    /// A fresh database of this test binary's PostgreSQL cluster (see [`pg`]).
    Postgres,
}

/// Options for starting a server; every test gets its own ledger and short timeouts.
pub struct ServerBuilder {
    args: Vec<String>,
    env: Vec<(String, String)>,
    dir: Option<Arc<tempfile::TempDir>>,
    /// Harness defaults not to pass (so a `--config` file's value applies).
    without: Vec<String>,
    /// The server executable (default: the workspace's `forkpool-server`).
    program: Option<PathBuf>,
    /// A command that runs the server: `wrapper... <program> <args...>`.
    wrapper: Vec<String>,
    /// Leave `RUST_LOG` unset (the server's default level) instead of the harness's `debug`.
    default_log_level: bool,
}

impl ServerBuilder {
    /// Keeps the bank's accounts in `kind`. `None` when PostgreSQL is asked for and not
    /// installed (noted, and a failure under `CI`): the test has nothing to run.
    pub fn ledger(self, kind: LedgerKind) -> Option<Self> {
        Some(match kind {
            LedgerKind::File => self,
            LedgerKind::Postgres => {
                let cluster = pg::postgres()?;
                let url = cluster.url(&cluster.new_database());
                self.args(["--ledger".to_string(), url])
            }
        })
    }

    /// Adds command-line arguments (they win over the harness's defaults).
    pub fn args<I: IntoIterator<Item = S>, S: Into<String>>(mut self, args: I) -> Self {
        self.args.extend(args.into_iter().map(Into::into));
        self
    }

    pub fn env(mut self, key: &str, value: &str) -> Self {
        self.env.push((key.into(), value.into()));
        self
    }

    /// Does not pass the harness's default for `flag` (e.g. `--workers`), so that a value
    /// from a `--config` file takes effect (flags win over the file).
    pub fn without_default(mut self, flag: &str) -> Self {
        self.without.push(flag.into());
        self
    }

    /// Runs this executable instead of the workspace's `forkpool-server` (e.g. a copy that a
    /// test replaces on disk before a binary upgrade).
    pub fn program(mut self, program: PathBuf) -> Self {
        self.program = Some(program);
        self
    }

    /// Runs the server through `wrapper` (e.g. `systemd-socket-activate -l ADDR`), which
    /// must exec it in place so the master keeps the child's pid.
    pub fn wrapper<I: IntoIterator<Item = S>, S: Into<String>>(mut self, wrapper: I) -> Self {
        self.wrapper = wrapper.into_iter().map(Into::into).collect();
        self
    }

    /// Runs the server at its default log level (`RUST_LOG` unset), as an operator would,
    /// instead of the harness's `debug`.
    pub fn default_log_level(mut self) -> Self {
        self.default_log_level = true;
        self
    }

    /// Uses (and shares) this data directory, e.g. to restart on the same ledger.
    pub fn data_dir(mut self, dir: Arc<tempfile::TempDir>) -> Self {
        self.dir = Some(dir);
        self
    }

    /// Starts the server and waits for its ready line.
    pub fn start(self) -> Server {
        let mut server = self.spawn();
        server.wait_ready();
        server
    }

    /// Starts the server without waiting for it to be ready (for start-up failures).
    pub fn spawn(self) -> Server {
        let dir = self
            .dir
            .unwrap_or_else(|| Arc::new(tempfile::tempdir().expect("a temporary directory")));
        let mut args: Vec<String> = Vec::new();
        let given = |flag: &str| {
            self.args
                .iter()
                .any(|a| a == flag || a.starts_with(&format!("{flag}=")))
        };
        let defaults = [
            ("--echo-addr", "127.0.0.1:0".to_string()),
            ("--bank-addr", "127.0.0.1:0".to_string()),
            ("--queue-addr", "127.0.0.1:0".to_string()),
            ("--workers", "2".to_string()),
            ("--graceful-timeout", "5".to_string()),
            (
                "--ledger",
                dir.path().join("ledger.bin").display().to_string(),
            ),
            (
                "--queue-store",
                dir.path().join("queue.bin").display().to_string(),
            ),
            // Small enough to make quickly on every test server.
            ("--queue-max-jobs", "4096".to_string()),
        ];
        for (flag, value) in defaults {
            if !given(flag) && !self.without.iter().any(|f| f == flag) && server_accepts(flag) {
                args.push(flag.to_string());
                args.push(value);
            }
        }
        args.extend(self.args.iter().cloned());
        let program = self
            .program
            .clone()
            .unwrap_or_else(|| binary("forkpool-server"));
        let mut command = match self.wrapper.split_first() {
            Some((wrapper, wrapper_args)) => {
                let mut command = Command::new(wrapper);
                command.args(wrapper_args).arg(&program);
                command
            }
            None => Command::new(&program),
        };
        command
            .args(&args)
            .current_dir(dir.path())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0);
        if self.default_log_level {
            command.env_remove("RUST_LOG");
        } else {
            command.env("RUST_LOG", "debug");
        }
        for (key, value) in &self.env {
            command.env(key, value);
        }
        let mut child = command.spawn().expect("forkpool-server starts");
        let pid = Pid::from_raw(child.id() as i32);
        let stdout = child.stdout.take().expect("stdout is piped");
        let stderr = child.stderr.take().expect("stderr is piped");
        let log = Arc::new(Mutex::new(Vec::new()));
        let stderr_log = Arc::new(Mutex::new(Vec::new()));
        let (ready_tx, ready_rx) = mpsc::channel();
        let closed_pipes = Arc::new(AtomicUsize::new(0));
        let (stdout_lines, stdout_closed) = (Arc::clone(&log), Arc::clone(&closed_pipes));
        std::thread::spawn(move || {
            collect_lines(stdout, &[&stdout_lines], Some(ready_tx));
            stdout_closed.fetch_add(1, Ordering::SeqCst);
        });
        let (stderr_lines, stderr_only, stderr_closed) = (
            Arc::clone(&log),
            Arc::clone(&stderr_log),
            Arc::clone(&closed_pipes),
        );
        std::thread::spawn(move || {
            collect_lines(stderr, &[&stderr_lines, &stderr_only], None);
            stderr_closed.fetch_add(1, Ordering::SeqCst);
        });
        Server {
            child: Some(child),
            pid,
            echo: None,
            bank: None,
            queue: None,
            status: None,
            log,
            stderr_log,
            closed_pipes,
            ready_rx,
            dir,
            exit: None,
        }
    }
}

/// Reads a child's output line by line (so the child never blocks on a full pipe) into each
/// of `logs`; stdout lines that start with `forkpool ready` go to `ready` too.
fn collect_lines(
    stream: impl Read,
    logs: &[&Mutex<Vec<String>>],
    ready: Option<mpsc::Sender<String>>,
) {
    for line in BufReader::new(stream).lines() {
        let Ok(line) = line else { break };
        if let Some(ready) = &ready {
            if line.starts_with("forkpool ready") {
                let _ = ready.send(line.clone());
            }
        }
        for log in logs {
            if let Ok(mut log) = log.lock() {
                log.push(line.clone());
            }
        }
    }
}

/// The harness passes `--bank-addr` and `--ledger` only to a server that has them.
fn server_accepts(flag: &str) -> bool {
    static HELP: OnceLock<String> = OnceLock::new();
    let help = HELP.get_or_init(|| {
        let output = Command::new(binary("forkpool-server"))
            .arg("--help")
            .output()
            .expect("forkpool-server --help runs");
        String::from_utf8_lossy(&output.stdout).into_owned()
    });
    help.contains(flag)
}

/// A running `forkpool-server`, killed with its whole process group on drop.
pub struct Server {
    child: Option<Child>,
    /// The master's pid.
    pub pid: Pid,
    pub echo: Option<SocketAddr>,
    pub bank: Option<SocketAddr>,
    pub queue: Option<SocketAddr>,
    /// The HTTP status address (`status=` in the ready line, with `--status-addr`).
    pub status: Option<SocketAddr>,
    log: Arc<Mutex<Vec<String>>>,
    /// What the server printed on stderr alone.
    stderr_log: Arc<Mutex<Vec<String>>>,
    /// How many of stdout and stderr reached EOF (all output collected).
    closed_pipes: Arc<AtomicUsize>,
    ready_rx: mpsc::Receiver<String>,
    dir: Arc<tempfile::TempDir>,
    exit: Option<ExitStatus>,
}

impl Server {
    pub fn builder() -> ServerBuilder {
        ServerBuilder {
            args: Vec::new(),
            env: Vec::new(),
            dir: None,
            without: Vec::new(),
            program: None,
            wrapper: Vec::new(),
            default_log_level: false,
        }
    }

    /// A server with the harness defaults (2 workers, ephemeral ports, its own ledger).
    pub fn start() -> Server {
        Server::builder().start()
    }

    /// Waits for the ready line and reads the addresses from it (after [`ServerBuilder::spawn`]).
    pub fn wait_ready(&mut self) {
        let line = match self.ready_rx.recv_timeout(START_TIMEOUT) {
            Ok(line) => line,
            Err(_) => panic!(
                "no ready line within {START_TIMEOUT:?}; output:\n{}",
                self.output()
            ),
        };
        self.read_ready_line(&line);
    }

    /// Takes the addresses from a ready line.
    fn read_ready_line(&mut self, line: &str) {
        for field in line.split_whitespace() {
            if let Some((key, value)) = field.split_once('=') {
                match key {
                    "echo" => self.echo = value.parse().ok(),
                    "bank" => self.bank = value.parse().ok(),
                    "queue" => self.queue = value.parse().ok(),
                    "status" => self.status = value.parse().ok(),
                    "pid" => assert_eq!(value, self.pid.to_string(), "ready line names the master"),
                    _ => {}
                }
            }
        }
    }

    /// Waits for the ready line (true) or for the master to exit without one (false), as a
    /// start on damaged input may do either.
    pub fn wait_ready_or_exit(&mut self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            match self.ready_rx.recv_timeout(Duration::from_millis(20)) {
                Ok(line) => {
                    self.read_ready_line(&line);
                    return true;
                }
                Err(mpsc::RecvTimeoutError::Disconnected) => return false,
                Err(mpsc::RecvTimeoutError::Timeout) => {}
            }
            let exited = self
                .child
                .as_mut()
                .is_some_and(|c| matches!(c.try_wait(), Ok(Some(_))));
            if exited {
                // A ready line printed just before the exit still counts.
                return self.ready_rx.try_recv().is_ok_and(|line| {
                    self.read_ready_line(&line);
                    true
                });
            }
            assert!(
                Instant::now() < deadline,
                "neither ready nor exited within {timeout:?}; output:\n{}",
                self.output()
            );
        }
    }

    pub fn echo_addr(&self) -> SocketAddr {
        self.echo.expect("the ready line names the echo address")
    }

    pub fn bank_addr(&self) -> SocketAddr {
        self.bank.expect("the ready line names the bank address")
    }

    pub fn queue_addr(&self) -> SocketAddr {
        self.queue.expect("the ready line names the queue address")
    }

    pub fn status_addr(&self) -> SocketAddr {
        self.status
            .expect("the ready line names the status address")
    }

    /// The data directory (holds the ledger unless the test chose another path).
    pub fn data_dir(&self) -> Arc<tempfile::TempDir> {
        Arc::clone(&self.dir)
    }

    /// Everything the server printed so far (stdout and stderr, interleaved by arrival).
    pub fn output(&self) -> String {
        self.log
            .lock()
            .map(|lines| lines.join("\n"))
            .unwrap_or_default()
    }

    /// The lines the server printed on stderr (complete after [`Server::wait_exit`]).
    pub fn stderr_lines(&self) -> Vec<String> {
        self.stderr_log
            .lock()
            .map(|lines| lines.clone())
            .unwrap_or_default()
    }

    pub fn output_lines(&self) -> Vec<String> {
        self.log
            .lock()
            .map(|lines| lines.clone())
            .unwrap_or_default()
    }

    /// A binary upgrade (SIGUSR2) that the old master completes: waits for the new master's
    /// ready line and for the old master to drain and exit successfully.
    pub fn upgrade_and_retire_old_master(&mut self, timeout: Duration) {
        self.signal(Signal::SIGUSR2);
        let ready = self.next_ready_line(timeout);
        assert!(
            !ready.ends_with(&format!(" pid={}", self.pid)),
            "a new master: {ready}"
        );
        assert!(
            self.wait_exit(timeout).success(),
            "the old master drains and exits"
        );
    }

    /// Lines the server logged at ERROR level about `path`.
    pub fn errors_about(&self, path: &Path) -> Vec<String> {
        let path = path.display().to_string();
        self.output_lines()
            .into_iter()
            .filter(|line| line.contains(" ERROR ") && line.contains(&path))
            .collect()
    }

    /// Waits for the first error line about `path` and returns it.
    pub fn wait_error_about(&self, path: &Path, timeout: Duration) -> String {
        wait_until(
            &format!("an error about {} to be logged", path.display()),
            timeout,
            || self.errors_about(path).into_iter().next(),
        )
    }

    pub fn signal(&self, signal: Signal) {
        kill(self.pid, signal).expect("the master can be signalled");
    }

    /// The master's live (non-zombie) children.
    pub fn workers(&self) -> Vec<Pid> {
        children_of(self.pid)
            .into_iter()
            .filter(|pid| process_state(*pid).is_some_and(|state| state != 'Z'))
            .collect()
    }

    /// Waits until the master has exactly `count` live workers and returns them.
    pub fn wait_workers(&self, count: usize, timeout: Duration) -> Vec<Pid> {
        wait_until(&format!("{count} live workers"), timeout, || {
            let workers = self.workers();
            (workers.len() == count).then_some(workers)
        })
    }

    /// Waits for the master to exit and returns its status (reaped); its output is then
    /// complete once its workers are gone too.
    pub fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        if let Some(status) = self.exit {
            return status;
        }
        let child = self.child.as_mut().expect("the master was started");
        let status = wait_until("the master to exit", timeout, || {
            child.try_wait().ok().flatten()
        });
        self.exit = Some(status);
        // The output is complete once every process holding the pipes is gone; after a
        // binary upgrade the new master holds them on, so this wait is bounded, not required.
        let deadline = Instant::now() + OUTPUT_END_TIMEOUT;
        while self.closed_pipes.load(Ordering::SeqCst) < 2 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
        status
    }

    /// Waits until the server's output contains `phrase` (one of [`log_phrase`]'s, so the
    /// wording is checked against the server's source), e.g. that a connection has reached a
    /// worker.
    /// Returns how many lines contain it by then.
    pub fn wait_log(&self, phrase: &str, timeout: Duration) -> usize {
        wait_until(&format!("the server to log {phrase:?}"), timeout, || {
            let count = self
                .output_lines()
                .iter()
                .filter(|line| line.contains(phrase))
                .count();
            (count > 0).then_some(count)
        })
    }

    /// Has the server logged `phrase` (one of [`log_phrase`]'s)? Used for checks that a
    /// line does NOT appear: the phrase is kept in step with the server's source by a test,
    /// so such a check cannot pass because the wording changed.
    pub fn has_logged(&self, phrase: &str) -> bool {
        self.output().contains(phrase)
    }

    /// Waits for a server that must refuse to start ([`ServerBuilder::spawn`]) to exit, checks
    /// it failed cleanly (non-zero status, no panic, no ready line, no worker forked), and
    /// returns everything it printed; `what` names the case in failure messages.
    pub fn wait_refused(&mut self, what: &str) -> String {
        let status = self.wait_exit(REFUSAL_TIMEOUT);
        let output = self.output();
        assert!(!status.success(), "{what}: the server started: {output}");
        assert!(!output.contains("panicked"), "{what}: {output}");
        assert!(!output.contains("forkpool ready"), "{what}: {output}");
        assert!(
            !output.contains(log_phrase::WORKER_STARTED),
            "{what}: {output}"
        );
        output
    }

    /// Waits for the next ready line (e.g. a new master's after SIGUSR2) and returns it.
    pub fn next_ready_line(&self, timeout: Duration) -> String {
        self.ready_rx.recv_timeout(timeout).unwrap_or_else(|_| {
            panic!(
                "no new ready line within {timeout:?}; output:\n{}",
                self.output()
            )
        })
    }

    /// How many lines of the output so far contain `text`.
    pub fn log_count(&self, text: &str) -> usize {
        self.output_lines()
            .iter()
            .filter(|l| l.contains(text))
            .count()
    }

    /// The pids tagged (`[... pid=N]`) on the server's log lines that contain `fragment`
    /// (e.g. `"] serving"`: the workers that became ready, to SIGKILL only those).
    pub fn pids_logging(&self, fragment: &str) -> BTreeSet<Pid> {
        self.output_lines()
            .iter()
            .filter(|line| line.contains(fragment))
            .filter_map(|line| {
                let digits: String = line
                    .split("pid=")
                    .nth(1)?
                    .chars()
                    .take_while(char::is_ascii_digit)
                    .collect();
                Some(Pid::from_raw(digits.parse().ok()?))
            })
            .collect()
    }

    /// Waits until the pool has settled at `count` workers and returns them: the master's
    /// `/status` lists exactly `count` workers, each idle or busy (none starting, retiring or
    /// draining), and they are its only live children. A resize replaces the workers whose
    /// sockets moved, so a bare process count can match half-way through. The server runs
    /// with `--status-addr`.
    pub fn wait_settled(&self, count: usize, timeout: Duration) -> Vec<Pid> {
        wait_until(&format!("a settled pool of {count}"), timeout, || {
            let (code, table) = http_request(self.status_addr(), "GET", "/status");
            if code != 200 {
                return None;
            }
            let mut listed = Vec::new();
            for row in table
                .lines()
                .skip_while(|l| !l.trim_start().starts_with("slot"))
                .skip(1)
            {
                let mut columns = row.split_whitespace().skip(1);
                let pid = columns.next()?.parse().ok()?;
                if !matches!(columns.next()?, "idle" | "busy") {
                    return None;
                }
                listed.push(Pid::from_raw(pid));
            }
            let mut live = self.workers();
            listed.sort();
            live.sort();
            (listed.len() == count && listed == live).then_some(live)
        })
    }

    /// The `/metrics` page (the server runs with `--status-addr`).
    pub fn metrics(&self) -> String {
        let (code, body) = http_request(self.status_addr(), "GET", "/metrics");
        assert_eq!(code, 200, "{body}");
        body
    }

    /// Waits for a server that must not start (after [`ServerBuilder::spawn`]); checks it
    /// failed without a panic or a worker, and returns its complete output.
    pub fn refused_to_start(&mut self, what: &str) -> String {
        let status = self.wait_exit(Duration::from_secs(10));
        let output = self.output();
        assert!(!status.success(), "{what}: the server started: {output}");
        assert!(!output.contains("panicked"), "{what}: {output}");
        assert!(!output.contains("forkpool ready"), "{what}: {output}");
        assert!(!output.contains("worker 0 started"), "{what}: {output}");
        output
    }

    /// Connects to the echo service.
    pub fn connect_echo(&self) -> TcpStream {
        connect(self.echo_addr())
    }

    /// Connects to the bank service.
    pub fn connect_bank(&self) -> TcpStream {
        connect(self.bank_addr())
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        // SIGQUIT makes a live master kill and reap its workers itself (no zombie is left for
        // a slow init to collect); then SIGKILL whatever is left of the process group, which
        // the master leads and its workers (and a USR2 successor) inherit.
        let _ = killpg(self.pid, Signal::SIGCONT);
        let _ = kill(self.pid, Signal::SIGQUIT);
        if let Some(child) = self.child.as_mut() {
            let deadline = Instant::now() + Duration::from_secs(3);
            while Instant::now() < deadline && matches!(child.try_wait(), Ok(None)) {
                std::thread::sleep(Duration::from_millis(2));
            }
            let _ = killpg(self.pid, Signal::SIGKILL);
            let _ = child.kill();
            let _ = child.wait();
        }
        // Orphans killed above become zombies until init reaps them; wait only for the
        // living ones.
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline && !living_in_group(self.pid).is_empty() {
            let _ = killpg(self.pid, Signal::SIGKILL);
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

/// Live (non-zombie) processes whose process group is `pgid`.
fn living_in_group(pgid: Pid) -> Vec<Pid> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(|entry| entry.ok()?.file_name().to_str()?.parse::<i32>().ok())
        .map(Pid::from_raw)
        .filter(|pid| {
            let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
                return false;
            };
            let Some(rest) = stat.rfind(')').map(|i| &stat[i + 1..]) else {
                return false;
            };
            let fields: Vec<&str> = rest.split_whitespace().collect();
            fields.first() != Some(&"Z")
                && fields.get(2) == Some(&pgid.as_raw().to_string().as_str())
        })
        .collect()
}

/// The master's pid in a ready line (`forkpool ready pid=... echo=...`).
pub fn ready_pid(line: &str) -> Pid {
    line.split_whitespace()
        .find_map(|field| field.strip_prefix("pid="))
        .and_then(|pid| pid.parse().ok())
        .map(Pid::from_raw)
        .unwrap_or_else(|| panic!("no pid in ready line {line:?}"))
}

/// Connects with a read timeout, so a test fails instead of hanging.
pub fn connect(addr: SocketAddr) -> TcpStream {
    let stream = TcpStream::connect_timeout(&addr, Duration::from_secs(5))
        .unwrap_or_else(|e| panic!("cannot connect to {addr}: {e}"));
    stream
        .set_read_timeout(Some(Duration::from_secs(20)))
        .expect("set a read timeout");
    stream.set_nodelay(true).expect("set TCP_NODELAY");
    stream
}

/// How a [`line_server`] answers one request line.
pub enum LineReply {
    /// Write these bytes and read the next line.
    Answer(Vec<u8>),
    /// Write these bytes (possibly none), then close the way forkpool does: the write side
    /// shut down, the rest of the input read and discarded until the client's EOF, so the
    /// close is never a reset.
    Close(Vec<u8>),
}

/// A throwaway loopback line server for client tests, a thread per connection: line `n`
/// (from 0, with its `\n`) of each connection is answered as `answer(n, line)` says.
pub fn line_server(
    answer: impl Fn(usize, &[u8]) -> LineReply + Send + Sync + 'static,
) -> SocketAddr {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind loopback");
    let addr = listener.local_addr().expect("the bound address");
    let answer = Arc::new(answer);
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            let answer = Arc::clone(&answer);
            std::thread::spawn(move || serve_lines(stream, &*answer));
        }
    });
    addr
}

fn serve_lines(stream: TcpStream, answer: &dyn Fn(usize, &[u8]) -> LineReply) {
    let Ok(mut writer) = stream.try_clone() else {
        return;
    };
    let mut reader = BufReader::new(stream);
    let mut line = Vec::new();
    for index in 0.. {
        line.clear();
        if reader.read_until(b'\n', &mut line).unwrap_or(0) == 0 {
            return;
        }
        match answer(index, &line) {
            LineReply::Answer(bytes) => {
                if writer.write_all(&bytes).is_err() {
                    return;
                }
            }
            LineReply::Close(bytes) => {
                let _ = writer.write_all(&bytes);
                let _ = writer.shutdown(std::net::Shutdown::Write);
                let _ = std::io::copy(&mut reader, &mut std::io::sink());
                return;
            }
        }
    }
}

/// Connects to `addr` from the loopback address `local` (any 127.x.y.z is this machine, and
/// a distinct peer to the server), with a read timeout.
pub fn connect_from(addr: SocketAddr, local: [u8; 4]) -> TcpStream {
    let socket =
        socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).expect("a socket");
    let local: SocketAddr = (std::net::Ipv4Addr::from(local), 0).into();
    socket.bind(&local.into()).expect("bind a loopback address");
    socket.connect(&addr.into()).expect("connect");
    let stream: TcpStream = socket.into();
    stream
        .set_read_timeout(Some(Duration::from_secs(20)))
        .expect("set a read timeout");
    stream
}

/// Sends `request` while reading replies on another thread (a client that only writes
/// would deadlock on backpressure), half-closes, and returns everything until EOF.
pub fn exchange(stream: TcpStream, request: &[u8]) -> Vec<u8> {
    let mut reader = stream.try_clone().expect("clone the stream");
    let replies = std::thread::spawn(move || {
        let mut replies = Vec::new();
        let _ = reader.read_to_end(&mut replies);
        replies
    });
    let mut writer = stream;
    writer.write_all(request).expect("send the request");
    writer
        .shutdown(std::net::Shutdown::Write)
        .expect("half-close");
    replies.join().expect("the reader thread does not panic")
}

/// Sends one line and reads one line back.
pub fn request_line(stream: &mut TcpStream, line: &str) -> String {
    stream
        .write_all(format!("{line}\n").as_bytes())
        .expect("send a line");
    read_line(stream)
}

/// Reads one `\n`-terminated line (without the `\n`), byte by byte (no read-ahead lost).
/// A read interrupted before it got a byte is tried again: a socket with a read timeout
/// gets `EINTR` when the test process is stopped and continued (or frozen and thawed by
/// its cgroup) on a busy machine, even with no signal handler installed.
pub fn read_line(stream: &mut TcpStream) -> String {
    let mut line = Vec::new();
    let mut byte = [0u8; 1];
    loop {
        match stream.read(&mut byte) {
            Ok(0) => break,
            Ok(_) if byte[0] == b'\n' => break,
            Ok(_) => line.push(byte[0]),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => panic!(
                "reading a reply line: {e} (got so far: {:?})",
                String::from_utf8_lossy(&line)
            ),
        }
    }
    String::from_utf8_lossy(&line).into_owned()
}

/// `STATS <queue>` of the queue service at `addr` as (field, value) pairs; none while the
/// queue does not exist yet.
pub fn queue_stats(addr: SocketAddr, queue: &str) -> BTreeMap<String, u64> {
    let line = request_line(&mut connect(addr), &format!("STATS {queue}"));
    if line.starts_with("ERR no-such-queue ") {
        return BTreeMap::new();
    }
    let fields = line
        .strip_prefix("OK ")
        .unwrap_or_else(|| panic!("STATS {queue}: {line}"));
    fields
        .split(' ')
        .filter_map(|f| {
            let (k, v) = f.split_once('=')?;
            Some((k.to_string(), v.parse().ok()?))
        })
        .collect()
}

/// One figure of `STATS <queue>`; 0 while the queue does not exist yet.
pub fn queue_stat(addr: SocketAddr, queue: &str, field: &str) -> u64 {
    queue_stats(addr, queue).get(field).copied().unwrap_or(0)
}

/// The one error line (`forkpool-server: ...`) of a refused start, which names `path`.
pub fn one_error_line<'a>(output: &'a str, path: &Path, what: &str) -> &'a str {
    let errors: Vec<&str> = output
        .lines()
        .filter(|line| line.starts_with("forkpool-server:"))
        .collect();
    assert_eq!(errors.len(), 1, "{what}: one error line expected: {output}");
    assert!(
        errors[0].contains(&path.display().to_string()),
        "{what}: the error does not name {}: {}",
        path.display(),
        errors[0]
    );
    errors[0]
}

/// Checks that a server spawned from `builder` is refused at once: exit 1, one error line
/// naming `shown` and containing `cause`, and no temp file (`.NAME.tmp.PID`) left in `dir`.
pub fn refused_at_start(builder: ServerBuilder, dir: &Path, shown: &Path, cause: &str) {
    let mut server = builder.spawn();
    let output = server.wait_refused(cause);
    assert_eq!(
        server.wait_exit(REFUSAL_TIMEOUT).code(),
        Some(1),
        "{output}"
    );
    let error = one_error_line(&output, shown, cause);
    assert!(error.contains(cause), "expected {cause:?} in {error}");
    let leftovers: Vec<String> = std::fs::read_dir(dir)
        .expect("list the directory")
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|name| name.contains(".tmp."))
        .collect();
    assert!(leftovers.is_empty(), "temp files left: {leftovers:?}");
}

/// Asserts that `reply` is the `ERR internal ... restart ...` of a service whose file failed
/// under the running server.
#[track_caller]
pub fn assert_internal(reply: &str) {
    assert!(
        reply.starts_with("ERR internal ") && reply.contains("restart"),
        "{reply}"
    );
}

/// Truncates (or extends) the file at `path` to `len` bytes, as an operator's `truncate -s`.
pub fn truncate_file(path: &Path, len: u64) {
    std::fs::OpenOptions::new()
        .write(true)
        .open(path)
        .expect("open the file")
        .set_len(len)
        .expect("truncate the file");
}

/// Splits a queue reply `JOB <id> <payload>`.
pub fn queue_job(line: &str) -> (u64, String) {
    queue_model::job_reply(line).unwrap_or_else(|e| panic!("expected a job: {e}"))
}

/// The value of one series (name and labels, exactly as printed) in a `/metrics` page.
pub fn metric(page: &str, series: &str) -> f64 {
    page.lines()
        .find_map(|line| line.strip_prefix(series)?.strip_prefix(' '))
        .unwrap_or_else(|| panic!("no {series} in\n{page}"))
        .trim()
        .parse()
        .unwrap_or_else(|_| panic!("{series} is not a number in\n{page}"))
}

/// Sends one HTTP/1.1 request without a body and returns the status code and the body (read
/// until the server closes).
pub fn http_request(addr: SocketAddr, method: &str, path: &str) -> (u16, String) {
    let mut stream = connect(addr);
    write!(
        stream,
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .expect("send the HTTP request");
    let mut response = Vec::new();
    stream
        .read_to_end(&mut response)
        .expect("read the HTTP response");
    let text = String::from_utf8_lossy(&response).into_owned();
    let code = text
        .strip_prefix("HTTP/1.1 ")
        .and_then(|rest| rest.get(..3))
        .and_then(|code| code.parse().ok())
        .unwrap_or_else(|| panic!("not an HTTP response: {text:?}"));
    let body = text
        .split_once("\r\n\r\n")
        .map_or(String::new(), |(_, body)| body.to_string());
    (code, body)
}

/// Runs `forkpool-bench ARGS --json` and returns its parsed report and exit status; panics
/// unless stdout is exactly one JSON object.
pub fn bench_json(args: &[&str]) -> (serde_json::Value, i32) {
    let out = Command::new(binary("forkpool-bench"))
        .args(args)
        .arg("--json")
        .output()
        .expect("forkpool-bench runs");
    let text = String::from_utf8_lossy(&out.stdout);
    let report: serde_json::Value = serde_json::from_str(text.trim_end()).unwrap_or_else(|e| {
        panic!(
            "not one JSON object ({e}): {text}\nstderr: {}",
            String::from_utf8_lossy(&out.stderr)
        )
    });
    assert!(
        report.is_object() && !text.trim_end().contains('\n'),
        "{text}"
    );
    (report, out.status.code().unwrap_or(-1))
}

/// The value at `key` anywhere in a report whose keys are unique (forkpool-bench's are);
/// panics if it is missing.
pub fn json_field<'a>(report: &'a serde_json::Value, key: &str) -> &'a serde_json::Value {
    fn find<'a>(value: &'a serde_json::Value, key: &str) -> Option<&'a serde_json::Value> {
        let object = value.as_object()?;
        object
            .get(key)
            .or_else(|| object.values().find_map(|v| find(v, key)))
    }
    find(report, key).unwrap_or_else(|| panic!("no {key} in {report}"))
}

/// The number at `key` (see [`json_field`]); panics if it is missing or not a number.
pub fn json_number(report: &serde_json::Value, key: &str) -> f64 {
    json_field(report, key)
        .as_f64()
        .unwrap_or_else(|| panic!("{key} is not a number in {report}"))
}

/// Which of `candidates` holds the server end of the loopback connection `client` (IPv4),
/// found through the socket's inode in `/proc/net/tcp` and the candidates' `/proc/<pid>/fd`.
pub fn socket_owner(client: &TcpStream, candidates: &[Pid]) -> Option<Pid> {
    let (server_port, client_port) = (
        client.peer_addr().ok()?.port(),
        client.local_addr().ok()?.port(),
    );
    let port = |field: &str| u16::from_str_radix(field.rsplit(':').next()?, 16).ok();
    let table = std::fs::read_to_string("/proc/net/tcp").ok()?;
    let inode = table.lines().skip(1).find_map(|line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        let (local, remote, inode) = (fields.get(1)?, fields.get(2)?, fields.get(9)?);
        (port(local)? == server_port && port(remote)? == client_port).then(|| inode.to_string())
    })?;
    let target = format!("socket:[{inode}]");
    candidates.iter().copied().find(|pid| {
        std::fs::read_dir(format!("/proc/{pid}/fd")).is_ok_and(|fds| {
            fds.flatten().any(|fd| {
                std::fs::read_link(fd.path()).is_ok_and(|link| link.as_os_str() == target.as_str())
            })
        })
    })
}

/// Pids whose parent is `parent`, from `/proc/<pid>/stat`.
pub fn children_of(parent: Pid) -> Vec<Pid> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(|entry| entry.ok()?.file_name().to_str()?.parse::<i32>().ok())
        .map(Pid::from_raw)
        .filter(|pid| stat_fields(*pid).is_some_and(|(_, ppid)| ppid == parent.as_raw()))
        .collect()
}

/// The state letter of a process (`R`, `S`, `Z`, ...), or `None` if it does not exist.
pub fn process_state(pid: Pid) -> Option<char> {
    stat_fields(pid).map(|(state, _)| state)
}

/// (state, ppid) from `/proc/<pid>/stat`; the command name may contain spaces and parens,
/// so fields are counted from the last `)`.
fn stat_fields(pid: Pid) -> Option<(char, i32)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &stat[stat.rfind(')')? + 1..];
    let mut fields = rest.split_whitespace();
    let state = fields.next()?.chars().next()?;
    let ppid = fields.next()?.parse().ok()?;
    Some((state, ppid))
}

/// True while the process exists and is not a zombie.
pub fn is_alive(pid: Pid) -> bool {
    process_state(pid).is_some_and(|state| state != 'Z')
}

/// Checks a `/metrics` page with `promtool check metrics` (when promtool is installed, see
/// [`tool`]); panics with promtool's complaints and the page.
pub fn check_with_promtool(page: &str) {
    let Some(promtool) = tool("promtool") else {
        return;
    };
    let mut check = Command::new(promtool)
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool runs");
    check
        .stdin
        .take()
        .expect("stdin is piped")
        .write_all(page.as_bytes())
        .expect("feed promtool");
    let out = check.wait_with_output().expect("promtool finishes");
    assert!(
        out.status.success(),
        "promtool check metrics failed:\n{}{}\n{page}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The path of an external tool a test needs, or `None` (the test then does nothing) when
/// it is missing outside CI. Under CI (`CI` set) a missing tool fails the test: `.ci/run`
/// installs every tool the tests use.
pub fn tool(name: &str) -> Option<PathBuf> {
    let found = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|dir| dir.join(name))
            .find(|path| path.is_file())
    });
    if found.is_none() {
        missing_tool(name);
    }
    found
}

/// Says that a test cannot run because `what` is not installed: a failure under `CI` (whose
/// `.ci/run` installs it), a note elsewhere (the caller then skips the test).
pub fn missing_tool(what: &str) {
    assert!(
        std::env::var_os("CI").is_none(),
        "{what} is not installed; .ci/run should have installed it"
    );
    eprintln!("skipping: {what} is not installed");
}

/// A small deterministic generator (splitmix64): fixed seeds make the load reproducible.
pub struct Rng(pub u64);

impl Rng {
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform enough in 0..n for a test load.
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }
}

/// One transfer of a bank load, between two accounts given by index.
#[derive(Debug, Clone, Copy)]
pub struct Transfer {
    pub from: usize,
    pub to: usize,
    pub amount: u64,
}

impl Transfer {
    /// What this transfer, if applied, does to `account`'s balance.
    pub fn delta(&self, account: usize) -> i128 {
        let amount = i128::from(self.amount);
        if account == self.from {
            -amount
        } else if account == self.to {
            amount
        } else {
            0
        }
    }
}

/// The size of a subset of `items` that sums to `target`, if there is one (the smallest):
/// which transfers of unknown outcome (cut by a kill) explain an account's balance.
pub fn subset_reaching(items: &[i128], target: i128) -> Option<usize> {
    assert!(
        items.len() <= 20,
        "{} unknown transfers on one account: too many to search",
        items.len()
    );
    // Every subset sum, with the smallest subset that reaches it.
    let mut sums = HashMap::from([(0i128, 0usize)]);
    for &item in items {
        let extended: Vec<(i128, usize)> = sums
            .iter()
            .map(|(&sum, &size)| (sum + item, size + 1))
            .collect();
        for (sum, size) in extended {
            let best = sums.entry(sum).or_insert(size);
            *best = (*best).min(size);
        }
    }
    sums.get(&target).copied()
}

/// The `strace` command line (a [`ServerBuilder::wrapper`]) whose trace, written to
/// `trace`, the reply-order checks below read: every process, the log writes, the flushes
/// and the replies.
pub fn fsync_trace_wrapper(strace: &Path, trace: &Path) -> Vec<String> {
    let path = |p: &Path| p.to_str().expect("a UTF-8 path").to_string();
    let flags = ["-DD", "-f", "-qq", "-s", "32", "-e"];
    let mut args = vec![path(strace)];
    args.extend(flags.iter().map(|f| f.to_string()));
    args.push("trace=pwrite64,fdatasync,write,sendto".into());
    args.extend(["-o".to_string(), path(trace)]);
    args
}

/// How many reply writes an `strace -f -e trace=pwrite64,fdatasync,write,sendto` trace shows
/// (`--fsync always` tests).
pub fn replies_in(trace: &str) -> usize {
    trace.lines().filter(|line| is_reply(line)).count()
}

/// A bank or queue reply that reports success (`OK ...`, a bare `OK`, `JOB ...`) in an
/// `strace` line.
fn is_reply(line: &str) -> bool {
    (line.contains("sendto(") || line.contains(" write("))
        && [", \"OK ", ", \"OK\\n", ", \"JOB "]
            .iter()
            .any(|reply| line.contains(reply))
}

/// Checks, in such a trace, that before each reply write an `fdatasync` that started after
/// the last log write (`pwrite64`) completed has returned. Returns how many replies it checked.
pub fn check_reply_order(trace: &str) -> usize {
    check_reply_order_except(trace, &[])
}

/// [`check_reply_order`], skipping the reply writes that contain one of `skip`: a reply that
/// may rightly leave before a log write just before it is flushed, because it does not
/// depend on it (another connection's record appended meanwhile).
pub fn check_reply_order_except(trace: &str, skip: &[&str]) -> usize {
    let mut last_log_write = None;
    // Per thread: the line where its unfinished fdatasync started.
    let mut syncing = std::collections::HashMap::new();
    let mut newest_sync_done_started_at = None;
    let mut replies = 0;
    for (i, line) in trace.lines().enumerate() {
        let thread = line.split_whitespace().next().unwrap_or_default();
        let log_write_done = (line.contains("pwrite64(") && !line.contains("<unfinished"))
            || line.contains("<... pwrite64 resumed>");
        if log_write_done {
            last_log_write = Some(i);
        } else if line.contains("fdatasync(") && line.contains("<unfinished") {
            syncing.insert(thread.to_string(), i);
        } else if line.contains("fdatasync(") && line.trim_end().ends_with("= 0") {
            newest_sync_done_started_at = newest_sync_done_started_at.max(Some(i));
        } else if line.contains("<... fdatasync resumed>") && line.trim_end().ends_with("= 0") {
            let started = syncing.remove(thread).unwrap_or(i);
            newest_sync_done_started_at = newest_sync_done_started_at.max(Some(started));
        } else if is_reply(line) && !skip.iter().any(|s| line.contains(s)) {
            replies += 1;
            assert!(
                newest_sync_done_started_at > last_log_write,
                "line {}: a reply written before an fdatasync covered the log write at line \
                 {last_log_write:?}:\n{line}\n{trace}",
                i + 1
            );
        }
    }
    replies
}

#[cfg(test)]
mod tests {
    /// Every phrase of [`super::log_phrase`] is written by the server: it appears in a
    /// source file of `server/src` (phrases built from a format string appear as they are
    /// in it).
    #[test]
    fn log_phrases_are_the_servers() {
        fn read_tree(dir: &std::path::Path, into: &mut String) {
            for entry in std::fs::read_dir(dir)
                .expect("a source directory")
                .flatten()
            {
                let path = entry.path();
                if path.is_dir() {
                    read_tree(&path, into);
                } else if let Ok(text) = std::fs::read_to_string(&path) {
                    into.push_str(&text);
                }
            }
        }
        let mut source = String::new();
        read_tree(
            &std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../server/src"),
            &mut source,
        );
        for phrase in super::log_phrase::ALL {
            assert!(source.contains(phrase), "the server never logs {phrase:?}");
        }
    }
}
