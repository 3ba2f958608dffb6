//! The writer stage: a thread that takes 1 MiB blocks from the decoder thread through a
//! small bounded queue (so decoding and writing overlap on two cores and memory stays at
//! a few MiB), writes non-zero 4 KiB runs, turns zero runs into holes or zeroed ranges,
//! refuses to grow past the volume, and checkpoints the page cache.

use super::{is_zero, AlignedBuf, FinishInfo, SinkError, Target, SECTOR};
use crate::cdi::space::TooLarge;
use crate::progress::Progress;
use crate::stream::read_full;
use std::io::{self, Read};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender};
use std::sync::Arc;
use std::thread::JoinHandle;

/// Block size handed between threads.
pub const BLOCK: usize = 1 << 20;
/// Buffers in flight; memory used by the writer is `QUEUE * BLOCK`.
const QUEUE: usize = 4;

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct WriteStats {
    /// Highest offset written or zeroed: the image's virtual size for a stream.
    pub end: u64,
    /// Bytes actually written (non-zero runs).
    pub data_bytes: u64,
    /// Bytes skipped as zeros.
    pub zero_bytes: u64,
}

pub struct WriterOptions {
    /// Refuse data beyond this many bytes (the volume's available space).
    pub limit: u64,
    /// Checkpoint (flush + drop page cache) after this many bytes.
    pub checkpoint_every: u64,
    pub progress: Option<Arc<Progress>>,
}

impl Default for WriterOptions {
    fn default() -> Self {
        WriterOptions {
            limit: u64::MAX,
            checkpoint_every: 64 << 20,
            progress: None,
        }
    }
}

enum Msg {
    Data {
        offset: u64,
        buf: AlignedBuf,
        len: usize,
    },
    PrepareRandom(u64),
    KeepFormat,
    Finish(u64),
    Abort,
}

/// Why [`SparseWriter::copy_from`] stopped.
#[derive(Debug, thiserror::Error)]
pub enum CopyError {
    #[error(transparent)]
    Read(io::Error),
    #[error(transparent)]
    Sink(SinkError),
}

pub struct SparseWriter {
    tx: SyncSender<Msg>,
    free: Receiver<AlignedBuf>,
    thread: Option<JoinHandle<Result<(WriteStats, FinishInfo), SinkError>>>,
    /// A buffer taken from the pool but not filled (end of one `copy_from`).
    spare: Option<AlignedBuf>,
    /// A block being filled by [`SparseWriter::write_at`]: (offset, buffer, bytes used).
    pending: Option<(u64, AlignedBuf, usize)>,
    pos: u64,
    limit: u64,
}

impl SparseWriter {
    pub fn spawn(target: Box<dyn Target>, opts: WriterOptions) -> Self {
        let (tx, rx) = sync_channel::<Msg>(QUEUE);
        let (free_tx, free) = sync_channel::<AlignedBuf>(QUEUE + 1);
        for _ in 0..QUEUE {
            let _ = free_tx.send(AlignedBuf::new(BLOCK));
        }
        let limit = opts.limit;
        let thread = std::thread::Builder::new()
            .name("writer".into())
            .spawn(move || run(target, rx, free_tx, opts))
            .expect("spawning the writer thread");
        SparseWriter {
            tx,
            free,
            thread: Some(thread),
            spare: None,
            pending: None,
            pos: 0,
            limit,
        }
    }

    /// Continues a sequential stream at `pos` (a resumed upload: the bytes below are on
    /// the target already).
    pub fn start_at(&mut self, pos: u64) {
        self.pos = pos;
    }

    /// Bytes handed to the writer so far (the image size of a sequential stream).
    pub fn position(&self) -> u64 {
        self.pos
    }

    /// Streams `r` to the target from the current position until end of stream.
    pub fn copy_from(&mut self, r: &mut dyn Read) -> Result<u64, CopyError> {
        self.flush_pending().map_err(CopyError::Sink)?;
        let start = self.pos;
        loop {
            let mut buf = self.take_buf().map_err(CopyError::Sink)?;
            let n = read_full(r, buf.as_mut_slice()).map_err(CopyError::Read)?;
            if n == 0 {
                self.spare = Some(buf);
                return Ok(self.pos - start);
            }
            self.send(self.pos, buf, n).map_err(CopyError::Sink)?;
        }
    }

