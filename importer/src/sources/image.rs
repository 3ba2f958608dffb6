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
    /// The layer descriptor's annotations (KubeVirt's `io.kubevirt.disk.name`, ...).
    pub annotations: Option<&'a std::collections::BTreeMap<String, String>>,
}

/// KubeVirt's annotation naming the volume a disk layer belongs to (VEP 256).
pub const DISK_NAME: &str = "io.kubevirt.disk.name";

/// A layer selector that cannot be read.
#[derive(Debug, thiserror::Error)]
#[error("layer annotation {0:?}: expected KEY=VALUE (e.g. io.kubevirt.disk.name=rootdisk)")]
pub struct LayerSelectorError(String);

/// Which layer of an artifact is the disk, as CDI's VEP 395 lets a DataVolume say: by
/// digest, or by annotations that must all match (`matchAnnotations`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LayerSelector {
    pub digest: Option<String>,
    pub annotations: Vec<(String, String)>,
}

impl LayerSelector {
    /// From `--layer-digest` and `--layer-annotation KEY=VALUE` (each also from env).
    pub fn parse(digest: Option<&str>, annotations: &[String]) -> Result<Self, LayerSelectorError> {
        let annotations = annotations
            .iter()
            .map(|a| a.trim())
            .filter(|a| !a.is_empty())
            .map(|a| {
                a.split_once('=')
                    .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
                    .filter(|(k, _)| !k.is_empty())
                    .ok_or_else(|| LayerSelectorError(a.to_string()))
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(LayerSelector {
            digest: digest
                .map(str::trim)
                .filter(|d| !d.is_empty())
                .map(String::from),
            annotations,
        })
    }

    fn matches(&self, l: &LayerInfo<'_>) -> bool {
        self.digest.as_deref().is_none_or(|d| l.digest == Some(d))
            && self.annotations.iter().all(|(k, v)| {
                l.annotations
                    .and_then(|a| a.get(k))
                    .is_some_and(|have| have == v)
            })
    }

    fn is_empty(&self) -> bool {
        self.digest.is_none() && self.annotations.is_empty()
    }

    fn describe(&self) -> String {
        let mut parts: Vec<String> = self.digest.iter().cloned().collect();
        parts.extend(self.annotations.iter().map(|(k, v)| format!("{k}={v}")));
        parts.join(", ")
    }
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

/// Why no one layer of an artifact is the disk.
#[derive(Debug, thiserror::Error)]
pub enum BlobChoiceError {
    #[error("no layer matches {selector} in {image}; it has {layers}")]
    NoMatch {
        selector: String,
        image: String,
        layers: String,
    },
    #[error("{count} layers match {selector} in {image}: {layers}; add a selector")]
    SeveralMatch {
        count: usize,
        selector: String,
        image: String,
        layers: String,
    },
    #[error("{image} holds {count} disk blobs: {layers}; choose one with FERRYDISK_LAYER_ANNOTATIONS (io.kubevirt.disk.name=NAME) or FERRYDISK_LAYER_DIGEST")]
    Several {
        image: String,
        count: usize,
        layers: String,
    },
}

/// The layer whose blob *is* the disk (no tar around it), or `None` for a containerDisk
/// (the disk is a file in a tar layer). In order: the one layer `want` selects by digest
/// and annotations (CDI's VEP 395); the one layer with KubeVirt's disk media type; the
/// one non-tar layer of an artifact. Several candidates without a selector is an error
/// listing them (by KubeVirt's disk names where the layers carry them).
pub fn disk_blob(
    image: &dyn ContainerImage,
    want: &LayerSelector,
) -> Result<Option<usize>, BlobChoiceError> {
    let n = image.layer_count();
    let list = |idx: &[usize]| {
        idx.iter()
            .map(|&i| {
                let l = image.layer_info(i);
                let name = l
                    .annotations
                    .and_then(|a| a.get(DISK_NAME))
                    .map(|n| format!(", {DISK_NAME}={n}"))
                    .unwrap_or_default();
                format!(
                    "{} ({}{}{name})",
                    l.digest.unwrap_or("?"),
                    l.media_type,
                    l.title.map(|t| format!(", {t}")).unwrap_or_default()
                )
            })
            .collect::<Vec<_>>()
            .join(", ")
    };
    if !want.is_empty() {
        let found: Vec<usize> = (0..n)
            .filter(|&i| want.matches(&image.layer_info(i)))
            .collect();
        return match found.as_slice() {
            [one] => Ok(Some(*one)),
            [] => Err(BlobChoiceError::NoMatch {
                selector: want.describe(),
                image: image.describe().to_string(),
                layers: list(&(0..n).collect::<Vec<_>>()),
            }),
            many => Err(BlobChoiceError::SeveralMatch {
                count: many.len(),
                selector: want.describe(),
                image: image.describe().to_string(),
                layers: list(many),
            }),
        };
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
        many => Err(BlobChoiceError::Several {
            image: image.describe().to_string(),
            count: many.len(),
            layers: list(many),
        }),
    }
}
