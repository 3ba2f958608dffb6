//! One converter per disk format, one contract for all (`contract.rs`): each reads the
//! image forward from a stream and writes guest data to a [`SparseWriter`], returning
//! the same [`ImageInfo`] or [`FormatError`]. [`converter`] is the dispatch.

pub mod contract;
pub mod forward;
pub mod probe;
pub mod qcow2;
pub mod vdi;
pub mod vhd;
pub mod vhdx;
pub mod vmdk;

pub use contract::{FormatError, ImageInfo, StreamOptions};

use crate::sink::SparseWriter;
use crate::sniff::Format;
use std::io::Read;

/// A native converter: the image read from its first byte into `writer`.
pub type Converter =
    fn(&mut dyn Read, &mut SparseWriter, &StreamOptions) -> Result<ImageInfo, FormatError>;

/// The converter for a disk format; `None` for raw (copied as is) and for what is not a
/// disk format (compression, tar, ISO, unknown).
pub fn converter(format: Format) -> Option<Converter> {
    Some(match format {
        Format::Qcow2 => qcow2::convert,
        Format::Vmdk => vmdk::convert,
        Format::Vdi => vdi::convert,
        Format::Vpc => vhd::convert,
        Format::Vhdx => vhdx::convert,
        _ => return None,
    })
}
