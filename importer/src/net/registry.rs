//! A client of one repository of an OCI distribution registry, for pulls (import,
//! inspect, the DataImportCron poller) and pushes. No push or import logic lives here:
//! requests, authentication, and the hostile-server rules every caller gets for free.
//!
//! - Authentication answers the registry's `WWW-Authenticate` challenge: Basic, or a
//!   Bearer token from the realm it names (token responses read bounded, 1 MiB).
//! - Credentials go only to the registry's own origin (scheme, host, port): an upload
//!   `Location` or a blob redirect elsewhere gets none, and an `http:` Location from an
//!   `https:` registry is refused ([`ferrydisk_common::origin`]).
//! - Every body is read bounded (`net::body`): manifests 4 MiB, a small blob at most its
//!   descriptor's size, error bodies 1 MiB; every request has the idle timeout on its
//!   response, and a streamed upload a watchdog that fails it when the registry stops
//!   reading for that long.
//! - What the registry says about itself is checked: a manifest fetched by digest must
//!   hash to it, a blob `HEAD` must report the descriptor's length, a pushed manifest's
//!   digest is ours (a registry answering another one is an error).

use super::body::{self, Bound};
use super::follow::{self, FollowError, SecretHeaders};
use bytes::Bytes;
use ferrydisk_common::origin::{self, Carry, Origin};
use ferrydisk_common::ErrorKind;
use reqwest::header::{
    HeaderMap, HeaderValue, ACCEPT, AUTHORIZATION, CONTENT_LENGTH, CONTENT_TYPE, LOCATION, RANGE,
    WWW_AUTHENTICATE,
};
use reqwest::{Method, StatusCode, Url};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
pub const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
pub const DOCKER_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";

/// Every manifest kind a pull understands, for `Accept`.
pub const MANIFEST_KINDS: &[&str] = &[OCI_INDEX, OCI_MANIFEST, DOCKER_LIST, DOCKER_MANIFEST];

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("{what}: {message}")]
    Http {
        what: String,
        message: String,
        kind: ErrorKind,
        /// Whether the connection itself failed (the insecure fallback to plain HTTP).
        connect: bool,
    },
    #[error("{what}: the registry answered {status}{}", detail(.body))]
    Status {
        what: String,
        status: StatusCode,
        body: String,
    },
    #[error("{what}: no answer within {secs} s (idle timeout)")]
    Timeout { what: String, secs: u64 },
    #[error("{0}")]
    Auth(String),
    #[error("{0}")]
    Protocol(String),
    #[error(transparent)]
    Body(#[from] body::BodyError),
}

impl ApiError {
    pub fn kind(&self) -> ErrorKind {
        match self {
            ApiError::Http { kind, .. } => *kind,
            ApiError::Status { status, .. }
                if status.is_server_error() || *status == StatusCode::TOO_MANY_REQUESTS =>
            {
                ErrorKind::Network
            }
            ApiError::Status { .. } | ApiError::Auth(_) | ApiError::Protocol(_) => {
                ErrorKind::SourceRefused
            }
            ApiError::Timeout { .. } => ErrorKind::Network,
            ApiError::Body(b) => b.kind(),
        }
    }

    fn http(what: &str, e: &reqwest::Error) -> ApiError {
        let (kind, message) = super::describe(e);
        ApiError::Http {
            what: what.to_string(),
            message,
            kind,
            connect: e.is_connect(),
        }
    }

    fn follow(what: &str, e: FollowError) -> ApiError {
        match e {
            FollowError::Http(e) => ApiError::http(what, &e),
            FollowError::Direct(e) => {
                let (kind, message) = super::direct::describe(&e);
                ApiError::Http {
                    what: what.to_string(),
                    message,
                    kind,
                    connect: e.connect,
                }
            }
            FollowError::Timeout(secs) => ApiError::Timeout {
                what: what.to_string(),
                secs,
            },
            FollowError::Redirect(m) => ApiError::Protocol(format!("{what}: {m}")),
            FollowError::Credentials(e) => ApiError::Protocol(format!("{what}: {e}")),
        }
    }
}

fn detail(body: &str) -> String {
    if body.is_empty() {
        String::new()
    } else {
        format!(" ({body})")
    }
}

/// What the credentials are asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    Pull,
    PullPush,
}

