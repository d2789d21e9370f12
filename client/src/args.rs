//! Command-line arguments: what to load, how hard, for how long. Parsing and validation only;
//! nothing here touches the network.

use std::net::{SocketAddr, ToSocketAddrs};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::{Args, Parser, Subcommand};

use crate::load::{Mix, Text};
use crate::tls::{ClientTls, Trust};

/// Default address of forkpool's echo service.
pub const DEFAULT_ECHO_ADDR: &str = "127.0.0.1:7878";
/// Default address of forkpool's bank service.
pub const DEFAULT_BANK_ADDR: &str = "127.0.0.1:7879";
/// Run length when neither `--duration` nor `--requests` is given.
const DEFAULT_DURATION_S: f64 = 10.0;
/// Hard cap on the measured window of a `--requests` run without `--duration`.
const DEFAULT_REQUESTS_CAP_S: f64 = 60.0;

macro_rules! exit_codes {
    () => {
        "\
Exit status:
  0  clean run: every reply checked and correct, no network error
  1  verification failure: an echo reply differed from the uppercase of the request, a bank
     reply was malformed or an unexpected error, or the final AUDIT differs from the expected
     total by more than the operations with unknown outcome can explain; a queue reply was
     malformed or an error, a job's payload was damaged or never put, a job was delivered
     again without a dropped consumer connection to explain it, or a job put was never done
  2  usage error, or the run could not start: an address that refuses or never accepts a
     connection (within --timeout), or a failed bank setup
  3  no verification failure, but the run was degraded: connect errors, resets (an EOF in the
     middle of a reply counts as one) or timeouts were counted, no request completed in the
     measured window, the final AUDIT could not be taken, or queue jobs were left undone that
     dropped connections explain (redis, unlike forkpool and beanstalkd, never delivers again
     the job of a consumer that went away)

A clean close by the server (EOF at a reply boundary, as a draining worker does) is not an
error: the connection is reopened, unanswered echo requests are sent again (counted as
`retried`), and unanswered bank operations are booked as of unknown outcome. With
--no-reconnect it is: the connection stays closed and the run is degraded (3).

Two counts: `requests` (JSON `requests`, also `counters.completed`) are the replies received
in the measured window, which the throughput and latency figures describe; `checked` (JSON
`counters.replies`) is every reply verified, those of the warm-up and those still in flight
when the window closed included, so it is at least `requests`."
    };
}
const EXIT_CODES: &str = exit_codes!();

/// Load-test client for forkpool-server: drives many connections over non-blocking sockets,
/// checks every reply, and reports latency, throughput and (with --server-pid) the server's
/// CPU time per request. `echo` is the default mode: `forkpool-bench -c 10` is
/// `forkpool-bench echo -c 10`.
#[derive(Parser, Debug)]
#[command(version, about, long_about = None, after_help = concat!(
    "Without a subcommand, echo runs: `forkpool-bench -c 10` is `forkpool-bench echo -c 10`.\n\n",
    exit_codes!()
))]
pub struct Cli {
    #[command(subcommand)]
    pub mode: Mode,
}

/// The three services.
#[derive(Subcommand, Debug)]
pub enum Mode {
    /// Uppercase echo: random lines (multi-byte UTF-8 mixed in, or ASCII only with
    /// `--text ascii`), each reply checked byte for byte.
    #[command(
        next_line_help = true,
        after_help = EXIT_CODES,
        mut_arg("addr", |a| a.help(addr_help(DEFAULT_ECHO_ADDR)))
    )]
    Echo(EchoArgs),
    /// Bank: opens accounts, runs a mix of transfers, deposits and withdrawals, then checks
    /// AUDIT against the acknowledged operations. Assumes nobody else writes to the ledger
    /// during the run.
    #[command(
        next_line_help = true,
        after_help = EXIT_CODES,
        mut_arg("addr", |a| a.help(addr_help(DEFAULT_BANK_ADDR)))
    )]
    Bank(BankArgs),
    /// Queue: producers PUT jobs, consumers GET each and mark it DONE; every payload carries
    /// its producer, sequence number and a checksum, and at the end every job put must have
    /// been done. Speaks forkpool's queue, beanstalkd or redis (`--protocol`).
    #[command(next_line_help = true, after_help = EXIT_CODES)]
    Queue(QueueArgs),
}

