//! VHDX -> raw, streaming.
//!
//! Layout (MS-VHDX): a file identifier, two headers (at 64 and 128 KiB, the valid one
//! with the higher sequence number wins), a region table at 192 KiB (copy at 256 KiB)
//! locating the block allocation table (BAT) and the metadata region, then payload
//! blocks. Tools write the regions before the blocks, so the image streams. The BAT
//! interleaves one sector-bitmap entry after every `chunk_ratio` payload entries.
//!
//! Refused: a log that still holds entries for the current log GUID (the image was not
//! closed cleanly and needs a replay, which would change its content), a parent
//! (differencing disks), unknown required regions or metadata items, and sizes outside
//! the spec's bounds. Checks follow qemu's vhdx driver.

use super::contract::{check_size, le16, le32, le64, FormatError, ImageInfo, StreamOptions};
use super::forward::hostread::{copy_extents, push_extent, Extent, HostReader};
use crate::sink::SparseWriter;
use crate::sniff::Format;
use std::io::Read;

const F: Format = Format::Vhdx;
const KIB: u64 = 1024;
const MIB: u64 = 1 << 20;
const HEADER_OFFSETS: [u64; 2] = [64 * KIB, 128 * KIB];
const HEADER_LEN: usize = 4096;
const REGION_TABLE_OFFSETS: [u64; 2] = [192 * KIB, 256 * KIB];
const REGION_TABLE_LEN: usize = 64 * 1024;
/// 16 MiB maps 2 TiB with 1 MiB blocks, the 64 TiB maximum with 32 MiB blocks (Hyper-V's
/// default); it is read whole, before the metadata says how much of it is needed.
const MAX_BAT_BYTES: u64 = 16 * MIB;
const MAX_METADATA_BYTES: u64 = MIB;
const MAX_VIRTUAL_SIZE: u64 = 64 << 40;

const BAT_GUID: [u8; 16] = guid(
    0x2DC2_7766,
    0xF623,
    0x4200,
    [0x9D, 0x64, 0x11, 0x5E, 0x9B, 0xFD, 0x4A, 0x08],
);
const METADATA_GUID: [u8; 16] = guid(
    0x8B7C_A206,
    0x4790,
    0x4B9A,
    [0xB8, 0xFE, 0x57, 0x5F, 0x05, 0x0F, 0x88, 0x6E],
);
const FILE_PARAMETERS: [u8; 16] = guid(
    0xCAA1_6737,
    0xFA36,
    0x4D43,
    [0xB3, 0xB6, 0x33, 0xF0, 0xAA, 0x44, 0xE7, 0x6B],
);
const VIRTUAL_DISK_SIZE: [u8; 16] = guid(
    0x2FA5_4224,
    0xCD1B,
    0x4876,
    [0xB2, 0x11, 0x5D, 0xBE, 0xD8, 0x3B, 0xF4, 0xB8],
);
const LOGICAL_SECTOR_SIZE: [u8; 16] = guid(
    0x8141_BF1D,
    0xA96F,
    0x4709,
    [0xBA, 0x47, 0xF2, 0x33, 0xA8, 0xFA, 0xAB, 0x5F],
);
const PHYSICAL_SECTOR_SIZE: [u8; 16] = guid(
    0xCDA3_48C7,
    0x445D,
    0x4471,
    [0x9C, 0xC9, 0xE9, 0x88, 0x52, 0x51, 0xC5, 0x56],
);
const PAGE83: [u8; 16] = guid(
    0xBECA_12AB,
    0xB2E6,
    0x4523,
    [0x93, 0xEF, 0xC3, 0x09, 0xE0, 0x00, 0xC7, 0x46],
);
const PARENT_LOCATOR: [u8; 16] = guid(
    0xA8D3_5F2D,
    0xB30B,
    0x454D,
    [0xAB, 0xF7, 0xD3, 0xD8, 0x48, 0x34, 0xAB, 0x0C],
);

/// A GUID as stored on disk (first three fields little-endian).
const fn guid(a: u32, b: u16, c: u16, d: [u8; 8]) -> [u8; 16] {
    let a = a.to_le_bytes();
    let b = b.to_le_bytes();
    let c = c.to_le_bytes();
    [
        a[0], a[1], a[2], a[3], b[0], b[1], c[0], c[1], d[0], d[1], d[2], d[3], d[4], d[5], d[6],
        d[7],
    ]
}

