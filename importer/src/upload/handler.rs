//! One upload request: routing, client-certificate check, CDI's status codes, and the
//! body streamed (raw or the multipart `file` field) into the import pipeline.

use super::clone::CloneKind;
use super::{Phase, Server};
use crate::failure::Failure;
use bytes::Bytes;
use ferrydisk_common::cdi::termination::TerminationMessage;
use ferrydisk_common::checksum::{Checksum, ChecksumError};
use ferrydisk_common::error::SourceError;
use ferrydisk_common::progress::Progress;
use ferrydisk_common::serve::{conn, linger, listen, tls};
use ferrydisk_common::stream::ChunkSender;
use ferrydisk_common::ErrorKind;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use std::convert::Infallible;
use std::sync::Arc;
use tracing::Instrument;

#[derive(Clone, Copy)]
struct Route {
    asynchronous: bool,
    form: bool,
    archive: bool,
}

/// The exact paths CDI's upload server serves (docs/cdi-contract.md section 4.4).
fn route(path: &str) -> Option<Route> {
    let rest = path
        .strip_prefix("/v1beta1/")
        .or_else(|| path.strip_prefix("/v1alpha1/"))?;
    let r = |asynchronous, form, archive| {
        Some(Route {
            asynchronous,
            form,
            archive,
        })
    };
    match rest {
        "upload" => r(false, false, false),
        "upload-async" => r(true, false, false),
        "upload-form" => r(false, true, false),
        "upload-form-async" => r(true, true, false),
        "upload-archive" => r(false, false, true),
        _ => None,
    }
}

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
    if !server.args.no_client_auth {
        let authorized = peer_cns
            .as_ref()
            .is_some_and(|cns| cns.iter().any(|cn| *cn == server.args.client_name));
        if !authorized {
            tracing::warn!(
                path,
                "refused upload: no client certificate with the expected common name"
            );
            linger(req);
            return reply(StatusCode::UNAUTHORIZED, "");
        }
    }
    let clone = CloneKind::from_header(
        req.headers()
            .get("x-cdi-content-type")
            .and_then(|v| v.to_str().ok()),
    );
    if clone.is_some() && route.asynchronous {
        linger(req);
        return reply(
            StatusCode::INTERNAL_SERVER_ERROR,
            "Saving stream failed: async clone not supported",
        );
    }
    match server.try_start() {
        Ok(()) => {}
        Err(phase) => {
            linger(req);
            let status = if phase == Phase::Done {
                StatusCode::CONFLICT
            } else {
                StatusCode::SERVICE_UNAVAILABLE
            };
            return reply(status, "");
        }
    }
    let boundary = if route.form {
        let ct = req
            .headers()
            .get(hyper::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("");
        match multer::parse_boundary(ct) {
            Ok(b) => Some(b),
            Err(e) => {
                server.set_phase(Phase::Idle);
                return reply(
                    StatusCode::BAD_REQUEST,
                    format!("Saving stream failed: {e}"),
                );
            }
        }
    } else {
        None
    };
    let content_length = if route.form || clone.is_some() {
        None
    } else {
        req.headers()
            .get(hyper::header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse().ok())
    };
    tracing::info!(path, content_length = ?content_length, "upload started");
    let checksums = match expected_checksums(&req) {
        Ok(c) => c,
        Err(e) => {
            server.set_phase(Phase::Idle);
            linger(req);
            return reply(
                StatusCode::BAD_REQUEST,
                format!("Saving stream failed: {e}"),
            );
        }
    };
    let mut plan = match server.disk_plan(route.archive).and_then(|p| match clone {
        Some(k) if k.unpacks(&p.dest) => server.disk_plan(true),
        _ => Ok(p),
    }) {
        Ok(p) => p,
        Err(f) => {
            server.set_phase(Phase::Idle);
            linger(req);
            return reply(
                StatusCode::BAD_REQUEST,
                format!("Saving stream failed: {}", f.detail()),
            );
        }
    };
    if !checksums.is_empty() {
        let names: Vec<&str> = checksums.iter().map(|c| c.algorithm()).collect();
        tracing::info!(algorithms = ?names, "verifying the upload against the client's digests");
        plan.checksum = checksums;
    }
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
    let started = std::time::Instant::now();
    let pumped = match boundary {
        Some(b) => pump_form(req.into_body(), b, &tx, &progress).await,
        None => pump_raw(req.into_body(), &tx, &progress).await,
    };
    match &pumped {
        Pumped::Complete(n) => {
            let secs = started.elapsed().as_secs_f64();
            let mb_s = if secs > 0.0 {
                *n as f64 / secs / 1e6
            } else {
                0.0
            };
            tracing::info!(
                bytes = n,
                seconds = format!("{secs:.2}"),
                mb_per_s = format!("{mb_s:.1}"),
                "upload body received"
            );
            tx.end().await;
        }
        Pumped::ClientFailed(e) => {
            tracing::warn!(error = %e, "upload body failed; the server takes a new upload");
            tx.fail(SourceError::new(ErrorKind::Network, e.clone()))
                .await;
        }
        Pumped::PipelineStopped => drop(tx),
    }
    if route.asynchronous && matches!(pumped, Pumped::Complete(_)) {
        // CDI: 200 once the body is in; the rest happens in the background and a failure
        // there ends the process with exit 1.
        let server = server.clone();
        tokio::spawn(async move {
            let result = join(work).await;
            reporter.abort();
            if result.is_ok() {
                progress.complete();
            }
            finish(&server, result.map_err(|f| f.detail()), false);
        });
        return reply(StatusCode::OK, "");
    }
    let result = join(work).await;
    reporter.abort();
    match result {
        Ok(msg) => {
            progress.complete(); // synced: only now 100
            finish(&server, Ok(msg), clone.is_some());
            reply(StatusCode::OK, "")
        }
        Err(f) => {
            server.set_phase(Phase::Idle);
            let detail = f.detail();
            tracing::error!(class = f.kind().class(), kind = %f.kind(), error = %detail, "upload failed");
            // A full volume is TooLarge by its io::ErrorKind where it was raised.
            if f.kind() == ErrorKind::ChecksumMismatch {
                // The client's bytes are not the ones it vouched for: its error, a 400,
                // and the disk was emptied by the failed write.
                reply(
                    StatusCode::BAD_REQUEST,
                    format!("Saving stream failed: {detail}"),
                )
            } else if f.kind() == ErrorKind::TooLarge {
                reply(StatusCode::BAD_REQUEST, format!("Saving stream failed: effective image size is larger than the reported available storage: {detail}"))
            } else if f.kind() == ErrorKind::ScratchRequired {
                reply(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "Saving stream failed: scratch space required and none found",
                )
            } else {
                reply(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    format!("Saving stream failed: {detail}"),
                )
            }
        }
    }
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
fn finish(server: &Server, result: Result<TerminationMessage, String>, clone: bool) {
    let result = result.map(|m| {
        server.set_phase(Phase::Done);
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
    if result.is_err() {
        server.set_phase(Phase::Idle);
    }
    let _ = server.finished.send(Some(result));
}

enum Pumped {
    Complete(u64),
    ClientFailed(String),
    /// The pipeline stopped reading (it failed); its error is the answer.
    PipelineStopped,
}

async fn pump_raw(mut body: Incoming, tx: &ChunkSender, progress: &Progress) -> Pumped {
    let idle = listen::body_idle_timeout();
    let mut n = 0u64;
    loop {
        let frame = match listen::next_frame(&mut body, idle).await {
            Ok(Some(f)) => f,
            Ok(None) => break,
            Err(stalled) => {
                return Pumped::ClientFailed(format!(
                    "upload body stopped after {n} bytes: {stalled}"
                ))
            }
        };
        match frame {
            Ok(f) => {
                if let Ok(data) = f.into_data() {
                    n += data.len() as u64;
                    progress.add_source(data.len() as u64);
                    if tx.data(data).await.is_err() {
                        linger::body(body);
                        return Pumped::PipelineStopped;
                    }
                }
            }
            Err(e) => {
                return Pumped::ClientFailed(format!("upload body ended after {n} bytes: {e}"))
            }
        }
    }
    Pumped::Complete(n)
}

/// Skips form parts until the one named `file` (CDI's rule) and streams it.
async fn pump_form(
    body: Incoming,
    boundary: String,
    tx: &ChunkSender,
    progress: &Progress,
) -> Pumped {
    let idle = listen::body_idle_timeout();
    let stream = futures_util::stream::unfold(Some(body), move |body| async move {
        let mut body = body?;
        loop {
            match listen::next_frame(&mut body, idle).await {
                Ok(Some(Ok(frame))) => match frame.into_data() {
                    Ok(d) => return Some((Ok(d), Some(body))),
                    Err(_) => continue, // trailers
                },
                Ok(Some(Err(e))) => return Some((Err(std::io::Error::other(e)), None)),
                Ok(None) => return None,
                Err(stalled) => return Some((Err(std::io::Error::other(stalled)), None)),
            }
        }
    });
    let mut form = multer::Multipart::new(stream, boundary);
    let mut n = 0u64;
    loop {
        let field = match form.next_field().await {
            Ok(Some(f)) => f,
            Ok(None) => return Pumped::ClientFailed("the form has no part named \"file\"".into()),
            Err(e) => return Pumped::ClientFailed(format!("reading form: {e}")),
        };
        if field.name() != Some("file") {
            continue;
        }
        let mut field = field;
        loop {
            match field.chunk().await {
                Ok(Some(data)) => {
                    n += data.len() as u64;
                    progress.add_source(data.len() as u64);
                    if tx.data(data).await.is_err() {
                        // Linger: read the rest of the form while the answer goes out.
                        drop(field);
                        linger::with(async move {
                            while let Ok(Some(mut f)) = form.next_field().await {
                                while let Ok(Some(_)) = f.chunk().await {}
                            }
                        });
                        return Pumped::PipelineStopped;
                    }
                }
                Ok(None) => return Pumped::Complete(n),
                Err(e) => {
                    return Pumped::ClientFailed(format!("upload form ended after {n} bytes: {e}"))
                }
            }
        }
    }
}

/// The digests the client vouches for, from any of: the `checksum` query parameter or
/// an `X-Checksum` header (IMPORTER_CHECKSUM's syntax, several separated by commas),
/// or an RFC 9530 `Content-Digest` header. All of them must match.
fn expected_checksums(req: &Request<Incoming>) -> Result<Vec<Checksum>, ChecksumError> {
    let mut out = Vec::new();
    for (k, v) in url::form_urlencoded::parse(req.uri().query().unwrap_or("").as_bytes()) {
        if k == "checksum" {
            out.extend(Checksum::parse_list(&v)?);
        }
    }
    let header = |name: &str| {
        req.headers()
            .get_all(name)
            .iter()
            .map(|v| {
                v.to_str()
                    .map_err(|_| ChecksumError::Invalid("<not ASCII>".into()))
            })
            .collect::<Result<Vec<_>, _>>()
    };
    for v in header("x-checksum")? {
        out.extend(Checksum::parse_list(v)?);
    }
    for v in header("content-digest")? {
        out.extend(Checksum::parse_content_digest(v)?);
    }
    Checksum::one_per_algorithm(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes_are_cdis() {
        assert!(route("/v1beta1/upload").is_some_and(|r| !r.asynchronous && !r.form));
        assert!(route("/v1alpha1/upload-form-async").is_some_and(|r| r.asynchronous && r.form));
        assert!(route("/v1beta1/upload-archive").is_some_and(|r| r.archive));
        assert!(route("/v1beta1/upload-archive-async").is_none());
        assert!(route("/v2/upload").is_none());
    }
}