/// How to reach a registry.
#[derive(Clone)]
pub struct Connect {
    pub http: crate::sources::client::HttpClient,
    /// `host[:port]` as the reference names it (Docker Hub already resolved).
    pub host: String,
    pub repo: String,
    pub creds: Option<(String, String)>,
    /// Fall back to plain HTTP when HTTPS cannot connect, as CDI does for insecure
    /// registries.
    pub insecure: bool,
    pub access: Access,
    /// The longest wait for a response, or for the registry to take more of an upload.
    pub idle: Duration,
}

/// One repository of one registry, authenticated.
pub struct Registry {
    http: crate::sources::client::HttpClient,
    /// `https://host[:port]` (or `http://` for an insecure registry without TLS).
    base: Url,
    origin: Origin,
    repo: String,
    creds: Option<(String, String)>,
    access: Access,
    idle: Duration,
    auth: Mutex<Option<HeaderValue>>,
}

impl Registry {
    /// Finds the scheme (HTTPS, or plain HTTP when `insecure` and HTTPS cannot connect)
    /// and authenticates up front with `GET /v2/`.
    pub async fn connect(c: Connect) -> Result<Self, ApiError> {
        let mut r = Registry::at("https", &c)?;
        match r.ping().await {
            Ok(()) => Ok(r),
            Err(e @ ApiError::Http { connect: true, .. }) if c.insecure => {
                tracing::info!(registry = %c.host, error = %e, "HTTPS failed for an insecure registry; trying plain HTTP");
                r = Registry::at("http", &c)?;
                r.ping().await.map(|()| r)
            }
            Err(e) => Err(e),
        }
    }

    fn at(scheme: &str, c: &Connect) -> Result<Self, ApiError> {
        let base = Url::parse(&format!("{scheme}://{}/", c.host))
            .map_err(|_| ApiError::Protocol(format!("invalid registry host {:?}", c.host)))?;
        let origin = Origin::of(&base)
            .ok_or_else(|| ApiError::Protocol(format!("invalid registry host {:?}", c.host)))?;
        Ok(Registry {
            http: c.http.clone(),
            base,
            origin,
            repo: c.repo.clone(),
            creds: c.creds.clone(),
            access: c.access,
            idle: c.idle,
            auth: Mutex::new(None),
        })
    }

    async fn ping(&self) -> Result<(), ApiError> {
        let url = self.join("/v2/")?;
        let what = "checking the registry";
        let resp = self.get(what, Method::GET, &url, HeaderMap::new()).await?;
        expect(resp, &[StatusCode::OK], what).await.map(drop)
    }

    fn join(&self, path: &str) -> Result<Url, ApiError> {
        self.base
            .join(path)
            .map_err(|e| ApiError::Protocol(format!("registry URL {path:?}: {e}")))
    }

    fn url(&self, tail: &str) -> Result<Url, ApiError> {
        self.join(&format!("/v2/{}/{tail}", self.repo))
    }

    fn auth_header(&self) -> Option<HeaderValue> {
        self.auth.lock().ok().and_then(|a| a.clone())
    }

    /// A GET or HEAD that may be redirected (a blob to its storage): credentials only on
    /// hops to the registry's origin; one 401 challenge answered.
    async fn get(
        &self,
        what: &str,
        method: Method,
        url: &Url,
        public: HeaderMap,
    ) -> Result<reqwest::Response, ApiError> {
        let policy = follow::Policy {
            refuse_internal: false,
            idle: self.idle,
        };
        let mut answered = false;
        loop {
            let mut secret = HeaderMap::new();
            if let Some(h) = self.auth_header() {
                secret.insert(AUTHORIZATION, h);
            }
            let resp = follow::send(
                &self.http,
                method.clone(),
                url,
                &public,
                &SecretHeaders(secret),
                policy,
            )
            .await
            .map_err(|e| ApiError::follow(what, e))?;
            if resp.status() != StatusCode::UNAUTHORIZED || answered {
                return Ok(resp);
            }
            self.challenged(&resp).await?;
            answered = true;
        }
    }