    /// Writes `data` at `offset`, for formats whose data arrives out of guest order
    /// (qcow2 clusters come in host order). Contiguous writes are coalesced into the
    /// pooled blocks, so a mostly sequential image costs no more than a raw one.
    pub fn write_at(&mut self, mut offset: u64, mut data: &[u8]) -> Result<(), SinkError> {
        let end = offset
            .checked_add(data.len() as u64)
            .ok_or(SinkError::TooLarge(TooLarge::Data {
                at_least: u64::MAX,
                limit: self.limit,
            }))?;
        if end > self.limit {
            return Err(SinkError::TooLarge(TooLarge::Data {
                at_least: end,
                limit: self.limit,
            }));
        }
        while !data.is_empty() {
            let contiguous = matches!(&self.pending, Some((off, _, used)) if off + *used as u64 == offset && *used < BLOCK);
            if !contiguous {
                self.flush_pending()?;
                let buf = self.take_buf()?;
                self.pending = Some((offset, buf, 0));
            }
            let Some((_, buf, used)) = &mut self.pending else {
                unreachable!("pending set above")
            };
            let n = data.len().min(BLOCK - *used);
            buf.as_mut_slice()[*used..*used + n].copy_from_slice(&data[..n]);
            *used += n;
            offset += n as u64;
            data = &data[n..];
            if *used == BLOCK {
                self.flush_pending()?;
            }
        }
        Ok(())
    }

    /// Announces writes in random order over `[0, len)` (see [`Target::prepare_random`]).
    pub fn prepare_random(&mut self, len: u64) -> Result<(), SinkError> {
        self.flush_pending()?;
        if self.tx.send(Msg::PrepareRandom(len)).is_err() {
            return Err(self.writer_error());
        }
        Ok(())
    }

    /// Announces an image already in the destination's format (see
    /// [`Target::keep_format`]); before any write.
    pub fn keep_format(&mut self) -> Result<(), SinkError> {
        self.flush_pending()?;
        if self.tx.send(Msg::KeepFormat).is_err() {
            return Err(self.writer_error());
        }
        Ok(())
    }

    /// Hands a partly filled [`SparseWriter::write_at`] block to the writer thread.
    pub fn flush_pending(&mut self) -> Result<(), SinkError> {
        match self.pending.take() {
            Some((off, buf, used)) if used > 0 => self.send(off, buf, used),
            Some((_, buf, _)) => {
                self.spare = Some(buf);
                Ok(())
            }
            None => Ok(()),
        }
    }

    fn take_buf(&mut self) -> Result<AlignedBuf, SinkError> {
        match self.spare.take() {
            Some(b) => Ok(b),
            None => self.free.recv().map_err(|_| self.writer_error()),
        }
    }

    fn send(&mut self, offset: u64, buf: AlignedBuf, len: usize) -> Result<(), SinkError> {
        let end = offset + len as u64;
        if end > self.limit {
            return Err(SinkError::TooLarge(TooLarge::Data {
                at_least: end,
                limit: self.limit,
            }));
        }
        if self.tx.send(Msg::Data { offset, buf, len }).is_err() {
            return Err(self.writer_error());
        }
        self.pos = self.pos.max(end);
        Ok(())
    }

    /// Sets the final length, makes the data durable and returns what was written.
    pub fn finish(mut self, final_len: u64) -> Result<(WriteStats, FinishInfo), SinkError> {
        self.flush_pending()?;
        let _ = self.tx.send(Msg::Finish(final_len));
        self.join()
    }

    /// Stops and leaves nothing that could pass for a complete disk.
    pub fn abort(mut self) {
        let _ = self.tx.send(Msg::Abort);
        let _ = self.join();
    }

    fn writer_error(&mut self) -> SinkError {
        match self.join() {
            Err(e) => e,
            Ok(_) => SinkError::WriterGone,
        }
    }

    fn join(&mut self) -> Result<(WriteStats, FinishInfo), SinkError> {
        match self.thread.take() {
            Some(t) => t.join().unwrap_or(Err(SinkError::WriterGone)),
            None => Err(SinkError::WriterGone),
        }
    }
}

impl Drop for SparseWriter {
    fn drop(&mut self) {
        if self.thread.is_some() {
            let _ = self.tx.send(Msg::Abort);
            let _ = self.join();
        }
    }
}

