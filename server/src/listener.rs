//! Listening sockets, bound by the master before it forks.
//!
//! Each service gets one `SO_REUSEPORT` listener per worker slot: the kernel spreads new
//! connections over the slots by a hash of the peer address, and only the slot's own worker
//! wakes for them (no thundering herd). The master keeps every slot's socket open for its
//! whole life and hands it to each replacement worker of that slot, so connections queued
//! on a dead worker's socket wait for the replacement instead of being reset. See the
//! README's design section for the measurements behind this choice.

use std::io;
use std::net::{SocketAddr, TcpListener};

use socket2::{Domain, Socket, Type};

/// The listeners of one service: one per worker slot, all bound to the same address.
#[derive(Debug)]
pub struct ListenerGroup {
    /// The address actually bound (port 0 resolved).
    pub addr: SocketAddr,
    pub slots: Vec<TcpListener>,
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
    pub fn bind(addr: SocketAddr, count: usize, backlog: u32) -> Result<ListenerGroup, BindError> {
        let error = |source| BindError { addr, source };
        if addr.port() != 0 {
            probe_free(addr).map_err(error)?;
        }
        let first = bind_one(addr, backlog).map_err(error)?;
        let bound = first.local_addr().map_err(error)?;
        let mut slots = vec![first];
        for _ in 1..count {
            slots.push(bind_one(bound, backlog).map_err(error)?);
        }
        Ok(ListenerGroup { addr: bound, slots })
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

fn bind_one(addr: SocketAddr, backlog: u32) -> io::Result<TcpListener> {
    let socket = new_socket(addr)?;
    socket.set_reuse_port(true)?;
    socket.set_nodelay(true)?;
    socket.bind(&addr.into())?;
    socket.listen(i32::try_from(backlog).unwrap_or(i32::MAX))?;
    socket.set_nonblocking(true)?;
    Ok(socket.into())
}
