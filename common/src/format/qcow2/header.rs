//! The qcow2 header and header extensions (qemu's docs/interop/qcow2.txt). Images are
//! untrusted: every field is bounded before it sizes an allocation or a loop, and
//! anything that would make the converter read outside the image (a backing file, an
//! external data file) or decrypt it is refused here, before a byte is written.

use zerocopy::byteorder::big_endian::{U32, U64};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

/// The version 2 header (qemu's docs/interop/qcow2.txt, bytes 0-71), big-endian.
#[derive(FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
struct OnDiskV2 {
    magic: [u8; 4],
    version: U32,
    backing_file_offset: U64,
    backing_file_size: U32,
    cluster_bits: U32,
    size: U64,
    crypt_method: U32,
    l1_size: U32,
    l1_table_offset: U64,
    refcount_table_offset: U64,
    refcount_table_clusters: U32,
    nb_snapshots: U32,
    snapshots_offset: U64,
}

/// What version 3 adds (bytes 72-103); `compression_type` (byte 104) follows when
/// `header_length` covers it.
#[derive(FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
struct OnDiskV3 {
    incompatible_features: U64,
    compatible_features: U64,
    autoclear_features: U64,
    refcount_order: U32,
    header_length: U32,
}

/// A header extension's type and length; `length` bytes of data follow, padded to 8.
#[derive(FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
struct OnDiskExtension {
    kind: U32,
    length: U32,
}

/// An extended L2 entry: the cluster descriptor and its subcluster bitmap (32
/// allocated bits, then 32 zero bits).
#[derive(FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct ExtendedL2Entry {
    pub entry: U64,
    pub bitmap: U64,
}

/// A table of big-endian 64-bit entries (L1, standard L2): whole entries only.
pub fn u64_table(table: &[u8]) -> &[U64] {
    <[U64]>::ref_from_prefix_with_elems(table, table.len() / 8)
        .map(|(t, _)| t)
        .unwrap_or(&[])
}

/// An extended L2 table: whole entries only.
pub fn extended_l2_table(table: &[u8]) -> &[ExtendedL2Entry] {
    <[ExtendedL2Entry]>::ref_from_prefix_with_elems(table, table.len() / 16)
        .map(|(t, _)| t)
        .unwrap_or(&[])
}

const _: () = assert!(std::mem::size_of::<OnDiskV2>() == 72);
const _: () = assert!(std::mem::size_of::<OnDiskV3>() == 32);

/// Incompatible feature bits (header offset 72, v3).
pub mod incompat {
    pub const DIRTY: u64 = 1 << 0;
    pub const CORRUPT: u64 = 1 << 1;
    pub const EXTERNAL_DATA_FILE: u64 = 1 << 2;
    pub const COMPRESSION_TYPE: u64 = 1 << 3;
    pub const EXTENDED_L2: u64 = 1 << 4;
    /// What we read correctly. DIRTY only means refcounts may be stale; we never read
    /// refcounts to find data, so a dirty image converts exactly as qemu-img converts it.
    pub const SUPPORTED: u64 = DIRTY | COMPRESSION_TYPE | EXTENDED_L2;
}

const EXT_END: u32 = 0;
const EXT_DATA_FILE: u32 = 0x4441_5441;
const EXT_FULL_DISK_ENCRYPTION: u32 = 0x0537_be77;

/// qemu's own limits: clusters of 512 B to 2 MiB, an L1 table of at most 32 MiB.
pub const MIN_CLUSTER_BITS: u32 = 9;
pub const MAX_CLUSTER_BITS: u32 = 21;
pub const MAX_L1_BYTES: u64 = 32 << 20;
/// qemu refuses images larger than this (QCOW_MAX_VIRTUAL_SIZE is 2^56 bytes).
pub const MAX_VIRTUAL_SIZE: u64 = 1 << 56;
/// qemu's limit on the backing file name: we only show it in the refusal.
const MAX_BACKING_NAME: u64 = 1023;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    Deflate,
    Zstd,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    pub version: u32,
    pub cluster_bits: u32,
    pub virtual_size: u64,
    pub l1_size: u32,
    pub l1_table_offset: u64,
    pub refcount_table_offset: u64,
    pub refcount_table_clusters: u32,
    pub nb_snapshots: u32,
    pub incompatible: u64,
    pub compression: Compression,
    pub extended_l2: bool,
    pub header_length: u32,
}

