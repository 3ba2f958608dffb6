//! An image's layers read for the disk, and stacks of qcow2 layers flattened top-down
//! through the cluster-claim bitmap (shared by overlay chains and virter images).

use super::open::{finish_disk, Disk};
use super::plan::DiskPlan;
use crate::failure::Failure;
use crate::sources::image::ContainerImage;
use ferrydisk_common::cdi::termination::TerminationMessage;
use ferrydisk_common::decode::gzip::Integrity;
use ferrydisk_common::pipeline::Report;
use ferrydisk_common::progress::Progress;
use ferrydisk_common::ErrorKind;
use std::io::Read;
use std::sync::Arc;

/// Layer `idx`'s stored bytes, its digest checked at its end; a failure names the layer.
pub(super) fn open_layer<'a>(
    image: &'a dyn ContainerImage,
    idx: usize,
    progress: &Arc<Progress>,
) -> Result<Box<dyn Read + Send + 'a>, Failure> {
    image
        .open_layer(idx, progress.clone())
        .map_err(|e| Failure::Process {
            kind: ferrydisk_common::error::io_kind(&e).unwrap_or(ErrorKind::Io),
            message: format!("opening layer {idx} of {}: {e}", image.describe()),
        })
}

/// What vouches for layer `idx`'s bytes: its digest, checked when the layer reader
/// reaches its end, where the image records one (a docker-archive may not).
pub(super) fn layer_integrity(image: &dyn ContainerImage, idx: usize) -> Integrity {
    match image.layer_info(idx).digest {
        Some(_) => Integrity::Digest,
        None => Integrity::Crc,
    }
}

/// One layer of a stack (a virter layer, a file of a `/disk` chain) converted into the
/// disk through the claim bitmap: only clusters no layer above decided are written.
pub(super) fn flatten_one(
    r: &mut dyn Read,
    disk: &mut Disk,
    stack: &Arc<ferrydisk_common::format::qcow2::layers::Stack>,
) -> Result<(), ferrydisk_common::format::contract::FormatError> {
    let sopts = ferrydisk_common::format::contract::StreamOptions {
        limit: disk.opts.limit,
        scratch: disk.opts.scratch.clone(),
        layers: Some(stack.clone()),
        ..Default::default()
    };
    ferrydisk_common::format::qcow2::convert(r, &mut disk.writer, &sopts).map(|_| ())
}

/// `r`, its bytes counted as decoded image bytes.
pub(super) fn counted<'a>(r: impl Read + 'a, progress: &Arc<Progress>) -> impl Read + 'a {
    let p = progress.clone();
    ferrydisk_common::stream::CountingReader::new(r, move |n| p.add_decoded(n))
}

/// After a stack was flattened (`result`): the disk finished with the top layer's
/// virtual size and the image's labels, or emptied.
pub(super) fn finish_flattened(
    plan: &DiskPlan,
    image: &dyn ContainerImage,
    disk: Disk,
    stack: &ferrydisk_common::format::qcow2::layers::Stack,
    progress: &Progress,
    mut report: Report,
    result: Result<(), Failure>,
) -> Result<TerminationMessage, Failure> {
    if let Err(f) = result {
        disk.writer.abort();
        return Err(f);
    }
    report.virtual_size = stack.virtual_size();
    progress.set_virtual_total(Some(report.virtual_size));
    tracing::info!(
        layers = stack.layers(),
        virtual_size = report.virtual_size,
        "flattened the layered image"
    );
    let labels = ferrydisk_common::cdi::labels::from_env(image.env().iter().map(String::as_str));
    finish_disk(plan, disk, &report, Some(labels))
}
