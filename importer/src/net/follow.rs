//! Redirects followed by hand, so the origin rule (`ferrydisk_common::origin`) holds on
//! every hop: reqwest strips only Authorization, Cookie and Proxy-Authorization when a
//! redirect leaves the host, and would carry an object store's session token or the
//! user's secret extra headers anywhere. Every client is built with reqwest's redirects
//! off; GET and HEAD requests that may be redirected go through [`send`], which adds
//! the credentials only on hops to the origin they belong to and puts a timeout on each
//! hop's response headers.

use crate::sources::client::HttpClient;
use ferrydisk_common::origin::{self, Carry, Origin};
use futures_util::future::BoxFuture;
use reqwest::header::{HeaderMap, LOCATION};
use reqwest::{Method, RequestBuilder, Response, StatusCode, Url};
use std::time::Duration;

/// At most this many redirects, as CDI's (Go's) client.
pub const MAX_REDIRECTS: usize = 10;

/// Credentials that could not be computed (a token endpoint refused the key): the
/// source's own error, which says why.
#[derive(Debug, thiserror::Error)]
#[error(transparent)]
pub struct AuthError(pub Box<dyn std::error::Error + Send + Sync>);

/// What a request carries only to its own origin: a signature, a token, secret headers.
pub trait Credentials: Send + Sync {
    fn apply<'a>(
        &'a self,
        req: RequestBuilder,
        url: &'a Url,
    ) -> BoxFuture<'a, Result<RequestBuilder, AuthError>>;
}

/// Fixed headers (an Authorization value, the user's extra headers).
pub struct SecretHeaders(pub HeaderMap);

impl Credentials for SecretHeaders {
    fn apply<'a>(
        &'a self,
        req: RequestBuilder,
        _url: &'a Url,
    ) -> BoxFuture<'a, Result<RequestBuilder, AuthError>> {
        Box::pin(async move { Ok(req.headers(self.0.clone())) })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum FollowError {
    #[error("{0}")]
    Http(#[source] reqwest::Error),
    /// The request failed on the direct HTTPS transport.
    #[error("{0}")]
    Direct(#[source] super::direct::DirectError),
    /// A redirect loop, a refused target, a bad Location: terminal.
    #[error("{0}")]
    Redirect(String),
    /// The credentials could not be computed (a token endpoint refused the key).
    #[error("{0}")]
    Credentials(AuthError),
    #[error("no response within {0} s (idle timeout)")]
    Timeout(u64),
}

/// How redirects are followed.
#[derive(Debug, Clone, Copy)]
pub struct Policy {
    /// Refuse targets on link-local, loopback and unspecified addresses.
    pub refuse_internal: bool,
    /// The longest wait for one hop's response headers.
    pub idle: Duration,
}

/// Sends `method` (GET or HEAD) to `url` with `public` headers on every hop and
/// `creds` only on hops to `url`'s own origin, following up to [`MAX_REDIRECTS`]
/// redirects. The final response is returned whatever its status.
pub async fn send(
    client: &HttpClient,
    method: Method,
    url: &Url,
    public: &HeaderMap,
    creds: &dyn Credentials,
    policy: Policy,
) -> Result<Response, FollowError> {
    let owner = Origin::of(url)
        .ok_or_else(|| FollowError::Redirect(format!("not an http(s) URL: {}", shown(url))))?;
    let mut next = url.clone();
    let mut hops = 0;
    loop {
        let mut req = client
            .request(method.clone(), next.clone())
            .headers(public.clone());
        if origin::carry(&owner, &next) == Carry::Credentials {
            req = creds
                .apply(req, &next)
                .await
                .map_err(FollowError::Credentials)?;
        }
        let sent = async {
            match &client.direct {
                Some(direct) if next.scheme() == "https" => {
                    let req = req.build().map_err(FollowError::Http)?;
                    direct.send(req).await.map_err(FollowError::Direct)
                }
                _ => req.send().await.map_err(FollowError::Http),
            }
        };
        let resp = match tokio::time::timeout(policy.idle, sent).await {
            Ok(r) => r?,
            Err(_) => return Err(FollowError::Timeout(policy.idle.as_secs())),
        };
        if !is_redirect(resp.status()) {
            return Ok(resp);
        }
        let Some(location) = resp.headers().get(LOCATION) else {
            return Ok(resp);
        };
        let location = location
            .to_str()
            .map_err(|_| FollowError::Redirect("a redirect Location that is not text".into()))?;
        let target = origin::resolve_location(&next, location)
            .map_err(|e| FollowError::Redirect(e.to_string()))?;
        hops += 1;
        if hops > MAX_REDIRECTS {
            return Err(FollowError::Redirect(format!(
                "more than {MAX_REDIRECTS} redirects (a redirect loop?) from {}",
                shown(url)
            )));
        }
        if policy.refuse_internal && crate::sources::client::is_internal(&target) {
            return Err(FollowError::Redirect(format!(
                "redirect to internal address {} refused (--refuse-internal-redirects)",
                target.host_str().unwrap_or("")
            )));
        }
        if origin::carry(&owner, &target) != Carry::Credentials {
            tracing::info!(from = %shown(&next), to = %shown(&target), "redirected to another origin: following without credentials");
        }
        next = target;
    }
}

fn is_redirect(s: StatusCode) -> bool {
    matches!(
        s,
        StatusCode::MOVED_PERMANENTLY
            | StatusCode::FOUND
            | StatusCode::SEE_OTHER
            | StatusCode::TEMPORARY_REDIRECT
            | StatusCode::PERMANENT_REDIRECT
    )
}

fn shown(u: &Url) -> String {
    crate::sources::redact::url(u.as_str())
}
