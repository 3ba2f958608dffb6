//! HTTP(S) source. The body is pumped into a bounded channel by a tokio task; a dropped
//! connection (or a body shorter than its Content-Length) is resumed with a `Range`
//! request guarded by `If-Range` (ETag or Last-Modified), and without range support the
//! download restarts and skips what was already delivered, as long as the validators
//! say the file is still the same one.

use super::redact;
use super::resume::{self as pump, backoff, Body, Labels, Opened, Policy, Reopen, Resumable};
use crate::net::follow::AuthError;
use crate::sources::client::HttpClient as Client;
use ferrydisk_common::progress::Progress;
use ferrydisk_common::resume::{self, Continue, Headers, Restart, Validators};
use ferrydisk_common::stream::{self, ChannelReader};
use ferrydisk_common::ErrorKind;
use futures_util::StreamExt;
use reqwest::header::{
    ACCEPT_RANGES, CONTENT_RANGE, ETAG, IF_MATCH, IF_RANGE, LAST_MODIFIED, RANGE,
};
use reqwest::{RequestBuilder, Response, StatusCode};
use std::sync::Arc;
use std::time::Duration;

#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    #[error("invalid URL {0:?}")]
    BadUrl(String),
    #[error("HTTP request to {url} failed: {message}")]
    Request {
        url: String,
        message: String,
        /// Network, or Config for a certificate the pod will never accept.
        kind: ErrorKind,
    },
    /// A redirect loop or a refused redirect target: terminal, retrying cannot help.
    #[error(transparent)]
    Redirect(Box<HttpError>),
    #[error("{url} answered {status}{detail}{hint}")]
    Status {
        url: String,
        status: StatusCode,
        /// What an object store's error body said (` (SignatureDoesNotMatch: ...)`).
        detail: String,
        hint: &'static str,
    },
}

impl HttpError {
    pub fn kind(&self) -> ErrorKind {
        match self {
            HttpError::BadUrl(_) => ErrorKind::Config,
            HttpError::Redirect(_) => ErrorKind::SourceRefused,
            HttpError::Request { kind, .. } => *kind,
            HttpError::Status { status, .. }
                if status.is_server_error() || *status == StatusCode::TOO_MANY_REQUESTS =>
            {
                ErrorKind::Network
            }
            HttpError::Status { .. } => ErrorKind::SourceRefused,
        }
    }
}

/// Adds credentials to each request (the first and every resume): an object store's
/// request signature or bearer token.
pub trait Authorize: Send + Sync + 'static {
    fn authorize<'a>(
        &'a self,
        req: RequestBuilder,
        url: &'a reqwest::Url,
    ) -> futures_util::future::BoxFuture<'a, Result<RequestBuilder, AuthError>>;
}

#[derive(Clone)]
pub enum Auth {
    None,
    /// HTTP basic (`IMPORTER_ACCESS_KEY_ID` / `IMPORTER_SECRET_KEY` on the http source).
    Basic(String, String),
    /// Computed per request (S3 SigV4, a GCS OAuth token).
    Per(Arc<dyn Authorize>),
}

#[derive(Clone)]
pub struct HttpOptions {
    pub auth: Auth,
    /// Resumes also send `If-Match` with the first response's ETag: object stores
    /// answer 412 when the object was replaced, instead of a body of the new one.
    pub if_match: bool,
    /// Names the transfer in errors and logs (`download of URL`, `s3 object bucket/key`).
    pub what: Option<String>,
    /// What a 401/403 tells the user to check (the source's credentials).
    pub credentials_hint: &'static str,
    pub retries: u32,
    pub idle_timeout: Duration,
    pub progress: Arc<Progress>,
    /// The user's extra headers (`IMPORTER_EXTRA_HEADER_*`, `/extraheaders`): secrets,
    /// sent only to the URL's own origin, as the credentials are.
    pub secret_headers: reqwest::header::HeaderMap,
    /// Refuse redirects to link-local, loopback and unspecified addresses.
    pub refuse_internal_redirects: bool,
}