/// The help of `--addr`, with the mode's default.
fn addr_help(default: &str) -> String {
    format!(
        "Server address (host:port); repeated, the connections are spread over the addresses \
         round-robin (instances sharing one ledger) [default: {default}]"
    )
}

/// Load shape shared by both modes.
#[derive(Args, Debug, Clone)]
pub struct LoadArgs {
    /// Server addresses (host:port); each mode sets its own help with its default.
    #[arg(long)]
    pub addr: Vec<String>,
    /// Number of connections kept open.
    #[arg(short = 'c', long, default_value_t = 50, value_parser = clap::value_parser!(u32).range(1..))]
    pub connections: u32,
    /// Requests in flight per connection (pipelining depth).
    #[arg(short = 'P', long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=4096))]
    pub pipeline: u32,
    /// Seconds to measure (after the warm-up). With --requests: a cap on the measured window
    /// [default: 10, or 60 with --requests]
    #[arg(short = 'd', long)]
    pub duration: Option<f64>,
    /// Stop after this many measured requests (or at --duration, whichever comes first).
    #[arg(short = 'n', long, value_parser = clap::value_parser!(u64).range(1..))]
    pub requests: Option<u64>,
    /// Seconds of load before the measured window (not counted).
    #[arg(long, default_value_t = 0.0)]
    pub warmup: f64,
    /// Client threads, each polling its share of the connections [default: number of CPUs]
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..))]
    pub threads: Option<u32>,
    /// Open loop at this many requests per second overall; latency is measured from when each
    /// request was due, so a stalled server shows in the percentiles. Without it: closed loop,
    /// as fast as replies come back.
    #[arg(long)]
    pub rate: Option<f64>,
    /// Seconds to wait for a connection or for a reply before the connection is counted as
    /// timed out, dropped and reconnected; also the longest wait for replies still in flight
    /// when the window ends.
    #[arg(long, default_value_t = 2.0)]
    pub timeout: f64,
    #[command(flatten)]
    pub output: Output,
    /// Seed of the payload and operation generator (the same seed gives the same requests).
    #[arg(long)]
    pub seed: Option<u64>,
    /// Speak TLS to the server (needs --tls-ca or --tls-insecure).
    #[arg(long)]
    pub tls: bool,
    /// With --tls: trust the CA certificates (PEM) in this file.
    #[arg(
        long,
        value_name = "FILE",
        requires = "tls",
        conflicts_with = "tls_insecure"
    )]
    pub tls_ca: Option<std::path::PathBuf>,
    /// With --tls: accept any certificate (self-signed test certificates; no protection
    /// against a man in the middle).
    #[arg(long, requires = "tls")]
    pub tls_insecure: bool,
    /// With --tls: the name the certificate must carry. [default: the host of the first --addr]
    #[arg(long, value_name = "NAME", requires = "tls")]
    pub tls_server_name: Option<String>,
    /// Treat a clean close by the server as an error: the connection is not reopened and the
    /// run is degraded (exit 3). For checking that replacing workers goes unnoticed.
    #[arg(long)]
    pub no_reconnect: bool,
}

/// What every mode reports besides its own figures.
#[derive(Args, Debug, Clone)]
pub struct Output {
    /// Sample utime+stime of this process and all its descendants at the start and end of the
    /// measured window and report the server's CPU microseconds per request (per job in queue
    /// mode). Repeated (one per instance, with several --addr): their CPU is summed.
    #[arg(long)]
    pub server_pid: Vec<u32>,
    /// Print one JSON object with every figure instead of the text report.
    #[arg(long)]
    pub json: bool,
}

