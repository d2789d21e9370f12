//! TLS for the services, with rustls (TLS 1.2 and 1.3, the `ring` provider, no OpenSSL):
//! loading a certificate chain and key into a server configuration, keeping that
//! configuration across a reload that finds bad files, and driving one TLS session over a
//! non-blocking socket from the worker's event loop (no threads, no async runtime).
//!
//! rustls does no I/O of its own. [`TlsStream`] feeds it what the socket gives
//! (`read_tls`), lets it decrypt (`process_new_packets`), and writes its records while the
//! socket takes them (`write_tls`). Encrypted bytes the socket refused stay inside rustls:
//! the caller keeps WRITABLE interest while [`TlsStream::wants_write`] says so and calls
//! [`TlsStream::flush_tls`] on each writable event.
//!
//! [`Transport`] puts a plain socket and a TLS one behind the same `Read`/`Write`/`Source`
//! surface so that the connection code is written once. Two rules differ from a bare socket
//! and are the caller's to follow (see [`Transport`]).
//!
//! A TLS session lives in the process that did the handshake: its keys and sequence numbers
//! are in this process's memory, so a descriptor alone cannot carry it to another worker.

use std::io::{self, Read, Write};
use std::net::Shutdown;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use mio::net::TcpStream;
use mio::{Interest, Registry, Token};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::{ServerConfig, ServerConnection};

use crate::config::Config;
use crate::service::ServiceKind;

/// The PEM files of one service's certificate chain (leaf first) and private key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// Why a certificate and key could not become a server configuration; each names the file.
#[derive(Debug, thiserror::Error)]
pub enum CertError {
    #[error("TLS {kind} file {path} does not exist")]
    Missing { kind: PemKind, path: PathBuf },
    #[error("cannot read TLS {kind} file {path}: {source}")]
    Unreadable {
        kind: PemKind,
        path: PathBuf,
        source: io::Error,
    },
    #[error("TLS {kind} file {path} is not valid PEM: {reason}")]
    BadPem {
        kind: PemKind,
        path: PathBuf,
        reason: String,
    },
    #[error("TLS certificate file {path} holds no certificate (no BEGIN CERTIFICATE block)")]
    NoCertificate { path: PathBuf },
    #[error(
        "TLS key file {path} holds no private key (no BEGIN PRIVATE KEY, RSA PRIVATE KEY or \
         EC PRIVATE KEY block)"
    )]
    NoKey { path: PathBuf },
    #[error("TLS key {key} does not belong to the certificate {cert}")]
    KeyMismatch { cert: PathBuf, key: PathBuf },
    #[error("TLS certificate {cert} with key {key} cannot be used: {source}")]
    Unusable {
        cert: PathBuf,
        key: PathBuf,
        source: rustls::Error,
    },
}

/// Which of the two files an error is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PemKind {
    Certificate,
    Key,
}

impl std::fmt::Display for PemKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            PemKind::Certificate => "certificate",
            PemKind::Key => "key",
        })
    }
}

/// Reads `files` into a server configuration offering TLS 1.3 and 1.2, without client
/// certificates. The key must match the leaf certificate.
pub fn load_server_config(files: &TlsFiles) -> Result<Arc<ServerConfig>, CertError> {
    let chain = read_chain(&files.cert)?;
    let key = read_key(&files.key)?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .expect("the ring provider supports TLS 1.2 and 1.3")
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .map_err(|source| match source {
            rustls::Error::InconsistentKeys(rustls::InconsistentKeys::KeyMismatch) => {
                CertError::KeyMismatch {
                    cert: files.cert.clone(),
                    key: files.key.clone(),
                }
            }
            source => CertError::Unusable {
                cert: files.cert.clone(),
                key: files.key.clone(),
                source,
            },
        })?;
    Ok(Arc::new(config))
}

fn read_pem_file(kind: PemKind, path: &Path) -> Result<Vec<u8>, CertError> {
    std::fs::read(path).map_err(|source| match source.kind() {
        io::ErrorKind::NotFound => CertError::Missing {
            kind,
            path: path.to_path_buf(),
        },
        _ => CertError::Unreadable {
            kind,
            path: path.to_path_buf(),
            source,
        },
    })
}

