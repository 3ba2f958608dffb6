//! One stream onto the disk (an HTTP body, an upload, a file, an artifact's blob): the
//! pipeline, draining and verifying the source, then finishing or undoing the write.

use super::errors::{checksum_failure, io_fail, process_failure};
use super::open::{finish_disk, log_done, open_disk, pipeline_options};
use super::plan::DiskPlan;
use crate::destination::{fs_available, Destination, FileSpace};
use crate::failure::Failure;
use ferrydisk_common::cdi::termination::TerminationMessage;
use ferrydisk_common::checksum::{HashingReader, Sha256Tap};
use ferrydisk_common::decode::gzip::Integrity;
use ferrydisk_common::decode::tar::Staging;
use ferrydisk_common::pipeline::{self, PipelineError, Report};
use ferrydisk_common::progress::Progress;
use ferrydisk_common::sink::sparse::CopyError;
use ferrydisk_common::sniff::Format;
use ferrydisk_common::ErrorKind;
use std::io::{self, Read};
use std::sync::Arc;

/// Runs part of the write half on a blocking thread (decoders are synchronous and
/// CPU-bound), inside the caller's span so its log lines name the import or upload.
pub async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, Failure> + Send + 'static,
) -> Result<T, Failure> {
    let span = tracing::Span::current();
    tokio::task::spawn_blocking(move || span.in_scope(f))
        .await
        .unwrap_or_else(|e| {
            Err(Failure::Process {
                kind: ErrorKind::Io,
                message: format!("pipeline thread failed: {e}"),
            })
        })
}

/// The blocking half of a stream import or upload: pipeline, drain, checksum, finish.
/// Nothing is fsynced and reported before the whole source has been read and verified.
/// `file` is the same source as a local file, which lets formats read data that precedes
/// its tables again instead of holding it. `digested`: the source checks a digest over
/// every byte at its end (an artifact's blob).
pub fn write_stream(
    plan: &DiskPlan,
    source: impl Read,
    content_length: Option<u64>,
    progress: Arc<Progress>,
    file: Option<Arc<std::fs::File>>,
    digested: bool,
) -> Result<TerminationMessage, Failure> {
    let source: Box<dyn Read> = match plan.output.inspected() {
        Some(found) => {
            found
                .hashed
                .store(true, std::sync::atomic::Ordering::Relaxed);
            Box::new(Sha256Tap::new(source, found.source_sha256.clone()))
        }
        None => Box::new(source),
    };
    let mut src = HashingReader::new(source, plan.checksum.clone());
    if let Destination::Dir(dir) = &plan.dest {
        let mut opts = pipeline_options(plan, progress, content_length);
        opts.limit = FileSpace::new(
            fs_available(dir).map_err(|e| io_fail(format!("statfs {}", dir.display()), e))?,
            plan.requested,
            plan.overhead,
        )
        .available;
        let staging = Staging::create(dir).map_err(|e| {
            io_fail(
                format!("creating a staging directory in {}", dir.display()),
                e,
            )
        })?;
        let result = pipeline::unpack_archive(&mut src, staging.path(), &opts)
            .map_err(process_failure)
            .and_then(|report| {
                drain(&mut src)?;
                src.verify().map_err(checksum_failure)?;
                Ok(report)
            });
        let report = match result {
            Ok(r) => r,
            Err(f) => {
                staging.discard();
                return Err(f);
            }
        };
        staging.commit().map_err(|e| {
            io_fail(
                format!("moving the unpacked archive into {}", dir.display()),
                e,
            )
        })?;
        log_done(&report, None);
        return Ok(TerminationMessage::import_complete(false, None));
    }
    let mut disk = open_disk(plan, progress, content_length)?;
    disk.opts.source_file = file;
    if digested {
        disk.opts.integrity = Integrity::Digest;
    }
    let result = pipeline::write_disk(&mut src, &mut disk.writer, &disk.opts)
        .map_err(process_failure)
        .and_then(|r| {
            drain(&mut src)?;
            src.verify().map_err(checksum_failure)?;
            Ok(r)
        });
    match result {
        Ok(report) => finish_disk(plan, disk, &report, None),
        Err(f) => {
            disk.writer.abort();
            Err(f)
        }
    }
}

/// A raw byte stream written as it is, with no format detection (a block-device clone
/// carries the device's bytes, whatever they look like): the sinks' zero and size rules
/// apply, and a file destination is exactly as long as the stream.
pub fn write_raw(
    plan: &DiskPlan,
    source: &mut dyn Read,
    progress: Arc<Progress>,
) -> Result<TerminationMessage, Failure> {
    let mut disk = open_disk(plan, progress.clone(), None)?;
    let counted = {
        let p = progress.clone();
        move |n| p.add_decoded(n)
    };
    let mut counting = ferrydisk_common::stream::CountingReader::new(source, counted);
    let result = disk
        .writer
        .copy_from(&mut counting)
        .map_err(|e| match e {
            CopyError::Read(e) => process_failure(PipelineError::Read(e)),
            CopyError::Sink(e) => process_failure(PipelineError::Sink(e)),
        })
        .and_then(|n| {
            drain(&mut counting)?;
            Ok(n)
        });
    match result {
        Ok(n) => {
            let report = Report {
                format: Some(Format::Raw),
                virtual_size: n,
                kept_len: Some(n),
                ..Default::default()
            };
            finish_disk(plan, disk, &report, None)
        }
        Err(f) => {
            disk.writer.abort();
            Err(f)
        }
    }
}

/// Reads whatever follows the image in the source (tar padding, trailing bytes), so a
/// short body or a checksum covers the whole download.
pub(super) fn drain(src: &mut dyn Read) -> Result<(), Failure> {
    io::copy(src, &mut io::sink())
        .map(|_| ())
        .map_err(|e| process_failure(PipelineError::Read(e)))
}
