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
pub(crate) const CS: u64 = 1 << CLUSTER_BITS;
/// L2 entries per table (8 bytes each): one table maps 512 MiB.
pub(crate) const L2_ENTRIES: u64 = CS / 8;
/// L2 tables kept in memory (1 MiB).
pub const CACHED_L2: usize = 16;
/// "Refcount is exactly one": qemu-img check reports entries without it as errors.
pub(crate) const COPIED: u64 = 1 << 63;
/// Refcount entries per block at 16 bits each.
pub(crate) const REFCOUNTS_PER_BLOCK: u64 = CS / 2;

/// The refcount blocks and refcount table clusters an image of `clusters` other clusters
/// needs: they cover every cluster, themselves included, so both grow until they do.
pub(crate) fn refcount_clusters(clusters: u64) -> (u64, u64) {
    let (mut blocks, mut table) = (0u64, 0u64);
    loop {
        let total = clusters + blocks + table;
        let b = total.div_ceil(REFCOUNTS_PER_BLOCK);
        let t = (b * 8).div_ceil(CS).max(1);
        if (b, t) == (blocks, table) {
            return (blocks, table);
        }
        (blocks, table) = (b, t);
    }
}

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
    /// Compressed clusters ([`Qcow2Target::with_compression`]).
    packing: Option<Packing>,
}

/// Compressed output: guest clusters are assembled whole, deflated (raw deflate, 4 KiB
/// window, as qemu writes them) and packed byte-tight after each other, so host
/// clusters are shared and each needs its own refcount.
struct Packing {
    /// The refcount of every host cluster handed out so far (index: host cluster).
    refs: Vec<u16>,
    /// The guest cluster being assembled and its bytes (zeros where nothing came).
    open: Option<(u64, Vec<u8>)>,
    /// The last stored cluster's buffer, reused for the next one.
    spare: Vec<u8>,
    /// The next free byte for compressed data and the end of the cluster it lies in.
    tail: u64,
    tail_end: u64,
    deflate: flate2::Compress,
    out: Vec<u8>,
    compressed: u64,
    stored: u64,
}

