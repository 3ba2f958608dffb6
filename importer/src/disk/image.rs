//! A container image onto the disk: the layer holding `/disk` (top layer first, lower
//! layers never read), an artifact's disk blob, or a chain or stack of layers.

use crate::failure::Failure;
use crate::sources::image::ContainerImage;
use ferrydisk_common::cdi::termination::TerminationMessage;
use ferrydisk_common::decode::containerdisk::{DiskError, DiskFinder};
use ferrydisk_common::decode::gzip::Integrity;
use ferrydisk_common::pipeline::{self, PipelineError};
use ferrydisk_common::progress::Progress;
use ferrydisk_common::ErrorKind;
use std::sync::Arc;

/// The blocking half of a containerDisk import: layers from the top until one holds
/// the disk; lower layers are never read.
pub fn write_image(
    plan: &DiskPlan,
    image: &dyn ContainerImage,
    layer: &crate::sources::image::LayerSelector,
    progress: Arc<Progress>,
) -> Result<TerminationMessage, Failure> {
    if is_virter(image) {
        return write_layered(plan, image, progress);
    }
    let blob = crate::sources::image::disk_blob(image, layer).map_err(|e| Failure::Process {
        kind: ErrorKind::Config,
        message: e.to_string(),
    })?;
    if let Some(idx) = blob {
        return write_blob(plan, image, idx, progress);
    }
    let mut disk = open_disk(plan, progress.clone(), None)?;
    let mut finder = DiskFinder::default();
    let mut fetched = 0u64;
    let result = (|| {
        for idx in (0..image.layer_count()).rev() {
            fetched += image.layer_size(idx);
            progress.set_source_total(Some(fetched));
            let mut layer = open_layer(image, idx, &progress)?;
            disk.opts.integrity = layer_integrity(image, idx);
            let found = match pipeline::write_disk_from_layer(
                &mut layer,
                &mut finder,
                &mut disk.writer,
                &disk.opts,
            ) {
                Err(e) if chain_hint(&e) => return Err(Chain(e.to_string())),
                r => r.map_err(process_failure)?,
            };
            if let Some(report) = found {
                if idx > 0 {
                    tracing::info!(
                        layer = idx,
                        below = idx,
                        "disk found; the layers below it are not downloaded"
                    );
                }
                return Ok(report);
            }
        }
        Err(Single(process_failure(PipelineError::Disk(
            DiskError::None,
        ))))
    })();
    match result {
        Ok(report) => {
            let labels =
                ferrydisk_common::cdi::labels::from_env(image.env().iter().map(String::as_str));
            tracing::info!(image = %image.describe(), labels = ?labels, "image labels");
            finish_disk(plan, disk, &report, Some(labels))
        }
        Err(Single(f)) => {
            disk.writer.abort();
            Err(f)
        }
        Err(Chain(why)) => {
            disk.writer.abort();
            write_chain(plan, image, progress, &why)
        }
    }
}

/// How the one-disk import of a containerDisk ended when it did not succeed.
pub(super) enum Attempt {
    /// A failure to report.
    Single(Failure),
    /// `/disk` may hold an overlay chain (several files, or a qcow2 with a backing
    /// file): read it as one, naming why.
    Chain(String),
}

use super::chain::write_chain;
use super::errors::process_failure;
use super::layered::{is_virter, write_layered};
use super::layers::{layer_integrity, open_layer};
use super::open::{finish_disk, open_disk};
use super::plan::DiskPlan;
use super::stream::write_stream;
use Attempt::{Chain, Single};

impl From<Failure> for Attempt {
    fn from(f: Failure) -> Self {
        Single(f)
    }
}

/// A second file under `/disk`, or a qcow2 disk with a backing file: what a chain of
/// overlays looks like to the one-disk reader.
pub(super) fn chain_hint(e: &PipelineError) -> bool {
    use ferrydisk_common::format::contract::FormatError;
    use ferrydisk_common::format::qcow2::header::Qcow2Error;
    matches!(
        e,
        PipelineError::Disk(DiskError::Several(_))
            | PipelineError::Format(FormatError::Qcow2(Qcow2Error::BackingFile(_)))
    )
}

/// An artifact whose layer blob is the disk itself (raw, qcow2, ..., possibly
/// compressed): streamed through the pipeline like an HTTP body, its digest checked
/// over every byte by the layer reader before the disk is reported.
pub(super) fn write_blob(
    plan: &DiskPlan,
    image: &dyn ContainerImage,
    idx: usize,
    progress: Arc<Progress>,
) -> Result<TerminationMessage, Failure> {
    let info = image.layer_info(idx);
    tracing::info!(
        image = %image.describe(),
        layer = idx,
        digest = info.digest.unwrap_or("?"),
        media_type = info.media_type,
        title = info.title.unwrap_or(""),
        "the disk is a layer's blob (OCI artifact): streaming it as the disk blob"
    );
    let size = image.layer_size(idx);
    progress.set_source_total(Some(size));
    let layer = open_layer(image, idx, &progress)?;
    // The same blocking half as an HTTP body: pipeline, drain (the layer reader checks
    // the digest at its end), checksum, finish or abort.
    let digested = layer_integrity(image, idx) == Integrity::Digest;
    write_stream(plan, layer, Some(size), progress, None, digested)
}