/// An open download: its length if the server said, and the reader its bytes arrive on.
pub struct Download {
    pub content_length: Option<u64>,
    pub reader: ChannelReader,
}

/// The resume-relevant headers of a response.
fn resume_headers(resp: &Response) -> Headers<'_> {
    let h = resp.headers();
    let get = |n| {
        h.get(n)
            .and_then(|v: &reqwest::header::HeaderValue| v.to_str().ok())
    };
    Headers {
        partial: resp.status() == StatusCode::PARTIAL_CONTENT,
        etag: get(ETAG),
        last_modified: get(LAST_MODIFIED),
        content_length: get(reqwest::header::CONTENT_LENGTH),
        content_range: get(CONTENT_RANGE),
    }
}

/// The first response, retrying what is transient (a 5xx, a reset) up to `retries`.
async fn connect(
    client: &Client,
    parsed: &reqwest::Url,
    opts: &HttpOptions,
    shown: &str,
) -> Result<Response, HttpError> {
    let mut attempt = 0;
    loop {
        match get(client, parsed, opts, None).await {
            Ok(r) if r.status().is_success() => return Ok(r),
            Ok(r) => {
                let status = r.status();
                let mut e = status_error(shown, status, opts.credentials_hint);
                if let HttpError::Status { detail, .. } = &mut e {
                    *detail = error_detail(r).await;
                }
                if e.kind() != ErrorKind::Network || attempt >= opts.retries {
                    return Err(e);
                }
                tracing::warn!(url = %shown, %status, attempt, "server error, retrying");
            }
            Err(Failed::Auth(m)) => {
                return Err(HttpError::Request {
                    url: shown.to_string(),
                    message: m,
                    kind: ErrorKind::Network,
                })
            }
            Err(Failed::Redirect(m)) => {
                return Err(HttpError::Redirect(Box::new(HttpError::Request {
                    url: shown.to_string(),
                    message: m,
                    kind: ErrorKind::SourceRefused,
                })))
            }
            Err(Failed::Http(kind, message)) => {
                let e = HttpError::Request {
                    url: shown.to_string(),
                    message,
                    kind,
                };
                if kind != ErrorKind::Network || attempt >= opts.retries {
                    return Err(e);
                }
                tracing::warn!(url = %shown, error = %e, attempt, "request failed, retrying");
            }
        }
        tokio::time::sleep(backoff(attempt)).await;
        attempt += 1;
    }
}

/// Connects (retrying transient failures) and starts pumping the body.
pub async fn open(client: Client, url: &str, opts: HttpOptions) -> Result<Download, HttpError> {
    let parsed = reqwest::Url::parse(url).map_err(|_| HttpError::BadUrl(redact::url(url)))?;
    if !matches!(parsed.scheme(), "http" | "https") {
        return Err(HttpError::BadUrl(redact::url(url)));
    }
    let shown = redact::url(url);
    let resp = connect(&client, &parsed, &opts, &shown).await?;
    let content_length = resp.content_length();
    let ranges = resp
        .headers()
        .get(ACCEPT_RANGES)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.eq_ignore_ascii_case("bytes"));
    let validators = Validators::of(&resume_headers(&resp));
    tracing::info!(url = %shown, content_length = ?content_length, ranges, "connected");
    opts.progress.set_source_total(content_length);
    let (tx, reader) = stream::channel();
    let policy = Policy {
        retries: opts.retries,
        idle_timeout: opts.idle_timeout,
        progress: opts.progress.clone(),
    };
    let labels = Labels {
        what: opts
            .what
            .clone()
            .unwrap_or_else(|| format!("download of {shown}")),
        total: content_length,
        interrupted: "connection lost, resuming",
    };
    let source = HttpSource {
        client,
        url: parsed,
        shown,
        opts,
        content_length,
        ranges,
        validators,
    };
    let first = Opened {
        body: body_of(resp),
        skip: 0,
    };
    tokio::spawn(pump::run(source, first, policy, labels, tx));
    Ok(Download {
        content_length,
        reader,
    })
}

