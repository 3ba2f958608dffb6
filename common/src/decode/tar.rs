//! Tar, two ways. For a disk image (`IMPORTER_CONTENTTYPE=kubevirt`) the archive must
//! hold exactly one regular file, which is streamed on without ever touching the
//! filesystem. For `archive` content the tar is unpacked into a directory with no way
//! out of it: no absolute paths, no `..`, no writes through links, no device nodes.

use crate::cdi::space::TooLarge;
use crate::error::{io_kind, ErrorKind};
use std::cell::Cell;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};
use std::rc::Rc;

#[derive(Debug, thiserror::Error)]
pub enum TarError {
    #[error("reading tar archive: {0}")]
    Read(#[source] io::Error),
    #[error("tar archive contains no regular file")]
    NoFile,
    #[error("tar archive contains more than one regular file (\"{first}\" and \"{second}\"); a disk archive must hold exactly one")]
    SeveralFiles { first: String, second: String },
    #[error("tar entry {path:?} is unsafe: {why}")]
    Unsafe { path: String, why: &'static str },
    #[error("unpacking {path:?}: {source}")]
    Write {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(transparent)]
    TooLarge(#[from] TooLarge),
    #[error("tar archive: the headers before an entry (GNU long names, PAX records, sparse maps) are larger than {MAX_HEADER_BYTES} bytes")]
    HeaderTooLarge,
    #[error("unpacking {path:?}: the volume is full ({source}); a larger PVC is required")]
    Full {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

impl TarError {
    pub fn kind(&self) -> ErrorKind {
        match self {
            TarError::Read(e) => io_kind(e).unwrap_or(ErrorKind::CorruptImage),
            TarError::Write { source, .. } => io_kind(source).unwrap_or(ErrorKind::Io),
            TarError::TooLarge(_) | TarError::Full { .. } => ErrorKind::TooLarge,
            TarError::NoFile
            | TarError::SeveralFiles { .. }
            | TarError::Unsafe { .. }
            | TarError::HeaderTooLarge => ErrorKind::CorruptImage,
        }
    }
}

/// What the `tar` crate may read between two entries' data: the header blocks, GNU long
/// name/link data, PAX records and GNU sparse maps. It reads all of these into memory,
/// so a hostile archive could name a 1 GiB "file name"; real ones need a few KiB.
pub const MAX_HEADER_BYTES: u64 = 1 << 20;

/// Sits under the `tar` crate: while a budget is set (the crate is looking for the next
/// entry), reads beyond it fail with [`TarError::HeaderTooLarge`]'s condition.
struct HeaderBudget<R> {
    inner: R,
    left: Rc<Cell<Option<u64>>>,
    exceeded: Rc<Cell<bool>>,
}

impl<R: Read> Read for HeaderBudget<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let Some(left) = self.left.get() else {
            return self.inner.read(buf);
        };
        if left == 0 {
            self.exceeded.set(true);
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "tar headers exceed their budget",
            ));
        }
        let want = buf.len().min(usize::try_from(left).unwrap_or(usize::MAX));
        let n = self.inner.read(&mut buf[..want])?;
        self.left.set(Some(left - n as u64));
        Ok(n)
    }
}

/// The budget's two ends: [`Budget::headers`] before asking for the next entry,
/// [`Budget::data`] while an entry's data is read.
#[derive(Clone)]
struct Budget {
    left: Rc<Cell<Option<u64>>>,
    exceeded: Rc<Cell<bool>>,
}

impl Budget {
    fn wrap<R: Read>(reader: R) -> (HeaderBudget<R>, Budget) {
        let b = Budget {
            left: Rc::new(Cell::new(Some(MAX_HEADER_BYTES))),
            exceeded: Rc::new(Cell::new(false)),
        };
        let r = HeaderBudget {
            inner: reader,
            left: b.left.clone(),
            exceeded: b.exceeded.clone(),
        };
        (r, b)
    }
    fn headers(&self) {
        self.left.set(Some(MAX_HEADER_BYTES));
    }
    fn data(&self) {
        self.left.set(None);
    }
    /// A read error of the `tar` crate, named for what it was.
    fn error(&self, e: io::Error) -> TarError {
        if self.exceeded.get() {
            TarError::HeaderTooLarge
        } else {
            TarError::Read(e)
        }
    }
}

/// The next entry, read under the header budget; its data is read without one.
fn next_entry<'a, R: Read>(
    entries: &mut tar::Entries<'a, HeaderBudget<R>>,
    budget: &Budget,
) -> Result<Option<tar::Entry<'a, HeaderBudget<R>>>, TarError> {
    budget.headers();
    let next = entries.next();
    budget.data();
    next.transpose().map_err(|e| budget.error(e))
}

