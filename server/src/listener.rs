//! Listening sockets, bound by the master before it forks.
//!
//! In the default mode ([`AcceptMode::ReusePort`]) each service gets one `SO_REUSEPORT`
//! listener per worker slot: the kernel spreads new connections over the slots by a hash of
//! the peer address, and only the slot's own worker wakes for them (no thundering herd). The
//! master keeps every slot's socket open for its whole life and hands it to each replacement
//! worker of that slot, so connections queued on a dead worker's socket wait for the
//! replacement instead of being reset. [`AcceptMode::Shared`] binds one socket that every
//! worker accepts from. The README's design section gives the measurements behind the
//! default.

use std::io;
use std::net::{SocketAddr, TcpListener};
use std::os::fd::{AsRawFd, OwnedFd, RawFd};

use socket2::{Domain, Socket, Type};

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

/// The listeners of one service: one per worker slot, all bound to the same address.
#[derive(Debug)]
pub struct ListenerGroup {
    /// The address actually bound (port 0 resolved).
    pub addr: SocketAddr,
    mode: AcceptMode,
    backlog: u32,
    slots: Vec<TcpListener>,
    /// Passed in by systemd or by the previous master: the address is not ours to change.
    pub inherited: bool,
}

/// Why an inherited descriptor cannot serve as a listener.
#[derive(Debug, thiserror::Error)]
pub enum InheritError {
    #[error("an inherited descriptor is not a listening TCP socket")]
    NotListening,
    #[error("an inherited socket cannot be used: {source}")]
    Socket { source: io::Error },
}

/// Why a service could not listen.
#[derive(Debug, thiserror::Error)]
#[error("cannot listen on {addr}: {source}")]
pub struct BindError {
    pub addr: SocketAddr,
    pub source: io::Error,
}

impl ListenerGroup {
    /// Binds `count` listeners to `addr`.
    ///
    /// `SO_REUSEPORT` would let this group silently join the group of another server already
    /// listening there; a plain bind first fails with "address in use" in that case.
    pub fn bind(
        addr: SocketAddr,
        count: usize,
        backlog: u32,
        mode: AcceptMode,
    ) -> Result<ListenerGroup, BindError> {
        let error = |source| BindError { addr, source };
        let reuse_port = mode == AcceptMode::ReusePort;
        if reuse_port && addr.port() != 0 {
            probe_free(addr).map_err(error)?;
        }
        let first = bind_one(addr, backlog, reuse_port).map_err(error)?;
        let mut group = ListenerGroup {
            addr: first.local_addr().map_err(error)?,
            mode,
            backlog,
            slots: vec![first],
            inherited: false,
        };
        while group.slots.len() < count {
            group.add_slot().map_err(error)?;
        }
        Ok(group)
    }

    /// A group made of inherited listening sockets (socket activation, or a binary upgrade),
    /// resized to `count` slots. One socket without `SO_REUSEPORT` (what systemd passes) is
    /// shared by every worker; `SO_REUSEPORT` sockets (a previous master's slots) stay one
    /// per slot, and more are bound beside them if needed.
    pub fn inherit(
        fds: Vec<OwnedFd>,
        count: usize,
        backlog: u32,
    ) -> Result<ListenerGroup, InheritError> {
        let mut slots = Vec::with_capacity(fds.len());
        let mut reuse_port = true;
        for fd in fds {
            let socket = Socket::from(fd);
            let fd_error = |source| InheritError::Socket { source };
            if !socket.is_listener().map_err(fd_error)?
                || socket.r#type().map_err(fd_error)? != Type::STREAM
            {
                return Err(InheritError::NotListening);
            }
            reuse_port &= socket.reuse_port().map_err(fd_error)?;
            socket.set_nonblocking(true).map_err(fd_error)?;
            socket.set_cloexec(true).map_err(fd_error)?;
            slots.push(TcpListener::from(socket));
        }
        let first = slots.first().ok_or(InheritError::NotListening)?;
        let addr = first
            .local_addr()
            .map_err(|source| InheritError::Socket { source })?;
        let mode = if reuse_port {
            AcceptMode::ReusePort
        } else {
            AcceptMode::Shared
        };
        slots.truncate(if mode == AcceptMode::Shared { 1 } else { count });
        let group = ListenerGroup {
            addr,
            mode,
            backlog,
            slots,
            inherited: true,
        };
        group
            .resized(count)
            .map_err(|e| InheritError::Socket { source: e.source })
    }

    /// Adds a listener for one more worker slot (TTIN).
    pub fn add_slot(&mut self) -> io::Result<()> {
        let listener = self.new_slot()?;
        self.slots.push(listener);
        Ok(())
    }

    /// Closes the last slot's listener (TTOU): the kernel stops routing to it once its
    /// draining worker has closed its copy too.
    pub fn remove_slot(&mut self) {
        self.slots.pop();
    }

    /// The descriptors to hand to a new binary (a binary upgrade).
    pub fn raw_fds(&self) -> Vec<RawFd> {
        self.slots.iter().map(AsRawFd::as_raw_fd).collect()
    }

    /// The listener of slot `index` (in a forked worker).
    pub fn take_slot(&mut self, index: usize) -> Option<TcpListener> {
        (index < self.slots.len()).then(|| self.slots.swap_remove(index))
    }

    /// A group on the same sockets with `count` slots (a reload): the sockets kept are shared
    /// with this group, so their queues carry over without a refused connection.
    pub fn resized(&self, count: usize) -> Result<ListenerGroup, BindError> {
        let error = |source| BindError {
            addr: self.addr,
            source,
        };
        let mut group = ListenerGroup {
            addr: self.addr,
            mode: self.mode,
            backlog: self.backlog,
            slots: Vec::with_capacity(count),
            inherited: self.inherited,
        };
        for listener in self.slots.iter().take(count) {
            group.slots.push(listener.try_clone().map_err(error)?);
        }
        while group.slots.len() < count {
            group.add_slot().map_err(error)?;
        }
        Ok(group)
    }

    fn new_slot(&self) -> io::Result<TcpListener> {
        match self.mode {
            AcceptMode::ReusePort => bind_one(self.addr, self.backlog, true),
            AcceptMode::Shared => self
                .slots
                .first()
                .ok_or_else(|| io::Error::other("the shared listener is closed"))?
                .try_clone(),
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
