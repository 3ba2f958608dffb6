//! The layer a push uploads, made in one forward pass over the source and hashed on the
//! fly: a tar holding `disk/<name>` (a containerDisk) or the disk bytes themselves (an
//! OCI artifact's blob), optionally zstd-compressed. Nothing is buffered beyond the
//! encoder's window and the chunk the uploader is sending, whatever the disk's size.

use sha2::{Digest, Sha256};
use std::io::{self, Read, Write};

/// The uid/gid KubeVirt's containerDisks give the disk (`ADD --chown=107:107`).
pub const QEMU_ID: u64 = 107;

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Layout {
    /// A tar layer holding `disk/<name>`, as `ADD --chown=107:107 disk.img /disk/`.
    #[value(name = "containerdisk")]
    ContainerDisk,
    /// An OCI artifact whose one layer blob is the disk (KubeVirt's disk media types).
    Artifact,
}

#[derive(Debug, Clone)]
pub struct LayerSpec {
    pub layout: Layout,
    pub disk_name: String,
    /// zstd level and worker threads (0: single-threaded); `None`: uncompressed.
    pub zstd: Option<(i32, u32)>,
}

/// What one pass produced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Produced {
    /// `sha256:<hex>` of the stored (maybe compressed) blob.
    pub digest: String,
    pub size: u64,
    /// `sha256:<hex>` of the uncompressed layer (the image config's `diff_ids`).
    pub diff_id: String,
}

/// A writer that hashes and counts what passes through it.
pub struct Hashing<W> {
    inner: W,
    hash: Sha256,
    len: u64,
}

impl<W: Write> Hashing<W> {
    pub fn new(inner: W) -> Self {
        Hashing {
            inner,
            hash: Sha256::new(),
            len: 0,
        }
    }

    /// The inner writer, `sha256:<hex>` and the byte count.
    pub fn finish(self) -> (W, String, u64) {
        let digest = format!("sha256:{}", hex::encode(self.hash.finalize()));
        (self.inner, digest, self.len)
    }
}

impl<W: Write> Write for Hashing<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hash.update(&buf[..n]);
        self.len += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// A `--disk-name` that cannot be `disk/<name>` in a tar.
#[derive(Debug, thiserror::Error)]
pub enum DiskNameError {
    #[error("disk name {0:?} must be one plain file name (no '/', not '.' or '..')")]
    NotPlain(String),
    #[error("disk name {name:?} is {} bytes; at most 95 fit the tar entry disk/<name>", name.len())]
    TooLong { name: String },
}

/// A disk name for `disk/<name>`: one plain path component that fits a ustar name.
pub fn check_disk_name(name: &str) -> Result<(), DiskNameError> {
    let plain = !name.is_empty()
        && name != "."
        && name != ".."
        && !name.contains('/')
        && !name.contains('\0')
        && !name.chars().any(char::is_control);
    if !plain {
        return Err(DiskNameError::NotPlain(name.to_string()));
    }
    if name.len() > 95 {
        return Err(DiskNameError::TooLong {
            name: name.to_string(),
        });
    }
    Ok(())
}

/// Copies exactly `len` bytes in 1 MiB reads; a source that ends early is an error
/// rather than a short disk under a header that promised more.
fn copy_exact(source: &mut dyn Read, len: u64, w: &mut dyn Write) -> io::Result<()> {
    let mut buf = vec![0u8; 1 << 20];
    let mut left = len;
    while left > 0 {
        let want = buf.len().min(usize::try_from(left).unwrap_or(usize::MAX));
        let n = match source.read(&mut buf[..want]) {
            Ok(0) => {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    format!(
                        "the source ended {left} bytes early (did it shrink while being pushed?)"
                    ),
                ))
            }
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        w.write_all(&buf[..n])?;
        left -= n as u64;
    }
    Ok(())
}

fn tar_header(path: &str, size: u64, dir: bool) -> io::Result<tar::Header> {
    let mut h = tar::Header::new_gnu();
    h.set_path(path)?;
    h.set_size(size);
    h.set_entry_type(if dir {
        tar::EntryType::Directory
    } else {
        tar::EntryType::Regular
    });
    h.set_mode(if dir { 0o555 } else { 0o644 });
    h.set_uid(QEMU_ID);
    h.set_gid(QEMU_ID);
    h.set_mtime(0);
    h.set_cksum();
    Ok(h)
}

/// The uncompressed layer: the disk's bytes (artifact) or a tar of `disk/` and
/// `disk/<name>` (containerDisk; sizes over 8 GiB take GNU's base-256 size field).
fn write_payload(
    source: &mut dyn Read,
    len: u64,
    spec: &LayerSpec,
    w: &mut dyn Write,
) -> io::Result<()> {
    match spec.layout {
        Layout::Artifact => copy_exact(source, len, w),
        Layout::ContainerDisk => {
            w.write_all(&tar_prefix(&spec.disk_name, len)?)?;
            copy_exact(source, len, w)?;
            w.write_all(&tar_suffix(len))
        }
    }
}

/// What comes before a containerDisk's `len` disk bytes: the `disk/` entry and the
/// header of `disk/<name>`.
pub fn tar_prefix(disk_name: &str, len: u64) -> io::Result<Vec<u8>> {
    let mut out = Vec::with_capacity(1024);
    out.extend_from_slice(tar_header("disk/", 0, true)?.as_bytes());
    let name = format!("disk/{disk_name}");
    out.extend_from_slice(tar_header(&name, len, false)?.as_bytes());
    Ok(out)
}