/// An L2 entry's flag for a compressed cluster.
const COMPRESSED: u64 = 1 << 62;
/// Where a compressed descriptor's sector count starts: 62 - (cluster_bits - 8).
const CSECTORS_SHIFT: u32 = 62 - (CLUSTER_BITS - 8);
const CSECTORS_MASK: u64 = 0xff;
const COFFSET_MASK: u64 = (1 << CSECTORS_SHIFT) - 1;

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
            packing: None,
        }
    }

    /// Data clusters are written compressed (deflate, as `qemu-img convert -c`), or as
    /// they are when compression would not save a sector. Costs 2 bytes of refcount
    /// per 64 KiB host cluster written (32 KiB per GiB of output).
    pub fn with_compression(mut self) -> Self {
        self.packing = Some(Packing {
            refs: vec![1], // the header
            open: None,
            spare: Vec::new(),
            tail: 0,
            tail_end: 0,
            deflate: flate2::Compress::new_with_window_bits(
                flate2::Compression::default(),
                false,
                12,
            ),
            out: Vec::with_capacity(CS as usize),
            compressed: 0,
            stored: 0,
        });
        self
    }

    fn alloc(&mut self) -> u64 {
        let off = self.next * CS;
        self.next += 1;
        if let Some(p) = &mut self.packing {
            p.refs.push(1);
        }
        off
    }

    /// The cache slot and index of guest cluster `gc`'s L2 entry (creating its table
    /// when `create`), `None` when it has no table.
    fn entry(&mut self, gc: u64, create: bool) -> io::Result<Option<(usize, usize)>> {
        Ok(self
            .table(gc / L2_ENTRIES, create)?
            .map(|slot| (slot, (gc % L2_ENTRIES) as usize)))
    }

    fn set_entry(&mut self, gc: u64, value: u64) -> io::Result<()> {
        let (slot, i) = self.entry(gc, true)?.expect("created");
        let t = &mut self.cache[slot];
        t.entries[i] = value;
        t.dirty = true;
        Ok(())
    }

    /// Compressed mode: `data` into guest cluster `gc` at `within` (`None`: zeros, which
    /// allocate nothing in a cluster that holds nothing yet).
    fn put(&mut self, gc: u64, within: usize, data: Option<&[u8]>, n: usize) -> io::Result<()> {
        let open_gc = self
            .packing
            .as_ref()
            .and_then(|p| p.open.as_ref().map(|o| o.0));
        if open_gc != Some(gc) {
            let existing = match self.entry(gc, false)? {
                Some((slot, i)) => self.cache[slot].entries[i],
                None => 0,
            };
            if data.is_none() && existing == 0 {
                return Ok(());
            }
            self.flush_open()?;
            let buf = self.load(gc, existing)?;
            if let Some(p) = &mut self.packing {
                p.open = Some((gc, buf));
            }
        }
        if let Some((_, buf)) = self.packing.as_mut().and_then(|p| p.open.as_mut()) {
            match data {
                Some(d) => buf[within..within + n].copy_from_slice(d),
                None => buf[within..within + n].fill(0),
            }
        }
        Ok(())
    }

    /// A guest cluster's bytes as stored so far (it returned after others: writes in
    /// random order), its old copy released.
    fn load(&mut self, gc: u64, entry: u64) -> io::Result<Vec<u8>> {
        let p = self.packing.as_mut().expect("compressed mode");
        let mut buf = std::mem::take(&mut p.spare);
        buf.clear();
        buf.resize(CS as usize, 0);
        if entry == 0 {
            return Ok(buf);
        }
        if entry & COMPRESSED != 0 {
            let off = entry & COFFSET_MASK;
            let sectors = (entry >> CSECTORS_SHIFT) & CSECTORS_MASK;
            let len = (sectors + 1) * 512 - (off % 512);
            let mut raw = vec![0u8; len as usize];
            let mut got = 0;
            while got < raw.len() {
                match self.reader.read_at(&mut raw[got..], off + got as u64)? {
                    0 => break,
                    k => got += k,
                }
            }
            let mut d = flate2::Decompress::new_with_window_bits(false, 12);
            d.decompress(&raw[..got], &mut buf, flate2::FlushDecompress::Finish)
                .map_err(io::Error::other)?;
            // (the sector-rounded end lies in the cluster of the last byte written)
            for c in off / CS..=(off + len - 1) / CS {
                p.refs[c as usize] = p.refs[c as usize].saturating_sub(1);
            }
        } else {
            let off = entry & !COPIED;
            self.reader.read_exact_at(&mut buf, off)?;
            p.refs[(off / CS) as usize] = 0;
        }
        self.set_entry(gc, 0)?;
        Ok(buf)
    }

    /// Stores the open guest cluster: nothing when it is all zeros, compressed when that
    /// saves a sector, else as it is in a cluster of its own.
    fn flush_open(&mut self) -> io::Result<()> {
        let Some((gc, buf)) = self.packing.as_mut().and_then(|p| p.open.take()) else {
            return Ok(());
        };
        if buf.chunks(super::SECTOR).all(super::is_zero) {
            self.put_spare(buf);
            return Ok(());
        }
        // The table first: its cluster must not land inside the compressed run.
        self.entry(gc, true)?;
        let p = self.packing.as_mut().expect("compressed mode");
        p.deflate.reset();
        p.out.clear();
        let status = p
            .deflate
            .compress_vec(&buf, &mut p.out, flate2::FlushCompress::Finish)
            .map_err(io::Error::other)?;
        let len = p.out.len() as u64;
        if status != flate2::Status::StreamEnd || len > CS - 512 {
            p.stored += 1;
            let off = self.alloc();
            self.inner.write_at(off, &buf)?;
            self.put_spare(buf);
            return self.set_entry(gc, off | COPIED);
        }
        p.compressed += 1;
        if p.tail + len > p.tail_end {
            // The run continues into the next cluster when that is the next one free.
            let continues = p.tail_end != 0 && p.tail_end == self.next * CS;
            let c = self.alloc();
            let p = self.packing.as_mut().expect("compressed mode");
            *p.refs.last_mut().expect("allocated") = 0;
            if continues {
                p.tail_end += CS;
            } else {
                (p.tail, p.tail_end) = (c, c + CS);
            }
        }
        let p = self.packing.as_mut().expect("compressed mode");
        let off = p.tail;
        for c in off / CS..=(off + len - 1) / CS {
            p.refs[c as usize] = p.refs[c as usize].saturating_add(1);
        }
        p.tail += len;
        let sectors = ((off + len - 1) >> 9) - (off >> 9);
        let data = std::mem::take(&mut p.out);
        self.inner.write_at(off, &data)?;
        if let Some(p) = &mut self.packing {
            p.out = data;
        }
        self.put_spare(buf);
        self.set_entry(gc, COMPRESSED | (sectors << CSECTORS_SHIFT) | off)
    }

    fn put_spare(&mut self, buf: Vec<u8>) {
        if let Some(p) = &mut self.packing {
            p.spare = buf;
        }
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
    // One function on purpose (83 lines): header, L1, refcount table and blocks laid out
    // and written together: their offsets depend on each other.
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
        let (blocks, table) = refcount_clusters(self.next);
        let table_offset = self.next * CS;
        let first_block = self.next + table;
        let total = first_block + blocks;

        let mut buf = vec![0u8; CS as usize];
        // The refcount blocks: 1 for every cluster below `total`, or what compressed
        // clusters sharing host clusters made it.
        let refs = self.packing.as_ref().map(|p| &p.refs);
        for b in 0..blocks {
            let from = b * REFCOUNTS_PER_BLOCK;
            let used = total.saturating_sub(from).min(REFCOUNTS_PER_BLOCK) as usize;
            buf.fill(0);
            for (k, e) in buf[..used * 2].chunks_exact_mut(2).enumerate() {
                let c = from as usize + k;
                let r = refs.and_then(|r| r.get(c).copied()).unwrap_or(1);
                e.copy_from_slice(&r.to_be_bytes());
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
        if let Some(p) = &self.packing {
            tracing::info!(
                compressed = p.compressed,
                stored_as_is = p.stored,
                "qcow2 output: compressed clusters"
            );
        }
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
        if self.packing.is_some() {
            let mut done = 0usize;
            while done < buf.len() {
                let pos = offset + done as u64;
                let within = (pos % CS) as usize;
                let n = (CS as usize - within).min(buf.len() - done);
                self.put(pos / CS, within, Some(&buf[done..done + n]), n)?;
                done += n;
            }
            return Ok(());
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
            if self.packing.is_some() {
                self.put(pos / CS, within as usize, None, n as usize)?;
            } else if let Some(host) = self.host(pos / CS, false)? {
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
        self.flush_open()?;
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
pub(crate) mod tests {
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
    pub(crate) fn read_back(path: &std::path::Path) -> Vec<u8> {
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
    fn compressed_clusters_read_back_in_any_write_order() {
        let dir = tempfile::tempdir().expect("tmp");
        let p = dir.path().join("disk.qcow2");
        let size = (600u64 << 20) + 777;
        let mut want = vec![0u8; size as usize];
        let mut t = qcow2_target(&p).with_compression();
        let put = |t: &mut Qcow2Target, want: &mut Vec<u8>, off: u64, data: Vec<u8>| {
            t.write_at(off, &data).expect("write");
            want[off as usize..off as usize + data.len()].copy_from_slice(&data);
        };
        // Compressible text, in pieces smaller than a cluster.
        let text: Vec<u8> = (0..3 << 20)
            .map(|i: u32| b"ferrydisk "[(i % 10) as usize])
            .collect();
        for (k, chunk) in text.chunks(20_000).enumerate() {
            put(
                &mut t,
                &mut want,
                4096 + (k * 20_000) as u64,
                chunk.to_vec(),
            );
        }
        // Incompressible data: stored as it is.
        let mut x = 0x2545_f491_4f6c_dd1du64;
        let noise: Vec<u8> = (0..200_000)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect();
        put(&mut t, &mut want, 10 << 20, noise);
        // A second table, then back into clusters already compressed and stored.
        put(&mut t, &mut want, 550 << 20, vec![7u8; 70_000]);
        put(&mut t, &mut want, 100_000, vec![9u8; 1000]);
        put(&mut t, &mut want, (10 << 20) + 50_000, vec![3u8; 10]);
        t.zero(0, 16384).expect("zero over data");
        want[..16384].fill(0);
        t.zero(200 << 20, 1 << 20).expect("zero over nothing");
        put(&mut t, &mut want, size - 777, vec![5u8; 777]);
        t.finish(size).expect("finish");
        assert_eq!(read_back(&p), want);
        let len = std::fs::metadata(&p).expect("meta").len();
        assert!(len < 2 << 20, "the text compressed: {len} bytes");
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