fn body_of(resp: Response) -> Body {
    Box::pin(
        resp.bytes_stream()
            .map(|r| r.map_err(|e| pump::Broken(error_text(&e)))),
    )
}

/// Why a request gave no response.
enum Failed {
    /// The request failed (its kind: a TLS refusal is terminal) or timed out.
    Http(ErrorKind, String),
    /// A redirect loop, a refused redirect target, a bad Location: terminal.
    Redirect(String),
    /// The credentials could not be computed (a token endpoint refused the key).
    Auth(String),
}

/// What only the URL's own origin gets: the source's credentials and the user's
/// secret extra headers.
struct SourceCredentials<'a> {
    auth: &'a Auth,
    headers: &'a reqwest::header::HeaderMap,
}

impl crate::net::follow::Credentials for SourceCredentials<'_> {
    fn apply<'a>(
        &'a self,
        req: RequestBuilder,
        url: &'a reqwest::Url,
    ) -> futures_util::future::BoxFuture<'a, Result<RequestBuilder, AuthError>> {
        Box::pin(async move {
            let req = req.headers(self.headers.clone());
            match self.auth {
                Auth::None => Ok(req),
                Auth::Basic(user, pass) => Ok(req.basic_auth(user, Some(pass))),
                Auth::Per(a) => a.authorize(req, url).await,
            }
        })
    }
}

async fn get(
    client: &Client,
    url: &reqwest::Url,
    opts: &HttpOptions,
    range: Option<(u64, &Validators)>,
) -> Result<Response, Failed> {
    use crate::net::follow::{self, FollowError};
    let mut public = reqwest::header::HeaderMap::new();
    if let Some((from, v)) = range {
        let mut put = |name, value: String| {
            if let Ok(v) = reqwest::header::HeaderValue::from_str(&value) {
                public.insert(name, v);
            }
        };
        put(RANGE, format!("bytes={from}-"));
        if let Some(ir) = v.if_range() {
            put(IF_RANGE, ir.to_string());
        }
        if let (true, Some(etag)) = (opts.if_match, &v.etag) {
            put(IF_MATCH, etag.clone());
        }
    }
    let creds = SourceCredentials {
        auth: &opts.auth,
        headers: &opts.secret_headers,
    };
    let policy = follow::Policy {
        refuse_internal: opts.refuse_internal_redirects,
        idle: opts.idle_timeout,
    };
    follow::send(client, reqwest::Method::GET, url, &public, &creds, policy)
        .await
        .map_err(|e| match e {
            FollowError::Http(e) => {
                let (kind, message) = crate::net::describe(&e);
                Failed::Http(kind, message)
            }
            FollowError::Direct(e) => {
                let (kind, message) = crate::net::direct::describe(&e);
                Failed::Http(kind, message)
            }
            FollowError::Timeout(secs) => Failed::Http(
                ErrorKind::Network,
                format!("no response within {secs} s (idle timeout)"),
            ),
            FollowError::Redirect(m) => Failed::Redirect(m),
            FollowError::Credentials(e) => Failed::Auth(e.to_string()),
        })
}

/// The code and message of an object store's XML error body (S3, GCS XML API), read
/// from at most 4 KiB of it: ` (SignatureDoesNotMatch: The request signature ...)`.
async fn error_detail(resp: Response) -> String {
    let mut body = Vec::new();
    let mut stream = resp.bytes_stream();
    let read = async {
        while let Some(Ok(b)) = stream.next().await {
            body.extend_from_slice(&b[..b.len().min(4096 - body.len())]);
            if body.len() >= 4096 {
                break;
            }
        }
    };
    if tokio::time::timeout(Duration::from_secs(5), read)
        .await
        .is_err()
    {
        return String::new();
    }
    let text = String::from_utf8_lossy(&body);
    let tag = |t: &str| {
        let open = format!("<{t}>");
        let start = text.find(&open)? + open.len();
        let end = start + text[start..].find('<')?;
        let v = text[start..end].trim();
        (!v.is_empty()).then(|| {
            v.chars()
                .filter(|c| !c.is_control())
                .take(200)
                .collect::<String>()
        })
    };
    match (tag("Code"), tag("Message")) {
        (Some(c), Some(m)) => format!(" ({c}: {m})"),
        (Some(c), None) => format!(" ({c})"),
        _ => String::new(),
    }
}

