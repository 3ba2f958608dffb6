//! The little of the Kubernetes API the proxy needs: read a PVC (and a ConfigMap) with
//! the pod's service account, through the `kube` client, typed with k8s-openapi.

use k8s_openapi::api::core::v1::{ConfigMap, PersistentVolumeClaim};

/// DER certificates of a PEM bundle (the service account's ca.crt).
fn rustls_pki_certs(pem: &[u8]) -> anyhow::Result<Vec<Vec<u8>>> {
    let mut out = Vec::new();
    for c in rustls_pemfile::certs(&mut &pem[..]) {
        out.push(c?.to_vec());
    }
    Ok(out)
}
use std::path::Path;

pub struct Kube {
    client: kube::Client,
    /// The projected service-account token: read for every call, so a token the kubelet
    /// rotated is used at once (kube's own token-file auth caches it for a minute).
    token_file: std::path::PathBuf,
}

#[derive(Debug, thiserror::Error)]
pub enum KubeError {
    #[error("not found")]
    NotFound,
    #[error("kubernetes API: {0}")]
    Api(String),
}

impl Kube {
    pub fn new(base: &str, token_file: &Path, ca_file: &Path) -> anyhow::Result<Self> {
        let mut config = kube::Config::new(base.trim_end_matches('/').parse()?);
        if let Ok(pem) = std::fs::read(ca_file) {
            let certs = rustls_pki_certs(&pem)?;
            config.root_cert = Some(certs);
        }
        config.connect_timeout = Some(std::time::Duration::from_secs(5));
        config.read_timeout = Some(std::time::Duration::from_secs(5));
        Ok(Kube {
            client: kube::Client::try_from(config)?,
            token_file: token_file.to_path_buf(),
        })
    }

    async fn get<T: serde::de::DeserializeOwned>(&self, path: &str) -> Result<T, KubeError> {
        let mut req = http::Request::get(path);
        let token = std::fs::read_to_string(&self.token_file)
            .ok()
            .map(|t| t.trim().to_string())
            .filter(|t| !t.is_empty());
        if let Some(t) = token {
            req = req.header(http::header::AUTHORIZATION, format!("Bearer {t}"));
        }
        let req = req
            .body(Vec::new())
            .map_err(|e| KubeError::Api(e.to_string()))?;
        match self.client.request::<T>(req).await {
            Ok(v) => Ok(v),
            Err(kube::Error::Api(s)) if s.code == 404 => Err(KubeError::NotFound),
            Err(e) => Err(KubeError::Api(format!("GET {path}: {e}"))),
        }
    }

    pub async fn pvc(
        &self,
        namespace: &str,
        name: &str,
    ) -> Result<PersistentVolumeClaim, KubeError> {
        self.get(&format!(
            "/api/v1/namespaces/{namespace}/persistentvolumeclaims/{name}"
        ))
        .await
    }

    pub async fn config_map(&self, namespace: &str, name: &str) -> Result<ConfigMap, KubeError> {
        self.get(&format!("/api/v1/namespaces/{namespace}/configmaps/{name}"))
            .await
    }
}

pub const ANN_UPLOAD_TARGET: &str = "cdi.kubevirt.io/storage.upload.target";
pub const ANN_POD_READY: &str = "cdi.kubevirt.io/storage.pod.ready";
pub const ANN_POD_PHASE: &str = "cdi.kubevirt.io/storage.pod.phase";
pub const ANN_CONTENT_TYPE: &str = "cdi.kubevirt.io/storage.contentType";
pub const ANN_PVC_PRIME: &str = "cdi.kubevirt.io/storage.populator.pvcPrime";

/// What one look at the PVC says (docs/cdi-contract.md section 5.4).
#[derive(Debug)]
pub enum Readiness {
    /// Upload to this PVC (the name may be the populator's PVC'), with this content type.
    Ready { pvc: String, content_type: String },
    /// Look again in a second.
    NotYet,
    /// Refuse now.
    Refused(Refusal),
}

/// Why the PVC takes no upload, in CDI's words.
#[derive(Debug, thiserror::Error)]
pub enum Refusal {
    #[error("rejecting Upload Request for PVC {0} that doesn't exist")]
    NoPvc(String),
    #[error("rejecting Upload Request for PVC {0}, PVC' wasn't created yet")]
    NoPrime(String),
    #[error("PVC {0} is not an upload target")]
    NotTarget(String),
    #[error("rejecting Upload Request for PVC {0} that already finished uploading")]
    Finished(String),
    #[error(transparent)]
    Api(KubeError),
}

fn annotation<'a>(pvc: &'a PersistentVolumeClaim, key: &str) -> Option<&'a str> {
    pvc.metadata
        .annotations
        .as_ref()?
        .get(key)
        .map(String::as_str)
}

pub async fn readiness(kube: &Kube, namespace: &str, name: &str) -> Readiness {
    let pvc = match kube.pvc(namespace, name).await {
        Ok(p) => p,
        Err(KubeError::NotFound) => return Readiness::Refused(Refusal::NoPvc(name.to_string())),
        Err(e) => return Readiness::Refused(Refusal::Api(e)),
    };
    let mut target = pvc;
    let mut target_name = name.to_string();
    let populated = target
        .spec
        .as_ref()
        .and_then(|s| s.data_source_ref.as_ref())
        .is_some_and(|r| r.kind == "VolumeUploadSource");
    if populated {
        let Some(prime) = annotation(&target, ANN_PVC_PRIME).map(str::to_string) else {
            return Readiness::NotYet;
        };
        target = match kube.pvc(namespace, &prime).await {
            Ok(p) => p,
            Err(KubeError::NotFound) => {
                return Readiness::Refused(Refusal::NoPrime(name.to_string()))
            }
            Err(e) => return Readiness::Refused(Refusal::Api(e)),
        };
        target_name = prime;
    }
    if annotation(&target, ANN_UPLOAD_TARGET).is_none() {
        return Readiness::Refused(Refusal::NotTarget(name.to_string()));
    }
    if annotation(&target, ANN_POD_PHASE) == Some("Succeeded") {
        return Readiness::Refused(Refusal::Finished(name.to_string()));
    }
    if annotation(&target, ANN_POD_READY)
        .is_some_and(|v| v.eq_ignore_ascii_case("true") || v == "1" || v == "t")
    {
        return Readiness::Ready {
            pvc: target_name,
            content_type: annotation(&target, ANN_CONTENT_TYPE)
                .unwrap_or("")
                .to_string(),
        };
    }
    Readiness::NotYet
}
