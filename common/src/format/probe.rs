//! The virtual size of an image file from its headers alone, as `qemu-img info` reports
//! it: CDI's size-detection pod (`cdi-image-size-detection`) for clones. Only the
//! headers and tables that state the size are read, by offset (a local file or device),
//! with the same checks as a conversion; what qemu would probe as raw (a fixed VHD, a
//! compressed file, an ISO) is raw, and its size is the file's length.

use super::contract::FormatError;
use super::{qcow2, vdi, vhd, vhdx, vmdk};
use crate::sniff::{sniff, Format, SNIFF_LEN};
use std::fs::File;
use std::io::{Seek, SeekFrom};
use std::os::unix::fs::FileExt;

/// What a probe found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Probed {
    pub format: Format,
    pub virtual_size: u64,
}

/// Up to `len` bytes at `off` (fewer at the end of the file).
fn read_upto(file: &File, off: u64, len: usize) -> Result<Vec<u8>, FormatError> {
    let mut buf = vec![0u8; len];
    let mut got = 0;
    while got < len {
        match file.read_at(&mut buf[got..], off + got as u64) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(source) => {
                return Err(FormatError::Read {
                    format: Format::Raw,
                    source,
                })
            }
        }
    }
    buf.truncate(got);
    Ok(buf)
}

/// The image's format and guest size.
pub fn probe(file: &mut File) -> Result<Probed, FormatError> {
    let head = read_upto(file, 0, SNIFF_LEN.max(512))?;
    let format = sniff(&head);
    let virtual_size = match format {
        Format::Qcow2 => {
            let bits = qcow2::Header::peek_cluster_bits(&head)?;
            let c0 = read_upto(file, 0, 1 << bits)?;
            qcow2::Header::parse(&c0)?.virtual_size
        }
        Format::Vmdk => vmdk::Header::parse(&head)?.virtual_size(),
        Format::Vdi => vdi::Header::parse(&head)?.virtual_size(),
        Format::Vpc => vhd::Footer::parse(&head)?.virtual_size,
        Format::Vhdx => vhdx::probe_virtual_size(&|off, len| read_upto(file, off, len))?,
        Format::Foreign(name) => {
            return Err(FormatError::unsupported(
                format,
                format!("the {name} format"),
            ))
        }
        // qemu-img info: anything else is raw, as long as the file is.
        _ => file
            .seek(SeekFrom::End(0))
            .map_err(|source| FormatError::Read {
                format: Format::Raw,
                source,
            })?,
    };
    Ok(Probed {
        format: match format {
            Format::Qcow2 | Format::Vmdk | Format::Vdi | Format::Vpc | Format::Vhdx => format,
            _ => Format::Raw,
        },
        virtual_size,
    })
}
