//! One stage of a warm (multi-stage) import: a snapshot's qcow2, whose backing file is
//! the checkpoint the previous stage imported, applied onto the disk that stage wrote.
//! Only the clusters the delta allocates are written (a zero cluster zeroes); every
//! other byte of the disk is left as it is. No scratch: the qcow2 streams through the
//! layered converter with the existing disk as the layer below. Applying the same delta
//! twice gives the same disk, so a failed stage is simply run again.

use super::errors::{io_fail, process_failure};
use super::plan::DiskPlan;
use crate::destination::Destination;
use crate::failure::Failure;
use ferrydisk_common::cdi::termination::{ImportInfo, TerminationMessage};
use ferrydisk_common::format::contract::StreamOptions;
use ferrydisk_common::format::qcow2::{header::Header, layers::Stack};
use ferrydisk_common::pipeline::PipelineError;
use ferrydisk_common::progress::Progress;
use ferrydisk_common::sink::sparse::WriterOptions;
use ferrydisk_common::sink::{BlockTarget, FileTarget, SparseWriter, Target};
use ferrydisk_common::ErrorKind;
use std::io::Read;
use std::sync::Arc;

/// The most of the delta read before its header is checked (cluster 0 holds the
/// header and the backing file name; clusters are at most 2 MiB).
const HEAD_MAX: usize = 2 << 20;

/// Applies the qcow2 read from `source` onto the disk `plan` names. `previous` is the
/// checkpoint the qcow2's backing file must name (CDI's rule: the file name of the
/// backing path), checked before anything is written.
pub fn write_delta(
    plan: &DiskPlan,
    mut source: impl Read,
    previous: &str,
    progress: Arc<Progress>,
) -> Result<TerminationMessage, Failure> {
    let mut head = Vec::with_capacity(64 << 10);
    (&mut source)
        .take(HEAD_MAX as u64)
        .read_to_end(&mut head)
        .map_err(|e| process_failure(PipelineError::Read(e)))?;
    check_backing(&head, previous)?;
    let (target, len): (Box<dyn Target>, u64) = match &plan.dest {
        Destination::File(path) => {
            let t = FileTarget::open_existing(path).map_err(|e| {
                io_fail(
                    format!("opening {} (the previous stage's disk)", path.display()),
                    e,
                )
            })?;
            let len = std::fs::metadata(path).map(|m| m.len()).unwrap_or(0);
            (Box::new(t), len)
        }
        Destination::Block(path) => {
            let t = BlockTarget::open(path, plan.direct, false)
                .map_err(|e| io_fail(format!("opening {}", path.display()), e))?
                .over_existing();
            let len = t.size();
            (Box::new(t), len)
        }
        Destination::Dir(_) => {
            return Err(Failure::Config(
                "a delta stage applies a disk image, not an archive".into(),
            ))
        }
    };
    let mut writer = SparseWriter::spawn(
        target,
        WriterOptions {
            limit: u64::MAX,
            progress: Some(progress.clone()),
            ..Default::default()
        },
    );
    let stack = Arc::new(Stack::overlay());
    let opts = StreamOptions {
        scratch: plan.scratch.clone(),
        layers: Some(stack.clone()),
        ..Default::default()
    };
    let counter = progress.clone();
    let mut stream = ferrydisk_common::stream::CountingReader::new(
        std::io::Cursor::new(head).chain(source),
        move |n| counter.add_decoded(n),
    );
    let converted = ferrydisk_common::format::qcow2::convert(&mut stream, &mut writer, &opts)
        .map_err(|e| process_failure(ferrydisk_common::pipeline::format_error(e, None)))
        .and_then(|info| {
            std::io::copy(&mut stream, &mut std::io::sink())
                .map_err(|e| process_failure(PipelineError::Read(e)))?;
            Ok(info)
        });
    let info = match converted {
        Ok(i) => i,
        Err(f) => {
            writer.abort();
            return Err(f);
        }
    };
    tracing::info!(
        virtual_size = info.virtual_size,
        checkpoint = previous,
        "applied the delta onto the disk"
    );
    let (stats, finished) =
        writer
            .finish(len.max(info.virtual_size))
            .map_err(|e| Failure::Process {
                kind: e.kind(),
                message: e.to_string(),
            })?;
    tracing::info!(
        data_bytes = stats.data_bytes,
        zero_bytes = stats.zero_bytes,
        "delta written"
    );
    let mut msg = TerminationMessage::import_complete(finished.preallocated, None);
    let s = progress.snapshot();
    msg.import_info = Some(ImportInfo::new(
        "qcow2",
        s.decoded,
        info.virtual_size,
        s.source,
        progress.elapsed(),
    ));
    Ok(msg)
}

/// CDI's check before a delta may be merged: the snapshot's backing file is the
/// checkpoint the previous stage imported.
fn check_backing(head: &[u8], previous: &str) -> Result<(), Failure> {
    let refuse = |message: String| Failure::Process {
        kind: ErrorKind::UnsupportedFormat,
        message,
    };
    if !head.starts_with(b"QFI\xfb") {
        return Err(refuse(
            "the snapshot of a delta stage is not a qcow2 image".into(),
        ));
    }
    let (_, backing) = Header::parse_layer(head).map_err(|e| refuse(e.to_string()))?;
    let backing = backing.unwrap_or_default();
    let name = backing.rsplit('/').next().unwrap_or("");
    if name != previous {
        return Err(refuse(format!(
            "snapshot backing file '{name}' does not match expected checkpoint '{previous}', unable to safely rebase snapshot"
        )));
    }
    Ok(())
}
