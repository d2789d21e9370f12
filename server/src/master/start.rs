//! How the master comes to be: the pid file claimed, the passed descriptors taken, every
//! listener bound, the ledger opened (and recovered), the event loop and the status page set
//! up, the link to the master this one replaces opened. Nothing is forked here; any failure is
//! a [`StartError`] naming what failed, and leaves nothing behind.

use std::ffi::OsString;
use std::io;
use std::sync::Arc;
use std::time::Instant;

use mio::{Interest, Poll};
use signal_hook::consts::{
    SIGCHLD, SIGHUP, SIGINT, SIGQUIT, SIGTERM, SIGTTIN, SIGTTOU, SIGUSR1, SIGUSR2,
};
use signal_hook_mio::v1_0::Signals;

use forkpool_queue::{Store, StoreOptions};

use super::{
    Master, MasterIo, Phase, ANNOUNCED_VERSION_VAR, PEER_TOKEN, SCOREBOARD_CELLS, SIGNAL_TOKEN,
    STATUS_HTTP_TOKENS,
};
use crate::broker::Broker;
use crate::channel::Channel;
use crate::config::{check_protected_mode, Cli, Config};
use crate::inherit;
use crate::ledger_store::LedgerStore;
use crate::listener::{ListenError, Listeners};
use crate::master_link::FORMAT_VERSION;
use crate::pidfile::PidFile;
use crate::pool::Pool;
use crate::status::StatusServer;
use crate::tls::ServiceTls;
use crate::upgrade::Takeover;
use crate::users::{Users, UsersError};

/// Why the master could not start; each names what failed.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Listen(#[from] ListenError),
    #[error(transparent)]
    Ledger(#[from] crate::ledger_store::LedgerStoreError),
    #[error(transparent)]
    Queue(#[from] forkpool_queue::StoreError),
    #[error(transparent)]
    PidFile(#[from] crate::pidfile::PidFileError),
    #[error(transparent)]
    Inherit(#[from] inherit::TakeError),
    #[error("cannot find this program's path (needed for USR2 upgrades): {0}")]
    CurrentExe(#[source] io::Error),
    #[error("cannot make the queue's wake-up socket: {0}")]
    Wakeup(#[source] io::Error),
    #[error("cannot set up the master's event loop: {0}")]
    EventLoop(#[source] io::Error),
    #[error("cannot listen on status address {addr}: {source}")]
    Status {
        addr: std::net::SocketAddr,
        #[source]
        source: io::Error,
    },
    #[error("cannot map the scoreboard: {0}")]
    Scoreboard(#[source] nix::Error),
    #[error(transparent)]
    Tls(#[from] crate::tls::CertError),
    #[error(transparent)]
    Users(#[from] crate::users::UsersError),
    #[error(transparent)]
    Unprotected(#[from] crate::config::ConfigError),
}

impl Master {
    /// Claims the pid file, binds every listener and opens the ledger; nothing is forked.
    pub fn new(cli: Cli, config: Config) -> Result<Master, StartError> {
        let mut pid_file = config.pid_file.as_deref().map(PidFile::claim).transpose()?;
        match Master::open(cli, config) {
            Ok(master) => Ok(Master {
                pid_file: pid_file.take(),
                ..master
            }),
            Err(e) => {
                // The file was created (or taken over) for a master that never started.
                if let Some(pid_file) = pid_file {
                    pid_file.remove();
                }
                Err(e)
            }
        }
    }

    fn open(cli: Cli, config: Config) -> Result<Master, StartError> {
        let exe = std::env::current_exe().map_err(StartError::CurrentExe)?;
        let args: Vec<OsString> = std::env::args_os().skip(1).collect();
        let tls = ServiceTls::load(&config)?;
        let users = load_users(&config)?;
        let mut inherited = inherit::take()?;
        let listeners = Listeners::open(&config, &mut inherited)?;
        // An inherited socket's address is systemd's (or the old master's), not ours:
        // protected mode applies to the address really served.
        for (kind, addr) in listeners.addrs() {
            check_protected_mode(kind, addr, &config)?;
        }
        let io = MasterIo::new(config.status_addr)?;
        let pool = Pool::new(config.workers, SCOREBOARD_CELLS).map_err(StartError::Scoreboard)?;
        // The ledger last: it logs what it opened, and a failed start is one line.
        let ledger = LedgerStore::open(&config, &mut inherited)?;
        let queue_options = StoreOptions {
            max_jobs: config.queue_max_jobs,
            max_payload: config.queue_max_payload,
            default_maxsize: config.queue_default_maxsize,
            fsync: config.fsync,
            ..StoreOptions::default()
        };
        let queue = match inherited.queue.take() {
            // A binary upgrade: the old master's workers use the store right now.
            Some(fd) => Store::adopt(
                fd,
                inherited.queue_guard.take(),
                &config.queue_store,
                &queue_options,
            )?,
            None => Store::open(&config.queue_store, &queue_options)?,
        };
        if let (Some(path), Some(users)) = (&config.users_file, &users) {
            log::info!("users file {}: {} users", path.display(), users.len());
        }
        let mut broker = Broker::new();
        if let Some(fd) = inherited.handover.take() {
            broker.add_predecessor(
                PEER_TOKEN,
                Channel::from_fd(fd),
                announced_version(),
                io.poll.registry(),
            );
        }
        Ok(Master {
            io,
            broker,
            tls,
            users,
            ledger,
            queue,
            wakeup: crate::wakeup::Wakeup::sender().map_err(StartError::Wakeup)?,
            unreleased: Vec::new(),
            listeners,
            pool,
            phase: Phase::Running,
            pid: nix::unistd::getpid(),
            pid_file: None,
            announced: false,
            next_inspection: Instant::now(),
            exe,
            args,
            upgrade: None,
            takeover: inherited.upgrade_from.map(Takeover::new),
            cli,
            config,
        })
    }
}

impl MasterIo {
    /// The master's poll with its signals and the status page.
    fn new(status_addr: Option<std::net::SocketAddr>) -> Result<MasterIo, StartError> {
        let event_loop = StartError::EventLoop;
        let poll = Poll::new().map_err(event_loop)?;
        let mut signals = Signals::new([
            SIGTERM, SIGINT, SIGQUIT, SIGCHLD, SIGHUP, SIGTTIN, SIGTTOU, SIGUSR1, SIGUSR2,
        ])
        .map_err(event_loop)?;
        poll.registry()
            .register(&mut signals, SIGNAL_TOKEN, Interest::READABLE)
            .map_err(event_loop)?;
        let status_http = status_addr
            .map(|addr| {
                StatusServer::bind(addr, poll.registry(), STATUS_HTTP_TOKENS)
                    .map_err(|source| StartError::Status { addr, source })
            })
            .transpose()?;
        Ok(MasterIo {
            poll,
            signals,
            status_http,
        })
    }
}

/// The hand-over format version this master announces to the old one after an upgrade:
/// ours, unless a test sets [`ANNOUNCED_VERSION_VAR`] to pretend otherwise.
fn announced_version() -> u8 {
    std::env::var(ANNOUNCED_VERSION_VAR)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(FORMAT_VERSION)
}

/// The bank's users, if `config` names a users file.
pub(super) fn load_users(config: &Config) -> Result<Option<Arc<Users>>, UsersError> {
    let Some(path) = config.users_file.as_deref() else {
        return Ok(None);
    };
    Ok(Some(Arc::new(Users::load(path)?)))
}