/// One regular file found in a tar stream.
pub struct TarFile<'a> {
    pub name: String,
    pub size: u64,
    pub reader: &'a mut dyn Read,
}

/// Streams the first regular file whose name satisfies `wanted` through `f` (CDI's
/// filesystem clone onto a block volume takes the entry named `disk.img`), then reads
/// the rest of the archive. `None` when no entry matched.
pub fn with_file_named<R, T, E>(
    reader: R,
    wanted: impl Fn(&str) -> bool,
    f: impl FnOnce(TarFile<'_>) -> Result<T, E>,
) -> Result<Option<T>, E>
where
    R: Read,
    E: From<TarError>,
{
    let (reader, budget) = Budget::wrap(reader);
    let mut archive = tar::Archive::new(reader);
    let mut entries = archive.entries().map_err(TarError::Read)?;
    let mut result = None;
    let mut f = Some(f);
    while let Some(mut entry) = next_entry(&mut entries, &budget)? {
        let kind = entry.header().entry_type();
        let name = entry
            .path()
            .map(|p| crate::error::sanitize(&p.display().to_string()))
            .unwrap_or_default();
        if (kind.is_file() || kind.is_gnu_sparse()) && wanted(&name) {
            if let Some(f) = f.take() {
                let size = entry.size();
                result = Some(f(TarFile {
                    name,
                    size,
                    reader: &mut entry,
                })?);
            }
        }
        io::copy(&mut entry, &mut io::sink()).map_err(TarError::Read)?;
    }
    Ok(result)
}

/// Streams the archive's one regular file through `f`, then reads the rest of the
/// archive to make sure there is no second one (a tar with two files is ambiguous; we
/// refuse it instead of guessing). `f`'s error type must absorb tar errors.
pub fn with_single_file<R, T, E>(
    reader: R,
    f: impl FnOnce(TarFile<'_>) -> Result<T, E>,
) -> Result<T, E>
where
    R: Read,
    E: From<TarError>,
{
    let (reader, budget) = Budget::wrap(reader);
    let mut archive = tar::Archive::new(reader);
    let mut entries = archive.entries().map_err(TarError::Read)?;
    let mut result = None;
    let mut first_name = String::new();
    let mut f = Some(f);
    while let Some(mut entry) = next_entry(&mut entries, &budget)? {
        if !entry.header().entry_type().is_file() && !entry.header().entry_type().is_gnu_sparse() {
            // Skipped here, outside the header budget (the crate would skip it there).
            io::copy(&mut entry, &mut io::sink()).map_err(TarError::Read)?;
            continue;
        }
        let name = entry
            .path()
            .map(|p| crate::error::sanitize(&p.display().to_string()))
            .unwrap_or_else(|_| "<invalid name>".into());
        let size = entry.size();
        if let Some(f) = f.take() {
            first_name = name.clone();
            let out = f(TarFile {
                name,
                size,
                reader: &mut entry,
            })?;
            // The consumer may stop early (e.g. after a trailer); drain so the next
            // header is read from the right place.
            io::copy(&mut entry, &mut io::sink()).map_err(TarError::Read)?;
            result = Some(out);
        } else if size > 0 {
            return Err(TarError::SeveralFiles {
                first: first_name,
                second: name,
            }
            .into());
        }
    }
    result.ok_or_else(|| TarError::NoFile.into())
}

/// What [`unpack`] wrote.
#[derive(Debug, Default, Clone, Copy)]
pub struct UnpackStats {
    pub files: u64,
    pub bytes: u64,
}

/// Unpacks a tar stream into `dir`, writing at most `limit` bytes of file content.
/// Permissions are kept (without setuid/setgid/sticky), ownership is not
/// (`--no-same-owner`, as CDI runs tar). Device nodes and fifos are skipped with a log
/// line: an unprivileged pod cannot create them and they have no place on a data volume.
// One function on purpose (114 lines): one entry at a time, each kind of entry (file,
// directory, link, special) with its own safety rule inside the one loop that owns
// the archive's borrow; the tar fuzz target covers it whole.
pub fn unpack<R: Read>(
    reader: R,
    dir: &Path,
    limit: u64,
    mut on_bytes: impl FnMut(u64),
) -> Result<UnpackStats, TarError> {
    let (reader, budget) = Budget::wrap(reader);
    let mut archive = tar::Archive::new(reader);
    let mut stats = UnpackStats::default();
    let mut entries = archive.entries().map_err(TarError::Read)?;
    while let Some(mut entry) = next_entry(&mut entries, &budget)? {
        let raw_path = entry.path().map_err(TarError::Read)?.into_owned();
        let shown = crate::error::sanitize(&raw_path.display().to_string());
        let Some(rel) = safe_relative(&raw_path).map_err(|why| TarError::Unsafe {
            path: shown.clone(),
            why,
        })?
        else {
            io::copy(&mut entry, &mut io::sink()).map_err(TarError::Read)?;
            continue; // "." itself
        };
        let target = dir.join(&rel);
        let kind = entry.header().entry_type();
        let mode = entry.header().mode().unwrap_or(0o644) & 0o777;
        let werr = |source: io::Error| {
            if crate::sink::is_full(&source) {
                TarError::Full {
                    path: target.clone(),
                    source,
                }
            } else {
                TarError::Write {
                    path: target.clone(),
                    source,
                }
            }
        };
        if kind.is_dir() {
            make_dirs(dir, &rel).map_err(werr)?;
            fs::set_permissions(&target, fs::Permissions::from_mode(mode | 0o700)).map_err(werr)?;
        } else if kind.is_file() || kind.is_gnu_sparse() || kind.is_contiguous() {
            if let Some(parent) = rel.parent() {
                make_dirs(dir, parent).map_err(werr)?;
            }
            let mut out = create_nofollow(&target, mode).map_err(werr)?;
            let mut limited = LimitedCopy {
                remaining: limit.saturating_sub(stats.bytes),
                on_bytes: &mut on_bytes,
            };
            let n = limited.copy(&mut entry, &mut out).map_err(|e| match e {
                CopyError::Limit => TarError::TooLarge(TooLarge::Archive { limit }),
                CopyError::Read(e) => TarError::Read(e),
                CopyError::Write(e) => werr(e),
            })?;
            stats.bytes += n;
            stats.files += 1;
        } else if kind.is_symlink() {
            let link = entry
                .link_name()
                .map_err(TarError::Read)?
                .ok_or(TarError::Unsafe {
                    path: shown.clone(),
                    why: "symlink without target",
                })?;
            let parent = rel.parent().unwrap_or(Path::new(""));
            if link.is_absolute() || !stays_inside(parent, &link) {
                return Err(TarError::Unsafe {
                    path: shown,
                    why: "symlink points outside the destination",
                });
            }
            make_dirs(dir, parent).map_err(werr)?;
            std::os::unix::fs::symlink(&link, &target).map_err(werr)?;
        } else if kind.is_hard_link() {
            let link = entry
                .link_name()
                .map_err(TarError::Read)?
                .ok_or(TarError::Unsafe {
                    path: shown.clone(),
                    why: "hard link without target",
                })?;
            let Some(link_rel) = safe_relative(&link).map_err(|why| TarError::Unsafe {
                path: shown.clone(),
                why,
            })?
            else {
                return Err(TarError::Unsafe {
                    path: shown,
                    why: "hard link to the destination itself",
                });
            };
            let src = dir.join(link_rel);
            // Only to a regular file we unpacked ourselves: never through a symlink.
            match fs::symlink_metadata(&src) {
                Ok(m) if m.file_type().is_file() => {}
                _ => {
                    return Err(TarError::Unsafe {
                        path: shown,
                        why: "hard link target is not a regular file inside the destination",
                    })
                }
            }
            if let Some(parent) = rel.parent() {
                make_dirs(dir, parent).map_err(werr)?;
            }
            fs::hard_link(&src, &target).map_err(werr)?;
        } else if kind.is_character_special() || kind.is_block_special() || kind.is_fifo() {
            tracing::warn!(path = %shown, "skipping device node or fifo in archive");
        }
        // Whatever data a non-file entry carries is skipped here, not under the budget.
        io::copy(&mut entry, &mut io::sink()).map_err(TarError::Read)?;
    }
    Ok(stats)
}

/// Where an archive is unpacked before it is known to be complete and verified: a
/// hidden directory inside the destination (same filesystem, so moving is a rename).
/// A failed or checksum-refused import removes it and leaves the volume as it was.
pub struct Staging {
    dir: PathBuf,
    staging: PathBuf,
}

impl Staging {
    pub const NAME: &'static str = ".ferrydisk-unpacking";

    /// Creates it empty (a run killed earlier may have left one behind).
    pub fn create(dir: &Path) -> io::Result<Self> {
        let staging = dir.join(Self::NAME);
        match fs::remove_dir_all(&staging) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
            _ => {}
        }
        fs::create_dir(&staging)?;
        Ok(Staging {
            dir: dir.to_path_buf(),
            staging,
        })
    }

    pub fn path(&self) -> &Path {
        &self.staging
    }

    /// Moves every unpacked top-level entry into the destination, replacing what is
    /// there under the same name (a rerun after a kill), and removes the staging dir.
    pub fn commit(self) -> io::Result<()> {
        for entry in fs::read_dir(&self.staging)? {
            let entry = entry?;
            let target = self.dir.join(entry.file_name());
            match fs::symlink_metadata(&target) {
                Ok(m) if m.file_type().is_dir() => fs::remove_dir_all(&target)?,
                Ok(_) => fs::remove_file(&target)?,
                Err(_) => {}
            }
            fs::rename(entry.path(), &target)?;
        }
        fs::remove_dir(&self.staging)
    }

    /// Removes everything unpacked so far.
    pub fn discard(self) {
        if let Err(e) = fs::remove_dir_all(&self.staging) {
            tracing::warn!(path = %self.staging.display(), error = %e, "could not remove a failed archive import");
        }
    }
}

/// Normalises a tar path to a relative path, refusing absolute paths and `..`.
/// `Ok(None)` means the path names the destination itself (`.` or `./`).
fn safe_relative(p: &Path) -> Result<Option<PathBuf>, &'static str> {
    let mut out = PathBuf::new();
    for c in p.components() {
        match c {
            Component::Normal(s) => out.push(s),
            Component::CurDir => {}
            Component::ParentDir => return Err("path contains '..'"),
            Component::RootDir | Component::Prefix(_) => return Err("absolute path"),
        }
    }
    Ok(if out.as_os_str().is_empty() {
        None
    } else {
        Some(out)
    })
}

