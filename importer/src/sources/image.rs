//! A containerDisk, wherever it is stored: a registry, an OCI layout (directory or
//! `oci-archive` tar), a `docker save` archive. The import reads layers top first
//! through this one interface.

use ferrydisk_common::progress::Progress;
use std::io::{self, Read};
use std::sync::Arc;

/// What the manifest says of one layer.
#[derive(Debug, Clone, Copy, Default)]
pub struct LayerInfo<'a> {
    pub media_type: &'a str,
    pub digest: Option<&'a str>,
    /// `org.opencontainers.image.title` (what `oras push` names a file).
    pub title: Option<&'a str>,
}

pub trait ContainerImage: Send + Sync {
    /// For logs (`docker://host/repo:tag`, `oci:/dir:tag`).
    fn describe(&self) -> &str;
    /// The image config's `Env` (labels come from here).
    fn env(&self) -> &[String];
    fn layer_count(&self) -> usize;
    /// Stored (compressed) size of layer `idx`, bottom layer 0.
    fn layer_size(&self, idx: usize) -> u64;
    fn layer_info(&self, idx: usize) -> LayerInfo<'_>;
    /// An OCI artifact's type: the manifest's `artifactType`, or its config's media type
    /// when that is not an image config. `None` for a container image.
    fn artifact_type(&self) -> Option<&str>;
    /// Layer `idx`'s stored bytes; reading to the end verifies its digest where the
    /// image format records one.
    fn open_layer(
        &self,
        idx: usize,
        progress: Arc<Progress>,
    ) -> io::Result<Box<dyn Read + Send + '_>>;
    /// The digest of the manifest the reference names (an index for a multi-arch
    /// image), where the source states one.
    fn top_digest(&self) -> Option<&str> {
        None
    }
    /// `os/arch[/variant]` of each entry when the reference names an index.
    fn platforms(&self) -> &[String] {
        &[]
    }
    /// The image config's `Labels`.
    fn config_labels(&self) -> std::collections::BTreeMap<String, String> {
        Default::default()
    }
}

/// KubeVirt's disk layers (VEP 256: `application/vnd.kubevirt.disk.raw+zstd`, ...).
pub const KUBEVIRT_DISK_MEDIA_PREFIX: &str = "application/vnd.kubevirt.disk";

/// Config media types of container images (anything else makes a manifest an artifact).
pub fn is_image_config(media_type: &str) -> bool {
    matches!(
        media_type,
        "application/vnd.oci.image.config.v1+json"
            | "application/vnd.docker.container.image.v1+json"
            | ""
    )
}

/// The layer whose blob *is* the disk (no tar around it), or `None` for a containerDisk
/// (the disk is a file in a tar layer). In order: the layer `want` names by digest
/// (CDI's VEP 395); the one layer with KubeVirt's disk media type; the one non-tar layer
/// of an artifact. Several candidates without `want` is an error listing them.
pub fn disk_blob(image: &dyn ContainerImage, want: Option<&str>) -> Result<Option<usize>, String> {
    let n = image.layer_count();
    let list = |idx: &[usize]| {
        idx.iter()
            .map(|&i| {
                let l = image.layer_info(i);
                format!(
                    "{} ({}{})",
                    l.digest.unwrap_or("?"),
                    l.media_type,
                    l.title.map(|t| format!(", {t}")).unwrap_or_default()
                )
            })
            .collect::<Vec<_>>()
            .join(", ")
    };
    if let Some(d) = want.map(str::trim).filter(|d| !d.is_empty()) {
        return (0..n)
            .find(|&i| image.layer_info(i).digest == Some(d))
            .map(Some)
            .ok_or_else(|| {
                format!(
                    "no layer {d} in {}; it has {}",
                    image.describe(),
                    list(&(0..n).collect::<Vec<_>>())
                )
            });
    }
    let kubevirt: Vec<usize> = (0..n)
        .filter(|&i| {
            image
                .layer_info(i)
                .media_type
                .starts_with(KUBEVIRT_DISK_MEDIA_PREFIX)
        })
        .collect();
    let candidates = if !kubevirt.is_empty() {
        kubevirt
    } else if image.artifact_type().is_some() {
        (0..n)
            .filter(|&i| !image.layer_info(i).media_type.contains("tar"))
            .collect()
    } else {
        return Ok(None);
    };
    match candidates.as_slice() {
        [] => Ok(None),
        [one] => Ok(Some(*one)),
        many => Err(format!(
            "{} holds {} disk blobs: {}; choose one with FERRYDISK_LAYER_DIGEST",
            image.describe(),
            many.len(),
            list(many)
        )),
    }
}
