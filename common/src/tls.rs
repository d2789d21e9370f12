//! A TLS session driven from a mio event loop, for the server's connections and the
//! load-test client's alike; the one module here that does I/O (the socket is the caller's,
//! the session rustls').
//!
//! rustls does no I/O of its own. [`TlsStream`] feeds it what the socket gives
//! (`read_tls`), lets it decrypt (`process_new_packets`), and writes its records while the
//! socket takes them (`write_tls`). Encrypted bytes the socket refused stay inside rustls:
//! the caller keeps WRITABLE interest while [`TlsStream::wants_write`] says so and calls
//! [`TlsStream::flush_tls`] on each writable event.
//!
//! [`Transport`] puts a plain socket and a TLS one behind the same `Read`/`Write`/`Source`
//! surface so that connection code is written once. Two rules differ from a bare socket and
//! are the caller's to follow (see [`Transport`]).

use std::io::{self, Read, Write};
use std::net::Shutdown;

use std::os::fd::{AsFd, BorrowedFd};

use mio::net::{TcpStream, UnixStream};
use mio::{Interest, Registry, Token};
use rustls::Connection;

/// How a TLS session failed. On a server, a failure during the handshake (a plain-text
/// client, an old or distrustful client, garbage) is the client's business: counted and
/// logged at debug. A failure afterwards is a broken or hostile peer.
#[derive(Debug, Clone, thiserror::Error)]
pub enum TlsError {
    #[error("TLS handshake failed: {0}")]
    Handshake(rustls::Error),
    #[error("TLS session failed: {0}")]
    Session(rustls::Error),
}

impl TlsError {
    pub fn is_handshake(&self) -> bool {
        matches!(self, TlsError::Handshake(_))
    }
}

/// The TLS failure inside an I/O error returned by [`Transport`]'s `Read`, if it is one
/// (to count handshake failures apart from socket errors).
pub fn tls_failure(error: &io::Error) -> Option<&TlsError> {
    error.get_ref()?.downcast_ref::<TlsError>()
}

/// What a read of decrypted bytes found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PlainRead {
    /// This many plaintext bytes were copied into the buffer.
    Data(usize),
    /// Nothing now: the socket is drained (a new readable edge will come).
    WouldBlock,
    /// The peer is done sending.
    Closed(PeerClose),
}

/// How the peer ended its side.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PeerClose {
    /// With a `close_notify` alert: everything it sent has arrived.
    CloseNotify,
    /// With a TCP FIN and no `close_notify` (common, and harmless for a line protocol
    /// whose last line's `\n` says it is complete).
    Truncated,
}

/// Where the sending side is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SendSide {
    Open,
    /// `close_notify` is queued: shut the TCP write side once it is out.
    Closing,
    Shut,
}

/// One TLS session (server or client side) over a non-blocking socket.
pub struct TlsStream {
    tcp: TcpStream,
    tls: Connection,
    /// The first fatal error, returned again by every later read (rustls is unusable after).
    failed: Option<TlsError>,
    /// The socket returned EOF.
    tcp_eof: bool,
    send: SendSide,
}

impl TlsStream {
    /// A session `tls` (a fresh `ServerConnection` or `ClientConnection`) over `tcp`.
    /// Nothing is read or written yet; a client's hello goes out on the first flush.
    pub fn new(tcp: TcpStream, tls: impl Into<Connection>) -> TlsStream {
        TlsStream {
            tcp,
            tls: tls.into(),
            failed: None,
            tcp_eof: false,
            send: SendSide::Open,
        }
    }

    /// Is the handshake still under way? Application data written meanwhile is held and
    /// sent, encrypted, once it completes.
    pub fn handshaking(&self) -> bool {
        self.tls.is_handshaking()
    }

    /// Are encrypted bytes waiting for the socket? Keep WRITABLE interest while so.
    pub fn wants_write(&self) -> bool {
        self.tls.wants_write()
    }

    /// The socket underneath (addresses, options, registration).
    pub fn tcp(&self) -> &TcpStream {
        &self.tcp
    }

