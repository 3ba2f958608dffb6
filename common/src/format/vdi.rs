//! VirtualBox VDI (fixed and dynamic) -> raw, streaming.
//!
//! A 512-byte header, a block map (one little-endian u32 per 1 MiB guest block: the
//! block's index in the data area, or "unallocated"/"zero"), then the data blocks.
//! VirtualBox and qemu-img both write the map before the data, so the image streams.
//! The checks mirror qemu's vdi driver: what qemu refuses, we refuse.

use super::contract::{check_size, FormatError, ImageInfo, StreamOptions};
use super::forward::hostread::{check_table, copy_extents, push_extent, Extent, HostReader};
use crate::sink::SparseWriter;
use crate::sniff::Format;
use std::io::Read;
use zerocopy::byteorder::little_endian::{U32, U64};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

const SIGNATURE: u32 = 0xbeda_107f;
const VERSION_1_1: u32 = 0x0001_0001;
const TYPE_DYNAMIC: u32 = 1;
const TYPE_FIXED: u32 = 2;
const BLOCK_SIZE: u32 = 1 << 20;
/// Map entries at or above this are not stored: 0xffffffff unallocated, 0xfffffffe
/// discarded (both read as zeros).
const FIRST_UNSTORED: u32 = 0xffff_fffe;
const F: Format = Format::Vdi;

/// The header as VirtualBox writes it (`VDIHEADER1PLUS` after the 64-byte text
/// pre-header), little-endian; what we need ends with the parent UUID at 0x1c8.
#[derive(FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
struct OnDisk {
    text: [u8; 64],
    signature: U32,
    version: U32,
    header_size: U32,
    image_type: U32,
    flags: U32,
    comment: [u8; 256],
    offset_bmap: U32,
    offset_data: U32,
    cylinders: U32,
    heads: U32,
    sectors: U32,
    sector_size: U32,
    unused: U32,
    disk_size: U64,
    block_size: U32,
    block_extra: U32,
    blocks_in_image: U32,
    blocks_allocated: U32,
    uuid_create: [u8; 16],
    uuid_modify: [u8; 16],
    /// The parent's UUIDs: a non-null one names a parent image.
    uuid_link: [u8; 16],
    uuid_parent: [u8; 16],
}

const _: () = assert!(std::mem::size_of::<OnDisk>() == 0x1c8);

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    pub image_type: u32,
    pub offset_bmap: u64,
    pub offset_data: u64,
    pub disk_size: u64,
    pub blocks_in_image: u32,
}

impl Header {
    /// Parses and checks the first 512 bytes.
    pub fn parse(h: &[u8]) -> Result<Header, FormatError> {
        let (h, _) = OnDisk::ref_from_prefix(h)
            .map_err(|_| FormatError::corrupt(F, "header is shorter than 456 bytes"))?;
        if h.signature.get() != SIGNATURE {
            return Err(FormatError::corrupt(F, "bad signature"));
        }
        let version = h.version.get();
        if version != VERSION_1_1 {
            return Err(FormatError::unsupported(
                F,
                format!("version {}.{}", version >> 16, version & 0xffff),
            ));
        }
        let image_type = h.image_type.get();
        match image_type {
            TYPE_DYNAMIC | TYPE_FIXED => {}
            3 => return Err(FormatError::external(F, "an undo image of a parent")),
            4 => return Err(FormatError::external(F, "a differencing image of a parent")),
            t => return Err(FormatError::unsupported(F, format!("image type {t}"))),
        }
        let offset_bmap = u64::from(h.offset_bmap.get());
        let offset_data = u64::from(h.offset_data.get());
        if !offset_bmap.is_multiple_of(512) || !offset_data.is_multiple_of(512) || offset_bmap < 512
        {
            return Err(FormatError::corrupt(
                F,
                format!("block map at {offset_bmap} or data at {offset_data} is misplaced"),
            ));
        }
        let sector_size = h.sector_size.get();
        if sector_size != 512 {
            return Err(FormatError::unsupported(
                F,
                format!("sector size {sector_size}"),
            ));
        }
        let disk_size = h.disk_size.get();
        let block_size = h.block_size.get();
        if block_size != BLOCK_SIZE {
            return Err(FormatError::unsupported(
                F,
                format!("block size {block_size}"),
            ));
        }
        let block_extra = h.block_extra.get();
        if block_extra != 0 {
            return Err(FormatError::unsupported(
                F,
                format!("block_extra {block_extra}"),
            ));
        }
        let blocks_in_image = h.blocks_in_image.get();
        if disk_size > u64::from(blocks_in_image) * u64::from(BLOCK_SIZE) {
            return Err(FormatError::corrupt(
                F,
                format!("disk size {disk_size} exceeds the {blocks_in_image} mapped blocks"),
            ));
        }
        // uuid_link and uuid_parent: a non-null one names a parent image.
        if h.uuid_link.iter().chain(&h.uuid_parent).any(|&b| b != 0) {
            return Err(FormatError::external(
                F,
                "a parent image (link/parent UUID)",
            ));
        }
        Ok(Header {
            image_type,
            offset_bmap,
            offset_data,
            disk_size,
            blocks_in_image,
        })
    }

