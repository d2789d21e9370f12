//! Listening sockets, bound by the master before it forks.
//!
//! In the default mode ([`AcceptMode::ReusePort`]) each service gets one `SO_REUSEPORT`
//! listener per worker slot: the kernel spreads new connections over the slots by a hash of
//! the peer address, and only the slot's own worker wakes for them (no thundering herd). The
//! master keeps every slot's socket open for its whole life and hands it to each replacement
//! worker of that slot, so connections queued on a dead worker's socket wait for the
//! replacement instead of being reset. [`AcceptMode::Shared`] binds one socket that every
//! worker accepts from. The README's design section gives the measurements behind the
//! default. A Unix-socket address (`unix:/path`) is one socket shared by every worker.

use std::io;
use std::net::{SocketAddr, TcpListener};
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixListener;

use socket2::{Domain, Socket, Type};

use crate::config::{Config, ListenAddr};
use crate::inherit::Inherited;
use crate::service::ServiceKind;
use crate::unix_listener::{bind_unix, UnixBindError};

/// A listening socket, TCP or Unix.
#[derive(Debug)]
pub enum ListeningSocket {
    Tcp(TcpListener),
    Unix(UnixListener),
}

impl ListeningSocket {
    fn try_clone(&self) -> io::Result<ListeningSocket> {
        Ok(match self {
            ListeningSocket::Tcp(tcp) => ListeningSocket::Tcp(tcp.try_clone()?),
            ListeningSocket::Unix(unix) => ListeningSocket::Unix(unix.try_clone()?),
        })
    }
}

impl AsRawFd for ListeningSocket {
    fn as_raw_fd(&self) -> RawFd {
        match self {
            ListeningSocket::Tcp(tcp) => tcp.as_raw_fd(),
            ListeningSocket::Unix(unix) => unix.as_raw_fd(),
        }
    }
}

/// How the workers share a service's address.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AcceptMode {
    /// One `SO_REUSEPORT` socket per worker slot: the kernel balances, one wake-up each.
    #[default]
    #[value(name = "reuseport")]
    #[serde(rename = "reuseport")]
    ReusePort,
    /// One socket shared by every worker: every idle worker wakes for each connection.
    Shared,
}

/// The listeners of one service, all bound to the same address: in reuseport mode at least
/// one per worker slot, in shared mode one for all.
#[derive(Debug)]
pub struct ListenerGroup {
    /// The address actually bound (port 0 resolved).
    pub addr: ListenAddr,
    mode: AcceptMode,
    backlog: u32,
    sockets: Vec<ListeningSocket>,
    /// Passed in by systemd or by the previous master: the address is not ours to change.
    inherited: bool,
}

/// Why an inherited descriptor cannot serve as a listener.
#[derive(Debug, thiserror::Error)]
pub enum InheritError {
    #[error("an inherited descriptor is not a listening TCP or Unix stream socket")]
    NotListening,
    #[error("an inherited socket cannot be used: {source}")]
    Socket { source: io::Error },
}

/// The listeners of every service, each a [`ListenerGroup`], and the pool size that decides
/// which worker slot accepts from which socket.
#[derive(Debug)]
pub struct Listeners {
    groups: Vec<(ServiceKind, ListenerGroup)>,
    pool_size: usize,
}

/// Why the master could not listen at start.
#[derive(Debug, thiserror::Error)]
pub enum ListenError {
    #[error(transparent)]
    Bind(#[from] BindError),
    #[error("{service}: {source}")]
    Inherit {
        service: &'static str,
        source: InheritError,
    },
}

impl Listeners {
    /// Every service's listeners: the inherited ones where there are any (socket activation,
    /// a binary upgrade), else bound to the configured address.
    pub fn open(config: &Config, inherited: &mut Inherited) -> Result<Listeners, ListenError> {
        let mut groups = Vec::new();
        for kind in ServiceKind::ALL {
            let fds = inherited.take_listeners(kind);
            let group = if fds.is_empty() {
                ListenerGroup::bind(config.listen_addr(kind), config, config.workers)?
            } else {
                let group = ListenerGroup::inherit(fds, config.workers, config.backlog).map_err(
                    |source| ListenError::Inherit {
                        service: kind.name(),
                        source,
                    },
                )?;
                log::info!("{} listens on inherited socket {}", kind.name(), group.addr);
                group
            };
            groups.push((kind, group));
        }
        Ok(Listeners {
            groups,
            pool_size: config.workers,
        })
    }

