//! qcow2 as the output format (`--output-format qcow2` from raw, vmdk, vhd, vhdx, vdi or
//! anything compressed): a [`Target`] in front of the file that gives each guest
//! cluster the next free host cluster the first time data lands in it, so data goes
//! out as it comes, in one pass, with no scratch.
//!
//! The layout is what a stream allows: cluster 0 is the header, written last; an L2
//! table takes the next free cluster when the first data of its range arrives; the L1
//! table, the refcount table and the refcount blocks follow the data at the end. Host
//! clusters are handed out strictly in order and never freed, so every cluster of the
//! file has refcount 1 and the refcounts are written from the final length alone, with
//! no table held in memory. Zero runs (which the [`super::SparseWriter`] in front finds)
//! allocate nothing: an unallocated cluster reads as zeros.
//!
//! Memory: the L1 table (8 bytes per 512 MiB of virtual disk that holds data) and at most
//! [`CACHED_L2`] L2 tables of 64 KiB; an older table is written to its cluster and read
//! back if writes in random order (vhd, vmdk, vdi tables) return to it.

use super::{FinishInfo, Target};
use crate::format::qcow2::header::NewImage;
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;

/// Cluster size of the images we write: qemu-img's default (64 KiB).
pub const CLUSTER_BITS: u32 = 16;
const CS: u64 = 1 << CLUSTER_BITS;
/// L2 entries per table (8 bytes each): one table maps 512 MiB.
const L2_ENTRIES: u64 = CS / 8;
/// L2 tables kept in memory (1 MiB).
pub const CACHED_L2: usize = 16;
/// "Refcount is exactly one": qemu-img check reports entries without it as errors.
const COPIED: u64 = 1 << 63;
/// Refcount entries per block at 16 bits each.
const REFCOUNTS_PER_BLOCK: u64 = CS / 2;

struct CachedL2 {
    l1_index: u64,
    entries: Vec<u64>,
    dirty: bool,
}

pub struct Qcow2Target {
    inner: Box<dyn Target>,
    /// The same file for reading back an L2 table that left the cache.
    reader: File,
    /// Host offset of each L2 table (0: none yet), up to the highest index with data.
    l1: Vec<u64>,
    /// Least recently used first.
    cache: Vec<CachedL2>,
    /// The next free host cluster (cluster 0 is the header).
    next: u64,
    /// The image is already qcow2 and written as it is (see [`Target::keep_format`]).
    verbatim: bool,
}

impl Qcow2Target {
    /// `inner` is the file the image goes to, `reader` a read handle on the same file.
    pub fn new(inner: Box<dyn Target>, reader: File) -> Self {
        Qcow2Target {
            inner,
            reader,
            l1: Vec::new(),
            cache: Vec::with_capacity(CACHED_L2),
            next: 1,
            verbatim: false,
        }
    }

    fn alloc(&mut self) -> u64 {
        let off = self.next * CS;
        self.next += 1;
        off
    }

    /// The cache slot holding the L2 table for `l1_index`, loading or creating it.
    /// `None` when the table does not exist and `create` is false.
    fn table(&mut self, l1_index: u64, create: bool) -> io::Result<Option<usize>> {
        if let Some(i) = self.cache.iter().position(|t| t.l1_index == l1_index) {
            // Most recently used last.
            let t = self.cache.remove(i);
            self.cache.push(t);
            return Ok(Some(self.cache.len() - 1));
        }
        let existing = self.l1.get(l1_index as usize).copied().unwrap_or(0);
        if existing == 0 && !create {
            return Ok(None);
        }
        if self.cache.len() >= CACHED_L2 {
            let old = self.cache.remove(0);
            self.store(&old)?;
        }
        let entries = if existing != 0 {
            let mut raw = vec![0u8; CS as usize];
            self.reader.read_exact_at(&mut raw, existing)?;
            raw.chunks_exact(8)
                .map(|b| u64::from_be_bytes(b.try_into().expect("8 bytes")))
                .collect()
        } else {
            let off = self.alloc();
            let i = l1_index as usize;
            if self.l1.len() <= i {
                self.l1.resize(i + 1, 0);
            }
            self.l1[i] = off;
            vec![0u64; L2_ENTRIES as usize]
        };
        self.cache.push(CachedL2 {
            l1_index,
            entries,
            dirty: existing == 0,
        });
        Ok(Some(self.cache.len() - 1))
    }

    fn store(&mut self, t: &CachedL2) -> io::Result<()> {
        if !t.dirty {
            return Ok(());
        }
        let raw: Vec<u8> = t.entries.iter().flat_map(|e| e.to_be_bytes()).collect();
        self.inner.write_at(self.l1[t.l1_index as usize], &raw)
    }

