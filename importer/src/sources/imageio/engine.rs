//! The oVirt engine's REST API, as much of it as an import needs: the OAuth password
//! grant (`/ovirt-engine/sso/oauth/token`), a disk and its snapshots, and an image
//! transfer's life (create, wait for `transferring`, extend, finalize, cancel). JSON
//! throughout (`Accept: application/json`, numbers may come as strings, as the engine
//! renders them). The bearer token goes to the engine's own origin only; every request
//! has a timeout and every body a bound.

use crate::net::body::{self, Bound};
use ferrydisk_common::ErrorKind;
use reqwest::{Client, Method, StatusCode, Url};
use serde_json::Value;
use std::time::{Duration, Instant};

/// Why the engine did not give what the import needs. The password is never in it.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("invalid engine URL {0:?}: expected https://ENGINE/ovirt-engine/api")]
    Endpoint(String),
    #[error("logging in to {sso} as {user}: {detail}")]
    Login {
        sso: String,
        user: String,
        detail: String,
    },
    #[error("{what}: {detail}")]
    Request {
        what: String,
        kind: ErrorKind,
        detail: String,
    },
    #[error("{what}: the engine answered {status}: {detail}")]
    Status {
        what: String,
        status: StatusCode,
        detail: String,
    },
    #[error("disk {0} not found")]
    NoDisk(String),
    #[error("snapshot {snapshot} not found on disk {disk}")]
    NoSnapshot { disk: String, snapshot: String },
    #[error("image transfer {id} for disk {disk} is still initializing after {secs} s")]
    Stuck { id: String, disk: String, secs: u64 },
    #[error("image transfer {id} for disk {disk} ended in phase {phase}")]
    Phase {
        id: String,
        disk: String,
        phase: String,
    },
    #[error("image transfer {0} names neither a transfer_url nor a proxy_url")]
    NoUrl(String),
    #[error("{what}: {detail}")]
    Answer { what: String, detail: String },
}

impl EngineError {
    /// Terminal (a wrong password, a disk or snapshot that is not there, a failed
    /// transfer) or worth a retry (the network, a transfer that did not start).
    pub fn kind(&self) -> ErrorKind {
        match self {
            EngineError::Endpoint(_) => ErrorKind::Config,
            EngineError::Login { .. } | EngineError::NoDisk(_) | EngineError::NoSnapshot { .. } => {
                ErrorKind::SourceRefused
            }
            EngineError::Request { kind, .. } => *kind,
            EngineError::Status { status, .. } if status.is_server_error() => ErrorKind::Network,
            EngineError::Status { .. } => ErrorKind::SourceRefused,
            EngineError::Stuck { .. } => ErrorKind::Network,
            EngineError::Phase { .. } => ErrorKind::Network,
            EngineError::NoUrl(_) | EngineError::Answer { .. } => ErrorKind::SourceRefused,
        }
    }
}

/// A disk as the engine describes it.
#[derive(Debug, Clone)]
pub struct Disk {
    pub id: String,
    pub image_id: Option<String>,
    pub total_size: u64,
    pub storage_domains: Vec<String>,
}

/// A disk snapshot found in a storage domain.
#[derive(Debug, Clone)]
pub struct Snapshot {
    pub id: String,
    pub actual_size: Option<u64>,
}

/// What an image transfer reads: the disk's active image or one snapshot.
#[derive(Debug, Clone)]
pub enum Target {
    Disk(String),
    Snapshot(String),
}

/// An image transfer the engine created.
#[derive(Debug, Clone)]
pub struct Transfer {
    pub id: String,
    pub phase: String,
    /// The host's imageio (direct), else the engine's imageio proxy.
    pub url: Option<String>,
}

/// A logged-in engine session.
pub struct Engine {
    http: Client,
    api: Url,
    token: String,
    idle: Duration,
}

/// A number the engine may render as a string.
fn number(v: &Value) -> Option<u64> {
    v.as_u64().or_else(|| v.as_str()?.parse().ok())
}

fn text(v: &Value, key: &str) -> Option<String> {
    v.get(key)?.as_str().map(str::to_string)
}

