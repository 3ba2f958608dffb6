//! A whole VM as one KubeVirt VM artifact: `importer push --disk NAME=SOURCE [--disk
//! ...] [--vm VM.json] --dest docker://...`. Each disk goes up as its own raw+zstd layer
//! exactly as a single-disk artifact push sends it (streamed from any import source,
//! no spool where that push needs none, not sent again when the registry has it); then
//! one config (the VM object), one manifest naming every layer with KubeVirt's
//! annotations, and the index under the tag.

use super::kubevirt::{self, ArtifactError};
use super::layer::Layout;
use super::{connect, parse_dest, push_with, Summary, OCI_INDEX, OCI_MANIFEST};
use crate::cli::PushArgs;
use bytes::Bytes;
use serde_json::json;

/// Why a VM push failed.
#[derive(Debug, thiserror::Error)]
pub enum VmPushError {
    #[error(transparent)]
    Settings(#[from] ArtifactError),
    /// A step shared with the single-disk push (the destination, the platforms).
    #[error("{0}")]
    Push(String),
    #[error("disk {name}: {message}")]
    Disk { name: String, message: String },
    #[error("{}", ferrydisk_common::error::chain_line(.0))]
    Registry(#[from] super::PushError),
}

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

/// `NAME=SOURCE` pairs, names unique DNS labels.
fn disks(args: &PushArgs) -> Result<Vec<(String, String)>, ArtifactError> {
    let mut out: Vec<(String, String)> = Vec::new();
    for d in &args.disks {
        let (name, source) = d
            .split_once('=')
            .filter(|(n, s)| !n.is_empty() && !s.is_empty())
            .ok_or_else(|| ArtifactError::DiskSpec(d.clone()))?;
        kubevirt::check_volume_name(name)?;
        if out.iter().any(|(n, _)| n == name) {
            return Err(ArtifactError::DiskTwice(name.to_string()));
        }
        out.push((name.to_string(), source.to_string()));
    }
    Ok(out)
}

pub async fn push(args: &PushArgs) -> Result<VmSummary, VmPushError> {
    if !args.source.as_os_str().is_empty() {
        return Err(ArtifactError::SourceAndDisks.into());
    }
    let dest = parse_dest(&args.dest).map_err(|e| {
        VmPushError::Push(format!(
            "{e} (a VM artifact with several disks goes to a registry)"
        ))
    })?;
    let list = disks(args)?;
    // Read once, before any disk goes up; each disk's push then carries no `--vm`.
    let vm = args.vm.as_deref().map(kubevirt::load_vm).transpose()?;
    let platforms = super::platforms(&PushArgs {
        layout: Layout::Artifact,
        ..args.clone()
    })
    .map_err(VmPushError::Push)?;
    let mut pushed: Vec<(String, Summary)> = Vec::new();
    for (name, source) in &list {
        let one = PushArgs {
            source: source.into(),
            disks: Vec::new(),
            vm: None,
            vm_object: None,
            volume_name: name.clone(),
            layout: Layout::Artifact,
            layer_only: true,
            ..args.clone()
        };
        tracing::info!(disk = %name, source = %crate::sources::redact::url(source), "pushing a disk of the VM");
        let s = push_with(&one, None)
            .await
            .map_err(|message| VmPushError::Disk {
                name: name.clone(),
                message,
            })?;
        pushed.push((name.clone(), s));
    }
    let names: Vec<&str> = list.iter().map(|(n, _)| n.as_str()).collect();
    let config =
        Bytes::from(serde_json::to_vec(&kubevirt::vm_config(vm.as_ref(), &names)).expect("json"));
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
    let entries = platforms
        .iter()
        .map(|(arch, variant)| {
            super::index_entry(&manifest_digest, manifest.len(), arch, variant.as_deref())
        })
        .collect();
    let index = Bytes::from(
        serde_json::to_vec(&kubevirt::index(entries, &kubevirt::created_now())).expect("json"),
    );
    let reg = connect(args, &dest).await.map_err(VmPushError::Push)?;
    reg.put_small_blob(config).await?;
    reg.put_manifest(&manifest_digest, OCI_MANIFEST, manifest)
        .await?;
    let top = reg.put_manifest(&dest.tag, OCI_INDEX, index).await?;
    let reference = format!("{}/{}:{}", dest.host, dest.repo, dest.tag);
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
