//! The resumable upload (tus 1.0, docs/upload.md): create (or take up again, by the
//! digest of the file's first MiB), then PATCH what the server lacks; after a drop,
//! ask the server where it is (HEAD) and go on from there. The last MiB goes in a
//! PATCH of its own that carries the whole file's sha256, computed while sending.

use super::digest::Ledger;
use super::meter::Meter;
use super::{answer_text, backoff, Summary, UploadError};
use crate::config::UploaderConfig;
use bytes::Bytes;
use ferrydisk_common::tus;
use reqwest::StatusCode;
use std::io::Read;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The last bytes, sent with the whole file's digest.
const TAIL: u64 = 1 << 20;
/// Bytes per read of the file into a request.
const CHUNK: usize = 1 << 20;

/// One attempt's outcome when it did not complete the upload.
enum Attempt {
    /// The server has this many bytes; go on.
    Moved(u64),
    /// Try again after asking the server where it is.
    Retry(String),
    /// The server does not know the upload (it restarted with nothing saved): create
    /// it again.
    Lost(String),
    Fatal(UploadError),
}

pub async fn upload(
    client: &reqwest::Client,
    create_url: &str,
    c: &UploaderConfig,
    len: u64,
    meter: &Meter,
) -> Result<Summary, UploadError> {
    let file_err = |e: std::io::Error| UploadError::File(format!("{}: {e}", c.file.display()));
    let mut file = std::fs::File::open(&c.file).map_err(file_err)?;
    let head = head_digest(&mut file, len).map_err(file_err)?;
    let ledger = Arc::new(Mutex::new(Ledger::default()));
    let mut failures = 0u32;
    let (mut url, mut offset) = loop {
        match create(client, create_url, c, len, &head).await {
            Ok(v) => break v,
            Err(Attempt::Fatal(e)) => return Err(e),
            Err(other) => {
                failures += 1;
                give_up(failures, c, other.why())?;
                backoff(failures).await;
            }
        }
    };
    if offset > 0 {
        meter.resumes.fetch_add(1, Relaxed);
        meter.note(
            "the server had this upload",
            &format!("going on from byte {offset}"),
        );
    }
    loop {
        if c.checksum {
            lock(&ledger).rewind(offset, &mut file).map_err(file_err)?;
        }
        meter.set(offset);
        if offset >= len && len > 0 {
            return Ok(Summary {
                protocol: "resumable",
                verified: c.checksum,
            });
        }
        let attempt = patch(client, &url, c, offset, len, &ledger, meter).await;
        let why = match attempt {
            Attempt::Moved(n) if n >= len => {
                meter.set(len);
                return Ok(Summary {
                    protocol: "resumable",
                    verified: c.checksum,
                });
            }
            Attempt::Moved(n) => {
                if n > offset {
                    failures = 0;
                }
                offset = n;
                continue;
            }
            Attempt::Fatal(e) => return Err(e),
            Attempt::Retry(why) => why,
            Attempt::Lost(why) => {
                meter.note("the server lost the upload; starting it again", &why);
                failures += 1;
                give_up(failures, c, why)?;
                backoff(failures).await;
                match create(client, create_url, c, len, &head).await {
                    Ok((u, o)) => {
                        (url, offset) = (u, o);
                        continue;
                    }
                    Err(Attempt::Fatal(e)) => return Err(e),
                    Err(_) => continue,
                }
            }
        };
        failures += 1;
        give_up(failures, c, why.clone())?;
        meter.note("the upload broke off; asking the server where it is", &why);
        backoff(failures).await;
        match head_offset(client, &url, c).await {
            Ok(n) => {
                if n > offset {
                    failures = 0;
                }
                offset = n;
                meter.resumes.fetch_add(1, Relaxed);
            }
            Err(Attempt::Fatal(e)) => return Err(e),
            Err(Attempt::Lost(why)) => {
                meter.note("the server lost the upload; starting it again", &why);
                if let Ok((u, o)) = create(client, create_url, c, len, &head).await {
                    (url, offset) = (u, o);
                }
            }
            Err(_) => {}
        }
    }
}

impl Attempt {
    fn why(self) -> String {
        match self {
            Attempt::Retry(why) | Attempt::Lost(why) => why,
            Attempt::Moved(n) => format!("the server is at byte {n}"),
            Attempt::Fatal(e) => e.to_string(),
        }
    }
}

fn give_up(failures: u32, c: &UploaderConfig, last: String) -> Result<(), UploadError> {
    if failures > c.retries {
        return Err(UploadError::GaveUp {
            attempts: failures,
            last,
        });
    }
    Ok(())
}

fn lock(l: &Mutex<Ledger>) -> std::sync::MutexGuard<'_, Ledger> {
    l.lock().unwrap_or_else(|e| e.into_inner())
}

