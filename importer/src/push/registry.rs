//! The registry side of a push (OCI distribution spec, "push"): a blob HEAD, an upload
//! session (POST, then one streamed PATCH or one PATCH per chunk with `Content-Range`,
//! then PUT with the digest), small blobs in one PUT, and the manifest. Authentication answers the registry's
//! `WWW-Authenticate` challenge: Basic, or a Bearer token from the realm it names.

use bytes::Bytes;
use reqwest::header::{HeaderValue, ACCEPT, AUTHORIZATION, CONTENT_LENGTH, CONTENT_TYPE, LOCATION};
use reqwest::{Method, StatusCode};
use std::sync::Mutex;

/// Logs each tenth of the layer crossed by `[before, after)`.
fn log_progress(before: u64, after: u64, total: u64) {
    if total == 0 {
        if before >> 30 != after >> 30 {
            tracing::info!(bytes = after, "uploaded {} GiB of the layer", after >> 30);
        }
        return;
    }
    if before == 0 || before * 10 / total != after * 10 / total {
        let pct = after.saturating_mul(100) / total;
        tracing::info!(bytes = after, total, "uploaded {pct}% of the layer");
    }
}

#[derive(Debug, thiserror::Error)]
pub enum PushError {
    #[error("{what}: {source}")]
    Http {
        what: String,
        #[source]
        source: reqwest::Error,
    },
    #[error("{what}: the registry answered {status}{}", body_text(.body))]
    Status {
        what: String,
        status: StatusCode,
        body: String,
    },
    #[error("{0}")]
    Auth(String),
    #[error("{0}")]
    Protocol(String),
}

fn body_text(body: &str) -> String {
    let t = body.trim();
    if t.is_empty() {
        String::new()
    } else {
        // The message is folded onto one line where it is reported (`chain_line`).
        format!(" ({})", t.chars().take(300).collect::<String>())
    }
}

/// One repository of one registry, with the credentials to push there.
pub struct Registry {
    http: reqwest::Client,
    /// `https://host[:port]` (or `http://` for an insecure registry without TLS).
    base: String,
    repo: String,
    creds: Option<(String, String)>,
    auth: Mutex<Option<HeaderValue>>,
}

impl Registry {
    /// Finds the scheme (HTTPS, or plain HTTP when `insecure` and HTTPS fails, as CDI's
    /// registry client does) and authenticates up front with `GET /v2/`.
    pub async fn connect(
        http: reqwest::Client,
        host: &str,
        repo: &str,
        creds: Option<(String, String)>,
        insecure: bool,
    ) -> Result<Self, PushError> {
        let mut r = Registry {
            http,
            base: format!("https://{host}"),
            repo: repo.to_string(),
            creds,
            auth: Mutex::new(None),
        };
        match r.ping().await {
            Ok(()) => Ok(r),
            Err(PushError::Http { source, .. }) if insecure && source.is_connect() => {
                tracing::info!(registry = host, error = %source, "HTTPS failed for an insecure registry; trying plain HTTP");
                r.base = format!("http://{host}");
                r.ping().await.map(|()| r)
            }
            Err(e) => Err(e),
        }
    }

    async fn ping(&self) -> Result<(), PushError> {
        let url = format!("{}/v2/", self.base);
        let resp = self
            .send("checking the registry", || self.http.get(&url))
            .await?;
        expect(resp, &[StatusCode::OK], "checking the registry")
            .await
            .map(drop)
    }

    /// The request with the Authorization header a challenge gave, if any.
    fn authed(&self, req: reqwest::RequestBuilder) -> reqwest::RequestBuilder {
        match self.auth.lock().expect("auth").clone() {
            Some(h) => req.header(AUTHORIZATION, h),
            None => req,
        }
    }

    /// Sends a request, answering one 401 challenge and sending it again.
    async fn send(
        &self,
        what: &str,
        make: impl Fn() -> reqwest::RequestBuilder,
    ) -> Result<reqwest::Response, PushError> {
        let mut answered = false;
        loop {
            let resp = self
                .authed(make())
                .send()
                .await
                .map_err(|source| PushError::Http {
                    what: what.to_string(),
                    source,
                })?;
            if resp.status() != StatusCode::UNAUTHORIZED || answered {
                return Ok(resp);
            }
            let challenge = resp
                .headers()
                .get(reqwest::header::WWW_AUTHENTICATE)
                .and_then(|v| v.to_str().ok())
                .unwrap_or("")
                .to_string();
            let header = self.answer(&challenge).await?;
            *self.auth.lock().expect("auth") = Some(header);
            answered = true;
        }
    }

