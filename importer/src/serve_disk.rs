//! `importer serve-disk` (also started as `cdi-containerimage-server`): CDI's
//! containerimage-server for `pullMethod: node` (docs/cdi-contract.md section 3). It runs inside the
//! user's containerDisk container, so its own environment *is* the image's ENV, served at
//! `/info` for labels; the one file in `/disk` is served on loopback with Range support.

use crate::cli::ServeArgs;
use bytes::Bytes;
use http_body_util::{combinators::BoxBody, BodyExt, Full, StreamBody};
use hyper::body::Frame;
use hyper::{Method, Request, Response, StatusCode};
use std::convert::Infallible;
use std::io::SeekFrom;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncSeekExt};

/// The single regular file in `dir`; anything else is CDI's "Invalid container image".
/// A symlink is refused: it could point anywhere in the container.
fn disk_file(dir: &Path) -> Result<PathBuf, String> {
    let entries: Vec<_> = std::fs::read_dir(dir)
        .map_err(|e| format!("Invalid container image: {}: {e}", dir.display()))?
        .filter_map(Result::ok)
        .collect();
    for e in &entries {
        println!("{}", e.path().display());
    }
    match entries.as_slice() {
        [one] => {
            let t = one.file_type().map_err(|e| e.to_string())?;
            if t.is_file() {
                Ok(one.path())
            } else {
                Err(format!(
                    "Invalid container image: {} is not a regular file",
                    one.path().display()
                ))
            }
        }
        _ => Err(format!(
            "Invalid container image: {} must hold exactly one file, it holds {}",
            dir.display(),
            entries.len()
        )),
    }
}

pub async fn run(args: ServeArgs) -> i32 {
    for d in ["sysroot", "ostree"] {
        if args.root.join(d).is_dir() {
            tracing::error!(
                "bootc image detected: /{d} exists; bootable container images are not VM disks"
            );
            return 1;
        }
    }
    let disk = match disk_file(&args.image_dir) {
        Ok(d) => d,
        Err(e) => {
            tracing::error!(error = %e, "cannot serve the disk");
            eprintln!("{e}");
            return 1;
        }
    };
    let name = disk
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let listener = match tokio::net::TcpListener::bind(("127.0.0.1", args.port)).await {
        Ok(l) => l,
        Err(e) => {
            tracing::error!(port = args.port, error = %e, "cannot listen");
            return 1;
        }
    };
    // CDI writes the ready file with the disk's name once the listener is bound.
    use std::os::unix::fs::OpenOptionsExt;
    if let Err(e) = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&args.ready_file)
        .and_then(|mut f| std::io::Write::write_all(&mut f, name.as_bytes()))
    {
        tracing::error!(file = %args.ready_file.display(), error = %e, "cannot write the ready file");
        return 1;
    }
    tracing::info!(disk = %disk.display(), port = args.port, "serving the disk");
    let disk = Arc::new(disk);
    let name: Arc<str> = name.into();
    let mut listener = ferrydisk_common::serve::listen::GuardedListener::new(listener, 64);
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        tokio::select! {
            (tcp, permit) = listener.accept() => {
                let (disk, name) = (disk.clone(), name.clone());
                let svc = hyper::service::service_fn(move |req| serve(disk.clone(), name.clone(), req));
                let conn = hyper::server::conn::http1::Builder::new()
                    .timer(hyper_util::rt::TokioTimer::new())
                    .header_read_timeout(ferrydisk_common::serve::listen::header_timeout())
                    .serve_connection(hyper_util::rt::TokioIo::new(tcp), svc);
                let watcher = graceful.watcher();
                tokio::spawn(async move { let _permit = permit; let _ = watcher.watch(conn).await; });
            }
            _ = tick.tick() => {
                if args.done_file.exists() {
                    let _ = std::fs::remove_file(&args.done_file);
                    break;
                }
            }
        }
    }
    drop(listener);
    let _ = tokio::time::timeout(Duration::from_secs(10), graceful.shutdown()).await;
    let _ = std::fs::remove_file(&args.ready_file);
    tracing::info!("Importer has completed");
    0
}

type Body = BoxBody<Bytes, std::io::Error>;

fn small(status: StatusCode, body: impl Into<Bytes>) -> Response<Body> {
    let mut r = Response::new(
        Full::new(body.into())
            .map_err(|never: Infallible| match never {})
            .boxed(),
    );
    *r.status_mut() = status;
    r
}

