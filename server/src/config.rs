//! Settings: command-line flags and an optional TOML file merged into one validated
//! [`Config`]. Flags win over the file, the file wins over the defaults, and the defaults live
//! here only (`deploy/forkpool.toml` documents the same values; a test keeps them in step).

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use clap::Parser;
use forkpool_ledger::{FsyncPolicy, DEFAULT_MAX_ACCOUNTS, MAX_MAX_ACCOUNTS};
use forkpool_pgledger::{PgSettings, SettingsError, DEFAULT_CONNECTIONS, DEFAULT_DEADLINE};
use forkpool_queue::{DEFAULT_MAX_JOBS, DEFAULT_MAX_PAYLOAD, MAX_JOBS, MAX_PAYLOAD};
use serde::Deserialize;

use crate::listener::AcceptMode;
use crate::service::ServiceKind;
use crate::tls::TlsFiles;

pub const DEFAULT_ECHO_ADDR: &str = "127.0.0.1:7878";
pub const DEFAULT_BANK_ADDR: &str = "127.0.0.1:7879";
pub const DEFAULT_QUEUE_ADDR: &str = "127.0.0.1:7880";
pub const DEFAULT_QUEUE_STORE_PATH: &str = "./data/queue.bin";
pub const DEFAULT_BACKLOG: u32 = 1024;
pub const DEFAULT_GRACEFUL_TIMEOUT_SECS: f64 = 30.0;
pub const DEFAULT_IDLE_TIMEOUT_SECS: f64 = 300.0;
pub const DEFAULT_MAX_CONNECTIONS: usize = 16_384;
pub const DEFAULT_MAX_LINE_BYTES: usize = 64 * 1024;
pub const DEFAULT_OUTPUT_LIMIT_BYTES: usize = 1024 * 1024;
pub const DEFAULT_WORKER_TIMEOUT_SECS: f64 = 30.0;
pub const DEFAULT_LEDGER_PATH: &str = "./data/ledger.bin";
/// Shortest per-request deadline of a PostgreSQL ledger.
pub const MIN_LEDGER_TIMEOUT: Duration = Duration::from_millis(10);
/// The most worker processes one master will run (a bound on everything sized per worker).
pub const MAX_WORKERS: usize = 1024;
/// The prefix of a Unix-socket address in the settings.
pub const UNIX_PREFIX: &str = "unix:";
/// Longest Unix socket path, in bytes (`sun_path` holds 108 bytes with the final NUL).
pub const MAX_UNIX_PATH_BYTES: usize = 107;

/// The URL schemes that name a PostgreSQL ledger instead of a ledger file.
pub const POSTGRES_SCHEMES: [&str; 2] = ["postgres://", "postgresql://"];

/// Where the bank's money lives: the `ledger` setting read as a file path or a database URL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LedgerLocation {
    /// The shared-memory ledger file (the default).
    File(PathBuf),
    /// A PostgreSQL-protocol database (`postgres://` or `postgresql://` URL, as written).
    Postgres(String),
}

impl LedgerLocation {
    /// Reads a `ledger` setting: a value starting with one of [`POSTGRES_SCHEMES`] is a
    /// database URL (scheme matched case-insensitively, as libpq does), anything else a path.
    pub fn of(setting: &Path) -> LedgerLocation {
        let url = setting.to_str().filter(|text| {
            POSTGRES_SCHEMES.iter().any(|scheme| {
                text.get(..scheme.len())
                    .is_some_and(|head| head.eq_ignore_ascii_case(scheme))
            })
        });
        match url {
            Some(url) => LedgerLocation::Postgres(url.to_owned()),
            None => LedgerLocation::File(setting.to_path_buf()),
        }
    }
}

/// Where a service listens: a TCP address, or a Unix socket path (`unix:/path`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ListenAddr {
    Tcp(SocketAddr),
    Unix(PathBuf),
}

/// A listening address that does not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct BadListenAddr(&'static str);

impl FromStr for ListenAddr {
    type Err = BadListenAddr;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        match text.strip_prefix(UNIX_PREFIX) {
            Some("") => Err(BadListenAddr(
                "a Unix socket address needs a path: unix:/PATH",
            )),
            Some(path) if path.len() > MAX_UNIX_PATH_BYTES => Err(BadListenAddr(
                "a Unix socket path is at most 107 bytes long",
            )),
            Some(path) => Ok(ListenAddr::Unix(PathBuf::from(path))),
            None => text.parse().map(ListenAddr::Tcp).map_err(|_| {
                BadListenAddr("expected IP:PORT (e.g. 127.0.0.1:7878 or [::1]:7878) or unix:/PATH")
            }),
        }
    }
}

impl fmt::Display for ListenAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ListenAddr::Tcp(addr) => write!(f, "{addr}"),
            ListenAddr::Unix(path) => write!(f, "{UNIX_PREFIX}{}", path.display()),
        }
    }
}

impl ListenAddr {
    /// Reachable only from this machine: a loopback address or a Unix socket. (0.0.0.0 and
    /// :: are every address, not loopback.)
    pub fn is_local(&self) -> bool {
        match self {
            ListenAddr::Tcp(addr) => addr.ip().to_canonical().is_loopback(),
            ListenAddr::Unix(_) => true,
        }
    }
}