/// The 401/403 hint of the http and s3 sources.
pub const ACCESS_KEY_HINT: &str = " (check IMPORTER_ACCESS_KEY_ID / IMPORTER_SECRET_KEY)";

fn status_error(url: &str, status: StatusCode, credentials_hint: &'static str) -> HttpError {
    let hint = match status {
        StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN => credentials_hint,
        StatusCode::NOT_FOUND => " (no image at this URL)",
        _ => "",
    };
    HttpError::Status {
        url: url.to_string(),
        status,
        detail: String::new(),
        hint,
    }
}

/// reqwest's Display hides the cause ("error sending request"); the chain says what
/// broke. The URL it names may carry credentials, so it is redacted.
fn error_text(e: &reqwest::Error) -> String {
    let s = ferrydisk_common::error::chain_line(e);
    match e.url() {
        Some(u) => s.replace(u.as_str(), &redact::url(u.as_str())),
        None => s,
    }
}

/// What a resumed request needs: the first response's validators and range support.
struct HttpSource {
    client: Client,
    url: reqwest::Url,
    shown: String,
    opts: HttpOptions,
    content_length: Option<u64>,
    ranges: bool,
    validators: Validators,
}

impl Resumable for HttpSource {
    /// A response whose body continues at `offset`, plus the bytes past `offset` of the
    /// chunk that crossed it when the download had to restart and skip. Bytes are only
    /// ever spliced when the resumed response proves it is the same file
    /// ([`resume::judge`]); otherwise the import starts again from byte 0.
    async fn reopen(&mut self, offset: u64) -> Result<Opened, Reopen> {
        if !self.validators.strong() {
            return Err(Reopen::Restart(format!(
                "{} cannot be resumed at byte {offset}: {}",
                self.shown,
                Restart::NoValidator.describe()
            )));
        }
        let range = self.ranges.then_some((offset, &self.validators));
        let resp = get(&self.client, &self.url, &self.opts, range)
            .await
            .map_err(|e| match e {
                Failed::Redirect(m) => Reopen::Fatal(ErrorKind::SourceRefused, m),
                Failed::Http(ErrorKind::Network, m) => Reopen::Retry(m),
                Failed::Http(kind, m) => Reopen::Fatal(kind, m),
                Failed::Auth(m) => Reopen::Retry(m),
            })?;
        let status = resp.status();
        if status == StatusCode::PRECONDITION_FAILED {
            return Err(Reopen::Restart(format!(
                "{} cannot be resumed at byte {offset}: it was replaced during the download (412 to If-Match {})",
                self.shown,
                self.validators.etag.as_deref().unwrap_or("")
            )));
        }
        if status.is_success() {
            match resume::judge(
                &self.validators,
                self.content_length,
                offset,
                &resume_headers(&resp),
            ) {
                Ok(Continue::Range) => {
                    return Ok(Opened {
                        body: body_of(resp),
                        skip: 0,
                    })
                }
                Ok(Continue::Skip) => {}
                Err(why) => {
                    return Err(Reopen::Restart(format!(
                        "{} cannot be resumed at byte {offset}: {}",
                        self.shown,
                        why.describe()
                    )))
                }
            }
        } else {
            let e = status_error(&self.shown, status, self.opts.credentials_hint);
            return Err(if e.kind() == ErrorKind::Network {
                Reopen::Retry(e.to_string())
            } else {
                Reopen::Fatal(e.kind(), e.to_string())
            });
        }
        tracing::info!(url = %self.shown, skip = offset, "server cannot resume; restarting the download and skipping what was already received");
        Ok(Opened {
            body: body_of(resp),
            skip: offset,
        })
    }
}
