//! The proxy handlers: token, readiness (`ready.rs`), then the body streamed to the
//! upload server over mTLS with back-pressure (never buffered), the answer streamed
//! back verbatim, and the access log as a layer around them.

use crate::app::App;
use crate::ready::wait_ready;
use crate::token::{from_header, TokenError};
use crate::upstream;
use axum::body::Body;
use axum::extract::{Path as UrlPath, State};
use axum::http::{HeaderMap, HeaderValue, Request, Response, StatusCode};
use ferrydisk_common::serve::{linger, listen};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Instant, SystemTime};

fn text(status: StatusCode, body: impl Into<String>) -> Response<Body> {
    let mut r = Response::new(Body::from(body.into()));
    *r.status_mut() = status;
    r
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&#34;")
        .replace('\'', "&#39;")
}

/// `Authorization: Bearer` uploads on CDI's paths.
pub async fn with_header(State(app): State<Arc<App>>, req: Request<Body>) -> Response<Body> {
    let path = req.uri().path().to_string();
    let token = from_header(
        req.headers()
            .get("authorization")
            .and_then(|v| v.to_str().ok()),
    )
    .map(str::to_string);
    forward(app, token, path, req).await
}

/// The headers of tus answers a browser's script may read.
pub const TUS_HEADERS: [&str; 8] = [
    "location",
    "upload-offset",
    "upload-length",
    "upload-metadata",
    "tus-resumable",
    "tus-version",
    "tus-extension",
    "tus-checksum-algorithm",
];

/// Resumable uploads (tus): `OPTIONS` answered here, without a token (it only says
/// what the protocol offers); every other request as any upload, its token checked.
pub async fn resumable(State(app): State<Arc<App>>, req: Request<Body>) -> Response<Body> {
    use ferrydisk_common::tus;
    if req.method() == axum::http::Method::OPTIONS {
        let mut r = text(StatusCode::NO_CONTENT, "");
        for (k, v) in [
            ("tus-resumable", tus::VERSION),
            ("tus-version", tus::VERSION),
            ("tus-extension", tus::EXTENSIONS),
            ("tus-checksum-algorithm", tus::CHECKSUM_ALGORITHMS),
        ] {
            r.headers_mut().insert(k, HeaderValue::from_static(v));
        }
        return r;
    }
    with_header(State(app), req).await
}

/// `curl -T disk.img https://proxy/upload/<token>`: the token in the path, for clients
/// that cannot set headers.
pub async fn with_path_token(
    State(app): State<Arc<App>>,
    UrlPath(token): UrlPath<String>,
    req: Request<Body>,
) -> Response<Body> {
    let token = if crate::token::is_token(&token) {
        Ok(token)
    } else {
        Err(TokenError::Malformed)
    };
    forward(app, token, "/v1beta1/upload".into(), req).await
}

/// Refusing early: answer at once and keep reading (and dropping) what the client is
/// still sending for a bounded while (a "lingering close"): closing with unread data
/// makes the kernel send a reset that can destroy the answer before the client reads it.
fn linger(req: Request<Body>) {
    linger::body(req.into_body());
}

/// The client's body as the upstream request's body, through a small channel filled by
/// a task of its own. When the upload server refuses early (a 400 for an image larger
/// than the volume) and drops the request body, the task keeps reading and dropping
/// what the client still sends for a bounded while, so the refusal we pass on reaches
/// the client instead of a reset.
fn feed(
    body: Body,
    counter: Arc<AtomicU64>,
) -> impl futures_util::Stream<Item = Result<bytes::Bytes, axum::Error>> + Send + 'static {
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<bytes::Bytes, axum::Error>>(8);
    let idle = listen::body_idle_timeout();
    tokio::spawn(async move {
        let mut body = body;
        loop {
            let frame = match listen::next_frame(&mut body, idle).await {
                Ok(Some(f)) => f,
                Ok(None) => break,
                Err(stalled) => {
                    // The upstream's body fails, so the upload server puts the upload
                    // away instead of waiting for the rest.
                    tracing::warn!(error = %stalled, "upload body stalled; failing it");
                    let _ = tx.send(Err(axum::Error::new(stalled))).await;
                    return;
                }
            };
            let item = match frame {
                Ok(f) => match f.into_data() {
                    Ok(b) => Ok(b),
                    Err(_) => continue, // trailers
                },
                Err(e) => Err(e),
            };
            if let Ok(b) = &item {
                counter.fetch_add(b.len() as u64, Ordering::Relaxed);
            }
            let failed = item.is_err();
            if tx.send(item).await.is_err() {
                // The upstream stopped reading: linger on the client's side.
                linger::body(body);
                return;
            }
            if failed {
                return;
            }
        }
    });
    futures_util::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|i| (i, rx)) })
}

/// What the access log says of a proxied upload besides the request line.
#[derive(Clone)]
pub struct Transfer {
    /// `namespace/pvc`, once the token named one.
    pub pvc: Option<String>,
    /// Body bytes passed upstream.
    pub bytes: Arc<AtomicU64>,
}