/// Pre-forking TCP server: an uppercase echo service and a shared-memory bank ledger.
///
/// Settings come from these flags, then from the TOML file given with --config, then from
/// the built-in defaults. Signals to the master: TERM/INT drain gracefully (a second one stops
/// at once), QUIT stops at once.
#[derive(Debug, Parser, Default)]
#[command(name = "forkpool-server", version, about, long_about = None)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,
    /// TOML file with settings (same names as the flags, with `_` for `-`).
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Address of the echo service (IPv4 or [IPv6]:port; port 0 picks a free port; or
    /// unix:/PATH). [default: 127.0.0.1:7878]
    #[arg(long, value_name = "ADDR")]
    pub echo_addr: Option<ListenAddr>,
    /// Address of the bank service. [default: 127.0.0.1:7879]
    #[arg(long, value_name = "ADDR")]
    pub bank_addr: Option<ListenAddr>,
    /// Address of the queue service. [default: 127.0.0.1:7880]
    #[arg(long, value_name = "ADDR")]
    pub queue_addr: Option<ListenAddr>,
    /// Certificate chain (PEM, leaf first) that turns on TLS for the echo service; needs
    /// --echo-tls-key. [default: none, plain text]
    #[arg(long, value_name = "FILE")]
    pub echo_tls_cert: Option<PathBuf>,
    /// Private key (PEM) of --echo-tls-cert.
    #[arg(long, value_name = "FILE")]
    pub echo_tls_key: Option<PathBuf>,
    /// Certificate chain (PEM) that turns on TLS for the bank; needs --bank-tls-key.
    /// [default: none, plain text]
    #[arg(long, value_name = "FILE")]
    pub bank_tls_cert: Option<PathBuf>,
    /// Private key (PEM) of --bank-tls-cert.
    #[arg(long, value_name = "FILE")]
    pub bank_tls_key: Option<PathBuf>,
    /// Certificate chain (PEM) that turns on TLS for the queue; needs --queue-tls-key.
    /// [default: none, plain text]
    #[arg(long, value_name = "FILE")]
    pub queue_tls_cert: Option<PathBuf>,
    /// Private key (PEM) of --queue-tls-cert.
    #[arg(long, value_name = "FILE")]
    pub queue_tls_key: Option<PathBuf>,
    /// Users of the bank and the queue (TOML): with it, their clients must AUTH and are held
    /// to their rights. Re-read on SIGHUP. [default: none, everyone may do everything]
    #[arg(long, value_name = "FILE")]
    pub users_file: Option<PathBuf>,
    /// Let the bank listen beyond loopback without a users file (anyone who reaches it may
    /// move money). Without it such a start is refused.
    #[arg(long)]
    pub bank_open: bool,
    /// Let the queue listen beyond loopback without a users file (anyone who reaches it may
    /// put, take and complete jobs). Without it such a start is refused.
    #[arg(long)]
    pub queue_open: bool,
    /// Permissions of the Unix socket files, in octal (e.g. 0660). [default: per umask]
    #[arg(long, value_name = "MODE")]
    pub socket_mode: Option<String>,
    /// Group (name or number) given to the Unix socket files. [default: the server's]
    #[arg(long, value_name = "GROUP")]
    pub socket_group: Option<String>,
    /// Number of worker processes. [default: number of CPUs]
    #[arg(long, value_name = "N")]
    pub workers: Option<usize>,
    /// Listen backlog of each listening socket. [default: 1024]
    #[arg(long, value_name = "N")]
    pub backlog: Option<u32>,
    /// Seconds a graceful shutdown waits for workers before killing them. [default: 30]
    #[arg(long, value_name = "SECS")]
    pub graceful_timeout: Option<f64>,
    /// Seconds without traffic after which a connection is closed (0 = never). [default: 300]
    #[arg(long, value_name = "SECS")]
    pub idle_timeout: Option<f64>,
    /// Connections one worker serves at once; past it, it stops accepting. [default: 16384]
    #[arg(long, value_name = "N")]
    pub max_connections: Option<usize>,
    /// Longest bank request line in bytes; longer gets `ERR line-too-long` and a close.
    /// Echo streams lines of any length. [default: 65536]
    #[arg(long, value_name = "BYTES")]
    pub max_line: Option<usize>,
    /// Unsent reply bytes per connection above which the server stops reading from it.
    /// [default: 1048576]
    #[arg(long, value_name = "BYTES")]
    pub output_limit: Option<usize>,
    /// File holding the bank ledger (created if missing), or a postgres:// (postgresql://)
    /// URL of a PostgreSQL database shared by several instances (PG* variables fill what
    /// the URL leaves out). [default: ./data/ledger.bin]
    #[arg(long, value_name = "PATH|URL")]
    pub ledger: Option<PathBuf>,
    /// PostgreSQL ledger: database connections per worker. [default: 4]
    #[arg(long, value_name = "N")]
    pub ledger_connections: Option<usize>,
    /// PostgreSQL ledger: seconds a bank request may wait for the database before it gets
    /// `ERR unavailable` (at least 0.01). [default: 2]
    #[arg(long, value_name = "SECS")]
    pub ledger_timeout: Option<f64>,
    /// Capacity of the ledger, in accounts (must match an existing ledger file).
    /// [default: 65536]
    #[arg(long, value_name = "N")]
    pub max_accounts: Option<u64>,
    /// File holding the job queues (created if missing). [default: ./data/queue.bin]
    #[arg(long, value_name = "PATH")]
    pub queue_store: Option<PathBuf>,
    /// Most jobs the queue store holds at once (must match an existing file).
    /// [default: 65536]
    #[arg(long, value_name = "N")]
    pub queue_max_jobs: Option<u32>,
    /// Longest job payload in bytes (must match an existing file). [default: 1024]
    #[arg(long, value_name = "BYTES")]
    pub queue_max_payload: Option<u32>,
    /// maxsize of a queue created on first use (0 = unbounded). [default: 0]
    #[arg(long, value_name = "N")]
    pub queue_default_maxsize: Option<u64>,
    /// How workers share each address: `reuseport` (a socket per worker, balanced by the
    /// kernel) or `shared` (one socket, every worker accepts from it). [default: reuseport]
    #[arg(long, value_name = "MODE")]
    pub accept: Option<AcceptMode>,
    /// Seconds a worker may go without a heartbeat before the master kills and replaces it
    /// (0 = never). [default: 30]
    #[arg(long, value_name = "SECS")]
    pub worker_timeout: Option<f64>,
    /// Requests after which a worker is replaced (it drains while its replacement already
    /// serves); 0 = never. [default: 0]
    #[arg(long, value_name = "N")]
    pub max_requests: Option<u64>,
    /// A random number of up to this many requests is added to each worker's max_requests,
    /// so workers do not all recycle at once. [default: 0]
    #[arg(long, value_name = "N")]
    pub max_requests_jitter: Option<u64>,
    /// Write the master's pid here once ready (locked while the master lives; removed at
    /// exit). A live master's file refuses the start. [default: none]
    #[arg(long, value_name = "PATH")]
    pub pid_file: Option<PathBuf>,
    /// Serve `GET /metrics` (Prometheus) and `GET /status` here. [default: off]
    #[arg(long, value_name = "ADDR")]
    pub status_addr: Option<SocketAddr>,
    /// Services behind a proxy that sends the PROXY protocol (v1 or v2) header, e.g.
    /// `bank` or `echo,bank`: each connection must start with one, and the client it names is
    /// the peer for logs and the AUTH throttle. `none` for none. [default: none]
    #[arg(long, value_name = "SERVICES", value_delimiter = ',')]
    pub proxy_protocol: Option<Vec<String>>,
    /// Durability of each bank operation: `never` (page cache: survives any process death,
    /// not a power loss) or `always` (on disk before the reply). [default: never]
    #[arg(long, value_name = "POLICY")]
    pub fsync: Option<FsyncPolicy>,
}

/// Tools that run instead of the server.
#[derive(Debug, clap::Subcommand)]
pub enum Command {
    /// Print a new random bank token (256 bits) and the users-file entry with its SHA-256.
    GenToken {
        /// The user's name (account-name rules: 1-64 of A-Z a-z 0-9 _ . -).
        name: String,
        /// The user's rights.
        #[arg(long, value_enum, default_value = "read")]
        rights: crate::users::Rights,
    },
}

/// The settings file: every field optional, unknown names rejected (a typo is an error,
/// not a silently ignored setting).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    pub echo_addr: Option<String>,
    pub bank_addr: Option<String>,
    pub queue_addr: Option<String>,
    pub echo_tls_cert: Option<PathBuf>,
    pub echo_tls_key: Option<PathBuf>,
    pub bank_tls_cert: Option<PathBuf>,
    pub bank_tls_key: Option<PathBuf>,
    pub queue_tls_cert: Option<PathBuf>,
    pub queue_tls_key: Option<PathBuf>,
    pub users_file: Option<PathBuf>,
    pub bank_open: Option<bool>,
    pub queue_open: Option<bool>,
    pub socket_mode: Option<String>,
    pub socket_group: Option<String>,
    pub workers: Option<usize>,
    pub backlog: Option<u32>,
    pub graceful_timeout: Option<f64>,
    pub idle_timeout: Option<f64>,
    pub max_connections: Option<usize>,
    pub max_line: Option<usize>,
    pub output_limit: Option<usize>,
    pub ledger: Option<PathBuf>,
    pub ledger_connections: Option<usize>,
    pub ledger_timeout: Option<f64>,
    pub max_accounts: Option<u64>,
    pub queue_store: Option<PathBuf>,
    pub queue_max_jobs: Option<u32>,
    pub queue_max_payload: Option<u32>,
    pub queue_default_maxsize: Option<u64>,
    pub fsync: Option<String>,
    pub accept: Option<AcceptMode>,
    pub worker_timeout: Option<f64>,
    pub max_requests: Option<u64>,
    pub max_requests_jitter: Option<u64>,
    pub pid_file: Option<PathBuf>,
    pub status_addr: Option<String>,
    pub proxy_protocol: Option<Vec<String>>,
}

