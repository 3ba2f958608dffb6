//! GCS source (`IMPORTER_SOURCE=gcs`): CDI's endpoint forms, a service-account key
//! (`GOOGLE_APPLICATION_CREDENTIALS`, CDI mounts it at `/google/credentials.json`)
//! turned into an OAuth access token by the JWT-bearer flow (RS256, signed with `ring`),
//! or anonymous for public objects; then the HTTP source's resumable ranged download.
//!
//! - `gs://bucket/object` -> `https://storage.googleapis.com/bucket/object` (XML API);
//! - `http(s)://host/bucket/object` (CDI's other form, any endpoint) and the JSON API's
//!   `.../storage/v1/b/BUCKET/o/OBJECT?alt=media` are fetched as given.

use super::http::Authorize;
use super::redact;
use base64::Engine;
use futures_util::future::BoxFuture;
use percent_encoding::{utf8_percent_encode, AsciiSet, NON_ALPHANUMERIC};
use reqwest::{Client, RequestBuilder, Url};
use std::path::Path;
use std::time::{Duration, Instant, SystemTime};

#[derive(Debug, thiserror::Error)]
pub enum GcsError {
    #[error(
        "invalid GCS endpoint {0:?}: expected gs://bucket/object or http(s)://host/bucket/object"
    )]
    Endpoint(String),
    #[error("GCS credentials {path}: {message}")]
    Key { path: String, message: String },
}

/// The default endpoint of `gs://` URLs.
pub const STORAGE_HOST: &str = "https://storage.googleapis.com";
/// Read-only access to objects is all an import needs.
pub const SCOPE: &str = "https://www.googleapis.com/auth/devstorage.read_only";

const OBJECT_NAME: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'_')
    .remove(b'.')
    .remove(b'~')
    .remove(b'/');

/// The URL to GET for `endpoint`.
pub fn object_url(endpoint: &str) -> Result<Url, GcsError> {
    let bad = || GcsError::Endpoint(redact::url(endpoint));
    let url = Url::parse(endpoint.trim()).map_err(|_| bad())?;
    match url.scheme() {
        "gs" => {
            let bucket = url.host_str().filter(|b| !b.is_empty()).ok_or_else(bad)?;
            let object = url.path().trim_start_matches('/');
            if object.is_empty() {
                return Err(bad());
            }
            let object = percent_encoding::percent_decode_str(object).decode_utf8_lossy();
            Url::parse(&format!(
                "{STORAGE_HOST}/{bucket}/{}",
                utf8_percent_encode(&object, OBJECT_NAME)
            ))
            .map_err(|_| bad())
        }
        "http" | "https" => {
            let path = url.path().trim_start_matches('/');
            if url.host_str().is_none() || !path.contains('/') {
                return Err(bad());
            }
            Ok(url)
        }
        _ => Err(bad()),
    }
}

/// The fields of a service-account key the token flow uses.
#[derive(serde::Deserialize)]
struct KeyFile {
    #[serde(rename = "type")]
    kind: String,
    client_email: String,
    private_key: String,
    #[serde(default)]
    private_key_id: Option<String>,
    #[serde(default = "default_token_uri")]
    token_uri: String,
}

fn default_token_uri() -> String {
    "https://oauth2.googleapis.com/token".into()
}

/// A service account's key and its current access token.
pub struct ServiceAccount {
    email: String,
    key_id: Option<String>,
    key: ring::signature::RsaKeyPair,
    token_uri: String,
    client: Client,
    /// The longest wait for the token endpoint's answer, and between its body's reads.
    idle: Duration,
    token: tokio::sync::Mutex<Option<(String, Instant)>>,
}

impl ServiceAccount {
    /// `client` follows no redirect (every source client is built so), so the signed
    /// assertion goes to `token_uri` and nowhere else.
    pub fn load(path: &Path, client: Client, idle: Duration) -> Result<Self, GcsError> {
        let err = |message: String| GcsError::Key {
            path: path.display().to_string(),
            message,
        };
        let text = std::fs::read(path).map_err(|e| err(e.to_string()))?;
        let key: KeyFile = serde_json::from_slice(&text)
            .map_err(|e| err(format!("not a service-account key: {e}")))?;
        if key.kind != "service_account" {
            return Err(err(format!(
                "key type {:?}: only service_account keys are supported",
                key.kind
            )));
        }
        let der = pem_body(&key.private_key, "PRIVATE KEY")
            .ok_or_else(|| err("private_key is not a PEM PKCS#8 key".into()))?;
        let pair = ring::signature::RsaKeyPair::from_pkcs8(&der)
            .map_err(|e| err(format!("private_key: {e}")))?;
        Url::parse(&key.token_uri).map_err(|_| err(format!("token_uri {:?}", key.token_uri)))?;
        Ok(ServiceAccount {
            email: key.client_email,
            key_id: key.private_key_id,
            key: pair,
            token_uri: key.token_uri,
            client,
            idle,
            token: tokio::sync::Mutex::new(None),
        })
    }

    pub fn email(&self) -> &str {
        &self.email
    }

