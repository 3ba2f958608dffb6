//! Resumable uploads: tus 1.0 (core, creation, checksum, termination) at
//! `/v1beta1/upload-resumable`, next to CDI's one-shot endpoints (docs/upload.md,
//! "Resumable uploads"). The requests and their answers are here; the upload itself,
//! a pipeline that outlives its requests, is [`session`]; its state on the volume for a
//! restarted server is [`state`].

mod session;
mod state;

use super::outcome::failure_response;
use super::Server;
use bytes::Bytes;
use ferrydisk_common::cdi::upload::Resumable;
use ferrydisk_common::checksum::{Checksum, ChecksumError, Digests};
use ferrydisk_common::tus;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::{HeaderMap, Method, Request, Response, StatusCode};
use session::{Patched, Session, StartRefused};
use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

type Resp = Response<Full<Bytes>>;

/// The server's resumable upload (at most one, as for any upload) and the ids of the
/// last ones that ended, with why: their requests get 410 Gone and the reason.
#[derive(Default)]
pub struct Registry {
    slot: Mutex<Slot>,
}

#[derive(Default)]
struct Slot {
    current: Option<Arc<Session>>,
    gone: VecDeque<(String, String)>,
}

/// Ended uploads remembered for their 410.
const GONE_KEPT: usize = 16;

impl Registry {
    fn lock(&self) -> std::sync::MutexGuard<'_, Slot> {
        self.slot.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn current(&self) -> Option<Arc<Session>> {
        self.lock().current.clone()
    }

    fn install(&self, s: Arc<Session>) {
        self.lock().current = Some(s);
    }

    /// The upload `id` has ended, for `why`.
    pub fn retire(&self, id: &str, why: &str) {
        let mut slot = self.lock();
        if slot.current.as_ref().is_some_and(|s| s.id == id) {
            slot.current = None;
        }
        slot.gone.retain(|(g, _)| g != id);
        if slot.gone.len() == GONE_KEPT {
            slot.gone.pop_front();
        }
        slot.gone.push_back((id.to_string(), why.to_string()));
    }

    fn find(&self, id: &str) -> Result<Arc<Session>, Option<String>> {
        let slot = self.lock();
        match &slot.current {
            Some(s) if s.id == id => Ok(s.clone()),
            _ => Err(slot
                .gone
                .iter()
                .find(|(g, _)| g == id)
                .map(|(_, why)| why.clone())),
        }
    }
}

/// A restarted server takes back the upload its state file describes (a raw image on
/// a filesystem volume), or says why not to whoever asks for it.
pub async fn restore(server: &Arc<Server>) {
    let plan = server.disk_plan(false);
    if !crate::disk::resumable_after_restart(&plan) {
        return;
    }
    let path = state::path_for(plan.dest.path());
    let saved = match state::load(&path) {
        None => return,
        Some(Err(e)) => {
            tracing::warn!(error = %e, "ignoring an unreadable upload state");
            state::remove(&path);
            return;
        }
        Some(Ok(s)) => s,
    };
    let why = match saved.format.as_deref() {
        Some("raw") if saved.offset > 0 => match Session::restore(server, saved.clone()).await {
            Ok(s) => {
                server.resumable.install(s);
                return;
            }
            Err(e) => format!("the upload server restarted and could not take the upload back ({e}): start it again"),
        },
        Some("raw") | None => "the upload server restarted before any of the upload was on stable storage: start it again".to_string(),
        Some(f) => format!("the upload server restarted; a {f} upload resumes only while the server runs: start it again"),
    };
    tracing::warn!(id = %saved.id, reason = %why, "not resuming the upload");
    state::remove(&path);
    server.resumable.retire(&saved.id, &why);
}

/// The deadline passed: a resumable upload no request is sending to is terminated (its
/// disk emptied), so the server can end as CDI's does when idle.
pub async fn abandon_if_idle(server: &Arc<Server>) {
    if let Some(s) = server.resumable.current() {
        if !s.in_use() {
            s.terminate(
                server,
                "the upload's deadline passed while nothing was sent",
            )
            .await;
        }
    }
}

