//! The third stage: the layer blob into the registry. A blob the registry has is not
//! sent; one it can mount from `--mount-from` is mounted; otherwise the layer is
//! produced again from the file and streamed up (one PATCH of 1 MiB pieces, or
//! `--chunk-mib` PATCHes), resumed where the registry says it stands when cut.

use super::error::PushFailure;
use super::layer::{self, LayerSpec, Produced};
use super::source::{SkipHoles, Source};
use crate::config::push::Transfer;
use crate::net::registry::{ApiError, Registry};
use bytes::Bytes;
use std::fs::File;
use std::io::{self, Write};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

/// Bytes per piece handed from the producer to a streamed upload.
pub const PIECE: usize = 1 << 20;

/// What became of the layer blob.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sent {
    /// The registry had it.
    Present,
    /// The registry mounted it from another repository.
    Mounted,
    Uploaded,
}

/// Puts the layer `pre` (its digest from a first pass) into the registry.
pub async fn send(
    t: &Transfer,
    reg: &Registry,
    src: &Source,
    pre: &Produced,
) -> Result<Sent, PushFailure> {
    if reg.blob_exists(&pre.digest, pre.size).await? {
        tracing::info!(digest = %pre.digest, "the registry has this layer; not uploading it");
        return Ok(Sent::Present);
    }
    if let Some(from) = t.mount_from.as_deref() {
        if reg.mount(&pre.digest, from).await? {
            tracing::info!(digest = %pre.digest, from, "layer mounted from another repository; not uploading it");
            return Ok(Sent::Mounted);
        }
        tracing::info!(digest = %pre.digest, from, "the registry did not mount the layer; uploading it");
    }
    let got = upload_layer(reg, src.file.clone(), src.len, &src.spec, pre.size, t).await?;
    // Pass two must make the layer pass one measured: the source did not change.
    if &got != pre {
        return Err(PushFailure::Changed {
            shown: src.shown.clone(),
            before: pre.digest.clone(),
            after: got.digest,
        });
    }
    Ok(Sent::Uploaded)
}

/// Pass two: the layer produced on a blocking thread into pieces (1 MiB, or the chunk
/// size) that the upload session sends as they come. A cut upload resumes where the
/// registry says it stands: the layer is produced again from the file and the bytes
/// the registry has are not sent again (`--retries` resumptions without progress).
async fn upload_layer(
    reg: &Registry,
    file: Arc<File>,
    len: u64,
    spec: &LayerSpec,
    layer_size: u64,
    t: &Transfer,
) -> Result<Produced, PushFailure> {
    let chunked = t.chunk.is_some();
    let piece = t.chunk.unwrap_or(PIECE);
    let producers = std::sync::Mutex::new(Vec::new());
    let produce = |skip: u64| {
        // Chunked: one chunk being sent, one queued. Streamed: a few 1 MiB pieces queued.
        let (tx, rx) = tokio::sync::mpsc::channel::<Bytes>(if chunked { 1 } else { 4 });
        let (dtx, drx) = tokio::sync::oneshot::channel();
        let (s, file) = (spec.clone(), file.clone());
        let out = Chunks::new(tx, piece).skipping(skip);
        let closed = out.closed.clone();
        let producer = tokio::task::spawn_blocking(move || {
            let made = layer::produce(&mut SkipHoles::new(&file, len), len, &s, out)
                .and_then(|(mut out, p)| out.send().map(|()| p));
            let _ = dtx.send(made.as_ref().ok().map(|p| p.digest.clone()));
            (made, closed)
        });
        if let Ok(mut p) = producers.lock() {
            p.push(producer);
        }
        (rx, drx)
    };
    let uploaded = reg
        .upload_resumable(produce, layer_size, chunked, t.retries)
        .await;
    // Only the last producer ran to the end; the others stopped when their upload did.
    let last = producers.lock().ok().and_then(|mut p| p.pop());
    let made = match last {
        Some(h) => Some(h.await.map_err(io::Error::other)?),
        None => None,
    };
    match (uploaded, made) {
        (Ok(_), Some((Ok(p), _))) => Ok(p),
        // The upload failed before any layer was asked for (the session was refused).
        (Err(u), None) => Err(u.into()),
        (Ok(_), None) => Err(ApiError::Protocol("no layer was produced".into()).into()),
        // The upload stopped taking the layer: its own error says why (a 401, say).
        (Err(u), Some((Err(_), closed))) if closed.load(Ordering::Relaxed) => Err(u.into()),
        // The producer's own error says what went wrong on the source side.
        (_, Some((Err(e), _))) => Err(PushFailure::Source {
            what: "reading",
            shown: "the source".into(),
            source: e,
        }),
        (Err(e), Some((Ok(_), _))) => Err(e.into()),
    }
}

/// Collects the layer into pieces for the uploader.
pub struct Chunks {
    buf: Vec<u8>,
    piece: usize,
    tx: tokio::sync::mpsc::Sender<Bytes>,
    /// Bytes of the layer the registry has already (a resumed upload): produced and
    /// hashed, not sent.
    skip: u64,
    /// Set when the upload stopped taking pieces: the upload's error is the cause.
    pub closed: Arc<AtomicBool>,
}

impl Chunks {
    pub fn new(tx: tokio::sync::mpsc::Sender<Bytes>, piece: usize) -> Self {
        Chunks {
            buf: Vec::new(),
            piece,
            tx,
            skip: 0,
            closed: Arc::new(AtomicBool::new(false)),
        }
    }

    fn skipping(mut self, skip: u64) -> Self {
        self.skip = skip;
        self
    }

    pub fn send(&mut self) -> io::Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        // The next buffer is allocated when the next write comes, not while this one waits.
        let chunk = std::mem::take(&mut self.buf);
        self.tx.blocking_send(Bytes::from(chunk)).map_err(|_| {
            self.closed.store(true, Ordering::Relaxed);
            io::Error::new(io::ErrorKind::BrokenPipe, "the upload stopped")
        })
    }
}

impl Write for Chunks {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        if self.skip > 0 {
            let n = data
                .len()
                .min(usize::try_from(self.skip).unwrap_or(usize::MAX));
            self.skip -= n as u64;
            return Ok(n);
        }
        if self.buf.capacity() == 0 {
            self.buf.reserve_exact(self.piece);
        }
        let n = data.len().min(self.piece - self.buf.len());
        self.buf.extend_from_slice(&data[..n]);
        if self.buf.len() == self.piece {
            self.send()?;
        }
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}
