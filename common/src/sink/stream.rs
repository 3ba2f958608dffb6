//! A target that is one forward byte stream: the disk in guest order, holes as zeros,
//! for pushing a disk while it is imported (a raw artifact blob going up as it comes).
//!
//! Raw and compressed raw arrive in guest order; converters whose data may come out of
//! order (qcow2, vmdk, vhd, vhdx, vdi) usually write in order too, since their images
//! are mostly laid out that way. A write that goes back before what was already sent
//! cannot be streamed: it fails with [`OutOfOrder`], which the caller takes as the
//! signal to spool instead.

use super::{FinishInfo, Target};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

/// Where the stream goes; `close` ends it once the last byte is written.
pub trait StreamOut: Write + Send {
    /// Called once, before the first byte, with the disk's final length when it is
    /// known by then (a format's virtual size, announced by `prepare_random`; a raw
    /// stream's length is known only at the end). An error stops the stream, and the
    /// caller spools instead (a tar entry needs its size in its header).
    fn begin(&mut self, _len: Option<u64>) -> io::Result<()> {
        Ok(())
    }
    /// `n` zero bytes: a hole of the disk, which a layout that does not store zeros
    /// (qcow2) skips instead of receiving.
    fn write_zeros(&mut self, mut n: u64) -> io::Result<()> {
        static ZEROS: [u8; 1 << 20] = [0; 1 << 20];
        while n > 0 {
            let k = n.min(ZEROS.len() as u64) as usize;
            self.write_all(&ZEROS[..k])?;
            n -= k as u64;
        }
        Ok(())
    }
    fn close(self: Box<Self>) -> io::Result<()>;
}

#[derive(Debug, thiserror::Error)]
#[error("the image's data is not in guest order (a write at offset {offset} after {sent} bytes were sent), so it cannot be streamed")]
pub struct OutOfOrder {
    pub offset: u64,
    pub sent: u64,
}

pub struct StreamTarget {
    out: Option<Box<dyn StreamOut>>,
    sent: u64,
    /// The length `prepare_random` announced, if it came before the first byte.
    len: Option<u64>,
    begun: bool,
    /// `len` came from [`StreamTarget::with_len`], not from the format.
    fixed_len: bool,
    shown: PathBuf,
    /// Set when the disk cannot be streamed: a write went backwards, or the stream
    /// refused to begin without a length.
    out_of_order: Arc<AtomicBool>,
}

impl StreamTarget {
    /// `shown` names the stream in messages; `out_of_order` is raised on [`OutOfOrder`].
    pub fn new(out: Box<dyn StreamOut>, shown: &str, out_of_order: Arc<AtomicBool>) -> Self {
        StreamTarget {
            out: Some(out),
            sent: 0,
            len: None,
            begun: false,
            fixed_len: false,
            shown: PathBuf::from(shown),
            out_of_order,
        }
    }

    fn out(&mut self) -> io::Result<&mut Box<dyn StreamOut>> {
        self.out
            .as_mut()
            .ok_or_else(|| io::Error::new(io::ErrorKind::BrokenPipe, "the stream is closed"))
    }

    fn backwards(&self, offset: u64) -> io::Error {
        self.out_of_order.store(true, Ordering::Relaxed);
        io::Error::other(OutOfOrder {
            offset,
            sent: self.sent,
        })
    }

    /// Tells the stream its length, once, before the first byte.
    fn begin(&mut self) -> io::Result<()> {
        if self.begun {
            return Ok(());
        }
        self.begun = true;
        let len = self.len;
        let r = self.out()?.begin(len);
        if r.is_err() {
            self.out_of_order.store(true, Ordering::Relaxed);
        }
        r
    }

    /// Zeros up to `to`.
    fn pad(&mut self, to: u64) -> io::Result<()> {
        if self.sent < to {
            let n = to - self.sent;
            self.out()?.write_zeros(n)?;
            self.sent = to;
        }
        Ok(())
    }

    /// The disk's length is known before the import (a measuring pass found it): it is
    /// what the stream begins with, whatever the format announces.
    pub fn with_len(mut self, len: u64) -> Self {
        self.len = Some(len);
        self.fixed_len = true;
        self
    }
}

impl Target for StreamTarget {
    fn write_at(&mut self, offset: u64, buf: &[u8]) -> io::Result<()> {
        if offset < self.sent {
            return Err(self.backwards(offset));
        }
        self.begin()?;
        self.pad(offset)?;
        self.out()?.write_all(buf)?;
        self.sent += buf.len() as u64;
        Ok(())
    }

    fn zero(&mut self, offset: u64, _len: u64) -> io::Result<()> {
        // Ahead of the stream, zeros are what the gap becomes anyway.
        if offset < self.sent {
            return Err(self.backwards(offset));
        }
        Ok(())
    }