/// What comes after them: the entry's padding, then the two zero blocks that end an
/// archive.
pub fn tar_suffix(len: u64) -> Vec<u8> {
    let pad = ((512 - len % 512) % 512) as usize;
    vec![0u8; pad + 1024]
}

/// One pass: the layer made from `len` bytes of `source`, written to `out`.
pub fn produce<W: Write>(
    source: &mut dyn Read,
    len: u64,
    spec: &LayerSpec,
    out: W,
) -> io::Result<(W, Produced)> {
    let mut blob = BlobWriter::new(out, spec.zstd)?;
    write_payload(source, len, spec, &mut blob)?;
    blob.finish()
}

/// A layer blob as its payload is written into it: plain, or through zstd, hashed on
/// both sides (the blob's digest and size, the payload's diff id).
pub enum BlobWriter<W: Write> {
    Plain(Hashing<W>),
    Zstd(Hashing<zstd::stream::Encoder<'static, Hashing<W>>>),
}

impl<W: Write> BlobWriter<W> {
    /// `zstd`: (level, worker threads; 0 compresses on the caller's thread).
    pub fn new(out: W, zstd: Option<(i32, u32)>) -> io::Result<Self> {
        Ok(match zstd {
            None => BlobWriter::Plain(Hashing::new(out)),
            Some((level, threads)) => {
                let mut enc = zstd::stream::Encoder::new(Hashing::new(out), level)?;
                if threads > 0 {
                    enc.multithread(threads)?;
                }
                BlobWriter::Zstd(Hashing::new(enc))
            }
        })
    }

    /// Ends the blob: the writer it went to and what was made.
    pub fn finish(self) -> io::Result<(W, Produced)> {
        Ok(match self {
            BlobWriter::Plain(h) => {
                let (out, digest, size) = h.finish();
                (
                    out,
                    Produced {
                        diff_id: digest.clone(),
                        digest,
                        size,
                    },
                )
            }
            BlobWriter::Zstd(h) => {
                let (enc, diff_id, _) = h.finish();
                let (out, digest, size) = enc.finish()?.finish();
                (
                    out,
                    Produced {
                        digest,
                        size,
                        diff_id,
                    },
                )
            }
        })
    }
}

impl<W: Write> Write for BlobWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            BlobWriter::Plain(w) => w.write(buf),
            BlobWriter::Zstd(w) => w.write(buf),
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        match self {
            BlobWriter::Plain(w) => w.flush(),
            BlobWriter::Zstd(w) => w.flush(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferrydisk_common::checksum::sha256_digest;

    fn spec(layout: Layout, zstd: Option<(i32, u32)>) -> LayerSpec {
        LayerSpec {
            layout,
            disk_name: "disk.img".into(),
            zstd,
        }
    }

    #[test]
    fn containerdisk_tar_holds_the_disk_owned_by_107() {
        let disk: Vec<u8> = (0..10_000u32).map(|i| (i % 251) as u8).collect();
        let (tar_bytes, p) = produce(
            &mut &disk[..],
            disk.len() as u64,
            &spec(Layout::ContainerDisk, None),
            Vec::new(),
        )
        .expect("produce");
        assert_eq!(p.digest, sha256_digest(&tar_bytes));
        assert_eq!(p.diff_id, p.digest);
        assert_eq!(p.size, tar_bytes.len() as u64);
        let mut a = tar::Archive::new(&tar_bytes[..]);
        let mut names = Vec::new();
        for e in a.entries().expect("entries") {
            let mut e = e.expect("entry");
            let h = e.header().clone();
            names.push(e.path().expect("path").display().to_string());
            assert_eq!((h.uid().expect("uid"), h.gid().expect("gid")), (107, 107));
            if h.entry_type().is_file() {
                assert_eq!(h.mode().expect("mode"), 0o644);
                let mut got = Vec::new();
                e.read_to_end(&mut got).expect("read");
                assert_eq!(got, disk);
            }
        }
        assert_eq!(names, ["disk/", "disk/disk.img"]);
    }

    #[test]
    fn zstd_layers_hash_both_sides_and_are_deterministic() {
        let disk = vec![7u8; 1 << 20];
        let s = spec(Layout::Artifact, Some((3, 0)));
        let (z, p) = produce(&mut &disk[..], disk.len() as u64, &s, Vec::new()).expect("zstd");
        assert_eq!(p.digest, sha256_digest(&z));
        assert_eq!(p.diff_id, sha256_digest(&disk));
        assert_eq!(zstd::decode_all(&z[..]).expect("decode"), disk);
        let (_, again) = produce(&mut &disk[..], disk.len() as u64, &s, io::sink()).expect("again");
        assert_eq!(again, p);
    }

    #[test]
    fn a_source_shorter_than_promised_is_an_error() {
        let disk = [1u8; 100];
        let e = produce(
            &mut &disk[..],
            200,
            &spec(Layout::ContainerDisk, None),
            io::sink(),
        )
        .expect_err("short");
        assert!(e.to_string().contains("100 bytes early"), "{e}");
    }

    #[test]
    fn disk_names_are_one_plain_component() {
        assert!(check_disk_name("disk.img").is_ok());
        for bad in ["", ".", "..", "a/b", "x\ny"] {
            assert!(check_disk_name(bad).is_err(), "{bad:?}");
        }
        assert!(check_disk_name(&"a".repeat(96)).is_err());
    }
}