impl Engine {
    /// The OAuth password grant against the engine's SSO, as the oVirt SDKs do it.
    pub async fn login(
        http: Client,
        endpoint: &str,
        user: &str,
        password: &str,
        idle: Duration,
    ) -> Result<Self, EngineError> {
        let api = Url::parse(endpoint.trim_end_matches('/'))
            .ok()
            .filter(|u| matches!(u.scheme(), "https" | "http") && u.path().ends_with("/api"))
            .ok_or_else(|| EngineError::Endpoint(crate::sources::redact::url(endpoint)))?;
        let mut sso = api.clone();
        let base = api.path().trim_end_matches("/api").to_string();
        sso.set_path(&format!("{base}/sso/oauth/token"));
        let fail = |detail: String| EngineError::Login {
            sso: sso.to_string(),
            user: user.to_string(),
            detail,
        };
        let send = http
            .post(sso.clone())
            .header("Accept", "application/json")
            .form(&[
                ("grant_type", "password"),
                ("scope", "ovirt-app-api"),
                ("username", user),
                ("password", password),
            ])
            .timeout(idle)
            .send();
        let resp = send.await.map_err(|e| fail(crate::net::describe(&e).1))?;
        let status = resp.status();
        let bytes = body::read(resp, Bound::AtMost(body::TOKEN_MAX), idle, "the SSO answer")
            .await
            .map_err(|e| fail(e.to_string()))?;
        let v: Value =
            serde_json::from_slice(&bytes).map_err(|e| fail(format!("{status}, not JSON: {e}")))?;
        match text(&v, "access_token") {
            Some(token) if status.is_success() => Ok(Engine {
                http,
                api,
                token,
                idle,
            }),
            _ => Err(fail(format!(
                "{status}: {}",
                text(&v, "error")
                    .or_else(|| text(&v, "error_description"))
                    .unwrap_or_else(|| "no access token".into())
            ))),
        }
    }

    /// One API call: `method` on `path` under the API, JSON both ways, bounded.
    async fn call(
        &self,
        method: Method,
        path: &str,
        body: Option<Value>,
        what: &str,
    ) -> Result<Value, EngineError> {
        let mut url = self.api.clone();
        url.set_path(&format!("{}/{path}", self.api.path()));
        let mut req = self
            .http
            .request(method, url)
            .bearer_auth(&self.token)
            .header("Accept", "application/json")
            .header("Version", "4")
            .timeout(self.idle);
        if let Some(b) = body {
            req = req.json(&b);
        }
        let resp = req.send().await.map_err(|e| {
            let (kind, detail) = crate::net::describe(&e);
            EngineError::Request {
                what: what.to_string(),
                kind,
                detail,
            }
        })?;
        let status = resp.status();
        if !status.is_success() {
            let detail = body::error_text(resp).await;
            return Err(EngineError::Status {
                what: what.to_string(),
                status,
                detail,
            });
        }
        let bytes = body::read(resp, Bound::AtMost(body::MANIFEST_MAX), self.idle, what)
            .await
            .map_err(|e| EngineError::Answer {
                what: what.to_string(),
                detail: e.to_string(),
            })?;
        if bytes.is_empty() {
            return Ok(Value::Null);
        }
        serde_json::from_slice(&bytes).map_err(|e| EngineError::Answer {
            what: what.to_string(),
            detail: format!("not JSON: {e}"),
        })
    }

    pub async fn disk(&self, id: &str) -> Result<Disk, EngineError> {
        let v = match self
            .call(
                Method::GET,
                &format!("disks/{id}"),
                None,
                &format!("reading disk {id}"),
            )
            .await
        {
            Err(EngineError::Status { status, .. }) if status == StatusCode::NOT_FOUND => {
                return Err(EngineError::NoDisk(id.to_string()))
            }
            other => other?,
        };
        let storage_domains = v
            .pointer("/storage_domains/storage_domain")
            .and_then(Value::as_array)
            .map(|a| a.iter().filter_map(|d| text(d, "id")).collect())
            .unwrap_or_default();
        Ok(Disk {
            id: text(&v, "id").unwrap_or_else(|| id.to_string()),
            image_id: text(&v, "image_id"),
            total_size: v
                .get("total_size")
                .and_then(number)
                .or_else(|| v.get("provisioned_size").and_then(number))
                .unwrap_or(0),
            storage_domains,
        })
    }