    /// The Authorization header a challenge asks for.
    async fn answer(&self, challenge: &str) -> Result<HeaderValue, PushError> {
        use base64::Engine;
        let basic = self.creds.as_ref().map(|(u, p)| {
            format!(
                "Basic {}",
                base64::engine::general_purpose::STANDARD.encode(format!("{u}:{p}"))
            )
        });
        let (scheme, params) = challenge.split_once(' ').unwrap_or((challenge, ""));
        let value = if scheme.eq_ignore_ascii_case("basic") {
            basic.ok_or_else(|| {
                PushError::Auth(format!(
                    "{} wants credentials (IMPORTER_ACCESS_KEY_ID/IMPORTER_SECRET_KEY or an auth file)",
                    self.base
                ))
            })?
        } else if scheme.eq_ignore_ascii_case("bearer") {
            let p = challenge_params(params);
            let realm = p
                .iter()
                .find(|(k, _)| k == "realm")
                .map(|(_, v)| v.clone())
                .ok_or_else(|| {
                    PushError::Auth(format!("bearer challenge without a realm: {challenge}"))
                })?;
            // Our repository's scope, and whatever else the challenge names (a mount
            // also needs `repository:<from>:pull`), each as its own `scope`, as docker
            // asks for them.
            let mut scopes = vec![format!("repository:{}:pull,push", self.repo)];
            for (_, v) in p.iter().filter(|(k, _)| k == "scope") {
                for sc in v.split(' ').filter(|s| !s.is_empty()) {
                    if !scopes.iter().any(|x| x == sc) {
                        scopes.push(sc.to_string());
                    }
                }
            }
            let mut query: Vec<(String, String)> =
                p.into_iter().filter(|(k, _)| k == "service").collect();
            query.extend(scopes.into_iter().map(|sc| ("scope".to_string(), sc)));
            let mut req = self.http.get(&realm).query(&query);
            if let Some(b) = &basic {
                req = req.header(AUTHORIZATION, b);
            }
            let resp = req.send().await.map_err(|source| PushError::Http {
                what: "fetching a registry token".into(),
                source,
            })?;
            let resp = expect(resp, &[StatusCode::OK], "fetching a registry token").await?;
            let v: serde_json::Value = resp.json().await.map_err(|source| PushError::Http {
                what: "reading the registry token".into(),
                source,
            })?;
            let token = v["token"]
                .as_str()
                .or_else(|| v["access_token"].as_str())
                .ok_or_else(|| PushError::Auth("the token endpoint answered no token".into()))?;
            format!("Bearer {token}")
        } else {
            return Err(PushError::Auth(format!(
                "unsupported registry challenge {challenge:?}"
            )));
        };
        HeaderValue::from_str(&value)
            .map_err(|_| PushError::Auth("credentials are not a valid header".into()))
    }

    fn url(&self, tail: &str) -> String {
        format!("{}/v2/{}/{tail}", self.base, self.repo)
    }

    /// A `Location` header made absolute.
    fn location(&self, resp: &reqwest::Response) -> Result<String, PushError> {
        let loc = resp
            .headers()
            .get(LOCATION)
            .and_then(|v| v.to_str().ok())
            .ok_or_else(|| PushError::Protocol("the registry sent no upload Location".into()))?;
        let base =
            reqwest::Url::parse(&self.base).map_err(|e| PushError::Protocol(e.to_string()))?;
        base.join(loc)
            .map(String::from)
            .map_err(|e| PushError::Protocol(format!("bad upload Location {loc:?}: {e}")))
    }

    /// Whether `reference` (a tag) names a manifest in this repository.
    pub async fn manifest_exists(&self, reference: &str) -> Result<bool, PushError> {
        let url = self.url(&format!("manifests/{reference}"));
        let what = format!("checking tag {reference}");
        let accept = [
            super::OCI_MANIFEST,
            super::OCI_INDEX,
            "application/vnd.docker.distribution.manifest.v2+json",
            "application/vnd.docker.distribution.manifest.list.v2+json",
        ]
        .join(", ");
        let resp = self
            .send(&what, || {
                self.http.head(&url).header(ACCEPT, accept.as_str())
            })
            .await?;
        match resp.status() {
            StatusCode::OK => Ok(true),
            StatusCode::NOT_FOUND => Ok(false),
            _ => expect(resp, &[], &what).await.map(|_| false),
        }
    }

