//! qcow2 written front to back into a stream that cannot seek (a registry upload, a tar
//! entry), when which clusters hold data is known before the data comes (a measuring
//! pass, [`super::measure`]): the header, the L1 table, the refcount table and blocks
//! and the L2 tables are computed from that bitmap and go out first, then the data
//! clusters in guest order. Zero clusters are not stored. Memory: the bitmap and one
//! cluster of metadata at a time.
//!
//! The layout, in clusters: `[header][L1][refcount table][refcount blocks][L2 tables]
//! [data]`; every cluster has refcount 1. The k-th cluster with data (in guest order)
//! is the k-th data cluster. The disk must come again exactly as measured: data in a
//! cluster the bitmap calls empty is refused (the source changed between the passes),
//! while a measured cluster that now holds zeros is written as zeros.

use super::measure::Clusters;
use super::qcow2::{refcount_clusters, CLUSTER_BITS, COPIED, CS, L2_ENTRIES, REFCOUNTS_PER_BLOCK};
use super::stream::StreamOut;
use crate::format::qcow2::header::NewImage;
use std::io::{self, Write};

/// Where everything of one image goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Layout {
    pub virtual_size: u64,
    l1_size: u64,
    l1_clusters: u64,
    table_clusters: u64,
    blocks: u64,
    /// The L1 indexes that have an L2 table, in order.
    l2: Vec<u64>,
    data: u64,
}

impl Layout {
    pub fn new(virtual_size: u64, clusters: &Clusters) -> io::Result<Self> {
        let guest = virtual_size.div_ceil(CS);
        if clusters.count(0, guest) != clusters.total() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("qcow2 output: data beyond the virtual size of {virtual_size} bytes"),
            ));
        }
        let l1_size = virtual_size.div_ceil(CS * L2_ENTRIES);
        if u32::try_from(l1_size).is_err() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("qcow2 output: virtual size {virtual_size} is too large"),
            ));
        }
        let l2: Vec<u64> = (0..l1_size)
            .filter(|&i| clusters.count(i * L2_ENTRIES, ((i + 1) * L2_ENTRIES).min(guest)) > 0)
            .collect();
        let l1_clusters = (l1_size * 8).div_ceil(CS).max(1);
        let data = clusters.total();
        let (blocks, table_clusters) = refcount_clusters(1 + l1_clusters + l2.len() as u64 + data);
        Ok(Layout {
            virtual_size,
            l1_size,
            l1_clusters,
            table_clusters,
            blocks,
            l2,
            data,
        })
    }

    fn table_at(&self) -> u64 {
        1 + self.l1_clusters
    }
    fn blocks_at(&self) -> u64 {
        self.table_at() + self.table_clusters
    }
    fn l2_at(&self) -> u64 {
        self.blocks_at() + self.blocks
    }
    fn data_at(&self) -> u64 {
        self.l2_at() + self.l2.len() as u64
    }
    fn clusters(&self) -> u64 {
        self.data_at() + self.data
    }

    /// The image's length in bytes.
    pub fn len(&self) -> u64 {
        self.clusters() * CS
    }

    pub fn is_empty(&self) -> bool {
        false // a header at least
    }

    /// Writes every metadata cluster, in file order, through `out`.
    fn write_metadata(&self, clusters: &Clusters, out: &mut dyn Write) -> io::Result<()> {
        let mut buf = vec![0u8; CS as usize];
        let header = NewImage {
            cluster_bits: CLUSTER_BITS,
            virtual_size: self.virtual_size,
            l1_size: self.l1_size as u32,
            l1_table_offset: CS,
            refcount_table_offset: self.table_at() * CS,
            refcount_table_clusters: self.table_clusters as u32,
        }
        .encode();
        buf[..header.len()].copy_from_slice(&header);
        out.write_all(&buf)?;
        // L1: each index with data points at its L2 table, in order.
        let mut next_l2 = self.l2.iter().copied().zip(self.l2_at()..).peekable();
        for c in 0..self.l1_clusters {
            buf.fill(0);
            for (k, e) in buf.chunks_exact_mut(8).enumerate() {
                let i = c * (CS / 8) + k as u64;
                if let Some(&(_, at)) = next_l2.peek().filter(|(l1, _)| *l1 == i) {
                    e.copy_from_slice(&((at * CS) | COPIED).to_be_bytes());
                    next_l2.next();
                }
            }
            out.write_all(&buf)?;
        }
        // The refcount table lists the blocks; the blocks count every cluster once.
        for c in 0..self.table_clusters {
            buf.fill(0);
            for (k, e) in buf.chunks_exact_mut(8).enumerate() {
                let b = c * (CS / 8) + k as u64;
                if b < self.blocks {
                    e.copy_from_slice(&((self.blocks_at() + b) * CS).to_be_bytes());
                }
            }
            out.write_all(&buf)?;
        }
        let total = self.clusters();
        for b in 0..self.blocks {
            buf.fill(0);
            let used = total
                .saturating_sub(b * REFCOUNTS_PER_BLOCK)
                .min(REFCOUNTS_PER_BLOCK);
            for e in buf[..used as usize * 2].chunks_exact_mut(2) {
                e.copy_from_slice(&1u16.to_be_bytes());
            }
            out.write_all(&buf)?;
        }
        // L2 tables: the k-th cluster with data is the k-th data cluster.
        let guest = self.virtual_size.div_ceil(CS);
        let mut rank = 0u64;
        for &i in &self.l2 {
            buf.fill(0);
            let from = i * L2_ENTRIES;
            for (k, e) in buf.chunks_exact_mut(8).enumerate() {
                let g = from + k as u64;
                if g < guest && clusters.has(g) {
                    let host = (self.data_at() + rank) * CS;
                    e.copy_from_slice(&(host | COPIED).to_be_bytes());
                    rank += 1;
                }
            }
            out.write_all(&buf)?;
        }
        Ok(())
    }
}