#[derive(Debug, thiserror::Error)]
pub enum Qcow2Error {
    #[error("qcow2 header is truncated ({0} bytes)")]
    ShortHeader(usize),
    #[error("qcow2 version {0} is not supported (2 and 3 are)")]
    Version(u32),
    #[error("qcow2 image has a backing file {0:?}: images with backing files are refused (they would read files outside the image)")]
    BackingFile(String),
    #[error("qcow2 image uses an external data file{0}: refused (it would read a file outside the image)")]
    ExternalDataFile(String),
    #[error("qcow2 image is encrypted (method {0}): encrypted images are not supported")]
    Encrypted(u32),
    #[error("qcow2 image is marked corrupt by qemu")]
    MarkedCorrupt,
    #[error("qcow2 image uses unknown incompatible features {0:#x}")]
    UnknownFeatures(u64),
    #[error("qcow2 field {field} has invalid value {value}")]
    Field { field: &'static str, value: u64 },
    #[error("qcow2 compression type {0} is unknown")]
    CompressionType(u8),
    #[error("qcow2 image is corrupt: {0}")]
    Corrupt(String),
    #[error("qcow2 image ends at byte {end} but data at host offset {offset} is still referenced")]
    Truncated { end: u64, offset: u64 },
    #[error("qcow2 compressed cluster at guest offset {guest} does not decompress: {source}")]
    Decompress {
        guest: u64,
        #[source]
        source: std::io::Error,
    },
    /// The image's layout needs more bookkeeping than streaming allows (clusters far
    /// out of order, many compressed clusters waiting on data not yet read).
    #[error("qcow2 image is laid out too far out of order to stream in bounded memory ({what}); convert it with qemu-img first")]
    TooScattered { what: String },
    /// A layer of a layered image that cannot be flattened as it is.
    #[error("layered qcow2 image: {0}")]
    Layered(String),
}

impl Qcow2Error {
    pub fn kind(&self) -> crate::ErrorKind {
        use crate::ErrorKind;
        match self {
            Qcow2Error::BackingFile(_)
            | Qcow2Error::ExternalDataFile(_)
            | Qcow2Error::Encrypted(_)
            | Qcow2Error::UnknownFeatures(_)
            | Qcow2Error::Version(_)
            | Qcow2Error::CompressionType(_)
            | Qcow2Error::Layered(_) => ErrorKind::UnsupportedFormat,
            Qcow2Error::ShortHeader(_)
            | Qcow2Error::MarkedCorrupt
            | Qcow2Error::Field { .. }
            | Qcow2Error::Corrupt(_)
            | Qcow2Error::Truncated { .. }
            | Qcow2Error::Decompress { .. }
            | Qcow2Error::TooScattered { .. } => ErrorKind::CorruptImage,
        }
    }
}

impl Header {
    pub fn cluster_size(&self) -> u64 {
        1 << self.cluster_bits
    }

    /// Bytes per L2 entry (16 with extended L2: entry + subcluster bitmap).
    pub fn l2_entry_size(&self) -> u64 {
        if self.extended_l2 {
            16
        } else {
            8
        }
    }

    /// Guest bytes one L2 table maps.
    pub fn l2_coverage(&self) -> u64 {
        self.cluster_size() / self.l2_entry_size() * self.cluster_size()
    }

    /// The cluster size from the first bytes, to know how much of the image holds the
    /// header and its extensions (qemu keeps both in cluster 0).
    pub fn peek_cluster_bits(head: &[u8]) -> Result<u32, Qcow2Error> {
        let (v2, _) =
            OnDiskV2::ref_from_prefix(head).map_err(|_| Qcow2Error::ShortHeader(head.len()))?;
        let bits = v2.cluster_bits.get();
        if !(MIN_CLUSTER_BITS..=MAX_CLUSTER_BITS).contains(&bits) {
            return Err(Qcow2Error::Field {
                field: "cluster_bits",
                value: bits.into(),
            });
        }
        Ok(bits)
    }

    /// Parses and validates the header from cluster 0 of the image.
    pub fn parse(c0: &[u8]) -> Result<Header, Qcow2Error> {
        Self::parse_inner(c0, false).map(|(h, _)| h)
    }

    /// As [`Header::parse`], for a layer of a layered image: a backing file name is
    /// returned (the caller resolves it inside the image, never on the host) instead of
    /// refused. A name that does not lie in cluster 0 is still refused.
    pub fn parse_layer(c0: &[u8]) -> Result<(Header, Option<String>), Qcow2Error> {
        Self::parse_inner(c0, true)
    }