fn read_chain(path: &Path) -> Result<Vec<CertificateDer<'static>>, CertError> {
    let pem = read_pem_file(PemKind::Certificate, path)?;
    let chain = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| CertError::BadPem {
            kind: PemKind::Certificate,
            path: path.to_path_buf(),
            reason: e.to_string(),
        })?;
    if chain.is_empty() {
        return Err(CertError::NoCertificate {
            path: path.to_path_buf(),
        });
    }
    Ok(chain)
}

fn read_key(path: &Path) -> Result<PrivateKeyDer<'static>, CertError> {
    let pem = read_pem_file(PemKind::Key, path)?;
    PrivateKeyDer::from_pem_slice(&pem).map_err(|e| match e {
        rustls::pki_types::pem::Error::NoItemsFound => CertError::NoKey {
            path: path.to_path_buf(),
        },
        e => CertError::BadPem {
            kind: PemKind::Key,
            path: path.to_path_buf(),
            reason: e.to_string(),
        },
    })
}

/// One service's server configuration and the files it came from. A reload that cannot use
/// the (possibly renamed) files keeps serving with the configuration it has.
#[derive(Debug)]
pub struct ReloadableTls {
    files: TlsFiles,
    config: Arc<ServerConfig>,
}

impl ReloadableTls {
    /// Loads `files`; at start a bad file is an error (the server refuses to start).
    pub fn load(files: TlsFiles) -> Result<ReloadableTls, CertError> {
        let config = load_server_config(&files)?;
        Ok(ReloadableTls { files, config })
    }

    /// The configuration new connections use.
    pub fn config(&self) -> &Arc<ServerConfig> {
        &self.config
    }

    /// The files the current configuration was read from.
    pub fn files(&self) -> &TlsFiles {
        &self.files
    }

    /// Re-reads `files` (the reloaded settings' paths). On success new connections use the
    /// new certificate; on error the current one stays, the error is logged, and returned for
    /// the caller's count.
    pub fn reload(&mut self, files: &TlsFiles) -> Result<(), CertError> {
        match load_server_config(files) {
            Ok(config) => {
                self.config = config;
                self.files = files.clone();
                Ok(())
            }
            Err(e) => {
                log::error!(
                    "TLS reload refused, keeping the certificate from {}: {e}",
                    self.files.cert.display()
                );
                Err(e)
            }
        }
    }
}

/// Every service's TLS configuration (`None`: plain text), loaded at start and reloaded on
/// SIGHUP.
#[derive(Debug)]
pub struct ServiceTls {
    /// By [`ServiceKind::index`].
    services: [Option<ReloadableTls>; 2],
}

impl ServiceTls {
    /// Loads the files `config` names; any bad file is an error (the server does not start).
    pub fn load(config: &Config) -> Result<ServiceTls, CertError> {
        let mut services = [None, None];
        for kind in ServiceKind::ALL {
            if let Some(files) = config.tls(kind) {
                services[kind.index()] = Some(ReloadableTls::load(files.clone())?);
            }
        }
        Ok(ServiceTls { services })
    }

    /// The configuration of `kind`'s new connections, if it speaks TLS.
    pub fn get(&self, kind: ServiceKind) -> Option<&Arc<ServerConfig>> {
        self.services[kind.index()]
            .as_ref()
            .map(ReloadableTls::config)
    }

    /// Re-reads each TLS service's files as `config` names them (a bad file keeps the current
    /// certificate, logged). Whether a service speaks TLS at all cannot change while running
    /// (its clients would all break): such a request is logged and ignored.
    pub fn reload(&mut self, config: &Config) {
        for kind in ServiceKind::ALL {
            match (&mut self.services[kind.index()], config.tls(kind)) {
                (Some(tls), Some(files)) => {
                    let _ = tls.reload(files);
                }
                (None, None) => {}
                (current, _) => log::warn!(
                    "SIGHUP: {} cannot switch TLS {} while running; restart to apply it",
                    kind.name(),
                    if current.is_some() { "off" } else { "on" }
                ),
            }
        }
    }
}

/// How a TLS session failed. A failure during the handshake (a plain-text client, an old or
/// distrustful client, garbage) is the client's business: counted and logged at debug. A
/// failure afterwards is a broken or hostile peer. Neither affects other connections.
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

