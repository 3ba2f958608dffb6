//! The one bounded reader for every small body a remote party sends us: registry
//! manifests and indexes, config blobs, token responses, error bodies, JSON answers.
//! A body is never read whole on trust: a `Content-Length` over the bound is refused
//! before a byte is read, the bytes are counted as they arrive, and each read must
//! arrive within the idle timeout. Large payloads (disks, layers) stream through the
//! pipeline instead and never come here.

use bytes::{Bytes, BytesMut};
use futures_util::StreamExt;
use std::time::Duration;

/// A manifest or an index (containers/image, and so CDI, refuses larger ones).
pub const MANIFEST_MAX: u64 = 4 << 20;
/// A token response, a small JSON answer (containers/image caps bearer tokens at 1 MiB).
pub const TOKEN_MAX: u64 = 1 << 20;
/// What is read of an error body at most; only its start is shown.
pub const ERROR_MAX: u64 = 1 << 20;
/// What of an error body goes into a message.
const ERROR_SHOWN: usize = 300;

#[derive(Debug, thiserror::Error)]
pub enum BodyError {
    #[error("{what} is larger than {limit} bytes (refused)")]
    TooLarge { what: String, limit: u64 },
    #[error("{what} is longer than the {declared} bytes its descriptor declares (refused)")]
    LongerThanDeclared { what: String, declared: u64 },
    #[error("{what} ended after {got} of the {declared} bytes its descriptor declares")]
    ShorterThanDeclared {
        what: String,
        got: u64,
        declared: u64,
    },
    #[error("reading {what}: {message}")]
    Read { what: String, message: String },
    #[error("reading {what}: no data for {secs} s (idle timeout)")]
    Idle { what: String, secs: u64 },
}

impl BodyError {
    pub fn kind(&self) -> ferrydisk_common::ErrorKind {
        use ferrydisk_common::ErrorKind;
        match self {
            BodyError::TooLarge { .. } | BodyError::LongerThanDeclared { .. } => {
                ErrorKind::SourceRefused
            }
            BodyError::ShorterThanDeclared { .. }
            | BodyError::Read { .. }
            | BodyError::Idle { .. } => ErrorKind::Network,
        }
    }
}

/// How much of a body to take.
#[derive(Debug, Clone, Copy)]
pub enum Bound {
    /// Up to this many bytes; more is an error.
    AtMost(u64),
    /// Exactly this many (a blob's descriptor size): more or fewer is an error, and
    /// nothing past the declared size is read.
    Exactly(u64),
}

/// The body of `resp`, bounded; `what` names it in errors ("the manifest of ...").
pub async fn read(
    resp: reqwest::Response,
    bound: Bound,
    idle: Duration,
    what: &str,
) -> Result<Bytes, BodyError> {
    let limit = match bound {
        Bound::AtMost(n) | Bound::Exactly(n) => n,
    };
    let too_large = || match bound {
        Bound::AtMost(limit) => BodyError::TooLarge {
            what: what.to_string(),
            limit,
        },
        Bound::Exactly(declared) => BodyError::LongerThanDeclared {
            what: what.to_string(),
            declared,
        },
    };
    if resp.content_length().is_some_and(|n| n > limit) {
        return Err(too_large());
    }
    // Sized for what is declared, never for what the server claims beyond the bound.
    let mut buf = BytesMut::with_capacity(resp.content_length().unwrap_or(0).min(limit) as usize);
    let mut stream = resp.bytes_stream();
    loop {
        let next = tokio::time::timeout(idle, stream.next())
            .await
            .map_err(|_| BodyError::Idle {
                what: what.to_string(),
                secs: idle.as_secs(),
            })?;
        let Some(chunk) = next else { break };
        let chunk = chunk.map_err(|e| BodyError::Read {
            what: what.to_string(),
            message: ferrydisk_common::error::chain_line(&e),
        })?;
        if buf.len() as u64 + chunk.len() as u64 > limit {
            return Err(too_large());
        }
        buf.extend_from_slice(&chunk);
    }
    if let Bound::Exactly(declared) = bound {
        if (buf.len() as u64) < declared {
            return Err(BodyError::ShorterThanDeclared {
                what: what.to_string(),
                got: buf.len() as u64,
                declared,
            });
        }
    }
    Ok(buf.freeze())
}

/// The start of an error body, for a message: at most [`ERROR_MAX`] bytes are read
/// (within 5 s), at most 300 characters kept, control characters dropped so the
/// message stays one line. Empty when the body is unreadable.
pub async fn error_text(resp: reqwest::Response) -> String {
    let mut kept = Vec::new();
    let mut read = 0u64;
    let mut stream = resp.bytes_stream();
    let drain = async {
        while let Some(Ok(chunk)) = stream.next().await {
            let room = (ERROR_SHOWN * 4).saturating_sub(kept.len());
            kept.extend_from_slice(&chunk[..chunk.len().min(room)]);
            read += chunk.len() as u64;
            if read >= ERROR_MAX || kept.len() >= ERROR_SHOWN * 4 {
                break;
            }
        }
    };
    let _ = tokio::time::timeout(Duration::from_secs(5), drain).await;
    shown(&String::from_utf8_lossy(&kept))
}

/// At most 300 characters of `text`, on one line.
pub fn shown(text: &str) -> String {
    text.trim()
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .take(ERROR_SHOWN)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shown_is_one_short_line() {
        let s = shown(&format!("  a\nb\r{}", "x".repeat(1000)));
        assert!(s.starts_with("a b "));
        assert_eq!(s.chars().count(), ERROR_SHOWN);
        assert!(!s.contains('\n'));
    }
}
