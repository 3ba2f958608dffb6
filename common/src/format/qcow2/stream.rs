//! qcow2 -> raw from a sequential stream (an HTTP body, a registry layer, an upload).
//!
//! The image is read once, in host order, one cluster at a time. The L1 table names
//! the L2 tables, the L2 tables name the data clusters; whatever arrives after its
//! mapping is written straight to its guest offset. What arrives before we know what it
//! is (qemu-img never writes images that way, but a qcow2 that was grown in place can
//! have data ahead of a later L2 table) is held in memory up to a bound, then spooled to
//! scratch, and placed when its mapping appears. Once every L2 table is known nothing
//! else needs holding: unreferenced clusters (refcounts, snapshots) are dropped at once.

use super::header::{extended_l2_table, u64_table, Compression, Header, Qcow2Error};
use super::wanted::{Want, Wanted, MAX_ENTRIES};
use crate::format::contract::{check_size, FormatError, ImageInfo, StreamOptions};
use crate::format::forward::decode_pool::{DecodePool, Done, Job};
use crate::format::forward::held::{Held, HeldError};
use crate::sink::SparseWriter;
use crate::sniff::Format;
use std::collections::{BTreeMap, HashMap};
use std::io::{self, Read};

const L1_OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
const L2_OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
const COMPRESSED: u64 = 1 << 62;
const ZERO_FLAG: u64 = 1;

/// Converts the qcow2 image read from `r` (positioned at its first byte) into `writer`.
/// The caller drains whatever follows the last referenced cluster.
pub fn convert(
    r: &mut dyn Read,
    writer: &mut SparseWriter,
    opts: &StreamOptions,
) -> Result<ImageInfo, FormatError> {
    let mut head = vec![0u8; 512];
    let n = fill(r, &mut head)?;
    let bits = Header::peek_cluster_bits(&head[..n])?;
    let cs = 1usize << bits;
    let mut c0 = head;
    c0.resize(cs, 0);
    let m = if n == 512 {
        fill(r, &mut c0[512..])?
    } else {
        0
    };
    c0.truncate(n + m);
    let (h, top) = match &opts.layers {
        Some(stack) => {
            let (h, backing) = Header::parse_layer(&c0)?;
            let top = stack.begin(&h, backing)?;
            (h, top)
        }
        None => (Header::parse(&c0)?, true),
    };
    check_size(h.virtual_size, opts)?;
    tracing::info!(
        version = h.version,
        cluster_size = cs,
        virtual_size = h.virtual_size,
        compression = ?h.compression,
        extended_l2 = h.extended_l2,
        "qcow2 image"
    );
    // Lower layers of a stack write into what the top layer prepared.
    if top {
        writer.prepare_random(h.virtual_size)?;
    }
    let mut st = State::new(h.clone(), writer, opts);
    st.run(r)?;
    Ok(ImageInfo {
        format: Format::Qcow2,
        virtual_size: h.virtual_size,
        subformat: if h.version == 2 { "v2" } else { "v3" },
    })
}

fn held_err(source: HeldError) -> FormatError {
    FormatError::Held {
        format: Format::Qcow2,
        source,
    }
}

fn fill(r: &mut dyn Read, buf: &mut [u8]) -> Result<usize, FormatError> {
    crate::stream::read_full(r, buf).map_err(|source| FormatError::Read {
        format: Format::Qcow2,
        source,
    })
}

/// Bytes of host clusters kept for compressed streams that continue into clusters not
/// read yet, or that share a cluster with a stream a later table maps.
const MAX_COMP_CACHE: u64 = 32 << 20;

struct Comp {
    host: u64,
    len: u64,
    guest: u64,
}