/// One server-side TLS session over a non-blocking socket.
pub struct TlsStream {
    tcp: TcpStream,
    tls: ServerConnection,
    /// The first fatal error, returned again by every later read (rustls is unusable after).
    failed: Option<TlsError>,
    /// The socket returned EOF.
    tcp_eof: bool,
    send: SendSide,
}

impl TlsStream {
    /// Starts the server side of a handshake on `tcp` (nothing is read or written yet).
    pub fn new(tcp: TcpStream, config: Arc<ServerConfig>) -> Result<TlsStream, TlsError> {
        let tls = ServerConnection::new(config).map_err(TlsError::Handshake)?;
        Ok(TlsStream {
            tcp,
            tls,
            failed: None,
            tcp_eof: false,
            send: SendSide::Open,
        })
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
    Tls(Box<TlsStream>),
}

impl Transport {
    /// `tcp` with TLS if the service has a configuration.
    pub fn new(tcp: TcpStream, tls: Option<&Arc<ServerConfig>>) -> Result<Transport, TlsError> {
        Ok(match tls {
            None => Transport::Plain(tcp),
            Some(config) => Transport::Tls(Box::new(TlsStream::new(tcp, Arc::clone(config))?)),
        })
    }

    pub fn is_tls(&self) -> bool {
        matches!(self, Transport::Tls(_))
    }

    /// Is a TLS handshake still under way?
    pub fn handshaking(&self) -> bool {
        match self {
            Transport::Plain(_) => false,
            Transport::Tls(tls) => tls.handshaking(),
        }
    }

    /// Are encrypted bytes waiting for the socket?
    pub fn wants_write(&self) -> bool {
        match self {
            Transport::Plain(_) => false,
            Transport::Tls(tls) => tls.wants_write(),
        }
    }

    pub fn tcp(&self) -> &TcpStream {
        match self {
            Transport::Plain(tcp) => tcp,
            Transport::Tls(tls) => tls.tcp(),
        }
    }

    fn tcp_mut(&mut self) -> &mut TcpStream {
        match self {
            Transport::Plain(tcp) => tcp,
            Transport::Tls(tls) => &mut tls.tcp,
        }
    }

    /// Ends the sending side (TLS: `close_notify` first; see [`TlsStream::shutdown`]).
    pub fn shutdown_write(&mut self) -> io::Result<()> {
        match self {
            Transport::Plain(tcp) => tcp.shutdown(Shutdown::Write),
            Transport::Tls(tls) => tls.shutdown(),
        }
    }

    /// Reads raw bytes from the socket, bypassing TLS: for discarding input while lingering.
    pub fn read_discard(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.tcp_mut().read(buf)
    }
}

impl Read for Transport {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let tls = match self {
            Transport::Plain(tcp) => return tcp.read(buf),
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
            Transport::Tls(tls) => match tls.write_plain(data)? {
                0 if !data.is_empty() => Err(io::ErrorKind::WouldBlock.into()),
                n => Ok(n),
            },
        }
    }