/// `forkpool-bench echo`.
#[derive(Args, Debug, Clone)]
pub struct EchoArgs {
    #[command(flatten)]
    pub load: LoadArgs,
    /// Bytes per request line on the wire, the final newline included.
    #[arg(long, default_value_t = 16, value_parser = clap::value_parser!(u32).range(1..=16 * 1024 * 1024))]
    pub size: u32,
    /// What the lines are made of: `mixed` (mostly ASCII, about one character in eight
    /// multi-byte UTF-8) or `ascii` (for servers that only uppercase ASCII).
    // The values are explained above: listing them again with their own help would switch
    // `echo --help` to clap's long layout, unlike `bank --help`.
    #[arg(long, value_enum, default_value_t = Text::Mixed, hide_possible_values = true)]
    pub text: Text,
}

/// `forkpool-bench bank`.
#[derive(Args, Debug, Clone)]
pub struct BankArgs {
    #[command(flatten)]
    pub load: LoadArgs,
    /// Number of accounts the run opens (or reuses) and spreads its operations over.
    #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u32).range(2..=1_000_000))]
    pub accounts: u32,
    /// Amount deposited into each account before the run.
    #[arg(long, default_value_t = 1_000_000, value_parser = clap::value_parser!(u64).range(1..=1_000_000_000_000))]
    pub opening_balance: u64,
    /// Operation mix as relative weights, e.g. `transfer=80,deposit=10,withdraw=10`; `balance`
    /// may be given too. Amounts are 1 to 100.
    #[arg(long, default_value = "transfer=80,deposit=10,withdraw=10")]
    pub mix: Mix,
    /// Account names are PREFIX-0 .. PREFIX-(N-1).
    #[arg(long, default_value = "bench")]
    pub prefix: String,
    /// Authenticate every connection first (`AUTH USER TOKEN`, a server with a users file).
    #[arg(long, value_name = "USER:TOKEN", value_parser = parse_auth)]
    pub auth: Option<Auth>,
}

/// Default address of forkpool's queue service.
pub const DEFAULT_QUEUE_ADDR: &str = "127.0.0.1:7880";

/// The queue servers `forkpool-bench queue` speaks to.
#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    /// forkpool's queue service: `PUT`, `GET`, `DONE`.
    Forkpool,
    /// beanstalkd: `put`, `reserve-with-timeout`, `delete` in a tube of its own.
    Beanstalk,
    /// redis, the reliable-queue pattern: `LPUSH`, `BLMOVE` to a processing list, `LREM`.
    Redis,
}

impl Protocol {
    /// Its name on the command line.
    pub fn name(self) -> &'static str {
        match self {
            Protocol::Forkpool => "forkpool",
            Protocol::Beanstalk => "beanstalk",
            Protocol::Redis => "redis",
        }
    }

    /// The server's usual address.
    fn default_addr(self) -> &'static str {
        match self {
            Protocol::Forkpool => DEFAULT_QUEUE_ADDR,
            Protocol::Beanstalk => "127.0.0.1:11300",
            Protocol::Redis => "127.0.0.1:6379",
        }
    }
}

