//! A regular file as the disk (`/data/disk.img`). The file is truncated when opened, so
//! every byte we do not write is a hole that reads as zero: a rerun after `kill -9`
//! starts from an empty file, never appends, and zero runs cost nothing.

use super::flush::{self, Flusher};
use super::{FinishInfo, Target};
use rustix::fs::{fadvise, fallocate, Advice, FallocateFlags};
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

pub struct FileTarget {
    path: PathBuf,
    file: File,
    /// A second handle with O_DIRECT for aligned writes, when asked for (the default,
    /// or `CACHE_MODE=TRYNONE`) and the filesystem allows it (tmpfs, for one, does not).
    direct: Option<File>,
    /// Bytes written through the page cache since the last checkpoint (all of them
    /// without O_DIRECT; with it, the unaligned writes: an image's tail, qcow2 headers).
    buffered: u64,
    preallocate: bool,
    /// Write-behind for checkpoints (buffered writes only), started at the first one.
    flusher: Option<Flusher>,
    /// Opened over a disk that holds data ([`FileTarget::open_existing`]): zero runs are
    /// zeroed, the file is never shortened, and a failure leaves it as it is.
    existing: bool,
}

impl FileTarget {
    /// Creates or truncates `path` (mode 0660, as CDI leaves disk.img).
    pub fn create(path: &Path, preallocate: bool, try_direct: bool) -> io::Result<Self> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o660)
            // A `disk.img` symlink left on a volume must not redirect the write.
            .custom_flags(libc::O_NOFOLLOW)
            .open(path)?;
        // An existing file keeps its old mode through open(); CDI chmods to 0660.
        file.set_permissions(std::fs::Permissions::from_mode(0o660))?;
        let direct = if try_direct {
            match OpenOptions::new()
                .write(true)
                .custom_flags(libc::O_DIRECT | libc::O_NOFOLLOW)
                .open(path)
            {
                Ok(f) => Some(f),
                Err(e) => {
                    tracing::info!(path = %path.display(), error = %e, "O_DIRECT not available on this destination; using buffered writes with page-cache checkpoints");
                    None
                }
            }
        } else {
            None
        };
        Ok(FileTarget {
            path: path.to_path_buf(),
            file,
            direct,
            buffered: 0,
            preallocate,
            flusher: None,
            existing: false,
        })
    }

    /// Opens the disk at `path` as it is, to change part of it (a warm migration's
    /// delta): nothing is truncated, zero runs are punched out (or written where the
    /// filesystem cannot punch), and a failed write leaves the disk as it stands; the
    /// delta is applied again whole by the next attempt.
    pub fn open_existing(path: &Path) -> io::Result<Self> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NOFOLLOW)
            .open(path)?;
        Ok(FileTarget {
            path: path.to_path_buf(),
            file,
            direct: None,
            buffered: 0,
            preallocate: false,
            flusher: None,
            existing: true,
        })
    }

    /// Zeroes `[offset, offset + len)` of an existing disk: a punched hole, else zeros.
    fn zero_existing(&mut self, offset: u64, len: u64) -> io::Result<()> {
        let flags = FallocateFlags::PUNCH_HOLE | FallocateFlags::KEEP_SIZE;
        if fallocate(&self.file, flags, offset, len).is_ok() {
            return Ok(());
        }
        let zeros = vec![0u8; len.min(1 << 20) as usize];
        let mut at = offset;
        while at < offset + len {
            let n = (offset + len - at).min(zeros.len() as u64) as usize;
            self.file.write_all_at(&zeros[..n], at)?;
            self.buffered += n as u64;
            at += n as u64;
        }
        Ok(())
    }
}

impl Target for FileTarget {
    fn write_at(&mut self, offset: u64, buf: &[u8]) -> io::Result<()> {
        match &self.direct {
            Some(d) if super::direct_aligned(offset, buf) => d.write_all_at(buf, offset),
            _ => {
                self.buffered += buf.len() as u64;
                self.file.write_all_at(buf, offset)
            }
        }
    }

    fn zero(&mut self, offset: u64, len: u64) -> io::Result<()> {
        if self.existing {
            return self.zero_existing(offset, len);
        }
        Ok(()) // a hole in a freshly truncated file already reads as zeros
    }

    fn checkpoint(&mut self, upto: u64) -> io::Result<()> {
        if std::mem::take(&mut self.buffered) > 0 {
            flush::checkpoint(&mut self.flusher, &self.file, upto)?;
        }
        Ok(())
    }

