//! VMDK (hosted sparse extents: monolithicSparse and streamOptimized) -> raw, streaming.
//!
//! Both subformats are one file holding a sparse extent header, an embedded text
//! descriptor and grains. monolithicSparse finds grains through a grain directory (GD)
//! and grain tables (GTs) written before the grains; streamOptimized (the disk inside an
//! OVA) compresses each grain behind a marker that names its guest sector, and puts
//! the tables at the end: we decode it marker by marker and never need the tables.
//! Descriptor-only VMDKs (monolithicFlat, split extents) and images with a parent name
//! other files and are refused. Checks mirror qemu's vmdk driver.

use super::contract::{check_size, FormatError, ImageInfo, StreamOptions};
use super::forward::decode_pool::{DecodePool, Done, Job};
use super::forward::hostread::{check_table, copy_extents, push_extent, Extent, HostReader};
use crate::sink::SparseWriter;
use crate::sniff::Format;
use std::io::Read;
use std::sync::Arc;
use zerocopy::byteorder::little_endian::{U16, U32, U64};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

const F: Format = Format::Vmdk;
const MAGIC: &[u8; 4] = b"KDMV";
const FLAG_ZEROED_GRAIN_GTE: u32 = 1 << 2;
const FLAG_COMPRESSED: u32 = 1 << 16;
const FLAG_MARKERS: u32 = 1 << 17;
const COMPRESS_DEFLATE: u16 = 1;
const GD_AT_END: u64 = u64::MAX;
/// qemu's bound on a grain is 2^21 sectors = 1 GiB; we take 8 MiB, far above the
/// 64 KiB every tool writes: a grain is decoded whole, so it bounds our memory (a few
/// grains in flight, each with its compressed input), and a larger field is refused.
const MAX_GRAIN_BYTES: u64 = 8 << 20;
const MAX_DESCRIPTOR: u64 = 1 << 20;
const MARKER_EOS: u32 = 0;
const MARKER_GT: u32 = 1;
const MARKER_GD: u32 = 2;
const MARKER_FOOTER: u32 = 3;

/// `SparseExtentHeader` (VMware's Virtual Disk Format 1.1), little-endian, packed.
#[derive(FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
struct OnDiskHeader {
    magic: [u8; 4],
    version: U32,
    flags: U32,
    capacity: U64,
    grain_size: U64,
    descriptor_offset: U64,
    descriptor_size: U64,
    num_gtes_per_gt: U32,
    rgd_offset: U64,
    gd_offset: U64,
    overhead: U64,
    unclean_shutdown: u8,
    line_chars: [u8; 4],
    compress_algorithm: U16,
    pad: [u8; 433],
}

/// A streamOptimized marker: a grain (`size` > 0, compressed bytes follow) or, with
/// `size` 0, metadata of `kind` whose `lba` sectors follow.
#[derive(FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
struct OnDiskMarker {
    lba: U64,
    size: U32,
    kind: U32,
}

const _: () = assert!(std::mem::size_of::<OnDiskHeader>() == 512);

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    pub version: u32,
    pub flags: u32,
    /// Guest size in sectors.
    pub capacity: u64,
    /// Grain size in sectors.
    pub grain: u64,
    pub descriptor_offset: u64,
    pub descriptor_size: u64,
    pub gtes_per_gt: u32,
    pub gd_offset: u64,
    pub overhead: u64,
    pub compress: u16,
}

impl Header {
    pub fn parse(b: &[u8]) -> Result<Header, FormatError> {
        let raw = OnDiskHeader::ref_from_prefix(b).ok().map(|(h, _)| h);
        let Some(raw) = raw.filter(|h| &h.magic == MAGIC) else {
            if b.starts_with(b"# Disk DescriptorFile") || crate::sniff::is_vmdk_descriptor(b) {
                return Err(FormatError::external(
                    F,
                    "a text descriptor whose extents are separate files",
                ));
            }
            return Err(FormatError::corrupt(F, "no sparse extent header"));
        };
        let h = Header {
            version: raw.version.get(),
            flags: raw.flags.get(),
            capacity: raw.capacity.get(),
            grain: raw.grain_size.get(),
            descriptor_offset: raw.descriptor_offset.get(),
            descriptor_size: raw.descriptor_size.get(),
            gtes_per_gt: raw.num_gtes_per_gt.get(),
            gd_offset: raw.gd_offset.get(),
            overhead: raw.overhead.get(),
            compress: raw.compress_algorithm.get(),
        };
        if !(1..=3).contains(&h.version) {
            return Err(FormatError::unsupported(
                F,
                format!("version {}", h.version),
            ));
        }
        if h.grain == 0 || !h.grain.is_power_of_two() {
            return Err(FormatError::corrupt(
                F,
                format!("grain size {} sectors", h.grain),
            ));
        }
        if h.grain.checked_mul(512).is_none_or(|b| b > MAX_GRAIN_BYTES) {
            return Err(FormatError::unsupported(
                F,
                format!(
                    "grains of {} sectors (more than {MAX_GRAIN_BYTES} bytes)",
                    h.grain
                ),
            ));
        }
        if h.gtes_per_gt == 0 || h.gtes_per_gt > 512 {
            return Err(FormatError::corrupt(
                F,
                format!("{} entries per grain table", h.gtes_per_gt),
            ));
        }
        if h.capacity > u64::MAX / 512 {
            return Err(FormatError::corrupt(F, "capacity overflows"));
        }
        if h.flags & FLAG_COMPRESSED != 0 && h.compress != COMPRESS_DEFLATE {
            return Err(FormatError::unsupported(
                F,
                format!("compression algorithm {}", h.compress),
            ));
        }
        Ok(h)
    }