    /// Copies decrypted bytes into `buf`, reading and decrypting from the socket as needed
    /// (and sending what the handshake has to say), until there is plaintext, the socket is
    /// drained (`WouldBlock`), or the peer is done (`Closed`). A TLS failure is an
    /// `InvalidData` error carrying a [`TlsError`], returned again by every later call.
    pub fn read_plain(&mut self, buf: &mut [u8]) -> Result<PlainRead, io::Error> {
        loop {
            if let Some(error) = &self.failed {
                return Err(io::Error::new(io::ErrorKind::InvalidData, error.clone()));
            }
            match self.tls.reader().read(buf) {
                Ok(0) if !buf.is_empty() => return Ok(PlainRead::Closed(PeerClose::CloseNotify)),
                Ok(n) => return Ok(PlainRead::Data(n)),
                Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => {
                    return Ok(PlainRead::Closed(PeerClose::Truncated))
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Err(e),
            }
            if self.tcp_eof {
                // rustls saw the EOF too and reports it above; this is a guard, not a path.
                return Ok(PlainRead::Closed(PeerClose::Truncated));
            }
            match self.tls.read_tls(&mut self.tcp) {
                Ok(0) => self.tcp_eof = true,
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    return Ok(PlainRead::WouldBlock)
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            }
            let handshaking = self.tls.is_handshaking();
            if let Err(error) = self.tls.process_new_packets() {
                // rustls has queued an alert telling the peer why: best effort.
                let _ = self.flush_tls();
                self.failed = Some(if handshaking {
                    TlsError::Handshake(error)
                } else {
                    TlsError::Session(error)
                });
                continue;
            }
            // The handshake's answers (ServerHello and the rest) go out as soon as they exist.
            self.flush_tls()?;
        }
    }

    /// Hands `data` to rustls for encryption and sends what the socket takes. Returns how many
    /// bytes rustls accepted: fewer than `data.len()` (even 0) once its buffer of unsent
    /// records is full; call again after a writable event.
    pub fn write_plain(&mut self, data: &[u8]) -> io::Result<usize> {
        self.flush_tls()?;
        let accepted = self.tls.writer().write(data)?;
        self.flush_tls()?;
        Ok(accepted)
    }

    /// Writes buffered TLS records until done or the socket is full (`wants_write` then
    /// stays true). Completes a pending [`TlsStream::shutdown`].
    pub fn flush_tls(&mut self) -> io::Result<()> {
        while self.tls.wants_write() {
            match self.tls.write_tls(&mut self.tcp) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        if self.send == SendSide::Closing {
            self.tcp.shutdown(Shutdown::Write)?;
            self.send = SendSide::Shut;
        }
        Ok(())
    }

    /// Ends the sending side: a `close_notify` alert, then the TCP write side once the alert
    /// is out (now, or in a later [`TlsStream::flush_tls`] while `wants_write`). After a
    /// failed session there is nothing to protect: the TCP write side is shut at once.
    pub fn shutdown(&mut self) -> io::Result<()> {
        if self.send != SendSide::Open {
            return Ok(());
        }
        if self.failed.is_none() {
            self.tls.send_close_notify();
        }
        self.send = SendSide::Closing;
        self.flush_tls()
    }
}

/// A connection's byte stream: a plain socket or a TLS session over one.
///
/// `Read` returns decrypted bytes with a bare socket's conventions (`WouldBlock` when
/// nothing is there, `Ok(0)` at the peer's end) and fills the buffer as far as the socket
/// allows, so a short read means the socket is drained, as with a bare socket. A TLS
/// failure comes back as an `InvalidData` error that [`tls_failure`] recognises. `Write`
/// returns `WouldBlock` when nothing more can be taken. Two rules are the caller's:
/// - Writable interest: keep it while replies are pending *or* [`Transport::wants_write`],
///   and call `flush` on each writable event even with no reply pending (rustls may hold
///   accepted bytes, the handshake, or the `close_notify`).
/// - Lingering after [`Transport::shutdown_write`]: discard with
///   [`Transport::read_discard`], which reads the socket itself (the session may be broken).
pub enum Transport {
    Plain(TcpStream),
    /// A Unix-socket connection (plain text: TLS is for what crosses a network).
    Unix(UnixStream),
    Tls(Box<TlsStream>),
}

impl Transport {
    pub fn is_tls(&self) -> bool {
        matches!(self, Transport::Tls(_))
    }

    /// Is a TLS handshake still under way?
    pub fn handshaking(&self) -> bool {
        match self {
            Transport::Plain(_) | Transport::Unix(_) => false,
            Transport::Tls(tls) => tls.handshaking(),
        }
    }

    /// Are encrypted bytes waiting for the socket?
    pub fn wants_write(&self) -> bool {
        match self {
            Transport::Plain(_) | Transport::Unix(_) => false,
            Transport::Tls(tls) => tls.wants_write(),
        }
    }

    /// The TCP socket underneath, if it is one.
    pub fn tcp(&self) -> Option<&TcpStream> {
        match self {
            Transport::Plain(tcp) => Some(tcp),
            Transport::Unix(_) => None,
            Transport::Tls(tls) => Some(tls.tcp()),
        }
    }

    /// The socket itself, as a mio event source.
    fn source(&mut self) -> &mut dyn mio::event::Source {
        match self {
            Transport::Plain(tcp) => tcp,
            Transport::Unix(unix) => unix,
            Transport::Tls(tls) => &mut tls.tcp,
        }
    }

    /// Ends the sending side (TLS: `close_notify` first; see [`TlsStream::shutdown`]).
    pub fn shutdown_write(&mut self) -> io::Result<()> {
        match self {
            Transport::Plain(tcp) => tcp.shutdown(Shutdown::Write),
            Transport::Unix(unix) => unix.shutdown(Shutdown::Write),
            Transport::Tls(tls) => tls.shutdown(),
        }
    }

    /// Reads raw bytes from the socket, bypassing TLS: for discarding input while lingering.
    pub fn read_discard(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Transport::Plain(tcp) => tcp.read(buf),
            Transport::Unix(unix) => unix.read(buf),
            Transport::Tls(tls) => tls.tcp.read(buf),
        }
    }
}

impl AsFd for Transport {
    fn as_fd(&self) -> BorrowedFd<'_> {
        match self {
            Transport::Plain(tcp) => tcp.as_fd(),
            Transport::Unix(unix) => unix.as_fd(),
            Transport::Tls(tls) => tls.tcp.as_fd(),
        }
    }
}