    /// The listeners a reload to `new` needs: the sockets of an address that did not change
    /// are kept (all of them), so no connection is refused or reset while workers are
    /// replaced; an inherited socket is always kept (its address is not ours to move; a
    /// request to move it is logged). Returns `None` if nothing changes.
    pub fn for_reload(&self, old: &Config, new: &Config) -> Result<Option<Listeners>, BindError> {
        let same = ServiceKind::ALL
            .iter()
            .all(|&kind| old.listen_addr(kind) == new.listen_addr(kind))
            && (self.pool_size, old.accept, old.backlog) == (new.workers, new.accept, new.backlog);
        if same {
            return Ok(None);
        }
        let mut groups = Vec::new();
        for (kind, group) in &self.groups {
            let addr = new.listen_addr(*kind);
            let keep =
                group.inherited || (new.accept == old.accept && addr_matches(&group.addr, addr));
            if group.inherited && !addr_matches(&group.addr, addr) {
                log::warn!(
                    "{} listens on an inherited socket ({}): {addr} is ignored until restart",
                    kind.name(),
                    group.addr
                );
            }
            let group = if keep {
                group.resized(new.workers)?
            } else {
                ListenerGroup::bind(addr, new, new.workers)?
            };
            groups.push((*kind, group));
        }
        Ok(Some(Listeners {
            groups,
            pool_size: new.workers,
        }))
    }

    /// A new pool size (TTIN, TTOU): binds what a larger pool needs (no socket is ever
    /// closed) and returns the slots (below the new size) whose sockets changed: their
    /// workers must be replaced to accept from the right ones. On failure nothing changes.
    pub fn resize(&mut self, count: usize) -> Result<Vec<usize>, BindError> {
        for (_, group) in &mut self.groups {
            group.grow_to(count)?;
        }
        let old = self.pool_size;
        self.pool_size = count;
        Ok((0..count)
            .filter(|&slot| {
                self.groups.iter().any(|(_, group)| {
                    let before: Vec<_> =
                        group.assigned(slot, old).map(AsRawFd::as_raw_fd).collect();
                    let after: Vec<_> = group
                        .assigned(slot, count)
                        .map(AsRawFd::as_raw_fd)
                        .collect();
                    before != after
                })
            })
            .collect())
    }

    /// The listeners of every service that slot `slot` accepts from (for the worker forked to
    /// serve it): duplicates, the master keeps its own.
    pub fn for_slot(&self, slot: usize) -> io::Result<Vec<(ServiceKind, ListeningSocket)>> {
        let mut listeners = Vec::new();
        for (kind, group) in &self.groups {
            for socket in group.assigned(slot, self.pool_size) {
                listeners.push((*kind, socket.try_clone()?));
            }
        }
        Ok(listeners)
    }

    /// Closes every listener (the master's copies, at a drain: a queue that nobody accepts
    /// from must not keep growing).
    pub fn close(&mut self) {
        self.groups.clear();
    }

    /// Every socket with its service's name, to pass to a new binary.
    pub fn named_fds(&self) -> Vec<(RawFd, &'static str)> {
        self.groups
            .iter()
            .flat_map(|(kind, group)| group.raw_fds().into_iter().map(|fd| (fd, kind.name())))
            .collect()
    }

    /// The address each service is bound to.
    pub fn addrs(&self) -> impl Iterator<Item = (ServiceKind, &ListenAddr)> + '_ {
        self.groups.iter().map(|(kind, group)| (*kind, &group.addr))
    }
}

/// Does a configured address (possibly port 0) name the socket bound as `bound`?
fn addr_matches(bound: &ListenAddr, configured: &ListenAddr) -> bool {
    match (bound, configured) {
        (ListenAddr::Tcp(bound), ListenAddr::Tcp(configured)) => {
            bound.ip() == configured.ip()
                && (configured.port() == 0 || bound.port() == configured.port())
        }
        (ListenAddr::Unix(bound), ListenAddr::Unix(configured)) => bound == configured,
        _ => false,
    }
}

