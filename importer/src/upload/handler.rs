//! One upload request: routing, client-certificate check, CDI's status codes, and the
//! body streamed (raw or the multipart `file` field) into the import pipeline.

use super::admit::{admit, prepare, Prepared};
use super::pump::pump;
use super::{Busy, Server, UploadFailed};
use crate::failure::Failure;
use bytes::Bytes;
use ferrydisk_common::cdi::termination::TerminationMessage;
use ferrydisk_common::cdi::upload::{route, Route};
use ferrydisk_common::progress::Progress;
use ferrydisk_common::serve::{conn, linger, tls};
use ferrydisk_common::ErrorKind;
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

/// CDI's answer to an upload the pipeline refused: the client's fault (400: a digest
/// that does not match, a disk larger than the volume) or ours (500).
fn failure_response(f: &Failure) -> Resp {
    let detail = f.detail();
    let (status, body) = match f.kind() {
        // The client's bytes are not the ones it vouched for; the disk was emptied.
        ErrorKind::ChecksumMismatch => (StatusCode::BAD_REQUEST, detail),
        // A full volume is TooLarge by its io::ErrorKind where it was raised.
        ErrorKind::TooLarge => (
            StatusCode::BAD_REQUEST,
            format!("effective image size is larger than the reported available storage: {detail}"),
        ),
        ErrorKind::ScratchRequired => (
            StatusCode::INTERNAL_SERVER_ERROR,
            "scratch space required and none found".into(),
        ),
        _ => (StatusCode::INTERNAL_SERVER_ERROR, detail),
    };
    let mut r = Response::new(Full::new(Bytes::from(format!(
        "Saving stream failed: {body}"
    ))));
    *r.status_mut() = status;
    r
}

async fn join(
    work: tokio::task::JoinHandle<Result<TerminationMessage, Failure>>,
) -> Result<TerminationMessage, Failure> {
    work.await.unwrap_or_else(|e| {
        Err(Failure::Process {
            kind: ErrorKind::Io,
            message: format!("pipeline thread failed: {e}"),
        })
    })
}

/// Records the outcome; the server loop writes the termination message and exits.
/// CDI's messages: a clone target says "Clone Complete", an upload "Upload Complete".
fn finish(
    server: &Server,
    busy: Busy,
    result: Result<TerminationMessage, UploadFailed>,
    clone: bool,
) {
    let result = result.map(|m| {
        TerminationMessage {
            preallocation_applied: m.preallocation_applied,
            // Deckhouse's report belongs to uploads; a clone target says only CDI's.
            import_info: if clone { None } else { m.import_info },
            message: Some(
                if clone {
                    "Clone Complete"
                } else {
                    "Upload Complete"
                }
                .into(),
            ),
            ..Default::default()
        }
    });
    // Done before the server loop hears of it; a failure frees the server.
    match &result {
        Ok(_) => busy.complete(),
        Err(_) => drop(busy),
    }
    let _ = server.finished.send(Some(result));
}
