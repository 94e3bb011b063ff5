//! TLS between all parties: the server side (`--tls-cert`, `--tls-key`: rustls over the
//! listening socket, see [`TlsListener`]; the pair is read again when the files change, see
//! [`ServerCert`]) and the client side (`--tls-ca`: which CAs this
//! process trusts when it calls other agents or the controller, see [`client_builder`]; the
//! bundle is read again when it changes, see [`TrustedCas`]).
//!
//! The bearer token stays the authentication; TLS protects it and the checkpoint streams
//! (process memory) from being read or changed on the node network. Clients do not present
//! certificates (no mutual TLS).

use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::pem::{self, PemObject};
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinSet;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;
use tracing::{debug, error};

/// A client that has not finished its handshake by then is dropped: a stalled or plain-HTTP
/// peer must not hold a connection slot.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Handshakes in flight at once; past that, new connections wait in the kernel's backlog.
const MAX_HANDSHAKES: usize = 256;

const CERT_EXPECTED: &str = "PEM certificates (-----BEGIN CERTIFICATE-----), this server's \
                             first, then any intermediate CAs";
const KEY_EXPECTED: &str = "an unencrypted PEM private key (-----BEGIN PRIVATE KEY-----, \
                            -----BEGIN RSA PRIVATE KEY----- or -----BEGIN EC PRIVATE KEY-----)";
const CA_EXPECTED: &str = "PEM CA certificates (-----BEGIN CERTIFICATE-----)";

/// Why the TLS files cannot be used; each names the file and what was expected of it.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// The file cannot be read.
    #[error("cannot read the {what} {}: {source}", path.display())]
    Read {
        /// Which file: "TLS certificate", "TLS private key", "CA bundle".
        what: &'static str,
        /// Its path.
        path: PathBuf,
        /// Why.
        source: io::Error,
    },
    /// The file is read but holds nothing usable.
    #[error("the {what} {} {problem}; expected {expected}", path.display())]
    Invalid {
        /// Which file.
        what: &'static str,
        /// Its path.
        path: PathBuf,
        /// What is wrong with it.
        problem: String,
        /// What it should hold.
        expected: &'static str,
    },
    /// The key is not the one the certificate was issued for.
    #[error(
        "the TLS private key {} does not match the certificate {}; expected the key the \
         certificate was issued for",
        key.display(), cert.display()
    )]
    KeyMismatch {
        /// The certificate file.
        cert: PathBuf,
        /// The key file.
        key: PathBuf,
    },
    /// rustls refused the pair for another reason (an unsupported key type, a certificate
    /// that does not parse).
    #[error(
        "cannot serve TLS with the certificate {} and the key {}: {reason}",
        cert.display(), key.display()
    )]
    Unusable {
        /// The certificate file.
        cert: PathBuf,
        /// The key file.
        key: PathBuf,
        /// rustls's reason.
        reason: String,
    },
}

fn read(what: &'static str, path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read {
        what,
        path: path.to_path_buf(),
        source,
    })
}

fn pem_problem(e: &pem::Error) -> String {
    match e {
        pem::Error::NoItemsFound => "holds none".to_string(),
        pem::Error::MissingSectionEnd { .. } => "has a PEM section with no END line".to_string(),
        pem::Error::IllegalSectionStart { .. } => "has a malformed BEGIN line".to_string(),
        pem::Error::Base64Decode(e) => format!("has a PEM section that is not base64 ({e})"),
        e => format!("is not valid PEM ({e:?})"),
    }
}

/// Every certificate in a PEM file, in order; at least one.
fn load_certificates(
    what: &'static str,
    path: &Path,
    expected: &'static str,
) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let invalid = |problem: String| TlsError::Invalid {
        what,
        path: path.to_path_buf(),
        problem,
        expected,
    };
    let bytes = read(what, path)?;
    let certs = CertificateDer::pem_slice_iter(&bytes)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| invalid(pem_problem(&e)))?;
    if certs.is_empty() {
        return Err(invalid("holds no certificate".to_string()));
    }
    Ok(certs)
}

