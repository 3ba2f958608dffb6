//! The proxy handler: token, readiness, then the body streamed to the upload server over
//! mTLS with back-pressure (never buffered), and the answer streamed back verbatim.

use crate::kube::{readiness, Kube, Readiness};
use crate::token::{from_header, TokenError, UploadTarget, Verifier};
use crate::upstream;
use axum::body::Body;
use axum::extract::{Path as UrlPath, State};
use axum::http::{HeaderMap, HeaderValue, Request, Response, StatusCode};
use ferrydisk_common::serve::{linger, listen};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

pub struct Config {
    pub upstream_template: String,
    pub ready_timeout: Duration,
    pub client_cert: PathBuf,
    pub client_key: PathBuf,
    /// Where the CA that signs upload server certificates comes from.
    pub upstream_ca: CaSource,
}

/// The upload-server CA bundle: a file (`--upload-server-ca`, re-read when it changes)
/// or CDI's ConfigMap, which `refresh_ca` re-reads periodically (CDI renews the signer
/// and republishes the bundle).
#[derive(Debug, Clone)]
pub enum CaSource {
    File(PathBuf),
    ConfigMap { namespace: String, name: String },
}

/// The mTLS client with what it was built from: the certificate and key files' mtimes
/// and the CA bundle.
type CachedClient = (Vec<SystemTime>, Vec<u8>, reqwest::Client);

pub struct App {
    pub cfg: Config,
    pub verifier: Verifier,
    pub kube: Option<Kube>,
    clients: Mutex<Option<CachedClient>>,
    /// The CA bundle last read.
    ca: Mutex<Vec<u8>>,
}

impl App {
    pub fn new(cfg: Config, verifier: Verifier, kube: Option<Kube>) -> Self {
        App {
            cfg,
            verifier,
            kube,
            clients: Mutex::new(None),
            ca: Mutex::new(Vec::new()),
        }
    }

    pub fn set_ca(&self, ca: Vec<u8>) {
        *self.ca.lock().unwrap_or_else(|e| e.into_inner()) = ca;
    }

    /// Reads the CA bundle from its source.
    pub async fn read_ca(&self) -> anyhow::Result<Vec<u8>> {
        use anyhow::Context;
        match &self.cfg.upstream_ca {
            CaSource::File(f) => {
                std::fs::read(f).with_context(|| format!("reading {}", f.display()))
            }
            CaSource::ConfigMap { namespace, name } => {
                let k = self.kube.as_ref().context("no Kubernetes API")?;
                let cm = k
                    .config_map(namespace, name)
                    .await
                    .with_context(|| format!("reading ConfigMap {namespace}/{name}"))?;
                Ok(cm
                    .data
                    .and_then(|d| d.get("ca-bundle.crt").cloned())
                    .context("the upload server CA ConfigMap has no ca-bundle.crt")?
                    .into_bytes())
            }
        }
    }

    /// Re-reads the CA bundle every `every`; a changed bundle is used by the next
    /// upstream connection (connections open keep theirs).
    pub async fn refresh_ca(self: std::sync::Arc<Self>, every: Duration) {
        loop {
            tokio::time::sleep(every).await;
            match self.read_ca().await {
                Ok(ca) => {
                    let changed = *self.ca.lock().unwrap_or_else(|e| e.into_inner()) != ca;
                    if changed {
                        tracing::info!(
                            "upload server CA bundle changed: new upstream connections use it"
                        );
                        self.set_ca(ca);
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %format!("{e:#}"), "could not re-read the upload server CA bundle; keeping the last one")
                }
            }
        }
    }

    /// The mTLS client; rebuilt when the client certificate or key file changes (CDI
    /// re-reads them on every request so rotated certificates take effect).
    fn client(&self) -> anyhow::Result<reqwest::Client> {
        let ca = self.ca.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let stamp: Vec<SystemTime> = [&self.cfg.client_cert, &self.cfg.client_key]
            .iter()
            .map(|p| {
                std::fs::metadata(p)
                    .and_then(|m| m.modified())
                    .unwrap_or(SystemTime::UNIX_EPOCH)
            })
            .collect();
        let mut cache = self.clients.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((s, a, c)) = cache.as_ref() {
            if *s == stamp && *a == ca {
                return Ok(c.clone());
            }
        }
        let mut pem = std::fs::read(&self.cfg.client_cert)?;
        pem.push(b'\n');
        pem.extend(std::fs::read(&self.cfg.client_key)?);
        let mut b = reqwest::Client::builder()
            .use_rustls_tls()
            .identity(reqwest::Identity::from_pem(&pem)?)
            .tls_built_in_root_certs(false)
            .min_tls_version(reqwest::tls::Version::TLS_1_2)
            .connect_timeout(Duration::from_secs(10))
            .redirect(reqwest::redirect::Policy::none())
            .no_proxy();
        for c in reqwest::Certificate::from_pem_bundle(&ca)? {
            b = b.add_root_certificate(c);
        }
        let c = b.build()?;
        *cache = Some((stamp, ca, c.clone()));
        Ok(c)
    }
}

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

