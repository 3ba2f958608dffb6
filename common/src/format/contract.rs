//! What every native format converter shares: its options, its error, and the answer
//! it gives back.

use super::forward::held::{Held, HeldError};
use super::qcow2::Qcow2Error;
use crate::cdi::space::TooLarge;
use crate::error::{io_kind, ErrorKind};
use crate::sink::SinkError;
use crate::sniff::Format;
use std::io;
use std::path::PathBuf;

/// How a converter may hold data and how large the image may be.
#[derive(Debug, Clone)]
pub struct StreamOptions {
    /// Where to spool data that must be held beyond `hold_memory`.
    pub scratch: Option<PathBuf>,
    /// Bytes of not-yet-mapped data kept in memory before spooling.
    pub hold_memory: u64,
    /// The image may not be larger than this.
    pub limit: u64,
    /// The image itself when it is a local file starting at offset 0: data met before
    /// its table is read again from here instead of being held.
    pub source_file: Option<std::sync::Arc<std::fs::File>>,
    /// The image's length when the stream says (Content-Length, a tar entry's size):
    /// a table pointing past it is refused at once instead of waited for.
    pub source_len: Option<u64>,
    /// A layer of a layered qcow2 image: the stack that knows what the layers above
    /// decided (see [`crate::format::qcow2::layers`]).
    pub layers: Option<std::sync::Arc<crate::format::qcow2::layers::Stack>>,
}

impl Default for StreamOptions {
    fn default() -> Self {
        StreamOptions {
            scratch: None,
            hold_memory: 32 << 20,
            limit: u64::MAX,
            source_file: None,
            source_len: None,
            layers: None,
        }
    }
}

impl StreamOptions {
    /// Where data read ahead of its tables is kept under these options: the image file
    /// itself when it is one (read back in `unit` byte pieces), else memory then scratch.
    pub fn held(&self, what: &'static str, unit: u64) -> Held {
        let held = Held::new(what, self.hold_memory, self.scratch.clone(), unit);
        match &self.source_file {
            Some(f) => held.reread_from(f),
            None => held,
        }
    }
}

/// What a converter found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageInfo {
    pub format: Format,
    /// Guest-visible size in bytes (the raw output's length).
    pub virtual_size: u64,
    /// The variant, for logs and reports (`dynamic`, `streamOptimized`, ...).
    pub subformat: &'static str,
}

#[derive(Debug, thiserror::Error)]
pub enum FormatError {
    #[error("{format} image is corrupt: {what}")]
    Corrupt { format: Format, what: String },
    #[error("{format} image uses {what}, which ferrydisk does not support")]
    Unsupported { format: Format, what: String },
    /// A parent, backing or extent file: following it would read a host path.
    #[error("{format} image refers to another file ({what}); images must be self-contained and ferrydisk never opens host files for them")]
    External { format: Format, what: String },
    #[error("{format} image ends at byte {end} but data at byte {offset} is referenced")]
    Truncated {
        format: Format,
        end: u64,
        offset: u64,
    },
    #[error("{format} image: data at byte {offset} is referenced after the stream has passed it (an out-of-order layout this stream cannot seek back to)")]
    Behind { format: Format, offset: u64 },
    #[error("reading {format} image: {source}")]
    Read {
        format: Format,
        #[source]
        source: io::Error,
    },
    #[error("{format} image: {source}")]
    Held {
        format: Format,
        #[source]
        source: HeldError,
    },
    #[error(transparent)]
    Sink(#[from] SinkError),
    #[error(transparent)]
    TooLarge(#[from] TooLarge),
    /// qcow2's own header and table checks, with their qcow2 wording.
    #[error(transparent)]
    Qcow2(#[from] Qcow2Error),
}

impl FormatError {
    pub fn kind(&self) -> ErrorKind {
        match self {
            FormatError::Corrupt { .. }
            | FormatError::Truncated { .. }
            | FormatError::Behind { .. } => ErrorKind::CorruptImage,
            FormatError::Unsupported { .. } | FormatError::External { .. } => {
                ErrorKind::UnsupportedFormat
            }
            FormatError::Read { source, .. } => io_kind(source).unwrap_or(ErrorKind::Io),
            FormatError::Held { source, .. } => source.kind(),
            FormatError::Sink(e) => e.kind(),
            FormatError::TooLarge(e) => e.kind(),
            FormatError::Qcow2(e) => e.kind(),
        }
    }

    pub fn corrupt(format: Format, what: impl Into<String>) -> Self {
        FormatError::Corrupt {
            format,
            what: what.into(),
        }
    }

    pub fn unsupported(format: Format, what: impl Into<String>) -> Self {
        FormatError::Unsupported {
            format,
            what: what.into(),
        }
    }

    pub fn external(format: Format, what: impl Into<String>) -> Self {
        FormatError::External {
            format,
            what: what.into(),
        }
    }
}

/// Refuses a virtual size above the volume before anything is written.
pub fn check_size(size: u64, opts: &StreamOptions) -> Result<(), FormatError> {
    Ok(crate::cdi::space::check_fits(size, opts.limit)?)
}