fn load_private_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    const WHAT: &str = "TLS private key";
    let bytes = read(WHAT, path)?;
    PrivateKeyDer::from_pem_slice(&bytes).map_err(|e| TlsError::Invalid {
        what: WHAT,
        path: path.to_path_buf(),
        problem: match e {
            pem::Error::NoItemsFound => "holds no private key".to_string(),
            e => pem_problem(&e),
        },
        expected: KEY_EXPECTED,
    })
}

/// The rustls configuration for serving with the certificate chain in `cert` and its key in
/// `key` (both PEM), HTTP/1.1 only (the only protocol the server speaks). The pair is read
/// again when the files change ([`ServerCert`]); a pair that does not load now is an error.
pub fn server_config(cert: &Path, key: &Path) -> Result<Arc<rustls::ServerConfig>, TlsError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let resolver = ServerCert::load(cert, key, provider.clone(), RELOAD_CHECK)?;
    // The provider is named rather than taken from the process default: reqwest's rustls is
    // built with ring only, and so is this one.
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| unusable(cert, key, e))?
        .with_no_client_auth()
        .with_cert_resolver(Arc::new(resolver));
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

fn unusable(cert: &Path, key: &Path, e: rustls::Error) -> TlsError {
    match e {
        rustls::Error::InconsistentKeys(rustls::InconsistentKeys::KeyMismatch) => {
            TlsError::KeyMismatch {
                cert: cert.to_path_buf(),
                key: key.to_path_buf(),
            }
        }
        e => TlsError::Unusable {
            cert: cert.to_path_buf(),
            key: key.to_path_buf(),
            reason: e.to_string(),
        },
    }
}

/// How often, at most, the server looks whether its certificate or key file changed (two
/// `stat`s, on a handshake).
pub const RELOAD_CHECK: Duration = Duration::from_secs(1);

/// The server's certificate chain and key, read again when either file changes: a
/// certificate renewed in place (a Kubernetes Secret volume that cert-manager updates, a file
/// replaced by a renewal job) is served from the next handshake on, without a restart, and an
/// expiring certificate does not take the node's API down with it.
///
/// A handshake looks at the files' identity (inode, size, modification time, following
/// symlinks as a Secret volume's are) at most once per check interval. A changed pair that
/// does not load (one file written and not the other yet, a key of another certificate) is
/// logged once and the pair loaded before is served until the files change again.
#[derive(Debug)]
pub struct ServerCert {
    cert: PathBuf,
    key: PathBuf,
    provider: Arc<rustls::crypto::CryptoProvider>,
    loaded: Reloaded<Arc<rustls::sign::CertifiedKey>>,
}

/// A value read from files, read again when they change: the state behind [`ServerCert`] and
/// [`TrustedCas`]. At most once per check interval the files' identity is compared with the
/// one they had when last read; a changed set that does not load is logged once and the
/// value loaded before is kept until the files change again.
#[derive(Debug)]
struct Reloaded<T> {
    paths: Vec<PathBuf>,
    /// What the value is, for the log.
    what: &'static str,
    check_every: Duration,
    state: std::sync::Mutex<Loaded<T>>,
}

#[derive(Debug)]
struct Loaded<T> {
    current: T,
    /// The files' identity when last looked at.
    seen: Vec<Option<FileId>>,
    checked: std::time::Instant,
}

impl<T: Clone> Reloaded<T> {
    /// Loads the value now (an error if it does not load).
    fn load(
        paths: &[&Path],
        what: &'static str,
        check_every: Duration,
        load: impl FnOnce() -> Result<T, TlsError>,
    ) -> Result<Self, TlsError> {
        let seen = paths.iter().map(|p| file_id(p)).collect();
        let current = load()?;
        Ok(Self {
            paths: paths.iter().map(|p| p.to_path_buf()).collect(),
            what,
            check_every,
            state: std::sync::Mutex::new(Loaded {
                current,
                seen,
                checked: std::time::Instant::now(),
            }),
        })
    }