fn run(
    mut target: Box<dyn Target>,
    rx: Receiver<Msg>,
    free: SyncSender<AlignedBuf>,
    opts: WriterOptions,
) -> Result<(WriteStats, FinishInfo), SinkError> {
    let mut stats = WriteStats::default();
    let mut last_checkpoint = 0u64;
    let result = (|| {
        for msg in rx.iter() {
            match msg {
                Msg::Data { offset, buf, len } => {
                    write_block(target.as_mut(), offset, &buf.as_slice()[..len], &mut stats)?;
                    let _ = free.try_send(buf);
                    if let Some(p) = &opts.progress {
                        p.add_written(len as u64);
                    }
                    if stats.end - last_checkpoint >= opts.checkpoint_every {
                        target
                            .checkpoint(stats.end)
                            .map_err(|source| SinkError::Sync { source })?;
                        last_checkpoint = stats.end;
                    }
                }
                Msg::PrepareRandom(len) => {
                    target
                        .prepare_random(len)
                        .map_err(|source| SinkError::Write { offset: 0, source })?;
                }
                Msg::KeepFormat => target.keep_format(),
                Msg::Finish(len) => {
                    let info = target
                        .finish(len.max(stats.end))
                        .map_err(|source| SinkError::Sync { source })?;
                    return Ok((stats, info));
                }
                Msg::Abort => return Err(SinkError::WriterGone),
            }
        }
        Err(SinkError::WriterGone)
    })();
    if result.is_err() {
        target.abort();
    }
    result.map_err(|e| e.classify_full(target.path()))
}