/// A [`StreamOut`] taking the disk in guest order and passing qcow2 on to `inner`.
pub struct Qcow2Stream {
    inner: Box<dyn StreamOut>,
    layout: Layout,
    clusters: Clusters,
    /// Guest bytes taken so far.
    pos: u64,
}

impl Qcow2Stream {
    pub fn new(inner: Box<dyn StreamOut>, layout: Layout, clusters: Clusters) -> Self {
        Qcow2Stream {
            inner,
            layout,
            clusters,
            pos: 0,
        }
    }

    fn changed(&self, at: u64) -> io::Error {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!(
                "the source changed since it was measured: data at guest offset {at}, in a cluster the first pass found empty"
            ),
        )
    }

    /// Takes `n` guest bytes (`data`, or zeros when `None`), cluster piece by piece.
    fn take(&mut self, mut data: Option<&[u8]>, mut n: u64) -> io::Result<()> {
        if self.pos + n > self.layout.virtual_size {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!(
                    "the disk goes past its measured size of {} bytes",
                    self.layout.virtual_size
                ),
            ));
        }
        while n > 0 {
            let c = self.pos >> CLUSTER_BITS;
            let k = n.min(CS - (self.pos & (CS - 1)));
            let piece = data.map(|d| &d[..k as usize]);
            if self.clusters.has(c) {
                match piece {
                    Some(p) => self.inner.write_all(p)?,
                    None => self.inner.write_zeros(k)?,
                }
            } else if piece.is_some_and(|p| p.iter().any(|&b| b != 0)) {
                return Err(self.changed(self.pos));
            }
            data = data.map(|d| &d[k as usize..]);
            self.pos += k;
            n -= k;
        }
        Ok(())
    }
}