    /// The value to use now, loaded again first with `load` if the files changed.
    fn current(&self, load: impl FnOnce() -> Result<T, TlsError>) -> T {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if state.checked.elapsed() < self.check_every {
            return state.current.clone();
        }
        state.checked = std::time::Instant::now();
        let seen: Vec<_> = self.paths.iter().map(|p| file_id(p)).collect();
        if seen == state.seen {
            return state.current.clone();
        }
        state.seen = seen;
        let files = self
            .paths
            .iter()
            .map(|p| p.display().to_string())
            .collect::<Vec<_>>()
            .join(", ");
        match load() {
            Ok(value) => {
                state.current = value;
                tracing::info!(%files, "{} changed on disk: using the new one", self.what);
            }
            Err(e) => tracing::error!(%files, error = %e,
                "{} changed on disk but cannot be used; still using the one loaded before until \
                 the files change again", self.what),
        }
        state.current.clone()
    }
}

/// What tells a file's contents changed without reading it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct FileId {
    dev: u64,
    ino: u64,
    len: u64,
    mtime_ns: i128,
}

fn file_id(path: &Path) -> Option<FileId> {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata(path).ok()?;
    Some(FileId {
        dev: m.dev(),
        ino: m.ino(),
        len: m.len(),
        mtime_ns: i128::from(m.mtime()) * 1_000_000_000 + i128::from(m.mtime_nsec()),
    })
}

impl ServerCert {
    /// Loads the pair now (an error if it does not load), to be looked at again at most once
    /// per `check_every`.
    pub fn load(
        cert: &Path,
        key: &Path,
        provider: Arc<rustls::crypto::CryptoProvider>,
        check_every: Duration,
    ) -> Result<Self, TlsError> {
        let loaded = Reloaded::load(&[cert, key], "TLS certificate", check_every, || {
            certified_key(cert, key, &provider).map(Arc::new)
        })?;
        Ok(Self {
            cert: cert.to_path_buf(),
            key: key.to_path_buf(),
            provider,
            loaded,
        })
    }

    /// The pair to serve now, read again first if the files changed.
    pub fn current(&self) -> Arc<rustls::sign::CertifiedKey> {
        self.loaded
            .current(|| certified_key(&self.cert, &self.key, &self.provider).map(Arc::new))
    }
}

impl rustls::server::ResolvesServerCert for ServerCert {
    fn resolve(
        &self,
        _hello: rustls::server::ClientHello<'_>,
    ) -> Option<Arc<rustls::sign::CertifiedKey>> {
        Some(self.current())
    }
}

/// The chain in `cert` and its key in `key`, checked to belong together.
fn certified_key(
    cert: &Path,
    key: &Path,
    provider: &rustls::crypto::CryptoProvider,
) -> Result<rustls::sign::CertifiedKey, TlsError> {
    let chain = load_certificates("TLS certificate", cert, CERT_EXPECTED)?;
    let private_key = load_private_key(key)?;
    rustls::sign::CertifiedKey::from_der(chain, private_key, provider)
        .map_err(|e| unusable(cert, key, e))
}

/// The CA certificates of a PEM bundle, each checked to be usable as a trust anchor.
pub fn load_ca_bundle(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    const WHAT: &str = "CA bundle";
    let certs = load_certificates(WHAT, path, CA_EXPECTED)?;
    let mut roots = rustls::RootCertStore::empty();
    for (i, cert) in certs.iter().enumerate() {
        roots.add(cert.clone()).map_err(|e| TlsError::Invalid {
            what: WHAT,
            path: path.to_path_buf(),
            problem: format!(
                "has a certificate (number {}) that is not usable: {e}",
                i + 1
            ),
            expected: CA_EXPECTED,
        })?;
    }
    Ok(certs)
}

