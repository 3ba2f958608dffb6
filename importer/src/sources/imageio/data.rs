//! The image data side of a transfer: ovirt-imageio's `OPTIONS` (features), `GET
//! .../extents` (which runs of a raw download are zeros) and ranged `GET`s of the data
//! extents, each bounded, each with a timeout, a broken range asked for again from
//! where it broke.

use crate::disk::Extent;
use crate::net::body::{self, Bound};
use reqwest::{Client, Method, StatusCode};
use std::io::{self, Read};
use std::time::Duration;

/// `/extents` of a 16 TiB disk fragmented into 1 MiB runs is under 1 GiB of JSON; a
/// list larger than this is refused.
const EXTENTS_MAX: u64 = 256 << 20;

/// Why the transfer's data could not be described.
#[derive(Debug, thiserror::Error)]
pub enum DataError {
    #[error("{what}: {detail}")]
    Request { what: &'static str, detail: String },
    #[error("{what}: imageio answered {status}: {detail}")]
    Status {
        what: &'static str,
        status: StatusCode,
        detail: String,
    },
    #[error("the image's extents do not cover it: {0}")]
    Extents(String),
}

async fn get_json(
    client: &Client,
    method: Method,
    url: &str,
    bound: u64,
    idle: Duration,
    what: &'static str,
) -> Result<serde_json::Value, DataError> {
    let resp = client
        .request(method, url)
        .timeout(idle)
        .send()
        .await
        .map_err(|e| DataError::Request {
            what,
            detail: crate::net::describe(&e).1,
        })?;
    let status = resp.status();
    if !status.is_success() {
        let detail = body::error_text(resp).await;
        return Err(DataError::Status {
            what,
            status,
            detail,
        });
    }
    let bytes = body::read(resp, Bound::AtMost(bound), idle, what)
        .await
        .map_err(|e| DataError::Request {
            what,
            detail: e.to_string(),
        })?;
    serde_json::from_slice(&bytes).map_err(|e| DataError::Request {
        what,
        detail: format!("not JSON: {e}"),
    })
}

/// The features the transfer URL offers (`extents`, `zero`, ...); none when it does not
/// say (an old daemon, a proxy).
pub async fn features(client: &Client, url: &str, idle: Duration) -> Vec<String> {
    match get_json(
        client,
        Method::OPTIONS,
        url,
        body::TOKEN_MAX,
        idle,
        "the transfer's OPTIONS",
    )
    .await
    {
        Ok(v) => v
            .get("features")
            .and_then(|f| f.as_array())
            .map(|a| {
                a.iter()
                    .filter_map(|x| x.as_str().map(str::to_string))
                    .collect()
            })
            .unwrap_or_default(),
        Err(e) => {
            tracing::info!(error = %e, "the transfer URL does not say its features; downloading the whole image");
            Vec::new()
        }
    }
}

/// The image's runs, checked to cover `[0, size)` in order with no gap or overlap.
pub async fn extents(
    client: &Client,
    url: &str,
    idle: Duration,
) -> Result<(u64, Vec<Extent>), DataError> {
    let v = get_json(
        client,
        Method::GET,
        &format!("{url}/extents"),
        EXTENTS_MAX,
        idle,
        "the image's extents",
    )
    .await?;
    let list = v
        .as_array()
        .ok_or_else(|| DataError::Extents("not a list".into()))?;
    let mut out: Vec<Extent> = Vec::with_capacity(list.len());
    let mut end = 0u64;
    for e in list {
        let field = |k: &str| e.get(k).and_then(serde_json::Value::as_u64);
        let (Some(start), Some(length)) = (field("start"), field("length")) else {
            return Err(DataError::Extents(format!(
                "an extent without start and length: {e}"
            )));
        };
        if start != end || length == 0 {
            return Err(DataError::Extents(format!(
                "an extent at {start} (+{length}) where {end} was expected"
            )));
        }
        end = start
            .checked_add(length)
            .ok_or_else(|| DataError::Extents(format!("an extent at {start} of {length} bytes")))?;
        let zero = e
            .get("zero")
            .and_then(serde_json::Value::as_bool)
            .unwrap_or(false);
        match out.last_mut() {
            // Runs of the same kind are read (or skipped) as one.
            Some(last) if last.zero == zero => last.length += length,
            _ => out.push(Extent {
                start,
                length,
                zero,
            }),
        }
    }
    Ok((end, out))
}

/// Reads `[start, start + length)` of the transfer URL on a blocking thread, asking for
/// the rest again (up to `retries` times) when a response breaks off.
pub struct RangeReader {
    client: Client,
    url: String,
    idle: Duration,
    rt: tokio::runtime::Handle,
    at: u64,
    end: u64,
    retries: u32,
    resp: Option<reqwest::Response>,
    chunk: bytes::Bytes,
}

impl RangeReader {
    pub fn new(
        rt: tokio::runtime::Handle,
        client: Client,
        url: String,
        idle: Duration,
        start: u64,
        length: u64,
        retries: u32,
    ) -> Self {
        RangeReader {
            client,
            url,
            idle,
            rt,
            at: start,
            end: start + length,
            retries,
            resp: None,
            chunk: bytes::Bytes::new(),
        }
    }

    fn request(&self) -> io::Result<reqwest::Response> {
        let range = format!("bytes={}-{}", self.at, self.end - 1);
        let send = self.client.get(&self.url).header("Range", range).send();
        let resp = self
            .rt
            .block_on(async { tokio::time::timeout(self.idle, send).await })
            .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "no answer to a range request"))?
            .map_err(|e| io::Error::other(crate::net::describe(&e).1))?;
        let want = self.end - self.at;
        match resp.status() {
            StatusCode::PARTIAL_CONTENT if resp.content_length() == Some(want) => Ok(resp),
            StatusCode::OK if self.at == 0 && resp.content_length() == Some(want) => Ok(resp),
            s => Err(io::Error::other(format!(
                "a range of {want} bytes at {} answered {s} with {:?} bytes",
                self.at,
                resp.content_length()
            ))),
        }
    }

    fn next_chunk(&mut self) -> io::Result<()> {
        if self.resp.is_none() {
            self.resp = Some(self.request()?);
        }
        let idle = self.idle;
        let Some(resp) = self.resp.as_mut() else {
            return Ok(());
        };
        let got = self
            .rt
            .block_on(async { tokio::time::timeout(idle, resp.chunk()).await })
            .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "the range stopped sending"))?
            .map_err(|e| io::Error::other(crate::net::describe(&e).1))?;
        match got {
            Some(c) => self.chunk = c,
            None => {
                self.resp = None;
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    format!("the range ended at {} of {}", self.at, self.end),
                ));
            }
        }
        Ok(())
    }
}

impl Read for RangeReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.at >= self.end || buf.is_empty() {
            return Ok(0);
        }
        while self.chunk.is_empty() {
            if let Err(e) = self.next_chunk() {
                if self.retries == 0 {
                    return Err(e);
                }
                self.retries -= 1;
                self.resp = None;
                tracing::warn!(error = %e, at = self.at, "a range read broke off; asking for the rest again");
            }
        }
        let n = buf
            .len()
            .min(self.chunk.len())
            .min(usize::try_from(self.end - self.at).unwrap_or(usize::MAX));
        buf[..n].copy_from_slice(&self.chunk[..n]);
        let _ = self.chunk.split_to(n);
        self.at += n as u64;
        Ok(n)
    }
}
