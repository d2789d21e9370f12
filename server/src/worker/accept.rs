//! The worker's accept path: its listening sockets (TCP or Unix), taking connections in
//! bounded batches, and pausing at the connection cap or when descriptors run out.
//!
//! Edge-triggered rules: a batch stops after [`ACCEPTS_PER_WAKEUP`] connections and the
//! listener is re-armed (re-registering reports a non-empty queue again), so a burst is
//! shared with the other workers and the open connections keep being served. At the cap the
//! listeners leave the poll (the kernel keeps queueing) and come back when a connection
//! closes; after EMFILE accepting pauses for [`ACCEPT_PAUSE`] instead of spinning.

use std::io;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, Instant};

use mio::net::{TcpListener, TcpStream, UnixListener, UnixStream};
use mio::{Interest, Registry, Token};
use nix::sys::socket::{
    getsockname, getsockopt, sockopt::PeerCredentials, AddressFamily, SockaddrLike, SockaddrStorage,
};

use super::{Worker, FIRST_CONN_TOKEN};
use crate::conn::Conn;
use crate::listener::ListeningSocket;
use crate::service::{ServiceKind, Session};
use crate::tls::{server_transport, Transport};
use crate::users::PeerKey;

/// Connections taken from a listener per wake-up.
const ACCEPTS_PER_WAKEUP: usize = 32;
/// After too many open files, accepting pauses this long instead of spinning.
pub(super) const ACCEPT_PAUSE: Duration = Duration::from_millis(100);

/// A listening socket of the worker, registered under its index as token.
pub(super) struct Listening {
    pub kind: ServiceKind,
    acceptor: Acceptor,
    pub registered: bool,
}

enum Acceptor {
    Tcp(TcpListener),
    Unix(UnixListener),
}

impl Listening {
    pub fn new(kind: ServiceKind, socket: ListeningSocket) -> Listening {
        let acceptor = match socket {
            ListeningSocket::Tcp(tcp) => Acceptor::Tcp(TcpListener::from_std(tcp)),
            ListeningSocket::Unix(unix) => Acceptor::Unix(UnixListener::from_std(unix)),
        };
        Listening {
            kind,
            acceptor,
            registered: false,
        }
    }

    fn source(&mut self) -> &mut dyn mio::event::Source {
        match &mut self.acceptor {
            Acceptor::Tcp(tcp) => tcp,
            Acceptor::Unix(unix) => unix,
        }
    }

    /// Registers (or re-arms) the listener under `token`.
    pub fn watch(&mut self, registry: &Registry, token: Token) -> io::Result<()> {
        let result = if self.registered {
            registry.reregister(self.source(), token, Interest::READABLE)
        } else {
            registry.register(self.source(), token, Interest::READABLE)
        };
        self.registered |= result.is_ok();
        result
    }

    /// Leaves the poll (the kernel keeps queueing).
    pub fn unwatch(&mut self, registry: &Registry) -> io::Result<()> {
        if self.registered {
            registry.deregister(self.source())?;
            self.registered = false;
        }
        Ok(())
    }

    /// The next queued connection and who it comes from.
    fn accept(&self) -> io::Result<(Transport, PeerKey)> {
        match &self.acceptor {
            Acceptor::Tcp(listener) => {
                let (stream, addr) = listener.accept()?;
                Ok((Transport::Plain(stream), PeerKey::Ip(addr.ip())))
            }
            Acceptor::Unix(listener) => {
                let (stream, _) = listener.accept()?;
                let uid = getsockopt(&stream.as_fd(), PeerCredentials)?.uid();
                Ok((Transport::Unix(stream), PeerKey::Uid(uid)))
            }
        }
    }
}

/// A connection socket received from another worker (a hand-over), as a plain-text
/// transport of its family, and who it comes from.
pub(super) fn adopted_socket(socket: OwnedFd) -> io::Result<(Transport, PeerKey)> {
    let local: SockaddrStorage = getsockname(socket.as_raw_fd())?;
    if local.family() == Some(AddressFamily::Unix) {
        let uid = getsockopt(&socket, PeerCredentials)?.uid();
        let stream = std::os::unix::net::UnixStream::from(socket);
        return Ok((
            Transport::Unix(UnixStream::from_std(stream)),
            PeerKey::Uid(uid),
        ));
    }
    let stream = std::net::TcpStream::from(socket);
    let peer = stream.peer_addr()?.ip();
    Ok((
        Transport::Plain(TcpStream::from_std(stream)),
        PeerKey::Ip(peer),
    ))
}

