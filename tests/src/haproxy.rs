//! HAProxy in front of forkpool instances, for the tests: Debian's `haproxy` run in the
//! foreground (`-db`) in its own process group, with a configuration made like
//! `deploy/haproxy.cfg` (TCP mode, the PROXY protocol to the instances, the same health
//! checks, TLS toward the instances if asked), a loopback port per frontend, and an admin socket to read the servers' states
//! and drain one. Dropping it kills the group and reaps it, also when a test panics.
//!
//! HAProxy cannot report a port it bound on `:0`: each frontend's port is found free by
//! binding it once, and a start that loses that race (another test took the port meanwhile)
//! is retried with new ports.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener};
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;

use crate::{tool, wait_until};

/// How long HAProxy may take to answer on its admin socket.
const START_TIMEOUT: Duration = Duration::from_secs(20);
/// Starts that lose their ports to another process before HAProxy binds them.
const START_TRIES: usize = 5;

/// Which PROXY protocol header HAProxy sends to a backend's servers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SendProxy {
    V1,
    V2,
}

/// A forkpool service behind HAProxy: a frontend on loopback and a backend of `servers`.
#[derive(Debug, Clone)]
pub struct Service {
    /// `echo` or `bank`: the health check and the section names.
    pub name: &'static str,
    pub servers: Vec<SocketAddr>,
    pub send_proxy: SendProxy,
    /// TLS toward the servers, their certificates checked against this CA (and the name
    /// `localhost`), as deploy/haproxy.cfg's bank backend; `None`: plain text.
    pub tls_ca: Option<PathBuf>,
}

/// A running HAProxy (see the module docs).
pub struct Haproxy {
    child: Child,
    dir: tempfile::TempDir,
    frontends: Vec<(&'static str, SocketAddr)>,
    output: Arc<Mutex<Vec<String>>>,
}

impl Haproxy {
    /// Starts HAProxy for `services` and waits until it answers on its admin socket;
    /// `None` if haproxy is not installed (a failure under `CI`).
    pub fn start(services: &[Service]) -> Option<Haproxy> {
        let binary = tool("haproxy")?;
        for _ in 0..START_TRIES {
            if let Some(haproxy) = Haproxy::try_start(&binary, services) {
                return Some(haproxy);
            }
        }
        panic!("haproxy did not start in {START_TRIES} tries");
    }

    fn try_start(binary: &PathBuf, services: &[Service]) -> Option<Haproxy> {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let frontends: Vec<(&'static str, SocketAddr)> = services
            .iter()
            .map(|service| (service.name, free_port()))
            .collect();
        let config = dir.path().join("haproxy.cfg");
        let admin = dir.path().join("admin.sock");
        std::fs::write(&config, configuration(services, &frontends, &admin))
            .expect("write haproxy.cfg");
        let mut child = Command::new(binary)
            .arg("-db")
            .arg("-f")
            .arg(&config)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0)
            .spawn()
            .expect("haproxy starts");
        let output = Arc::new(Mutex::new(Vec::new()));
        for stream in [
            child
                .stdout
                .take()
                .map(|s| Box::new(s) as Box<dyn Read + Send>),
            child
                .stderr
                .take()
                .map(|s| Box::new(s) as Box<dyn Read + Send>),
        ]
        .into_iter()
        .flatten()
        {
            let output = Arc::clone(&output);
            std::thread::spawn(move || {
                for line in BufReader::new(stream).lines().map_while(Result::ok) {
                    if let Ok(mut lines) = output.lock() {
                        lines.push(line);
                    }
                }
            });
        }
        let mut haproxy = Haproxy {
            child,
            dir,
            frontends,
            output,
        };
        let started = wait_until("haproxy to answer or exit", START_TIMEOUT, || {
            if matches!(haproxy.child.try_wait(), Ok(Some(_))) {
                return Some(false);
            }
            haproxy.try_command("show info").map(|_| true)
        });
        if started {
            return Some(haproxy);
        }
        let output = haproxy.output();
        assert!(
            output.contains("cannot bind") || output.contains("Address already in use"),
            "haproxy exited:\n{output}"
        );
        None
    }

    /// The loopback address of `service`'s frontend.
    pub fn addr(&self, service: &str) -> SocketAddr {
        self.frontends
            .iter()
            .find(|(name, _)| *name == service)
            .map(|(_, addr)| *addr)
            .unwrap_or_else(|| panic!("no frontend {service}"))
    }