/// Why a service could not listen.
#[derive(Debug, thiserror::Error)]
pub enum BindError {
    #[error("cannot listen on {addr}: {source}")]
    Tcp { addr: SocketAddr, source: io::Error },
    #[error(transparent)]
    Unix(#[from] UnixBindError),
}

impl ListenerGroup {
    /// Binds listeners to `addr` for a pool of `count` slots, as `config` says (accept mode,
    /// backlog, a Unix socket's mode and group).
    ///
    /// `SO_REUSEPORT` would let this group silently join the group of another server already
    /// listening there; a plain bind first fails with "address in use" in that case.
    pub fn bind(
        addr: &ListenAddr,
        config: &Config,
        count: usize,
    ) -> Result<ListenerGroup, BindError> {
        let (first, bound, mode) = match addr {
            ListenAddr::Tcp(addr) => {
                let addr = *addr;
                let error = |source| BindError::Tcp { addr, source };
                let reuse_port = config.accept == AcceptMode::ReusePort;
                if reuse_port && addr.port() != 0 {
                    probe_free(addr).map_err(error)?;
                }
                let first = bind_one(addr, config.backlog, reuse_port).map_err(error)?;
                let bound = first.local_addr().map_err(error)?;
                (
                    ListeningSocket::Tcp(first),
                    ListenAddr::Tcp(bound),
                    config.accept,
                )
            }
            ListenAddr::Unix(path) => {
                let socket = bind_unix(path, config.backlog, &config.unix_socket)?;
                socket
                    .set_nonblocking(true)
                    .map_err(|source| UnixBindError::Bind {
                        path: path.clone(),
                        source,
                    })?;
                (
                    ListeningSocket::Unix(socket),
                    addr.clone(),
                    AcceptMode::Shared,
                )
            }
        };
        let mut group = ListenerGroup {
            addr: bound,
            mode,
            backlog: config.backlog,
            sockets: vec![first],
            inherited: false,
        };
        group.grow_to(count)?;
        Ok(group)
    }

    /// A group made of inherited listening sockets (socket activation, or a binary upgrade)
    /// for a pool of `count` slots. One socket without `SO_REUSEPORT` (what systemd passes,
    /// or a Unix socket) is shared by every worker; `SO_REUSEPORT` sockets (a previous
    /// master's) are all kept, and more are bound beside them if the pool needs more.
    pub fn inherit(
        fds: Vec<OwnedFd>,
        count: usize,
        backlog: u32,
    ) -> Result<ListenerGroup, InheritError> {
        let fd_error = |source| InheritError::Socket { source };
        let mut sockets = Vec::with_capacity(fds.len());
        let mut addrs = Vec::with_capacity(fds.len());
        let mut reuse_port = true;
        for fd in fds {
            let socket = Socket::from(fd);
            if !socket.is_listener().map_err(fd_error)?
                || socket.r#type().map_err(fd_error)? != Type::STREAM
            {
                return Err(InheritError::NotListening);
            }
            socket.set_nonblocking(true).map_err(fd_error)?;
            socket.set_cloexec(true).map_err(fd_error)?;
            let local = socket.local_addr().map_err(fd_error)?;
            if socket.domain().map_err(fd_error)? == Domain::UNIX {
                let path = local.as_pathname().ok_or(InheritError::NotListening)?;
                addrs.push(ListenAddr::Unix(path.to_path_buf()));
                reuse_port = false;
                sockets.push(ListeningSocket::Unix(socket.into()));
            } else {
                let addr = local.as_socket().ok_or(InheritError::NotListening)?;
                addrs.push(ListenAddr::Tcp(addr));
                reuse_port &= socket.reuse_port().map_err(fd_error)?;
                sockets.push(ListeningSocket::Tcp(socket.into()));
            }
        }
        let addr = addrs.first().cloned().ok_or(InheritError::NotListening)?;
        if addrs.iter().any(|other| *other != addr) {
            return Err(InheritError::NotListening);
        }
        let mode = if reuse_port {
            AcceptMode::ReusePort
        } else {
            AcceptMode::Shared
        };
        let mut group = ListenerGroup {
            addr,
            mode,
            backlog,
            sockets,
            inherited: true,
        };
        group.grow_to(count).map_err(|e| match e {
            BindError::Tcp { source, .. } => InheritError::Socket { source },
            BindError::Unix(e) => InheritError::Socket {
                source: io::Error::other(e.to_string()),
            },
        })?;
        Ok(group)
    }