    /// A request whose body can be sent again (empty or in memory), to a URL on the
    /// registry's origin or to an upload `Location`: the Authorization header goes only
    /// to the registry's own origin; one 401 challenge answered.
    async fn send(
        &self,
        what: &str,
        method: Method,
        url: &Url,
        make: impl Fn(reqwest::RequestBuilder) -> reqwest::RequestBuilder,
    ) -> Result<reqwest::Response, ApiError> {
        let carry = self.carry(url)?;
        let mut answered = false;
        loop {
            let mut req = make(self.http.request(method.clone(), url.clone()));
            if carry {
                if let Some(h) = self.auth_header() {
                    req = req.header(AUTHORIZATION, h);
                }
            }
            let resp = self.timed(what, req).await?;
            if resp.status() != StatusCode::UNAUTHORIZED || answered || !carry {
                return Ok(resp);
            }
            self.challenged(&resp).await?;
            answered = true;
        }
    }

    /// Sends `req`, failing when no response comes within the idle timeout.
    async fn timed(
        &self,
        what: &str,
        req: reqwest::RequestBuilder,
    ) -> Result<reqwest::Response, ApiError> {
        match tokio::time::timeout(self.idle, req.send()).await {
            Ok(r) => r.map_err(|e| ApiError::http(what, &e)),
            Err(_) => Err(ApiError::Timeout {
                what: what.to_string(),
                secs: self.idle.as_secs(),
            }),
        }
    }

    /// Whether a request to `url` carries our credentials; an `http:` URL named by an
    /// `https:` registry is refused.
    fn carry(&self, url: &Url) -> Result<bool, ApiError> {
        match origin::carry(&self.origin, url) {
            Carry::Credentials => Ok(true),
            Carry::Nothing => {
                tracing::info!(registry = %self.origin, location = %crate::sources::redact::url(url.as_str()), "the registry named another origin: sending no credentials there");
                Ok(false)
            }
            Carry::Downgrade => Err(ApiError::Protocol(format!(
                "the registry {} named a plain-http URL ({}): refused",
                self.origin,
                crate::sources::redact::url(url.as_str())
            ))),
        }
    }

