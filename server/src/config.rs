//! Settings: command-line flags and an optional TOML file merged into one validated
//! [`Config`]. Flags win over the file, the file wins over the defaults, and the defaults live
//! here only (`deploy/forkpool.toml` documents the same values; a test keeps them in step).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::Parser;
use forkpool_ledger::{FsyncPolicy, DEFAULT_MAX_ACCOUNTS, MAX_MAX_ACCOUNTS};
use serde::Deserialize;

use crate::listener::AcceptMode;

pub const DEFAULT_ECHO_ADDR: &str = "127.0.0.1:7878";
pub const DEFAULT_BANK_ADDR: &str = "127.0.0.1:7879";
pub const DEFAULT_BACKLOG: u32 = 1024;
pub const DEFAULT_GRACEFUL_TIMEOUT_SECS: f64 = 30.0;
pub const DEFAULT_IDLE_TIMEOUT_SECS: f64 = 300.0;
pub const DEFAULT_MAX_CONNECTIONS: usize = 16_384;
pub const DEFAULT_MAX_LINE_BYTES: usize = 64 * 1024;
pub const DEFAULT_OUTPUT_LIMIT_BYTES: usize = 1024 * 1024;
pub const DEFAULT_WORKER_TIMEOUT_SECS: f64 = 30.0;
pub const DEFAULT_LEDGER_PATH: &str = "./data/ledger.bin";
/// The most worker processes one master will run (a bound on everything sized per worker).
pub const MAX_WORKERS: usize = 1024;

/// Pre-forking TCP server: an uppercase echo service and a shared-memory bank ledger.
///
/// Settings come from these flags, then from the TOML file given with --config, then from
/// the built-in defaults. Signals to the master: TERM/INT drain gracefully (a second one stops
/// at once), QUIT stops at once.
#[derive(Debug, Parser, Default)]
#[command(name = "forkpool-server", version, about, long_about = None)]
pub struct Cli {
    /// TOML file with settings (same names as the flags, with `_` for `-`).
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Address of the echo service (IPv4 or [IPv6]:port; port 0 picks a free port).
    /// [default: 127.0.0.1:7878]
    #[arg(long, value_name = "ADDR")]
    pub echo_addr: Option<SocketAddr>,
    /// Address of the bank service. [default: 127.0.0.1:7879]
    #[arg(long, value_name = "ADDR")]
    pub bank_addr: Option<SocketAddr>,
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
    /// File holding the bank ledger (created if missing). [default: ./data/ledger.bin]
    #[arg(long, value_name = "PATH")]
    pub ledger: Option<PathBuf>,
    /// Capacity of the ledger, in accounts (must match an existing ledger file).
    /// [default: 65536]
    #[arg(long, value_name = "N")]
    pub max_accounts: Option<u64>,
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
    /// Durability of each bank operation: `never` (page cache: survives any process death,
    /// not a power loss) or `always` (on disk before the reply). [default: never]
    #[arg(long, value_name = "POLICY")]
    pub fsync: Option<FsyncPolicy>,
}

/// The settings file: every field optional, unknown names rejected (a typo is an error,
/// not a silently ignored setting).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    pub echo_addr: Option<String>,
    pub bank_addr: Option<String>,
    pub workers: Option<usize>,
    pub backlog: Option<u32>,
    pub graceful_timeout: Option<f64>,
    pub idle_timeout: Option<f64>,
    pub max_connections: Option<usize>,
    pub max_line: Option<usize>,
    pub output_limit: Option<usize>,
    pub ledger: Option<PathBuf>,
    pub max_accounts: Option<u64>,
    pub fsync: Option<String>,
    pub accept: Option<AcceptMode>,
    pub worker_timeout: Option<f64>,
    pub max_requests: Option<u64>,
    pub max_requests_jitter: Option<u64>,
    pub pid_file: Option<PathBuf>,
    pub status_addr: Option<String>,
}

/// Every setting, validated.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    pub echo_addr: SocketAddr,
    pub bank_addr: SocketAddr,
    pub workers: usize,
    pub backlog: u32,
    pub graceful_timeout: Duration,
    /// `None`: idle connections stay open.
    pub idle_timeout: Option<Duration>,
    pub max_connections: usize,
    pub max_line: usize,
    pub output_limit: usize,
    pub ledger: PathBuf,
    pub max_accounts: u64,
    pub fsync: FsyncPolicy,
    pub accept: AcceptMode,
    /// `None`: hang detection off.
    pub worker_timeout: Option<Duration>,
    /// 0: workers are never recycled.
    pub max_requests: u64,
    pub max_requests_jitter: u64,
    pub pid_file: Option<PathBuf>,
    pub status_addr: Option<SocketAddr>,
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
}

impl Config {
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
                cli.echo_addr,
                file.echo_addr,
                DEFAULT_ECHO_ADDR,
            )?,
            bank_addr: pick_addr(
                "bank_addr",
                cli.bank_addr,
                file.bank_addr,
                DEFAULT_BANK_ADDR,
            )?,
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
            max_accounts: cli
                .max_accounts
                .or(file.max_accounts)
                .unwrap_or(DEFAULT_MAX_ACCOUNTS),
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
        };
        config.validate()?;
        Ok(config)
    }

    fn validate(&self) -> Result<(), ConfigError> {
        check(
            "workers",
            self.workers,
            (1..=MAX_WORKERS).contains(&self.workers),
            "must be 1 to 1024",
        )?;
        check(
            "backlog",
            self.backlog,
            (1..=65_535).contains(&self.backlog),
            "must be 1 to 65535",
        )?;
        check(
            "max_connections",
            self.max_connections,
            self.max_connections >= 1,
            "must be at least 1",
        )?;
        check(
            "max_line",
            self.max_line,
            self.max_line >= 1,
            "must be at least 1",
        )?;
        check(
            "output_limit",
            self.output_limit,
            self.output_limit >= 1,
            "must be at least 1",
        )?;
        check(
            "max_accounts",
            self.max_accounts,
            (1..=MAX_MAX_ACCOUNTS).contains(&self.max_accounts),
            "must be from 1 to the ledger's limit",
        )?;
        check(
            "ledger",
            self.ledger.display(),
            !self.ledger.as_os_str().is_empty(),
            "must not be empty",
        )?;
        if self.echo_addr == self.bank_addr && self.echo_addr.port() != 0 {
            return Err(ConfigError::Invalid {
                name: "bank_addr",
                value: self.bank_addr.to_string(),
                reason: "must differ from echo_addr",
            });
        }
        Ok(())
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
fn pick_addr(
    name: &'static str,
    flag: Option<SocketAddr>,
    file: Option<String>,
    default: &str,
) -> Result<SocketAddr, ConfigError> {
    let parse = |text: &str| {
        text.parse().map_err(|_| ConfigError::Invalid {
            name,
            value: text.to_string(),
            reason: "expected IP:PORT, e.g. 127.0.0.1:7878 or [::1]:7878",
        })
    };
    let from_file = file.as_deref().map(parse).transpose()?;
    match (flag, from_file) {
        (Some(addr), _) | (None, Some(addr)) => Ok(addr),
        (None, None) => parse(default),
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
}