/// The one place every HTTP client of this binary starts from (agent to agent, agent to
/// controller, controller to agent, the CLI). With `ca`, the CAs of that bundle are the
/// *only* trust anchors: a cluster's own CA signs the node certificates, and a public CA
/// that would also be trusted could issue a certificate for a node's name to anyone. The
/// bundle is read again when it changes ([`TrustedCas`]). Without it, the built-in web PKI
/// roots, as before.
pub fn client_builder(ca: Option<&Path>) -> Result<reqwest::ClientBuilder, TlsError> {
    let builder = reqwest::Client::builder().use_rustls_tls();
    let Some(path) = ca else {
        return Ok(builder);
    };
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let verifier = TrustedCas::load(path, provider.clone(), RELOAD_CHECK)?;
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Invalid {
            what: "CA bundle",
            path: path.to_path_buf(),
            problem: format!("cannot be used with this TLS library: {e}"),
            expected: CA_EXPECTED,
        })?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier))
        .with_no_client_auth();
    Ok(builder.use_preconfigured_tls(config))
}

/// The CAs a client trusts (`--tls-ca`), read again when the bundle changes: a CA rotated in
/// place (a new CA added to the bundle before the certificates it signs are rolled out, the
/// old one removed after) is trusted from the next connection on, without a restart.
///
/// As [`ServerCert`]: a connection looks at the file's identity at most once per check
/// interval; a changed bundle that does not load is logged and the CAs loaded before stay
/// trusted until it changes again. Verification itself is rustls' WebPKI verifier.
#[derive(Debug)]
pub struct TrustedCas {
    path: PathBuf,
    provider: Arc<rustls::crypto::CryptoProvider>,
    loaded: Reloaded<Arc<rustls::client::WebPkiServerVerifier>>,
}

impl TrustedCas {
    /// Loads the bundle now (an error if it does not load), to be looked at again at most
    /// once per `check_every`.
    pub fn load(
        path: &Path,
        provider: Arc<rustls::crypto::CryptoProvider>,
        check_every: Duration,
    ) -> Result<Self, TlsError> {
        let loaded = Reloaded::load(&[path], "CA bundle", check_every, || {
            ca_verifier(path, &provider)
        })?;
        Ok(Self {
            path: path.to_path_buf(),
            provider,
            loaded,
        })
    }

    /// The verifier of the CAs to trust now, read again first if the bundle changed.
    fn current(&self) -> Arc<rustls::client::WebPkiServerVerifier> {
        self.loaded
            .current(|| ca_verifier(&self.path, &self.provider))
    }
}

/// rustls' WebPKI verifier over the CAs of the bundle at `path`.
fn ca_verifier(
    path: &Path,
    provider: &Arc<rustls::crypto::CryptoProvider>,
) -> Result<Arc<rustls::client::WebPkiServerVerifier>, TlsError> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in load_ca_bundle(path)? {
        // load_ca_bundle has checked each one.
        let _ = roots.add(cert);
    }
    rustls::client::WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider.clone())
        .build()
        .map_err(|e| TlsError::Invalid {
            what: "CA bundle",
            path: path.to_path_buf(),
            problem: format!("cannot verify certificates: {e}"),
            expected: CA_EXPECTED,
        })
}

impl rustls::client::danger::ServerCertVerifier for TrustedCas {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &rustls::pki_types::ServerName<'_>,
        ocsp_response: &[u8],
        now: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        self.current().verify_server_cert(
            end_entity,
            intermediates,
            server_name,
            ocsp_response,
            now,
        )
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.current().verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.current().verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.current().supported_verify_schemes()
    }
}

/// A TCP listener that hands axum only connections whose TLS handshake succeeded.
///
/// Handshakes run as their own tasks, so one slow or hostile client does not hold up the
/// others; a failed one is logged at debug and forgotten.
pub struct TlsListener {
    tcp: TcpListener,
    acceptor: TlsAcceptor,
    handshakes: JoinSet<(SocketAddr, io::Result<TlsStream<TcpStream>>)>,
}

impl TlsListener {
    /// Serves TLS with `config` on an already bound listener.
    pub fn new(tcp: TcpListener, config: Arc<rustls::ServerConfig>) -> Self {
        Self {
            tcp,
            acceptor: TlsAcceptor::from(config),
            handshakes: JoinSet::new(),
        }
    }