/// Every setting, validated.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    pub echo_addr: ListenAddr,
    pub bank_addr: ListenAddr,
    pub queue_addr: ListenAddr,
    /// `None`: the echo service speaks plain text.
    pub echo_tls: Option<TlsFiles>,
    /// `None`: the bank speaks plain text.
    pub bank_tls: Option<TlsFiles>,
    /// `None`: the queue speaks plain text.
    pub queue_tls: Option<TlsFiles>,
    /// `None`: no users; the bank and the queue behave as without authentication.
    pub users_file: Option<PathBuf>,
    /// The bank's protected-mode opt-out (see [`check_protected_mode`]).
    pub bank_open: bool,
    /// The queue's protected-mode opt-out.
    pub queue_open: bool,
    pub unix_socket: UnixSocketSettings,
    pub workers: usize,
    pub backlog: u32,
    pub graceful_timeout: Duration,
    /// `None`: idle connections stay open.
    pub idle_timeout: Option<Duration>,
    pub max_connections: usize,
    pub max_line: usize,
    pub output_limit: usize,
    /// A file path or a database URL (see [`LedgerLocation`]).
    pub ledger: PathBuf,
    /// Database connections per worker (a PostgreSQL ledger only).
    pub ledger_connections: usize,
    /// Per-request deadline (a PostgreSQL ledger only).
    pub ledger_timeout: Duration,
    pub max_accounts: u64,
    pub queue_store: PathBuf,
    pub queue_max_jobs: u32,
    pub queue_max_payload: u32,
    pub queue_default_maxsize: u64,
    pub fsync: FsyncPolicy,
    pub accept: AcceptMode,
    /// `None`: hang detection off.
    pub worker_timeout: Option<Duration>,
    /// 0: workers are never recycled.
    pub max_requests: u64,
    pub max_requests_jitter: u64,
    pub pid_file: Option<PathBuf>,
    pub status_addr: Option<SocketAddr>,
    pub proxy_protocol: ProxiedServices,
}

/// Why the settings could not be loaded; each names the file or setting and the cause.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("invalid config file {path}{}: {message}", place(*.line, .key.as_deref()))]
    Parse {
        path: PathBuf,
        /// The line the error points at (1-based), when the parser gave a position.
        line: Option<usize>,
        /// The setting on that line, when the line is a `key = value` one.
        key: Option<String>,
        message: String,
    },
    #[error("invalid setting {name} = {value}: {reason}")]
    Invalid {
        name: &'static str,
        value: String,
        reason: &'static str,
    },
    #[error("{given} is set but {missing} is not: a TLS certificate needs its key and back")]
    TlsHalf {
        given: &'static str,
        missing: &'static str,
    },
    #[error(
        "protected mode: the {service} listens on {addr}, beyond this machine, with no \
         users_file; set users_file, or {opt_out} = true to let anyone who reaches it {risk}"
    )]
    Unprotected {
        service: &'static str,
        addr: ListenAddr,
        opt_out: &'static str,
        risk: &'static str,
    },
    /// The URL is never quoted: it may hold a password.
    #[error("ledger: {0}")]
    LedgerUrl(#[source] SettingsError),
    #[error(
        "{name} = {addr}: TLS is for connections that cross a network; a Unix socket is served \
         in plain text (remove the service's TLS certificate or listen on TCP)"
    )]
    TlsOnUnixSocket {
        name: &'static str,
        addr: ListenAddr,
    },
}

/// The services behind a proxy that sends PROXY protocol headers (`proxy_protocol`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ProxiedServices([bool; ServiceKind::ALL.len()]);

impl ProxiedServices {
    /// Must `kind`'s connections start with a PROXY header?
    pub fn covers(self, kind: ServiceKind) -> bool {
        self.0[kind.index()]
    }

    /// The flag's list if given, else the file's, else none. A malformed file value is an
    /// error even when the flag overrides it, as for the addresses.
    fn pick(flag: Option<&[String]>, file: Option<&[String]>) -> Result<Self, ConfigError> {
        let from_file = file.map(ProxiedServices::parse).transpose()?;
        match flag.map(ProxiedServices::parse).transpose()? {
            Some(services) => Ok(services),
            None => Ok(from_file.unwrap_or_default()),
        }
    }

    /// Service names (`echo`, `bank`), or the single word `none`.
    fn parse(names: &[String]) -> Result<Self, ConfigError> {
        let mut services = ProxiedServices::default();
        let none = matches!(names, [only] if only == "none");
        for name in names.iter().filter(|_| !none) {
            let kind = ServiceKind::named(name).ok_or_else(|| ConfigError::Invalid {
                name: "proxy_protocol",
                value: names.join(","),
                reason: "expected service names (echo, bank, queue) or none",
            })?;
            services.0[kind.index()] = true;
        }
        Ok(services)
    }
}

/// How Unix socket files are created (for `unix:/path` addresses).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct UnixSocketSettings {
    /// Permission bits (e.g. 0o660); `None`: as the umask leaves them.
    pub mode: Option<u32>,
    /// Group name or number; `None`: the server's group.
    pub group: Option<String>,
}

/// Protected mode (Redis' idea): a bank or a queue reachable beyond this machine with no
/// users refuses to start unless its opt-out (`bank_open`, `queue_open`) says so; the echo
/// service needs none. Run at load, and again by whoever learns the real address (an
/// inherited socket): `addr` is where `kind` listens.
pub fn check_protected_mode(
    kind: ServiceKind,
    addr: &ListenAddr,
    config: &Config,
) -> Result<(), ConfigError> {
    let (opt_out, open, risk) = match kind {
        ServiceKind::Echo => return Ok(()),
        ServiceKind::Bank => ("bank_open", config.bank_open, "move money"),
        ServiceKind::Queue => (
            "queue_open",
            config.queue_open,
            "put, take and complete jobs",
        ),
    };
    if addr.is_local() || config.users_file.is_some() || open {
        return Ok(());
    }
    Err(ConfigError::Unprotected {
        service: kind.name(),
        addr: addr.clone(),
        opt_out,
        risk,
    })
}

impl Config {
    /// The configured address of `kind`, TCP or Unix.
    pub fn listen_addr(&self, kind: ServiceKind) -> &ListenAddr {
        match kind {
            ServiceKind::Echo => &self.echo_addr,
            ServiceKind::Bank => &self.bank_addr,
            ServiceKind::Queue => &self.queue_addr,
        }
    }

    /// The certificate and key of `kind`, if it speaks TLS.
    pub fn tls(&self, kind: ServiceKind) -> Option<&TlsFiles> {
        match kind {
            ServiceKind::Echo => self.echo_tls.as_ref(),
            ServiceKind::Bank => self.bank_tls.as_ref(),
            ServiceKind::Queue => self.queue_tls.as_ref(),
        }
    }

    /// The `ledger` setting as a file or a database URL.
    pub fn ledger_location(&self) -> LedgerLocation {
        LedgerLocation::of(&self.ledger)
    }

    /// How to reach and use the PostgreSQL ledger, if `ledger` is a database URL: the URL
    /// completed from the `PG*` environment variables, with the pool's settings.
    pub fn postgres(&self) -> Result<Option<PgSettings>, ConfigError> {
        let LedgerLocation::Postgres(url) = self.ledger_location() else {
            return Ok(None);
        };
        let mut settings =
            PgSettings::from_url(&url, self.max_accounts).map_err(ConfigError::LedgerUrl)?;
        settings.connections = self.ledger_connections;
        settings.deadline = self.ledger_timeout;
        settings.validate().map_err(ConfigError::LedgerUrl)?;
        Ok(Some(settings))
    }

    /// Settings a reload cannot change (the ledger, its capacity and fsync policy, the status
    /// address, the pid file): taken from the `running` ones, each requested change logged.
    pub fn keep_fixed_settings(&mut self, running: &Config) {
        for (name, changed) in [
            ("ledger", self.ledger != running.ledger),
            ("max_accounts", self.max_accounts != running.max_accounts),
            ("fsync", self.fsync != running.fsync),
            ("queue_store", self.queue_store != running.queue_store),
            (
                "queue_max_jobs",
                self.queue_max_jobs != running.queue_max_jobs,
            ),
            (
                "queue_max_payload",
                self.queue_max_payload != running.queue_max_payload,
            ),
            ("status_addr", self.status_addr != running.status_addr),
            ("pid_file", self.pid_file != running.pid_file),
        ] {
            if changed {
                log::warn!("SIGHUP: {name} cannot change while running; restart to apply it");
            }
        }
        self.ledger.clone_from(&running.ledger);
        self.max_accounts = running.max_accounts;
        self.fsync = running.fsync;
        self.queue_store.clone_from(&running.queue_store);
        self.queue_max_jobs = running.queue_max_jobs;
        self.queue_max_payload = running.queue_max_payload;
        self.status_addr = running.status_addr;
        self.pid_file.clone_from(&running.pid_file);
    }