/// `forkpool-bench queue`.
#[derive(Args, Debug, Clone)]
pub struct QueueArgs {
    /// Server address (host:port) [default: 127.0.0.1:7880; beanstalkd 127.0.0.1:11300, redis
    /// 127.0.0.1:6379]
    #[arg(long)]
    pub addr: Option<String>,
    /// The server at --addr: forkpool, beanstalk or redis.
    #[arg(long, value_enum, default_value_t = Protocol::Forkpool, hide_possible_values = true)]
    pub protocol: Protocol,
    /// Producer connections; each has one PUT in flight at a time.
    #[arg(long, default_value_t = 16, value_parser = clap::value_parser!(u32).range(1..=4096))]
    pub producers: u32,
    /// Consumer connections; each GETs a job (waiting while the queue is empty), then DONEs it.
    #[arg(long, default_value_t = 16, value_parser = clap::value_parser!(u32).range(1..=4096))]
    pub consumers: u32,
    /// Bytes of each job's payload (its tag and checksum need 64 at most).
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u32).range(64..=65536))]
    pub size: u32,
    /// Producers wait while this many jobs are put and not yet done: the client keeps the
    /// queue's depth bounded, the same way for every server.
    #[arg(long, default_value_t = 256, value_parser = clap::value_parser!(u32).range(1..))]
    pub backlog: u32,
    /// Queue name (a beanstalkd tube; the redis keys NAME and NAME:processing) [default:
    /// bench-SEED, a fresh queue per run]
    #[arg(long)]
    pub queue: Option<String>,
    /// Seconds to measure (after the warm-up).
    #[arg(short = 'd', long, default_value_t = DEFAULT_DURATION_S)]
    pub duration: f64,
    /// Seconds of load before the measured window (not counted).
    #[arg(long, default_value_t = 0.0)]
    pub warmup: f64,
    /// Seconds to wait for a connection or a reply (beyond a GET's own wait) before the
    /// connection counts as timed out and is reopened; after the window, the consumers have
    /// this long to finish the jobs still queued.
    #[arg(long, default_value_t = 2.0)]
    pub timeout: f64,
    #[command(flatten)]
    pub output: Output,
    /// Seed of the default queue name.
    #[arg(long)]
    pub seed: Option<u64>,
}

/// The validated settings of a queue run.
#[derive(Debug, Clone)]
pub struct QueueSettings {
    pub addr: SocketAddr,
    pub protocol: Protocol,
    pub producers: usize,
    pub consumers: usize,
    pub size: usize,
    pub backlog: u64,
    pub queue: String,
    pub warmup: Duration,
    pub window: Duration,
    pub timeout: Duration,
    pub server_pids: Vec<u32>,
    pub seed: u64,
}

impl QueueArgs {
    /// Checks the flags and resolves the address.
    pub fn settings(&self) -> anyhow::Result<QueueSettings> {
        let addr_text = self.addr.as_deref().unwrap_or(self.protocol.default_addr());
        let addr = resolve(addr_text)?;
        let window = seconds("duration", self.duration)?;
        if window.is_zero() {
            bail!("--duration must be positive");
        }
        let timeout = seconds("timeout", self.timeout)?;
        if timeout < Duration::from_millis(10) {
            bail!("--timeout must be at least 0.01 s");
        }
        let seed = self.seed.unwrap_or_else(clock_seed);
        let queue = self
            .queue
            .clone()
            .unwrap_or_else(|| format!("bench-{seed}"));
        let valid = |b: u8| b.is_ascii_alphanumeric() || b"_.-".contains(&b);
        if queue.is_empty() || queue.len() > 64 || !queue.bytes().all(valid) {
            bail!("--queue {queue:?}: 1 to 64 bytes of [A-Za-z0-9_.-]");
        }
        Ok(QueueSettings {
            addr,
            protocol: self.protocol,
            producers: self.producers as usize,
            consumers: self.consumers as usize,
            size: self.size as usize,
            backlog: u64::from(self.backlog),
            queue,
            warmup: seconds("warmup", self.warmup)?,
            window,
            timeout,
            server_pids: self.output.server_pid.clone(),
            seed,
        })
    }
}

/// The first address `text` (host:port) resolves to.
fn resolve(text: &str) -> anyhow::Result<SocketAddr> {
    text.to_socket_addrs()
        .with_context(|| format!("--addr {text}: cannot resolve"))?
        .next()
        .with_context(|| format!("--addr {text}: resolves to no address"))
}