    /// The signed JWT asking `token_uri` for a read-only storage token.
    fn assertion(&self, now: u64) -> Result<String, TokenError> {
        let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
        let mut header = serde_json::json!({"alg": "RS256", "typ": "JWT"});
        if let Some(kid) = &self.key_id {
            header["kid"] = kid.clone().into();
        }
        let claims = serde_json::json!({
            "iss": self.email,
            "scope": SCOPE,
            "aud": self.token_uri,
            "iat": now,
            "exp": now + 3600,
        });
        let signing_input = format!(
            "{}.{}",
            b64.encode(header.to_string()),
            b64.encode(claims.to_string())
        );
        let mut sig = vec![0u8; self.key.public().modulus_len()];
        self.key
            .sign(
                &ring::signature::RSA_PKCS1_SHA256,
                &ring::rand::SystemRandom::new(),
                signing_input.as_bytes(),
                &mut sig,
            )
            .map_err(|_| TokenError::Sign)?;
        Ok(format!("{signing_input}.{}", b64.encode(sig)))
    }

    /// The cached access token, fetched again a minute before it expires.
    async fn access_token(&self) -> Result<String, TokenError> {
        let mut cached = self.token.lock().await;
        if let Some((t, until)) = cached.as_ref() {
            if Instant::now() + Duration::from_secs(60) < *until {
                return Ok(t.clone());
            }
        }
        let now = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        let assertion = self.assertion(now)?;
        let shown = redact::url(&self.token_uri);
        let send = self
            .client
            .post(&self.token_uri)
            .form(&[
                ("grant_type", "urn:ietf:params:oauth:grant-type:jwt-bearer"),
                ("assertion", assertion.as_str()),
            ])
            .send();
        let resp = match tokio::time::timeout(self.idle, send).await {
            Ok(r) => r.map_err(|e| TokenError::Send {
                shown: shown.clone(),
                message: crate::net::describe(&e).1,
            })?,
            Err(_) => {
                return Err(TokenError::Idle {
                    shown,
                    secs: self.idle.as_secs(),
                })
            }
        };
        let status = resp.status();
        #[derive(serde::Deserialize)]
        struct Token {
            access_token: String,
            #[serde(default)]
            expires_in: Option<u64>,
        }
        if status.is_redirection() {
            return Err(TokenError::Redirected { shown, status });
        }
        if !status.is_success() {
            let text = crate::net::body::error_text(resp).await;
            return Err(TokenError::Refused {
                shown,
                email: self.email.clone(),
                status,
                text,
            });
        }
        let body = crate::net::body::read(
            resp,
            crate::net::body::Bound::AtMost(crate::net::body::TOKEN_MAX),
            self.idle,
            &format!("the token response from {shown}"),
        )
        .await?;
        let token: Token =
            serde_json::from_slice(&body).map_err(|e| TokenError::Parse { shown, source: e })?;
        let life = Duration::from_secs(token.expires_in.unwrap_or(3600).clamp(60, 86_400));
        tracing::info!(account = %self.email, expires_in_s = life.as_secs(), "got a GCS access token");
        *cached = Some((token.access_token.clone(), Instant::now() + life));
        Ok(token.access_token)
    }
}

/// Why no access token was had from the service account's token endpoint.
#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    #[error("signing the token request failed")]
    Sign,
    #[error("token request to {shown} failed: {message}")]
    Send { shown: String, message: String },
    #[error("token request to {shown}: no answer within {secs} s (idle timeout)")]
    Idle { shown: String, secs: u64 },
    #[error("token request to {shown} answered {status}: a token endpoint is not followed to another URL (the signed assertion goes only to token_uri)")]
    Redirected {
        shown: String,
        status: reqwest::StatusCode,
    },
    #[error("token request to {shown} for {email} answered {status}: {text}")]
    Refused {
        shown: String,
        email: String,
        status: reqwest::StatusCode,
        text: String,
    },
    #[error(transparent)]
    Body(#[from] crate::net::body::BodyError),
    #[error("token response from {shown}: {source}")]
    Parse {
        shown: String,
        source: serde_json::Error,
    },
}

impl Authorize for ServiceAccount {
    fn authorize<'a>(
        &'a self,
        req: RequestBuilder,
        _url: &'a Url,
    ) -> BoxFuture<'a, Result<RequestBuilder, crate::net::follow::AuthError>> {
        Box::pin(async move {
            let token = self
                .access_token()
                .await
                .map_err(|e| crate::net::follow::AuthError(Box::new(e)))?;
            Ok(req.bearer_auth(token))
        })
    }
}

/// The DER inside the first `-----BEGIN <label>-----` block.
fn pem_body(pem: &str, label: &str) -> Option<Vec<u8>> {
    let begin = format!("-----BEGIN {label}-----");
    let end = format!("-----END {label}-----");
    let start = pem.find(&begin)? + begin.len();
    let stop = start + pem[start..].find(&end)?;
    let b64: String = pem[start..stop]
        .chars()
        .filter(|c| !c.is_whitespace())
        .collect();
    base64::engine::general_purpose::STANDARD.decode(b64).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints() {
        assert_eq!(
            object_url("gs://disks/images/a b.qcow2")
                .expect("gs")
                .as_str(),
            "https://storage.googleapis.com/disks/images/a%20b.qcow2"
        );
        assert_eq!(
            object_url("http://127.0.0.1:4443/disks/x.raw")
                .expect("http")
                .as_str(),
            "http://127.0.0.1:4443/disks/x.raw"
        );
        assert!(object_url("gs://disks").is_err());
        assert!(object_url("http://h/only-bucket").is_err());
        assert!(object_url("s3://b/k").is_err());
    }

    #[test]
    fn pem_bodies() {
        let pem = "junk\n-----BEGIN PRIVATE KEY-----\nAAEC\nAw==\n-----END PRIVATE KEY-----\n";
        assert_eq!(pem_body(pem, "PRIVATE KEY"), Some(vec![0, 1, 2, 3]));
        assert_eq!(pem_body(pem, "RSA PRIVATE KEY"), None);
    }
}
