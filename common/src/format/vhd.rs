//! VHD (qemu's "vpc") -> raw, streaming.
//!
//! A fixed VHD is the raw disk followed by a 512-byte footer, so it looks like raw
//! until its last sector: [`FooterStrip`] holds the last 512 bytes of a raw stream
//! back and drops them when they are a fixed-VHD footer. A dynamic VHD starts with a
//! copy of the footer, then a dynamic header and the block allocation table (BAT, one
//! big-endian sector number per block), then blocks (a sector bitmap, then data), all
//! in that order as every tool writes it. Differencing VHDs name a parent file and are
//! refused. The virtual size follows qemu's rule (CHS geometry or the footer's size,
//! by creator application), so our output matches `qemu-img convert -f vpc`.

use super::contract::{check_size, FormatError, ImageInfo, StreamOptions};
use super::forward::hostread::{check_table, copy_extents, push_extent, Extent, HostReader};
use crate::sink::SparseWriter;
use crate::sniff::Format;
use std::io::{self, Read};
use zerocopy::byteorder::big_endian::{U16, U32, U64};
use zerocopy::{FromBytes, FromZeros, Immutable, IntoBytes, KnownLayout, Unaligned};

const F: Format = Format::Vpc;
const TYPE_FIXED: u32 = 2;
const TYPE_DYNAMIC: u32 = 3;
const TYPE_DIFFERENCING: u32 = 4;
const MAX_GEOMETRY: u64 = 65535 * 16 * 255;
const UNALLOCATED: u32 = 0xffff_ffff;

/// The hard disk footer (VHD specification, "Hard Disk Footer Format"), big-endian.
#[derive(FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
struct OnDiskFooter {
    cookie: [u8; 8],
    features: U32,
    version: U32,
    data_offset: U64,
    timestamp: U32,
    creator_app: [u8; 4],
    creator_version: U32,
    creator_os: U32,
    original_size: U64,
    current_size: U64,
    cylinders: U16,
    heads: u8,
    sectors: u8,
    disk_type: U32,
    checksum: U32,
    uuid: [u8; 16],
    saved_state: u8,
    reserved: [u8; 427],
}

/// The dynamic disk header ("Dynamic Disk Header Format"), big-endian; what follows
/// the block size (parent UUID, name and locators) only matters to differencing disks,
/// which are refused by the footer's disk type.
#[derive(FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
struct OnDiskDynamic {
    cookie: [u8; 8],
    data_offset: U64,
    table_offset: U64,
    header_version: U32,
    max_table_entries: U32,
    block_size: U32,
    checksum: U32,
}

const _: () = assert!(std::mem::size_of::<OnDiskFooter>() == 512);
const _: () = assert!(std::mem::size_of::<OnDiskDynamic>() == 40);

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Footer {
    pub disk_type: u32,
    pub data_offset: u64,
    pub current_size: u64,
    /// Guest bytes as qemu computes them.
    pub virtual_size: u64,
}

impl Footer {
    pub fn parse(b: &[u8]) -> Result<Footer, FormatError> {
        let no_cookie = || FormatError::corrupt(F, "no footer cookie");
        let (f, _) = OnDiskFooter::ref_from_prefix(b).map_err(|_| no_cookie())?;
        if &f.cookie != b"conectix" {
            return Err(no_cookie());
        }
        // The one's complement of the byte sum, the checksum field counted as zero.
        let sum = f
            .as_bytes()
            .iter()
            .fold(0u32, |s, &x| s.wrapping_add(u32::from(x)))
            .wrapping_sub(f.checksum.as_bytes().iter().map(|&x| u32::from(x)).sum());
        if !sum != f.checksum.get() && !cfg!(fuzzing) {
            return Err(FormatError::corrupt(F, "footer checksum mismatch"));
        }
        let disk_type = f.disk_type.get();
        match disk_type {
            TYPE_FIXED | TYPE_DYNAMIC => {}
            TYPE_DIFFERENCING => {
                return Err(FormatError::external(F, "a differencing disk of a parent"))
            }
            t => return Err(FormatError::unsupported(F, format!("disk type {t}"))),
        }
        let current_size = f.current_size.get();
        let chs = u64::from(f.cylinders.get()) * u64::from(f.heads) * u64::from(f.sectors);
        // qemu: Virtual PC (and old qemu) size disks by CHS geometry; Hyper-V, disk2vhd,
        // XenServer and qemu's own "qem2" by the footer's current size; a maximal
        // geometry means the real size did not fit in CHS.
        let by_size = [b"win ", b"qem2", b"d2v ", b"CTXS", b"tap\0"].contains(&&f.creator_app);
        let sectors = if by_size || chs == MAX_GEOMETRY {
            current_size / 512
        } else {
            chs
        };
        Ok(Footer {
            disk_type,
            data_offset: f.data_offset.get(),
            current_size,
            virtual_size: sectors * 512,
        })
    }
}