    pub fn virtual_size(&self) -> u64 {
        self.capacity * 512
    }

    fn grain_bytes(&self) -> u64 {
        self.grain * 512
    }

    fn stream_optimized(&self) -> bool {
        self.flags & FLAG_COMPRESSED != 0 && self.flags & FLAG_MARKERS != 0
    }
}

/// What the embedded descriptor says; only `createType` matters once parents are ruled out.
pub fn check_descriptor(text: &str) -> Result<String, FormatError> {
    let mut create_type = String::new();
    for line in text.lines() {
        let line = line.trim();
        let Some((key, value)) = line.split_once('=') else {
            continue;
        };
        let (key, value) = (key.trim(), value.trim().trim_matches('"'));
        match key {
            "createType" => create_type = value.to_string(),
            "parentCID" if !value.eq_ignore_ascii_case("ffffffff") => {
                return Err(FormatError::external(
                    F,
                    format!("a parent (parentCID={value})"),
                ));
            }
            "parentFileNameHint" => {
                return Err(FormatError::external(F, format!("a parent file {value:?}")));
            }
            _ => {}
        }
    }
    match create_type.as_str() {
        "monolithicSparse" | "streamOptimized" | "" => Ok(create_type),
        other => Err(FormatError::unsupported(
            F,
            format!("createType {other:?} in a sparse extent"),
        )),
    }
}

/// Converts the VMDK image read from `r` into `writer`; the caller drains the rest.
pub fn convert(
    r: &mut dyn Read,
    writer: &mut SparseWriter,
    opts: &StreamOptions,
) -> Result<ImageInfo, FormatError> {
    let mut rd = HostReader::for_image(r, F, opts);
    let mut head = vec![0u8; 512];
    let n = rd.read_prefix(&mut head)?;
    let h = Header::parse(&head[..n])?;
    let size = h.virtual_size();
    check_size(size, opts)?;
    if h.descriptor_offset > 0 {
        let len = h.descriptor_size.saturating_mul(512).min(MAX_DESCRIPTOR);
        let mut d = vec![0u8; len as usize];
        rd.read_at(h.descriptor_offset.saturating_mul(512), &mut d)?;
        let end = d.iter().position(|&b| b == 0).unwrap_or(d.len());
        check_descriptor(&String::from_utf8_lossy(&d[..end]))?;
    }
    writer.prepare_random(size)?;
    let subformat = if h.stream_optimized() {
        "streamOptimized"
    } else if h.flags & FLAG_COMPRESSED != 0 {
        return Err(FormatError::unsupported(
            F,
            "compressed grains without markers",
        ));
    } else if h.gd_offset == GD_AT_END {
        return Err(FormatError::unsupported(
            F,
            "a grain directory at the end without markers",
        ));
    } else {
        "monolithicSparse"
    };
    tracing::info!(
        subformat,
        virtual_size = size,
        grain = h.grain_bytes(),
        "vmdk image"
    );
    if h.stream_optimized() {
        let ends_after = last_grain_marker(&mut rd, &h)?;
        rd.stop_retaining()?;
        stream_markers(&mut rd, writer, &h, ends_after)?;
    } else {
        let extents = read_tables(&mut rd, &h)?;
        rd.stop_retaining()?;
        copy_extents(&mut rd, writer, extents)?;
    }
    writer.flush_pending()?;
    Ok(ImageInfo {
        format: F,
        virtual_size: size,
        subformat,
    })
}

