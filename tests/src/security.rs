//! Helpers of the security tests: users made with `forkpool-server gen-token`, a server
//! with a users file, AUTH, and `openssl s_client` as a TLS client, one-shot or line by line.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::{mpsc, Arc};
use std::time::Duration;

use crate::{binary, request_line, Server};

/// A user made with `forkpool-server gen-token`: its token and its users-file entry.
pub struct NewUser {
    pub token: String,
    pub entry: String,
}

/// Makes a user named `name` with `rights` (`read` or `write`).
pub fn gen_token(name: &str, rights: &str) -> NewUser {
    let out = Command::new(binary("forkpool-server"))
        .args(["gen-token", name, "--rights", rights])
        .output()
        .expect("forkpool-server gen-token runs");
    assert!(out.status.success(), "{out:?}");
    let text = String::from_utf8(out.stdout).expect("UTF-8");
    let token = text
        .lines()
        .find_map(|line| line.strip_prefix("token: "))
        .expect("a token line")
        .to_string();
    assert!(token.len() >= 32, "at least 128 bits: {token}");
    let entry = text
        .lines()
        .filter(|line| !line.starts_with("token: ") && !line.starts_with('#'))
        .map(|line| format!("{line}\n"))
        .collect();
    NewUser { token, entry }
}

/// A one-worker server (with its status page) whose users file has `alice` (write, with
/// `alice_extra`: her `debit` or `queues` lines), `reader` (read) and `admin` (write,
/// everything), and the three tokens.
pub struct WithUsers {
    pub server: Server,
    pub dir: Arc<tempfile::TempDir>,
    pub users_file: PathBuf,
    pub alice: String,
    pub reader: String,
    pub admin: String,
}

/// Starts a [`WithUsers`] server with `extra` settings.
pub fn server_with_users(alice_extra: &str, extra: &[&str]) -> WithUsers {
    let dir = Arc::new(tempfile::tempdir().expect("a temporary directory"));
    let (alice, reader, admin) = (
        gen_token("alice", "write"),
        gen_token("reader", "read"),
        gen_token("admin", "write"),
    );
    let users = format!(
        "{}{alice_extra}\n{}\n{}",
        alice.entry, reader.entry, admin.entry
    );
    let users_file = dir.path().join("users.toml");
    std::fs::write(&users_file, users).expect("write the users file");
    let server = Server::builder()
        .data_dir(Arc::clone(&dir))
        .args(["--workers", "1", "--users-file"])
        .args([users_file.display().to_string()])
        .args(["--status-addr", "127.0.0.1:0"])
        .args(extra.iter().copied())
        .start();
    WithUsers {
        server,
        dir,
        users_file,
        alice: alice.token,
        reader: reader.token,
        admin: admin.token,
    }
}

/// Starts a server with `args` that must refuse to start (protected mode); returns the one
/// line it printed on stderr.
pub fn refusal_line(args: &[&str]) -> String {
    let mut server = Server::builder().args(args.iter().copied()).spawn();
    let output = server.wait_refused(&args.join(" "));
    let errors: Vec<&str> = output
        .lines()
        .filter(|l| l.starts_with("forkpool-server:"))
        .collect();
    assert_eq!(errors.len(), 1, "{output}");
    errors[0].to_string()
}

/// Sends `AUTH user token` and returns the reply line.
pub fn auth(stream: &mut TcpStream, user: &str, token: &str) -> String {
    request_line(stream, &format!("AUTH {user} {token}"))
}

fn s_client_command(openssl: &Path, addr: SocketAddr, extra: &[&str]) -> Command {
    let mut command = Command::new(openssl);
    command
        .args(["s_client", "-connect", &addr.to_string(), "-quiet"])
        .args(["-verify_return_error", "-no_ign_eof"])
        .args(extra)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null());
    command
}

/// Runs `openssl s_client` against `addr`, sends `input` and reads until `expect_bytes` of
/// replies have come (s_client quits at its stdin's EOF without waiting for them) or it
/// ends by itself (a refused handshake); returns (success, what it printed).
pub fn s_client(
    openssl: &Path,
    addr: SocketAddr,
    extra: &[&str],
    input: &[u8],
    expect_bytes: usize,
) -> (bool, String) {
    let mut child = s_client_command(openssl, addr, extra)
        .spawn()
        .expect("openssl s_client starts");
    let mut stdin = child.stdin.take().expect("piped stdin");
    let _ = stdin.write_all(input);
    let mut stdout = child.stdout.take().expect("piped stdout");
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    while got.len() < expect_bytes {
        match stdout.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => got.extend_from_slice(&buf[..n]),
        }
    }
    drop(stdin);
    let status = child.wait().expect("openssl s_client ends");
    (status.success(), String::from_utf8_lossy(&got).into_owned())
}

/// An `openssl s_client` session driven line by line (killed and reaped when dropped).
pub struct TlsLines {
    child: Child,
    stdin: Option<ChildStdin>,
    /// Lines printed, from a reader thread; closed at s_client's end of output.
    lines: mpsc::Receiver<String>,
}

impl TlsLines {
    /// Connects to `addr` (`extra`: s_client's trust options).
    pub fn connect(openssl: &Path, addr: SocketAddr, extra: &[&str]) -> TlsLines {
        let mut child = s_client_command(openssl, addr, extra)
            .spawn()
            .expect("openssl s_client starts");
        let stdin = child.stdin.take();
        let stdout = child.stdout.take().expect("piped stdout");
        let (send, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if send.send(line).is_err() {
                    break;
                }
            }
        });
        TlsLines {
            child,
            stdin,
            lines,
        }
    }

    /// Sends `line` and a newline.
    pub fn send(&mut self, line: &str) {
        let stdin = self.stdin.as_mut().expect("stdin open");
        stdin
            .write_all(format!("{line}\n").as_bytes())
            .expect("send to s_client");
        stdin.flush().expect("flush to s_client");
    }

    /// The next line within `timeout`, or `None` once the server closed.
    pub fn next_line(&mut self, timeout: Duration) -> Option<String> {
        match self.lines.recv_timeout(timeout) {
            Ok(line) => Some(line),
            Err(mpsc::RecvTimeoutError::Disconnected) => None,
            Err(mpsc::RecvTimeoutError::Timeout) => panic!("no line from s_client in {timeout:?}"),
        }
    }

    /// Sends `line` and returns the reply line.
    pub fn request(&mut self, line: &str, timeout: Duration) -> String {
        self.send(line);
        self.next_line(timeout)
            .unwrap_or_else(|| panic!("{line}: the server closed"))
    }
}

impl Drop for TlsLines {
    fn drop(&mut self) {
        drop(self.stdin.take());
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
