//! A block device as the disk (`/dev/cdi-block-volume`). A device keeps whatever it held
//! before, so skipped zero runs must be zeroed explicitly. Adjacent zero runs are merged
//! so a mostly-empty disk costs few calls. How, in order (see [`Zeroing`]):
//!
//! - `fallocate(PUNCH_HOLE)`: the kernel deallocates the range (discard/unmap) *and*
//!   guarantees it reads back as zeros, or refuses (`EOPNOTSUPP`): a thin volume (LVM
//!   thin, Ceph RBD, a loop device on a sparse file) stays thin (CDI issue 3614);
//! - `fallocate(ZERO_RANGE)`: BLKZEROOUT with NOUNMAP, offloaded to the device where it
//!   can, which allocates on a thin volume; first when preallocation was asked for;
//! - writing zeros.

use super::flush::{self, Flusher};
use super::{FinishInfo, Target};
use rustix::fs::{fadvise, fallocate, Advice, FallocateFlags};
use std::fs::{File, OpenOptions};
use std::io::{self, Seek, SeekFrom};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

/// The best way to zero a range this device has not refused yet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Zeroing {
    /// Deallocate with guaranteed zeros (`PUNCH_HOLE`): thin stays thin.
    Unmap,
    /// Zero in place, allocating (`ZERO_RANGE`): preallocation.
    Allocate,
    /// The device offloads neither: write zeros.
    Write,
}

impl Zeroing {
    /// Where to start: a preallocated disk must end up allocated, any other one thin.
    pub fn for_preallocation(preallocate: bool) -> Self {
        if preallocate {
            Zeroing::Allocate
        } else {
            Zeroing::Unmap
        }
    }
}

pub struct BlockTarget {
    path: PathBuf,
    file: File,
    direct: Option<File>,
    size: u64,
    pending_zero: Option<(u64, u64)>,
    zero_offload: Zeroing,
    /// The end of the furthest write, zeroed back on abort.
    written_end: u64,
    /// The device's logical block size (512, or 4096 on a 4Kn device): the alignment
    /// `fallocate` and O_DIRECT need.
    block: u64,
    /// The caller vouches that the device already reads as zeros (a fresh thin volume):
    /// zero runs are skipped, neither deallocated nor zeroed.
    skip_zeros: bool,
    /// Write-behind for checkpoints (buffered writes only), started at the first one.
    flusher: Option<Flusher>,
    /// Bytes that went through the page cache since the last checkpoint (everything
    /// without O_DIRECT; with it, unaligned writes and zeros written as zeros).
    buffered: u64,
    /// The device holds a disk being changed in place ([`BlockTarget::over_existing`]):
    /// nothing is zeroed ahead of random-order writes, nothing zeroed back on abort.
    existing: bool,
}

impl BlockTarget {
    pub fn open(path: &Path, try_direct: bool, preallocate: bool) -> io::Result<Self> {
        let mut file = OpenOptions::new().read(true).write(true).open(path)?;
        // lseek(SEEK_END) on a block device returns its size: no ioctl needed.
        let size = file.seek(SeekFrom::End(0))?;
        file.seek(SeekFrom::Start(0))?;
        let block = logical_block(&file);
        let direct = if try_direct && block <= super::SECTOR as u64 {
            match OpenOptions::new()
                .write(true)
                .custom_flags(libc::O_DIRECT)
                .open(path)
            {
                Ok(d) => Some(d),
                Err(e) => {
                    tracing::info!(device = %path.display(), error = %e, "O_DIRECT not available on this device; using buffered writes");
                    None
                }
            }
        } else {
            None
        };
        Ok(BlockTarget {
            path: path.to_path_buf(),
            file,
            direct,
            size,
            pending_zero: None,
            zero_offload: Zeroing::for_preallocation(preallocate),
            written_end: 0,
            block,
            skip_zeros: false,
            flusher: None,
            buffered: 0,
            existing: false,
        })
    }

    pub fn size(&self) -> u64 {
        self.size
    }

    fn flush_zero(&mut self) -> io::Result<()> {
        let Some((start, end)) = self.pending_zero.take() else {
            return Ok(());
        };
        if self.zero_offload == Zeroing::Write
            || !start.is_multiple_of(self.block)
            || !end.is_multiple_of(self.block)
        {
            self.buffered += end - start;
        }
        zero_range(
            &self.file,
            &mut self.zero_offload,
            self.block,
            start,
            end - start,
        )
    }

    /// Trust that the device reads as zeros: zero runs cost nothing (`--target-zeroed`).
    /// Ignored with preallocation, which must leave the device allocated.
    /// The device holds the disk of a previous stage, which this write changes in place
    /// (a warm migration's delta): random-order writes do not clear the device first,
    /// zero runs are zeroed, and a failure leaves the device as it stands (the next
    /// attempt applies the delta again whole).
    pub fn over_existing(mut self) -> Self {
        self.existing = true;
        self.skip_zeros = false;
        self
    }

    pub fn assume_zeroed(mut self, yes: bool) -> Self {
        self.skip_zeros = yes && self.zero_offload != Zeroing::Allocate;
        if self.skip_zeros {
            tracing::info!(device = %self.path.display(), "the device is taken to read as zeros already (--target-zeroed): zero runs are not written");
        }
        self
    }

    /// The device's logical block size.
    pub fn logical_block(&self) -> u64 {
        self.block
    }
}

/// The logical block size of a device (`BLKSSZGET`): 4096 on a 4Kn device, 512 on most;
/// 512 when the ioctl fails (a regular file in a unit test).
pub fn logical_block(file: &File) -> u64 {
    match rustix::fs::ioctl_blksszget(file) {
        Ok(n) if n >= 512 && n.is_power_of_two() => u64::from(n),
        _ => 512,
    }
}

