//! Refusing early: answer at once, and keep reading (and dropping) what the client is
//! still sending for a little while (a "lingering close"). Closing a socket with unread
//! data makes the kernel send a reset, which can destroy our answer before the client
//! reads it. Bounded in time and bytes, so a refused 10 GB upload costs at most that.

use bytes::Buf;
use http_body_util::BodyExt;
use std::future::Future;
use std::time::Duration;

/// What a lingering close reads at most.
pub const LINGER_BYTES: usize = 256 << 20;

/// How long a lingering close reads at most.
pub const LINGER_TIME: Duration = Duration::from_secs(5);

/// Reads and drops what is left of `body` beside the answer.
pub fn body<B>(body: B)
where
    B: hyper::body::Body + Send + Unpin + 'static,
    B::Data: Send,
{
    with(async move {
        let mut body = body;
        let mut n = 0usize;
        while let Some(Ok(frame)) = body.frame().await {
            n += frame.data_ref().map_or(0, |d| d.remaining());
            if n > LINGER_BYTES {
                break;
            }
        }
    });
}

/// Runs a body-draining future for at most [`LINGER_TIME`], beside the answer.
pub fn with(drain: impl Future<Output = ()> + Send + 'static) {
    tokio::spawn(async move {
        let _ = tokio::time::timeout(LINGER_TIME, drain).await;
    });
}