    /// Answers a 401's challenge, keeping the header for later requests.
    async fn challenged(&self, resp: &reqwest::Response) -> Result<(), ApiError> {
        let challenge = resp
            .headers()
            .get(WWW_AUTHENTICATE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_string();
        let header = self.answer(&challenge).await?;
        if let Ok(mut a) = self.auth.lock() {
            *a = Some(header);
        }
        Ok(())
    }

    fn basic(&self) -> Option<String> {
        use base64::Engine;
        self.creds.as_ref().map(|(u, p)| {
            format!(
                "Basic {}",
                base64::engine::general_purpose::STANDARD.encode(format!("{u}:{p}"))
            )
        })
    }

    /// The Authorization header a challenge asks for.
    async fn answer(&self, challenge: &str) -> Result<HeaderValue, ApiError> {
        let (scheme, params) = challenge.split_once(' ').unwrap_or((challenge, ""));
        let value = if scheme.eq_ignore_ascii_case("basic") {
            self.basic().ok_or_else(|| {
                ApiError::Auth(format!(
                    "{} wants credentials (IMPORTER_ACCESS_KEY_ID/IMPORTER_SECRET_KEY or an auth file)",
                    self.origin
                ))
            })?
        } else if scheme.eq_ignore_ascii_case("bearer") {
            format!("Bearer {}", self.token(params).await?)
        } else {
            return Err(ApiError::Auth(format!(
                "unsupported registry challenge {:?}",
                body::shown(challenge)
            )));
        };
        HeaderValue::from_str(&value)
            .map_err(|_| ApiError::Auth("the credentials are not a valid header".into()))
    }

    /// A bearer token from the realm the challenge names, for our repository's scope and
    /// whatever else the challenge names (a mount also needs `repository:<from>:pull`).
    /// The user's credentials go to the realm (the registry named it as its token
    /// service; a plain-http realm of an https registry is logged). The response is
    /// read bounded (1 MiB) and no redirect is followed.
    async fn token(&self, params: &str) -> Result<String, ApiError> {
        let what = "fetching a registry token";
        let p = origin::challenge_params(params);
        let realm = p
            .iter()
            .find(|(k, _)| k == "realm")
            .map(|(_, v)| v.clone())
            .ok_or_else(|| ApiError::Auth("a bearer challenge without a realm".into()))?;
        let realm = origin::resolve_location(&self.base, &realm)
            .map_err(|e| ApiError::Auth(format!("bearer realm: {e}")))?;
        let actions = match self.access {
            Access::Pull => "pull",
            Access::PullPush => "pull,push",
        };
        let mut scopes = vec![format!("repository:{}:{actions}", self.repo)];
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
        let mut req = self.http.get(realm.clone()).query(&query);
        if let Some(b) = &self.basic() {
            // As docker and containers/image do: the realm is the token service the
            // registry (authenticated by its certificate) named for these credentials.
            if origin::carry(&self.origin, &realm) == Carry::Downgrade {
                tracing::warn!(realm = %crate::sources::redact::url(realm.as_str()), "the registry's token realm is plain http: the credentials cross the network unencrypted");
            }
            req = req.header(AUTHORIZATION, b);
        }
        let resp = self.timed(what, req).await?;
        let resp = expect(resp, &[StatusCode::OK], what).await?;
        let text = body::read(
            resp,
            Bound::AtMost(body::TOKEN_MAX),
            self.idle,
            "the registry token response",
        )
        .await?;
        #[derive(serde::Deserialize)]
        struct Token {
            token: Option<String>,
            access_token: Option<String>,
        }
        let t: Token = serde_json::from_slice(&text)
            .map_err(|e| ApiError::Auth(format!("the token response is not JSON: {e}")))?;
        t.token
            .or(t.access_token)
            .filter(|t| !t.is_empty())
            .ok_or_else(|| ApiError::Auth("the token endpoint answered no token".into()))
    }

    /// A manifest or index by tag or digest, read bounded (4 MiB). Returns its bytes and
    /// their digest; one fetched by digest must hash to it.
    pub async fn manifest(&self, reference: &str, accept: &[&str]) -> Result<Bytes, ApiError> {
        let url = self.url(&format!("manifests/{reference}"))?;
        let what = format!("fetching manifest {reference}");
        let mut h = HeaderMap::new();
        h.insert(
            ACCEPT,
            HeaderValue::from_str(&accept.join(", "))
                .map_err(|_| ApiError::Protocol("bad Accept".into()))?,
        );
        let resp = self.get(&what, Method::GET, &url, h).await?;
        let resp = expect(resp, &[StatusCode::OK], &what).await?;
        let bytes = body::read(
            resp,
            Bound::AtMost(body::MANIFEST_MAX),
            self.idle,
            &format!("the manifest {reference:?}"),
        )
        .await?;
        if reference.contains(':') {
            let got = ferrydisk_common::checksum::digest_of(reference, &bytes);
            if got.as_deref() != Some(reference) {
                return Err(ApiError::Protocol(format!(
                    "the registry served a manifest for {reference} whose digest is {}",
                    got.unwrap_or_else(|| "of an unknown algorithm".into())
                )));
            }
        }
        Ok(bytes)
    }

    /// A small blob (a config), exactly its descriptor's size and digest.
    pub async fn small_blob(&self, digest: &str, size: u64) -> Result<Bytes, ApiError> {
        let url = self.url(&format!("blobs/{digest}"))?;
        let what = format!("fetching blob {digest}");
        let resp = self.get(&what, Method::GET, &url, HeaderMap::new()).await?;
        let resp = expect(resp, &[StatusCode::OK], &what).await?;
        let bytes = body::read(
            resp,
            Bound::Exactly(size),
            self.idle,
            &format!("blob {digest}"),
        )
        .await?;
        if ferrydisk_common::checksum::digest_of(digest, &bytes).as_deref() != Some(digest) {
            return Err(ApiError::Protocol(format!(
                "blob {digest}: the registry served bytes of another digest"
            )));
        }
        Ok(bytes)
    }

    /// A blob's body from `offset` (a Range request past 0): the response, 200 or 206.
    pub async fn blob_from(
        &self,
        digest: &str,
        offset: u64,
    ) -> Result<reqwest::Response, ApiError> {
        let url = self.url(&format!("blobs/{digest}"))?;
        let what = format!("fetching blob {digest}");
        let mut h = HeaderMap::new();
        if offset > 0 {
            h.insert(
                RANGE,
                HeaderValue::from_str(&format!("bytes={offset}-"))
                    .map_err(|_| ApiError::Protocol("bad range".into()))?,
            );
        }
        let resp = self.get(&what, Method::GET, &url, h).await?;
        expect(resp, &[StatusCode::OK, StatusCode::PARTIAL_CONTENT], &what).await
    }

    /// Whether `reference` (a tag) names a manifest in this repository.
    pub async fn manifest_exists(&self, reference: &str) -> Result<bool, ApiError> {
        let url = self.url(&format!("manifests/{reference}"))?;
        let what = format!("checking tag {reference}");
        let mut h = HeaderMap::new();
        h.insert(
            ACCEPT,
            HeaderValue::from_str(&MANIFEST_KINDS.join(", "))
                .map_err(|_| ApiError::Protocol("bad Accept".into()))?,
        );
        let resp = self.get(&what, Method::HEAD, &url, h).await?;
        match resp.status() {
            StatusCode::OK => Ok(true),
            StatusCode::NOT_FOUND => Ok(false),
            _ => expect(resp, &[], &what).await.map(|_| false),
        }
    }

    /// Whether this repository holds any tag (`GET /v2/<repo>/tags/list?n=1`, read
    /// bounded): a push into it may find its layer there already.
    pub async fn has_tags(&self) -> Result<bool, ApiError> {
        let mut url = self.url("tags/list")?;
        url.query_pairs_mut().append_pair("n", "1");
        let what = "listing the repository's tags";
        let resp = self.get(what, Method::GET, &url, HeaderMap::new()).await?;
        match resp.status() {
            StatusCode::OK => {
                let body = body::read(
                    resp,
                    Bound::AtMost(body::TOKEN_MAX),
                    self.idle,
                    "the tag list",
                )
                .await?;
                let v: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
                Ok(v["tags"].as_array().is_some_and(|t| !t.is_empty()))
            }
            StatusCode::NOT_FOUND => Ok(false),
            _ => expect(resp, &[], what).await.map(|_| false),
        }
    }

    /// Whether the registry holds blob `digest` of `size` bytes. A `200` whose
    /// `Content-Length` is another length is taken as missing (a registry that lies
    /// about a blob is not trusted to have it), logged.
    pub async fn blob_exists(&self, digest: &str, size: u64) -> Result<bool, ApiError> {
        let url = self.url(&format!("blobs/{digest}"))?;
        let what = format!("checking blob {digest}");
        let resp = self
            .get(&what, Method::HEAD, &url, HeaderMap::new())
            .await?;
        match resp.status() {
            StatusCode::OK => {
                let len = resp
                    .headers()
                    .get(CONTENT_LENGTH)
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.parse::<u64>().ok());
                if len == Some(size) {
                    Ok(true)
                } else {
                    tracing::warn!(digest, size, registry_length = ?len, "the registry answered HEAD with another length: uploading the blob");
                    Ok(false)
                }
            }
            StatusCode::NOT_FOUND => Ok(false),
            _ => expect(resp, &[], &what).await.map(|_| false),
        }
    }