    /// Everything HAProxy printed so far (its log goes to stdout).
    pub fn output(&self) -> String {
        self.output
            .lock()
            .map(|lines| lines.join("\n"))
            .unwrap_or_default()
    }

    /// Runs an admin command (e.g. `set server bank/s0 state drain`) and returns its answer.
    pub fn command(&self, command: &str) -> String {
        self.try_command(command)
            .unwrap_or_else(|| panic!("the admin socket does not answer {command:?}"))
    }

    fn try_command(&self, command: &str) -> Option<String> {
        let mut socket = UnixStream::connect(self.dir.path().join("admin.sock")).ok()?;
        socket.set_read_timeout(Some(START_TIMEOUT)).ok()?;
        socket.write_all(format!("{command}\n").as_bytes()).ok()?;
        let mut answer = String::new();
        socket.read_to_string(&mut answer).ok()?;
        Some(answer)
    }

    /// The check status (`UP`, `DOWN`, `DRAIN`, `MAINT`, ...) of each server of `service`'s
    /// backend, in order (`s0`, `s1`, ...), from `show stat`.
    pub fn server_states(&self, service: &str) -> Vec<String> {
        let stat = self.command("show stat");
        let mut lines = stat.lines();
        let header: Vec<&str> = lines
            .next()
            .unwrap_or_default()
            .trim_start_matches("# ")
            .split(',')
            .collect();
        let column = |name: &str| header.iter().position(|&c| c == name);
        let (Some(proxy), Some(server), Some(status)) =
            (column("pxname"), column("svname"), column("status"))
        else {
            panic!("show stat has no pxname/svname/status columns:\n{stat}");
        };
        lines
            .map(|line| line.split(',').collect::<Vec<_>>())
            .filter(|fields| {
                fields.get(proxy) == Some(&service)
                    && !matches!(fields.get(server), Some(&("FRONTEND" | "BACKEND")))
            })
            .map(|fields| fields.get(status).unwrap_or(&"").to_string())
            .collect()
    }

    /// Waits until every server of `service`'s backend passes its health check.
    pub fn wait_all_up(&self, service: &str, timeout: Duration) {
        wait_until(
            &format!("every {service} server UP in haproxy"),
            timeout,
            || {
                let states = self.server_states(service);
                (!states.is_empty() && states.iter().all(|state| state == "UP")).then_some(())
            },
        );
    }
}

impl Drop for Haproxy {
    fn drop(&mut self) {
        let _ = killpg(Pid::from_raw(self.child.id() as i32), Signal::SIGKILL);
        let _ = self.child.wait();
    }
}

/// A loopback port nothing listens on right now.
fn free_port() -> SocketAddr {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .expect("a free loopback port")
}

/// The configuration: as `deploy/haproxy.cfg`, with loopback addresses and quick checks.
fn configuration(
    services: &[Service],
    frontends: &[(&'static str, SocketAddr)],
    admin: &std::path::Path,
) -> String {
    let mut text = format!(
        "global\n\
         \x20   log stdout format raw local0 info\n\
         \x20   stats socket {} level admin\n\
         defaults\n\
         \x20   mode tcp\n\
         \x20   log global\n\
         \x20   option tcplog\n\
         \x20   timeout connect 2s\n\
         \x20   timeout client 60s\n\
         \x20   timeout server 60s\n\
         \x20   timeout check 2s\n\
         \x20   retries 3\n\
         \x20   option redispatch 1\n",
        admin.display()
    );
    for (service, (_, addr)) in services.iter().zip(frontends) {
        let (send, expect) = match service.name {
            "bank" => ("PING", "PONG"),
            _ => ("health", "HEALTH"),
        };
        let send_proxy = match service.send_proxy {
            SendProxy::V1 => "send-proxy",
            SendProxy::V2 => "send-proxy-v2",
        };
        let tls = service.tls_ca.as_ref().map_or_else(String::new, |ca| {
            format!(
                " ssl verify required ca-file {} verifyhost localhost",
                ca.display()
            )
        });
        text += &format!(
            "frontend {name}\n\
             \x20   bind {addr}\n\
             \x20   default_backend {name}\n\
             backend {name}\n\
             \x20   balance roundrobin\n\
             \x20   option tcp-check\n\
             \x20   tcp-check send \"{send}\\n\"\n\
             \x20   tcp-check expect string {expect}\n\
             \x20   default-server check inter 200ms fall 1 rise 1 {send_proxy}{tls}\n",
            name = service.name
        );
        for (index, server) in service.servers.iter().enumerate() {
            text += &format!("    server s{index} {server}\n");
        }
    }
    text
}