/// A bank user and its token (`--auth USER:TOKEN`).
#[derive(Debug, Clone)]
pub struct Auth {
    pub user: String,
    pub token: String,
}

impl Auth {
    /// The request line each connection sends first, and the reply it must get.
    pub fn greeting(&self) -> Greeting {
        Greeting {
            request: format!("AUTH {} {}\n", self.user, self.token).into_bytes(),
            reply: format!("OK {}\n", self.user).into_bytes(),
        }
    }
}

/// A request every connection sends before its load, and the one reply that must answer it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Greeting {
    pub request: Vec<u8>,
    pub reply: Vec<u8>,
}

fn parse_auth(text: &str) -> Result<Auth, String> {
    let (user, token) = text
        .split_once(':')
        .ok_or_else(|| "expected USER:TOKEN".to_string())?;
    let valid = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_graphic());
    if !valid(user) || !valid(token) {
        return Err("USER and TOKEN must be non-empty and without spaces".to_string());
    }
    Ok(Auth {
        user: user.to_string(),
        token: token.to_string(),
    })
}

/// The validated settings of one run.
#[derive(Debug, Clone)]
pub struct Settings {
    /// `--addr`, in the order given: never empty. Connection `i` goes to `addrs[i % len]`;
    /// the bank's setup and audit use the first.
    pub addrs: Vec<SocketAddr>,
    pub connections: usize,
    pub pipeline: usize,
    pub threads: usize,
    pub warmup: Duration,
    pub end: End,
    pub rate: Option<f64>,
    pub timeout: Duration,
    /// `--server-pid`, every one given (none: the server's CPU is not measured).
    pub server_pids: Vec<u32>,
    pub seed: u64,
    /// `--tls`: how to start each connection's session.
    pub tls: Option<Arc<ClientTls>>,
    /// `--no-reconnect`: a clean close by the server is an error, not reopened.
    pub no_reconnect: bool,
}

/// When the measured window ends.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum End {
    /// After this long.
    After(Duration),
    /// After this many measured requests, or at the cap, whichever first.
    Requests { count: u64, cap: Duration },
}

impl std::fmt::Display for End {
    /// For people: `10 s`, `50000 requests (at most 60 s)`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            End::After(d) => write!(f, "{} s", d.as_secs_f64()),
            End::Requests { count, cap } => {
                write!(f, "{count} requests (at most {} s)", cap.as_secs_f64())
            }
        }
    }
}

impl Settings {
    /// The first address: the bank's setup and final audit go there (the addresses share
    /// one ledger).
    pub fn first_addr(&self) -> SocketAddr {
        self.addrs[0]
    }

    /// The addresses as given, comma-separated (the report's `addr`).
    pub fn addrs_text(&self) -> String {
        let texts: Vec<String> = self.addrs.iter().map(ToString::to_string).collect();
        texts.join(",")
    }
}

impl End {
    /// The longest the measured window can last.
    pub fn max_window(self) -> Duration {
        match self {
            End::After(d) => d,
            End::Requests { cap, .. } => cap,
        }
    }
}

fn seconds(name: &str, value: f64) -> anyhow::Result<Duration> {
    Duration::try_from_secs_f64(value)
        .with_context(|| format!("--{name} {value}: not a number of seconds"))
}

impl LoadArgs {
    /// The TLS settings of `--tls`, the server name defaulting to the host of `addr_text`.
    fn client_tls(&self, addr_text: &str) -> anyhow::Result<Option<ClientTls>> {
        if !self.tls {
            return Ok(None);
        }
        let trust = match (&self.tls_ca, self.tls_insecure) {
            (Some(ca), false) => Trust::CaFile(ca),
            (None, true) => Trust::Insecure,
            _ => bail!("--tls needs --tls-ca FILE or --tls-insecure"),
        };
        let host = addr_text
            .rsplit_once(':')
            .map_or(addr_text, |(host, _)| host)
            .trim_start_matches('[')
            .trim_end_matches(']');
        let name = self.tls_server_name.as_deref().unwrap_or(host);
        ClientTls::new(trust, name).map(Some)
    }

