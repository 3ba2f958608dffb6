//! A raw upload continued after the upload server restarted: the disk's first `start`
//! bytes stay (a writer checkpoint fsynced them), what was written after them is cut
//! off, and the stream goes on at `start` as if it had never stopped.

use super::errors::{io_fail, process_failure};
use super::open::{finish_disk, pipeline_options, Disk};
use super::plan::{DiskPlan, Output};
use crate::destination::{fs_available, Destination, FileSpace};
use crate::failure::Failure;
use ferrydisk_common::cdi::termination::TerminationMessage;
use ferrydisk_common::format::vhd::FooterStrip;
use ferrydisk_common::pipeline::{PipelineError, Report};
use ferrydisk_common::progress::Progress;
use ferrydisk_common::sink::sparse::{CopyError, WriterOptions};
use ferrydisk_common::sink::{FileTarget, SparseWriter};
use ferrydisk_common::sniff::Format;
use ferrydisk_common::stream::CountingReader;
use std::io::Read;
use std::sync::Arc;

/// Whether a plan's disk can be continued after a restart: a raw image file (a block
/// device keeps no state file; a qcow2 output is not written in order).
pub fn resumable_after_restart(plan: &DiskPlan) -> bool {
    matches!(
        (&plan.output, &plan.dest),
        (Output::Volume, Destination::File(_))
    ) && !plan.qcow2_out
}

/// Writes `source` (the raw image's bytes from `start` on) at `start` of the disk file,
/// then finishes the disk as any upload does. A failure empties the disk.
pub fn write_raw_resumed(
    plan: &DiskPlan,
    source: &mut dyn Read,
    start: u64,
    progress: Arc<Progress>,
) -> Result<TerminationMessage, Failure> {
    let Destination::File(path) = &plan.dest else {
        return Err(Failure::Config(
            "only a disk image file can be resumed after a restart".into(),
        ));
    };
    let cut = std::fs::OpenOptions::new()
        .write(true)
        .open(path)
        .and_then(|f| f.set_len(start));
    cut.map_err(|e| io_fail(format!("cutting {} at byte {start}", path.display()), e))?;
    let target = FileTarget::open_existing(path)
        .map_err(|e| io_fail(format!("opening {}", path.display()), e))?;
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(std::path::Path::new("."));
    let avail = fs_available(dir).map_err(|e| io_fail(format!("statfs {}", dir.display()), e))?;
    // The bytes kept count as room the image has, as they would in a fresh upload.
    let space = FileSpace::new(avail.saturating_add(start), plan.requested, plan.overhead);
    let mut writer = SparseWriter::spawn(
        Box::new(target),
        WriterOptions {
            limit: space.available,
            progress: Some(progress.clone()),
            ..Default::default()
        },
    );
    writer.start_at(start);
    let mut disk = Disk {
        writer,
        opts: pipeline_options(plan, progress.clone(), None),
        space: Some(space),
    };
    let result = {
        let p = progress.clone();
        let mut counted = CountingReader::new(source, move |n| p.add_decoded(n));
        let mut strip = FooterStrip::new(&mut counted);
        let copied = disk.writer.copy_from(&mut strip).map_err(|e| match e {
            CopyError::Read(e) => process_failure(PipelineError::Read(e)),
            CopyError::Sink(e) => process_failure(PipelineError::Sink(e)),
        });
        copied.map(|_| match strip.footer() {
            Some(f) => (Format::Vpc, f.virtual_size),
            None => (Format::Raw, disk.writer.position()),
        })
    };
    match result {
        Ok((format, virtual_size)) => {
            let report = Report {
                format: Some(format),
                virtual_size,
                ..Default::default()
            };
            finish_disk(plan, disk, &report, None)
        }
        Err(f) => {
            disk.writer.abort();
            // An existing target keeps its bytes on abort; a failed upload leaves
            // nothing that could pass for a disk.
            let _ = std::fs::OpenOptions::new()
                .write(true)
                .open(path)
                .and_then(|f| f.set_len(0));
            Err(f)
        }
    }
}