impl Write for Qcow2Stream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.take(Some(buf), buf.len() as u64)?;
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl StreamOut for Qcow2Stream {
    fn begin(&mut self, _guest_len: Option<u64>) -> io::Result<()> {
        self.inner.begin(Some(self.layout.len()))?;
        let (layout, clusters) = (&self.layout, &self.clusters);
        layout.write_metadata(clusters, &mut self.inner)
    }

    fn write_zeros(&mut self, n: u64) -> io::Result<()> {
        self.take(None, n)
    }

    fn close(mut self: Box<Self>) -> io::Result<()> {
        let v = self.layout.virtual_size;
        if self.pos != v {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("the disk ended at {} of its measured {v} bytes", self.pos),
            ));
        }
        // The last cluster, when it has data and the disk ends inside it, is whole.
        let tail = v & (CS - 1);
        if tail != 0 && self.clusters.has(v >> CLUSTER_BITS) {
            self.inner.write_zeros(CS - tail)?;
        }
        self.inner.close()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sink::measure::{MeasureTarget, Measured};
    use crate::sink::stream::StreamTarget;
    use crate::sink::Target;
    use std::sync::atomic::AtomicBool;
    use std::sync::{Arc, Mutex};

    struct ToFile(std::fs::File, Arc<Mutex<Option<u64>>>);
    impl Write for ToFile {
        fn write(&mut self, b: &[u8]) -> io::Result<usize> {
            self.0.write(b)
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }
    impl StreamOut for ToFile {
        fn begin(&mut self, len: Option<u64>) -> io::Result<()> {
            *self.1.lock().expect("lock") = len;
            Ok(())
        }
        fn close(self: Box<Self>) -> io::Result<()> {
            Ok(())
        }
    }

    /// The writes of a disk: (offset, bytes), in guest order, zeros left out.
    fn writes(size: u64) -> Vec<(u64, Vec<u8>)> {
        vec![
            (0, vec![1; 4096]),
            (70_000 & !4095, vec![2; 8192]),
            (600 << 20, vec![3; 1 << 20]),         // a second L2 table
            ((1300 << 20) + 12288, vec![4; 4096]), // a third, two L1 entries on
            (size - 4096, vec![5; 4096]),          // the disk ends mid-cluster
        ]
    }

    fn measure(size: u64, w: &[(u64, Vec<u8>)]) -> Measured {
        let found = Arc::new(Mutex::new(None));
        let mut t = MeasureTarget::new(found.clone(), "<m>");
        for (o, d) in w {
            t.write_at(*o, d).expect("write");
        }
        t.finish(size).expect("finish");
        let m = found.lock().expect("lock").take();
        m.expect("measured")
    }

    #[test]
    fn streams_a_qcow2_our_reader_and_the_layout_agree_on() {
        let size = (1400u64 << 20) + 4096 * 3;
        let w = writes(size);
        let m = measure(size, &w);
        let layout = Layout::new(m.len, &m.clusters).expect("layout");
        let dir = tempfile::tempdir().expect("tmp");
        let p = dir.path().join("disk.qcow2");
        let announced = Arc::new(Mutex::new(None));
        let out = ToFile(
            std::fs::File::create(&p).expect("create"),
            announced.clone(),
        );
        let q = Qcow2Stream::new(Box::new(out), layout.clone(), m.clusters.clone());
        let mut t =
            StreamTarget::new(Box::new(q), "<q>", Arc::new(AtomicBool::new(false))).with_len(m.len);
        let mut want = vec![0u8; size as usize];
        for (o, d) in &w {
            t.write_at(*o, d).expect("write");
            want[*o as usize..*o as usize + d.len()].copy_from_slice(d);
        }
        t.finish(size).expect("finish");
        let file_len = std::fs::metadata(&p).expect("meta").len();
        assert_eq!(file_len, layout.len());
        assert_eq!(*announced.lock().expect("lock"), Some(layout.len()));
        // header, L1, refcount table, one refcount block, three L2 tables, 1+1+16+1+1 data
        assert_eq!(layout.len() / CS, 1 + 1 + 1 + 1 + 3 + 20);
        assert_eq!(crate::sink::qcow2::tests::read_back(&p), want);
    }

    #[test]
    fn data_where_the_first_pass_saw_none_is_refused() {
        let size = 4u64 << 20;
        let m = measure(size, &[(0, vec![1; 4096])]);
        let layout = Layout::new(m.len, &m.clusters).expect("layout");
        let sink = ToFile(
            tempfile::tempfile().expect("tmp"),
            Arc::new(Mutex::new(None)),
        );
        let q = Qcow2Stream::new(Box::new(sink), layout, m.clusters);
        let mut t =
            StreamTarget::new(Box::new(q), "<q>", Arc::new(AtomicBool::new(false))).with_len(size);
        t.write_at(0, &[1; 4096]).expect("measured");
        let e = t.write_at(1 << 20, &[7; 4096]).expect_err("changed");
        assert!(e.to_string().contains("source changed"), "{e}");
        // Past the measured size.
        let m = measure(size, &[(0, vec![1; 4096])]);
        let layout = Layout::new(m.len, &m.clusters).expect("layout");
        let sink = ToFile(
            tempfile::tempfile().expect("tmp"),
            Arc::new(Mutex::new(None)),
        );
        let mut q = Qcow2Stream::new(Box::new(sink), layout, m.clusters);
        q.begin(None).expect("begin");
        q.write_zeros(size).expect("zeros");
        assert!(q.write_zeros(1).is_err());
    }
}