    /// The host offset of guest cluster `gc`, allocating it (and its table) when
    /// `allocate` is set; `None` for an unallocated cluster otherwise.
    fn host(&mut self, gc: u64, allocate: bool) -> io::Result<Option<u64>> {
        let Some(slot) = self.table(gc / L2_ENTRIES, allocate)? else {
            return Ok(None);
        };
        let i = (gc % L2_ENTRIES) as usize;
        let entry = self.cache[slot].entries[i] & !COPIED;
        if entry != 0 {
            return Ok(Some(entry));
        }
        if !allocate {
            return Ok(None);
        }
        let off = self.alloc();
        let t = &mut self.cache[slot];
        t.entries[i] = off | COPIED;
        t.dirty = true;
        Ok(Some(off))
    }

    /// Writes the tables, refcounts and header after the data; returns the file length.
    fn write_metadata(&mut self, virtual_size: u64) -> io::Result<u64> {
        let l1_size = virtual_size.div_ceil(CS * L2_ENTRIES);
        if (self.l1.len() as u64) > l1_size {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("qcow2 output: data beyond the virtual size of {virtual_size} bytes"),
            ));
        }
        let l1_size32 = u32::try_from(l1_size).map_err(|_| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("qcow2 output: virtual size {virtual_size} is too large"),
            )
        })?;
        for t in std::mem::take(&mut self.cache) {
            self.store(&t)?;
        }
        let l1_clusters = (l1_size * 8).div_ceil(CS).max(1);
        let l1_offset = self.next * CS;
        self.next += l1_clusters;
        // Refcount blocks and the table that lists them cover every cluster, themselves
        // included: grow both until they do.
        let (mut blocks, mut table) = (0u64, 0u64);
        loop {
            let total = self.next + blocks + table;
            let b = total.div_ceil(REFCOUNTS_PER_BLOCK);
            let t = (b * 8).div_ceil(CS).max(1);
            if (b, t) == (blocks, table) {
                break;
            }
            (blocks, table) = (b, t);
        }
        let table_offset = self.next * CS;
        let first_block = self.next + table;
        let total = first_block + blocks;

        let mut buf = vec![0u8; CS as usize];
        // The refcount blocks: 1 for every cluster below `total`.
        for b in 0..blocks {
            let from = b * REFCOUNTS_PER_BLOCK;
            let used = total.saturating_sub(from).min(REFCOUNTS_PER_BLOCK) as usize;
            buf.fill(0);
            for e in buf[..used * 2].chunks_exact_mut(2) {
                e.copy_from_slice(&1u16.to_be_bytes());
            }
            self.inner.write_at((first_block + b) * CS, &buf)?;
        }
        // The refcount table, one entry per block.
        let mut rt = vec![0u8; (table * CS) as usize];
        for b in 0..blocks {
            let at = (b * 8) as usize;
            rt[at..at + 8].copy_from_slice(&((first_block + b) * CS).to_be_bytes());
        }
        self.inner.write_at(table_offset, &rt)?;
        // The L1 table.
        let mut l1 = vec![0u8; (l1_clusters * CS) as usize];
        for (i, &off) in self.l1.iter().enumerate() {
            if off != 0 {
                l1[i * 8..i * 8 + 8].copy_from_slice(&(off | COPIED).to_be_bytes());
            }
        }
        self.inner.write_at(l1_offset, &l1)?;
        // The header, last: until here the file has no valid header.
        let header = NewImage {
            cluster_bits: CLUSTER_BITS,
            virtual_size,
            l1_size: l1_size32,
            l1_table_offset: l1_offset,
            refcount_table_offset: table_offset,
            refcount_table_clusters: table as u32,
        }
        .encode();
        buf.fill(0);
        buf[..header.len()].copy_from_slice(&header);
        self.inner.write_at(0, &buf)?;
        tracing::info!(
            virtual_size,
            file_size = total * CS,
            l2_tables = self.l1.iter().filter(|&&o| o != 0).count(),
            "qcow2 output: tables, refcounts and header written after the data"
        );
        Ok(total * CS)
    }
}

impl Target for Qcow2Target {
    fn write_at(&mut self, offset: u64, buf: &[u8]) -> io::Result<()> {
        if self.verbatim {
            return self.inner.write_at(offset, buf);
        }
        // Consecutive guest clusters usually get consecutive host clusters: one write.
        let (mut run_host, mut run_start, mut run_len) = (0u64, 0usize, 0usize);
        let mut done = 0usize;
        while done < buf.len() {
            let pos = offset + done as u64;
            let within = pos % CS;
            let n = ((CS - within) as usize).min(buf.len() - done);
            let host = self.host(pos / CS, true)?.expect("allocated") + within;
            if run_len > 0 && run_host + run_len as u64 == host {
                run_len += n;
            } else {
                if run_len > 0 {
                    self.inner
                        .write_at(run_host, &buf[run_start..run_start + run_len])?;
                }
                (run_host, run_start, run_len) = (host, done, n);
            }
            done += n;
        }
        if run_len > 0 {
            self.inner
                .write_at(run_host, &buf[run_start..run_start + run_len])?;
        }
        Ok(())
    }

