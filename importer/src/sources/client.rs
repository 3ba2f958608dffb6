//! The HTTP client every network source shares: rustls with the built-in roots plus
//! the CA files CDI mounts, CDI's insecure switch, proxies. It follows no redirect
//! itself: `net::follow` does, keeping credentials and the user's secret extra headers
//! (applied per request, never as client defaults) on their own origin.

use reqwest::header::{HeaderMap, HeaderName, HeaderValue};
use std::path::{Path, PathBuf};
use std::sync::Arc;

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("reading CA certificate {path}: {source}")]
    Cert {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("invalid extra header {0:?}: expected `Name: value`")]
    Header(String),
    #[error("invalid proxy {0:?}")]
    Proxy(String),
    #[error("building HTTP client: {0}")]
    Build(String),
}

/// The proxies requests go through (read from flags and the environment at the edge,
/// in `cli.rs`); none means direct.
#[derive(Debug, Clone, Default)]
pub struct Proxies {
    pub http: Option<String>,
    pub https: Option<String>,
    pub no_proxy: Option<String>,
}

pub struct ClientOptions<'a> {
    pub ca_dirs: Vec<&'a Path>,
    pub insecure: bool,
    pub proxies: Proxies,
    /// Names under `.localhost` to resolve to the loopback addresses ourselves, as RFC
    /// 6761 (6.3) asks of applications and curl does; glibc sends them to DNS. A
    /// virtual-hosted S3 bucket on a local endpoint (`disks.localhost:9000`) needs it.
    pub localhost_names: Vec<String>,
}

/// Link-local (cloud metadata at 169.254.169.254), loopback, unspecified; `localhost`.
/// A host name that resolves there is not caught: only what the URL names.
pub fn is_internal(url: &reqwest::Url) -> bool {
    use std::net::IpAddr;
    match url.host() {
        Some(url::Host::Ipv4(v4)) => internal_ip(IpAddr::V4(v4)),
        Some(url::Host::Ipv6(v6)) => internal_ip(IpAddr::V6(v6)),
        Some(url::Host::Domain(d)) => {
            let d = d.trim_end_matches('.').to_ascii_lowercase();
            d == "localhost" || d.ends_with(".localhost")
        }
        None => false,
    }
}

fn internal_ip(ip: std::net::IpAddr) -> bool {
    use std::net::IpAddr;
    match ip {
        IpAddr::V4(v4) => v4.is_link_local() || v4.is_loopback() || v4.is_unspecified(),
        IpAddr::V6(v6) => {
            if let Some(v4) = v6.to_ipv4_mapped() {
                return internal_ip(IpAddr::V4(v4));
            }
            v6.is_loopback() || v6.is_unspecified() || (v6.segments()[0] & 0xffc0) == 0xfe80
        }
    }
}

pub const USER_AGENT: &str = concat!("ferrydisk-importer/", env!("CARGO_PKG_VERSION"));

/// The client of the network sources: reqwest, and for a GET of an `https://` URL when
/// no proxy is set, the direct transport (`net::direct`: the same TLS configuration,
/// with reads under TLS in large gulps). Everything else is reqwest's, reached through
/// `Deref`.
#[derive(Clone)]
pub struct HttpClient {
    pub reqwest: reqwest::Client,
    pub direct: Option<crate::net::direct::Direct>,
}

impl std::ops::Deref for HttpClient {
    type Target = reqwest::Client;

    fn deref(&self) -> &reqwest::Client {
        &self.reqwest
    }
}

const CONNECT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);
const KEEPALIVE: std::time::Duration = std::time::Duration::from_secs(30);