    /// Makes sure a pool of `count` slots has a socket per slot (reuseport; a shared group
    /// has its one socket). Sockets are never closed while the group lives: closing one
    /// would reset the connections queued on it.
    pub fn grow_to(&mut self, count: usize) -> Result<(), BindError> {
        let ListenAddr::Tcp(addr) = self.addr else {
            return Ok(());
        };
        while self.mode == AcceptMode::ReusePort && self.sockets.len() < count {
            let socket = bind_one(addr, self.backlog, true)
                .map_err(|source| BindError::Tcp { addr, source })?;
            self.sockets.push(ListeningSocket::Tcp(socket));
        }
        Ok(())
    }

    /// The sockets a pool of `count` slots gives to slot `slot`: in reuseport mode every
    /// socket whose index is `slot` modulo `count` (so a socket left by a smaller pool is
    /// served too), in shared mode the one socket.
    fn assigned(&self, slot: usize, count: usize) -> impl Iterator<Item = &ListeningSocket> {
        let shared = self.mode == AcceptMode::Shared;
        self.sockets
            .iter()
            .enumerate()
            .filter(move |(index, _)| shared || index % count.max(1) == slot)
            .map(|(_, socket)| socket)
    }

    /// The descriptors to hand to a new binary (a binary upgrade).
    pub fn raw_fds(&self) -> Vec<RawFd> {
        self.sockets.iter().map(AsRawFd::as_raw_fd).collect()
    }

    /// A group on the same sockets for a pool of `count` slots (a reload): every socket is
    /// shared with this group, so their queues carry over without a refused connection.
    pub fn resized(&self, count: usize) -> Result<ListenerGroup, BindError> {
        let mut sockets = Vec::with_capacity(self.sockets.len());
        for socket in &self.sockets {
            sockets.push(socket.try_clone().map_err(|source| self.error(source))?);
        }
        let mut group = ListenerGroup {
            addr: self.addr.clone(),
            mode: self.mode,
            backlog: self.backlog,
            sockets,
            inherited: self.inherited,
        };
        group.grow_to(count)?;
        Ok(group)
    }

    fn error(&self, source: io::Error) -> BindError {
        match &self.addr {
            ListenAddr::Tcp(addr) => BindError::Tcp {
                addr: *addr,
                source,
            },
            ListenAddr::Unix(path) => BindError::Unix(UnixBindError::Bind {
                path: path.clone(),
                source,
            }),
        }
    }
}

/// Fails if something already listens on `addr` (with `SO_REUSEADDR`, connections in
/// TIME_WAIT do not count).
fn probe_free(addr: SocketAddr) -> io::Result<()> {
    let socket = new_socket(addr)?;
    socket.bind(&addr.into())
}

fn new_socket(addr: SocketAddr) -> io::Result<Socket> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, None)?;
    socket.set_reuse_address(true)?;
    if addr.is_ipv6() {
        // Explicit: the system default (net.ipv6.bindv6only) varies between machines.
        socket.set_only_v6(true)?;
    }
    socket.set_cloexec(true)?;
    Ok(socket)
}

fn bind_one(addr: SocketAddr, backlog: u32, reuse_port: bool) -> io::Result<TcpListener> {
    let socket = new_socket(addr)?;
    socket.set_reuse_port(reuse_port)?;
    socket.set_nodelay(true)?;
    socket.bind(&addr.into())?;
    socket.listen(i32::try_from(backlog).unwrap_or(i32::MAX))?;
    socket.set_nonblocking(true)?;
    Ok(socket.into())
}