    fn zero(&mut self, offset: u64, len: u64) -> io::Result<()> {
        if self.verbatim {
            return self.inner.zero(offset, len);
        }
        // Unallocated clusters already read as zeros; only data written earlier (writes
        // in random order) is overwritten.
        static ZEROS: [u8; CS as usize] = [0; CS as usize];
        let end = offset.saturating_add(len);
        let mut pos = offset;
        while pos < end {
            let within = pos % CS;
            let n = (CS - within).min(end - pos);
            if let Some(host) = self.host(pos / CS, false)? {
                self.inner.write_at(host + within, &ZEROS[..n as usize])?;
            }
            pos += n;
        }
        Ok(())
    }

    fn checkpoint(&mut self, _upto: u64) -> io::Result<()> {
        self.inner.checkpoint(self.next * CS)
    }

    fn finish(&mut self, final_len: u64) -> io::Result<FinishInfo> {
        if self.verbatim {
            return self.inner.finish(final_len);
        }
        let file_len = self.write_metadata(final_len)?;
        self.inner.finish(file_len)
    }

    fn abort(&mut self) {
        self.inner.abort();
    }

    fn prepare_random(&mut self, len: u64) -> io::Result<()> {
        if self.verbatim {
            return self.inner.prepare_random(len);
        }
        Ok(()) // a cluster never written is never allocated: it reads as zeros
    }

    fn keep_format(&mut self) {
        self.verbatim = true;
    }

    fn path(&self) -> &std::path::Path {
        self.inner.path()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::format::contract::StreamOptions;
    use crate::sink::sparse::{SparseWriter, WriterOptions};
    use crate::sink::FileTarget;

    fn qcow2_target(path: &std::path::Path) -> Qcow2Target {
        let inner = FileTarget::create(path, false, false).expect("create");
        let reader = File::open(path).expect("reader");
        Qcow2Target::new(Box::new(inner), reader)
    }

    /// Converts the qcow2 at `path` back to raw with our own reader.
    fn read_back(path: &std::path::Path) -> Vec<u8> {
        let dir = tempfile::tempdir().expect("tmp");
        let raw = dir.path().join("raw");
        let mut w = SparseWriter::spawn(
            Box::new(FileTarget::create(&raw, false, false).expect("raw")),
            WriterOptions::default(),
        );
        let mut f = File::open(path).expect("open");
        let h = crate::format::qcow2::convert(&mut f, &mut w, &StreamOptions::default())
            .expect("our qcow2 converts");
        w.finish(h.virtual_size).expect("finish");
        std::fs::read(&raw).expect("read")
    }

    #[test]
    fn sequential_and_random_writes_read_back() {
        let dir = tempfile::tempdir().expect("tmp");
        let p = dir.path().join("disk.qcow2");
        let size = (1u64 << 30) + 12345;
        let mut want = vec![0u8; size as usize];
        let mut t = qcow2_target(&p);
        let mut put = |t: &mut Qcow2Target, off: u64, len: usize, b: u8| {
            let data = vec![b; len];
            t.write_at(off, &data).expect("write");
            want[off as usize..off as usize + len].copy_from_slice(&data);
        };
        put(&mut t, 0, 1 << 20, 1);
        put(&mut t, 600 << 20, 4096, 2); // a second L2 table
        put(&mut t, 70_000, 5000, 3); // back into the first, mid-cluster
                                      // Touch more tables than the cache holds so the first is evicted and re-read.
        for i in 0..(CACHED_L2 as u64 + 2) {
            put(&mut t, (1 << 30) - 65536 + i * 8, 4, 4 + i as u8);
        }
        put(&mut t, size - 345, 345, 9);
        t.zero(0, 8192).expect("zero over data");
        want[..8192].fill(0);
        t.finish(size).expect("finish");
        assert_eq!(read_back(&p), want);
    }

    #[test]
    fn empty_image_is_valid() {
        let dir = tempfile::tempdir().expect("tmp");
        let p = dir.path().join("disk.qcow2");
        let mut t = qcow2_target(&p);
        t.finish(10 << 20).expect("finish");
        assert_eq!(read_back(&p), vec![0u8; 10 << 20]);
        // header, L1, refcount table, one refcount block
        assert_eq!(std::fs::metadata(&p).expect("meta").len(), 4 * CS);
    }

    #[test]
    fn data_past_the_virtual_size_is_refused() {
        let dir = tempfile::tempdir().expect("tmp");
        let p = dir.path().join("disk.qcow2");
        let mut t = qcow2_target(&p);
        t.write_at(2 << 30, &[1u8; 4096]).expect("write");
        assert!(t.finish(1 << 20).is_err());
    }
}
