//! Test certificates, made fresh by each test: a certificate authority and the server
//! certificates it signs (current, expired, for another host), plus self-signed ones, written
//! as PEM files in a temporary directory.
//!
//! Generated in-process with `rcgen` rather than committed (no private key in the repository,
//! no expiry date that one day breaks the tests) or made by running `openssl` (one tool less
//! for CI to install, and an expired certificate is a field to set, not a clock to fake).

use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair, KeyUsagePurpose,
};

/// The PEM files of one certificate and its key.
#[derive(Debug, Clone)]
pub struct CertFiles {
    /// The certificate chain: the leaf, then the CA certificate if it has an issuer.
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// When a certificate is valid.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Validity {
    /// From 2000 to 4000: valid for the life of any test.
    Current,
    /// 2000 to 2001: long expired.
    Expired,
}

/// A test certificate authority and the directory its files live in (removed on drop).
pub struct TestPki {
    dir: tempfile::TempDir,
    ca: CertifiedIssuer<'static, KeyPair>,
    ca_file: PathBuf,
}

impl TestPki {
    /// A new CA, its certificate written to `ca.pem`.
    pub fn new() -> TestPki {
        let dir = tempfile::tempdir().expect("a temporary directory for test certificates");
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("no names is valid");
        // A name of its own, so that a client trusting another test CA finds no issuer.
        let name = format!("forkpool test CA {}", dir.path().display());
        params.distinguished_name.push(DnType::CommonName, name);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        set_validity(&mut params, Validity::Current);
        let key = KeyPair::generate().expect("generate a CA key");
        let ca = CertifiedIssuer::self_signed(params, key).expect("self-sign the test CA");
        let ca_file = dir.path().join("ca.pem");
        std::fs::write(&ca_file, ca.pem()).expect("write the CA certificate");
        TestPki { dir, ca, ca_file }
    }

    /// The CA certificate (PEM), for a client's trust store.
    pub fn ca_file(&self) -> &Path {
        &self.ca_file
    }

    /// The directory the files are written to.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// A server certificate for `hosts` (DNS names or IP addresses), signed by this CA, as
    /// `<name>.pem` (leaf then CA) and `<name>.key`.
    pub fn issue(&self, name: &str, hosts: &[&str], validity: Validity) -> CertFiles {
        let key = KeyPair::generate().expect("generate a server key");
        let params = leaf_params(hosts, validity);
        let cert = params
            .signed_by(&key, &self.ca)
            .expect("the test CA signs a server certificate");
        self.write(name, &format!("{}{}", cert.pem(), self.ca.pem()), &key)
    }

    /// A self-signed certificate for `hosts` that no CA vouches for.
    pub fn self_signed(&self, name: &str, hosts: &[&str]) -> CertFiles {
        let key = KeyPair::generate().expect("generate a server key");
        let cert = leaf_params(hosts, Validity::Current)
            .self_signed(&key)
            .expect("self-sign a server certificate");
        self.write(name, &cert.pem(), &key)
    }

    /// Writes `name.pem` and `name.key` in the directory.
    fn write(&self, name: &str, chain_pem: &str, key: &KeyPair) -> CertFiles {
        let files = CertFiles {
            cert: self.dir.path().join(format!("{name}.pem")),
            key: self.dir.path().join(format!("{name}.key")),
        };
        std::fs::write(&files.cert, chain_pem).expect("write a test certificate");
        std::fs::write(&files.key, key.serialize_pem()).expect("write a test key");
        files
    }
}

impl Default for TestPki {
    fn default() -> Self {
        TestPki::new()
    }
}

fn leaf_params(hosts: &[&str], validity: Validity) -> CertificateParams {
    let names: Vec<String> = hosts.iter().map(|host| host.to_string()).collect();
    let mut params = CertificateParams::new(names).expect("test host names are valid");
    params.distinguished_name.push(
        DnType::CommonName,
        hosts.first().copied().unwrap_or("server"),
    );
    set_validity(&mut params, validity);
    params
}

fn set_validity(params: &mut CertificateParams, validity: Validity) {
    let (from, to) = match validity {
        Validity::Current => (2000, 4000),
        Validity::Expired => (2000, 2001),
    };
    params.not_before = rcgen::date_time_ymd(from, 1, 1);
    params.not_after = rcgen::date_time_ymd(to, 1, 1);
}
