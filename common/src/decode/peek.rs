//! Look at a stream's first bytes without consuming them.

use std::io::{self, Read};

/// Reads up to `n` bytes ahead (fewer only at end of stream), exposes them through
/// [`PeekReader::head`], then replays them before the rest of the stream.
pub struct PeekReader<R> {
    inner: R,
    head: Vec<u8>,
    pos: usize,
}

impl<R: Read> PeekReader<R> {
    pub fn new(mut inner: R, n: usize) -> io::Result<Self> {
        let mut head = vec![0u8; n];
        let filled = crate::stream::read_full(&mut inner, &mut head)?;
        head.truncate(filled);
        Ok(PeekReader {
            inner,
            head,
            pos: 0,
        })
    }

    pub fn head(&self) -> &[u8] {
        &self.head
    }
}

impl<R: Read> Read for PeekReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.pos < self.head.len() {
            let n = buf.len().min(self.head.len() - self.pos);
            buf[..n].copy_from_slice(&self.head[self.pos..self.pos + n]);
            self.pos += n;
            if self.pos == self.head.len() {
                self.head = Vec::new(); // give the memory back once replayed
                self.pos = 0;
            }
            return Ok(n);
        }
        self.inner.read(buf)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replays_head_then_rest() {
        let data: Vec<u8> = (0..=255).cycle().take(3000).collect();
        let mut p = PeekReader::new(&data[..], 512).expect("peek");
        assert_eq!(p.head(), &data[..512]);
        let mut out = Vec::new();
        p.read_to_end(&mut out).expect("read");
        assert_eq!(out, data);
    }

    #[test]
    fn short_stream() {
        let mut p = PeekReader::new(&b"abc"[..], 512).expect("peek");
        assert_eq!(p.head(), b"abc");
        let mut out = Vec::new();
        p.read_to_end(&mut out).expect("read");
        assert_eq!(out, b"abc");
    }
}
