//! A throwaway PostgreSQL cluster for the tests: one per test binary, started on first use,
//! a fresh database per test, killed and removed when the test binary exits.
//!
//! The binaries come from Debian's `postgresql` package (`/usr/lib/postgresql/<version>/bin`,
//! not on PATH; the newest version installed is used). `initdb` and `postgres` refuse to run
//! as root, and CI runs as root: then they run as the `postgres` user the package creates,
//! with the data and socket directories in a temporary directory that user owns (mode 0700,
//! under /tmp, which it can traverse). The server listens on a Unix socket only
//! (`listen_addresses = ''`).
//!
//! No leak, however the binary ends: the postmaster leads its own process group and gets
//! SIGKILL when the thread that started it dies (`PR_SET_PDEATHSIG`; that thread lives as
//! long as the process), its backends exit when they see the postmaster gone, and an
//! `atexit` handler kills the group and removes the directories on a normal exit.

use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{mpsc, Mutex, OnceLock};
use std::time::Duration;

use nix::sys::signal::{killpg, Signal};
use nix::unistd::{Pid, User};

use crate::{missing_tool, wait_until};

/// Where Debian installs the server binaries, one directory per major version.
const PG_LIB_DIR: &str = "/usr/lib/postgresql";
/// The port number names the socket file (`.s.PGSQL.<port>`); nothing listens on TCP.
const PORT: u16 = 5432;
/// How long a fresh cluster may take to accept connections.
const START_TIMEOUT: Duration = Duration::from_secs(60);
/// Connections the cluster accepts (pools of several tests at once, plus pgbench).
const MAX_CONNECTIONS: u32 = 300;

/// The running cluster (see the module docs).
pub struct PgCluster {
    bin: PathBuf,
    /// The temporary directory holding `data/` and `sock/`, owned by the server's user.
    root: PathBuf,
    /// The user the server runs as (`None`: this process's own).
    run_as: Option<User>,
    /// The postmaster, while it runs (its pid is its process group).
    postmaster: Mutex<Option<Child>>,
    /// Starts postmasters from a thread that lives as long as the process.
    starter: Mutex<mpsc::Sender<mpsc::Sender<std::io::Result<Child>>>>,
}

static CLUSTER: OnceLock<Option<PgCluster>> = OnceLock::new();

/// The cluster of this test binary, started on first use; `None` (after a note, and a failure
/// under `CI`) when PostgreSQL is not installed.
pub fn postgres() -> Option<&'static PgCluster> {
    CLUSTER
        .get_or_init(|| {
            let bin = pg_bin_dir()?;
            let cluster = PgCluster::init(bin);
            // SAFETY: `kill_cluster` is an `extern "C" fn()` with no arguments, as atexit
            // requires; registering it has no other precondition.
            unsafe { libc::atexit(kill_cluster) };
            cluster.start();
            Some(cluster)
        })
        .as_ref()
}

/// The `bin` directory of the newest PostgreSQL installed.
fn pg_bin_dir() -> Option<PathBuf> {
    let newest = std::fs::read_dir(PG_LIB_DIR)
        .ok()?
        .flatten()
        .filter_map(|entry| {
            let version: u32 = entry.file_name().to_str()?.parse().ok()?;
            let bin = entry.path().join("bin");
            bin.join("initdb").is_file().then_some((version, bin))
        })
        .max_by_key(|(version, _)| *version)
        .map(|(_, bin)| bin);
    if newest.is_none() {
        missing_tool("postgresql (initdb under /usr/lib/postgresql/<version>/bin)");
    }
    newest
}

extern "C" fn kill_cluster() {
    if let Some(Some(cluster)) = CLUSTER.get() {
        cluster.kill();
        let _ = std::fs::remove_dir_all(&cluster.root);
    }
}

