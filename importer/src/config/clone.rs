//! [`CloneConfig`]: the clone source's flags and CDI's cloner environment, checked as
//! CDI's cloner checks them (each refusal is its `klog.Fatalf` text, exit 255).

use crate::cli::{parse_go_bool, ClonerArgs};
use std::net::SocketAddr;
use std::path::PathBuf;

/// Why the clone source cannot start, in CDI's words.
#[derive(Debug, thiserror::Error)]
pub enum CloneStartError {
    #[error("Invalid content-type {0:?}")]
    ContentType(String),
    #[error("Invalid mount \"\"")]
    NoMount,
    #[error("Error getting env var {0}")]
    MissingEnv(&'static str),
    #[error("Error {0} creating client keypair")]
    Client(String),
}

pub struct CloneConfig {
    /// `blockdevice-clone` (the device's bytes) or `filesystem-clone` (a sparse tar).
    pub block: bool,
    /// CDI's name for it, sent as `x-cdi-content-type`.
    pub content_type: String,
    pub mount: PathBuf,
    /// About how many bytes will be read (the progress metric's 100 %).
    pub upload_bytes: u64,
    pub owner_uid: String,
    pub upload_url: String,
    /// The mTLS client: trusts only SERVER_CA_CERT, presents CLIENT_CERT/CLIENT_KEY.
    pub client: reqwest::Client,
    pub preallocation: bool,
    pub termination_log: PathBuf,
    pub metrics_addr: Option<SocketAddr>,
}

impl CloneConfig {
    pub fn from_args(args: ClonerArgs) -> Result<Self, CloneStartError> {
        let block = match args.content_type.as_str() {
            "filesystem-clone" => false,
            "blockdevice-clone" => true,
            other => return Err(CloneStartError::ContentType(other.to_string())),
        };
        if args.mount.as_os_str().is_empty() {
            return Err(CloneStartError::NoMount);
        }
        let metrics_addr = args.metrics_addr();
        let e = args.env;
        let need = |value: Option<String>, name: &'static str| {
            value
                .filter(|v| !v.is_empty())
                .ok_or(CloneStartError::MissingEnv(name))
        };
        // In CDI's order: the first one missing is named.
        let owner_uid = need(e.owner_uid, "OWNER_UID")?;
        let key = need(e.client_key, "CLIENT_KEY")?;
        let cert = need(e.client_cert, "CLIENT_CERT")?;
        let ca = need(e.server_ca_cert, "SERVER_CA_CERT")?;
        let upload_url = need(e.upload_url, "UPLOAD_URL")?;
        let prealloc = need(e.preallocation, "PREALLOCATION")?;
        let client =
            client(&cert, &key, &ca).map_err(|e| CloneStartError::Client(e.to_string()))?;
        Ok(CloneConfig {
            block,
            content_type: args.content_type,
            mount: args.mount,
            upload_bytes: args.upload_bytes,
            owner_uid,
            upload_url,
            client,
            // CDI: strconv.ParseBool, false when it does not parse.
            preallocation: parse_go_bool(&prealloc).unwrap_or(false),
            termination_log: args.termination_log,
            metrics_addr,
        })
    }
}

/// The mTLS client: CDI's cloner trusts only `SERVER_CA_CERT` and presents
/// `CLIENT_CERT`/`CLIENT_KEY`, TLS 1.2 at least.
fn client(cert: &str, key: &str, ca: &str) -> Result<reqwest::Client, reqwest::Error> {
    let mut pem = cert.as_bytes().to_vec();
    pem.push(b'\n');
    pem.extend_from_slice(key.as_bytes());
    let mut b = reqwest::Client::builder()
        .use_rustls_tls()
        .identity(reqwest::Identity::from_pem(&pem)?)
        .tls_built_in_root_certs(false)
        .min_tls_version(reqwest::tls::Version::TLS_1_2)
        .redirect(reqwest::redirect::Policy::none())
        .no_proxy();
    for c in reqwest::Certificate::from_pem_bundle(ca.as_bytes())? {
        b = b.add_root_certificate(c);
    }
    b.build()
}