    fn checkpoint(&mut self, _upto: u64) -> io::Result<()> {
        Ok(())
    }

    fn finish(&mut self, final_len: u64) -> io::Result<FinishInfo> {
        if let Some(len) = self.len.filter(|&l| l != final_len) {
            return Err(io::Error::other(format!(
                "the disk was announced as {len} bytes and ended at {final_len}"
            )));
        }
        self.begin()?;
        self.pad(final_len)?;
        match self.out.take() {
            Some(out) => out.close()?,
            None => {
                return Err(io::Error::new(
                    io::ErrorKind::BrokenPipe,
                    "the stream is closed",
                ))
            }
        }
        Ok(FinishInfo::default())
    }

    fn abort(&mut self) {
        // Dropping the stream unfinished ends the upload without a digest.
        self.out = None;
    }

    fn prepare_random(&mut self, len: u64) -> io::Result<()> {
        // Random order is tolerated until a write actually goes backwards; the length
        // counts only if no byte went out yet.
        if !self.begun && !self.fixed_len {
            self.len = Some(len);
        }
        Ok(())
    }

    fn path(&self) -> &Path {
        &self.shown
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    struct Collect(Arc<Mutex<Vec<u8>>>, Arc<AtomicBool>);
    impl Write for Collect {
        fn write(&mut self, b: &[u8]) -> io::Result<usize> {
            self.0.lock().expect("lock").extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }
    impl StreamOut for Collect {
        fn close(self: Box<Self>) -> io::Result<()> {
            self.1.store(true, Ordering::Relaxed);
            Ok(())
        }
    }

    #[test]
    fn gaps_become_zeros_and_a_backward_write_is_refused() {
        let (data, closed, ooo) = (
            Arc::new(Mutex::new(Vec::new())),
            Arc::new(AtomicBool::new(false)),
            Arc::new(AtomicBool::new(false)),
        );
        let mut t = StreamTarget::new(
            Box::new(Collect(data.clone(), closed.clone())),
            "<test>",
            ooo.clone(),
        );
        t.write_at(4096, &[1; 4096]).expect("write");
        t.zero(3 << 20, 4096).expect("zero ahead");
        t.write_at(8192, &[2; 10]).expect("write");
        t.finish(3 << 20).expect("finish");
        let got = data.lock().expect("lock").clone();
        assert_eq!(got.len(), 3 << 20);
        assert!(got[..4096].iter().all(|&b| b == 0));
        assert!(got[4096..8192].iter().all(|&b| b == 1));
        assert!(got[8192..8202].iter().all(|&b| b == 2));
        assert!(got[8202..].iter().all(|&b| b == 0));
        assert!(closed.load(Ordering::Relaxed));

        let mut t = StreamTarget::new(
            Box::new(Collect(data.clone(), closed.clone())),
            "<test>",
            ooo.clone(),
        );
        t.write_at(65536, &[1; 4096]).expect("write");
        let e = t.write_at(0, &[1; 4096]).expect_err("backwards");
        assert!(e.to_string().contains("not in guest order"), "{e}");
        assert!(ooo.load(Ordering::Relaxed));
    }

    /// Refuses to begin without a length, as a tar entry must.
    struct NeedsLen(Arc<Mutex<Option<u64>>>);
    impl Write for NeedsLen {
        fn write(&mut self, b: &[u8]) -> io::Result<usize> {
            Ok(b.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }
    impl StreamOut for NeedsLen {
        fn begin(&mut self, len: Option<u64>) -> io::Result<()> {
            *self.0.lock().expect("lock") = len;
            len.map(|_| ()).ok_or_else(|| io::Error::other("no length"))
        }
        fn close(self: Box<Self>) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn the_stream_begins_with_the_announced_length_or_not_at_all() {
        let seen = Arc::new(Mutex::new(None));
        let ooo = Arc::new(AtomicBool::new(false));
        let mut t = StreamTarget::new(Box::new(NeedsLen(seen.clone())), "<t>", ooo.clone());
        t.prepare_random(1 << 20).expect("announce");
        t.write_at(0, &[1; 512]).expect("write");
        assert_eq!(*seen.lock().expect("lock"), Some(1 << 20));
        let e = t.finish(2 << 20).expect_err("a different end");
        assert!(e.to_string().contains("announced as 1048576"), "{e}");
        assert!(!ooo.load(Ordering::Relaxed));

        let mut t = StreamTarget::new(Box::new(NeedsLen(seen)), "<t>", ooo.clone());
        t.write_at(0, &[1; 512]).expect_err("no length");
        assert!(ooo.load(Ordering::Relaxed), "the caller spools instead");
    }
}