/// monolithicSparse: GD -> GTs -> grain extents.
fn read_tables(rd: &mut HostReader<'_>, h: &Header) -> Result<Vec<Extent>, FormatError> {
    let gb = h.grain_bytes();
    let size = h.virtual_size();
    let mut extents = Vec::new();
    grain_entries(rd, h, |guest, sector| {
        push_extent(
            F,
            &mut extents,
            Extent {
                host: sector * 512,
                guest,
                len: gb.min(size - guest),
            },
        )
    })?;
    Ok(extents)
}

/// Every allocated grain's guest offset and host sector, through the grain directory at
/// `gd_offset` and its tables, in host order of the tables.
fn grain_entries(
    rd: &mut HostReader<'_>,
    h: &Header,
    mut each: impl FnMut(u64, u64) -> Result<(), FormatError>,
) -> Result<(), FormatError> {
    let gt_cover = u64::from(h.gtes_per_gt) * h.grain;
    let gts = h.capacity.div_ceil(gt_cover);
    // 4 bytes per grain table (32 MiB of disk with the usual 512 x 64 KiB): 4 MiB maps
    // 32 PiB, and bounds what odd grain sizes can make us allocate.
    check_table(F, "grain directory", gts * 4, 4 << 20)?;
    let mut gd = vec![U32::ZERO; gts as usize];
    rd.read_at(h.gd_offset.saturating_mul(512), gd.as_mut_bytes())?;
    let mut tables: Vec<(u64, u64)> = gd
        .iter()
        .enumerate()
        .map(|(i, e)| (u64::from(e.get()), i as u64))
        .filter(|&(sector, _)| sector != 0)
        .collect();
    tables.sort_unstable();
    let gb = h.grain_bytes();
    let size = h.virtual_size();
    let mut gt = vec![U32::ZERO; h.gtes_per_gt as usize];
    for (sector, index) in tables {
        rd.read_at(sector * 512, gt.as_mut_bytes())?;
        for (j, e) in gt.iter().enumerate() {
            let e = u64::from(e.get());
            if e == 0 || (e == 1 && h.flags & FLAG_ZEROED_GRAIN_GTE != 0) {
                continue;
            }
            let guest = (index * u64::from(h.gtes_per_gt) + j as u64) * gb;
            if guest >= size {
                break;
            }
            each(guest, e)?;
        }
    }
    Ok(())
}

/// A streamOptimized image whose grain directory is in its header (qemu-img writes
/// it there) may end right after its last grain, with no end-of-stream marker
/// (qemu-img 10 does when the data does not compress): the byte where that last
/// grain's marker starts, from the tables, so the stream may end after it and only
/// there (a stream cut anywhere before it is still truncated).
fn last_grain_marker(rd: &mut HostReader<'_>, h: &Header) -> Result<Option<u64>, FormatError> {
    if h.gd_offset == GD_AT_END || h.gd_offset == 0 || h.gd_offset >= h.overhead {
        return Ok(None);
    }
    let mut last = 0u64;
    grain_entries(rd, h, |_, sector| {
        last = last.max(sector);
        Ok(())
    })?;
    Ok(Some(last.saturating_mul(512)))
}

