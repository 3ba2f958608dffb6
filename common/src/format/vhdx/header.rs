//! VHDX's on-disk structures (MS-VHDX sections 2.2-2.6), little-endian: the headers,
//! the region table, the metadata table and its items, and the CRC-32C that guards
//! them. Every count and offset is bounded before it indexes anything.

use crate::format::contract::FormatError;
use crate::sniff::Format;
use zerocopy::byteorder::little_endian::{U16, U32, U64};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

pub(super) const F: Format = Format::Vhdx;
pub(super) const KIB: u64 = 1024;
pub(super) const MIB: u64 = 1 << 20;
const MAX_VIRTUAL_SIZE: u64 = 64 << 40;

/// The start of a header (section 2.2.2); the rest of its 4 KiB is reserved.
#[derive(FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
struct OnDiskHeader {
    signature: [u8; 4],
    checksum: U32,
    sequence: U64,
    file_write_guid: [u8; 16],
    data_write_guid: [u8; 16],
    log_guid: [u8; 16],
    log_version: U16,
    version: U16,
    log_length: U32,
    log_offset: U64,
}

/// The region table header (section 2.3), followed by `entry_count` entries.
#[derive(FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
struct OnDiskRegionTable {
    signature: [u8; 4],
    checksum: U32,
    entry_count: U32,
    reserved: U32,
}

#[derive(FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
struct OnDiskRegion {
    guid: [u8; 16],
    file_offset: U64,
    length: U32,
    /// Bit 0: required (an unknown required region makes the file unreadable).
    required: U32,
}

/// The metadata table header (section 2.6.1), followed by `entry_count` entries.
#[derive(FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
struct OnDiskMetadataTable {
    signature: [u8; 8],
    reserved: U16,
    entry_count: U16,
    reserved2: [u8; 20],
}

#[derive(FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
struct OnDiskMetadataEntry {
    item_id: [u8; 16],
    offset: U32,
    length: U32,
    /// Bit 2: required.
    flags: U32,
    reserved: U32,
}

/// The file parameters item (section 2.6.2.1).
#[derive(FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
struct OnDiskFileParameters {
    block_size: U32,
    /// Bit 1: has a parent (a differencing disk).
    flags: U32,
}

/// A log entry header (section 2.3.1.1), as far as the replay check reads it.
#[derive(FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub(super) struct OnDiskLogEntry {
    pub signature: [u8; 4],
    pub checksum: U32,
    pub entry_length: U32,
    pub tail: U32,
    pub sequence: U64,
    pub descriptor_count: U32,
    pub reserved: U32,
    pub log_guid: [u8; 16],
}

const _: () = assert!(std::mem::size_of::<OnDiskHeader>() == 80);
const _: () = assert!(std::mem::size_of::<OnDiskRegion>() == 32);
const _: () = assert!(std::mem::size_of::<OnDiskMetadataTable>() == 32);
const _: () = assert!(std::mem::size_of::<OnDiskMetadataEntry>() == 32);
const _: () = assert!(std::mem::size_of::<OnDiskLogEntry>() == 48);

pub(super) const BAT_GUID: [u8; 16] = guid(
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
pub(super) fn checksum_ok(b: &[u8]) -> bool {
    if cfg!(fuzzing) {
        return true;
    }
    let Some(stored) = b.get(4..8).and_then(|c| U32::read_from_bytes(c).ok()) else {
        return false;
    };
    let stored = stored.get();
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
        let (h, _) = OnDiskHeader::ref_from_prefix(b).ok()?;
        if &h.signature != b"head" || !checksum_ok(b) || h.version.get() != 1 {
            return None;
        }
        Some(Header {
            sequence: h.sequence.get(),
            log_guid: h.log_guid,
            log_length: h.log_length.get(),
            log_offset: h.log_offset.get(),
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
    let (head, rest) = OnDiskRegionTable::ref_from_prefix(t).ok()?;
    if &head.signature != b"regi" || !checksum_ok(t) {
        return None;
    }
    let count = head.entry_count.get() as usize;
    if count > 2047 {
        return Some(Err(FormatError::corrupt(F, format!("{count} regions"))));
    }
    let Ok((entries, _)) = <[OnDiskRegion]>::ref_from_prefix_with_elems(rest, count) else {
        return Some(Err(FormatError::corrupt(F, format!("{count} regions"))));
    };
    let (mut bat, mut meta) = (None, None);
    for e in entries {
        let r = Region {
            offset: e.file_offset.get(),
            len: u64::from(e.length.get()),
        };
        let required = e.required.get() & 1 != 0;
        if !r.offset.is_multiple_of(MIB) || r.offset < MIB {
            return Some(Err(FormatError::corrupt(
                F,
                format!("region at {}", r.offset),
            )));
        }
        match e.guid {
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
// One function on purpose (86 lines): the metadata table's entries checked in one
// pass, every required item accounted for before any is used.
pub fn parse_metadata(m: &[u8]) -> Result<Metadata, FormatError> {
    let no_table = || FormatError::corrupt(F, "no metadata table");
    if m.len() < 64 * 1024 {
        return Err(no_table());
    }
    let (head, rest) = OnDiskMetadataTable::ref_from_prefix(m).map_err(|_| no_table())?;
    if &head.signature != b"metadata" {
        return Err(no_table());
    }
    let count = head.entry_count.get() as usize;
    if count > 2047 {
        return Err(FormatError::corrupt(F, format!("{count} metadata items")));
    }
    let (entries, _) = <[OnDiskMetadataEntry]>::ref_from_prefix_with_elems(rest, count)
        .map_err(|_| FormatError::corrupt(F, format!("{count} metadata items")))?;
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
    for e in entries {
        let (off, len, flags) = (e.offset.get(), e.length.get(), e.flags.get());
        match e.item_id {
            FILE_PARAMETERS => {
                let v = OnDiskFileParameters::ref_from_bytes(item(off, len, 8)?)
                    .map_err(|_| FormatError::corrupt(F, "file parameters"))?;
                if v.flags.get() & 2 != 0 {
                    return Err(FormatError::external(
                        F,
                        "a parent disk (differencing VHDX)",
                    ));
                }
                block_size = Some(u64::from(v.block_size.get()));
            }
            VIRTUAL_DISK_SIZE => virtual_size = Some(read_le::<U64>(item(off, len, 8)?)?.get()),
            LOGICAL_SECTOR_SIZE => {
                logical = Some(u64::from(read_le::<U32>(item(off, len, 4)?)?.get()))
            }
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

/// A metadata item holding one integer.
fn read_le<T: FromBytes + Copy>(b: &[u8]) -> Result<T, FormatError> {
    T::read_from_bytes(b).map_err(|_| FormatError::corrupt(F, "a metadata item of the wrong size"))
}

impl Metadata {
    /// Payload blocks per sector-bitmap block (the BAT interleave).
    pub(super) fn chunk_ratio(&self) -> u64 {
        (1u64 << 23) * self.logical_sector / self.block_size
    }

    pub(super) fn payload_blocks(&self) -> u64 {
        self.virtual_size.div_ceil(self.block_size)
    }

    /// BAT entries up to the last payload block.
    pub(super) fn bat_entries(&self) -> u64 {
        let n = self.payload_blocks();
        if n == 0 {
            0
        } else {
            n + (n - 1) / self.chunk_ratio()
        }
    }
}
