//! The second stage: the disk the layer is produced from, opened and described before
//! anything is sent (a local file, or the spool an import wrote), and the layer's form.

use super::error::PushFailure;
use super::layer::{LayerSpec, Layout};
use super::spool::{Origin, Spooled};
use crate::config::push::Payload;
use crate::config::PushConfig;
use ferrydisk_common::format::probe;
use ferrydisk_common::sniff::Format;
use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom};
use std::os::unix::fs::FileExt;
use std::sync::Arc;

/// What `push` needs to know of its source, found before anything is sent.
pub struct Source {
    pub file: Arc<File>,
    pub len: u64,
    pub shown: String,
    pub format: Format,
    pub virtual_size: u64,
    pub spec: LayerSpec,
    pub media: String,
    /// What the config's labels describe: the file itself, or what an import found
    /// in the source it spooled from.
    pub origin: Origin,
}

/// Opens the disk to push: the spool an import wrote, else the source file itself.
/// `given`: what the upload server received, when it pushes the volume it wrote.
pub fn open(
    cfg: &PushConfig,
    spooled: Option<&Spooled>,
    given: Option<Origin>,
) -> Result<Source, PushFailure> {
    let shown = cfg.source.to_string_lossy().to_string();
    let path = spooled.map_or(cfg.source.as_path(), |s| s.disk.as_path());
    let fail = |what: &'static str| {
        let shown = shown.clone();
        move |source| PushFailure::Source {
            what,
            shown,
            source,
        }
    };
    let mut file = File::open(path).map_err(fail("opening"))?;
    let len = source_len(&mut file).map_err(fail("sizing"))?;
    let probed = probe::probe(&mut file).map_err(|e| PushFailure::Probe {
        shown: shown.clone(),
        message: e.to_string(),
    })?;
    let spec = layer_spec(&cfg.payload);
    let media = media_type(&spec, probed.format)?;
    tracing::info!(source = %shown, format = probed.format.name(), virtual_size = probed.virtual_size, source_size = len, layout = ?spec.layout, media_type = %media, dest = %cfg.dest_shown, "pushing");
    let origin = match (spooled, given) {
        (Some(s), _) => s.origin.clone(),
        (None, Some(o)) => o,
        (None, None) => Origin {
            format: probed.format.name().to_string(),
            virtual_size: probed.virtual_size,
            source_size: len,
        },
    };
    Ok(Source {
        file: Arc::new(file),
        len,
        shown,
        format: probed.format,
        virtual_size: probed.virtual_size,
        spec,
        media,
        origin,
    })
}

/// The layer's form: layout, name, compression.
pub fn layer_spec(p: &Payload) -> LayerSpec {
    LayerSpec {
        layout: p.layout,
        disk_name: p.disk_name.clone(),
        zstd: p.zstd.map(|level| (level, zstd_threads())),
    }
}

/// The layer's media type: KubeVirt's one disk type for an artifact (raw+zstd), OCI's
/// tar types for a containerDisk.
pub fn media_type(spec: &LayerSpec, format: Format) -> Result<String, PushFailure> {
    let z = if spec.zstd.is_some() { "+zstd" } else { "" };
    match spec.layout {
        Layout::ContainerDisk => Ok(format!("application/vnd.oci.image.layer.v1.tar{z}")),
        Layout::Artifact if format == Format::Raw && spec.zstd.is_some() => {
            Ok(super::kubevirt::DISK_MEDIA_TYPE.to_string())
        }
        Layout::Artifact => Err(PushFailure::NotRawZstd(format!("{}{z}", format.name()))),
    }
}

/// zstd workers: the cores this process may use, less one for hashing and the upload.
fn zstd_threads() -> u32 {
    let n = std::thread::available_parallelism().map_or(1, |n| n.get());
    u32::try_from(n.saturating_sub(1)).unwrap_or(0)
}

/// The source's length: a file's size, a block device's capacity.
fn source_len(f: &mut File) -> io::Result<u64> {
    let len = f.seek(SeekFrom::End(0))?;
    f.seek(SeekFrom::Start(0))?;
    Ok(len)
}

/// Reads a file front to back, answering its holes (SEEK_HOLE/SEEK_DATA) with zeros
/// instead of reading them; a block device, or a file system without hole reporting,
/// is read whole.
pub struct SkipHoles<'a> {
    f: &'a File,
    pos: u64,
    len: u64,
    /// `[pos, data_end)` is known data, `[pos, hole_end)` a known hole.
    data_end: u64,
    hole_end: u64,
}

impl<'a> SkipHoles<'a> {
    pub fn new(f: &'a File, len: u64) -> Self {
        SkipHoles {
            f,
            pos: 0,
            len,
            data_end: 0,
            hole_end: 0,
        }
    }

    /// Classifies the bytes at `pos`.
    fn locate(&mut self) -> io::Result<()> {
        use rustix::fs::{seek, SeekFrom as Whence};
        let data = match seek(self.f, Whence::Data(self.pos)) {
            Ok(d) => d.min(self.len),
            Err(rustix::io::Errno::NXIO) => self.len, // only a hole remains
            Err(_) => {
                self.data_end = self.len;
                return Ok(());
            }
        };
        if data > self.pos {
            self.hole_end = data;
        } else {
            self.data_end = seek(self.f, Whence::Hole(self.pos))
                .map(|h| h.min(self.len))
                .unwrap_or(self.len)
                .max(self.pos + 1);
        }
        Ok(())
    }
}

impl Read for SkipHoles<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.pos >= self.len || buf.is_empty() {
            return Ok(0);
        }
        if self.pos >= self.hole_end && self.pos >= self.data_end {
            self.locate()?;
        }
        let limit = |end: u64| {
            buf.len()
                .min(usize::try_from(end - self.pos).unwrap_or(usize::MAX))
        };
        let n = if self.pos < self.hole_end {
            let n = limit(self.hole_end);
            buf[..n].fill(0);
            n
        } else {
            let n = limit(self.data_end);
            self.f.read_at(&mut buf[..n], self.pos)?
        };
        self.pos += n as u64;
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    #[test]
    fn holes_read_as_zeros_without_reading_them() {
        let d = tempfile::tempdir().expect("tmp");
        let p = d.path().join("sparse");
        let f = File::create(&p).expect("create");
        f.write_all_at(&[1u8; 4096], 1 << 20).expect("write");
        f.write_all_at(&[2u8; 100], 3 << 20).expect("write");
        f.set_len(5 << 20).expect("len");
        let f = File::open(&p).expect("open");
        let mut got = Vec::new();
        SkipHoles::new(&f, 5 << 20)
            .read_to_end(&mut got)
            .expect("read");
        assert_eq!(got, std::fs::read(&p).expect("read"));
    }
}