/// Zeroes `[offset, offset+len)` of a device whose logical block is `block` bytes; also
/// used for blank preallocated disks. The block-aligned middle is offloaded: `mode` steps
/// down (Unmap -> Allocate -> Write) when the device refuses a way, once, with a log
/// line. An unaligned head or tail (the image's last partial block on a 4Kn device) is
/// written as zeros, through the page cache, which does the read-modify-write.
pub fn zero_range(
    file: &File,
    mode: &mut Zeroing,
    block: u64,
    offset: u64,
    len: u64,
) -> io::Result<()> {
    let end = offset.saturating_add(len);
    let start = offset.next_multiple_of(block).min(end);
    let stop = (end / block * block).max(start);
    write_zeros(file, offset, start)?;
    offload_zero(file, mode, start, stop)?;
    write_zeros(file, stop, end)
}

fn offload_zero(file: &File, mode: &mut Zeroing, start: u64, end: u64) -> io::Result<()> {
    if start >= end {
        return Ok(());
    }
    let len = end - start;
    if *mode == Zeroing::Unmap {
        match fallocate(
            file,
            FallocateFlags::PUNCH_HOLE | FallocateFlags::KEEP_SIZE,
            start,
            len,
        ) {
            Ok(()) => return Ok(()),
            Err(e) => {
                tracing::info!(error = %e, "device cannot deallocate with guaranteed zeros (punch hole); zeroing in place");
                *mode = Zeroing::Allocate;
            }
        }
    }
    if *mode == Zeroing::Allocate {
        match fallocate(
            file,
            FallocateFlags::ZERO_RANGE | FallocateFlags::KEEP_SIZE,
            start,
            len,
        ) {
            Ok(()) => return Ok(()),
            Err(e) => {
                tracing::info!(error = %e, "device does not zero ranges by itself; writing zeros");
                *mode = Zeroing::Write;
            }
        }
    }
    write_zeros(file, start, end)
}

fn write_zeros(file: &File, start: u64, end: u64) -> io::Result<()> {
    static ZEROS: [u8; 1 << 20] = [0; 1 << 20];
    let mut off = start;
    while off < end {
        let n = ((end - off) as usize).min(ZEROS.len());
        file.write_all_at(&ZEROS[..n], off)?;
        off += n as u64;
    }
    Ok(())
}

impl Target for BlockTarget {
    fn write_at(&mut self, offset: u64, buf: &[u8]) -> io::Result<()> {
        let end = offset.checked_add(buf.len() as u64);
        if end.is_none_or(|e| e > self.size) {
            return Err(io::Error::new(
                io::ErrorKind::WriteZero,
                format!("write past the end of the device ({} bytes)", self.size),
            ));
        }
        self.written_end = self.written_end.max(end.unwrap_or(0));
        match &self.direct {
            Some(d) if super::direct_aligned(offset, buf) => d.write_all_at(buf, offset),
            _ => {
                self.buffered += buf.len() as u64;
                self.file.write_all_at(buf, offset)
            }
        }
    }

    fn zero(&mut self, offset: u64, len: u64) -> io::Result<()> {
        if self.skip_zeros {
            return Ok(());
        }
        match self.pending_zero {
            Some((s, e)) if e == offset => self.pending_zero = Some((s, offset + len)),
            _ => {
                self.flush_zero()?;
                self.pending_zero = Some((offset, offset + len));
            }
        }
        Ok(())
    }

    fn checkpoint(&mut self, upto: u64) -> io::Result<()> {
        self.flush_zero()?;
        if std::mem::take(&mut self.buffered) > 0 {
            flush::checkpoint(&mut self.flusher, &self.file, upto)?;
        }
        Ok(())
    }

    fn finish(&mut self, _final_len: u64) -> io::Result<FinishInfo> {
        self.flush_zero()?;
        flush::settle(&mut self.flusher)?;
        self.file.sync_all()?;
        if let Some(d) = &self.direct {
            d.sync_all()?;
        }
        let _ = fadvise(&self.file, 0, None, Advice::DontNeed);
        // Every byte of the image was written or explicitly zeroed.
        Ok(FinishInfo {
            preallocated: false,
        })
    }

    fn abort(&mut self) {
        // A device cannot be emptied like a file: zero what this import wrote, so a
        // failed (or checksum-refused) import leaves no disk content behind.
        self.pending_zero = None;
        self.flusher = None;
        if self.existing {
            let _ = self.file.sync_all();
            return;
        }
        let end = self.written_end.min(self.size);
        if end > 0 {
            tracing::info!(device = %self.path.display(), bytes = end, "zeroing what the failed import wrote");
            if let Err(e) = zero_range(&self.file, &mut self.zero_offload, self.block, 0, end) {
                tracing::warn!(device = %self.path.display(), error = %e, "could not zero the device after a failure");
            }
        }
        let _ = self.file.sync_all();
    }

    fn prepare_random(&mut self, len: u64) -> io::Result<()> {
        // Zero runs are only seen for bytes we write; with random-order writes the gaps
        // are never seen at all, so clear the image's range up front (offloaded to the
        // device where it supports write-zeroes).
        if self.skip_zeros || self.existing {
            return Ok(());
        }
        tracing::info!(device = %self.path.display(), bytes = len, "zeroing the image range before a random-order conversion");
        self.written_end = self.written_end.max(len.min(self.size));
        zero_range(
            &self.file,
            &mut self.zero_offload,
            self.block,
            0,
            len.min(self.size),
        )
    }

    fn path(&self) -> &Path {
        &self.path
    }
}
