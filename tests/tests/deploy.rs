//! The deploy files, proven without running systemd (it cannot be PID 1 here): the service
//! unit's sandbox rates "OK" in `systemd-analyze security`, every unit file passes
//! `systemd-analyze verify`, and every system call the real server makes (under strace, through
//! start, echo, bank, the status page, TTIN, TTOU, HUP and a USR2 upgrade) is allowed by the
//! unit's own `SystemCallFilter=`.

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use forkpool_testkit::{
    binary, http_request, is_alive, request_line, tool, wait_until, Server, Signal,
};
use nix::sys::signal::kill;
use nix::unistd::Pid;

/// The directory of the unit files and the example settings.
const DEPLOY_DIR: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy");
/// The service unit, the one `systemd-analyze security` rates.
const SERVICE_UNIT: &str = "forkpool.service";
/// Highest overall exposure accepted: systemd calls 0 to 2 "OK" (then MEDIUM, EXPOSED, UNSAFE).
const MAX_EXPOSURE: f64 = 2.0;
/// The unit's ExecStart program; verify needs it to exist.
const INSTALLED_BINARY: &str = "/usr/local/bin/forkpool-server";
/// How long each step of the traced run may take (strace slows every system call).
const TRACED_STEP: Duration = Duration::from_secs(30);

fn deploy_file(name: &str) -> PathBuf {
    Path::new(DEPLOY_DIR).join(name)
}