/// `bytes=a-b`, `bytes=a-`, `bytes=-n` within `len` -> (start, end exclusive).
fn parse_range(v: &str, len: u64) -> Option<(u64, u64)> {
    let spec = v.strip_prefix("bytes=")?;
    if spec.contains(',') {
        return None; // one range only
    }
    let (a, b) = spec.split_once('-')?;
    let (start, end) = match (a.trim(), b.trim()) {
        ("", n) => {
            let n: u64 = n.parse().ok()?;
            (len.saturating_sub(n), len)
        }
        (s, "") => (s.parse().ok()?, len),
        (s, e) => (
            s.parse().ok()?,
            e.parse::<u64>().ok()?.saturating_add(1).min(len),
        ),
    };
    (start < end && start < len).then_some((start, end))
}

async fn serve(
    disk: Arc<PathBuf>,
    name: Arc<str>,
    req: Request<hyper::body::Incoming>,
) -> Result<Response<Body>, Infallible> {
    let path = req.uri().path();
    if path == "/info" {
        // The server's environment is the containerDisk's ENV (plus what the pod adds).
        let env: Vec<String> = std::env::vars().map(|(k, v)| format!("{k}={v}")).collect();
        let mut r = small(
            StatusCode::OK,
            serde_json::json!({ "env": env }).to_string(),
        );
        r.headers_mut().insert(
            "content-type",
            hyper::header::HeaderValue::from_static("application/json"),
        );
        return Ok(r);
    }
    if path.trim_start_matches('/') != &*name
        || !(req.method() == Method::GET || req.method() == Method::HEAD)
    {
        return Ok(small(StatusCode::NOT_FOUND, "404 page not found\n"));
    }
    let mut file = match tokio::fs::File::open(&*disk).await {
        Ok(f) => f,
        Err(e) => return Ok(small(StatusCode::INTERNAL_SERVER_ERROR, e.to_string())),
    };
    let len = file.metadata().await.map(|m| m.len()).unwrap_or(0);
    let range = req
        .headers()
        .get(hyper::header::RANGE)
        .and_then(|v| v.to_str().ok())
        .map(|v| parse_range(v, len));
    let (status, start, end) = match range {
        None => (StatusCode::OK, 0, len),
        Some(Some((s, e))) => (StatusCode::PARTIAL_CONTENT, s, e),
        Some(None) => {
            let mut r = small(StatusCode::RANGE_NOT_SATISFIABLE, "");
            r.headers_mut().insert(
                "content-range",
                format!("bytes */{len}").parse().expect("header"),
            );
            return Ok(r);
        }
    };
    let body: Body = if req.method() == Method::HEAD || start == end {
        Full::new(Bytes::new())
            .map_err(|never: Infallible| match never {})
            .boxed()
    } else {
        if let Err(e) = file.seek(SeekFrom::Start(start)).await {
            return Ok(small(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()));
        }
        let stream =
            futures_util::stream::unfold((file, end - start), |(mut f, left)| async move {
                if left == 0 {
                    return None;
                }
                let mut buf = vec![0u8; (left as usize).min(1 << 20)];
                match f.read(&mut buf).await {
                    Ok(0) => None,
                    Ok(n) => {
                        buf.truncate(n);
                        Some((Ok(Frame::data(Bytes::from(buf))), (f, left - n as u64)))
                    }
                    Err(e) => Some((Err(e), (f, 0))),
                }
            });
        StreamBody::new(stream).boxed()
    };
    let mut r = Response::new(body);
    *r.status_mut() = status;
    let h = r.headers_mut();
    h.insert("accept-ranges", "bytes".parse().expect("header"));
    h.insert(
        "content-length",
        (end - start).to_string().parse().expect("header"),
    );
    if status == StatusCode::PARTIAL_CONTENT {
        h.insert(
            "content-range",
            format!("bytes {start}-{}/{len}", end - 1)
                .parse()
                .expect("header"),
        );
    }
    Ok(r)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges() {
        assert_eq!(parse_range("bytes=0-", 10), Some((0, 10)));
        assert_eq!(parse_range("bytes=2-4", 10), Some((2, 5)));
        assert_eq!(parse_range("bytes=-3", 10), Some((7, 10)));
        assert_eq!(parse_range("bytes=5-100", 10), Some((5, 10)));
        assert_eq!(parse_range("bytes=10-", 10), None);
        assert_eq!(parse_range("bytes=0-1,3-4", 10), None);
    }

    #[test]
    fn exactly_one_regular_file() {
        let d = tempfile::tempdir().expect("tmp");
        assert!(disk_file(d.path()).is_err());
        std::fs::write(d.path().join("disk.qcow2"), b"x").expect("write");
        assert_eq!(
            disk_file(d.path()).expect("one"),
            d.path().join("disk.qcow2")
        );
        std::os::unix::fs::symlink("/etc/shadow", d.path().join("other")).expect("link");
        assert!(disk_file(d.path())
            .expect_err("two")
            .contains("exactly one"));
        std::fs::remove_file(d.path().join("disk.qcow2")).expect("rm");
        assert!(disk_file(d.path())
            .expect_err("symlink")
            .contains("not a regular file"));
    }
}