struct State<'w> {
    h: Header,
    cs: u64,
    writer: &'w mut SparseWriter,
    /// Host offset of the cluster being processed.
    cur: u64,
    l1: Option<Vec<u8>>,
    l1_bytes: u64,
    /// Every L1 entry has been seen (an L2 table parsed while the L1 is still being
    /// walked must not conclude that nothing is left to map).
    l1_parsed: bool,
    l2_wanted: Wanted,
    data_wanted: Wanted,
    /// Bytes held in `comp_cache`.
    comp_cache_bytes: u64,
    comp_pending: BTreeMap<u64, Vec<Comp>>,
    comp_refs: HashMap<u64, u32>,
    comp_cache: HashMap<u64, Vec<u8>>,
    /// Bytes of each cached cluster known to belong to compressed streams already
    /// decoded. Several compressed clusters share a host cluster, and the rest of it may
    /// belong to one an L2 table not yet read maps: a cluster is let go only when known
    /// streams cover all of it (or every table is known).
    comp_covered: HashMap<u64, u64>,
    /// Reused decompression buffers (compressed input spanning clusters, one cluster out).
    comp_in: Vec<u8>,
    comp_out: Vec<u8>,
    held: Held,
    mapping_done: bool,
    /// Host bytes the image really has (known at end of stream).
    eof: Option<u64>,
    /// The image's length, when the stream says: offsets past it are refused at once.
    source_len: Option<u64>,
    /// Decodes compressed clusters on the other cores once every table is known (the
    /// usual case: qemu-img writes the tables first).
    pool: Option<DecodePool>,
    /// Set for a layer of a layered image.
    layers: Option<std::sync::Arc<super::layers::Stack>>,
    /// One cluster of zeros, made the first time a zero cluster is written over an
    /// existing disk (an overlay stack).
    zeros: Vec<u8>,
}

impl<'w> State<'w> {
    fn new(h: Header, writer: &'w mut SparseWriter, opts: &StreamOptions) -> Self {
        let cs = h.cluster_size();
        let l1_bytes = u64::from(h.l1_size) * 8;
        State {
            cs,
            writer,
            cur: 0,
            l1: (l1_bytes > 0).then(Vec::new),
            l1_bytes,
            l1_parsed: l1_bytes == 0,
            l2_wanted: Wanted::new(cs, h.l2_coverage()),
            data_wanted: Wanted::new(cs, cs),
            comp_cache_bytes: 0,
            source_len: opts.source_len,
            layers: opts.layers.clone(),
            comp_pending: BTreeMap::new(),
            comp_refs: HashMap::new(),
            comp_cache: HashMap::new(),
            comp_covered: HashMap::new(),
            comp_in: Vec::new(),
            comp_out: Vec::new(),
            held: opts.held("qcow2", h.cluster_size()),
            mapping_done: l1_bytes == 0,
            eof: None,
            pool: None,
            zeros: Vec::new(),
            h,
        }
    }

    /// Writes a zero cluster at `guest` (clipped to the disk): the sink turns it into
    /// a hole or a zeroed range.
    fn zero_cluster(&mut self, guest: u64) -> Result<(), FormatError> {
        let len = self.cs.min(self.h.virtual_size - guest) as usize;
        if self.zeros.is_empty() {
            self.zeros = vec![0u8; self.cs as usize];
        }
        self.writer.write_at(guest, &self.zeros[..len])?;
        Ok(())
    }

    fn run(&mut self, r: &mut dyn Read) -> Result<(), FormatError> {
        let mut buf = vec![0u8; self.cs as usize];
        let mut pos = self.cs;
        loop {
            if self.mapping_done && self.data_wanted.is_empty() && self.comp_pending.is_empty() {
                break;
            }
            let n = fill(r, &mut buf)?;
            if n == 0 {
                self.eof = Some(pos);
                break;
            }
            self.process(pos, &buf[..n])?;
            if (n as u64) < self.cs {
                self.eof = Some(pos + n as u64);
                break;
            }
            pos += self.cs;
        }
        if let Some(end) = self.eof {
            self.finish_at_eof(end)?;
        }
        if let Some(mut pool) = self.pool.take() {
            let (vsize, cs) = (self.h.virtual_size, self.cs);
            let writer = &mut *self.writer;
            pool.finish(&mut |p, d| write_decoded(writer, vsize, cs, p, d))?;
        }
        self.writer.flush_pending()?;
        Ok(())
    }

    fn process(&mut self, c: u64, data: &[u8]) -> Result<(), FormatError> {
        self.cur = c;
        let mut used = false;
        let l1_off = self.h.l1_table_offset;
        if let Some(l1) = &mut self.l1 {
            if c >= l1_off && c < l1_off + self.l1_bytes {
                let want = (self.l1_bytes - l1.len() as u64).min(data.len() as u64) as usize;
                l1.extend_from_slice(&data[..want]);
                used = true;
                if l1.len() as u64 == self.l1_bytes {
                    let table = self.l1.take().unwrap_or_default();
                    self.parse_l1(&table)?;
                }
            }
        }
        let rt = self.h.refcount_table_offset;
        if rt != 0 && c >= rt && c < rt + u64::from(self.h.refcount_table_clusters) * self.cs {
            used = true; // refcounts are never needed to find data
        }
        if let Some(t) = self.l2_wanted.take(c).first {
            self.parse_l2(t.guest, data)?;
            used = true;
        }
        let wants = self.data_wanted.take(c);
        if !wants.is_empty() {
            for w in wants.wants() {
                self.write_data(&w, data, c)?;
            }
            used = true;
        }
        if self.comp_refs.contains_key(&c) {
            self.cache_insert(c, data.to_vec())?;
            used = true;
            let ready: Vec<u64> = self.comp_pending.range(..=c).map(|(k, _)| *k).collect();
            for k in ready {
                for comp in self.comp_pending.remove(&k).unwrap_or_default() {
                    self.decompress(&comp)?;
                }
            }
        }
        if !used && !self.mapping_done {
            self.held.put(c, data).map_err(held_err)?;
        }
        Ok(())
    }