    /// Checks the combination of flags and resolves the addresses.
    pub fn settings(&self, default_addr: &str) -> anyhow::Result<Settings> {
        let texts: Vec<&str> = if self.addr.is_empty() {
            vec![default_addr]
        } else {
            self.addr.iter().map(String::as_str).collect()
        };
        let addrs = texts
            .iter()
            .map(|text| resolve(text))
            .collect::<anyhow::Result<Vec<_>>>()?;
        let end = match (self.requests, self.duration) {
            (Some(count), cap) => End::Requests {
                count,
                cap: seconds("duration", cap.unwrap_or(DEFAULT_REQUESTS_CAP_S))?,
            },
            (None, d) => End::After(seconds("duration", d.unwrap_or(DEFAULT_DURATION_S))?),
        };
        if end.max_window().is_zero() {
            bail!("--duration must be positive");
        }
        let timeout = seconds("timeout", self.timeout)?;
        if timeout < Duration::from_millis(10) {
            bail!("--timeout must be at least 0.01 s");
        }
        if let Some(rate) = self.rate {
            if !(rate.is_finite() && rate > 0.0) {
                bail!("--rate {rate}: must be a positive number of requests per second");
            }
        }
        let connections = self.connections as usize;
        let cpus = std::thread::available_parallelism().map_or(1, usize::from);
        let threads = self.threads.map_or(cpus, |t| t as usize).min(connections);
        let seed = self.seed.unwrap_or_else(clock_seed);
        let tls = self.client_tls(texts[0])?.map(Arc::new);
        Ok(Settings {
            tls,
            addrs,
            connections,
            pipeline: self.pipeline as usize,
            threads,
            warmup: seconds("warmup", self.warmup)?,
            end,
            rate: self.rate,
            timeout,
            server_pids: self.output.server_pid.clone(),
            seed,
            no_reconnect: self.no_reconnect,
        })
    }
}

/// A seed that differs between runs: the wall clock mixed with the process id.
fn clock_seed() -> u64 {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    t.as_nanos() as u64 ^ u64::from(std::process::id()).rotate_left(32)
}

/// Parses the command line; `echo` is implied when the first argument is not a subcommand.
pub fn parse() -> Cli {
    Cli::parse_from(with_default_mode(std::env::args_os().collect()))
}

