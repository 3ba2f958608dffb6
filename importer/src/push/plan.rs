//! The first stage: how the payload is made. A local file pushed as it is stored goes
//! up from the file; anything else is imported (a URL, an image, a conversion), streamed
//! into the upload where it can be and spooled where it cannot.

use crate::cli::{Convert, OutputFormat};
use crate::config::PushConfig;
use ferrydisk_common::sniff::Format;
use std::fs::File;
use std::path::Path;

/// A push source that is a path to a file or block device (not a URL or image
/// reference).
pub fn is_path(source: &str) -> bool {
    crate::inspect::classify(source).0 == crate::config::import::SourceKind::Http
        && !source.contains("://")
}

/// The source goes up as the file holds it: a local file kept as stored, or a local
/// raw file converted to raw (already what it would become).
pub fn as_stored(cfg: &PushConfig) -> bool {
    let given = cfg.source.to_string_lossy();
    is_path(&given)
        && match cfg.payload.convert {
            Convert::Keep => true,
            Convert::Raw => is_plain_raw(&cfg.source),
            Convert::Qcow2 => false,
        }
}

/// What an imported source is written as: raw when asked, else qcow2 (a qcow2 source
/// keeps its bytes).
pub fn output(cfg: &PushConfig) -> OutputFormat {
    match cfg.payload.convert {
        Convert::Raw => OutputFormat::Raw,
        Convert::Keep | Convert::Qcow2 => OutputFormat::Qcow2,
    }
}

/// Whether a local file or device holds a raw disk as it is (not a format, not
/// compressed), by the importer's own sniffing.
fn is_plain_raw(path: &Path) -> bool {
    use ferrydisk_common::sniff::{sniff, SNIFF_LEN};
    let mut head = [0u8; SNIFF_LEN];
    File::open(path)
        .and_then(|mut f| ferrydisk_common::stream::read_full(&mut f, &mut head))
        .is_ok_and(|got| sniff(&head[..got]) == Format::Raw)
}
