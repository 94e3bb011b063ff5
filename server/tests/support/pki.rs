//! A throwaway CA for tests and the server certificates it signs, written as PEM files into a
//! directory the test owns; no key or certificate is stored in the repository. Include it with
//! `#[path = "support/pki.rs"] mod pki;`.

use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose,
};

/// A CA whose certificate is `dir/<name>.pem`.
pub struct TestCa {
    issuer: CertifiedIssuer<'static, KeyPair>,
    dir: PathBuf,
    /// The CA certificate (PEM), for `--tls-ca`.
    pub cert: PathBuf,
}

impl TestCa {
    /// A new CA, its certificate written to `dir/<name>.pem`.
    pub fn new(dir: &Path, name: &str) -> Self {
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
        params.distinguished_name.push(DnType::CommonName, name);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let issuer = CertifiedIssuer::self_signed(params, KeyPair::generate().expect("CA key"))
            .expect("CA certificate");
        let cert = dir.join(format!("{name}.pem"));
        std::fs::write(&cert, issuer.pem()).expect("write the CA certificate");
        Self {
            issuer,
            dir: dir.to_path_buf(),
            cert,
        }
    }

    /// A server certificate for `names` (IP addresses or DNS names) and its key:
    /// `dir/<name>.pem` and `dir/<name>-key.pem`.
    pub fn issue(&self, name: &str, names: &[&str]) -> (PathBuf, PathBuf) {
        let key = KeyPair::generate().expect("server key");
        let names: Vec<String> = names.iter().map(|n| n.to_string()).collect();
        let mut params = CertificateParams::new(names).expect("server params");
        params.distinguished_name.push(DnType::CommonName, name);
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let cert = params
            .signed_by(&key, &self.issuer)
            .expect("server certificate");
        let (cert_path, key_path) = (
            self.dir.join(format!("{name}.pem")),
            self.dir.join(format!("{name}-key.pem")),
        );
        std::fs::write(&cert_path, cert.pem()).expect("write the certificate");
        std::fs::write(&key_path, key.serialize_pem()).expect("write the key");
        (cert_path, key_path)
    }
}
