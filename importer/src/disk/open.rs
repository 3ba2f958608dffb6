//! Opening the destination (file, block device, qcow2 file, a push's stream, nothing)
//! and finishing it: CDI's resize rule, fsync, the success message.

use super::errors::io_fail;
use super::plan::{DiskPlan, Output};
use crate::destination::{fs_available, Destination, FileSpace};
use crate::failure::Failure;
use ferrydisk_common::cdi::termination::{ImportInfo, TerminationMessage};
use ferrydisk_common::decode::gzip::Integrity;
use ferrydisk_common::pipeline::{self, Report};
use ferrydisk_common::progress::Progress;
use ferrydisk_common::sink::discard::DiscardTarget;
use ferrydisk_common::sink::sparse::WriterOptions;
use ferrydisk_common::sink::{BlockTarget, FileTarget, Qcow2Target, SparseWriter, Target};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// An open disk destination (file or block device).
pub(super) struct Disk {
    pub(super) writer: SparseWriter,
    pub(super) opts: pipeline::Options,
    /// The resize rule, for a file.
    pub(super) space: Option<FileSpace>,
}

pub(super) fn pipeline_options(
    plan: &DiskPlan,
    progress: Arc<Progress>,
    source_len: Option<u64>,
) -> pipeline::Options {
    pipeline::Options {
        limit: u64::MAX,
        source_len,
        progress,
        // Only a mounted scratch volume counts (CDI: a missing one means "required").
        scratch: plan.scratch.clone(),
        source_file: None,
        keep_qcow2: plan.qcow2_out,
        // A checksum the user gave covers the source's bytes as a layer digest does.
        integrity: if plan.checksum.is_empty() {
            Integrity::Crc
        } else {
            Integrity::Digest
        },
    }
}

pub(super) fn open_disk(
    plan: &DiskPlan,
    progress: Arc<Progress>,
    source_len: Option<u64>,
) -> Result<Disk, Failure> {
    let mut opts = pipeline_options(plan, progress.clone(), source_len);
    let (target, space): (Box<dyn Target>, Option<FileSpace>) = match (&plan.output, &plan.dest) {
        (Output::Stream(sink), _) => {
            let taken = sink.lock().ok().and_then(|mut s| s.take());
            let (t, limit) = taken.ok_or(Failure::StreamTaken)?;
            opts.limit = limit;
            (t, None)
        }
        (Output::Discard(_), _) => (Box::new(DiscardTarget::default()), None),
        (Output::Volume, Destination::Dir(_)) => {
            return Err(Failure::Config(
                "a disk image needs a file or block destination".into(),
            ))
        }
        (Output::Volume, Destination::File(path)) => {
            let t = FileTarget::create(path, plan.preallocate, plan.direct)
                .map_err(|e| io_fail(format!("creating {}", path.display()), e))?;
            // Measured after truncation, so a rerun does not count the old image as used.
            let dir = parent_dir(path);
            let avail =
                fs_available(&dir).map_err(|e| io_fail(format!("statfs {}", dir.display()), e))?;
            let space = FileSpace::new(avail, plan.requested, plan.overhead);
            opts.limit = space.available;
            if plan.qcow2_out {
                let reader = std::fs::File::open(path)
                    .map_err(|e| io_fail(format!("opening {}", path.display()), e))?;
                let q = Qcow2Target::new(Box::new(t), reader);
                let q = if plan.qcow2_compress {
                    q.with_compression()
                } else {
                    q
                };
                (Box::new(q), Some(space))
            } else {
                (Box::new(t), Some(space))
            }
        }
        (Output::Volume, Destination::Block(path)) => {
            let t = BlockTarget::open(path, plan.direct, plan.preallocate)
                .map_err(|e| io_fail(format!("opening {}", path.display()), e))?
                .assume_zeroed(plan.target_zeroed);
            opts.limit = t.size();
            (Box::new(t), None)
        }
    };
    let writer = SparseWriter::spawn(
        target,
        WriterOptions {
            limit: opts.limit,
            progress: Some(progress),
            ..Default::default()
        },
    );
    Ok(Disk {
        writer,
        opts,
        space,
    })
}

/// Resizes per CDI's rule, makes the disk durable and builds the success message.
pub(super) fn finish_disk(
    plan: &DiskPlan,
    disk: Disk,
    report: &Report,
    labels: Option<BTreeMap<String, String>>,
) -> Result<TerminationMessage, Failure> {
    // A kept qcow2 is exactly as long as it came; raw disks follow CDI's resize rule.
    let final_len = report.kept_len.unwrap_or_else(|| {
        disk.space
            .map_or(report.virtual_size, |s| s.final_len(report.virtual_size))
    });
    if let Some(found) = plan.output.inspected() {
        if let Ok(mut r) = found.report.lock() {
            *r = Some(report.clone());
        }
    }
    let disk_progress = disk.opts.progress.clone();
    let (stats, info) = disk
        .writer
        .finish(final_len)
        .map_err(|e| Failure::Process {
            kind: e.kind(),
            message: e.to_string(),
        })?;
    log_done(report, Some((stats, final_len)));
    // A block device has every byte of the image written or explicitly zeroed.
    let preallocated =
        info.preallocated || (plan.preallocate && matches!(plan.dest, Destination::Block(_)));
    let mut message = TerminationMessage::import_complete(preallocated, labels);
    message.import_info = Some(import_info(report, &disk_progress));
    Ok(message)
}

/// Deckhouse's report of an import: the image under its layers, duration and speed.
pub(super) fn import_info(report: &Report, progress: &Progress) -> ImportInfo {
    let s = progress.snapshot();
    ImportInfo::new(
        report.format.map_or("", |f| f.name()),
        s.decoded,
        report.virtual_size,
        s.source,
        progress.elapsed(),
    )
}

pub(super) fn parent_dir(path: &Path) -> PathBuf {
    path.parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."))
        .to_path_buf()
}

pub(super) fn log_done(
    report: &Report,
    written: Option<(ferrydisk_common::sink::WriteStats, u64)>,
) {
    match written {
        Some((s, len)) => tracing::info!(
            format = %report.describe(),
            virtual_size = report.virtual_size,
            disk_size = len,
            data_bytes = s.data_bytes,
            zero_bytes = s.zero_bytes,
            tar_entry = ?report.tar_entry,
            "import complete"
        ),
        None => {
            tracing::info!(format = %report.describe(), bytes = report.virtual_size, "archive import complete")
        }
    }
}