    /// Sends the TLS records waiting for the socket (nothing to do for a plain socket).
    fn flush(&mut self) -> io::Result<()> {
        match self {
            Transport::Plain(_) => Ok(()),
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
        self.tcp_mut().register(registry, token, interests)
    }

    fn reregister(
        &mut self,
        registry: &Registry,
        token: Token,
        interests: Interest,
    ) -> io::Result<()> {
        self.tcp_mut().reregister(registry, token, interests)
    }

    fn deregister(&mut self, registry: &Registry) -> io::Result<()> {
        self.tcp_mut().deregister(registry)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use forkpool_testkit::pki::{CertFiles, TestPki, Validity};
    use rustls::pki_types::ServerName;
    use rustls::{CertificateError, ClientConfig, ClientConnection, RootCertStore, StreamOwned};
    use std::net::TcpListener;
    use std::sync::mpsc;
    use std::thread::JoinHandle;
    use std::time::Duration;

    /// How long either side of a test waits for the other before the test fails.
    const TEST_TIMEOUT: Duration = Duration::from_secs(20);
    const TOKEN: Token = Token(0);

    fn files(cert: &CertFiles) -> TlsFiles {
        TlsFiles {
            cert: cert.cert.clone(),
            key: cert.key.clone(),
        }
    }

    fn client_config(
        ca: &Path,
        version: &'static rustls::SupportedProtocolVersion,
    ) -> Arc<ClientConfig> {
        let mut roots = RootCertStore::empty();
        let pem = std::fs::read(ca).expect("read the test CA");
        for cert in CertificateDer::pem_slice_iter(&pem) {
            roots
                .add(cert.expect("the test CA is PEM"))
                .expect("a valid CA");
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[version])
            .expect("ring supports both versions")
            .with_root_certificates(roots)
            .with_no_client_auth();
        Arc::new(config)
    }

    /// A client connected over loopback, its reads bounded by [`TEST_TIMEOUT`].
    fn tls_client(
        addr: std::net::SocketAddr,
        config: Arc<ClientConfig>,
        host: &str,
    ) -> StreamOwned<ClientConnection, std::net::TcpStream> {
        let tcp = std::net::TcpStream::connect(addr).expect("connect to the test server");
        tcp.set_read_timeout(Some(TEST_TIMEOUT))
            .expect("set a timeout");
        let name = ServerName::try_from(host.to_string()).expect("a valid server name");
        let conn = ClientConnection::new(config, name).expect("a client session");
        StreamOwned::new(conn, tcp)
    }

    /// How the test server's one connection ended.
    #[derive(Debug)]
    enum ServerEnd {
        /// The peer finished; every byte it sent, in order.
        Finished(Vec<u8>),
        Failed(io::Error),
    }

    /// Serves one connection with a [`Transport`] in a mio loop, following the rules the
    /// worker must follow: read until `WouldBlock`, answer each chunk with `reply`, keep
    /// WRITABLE while replies or TLS records are pending, and at the peer's end shut down the
    /// write side (close_notify), linger until EOF, and close. `blocked` hears once when a
    /// write could not go out whole (the backpressure path ran).
    fn serve_one(
        tls: Option<Arc<ServerConfig>>,
        reply: fn(&[u8]) -> Vec<u8>,
        blocked: Option<mpsc::Sender<()>>,
    ) -> (std::net::SocketAddr, JoinHandle<ServerEnd>) {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind loopback");
        let addr = listener.local_addr().expect("bound address");
        let handle = std::thread::spawn(move || {
            let (tcp, _) = listener.accept().expect("accept the test client");
            tcp.set_nonblocking(true).expect("non-blocking");
            let transport =
                Transport::new(TcpStream::from_std(tcp), tls.as_ref()).expect("a server session");
            drive(transport, reply, blocked)
        });
        (addr, handle)
    }

    fn drive(
        mut transport: Transport,
        reply: fn(&[u8]) -> Vec<u8>,
        mut blocked: Option<mpsc::Sender<()>>,
    ) -> ServerEnd {
        let mut poll = mio::Poll::new().expect("a poll");
        let mut events = mio::Events::with_capacity(8);
        poll.registry()
            .register(&mut transport, TOKEN, Interest::READABLE)
            .expect("register");
        let (mut received, mut pending) = (Vec::new(), Vec::new());
        let mut buf = vec![0; 16 * 1024];
        let mut peer_done = false;
        let mut writable = false;
        loop {
            poll.poll(&mut events, Some(TEST_TIMEOUT)).expect("poll");
            if events.is_empty() {
                return ServerEnd::Failed(io::ErrorKind::TimedOut.into());
            }
            while !peer_done {
                match transport.read(&mut buf) {
                    Ok(0) => peer_done = true,
                    Ok(n) => {
                        received.extend_from_slice(&buf[..n]);
                        pending.extend(reply(&buf[..n]));
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) => {
                        linger(&mut transport, &mut poll, &mut buf);
                        return ServerEnd::Failed(e);
                    }
                }
            }
            if let Err(e) = send(&mut transport, &mut pending) {
                return ServerEnd::Failed(e);
            }
            if !pending.is_empty() || transport.wants_write() {
                if let Some(tx) = blocked.take() {
                    tx.send(()).expect("the client waits for this");
                }
            }
            if peer_done && pending.is_empty() {
                if let Err(e) = transport.shutdown_write() {
                    return ServerEnd::Failed(e);
                }
                if !transport.wants_write() {
                    linger(&mut transport, &mut poll, &mut buf);
                    return ServerEnd::Finished(received);
                }
            }
            let wants = !pending.is_empty() || transport.wants_write();
            if wants != writable {
                let interest = if wants {
                    Interest::READABLE | Interest::WRITABLE
                } else {
                    Interest::READABLE
                };
                poll.registry()
                    .reregister(&mut transport, TOKEN, interest)
                    .expect("reregister");
                writable = wants;
            }
        }
    }

    /// Flushes TLS records, then writes replies until done or the socket is full.
    fn send(transport: &mut Transport, pending: &mut Vec<u8>) -> io::Result<()> {
        transport.flush()?;
        while !pending.is_empty() {
            match transport.write(pending) {
                Ok(n) => drop(pending.drain(..n)),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// The lingering close: write side shut, raw input discarded until EOF or the timeout.
    fn linger(transport: &mut Transport, poll: &mut mio::Poll, buf: &mut [u8]) {
        let _ = transport.shutdown_write();
        let mut events = mio::Events::with_capacity(8);
        loop {
            match transport.read_discard(buf) {
                Ok(0) => return,
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    poll.poll(&mut events, Some(TEST_TIMEOUT)).expect("poll");
                    if events.is_empty() {
                        return;
                    }
                }
                Err(_) => return,
            }
        }
    }

    fn uppercase(chunk: &[u8]) -> Vec<u8> {
        chunk.to_ascii_uppercase()
    }

    #[test]
    fn tls13_and_tls12_carry_bytes_both_ways_and_close_with_close_notify() {
        let pki = TestPki::new();
        let cert = pki.issue("server", &["localhost"], Validity::Current);
        let config = load_server_config(&files(&cert)).expect("valid certificate");
        for version in [&rustls::version::TLS13, &rustls::version::TLS12] {
            let (addr, server) = serve_one(Some(Arc::clone(&config)), uppercase, None);
            let mut client = tls_client(addr, client_config(pki.ca_file(), version), "localhost");
            client.write_all(b"hello tls\n").expect("send");
            let mut line = [0u8; 10];
            client.read_exact(&mut line).expect("the reply");
            assert_eq!(&line, b"HELLO TLS\n");
            assert_eq!(client.conn.protocol_version(), Some(version.version));
            client.conn.send_close_notify();
            client.flush().expect("send close_notify");
            let mut rest = Vec::new();
            client
                .read_to_end(&mut rest)
                .expect("the server's close_notify ends the stream cleanly");
            assert!(rest.is_empty());
            drop(client);
            match server.join().expect("server thread") {
                ServerEnd::Finished(received) => assert_eq!(received, b"hello tls\n"),
                ServerEnd::Failed(e) => panic!("{version:?}: server failed: {e}"),
            }
        }
    }

    #[test]
    fn a_reply_larger_than_the_socket_buffers_arrives_whole_through_writable_events() {
        const BIG: usize = 32 << 20;
        fn big_reply(chunk: &[u8]) -> Vec<u8> {
            if chunk.contains(&b'\n') {
                (0..BIG).map(|i| (i % 251) as u8).collect()
            } else {
                Vec::new()
            }
        }
        let pki = TestPki::new();
        let cert = pki.issue("server", &["localhost"], Validity::Current);
        let config = load_server_config(&files(&cert)).expect("valid certificate");
        let (tx, blocked) = mpsc::channel();
        let (addr, server) = serve_one(Some(config), big_reply, Some(tx));
        let version = &rustls::version::TLS13;
        let mut client = tls_client(addr, client_config(pki.ca_file(), version), "localhost");
        // The stream completes the handshake before it writes; the client reads the reply
        // only once the server has found the socket full.
        client.write_all(b"BIG\n").expect("send");
        client.flush().expect("send the request");
        blocked
            .recv_timeout(TEST_TIMEOUT)
            .expect("the server's reply outgrew the socket buffers");
        let mut reply = vec![0u8; BIG];
        client.read_exact(&mut reply).expect("the whole reply");
        assert!(reply.iter().enumerate().all(|(i, &b)| b == (i % 251) as u8));
        client.conn.send_close_notify();
        client.flush().expect("send close_notify");
        drop(client);
        assert!(matches!(
            server.join().expect("server thread"),
            ServerEnd::Finished(_)
        ));
    }

    #[test]
    fn a_plain_text_client_on_a_tls_port_is_closed_not_left_hanging() {
        let pki = TestPki::new();
        let cert = pki.issue("server", &["localhost"], Validity::Current);
        let config = load_server_config(&files(&cert)).expect("valid certificate");
        let (addr, server) = serve_one(Some(config), uppercase, None);
        let mut plain = std::net::TcpStream::connect(addr).expect("connect");
        plain.set_read_timeout(Some(TEST_TIMEOUT)).expect("timeout");
        plain.write_all(b"PING\n").expect("send");
        let mut answer = Vec::new();
        plain
            .read_to_end(&mut answer)
            .expect("the server closes (a timeout here is the hang)");
        assert!(!answer.starts_with(b"PONG"), "{answer:?}");
        drop(plain);
        match server.join().expect("server thread") {
            ServerEnd::Failed(e) => {
                let failure = tls_failure(&e).expect("a TLS failure, not an I/O error");
                assert!(failure.is_handshake(), "{failure}");
            }
            ServerEnd::Finished(bytes) => panic!("plain text accepted: {bytes:?}"),
        }
    }

    #[test]
    fn a_client_that_does_not_trust_the_certificate_fails_the_handshake_on_both_sides() {
        let pki = TestPki::new();
        let other_ca = TestPki::new();
        let cert = pki.issue("server", &["localhost"], Validity::Current);
        let config = load_server_config(&files(&cert)).expect("valid certificate");
        let (addr, server) = serve_one(Some(config), uppercase, None);
        let untrusting = client_config(other_ca.ca_file(), &rustls::version::TLS13);
        let mut client = tls_client(addr, untrusting, "localhost");
        let err = client.write_all(b"x\n").and_then(|()| client.flush());
        let err = err.expect_err("an unknown issuer is refused");
        assert_eq!(certificate_error(&err), CertificateError::UnknownIssuer);
        drop(client);
        match server.join().expect("server thread") {
            ServerEnd::Failed(e) => {
                assert!(tls_failure(&e).is_some_and(TlsError::is_handshake), "{e}");
            }
            ServerEnd::Finished(bytes) => panic!("session went on: {bytes:?}"),
        }
    }

    /// The certificate error inside a client's I/O error.
    fn certificate_error(error: &io::Error) -> CertificateError {
        match error
            .get_ref()
            .and_then(|e| e.downcast_ref::<rustls::Error>())
        {
            Some(rustls::Error::InvalidCertificate(why)) => why.clone(),
            _ => panic!("not a certificate error: {error}"),
        }
    }

    /// The error a verifying client meets against `cert` when it asks for `host`.
    fn client_verdict(pki: &TestPki, cert: &CertFiles, host: &str) -> Result<(), io::Error> {
        let config = load_server_config(&files(cert)).expect("the server loads any of them");
        let (addr, server) = serve_one(Some(config), uppercase, None);
        let mut client = tls_client(
            addr,
            client_config(pki.ca_file(), &rustls::version::TLS13),
            host,
        );
        let outcome = client.write_all(b"x\n").and_then(|()| {
            let mut reply = [0u8; 2];
            client.read_exact(&mut reply)
        });
        drop(client);
        let _ = server.join();
        outcome
    }

    #[test]
    fn a_verifying_client_refuses_expired_wrong_host_and_self_signed_certificates() {
        let pki = TestPki::new();
        let good = pki.issue("good", &["localhost", "127.0.0.1"], Validity::Current);
        client_verdict(&pki, &good, "localhost").expect("a valid certificate");
        client_verdict(&pki, &good, "127.0.0.1").expect("an IP address name");
        let expired = pki.issue("expired", &["localhost"], Validity::Expired);
        let err = client_verdict(&pki, &expired, "localhost").expect_err("expired");
        assert!(matches!(
            certificate_error(&err),
            CertificateError::Expired | CertificateError::ExpiredContext { .. }
        ));
        let err = client_verdict(&pki, &good, "example.com").expect_err("wrong host");
        assert!(matches!(
            certificate_error(&err),
            CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. }
        ));
        let own = pki.self_signed("own", &["localhost"]);
        let err = client_verdict(&pki, &own, "localhost").expect_err("self-signed");
        assert_eq!(certificate_error(&err), CertificateError::UnknownIssuer);
    }

    #[test]
    fn a_plain_transport_reads_and_writes_like_its_socket() {
        let (addr, server) = serve_one(None, uppercase, None);
        let mut client = std::net::TcpStream::connect(addr).expect("connect");
        client
            .set_read_timeout(Some(TEST_TIMEOUT))
            .expect("timeout");
        client.write_all(b"plain\n").expect("send");
        client.shutdown(Shutdown::Write).expect("half-close");
        let mut reply = Vec::new();
        client.read_to_end(&mut reply).expect("reply and EOF");
        assert_eq!(reply, b"PLAIN\n");
        drop(client);
        match server.join().expect("server thread") {
            ServerEnd::Finished(received) => assert_eq!(received, b"plain\n"),
            ServerEnd::Failed(e) => panic!("{e}"),
        }
    }

    #[test]
    fn bad_certificate_files_are_errors_naming_the_file() {
        let pki = TestPki::new();
        let good = pki.issue("good", &["localhost"], Validity::Current);
        let other = pki.issue("other", &["localhost"], Validity::Current);
        let dir = pki.dir();
        let text = dir.join("text.pem");
        std::fs::write(&text, "just text\n").expect("write");
        let broken = dir.join("broken.pem");
        std::fs::write(
            &broken,
            "-----BEGIN CERTIFICATE-----\n!!!\n-----END CERTIFICATE-----\n",
        )
        .expect("write");
        let missing = dir.join("missing.pem");
        let error = |cert: &Path, key: &Path| {
            let files = TlsFiles {
                cert: cert.to_path_buf(),
                key: key.to_path_buf(),
            };
            load_server_config(&files).expect_err("refused").to_string()
        };
        let cases: [(&Path, &Path, &str, &Path); 7] = [
            (&missing, &good.key, "does not exist", &missing),
            (&good.cert, &missing, "key file", &missing),
            (dir, &good.key, "cannot read TLS certificate file", dir),
            (&text, &good.key, "holds no certificate", &text),
            (&broken, &good.key, "not valid PEM", &broken),
            (&good.cert, &good.cert, "holds no private key", &good.cert),
            (
                &good.cert,
                &other.key,
                "does not belong to the certificate",
                &other.key,
            ),
        ];
        for (cert, key, says, names) in cases {
            let message = error(cert, key);
            assert!(message.contains(says), "{message}");
            assert!(message.contains(&names.display().to_string()), "{message}");
        }
    }

    #[test]
    fn services_get_their_own_configuration_and_cannot_switch_tls_on_reload() {
        let pki = TestPki::new();
        let bank = pki.issue("bank", &["localhost"], Validity::Current);
        let other = pki.issue("other", &["localhost"], Validity::Current);
        let with_bank_tls = |cert: &CertFiles| crate::config::Cli {
            bank_tls_cert: Some(cert.cert.clone()),
            bank_tls_key: Some(cert.key.clone()),
            ..crate::config::Cli::default()
        };
        let config = Config::load(&with_bank_tls(&bank)).expect("valid settings");
        let mut tls = ServiceTls::load(&config).expect("valid certificate");
        assert!(tls.get(ServiceKind::Echo).is_none());
        let first = Arc::clone(tls.get(ServiceKind::Bank).expect("bank speaks TLS"));
        tls.reload(&Config::load(&with_bank_tls(&other)).expect("valid settings"));
        let second = Arc::clone(tls.get(ServiceKind::Bank).expect("still TLS"));
        assert!(
            !Arc::ptr_eq(&first, &second),
            "new files, new configuration"
        );
        tls.reload(&Config::load(&crate::config::Cli::default()).expect("defaults"));
        let kept = tls
            .get(ServiceKind::Bank)
            .expect("TLS cannot be switched off by a reload");
        assert!(Arc::ptr_eq(&second, kept));
    }

    #[test]
    fn a_reload_with_bad_files_keeps_the_current_certificate() {
        let pki = TestPki::new();
        let first = pki.issue("first", &["localhost"], Validity::Current);
        let second = pki.issue("second", &["localhost"], Validity::Current);
        let mut tls = ReloadableTls::load(files(&first)).expect("valid");
        let before = Arc::clone(tls.config());
        let bad = TlsFiles {
            cert: second.cert.clone(),
            key: first.key.clone(),
        };
        assert!(tls.reload(&bad).is_err());
        assert!(Arc::ptr_eq(&before, tls.config()));
        assert_eq!(tls.files(), &files(&first));
        tls.reload(&files(&second)).expect("valid");
        assert!(!Arc::ptr_eq(&before, tls.config()));
        assert_eq!(tls.files(), &files(&second));
    }
}