/// Runs a command; returns its exit status and everything it printed.
fn run(program: &Path, args: &[&str]) -> (bool, String) {
    let out = Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{} runs: {e}", program.display()));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

#[test]
fn the_service_unit_is_rated_ok_by_systemd_analyze_security() {
    let Some(analyze) = tool("systemd-analyze") else {
        return;
    };
    let unit = deploy_file(SERVICE_UNIT);
    let unit = unit.to_str().expect("a UTF-8 path");
    let (_, report) = run(&analyze, &["security", "--offline=yes", "--no-pager", unit]);
    let exposure: f64 = report
        .lines()
        .find_map(|line| line.split_once(&format!("Overall exposure level for {SERVICE_UNIT}: ")))
        .and_then(|(_, rest)| rest.split_whitespace().next()?.parse().ok())
        .unwrap_or_else(|| panic!("no overall exposure in:\n{report}"));
    eprintln!("{SERVICE_UNIT}: overall exposure {exposure}");
    assert!(
        exposure <= MAX_EXPOSURE,
        "exposure {exposure} > {MAX_EXPOSURE}:\n{report}"
    );
}

/// `verify` also checks that ExecStart's program exists, and the binary is not installed on a
/// build machine: it verifies copies of the unit files (same names, so the socket units find
/// their service) whose only change is ExecStart naming the binary just built. Any warning
/// (an unknown or misspelt setting is only a warning) fails the test.
#[test]
fn every_unit_file_passes_systemd_analyze_verify() {
    let Some(analyze) = tool("systemd-analyze") else {
        return;
    };
    let copies = tempfile::tempdir().expect("a temporary directory");
    let built = binary("forkpool-server");
    let mut units = Vec::new();
    for entry in std::fs::read_dir(DEPLOY_DIR).expect("deploy/ is readable") {
        let path = entry.expect("a directory entry").path();
        let is_unit = path
            .extension()
            .is_some_and(|ext| ext == "service" || ext == "socket");
        if !is_unit {
            continue;
        }
        let text = std::fs::read_to_string(&path).expect("a unit file is readable");
        let start = format!("ExecStart={INSTALLED_BINARY} ");
        let text = if path.extension().is_some_and(|ext| ext == "service") {
            assert!(
                text.contains(&start),
                "{} runs {INSTALLED_BINARY}",
                path.display()
            );
            text.replace(&start, &format!("ExecStart={} ", built.display()))
        } else {
            text
        };
        let copy = copies.path().join(path.file_name().expect("a file name"));
        std::fs::write(&copy, text).expect("write a unit copy");
        units.push(copy.display().to_string());
    }
    units.sort();
    assert!(
        units.len() >= 3,
        "the service and its two sockets: {units:?}"
    );
    let mut args = vec!["verify"];
    args.extend(units.iter().map(String::as_str));
    let (ok, output) = run(&analyze, &args);
    assert!(
        ok && output.trim().is_empty(),
        "systemd-analyze verify {units:?}:\n{output}"
    );
}

#[test]
fn every_system_call_the_server_makes_is_allowed_by_the_units_filter() {
    let (Some(strace), Some(analyze)) = (tool("strace"), tool("systemd-analyze")) else {
        return;
    };
    let unit = std::fs::read_to_string(deploy_file(SERVICE_UNIT)).expect("the unit is readable");
    let allowed = SyscallGroups::new(analyze).allowed_by(&unit);
    let made = traced_run(&strace);
    // The run did exercise what the sandbox must keep allowed (a trace that missed them would
    // prove nothing): fork, re-exec, the file limit, the parent-death signal, the ledger and its log.
    for needed in [
        "clone",
        "execve",
        "prlimit64",
        "prctl",
        "fallocate",
        "fdatasync",
        "flock",
        "accept4",
    ] {
        assert!(
            made.contains(needed),
            "{needed} missing from the trace: {made:?}"
        );
    }
    let refused: Vec<&String> = made.difference(&allowed).collect();
    assert!(
        refused.is_empty(),
        "system calls the server makes that the unit's SystemCallFilter refuses: {refused:?}"
    );
    eprintln!("{} distinct system calls, all allowed", made.len());
}

/// Runs the server under `strace -f -c` through everything it does in production and returns
/// the names of the system calls its processes made. `-DD` runs strace as a detached
/// grandchild, so the traced server keeps the pid the harness started (its ready line must
/// name it) and strace survives the harness killing the server's process group.
fn traced_run(strace: &Path) -> BTreeSet<String> {
    let dir = Arc::new(tempfile::tempdir().expect("a temporary directory"));
    let summary = dir.path().join("strace.txt");
    let config = dir.path().join("forkpool.toml");
    std::fs::write(&config, "workers = 2\n").expect("write the config file");
    let pid_file = dir.path().join("forkpool.pid");
    let path = |p: &Path| p.to_str().expect("a UTF-8 path").to_string();
    let mut server = Server::builder()
        .data_dir(Arc::clone(&dir))
        .wrapper([
            path(strace),
            "-DD".into(),
            "-f".into(),
            "-qq".into(),
            "-c".into(),
            "-o".into(),
            path(&summary),
        ])
        .without_default("--workers")
        .args(["--config", &path(&config), "--pid-file", &path(&pid_file)])
        .args(["--fsync", "always", "--status-addr", "127.0.0.1:0"])
        .start();
    serve_once(&server);
    let (status, _) = http_request(server.status_addr(), "GET", "/metrics");
    assert_eq!(status, 200);
    server.signal(Signal::SIGTTIN);
    server.wait_settled(3, TRACED_STEP);
    server.signal(Signal::SIGTTOU);
    let before_reload = server.wait_settled(2, TRACED_STEP);
    std::fs::write(&config, "workers = 2\nidle_timeout = 100\n").expect("rewrite the config");
    server.signal(Signal::SIGHUP);
    wait_until("the reload to replace both workers", TRACED_STEP, || {
        let now = server.workers();
        (now.len() == 2 && now.iter().all(|w| !before_reload.contains(w))).then_some(())
    });
    serve_once(&server);
    server.signal(Signal::SIGUSR2);
    let ready = server.next_ready_line(TRACED_STEP);
    let new_master = ready
        .split_whitespace()
        .find_map(|field| field.strip_prefix("pid="))
        .and_then(|pid| pid.parse().ok())
        .map(Pid::from_raw)
        .unwrap_or_else(|| panic!("no pid in {ready:?}"));
    assert!(
        server.wait_exit(TRACED_STEP).success(),
        "the old master drains"
    );
    serve_once(&server);
    kill(new_master, Signal::SIGTERM).expect("stop the new master");
    wait_until("the new master to exit", TRACED_STEP, || {
        (!is_alive(new_master)).then_some(())
    });
    // strace writes its summary once the last traced process is gone.
    let table = wait_until("strace's summary", TRACED_STEP, || {
        let text = std::fs::read_to_string(&summary).ok()?;
        text.lines()
            .any(|line| line.ends_with(" total"))
            .then_some(text)
    });
    syscalls_of_summary(&table)
}

/// One echo line and a round of bank requests, successful and failed.
fn serve_once(server: &Server) {
    let mut echo = server.connect_echo();
    assert_eq!(request_line(&mut echo, "traced"), "TRACED");
    let mut bank = server.connect_bank();
    for request in [
        "DEPOSIT traced 10",
        "TRANSFER traced other 3",
        "WITHDRAW other 1",
        "BALANCE traced",
        "WITHDRAW traced 1000",
        "AUDIT",
    ] {
        assert!(!request_line(&mut bank, request).is_empty(), "{request}");
    }
    assert_eq!(request_line(&mut bank, "QUIT"), "BYE");
}

/// The system call names of a `strace -c` table (the last column of each row between the
/// dashed rules).
fn syscalls_of_summary(table: &str) -> BTreeSet<String> {
    table
        .lines()
        .skip_while(|line| !line.starts_with("------"))
        .skip(1)
        .take_while(|line| !line.starts_with("------"))
        .filter_map(|line| line.split_whitespace().last())
        .map(str::to_string)
        .collect()
}

/// systemd's system call groups (`@system-service`, ...), expanded through
/// `systemd-analyze syscall-filter`, so the test follows the local systemd's definition.
struct SyscallGroups {
    analyze: PathBuf,
    expanded: HashMap<String, BTreeSet<String>>,
}

impl SyscallGroups {
    fn new(analyze: PathBuf) -> Self {
        SyscallGroups {
            analyze,
            expanded: HashMap::new(),
        }
    }

    /// The calls a unit's `SystemCallFilter=` lines allow: the first line is an allow list,
    /// each later one adds to it, or (starting with `~`) takes away from it.
    fn allowed_by(&mut self, unit: &str) -> BTreeSet<String> {
        let filters: Vec<&str> = unit
            .lines()
            .filter_map(|line| line.strip_prefix("SystemCallFilter="))
            .collect();
        assert!(
            filters.first().is_some_and(|first| !first.starts_with('~')),
            "the unit's SystemCallFilter starts with an allow list: {filters:?}"
        );
        let mut allowed = BTreeSet::new();
        for filter in filters {
            let (deny, names) = match filter.strip_prefix('~') {
                Some(names) => (true, names),
                None => (false, filter),
            };
            for name in names.split_whitespace() {
                // `name:errno` sets the error number for that entry only.
                let name = name.split(':').next().unwrap_or(name);
                let calls = self.expand(name);
                if deny {
                    allowed.retain(|call| !calls.contains(call));
                } else {
                    allowed.extend(calls);
                }
            }
        }
        allowed
    }

    /// A call's own name, or every call of a group (nested groups included).
    fn expand(&mut self, name: &str) -> BTreeSet<String> {
        if !name.starts_with('@') {
            return BTreeSet::from([name.to_string()]);
        }
        if let Some(calls) = self.expanded.get(name) {
            return calls.clone();
        }
        let (ok, listing) = run(&self.analyze, &["syscall-filter", name]);
        assert!(ok, "systemd-analyze syscall-filter {name}:\n{listing}");
        let mut calls = BTreeSet::new();
        for entry in listing
            .lines()
            .filter(|line| line.starts_with(' '))
            .map(str::trim)
            .filter(|entry| !entry.is_empty() && !entry.starts_with('#'))
        {
            calls.extend(self.expand(entry));
        }
        assert!(!calls.is_empty(), "group {name} lists no call:\n{listing}");
        self.expanded.insert(name.to_string(), calls.clone());
        calls
    }
}