fn write_block(
    t: &mut dyn Target,
    offset: u64,
    buf: &[u8],
    stats: &mut WriteStats,
) -> Result<(), SinkError> {
    let mut i = 0;
    while i < buf.len() {
        let first_end = (i + SECTOR).min(buf.len());
        let zero = is_zero(&buf[i..first_end]);
        let mut j = first_end;
        while j < buf.len() {
            let e = (j + SECTOR).min(buf.len());
            if is_zero(&buf[j..e]) != zero {
                break;
            }
            j = e;
        }
        let at = offset + i as u64;
        let len = (j - i) as u64;
        let res = if zero {
            t.zero(at, len)
        } else {
            t.write_at(at, &buf[i..j])
        };
        res.map_err(|source| SinkError::Write { offset: at, source })?;
        if zero {
            stats.zero_bytes += len;
        } else {
            stats.data_bytes += len;
        }
        i = j;
    }
    stats.end = stats.end.max(offset + buf.len() as u64);
    Ok(())
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    /// An in-memory target recording what the writer asked for.
    #[derive(Default, Clone)]
    pub struct MemTarget {
        pub data: Arc<Mutex<Vec<u8>>>,
        pub writes: Arc<Mutex<Vec<(u64, usize)>>>,
        pub aborted: Arc<Mutex<bool>>,
    }

    impl Target for MemTarget {
        fn write_at(&mut self, offset: u64, buf: &[u8]) -> io::Result<()> {
            let mut d = self.data.lock().expect("lock");
            let end = offset as usize + buf.len();
            if d.len() < end {
                d.resize(end, 0);
            }
            d[offset as usize..end].copy_from_slice(buf);
            self.writes.lock().expect("lock").push((offset, buf.len()));
            Ok(())
        }
        fn zero(&mut self, _offset: u64, _len: u64) -> io::Result<()> {
            Ok(())
        }
        fn checkpoint(&mut self, _upto: u64) -> io::Result<()> {
            Ok(())
        }
        fn finish(&mut self, final_len: u64) -> io::Result<FinishInfo> {
            self.data
                .lock()
                .expect("lock")
                .resize(final_len as usize, 0);
            Ok(FinishInfo::default())
        }
        fn abort(&mut self) {
            *self.aborted.lock().expect("lock") = true;
        }
        fn prepare_random(&mut self, _len: u64) -> io::Result<()> {
            Ok(())
        }
        fn path(&self) -> &std::path::Path {
            std::path::Path::new("<memory>")
        }
    }

    /// A target on a full volume.
    struct FullTarget;
    impl Target for FullTarget {
        fn write_at(&mut self, _offset: u64, _buf: &[u8]) -> io::Result<()> {
            Err(io::Error::from_raw_os_error(libc::ENOSPC))
        }
        fn zero(&mut self, _offset: u64, _len: u64) -> io::Result<()> {
            Ok(())
        }
        fn checkpoint(&mut self, _upto: u64) -> io::Result<()> {
            Ok(())
        }
        fn finish(&mut self, _final_len: u64) -> io::Result<FinishInfo> {
            Ok(FinishInfo::default())
        }
        fn abort(&mut self) {}
        fn prepare_random(&mut self, _len: u64) -> io::Result<()> {
            Ok(())
        }
        fn path(&self) -> &std::path::Path {
            std::path::Path::new("/data/disk.img")
        }
    }

    #[test]
    fn enospc_names_the_volume_and_is_terminal() {
        let mut w = SparseWriter::spawn(Box::new(FullTarget), WriterOptions::default());
        let e = match w.write_at(0, &[1u8; 3 * BLOCK]) {
            Err(e) => e,
            Ok(()) => match w.finish(3 * BLOCK as u64) {
                Err(e) => e,
                Ok(_) => panic!("a full volume succeeded"),
            },
        };
        assert_eq!(e.kind(), crate::ErrorKind::TooLarge);
        let err = e.to_string();
        assert!(
            err.contains("the volume holding /data/disk.img is full"),
            "{err}"
        );
    }

    #[test]
    fn writes_only_non_zero_runs_and_reproduces_bytes() {
        let mut img = vec![0u8; 3 * BLOCK + 1234];
        img[5000..9000].fill(0xab);
        img[BLOCK + 10] = 1;
        let last = img.len() - 1;
        img[last] = 9;
        let t = MemTarget::default();
        let mut w = SparseWriter::spawn(Box::new(t.clone()), WriterOptions::default());
        assert_eq!(w.copy_from(&mut &img[..]).expect("copy"), img.len() as u64);
        let (stats, _) = w.finish(img.len() as u64).expect("finish");
        assert_eq!(*t.data.lock().expect("lock"), img);
        assert_eq!(stats.end, img.len() as u64);
        assert_eq!(
            stats.data_bytes,
            2 * 4096 + 4096 + (img.len() as u64 % 4096)
        );
        assert!(stats.zero_bytes > 0);
    }

    #[test]
    fn random_writes_are_placed_and_coalesced() {
        let t = MemTarget::default();
        let mut w = SparseWriter::spawn(Box::new(t.clone()), WriterOptions::default());
        w.write_at(3 * BLOCK as u64, &[2u8; 4096]).expect("write");
        w.write_at(0, &[1u8; 4096]).expect("write");
        w.write_at(4096, &[1u8; 8192]).expect("write");
        w.write_at(BLOCK as u64 - 100, &[3u8; 200]).expect("write");
        w.finish(4 * BLOCK as u64).expect("finish");
        let d = t.data.lock().expect("lock");
        assert_eq!(d.len(), 4 * BLOCK);
        assert!(d[..12288].iter().all(|&b| b == 1));
        assert!(d[BLOCK - 100..BLOCK + 100].iter().all(|&b| b == 3));
        assert!(d[3 * BLOCK..3 * BLOCK + 4096].iter().all(|&b| b == 2));
        assert_eq!(d.iter().filter(|&&b| b != 0).count(), 12288 + 200 + 4096);
        // 0 and 4096 coalesce into one write; the 200 bytes across the 1 MiB boundary
        // stay one pending block of their own.
        assert_eq!(t.writes.lock().expect("lock").len(), 3);
    }

    #[test]
    fn refuses_to_exceed_limit_and_aborts() {
        let img = vec![1u8; 3 * BLOCK];
        let t = MemTarget::default();
        let mut w = SparseWriter::spawn(
            Box::new(t.clone()),
            WriterOptions {
                limit: 2 * BLOCK as u64,
                ..Default::default()
            },
        );
        let err = w.copy_from(&mut &img[..]).expect_err("too large");
        assert!(
            matches!(err, CopyError::Sink(SinkError::TooLarge(TooLarge::Data { limit, .. })) if limit == 2 * BLOCK as u64)
        );
        w.abort();
        assert!(*t.aborted.lock().expect("lock"));
    }
}
