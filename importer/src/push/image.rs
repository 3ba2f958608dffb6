//! The last stage: the small blobs around the layer (a config and a manifest per
//! platform, an index for several platforms or an artifact) and the tag, written last.

use super::error::PushFailure;
use super::kubevirt;
use super::layer::{Layout, Produced};
use super::source::Source;
use super::spool::Origin;
use super::target::Dest;
use crate::config::push::ImageSettings;
use crate::net::registry::Registry;
use crate::net::registry::{OCI_INDEX, OCI_MANIFEST};
use bytes::Bytes;
use ferrydisk_common::checksum::sha256_digest;

const OCI_CONFIG: &str = "application/vnd.oci.image.config.v1+json";

/// The descriptor a tag points at.
pub struct Top {
    pub media_type: &'static str,
    pub digest: String,
    pub size: usize,
}

/// The image's small blobs, each as (digest, bytes): one config and one manifest per
/// platform, and an index when there are several platforms (or an artifact).
pub struct ImageBlobs {
    pub configs: Vec<(String, Bytes)>,
    pub manifests: Vec<(String, Bytes)>,
    pub index: Option<(String, Bytes)>,
}

impl ImageBlobs {
    /// What the tag points at: the index, else the one manifest.
    pub fn top(&self) -> Top {
        match &self.index {
            Some((d, b)) => Top {
                media_type: OCI_INDEX,
                digest: d.clone(),
                size: b.len(),
            },
            None => Top {
                media_type: OCI_MANIFEST,
                digest: self.manifests[0].0.clone(),
                size: self.manifests[0].1.len(),
            },
        }
    }

    pub fn all(&self) -> impl Iterator<Item = &(String, Bytes)> {
        self.configs
            .iter()
            .chain(&self.manifests)
            .chain(self.index.as_ref())
    }
}

/// Once the layer is in: the configs, the manifests (and index), the tag last. Returns
/// the digest the tag points at.
pub async fn publish(
    image: &ImageSettings,
    dest: &Dest,
    reg: &Registry,
    src: &Source,
    pre: &Produced,
) -> Result<String, PushFailure> {
    if image.layer_only {
        // One disk of a VM artifact: its manifest names every disk (`vm.rs`).
        return Ok(String::new());
    }
    let blobs = blobs(image, src, pre);
    for (_, config) in &blobs.configs {
        reg.put_small_blob(config.clone()).await?;
    }
    Ok(match &blobs.index {
        None => {
            let (_, body) = &blobs.manifests[0];
            reg.put_manifest(&dest.tag, OCI_MANIFEST, body.clone())
                .await?
        }
        Some((_, index)) => {
            // The platforms' manifests by digest first, then the index under the tag.
            for (digest, body) in &blobs.manifests {
                reg.put_manifest(digest, OCI_MANIFEST, body.clone()).await?;
            }
            reg.put_manifest(&dest.tag, OCI_INDEX, index.clone())
                .await?
        }
    })
}

/// Builds [`ImageBlobs`] for the platforms `image` names.
pub fn blobs(image: &ImageSettings, src: &Source, pre: &Produced) -> ImageBlobs {
    let mut blobs = ImageBlobs {
        configs: Vec::new(),
        manifests: Vec::new(),
        index: None,
    };
    let mut entries = Vec::new();
    for (arch, variant) in &image.platforms {
        let (config_media, config) = config_blob(image, src, pre, arch, variant.as_deref());
        let config_digest = sha256_digest(&config);
        let manifest = manifest_blob(image, src, pre, config_media, &config_digest, config.len());
        let digest = sha256_digest(&manifest);
        entries.push(index_entry(
            &digest,
            manifest.len(),
            arch,
            variant.as_deref(),
        ));
        blobs.configs.push((config_digest, config));
        blobs.manifests.push((digest, manifest));
    }
    if src.spec.layout == Layout::Artifact {
        let index = kubevirt::index(entries, &kubevirt::created(image.created));
        let index = Bytes::from(serde_json::to_vec(&index).expect("json"));
        blobs.index = Some((sha256_digest(&index), index));
    } else if image.platforms.len() > 1 {
        let index = Bytes::from(
            serde_json::to_vec(&serde_json::json!({
                "schemaVersion": 2,
                "mediaType": OCI_INDEX,
                "manifests": entries,
            }))
            .expect("json"),
        );
        blobs.index = Some((sha256_digest(&index), index));
    }
    blobs
}