/// Converts a dynamic VHD read from `r` into `writer`; the caller drains the rest.
pub fn convert(
    r: &mut dyn Read,
    writer: &mut SparseWriter,
    opts: &StreamOptions,
) -> Result<ImageInfo, FormatError> {
    let mut rd = HostReader::for_image(r, F, opts);
    let mut head = vec![0u8; 512];
    rd.read_at(0, &mut head)?;
    let footer = Footer::parse(&head)?;
    if footer.disk_type != TYPE_DYNAMIC {
        // A fixed disk's footer copy at the start is not something tools write.
        return Err(FormatError::corrupt(
            F,
            "a footer at the start of a fixed disk",
        ));
    }
    let size = footer.virtual_size;
    check_size(size, opts)?;
    if footer.data_offset < 512 || footer.data_offset > 1 << 40 {
        return Err(FormatError::corrupt(
            F,
            format!("dynamic header offset {}", footer.data_offset),
        ));
    }
    let mut dynh = OnDiskDynamic::new_zeroed();
    rd.read_at(footer.data_offset, dynh.as_mut_bytes())?;
    if &dynh.cookie != b"cxsparse" {
        return Err(FormatError::corrupt(F, "no dynamic header cookie"));
    }
    let table_offset = dynh.table_offset.get();
    let max_entries = u64::from(dynh.max_table_entries.get());
    let block_size = u64::from(dynh.block_size.get());
    if !block_size.is_power_of_two() || block_size < 512 {
        return Err(FormatError::corrupt(F, format!("block size {block_size}")));
    }
    if max_entries * block_size < size {
        return Err(FormatError::corrupt(
            F,
            format!("{max_entries} table entries of {block_size} bytes cannot hold {size} bytes"),
        ));
    }
    tracing::info!(virtual_size = size, block_size, "vhd image (dynamic)");
    let used = size.div_ceil(block_size);
    // 4 bytes per block (2 MiB as tools write them): 8 MiB maps 4 TiB, twice what VHD allows.
    check_table(F, "block allocation table", used * 4, 8 << 20)?;
    let mut bat = vec![U32::ZERO; used as usize];
    rd.read_at(table_offset, bat.as_mut_bytes())?;
    rd.stop_retaining()?;
    // Each block starts with its sector bitmap (one bit per sector, padded to a sector).
    // qemu reads allocated blocks whole and ignores the bitmap; so do we. Its size is
    // qemu's arithmetic, `(block_size / 4096 + 511) & !511`, which agrees with the spec
    // from 4 KiB blocks up and is 0 below (qemu-img's output is the oracle).
    let bitmap = (block_size / 4096 + 511) & !511;
    let mut extents = Vec::new();
    for (i, e) in bat.iter().enumerate() {
        let e = e.get();
        if e == UNALLOCATED {
            continue;
        }
        let guest = i as u64 * block_size;
        push_extent(
            F,
            &mut extents,
            Extent {
                host: u64::from(e) * 512 + bitmap,
                guest,
                len: block_size.min(size - guest),
            },
        )?;
    }
    writer.prepare_random(size)?;
    copy_extents(&mut rd, writer, extents)?;
    writer.flush_pending()?;
    Ok(ImageInfo {
        format: F,
        virtual_size: size,
        subformat: "dynamic",
    })
}

/// A raw stream with its last 512 bytes held back: at the end, a fixed-VHD footer
/// there is dropped (and reported by [`FooterStrip::footer`]); anything else is given
/// out as the raw disk's last bytes.
pub struct FooterStrip<'r> {
    inner: &'r mut dyn Read,
    held: [u8; 512],
    held_len: usize,
    passed: u64,
    eof: bool,
    footer: Option<Footer>,
    /// Staged bytes for reads smaller than the held tail.
    ready: Vec<u8>,
    ready_pos: usize,
}

impl<'r> FooterStrip<'r> {
    pub fn new(inner: &'r mut dyn Read) -> Self {
        FooterStrip {
            inner,
            held: [0; 512],
            held_len: 0,
            passed: 0,
            eof: false,
            footer: None,
            ready: Vec::new(),
            ready_pos: 0,
        }
    }

    /// The fixed-VHD footer found at the end of the stream, once it has ended.
    pub fn footer(&self) -> Option<&Footer> {
        self.footer.as_ref()
    }

    fn at_end(&mut self) -> usize {
        self.eof = true;
        if self.held_len == 512 {
            if let Ok(f) = Footer::parse(&self.held) {
                let fits = f.disk_type == TYPE_FIXED
                    && f.data_offset == u64::MAX
                    && f.virtual_size <= self.passed
                    && f.current_size <= self.passed;
                if fits {
                    self.footer = Some(f);
                    self.held_len = 0;
                }
            }
        }
        self.held_len
    }
}

