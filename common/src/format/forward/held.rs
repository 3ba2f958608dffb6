//! Data read ahead of the tables that say where it goes (a stream cannot seek back):
//! kept in memory up to a bound, then in a spool file on scratch, and without scratch
//! the CDI answer "scratch space required" so the controller mounts one and retries.
//! When the image is a local file, nothing is kept: it is read again from the file
//! (random access), so no layout ever needs memory or scratch.

use std::collections::HashMap;
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
}

impl HeldError {
    pub fn kind(&self) -> crate::ErrorKind {
        match self {
            HeldError::ScratchRequired { .. } => crate::ErrorKind::ScratchRequired,
            HeldError::Spool(e) | HeldError::Reread(e) => {
                crate::error::io_kind(e).unwrap_or(crate::ErrorKind::Io)
            }
        }
    }
}

/// An unlinked spool file, where each held cluster is (offset in file, length), and
/// the next free offset.
struct Spool {
    file: File,
    index: HashMap<u64, (u64, usize)>,
    next: u64,
}

/// Data whose role is not known yet, keyed by its offset in the image: memory up to a
/// bound, then a spool file on scratch (unlinked at creation, so nothing is left
/// behind); or, for a local file, the file itself.
pub struct Held {
    /// The image file, read back with `pread` in units of `.1` bytes (of `.2` in all).
    source: Option<(Arc<File>, u64, u64)>,
    mem: HashMap<u64, Vec<u8>>,
    mem_bytes: u64,
    limit: u64,
    scratch: Option<PathBuf>,
    spool: Option<Spool>,
    /// The format, for the log line and the spool file's name.
    what: &'static str,
}

impl Held {
    pub fn new(what: &'static str, limit: u64, scratch: Option<PathBuf>) -> Self {
        Held {
            source: None,
            what,
            mem: HashMap::new(),
            mem_bytes: 0,
            limit,
            scratch,
            spool: None,
        }
    }

    /// Nothing is kept: data is read again from the image file, in `unit` byte pieces.
    pub fn reread_from(mut self, file: &Arc<File>, unit: u64) -> Self {
        if let Ok(m) = file.metadata() {
            self.source = Some((file.clone(), unit, m.len()));
        }
        self
    }

    pub fn put(&mut self, off: u64, data: &[u8]) -> Result<(), HeldError> {
        if self.source.is_some() {
            return Ok(());
        }
        if self.mem_bytes + data.len() as u64 <= self.limit {
            self.mem_bytes += data.len() as u64;
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
                index: HashMap::new(),
                next: 0,
            });
        }
        let Some(sp) = &mut self.spool else {
            unreachable!("spool created above")
        };
        sp.file
            .write_all_at(data, sp.next)
            .map_err(HeldError::Spool)?;
        sp.index.insert(off, (sp.next, data.len()));
        sp.next += data.len() as u64;
        Ok(())
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
        if let Some(d) = self.mem.get(&off) {
            return Ok(Some(d.clone()));
        }
        if let Some(sp) = &self.spool {
            if let Some(&(at, len)) = sp.index.get(&off) {
                let mut v = vec![0u8; len];
                sp.file
                    .read_exact_at(&mut v, at)
                    .map_err(HeldError::Spool)?;
                return Ok(Some(v));
            }
        }
        Ok(None)
    }

    pub fn clear(&mut self) {
        self.mem = HashMap::new();
        self.mem_bytes = 0;
        self.spool = None;
    }
}