/// `sha256:<hex>` of the file's first MiB (or all of a smaller file).
fn head_digest(f: &mut std::fs::File, len: u64) -> std::io::Result<String> {
    let mut buf = vec![0u8; tus::HEAD_LEN.min(len) as usize];
    f.read_exact(&mut buf)?;
    Ok(ferrydisk_common::checksum::sha256_digest(&buf))
}

/// `POST`: the upload's URL and the offset the server has (0 for a new upload).
async fn create(
    client: &reqwest::Client,
    create_url: &str,
    c: &UploaderConfig,
    len: u64,
    head: &str,
) -> Result<(String, u64), Attempt> {
    let name = c
        .file
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let mut meta = vec![("filename", name.as_str()), ("head", head)];
    if c.checksum {
        meta.push(("checksum", "sha256"));
    }
    let r = client
        .post(create_url)
        .bearer_auth(&c.token)
        .header("tus-resumable", tus::VERSION)
        .header("upload-length", len)
        .header("upload-metadata", tus::encode_metadata(&meta))
        .timeout(Duration::from_secs(60))
        .send()
        .await
        .map_err(|e| Attempt::Retry(ferrydisk_common::error::chain_line(&e)))?;
    match r.status() {
        StatusCode::CREATED => {
            let location = r
                .headers()
                .get("location")
                .and_then(|v| v.to_str().ok())
                .ok_or_else(|| fatal(201, "no Location in the answer".into()))?;
            let url = reqwest::Url::parse(create_url)
                .and_then(|base| base.join(location))
                .map_err(|e| fatal(201, format!("Location {location:?}: {e}")))?;
            // The upload's URL must stay with the proxy the token was given to.
            let base = reqwest::Url::parse(create_url).map_err(|e| fatal(0, e.to_string()))?;
            if url.origin() != base.origin() {
                return Err(fatal(201, format!("Location {url} is another server")));
            }
            let offset = offset_of(&r).unwrap_or(0);
            Ok((url.to_string(), offset))
        }
        StatusCode::NOT_FOUND | StatusCode::METHOD_NOT_ALLOWED => {
            Err(Attempt::Fatal(UploadError::NotOffered))
        }
        s if s.is_server_error() || s == StatusCode::TOO_MANY_REQUESTS => Err(Attempt::Retry(
            format!("{}: {}", s.as_u16(), answer_text(r).await),
        )),
        s => Err(fatal(s.as_u16(), answer_text(r).await)),
    }
}

fn fatal(status: u16, message: String) -> Attempt {
    Attempt::Fatal(UploadError::Refused { status, message })
}

fn offset_of(r: &reqwest::Response) -> Option<u64> {
    r.headers()
        .get("upload-offset")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| tus::parse_u64("Upload-Offset", Some(v)).ok())
}

/// `HEAD`: where the server is.
async fn head_offset(
    client: &reqwest::Client,
    url: &str,
    c: &UploaderConfig,
) -> Result<u64, Attempt> {
    let r = client
        .head(url)
        .bearer_auth(&c.token)
        .header("tus-resumable", tus::VERSION)
        .timeout(Duration::from_secs(60))
        .send()
        .await
        .map_err(|e| Attempt::Retry(ferrydisk_common::error::chain_line(&e)))?;
    match r.status() {
        StatusCode::OK => offset_of(&r).ok_or_else(|| Attempt::Retry("no Upload-Offset".into())),
        StatusCode::NOT_FOUND => Err(Attempt::Lost(answer_text(r).await)),
        s if s.is_server_error() => Err(Attempt::Retry(format!(
            "{}: {}",
            s.as_u16(),
            answer_text(r).await
        ))),
        s => Err(fatal(s.as_u16(), answer_text(r).await)),
    }
}