    // One function on purpose (130 lines): every check of the header in the order the
    // spec lays out its fields, each bound next to the field it bounds, so a reviewer
    // reads the whole validation top to bottom; the qcow2 fuzz target covers it whole.
    fn parse_inner(c0: &[u8], allow_backing: bool) -> Result<(Header, Option<String>), Qcow2Error> {
        let short = || Qcow2Error::ShortHeader(c0.len());
        let (v2, rest) = OnDiskV2::ref_from_prefix(c0).map_err(|_| short())?;
        if &v2.magic != b"QFI\xfb" {
            return Err(short());
        }
        let version = v2.version.get();
        if version != 2 && version != 3 {
            return Err(Qcow2Error::Version(version));
        }
        let cluster_bits = Self::peek_cluster_bits(c0)?;
        let cs = 1u64 << cluster_bits;
        let backing_file_offset = v2.backing_file_offset.get();
        let backing_file_size = u64::from(v2.backing_file_size.get());
        let mut backing = None;
        if backing_file_offset != 0 {
            let name = backing_name(c0, backing_file_offset, backing_file_size);
            let inside = usize::try_from(backing_file_offset)
                .ok()
                .zip(usize::try_from(backing_file_size).ok())
                .and_then(|(o, n)| o.checked_add(n))
                .is_some_and(|e| e <= c0.len())
                && backing_file_size <= MAX_BACKING_NAME;
            if !allow_backing || !inside {
                return Err(Qcow2Error::BackingFile(name));
            }
            backing = Some(name);
        }
        let virtual_size = v2.size.get();
        if virtual_size > MAX_VIRTUAL_SIZE {
            return Err(Qcow2Error::Field {
                field: "size",
                value: virtual_size,
            });
        }
        let crypt_method = v2.crypt_method.get();
        if crypt_method != 0 {
            return Err(Qcow2Error::Encrypted(crypt_method));
        }
        let l1_size = v2.l1_size.get();
        let l1_table_offset = v2.l1_table_offset.get();
        let refcount_table_offset = v2.refcount_table_offset.get();
        let refcount_table_clusters = v2.refcount_table_clusters.get();
        let nb_snapshots = v2.nb_snapshots.get();
        let (incompatible, header_length) = if version == 3 {
            let (v3, _) = OnDiskV3::ref_from_prefix(rest).map_err(|_| short())?;
            (v3.incompatible_features.get(), v3.header_length.get())
        } else {
            (0, 72)
        };
        if version == 3
            && (header_length < 104
                || u64::from(header_length) > cs
                || header_length as usize > c0.len())
        {
            return Err(Qcow2Error::Field {
                field: "header_length",
                value: header_length.into(),
            });
        }
        if incompatible & incompat::CORRUPT != 0 {
            return Err(Qcow2Error::MarkedCorrupt);
        }
        if incompatible & incompat::EXTERNAL_DATA_FILE != 0 {
            return Err(Qcow2Error::ExternalDataFile(String::new()));
        }
        let unknown = incompatible & !incompat::SUPPORTED;
        if unknown != 0 {
            return Err(Qcow2Error::UnknownFeatures(unknown));
        }
        let compression = if incompatible & incompat::COMPRESSION_TYPE != 0 {
            if header_length < 105 {
                return Err(Qcow2Error::Field {
                    field: "header_length",
                    value: header_length.into(),
                });
            }
            match c0[104] {
                0 => Compression::Deflate,
                1 => Compression::Zstd,
                t => return Err(Qcow2Error::CompressionType(t)),
            }
        } else {
            Compression::Deflate
        };
        let extended_l2 = incompatible & incompat::EXTENDED_L2 != 0;
        if extended_l2 && cluster_bits < 14 {
            // qemu requires 16 KiB clusters for subclusters (32 subclusters of >= 512 B).
            return Err(Qcow2Error::Field {
                field: "cluster_bits (extended L2)",
                value: cluster_bits.into(),
            });
        }
        let h = Header {
            version,
            cluster_bits,
            virtual_size,
            l1_size,
            l1_table_offset,
            refcount_table_offset,
            refcount_table_clusters,
            nb_snapshots,
            incompatible,
            compression,
            extended_l2,
            header_length,
        };
        // The L1 table must cover the disk, fit qemu's limit, and be cluster-aligned.
        let needed = virtual_size.div_ceil(h.l2_coverage());
        if u64::from(l1_size) < needed || u64::from(l1_size) * 8 > MAX_L1_BYTES {
            return Err(Qcow2Error::Field {
                field: "l1_size",
                value: l1_size.into(),
            });
        }
        if l1_size > 0 && (l1_table_offset == 0 || !l1_table_offset.is_multiple_of(cs)) {
            return Err(Qcow2Error::Field {
                field: "l1_table_offset",
                value: l1_table_offset,
            });
        }
        if !refcount_table_offset.is_multiple_of(cs) {
            return Err(Qcow2Error::Field {
                field: "refcount_table_offset",
                value: refcount_table_offset,
            });
        }
        h.check_extensions(c0)?;
        Ok((h, backing))
    }

