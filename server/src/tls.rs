//! TLS for the services, with rustls (TLS 1.2 and 1.3, the `ring` provider, no OpenSSL):
//! loading a certificate chain and key into a server configuration, keeping that
//! configuration across a reload that finds bad files, and starting a connection's
//! [`Transport`], plain or TLS. The session itself is driven by `forkpool_common::tls`
//! (shared with forkpool-bench), from the worker's event loop: no threads, no async runtime.
//!
//! A TLS session lives in the process that did the handshake: its keys and sequence numbers
//! are in this process's memory, so a descriptor alone cannot carry it to another worker.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

pub use forkpool_common::tls::{tls_failure, TlsError, TlsStream, Transport};
use mio::net::TcpStream;
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
    #[cfg(test)]
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

/// `tcp` as a connection of a service: with a TLS session if the service has a
/// configuration (the handshake starts with the first read).
pub fn server_transport(
    tcp: TcpStream,
    tls: Option<&Arc<ServerConfig>>,
) -> Result<Transport, TlsError> {
    Ok(match tls {
        None => Transport::Plain(tcp),
        Some(config) => {
            let session = ServerConnection::new(Arc::clone(config)).map_err(TlsError::Handshake)?;
            Transport::Tls(Box::new(TlsStream::new(tcp, session)))
        }
    })
}

/// Every service's TLS configuration (`None`: plain text), loaded at start and reloaded on
/// SIGHUP.
#[derive(Debug)]
pub struct ServiceTls {
    /// By [`ServiceKind::index`].
    services: [Option<ReloadableTls>; ServiceKind::ALL.len()],
}

impl ServiceTls {
    /// Loads the files `config` names; any bad file is an error (the server does not start).
    pub fn load(config: &Config) -> Result<ServiceTls, CertError> {
        let mut services = [const { None }; ServiceKind::ALL.len()];
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

#[cfg(test)]
mod tests {
    use super::*;
    use forkpool_common::tls::tls_failure;
    use forkpool_testkit::pki::{CertFiles, TestPki, Validity};
    use mio::{Interest, Token};
    use rustls::pki_types::ServerName;
    use rustls::{CertificateError, ClientConfig, ClientConnection, RootCertStore, StreamOwned};
    use std::io::{Read, Write};
    use std::net::Shutdown;
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
                server_transport(TcpStream::from_std(tcp), tls.as_ref()).expect("a server session");
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
        // Wait for the server's close_notify: closing first would make its alert a reset.
        let mut rest = Vec::new();
        client.read_to_end(&mut rest).expect("a clean end");
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