pub fn build(opts: &ClientOptions<'_>) -> Result<HttpClient, ClientError> {
    let tls = tls_config(opts)?;
    let mut b = reqwest::Client::builder()
        .use_preconfigured_tls(tls.clone())
        .user_agent(USER_AGENT)
        .connect_timeout(CONNECT_TIMEOUT)
        .tcp_keepalive(KEEPALIVE)
        .redirect(reqwest::redirect::Policy::none())
        // A disk is one long body: HTTP/1.1 hands it over in large reads, where HTTP/2
        // (which a TLS server offers by ALPN) cuts it into 16 KiB frames, each with its
        // flow-control bookkeeping.
        .http1_only()
        .no_proxy();
    for name in &opts.localhost_names {
        if name.ends_with(".localhost") {
            b = b.resolve_to_addrs(name, &crate::net::direct::LOOPBACK);
        }
    }
    let no_proxy = opts
        .proxies
        .no_proxy
        .as_deref()
        .and_then(reqwest::NoProxy::from_string);
    let http_proxy = opts.proxies.http.clone();
    let https_proxy = opts.proxies.https.clone();
    if let Some(p) = http_proxy {
        b = b.proxy(
            reqwest::Proxy::http(&p)
                .map_err(|_| ClientError::Proxy(super::redact::url(&p)))?
                .no_proxy(no_proxy.clone()),
        );
    }
    // An HTTPS proxy sees every https:// request: the direct transport (which speaks
    // to origins only) is left out.
    let direct = opts.proxies.https.is_none().then(|| {
        crate::net::direct::Direct::new(
            USER_AGENT,
            tls,
            &opts.localhost_names,
            CONNECT_TIMEOUT,
            KEEPALIVE,
        )
    });
    if let Some(p) = https_proxy {
        b = b.proxy(
            reqwest::Proxy::https(&p)
                .map_err(|_| ClientError::Proxy(super::redact::url(&p)))?
                .no_proxy(no_proxy),
        );
    }
    let reqwest = b.build().map_err(|e| ClientError::Build(e.to_string()))?;
    Ok(HttpClient { reqwest, direct })
}

/// The one TLS configuration of both transports: the compiled-in Mozilla roots, the
/// system's, and every certificate in the CA directories CDI mounts (a file with none
/// is skipped with a warning, as CDI's loadCA does); CDI's insecure switch accepts any
/// certificate. HTTP/1.1 only.
fn tls_config(opts: &ClientOptions<'_>) -> Result<rustls::ClientConfig, ClientError> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::CertificateDer;
    let mut roots = rustls::RootCertStore::empty();
    roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    // Native stores may hold ancient or malformed certificates: those are skipped.
    for cert in rustls_native_certs::load_native_certs().certs {
        let _ = roots.add(cert);
    }
    for dir in &opts.ca_dirs {
        for path in pem_files(dir) {
            let pem = std::fs::read(&path).map_err(|source| ClientError::Cert {
                path: path.clone(),
                source,
            })?;
            let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&pem)
                .filter_map(Result::ok)
                .collect();
            if certs.is_empty() {
                tracing::warn!(path = %path.display(), "no certificate in this file of the CA directory; skipped");
                continue;
            }
            for c in certs {
                if let Err(e) = roots.add(c) {
                    tracing::warn!(path = %path.display(), error = %e, "an unusable certificate in this file of the CA directory; skipped");
                }
            }
        }
    }
    let provider = ferrydisk_common::serve::tls::provider();
    let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(rustls::ALL_VERSIONS)
        .map_err(|e| ClientError::Build(e.to_string()))?;
    let mut config = if opts.insecure {
        builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(AnyCertificate(provider)))
            .with_no_client_auth()
    } else {
        builder.with_root_certificates(roots).with_no_client_auth()
    };
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(config)
}

/// CDI's insecure switch (`INSECURE_TLS`, an insecure registry): any certificate and
/// any handshake signature are taken, as reqwest's own switch took them (a
/// self-signed certificate with a key ring cannot verify, RSA-1024, still connects).
#[derive(Debug)]
struct AnyCertificate(Arc<rustls::crypto::CryptoProvider>);