    fn handshake(&mut self, stream: TcpStream, peer: SocketAddr) {
        // As without TLS (main.rs, no_delay): small messages go out at once.
        let _ = stream.set_nodelay(true);
        let acceptor = self.acceptor.clone();
        self.handshakes.spawn(async move {
            let result = tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream))
                .await
                .unwrap_or_else(|_| {
                    Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        format!("no TLS handshake within {HANDSHAKE_TIMEOUT:?}"),
                    ))
                });
            (peer, result)
        });
    }
}

impl axum::serve::Listener for TlsListener {
    type Io = TlsStream<TcpStream>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        loop {
            let room = self.handshakes.len() < MAX_HANDSHAKES;
            tokio::select! {
                accepted = self.tcp.accept(), if room => match accepted {
                    Ok((stream, peer)) => self.handshake(stream, peer),
                    Err(e) => accept_failed(e).await,
                },
                Some(done) = self.handshakes.join_next() => match done {
                    Ok((peer, Ok(stream))) => return (stream, peer),
                    Ok((peer, Err(e))) => debug!(%peer, error = %e, "TLS handshake failed"),
                    Err(e) => debug!(error = %e, "TLS handshake task ended abnormally"),
                },
            }
        }
    }

    fn local_addr(&self) -> io::Result<Self::Addr> {
        self.tcp.local_addr()
    }
}