/// CRC-32C (Castagnoli), as VHDX checksums its headers, region tables and log entries.
pub fn crc32c(data: &[u8]) -> u32 {
    static TABLE: std::sync::OnceLock<[u32; 256]> = std::sync::OnceLock::new();
    let table = TABLE.get_or_init(|| {
        let mut t = [0u32; 256];
        for (i, e) in t.iter_mut().enumerate() {
            let mut c = i as u32;
            for _ in 0..8 {
                c = if c & 1 != 0 {
                    (c >> 1) ^ 0x82F6_3B78
                } else {
                    c >> 1
                };
            }
            *e = c;
        }
        t
    });
    !data.iter().fold(!0u32, |c, &b| {
        table[((c ^ u32::from(b)) & 0xff) as usize] ^ (c >> 8)
    })
}

/// Whether `b` (a header, region table or log entry) carries a valid checksum at 4..8.
fn checksum_ok(b: &[u8]) -> bool {
    if cfg!(fuzzing) {
        return true;
    }
    let stored = le32(b, 4);
    let mut copy = b.to_vec();
    copy[4..8].fill(0);
    crc32c(&copy) == stored
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    pub sequence: u64,
    pub log_guid: [u8; 16],
    pub log_length: u32,
    pub log_offset: u64,
}

impl Header {
    fn parse(b: &[u8]) -> Option<Header> {
        if &b[..4] != b"head" || !checksum_ok(b) || le16(b, 66) != 1 {
            return None;
        }
        Some(Header {
            sequence: le64(b, 8),
            log_guid: b[48..64].try_into().expect("16 bytes"),
            log_length: le32(b, 68),
            log_offset: le64(b, 72),
        })
    }
}