    pub async fn blob_exists(&self, digest: &str) -> Result<bool, PushError> {
        let url = self.url(&format!("blobs/{digest}"));
        let what = format!("checking blob {digest}");
        let resp = self.send(&what, || self.http.head(&url)).await?;
        match resp.status() {
            StatusCode::OK => Ok(true),
            StatusCode::NOT_FOUND => Ok(false),
            _ => expect(resp, &[], &what).await.map(|_| false),
        }
    }

    /// Cross-repository mount: asks the registry to link blob `digest` from repository
    /// `from` into this one. True when it did (201). A 202 means it started an upload
    /// instead (the blob is not there, or the credentials cannot read `from`): that
    /// session is cancelled and the caller uploads. A token registry that will not give
    /// us `from` answers 401 or 403: not mounted either.
    pub async fn mount(&self, digest: &str, from: &str) -> Result<bool, PushError> {
        let url = self.url(&format!("blobs/uploads/?mount={digest}&from={from}"));
        let what = format!("mounting blob {digest} from {from}");
        let resp = self
            .send(&what, || self.http.post(&url).header(CONTENT_LENGTH, 0))
            .await?;
        match resp.status() {
            StatusCode::CREATED => Ok(true),
            StatusCode::ACCEPTED => {
                if let Ok(location) = self.location(&resp) {
                    let _ = self
                        .send("cancelling an upload session", || {
                            self.http.delete(&location)
                        })
                        .await;
                }
                Ok(false)
            }
            StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN => {
                tracing::info!(
                    from,
                    status = resp.status().as_u16(),
                    "no access to the mount's source repository"
                );
                Ok(false)
            }
            _ => expect(resp, &[], &what).await.map(|_| false),
        }
    }

    async fn start_upload(&self) -> Result<String, PushError> {
        let url = self.url("blobs/uploads/");
        let resp = self
            .send("starting a blob upload", || {
                self.http.post(&url).header(CONTENT_LENGTH, 0)
            })
            .await?;
        let resp = expect(resp, &[StatusCode::ACCEPTED], "starting a blob upload").await?;
        self.location(&resp)
    }

    async fn finish_upload(
        &self,
        location: &str,
        digest: &str,
        body: Bytes,
    ) -> Result<(), PushError> {
        let mut url =
            reqwest::Url::parse(location).map_err(|e| PushError::Protocol(e.to_string()))?;
        url.query_pairs_mut().append_pair("digest", digest);
        let what = format!("committing blob {digest}");
        let resp = self
            .send(&what, || {
                self.http
                    .put(url.clone())
                    .header(CONTENT_TYPE, "application/octet-stream")
                    .header(CONTENT_LENGTH, body.len())
                    .body(body.clone())
            })
            .await?;
        expect(resp, &[StatusCode::CREATED], &what).await.map(drop)
    }

    /// A small blob (a config) in one request, unless the registry has it.
    pub async fn put_small_blob(&self, data: Bytes) -> Result<String, PushError> {
        let digest = ferrydisk_common::checksum::sha256_digest(&data);
        if self.blob_exists(&digest).await? {
            return Ok(digest);
        }
        let location = self.start_upload().await?;
        self.finish_upload(&location, &digest, data).await?;
        Ok(digest)
    }