/// Whether `link`, taken relative to directory `from` (itself relative to the
/// destination root), stays inside the root when resolved lexically.
fn stays_inside(from: &Path, link: &Path) -> bool {
    let mut depth: i64 = from.components().count() as i64;
    for c in link.components() {
        match c {
            Component::Normal(_) => depth += 1,
            Component::CurDir => {}
            Component::ParentDir => {
                depth -= 1;
                if depth < 0 {
                    return false;
                }
            }
            _ => return false,
        }
    }
    true
}

/// Creates `rel` below `root` one component at a time, refusing to pass through
/// anything that is not a real directory (an earlier entry may have planted a symlink).
fn make_dirs(root: &Path, rel: &Path) -> io::Result<()> {
    let mut cur = root.to_path_buf();
    for c in rel.components() {
        cur.push(c);
        match fs::symlink_metadata(&cur) {
            Ok(m) if m.file_type().is_dir() => {}
            Ok(_) => {
                return Err(io::Error::new(
                    io::ErrorKind::AlreadyExists,
                    "path component exists and is not a directory",
                ));
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => fs::create_dir(&cur)?,
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

fn create_nofollow(path: &Path, mode: u32) -> io::Result<File> {
    // An existing symlink at the final component makes open fail (ELOOP) instead of
    // writing wherever it points; an existing regular file is replaced.
    if let Ok(m) = fs::symlink_metadata(path) {
        if m.file_type().is_file() {
            fs::remove_file(path)?;
        }
    }
    OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)
}

enum CopyError {
    Limit,
    Read(io::Error),
    Write(io::Error),
}

struct LimitedCopy<'a, F: FnMut(u64)> {
    remaining: u64,
    on_bytes: &'a mut F,
}

impl<F: FnMut(u64)> LimitedCopy<'_, F> {
    /// Copies `r` into `w`, leaving holes where a whole 4 KiB block of the file is
    /// zeros (a GNU sparse entry reads back as zeros; a clone keeps its sparseness), and
    /// sets the length at the end so trailing holes count.
    fn copy(&mut self, r: &mut dyn Read, w: &mut File) -> Result<u64, CopyError> {
        use std::os::unix::fs::FileExt;
        const HOLE: usize = crate::sink::SECTOR;
        let mut buf = vec![0u8; 256 * 1024];
        let mut total = 0u64;
        loop {
            let n = match r.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(CopyError::Read(e)),
            };
            if n as u64 > self.remaining {
                return Err(CopyError::Limit);
            }
            self.remaining -= n as u64;
            // Pieces that end on the file's 4 KiB boundaries: written unless all zeros.
            let mut off = 0usize;
            while off < n {
                let at = total + off as u64;
                let to_boundary = HOLE - (at % HOLE as u64) as usize;
                let end = (off + to_boundary).min(n);
                let piece = &buf[off..end];
                if !crate::sink::is_zero(piece) {
                    w.write_all_at(piece, at).map_err(CopyError::Write)?;
                }
                off = end;
            }
            (self.on_bytes)(n as u64);
            total += n as u64;
        }
        w.set_len(total).map_err(CopyError::Write)?;
        Ok(total)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tar_of(entries: &[(&str, tar::EntryType, &[u8], Option<&str>)]) -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        for (name, kind, data, link) in entries {
            let mut h = tar::Header::new_gnu();
            h.set_entry_type(*kind);
            h.set_size(data.len() as u64);
            h.set_mode(0o644);
            if let Some(l) = link {
                h.set_link_name(l).expect("link");
            }
            // Bypass the builder's own path checks: we want hostile names in the stream.
            let nb = name.as_bytes();
            h.as_old_mut().name[..nb.len()].copy_from_slice(nb);
            h.set_cksum();
            b.append(&h, *data).expect("append");
        }
        b.into_inner().expect("finish")
    }

    #[test]
    fn single_file_is_streamed() {
        let t = tar_of(&[
            ("d/", tar::EntryType::Directory, b"", None),
            ("d/disk.img", tar::EntryType::Regular, b"DATA", None),
        ]);
        let got: Result<(String, Vec<u8>), TarError> = with_single_file(&t[..], |f| {
            let mut v = Vec::new();
            f.reader.read_to_end(&mut v).map_err(TarError::Read)?;
            Ok((f.name, v))
        });
        let (name, data) = got.expect("one file");
        assert_eq!(name, "d/disk.img");
        assert_eq!(data, b"DATA");
    }

    #[test]
    fn two_files_refused() {
        let t = tar_of(&[
            ("a", tar::EntryType::Regular, b"1", None),
            ("b", tar::EntryType::Regular, b"2", None),
        ]);
        let r: Result<(), TarError> = with_single_file(&t[..], |_| Ok(()));
        assert!(matches!(r, Err(TarError::SeveralFiles { .. })), "{r:?}");
        let empty = tar_of(&[("d/", tar::EntryType::Directory, b"", None)]);
        let r: Result<(), TarError> = with_single_file(&empty[..], |_| Ok(()));
        assert!(matches!(r, Err(TarError::NoFile)));
    }

    #[test]
    fn unpack_refuses_escapes() {
        for (entries, what) in [
            (
                vec![("../evil", tar::EntryType::Regular, &b"x"[..], None)],
                "dotdot",
            ),
            (
                vec![("/etc/evil", tar::EntryType::Regular, &b"x"[..], None)],
                "absolute",
            ),
            (
                vec![("l", tar::EntryType::Symlink, &b""[..], Some("../../etc"))],
                "symlink out",
            ),
            (
                vec![("l", tar::EntryType::Symlink, &b""[..], Some("/etc"))],
                "symlink absolute",
            ),
            (
                vec![("h", tar::EntryType::Link, &b""[..], Some("../outside"))],
                "hardlink out",
            ),
        ] {
            let dir = tempfile::tempdir().expect("tmp");
            let t = tar_of(&entries);
            let r = unpack(&t[..], dir.path(), u64::MAX, |_| {});
            assert!(matches!(r, Err(TarError::Unsafe { .. })), "{what}: {r:?}");
        }
    }

    #[test]
    fn unpack_never_writes_through_a_symlink() {
        let outside = tempfile::tempdir().expect("tmp");
        let dir = tempfile::tempdir().expect("tmp");
        std::os::unix::fs::symlink(outside.path(), dir.path().join("sub")).expect("plant");
        let t = tar_of(&[("sub/file", tar::EntryType::Regular, b"x", None)]);
        assert!(unpack(&t[..], dir.path(), u64::MAX, |_| {}).is_err());
        assert!(!outside.path().join("file").exists());

        let t = tar_of(&[
            ("inner", tar::EntryType::Symlink, b"", Some("a")),
            ("inner", tar::EntryType::Regular, b"x", None),
        ]);
        let dir2 = tempfile::tempdir().expect("tmp");
        assert!(unpack(&t[..], dir2.path(), u64::MAX, |_| {}).is_err());
    }

    #[test]
    fn unpack_writes_files_links_and_respects_limit() {
        let dir = tempfile::tempdir().expect("tmp");
        let t = tar_of(&[
            ("./a/", tar::EntryType::Directory, b"", None),
            ("./a/f", tar::EntryType::Regular, b"hello", None),
            ("./a/l", tar::EntryType::Symlink, b"", Some("f")),
            ("./h", tar::EntryType::Link, b"", Some("a/f")),
        ]);
        let stats = unpack(&t[..], dir.path(), u64::MAX, |_| {}).expect("unpack");
        assert_eq!(stats.bytes, 5);
        assert_eq!(
            fs::read(dir.path().join("a/l")).expect("via link"),
            b"hello"
        );
        assert_eq!(fs::read(dir.path().join("h")).expect("hardlink"), b"hello");
        let dir = tempfile::tempdir().expect("tmp");
        let r = unpack(&t[..], dir.path(), 3, |_| {});
        assert!(matches!(r, Err(TarError::TooLarge(_))));
    }
}