    /// Merges flags over the file named by `--config` (if any) over the defaults.
    pub fn load(cli: &Cli) -> Result<Config, ConfigError> {
        let file = match &cli.config {
            Some(path) => read_file(path)?,
            None => FileConfig::default(),
        };
        Config::merge(cli, file)
    }

    fn merge(cli: &Cli, file: FileConfig) -> Result<Config, ConfigError> {
        let config = Config {
            echo_addr: pick_addr(
                "echo_addr",
                cli.echo_addr.clone(),
                file.echo_addr,
                DEFAULT_ECHO_ADDR,
            )?,
            bank_addr: pick_addr(
                "bank_addr",
                cli.bank_addr.clone(),
                file.bank_addr,
                DEFAULT_BANK_ADDR,
            )?,
            queue_addr: pick_addr(
                "queue_addr",
                cli.queue_addr.clone(),
                file.queue_addr,
                DEFAULT_QUEUE_ADDR,
            )?,
            echo_tls: pick_tls(
                (
                    "echo_tls_cert",
                    cli.echo_tls_cert.clone().or(file.echo_tls_cert),
                ),
                (
                    "echo_tls_key",
                    cli.echo_tls_key.clone().or(file.echo_tls_key),
                ),
            )?,
            bank_tls: pick_tls(
                (
                    "bank_tls_cert",
                    cli.bank_tls_cert.clone().or(file.bank_tls_cert),
                ),
                (
                    "bank_tls_key",
                    cli.bank_tls_key.clone().or(file.bank_tls_key),
                ),
            )?,
            queue_tls: pick_tls(
                (
                    "queue_tls_cert",
                    cli.queue_tls_cert.clone().or(file.queue_tls_cert),
                ),
                (
                    "queue_tls_key",
                    cli.queue_tls_key.clone().or(file.queue_tls_key),
                ),
            )?,
            users_file: cli.users_file.clone().or(file.users_file),
            bank_open: cli.bank_open || file.bank_open.unwrap_or(false),
            queue_open: cli.queue_open || file.queue_open.unwrap_or(false),
            unix_socket: UnixSocketSettings {
                mode: pick_socket_mode(cli.socket_mode.clone().or(file.socket_mode))?,
                group: cli.socket_group.clone().or(file.socket_group),
            },
            workers: cli.workers.or(file.workers).unwrap_or_else(default_workers),
            backlog: cli.backlog.or(file.backlog).unwrap_or(DEFAULT_BACKLOG),
            graceful_timeout: seconds(
                "graceful_timeout",
                cli.graceful_timeout.or(file.graceful_timeout),
                DEFAULT_GRACEFUL_TIMEOUT_SECS,
            )?,
            idle_timeout: Some(seconds(
                "idle_timeout",
                cli.idle_timeout.or(file.idle_timeout),
                DEFAULT_IDLE_TIMEOUT_SECS,
            )?)
            .filter(|timeout| !timeout.is_zero()),
            max_connections: cli
                .max_connections
                .or(file.max_connections)
                .unwrap_or(DEFAULT_MAX_CONNECTIONS),
            max_line: cli
                .max_line
                .or(file.max_line)
                .unwrap_or(DEFAULT_MAX_LINE_BYTES),
            output_limit: cli
                .output_limit
                .or(file.output_limit)
                .unwrap_or(DEFAULT_OUTPUT_LIMIT_BYTES),
            ledger: cli
                .ledger
                .clone()
                .or(file.ledger)
                .unwrap_or_else(|| PathBuf::from(DEFAULT_LEDGER_PATH)),
            ledger_connections: cli
                .ledger_connections
                .or(file.ledger_connections)
                .unwrap_or(DEFAULT_CONNECTIONS),
            ledger_timeout: seconds(
                "ledger_timeout",
                cli.ledger_timeout.or(file.ledger_timeout),
                DEFAULT_DEADLINE.as_secs_f64(),
            )?,
            max_accounts: cli
                .max_accounts
                .or(file.max_accounts)
                .unwrap_or(DEFAULT_MAX_ACCOUNTS),
            queue_store: cli
                .queue_store
                .clone()
                .or(file.queue_store)
                .unwrap_or_else(|| PathBuf::from(DEFAULT_QUEUE_STORE_PATH)),
            queue_max_jobs: cli
                .queue_max_jobs
                .or(file.queue_max_jobs)
                .unwrap_or(DEFAULT_MAX_JOBS),
            queue_max_payload: cli
                .queue_max_payload
                .or(file.queue_max_payload)
                .unwrap_or(DEFAULT_MAX_PAYLOAD),
            queue_default_maxsize: cli
                .queue_default_maxsize
                .or(file.queue_default_maxsize)
                .unwrap_or(0),
            fsync: pick_fsync(cli.fsync, file.fsync)?,
            accept: cli.accept.or(file.accept).unwrap_or_default(),
            worker_timeout: Some(seconds(
                "worker_timeout",
                cli.worker_timeout.or(file.worker_timeout),
                DEFAULT_WORKER_TIMEOUT_SECS,
            )?)
            .filter(|timeout| !timeout.is_zero()),
            max_requests: cli.max_requests.or(file.max_requests).unwrap_or(0),
            max_requests_jitter: cli
                .max_requests_jitter
                .or(file.max_requests_jitter)
                .unwrap_or(0),
            pid_file: cli.pid_file.clone().or(file.pid_file),
            status_addr: pick_optional_addr("status_addr", cli.status_addr, file.status_addr)?,
            proxy_protocol: ProxiedServices::pick(
                cli.proxy_protocol.as_deref(),
                file.proxy_protocol.as_deref(),
            )?,
        };
        config.validate()?;
        Ok(config)
    }

    /// Checks every setting against its range (see [`LIMITS`] and the durations' own
    /// bounds), so that nothing downstream meets a value it cannot handle.
    fn validate(&self) -> Result<(), ConfigError> {
        let counts = [
            ("workers", self.workers as u64),
            ("ledger_connections", self.ledger_connections as u64),
            ("backlog", u64::from(self.backlog)),
            ("max_connections", self.max_connections as u64),
            ("max_line", self.max_line as u64),
            ("output_limit", self.output_limit as u64),
            ("max_accounts", self.max_accounts),
            ("queue_max_jobs", u64::from(self.queue_max_jobs)),
            ("queue_max_payload", u64::from(self.queue_max_payload)),
            ("queue_default_maxsize", self.queue_default_maxsize),
            ("max_requests", self.max_requests),
            ("max_requests_jitter", self.max_requests_jitter),
        ];
        for (name, value) in counts {
            let limit = Limit::of(name);
            if !limit.range.contains(&value) {
                return Err(ConfigError::Invalid {
                    name: limit.name,
                    value: value.to_string(),
                    reason: limit.reason,
                });
            }
        }
        if let Some(timeout) = self.worker_timeout {
            check(
                "worker_timeout",
                timeout.as_secs_f64(),
                timeout >= MIN_WORKER_TIMEOUT,
                "must be 0 (off) or at least 0.1 seconds",
            )?;
        }
        check(
            "ledger",
            self.ledger.display(),
            !self.ledger.as_os_str().is_empty(),
            "must not be empty",
        )?;
        check(
            "ledger_timeout",
            self.ledger_timeout.as_secs_f64(),
            self.ledger_timeout >= MIN_LEDGER_TIMEOUT,
            "must be at least 0.01 seconds",
        )?;
        self.postgres()?;
        let addrs = [
            ("echo_addr", &self.echo_addr),
            ("bank_addr", &self.bank_addr),
            ("queue_addr", &self.queue_addr),
        ];
        for (i, (name, addr)) in addrs.iter().enumerate() {
            let any_port = matches!(addr, ListenAddr::Tcp(a) if a.port() == 0);
            if !any_port && addrs[..i].iter().any(|(_, earlier)| earlier == addr) {
                return Err(ConfigError::Invalid {
                    name,
                    value: addr.to_string(),
                    reason: "must differ from the other services' addresses",
                });
            }
        }
        check(
            "queue_store",
            self.queue_store.display(),
            !self.queue_store.as_os_str().is_empty(),
            "must not be empty",
        )?;
        for (name, kind) in [
            ("echo_addr", ServiceKind::Echo),
            ("bank_addr", ServiceKind::Bank),
            ("queue_addr", ServiceKind::Queue),
        ] {
            let addr = self.listen_addr(kind);
            if matches!(addr, ListenAddr::Unix(_)) && self.tls(kind).is_some() {
                return Err(ConfigError::TlsOnUnixSocket {
                    name,
                    addr: addr.clone(),
                });
            }
            check_protected_mode(kind, addr, self)?;
        }
        Ok(())
    }
}

