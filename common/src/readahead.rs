//! Read-ahead under a TLS stream. rustls asks its transport for at most one record
//! (about 16 KiB) per read, so a TLS body of 1 GiB costs some 65,000 `recvfrom` calls
//! and as many trips through the socket's locking and ACK bookkeeping. [`ReadAhead`]
//! reads the socket in large gulps and hands rustls its records from memory.
//!
//! A server's buffer exists only while bytes flow: it is dropped whenever it is empty
//! and the socket has nothing more, so an idle or slow connection (a server may hold
//! hundreds) costs nothing. Writes go straight through.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// How much a client reads from the socket at once.
pub const READ_AHEAD: usize = 256 << 10;

pub struct ReadAhead<T> {
    inner: T,
    /// Empty while released.
    buf: Box<[u8]>,
    pos: usize,
    filled: usize,
    cap: usize,
    release_when_idle: bool,
}

impl<T> ReadAhead<T> {
    /// A client's: [`READ_AHEAD`], kept for the connection's life.
    pub fn new(inner: T) -> Self {
        Self::with_capacity(READ_AHEAD, false, inner)
    }

    /// `release_when_idle`: drop the buffer whenever it is empty and the socket has
    /// nothing (a server holding many connections).
    pub fn with_capacity(cap: usize, release_when_idle: bool, inner: T) -> Self {
        ReadAhead {
            inner,
            buf: Box::default(),
            pos: 0,
            filled: 0,
            cap: cap.max(1),
            release_when_idle,
        }
    }

    /// Bytes read from the socket and not yet handed on.
    #[cfg(test)]
    fn buffered(&self) -> usize {
        self.filled - self.pos
    }

    /// The buffer's size now (0 while released).
    #[cfg(test)]
    fn held(&self) -> usize {
        self.buf.len()
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for ReadAhead<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        out: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if this.pos == this.filled {
            this.pos = 0;
            this.filled = 0;
            // Nothing held: a reader asking for as much as we would fetch reads directly.
            if out.remaining() >= this.cap {
                return Pin::new(&mut this.inner).poll_read(cx, out);
            }
            if this.buf.is_empty() {
                this.buf = vec![0u8; this.cap].into_boxed_slice();
            }
            let mut rb = ReadBuf::new(&mut this.buf);
            match Pin::new(&mut this.inner).poll_read(cx, &mut rb) {
                Poll::Ready(Ok(())) => {
                    this.filled = rb.filled().len();
                    if this.filled == 0 {
                        this.buf = Box::default();
                        return Poll::Ready(Ok(()));
                    }
                }
                Poll::Ready(Err(e)) => {
                    this.buf = Box::default();
                    return Poll::Ready(Err(e));
                }
                Poll::Pending => {
                    if this.release_when_idle {
                        this.buf = Box::default();
                    }
                    return Poll::Pending;
                }
            }
        }
        let n = out.remaining().min(this.filled - this.pos);
        out.put_slice(&this.buf[this.pos..this.pos + n]);
        this.pos += n;
        Poll::Ready(Ok(()))
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for ReadAhead<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn hands_on_every_byte_in_order_and_holds_nothing_when_idle() {
        let (mut tx, rx) = tokio::io::duplex(1 << 20);
        let data: Vec<u8> = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();
        let sent = data.clone();
        let writer = tokio::spawn(async move {
            for c in sent.chunks(70_001) {
                tx.write_all(c).await.expect("test");
            }
        });
        let mut r = ReadAhead::with_capacity(64 << 10, true, rx);
        let mut got = Vec::new();
        let mut small = [0u8; 5000];
        loop {
            let n = r.read(&mut small).await.expect("test");
            if n == 0 {
                break;
            }
            got.extend_from_slice(&small[..n]);
        }
        writer.await.expect("test");
        assert_eq!(got, data);
        assert_eq!(r.buffered(), 0);
        assert_eq!(r.held(), 0, "nothing held after the end");
    }

    #[tokio::test]
    async fn a_large_read_bypasses_the_buffer() {
        let (mut tx, rx) = tokio::io::duplex(1 << 20);
        tx.write_all(&[7u8; 100_000]).await.expect("test");
        drop(tx);
        let mut r = ReadAhead::with_capacity(1024, true, rx);
        let mut big = vec![0u8; 4096];
        let n = r.read(&mut big).await.expect("test");
        assert!(n > 1024);
        assert_eq!(r.held(), 0);
    }

    #[tokio::test]
    async fn an_idle_socket_holds_no_buffer() {
        let (_tx, rx) = tokio::io::duplex(1024);
        let mut r = ReadAhead::with_capacity(64 << 10, true, rx);
        let mut b = [0u8; 100];
        let read = tokio::time::timeout(std::time::Duration::from_millis(50), r.read(&mut b));
        assert!(read.await.is_err());
        assert_eq!(r.held(), 0);
    }
}