/// streamOptimized: `[lba u64][size u32][deflate data]` grains and
/// `[sectors u64][0 u32][type u32]` metadata markers, each padded to a sector.
// One function on purpose (about 95 lines): the stream-optimized marker loop, one arm per
// marker type, sharing the read position and the pool of grains being inflated.
fn stream_markers(
    rd: &mut HostReader<'_>,
    writer: &mut SparseWriter,
    h: &Header,
    ends_after: Option<u64>,
) -> Result<(), FormatError> {
    let gb = h.grain_bytes();
    let size = h.virtual_size();
    // deflate never grows data by more than a few bytes per 16 KiB block.
    let max_compressed = gb + gb / 16 + 4096;
    let mut at = h
        .overhead
        .saturating_mul(512)
        .max(rd.pos().div_ceil(512) * 512);
    let mut sector = [0u8; 512];
    let mut pool = DecodePool::new(Arc::new(inflate_grain), gb as usize, 4 << 20);
    let mut on_done = |p: &mut DecodePool, d: Done| -> Result<(), FormatError> {
        d.result.map_err(|e| {
            FormatError::corrupt(
                F,
                format!("grain for byte {} does not inflate: {e}", d.guest),
            )
        })?;
        let want = gb.min(size - d.guest) as usize;
        writer.write_at(d.guest, &d.out[..want])?;
        p.recycle(d.input, d.out);
        Ok(())
    };
    loop {
        match rd.read_at(at, &mut sector) {
            Ok(()) => {}
            // The end of the stream after the last grain the tables name.
            Err(FormatError::Truncated { end, .. })
                if end == at && ends_after.is_some_and(|last| at > last) =>
            {
                break
            }
            Err(e) => return Err(e),
        }
        let (marker, _) = OnDiskMarker::ref_from_prefix(&sector[..])
            .map_err(|_| FormatError::corrupt(F, "short marker"))?;
        let lba = marker.lba.get();
        let len = u64::from(marker.size.get());
        if len == 0 {
            let kind = marker.kind.get();
            match kind {
                MARKER_EOS => break,
                MARKER_GT | MARKER_GD | MARKER_FOOTER => {
                    at = lba
                        .checked_add(1)
                        .and_then(|s| s.checked_mul(512))
                        .and_then(|b| b.checked_add(at))
                        .ok_or_else(|| FormatError::corrupt(F, "metadata marker overflows"))?;
                    continue;
                }
                other => {
                    return Err(FormatError::corrupt(
                        F,
                        format!("unknown marker type {other} at byte {at}"),
                    ))
                }
            }
        }
        if len > max_compressed {
            return Err(FormatError::corrupt(
                F,
                format!("compressed grain of {len} bytes at byte {at}"),
            ));
        }
        let guest = lba
            .checked_mul(512)
            .filter(|g| g.is_multiple_of(gb) && *g < size)
            .ok_or_else(|| {
                FormatError::corrupt(F, format!("grain marker for sector {lba} at byte {at}"))
            })?;
        let (mut comp, out) = pool.buffers(gb as usize);
        let first = (len as usize).min(500);
        comp.extend_from_slice(&sector[12..12 + first]);
        if len as usize > first {
            let old = comp.len();
            comp.resize(len as usize, 0);
            rd.read_at(at + 512, &mut comp[old..])?;
        }
        pool.submit(
            Job {
                guest,
                input: comp,
                out,
            },
            &mut on_done,
        )?;
        at += (12 + len).div_ceil(512) * 512;
    }
    pool.finish(&mut on_done)
}

/// One streamOptimized grain: a zlib stream that inflates to at most a grain (the rest
/// reads as zeros).
fn inflate_grain(input: &[u8], out: &mut [u8]) -> std::io::Result<u64> {
    let bad = |m: String| std::io::Error::new(std::io::ErrorKind::InvalidData, m);
    let mut z = flate2::Decompress::new(true);
    let status = z
        .decompress(input, out, flate2::FlushDecompress::Finish)
        .map_err(|e| bad(e.to_string()))?;
    if status != flate2::Status::StreamEnd {
        return Err(bad("not one zlib stream within the grain size".into()));
    }
    let n = z.total_out() as usize;
    out[n..].fill(0);
    Ok(z.total_in())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn descriptor_parents_and_types() {
        let ok = "# Disk DescriptorFile\nversion=1\nCID=1234\nparentCID=ffffffff\ncreateType=\"streamOptimized\"\n";
        assert_eq!(check_descriptor(ok).expect("ok"), "streamOptimized");
        let parent = "parentCID=12345678\ncreateType=\"monolithicSparse\"\n";
        assert!(matches!(
            check_descriptor(parent),
            Err(FormatError::External { .. })
        ));
        let hint = "parentFileNameHint=\"/etc/shadow\"\n";
        assert!(matches!(
            check_descriptor(hint),
            Err(FormatError::External { .. })
        ));
        assert!(check_descriptor("createType=\"vmfs\"\n").is_err());
    }

    #[test]
    fn header_bounds() {
        let mut b = vec![0u8; 512];
        b[..4].copy_from_slice(MAGIC);
        b[4..8].copy_from_slice(&1u32.to_le_bytes());
        b[12..20].copy_from_slice(&2048u64.to_le_bytes());
        b[20..28].copy_from_slice(&128u64.to_le_bytes());
        b[44..48].copy_from_slice(&512u32.to_le_bytes());
        assert_eq!(Header::parse(&b).expect("ok").virtual_size(), 1 << 20);
        b[20..28].copy_from_slice(&u64::MAX.to_le_bytes());
        assert!(Header::parse(&b).is_err());
        let desc = b"# Disk DescriptorFile\nRW 100 FLAT \"/etc/passwd\" 0\n";
        let mut d = vec![0u8; 512];
        d[..desc.len()].copy_from_slice(desc);
        assert!(matches!(
            Header::parse(&d),
            Err(FormatError::External { .. })
        ));
    }
}