    fn check_extensions(&self, c0: &[u8]) -> Result<(), Qcow2Error> {
        let mut off = self.header_length as usize;
        let end = c0.len().min(self.cluster_size() as usize);
        while off + 8 <= end {
            let (ext, _) = OnDiskExtension::ref_from_prefix(&c0[off..end])
                .map_err(|_| Qcow2Error::Corrupt("header extension".into()))?;
            let kind = ext.kind.get();
            let len = ext.length.get() as usize;
            let data = off + 8;
            if kind == EXT_END {
                return Ok(());
            }
            if data.checked_add(len).is_none_or(|e| e > end) {
                return Err(Qcow2Error::Corrupt(format!(
                    "header extension {kind:#x} overruns cluster 0"
                )));
            }
            match kind {
                EXT_DATA_FILE => {
                    let name = String::from_utf8_lossy(&c0[data..data + len.min(256)]).into_owned();
                    return Err(Qcow2Error::ExternalDataFile(format!(" {name:?}")));
                }
                EXT_FULL_DISK_ENCRYPTION => return Err(Qcow2Error::Encrypted(2)),
                _ => {}
            }
            off = data + len.div_ceil(8) * 8;
        }
        Ok(())
    }
}

/// The backing file's name, for the refusal message only (never opened).
fn backing_name(c0: &[u8], off: u64, size: u64) -> String {
    let size = size.min(MAX_BACKING_NAME);
    match (usize::try_from(off), usize::try_from(size)) {
        (Ok(o), Ok(s)) if o.checked_add(s).is_some_and(|e| e <= c0.len()) => {
            String::from_utf8_lossy(&c0[o..o + s])
                .chars()
                .filter(|c| !c.is_control())
                .collect()
        }
        _ => "<outside the first cluster>".to_string(),
    }
}

/// What a fresh image we write has in its header: a version 3 image with 16-bit
/// refcounts, no backing file, no snapshots, no features.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NewImage {
    pub cluster_bits: u32,
    pub virtual_size: u64,
    pub l1_size: u32,
    pub l1_table_offset: u64,
    pub refcount_table_offset: u64,
    pub refcount_table_clusters: u32,
}

impl NewImage {
    /// The refcount width we write (`refcount_order` 4: 16 bits, qemu's default).
    pub const REFCOUNT_ORDER: u32 = 4;