/// Answers one request under `/v1beta1/upload-resumable`.
pub async fn handle(server: Arc<Server>, at: Resumable<'_>, req: Request<Incoming>) -> Resp {
    if req.method() == Method::OPTIONS {
        return options();
    }
    if let Some(r) = wrong_version(req.headers()) {
        linger(req);
        return r;
    }
    match (at, req.method().clone()) {
        (Resumable::Create, Method::POST) => {
            let r = create(&server, req.headers(), req.uri().path()).await;
            linger(req);
            r
        }
        (Resumable::Upload(id), Method::HEAD) => {
            linger(req);
            match server.resumable.find(id) {
                Ok(s) => {
                    let mut r = tus_reply(StatusCode::OK, "");
                    set(&mut r, "upload-offset", s.offset().to_string());
                    set(&mut r, "upload-length", s.length.to_string());
                    set(&mut r, "cache-control", "no-store".into());
                    r
                }
                Err(why) => missing(id, why),
            }
        }
        (Resumable::Upload(id), Method::PATCH) => {
            let id = id.to_string();
            patch(&server, &id, req).await
        }
        (Resumable::Upload(id), Method::DELETE) => {
            linger(req);
            match server.resumable.find(id) {
                Ok(s) => {
                    s.terminate(&server, "terminated by the client").await;
                    tus_reply(StatusCode::NO_CONTENT, "")
                }
                Err(why) => missing(id, why),
            }
        }
        _ => {
            linger(req);
            let mut r = tus_reply(StatusCode::METHOD_NOT_ALLOWED, "");
            set(
                &mut r,
                "allow",
                match at {
                    Resumable::Create => "OPTIONS, POST",
                    Resumable::Upload(_) => "OPTIONS, HEAD, PATCH, DELETE",
                }
                .into(),
            );
            r
        }
    }
}

/// `POST`: a new upload of `Upload-Length` bytes, or (metadata `head`, the digest of
/// its first MiB, and the same length) the one in progress, taken up again.
async fn create(server: &Arc<Server>, h: &HeaderMap, base: &str) -> Resp {
    if h.contains_key("upload-defer-length") {
        return tus_reply(
            StatusCode::BAD_REQUEST,
            "Upload-Defer-Length is not supported: give Upload-Length",
        );
    }
    let length = match tus::parse_u64("Upload-Length", header(h, "upload-length")) {
        Ok(n) => n,
        Err(e) => return tus_reply(StatusCode::BAD_REQUEST, e.to_string()),
    };
    let meta = match header(h, "upload-metadata").map(tus::parse_metadata) {
        None => Vec::new(),
        Some(Ok(m)) => m,
        Some(Err(e)) => return tus_reply(StatusCode::BAD_REQUEST, e.to_string()),
    };
    let value = |k: &str| meta.iter().find(|(m, _)| m == k).map(|(_, v)| v.as_str());
    let (wants, algorithms, digests) = match parse_checksums(value("checksum").unwrap_or("")) {
        Ok(c) => c,
        Err(e) => return tus_reply(StatusCode::BAD_REQUEST, e.to_string()),
    };
    if let Some(s) = server.resumable.current() {
        let same = value("head").is_some_and(|h| s.head() == Some(h)) && s.length == length;
        if same {
            tracing::info!(id = %s.id, offset = s.offset(), "the client took its upload up again");
            return created(base, &s);
        }
        if s.in_use() {
            return tus_reply(
                StatusCode::SERVICE_UNAVAILABLE,
                "another upload is in progress",
            );
        }
        // Only one upload fits the volume: the one nobody is sending gives way.
        s.terminate(server, "replaced by a new upload").await;
    }
    if let Some(name) = value("filename") {
        tracing::info!(filename = %name.chars().take(200).collect::<String>(), "upload names its file");
    }
    match Session::start(server, new_id(), length, wants, algorithms, digests) {
        Ok(s) => {
            server.resumable.install(s.clone());
            created(base, &s)
        }
        Err(StartRefused::Done) => tus_reply(StatusCode::CONFLICT, "the upload is complete"),
        Err(StartRefused::Busy) => tus_reply(
            StatusCode::SERVICE_UNAVAILABLE,
            "another upload is in progress",
        ),
    }
}

