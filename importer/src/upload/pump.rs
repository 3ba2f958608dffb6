//! An upload's body into the pipeline as it arrives: raw, or the `file` part of a
//! multipart form; a client that stalls or breaks off fails the upload, a pipeline that
//! stops reading (it refused the data) leaves the rest of the body to a lingering read.

use ferrydisk_common::error::SourceError;
use ferrydisk_common::progress::Progress;
use ferrydisk_common::serve::{linger, listen};
use ferrydisk_common::stream::{Batcher, ChunkSender};
use ferrydisk_common::ErrorKind;
use hyper::body::Incoming;

/// Reads the body (raw, or a form's `file` part) into the pipeline; whether it all came.
pub(super) async fn pump(
    body: Incoming,
    boundary: Option<String>,
    tx: ChunkSender,
    progress: &Progress,
) -> bool {
    let started = std::time::Instant::now();
    let pumped = match boundary {
        Some(b) => pump_form(body, b, &tx, progress).await,
        None => pump_raw(body, &tx, progress).await,
    };
    match pumped {
        Pumped::Complete(n) => {
            let secs = started.elapsed().as_secs_f64();
            let mb_s = if secs > 0.0 {
                n as f64 / secs / 1e6
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
            true
        }
        Pumped::ClientFailed(e) => {
            tracing::warn!(error = %e, "upload body failed; the server takes a new upload");
            tx.fail(SourceError::new(ErrorKind::Network, e)).await;
            false
        }
        Pumped::PipelineStopped => false,
    }
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
    // TLS yields a record at a time: gathered, they reach the pipeline in one hand-off.
    let mut batcher = Batcher::default();
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
                    let Some(batch) = batcher.push(data) else {
                        continue;
                    };
                    if tx.batch(batch).await.is_err() {
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
    if let Some(batch) = batcher.take() {
        if tx.batch(batch).await.is_err() {
            return Pumped::PipelineStopped;
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