    /// The header bytes (v2 part, v3 part, the end-of-extensions marker), for the start
    /// of cluster 0.
    pub fn encode(&self) -> Vec<u8> {
        let v2 = OnDiskV2 {
            magic: *b"QFI\xfb",
            version: U32::new(3),
            backing_file_offset: U64::new(0),
            backing_file_size: U32::new(0),
            cluster_bits: U32::new(self.cluster_bits),
            size: U64::new(self.virtual_size),
            crypt_method: U32::new(0),
            l1_size: U32::new(self.l1_size),
            l1_table_offset: U64::new(self.l1_table_offset),
            refcount_table_offset: U64::new(self.refcount_table_offset),
            refcount_table_clusters: U32::new(self.refcount_table_clusters),
            nb_snapshots: U32::new(0),
            snapshots_offset: U64::new(0),
        };
        let v3 = OnDiskV3 {
            incompatible_features: U64::new(0),
            compatible_features: U64::new(0),
            autoclear_features: U64::new(0),
            refcount_order: U32::new(Self::REFCOUNT_ORDER),
            header_length: U32::new(
                (std::mem::size_of::<OnDiskV2>() + std::mem::size_of::<OnDiskV3>()) as u32,
            ),
        };
        let end = OnDiskExtension {
            kind: U32::new(EXT_END),
            length: U32::new(0),
        };
        let mut out = Vec::with_capacity(112);
        out.extend_from_slice(v2.as_bytes());
        out.extend_from_slice(v3.as_bytes());
        out.extend_from_slice(end.as_bytes());
        out
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A minimal valid v3 header in a 64 KiB cluster 0.
    pub fn header_v3(size: u64) -> Vec<u8> {
        let mut c = vec![0u8; 65536];
        c[..4].copy_from_slice(b"QFI\xfb");
        c[4..8].copy_from_slice(&3u32.to_be_bytes());
        c[20..24].copy_from_slice(&16u32.to_be_bytes());
        c[24..32].copy_from_slice(&size.to_be_bytes());
        let l1 = size.div_ceil(8192 * 65536).max(1) as u32;
        c[36..40].copy_from_slice(&l1.to_be_bytes());
        c[40..48].copy_from_slice(&(3 * 65536u64).to_be_bytes());
        c[48..56].copy_from_slice(&65536u64.to_be_bytes());
        c[56..60].copy_from_slice(&1u32.to_be_bytes());
        c[96..100].copy_from_slice(&4u32.to_be_bytes());
        c[100..104].copy_from_slice(&104u32.to_be_bytes());
        c
    }

    #[test]
    fn encoded_header_parses_back() {
        let new = NewImage {
            cluster_bits: 16,
            virtual_size: 3 << 30,
            l1_size: 6,
            l1_table_offset: 5 << 16,
            refcount_table_offset: 6 << 16,
            refcount_table_clusters: 1,
        };
        let mut c0 = new.encode();
        c0.resize(65536, 0);
        let h = Header::parse(&c0).expect("our own header parses");
        assert_eq!(h.version, 3);
        assert_eq!(h.virtual_size, 3 << 30);
        assert_eq!(h.l1_size, 6);
        assert_eq!(h.l1_table_offset, 5 << 16);
        assert_eq!(h.refcount_table_offset, 6 << 16);
        assert_eq!(h.header_length, 104);
        assert_eq!(h.incompatible, 0);
    }

    #[test]
    fn parses_valid_header() {
        let h = Header::parse(&header_v3(1 << 30)).expect("valid");
        assert_eq!(h.cluster_size(), 65536);
        assert_eq!(h.virtual_size, 1 << 30);
        assert_eq!(h.compression, Compression::Deflate);
    }

    #[test]
    fn refuses_hostile_headers() {
        let mut c = header_v3(1 << 30);
        c[8..16].copy_from_slice(&200u64.to_be_bytes());
        c[16..20].copy_from_slice(&10u32.to_be_bytes());
        c[200..210].copy_from_slice(b"/etc/shado");
        assert!(matches!(Header::parse(&c), Err(Qcow2Error::BackingFile(n)) if n == "/etc/shado"));

        let mut c = header_v3(1 << 30);
        c[72..80].copy_from_slice(&incompat::EXTERNAL_DATA_FILE.to_be_bytes());
        assert!(matches!(
            Header::parse(&c),
            Err(Qcow2Error::ExternalDataFile(_))
        ));

        let mut c = header_v3(1 << 30);
        c[104..108].copy_from_slice(&EXT_DATA_FILE.to_be_bytes());
        c[108..112].copy_from_slice(&4u32.to_be_bytes());
        c[112..116].copy_from_slice(b"/dev");
        assert!(matches!(
            Header::parse(&c),
            Err(Qcow2Error::ExternalDataFile(_))
        ));

        let mut c = header_v3(1 << 30);
        c[32..36].copy_from_slice(&1u32.to_be_bytes());
        assert!(matches!(Header::parse(&c), Err(Qcow2Error::Encrypted(1))));

        let mut c = header_v3(1 << 30);
        c[72..80].copy_from_slice(&(1u64 << 40).to_be_bytes());
        assert!(matches!(
            Header::parse(&c),
            Err(Qcow2Error::UnknownFeatures(_))
        ));

        let mut c = header_v3(1 << 30);
        c[36..40].copy_from_slice(&(1u32 << 31).to_be_bytes());
        assert!(matches!(
            Header::parse(&c),
            Err(Qcow2Error::Field {
                field: "l1_size",
                ..
            })
        ));

        let mut c = header_v3(1 << 30);
        c[20..24].copy_from_slice(&30u32.to_be_bytes());
        assert!(Header::parse(&c).is_err());

        let mut c = header_v3(1 << 30);
        c[104..108].copy_from_slice(&0x1234u32.to_be_bytes());
        c[108..112].copy_from_slice(&u32::MAX.to_be_bytes());
        assert!(matches!(Header::parse(&c), Err(Qcow2Error::Corrupt(_))));

        assert!(Header::parse(&header_v3(1 << 30)[..50]).is_err());
    }
}