impl Worker {
    /// Accepts a bounded batch from listener `index`, re-arming it if it may hold more.
    pub(super) fn accept_batch(&mut self, index: usize, now: Instant) {
        let room = self
            .settings
            .config
            .max_connections
            .saturating_sub(self.conns.len())
            .min(ACCEPTS_PER_WAKEUP);
        let drained = self.accept_until_blocked(index, now, room);
        self.pause_or_resume_accepting(now);
        if !drained {
            if let Some(listening) = self.listeners.get_mut(index).filter(|l| l.registered) {
                if let Err(e) = listening.watch(self.poll.registry(), Token(index)) {
                    log::error!("cannot re-arm the {} listener: {e}", listening.kind.name());
                }
            }
        }
    }

    /// Accepts until the queue is empty (returns true) or `room` connections were taken or
    /// accepting must pause (returns false).
    pub(super) fn accept_until_blocked(
        &mut self,
        index: usize,
        now: Instant,
        mut room: usize,
    ) -> bool {
        let Some(kind) = self.listeners.get(index).map(|l| l.kind) else {
            return true;
        };
        while room > 0 {
            match self.listeners[index].accept() {
                Ok((stream, peer)) => {
                    room -= 1;
                    if std::mem::take(&mut self.short_of_descriptors) {
                        log::info!("accepting again");
                    }
                    log::debug!("accepted {} connection from {peer}", kind.name());
                    self.add_conn(stream, peer, kind, now);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return true,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if is_out_of_descriptors(&e) => {
                    if !self.short_of_descriptors {
                        log::warn!("accept: {e}; pausing accepts for {ACCEPT_PAUSE:?} at a time");
                        self.short_of_descriptors = true;
                    }
                    self.accept_paused_until = Some(now + ACCEPT_PAUSE);
                    return false;
                }
                // The client gave up while queued (ECONNABORTED and the like): next one.
                Err(e) => log::debug!("accept: {e}"),
            }
        }
        false
    }

    /// A new connection of `kind`: with a TLS session if the service speaks TLS.
    fn add_conn(&mut self, stream: Transport, peer: PeerKey, kind: ServiceKind, now: Instant) {
        let stream = match stream {
            Transport::Plain(tcp) => match server_transport(tcp, self.settings.tls(kind)) {
                Ok(stream) => stream,
                Err(e) => {
                    log::warn!("cannot start a TLS session: {e}");
                    return;
                }
            },
            other => other,
        };
        let entry = self.conns.vacant_entry();
        let token = Token(entry.key() + FIRST_CONN_TOKEN);
        let counters = self.cell.counters(kind);
        let session = Session::new(kind, self.sessions, peer, counters);
        let mut conn = Conn::new(stream, token, session, counters, now);
        if self.settings.config.proxy_protocol.covers(kind) {
            conn.expect_proxy_header(peer, now);
        }
        if let Err(e) = conn.register(self.poll.registry()) {
            log::warn!("cannot register a connection: {e}");
            return;
        }
        counters.accepted.fetch_add(1, Relaxed);
        counters.open_connections.fetch_add(1, Relaxed);
        entry.insert(conn);
    }

    /// Deregisters the listeners while at the connection cap or after EMFILE (so that the
    /// queue waits instead of waking us in a loop), and registers them again when a slot
    /// frees: registering reports a non-empty queue at once.
    pub(super) fn pause_or_resume_accepting(&mut self, now: Instant) {
        if self.accept_paused_until.is_some_and(|until| now >= until) {
            self.accept_paused_until = None;
        }
        let accept = self.conns.len() < self.settings.config.max_connections
            && self.accept_paused_until.is_none();
        let registry = self.poll.registry();
        for (index, listening) in self.listeners.iter_mut().enumerate() {
            if listening.registered == accept {
                continue;
            }
            let result = if accept {
                listening.watch(registry, Token(index))
            } else {
                listening.unwatch(registry)
            };
            if let Err(e) = result {
                log::error!(
                    "cannot change accepting on {} listener: {e}",
                    listening.kind.name()
                );
            }
        }
    }
}

fn is_out_of_descriptors(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM)
    )
}