/// A peer that gave up before its connection was accepted is routine; anything else (out of
/// file descriptors) is worth an error, and a pause so the loop does not spin on it.
async fn accept_failed(e: io::Error) {
    if matches!(
        e.kind(),
        io::ErrorKind::ConnectionAborted | io::ErrorKind::ConnectionReset
    ) {
        debug!(error = %e, "connection closed before it was accepted");
        return;
    }
    error!(error = %e, "cannot accept connections; retrying in 1s");
    tokio::time::sleep(Duration::from_secs(1)).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOT_PEM: &str = "this is not a certificate\n";

    fn write(dir: &Path, name: &str, contents: &str) -> PathBuf {
        let path = dir.join(name);
        std::fs::write(&path, contents).expect("write");
        path
    }

    /// A self-signed certificate and its key, and a second key that does not match it.
    fn pair() -> (String, String, String) {
        let key = rcgen::KeyPair::generate().expect("key");
        let cert = rcgen::CertificateParams::new(vec!["localhost".to_string()])
            .expect("params")
            .self_signed(&key)
            .expect("cert");
        let other = rcgen::KeyPair::generate().expect("other key");
        (cert.pem(), key.serialize_pem(), other.serialize_pem())
    }

    #[test]
    fn a_matching_pair_loads() {
        let dir = tempfile::tempdir().expect("tmp");
        let (cert, key, _) = pair();
        let config = server_config(
            &write(dir.path(), "cert.pem", &cert),
            &write(dir.path(), "key.pem", &key),
        )
        .expect("config");
        assert_eq!(config.alpn_protocols, vec![b"http/1.1".to_vec()]);
        assert_eq!(
            load_ca_bundle(&write(dir.path(), "ca.pem", &(cert.clone() + &cert)))
                .expect("bundle")
                .len(),
            2
        );
    }

    /// Replaces `dir/name` as a Secret volume update or a renewal job does: a new file renamed
    /// over the old one.
    fn replace(dir: &Path, name: &str, contents: &str) {
        let tmp = write(dir, &format!(".{name}.new"), contents);
        std::fs::rename(tmp, dir.join(name)).expect("rename");
    }

    fn der(pem: &str) -> CertificateDer<'static> {
        CertificateDer::from_pem_slice(pem.as_bytes()).expect("certificate")
    }

    #[test]
    fn a_renewed_pair_is_served_and_a_half_written_one_is_not() {
        let dir = tempfile::tempdir().expect("tmp");
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let (cert_a, key_a, _) = pair();
        let cert = write(dir.path(), "cert.pem", &cert_a);
        let key = write(dir.path(), "key.pem", &key_a);
        let served = ServerCert::load(&cert, &key, provider.clone(), Duration::ZERO).expect("load");
        let first = served.current();
        assert_eq!(first.cert, vec![der(&cert_a)]);
        assert!(
            Arc::ptr_eq(&first, &served.current()),
            "unchanged files are not read again"
        );

        let (cert_b, key_b, _) = pair();
        replace(dir.path(), "cert.pem", &cert_b);
        replace(dir.path(), "key.pem", &key_b);
        assert_eq!(served.current().cert, vec![der(&cert_b)]);

        // Half a renewal: the new certificate is there, its key not yet. B is still served.
        let (cert_c, key_c, _) = pair();
        replace(dir.path(), "cert.pem", &cert_c);
        assert_eq!(served.current().cert, vec![der(&cert_b)]);
        replace(dir.path(), "key.pem", &key_c);
        assert_eq!(served.current().cert, vec![der(&cert_c)]);

        // Removed files (a Secret being replaced) keep the last pair too.
        std::fs::remove_file(&key).expect("rm");
        assert_eq!(served.current().cert, vec![der(&cert_c)]);

        // Between two checks the files are not looked at.
        let (cert_d, key_d, _) = pair();
        replace(dir.path(), "key.pem", &key_c);
        let lazy =
            ServerCert::load(&cert, &key, provider, Duration::from_secs(3600)).expect("load");
        replace(dir.path(), "cert.pem", &cert_d);
        replace(dir.path(), "key.pem", &key_d);
        assert_eq!(lazy.current().cert, vec![der(&cert_c)]);
    }

    #[test]
    fn bad_files_are_named_with_what_was_expected() {
        let dir = tempfile::tempdir().expect("tmp");
        let (cert, key, other) = pair();
        let cert_path = write(dir.path(), "cert.pem", &cert);
        let key_path = write(dir.path(), "key.pem", &key);
        let not_pem = write(dir.path(), "not.pem", NOT_PEM);
        let truncated = write(
            dir.path(),
            "truncated.pem",
            &cert[..cert.find("-----END").expect("end")],
        );
        let missing = dir.path().join("missing.pem");
        let message = |r: Result<Arc<rustls::ServerConfig>, TlsError>| {
            r.expect_err("should fail").to_string()
        };

        let e = message(server_config(&missing, &key_path));
        assert!(
            e.contains("cannot read the TLS certificate") && e.contains("missing.pem"),
            "{e}"
        );
        let e = message(server_config(&not_pem, &key_path));
        assert!(
            e.contains("not.pem holds no certificate") && e.contains("BEGIN CERTIFICATE"),
            "{e}"
        );
        let e = message(server_config(&truncated, &key_path));
        assert!(
            e.contains("truncated.pem has a PEM section with no END line"),
            "{e}"
        );
        // The two files swapped: the certificate file holds no key.
        let e = message(server_config(&key_path, &cert_path));
        assert!(
            e.contains("TLS certificate") && e.contains("key.pem"),
            "{e}"
        );
        let e = message(server_config(&cert_path, &cert_path));
        assert!(
            e.contains("TLS private key") && e.contains("holds no private key"),
            "{e}"
        );
        assert!(e.contains("BEGIN PRIVATE KEY"), "{e}");

        let other_path = write(dir.path(), "other.pem", &other);
        match server_config(&cert_path, &other_path) {
            Err(e @ TlsError::KeyMismatch { .. }) => {
                let e = e.to_string();
                assert!(e.contains("other.pem") && e.contains("cert.pem"), "{e}");
            }
            other => panic!("expected a key mismatch, got {other:?}"),
        }

        let e = load_ca_bundle(&not_pem)
            .expect_err("not a bundle")
            .to_string();
        assert!(e.contains("CA bundle") && e.contains("not.pem"), "{e}");
        let e = client_builder(Some(&missing))
            .expect_err("missing bundle")
            .to_string();
        assert!(e.contains("cannot read the CA bundle"), "{e}");
    }
}
