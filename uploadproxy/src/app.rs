//! The proxy's state: its settings, the mTLS client to upload servers (rebuilt when the
//! certificate, key or CA bundle changes) and the CA bundle's refresh.

use crate::kube::Kube;
use crate::token::Verifier;
use std::path::PathBuf;
use std::sync::Mutex;
use std::time::{Duration, SystemTime};

pub struct Config {
    pub upstream_template: String,
    pub ready_timeout: Duration,
    pub client_cert: PathBuf,
    pub client_key: PathBuf,
    /// Where the CA that signs upload server certificates comes from.
    pub upstream_ca: CaSource,
}

/// The upload-server CA bundle: a file (`--upload-server-ca`, re-read when it changes)
/// or CDI's ConfigMap, which `refresh_ca` re-reads periodically (CDI renews the signer
/// and republishes the bundle).
#[derive(Debug, Clone)]
pub enum CaSource {
    File(PathBuf),
    ConfigMap { namespace: String, name: String },
}

/// The mTLS client with what it was built from: the certificate and key files' mtimes
/// and the CA bundle.
type CachedClient = (Vec<SystemTime>, Vec<u8>, reqwest::Client);

pub struct App {
    pub cfg: Config,
    pub verifier: Verifier,
    pub kube: Option<Kube>,
    clients: Mutex<Option<CachedClient>>,
    /// The CA bundle last read.
    ca: Mutex<Vec<u8>>,
}

impl App {
    pub fn new(cfg: Config, verifier: Verifier, kube: Option<Kube>) -> Self {
        App {
            cfg,
            verifier,
            kube,
            clients: Mutex::new(None),
            ca: Mutex::new(Vec::new()),
        }
    }

    pub fn set_ca(&self, ca: Vec<u8>) {
        *self.ca.lock().unwrap_or_else(|e| e.into_inner()) = ca;
    }

    /// Reads the CA bundle from its source.
    pub async fn read_ca(&self) -> anyhow::Result<Vec<u8>> {
        use anyhow::Context;
        match &self.cfg.upstream_ca {
            CaSource::File(f) => {
                std::fs::read(f).with_context(|| format!("reading {}", f.display()))
            }
            CaSource::ConfigMap { namespace, name } => {
                let k = self.kube.as_ref().context("no Kubernetes API")?;
                let cm = k
                    .config_map(namespace, name)
                    .await
                    .with_context(|| format!("reading ConfigMap {namespace}/{name}"))?;
                Ok(cm
                    .data
                    .and_then(|d| d.get("ca-bundle.crt").cloned())
                    .context("the upload server CA ConfigMap has no ca-bundle.crt")?
                    .into_bytes())
            }
        }
    }

    /// Re-reads the CA bundle every `every`; a changed bundle is used by the next
    /// upstream connection (connections open keep theirs).
    pub async fn refresh_ca(self: std::sync::Arc<Self>, every: Duration) {
        loop {
            tokio::time::sleep(every).await;
            match self.read_ca().await {
                Ok(ca) => {
                    let changed = *self.ca.lock().unwrap_or_else(|e| e.into_inner()) != ca;
                    if changed {
                        tracing::info!(
                            "upload server CA bundle changed: new upstream connections use it"
                        );
                        self.set_ca(ca);
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %format!("{e:#}"), "could not re-read the upload server CA bundle; keeping the last one")
                }
            }
        }
    }

    /// The mTLS client; rebuilt when the client certificate or key file changes (CDI
    /// re-reads them on every request so rotated certificates take effect).
    pub fn client(&self) -> anyhow::Result<reqwest::Client> {
        let ca = self.ca.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let stamp: Vec<SystemTime> = [&self.cfg.client_cert, &self.cfg.client_key]
            .iter()
            .map(|p| {
                std::fs::metadata(p)
                    .and_then(|m| m.modified())
                    .unwrap_or(SystemTime::UNIX_EPOCH)
            })
            .collect();
        let mut cache = self.clients.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((s, a, c)) = cache.as_ref() {
            if *s == stamp && *a == ca {
                return Ok(c.clone());
            }
        }
        let mut pem = std::fs::read(&self.cfg.client_cert)?;
        pem.push(b'\n');
        pem.extend(std::fs::read(&self.cfg.client_key)?);
        let mut b = reqwest::Client::builder()
            .use_rustls_tls()
            .identity(reqwest::Identity::from_pem(&pem)?)
            .tls_built_in_root_certs(false)
            .min_tls_version(reqwest::tls::Version::TLS_1_2)
            .connect_timeout(Duration::from_secs(10))
            .redirect(reqwest::redirect::Policy::none())
            .no_proxy();
        for c in reqwest::Certificate::from_pem_bundle(&ca)? {
            b = b.add_root_certificate(c);
        }
        let c = b.build()?;
        *cache = Some((stamp, ca, c.clone()));
        Ok(c)
    }
}