impl Read for Transport {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let tls = match self {
            Transport::Plain(tcp) => return tcp.read(buf),
            Transport::Unix(unix) => return unix.read(buf),
            Transport::Tls(tls) => tls,
        };
        let mut filled = 0;
        while filled < buf.len() {
            match tls.read_plain(&mut buf[filled..]) {
                Ok(PlainRead::Data(n)) => filled += n,
                Ok(PlainRead::WouldBlock) if filled == 0 => {
                    return Err(io::ErrorKind::WouldBlock.into())
                }
                Ok(PlainRead::WouldBlock | PlainRead::Closed(_)) => break,
                // The error is kept and comes back on the next read.
                Err(_) if filled > 0 => break,
                Err(e) => return Err(e),
            }
        }
        Ok(filled)
    }
}

impl Write for Transport {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        match self {
            Transport::Plain(tcp) => tcp.write(data),
            Transport::Unix(unix) => unix.write(data),
            Transport::Tls(tls) => match tls.write_plain(data)? {
                0 if !data.is_empty() => Err(io::ErrorKind::WouldBlock.into()),
                n => Ok(n),
            },
        }
    }

    /// Sends the TLS records waiting for the socket (nothing to do for a plain socket).
    fn flush(&mut self) -> io::Result<()> {
        match self {
            Transport::Plain(_) | Transport::Unix(_) => Ok(()),
            Transport::Tls(tls) => tls.flush_tls(),
        }
    }
}

impl mio::event::Source for Transport {
    fn register(
        &mut self,
        registry: &Registry,
        token: Token,
        interests: Interest,
    ) -> io::Result<()> {
        self.source().register(registry, token, interests)
    }

    fn reregister(
        &mut self,
        registry: &Registry,
        token: Token,
        interests: Interest,
    ) -> io::Result<()> {
        self.source().reregister(registry, token, interests)
    }

    fn deregister(&mut self, registry: &Registry) -> io::Result<()> {
        self.source().deregister(registry)
    }
}