/// An index entry for one platform's manifest.
pub fn index_entry(
    digest: &str,
    size: usize,
    arch: &str,
    variant: Option<&str>,
) -> serde_json::Value {
    let mut platform = serde_json::json!({"architecture": arch, "os": "linux"});
    if let Some(v) = variant {
        platform["variant"] = v.into();
    }
    serde_json::json!({
        "mediaType": OCI_MANIFEST,
        "digest": digest,
        "size": size,
        "platform": platform,
    })
}

/// The image config: a container image's for a containerDisk (Deckhouse's labels,
/// the layer's diff_id), KubeVirt's VM object for an artifact.
fn config_blob(
    image: &ImageSettings,
    src: &Source,
    pre: &Produced,
    arch: &str,
    variant: Option<&str>,
) -> (&'static str, Bytes) {
    let (media, config) = match src.spec.layout {
        Layout::ContainerDisk => {
            let mut c = serde_json::json!({
                "architecture": arch,
                "os": "linux",
                "config": {"Labels": labels(&src.origin)},
                "rootfs": {"type": "layers", "diff_ids": [pre.diff_id]},
                "history": [{"created_by": format!("ferrydisk push: disk/{}", src.spec.disk_name)}],
            });
            if let Some(v) = variant {
                c["variant"] = v.into();
            }
            if !image.env.is_empty() {
                c["config"]["Env"] = image.env.clone().into();
            }
            (OCI_CONFIG, c)
        }
        Layout::Artifact => (
            kubevirt::CONFIG_MEDIA_TYPE,
            kubevirt::vm_config(image.vm.as_ref(), &[image.volume_name.as_str()]),
        ),
    };
    (
        media,
        Bytes::from(serde_json::to_vec(&config).expect("json")),
    )
}

/// The OCI image manifest naming the config and the one layer.
fn manifest_blob(
    image: &ImageSettings,
    src: &Source,
    pre: &Produced,
    config_media: &str,
    config_digest: &str,
    config_size: usize,
) -> Bytes {
    let mut layer_desc = serde_json::json!({
        "mediaType": src.media, "digest": pre.digest, "size": pre.size,
    });
    let mut manifest = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": {"mediaType": config_media, "digest": config_digest, "size": config_size},
    });
    if src.spec.layout == Layout::Artifact {
        layer_desc["annotations"] = kubevirt::layer_annotations(
            &image.volume_name,
            src.virtual_size,
            &src.origin.format,
            src.origin.source_size,
        );
        manifest["artifactType"] = serde_json::json!(kubevirt::ARTIFACT_TYPE);
    }
    manifest["layers"] = serde_json::json!([layer_desc]);
    Bytes::from(serde_json::to_vec(&manifest).expect("json"))
}

/// Deckhouse's labels for an image in its registry.
fn labels(o: &Origin) -> serde_json::Value {
    serde_json::json!({
        "source-image-format": o.format,
        "source-image-size": o.source_size.to_string(),
        "source-image-virtual-size": o.virtual_size.to_string(),
    })
}

/// `image` with the source's `KUBEVIRT_IO_` Env entries added, unless `--env` sets the
/// same key.
pub fn with_source_env(image: &ImageSettings, source_env: &[String]) -> ImageSettings {
    let mut image = image.clone();
    for e in source_env {
        let key = e.split_once('=').map_or(e.as_str(), |(k, _)| k);
        if !image
            .env
            .iter()
            .any(|x| x.split_once('=').is_some_and(|(k, _)| k == key))
        {
            image.env.push(e.clone());
        }
    }
    image
}