impl PgCluster {
    /// Makes the directories and runs initdb.
    fn init(bin: PathBuf) -> PgCluster {
        let run_as = nix::unistd::geteuid().is_root().then(|| {
            User::from_name("postgres")
                .expect("the user database is readable")
                .expect("the postgresql package creates the postgres user")
        });
        let root = tempfile::Builder::new()
            .prefix("forkpool-pg-")
            .tempdir_in("/tmp")
            .expect("a temporary directory in /tmp")
            .keep();
        for dir in [root.clone(), root.join("data"), root.join("sock")] {
            std::fs::create_dir_all(&dir).expect("create the cluster's directories");
            std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700))
                .expect("chmod the cluster's directories");
            if let Some(user) = &run_as {
                nix::unistd::chown(&dir, Some(user.uid), Some(user.gid))
                    .expect("chown the cluster's directories to postgres");
            }
        }
        let (starter, requests) = mpsc::channel::<mpsc::Sender<std::io::Result<Child>>>();
        let cluster = PgCluster {
            bin,
            root,
            run_as,
            postmaster: Mutex::new(None),
            starter: Mutex::new(starter),
        };
        let postmaster = cluster.command("postgres");
        std::thread::Builder::new()
            .name("postgres-starter".to_string())
            .spawn(move || start_postmasters(postmaster, requests))
            .expect("a thread to start postgres from");
        let status = cluster
            .command("initdb")
            .args(["--auth=trust", "--username=postgres", "--encoding=UTF8"])
            .args(["--locale=C", "--no-sync", "--pgdata"])
            .arg(cluster.root.join("data"))
            .stdout(Stdio::null())
            .status()
            .expect("run initdb");
        assert!(status.success(), "initdb failed: {status}");
        cluster
    }

    /// A command for one of the server binaries, run as the server's user.
    fn command(&self, tool: &str) -> Command {
        let mut command = Command::new(self.bin.join(tool));
        if let Some(user) = &self.run_as {
            command.uid(user.uid.as_raw()).gid(user.gid.as_raw());
        }
        command.current_dir(&self.root);
        command
    }

    /// Starts the postmaster (again, after [`PgCluster::stop_immediate`]) and waits until it
    /// accepts connections.
    pub fn start(&self) {
        let (reply, answer) = mpsc::channel();
        self.starter
            .lock()
            .expect("the starter lock")
            .send(reply)
            .expect("the starter thread lives as long as the process");
        let child = answer
            .recv()
            .expect("the starter thread answers")
            .expect("start postgres");
        *self.postmaster.lock().expect("the postmaster lock") = Some(child);
        wait_until("PostgreSQL to accept connections", START_TIMEOUT, || {
            let ready = Command::new(self.bin.join("pg_isready"))
                .arg("--host")
                .arg(self.socket_dir())
                .args(["--port", &PORT.to_string(), "--quiet"])
                .status()
                .is_ok_and(|status| status.success());
            ready.then_some(())
        });
    }

    /// `pg_ctl stop -m immediate`: every backend is killed at once, nothing is shut down
    /// cleanly (the next start runs crash recovery), as when the database machine fails.
    pub fn stop_immediate(&self) {
        let status = self
            .command("pg_ctl")
            .args(["stop", "--mode=immediate", "--silent", "--pgdata"])
            .arg(self.root.join("data"))
            .status()
            .expect("run pg_ctl");
        assert!(status.success(), "pg_ctl stop failed: {status}");
        if let Some(mut child) = self.postmaster.lock().expect("the postmaster lock").take() {
            let _ = child.wait();
        }
    }

    /// The directory of the server's socket (the `host` of a connection).
    pub fn socket_dir(&self) -> PathBuf {
        self.root.join("sock")
    }

    /// Creates a fresh, empty database and returns its name.
    pub fn new_database(&self) -> String {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let name = format!(
            "test_{}_{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        self.psql("postgres", &format!("CREATE DATABASE {name}"));
        name
    }

    /// The URL of `database`, as the server's `ledger` setting takes it.
    pub fn url(&self, database: &str) -> String {
        format!(
            "postgresql:///{database}?host={}&port={PORT}&user=postgres",
            self.socket_dir().display()
        )
    }

    /// Runs `sql` with psql on `database`; returns its unaligned, tuples-only output.
    /// Panics (with psql's message) if it fails.
    pub fn psql(&self, database: &str, sql: &str) -> String {
        let output = Command::new(self.bin.join("psql"))
            .arg("--host")
            .arg(self.socket_dir())
            .args(["--port", &PORT.to_string(), "--username=postgres"])
            .args(["--no-psqlrc", "--tuples-only", "--no-align", "--quiet"])
            .args([
                "--set=ON_ERROR_STOP=1",
                "--dbname",
                database,
                "--command",
                sql,
            ])
            .output()
            .expect("run psql");
        assert!(
            output.status.success(),
            "psql {sql:?} failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        String::from_utf8_lossy(&output.stdout).trim().to_string()
    }

    /// Waits until no database connection of a dead forkpool worker is left (the server
    /// labels its connections `... worker <pid>`). A worker SIGKILLed after sending its
    /// pipelined `COMMIT` leaves a transaction that still commits, until its backend reads
    /// the end of the connection: only then is the killed request's outcome settled.
    pub fn wait_dead_workers_gone(&self) {
        wait_until(
            "the connections of dead workers to close",
            START_TIMEOUT,
            || {
                let names = self.psql(
                    "postgres",
                    "SELECT application_name FROM pg_stat_activity \
                     WHERE application_name LIKE '% worker %'",
                );
                let dead = names
                    .lines()
                    .filter_map(|name| name.rsplit(' ').next()?.parse::<i32>().ok())
                    .any(|pid| {
                        crate::process_state(Pid::from_raw(pid)).is_none_or(|state| state == 'Z')
                    });
                (!dead).then_some(())
            },
        );
    }

    /// Locks `table` of `database` `IN ACCESS EXCLUSIVE MODE` from a psql session of its own
    /// (the database made slow for real: every query on the table waits) and returns once
    /// the lock is granted. Dropping the [`TableLock`] ends the session, which releases it.
    pub fn lock_table(&self, database: &str, table: &str) -> TableLock {
        let psql = Command::new(self.bin.join("psql"))
            .args(self.client_args())
            .args(["--no-psqlrc", "--quiet", "--set=ON_ERROR_STOP=1"])
            .args(["--dbname", database])
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .spawn()
            .expect("run psql");
        let lock = TableLock { psql };
        lock.send(&format!(
            "BEGIN;\nLOCK TABLE {table} IN ACCESS EXCLUSIVE MODE;\n"
        ));
        wait_until("the table lock to be granted", START_TIMEOUT, || {
            let granted = self.psql(
                database,
                &format!(
                    "SELECT count(*) FROM pg_locks \
                     WHERE relation = '{table}'::regclass \
                     AND mode = 'AccessExclusiveLock' AND granted"
                ),
            );
            (granted == "1").then_some(())
        });
        lock
    }

    /// How many of forkpool's database connections (named `... worker <pid>`) on
    /// `database` wait for a lock.
    pub fn workers_waiting_on_locks(&self, database: &str) -> usize {
        self.psql(
            "postgres",
            &format!(
                "SELECT count(*) FROM pg_stat_activity \
                 WHERE datname = '{database}' AND wait_event_type = 'Lock' \
                 AND application_name LIKE '% worker %'"
            ),
        )
        .parse()
        .expect("a count")
    }

    /// The path of one of the cluster's client or server programs (e.g. `pgbench`).
    pub fn program(&self, name: &str) -> PathBuf {
        self.bin.join(name)
    }

    /// The argument list for a client program to reach this cluster (`--host ... --port ...
    /// --username postgres`).
    pub fn client_args(&self) -> Vec<String> {
        vec![
            "--host".to_string(),
            self.socket_dir().display().to_string(),
            "--port".to_string(),
            PORT.to_string(),
            "--username".to_string(),
            "postgres".to_string(),
        ]
    }

    /// SIGKILLs the postmaster's process group (what is left of it).
    fn kill(&self) {
        if let Ok(mut postmaster) = self.postmaster.lock() {
            if let Some(mut child) = postmaster.take() {
                let _ = killpg(Pid::from_raw(child.id() as i32), Signal::SIGKILL);
                let _ = child.wait();
            }
        }
    }
}

/// A table lock held by a psql session ([`PgCluster::lock_table`]) until dropped.
pub struct TableLock {
    psql: Child,
}

impl TableLock {
    fn send(&self, sql: &str) {
        use std::io::Write;
        let mut stdin = self.psql.stdin.as_ref().expect("psql's stdin is piped");
        stdin.write_all(sql.as_bytes()).expect("write to psql");
    }
}

impl Drop for TableLock {
    /// Kills the session: its backend reads the end of the connection and rolls back, which
    /// releases the lock.
    fn drop(&mut self) {
        let _ = self.psql.kill();
        let _ = self.psql.wait();
    }
}

/// The starter thread: spawns a postmaster for every request, in its own process group and
/// with SIGKILL as its parent-death signal (tied to this thread, which never ends before the
/// process does).
fn start_postmasters(
    mut postmaster: Command,
    requests: mpsc::Receiver<mpsc::Sender<std::io::Result<Child>>>,
) {
    let root = postmaster
        .get_current_dir()
        .map(Path::to_path_buf)
        .expect("the postmaster command has its directory");
    postmaster
        .arg("-D")
        .arg(root.join("data"))
        .arg("-k")
        .arg(root.join("sock"))
        .args(["-p", &PORT.to_string()])
        .args(["-c", "listen_addresses="])
        .args(["-c", &format!("max_connections={MAX_CONNECTIONS}")])
        // Tests stop the server, they do not crash the machine: the page cache is enough.
        .args(["-c", "fsync=off", "-c", "full_page_writes=off"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .process_group(0);
    // SAFETY: prctl is async-signal-safe; it runs in the child between fork and exec, after
    // the uid change (which would clear the parent-death signal).
    unsafe {
        postmaster.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) == -1 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    for reply in requests {
        // The server's log, kept next to its data for a test that needs to know why.
        let spawned = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(root.join("postgres.log"))
            .and_then(|log| postmaster.stderr(log).spawn());
        let _ = reply.send(spawned);
    }
}