/// The current header: the valid one with the higher sequence number.
pub fn current_header(h1: &[u8], h2: &[u8]) -> Result<Header, FormatError> {
    match (Header::parse(h1), Header::parse(h2)) {
        (Some(a), Some(b)) => Ok(if b.sequence > a.sequence { b } else { a }),
        (Some(a), None) | (None, Some(a)) => Ok(a),
        (None, None) => Err(FormatError::corrupt(F, "no valid header")),
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Region {
    pub offset: u64,
    pub len: u64,
}

/// (BAT, metadata) from a region table.
pub fn parse_regions(t: &[u8]) -> Option<Result<(Region, Region), FormatError>> {
    if &t[..4] != b"regi" || !checksum_ok(t) {
        return None;
    }
    let count = le32(t, 8) as usize;
    if count > 2047 {
        return Some(Err(FormatError::corrupt(F, format!("{count} regions"))));
    }
    let (mut bat, mut meta) = (None, None);
    for i in 0..count {
        let e = &t[16 + 32 * i..48 + 32 * i];
        let r = Region {
            offset: le64(e, 16),
            len: u64::from(le32(e, 24)),
        };
        let required = le32(e, 28) & 1 != 0;
        if !r.offset.is_multiple_of(MIB) || r.offset < MIB {
            return Some(Err(FormatError::corrupt(
                F,
                format!("region at {}", r.offset),
            )));
        }
        match e[..16].try_into().expect("16 bytes") {
            BAT_GUID => bat = Some(r),
            METADATA_GUID => meta = Some(r),
            _ if required => {
                return Some(Err(FormatError::unsupported(
                    F,
                    "an unknown required region",
                )))
            }
            _ => {}
        }
    }
    Some(match (bat, meta) {
        (Some(b), Some(m)) => Ok((b, m)),
        _ => Err(FormatError::corrupt(F, "no BAT or metadata region")),
    })
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Metadata {
    pub block_size: u64,
    pub virtual_size: u64,
    pub logical_sector: u64,
}

/// The metadata region (its table and the items it points at, all inside `m`).
pub fn parse_metadata(m: &[u8]) -> Result<Metadata, FormatError> {
    if m.len() < 64 * 1024 || &m[..8] != b"metadata" {
        return Err(FormatError::corrupt(F, "no metadata table"));
    }
    let count = le16(m, 10) as usize;
    if count > 2047 {
        return Err(FormatError::corrupt(F, format!("{count} metadata items")));
    }
    let item = |off: u32, len: u32, want: usize| -> Result<&[u8], FormatError> {
        let (off, len) = (off as usize, len as usize);
        if len < want || off < 64 * 1024 || off.checked_add(want).is_none_or(|e| e > m.len()) {
            return Err(FormatError::corrupt(
                F,
                "a metadata item outside its region",
            ));
        }
        Ok(&m[off..off + want])
    };
    let (mut block_size, mut virtual_size, mut logical) = (None, None, None);
    for i in 0..count {
        let e = &m[32 + 32 * i..64 + 32 * i];
        let id: [u8; 16] = e[..16].try_into().expect("16 bytes");
        let (off, len, flags) = (le32(e, 16), le32(e, 20), le32(e, 24));
        match id {
            FILE_PARAMETERS => {
                let v = item(off, len, 8)?;
                if le32(v, 4) & 2 != 0 {
                    return Err(FormatError::external(
                        F,
                        "a parent disk (differencing VHDX)",
                    ));
                }
                block_size = Some(u64::from(le32(v, 0)));
            }
            VIRTUAL_DISK_SIZE => virtual_size = Some(le64(item(off, len, 8)?, 0)),
            LOGICAL_SECTOR_SIZE => logical = Some(u64::from(le32(item(off, len, 4)?, 0))),
            PARENT_LOCATOR => {
                return Err(FormatError::external(
                    F,
                    "a parent locator (differencing VHDX)",
                ))
            }
            PHYSICAL_SECTOR_SIZE | PAGE83 => {}
            _ if flags & 4 != 0 => {
                return Err(FormatError::unsupported(
                    F,
                    "an unknown required metadata item",
                ))
            }
            _ => {}
        }
    }
    let (Some(block_size), Some(virtual_size), Some(logical_sector)) =
        (block_size, virtual_size, logical)
    else {
        return Err(FormatError::corrupt(F, "missing required metadata"));
    };
    if !block_size.is_power_of_two() || !(MIB..=256 * MIB).contains(&block_size) {
        return Err(FormatError::corrupt(F, format!("block size {block_size}")));
    }
    if logical_sector != 512 && logical_sector != 4096 {
        return Err(FormatError::corrupt(
            F,
            format!("logical sector size {logical_sector}"),
        ));
    }
    if virtual_size > MAX_VIRTUAL_SIZE || !virtual_size.is_multiple_of(logical_sector) {
        return Err(FormatError::corrupt(
            F,
            format!("virtual size {virtual_size}"),
        ));
    }
    Ok(Metadata {
        block_size,
        virtual_size,
        logical_sector,
    })
}

impl Metadata {
    /// Payload blocks per sector-bitmap block (the BAT interleave).
    fn chunk_ratio(&self) -> u64 {
        (1u64 << 23) * self.logical_sector / self.block_size
    }

    fn payload_blocks(&self) -> u64 {
        self.virtual_size.div_ceil(self.block_size)
    }

    /// BAT entries up to the last payload block.
    fn bat_entries(&self) -> u64 {
        let n = self.payload_blocks();
        if n == 0 {
            0
        } else {
            n + (n - 1) / self.chunk_ratio()
        }
    }
}

const STATE_FULLY_PRESENT: u64 = 6;
const STATE_PARTIALLY_PRESENT: u64 = 7;

/// Converts the VHDX image read from `r` into `writer`; the caller drains the rest.
pub fn convert(
    r: &mut dyn Read,
    writer: &mut SparseWriter,
    opts: &StreamOptions,
) -> Result<ImageInfo, FormatError> {
    let mut rd = HostReader::for_image(r, F, opts);
    let mut ident = [0u8; 8];
    rd.read_at(0, &mut ident)?;
    if &ident != b"vhdxfile" {
        return Err(FormatError::corrupt(F, "no file identifier"));
    }
    let mut h1 = vec![0u8; HEADER_LEN];
    let mut h2 = vec![0u8; HEADER_LEN];
    rd.read_at(HEADER_OFFSETS[0], &mut h1)?;
    rd.read_at(HEADER_OFFSETS[1], &mut h2)?;
    let header = current_header(&h1, &h2)?;
    let mut t = vec![0u8; REGION_TABLE_LEN];
    rd.read_at(REGION_TABLE_OFFSETS[0], &mut t)?;
    let regions = match parse_regions(&t) {
        Some(r) => r,
        None => {
            rd.read_at(REGION_TABLE_OFFSETS[1], &mut t)?;
            parse_regions(&t)
                .unwrap_or_else(|| Err(FormatError::corrupt(F, "no valid region table")))
        }
    }?;
    let (bat_region, meta_region) = regions;
    // Log, BAT and metadata in file order (the BAT usually comes first, and its useful
    // length is known only from the metadata: read up to a bound, check after).
    let mut reads = vec![
        (bat_region.offset, bat_region.len.min(MAX_BAT_BYTES), 0),
        (
            meta_region.offset,
            meta_region.len.min(MAX_METADATA_BYTES),
            1,
        ),
    ];
    if header.log_guid != [0; 16] {
        reads.push((
            header.log_offset,
            u64::from(header.log_length).min(MAX_METADATA_BYTES),
            2,
        ));
    }
    reads.sort_unstable();
    let mut bufs: [Vec<u8>; 3] = Default::default();
    for (off, len, which) in reads {
        let mut b = vec![0u8; len as usize];
        rd.read_at(off, &mut b)?;
        bufs[which] = b;
    }
    let [bat, meta, log] = bufs;
    if log_needs_replay(&log, &header.log_guid) {
        return Err(FormatError::unsupported(
            F,
            "a log that needs replaying (the image was not closed cleanly; open it once with Hyper-V or qemu-img check -r all)",
        ));
    }
    let md = parse_metadata(&meta)?;
    let size = md.virtual_size;
    check_size(size, opts)?;
    let entries = md.bat_entries();
    if entries * 8 > bat.len() as u64 {
        return Err(FormatError::corrupt(
            F,
            format!("BAT of {} bytes cannot map {size} bytes", bat.len()),
        ));
    }
    rd.stop_retaining()?;
    tracing::info!(
        virtual_size = size,
        block_size = md.block_size,
        "vhdx image"
    );
    let ratio = md.chunk_ratio();
    let mut extents = Vec::new();
    for block in 0..md.payload_blocks() {
        let e = le64(&bat, ((block + block / ratio) * 8) as usize);
        match e & 7 {
            STATE_FULLY_PRESENT => {
                let guest = block * md.block_size;
                push_extent(
                    F,
                    &mut extents,
                    Extent {
                        host: e >> 20 << 20,
                        guest,
                        len: md.block_size.min(size - guest),
                    },
                )?;
            }
            STATE_PARTIALLY_PRESENT => {
                return Err(FormatError::external(
                    F,
                    "partially present blocks of a parent",
                ))
            }
            0..=3 => {} // not present, undefined, zero, unmapped: zeros
            s => return Err(FormatError::corrupt(F, format!("block state {s}"))),
        }
    }
    writer.prepare_random(size)?;
    copy_extents(&mut rd, writer, extents)?;
    writer.flush_pending()?;
    Ok(ImageInfo {
        format: F,
        virtual_size: size,
        subformat: "vhdx",
    })
}

/// Whether the log holds a valid entry of the current log GUID (what qemu would replay).
pub fn log_needs_replay(log: &[u8], guid: &[u8; 16]) -> bool {
    if guid == &[0; 16] {
        return false;
    }
    log.chunks_exact(4096).enumerate().any(|(i, sector)| {
        let len = le32(sector, 8) as usize;
        &sector[..4] == b"loge"
            && &sector[32..48] == guid
            && len >= 4096
            && len.is_multiple_of(4096)
            && i * 4096 + len <= log.len()
            && checksum_ok(&log[i * 4096..i * 4096 + len])
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc32c_known_value() {
        assert_eq!(crc32c(b"123456789"), 0xE306_9283);
    }

    #[test]
    fn guids_are_mixed_endian() {
        assert_eq!(
            BAT_GUID,
            [
                0x66, 0x77, 0xc2, 0x2d, 0x23, 0xf6, 0x00, 0x42, 0x9d, 0x64, 0x11, 0x5e, 0x9b, 0xfd,
                0x4a, 0x08
            ]
        );
    }

    fn header(seq: u64) -> Vec<u8> {
        let mut h = vec![0u8; HEADER_LEN];
        h[..4].copy_from_slice(b"head");
        h[8..16].copy_from_slice(&seq.to_le_bytes());
        h[66..68].copy_from_slice(&1u16.to_le_bytes());
        let c = crc32c(&h);
        h[4..8].copy_from_slice(&c.to_le_bytes());
        h
    }

    #[test]
    fn newest_valid_header_wins() {
        assert_eq!(
            current_header(&header(5), &header(7)).expect("ok").sequence,
            7
        );
        let mut bad = header(9);
        bad[100] = 1;
        assert_eq!(current_header(&header(5), &bad).expect("ok").sequence, 5);
        assert!(current_header(&bad, &bad).is_err());
    }
}
