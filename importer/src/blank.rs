//! `IMPORTER_SOURCE=none`: a blank disk (docs/cdi-contract.md section 1.5 step 3): a destination
//! written with no source.

use crate::destination::{fs_available, Destination, FileSpace};
use crate::failure::Failure;
use ferrydisk_common::cdi::termination::{TerminationMessage, IMPORT_COMPLETE};
use ferrydisk_common::sink::{block, FileTarget, Target};
use ferrydisk_common::ErrorKind;

/// `None` means "exit 0 without a termination message" (block without preallocation:
/// CDI has nothing to do there either).
pub fn create(
    dest: &Destination,
    requested: Option<u64>,
    overhead: f64,
    preallocate: bool,
) -> Result<Option<TerminationMessage>, Failure> {
    let fail = |kind, message: String| Failure::Blank { kind, message };
    let done = |applied| TerminationMessage {
        preallocation_applied: Some(applied),
        message: Some(IMPORT_COMPLETE.into()),
        ..Default::default()
    };
    match dest {
        Destination::Dir(_) => Err(Failure::Config(
            "Cannot create empty disk with content type archive".into(),
        )),
        Destination::Block(path) if !preallocate => {
            tracing::info!(device = %path.display(), "blank block volume without preallocation: nothing to write");
            Ok(None)
        }
        Destination::Block(path) => {
            let t = block::BlockTarget::open(path, false, true)
                .map_err(|e| fail(kind_of(&e), format!("opening {}: {e}", path.display())))?;
            let f = std::fs::OpenOptions::new()
                .write(true)
                .open(path)
                .map_err(|e| fail(kind_of(&e), e.to_string()))?;
            let mut offload = block::Zeroing::Allocate; // preallocation: allocate
            block::zero_range(&f, &mut offload, t.logical_block(), 0, t.size())
                .map_err(|e| fail(kind_of(&e), format!("zeroing {}: {e}", path.display())))?;
            f.sync_all().map_err(|e| fail(kind_of(&e), e.to_string()))?;
            Ok(Some(done(true)))
        }
        Destination::File(path) => {
            let requested = requested.ok_or_else(|| {
                fail(
                    ErrorKind::Config,
                    "IMPORTER_IMAGE_SIZE is required for a blank disk".into(),
                )
            })?;
            let mut t = FileTarget::create(path, preallocate, false)
                .map_err(|e| fail(kind_of(&e), format!("creating {}: {e}", path.display())))?;
            let dir = path
                .parent()
                .filter(|p| !p.as_os_str().is_empty())
                .unwrap_or(std::path::Path::new("."));
            let avail = fs_available(dir)
                .map_err(|e| fail(kind_of(&e), format!("statfs {}: {e}", dir.display())))?;
            let len = FileSpace::new(avail, Some(requested), overhead).blank_len();
            let info = t.finish(len).map_err(|e| {
                t.abort();
                fail(kind_of(&e), format!("writing {}: {e}", path.display()))
            })?;
            tracing::info!(path = %path.display(), size = len, preallocated = info.preallocated, "created blank disk");
            Ok(Some(done(info.preallocated)))
        }
    }
}

/// A full volume is `TooLarge`, any other local failure `Io`.
fn kind_of(e: &std::io::Error) -> ErrorKind {
    ferrydisk_common::error::io_kind(e).unwrap_or(ErrorKind::Io)
}
