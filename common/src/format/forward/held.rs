//! Data read ahead of the tables that say where it goes (a stream cannot seek back):
//! kept in memory up to a bound, then in a spool file on scratch, and without scratch
//! the CDI answer "scratch space required" so the controller mounts one and retries.
//! When the image is a local file, nothing is kept: it is read again from the file
//! (random access), so no layout ever needs memory or scratch.

use std::collections::BTreeMap;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::Arc;

#[derive(Debug, thiserror::Error)]
pub enum HeldError {
    #[error("the image keeps data before the tables that map it ({held} bytes so far) and no scratch space is mounted")]
    ScratchRequired { held: u64 },
    #[error("spooling to scratch: {0}")]
    Spool(#[source] std::io::Error),
    #[error("reading the image file again: {0}")]
    Reread(#[source] std::io::Error),
    #[error("the image scatters data ahead of its tables in more than {0} pieces (refused)")]
    TooScattered(usize),
}

impl HeldError {
    pub fn kind(&self) -> crate::ErrorKind {
        match self {
            HeldError::ScratchRequired { .. } => crate::ErrorKind::ScratchRequired,
            HeldError::TooScattered(_) => crate::ErrorKind::UnsupportedFormat,
            HeldError::Spool(e) | HeldError::Reread(e) => {
                crate::error::io_kind(e).unwrap_or(crate::ErrorKind::Io)
            }
        }
    }
}

/// The most runs a spool's index keeps (~64 bytes each: 16 MiB at most). Data read in
/// stream order is one run however long; only data with gaps between its pieces makes
/// more.
const MAX_RUNS: usize = 1 << 18;

/// An unlinked spool file and its index: runs of held data contiguous in the image,
/// keyed by where each starts in the image, to (offset in the file, length). A run
/// grows while pieces arrive back to back, so 1 GiB of 512-byte clusters in stream
/// order is one entry, not two million.
struct Spool {
    file: File,
    runs: BTreeMap<u64, (u64, u64)>,
    next: u64,
}

impl Spool {
    fn add(&mut self, off: u64, len: u64) -> Result<(), HeldError> {
        if let Some((&start, run)) = self.runs.iter_mut().next_back() {
            if start + run.1 == off && run.0 + run.1 == self.next - len {
                run.1 += len;
                return Ok(());
            }
        }
        if self.runs.len() >= MAX_RUNS {
            return Err(HeldError::TooScattered(MAX_RUNS));
        }
        self.runs.insert(off, (self.next - len, len));
        Ok(())
    }

    /// Where in the file the held data at image offset `off` is, and how much of the
    /// run follows it.
    fn find(&self, off: u64) -> Option<(u64, u64)> {
        let (&start, &(at, len)) = self.runs.range(..=off).next_back()?;
        (off < start + len).then(|| (at + (off - start), start + len - off))
    }
}

/// Data whose role is not known yet, keyed by its offset in the image: memory up to a
/// bound, then a spool file on scratch (unlinked at creation, so nothing is left
/// behind); or, for a local file, the file itself.
pub struct Held {
    /// The image file, read back with `pread` in units of `.1` bytes (of `.2` in all).
    source: Option<(Arc<File>, u64, u64)>,
    /// Runs of held data contiguous in the image, by where each starts: a piece that
    /// follows the last run extends it, so small clusters cost no per-piece overhead.
    mem: BTreeMap<u64, Vec<u8>>,
    mem_bytes: u64,
    limit: u64,
    scratch: Option<PathBuf>,
    spool: Option<Spool>,
    /// The format, for the log line and the spool file's name.
    what: &'static str,
    /// The size of the pieces put and got (a cluster, a chunk); the last may be shorter.
    unit: u64,
}

impl Held {
    pub fn new(what: &'static str, limit: u64, scratch: Option<PathBuf>, unit: u64) -> Self {
        Held {
            source: None,
            what,
            unit: unit.max(1),
            mem: BTreeMap::new(),
            mem_bytes: 0,
            limit,
            scratch,
            spool: None,
        }
    }

    /// Nothing is kept: data is read again from the image file, in `unit` byte pieces.
    pub fn reread_from(mut self, file: &Arc<File>) -> Self {
        if let Ok(m) = file.metadata() {
            self.source = Some((file.clone(), self.unit, m.len()));
        }
        self
    }

    pub fn put(&mut self, off: u64, data: &[u8]) -> Result<(), HeldError> {
        if self.source.is_some() {
            return Ok(());
        }
        if self.mem_bytes + data.len() as u64 <= self.limit {
            self.mem_bytes += data.len() as u64;
            if let Some((&start, run)) = self.mem.iter_mut().next_back() {
                if start + run.len() as u64 == off {
                    run.extend_from_slice(data);
                    return Ok(());
                }
            }
            self.mem.insert(off, data.to_vec());
            return Ok(());
        }
        if self.spool.is_none() {
            let Some(dir) = &self.scratch else {
                return Err(HeldError::ScratchRequired {
                    held: self.mem_bytes,
                });
            };
            let path = dir.join(format!(
                ".ferrydisk-spool-{}-{}",
                std::process::id(),
                self.what
            ));
            let f = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(true)
                .open(&path)
                .map_err(HeldError::Spool)?;
            let _ = std::fs::remove_file(&path);
            tracing::info!(image = self.what, scratch = %dir.display(), held_bytes = self.mem_bytes, "image stores data ahead of the tables that map it: spooling the unmapped data to scratch");
            self.spool = Some(Spool {
                file: f,
                runs: BTreeMap::new(),
                next: 0,
            });
        }
        let Some(sp) = &mut self.spool else {
            unreachable!("spool created above")
        };
        sp.file
            .write_all_at(data, sp.next)
            .map_err(HeldError::Spool)?;
        sp.next += data.len() as u64;
        sp.add(off, data.len() as u64)
    }

    /// A copy: held clusters are only read for out-of-order images, rarely.
    pub fn get(&self, off: u64) -> Result<Option<Vec<u8>>, HeldError> {
        if let Some((f, unit, len)) = &self.source {
            if off >= *len {
                return Ok(None);
            }
            let mut v = vec![0u8; (*unit).min(len - off) as usize];
            f.read_exact_at(&mut v, off).map_err(HeldError::Reread)?;
            return Ok(Some(v));
        }
        if let Some((&start, run)) = self.mem.range(..=off).next_back() {
            let end = start + run.len() as u64;
            if off < end {
                let from = (off - start) as usize;
                let to = from + (end - off).min(self.unit) as usize;
                return Ok(Some(run[from..to].to_vec()));
            }
        }
        if let Some(sp) = &self.spool {
            if let Some((at, rest)) = sp.find(off) {
                let mut v = vec![0u8; rest.min(self.unit) as usize];
                sp.file
                    .read_exact_at(&mut v, at)
                    .map_err(HeldError::Spool)?;
                return Ok(Some(v));
            }
        }
        Ok(None)
    }

    pub fn clear(&mut self) {
        self.mem = BTreeMap::new();
        self.mem_bytes = 0;
        self.spool = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_spool_indexes_runs_not_pieces() {
        let dir = tempfile::tempdir().expect("tmp");
        let mut h = Held::new("test", 1024, Some(dir.path().into()), 512);
        for i in 0..10_000u64 {
            h.put(i * 512, &[(i % 251) as u8; 512]).expect("put");
        }
        // The first two pieces fit in memory (one run); the other 9,998 are one run.
        assert_eq!(h.mem.len(), 1);
        let sp = h.spool.as_ref().expect("spooled");
        assert_eq!(sp.runs.len(), 1);
        h.put(100 << 20, &[7u8; 300]).expect("a piece after a gap");
        assert_eq!(h.spool.as_ref().map(|s| s.runs.len()), Some(2));
        for i in [0u64, 1, 2, 777, 9_999] {
            assert_eq!(
                h.get(i * 512).expect("get"),
                Some(vec![(i % 251) as u8; 512]),
                "piece {i}"
            );
        }
        assert_eq!(h.get(100 << 20).expect("get"), Some(vec![7u8; 300]));
        assert_eq!(h.get(10_000 * 512).expect("get"), None);
        assert_eq!(h.get(200 << 20).expect("get"), None);
    }
}
