//! A filesystem volume as GNU tar, written natively (CDI's cloner runs `tar cv -S`):
//! directories, regular files and symlinks, recursively, `lost+found` at the top level
//! skipped. A regular file with holes becomes a GNU sparse entry (type `S`, the map in
//! the header and its extension blocks, only the data segments stored), found with
//! SEEK_DATA/SEEK_HOLE, so a 64 GiB disk with 1 GiB of data sends 1 GiB; with
//! preallocation (CDI: no `-S`) files are stored whole. Device nodes, fifos and sockets
//! are skipped with a log line: they are not volume data.

use std::fs::{self, File};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::Path;

/// Sparse map entries in the GNU header itself, and in each extension block.
const IN_HEADER: usize = 4;
const PER_EXTENSION: usize = 21;

/// Writes the tar of `mount` (its entries, not the directory itself) to `out`.
pub fn write_tar(mount: &Path, sparse: bool, out: impl Write) -> io::Result<u64> {
    let mut b = tar::Builder::new(out);
    b.follow_symlinks(false);
    let mut bytes = 0u64;
    let mut names: Vec<_> = fs::read_dir(mount)?
        .collect::<Result<Vec<_>, _>>()?
        .into_iter()
        .map(|e| e.file_name())
        .filter(|n| n != "lost+found")
        .collect();
    names.sort();
    for n in names {
        add(&mut b, mount, Path::new(&n), sparse, &mut bytes)?;
    }
    b.into_inner()?.flush()?;
    Ok(bytes)
}

fn add<W: Write>(
    b: &mut tar::Builder<W>,
    root: &Path,
    rel: &Path,
    sparse: bool,
    bytes: &mut u64,
) -> io::Result<()> {
    let path = root.join(rel);
    let meta = fs::symlink_metadata(&path)?;
    let t = meta.file_type();
    let mut h = tar::Header::new_gnu();
    h.set_metadata_in_mode(&meta, tar::HeaderMode::Complete);
    if t.is_dir() {
        b.append_data(&mut h, rel, io::empty())?;
        let mut names: Vec<_> = fs::read_dir(&path)?
            .collect::<Result<Vec<_>, _>>()?
            .into_iter()
            .map(|e| e.file_name())
            .collect();
        names.sort();
        for n in names {
            add(b, root, &rel.join(n), sparse, bytes)?;
        }
    } else if t.is_symlink() {
        let target = fs::read_link(&path)?;
        h.set_size(0);
        b.append_link(&mut h, rel, target)?;
    } else if t.is_file() {
        let mut f = File::open(&path)?;
        let len = meta.len();
        let segments = if sparse && meta.blocks() * 512 < len {
            data_segments(&mut f, len)?
        } else {
            vec![(0, len)]
        };
        *bytes += segments.iter().map(|s| s.1).sum::<u64>();
        if segments.len() == 1 && segments[0] == (0, len) {
            h.set_size(len);
            b.append_data(&mut h, rel, f)?;
        } else {
            append_sparse(b, &mut h, rel, f, len, &segments)?;
        }
    } else if t.is_block_device() || t.is_char_device() || t.is_fifo() || t.is_socket() {
        tracing::info!(path = %rel.display(), "skipped: not a file, directory or symlink");
    }
    Ok(())
}

/// The file's data as (offset, length) runs, by SEEK_DATA/SEEK_HOLE. A file that ends
/// in a hole gets a last empty run at its end, as GNU tar writes it.
fn data_segments(f: &mut File, len: u64) -> io::Result<Vec<(u64, u64)>> {
    use rustix::fs::{seek, SeekFrom as Whence};
    let mut runs = Vec::new();
    let mut at = 0u64;
    while at < len {
        let start = match seek(&*f, Whence::Data(at)) {
            Ok(s) => s,
            Err(rustix::io::Errno::NXIO) => break, // only a hole remains
            Err(e) => return Err(e.into()),
        };
        let end = seek(&*f, Whence::Hole(start))?.min(len);
        runs.push((start, end - start));
        at = end;
    }
    if runs.last().is_none_or(|&(o, l)| o + l < len) {
        runs.push((len, 0));
    }
    f.seek(SeekFrom::Start(0))?;
    Ok(runs)
}

/// A GNU sparse entry: the header with the first map entries and the real size,
/// extension blocks with the rest, then the data runs.
fn append_sparse<W: Write>(
    b: &mut tar::Builder<W>,
    h: &mut tar::Header,
    rel: &Path,
    f: File,
    len: u64,
    runs: &[(u64, u64)],
) -> io::Result<()> {
    h.set_entry_type(tar::EntryType::GNUSparse);
    h.set_size(runs.iter().map(|r| r.1).sum());
    let gnu = h
        .as_gnu_mut()
        .ok_or_else(|| io::Error::other("not a GNU header"))?;
    gnu.set_real_size(len);
    for (slot, &(off, n)) in gnu.sparse.iter_mut().zip(runs) {
        slot.set_offset(off);
        slot.set_length(n);
    }
    let rest = runs.get(IN_HEADER..).unwrap_or(&[]);
    gnu.set_is_extended(!rest.is_empty());
    let mut ext = Vec::new();
    let chunks: Vec<_> = rest.chunks(PER_EXTENSION).collect();
    for (i, chunk) in chunks.iter().enumerate() {
        let mut e = tar::GnuExtSparseHeader::new();
        for (slot, &(off, n)) in e.sparse_mut().iter_mut().zip(chunk.iter()) {
            slot.set_offset(off);
            slot.set_length(n);
        }
        e.set_is_extended(i + 1 < chunks.len());
        ext.extend_from_slice(e.as_bytes());
    }
    let data = Runs {
        f,
        runs: runs.to_vec(),
        idx: 0,
        left: runs.first().map_or(0, |r| r.1),
        positioned: false,
    };
    // The extension blocks follow the header directly; `append_data` would set the path
    // (long names need GNU long-name entries first), so the path goes through it.
    h.set_cksum();
    b.append_data(h, rel, io::Cursor::new(ext).chain(data))
}

/// Reads the data runs of a file one after the other.
struct Runs {
    f: File,
    runs: Vec<(u64, u64)>,
    idx: usize,
    left: u64,
    positioned: bool,
}

impl Read for Runs {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            let Some(&(off, _)) = self.runs.get(self.idx) else {
                return Ok(0);
            };
            if self.left == 0 {
                self.idx += 1;
                self.left = self.runs.get(self.idx).map_or(0, |r| r.1);
                self.positioned = false;
                continue;
            }
            if !self.positioned {
                self.f.seek(SeekFrom::Start(off))?;
                self.positioned = true;
            }
            let want = buf.len().min(self.left as usize);
            let n = self.f.read(&mut buf[..want])?;
            if n == 0 {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "the file shrank while it was being cloned",
                ));
            }
            self.left -= n as u64;
            return Ok(n);
        }
    }
}

/// `du -sb` (`apparent`) or `du -s --block-size=1` of a tree, symlinks not followed.
pub fn du(path: &Path, apparent: bool) -> u64 {
    let Ok(meta) = fs::symlink_metadata(path) else {
        return 0;
    };
    let own = if apparent {
        meta.len()
    } else {
        meta.blocks() * 512
    };
    if !meta.is_dir() {
        return own;
    }
    own + fs::read_dir(path)
        .map(|it| {
            it.filter_map(Result::ok)
                .map(|e| du(&e.path(), apparent))
                .sum::<u64>()
        })
        .unwrap_or(0)
}
