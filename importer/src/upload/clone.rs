//! Host-assisted clone, the target side. CDI's cloner (`cdi-cloner`) POSTs a
//! snappy-framed stream with `x-cdi-content-type: filesystem-clone` (a GNU `tar cv -S`
//! of the source volume: sparse entries) or `blockdevice-clone` (the raw device). As
//! CDI's upload server does (`pkg/uploadserver`, `cloneProcessor`):
//!
//! * a filesystem clone onto a filesystem volume is unpacked into the data directory,
//!   with the archive path rules, staged and moved into place only once complete, holes
//!   kept; CDI reports `preallocationApplied: true` for it;
//! * a filesystem clone onto a block volume writes the tar entry named `disk.img` to the
//!   device;
//! * a block-device clone is written raw (no format detection) to the destination, file
//!   or device, under the sinks' zero and size rules.
//!
//! Only the synchronous endpoints take clones: an async clone is refused, as CDI does.

use crate::destination::Destination;
use crate::disk::{self, DiskPlan};
use crate::failure::Failure;
use ferrydisk_common::cdi::termination::TerminationMessage;
use ferrydisk_common::decode::tar::{self, TarError};
use ferrydisk_common::decode::PeekReader;
use ferrydisk_common::progress::Progress;
use ferrydisk_common::ErrorKind;
use std::io::Read;
use std::sync::Arc;

/// What the cloner sends (`x-cdi-content-type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CloneKind {
    Filesystem,
    Block,
}

impl CloneKind {
    pub fn from_header(v: Option<&str>) -> Option<Self> {
        match v {
            Some("filesystem-clone") => Some(CloneKind::Filesystem),
            Some("blockdevice-clone") => Some(CloneKind::Block),
            _ => None,
        }
    }

    /// Whether the stream is unpacked into a directory (rather than written to a disk).
    pub fn unpacks(self, disk_dest: &Destination) -> bool {
        self == CloneKind::Filesystem && !matches!(disk_dest, Destination::Block(_))
    }
}

/// The blocking half of a clone. `plan` is the data directory when [`CloneKind::unpacks`],
/// the disk otherwise. The message's `preallocationApplied` is CDI's for the clone kind;
/// the caller words the message (`Clone Complete`).
pub fn write(
    plan: &DiskPlan,
    kind: CloneKind,
    body: impl Read,
    progress: Arc<Progress>,
) -> Result<TerminationMessage, Failure> {
    let mut stream = snap::read::FrameDecoder::new(body);
    let msg = match (kind, &plan.dest) {
        (CloneKind::Filesystem, Destination::Dir(_)) => {
            // An empty source volume is a tar of end-of-archive blocks only (all zeros):
            // nothing to unpack, and not "not an archive".
            let mut peek = PeekReader::new(&mut stream, 512).map_err(read_failure)?;
            let mut m = if peek.head().iter().all(|&b| b == 0) {
                std::io::copy(&mut peek, &mut std::io::sink()).map_err(read_failure)?;
                tracing::info!("the clone source volume is empty");
                TerminationMessage::default()
            } else {
                disk::write_stream(plan, peek, None, progress, None, false)?
            };
            m.preallocation_applied = Some(true);
            m
        }
        (CloneKind::Filesystem, _) => {
            let found = tar::with_file_named(
                &mut stream,
                |name| name.contains("disk.img"),
                |f| disk::write_raw(plan, f.reader, progress.clone()).map_err(Wrapped::Failure),
            )
            .map_err(Wrapped::into_failure)?;
            let mut m = found.ok_or_else(|| Failure::Process {
                kind: ErrorKind::CorruptImage,
                message: "no disk image found in tar".into(),
            })?;
            m.preallocation_applied = Some(false);
            m
        }
        (CloneKind::Block, _) => {
            let mut m = disk::write_raw(plan, &mut stream, progress)?;
            m.preallocation_applied = Some(false);
            m
        }
    };
    Ok(msg)
}

fn read_failure(e: std::io::Error) -> Failure {
    Failure::Process {
        kind: ferrydisk_common::error::io_kind(&e).unwrap_or(ErrorKind::Io),
        message: format!("reading the clone stream: {e}"),
    }
}

/// A failure from inside the tar walk, or the walk's own.
enum Wrapped {
    Failure(Failure),
    Tar(TarError),
}

impl From<TarError> for Wrapped {
    fn from(e: TarError) -> Self {
        Wrapped::Tar(e)
    }
}

impl Wrapped {
    fn into_failure(self) -> Failure {
        match self {
            Wrapped::Failure(f) => f,
            Wrapped::Tar(e) => Failure::Process {
                kind: e.kind(),
                message: ferrydisk_common::error::chain_line(&e),
            },
        }
    }
}
