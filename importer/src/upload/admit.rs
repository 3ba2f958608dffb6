//! Before an upload's body is read: who may upload and when (the client certificate, a
//! clone's kind, the server free), and what the upload writes (the disk plan, the
//! client's digests, a form's boundary). A refusal is the answer to send.

use super::clone::CloneKind;
use super::{Busy, Phase, Server};
use crate::disk::DiskPlan;
use ferrydisk_common::cdi::upload::Route;
use ferrydisk_common::checksum::{Checksum, ChecksumError};
use hyper::body::Incoming;
use hyper::{Request, StatusCode};
use std::sync::Arc;

/// An upload refused before its body is read: the status and text to answer.
pub(super) struct Refusal {
    pub(super) status: StatusCode,
    pub(super) body: String,
}

impl Refusal {
    fn new(status: StatusCode, body: impl Into<String>) -> Self {
        Refusal {
            status,
            body: body.into(),
        }
    }

    /// CDI's 400 for a request it cannot take.
    fn bad(e: impl std::fmt::Display) -> Self {
        Refusal::new(
            StatusCode::BAD_REQUEST,
            format!("Saving stream failed: {e}"),
        )
    }
}

/// Who may upload, and when: the client certificate, a clone's kind, and the server
/// free to take it (the guard holds it busy). A refusal is the answer to send.
pub(super) fn admit(
    server: &Arc<Server>,
    peer_cns: Option<&Vec<String>>,
    route: Route,
    req: &Request<Incoming>,
) -> Result<(Busy, Option<CloneKind>), Refusal> {
    if !authorized(server, peer_cns) {
        return Err(Refusal::new(StatusCode::UNAUTHORIZED, ""));
    }
    let clone = CloneKind::from_header(
        req.headers()
            .get("x-cdi-content-type")
            .and_then(|v| v.to_str().ok()),
    );
    if clone.is_some() && route.asynchronous {
        return Err(Refusal::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "Saving stream failed: async clone not supported",
        ));
    }
    match server.try_start() {
        Ok(busy) => Ok((busy, clone)),
        Err(Phase::Done) => Err(Refusal::new(StatusCode::CONFLICT, "")),
        Err(_) => Err(Refusal::new(StatusCode::SERVICE_UNAVAILABLE, "")),
    }
}

/// Whether the client may upload: it shows a certificate with the expected common
/// name when the server was told one (CLIENT_NAME).
pub(super) fn authorized(server: &Server, peer_cns: Option<&Vec<String>>) -> bool {
    let Some(name) = &server.config.client_name else {
        return true;
    };
    let ok = peer_cns.is_some_and(|cns| cns.iter().any(|cn| cn == name));
    if !ok {
        tracing::warn!("refused upload: no client certificate with the expected common name");
    }
    ok
}

/// What one upload writes and how its body is read, checked before a byte is taken.
pub(super) struct Prepared {
    pub(super) plan: DiskPlan,
    pub(super) clone: Option<CloneKind>,
    /// A form upload's multipart boundary.
    pub(super) boundary: Option<String>,
    pub(super) content_length: Option<u64>,
}

pub(super) fn prepare(
    server: &Server,
    route: Route,
    clone: Option<CloneKind>,
    req: &Request<Incoming>,
) -> Result<Prepared, Refusal> {
    let boundary = if route.form {
        let ct = req
            .headers()
            .get(hyper::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("");
        Some(multer::parse_boundary(ct).map_err(Refusal::bad)?)
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
    tracing::info!(content_length = ?content_length, "upload started");
    let checksums = expected_checksums(req).map_err(Refusal::bad)?;
    let mut plan = match server.disk_plan(route.archive) {
        p if clone.is_some_and(|k| k.unpacks(&p.dest)) => server.disk_plan(true),
        p => p,
    };
    if !checksums.is_empty() {
        let names: Vec<&str> = checksums.iter().map(|c| c.algorithm()).collect();
        tracing::info!(algorithms = ?names, "verifying the upload against the client's digests");
        plan.checksum = checksums;
    }
    Ok(Prepared {
        plan,
        clone,
        boundary,
        content_length,
    })
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