/// The accepted range of a numeric setting, and how the error says it.
pub struct Limit {
    pub name: &'static str,
    pub range: std::ops::RangeInclusive<u64>,
    pub reason: &'static str,
}

/// Most requests (and jitter) `max_requests` may name: far beyond any worker's life, and small
/// enough that the sum of the two never overflows.
pub const MAX_REQUESTS_LIMIT: u64 = 1 << 48;
/// Longest bank request line a worker will buffer.
pub const MAX_LINE_LIMIT: u64 = 64 << 20;
/// Largest per-connection output buffer.
pub const OUTPUT_LIMIT_LIMIT: u64 = 1 << 30;
/// Most connections one worker may hold (each is a descriptor).
pub const MAX_CONNECTIONS_LIMIT: u64 = 1 << 20;
/// Shortest hang-detection timeout: a worker beats four times per timeout.
pub const MIN_WORKER_TIMEOUT: Duration = Duration::from_millis(100);

/// Every numeric setting's range, in one table (the validation and its tests read it).
pub const LIMITS: [Limit; 12] = [
    Limit {
        name: "workers",
        range: 1..=MAX_WORKERS as u64,
        reason: "must be 1 to 1024",
    },
    Limit {
        name: "ledger_connections",
        range: 1..=forkpool_pgledger::MAX_CONNECTIONS as u64,
        reason: "must be 1 to 256",
    },
    Limit {
        name: "backlog",
        range: 1..=65_535,
        reason: "must be 1 to 65535",
    },
    Limit {
        name: "max_connections",
        range: 1..=MAX_CONNECTIONS_LIMIT,
        reason: "must be 1 to 1048576",
    },
    Limit {
        name: "max_line",
        range: 1..=MAX_LINE_LIMIT,
        reason: "must be 1 to 67108864 bytes",
    },
    Limit {
        name: "output_limit",
        range: 1..=OUTPUT_LIMIT_LIMIT,
        reason: "must be 1 to 1073741824 bytes",
    },
    Limit {
        name: "max_accounts",
        range: 1..=MAX_MAX_ACCOUNTS,
        reason: "must be 1 to 16777216",
    },
    Limit {
        name: "queue_max_jobs",
        range: 1..=MAX_JOBS as u64,
        reason: "must be 1 to 16777216",
    },
    Limit {
        name: "queue_max_payload",
        range: 1..=MAX_PAYLOAD as u64,
        reason: "must be 1 to 1048576 bytes",
    },
    Limit {
        name: "queue_default_maxsize",
        range: 0..=MAX_REQUESTS_LIMIT,
        reason: "must be 0 (unbounded) to 281474976710656",
    },
    Limit {
        name: "max_requests",
        range: 0..=MAX_REQUESTS_LIMIT,
        reason: "must be 0 (never) to 281474976710656",
    },
    Limit {
        name: "max_requests_jitter",
        range: 0..=MAX_REQUESTS_LIMIT,
        reason: "must be 0 to 281474976710656",
    },
];

impl Limit {
    /// The limit of the setting `name` (one of [`LIMITS`]).
    fn of(name: &str) -> &'static Limit {
        LIMITS
            .iter()
            .find(|limit| limit.name == name)
            .expect("every validated count has an entry in LIMITS")
    }
}

fn read_file(path: &Path) -> Result<FileConfig, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    parse_file(path, &text)
}

/// Parses the text of a settings file (public so that tests can check the example file). An
/// error names the line and, on a `key = value` line, the key (serde's own message names
/// neither for a value of the wrong type).
pub fn parse_file(path: &Path, text: &str) -> Result<FileConfig, ConfigError> {
    toml::from_str(text).map_err(|e| {
        let line = e.span().map(|span| line_at(text, span.start));
        ConfigError::Parse {
            path: path.to_path_buf(),
            line: line.map(|(number, _)| number),
            key: line.and_then(|(_, line)| key_of(line)),
            message: e.message().to_string(),
        }
    })
}

/// The 1-based number and the text of the line holding byte `offset` of `text`.
fn line_at(text: &str, offset: usize) -> (usize, &str) {
    let before = text.get(..offset).unwrap_or(text);
    let start = before.rfind('\n').map_or(0, |newline| newline + 1);
    let line = text[start..].lines().next().unwrap_or_default();
    (before.matches('\n').count() + 1, line)
}

/// The key of a `key = value` line (a bare or quoted TOML key), if the line is one.
fn key_of(line: &str) -> Option<String> {
    let (key, _) = line.split_once('=')?;
    let key = key.trim().trim_matches('"');
    let bare = |b: u8| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.');
    (!key.is_empty() && key.bytes().all(bare)).then(|| key.to_string())
}

/// `, line N, key K` (the parts that are known) for a file error.
fn place(line: Option<usize>, key: Option<&str>) -> String {
    let line = line
        .map(|line| format!(", line {line}"))
        .unwrap_or_default();
    let key = key.map(|key| format!(", key {key}")).unwrap_or_default();
    line + &key
}

fn default_workers() -> usize {
    std::thread::available_parallelism().map_or(1, usize::from)
}

/// The flag if given, else the file's value, else the default. A malformed file value is an
/// error even when a flag overrides it: the file is wrong either way.
fn pick_addr<A: AddrSetting>(
    name: &'static str,
    flag: Option<A>,
    file: Option<String>,
    default: &str,
) -> Result<A, ConfigError> {
    let parse = |text: &str| {
        A::parse_setting(text).map_err(|reason| ConfigError::Invalid {
            name,
            value: text.to_string(),
            reason,
        })
    };
    let from_file = file.as_deref().map(parse).transpose()?;
    match (flag, from_file) {
        (Some(addr), _) | (None, Some(addr)) => Ok(addr),
        (None, None) => parse(default),
    }
}

/// An address as a setting: parsed from text, or the reason it does not parse.
trait AddrSetting: Sized {
    fn parse_setting(text: &str) -> Result<Self, &'static str>;
}

impl AddrSetting for SocketAddr {
    fn parse_setting(text: &str) -> Result<Self, &'static str> {
        text.parse()
            .map_err(|_| "expected IP:PORT, e.g. 127.0.0.1:7878 or [::1]:7878")
    }
}

impl AddrSetting for ListenAddr {
    fn parse_setting(text: &str) -> Result<Self, &'static str> {
        text.parse().map_err(|e: BadListenAddr| e.0)
    }
}

fn pick_optional_addr(
    name: &'static str,
    flag: Option<SocketAddr>,
    file: Option<String>,
) -> Result<Option<SocketAddr>, ConfigError> {
    match (flag, file) {
        (None, None) => Ok(None),
        (flag, file) => pick_addr(name, flag, file, "").map(Some),
    }
}