fn created(base: &str, s: &Session) -> Resp {
    let mut r = tus_reply(StatusCode::CREATED, "");
    set(
        &mut r,
        "location",
        format!("{}/{}", base.trim_end_matches('/'), s.id),
    );
    set(&mut r, "upload-offset", s.offset().to_string());
    r
}

/// The `checksum` metadata: `algorithm:hex` digests checked at the end, or bare
/// algorithm names whose digests the last PATCH brings (`X-Checksum`); and the hashers
/// for all of them.
fn parse_checksums(v: &str) -> Result<(Vec<Checksum>, Vec<String>, Digests), ChecksumError> {
    let mut wants = Vec::new();
    let mut algorithms = Vec::new();
    for part in v.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        if part.contains(':') {
            wants.push(Checksum::parse(part)?);
        } else {
            algorithms.push(part.to_ascii_lowercase());
        }
    }
    let wants = Checksum::one_per_algorithm(wants)?;
    let digests = session::hashers(&wants, &algorithms)?;
    Ok((wants, algorithms, digests))
}

async fn patch(server: &Arc<Server>, id: &str, req: Request<Incoming>) -> Resp {
    let h = req.headers();
    let content_type = header(h, "content-type").unwrap_or("");
    if !content_type
        .trim()
        .eq_ignore_ascii_case(tus::PATCH_CONTENT_TYPE)
    {
        linger(req);
        return tus_reply(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            format!("a PATCH's Content-Type is {}", tus::PATCH_CONTENT_TYPE),
        );
    }
    let at = match tus::parse_u64("Upload-Offset", header(h, "upload-offset")) {
        Ok(n) => n,
        Err(e) => {
            linger(req);
            return tus_reply(StatusCode::BAD_REQUEST, e.to_string());
        }
    };
    let checksum = match header(h, "upload-checksum").map(tus::parse_checksum) {
        None => None,
        Some(Ok(c)) => Some(c.as_checksum()),
        Some(Err(e)) => {
            linger(req);
            return tus_reply(StatusCode::BAD_REQUEST, e.to_string());
        }
    };
    let finals = match h
        .get_all("x-checksum")
        .iter()
        .map(|v| {
            v.to_str()
                .map_err(|_| "X-Checksum is not ASCII".to_string())
                .and_then(|v| Checksum::parse_list(v).map_err(|e| e.to_string()))
        })
        .collect::<Result<Vec<_>, _>>()
    {
        Ok(v) => v.into_iter().flatten().collect::<Vec<_>>(),
        Err(e) => {
            linger(req);
            return tus_reply(StatusCode::BAD_REQUEST, e);
        }
    };
    let session = match server.resumable.find(id) {
        Ok(s) => s,
        Err(why) => {
            linger(req);
            return missing(id, why);
        }
    };
    let declared = header(h, "content-length").and_then(|v| v.parse::<u64>().ok());
    // (At another offset than the upload's, the answer is 409 whatever the length.)
    if at == session.offset() && declared.is_some_and(|n| at.saturating_add(n) > session.length) {
        linger(req);
        return tus_reply(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!(
                "the body would go past Upload-Length ({} bytes)",
                session.length
            ),
        );
    }
    match session
        .patch(server, at, checksum, finals, req.into_body())
        .await
    {
        Patched::Taken(n) => offset_reply(StatusCode::NO_CONTENT, n),
        Patched::Complete => offset_reply(StatusCode::NO_CONTENT, session.length),
        Patched::Conflict { at: now } => {
            let mut r = tus_reply(
                StatusCode::CONFLICT,
                format!("Upload-Offset is {at} but the upload is at {now}"),
            );
            set(&mut r, "upload-offset", now.to_string());
            r
        }
        Patched::Superseded => tus_reply(
            StatusCode::CONFLICT,
            "a newer request took this upload over",
        ),
        Patched::PastLength { at } => {
            let mut r = tus_reply(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!(
                    "the body went past Upload-Length ({} bytes); the bytes up to it were taken",
                    session.length
                ),
            );
            set(&mut r, "upload-offset", at.to_string());
            r
        }
        Patched::ChecksumBodyTooLarge => tus_reply(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!(
                "a PATCH with Upload-Checksum carries at most {} bytes (it is held until checked): send smaller pieces",
                session::MAX_CHECKSUMMED
            ),
        ),
        Patched::ChecksumMismatch => tus_reply(
            StatusCode::from_u16(tus::CHECKSUM_MISMATCH).unwrap_or(StatusCode::BAD_REQUEST),
            "Upload-Checksum does not match the body; nothing was taken",
        ),
        Patched::Ended => tus_reply(StatusCode::GONE, "the upload has ended"),
        Patched::ClientFailed { at, why } => {
            let mut r = tus_reply(StatusCode::BAD_REQUEST, format!("the body broke off: {why}"));
            set(&mut r, "upload-offset", at.to_string());
            r
        }
        Patched::Failed(f) => {
            let mut r = failure_response(&f);
            set(&mut r, "tus-resumable", tus::VERSION.into());
            r
        }
    }
}