async fn forward(
    app: Arc<App>,
    token: Result<String, TokenError>,
    path: String,
    req: Request<Body>,
) -> Response<Body> {
    let started = Instant::now();
    let method = req.method().clone();
    let shown_path = if req.uri().path().starts_with("/upload/") {
        "/upload/<token>".to_string()
    } else {
        req.uri().path().to_string()
    };
    let bytes = Arc::new(AtomicU64::new(0));
    let mut pvc_shown = String::from("-");
    let resp = async {
        let now = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        let target = match token.and_then(|t| app.verifier.verify(&t, now)) {
            Ok(t) => t,
            Err(e) => {
                linger(req);
                return text(
                    StatusCode::from_u16(e.status()).unwrap_or(StatusCode::BAD_REQUEST),
                    e.to_string(),
                );
            }
        };
        pvc_shown = format!("{}/{}", target.namespace, target.pvc);
        let (pvc, upstream_path) = match wait_ready(&app, &target).await {
            Ok(r) => r,
            Err(msg) => {
                linger(req);
                let mut r = text(StatusCode::SERVICE_UNAVAILABLE, escape(&msg));
                r.headers_mut()
                    .insert("retry-after", HeaderValue::from_static("5"));
                return r;
            }
        };
        let path = match upstream_path {
            Some(ct) => match upstream::path_for(&ct, &path) {
                Ok(p) => p,
                Err(e) => {
                    linger(req);
                    return text(
                        StatusCode::SERVICE_UNAVAILABLE,
                        escape(&format!(
                            "rejecting upload request for PVC {} - {e}",
                            target.pvc
                        )),
                    );
                }
            },
            None => path,
        };
        // The query goes along (CDI's reverse proxy keeps it): an upload's `checksum`.
        let query = req
            .uri()
            .query()
            .map(|q| format!("?{q}"))
            .unwrap_or_default();
        let url = format!(
            "{}{path}{query}",
            upstream::base_url(&app.cfg.upstream_template, &target.namespace, &pvc)
        );
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
            .request(parts.method.clone(), &url)
            .body(reqwest::Body::wrap_stream(feed(body, bytes.clone())));
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
                // A refused certificate says why (unknown authority: the upload
                // server's CA bundle is not the one its certificate was issued by).
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
    .await;
    // The access log: never the token (it is only ever in a header or a redacted path).
    let (n, secs) = (
        bytes.load(Ordering::Relaxed),
        started.elapsed().as_secs_f64(),
    );
    let mb_per_s = if secs > 0.0 {
        n as f64 / secs / 1e6
    } else {
        0.0
    };
    tracing::info!(method = %method, path = %shown_path, pvc = %pvc_shown, bytes = n, duration_ms = (secs * 1000.0) as u64, mb_per_s = format!("{mb_per_s:.1}"), status = resp.status().as_u16(), "request");
    resp
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

/// Waits up to the configured time for the upload server (CDI polls the PVC every
/// second for 10 s). Returns the PVC to route to and, in Kubernetes mode, its content
/// type for the archive rewrite.
async fn wait_ready(app: &App, t: &UploadTarget) -> Result<(String, Option<String>), String> {
    let deadline = Instant::now() + app.cfg.ready_timeout;
    loop {
        match &app.kube {
            Some(kube) => match readiness(kube, &t.namespace, &t.pvc).await {
                Readiness::Ready { pvc, content_type } => return Ok((pvc, Some(content_type))),
                Readiness::Refused(m) => return Err(m),
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
                                return Err(format!(
                                    "upload server for PVC {}/{}: TLS: {}; check the proxy's upload-server CA bundle",
                                    t.namespace, t.pvc, tls.cause
                                ));
                            }
                        }
                    }
                }
            }
        }
        if Instant::now() >= deadline {
            return Err(format!(
                "upload server for PVC {}/{} is not ready: timed out waiting for the condition",
                t.namespace, t.pvc
            ));
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}