    fn parse_l1(&mut self, table: &[u8]) -> Result<(), FormatError> {
        let coverage = self.h.l2_coverage();
        for (i, e) in u64_table(table).iter().enumerate() {
            let off = e.get() & L1_OFFSET_MASK;
            let guest_base = i as u64 * coverage;
            if off == 0 || guest_base >= self.h.virtual_size {
                continue;
            }
            if !off.is_multiple_of(self.cs) {
                return Err(corrupt(format!(
                    "L1 entry {i} points at unaligned offset {off}"
                )));
            }
            self.check_inside(off)?;
            if off <= self.cur {
                let t = self.held.get(off).map_err(held_err)?.ok_or_else(|| {
                    corrupt(format!(
                        "L2 table at {off} lies before the L1 table and overlaps metadata"
                    ))
                })?;
                self.parse_l2(guest_base, &t)?;
            } else {
                let others = self.bookkeeping() - self.l2_wanted.entries();
                let w = Want {
                    guest: guest_base,
                    mask: None,
                };
                if !self
                    .l2_wanted
                    .insert(off, w, false, others)
                    .map_err(|_| self.over_budget("L2 tables"))?
                {
                    return Err(corrupt(format!(
                        "two L1 entries share the L2 table at {off}"
                    )));
                }
            }
        }
        self.l1 = None;
        self.l1_parsed = true;
        self.check_mapping_done();
        Ok(())
    }