impl FooterStrip<'_> {
    /// One read into a buffer larger than the held-back tail.
    fn read_big(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            if self.eof {
                let n = self.held_len.min(buf.len());
                buf[..n].copy_from_slice(&self.held[..n]);
                self.held.copy_within(n..self.held_len, 0);
                self.held_len -= n;
                return Ok(n);
            }
            let k = self.held_len;
            buf[..k].copy_from_slice(&self.held[..k]);
            let n = self.inner.read(&mut buf[k..])?;
            if n == 0 {
                self.held_len = k;
                let left = self.at_end();
                let out = left.min(buf.len());
                // `buf[..k]` already holds the held bytes.
                self.held.copy_within(out..left, 0);
                self.held_len = left - out;
                return Ok(out);
            }
            let total = k + n;
            let keep = total.min(512);
            self.held[..keep].copy_from_slice(&buf[total - keep..total]);
            self.held_len = keep;
            let out = total - keep;
            self.passed += out as u64;
            if out > 0 {
                return Ok(out);
            }
        }
    }
}

impl Read for FooterStrip<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.ready_pos == self.ready.len() && buf.len() > 512 {
            return self.read_big(buf);
        }
        if self.ready_pos == self.ready.len() {
            // Small reads go through a staging buffer larger than the held tail.
            let mut tmp = std::mem::take(&mut self.ready);
            tmp.resize(8192, 0);
            let n = self.read_big(&mut tmp)?;
            tmp.truncate(n);
            self.ready = tmp;
            self.ready_pos = 0;
        }
        let n = (self.ready.len() - self.ready_pos).min(buf.len());
        buf[..n].copy_from_slice(&self.ready[self.ready_pos..self.ready_pos + n]);
        self.ready_pos += n;
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn footer(disk_type: u32, size: u64, creator: &[u8; 4]) -> Vec<u8> {
        let mut f = vec![0u8; 512];
        f[..8].copy_from_slice(b"conectix");
        f[12..16].copy_from_slice(&0x0001_0000u32.to_be_bytes());
        let off = if disk_type == TYPE_FIXED {
            u64::MAX
        } else {
            512
        };
        f[16..24].copy_from_slice(&off.to_be_bytes());
        f[28..32].copy_from_slice(creator);
        f[40..48].copy_from_slice(&size.to_be_bytes());
        f[48..56].copy_from_slice(&size.to_be_bytes());
        f[56..58].copy_from_slice(&1000u16.to_be_bytes());
        f[58] = 16;
        f[59] = 63;
        f[60..64].copy_from_slice(&disk_type.to_be_bytes());
        let sum = f.iter().fold(0u32, |s, &x| s.wrapping_add(u32::from(x)));
        f[64..68].copy_from_slice(&(!sum).to_be_bytes());
        f
    }

    fn strip(data: &[u8], chunk: usize) -> (Vec<u8>, Option<Footer>) {
        let mut src = data;
        let mut s = FooterStrip::new(&mut src);
        let mut out = Vec::new();
        let mut buf = vec![0u8; chunk];
        loop {
            let n = s.read(&mut buf).expect("read");
            if n == 0 {
                break;
            }
            out.extend_from_slice(&buf[..n]);
        }
        (out, s.footer().cloned())
    }

    #[test]
    fn fixed_footer_is_stripped_and_other_tails_kept() {
        let disk: Vec<u8> = (0..1_000_448u32).map(|i| (i % 253) as u8).collect();
        let mut vhd = disk.clone();
        vhd.extend(footer(TYPE_FIXED, disk.len() as u64, b"win "));
        for chunk in [100, 512, 513, 4096, 1 << 20] {
            let (out, f) = strip(&vhd, chunk);
            assert_eq!(out.len(), disk.len(), "chunk {chunk}");
            assert!(out == disk);
            assert_eq!(f.expect("footer").virtual_size, disk.len() as u64);
            let (out, f) = strip(&disk, chunk);
            assert!(out == disk, "raw kept whole, chunk {chunk}");
            assert!(f.is_none());
        }
        // A footer claiming more data than precedes it is just data.
        let mut odd = vec![7u8; 4096];
        odd.extend(footer(TYPE_FIXED, 1 << 30, b"win "));
        let (out, f) = strip(&odd, 4096);
        assert_eq!(out, odd);
        assert!(f.is_none());
        // Short streams pass through.
        assert_eq!(strip(b"abc", 10).0, b"abc");
    }

    #[test]
    fn size_rule_follows_the_creator() {
        let chs = 1000 * 16 * 63 * 512;
        let f = Footer::parse(&footer(TYPE_DYNAMIC, 600 << 20, b"qemu")).expect("ok");
        assert_eq!(f.virtual_size, chs);
        let f = Footer::parse(&footer(TYPE_DYNAMIC, 600 << 20, b"win ")).expect("ok");
        assert_eq!(f.virtual_size, 600 << 20);
        let mut bad = footer(TYPE_DYNAMIC, 1 << 20, b"qemu");
        bad[100] ^= 1;
        assert!(Footer::parse(&bad).is_err());
        assert!(matches!(
            Footer::parse(&footer(TYPE_DIFFERENCING, 1 << 20, b"qemu")),
            Err(FormatError::External { .. })
        ));
    }
}
