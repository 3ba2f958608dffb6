//! A target that keeps no data, only what a second pass needs to stream the disk with
//! its size and layout known up front: the final length, which 64 KiB clusters hold
//! data (one bit each: 2 MiB of memory per TiB of disk), whether the data came in guest
//! order, and whether the image was kept in its own format (a qcow2 pushed as it is).
//!
//! A push to a registry cannot seek back: a containerDisk's tar header needs the disk's
//! length before its first byte, and a qcow2 its tables before the data they map. When
//! the source does not say these (a raw.xz's length is known only at its end; a disk
//! converted to qcow2 is laid out by what its clusters hold), the import runs once into
//! this target, then again into the upload.

use super::{FinishInfo, Target};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

/// The cluster size the bitmap counts in: the qcow2 writers' (64 KiB).
use super::qcow2::CLUSTER_BITS;

/// Which clusters of a disk hold data (a set bit: at least one non-zero byte).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Clusters {
    words: Vec<u64>,
}

impl Clusters {
    pub fn mark(&mut self, cluster: u64) {
        let (w, b) = ((cluster / 64) as usize, cluster % 64);
        if w >= self.words.len() {
            self.words.resize(w + 1, 0);
        }
        self.words[w] |= 1 << b;
    }

    pub fn has(&self, cluster: u64) -> bool {
        let (w, b) = ((cluster / 64) as usize, cluster % 64);
        self.words.get(w).is_some_and(|x| x & (1 << b) != 0)
    }

    /// Clusters with data in `[from, to)`.
    pub fn count(&self, from: u64, to: u64) -> u64 {
        let mut n = 0u64;
        let mut c = from;
        while c < to {
            let (w, b) = ((c / 64) as usize, c % 64);
            let Some(&word) = self.words.get(w) else {
                break;
            };
            // The bits of this word from `b` up to `to`.
            let width = (64 - b).min(to - c);
            let mask = if width == 64 {
                u64::MAX
            } else {
                ((1u64 << width) - 1) << b
            };
            n += u64::from((word & mask).count_ones());
            c += width;
        }
        n
    }

    /// Clusters with data in all.
    pub fn total(&self) -> u64 {
        self.words.iter().map(|w| u64::from(w.count_ones())).sum()
    }
}

/// What the measuring pass found.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Measured {
    /// The disk's final length (a kept image's own length).
    pub len: u64,
    pub clusters: Clusters,
    /// Every write began at or after the end of the writes before it.
    pub in_order: bool,
    /// The image was kept in its own format (see [`Target::keep_format`]).
    pub verbatim: bool,
}

pub struct MeasureTarget {
    found: Arc<Mutex<Option<Measured>>>,
    now: Measured,
    end: u64,
    shown: PathBuf,
}

impl MeasureTarget {
    /// What was measured is left in `found` when the pass finishes.
    pub fn new(found: Arc<Mutex<Option<Measured>>>, shown: &str) -> Self {
        MeasureTarget {
            found,
            now: Measured {
                in_order: true,
                ..Default::default()
            },
            end: 0,
            shown: PathBuf::from(shown),
        }
    }
}

impl Target for MeasureTarget {
    fn write_at(&mut self, offset: u64, buf: &[u8]) -> io::Result<()> {
        if buf.is_empty() {
            return Ok(());
        }
        if offset < self.end {
            self.now.in_order = false;
        }
        let last = offset + buf.len() as u64 - 1;
        for c in offset >> CLUSTER_BITS..=last >> CLUSTER_BITS {
            self.now.clusters.mark(c);
        }
        self.end = self.end.max(last + 1);
        Ok(())
    }

    fn zero(&mut self, _offset: u64, _len: u64) -> io::Result<()> {
        Ok(())
    }

    fn checkpoint(&mut self, _upto: u64) -> io::Result<()> {
        Ok(())
    }

    fn finish(&mut self, final_len: u64) -> io::Result<FinishInfo> {
        let mut m = std::mem::take(&mut self.now);
        m.len = final_len.max(self.end);
        *self.found.lock().unwrap_or_else(|e| e.into_inner()) = Some(m);
        Ok(FinishInfo::default())
    }

    fn abort(&mut self) {}

    fn prepare_random(&mut self, _len: u64) -> io::Result<()> {
        Ok(())
    }

    fn keep_format(&mut self) {
        self.now.verbatim = true;
    }

    fn path(&self) -> &Path {
        &self.shown
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clusters_order_and_length_are_recorded() {
        let found = Arc::new(Mutex::new(None));
        let mut t = MeasureTarget::new(found.clone(), "<t>");
        t.write_at(4096, &[1; 512]).expect("write");
        t.write_at(3 << 16, &[1; 70_000])
            .expect("write across two clusters");
        t.zero(10 << 16, 1 << 20).expect("zero");
        t.finish(20 << 16).expect("finish");
        let m = found.lock().expect("lock").clone().expect("measured");
        assert_eq!(m.len, 20 << 16);
        assert!(m.in_order && !m.verbatim);
        let set: Vec<u64> = (0..20).filter(|&c| m.clusters.has(c)).collect();
        assert_eq!(set, [0, 3, 4]);
        assert_eq!((m.clusters.total(), m.clusters.count(1, 4)), (3, 1));

        let mut t = MeasureTarget::new(found.clone(), "<t>");
        t.keep_format();
        t.write_at(1 << 20, &[1; 4096]).expect("write");
        t.write_at(0, &[1; 4096]).expect("write back");
        t.finish(0).expect("finish");
        let m = found.lock().expect("lock").clone().expect("measured");
        assert!(!m.in_order && m.verbatim);
        assert_eq!(
            m.len,
            (1 << 20) + 4096,
            "at least as long as what was written"
        );
    }
}
