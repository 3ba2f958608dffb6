//! Whether a PVC's upload server takes the upload: the PVC's annotations through the
//! Kubernetes API (CDI's rules), or the server's `/healthz` without one.

use crate::app::App;
use crate::kube::{readiness, Readiness};
use crate::token::UploadTarget;
use crate::upstream;
use std::time::{Duration, Instant};

/// Why an upload waits no longer for its server.
#[derive(Debug, thiserror::Error)]
pub enum NotReady {
    #[error(transparent)]
    Refused(#[from] crate::kube::Refusal),
    #[error("upload server for PVC {namespace}/{pvc}: TLS: {cause}; check the proxy's upload-server CA bundle")]
    Tls {
        namespace: String,
        pvc: String,
        cause: String,
    },
    #[error(
        "upload server for PVC {namespace}/{pvc} is not ready: timed out waiting for the condition"
    )]
    Timeout { namespace: String, pvc: String },
}

/// Waits up to the configured time for the upload server (CDI polls the PVC every
/// second for 10 s). Returns the PVC to route to and, in Kubernetes mode, its content
/// type for the archive rewrite.
pub async fn wait_ready(app: &App, t: &UploadTarget) -> Result<(String, Option<String>), NotReady> {
    let deadline = Instant::now() + app.cfg.ready_timeout;
    loop {
        match &app.kube {
            Some(kube) => match readiness(kube, &t.namespace, &t.pvc).await {
                Readiness::Ready { pvc, content_type } => return Ok((pvc, Some(content_type))),
                Readiness::Refused(r) => return Err(r.into()),
                Readiness::NotYet => {}
            },
            None => {
                let url = format!(
                    "{}/healthz",
                    upstream::base_url(&app.cfg.upstream_template, &t.namespace, &t.pvc)
                );
                if let Ok(c) = app.client() {
                    match c.get(&url).timeout(Duration::from_secs(2)).send().await {
                        Ok(r) if r.status().is_success() => return Ok((t.pvc.clone(), None)),
                        Ok(_) => {}
                        // A certificate the proxy will never accept does not get better
                        // by waiting: say so at once.
                        Err(e) => {
                            if let Some(tls) = ferrydisk_common::tls_failure::diagnose(&e)
                                .filter(|f| f.kind == ferrydisk_common::ErrorKind::Config)
                            {
                                return Err(NotReady::Tls {
                                    namespace: t.namespace.clone(),
                                    pvc: t.pvc.clone(),
                                    cause: tls.cause,
                                });
                            }
                        }
                    }
                }
            }
        }
        if Instant::now() >= deadline {
            return Err(NotReady::Timeout {
                namespace: t.namespace.clone(),
                pvc: t.pvc.clone(),
            });
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}
