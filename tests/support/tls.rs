//! Certificates for tests of TLS to Redis and PostgreSQL: a certificate authority of the test's
//! own, and server certificates for 127.0.0.1 and localhost signed by it (rcgen).

use std::path::{Path, PathBuf};

use rcgen::{BasicConstraints, Certificate, CertificateParams, DnType, IsCa, KeyPair};

/// A certificate authority made for one test.
pub struct TestCa {
    cert: Certificate,
    key: KeyPair,
}

/// A server's certificate and key, PEM, written into a directory.
#[derive(Debug, Clone)]
pub struct ServerFiles {
    /// The certificate.
    pub cert: PathBuf,
    /// Its private key.
    pub key: PathBuf,
}

impl TestCa {
    /// A new authority named `name`.
    pub fn new(name: &str) -> anyhow::Result<Self> {
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        let cert = params.self_signed(&key)?;
        Ok(Self { cert, key })
    }

    /// Writes the authority's certificate (what a client trusts) to `path`.
    pub fn write_cert(&self, path: &Path) -> anyhow::Result<PathBuf> {
        std::fs::write(path, self.cert.pem())?;
        Ok(path.to_path_buf())
    }

    /// A server certificate for 127.0.0.1 and localhost, signed by this authority, written as
    /// `<stem>.crt` and `<stem>.key` in `dir`.
    pub fn server(&self, dir: &Path, stem: &str) -> anyhow::Result<ServerFiles> {
        let key = KeyPair::generate()?;
        let mut params =
            CertificateParams::new(vec!["127.0.0.1".to_owned(), "localhost".to_owned()])?;
        params.distinguished_name.push(DnType::CommonName, "mesh test server");
        let cert = params.signed_by(&key, &self.cert, &self.key)?;
        let files = ServerFiles {
            cert: dir.join(format!("{stem}.crt")),
            key: dir.join(format!("{stem}.key")),
        };
        std::fs::write(&files.cert, cert.pem())?;
        std::fs::write(&files.key, key.serialize_pem())?;
        Ok(files)
    }
}