fn options() -> Resp {
    let mut r = tus_reply(StatusCode::NO_CONTENT, "");
    set(&mut r, "tus-version", tus::VERSION.into());
    set(&mut r, "tus-extension", tus::EXTENSIONS.into());
    set(
        &mut r,
        "tus-checksum-algorithm",
        tus::CHECKSUM_ALGORITHMS.into(),
    );
    r
}

/// 412 for a client that speaks another version of tus.
fn wrong_version(h: &HeaderMap) -> Option<Resp> {
    match header(h, "tus-resumable") {
        Some(tus::VERSION) => None,
        other => {
            let mut r = tus_reply(
                StatusCode::PRECONDITION_FAILED,
                format!(
                    "Tus-Resumable must be {} (got {:?})",
                    tus::VERSION,
                    other.unwrap_or("nothing")
                ),
            );
            set(&mut r, "tus-version", tus::VERSION.into());
            Some(r)
        }
    }
}

/// 404 for an id never seen; 410 and the reason for one that ended.
fn missing(id: &str, why: Option<String>) -> Resp {
    match why {
        Some(why) => tus_reply(StatusCode::GONE, format!("upload {id} has ended: {why}")),
        None => tus_reply(
            StatusCode::NOT_FOUND,
            format!("no upload {id} here (an upload server that restarted resumes only a raw image on a filesystem volume): start the upload again"),
        ),
    }
}

fn offset_reply(status: StatusCode, offset: u64) -> Resp {
    let mut r = tus_reply(status, "");
    set(&mut r, "upload-offset", offset.to_string());
    r
}

fn tus_reply(status: StatusCode, body: impl Into<Bytes>) -> Resp {
    let mut r = Response::new(Full::new(body.into()));
    *r.status_mut() = status;
    set(&mut r, "tus-resumable", tus::VERSION.into());
    r
}

fn set(r: &mut Resp, name: &'static str, value: String) {
    if let Ok(v) = hyper::header::HeaderValue::from_str(&value) {
        r.headers_mut().insert(name, v);
    }
}

fn header<'a>(h: &'a HeaderMap, name: &str) -> Option<&'a str> {
    h.get(name).and_then(|v| v.to_str().ok())
}

fn linger(req: Request<Incoming>) {
    ferrydisk_common::serve::linger::body(req.into_body());
}

/// 32 hex digits from the kernel's random source (a clock-and-pid mix without one).
fn new_id() -> String {
    use std::io::Read;
    let mut b = [0u8; 16];
    let random = std::fs::File::open("/dev/urandom").and_then(|mut f| f.read_exact(&mut b));
    if random.is_err() {
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        b = (t ^ (u128::from(std::process::id()) << 64)).to_le_bytes();
    }
    hex::encode(b)
}
