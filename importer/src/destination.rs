//! Where the image goes and how much of it fits (docs/cdi-contract.md sections 1.4 and 1.7).

use ferrydisk_common::cdi::space::usable_space;
use ferrydisk_common::sink::is_block_device;
use std::io;
use std::path::{Path, PathBuf};

#[derive(Debug, Clone, PartialEq)]
pub enum Destination {
    /// A disk image file (`/data/disk.img`).
    File(PathBuf),
    /// A block device written in place (`/dev/cdi-block-volume`).
    Block(PathBuf),
    /// A directory an archive is unpacked into (`/data`).
    Dir(PathBuf),
}

impl Destination {
    /// CDI decides purely by the block device's existence; `--dest` overrides.
    pub fn choose(
        dest: Option<&Path>,
        block_device: &Path,
        data_dir: &Path,
        archive: bool,
    ) -> Self {
        if archive {
            return Destination::Dir(data_dir.to_path_buf());
        }
        match dest {
            Some(d) if is_block_device(d) => Destination::Block(d.to_path_buf()),
            Some(d) => Destination::File(d.to_path_buf()),
            None if block_device.exists() => Destination::Block(block_device.to_path_buf()),
            None => Destination::File(data_dir.join("disk.img")),
        }
    }

    pub fn path(&self) -> &Path {
        match self {
            Destination::File(p) | Destination::Block(p) | Destination::Dir(p) => p,
        }
    }
}

/// Free bytes for an unprivileged writer on the filesystem holding `path`
/// (Go: `Bavail * Bsize`).
pub fn fs_available(path: &Path) -> io::Result<u64> {
    let s = rustix::fs::statvfs(path)?;
    Ok(s.f_bavail.saturating_mul(s.f_bsize))
}

/// The space rules for a filesystem destination.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct FileSpace {
    /// CDI's `availableSpace`: `min(statfs avail, IMPORTER_IMAGE_SIZE)`. An image whose
    /// virtual size exceeds it is refused ("A larger PVC is required").
    pub available: u64,
    pub requested: Option<u64>,
    pub overhead: f64,
}

impl FileSpace {
    pub fn new(fs_avail: u64, requested: Option<u64>, overhead: f64) -> Self {
        let available = requested.map_or(fs_avail, |r| r.min(fs_avail));
        FileSpace {
            available,
            requested,
            overhead,
        }
    }

    /// CDI's resize rule: grow to `min(requested, GetUsableSpace(overhead, available))`,
    /// never shrink below the image.
    pub fn final_len(&self, virtual_size: u64) -> u64 {
        match self.requested {
            Some(req) => virtual_size.max(req.min(usable_space(self.overhead, self.available))),
            None => virtual_size,
        }
    }

    /// A blank disk's size: the usable size of the available space.
    pub fn blank_len(&self) -> u64 {
        usable_space(self.overhead, self.available)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resize_rule() {
        let s = FileSpace::new(100 << 30, Some(1 << 30), 0.06);
        assert_eq!(s.available, 1 << 30);
        assert_eq!(s.final_len(10 << 20), 966 << 20);
        assert_eq!(
            s.final_len(1000 << 20),
            1000 << 20,
            "never shrinks below the image"
        );
        let s = FileSpace::new(512 << 20, Some(1 << 30), 0.0);
        assert_eq!(s.available, 512 << 20, "the filesystem bounds it");
        assert_eq!(FileSpace::new(5, None, 0.0).final_len(3), 3);
    }

    #[test]
    fn choice() {
        let d = Destination::choose(
            None,
            Path::new("/nonexistent/dev"),
            Path::new("/data"),
            false,
        );
        assert_eq!(d, Destination::File("/data/disk.img".into()));
        let d = Destination::choose(
            None,
            Path::new("/nonexistent/dev"),
            Path::new("/data"),
            true,
        );
        assert_eq!(d, Destination::Dir("/data".into()));
    }
}
