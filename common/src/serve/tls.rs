//! rustls server configuration from PEM files, with optional client-certificate
//! verification (CDI's upload server: `VerifyClientCertIfGiven` + a CN check per
//! request), and the one crypto provider every client and server in a binary uses.

use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use std::path::Path;
use std::sync::Arc;

#[derive(Debug, thiserror::Error)]
#[error("{context}: {message}")]
pub struct TlsError {
    context: String,
    message: String,
}

fn err(context: impl Into<String>, e: impl std::fmt::Display) -> TlsError {
    TlsError {
        context: context.into(),
        message: e.to_string(),
    }
}

/// ring: the one crypto library in the binaries.
pub fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Makes [`provider`] the process default, so clients built by other crates (reqwest
/// inside oci-client) use it instead of bringing a second crypto library.
pub fn install_default_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

pub fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let shown = path.display().to_string();
    let pem = std::fs::read(path).map_err(|e| err(format!("reading {shown}"), e))?;
    let certs = rustls_pemfile::certs(&mut &pem[..])
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| err(format!("parsing {shown}"), e))?;
    if certs.is_empty() {
        return Err(err(shown, "holds no certificate"));
    }
    Ok(certs)
}

pub fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    let shown = path.display().to_string();
    let pem = std::fs::read(path).map_err(|e| err(format!("reading {shown}"), e))?;
    rustls_pemfile::private_key(&mut &pem[..])
        .map_err(|e| err(format!("parsing {shown}"), e))?
        .ok_or_else(|| err(shown, "holds no private key"))
}

/// `TLS_MIN_VERSION` in openshift/library-go spelling: `VersionTLS13` means 1.3 only;
/// anything else (or nothing) allows 1.2 and 1.3, rustls's floor.
pub fn versions(min: &str) -> &'static [&'static rustls::SupportedProtocolVersion] {
    static TLS13_ONLY: &[&rustls::SupportedProtocolVersion] = &[&rustls::version::TLS13];
    if min == "VersionTLS13" {
        TLS13_ONLY
    } else {
        rustls::DEFAULT_VERSIONS
    }
}

/// How a server's TLS is set up beyond its certificate.
#[derive(Debug, Clone, Copy, Default)]
pub struct ServerTls<'a> {
    /// Verify client certificates against this CA bundle when a client offers one.
    pub client_ca: Option<&'a Path>,
    /// `TLS_MIN_VERSION` ([`versions`]).
    pub min_version: &'a str,
    /// Offer only HTTP/1.1 by ALPN (an upload is one long body; see the proxy).
    pub http11_only: bool,
}

/// A server config from PEM files.
pub fn server_config(
    cert: &Path,
    key: &Path,
    opts: ServerTls<'_>,
) -> Result<rustls::ServerConfig, TlsError> {
    server_config_der(load_certs(cert)?, load_key(key)?, opts)
}

/// A server config from DER (a generated self-signed certificate).
pub fn server_config_der(
    certs: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    opts: ServerTls<'_>,
) -> Result<rustls::ServerConfig, TlsError> {
    let builder = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(versions(opts.min_version))
        .map_err(|e| err("TLS versions", e))?;
    let builder = match opts.client_ca {
        Some(ca) => {
            let mut roots = rustls::RootCertStore::empty();
            for c in load_certs(ca)? {
                roots
                    .add(c)
                    .map_err(|e| err(format!("client CA {}", ca.display()), e))?;
            }
            // Verified if given; whether one is required is decided per request (CDI
            // answers 401, not a handshake failure, and /healthz needs none).
            let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
                Arc::new(roots),
                provider(),
            )
            .allow_unauthenticated()
            .build()
            .map_err(|e| err(format!("client CA {}", ca.display()), e))?;
            builder.with_client_cert_verifier(verifier)
        }
        None => builder.with_no_client_auth(),
    };
    let mut config = builder
        .with_single_cert(certs, key)
        .map_err(|e| err("server certificate", e))?;
    if opts.http11_only {
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
    }
    Ok(config)
}