/// One `PATCH` from `offset`: up to the last MiB, or (from there) the rest with the
/// whole file's digest.
async fn patch(
    client: &reqwest::Client,
    url: &str,
    c: &UploaderConfig,
    offset: u64,
    len: u64,
    ledger: &Arc<Mutex<Ledger>>,
    meter: &Meter,
) -> Attempt {
    let tail = if c.checksum {
        len.saturating_sub(TAIL)
    } else {
        len
    };
    let last = offset >= tail;
    let to = if last { len } else { tail };
    let sent = Arc::new(AtomicU64::new(0));
    let mut req = client
        .patch(url)
        .bearer_auth(&c.token)
        .header("tus-resumable", tus::VERSION)
        .header("upload-offset", offset)
        .header(reqwest::header::CONTENT_TYPE, tus::PATCH_CONTENT_TYPE)
        .header(reqwest::header::CONTENT_LENGTH, to - offset);
    if last && c.checksum {
        // The tail is read and hashed now: the digest goes in this request's headers.
        let mut buf = vec![0u8; (to - offset) as usize];
        let read = std::fs::File::open(&c.file).and_then(|mut f| {
            use std::io::{Seek, SeekFrom};
            f.seek(SeekFrom::Start(offset))?;
            f.read_exact(&mut buf)
        });
        if let Err(e) = read {
            return Attempt::Fatal(UploadError::File(format!("{}: {e}", c.file.display())));
        }
        let digest = {
            let mut l = lock(ledger);
            l.update(offset, &buf);
            l.digest()
        };
        sent.store(buf.len() as u64, Relaxed);
        req = req.header("x-checksum", digest).body(buf);
    } else {
        let ledger = c.checksum.then(|| ledger.clone());
        match file_body(&c.file, offset, to, sent.clone(), ledger) {
            Ok(b) => req = req.body(b),
            Err(e) => {
                return Attempt::Fatal(UploadError::File(format!("{}: {e}", c.file.display())))
            }
        }
    }
    let watch = progress_watch(&sent, offset, to - offset, meter, c.idle);
    let result = tokio::select! {
        r = req.send() => r.map_err(|e| ferrydisk_common::error::chain_line(&e)),
        why = watch => Err(why),
    };
    let r = match result {
        Ok(r) => r,
        Err(why) => return Attempt::Retry(why),
    };
    match r.status() {
        StatusCode::NO_CONTENT | StatusCode::OK => match offset_of(&r) {
            Some(n) => Attempt::Moved(n),
            None => Attempt::Retry("no Upload-Offset in the answer".into()),
        },
        StatusCode::CONFLICT | StatusCode::LOCKED | StatusCode::REQUEST_TIMEOUT => {
            Attempt::Retry(format!("{}: {}", r.status().as_u16(), answer_text(r).await))
        }
        StatusCode::NOT_FOUND => Attempt::Lost(answer_text(r).await),
        s if s.is_server_error() || s == StatusCode::TOO_MANY_REQUESTS => {
            Attempt::Retry(format!("{}: {}", s.as_u16(), answer_text(r).await))
        }
        s => {
            let message = answer_text(r).await;
            // The answer to a completing PATCH was lost and a later one finds it done.
            if s == StatusCode::GONE && message.ends_with("the upload is complete") {
                return Attempt::Moved(len);
            }
            Attempt::Fatal(UploadError::Refused {
                status: s.as_u16(),
                message,
            })
        }
    }
}

/// `[from, to)` of the file as a request body, read a MiB at a time, hashed into
/// `ledger` and counted into `sent` as it goes.
pub fn file_body(
    path: &std::path::Path,
    from: u64,
    to: u64,
    sent: Arc<AtomicU64>,
    ledger: Option<Arc<Mutex<Ledger>>>,
) -> std::io::Result<reqwest::Body> {
    use std::io::{Seek, SeekFrom};
    let mut f = std::fs::File::open(path)?;
    f.seek(SeekFrom::Start(from))?;
    let f = Arc::new(Mutex::new(f));
    let stream = futures_util::stream::unfold(from, move |at| {
        let (f, sent, ledger) = (f.clone(), sent.clone(), ledger.clone());
        async move {
            if at >= to {
                return None;
            }
            let want = CHUNK.min((to - at) as usize);
            let read = tokio::task::spawn_blocking(move || {
                let mut buf = vec![0u8; want];
                let mut f = f.lock().unwrap_or_else(|e| e.into_inner());
                f.read_exact(&mut buf).map(|()| buf)
            })
            .await
            .unwrap_or_else(|e| Err(std::io::Error::other(e)));
            match read {
                Ok(buf) => {
                    if let Some(l) = &ledger {
                        lock(l).update(at, &buf);
                    }
                    sent.fetch_add(buf.len() as u64, Relaxed);
                    Some((
                        Ok::<Bytes, std::io::Error>(Bytes::from(buf)),
                        at + want as u64,
                    ))
                }
                Err(e) => Some((Err(e), to)),
            }
        }
    });
    Ok(reqwest::Body::wrap_stream(stream))
}

/// Shows the bytes sent from `base` on the meter; resolves (the attempt failed) when
/// nothing was taken for `idle` while the body (`total` bytes) was still being sent.
/// Once it is all sent, the server's answer may take as long as finishing the disk.
pub async fn progress_watch(
    sent: &AtomicU64,
    base: u64,
    total: u64,
    meter: &Meter,
    idle: Duration,
) -> String {
    let mut last = (sent.load(Relaxed), Instant::now());
    loop {
        tokio::time::sleep(Duration::from_millis(200)).await;
        let now = sent.load(Relaxed);
        meter.set(base + now);
        if now != last.0 || now >= total {
            last = (now, Instant::now());
        } else if last.1.elapsed() > idle {
            return format!("no byte taken for {} s", idle.as_secs());
        }
    }
}