    fn finish(&mut self, final_len: u64) -> io::Result<FinishInfo> {
        flush::settle(&mut self.flusher)?;
        let len = self.file.metadata()?.len();
        // An existing disk is only ever grown (the disk the last stage sized stays).
        if len != final_len && !(self.existing && final_len < len) {
            self.file.set_len(final_len)?;
        }
        let mut preallocated = false;
        if self.preallocate && final_len > 0 {
            match fallocate(&self.file, FallocateFlags::empty(), 0, final_len) {
                Ok(()) => preallocated = true,
                Err(e) => {
                    tracing::warn!(path = %self.path.display(), error = %e, "preallocation not supported by this filesystem; the disk stays sparse")
                }
            }
        }
        self.file.sync_all()?;
        if let Some(d) = &self.direct {
            d.sync_all()?;
        }
        let _ = fadvise(&self.file, 0, None, Advice::DontNeed);
        Ok(FinishInfo { preallocated })
    }

    fn abort(&mut self) {
        self.flusher = None;
        if self.existing {
            // The disk of earlier stages stays; the next attempt applies the delta again.
            let _ = self.file.sync_all();
            return;
        }
        // A half-written disk must not look like a disk: empty it (and free its space).
        let _ = self.file.set_len(0);
        let _ = self.file.sync_all();
    }

    fn prepare_random(&mut self, _len: u64) -> io::Result<()> {
        Ok(()) // truncated at open: unwritten ranges are holes
    }

    fn path(&self) -> &std::path::Path {
        &self.path
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    #[test]
    fn an_existing_disk_is_changed_in_place_zeroed_where_asked_and_kept_on_abort() {
        let dir = tempfile::tempdir().expect("tmp");
        let p = dir.path().join("disk.img");
        std::fs::write(&p, vec![0xffu8; 1 << 20]).expect("old content");
        let mut t = FileTarget::open_existing(&p).expect("open");
        t.write_at(4096, &[1u8; 4096]).expect("write");
        t.zero(65536, 65536).expect("zero");
        t.finish(512 << 10).expect("finish: never shortened");
        let data = std::fs::read(&p).expect("read");
        assert_eq!(data.len(), 1 << 20);
        assert!(data[..4096].iter().all(|&b| b == 0xff), "untouched");
        assert!(data[4096..8192].iter().all(|&b| b == 1), "written");
        assert!(data[65536..131072].iter().all(|&b| b == 0), "zeroed");
        assert!(data[131072..].iter().all(|&b| b == 0xff), "untouched");
        let mut t = FileTarget::open_existing(&p).expect("open");
        t.write_at(0, &[2u8; 512]).expect("write");
        t.abort();
        assert_eq!(
            std::fs::read(&p).expect("read").len(),
            1 << 20,
            "kept on abort"
        );
    }

    #[test]
    fn truncates_and_sets_length_sparsely() {
        let dir = tempfile::tempdir().expect("tmp");
        let p = dir.path().join("disk.img");
        std::fs::write(&p, vec![0xffu8; 1 << 20]).expect("old content");
        let mut t = FileTarget::create(&p, false, false).expect("create");
        t.write_at(8192, &[1u8; 4096]).expect("write");
        t.finish(64 << 20).expect("finish");
        let data = std::fs::read(&p).expect("read");
        assert_eq!(data.len(), 64 << 20);
        assert!(
            data[..8192].iter().all(|&b| b == 0),
            "old content must be gone"
        );
        assert_eq!(data[8192], 1);
        let m = std::fs::metadata(&p).expect("meta");
        assert!(m.blocks() * 512 < 1 << 20, "sparse: {} blocks", m.blocks());
        assert_eq!(m.mode() & 0o777, 0o660);
    }

    #[test]
    fn preallocation_allocates() {
        let dir = tempfile::tempdir().expect("tmp");
        let p = dir.path().join("disk.img");
        let mut t = FileTarget::create(&p, true, false).expect("create");
        let info = t.finish(8 << 20).expect("finish");
        if info.preallocated {
            assert!(std::fs::metadata(&p).expect("meta").blocks() * 512 >= 8 << 20);
        }
    }

    #[test]
    fn abort_empties_the_file() {
        let dir = tempfile::tempdir().expect("tmp");
        let p = dir.path().join("disk.img");
        let mut t = FileTarget::create(&p, false, false).expect("create");
        t.write_at(0, &[1u8; 4096]).expect("write");
        t.abort();
        assert_eq!(std::fs::metadata(&p).expect("meta").len(), 0);
    }
}