/// Inserts `echo` after the program name when the command line is empty or starts with an
/// option of echo's (`forkpool-bench -c 10`). A first word that is not an option is a mode,
/// known or not: clap then names an unknown one and shows the top-level usage.
fn with_default_mode(mut argv: Vec<std::ffi::OsString>) -> Vec<std::ffi::OsString> {
    let implied = match argv.get(1).map(|a| a.to_string_lossy()) {
        None => true,
        Some(first) => {
            first.starts_with('-') && !matches!(&*first, "-h" | "--help" | "-V" | "--version")
        }
    };
    if implied {
        argv.insert(1.min(argv.len()), "echo".into());
    }
    argv
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Cli {
        let argv = std::iter::once("forkpool-bench")
            .chain(args.iter().copied())
            .map(Into::into);
        Cli::try_parse_from(with_default_mode(argv.collect())).expect("valid command line")
    }

    #[test]
    fn echo_is_the_default_mode() {
        for args in [&[][..], &["-c", "3"], &["echo", "-c", "3"]] {
            assert!(matches!(parse(args).mode, Mode::Echo(_)), "{args:?}");
        }
        let Mode::Echo(echo) = parse(&["-c", "3", "-P", "16", "--size", "100"]).mode else {
            panic!("echo expected");
        };
        assert_eq!(
            (echo.load.connections, echo.load.pipeline, echo.size),
            (3, 16, 100)
        );
    }

    #[test]
    fn a_first_word_that_is_no_mode_is_not_taken_for_echo() {
        let argv = |args: &[&str]| -> Vec<std::ffi::OsString> {
            std::iter::once("forkpool-bench")
                .chain(args.iter().copied())
                .map(Into::into)
                .collect()
        };
        let err = Cli::try_parse_from(with_default_mode(argv(&["bogus"]))).unwrap_err();
        assert_eq!(err.kind(), clap::error::ErrorKind::InvalidSubcommand);
        for args in [&["--help"][..], &["-V"], &["help"], &["bank"]] {
            assert_eq!(with_default_mode(argv(args)), argv(args), "{args:?}");
        }
    }

    #[test]
    fn the_end_of_the_window_reads_plainly() {
        assert_eq!(End::After(Duration::from_secs(3)).to_string(), "3 s");
        assert_eq!(
            End::Requests {
                count: 50_000,
                cap: Duration::from_millis(60_500)
            }
            .to_string(),
            "50000 requests (at most 60.5 s)"
        );
    }

    #[test]
    fn defaults_resolve_to_a_ten_second_closed_loop() {
        let Mode::Echo(echo) = parse(&[]).mode else {
            panic!("echo expected")
        };
        let s = echo.load.settings(DEFAULT_ECHO_ADDR).expect("valid");
        assert_eq!(s.addrs, ["127.0.0.1:7878".parse().expect("addr")]);
        assert_eq!((s.connections, s.pipeline), (50, 1));
        assert_eq!(s.end, End::After(Duration::from_secs(10)));
        assert_eq!(s.rate, None);
    }

    #[test]
    fn a_repeated_addr_keeps_every_address_in_order() {
        let Mode::Bank(bank) = parse(&[
            "bank",
            "--addr",
            "127.0.0.1:9001",
            "--addr",
            "127.0.0.1:9002",
        ])
        .mode
        else {
            panic!("bank expected")
        };
        let s = bank.load.settings(DEFAULT_BANK_ADDR).expect("valid");
        let ports: Vec<u16> = s.addrs.iter().map(SocketAddr::port).collect();
        assert_eq!(ports, [9001, 9002]);
        assert_eq!(s.first_addr().port(), 9001);
        assert_eq!(s.addrs_text(), "127.0.0.1:9001,127.0.0.1:9002");
    }

    #[test]
    fn requests_mode_has_a_cap() {
        let Mode::Bank(bank) = parse(&["bank", "-n", "500"]).mode else {
            panic!("bank expected")
        };
        let s = bank.load.settings(DEFAULT_BANK_ADDR).expect("valid");
        assert_eq!(
            s.end,
            End::Requests {
                count: 500,
                cap: Duration::from_secs(60)
            }
        );
        assert_eq!(s.first_addr().port(), 7879);
        assert_eq!(bank.accounts, 100);
    }

    #[test]
    fn nonsense_is_refused() {
        let Mode::Echo(echo) = parse(&["--rate=-5"]).mode else {
            panic!("echo expected")
        };
        assert!(echo.load.settings(DEFAULT_ECHO_ADDR).is_err());
        let Mode::Echo(echo) = parse(&["-d", "0"]).mode else {
            panic!("echo expected")
        };
        assert!(echo.load.settings(DEFAULT_ECHO_ADDR).is_err());
        assert!(Cli::try_parse_from(["x", "echo", "-c", "0"]).is_err());
        assert!(Cli::try_parse_from(["x", "bank", "--mix", "transfer=x"]).is_err());
    }

    #[test]
    fn threads_never_outnumber_connections() {
        let Mode::Echo(echo) = parse(&["-c", "1", "--threads", "8"]).mode else {
            panic!()
        };
        assert_eq!(
            echo.load
                .settings(DEFAULT_ECHO_ADDR)
                .expect("valid")
                .threads,
            1
        );
    }
}
