//! The answers: `GET|HEAD /<disk name>` with one `Range`, `/info` with the environment,
//! 404 for anything else.

use bytes::Bytes;
use http_body_util::{combinators::BoxBody, BodyExt, Full, StreamBody};
use hyper::body::Frame;
use hyper::header::{HeaderValue, CONTENT_LENGTH, CONTENT_RANGE, CONTENT_TYPE, RANGE};
use hyper::{Method, Request, Response, StatusCode};
use std::convert::Infallible;
use std::io::SeekFrom;
use std::path::PathBuf;
use std::sync::Arc;
use tokio::io::{AsyncReadExt, AsyncSeekExt};

/// Bytes per body frame: small, so a served disk costs little memory.
const FRAME: u64 = 256 << 10;

/// What the server serves.
pub struct Served {
    pub path: PathBuf,
    /// The disk file's name: the one path served.
    pub name: String,
    /// The container's environment (the image's ENV), `KEY=VALUE`.
    pub env: Vec<String>,
}

pub type Body = BoxBody<Bytes, std::io::Error>;

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
pub fn parse_range(v: &str, len: u64) -> Option<(u64, u64)> {
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

/// `{"env":[...]}` with JSON string escaping.
pub fn env_json(env: &[String]) -> String {
    let mut out = String::from("{\"env\":[");
    for (i, kv) in env.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        out.push('"');
        for c in kv.chars() {
            match c {
                '"' => out.push_str("\\\""),
                '\\' => out.push_str("\\\\"),
                '\n' => out.push_str("\\n"),
                '\r' => out.push_str("\\r"),
                '\t' => out.push_str("\\t"),
                c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
                c => out.push(c),
            }
        }
        out.push('"');
    }
    out.push_str("]}");
    out
}

pub async fn serve(
    served: Arc<Served>,
    req: Request<hyper::body::Incoming>,
) -> Result<Response<Body>, Infallible> {
    let path = req.uri().path();
    if path == "/info" {
        let mut r = small(StatusCode::OK, env_json(&served.env));
        r.headers_mut()
            .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
        return Ok(r);
    }
    if path.trim_start_matches('/') != served.name
        || !(req.method() == Method::GET || req.method() == Method::HEAD)
    {
        return Ok(small(StatusCode::NOT_FOUND, "404 page not found\n"));
    }
    Ok(match disk(&served, &req).await {
        Ok(r) => r,
        Err(e) => small(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    })
}

async fn disk(
    served: &Served,
    req: &Request<hyper::body::Incoming>,
) -> std::io::Result<Response<Body>> {
    let mut file = tokio::fs::File::open(&served.path).await?;
    let len = file.metadata().await?.len();
    let range = req
        .headers()
        .get(RANGE)
        .and_then(|v| v.to_str().ok())
        .map(|v| parse_range(v, len));
    let (status, start, end) = match range {
        None => (StatusCode::OK, 0, len),
        Some(Some((s, e))) => (StatusCode::PARTIAL_CONTENT, s, e),
        Some(None) => {
            let mut r = small(StatusCode::RANGE_NOT_SATISFIABLE, "");
            r.headers_mut()
                .insert(CONTENT_RANGE, header(format!("bytes */{len}")));
            return Ok(r);
        }
    };
    let body: Body = if req.method() == Method::HEAD || start == end {
        Full::new(Bytes::new())
            .map_err(|never: Infallible| match never {})
            .boxed()
    } else {
        file.seek(SeekFrom::Start(start)).await?;
        let stream =
            futures_util::stream::unfold((file, end - start), |(mut f, left)| async move {
                if left == 0 {
                    return None;
                }
                let mut buf = vec![0u8; usize::try_from(left.min(FRAME)).unwrap_or(0)];
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
    h.insert("accept-ranges", HeaderValue::from_static("bytes"));
    h.insert(CONTENT_LENGTH, header((end - start).to_string()));
    if status == StatusCode::PARTIAL_CONTENT {
        h.insert(
            CONTENT_RANGE,
            header(format!("bytes {start}-{}/{len}", end - 1)),
        );
    }
    Ok(r)
}

/// A header value from text that is always visible ASCII (numbers, `bytes`, `/`, `-`).
fn header(s: String) -> HeaderValue {
    HeaderValue::from_str(&s).unwrap_or(HeaderValue::from_static(""))
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
    fn env_is_json() {
        assert_eq!(
            env_json(&["A=1".into(), "B=\"x\"\\\n".into()]),
            r#"{"env":["A=1","B=\"x\"\\\n"]}"#
        );
    }
}
