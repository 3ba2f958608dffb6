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
