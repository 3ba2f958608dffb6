//! The one resumable pump every network source uses (HTTP, registry blobs, and later
//! S3/GCS): the body is pumped into the bounded channel the pipeline reads; a dropped
//! connection, a stall longer than the idle timeout or a body shorter than its length
//! is resumed at the byte reached, by the source's own [`Resumable::reopen`] (a Range
//! request, or a restart that skips what was delivered). One retry policy for all:
//! `retries` failures in a row without progress end the transfer, 16 MiB of progress
//! resets the count, and backoff doubles from 250 ms up to 10 s.

use bytes::Bytes;
use ferrydisk_common::error::SourceError;
use ferrydisk_common::progress::Progress;
use ferrydisk_common::stream::{Batcher, ChunkSender};
use ferrydisk_common::ErrorKind;
use futures_util::{Stream, StreamExt};
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

/// A response body as the pump reads it; an item's error says what broke.
pub type Body = Pin<Box<dyn Stream<Item = Result<Bytes, Broken>> + Send>>;

/// A body that broke off mid-transfer, as the HTTP client described it (the pump
/// resumes after it).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct Broken(pub String);

/// A (re)opened transfer.
pub struct Opened {
    pub body: Body,
    /// Bytes at the start of `body` that were already delivered (the server ignored the
    /// range and sent the whole object again).
    pub skip: u64,
}

/// Why a reopen did not give a body.
pub enum Reopen {
    /// Transient: counts as a failure, then the pump tries again.
    Retry(String),
    /// Continuing would splice two different objects (validators changed or missing):
    /// the import starts again from byte 0 ([`ErrorKind::SourceChanged`]).
    Restart(String),
    /// Refused for good (the object is gone, credentials changed).
    Fatal(ErrorKind, String),
}

/// A transfer that can be reopened at a byte offset.
pub trait Resumable: Send + 'static {
    /// A body whose bytes continue at `offset`, directly or after [`Opened::skip`].
    fn reopen(&mut self, offset: u64) -> impl Future<Output = Result<Opened, Reopen>> + Send;
}

/// The retry policy and what the pump reports to.
#[derive(Clone)]
pub struct Policy {
    /// Failures in a row (without [`PROGRESS_RESETS_RETRIES`] of progress) before the
    /// transfer fails.
    pub retries: u32,
    /// A body that delivers nothing for this long counts as dropped.
    pub idle_timeout: Duration,
    pub progress: Arc<Progress>,
}

/// This much progress after a failure resets the retry budget: a long download over a
/// flaky link may drop many times, but never `retries` times in a row without progress.
pub const PROGRESS_RESETS_RETRIES: u64 = 16 << 20;

/// The wait before retry `attempt` (0-based): 250 ms doubling, at most 10 s.
pub fn backoff(attempt: u32) -> Duration {
    Duration::from_millis(250u64.saturating_mul(1 << attempt.min(6))).min(Duration::from_secs(10))
}

/// How a failed transfer is described: `what` names it, `total` is its length if known.
pub struct Labels {
    /// `download of https://host/x` or `failed to pull image: layer sha256:..`.
    pub what: String,
    pub total: Option<u64>,
    /// The log message of a resume (`connection lost, resuming`): what operators and
    /// the tests search the log for.
    pub interrupted: &'static str,
}

/// Runs the pump: reads `first` (or opens at byte 0 when there is none) and whatever
/// the reopens give, sending every byte once, in order, then the end (or the failure)
/// on `tx`.
pub async fn run<S: Resumable>(
    mut source: S,
    first: impl Into<Option<Opened>>,
    policy: Policy,
    labels: Labels,
    tx: ChunkSender,
) {
    let mut opened: Option<Opened> = first.into();
    let mut offset = 0u64;
    let mut failures = 0u32;
    let mut failure = String::new();
    loop {
        if let Some(mut body) = opened.take() {
            match pump_body(&mut body, &mut offset, &policy, &labels, &tx, &mut failures).await {
                Pumped::Done => {
                    tx.end().await;
                    return;
                }
                Pumped::Stopped => return,
                Pumped::Failed(why) => {
                    failure = why;
                    failures += 1;
                }
            }
        }
        if failures > policy.retries {
            let total = labels.total.map(|l| format!(" of {l}")).unwrap_or_default();
            let msg = format!(
                "{} failed after {offset}{total} bytes and {} retries: {failure}",
                labels.what, policy.retries
            );
            tx.fail(SourceError::new(ErrorKind::Network, msg)).await;
            return;
        }
        if failures > 0 {
            tracing::warn!(source = %labels.what, offset, error = %failure, attempt = failures, "{}", labels.interrupted);
            tokio::time::sleep(backoff(failures - 1)).await;
        }
        match source.reopen(offset).await {
            Ok(o) => opened = Some(o),
            Err(Reopen::Retry(m)) => {
                tracing::warn!(source = %labels.what, error = %m, "resume request failed");
                failure = m;
                failures += 1;
            }
            Err(Reopen::Fatal(kind, m)) => {
                tx.fail(SourceError::new(kind, m)).await;
                return;
            }
            Err(Reopen::Restart(m)) => {
                tracing::warn!(source = %labels.what, offset, error = %m, "not splicing two responses: the import starts again from byte 0");
                tx.fail(SourceError::new(ErrorKind::SourceChanged, m)).await;
                return;
            }
        }
    }
}

