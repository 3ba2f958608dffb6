//! HTTP(S) source. The body is pumped into a bounded channel by a tokio task; a dropped
//! connection (or a body shorter than its Content-Length) is resumed with a `Range`
//! request guarded by `If-Range` (ETag or Last-Modified), and without range support the
//! download restarts and skips what was already delivered, as long as the validators
//! say the file is still the same one.

use super::redact;
use super::resume::{self as pump, backoff, Body, Labels, Opened, Policy, Reopen, Resumable};
use ferrydisk_common::progress::Progress;
use ferrydisk_common::resume::{self, Continue, Headers, Restart, Validators};
use ferrydisk_common::stream::{self, ChannelReader};
use ferrydisk_common::ErrorKind;
use futures_util::StreamExt;
use reqwest::header::{ACCEPT_RANGES, CONTENT_RANGE, ETAG, IF_RANGE, LAST_MODIFIED, RANGE};
use reqwest::{Client, Response, StatusCode};
use std::sync::Arc;
use std::time::Duration;

#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    #[error("invalid URL {0:?}")]
    BadUrl(String),
    #[error("HTTP request to {url} failed: {message}")]
    Request { url: String, message: String },
    /// A redirect loop or a refused redirect target: terminal, retrying cannot help.
    #[error(transparent)]
    Redirect(Box<HttpError>),
    #[error("{url} answered {status}{hint}")]
    Status {
        url: String,
        status: StatusCode,
        hint: &'static str,
    },
}

impl HttpError {
    pub fn kind(&self) -> ErrorKind {
        match self {
            HttpError::BadUrl(_) => ErrorKind::Config,
            HttpError::Redirect(_) => ErrorKind::SourceRefused,
            HttpError::Request { .. } => ErrorKind::Network,
            HttpError::Status { status, .. }
                if status.is_server_error() || *status == StatusCode::TOO_MANY_REQUESTS =>
            {
                ErrorKind::Network
            }
            HttpError::Status { .. } => ErrorKind::SourceRefused,
        }
    }
}

#[derive(Clone)]
pub struct HttpOptions {
    pub auth: Option<(String, String)>,
    pub retries: u32,
    pub idle_timeout: Duration,
    pub progress: Arc<Progress>,
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

/// Connects (retrying transient failures) and starts pumping the body.
pub async fn open(client: Client, url: &str, opts: HttpOptions) -> Result<Download, HttpError> {
    let parsed = reqwest::Url::parse(url).map_err(|_| HttpError::BadUrl(redact::url(url)))?;
    if !matches!(parsed.scheme(), "http" | "https") {
        return Err(HttpError::BadUrl(redact::url(url)));
    }
    let shown = redact::url(url);
    let mut attempt = 0;
    let resp = loop {
        match get(&client, &parsed, &opts, None).await {
            Ok(r) if r.status().is_success() => break r,
            Ok(r) => {
                let e = status_error(&shown, r.status());
                if e.kind() != ErrorKind::Network || attempt >= opts.retries {
                    return Err(e);
                }
                tracing::warn!(url = %shown, status = %r.status(), attempt, "server error, retrying");
            }
            Err(e) => {
                let refused = super::client::is_redirect_refusal(&e);
                let e = HttpError::Request {
                    url: shown.clone(),
                    message: error_text(&e),
                };
                if refused {
                    return Err(HttpError::Redirect(Box::new(e)));
                }
                if attempt >= opts.retries {
                    return Err(e);
                }
                tracing::warn!(url = %shown, error = %e, attempt, "request failed, retrying");
            }
        }
        tokio::time::sleep(backoff(attempt)).await;
        attempt += 1;
    };
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
        what: format!("download of {shown}"),
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
    Box::pin(resp.bytes_stream().map(|r| r.map_err(|e| error_text(&e))))
}

async fn get(
    client: &Client,
    url: &reqwest::Url,
    opts: &HttpOptions,
    range: Option<(u64, &Validators)>,
) -> reqwest::Result<Response> {
    let mut req = client.get(url.clone());
    if let Some((user, pass)) = &opts.auth {
        req = req.basic_auth(user, Some(pass));
    }
    if let Some((from, v)) = range {
        req = req.header(RANGE, format!("bytes={from}-"));
        if let Some(ir) = v.if_range() {
            req = req.header(IF_RANGE, ir);
        }
    }
    req.send().await
}

fn status_error(url: &str, status: StatusCode) -> HttpError {
    let hint = match status {
        StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN => {
            " (check IMPORTER_ACCESS_KEY_ID / IMPORTER_SECRET_KEY)"
        }
        StatusCode::NOT_FOUND => " (no image at this URL)",
        _ => "",
    };
    HttpError::Status {
        url: url.to_string(),
        status,
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
            .map_err(|e| {
                if super::client::is_redirect_refusal(&e) {
                    Reopen::Fatal(ErrorKind::SourceRefused, error_text(&e))
                } else {
                    Reopen::Retry(error_text(&e))
                }
            })?;
        let status = resp.status();
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
            let e = status_error(&self.shown, status);
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
