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

use super::contract::{check_size, FormatError, ImageInfo, StreamOptions};
use super::forward::hostread::{copy_extents, push_extent, Extent, HostReader};
use crate::sink::SparseWriter;
use std::io::Read;

pub use header::{crc32c, current_header, parse_metadata, parse_regions, Header, Metadata, Region};
use header::{F, KIB, MIB};
use zerocopy::byteorder::little_endian::U64;
use zerocopy::FromBytes;

pub mod header;

const HEADER_OFFSETS: [u64; 2] = [64 * KIB, 128 * KIB];
const HEADER_LEN: usize = 4096;
const REGION_TABLE_OFFSETS: [u64; 2] = [192 * KIB, 256 * KIB];
const REGION_TABLE_LEN: usize = 64 * 1024;
/// 16 MiB maps 2 TiB with 1 MiB blocks, the 64 TiB maximum with 32 MiB blocks (Hyper-V's
/// default); it is read whole, before the metadata says how much of it is needed.
const MAX_BAT_BYTES: u64 = 16 * MIB;
const MAX_METADATA_BYTES: u64 = MIB;

const STATE_FULLY_PRESENT: u64 = 6;
const STATE_PARTIALLY_PRESENT: u64 = 7;

/// Converts the VHDX image read from `r` into `writer`; the caller drains the rest.
// One function on purpose (114 lines): the steps MS-VHDX prescribes in its order
// (identifier, the newer valid header, region table, log, metadata, BAT walk), each
// step's result feeding the next; split, each piece would take most of the others'
// state. The vhdx fuzz target covers it whole.
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
    // Whole entries only; the length was bounded by MAX_BAT_BYTES above.
    let bat = <[U64]>::ref_from_prefix_with_elems(&bat, bat.len() / 8)
        .map(|(t, _)| t)
        .map_err(|_| FormatError::corrupt(F, "BAT"))?;
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
    if entries > bat.len() as u64 {
        return Err(FormatError::corrupt(
            F,
            format!("BAT of {} bytes cannot map {size} bytes", bat.len() * 8),
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
        let e = bat[(block + block / ratio) as usize].get();
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

/// The virtual size from the headers, region table and metadata of an image read by
/// offset (`read(offset, len)`, fewer bytes at the end): what `qemu-img info` reports.
pub fn probe_virtual_size(
    read: &dyn Fn(u64, usize) -> Result<Vec<u8>, FormatError>,
) -> Result<u64, FormatError> {
    let pad = |mut b: Vec<u8>, len: usize| {
        b.resize(len, 0);
        b
    };
    if read(0, 8)? != b"vhdxfile" {
        return Err(FormatError::corrupt(F, "no file identifier"));
    }
    let h1 = pad(read(HEADER_OFFSETS[0], HEADER_LEN)?, HEADER_LEN);
    let h2 = pad(read(HEADER_OFFSETS[1], HEADER_LEN)?, HEADER_LEN);
    current_header(&h1, &h2)?;
    let mut regions = None;
    for off in REGION_TABLE_OFFSETS {
        let t = pad(read(off, REGION_TABLE_LEN)?, REGION_TABLE_LEN);
        if let Some(r) = parse_regions(&t) {
            regions = Some(r?);
            break;
        }
    }
    let (_, meta) = regions.ok_or_else(|| FormatError::corrupt(F, "no valid region table"))?;
    let len = meta.len.min(MAX_METADATA_BYTES) as usize;
    let m = pad(read(meta.offset, len)?, len);
    Ok(parse_metadata(&m)?.virtual_size)
}

/// Whether the log holds a valid entry of the current log GUID (what qemu would replay).
pub fn log_needs_replay(log: &[u8], guid: &[u8; 16]) -> bool {
    if guid == &[0; 16] {
        return false;
    }
    log.chunks_exact(4096).enumerate().any(|(i, sector)| {
        let Ok((entry, _)) = header::OnDiskLogEntry::ref_from_prefix(sector) else {
            return false;
        };
        let len = entry.entry_length.get() as usize;
        &entry.signature == b"loge"
            && &entry.log_guid == guid
            && len >= 4096
            && len.is_multiple_of(4096)
            && i * 4096 + len <= log.len()
            && header::checksum_ok(&log[i * 4096..i * 4096 + len])
    })
}

#[cfg(test)]
mod tests {
    use super::header::BAT_GUID;
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
