//! virter's layered qcow2 images: each layer a gzip'd qcow2 backed by the layer below.

use super::errors::process_failure;
use super::layers::{counted, finish_flattened, flatten_one, layer_integrity, open_layer};
use super::open::open_disk;
use super::plan::DiskPlan;
use super::stream::drain;
use crate::failure::Failure;
use crate::sources::image::ContainerImage;
use ferrydisk_common::cdi::termination::TerminationMessage;
use ferrydisk_common::checksum::Sha256Tap;
use ferrydisk_common::error::chain_line;
use ferrydisk_common::pipeline::{PipelineError, Report};
use ferrydisk_common::progress::Progress;
use ferrydisk_common::sniff::Format;
use ferrydisk_common::ErrorKind;
use std::sync::{Arc, Mutex};

/// virter's layer media type: a gzip'd bare qcow2 whose backing file is the layer below
/// it, named `./virter:layer:<diff id of that layer>`.
pub const VIRTER_LAYER: &str = "application/vnd.com.linbit.virter.layer.v1.qcow2.gzip";

pub(super) fn is_virter(image: &dyn ContainerImage) -> bool {
    let n = image.layer_count();
    n > 0 && (0..n).all(|i| image.layer_info(i).media_type == VIRTER_LAYER)
}

/// The diff id a virter backing name stands for: `[./]virter:layer:sha256:<hex>`, a
/// sibling layer of the same image; anything else (a host path) is refused.
pub(super) fn virter_backing(name: &str) -> Option<String> {
    let id = name
        .strip_prefix("./")
        .unwrap_or(name)
        .strip_prefix("virter:layer:")?;
    let hex = id.strip_prefix("sha256:")?;
    (hex.len() == 64 && hex.bytes().all(|b| b.is_ascii_hexdigit())).then(|| id.to_string())
}

/// A layered qcow2 image (virter), flattened top-down: each layer is streamed once
/// (gunzip, qcow2), its decided clusters claimed, lower layers filling only what no
/// layer above decided. Each backing name must be the diff id of the layer below, which
/// is checked over that layer's uncompressed bytes as it streams.
pub(super) fn write_layered(
    plan: &DiskPlan,
    image: &dyn ContainerImage,
    progress: Arc<Progress>,
) -> Result<TerminationMessage, Failure> {
    use ferrydisk_common::checksum::tap_digest;
    use ferrydisk_common::format::qcow2::layers::Stack;
    let refuse = |message: String| Failure::Process {
        kind: ErrorKind::UnsupportedFormat,
        message,
    };
    let n = image.layer_count();
    tracing::info!(image = %image.describe(), layers = n, "a layered qcow2 image (virter): flattening its layers top-down");
    let mut disk = open_disk(plan, progress.clone(), None)?;
    let stack = Arc::new(Stack::default());
    let mut expected: Option<String> = None;
    let mut fetched = 0u64;
    let result = (|| {
        for idx in (0..n).rev() {
            fetched += image.layer_size(idx);
            progress.set_source_total(Some(fetched));
            let mut layer = open_layer(image, idx, &progress)?;
            let hasher = Arc::new(Mutex::new(sha2::Sha256::default()));
            {
                let gz = ferrydisk_common::decode::compression::decompressor(
                    Format::Gzip,
                    &mut layer,
                    layer_integrity(image, idx),
                )
                .map_err(|e| process_failure(PipelineError::Read(e)))?
                .expect("gzip is supported");
                let mut counted = counted(Sha256Tap::new(gz, hasher.clone()), &progress);
                flatten_one(&mut counted, &mut disk, &stack).map_err(|e| Failure::Process {
                    kind: e.kind(),
                    message: format!("layer {idx}: {}", chain_line(&e)),
                })?;
                drain(&mut counted)?;
            }
            // The compressed layer to its end: its digest is checked there.
            drain(&mut layer)?;
            let diff_id = tap_digest(&hasher);
            if let Some(want) = expected.take() {
                if diff_id != want {
                    return Err(refuse(format!(
                        "the layer above layer {idx} names backing layer {want}, but layer {idx} is {diff_id}"
                    )));
                }
            }
            match stack.backing() {
                Some(name) if idx > 0 => {
                    expected = Some(virter_backing(&name).ok_or_else(|| {
                        refuse(format!(
                            "layer {idx} has backing file {name:?}, which is not a layer of this image (virter:layer:sha256:<diff id>); backing files outside the image are refused"
                        ))
                    })?);
                }
                Some(name) => {
                    return Err(refuse(format!(
                        "the bottom layer has backing file {name:?}: there is no layer below it, and backing files outside the image are refused"
                    )))
                }
                None => {
                    if idx > 0 {
                        tracing::info!(layer = idx, "this layer has no backing file: the layers below it are not read");
                    }
                    break;
                }
            }
        }
        Ok(())
    })();
    let report = Report {
        layers: vec![Format::Gzip],
        format: Some(Format::Qcow2),
        ..Default::default()
    };
    finish_flattened(plan, image, disk, &stack, &progress, report, result)
}