    /// The snapshot `id` of `disk`, looked for in the disk's storage domains.
    pub async fn snapshot(&self, disk: &Disk, id: &str) -> Result<Option<Snapshot>, EngineError> {
        for sd in &disk.storage_domains {
            let v = self
                .call(
                    Method::GET,
                    &format!("storagedomains/{sd}/disksnapshots"),
                    None,
                    &format!("listing the snapshots of storage domain {sd}"),
                )
                .await?;
            let found = v
                .get("disk_snapshot")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
                .find(|s| text(s, "id").as_deref() == Some(id));
            if let Some(s) = found {
                return Ok(Some(Snapshot {
                    id: id.to_string(),
                    actual_size: s.get("actual_size").and_then(number),
                }));
            }
        }
        Ok(None)
    }

    /// Creates a download transfer of `target` as `format` (`raw` or `cow`), trying
    /// again while the engine says the disk is locked (a snapshot being taken).
    pub async fn start_transfer(
        &self,
        target: &Target,
        format: &str,
        lock_wait: Duration,
    ) -> Result<Transfer, EngineError> {
        let what = match target {
            Target::Disk(id) => serde_json::json!({"image": {"id": id}}),
            Target::Snapshot(id) => serde_json::json!({"snapshot": {"id": id}}),
        };
        let mut body = what;
        body["direction"] = "download".into();
        body["format"] = format.into();
        body["inactivity_timeout"] = 60.into();
        let mut attempt = 0;
        loop {
            match self
                .call(
                    Method::POST,
                    "imagetransfers",
                    Some(body.clone()),
                    "creating the image transfer",
                )
                .await
            {
                Err(EngineError::Status { detail, .. })
                    if detail.to_ascii_lowercase().contains("locked") && attempt < 39 =>
                {
                    tracing::info!(
                        wait_s = lock_wait.as_secs(),
                        "the disk is locked; waiting to create the transfer"
                    );
                    tokio::time::sleep(lock_wait).await;
                    attempt += 1;
                }
                other => return transfer(&other?),
            }
        }
    }

    /// Polls the transfer until it is `transferring` (within `timeout`).
    pub async fn wait_transferring(
        &self,
        t: &Transfer,
        disk: &str,
        timeout: Duration,
    ) -> Result<Transfer, EngineError> {
        let started = Instant::now();
        let mut t = t.clone();
        loop {
            match t.phase.as_str() {
                "transferring" => return Ok(t),
                "initializing" | "resuming" | "unknown" | "" => {}
                phase => {
                    return Err(EngineError::Phase {
                        id: t.id.clone(),
                        disk: disk.to_string(),
                        phase: phase.to_string(),
                    })
                }
            }
            if started.elapsed() >= timeout {
                return Err(EngineError::Stuck {
                    id: t.id.clone(),
                    disk: disk.to_string(),
                    secs: timeout.as_secs(),
                });
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
            let v = self
                .call(
                    Method::GET,
                    &format!("imagetransfers/{}", t.id),
                    None,
                    "reading the image transfer",
                )
                .await?;
            t = transfer(&v)?;
        }
    }

    /// `finalize`, `cancel` or `extend` on a transfer.
    pub async fn act(&self, id: &str, action: &str) -> Result<(), EngineError> {
        self.call(
            Method::POST,
            &format!("imagetransfers/{id}/{action}"),
            Some(serde_json::json!({})),
            &format!("{action} of image transfer {id}"),
        )
        .await
        .map(|_| ())
    }
}

fn transfer(v: &Value) -> Result<Transfer, EngineError> {
    let id = text(v, "id").ok_or_else(|| EngineError::Answer {
        what: "creating the image transfer".into(),
        detail: "no transfer id in the answer".into(),
    })?;
    let url = text(v, "transfer_url")
        .filter(|u| !u.is_empty())
        .or_else(|| text(v, "proxy_url").filter(|u| !u.is_empty()));
    Ok(Transfer {
        phase: text(v, "phase").unwrap_or_default(),
        url,
        id,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transfers_fall_back_to_the_proxy_url_and_numbers_may_be_strings() {
        let t = transfer(&serde_json::json!({"id": "t", "phase": "transferring", "proxy_url": "https://p/images/x"}))
            .expect("transfer");
        assert_eq!(t.url.as_deref(), Some("https://p/images/x"));
        let t = transfer(&serde_json::json!({"id": "t", "transfer_url": "https://h/images/x", "proxy_url": "https://p/images/x"}))
            .expect("transfer");
        assert_eq!(t.url.as_deref(), Some("https://h/images/x"));
        assert_eq!(number(&serde_json::json!("1073741824")), Some(1 << 30));
        assert_eq!(number(&serde_json::json!(5)), Some(5));
    }
}