/// The access log, as a layer around the router: one line per request, never the
/// token (it is only ever in a header or a redacted path), with the PVC and the bytes
/// an upload handler recorded in the response.
pub async fn access_log(req: Request<Body>, next: axum::middleware::Next) -> Response<Body> {
    let started = Instant::now();
    let method = req.method().clone();
    let path = if req.uri().path().starts_with("/upload/") {
        "/upload/<token>".to_string()
    } else {
        req.uri().path().to_string()
    };
    let resp = next.run(req).await;
    let Some(t) = resp.extensions().get::<Transfer>() else {
        return resp; // not an upload (`/healthz`, a 404): probes are not logged
    };
    let n = t.bytes.load(Ordering::Relaxed);
    let pvc = t.pvc.as_deref().unwrap_or("-");
    let secs = started.elapsed().as_secs_f64();
    let mb_per_s = if secs > 0.0 {
        n as f64 / secs / 1e6
    } else {
        0.0
    };
    tracing::info!(method = %method, path = %path, pvc = %pvc, bytes = n, duration_ms = (secs * 1000.0) as u64, mb_per_s = format!("{mb_per_s:.1}"), status = resp.status().as_u16(), "request");
    resp
}

async fn forward(
    app: Arc<App>,
    token: Result<String, TokenError>,
    path: String,
    req: Request<Body>,
) -> Response<Body> {
    let bytes = Arc::new(AtomicU64::new(0));
    // The query goes along (CDI's reverse proxy keeps it): an upload's `checksum`.
    let query = req
        .uri()
        .query()
        .map(|q| format!("?{q}"))
        .unwrap_or_default();
    let (mut resp, pvc) = match upstream_url(&app, token, path + &query).await {
        Ok((url, pvc)) => (send(&app, &url, req, bytes.clone()).await, Some(pvc)),
        Err((refused, pvc)) => {
            linger(req);
            (refused, pvc)
        }
    };
    resp.extensions_mut().insert(Transfer { pvc, bytes });
    resp
}

/// The token checked, the PVC's upload server ready, and the URL to send to (the
/// archive rewrite applied); or the refusal to answer, with the PVC when one was named.
async fn upstream_url(
    app: &App,
    token: Result<String, TokenError>,
    path_and_query: String,
) -> Result<(String, String), (Response<Body>, Option<String>)> {
    let (path, query) = match path_and_query.split_once('?') {
        Some((p, q)) => (p.to_string(), format!("?{q}")),
        None => (path_and_query, String::new()),
    };
    let now = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let target = token
        .and_then(|t| app.verifier.verify(&t, now))
        .map_err(|e| {
            let status = StatusCode::from_u16(e.status()).unwrap_or(StatusCode::BAD_REQUEST);
            (text(status, e.to_string()), None)
        })?;
    let shown = format!("{}/{}", target.namespace, target.pvc);
    let (pvc, content_type) = wait_ready(app, &target).await.map_err(|e| {
        let mut r = text(StatusCode::SERVICE_UNAVAILABLE, escape(&e.to_string()));
        r.headers_mut()
            .insert("retry-after", HeaderValue::from_static("5"));
        (r, Some(shown.clone()))
    })?;
    let path = match content_type {
        Some(ct) => upstream::path_for(&ct, &path).map_err(|e| {
            let m = format!("rejecting upload request for PVC {} - {e}", target.pvc);
            (
                text(StatusCode::SERVICE_UNAVAILABLE, escape(&m)),
                Some(shown.clone()),
            )
        })?,
        None => path,
    };
    let base = upstream::base_url(&app.cfg.upstream_template, &target.namespace, &pvc);
    Ok((format!("{base}{path}{query}"), shown))
}

/// The request to the upload server over mTLS, its body streamed as it arrives, and
/// the answer streamed back verbatim.
async fn send(app: &App, url: &str, req: Request<Body>, bytes: Arc<AtomicU64>) -> Response<Body> {
    let client = match app.client() {
        Ok(c) => c,
        Err(e) => {
            return text(
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("error in upload-proxy: {e:#}"),
            )
        }
    };
    let (parts, body) = req.into_parts();
    let mut out = client
        .request(parts.method.clone(), url)
        .body(reqwest::Body::wrap_stream(feed(body, bytes)));
    for (k, v) in forwarded_headers(&parts.headers).iter() {
        out = out.header(k, v);
    }
    match out.send().await {
        Ok(r) => {
            let mut resp = Response::builder().status(r.status().as_u16());
            for (k, v) in forwarded_headers(r.headers()).iter() {
                resp = resp.header(k, v);
            }
            resp.body(Body::from_stream(r.bytes_stream()))
                .unwrap_or_else(|e| {
                    text(
                        StatusCode::BAD_GATEWAY,
                        format!("error in upload-proxy: {e}"),
                    )
                })
        }
        Err(e) => {
            // A refused certificate says why (unknown authority: the upload server's
            // CA bundle is not the one its certificate was issued by).
            let m = ferrydisk_common::tls_failure::diagnose(&e)
                .map(|t| {
                    format!(
                        "TLS: {}; check the proxy's upload-server CA bundle",
                        t.cause
                    )
                })
                .unwrap_or_else(|| ferrydisk_common::error::chain_line(&e));
            tracing::warn!(error = %m, "the upload server could not be reached");
            text(
                StatusCode::BAD_GATEWAY,
                format!("error in upload-proxy: {m}"),
            )
        }
    }
}

/// Hop-by-hop headers stay on their hop; `Expect` was answered by us.
fn forwarded_headers(h: &HeaderMap) -> HeaderMap {
    let mut out = h.clone();
    for k in [
        "host",
        "connection",
        "keep-alive",
        "transfer-encoding",
        "te",
        "trailer",
        "upgrade",
        "proxy-connection",
        "expect",
    ] {
        out.remove(k);
    }
    out
}
