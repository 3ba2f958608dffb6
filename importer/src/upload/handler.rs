//! One upload request: routing, client-certificate check, CDI's status codes, and the
//! body streamed (raw or the multipart `file` field) into the import pipeline.

use super::admit::{admit, prepare, Prepared};
use super::outcome::{failure_response, finish, join};
use super::pump::pump;
use super::{Busy, Server, UploadFailed};
use bytes::Bytes;
use ferrydisk_common::cdi::upload::{resumable, route, Route};
use ferrydisk_common::progress::Progress;
use ferrydisk_common::serve::{conn, linger, tls};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use std::convert::Infallible;
use std::sync::Arc;
use tracing::Instrument;

pub fn spawn_connection(
    server: Arc<Server>,
    acceptor: tokio_rustls::TlsAcceptor,
    tcp: tokio::net::TcpStream,
    permit: tokio::sync::OwnedSemaphorePermit,
    watcher: hyper_util::server::graceful::Watcher,
) {
    conn::spawn(acceptor, tcp, permit, Some(watcher), move |tls| {
        // Verified by rustls against CLIENT_CERT_FILE when present.
        let peer_cns: Option<Arc<Vec<String>>> = tls
            .get_ref()
            .1
            .peer_certificates()
            .map(|certs| Arc::new(certs.iter().flat_map(|c| tls::common_names(c)).collect()));
        hyper::service::service_fn(move |req: Request<Incoming>| {
            let span = tracing::info_span!("upload", path = %req.uri().path());
            handle(server.clone(), peer_cns.clone(), req).instrument(span)
        })
    });
}

type Resp = Response<Full<Bytes>>;

fn linger(req: Request<Incoming>) {
    linger::body(req.into_body());
}

fn reply(status: StatusCode, body: impl Into<Bytes>) -> Result<Resp, Infallible> {
    let mut r = Response::new(Full::new(body.into()));
    *r.status_mut() = status;
    Ok(r)
}

async fn handle(
    server: Arc<Server>,
    peer_cns: Option<Arc<Vec<String>>>,
    req: Request<Incoming>,
) -> Result<Resp, Infallible> {
    let path = req.uri().path().to_string();
    if path == "/healthz" {
        return reply(StatusCode::OK, "OK");
    }
    if path == "/metrics" && req.method() == Method::GET {
        // Like /healthz, no client certificate needed: a scraper has none.
        let mut r = Response::new(Full::new(Bytes::from(server.metrics_text())));
        r.headers_mut().insert(
            hyper::header::CONTENT_TYPE,
            hyper::header::HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
        );
        return Ok(r);
    }
    if let Some(at) = resumable(&path) {
        if !super::admit::authorized(&server, peer_cns.as_deref()) {
            linger(req);
            return reply(StatusCode::UNAUTHORIZED, "");
        }
        return Ok(super::resumable::handle(server.clone(), at, req).await);
    }
    let Some(route) = route(&path) else {
        return reply(StatusCode::NOT_FOUND, "");
    };
    if req.method() == Method::HEAD && route.asynchronous {
        return reply(StatusCode::OK, ""); // lets clients probe for async support
    }
    // CDI accepts POST only; `curl -T` sends PUT, so we take both.
    if req.method() != Method::POST && req.method() != Method::PUT {
        return reply(StatusCode::NOT_FOUND, "");
    }
    let admitted = admit(&server, peer_cns.as_deref(), route, &req)
        .and_then(|(busy, clone)| Ok((busy, prepare(&server, route, clone, &req)?)));
    match admitted {
        Ok((busy, prepared)) => Ok(upload(server, route, busy, prepared, req).await),
        Err(refused) => {
            linger(req);
            reply(refused.status, refused.body)
        }
    }
}

/// The body into the pipeline as it arrives; the answer once the disk is durable (or,
/// asynchronous, once the body is in).
async fn upload(
    server: Arc<Server>,
    route: Route,
    busy: Busy,
    prepared: Prepared,
    req: Request<Incoming>,
) -> Resp {
    let Prepared {
        plan,
        clone,
        boundary,
        content_length,
    } = prepared;
    let (tx, reader) = ferrydisk_common::stream::channel();
    let progress = Arc::new(Progress::default());
    progress.set_source_total(content_length);
    server.set_progress(progress.clone());
    let reporter = crate::report::spawn(progress.clone(), false);
    let work_progress = progress.clone();
    let work = tokio::spawn(
        crate::disk::blocking(move || match clone {
            Some(kind) => super::clone::write(&plan, kind, reader, work_progress),
            None => {
                crate::disk::write_stream(&plan, reader, content_length, work_progress, None, false)
            }
        })
        .in_current_span(),
    );
    // When the pipeline refuses the data (too large for the volume, not an image) while
    // the client is still sending, both pumps keep reading while the answer goes out, so
    // the client sees our 400 instead of a reset.
    let complete = pump(req.into_body(), boundary, tx, &progress).await;
    if route.asynchronous && complete {
        // CDI: 200 once the body is in; the rest happens in the background and a failure
        // there ends the process with exit 1.
        tokio::spawn(async move {
            let result = join(work).await;
            reporter.abort();
            if result.is_ok() {
                progress.complete();
            }
            finish(
                &server,
                busy,
                result.map_err(UploadFailed::Processing),
                false,
            );
        });
        return status_only(StatusCode::OK);
    }
    let result = join(work).await;
    reporter.abort();
    match result {
        Ok(msg) => {
            progress.complete(); // synced: only now 100
            finish(&server, busy, Ok(msg), clone.is_some());
            status_only(StatusCode::OK)
        }
        Err(f) => {
            drop(busy);
            tracing::error!(class = f.kind().class(), kind = %f.kind(), error = %f.detail(), "upload failed");
            failure_response(&f)
        }
    }
}

fn status_only(status: StatusCode) -> Resp {
    let mut r = Response::new(Full::new(Bytes::new()));
    *r.status_mut() = status;
    r
}