    /// Guest bytes (qemu counts whole sectors).
    pub fn virtual_size(&self) -> u64 {
        self.disk_size / 512 * 512
    }

    /// Map entries that cover the disk (more may exist; qemu never reads them).
    fn blocks_used(&self) -> u64 {
        self.virtual_size().div_ceil(u64::from(BLOCK_SIZE))
    }
}

/// Converts the VDI image read from `r` into `writer`; the caller drains the rest.
pub fn convert(
    r: &mut dyn Read,
    writer: &mut SparseWriter,
    opts: &StreamOptions,
) -> Result<ImageInfo, FormatError> {
    let mut rd = HostReader::for_image(r, F, opts);
    let mut head = vec![0u8; 512];
    rd.read_at(0, &mut head)?;
    let h = Header::parse(&head)?;
    let size = h.virtual_size();
    check_size(size, opts)?;
    let subformat = if h.image_type == TYPE_FIXED {
        "fixed"
    } else {
        "dynamic"
    };
    tracing::info!(
        subformat,
        virtual_size = size,
        blocks = h.blocks_in_image,
        "vdi image"
    );
    let used = h.blocks_used();
    // 4 bytes per 1 MiB block: 64 MiB maps 16 TiB.
    check_table(F, "block map", used * 4, 64 << 20)?;
    let mut map = vec![U32::ZERO; used as usize];
    rd.read_at(h.offset_bmap, map.as_mut_bytes())?;
    rd.stop_retaining()?;
    let mut extents = Vec::new();
    for (i, e) in map.iter().enumerate() {
        let e = e.get();
        if e >= FIRST_UNSTORED {
            continue;
        }
        let guest = i as u64 * u64::from(BLOCK_SIZE);
        push_extent(
            F,
            &mut extents,
            Extent {
                host: h.offset_data + u64::from(e) * u64::from(BLOCK_SIZE),
                guest,
                len: u64::from(BLOCK_SIZE).min(size - guest),
            },
        )?;
    }
    writer.prepare_random(size)?;
    copy_extents(&mut rd, writer, extents)?;
    writer.flush_pending()?;
    Ok(ImageInfo {
        format: F,
        virtual_size: size,
        subformat,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn header(disk_size: u64, blocks: u32) -> Vec<u8> {
        let mut h = vec![0u8; 512];
        h[0x40..0x44].copy_from_slice(&SIGNATURE.to_le_bytes());
        h[0x44..0x48].copy_from_slice(&VERSION_1_1.to_le_bytes());
        h[0x48..0x4c].copy_from_slice(&0x190u32.to_le_bytes());
        h[0x4c..0x50].copy_from_slice(&TYPE_DYNAMIC.to_le_bytes());
        h[0x154..0x158].copy_from_slice(&512u32.to_le_bytes());
        h[0x158..0x15c].copy_from_slice(&(1u32 << 20).to_le_bytes());
        h[0x168..0x16c].copy_from_slice(&512u32.to_le_bytes());
        h[0x170..0x178].copy_from_slice(&disk_size.to_le_bytes());
        h[0x178..0x17c].copy_from_slice(&BLOCK_SIZE.to_le_bytes());
        h[0x180..0x184].copy_from_slice(&blocks.to_le_bytes());
        h
    }

    #[test]
    fn parses_and_refuses() {
        let h = Header::parse(&header(3 << 20, 3)).expect("ok");
        assert_eq!(h.virtual_size(), 3 << 20);
        assert_eq!(h.blocks_used(), 3);
        let err = Header::parse(&header(4 << 20, 3)).expect_err("too few blocks");
        assert!(err.to_string().contains("exceeds"), "{err}");
        let mut p = header(1 << 20, 1);
        p[0x1b8] = 1;
        let err = Header::parse(&p).expect_err("parent");
        assert!(matches!(err, FormatError::External { .. }), "{err}");
        let mut d = header(1 << 20, 1);
        d[0x4c] = 4;
        assert!(matches!(
            Header::parse(&d),
            Err(FormatError::External { .. })
        ));
    }
}