    /// Uploads a blob of `total` bytes whose pieces arrive on `pieces`; `digest` is
    /// awaited once they end (the producer computes it as it goes) and the upload is
    /// committed with it.
    ///
    /// `chunked`: one PATCH per piece with its `Content-Range` (the spec's chunked
    /// upload; pieces are then the chunk size). Otherwise the pieces are the body of one
    /// PATCH of known length (the spec's streamed upload, as docker and containers/image
    /// push): distribution saves and restores its hash state for every PATCH, so one
    /// long PATCH is the faster of the two.
    pub async fn upload(
        &self,
        mut pieces: tokio::sync::mpsc::Receiver<Bytes>,
        digest: tokio::sync::oneshot::Receiver<Option<String>>,
        total: Option<u64>,
        chunked: bool,
    ) -> Result<(), PushError> {
        // (an unknown length: a streamed disk whose size shows at its end)
        let shown_total = total.unwrap_or(0);
        let mut location = self.start_upload().await?;
        if chunked {
            let mut offset = 0u64;
            while let Some(chunk) = pieces.recv().await {
                if chunk.is_empty() {
                    continue;
                }
                let end = offset + chunk.len() as u64 - 1;
                let what = format!("uploading bytes {offset}-{end}");
                let resp = self
                    .send(&what, || {
                        self.http
                            .request(Method::PATCH, &location)
                            .header(CONTENT_TYPE, "application/octet-stream")
                            .header("Content-Range", format!("{offset}-{end}"))
                            .header(CONTENT_LENGTH, chunk.len())
                            .body(chunk.clone())
                    })
                    .await?;
                let resp = expect(resp, &[StatusCode::ACCEPTED], &what).await?;
                location = self.location(&resp)?;
                log_progress(offset, end + 1, shown_total);
                offset = end + 1;
            }
        } else {
            let stream =
                futures_util::stream::unfold((pieces, 0u64), move |(mut rx, sent)| async move {
                    let piece = rx.recv().await?;
                    let after = sent + piece.len() as u64;
                    log_progress(sent, after, shown_total);
                    Some((Ok::<_, std::io::Error>(piece), (rx, after)))
                });
            // A streaming body cannot be sent twice, so no challenge is answered here:
            // `connect` authenticated, and a 401 now is an error. The first pass measured
            // the layer: a known length spares the registry chunked transfer decoding.
            let what = "uploading the layer";
            let mut req = self
                .http
                .request(Method::PATCH, &location)
                .header(CONTENT_TYPE, "application/octet-stream");
            if let Some(total) = total {
                req = req.header(CONTENT_LENGTH, total);
            }
            let req = req.body(reqwest::Body::wrap_stream(stream));
            let resp = self
                .authed(req)
                .send()
                .await
                .map_err(|source| PushError::Http {
                    what: what.into(),
                    source,
                })?;
            let resp = expect(resp, &[StatusCode::ACCEPTED, StatusCode::NO_CONTENT], what).await?;
            location = self.location(&resp)?;
        }
        // The producer drops its sender on failure too: only a digest means it finished.
        let digest =
            digest.await.ok().flatten().ok_or_else(|| {
                PushError::Protocol("the layer was not produced to the end".into())
            })?;
        self.finish_upload(&location, &digest, Bytes::new()).await
    }

    /// PUTs a manifest under `reference` (a tag); returns the digest the registry gives it.
    pub async fn put_manifest(
        &self,
        reference: &str,
        media_type: &str,
        body: Bytes,
    ) -> Result<String, PushError> {
        let url = self.url(&format!("manifests/{reference}"));
        let what = format!("pushing the manifest {reference}");
        let resp = self
            .send(&what, || {
                self.http
                    .put(&url)
                    .header(CONTENT_TYPE, media_type)
                    .body(body.clone())
            })
            .await?;
        let resp = expect(resp, &[StatusCode::CREATED], &what).await?;
        Ok(resp
            .headers()
            .get("Docker-Content-Digest")
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
            .unwrap_or_else(|| ferrydisk_common::checksum::sha256_digest(&body)))
    }
}

/// The response if its status is one of `ok` (any 2xx when `ok` is empty is an error too).
async fn expect(
    resp: reqwest::Response,
    ok: &[StatusCode],
    what: &str,
) -> Result<reqwest::Response, PushError> {
    if ok.contains(&resp.status()) {
        return Ok(resp);
    }
    let status = resp.status();
    let mut body = String::new();
    if let Ok(b) = resp.bytes().await {
        body = String::from_utf8_lossy(&b[..b.len().min(1024)]).into_owned();
    }
    Err(PushError::Status {
        what: what.to_string(),
        status,
        body,
    })
}

/// `realm="https://auth",service="registry",scope="..."` as pairs.
fn challenge_params(s: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut rest = s.trim();
    while !rest.is_empty() {
        let Some((k, v)) = rest.split_once('=') else {
            break;
        };
        let k = k.trim().trim_start_matches(',').trim().to_ascii_lowercase();
        let v = v.trim_start();
        let (value, tail) = if let Some(q) = v.strip_prefix('"') {
            match q.find('"') {
                Some(i) => (&q[..i], &q[i + 1..]),
                None => (q, ""),
            }
        } else {
            match v.find(',') {
                Some(i) => (&v[..i], &v[i..]),
                None => (v, ""),
            }
        };
        out.push((k, value.to_string()));
        rest = tail.trim_start().trim_start_matches(',').trim_start();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bearer_challenges_are_parsed() {
        let p = challenge_params(
            r#"realm="https://auth.example/token",service="registry.example",scope="repository:a/b:pull,push""#,
        );
        assert_eq!(
            p,
            [
                (
                    "realm".to_string(),
                    "https://auth.example/token".to_string()
                ),
                ("service".to_string(), "registry.example".to_string()),
                ("scope".to_string(), "repository:a/b:pull,push".to_string()),
            ]
        );
    }
}