/// A certificate and its key, both or neither.
fn pick_tls(
    (cert_name, cert): (&'static str, Option<PathBuf>),
    (key_name, key): (&'static str, Option<PathBuf>),
) -> Result<Option<TlsFiles>, ConfigError> {
    match (cert, key) {
        (None, None) => Ok(None),
        (Some(cert), Some(key)) => Ok(Some(TlsFiles { cert, key })),
        (Some(_), None) => Err(ConfigError::TlsHalf {
            given: cert_name,
            missing: key_name,
        }),
        (None, Some(_)) => Err(ConfigError::TlsHalf {
            given: key_name,
            missing: cert_name,
        }),
    }
}

/// Octal permission bits, e.g. "0660" or "660", at most 0777.
fn pick_socket_mode(text: Option<String>) -> Result<Option<u32>, ConfigError> {
    let Some(text) = text else {
        return Ok(None);
    };
    u32::from_str_radix(&text, 8)
        .ok()
        .filter(|&mode| mode <= 0o777 && !text.is_empty())
        .map(Some)
        .ok_or(ConfigError::Invalid {
            name: "socket_mode",
            value: text,
            reason: "expected octal permission bits from 0 to 0777, e.g. \"0660\"",
        })
}

fn pick_fsync(flag: Option<FsyncPolicy>, file: Option<String>) -> Result<FsyncPolicy, ConfigError> {
    let from_file = file
        .map(|text| {
            text.parse().map_err(|_| ConfigError::Invalid {
                name: "fsync",
                value: text,
                reason: "expected \"never\" or \"always\"",
            })
        })
        .transpose()?;
    Ok(flag.or(from_file).unwrap_or_default())
}

fn seconds(name: &'static str, value: Option<f64>, default: f64) -> Result<Duration, ConfigError> {
    let secs = value.unwrap_or(default);
    Duration::try_from_secs_f64(secs)
        .ok()
        .filter(|d| *d <= Duration::from_secs(86_400 * 365))
        .ok_or_else(|| ConfigError::Invalid {
            name,
            value: secs.to_string(),
            reason: "must be a number of seconds from 0 to one year",
        })
}

fn check(
    name: &'static str,
    value: impl std::fmt::Display,
    ok: bool,
    reason: &'static str,
) -> Result<(), ConfigError> {
    if ok {
        Ok(())
    } else {
        Err(ConfigError::Invalid {
            name,
            value: value.to_string(),
            reason,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ledger_setting_is_a_file_unless_it_is_a_postgres_url() {
        let location = |text: &str| LedgerLocation::of(Path::new(text));
        assert_eq!(
            location("./data/ledger.bin"),
            LedgerLocation::File(PathBuf::from("./data/ledger.bin"))
        );
        for url in [
            "postgres://bank@db.example/forkpool",
            "postgresql:///forkpool?host=/run/postgresql",
            "PostgreSQL://db/forkpool",
        ] {
            assert_eq!(location(url), LedgerLocation::Postgres(url.to_owned()));
        }
        // Not a URL: a relative path that merely contains the word.
        assert_eq!(
            location("postgres/ledger.bin"),
            LedgerLocation::File(PathBuf::from("postgres/ledger.bin"))
        );
        let config = Config::load(&Cli::default()).expect("defaults are valid");
        assert_eq!(
            config.ledger_location(),
            LedgerLocation::File(PathBuf::from(DEFAULT_LEDGER_PATH))
        );
        let cli = Cli {
            ledger: Some(PathBuf::from("postgres://bank:secret@db/forkpool")),
            ledger_connections: Some(7),
            ledger_timeout: Some(0.5),
            ..Cli::default()
        };
        let config = Config::load(&cli).expect("a database URL is a ledger");
        let settings = config.postgres().expect("valid").expect("a database");
        assert_eq!(settings.target(), "db:5432/forkpool");
        assert_eq!(settings.connections, 7);
        assert_eq!(settings.deadline, Duration::from_millis(500));
        assert!(Config::load(&Cli::default())
            .expect("defaults")
            .postgres()
            .expect("valid")
            .is_none());
    }

    /// A database URL that cannot be used is refused at load, on one line, without the URL
    /// (it may hold a password).
    #[test]
    fn a_bad_ledger_url_is_refused_without_quoting_it() {
        for (url, says) in [
            (
                "postgres://bank:secret@db:notaport/forkpool",
                "does not parse",
            ),
            (
                "postgres://bank:secret@db/forkpool?sslmode=require",
                "sslmode=require",
            ),
            (
                "postgresql://bank:secret@db/x?connect_timeout=x",
                "does not parse",
            ),
        ] {
            let cli = Cli {
                ledger: Some(PathBuf::from(url)),
                ..Cli::default()
            };
            let err = Config::load(&cli).expect_err(url).to_string();
            assert!(err.starts_with("ledger: ") && err.contains(says), "{err}");
            assert!(!err.contains("secret") && !err.contains('\n'), "{err}");
        }
        let err = load_text("ledger_timeout = 0.001\n").unwrap_err();
        assert!(err.contains("ledger_timeout = 0.001"), "{err}");
    }

    #[test]
    fn defaults_need_no_file() {
        let config = Config::load(&Cli::default()).expect("defaults are valid");
        assert_eq!(config.echo_addr, DEFAULT_ECHO_ADDR.parse().unwrap());
        assert_eq!(config.backlog, 1024);
        assert_eq!(config.graceful_timeout, Duration::from_secs(30));
        assert!(config.workers >= 1);
    }

    /// deploy/forkpool.toml documents every setting at its default: it must parse with the
    /// real loader and give exactly the built-in defaults.
    #[test]
    fn the_example_config_file_shows_the_defaults() {
        let path = Path::new(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../deploy/forkpool.toml"
        ));
        let text = std::fs::read_to_string(path).expect("deploy/forkpool.toml exists");
        let file = parse_file(path, &text).expect("the example parses");
        let from_file = Config::merge(&Cli::default(), file).expect("the example is valid");
        let defaults = Config::load(&Cli::default()).expect("defaults are valid");
        assert_eq!(from_file, defaults);
    }

    /// Every key of deploy/forkpool.toml, commented-out ones included (`# workers = 2`).
    fn example_file_keys(text: &str) -> Vec<&str> {
        text.lines()
            .map(|line| line.trim_start_matches(['#', ' ']))
            .filter_map(|line| line.split_once(" = "))
            .map(|(key, _)| key)
            .filter(|key| key.bytes().all(|b| b.is_ascii_lowercase() || b == b'_'))
            .collect()
    }

    /// The keys the loader knows, read from `FileConfig`'s derived `Deserialize` (the field
    /// list serde hands to `deserialize_struct`), so a new setting cannot be forgotten here.
    fn known_keys() -> &'static [&'static str] {
        use serde::de::{self, Deserializer, Visitor};

        struct FieldCatcher(&'static [&'static str]);
        impl<'de> Deserializer<'de> for &mut FieldCatcher {
            type Error = de::value::Error;
            fn deserialize_any<V: Visitor<'de>>(self, _: V) -> Result<V::Value, Self::Error> {
                Err(de::Error::custom("FileConfig is a struct"))
            }
            fn deserialize_struct<V: Visitor<'de>>(
                self,
                _name: &'static str,
                fields: &'static [&'static str],
                _visitor: V,
            ) -> Result<V::Value, Self::Error> {
                self.0 = fields;
                Err(de::Error::custom("fields caught"))
            }
            serde::forward_to_deserialize_any! {
                bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string bytes
                byte_buf option unit unit_struct newtype_struct seq tuple tuple_struct map
                enum identifier ignored_any
            }
        }
        let mut catcher = FieldCatcher(&[]);
        let _ = FileConfig::deserialize(&mut catcher);
        assert!(!catcher.0.is_empty(), "FileConfig has fields");
        catcher.0
    }

    /// README promises that deploy/forkpool.toml lists every setting: its keys (commented or
    /// not) are exactly the loader's, each once; and every commented-out example is valid.
    #[test]
    fn the_example_config_file_lists_every_setting_once() {
        let path = Path::new(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../deploy/forkpool.toml"
        ));
        let text = std::fs::read_to_string(path).expect("deploy/forkpool.toml exists");
        let mut listed = example_file_keys(&text);
        listed.sort_unstable();
        let mut known = known_keys().to_vec();
        known.sort_unstable();
        assert_eq!(listed, known, "keys of deploy/forkpool.toml vs FileConfig");
        let uncommented: String = text
            .lines()
            .map(|line| match line.strip_prefix("# ") {
                Some(setting) if example_file_keys(setting).len() == 1 => setting,
                _ => line,
            })
            .map(|line| format!("{line}\n"))
            .collect();
        let file = parse_file(path, &uncommented).expect("the commented-out examples parse");
        Config::merge(&Cli::default(), file).expect("the commented-out examples are valid");
    }

    #[test]
    fn a_value_of_the_wrong_type_names_the_key_and_the_line() {
        let text = "backlog = 7\n\n  workers = \"three\"  # comment\n";
        let err = parse_file(Path::new("t.toml"), text).unwrap_err();
        assert_eq!(
            err.to_string(),
            "invalid config file t.toml, line 3, key workers: invalid type: string \"three\", \
             expected usize"
        );
        let err = parse_file(Path::new("t.toml"), "backlog = 7\nwrokers = 3\n").unwrap_err();
        assert!(
            err.to_string()
                .starts_with("invalid config file t.toml, line 2, key wrokers: unknown field"),
            "{err}"
        );
        let err = parse_file(Path::new("t.toml"), "a\n[[garbage").unwrap_err();
        assert!(
            err.to_string()
                .starts_with("invalid config file t.toml, line 1: "),
            "{err}"
        );
    }

    #[test]
    fn flags_win_over_the_file() {
        let file = parse_file(Path::new("t.toml"), "workers = 3\nbacklog = 7\n").unwrap();
        let cli = Cli {
            workers: Some(5),
            ..Cli::default()
        };
        let config = Config::merge(&cli, file).unwrap();
        assert_eq!((config.workers, config.backlog), (5, 7));
    }

    /// Each numeric setting is accepted at both ends of its range and refused just outside,
    /// with an error naming the setting; the reason states the range it checks.
    #[test]
    fn every_numeric_setting_is_checked_at_both_bounds() {
        let load = |name: &str, value: u64| {
            let text = format!("{name} = {value}\n");
            let file = parse_file(Path::new("t.toml"), &text).expect("a TOML integer");
            Config::merge(&Cli::default(), file)
        };
        for limit in &LIMITS {
            let (low, high) = (*limit.range.start(), *limit.range.end());
            assert!(load(limit.name, low).is_ok(), "{} = {low}", limit.name);
            assert!(load(limit.name, high).is_ok(), "{} = {high}", limit.name);
            assert!(
                limit.reason.contains(&high.to_string()),
                "{}: {}",
                limit.name,
                limit.reason
            );
            let outside = [low.checked_sub(1), high.checked_add(1)];
            for value in outside.into_iter().flatten() {
                let err = load(limit.name, value).expect_err(limit.name).to_string();
                assert!(err.contains(&format!("{} = {value}", limit.name)), "{err}");
            }
        }
    }

    /// The review's crash: a jitter of u64::MAX passed validation, then every worker divided
    /// by zero.
    #[test]
    fn a_huge_max_requests_jitter_is_refused() {
        let cli = Cli {
            max_requests: Some(1),
            max_requests_jitter: Some(u64::MAX),
            ..Cli::default()
        };
        let err = Config::load(&cli).unwrap_err().to_string();
        assert!(err.contains("max_requests_jitter"), "{err}");
    }

    #[test]
    fn durations_are_checked_at_their_bounds() {
        let with = |cli: Cli| Config::load(&cli).map(|_| ()).map_err(|e| e.to_string());
        let year = 86_400.0 * 365.0;
        for value in [0.0, year] {
            assert!(with(Cli {
                graceful_timeout: Some(value),
                ..Cli::default()
            })
            .is_ok());
            assert!(with(Cli {
                idle_timeout: Some(value),
                ..Cli::default()
            })
            .is_ok());
        }
        for value in [-0.5, year + 1.0, f64::NAN, f64::INFINITY] {
            let err = with(Cli {
                graceful_timeout: Some(value),
                ..Cli::default()
            });
            assert!(err.unwrap_err().contains("graceful_timeout"));
            let err = with(Cli {
                idle_timeout: Some(value),
                ..Cli::default()
            });
            assert!(err.unwrap_err().contains("idle_timeout"));
        }
        assert!(with(Cli {
            worker_timeout: Some(0.0),
            ..Cli::default()
        })
        .is_ok());
        assert!(with(Cli {
            worker_timeout: Some(0.1),
            ..Cli::default()
        })
        .is_ok());
        let err = with(Cli {
            worker_timeout: Some(0.05),
            ..Cli::default()
        });
        assert!(err.unwrap_err().contains("worker_timeout"));
    }

    /// Every setting the loader knows, as serde lists them when it meets an unknown one.
    fn loader_keys() -> std::collections::BTreeSet<String> {
        let err = parse_file(Path::new("t.toml"), "not_a_setting = 1\n").unwrap_err();
        let message = err.to_string();
        let expected = message
            .split_once("expected one of")
            .map(|(_, list)| list)
            .unwrap_or_else(|| panic!("serde lists the fields: {message}"));
        expected
            .split('`')
            .skip(1)
            .step_by(2)
            .map(str::to_string)
            .collect()
    }

    /// Every setting appears in deploy/forkpool.toml, set (at its default) or, for settings
    /// without a default value, commented out as `# name = ...`.
    #[test]
    fn the_example_config_file_lists_every_setting() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/forkpool.toml");
        let text = std::fs::read_to_string(path).expect("deploy/forkpool.toml exists");
        let listed: std::collections::BTreeSet<String> = text
            .lines()
            .map(|line| line.trim_start_matches('#').trim_start())
            .filter_map(|line| line.split_once(" = ").map(|(key, _)| key))
            .filter(|key| key.bytes().all(|b| b.is_ascii_lowercase() || b == b'_'))
            .map(str::to_string)
            .collect();
        let keys = loader_keys();
        assert!(keys.len() > 20, "{keys:?}");
        let missing: Vec<_> = keys.difference(&listed).collect();
        assert!(
            missing.is_empty(),
            "not in deploy/forkpool.toml: {missing:?}"
        );
        let unknown: Vec<_> = listed.difference(&keys).collect();
        assert!(unknown.is_empty(), "not settings: {unknown:?}");
    }

    fn load_text(text: &str) -> Result<Config, String> {
        let file = parse_file(Path::new("t.toml"), text).map_err(|e| e.to_string())?;
        Config::merge(&Cli::default(), file).map_err(|e| e.to_string())
    }

    #[test]
    fn listen_addresses_are_tcp_or_unix_paths() {
        assert_eq!(
            "127.0.0.1:1".parse(),
            Ok(ListenAddr::Tcp("127.0.0.1:1".parse().unwrap()))
        );
        assert_eq!(
            "unix:/run/fp/bank.sock".parse(),
            Ok(ListenAddr::Unix("/run/fp/bank.sock".into()))
        );
        let unix = ListenAddr::Unix("/run/x.sock".into());
        assert_eq!(unix.to_string(), "unix:/run/x.sock");
        assert_eq!(unix.to_string().parse(), Ok(unix));
        for bad in ["unix:", "localhost:80", "", "unix"] {
            assert!(bad.parse::<ListenAddr>().is_err(), "{bad:?}");
        }
        let long = format!("unix:/{}", "a".repeat(MAX_UNIX_PATH_BYTES));
        assert!(long.parse::<ListenAddr>().is_err());
        let err = load_text("echo_addr = \"unix:\"\n").unwrap_err();
        assert!(
            err.contains("echo_addr = unix:") && err.contains("needs a path"),
            "{err}"
        );
        load_text("bank_addr = \"unix:/tmp/b.sock\"\n").expect("a Unix bank");
        // TLS is for TCP: on a Unix socket it is refused, not ignored.
        let err = load_text(
            "bank_addr = \"unix:/tmp/b.sock\"\nbank_tls_cert = \"c.pem\"\nbank_tls_key = \"k.pem\"\n",
        )
        .unwrap_err();
        assert!(
            err.contains("bank_addr = unix:/tmp/b.sock") && err.contains("TLS"),
            "{err}"
        );
    }

    #[test]
    fn a_certificate_without_its_key_is_an_error_naming_both() {
        let err = load_text("echo_tls_cert = \"c.pem\"\n").unwrap_err();
        assert!(
            err.contains("echo_tls_cert") && err.contains("echo_tls_key"),
            "{err}"
        );
        let err = load_text("bank_tls_key = \"k.pem\"\n").unwrap_err();
        assert!(
            err.contains("bank_tls_key") && err.contains("bank_tls_cert"),
            "{err}"
        );
        let config =
            load_text("bank_tls_cert = \"c.pem\"\nbank_tls_key = \"k.pem\"\n").expect("a pair");
        let files = config.tls(ServiceKind::Bank).expect("bank TLS");
        assert_eq!(
            (files.cert.as_path(), files.key.as_path()),
            (Path::new("c.pem"), Path::new("k.pem"))
        );
        assert!(config.tls(ServiceKind::Echo).is_none());
        let cli = Cli {
            echo_tls_cert: Some("flag.pem".into()),
            ..Cli::default()
        };
        let file = parse_file(Path::new("t.toml"), "echo_tls_key = \"k.pem\"\n").unwrap();
        let config = Config::merge(&cli, file).expect("flag and file make a pair");
        assert_eq!(
            config.tls(ServiceKind::Echo).map(|f| f.cert.clone()),
            Some("flag.pem".into())
        );
    }

    /// The bank beyond loopback needs users or the explicit opt-out; loopback, IPv4-mapped
    /// loopback and Unix sockets do not.
    #[test]
    fn protected_mode_refuses_an_open_bank_beyond_loopback() {
        for addr in [
            "0.0.0.0:7879",
            "[::]:7879",
            "192.0.2.10:7879",
            "[2001:db8::1]:1",
        ] {
            let text = format!("bank_addr = \"{addr}\"\n");
            let err = load_text(&text).unwrap_err();
            assert!(
                err.contains("bank_open") && err.contains("users_file"),
                "{err}"
            );
            assert!(!err.contains('\n'), "one line: {err}");
            load_text(&format!("{text}bank_open = true\n")).expect("opted out");
            load_text(&format!("{text}users_file = \"u.toml\"\n")).expect("with users");
            let cli = Cli {
                bank_open: true,
                ..Cli::default()
            };
            let file = parse_file(Path::new("t.toml"), &text).unwrap();
            Config::merge(&cli, file).expect("--bank-open");
        }
        for addr in [
            "127.0.0.1:0",
            "127.9.9.9:1",
            "[::1]:0",
            "[::ffff:127.0.0.1]:0",
        ] {
            load_text(&format!("bank_addr = \"{addr}\"\n")).expect(addr);
        }
        assert!(ListenAddr::Unix("/run/b.sock".into()).is_local());
        let defaults = load_text("").expect("defaults");
        for kind in [ServiceKind::Bank, ServiceKind::Queue] {
            check_protected_mode(kind, &ListenAddr::Unix("/b".into()), &defaults)
                .expect("a Unix socket");
        }
        // The echo service moves no money.
        load_text("echo_addr = \"0.0.0.0:0\"\n").expect("echo anywhere");
    }

    /// The queue beyond loopback needs users or its own opt-out (bank_open is not it).
    #[test]
    fn protected_mode_refuses_an_open_queue_beyond_loopback() {
        let text = "queue_addr = \"0.0.0.0:7880\"\n";
        let err = load_text(text).unwrap_err();
        assert_eq!(
            err,
            "protected mode: the queue listens on 0.0.0.0:7880, beyond this \
             machine, with no users_file; set users_file, or queue_open = true to let anyone \
             who reaches it put, take and complete jobs"
        );
        assert!(load_text(&format!("{text}bank_open = true\n")).is_err());
        load_text(&format!("{text}queue_open = true\n")).expect("opted out");
        load_text(&format!("{text}users_file = \"u.toml\"\n")).expect("with users");
        let cli = Cli {
            queue_open: true,
            ..Cli::default()
        };
        let file = parse_file(Path::new("t.toml"), text).unwrap();
        Config::merge(&cli, file).expect("--queue-open");
    }

    #[test]
    fn the_queue_speaks_tls_with_its_own_pair_on_tcp_only() {
        let pair = "queue_tls_cert = \"q.pem\"\nqueue_tls_key = \"q.key\"\n";
        let config = load_text(pair).expect("a pair");
        let files = config.tls(ServiceKind::Queue).expect("queue TLS");
        assert_eq!(files.cert, Path::new("q.pem"));
        assert!(config.tls(ServiceKind::Bank).is_none());
        let err = load_text("queue_tls_key = \"q.key\"\n").unwrap_err();
        assert!(
            err.contains("queue_tls_key is set but queue_tls_cert"),
            "{err}"
        );
        let err = load_text(&format!("{pair}queue_addr = \"unix:/tmp/q.sock\"\n")).unwrap_err();
        assert!(
            err.starts_with("queue_addr = unix:/tmp/q.sock: TLS"),
            "{err}"
        );
    }

    #[test]
    fn socket_mode_is_octal_up_to_0777() {
        for (text, mode) in [("0660", 0o660), ("600", 0o600), ("0", 0), ("0777", 0o777)] {
            let config = load_text(&format!("socket_mode = \"{text}\"\n")).expect(text);
            assert_eq!(config.unix_socket.mode, Some(mode), "{text}");
        }
        for bad in ["0778", "1777", "rw-rw----", "", "-1", "0x1ff"] {
            let err = load_text(&format!("socket_mode = \"{bad}\"\n")).unwrap_err();
            assert!(err.contains("socket_mode"), "{err}");
        }
        let config = load_text("socket_group = \"forkpool\"\n").expect("a group");
        assert_eq!(config.unix_socket.group.as_deref(), Some("forkpool"));
    }

    #[test]
    fn unknown_and_bad_settings_are_errors_naming_them() {
        let err = parse_file(Path::new("t.toml"), "wrokers = 3\n").unwrap_err();
        assert!(err.to_string().contains("wrokers"), "{err}");
        let file = parse_file(Path::new("t.toml"), "echo_addr = \"nowhere\"\n").unwrap();
        let err = Config::merge(&Cli::default(), file).unwrap_err();
        assert!(err.to_string().contains("echo_addr = nowhere"), "{err}");
        let cli = Cli {
            workers: Some(0),
            ..Cli::default()
        };
        assert!(Config::load(&cli)
            .unwrap_err()
            .to_string()
            .contains("workers"));
        let cli = Cli {
            graceful_timeout: Some(-1.0),
            ..Cli::default()
        };
        assert!(Config::load(&cli)
            .unwrap_err()
            .to_string()
            .contains("graceful_timeout"));
    }

    #[test]
    fn proxy_protocol_names_services_flag_over_file_and_refuses_unknown_names() {
        let names = |list: &[&str]| list.iter().map(|name| name.to_string()).collect::<Vec<_>>();
        let services = |flag: Option<&[&str]>, file: Option<&[&str]>| {
            let (flag, file) = (flag.map(names), file.map(names));
            ProxiedServices::pick(flag.as_deref(), file.as_deref())
                .map(|set| ServiceKind::ALL.map(|kind| set.covers(kind)))
        };
        assert_eq!(
            services(None, None).ok(),
            Some([false, false, false]),
            "off by default"
        );
        assert_eq!(
            services(None, Some(&["bank"])).ok(),
            Some([false, true, false])
        );
        assert_eq!(
            services(Some(&["echo", "bank"]), Some(&["bank"])).ok(),
            Some([true, true, false])
        );
        assert_eq!(
            services(Some(&["none"]), Some(&["echo"])).ok(),
            Some([false, false, false]),
            "the flag turns the file's list off"
        );
        assert_eq!(services(None, Some(&[])).ok(), Some([false, false, false]));
        for (flag, file) in [
            (Some(&["bank", "http"][..]), None),
            (Some(&["Bank"][..]), None),
            (Some(&["none", "bank"][..]), None),
            (Some(&["bank"][..]), Some(&[""][..])),
        ] {
            let error = services(flag, file)
                .expect_err("an unknown service")
                .to_string();
            assert!(
                error.starts_with("invalid setting proxy_protocol = ")
                    && error.ends_with("expected service names (echo, bank, queue) or none"),
                "{error}"
            );
        }
        let cli = Cli::try_parse_from(["forkpool-server", "--proxy-protocol", "echo,bank"])
            .expect("a comma-separated list");
        let config = Config::load(&cli).expect("valid settings");
        assert!(config.proxy_protocol.covers(ServiceKind::Echo));
        assert!(config.proxy_protocol.covers(ServiceKind::Bank));
    }
}
