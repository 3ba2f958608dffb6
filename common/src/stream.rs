//! Adapters between sources and the blocking pipeline.

use crate::error::{ErrorKind, SourceError};
use bytes::Bytes;
use std::io::{self, Read};

/// One message from an async source: bytes, or the explicit end of the stream. A
/// channel that closes without [`Chunk::End`] is an error, never a clean end, so a
/// source task that dies cannot make a truncated image look complete.
#[derive(Debug)]
pub enum Chunk {
    Data(Bytes),
    /// Several pieces in one hand-off (see [`Batcher`]).
    Batch(Vec<Bytes>),
    End,
}

/// Bytes gathered before one hand-off to the pipeline.
pub const BATCH: usize = 256 << 10;

/// Gathers a source's pieces into hand-offs of at least [`BATCH`] bytes. A TLS stream
/// yields one record (at most 16 KiB) at a time; handing each to the pipeline thread on
/// its own costs a wake-up of one side or the other per record (35,000 for a 515 MB
/// layer), more than the decryption. Nothing is copied: the pieces travel as they are.
#[derive(Debug, Default)]
pub struct Batcher {
    parts: Vec<Bytes>,
    len: usize,
}

impl Batcher {
    /// Adds `b`; a batch to send once there is enough.
    pub fn push(&mut self, b: Bytes) -> Option<Vec<Bytes>> {
        self.len += b.len();
        self.parts.push(b);
        (self.len >= BATCH).then(|| self.take_all())
    }

    /// What is gathered, if anything (before the end, or a failure that keeps what came).
    pub fn take(&mut self) -> Option<Vec<Bytes>> {
        (!self.parts.is_empty()).then(|| self.take_all())
    }

    fn take_all(&mut self) -> Vec<Bytes> {
        self.len = 0;
        std::mem::take(&mut self.parts)
    }
}

/// Chunks in flight between an async source and the pipeline: enough to keep a socket
/// busy, few enough that memory does not depend on how fast the network is.
pub const CHANNEL_CHUNKS: usize = 16;

/// The bounded channel between an async source and the blocking pipeline.
pub fn channel() -> (ChunkSender, ChannelReader) {
    let (tx, rx) = tokio::sync::mpsc::channel(CHANNEL_CHUNKS);
    (ChunkSender(tx), ChannelReader::new(rx))
}

/// The pipeline stopped reading (it failed, and reports its own error).
#[derive(Debug)]
pub struct Stopped;

/// The sending half of [`channel`]: data, then exactly one end or failure.
#[derive(Clone)]
pub struct ChunkSender(tokio::sync::mpsc::Sender<io::Result<Chunk>>);

impl ChunkSender {
    /// Waits for room (the back-pressure), then hands `b` to the pipeline.
    pub async fn data(&self, b: Bytes) -> Result<(), Stopped> {
        self.0.send(Ok(Chunk::Data(b))).await.map_err(|_| Stopped)
    }

    /// Several pieces in one hand-off (one wake-up of the pipeline for all of them).
    pub async fn batch(&self, parts: Vec<Bytes>) -> Result<(), Stopped> {
        self.0
            .send(Ok(Chunk::Batch(parts)))
            .await
            .map_err(|_| Stopped)
    }

    /// The stream is complete.
    pub async fn end(self) {
        let _ = self.0.send(Ok(Chunk::End)).await;
    }

    /// The source failed; the pipeline's read returns this error (its kind survives).
    pub async fn fail(self, e: SourceError) {
        let _ = self.0.send(Err(e.into_io())).await;
    }
}

/// A blocking `Read` over a bounded tokio channel filled by an async source task. The
/// bound is the back-pressure: when the pipeline is slower than the network, the
/// source task waits instead of buffering.
pub struct ChannelReader {
    rx: tokio::sync::mpsc::Receiver<io::Result<Chunk>>,
    cur: Bytes,
    /// The rest of a batch.
    queued: std::collections::VecDeque<Bytes>,
    ended: bool,
}

impl ChannelReader {
    pub fn new(rx: tokio::sync::mpsc::Receiver<io::Result<Chunk>>) -> Self {
        ChannelReader {
            rx,
            cur: Bytes::new(),
            queued: Default::default(),
            ended: false,
        }
    }
}

impl Read for ChannelReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        while self.cur.is_empty() {
            if let Some(b) = self.queued.pop_front() {
                self.cur = b;
                continue;
            }
            if self.ended {
                return Ok(0);
            }
            match self.rx.blocking_recv() {
                Some(Ok(Chunk::Data(b))) => self.cur = b,
                Some(Ok(Chunk::Batch(parts))) => self.queued.extend(parts),
                Some(Ok(Chunk::End)) => self.ended = true,
                Some(Err(e)) => return Err(e),
                None => {
                    return Err(SourceError::new(
                        ErrorKind::Network,
                        "the source stopped before the end of the stream",
                    )
                    .into_io())
                }
            }
        }
        let n = buf.len().min(self.cur.len());
        buf[..n].copy_from_slice(&self.cur[..n]);
        let _ = self.cur.split_to(n);
        Ok(n)
    }
}

/// Reads until `buf` is full or the stream ends; returns the bytes read (short only at
/// end of stream). `Read::read_exact` cannot say how much a short stream held.
pub fn read_full(r: &mut dyn Read, buf: &mut [u8]) -> io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match r.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

/// Counts bytes read through it.
pub struct CountingReader<R, F> {
    inner: R,
    on_bytes: F,
}

impl<R: Read, F: FnMut(u64)> CountingReader<R, F> {
    pub fn new(inner: R, on_bytes: F) -> Self {
        CountingReader { inner, on_bytes }
    }
}

impl<R: Read, F: FnMut(u64)> Read for CountingReader<R, F> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        (self.on_bytes)(n as u64);
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn channel_without_end_is_an_error() {
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        tx.blocking_send(Ok(Chunk::Data(Bytes::from_static(b"abc"))))
            .expect("send");
        drop(tx);
        let mut r = ChannelReader::new(rx);
        let mut out = Vec::new();
        let err = r.read_to_end(&mut out).expect_err("no End");
        assert!(crate::error::find_in_chain::<SourceError>(&err).is_some());
        assert_eq!(out, b"abc");
    }

    #[test]
    fn batches_arrive_in_order_and_whole() {
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        let mut b = Batcher::default();
        let mut want = Vec::new();
        for i in 0..40u8 {
            let piece = Bytes::from(vec![i; 16 << 10]);
            want.extend_from_slice(&piece);
            if let Some(batch) = b.push(piece) {
                assert_eq!(batch.iter().map(Bytes::len).sum::<usize>(), BATCH);
                tx.blocking_send(Ok(Chunk::Batch(batch))).expect("send");
            }
        }
        let rest = b.take().expect("the rest");
        assert_eq!(rest.len(), 40 - 32);
        assert!(b.take().is_none());
        tx.blocking_send(Ok(Chunk::Batch(rest))).expect("send");
        tx.blocking_send(Ok(Chunk::End)).expect("send");
        let mut out = Vec::new();
        ChannelReader::new(rx).read_to_end(&mut out).expect("end");
        assert_eq!(out, want);
    }

    #[test]
    fn channel_with_end_is_eof() {
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        tx.blocking_send(Ok(Chunk::Data(Bytes::from_static(b"abc"))))
            .expect("send");
        tx.blocking_send(Ok(Chunk::End)).expect("send");
        let mut out = Vec::new();
        ChannelReader::new(rx)
            .read_to_end(&mut out)
            .expect("clean end");
        assert_eq!(out, b"abc");
    }
}
