//! Where the disk goes. Two real targets, a sparse regular file ([`file::FileTarget`])
//! and a block device ([`block::BlockTarget`]), behind [`Target`], optionally with the
//! qcow2 writer ([`qcow2::Qcow2Target`]) in front of a file; the
//! [`sparse::SparseWriter`] in front of them skips zero blocks, enforces the size
//! limit and keeps the page cache charged to the pod flat.

pub mod aligned;
pub mod block;
pub mod discard;
pub mod file;
mod flush;
pub mod measure;
pub mod qcow2;
pub mod qcow2_stream;
pub mod sparse;
pub mod stream;

use std::io;

pub use aligned::AlignedBuf;
pub use block::BlockTarget;
pub use file::FileTarget;
pub use qcow2::Qcow2Target;
pub use sparse::{SparseWriter, WriteStats};

/// The alignment O_DIRECT needs for offsets, lengths and memory (covers 512-byte and
/// 4 KiB logical blocks), and the granularity at which zero blocks are skipped (the same
/// as qemu-img convert's default `-S 4k`).
pub const SECTOR: usize = 4096;

/// Whether `s` (at most a [`SECTOR`]) is all zeros: a compare against a zero block,
/// which the compiler turns into `memcmp`, not a byte loop.
pub fn is_zero(s: &[u8]) -> bool {
    static ZEROS: [u8; SECTOR] = [0; SECTOR];
    s == &ZEROS[..s.len()]
}

/// A destination for image bytes at absolute offsets.
pub trait Target: Send {
    /// Writes `buf` at `offset`. Offsets and lengths are multiples of [`SECTOR`] except
    /// for the very last write of an image.
    fn write_at(&mut self, offset: u64, buf: &[u8]) -> io::Result<()>;
    /// Makes `[offset, offset+len)` read back as zeros.
    fn zero(&mut self, offset: u64, len: u64) -> io::Result<()>;
    /// Called every few hundred MiB: push written data to storage and drop it from the
    /// page cache so a pod's memory does not grow with the image.
    fn checkpoint(&mut self, upto: u64) -> io::Result<()>;
    /// Sets the final length (files) and makes everything durable.
    fn finish(&mut self, final_len: u64) -> io::Result<FinishInfo>;
    /// After a failure: leave nothing that could pass for a complete disk.
    fn abort(&mut self);
    /// Called before writes that arrive in random order (qcow2): afterwards every byte
    /// of `[0, len)` that is never written must read as zero.
    fn prepare_random(&mut self, len: u64) -> io::Result<()>;
    /// Called before any write when the image already is in the destination's format
    /// (a qcow2 kept as qcow2): its bytes go where they are addressed, unconverted.
    fn keep_format(&mut self) {}
    /// What the target writes to, for messages (a full volume names it).
    fn path(&self) -> &std::path::Path;
}

#[derive(Debug, Clone, Copy, Default)]
pub struct FinishInfo {
    /// Whether the whole destination ended up allocated (CDI's `preallocationApplied`).
    pub preallocated: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum SinkError {
    #[error("writing the destination at offset {offset}: {source}")]
    Write {
        offset: u64,
        #[source]
        source: io::Error,
    },
    #[error("flushing the destination: {source}")]
    Sync {
        #[source]
        source: io::Error,
    },
    #[error(transparent)]
    TooLarge(#[from] crate::cdi::space::TooLarge),
    /// ENOSPC/EDQUOT: terminal, and said in words a user acts on (a larger PVC).
    #[error(
        "the volume holding {path} is full ({source}) at offset {offset}; a larger PVC is required"
    )]
    Full {
        path: String,
        offset: u64,
        #[source]
        source: io::Error,
    },
    #[error("the writer stopped unexpectedly")]
    WriterGone,
}

impl SinkError {
    pub fn kind(&self) -> crate::ErrorKind {
        match self {
            SinkError::TooLarge(_) | SinkError::Full { .. } => crate::ErrorKind::TooLarge,
            _ => crate::ErrorKind::Io,
        }
    }

    /// A write or flush that failed because the volume is full becomes [`SinkError::Full`].
    pub fn classify_full(self, path: &std::path::Path) -> Self {
        let (offset, source) = match self {
            SinkError::Write { offset, source } if is_full(&source) => (offset, source),
            SinkError::Sync { source } if is_full(&source) => (0, source),
            other => return other,
        };
        SinkError::Full {
            path: path.display().to_string(),
            offset,
            source,
        }
    }
}

/// ENOSPC or EDQUOT, by `io::ErrorKind` (never by message text).
pub fn is_full(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::StorageFull | io::ErrorKind::QuotaExceeded
    )
}

/// Which [`Target`] a path calls for: block devices are written in place, anything else
/// is a regular file.
pub fn is_block_device(path: &std::path::Path) -> bool {
    use std::os::unix::fs::FileTypeExt;
    std::fs::metadata(path)
        .map(|m| m.file_type().is_block_device())
        .unwrap_or(false)
}

/// Whether a write can go through an O_DIRECT handle: offset, length and memory all
/// sector-aligned. Anything else (the image's tail) takes the buffered handle.
pub(crate) fn direct_aligned(offset: u64, buf: &[u8]) -> bool {
    offset.is_multiple_of(SECTOR as u64)
        && buf.len().is_multiple_of(SECTOR)
        && (buf.as_ptr() as usize).is_multiple_of(SECTOR)
}