enum Pumped {
    Done,
    /// The pipeline stopped reading; its own error is what gets reported.
    Stopped,
    Failed(String),
}

async fn pump_body(
    opened: &mut Opened,
    offset: &mut u64,
    policy: &Policy,
    labels: &Labels,
    tx: &ChunkSender,
    failures: &mut u32,
) -> Pumped {
    let mut since_failure = 0u64;
    let mut batcher = Batcher::default();
    let pumped = loop {
        match tokio::time::timeout(policy.idle_timeout, opened.body.next()).await {
            Ok(Some(Ok(mut b))) => {
                if opened.skip > 0 {
                    let take = opened.skip.min(b.len() as u64);
                    opened.skip -= take;
                    b = b.slice(take as usize..);
                    if b.is_empty() {
                        continue;
                    }
                }
                *offset += b.len() as u64;
                since_failure += b.len() as u64;
                if since_failure >= PROGRESS_RESETS_RETRIES {
                    *failures = 0;
                }
                policy.progress.add_source(b.len() as u64);
                if let Some(batch) = batcher.push(b) {
                    if tx.batch(batch).await.is_err() {
                        return Pumped::Stopped;
                    }
                }
            }
            Ok(Some(Err(e))) => break Pumped::Failed(e.0),
            Ok(None) if opened.skip > 0 => {
                break Pumped::Failed(format!(
                    "body ended {} bytes before the resume point {offset}",
                    opened.skip
                ))
            }
            Ok(None) => match labels.total {
                Some(len) if *offset < len => {
                    break Pumped::Failed(format!("body ended after {offset} of {len} bytes"))
                }
                _ => break Pumped::Done,
            },
            Err(_) => {
                break Pumped::Failed(format!("no data for {} s", policy.idle_timeout.as_secs()))
            }
        }
    };
    // What came before the end (or the failure a resume goes on from) is the stream's.
    if let Some(batch) = batcher.take() {
        if tx.batch(batch).await.is_err() {
            return Pumped::Stopped;
        }
    }
    pumped
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferrydisk_common::stream;
    use std::io::Read;

    /// A source that drops after `cut` bytes on its first body, then resumes (or skips).
    struct Flaky {
        data: Bytes,
        honour_range: bool,
        reopens: u32,
    }

    fn body(chunks: Vec<Result<Bytes, Broken>>) -> Body {
        Box::pin(futures_util::stream::iter(chunks))
    }

    impl Resumable for Flaky {
        async fn reopen(&mut self, offset: u64) -> Result<Opened, Reopen> {
            self.reopens += 1;
            Ok(if self.honour_range {
                Opened {
                    body: body(vec![Ok(self.data.slice(offset as usize..))]),
                    skip: 0,
                }
            } else {
                Opened {
                    body: body(vec![Ok(self.data.slice(..10)), Ok(self.data.slice(10..))]),
                    skip: offset,
                }
            })
        }
    }

    fn policy() -> Policy {
        Policy {
            retries: 2,
            idle_timeout: Duration::from_secs(5),
            progress: Arc::default(),
        }
    }

    async fn pumped(honour_range: bool) -> Vec<u8> {
        let data = Bytes::from((0..100u8).collect::<Vec<_>>());
        let first = Opened {
            body: body(vec![Ok(data.slice(..37)), Err(Broken("reset".into()))]),
            skip: 0,
        };
        let (tx, mut rx) = stream::channel();
        let src = Flaky {
            data: data.clone(),
            honour_range,
            reopens: 0,
        };
        let labels = Labels {
            what: "test".into(),
            total: Some(100),
            interrupted: "connection lost, resuming",
        };
        tokio::spawn(run(src, first, policy(), labels, tx));
        tokio::task::spawn_blocking(move || {
            let mut out = Vec::new();
            rx.read_to_end(&mut out).expect("read");
            out
        })
        .await
        .expect("join")
    }

    #[tokio::test]
    async fn resumes_by_range_and_by_skipping() {
        let want: Vec<u8> = (0..100u8).collect();
        assert_eq!(pumped(true).await, want);
        assert_eq!(pumped(false).await, want);
    }

    #[tokio::test]
    async fn gives_up_after_retries_without_progress() {
        struct Dead;
        impl Resumable for Dead {
            async fn reopen(&mut self, _: u64) -> Result<Opened, Reopen> {
                Err(Reopen::Retry("refused".into()))
            }
        }
        let first = Opened {
            body: body(vec![Err(Broken("reset".into()))]),
            skip: 0,
        };
        let (tx, mut rx) = stream::channel();
        let mut p = policy();
        p.retries = 1;
        let labels = Labels {
            what: "download of x".into(),
            total: None,
            interrupted: "connection lost, resuming",
        };
        tokio::spawn(run(Dead, first, p, labels, tx));
        let err = tokio::task::spawn_blocking(move || {
            let mut out = Vec::new();
            rx.read_to_end(&mut out).expect_err("fails")
        })
        .await
        .expect("join");
        assert!(
            err.to_string()
                .starts_with("download of x failed after 0 bytes and 1 retries: refused"),
            "{err}"
        );
        assert_eq!(
            ferrydisk_common::error::io_kind(&err),
            Some(ErrorKind::Network)
        );
    }

    #[test]
    fn backoff_grows_and_caps() {
        assert!(backoff(0) < backoff(3));
        assert_eq!(backoff(30), Duration::from_secs(10));
    }
}