impl rustls::client::danger::ServerCertVerifier for AnyCertificate {
    fn verify_server_cert(
        &self,
        _end_entity: &rustls::pki_types::CertificateDer<'_>,
        _intermediates: &[rustls::pki_types::CertificateDer<'_>],
        _server_name: &rustls::pki_types::ServerName<'_>,
        _ocsp_response: &[u8],
        _now: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &rustls::pki_types::CertificateDer<'_>,
        _dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        Ok(rustls::client::danger::HandshakeSignatureValid::assertion())
    }

    fn verify_tls13_signature(
        &self,
        _message: &[u8],
        _cert: &rustls::pki_types::CertificateDer<'_>,
        _dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        Ok(rustls::client::danger::HandshakeSignatureValid::assertion())
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// Every regular, non-dot file in `dir` (CDI adds each as PEM). A missing dir is empty.
pub fn pem_files(dir: &Path) -> Vec<PathBuf> {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut out: Vec<PathBuf> = rd
        .filter_map(Result::ok)
        .filter(|e| !e.file_name().to_string_lossy().starts_with('.'))
        .map(|e| e.path())
        .filter(|p| p.is_file())
        .collect();
    out.sort();
    out
}

/// `Name: value` lines -> headers (split at the first colon, value trimmed).
pub fn parse_headers(lines: &[String]) -> Result<HeaderMap, ClientError> {
    let mut map = HeaderMap::new();
    for line in lines {
        let line = line.trim_end_matches(['\r', '\n']);
        let (name, value) = line
            .split_once(':')
            .ok_or_else(|| ClientError::Header(redact_header(line)))?;
        let name = HeaderName::from_bytes(name.trim().as_bytes())
            .map_err(|_| ClientError::Header(redact_header(line)))?;
        let value = HeaderValue::from_str(value.trim())
            .map_err(|_| ClientError::Header(redact_header(line)))?;
        map.append(name, value);
    }
    Ok(map)
}

fn redact_header(line: &str) -> String {
    match line.split_once(':') {
        Some((n, _)) => format!("{n}: <redacted>"),
        None => "<redacted>".into(),
    }
}

/// Extra headers as CDI collects them: `IMPORTER_EXTRA_HEADER_*` env vars (in name
/// order) and every non-dot file below `dir` (one header line each, recursively).
pub fn collect_extra_headers(
    env: impl Iterator<Item = (String, String)>,
    dir: &Path,
) -> Vec<String> {
    let mut from_env: Vec<(String, String)> = env
        .filter(|(k, _)| k.starts_with("IMPORTER_EXTRA_HEADER_"))
        .collect();
    from_env.sort();
    let mut out: Vec<String> = from_env.into_iter().map(|(_, v)| v).collect();
    let mut stack = vec![dir.to_path_buf()];
    let mut files = Vec::new();
    while let Some(d) = stack.pop() {
        let Ok(rd) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in rd.filter_map(Result::ok) {
            if e.file_name().to_string_lossy().starts_with('.') {
                continue;
            }
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else if p.is_file() {
                files.push(p);
            }
        }
    }
    files.sort();
    for f in files {
        if let Ok(s) = std::fs::read_to_string(&f) {
            out.push(s.trim().to_string());
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn internal_targets() {
        let u = |s: &str| reqwest::Url::parse(s).expect("url");
        assert!(is_internal(&u("http://169.254.169.254/latest/meta-data")));
        assert!(is_internal(&u("http://127.0.0.1:8080/x")));
        assert!(is_internal(&u("http://[::1]/x")));
        assert!(is_internal(&u("http://[fe80::1]/x")));
        assert!(is_internal(&u("http://[::ffff:169.254.1.1]/x")));
        assert!(is_internal(&u("http://0.0.0.0/x")));
        assert!(is_internal(&u("http://LOCALHOST./x")));
        assert!(!is_internal(&u("https://example.org/disk.img")));
        assert!(!is_internal(&u("http://10.0.0.1/disk.img")));
    }

    #[test]
    fn headers_parse_and_invalid_ones_are_redacted() {
        let h = parse_headers(&["X-Token: abc".into(), "Accept:  */*".into()]).expect("parse");
        assert_eq!(h["x-token"], "abc");
        assert_eq!(h["accept"], "*/*");
        let e = parse_headers(&["Bad Header: secret".into()]).expect_err("invalid");
        assert!(!e.to_string().contains("secret"));
    }

    #[test]
    fn collects_env_and_secret_files() {
        let dir = tempfile::tempdir().expect("tmp");
        std::fs::create_dir_all(dir.path().join("0/..data")).expect("mkdir");
        std::fs::write(dir.path().join("0/secretHeader"), "X-Secret: s\n").expect("write");
        std::fs::write(dir.path().join("0/.hidden"), "X-No: n").expect("write");
        let env = vec![
            ("IMPORTER_EXTRA_HEADER_1".to_string(), "B: 2".to_string()),
            ("IMPORTER_EXTRA_HEADER_0".to_string(), "A: 1".to_string()),
            ("PATH".to_string(), "x".to_string()),
        ];
        let got = collect_extra_headers(env.into_iter(), dir.path());
        assert_eq!(got, vec!["A: 1", "B: 2", "X-Secret: s"]);
    }
}
