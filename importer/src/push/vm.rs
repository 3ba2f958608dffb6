//! A whole VM as one KubeVirt VM artifact: `importer push --disk NAME=SOURCE [--disk
//! ...] [--vm VM.json] --dest docker://...`. Each disk goes up as its own raw+zstd layer
//! exactly as a single-disk artifact push sends it (streamed from any import source,
//! no spool where that push needs none, not sent again when the registry has it); then
//! one config (the VM object), one manifest naming every layer with KubeVirt's
//! annotations, and the index under the tag.

use super::error::PushFailure;
use super::image::ImageBlobs;
use super::kubevirt;
use super::summary::Summary;
use crate::config::PushConfig;
use crate::net::registry::{OCI_INDEX, OCI_MANIFEST};
use bytes::Bytes;
use serde_json::json;

/// What a VM push did, printed as one JSON line.
#[derive(Debug, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct VmSummary {
    pub reference: String,
    pub manifest_digest: String,
    pub disks: Vec<DiskSummary>,
}

#[derive(Debug, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct DiskSummary {
    pub name: String,
    pub layer_digest: String,
    pub layer_size: u64,
    pub layer_uploaded: bool,
    pub source_format: String,
    pub virtual_size: u64,
}

pub async fn push(cfg: &PushConfig) -> Result<VmSummary, PushFailure> {
    let Some(dest) = cfg.registry() else {
        let not = super::target::DestError::NotDocker(cfg.dest_shown.clone());
        return Err(crate::config::push::ConfigError::VmNotToRegistry(not).into());
    };
    let list = &cfg.disks;
    let mut pushed: Vec<(String, Summary)> = Vec::new();
    for (name, source) in list {
        tracing::info!(disk = %name, source = %crate::sources::redact::url(source), "pushing a disk of the VM");
        let s = super::push(&cfg.one_disk(name, source), None)
            .await
            .map_err(|e| PushFailure::Disk {
                name: name.clone(),
                source: Box::new(e),
            })?;
        pushed.push((name.clone(), s));
    }
    let blobs = vm_blobs(cfg, &pushed);
    let (config, manifest_digest, manifest, index) = (
        blobs.configs[0].1.clone(),
        blobs.manifests[0].0.clone(),
        blobs.manifests[0].1.clone(),
        blobs.index.map(|(_, b)| b).unwrap_or_default(),
    );
    let reg = super::connect::connect(&cfg.access, cfg.transfer.idle, dest).await?;
    reg.put_small_blob(config).await?;
    reg.put_manifest(&manifest_digest, OCI_MANIFEST, manifest)
        .await?;
    let top = reg.put_manifest(&dest.tag, OCI_INDEX, index).await?;
    let reference = dest.reference();
    tracing::info!(%reference, digest = %top, disks = pushed.len(), "pushed the VM artifact");
    Ok(VmSummary {
        reference,
        manifest_digest: top,
        disks: pushed
            .into_iter()
            .map(|(name, s)| DiskSummary {
                name,
                layer_digest: s.layer_digest,
                layer_size: s.layer_size,
                layer_uploaded: s.layer_uploaded,
                source_format: s.source_format,
                virtual_size: s.virtual_size,
            })
            .collect(),
    })
}

/// The VM's config (the VM object), the manifest naming every disk's layer with
/// KubeVirt's annotations, and the index over it.
fn vm_blobs(cfg: &PushConfig, pushed: &[(String, Summary)]) -> ImageBlobs {
    let names: Vec<&str> = pushed.iter().map(|(n, _)| n.as_str()).collect();
    let config = Bytes::from(
        serde_json::to_vec(&kubevirt::vm_config(cfg.image.vm.as_ref(), &names)).expect("json"),
    );
    let config_digest = ferrydisk_common::checksum::sha256_digest(&config);
    let layers: Vec<serde_json::Value> = pushed
        .iter()
        .map(|(name, s)| {
            json!({
                "mediaType": kubevirt::DISK_MEDIA_TYPE,
                "digest": s.layer_digest,
                "size": s.layer_size,
                "annotations": kubevirt::layer_annotations(name, s.virtual_size, &s.source_format, s.source_size),
            })
        })
        .collect();
    let manifest = Bytes::from(
        serde_json::to_vec(&json!({
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "artifactType": kubevirt::ARTIFACT_TYPE,
            "config": {"mediaType": kubevirt::CONFIG_MEDIA_TYPE, "digest": config_digest, "size": config.len()},
            "layers": layers,
        }))
        .expect("json"),
    );
    let manifest_digest = ferrydisk_common::checksum::sha256_digest(&manifest);
    let entries = cfg
        .image
        .platforms
        .iter()
        .map(|(arch, variant)| {
            super::image::index_entry(&manifest_digest, manifest.len(), arch, variant.as_deref())
        })
        .collect();
    let index = Bytes::from(
        serde_json::to_vec(&kubevirt::index(
            entries,
            &kubevirt::created(cfg.image.created),
        ))
        .expect("json"),
    );
    ImageBlobs {
        configs: vec![(config_digest, config)],
        manifests: vec![(manifest_digest, manifest)],
        index: Some((ferrydisk_common::checksum::sha256_digest(&index), index)),
    }
}