    // One function on purpose (88 lines): every L2 entry form (standard, compressed,
    // zero, unallocated) checked in the one loop that bounds it against the image.
    fn parse_l2(&mut self, guest_base: u64, table: &[u8]) -> Result<(), FormatError> {
        if (table.len() as u64) < self.cs {
            return Err(Qcow2Error::Truncated {
                end: self.cur + table.len() as u64,
                offset: self.cur,
            }
            .into());
        }
        let bits = self.h.cluster_bits;
        // (entry, subcluster bitmap): the bitmap only with extended L2.
        let entries: Box<dyn Iterator<Item = (u64, u64)> + '_> = if self.h.extended_l2 {
            Box::new(
                extended_l2_table(table)
                    .iter()
                    .map(|e| (e.entry.get(), e.bitmap.get())),
            )
        } else {
            Box::new(u64_table(table).iter().map(|e| (e.get(), 0)))
        };
        for (j, (entry, bitmap)) in entries.enumerate() {
            let guest = guest_base + j as u64 * self.cs;
            if guest >= self.h.virtual_size {
                break;
            }
            if let Some(stack) = &self.layers {
                // Unallocated here: left to the layers below. Decided by a layer above:
                // not this layer's to write.
                let host = entry & L2_OFFSET_MASK;
                let decided = entry & (COMPRESSED | ZERO_FLAG) != 0 || host != 0;
                if !decided || !stack.claim(guest) {
                    continue;
                }
                // Over an existing disk a zero cluster zeroes what is there (a fresh
                // disk already reads as zeros).
                if entry & ZERO_FLAG != 0 && entry & COMPRESSED == 0 && stack.is_overlay() {
                    self.zero_cluster(guest)?;
                    continue;
                }
            }
            if entry & COMPRESSED != 0 {
                let x = 62 - (bits - 8);
                let host = entry & ((1u64 << x) - 1);
                let sectors = (entry >> x) & ((1u64 << (bits - 8)) - 1);
                let len = (sectors + 1) * 512 - (host & 511);
                self.check_inside(host)?;
                self.want_compressed(Comp { host, len, guest })?;
                continue;
            }
            let host = entry & L2_OFFSET_MASK;
            let mask = if self.h.extended_l2 {
                let (alloc, zero) = (bitmap as u32, (bitmap >> 32) as u32);
                if alloc & zero != 0 {
                    return Err(corrupt(format!("L2 entry for guest offset {guest} marks subclusters both allocated and zero")));
                }
                if host == 0 || alloc == 0 {
                    continue;
                }
                (alloc != u32::MAX).then_some(alloc)
            } else {
                if entry & ZERO_FLAG != 0 || host == 0 {
                    continue;
                }
                None
            };
            if !host.is_multiple_of(self.cs) {
                return Err(corrupt(format!(
                    "L2 entry for guest offset {guest} points at unaligned offset {host}"
                )));
            }
            let w = Want { guest, mask };
            self.check_inside(host)?;
            if host <= self.cur {
                let d = self.held.get(host).map_err(held_err)?.ok_or_else(|| {
                    corrupt(format!(
                        "data for guest offset {guest} at host offset {host} overlaps metadata"
                    ))
                })?;
                self.write_data(&w, &d, host)?;
            } else {
                let others = self.bookkeeping() - self.data_wanted.entries();
                self.data_wanted
                    .insert(host, w, true, others)
                    .map_err(|_| self.over_budget("data clusters"))?;
            }
        }
        self.check_mapping_done();
        Ok(())
    }

    fn check_mapping_done(&mut self) {
        if self.l1_parsed && self.l2_wanted.is_empty() && !self.mapping_done {
            self.mapping_done = true;
            self.held.clear();
        }
    }

    /// A table entry naming `host` in an image of known length must lie inside it.
    fn check_inside(&self, host: u64) -> Result<(), FormatError> {
        match self.source_len {
            Some(len) if host >= len => Err(Qcow2Error::Truncated {
                end: len,
                offset: host,
            }
            .into()),
            _ => Ok(()),
        }
    }

    /// Entries of every waiting map, for [`MAX_ENTRIES`].
    fn bookkeeping(&self) -> usize {
        self.l2_wanted.entries()
            + self.data_wanted.entries()
            + self.comp_pending.len()
            + self.comp_refs.len()
    }

    fn over_budget(&self, what: &str) -> FormatError {
        FormatError::Qcow2(Qcow2Error::TooScattered {
            what: format!(
                "more than {MAX_ENTRIES} separate runs of {what} wait for data not yet read at byte {}",
                self.cur
            ),
        })
    }

    fn check_budget(&self, what: &str) -> Result<(), FormatError> {
        if self.bookkeeping() >= MAX_ENTRIES {
            return Err(self.over_budget(what));
        }
        Ok(())
    }

    fn cache_insert(&mut self, c: u64, data: Vec<u8>) -> Result<(), FormatError> {
        self.comp_cache_bytes += data.len() as u64;
        if let Some(old) = self.comp_cache.insert(c, data) {
            self.comp_cache_bytes -= old.len() as u64;
        }
        if self.comp_cache_bytes > MAX_COMP_CACHE {
            return Err(FormatError::Qcow2(Qcow2Error::TooScattered {
                what: format!(
                    "more than {MAX_COMP_CACHE} bytes of clusters kept for compressed data at byte {}",
                    self.cur
                ),
            }));
        }
        Ok(())
    }

    fn cache_remove(&mut self, c: u64) -> Option<Vec<u8>> {
        let d = self.comp_cache.remove(&c)?;
        self.comp_cache_bytes -= d.len() as u64;
        Some(d)
    }

    /// Writes one data cluster. The image's last cluster may be cut short by the end of
    /// the file (qemu writes images that end inside their last, partly used cluster,
    /// and reads what lies past the end as zeros): then the bytes present are written
    /// and the rest stays zero, as long as `data` is that final piece.
    fn write_data(&mut self, w: &Want, data: &[u8], host: u64) -> Result<(), FormatError> {
        let vsize = self.h.virtual_size;
        let full = (self.cs.min(vsize - w.guest)) as usize;
        let at_eof = (data.len() as u64) < self.cs;
        if data.len() < full && !at_eof {
            return Err(Qcow2Error::Truncated {
                end: host + data.len() as u64,
                offset: host,
            }
            .into());
        }
        let avail = data.len().min(full);
        match w.mask {
            None => self.writer.write_at(w.guest, &data[..avail])?,
            Some(mask) => {
                let sub = self.cs / 32;
                for i in 0..32u64 {
                    let g = w.guest + i * sub;
                    if g >= vsize {
                        break;
                    }
                    let at = (i * sub) as usize;
                    if mask & (1 << i) != 0 && at < avail {
                        let len = (sub.min(vsize - g) as usize).min(avail - at);
                        self.writer.write_at(g, &data[at..at + len])?;
                    }
                }
            }
        }
        Ok(())
    }

    fn want_compressed(&mut self, comp: Comp) -> Result<(), FormatError> {
        let first = comp.host & !(self.cs - 1);
        let last = (comp.host + comp.len - 1) & !(self.cs - 1);
        let mut c = first;
        while c <= last {
            *self.comp_refs.entry(c).or_default() += 1;
            if c <= self.cur && !self.comp_cache.contains_key(&c) {
                match self.held.get(c).map_err(held_err)? {
                    Some(d) => {
                        self.cache_insert(c, d)?;
                    }
                    // Compressed data may run past the end of the image (the length
                    // is an upper bound), never into metadata before it.
                    None if c == last && c > first => {}
                    None => {
                        return Err(corrupt(format!(
                        "compressed data for guest offset {} at host offset {} overlaps metadata",
                        comp.guest, comp.host
                    )))
                    }
                }
            }
            c += self.cs;
        }
        if last <= self.cur {
            self.decompress(&comp)
        } else {
            self.check_budget("compressed clusters")?;
            self.comp_pending.entry(last).or_default().push(comp);
            Ok(())
        }
    }

    fn decompress(&mut self, comp: &Comp) -> Result<(), FormatError> {
        if self.mapping_done {
            return self.decompress_parallel(comp);
        }
        let first = comp.host & !(self.cs - 1);
        let last = (comp.host + comp.len - 1) & !(self.cs - 1);
        let start = (comp.host - first) as usize;
        let truncated = |have: usize| {
            FormatError::from(Qcow2Error::Truncated {
                end: first + have as u64,
                offset: comp.host,
            })
        };
        // Buffers reused across clusters: no allocation per compressed cluster.
        let mut out = std::mem::take(&mut self.comp_out);
        out.resize(self.cs as usize, 0);
        let decoded = if first == last {
            // The usual case: the stream lies inside one host cluster; decode in place.
            let d = self.comp_cache.get(&first).map_or(&[][..], Vec::as_slice);
            let end = (start + comp.len as usize).min(d.len());
            if start >= end {
                return Err(truncated(d.len()));
            }
            decode_cluster(self.h.compression, &d[start..end], &mut out)
        } else {
            let mut input = std::mem::take(&mut self.comp_in);
            input.clear();
            self.gather(first, last, &mut input);
            let end = (start + comp.len as usize).min(input.len());
            if start >= end {
                return Err(truncated(input.len()));
            }
            let r = decode_cluster(self.h.compression, &input[start..end], &mut out);
            self.comp_in = input;
            r
        };
        let consumed = decoded.map_err(|source| Qcow2Error::Decompress {
            guest: comp.guest,
            source,
        })?;
        let out_len = self.cs.min(self.h.virtual_size - comp.guest) as usize;
        self.writer.write_at(comp.guest, &out[..out_len])?;
        self.comp_out = out;
        // Account the exact bytes this stream used in each cluster it touched, then let
        // go of clusters nothing else can need.
        let (s_host, e_host) = (comp.host, comp.host + consumed);
        let mut c = first;
        while c <= last {
            let used = e_host.min(c + self.cs).saturating_sub(s_host.max(c));
            *self.comp_covered.entry(c).or_default() += used;
            if let Some(n) = self.comp_refs.get_mut(&c) {
                *n -= 1;
                if *n == 0 {
                    self.comp_refs.remove(&c);
                    let covered = self.comp_covered.remove(&c).unwrap_or(0);
                    if let Some(data) = self.cache_remove(c) {
                        if !self.mapping_done
                            && covered < data.len() as u64
                            && self.held.get(c).map_err(held_err)?.is_none()
                        {
                            self.held.put(c, &data).map_err(held_err)?;
                        }
                    }
                }
            }
            c += self.cs;
        }
        Ok(())
    }

    /// Appends the cached host clusters `first..=last` to `input`, stopping at the end
    /// of the image (a compressed length is an upper bound and may run past it).
    fn gather(&self, first: u64, last: u64, input: &mut Vec<u8>) {
        let mut c = first;
        while c <= last {
            match self.comp_cache.get(&c) {
                Some(d) => input.extend_from_slice(d),
                None => break,
            }
            c += self.cs;
        }
    }

    /// Every table is known, so no cluster needs keeping for later: the compressed bytes
    /// go to a worker, and the clusters they came from are let go at once.
    fn decompress_parallel(&mut self, comp: &Comp) -> Result<(), FormatError> {
        let first = comp.host & !(self.cs - 1);
        let last = (comp.host + comp.len - 1) & !(self.cs - 1);
        let start = (comp.host - first) as usize;
        let compression = self.h.compression;
        let mut pool = self.pool.take().unwrap_or_else(|| {
            DecodePool::new(
                std::sync::Arc::new(move |src: &[u8], out: &mut [u8]| {
                    decode_cluster(compression, src, out)
                }),
                self.cs as usize,
                4 << 20,
            )
        });
        let (mut input, out) = pool.buffers(self.cs as usize);
        self.gather(first, last, &mut input);
        let end = (start + comp.len as usize).min(input.len());
        if start >= end {
            return Err(Qcow2Error::Truncated {
                end: first + input.len() as u64,
                offset: comp.host,
            }
            .into());
        }
        input.truncate(end);
        input.drain(..start);
        let (vsize, cs) = (self.h.virtual_size, self.cs);
        let writer = &mut *self.writer;
        let job = Job {
            guest: comp.guest,
            input,
            out,
        };
        let submitted = pool.submit(job, &mut |p, d| write_decoded(writer, vsize, cs, p, d));
        self.pool = Some(pool);
        submitted?;
        let mut c = first;
        while c <= last {
            if let Some(n) = self.comp_refs.get_mut(&c) {
                *n -= 1;
                if *n == 0 {
                    self.comp_refs.remove(&c);
                    self.cache_remove(c);
                }
            }
            c += self.cs;
        }
        Ok(())
    }

    fn finish_at_eof(&mut self, end: u64) -> Result<(), FormatError> {
        if !self.l1_parsed {
            return Err(Qcow2Error::Truncated {
                end,
                offset: self.h.l1_table_offset,
            }
            .into());
        }
        if let Some(off) = self.l2_wanted.first() {
            return Err(Qcow2Error::Truncated { end, offset: off }.into());
        }
        if let Some(off) = self.data_wanted.first() {
            return Err(Qcow2Error::Truncated { end, offset: off }.into());
        }
        // Compressed clusters at the very end: their stated length may pass EOF.
        let pending: Vec<Comp> = std::mem::take(&mut self.comp_pending)
            .into_values()
            .flatten()
            .collect();
        for comp in pending {
            self.decompress(&comp)?;
        }
        Ok(())
    }
}