/// Subject common names of a DER certificate.
pub fn common_names(der: &[u8]) -> Vec<String> {
    match x509_parser::parse_x509_certificate(der) {
        Ok((_, cert)) => cert
            .subject()
            .iter_common_name()
            .filter_map(|cn| cn.as_str().ok().map(str::to_string))
            .collect(),
        Err(_) => Vec::new(),
    }
}

/// A server certificate read from its files again when they change: the kubelet renews
/// a mounted secret by writing a new `..data` directory and flipping the symlink, and
/// CDI renews its certificates after about half of their 24 h. Every handshake checks
/// the files' identity (resolved path, inode, mtime, length: a few syscalls); a change is
/// loaded, and a pair that does not load (caught half-written) keeps the previous one.
/// Connections already open keep the certificate they started with.
#[derive(Debug)]
pub struct ReloadingCert {
    cert: std::path::PathBuf,
    key: std::path::PathBuf,
    current: std::sync::Mutex<(Vec<Stamp>, Arc<rustls::sign::CertifiedKey>)>,
}

type Stamp = Option<(std::path::PathBuf, u64, std::time::SystemTime, u64)>;

fn stamp(p: &Path) -> Stamp {
    use std::os::unix::fs::MetadataExt;
    let real = std::fs::canonicalize(p).ok()?;
    let m = std::fs::metadata(&real).ok()?;
    Some((real, m.ino(), m.modified().ok()?, m.len()))
}

fn certified_key(cert: &Path, key_path: &Path) -> Result<rustls::sign::CertifiedKey, TlsError> {
    let certs = load_certs(cert)?;
    let key = load_key(key_path)?;
    let signer = provider()
        .key_provider
        .load_private_key(key)
        .map_err(|e| err(format!("private key {}", key_path.display()), e))?;
    Ok(rustls::sign::CertifiedKey::new(certs, signer))
}

impl ReloadingCert {
    pub fn new(cert: &Path, key: &Path) -> Result<Self, TlsError> {
        let stamps = vec![stamp(cert), stamp(key)];
        let ck = certified_key(cert, key)?;
        Ok(ReloadingCert {
            cert: cert.to_path_buf(),
            key: key.to_path_buf(),
            current: std::sync::Mutex::new((stamps, Arc::new(ck))),
        })
    }

    fn current(&self) -> Arc<rustls::sign::CertifiedKey> {
        let mut cur = self.current.lock().unwrap_or_else(|e| e.into_inner());
        let now = vec![stamp(&self.cert), stamp(&self.key)];
        if now != cur.0 {
            match certified_key(&self.cert, &self.key) {
                Ok(ck) => {
                    tracing::info!(cert = %self.cert.display(), "server certificate changed on disk: serving the new one");
                    *cur = (now, Arc::new(ck));
                }
                Err(e) => {
                    tracing::warn!(error = %e, "server certificate changed but does not load yet; serving the previous one")
                }
            }
        }
        cur.1.clone()
    }
}

impl rustls::server::ResolvesServerCert for ReloadingCert {
    fn resolve(
        &self,
        _hello: rustls::server::ClientHello<'_>,
    ) -> Option<Arc<rustls::sign::CertifiedKey>> {
        Some(self.current())
    }
}

/// [`server_config`] whose certificate follows its files ([`ReloadingCert`]).
pub fn server_config_reloading(
    cert: &Path,
    key: &Path,
    opts: ServerTls<'_>,
) -> Result<rustls::ServerConfig, TlsError> {
    let resolver = Arc::new(ReloadingCert::new(cert, key)?);
    let builder = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(versions(opts.min_version))
        .map_err(|e| err("TLS versions", e))?;
    if opts.client_ca.is_some() {
        return Err(err(
            "client CA",
            "not supported with a reloading certificate",
        ));
    }
    let mut config = builder.with_no_client_auth().with_cert_resolver(resolver);
    if opts.http11_only {
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
    }
    Ok(config)
}
