//! `--tls`: the client side of TLS for the load connections. The session is driven by
//! `forkpool_common::tls` (the same code as the server's); this module builds the rustls
//! client configuration: trust a CA file, or (`--tls-insecure`, for self-signed test
//! certificates) verify nothing but the handshake signatures.

use std::path::Path;
use std::sync::Arc;

use anyhow::Context;
use forkpool_common::tls::{TlsStream, Transport};
use mio::net::TcpStream;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{verify_tls12_signature, verify_tls13_signature, CryptoProvider};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{
    ClientConfig, ClientConnection, DigitallySignedStruct, RootCertStore, SignatureScheme,
};

/// What a TLS connection needs: the configuration and the name to ask the server for.
#[derive(Debug, Clone)]
pub struct ClientTls {
    pub config: Arc<ClientConfig>,
    pub server_name: ServerName<'static>,
}

/// How the server's certificate is checked.
pub enum Trust<'a> {
    /// Against the CA certificates (PEM) in this file.
    CaFile(&'a Path),
    /// Not at all (self-signed test certificates): anyone in the middle can read the run.
    Insecure,
}

impl ClientTls {
    pub fn new(trust: Trust<'_>, server_name: &str) -> anyhow::Result<ClientTls> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = ClientConfig::builder_with_provider(Arc::clone(&provider))
            .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
            .context("the ring provider supports TLS 1.2 and 1.3")?;
        let config = match trust {
            Trust::CaFile(path) => builder
                .with_root_certificates(read_roots(path)?)
                .with_no_client_auth(),
            Trust::Insecure => builder
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(AcceptAnyCertificate(provider)))
                .with_no_client_auth(),
        };
        let server_name = ServerName::try_from(server_name.to_string())
            .with_context(|| format!("--tls-server-name {server_name}: not a host name or IP"))?;
        Ok(ClientTls {
            config: Arc::new(config),
            server_name,
        })
    }

    /// `tcp` with a new client session (its hello goes out on the first write or flush).
    pub fn transport(&self, tcp: TcpStream) -> anyhow::Result<Transport> {
        let session = ClientConnection::new(Arc::clone(&self.config), self.server_name.clone())?;
        Ok(Transport::Tls(Box::new(TlsStream::new(tcp, session))))
    }
}

fn read_roots(path: &Path) -> anyhow::Result<RootCertStore> {
    let pem = std::fs::read(path).with_context(|| format!("--tls-ca {}", path.display()))?;
    let mut roots = RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(&pem) {
        let cert = cert.with_context(|| format!("--tls-ca {}: not PEM", path.display()))?;
        roots
            .add(cert)
            .with_context(|| format!("--tls-ca {}: not a CA certificate", path.display()))?;
    }
    anyhow::ensure!(
        !roots.is_empty(),
        "--tls-ca {}: no certificate",
        path.display()
    );
    Ok(roots)
}

/// `--tls-insecure`: any certificate is accepted; the handshake signatures are still checked
/// (the session is encrypted, with nobody vouching for the other end).
#[derive(Debug)]
struct AcceptAnyCertificate(Arc<CryptoProvider>);

impl ServerCertVerifier for AcceptAnyCertificate {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}