/// Writes a cluster a worker decoded.
fn write_decoded(
    writer: &mut SparseWriter,
    virtual_size: u64,
    cs: u64,
    pool: &mut DecodePool,
    d: Done,
) -> Result<(), FormatError> {
    d.result.map_err(|source| Qcow2Error::Decompress {
        guest: d.guest,
        source,
    })?;
    let n = cs.min(virtual_size - d.guest) as usize;
    writer.write_at(d.guest, &d.out[..n])?;
    pool.recycle(d.input, d.out);
    Ok(())
}

/// Decodes one compressed cluster into `out` (exactly one cluster); returns the bytes of
/// `src` the stream really occupies (`src` is an upper bound that may run into the next
/// compressed cluster).
fn decode_cluster(c: Compression, src: &[u8], out: &mut [u8]) -> io::Result<u64> {
    let bad = |m: String| io::Error::new(io::ErrorKind::InvalidData, m);
    match c {
        // qemu writes raw deflate (no zlib header), one stream per cluster.
        Compression::Deflate => {
            let mut d = flate2::Decompress::new(false);
            d.decompress(src, out, flate2::FlushDecompress::Finish)
                .map_err(|e| bad(e.to_string()))?;
            if d.total_out() != out.len() as u64 {
                return Err(bad(format!(
                    "deflate stream gave {} bytes, not a cluster",
                    d.total_out()
                )));
            }
            Ok(d.total_in())
        }
        // One zstd frame per cluster.
        Compression::Zstd => {
            let frame = zstd::zstd_safe::find_frame_compressed_size(src)
                .map_err(|code| bad(zstd::zstd_safe::get_error_name(code).to_string()))?;
            let n = zstd::bulk::Decompressor::new()?.decompress_to_buffer(&src[..frame], out)?;
            if n != out.len() {
                return Err(bad(format!("zstd frame gave {n} bytes, not a cluster")));
            }
            Ok(frame as u64)
        }
    }
}

fn corrupt(m: String) -> FormatError {
    FormatError::Qcow2(Qcow2Error::Corrupt(m))
}