    /// Cross-repository mount: asks the registry to link blob `digest` from repository
    /// `from` into this one. True when it did (201). A 202 means it started an upload
    /// instead (the blob is not there, or the credentials cannot read `from`): that
    /// session is cancelled and the caller uploads. A token registry that will not give
    /// us `from` answers 401 or 403: not mounted either.
    pub async fn mount(&self, digest: &str, from: &str) -> Result<bool, ApiError> {
        let mut url = self.url("blobs/uploads/")?;
        url.query_pairs_mut()
            .append_pair("mount", digest)
            .append_pair("from", from);
        let what = format!("mounting blob {digest} from {from}");
        let resp = self
            .send(&what, Method::POST, &url, |r| r.header(CONTENT_LENGTH, 0))
            .await?;
        match resp.status() {
            StatusCode::CREATED => Ok(true),
            StatusCode::ACCEPTED => {
                if let Ok(location) = self.location(&resp, &url) {
                    let _ = self
                        .send(
                            "cancelling an upload session",
                            Method::DELETE,
                            &location,
                            |r| r,
                        )
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

    /// A `Location` header resolved against the URL that answered it.
    fn location(&self, resp: &reqwest::Response, answered: &Url) -> Result<Url, ApiError> {
        let loc = resp
            .headers()
            .get(LOCATION)
            .and_then(|v| v.to_str().ok())
            .ok_or_else(|| ApiError::Protocol("the registry sent no upload Location".into()))?;
        origin::resolve_location(answered, loc)
            .map_err(|e| ApiError::Protocol(format!("upload Location: {e}")))
    }

    async fn start_upload(&self) -> Result<Url, ApiError> {
        let url = self.url("blobs/uploads/")?;
        let what = "starting a blob upload";
        let resp = self
            .send(what, Method::POST, &url, |r| r.header(CONTENT_LENGTH, 0))
            .await?;
        let resp = expect(resp, &[StatusCode::ACCEPTED], what).await?;
        // (every request to it goes through `carry`, which refuses a downgrade before
        // any byte is sent)
        self.location(&resp, &url)
    }

    async fn finish_upload(
        &self,
        location: &Url,
        digest: &str,
        body: Bytes,
    ) -> Result<(), ApiError> {
        let mut url = location.clone();
        url.query_pairs_mut().append_pair("digest", digest);
        let what = format!("committing blob {digest}");
        let resp = self
            .send(&what, Method::PUT, &url, |r| {
                r.header(CONTENT_TYPE, "application/octet-stream")
                    .header(CONTENT_LENGTH, body.len())
                    .body(body.clone())
            })
            .await?;
        expect(resp, &[StatusCode::CREATED], &what).await.map(drop)
    }

    /// A small blob (a config) in one request, unless the registry has it.
    pub async fn put_small_blob(&self, data: Bytes) -> Result<String, ApiError> {
        let digest = ferrydisk_common::checksum::sha256_digest(&data);
        if self.blob_exists(&digest, data.len() as u64).await? {
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
        pieces: tokio::sync::mpsc::Receiver<Bytes>,
        digest: tokio::sync::oneshot::Receiver<Option<String>>,
        total: Option<u64>,
        chunked: bool,
    ) -> Result<(), ApiError> {
        // (an unknown length: a streamed disk whose size shows at its end)
        let shown_total = total.unwrap_or(0);
        let mut location = self.start_upload().await?;
        if chunked {
            let mut offset = 0u64;
            self.patch_chunks(pieces, &mut location, &mut offset, shown_total)
                .await?;
        } else {
            location = self.stream_patch(pieces, &location, 0, total).await?;
        }
        // The producer drops its sender on failure too: only a digest means it finished.
        let digest =
            digest.await.ok().flatten().ok_or_else(|| {
                ApiError::Protocol("the layer was not produced to the end".into())
            })?;
        self.finish_upload(&location, &digest, Bytes::new()).await
    }

    /// [`Registry::upload`] of a blob of known length that the caller can produce again
    /// from any offset (`produce(skip)`: the pieces from byte `skip` on, and the digest
    /// of the whole blob at its end). When the connection is cut mid-blob, the registry
    /// is asked where the session stands (`GET` on the upload URL, its `Range`, as the
    /// distribution spec defines) and the upload continues from there, with a PATCH
    /// whose `Content-Range` starts at that offset; a registry that dropped the session
    /// (docker-registry 2.8 answers 404 after a cut) gets a new one from byte 0, logged.
    /// At most `retries` resumptions in a row without progress.
    pub async fn upload_resumable(
        &self,
        mut produce: impl FnMut(
            u64,
        ) -> (
            tokio::sync::mpsc::Receiver<Bytes>,
            tokio::sync::oneshot::Receiver<Option<String>>,
        ),
        total: u64,
        chunked: bool,
        retries: u32,
    ) -> Result<(), ApiError> {
        let mut location = self.start_upload().await?;
        let mut offset = 0u64;
        let mut failures = 0u32;
        loop {
            let (pieces, digest) = produce(offset);
            let sent = if chunked {
                self.patch_chunks(pieces, &mut location, &mut offset, total)
                    .await
                    .map(|()| location.clone())
            } else {
                self.stream_patch(pieces, &location, offset, Some(total))
                    .await
            };
            let e = match sent {
                Ok(next) => {
                    let digest = digest.await.ok().flatten().ok_or_else(|| {
                        ApiError::Protocol("the layer was not produced to the end".into())
                    })?;
                    return self.finish_upload(&next, &digest, Bytes::new()).await;
                }
                Err(e) if cut(&e) && failures < retries => e,
                Err(e) => return Err(e),
            };
            failures += 1;
            tokio::time::sleep(Duration::from_millis(250 << failures.min(5))).await;
            let before = offset;
            match self.upload_status(&location).await {
                Ok((next, at)) => {
                    tracing::warn!(error = %e, offset = at, "the upload was cut; resuming at the offset the registry reports");
                    location = next;
                    offset = at;
                }
                Err(status) => {
                    tracing::warn!(error = %e, status = %status, "the upload was cut and the registry dropped the session; starting a new upload session");
                    location = self.start_upload().await?;
                    offset = 0;
                }
            }
            if offset > before {
                failures = 0;
            }
        }
    }

    /// Where an upload session stands: `GET` on its URL answers 204 with `Range:
    /// 0-<last byte>` and the URL to continue at. Returns that URL and the next offset.
    async fn upload_status(&self, location: &Url) -> Result<(Url, u64), ApiError> {
        let what = "asking where the upload stands";
        let resp = self.send(what, Method::GET, location, |r| r).await?;
        let resp = expect(resp, &[StatusCode::NO_CONTENT, StatusCode::OK], what).await?;
        let next = resp
            .headers()
            .get("Range")
            .and_then(|v| v.to_str().ok())
            .map(|v| v.trim().trim_start_matches("bytes="))
            .and_then(|v| v.split_once('-'))
            .and_then(|(a, b)| Some((a.parse::<u64>().ok()?, b.parse::<u64>().ok()?)))
            .map(|(a, b)| if a == 0 && b == 0 { 0 } else { b + 1 })
            .unwrap_or(0);
        let url = match resp.headers().get(LOCATION) {
            Some(_) => self.location(&resp, location)?,
            None => location.clone(),
        };
        Ok((url, next))
    }

    /// One PATCH per piece from `offset`, each with its `Content-Range`; `location` and
    /// `offset` follow what the registry acknowledged.
    async fn patch_chunks(
        &self,
        mut pieces: tokio::sync::mpsc::Receiver<Bytes>,
        location: &mut Url,
        offset: &mut u64,
        total: u64,
    ) -> Result<(), ApiError> {
        while let Some(chunk) = pieces.recv().await {
            if chunk.is_empty() {
                continue;
            }
            let at = *offset;
            let end = at + chunk.len() as u64 - 1;
            let what = format!("uploading bytes {at}-{end}");
            let resp = self
                .send(&what, Method::PATCH, location, |r| {
                    r.header(CONTENT_TYPE, "application/octet-stream")
                        .header("Content-Range", format!("{at}-{end}"))
                        .header(CONTENT_LENGTH, chunk.len())
                        .body(chunk.clone())
                })
                .await?;
            let resp = expect(resp, &[StatusCode::ACCEPTED], &what).await?;
            let answered = location.clone();
            *location = self.location(&resp, &answered)?;
            log_progress(at, end + 1, total);
            *offset = end + 1;
        }
        Ok(())
    }

    /// One PATCH whose body is the pieces, watched: when the registry takes nothing for
    /// the idle timeout while a piece waits (or answers nothing once the body is sent),
    /// the upload fails instead of hanging. Time the producer takes is not counted.
    async fn stream_patch(
        &self,
        pieces: tokio::sync::mpsc::Receiver<Bytes>,
        location: &Url,
        offset: u64,
        total: Option<u64>,
    ) -> Result<Url, ApiError> {
        let shown_total = total.unwrap_or(0);
        let start = Instant::now();
        let watch = Arc::new(Watch {
            start,
            last_ms: AtomicU64::new(0),
            producing: AtomicBool::new(false),
        });
        let w = watch.clone();
        let stream = futures_util::stream::unfold(
            (pieces, offset, w),
            move |(mut rx, sent, w)| async move {
                w.producing.store(true, Ordering::Relaxed);
                let piece = rx.recv().await;
                w.producing.store(false, Ordering::Relaxed);
                w.touch();
                let piece = piece?;
                let after = sent + piece.len() as u64;
                log_progress(sent, after, shown_total);
                Some((Ok::<_, std::io::Error>(piece), (rx, after, w)))
            },
        );
        // A streaming body cannot be sent twice, so no challenge is answered here:
        // `connect` authenticated, and a 401 now is an error. The first pass measured
        // the layer: a known length spares the registry chunked transfer decoding.
        let what = "uploading the layer";
        let mut req = self
            .http
            .request(Method::PATCH, location.clone())
            .header(CONTENT_TYPE, "application/octet-stream");
        if self.carry(location)? {
            if let Some(h) = self.auth_header() {
                req = req.header(AUTHORIZATION, h);
            }
        }
        if let Some(total) = total {
            req = req.header(CONTENT_LENGTH, total - offset);
            if offset > 0 {
                req = req.header("Content-Range", format!("{offset}-{}", total - 1));
            }
        }
        let req = req.body(reqwest::Body::wrap_stream(stream));
        let idle = self.idle;
        let resp = tokio::select! {
            r = req.send() => r.map_err(|e| ApiError::http(what, &e))?,
            () = watch.stalled(idle) => return Err(ApiError::Timeout { what: what.into(), secs: idle.as_secs() }),
        };
        let resp = expect(resp, &[StatusCode::ACCEPTED, StatusCode::NO_CONTENT], what).await?;
        self.location(&resp, location)
    }

    /// PUTs a manifest under `reference` (a tag or its digest). Returns its digest: that
    /// of the bytes sent; a registry that answers another `Docker-Content-Digest` is an
    /// error (it did not store what we pushed).
    pub async fn put_manifest(
        &self,
        reference: &str,
        media_type: &str,
        body: Bytes,
    ) -> Result<String, ApiError> {
        let ours = ferrydisk_common::checksum::sha256_digest(&body);
        let url = self.url(&format!("manifests/{reference}"))?;
        let what = format!("pushing the manifest {reference}");
        let resp = self
            .send(&what, Method::PUT, &url, |r| {
                r.header(CONTENT_TYPE, media_type).body(body.clone())
            })
            .await?;
        let resp = expect(resp, &[StatusCode::CREATED], &what).await?;
        if let Some(theirs) = resp
            .headers()
            .get("Docker-Content-Digest")
            .and_then(|v| v.to_str().ok())
        {
            if theirs.trim() != ours {
                return Err(ApiError::Protocol(format!(
                    "{what}: the registry reports digest {} for a manifest whose digest is {ours}",
                    body::shown(theirs)
                )));
            }
        }
        Ok(ours)
    }
}

/// Whether a failed upload request was cut (the connection, a timeout, a registry
/// restarting) rather than refused: then the session may be resumed.
fn cut(e: &ApiError) -> bool {
    match e {
        ApiError::Http { kind, .. } => *kind == ErrorKind::Network,
        ApiError::Timeout { .. } => true,
        ApiError::Status { status, .. } => status.is_server_error(),
        _ => false,
    }
}

/// When a streamed upload last moved.
struct Watch {
    start: Instant,
    last_ms: AtomicU64,
    /// The body waits for the producer: the registry is not the one stalling.
    producing: AtomicBool,
}

impl Watch {
    fn touch(&self) {
        self.last_ms
            .store(self.start.elapsed().as_millis() as u64, Ordering::Relaxed);
    }

    /// Resolves once nothing moved for `idle` while the registry had something to take.
    async fn stalled(&self, idle: Duration) {
        let tick = (idle / 4).clamp(Duration::from_millis(100), Duration::from_secs(5));
        loop {
            tokio::time::sleep(tick).await;
            if self.producing.load(Ordering::Relaxed) {
                self.touch();
                continue;
            }
            let last = Duration::from_millis(self.last_ms.load(Ordering::Relaxed));
            if self.start.elapsed().saturating_sub(last) >= idle {
                return;
            }
        }
    }
}

/// The response if its status is one of `ok`; otherwise an error with the start of
/// the body (read bounded).
async fn expect(
    resp: reqwest::Response,
    ok: &[StatusCode],
    what: &str,
) -> Result<reqwest::Response, ApiError> {
    if ok.contains(&resp.status()) {
        return Ok(resp);
    }
    let status = resp.status();
    let body = body::error_text(resp).await;
    Err(ApiError::Status {
        what: what.to_string(),
        status,
        body,
    })
}

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
