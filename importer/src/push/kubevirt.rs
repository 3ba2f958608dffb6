//! KubeVirt's VM artifact, exactly as KubeVirt defines it (`pkg/storage/oci/oci.go`,
//! VEP 256; what `virtctl vmexport download --format=oci` writes and CDI's VEP 395
//! imports): an index (`artifactType` as the manifest's, one manifest per architecture,
//! only the `org.opencontainers.image.created` annotation) over a manifest with no
//! annotations, `artifactType` `application/vnd.kubevirt.virtualmachine.v1`, the VM
//! object as its config, and one layer per disk: the raw disk compressed with zstd
//! (`application/vnd.kubevirt.disk.raw+zstd`, never a tar), annotated with the volume's
//! name, its uncompressed size as a Kubernetes BinarySI quantity, and a file title.

use serde_json::{json, Value};
use std::path::{Path, PathBuf};

/// What is wrong with a VM artifact push's settings, found before anything is sent.
#[derive(Debug, thiserror::Error)]
pub enum ArtifactError {
    #[error("volume name {0:?} must be a DNS-1123 label (lower-case letters, digits and '-', at most 63)")]
    VolumeName(String),
    #[error("--layout artifact writes KubeVirt's VM artifact, whose disks are raw+zstd only: drop --convert qcow2")]
    NotRaw,
    #[error("--vm {}: {message}", path.display())]
    Vm { path: PathBuf, message: String },
    #[error("--disk {0:?}: expected NAME=SOURCE")]
    DiskSpec(String),
    #[error("--disk: volume {0:?} named twice")]
    DiskTwice(String),
    #[error("--source and --disk do not go together: name every disk with --disk NAME=SOURCE")]
    SourceAndDisks,
}

pub const ARTIFACT_TYPE: &str = "application/vnd.kubevirt.virtualmachine.v1";
pub const CONFIG_MEDIA_TYPE: &str = "application/vnd.kubevirt.virtualmachine.config.v1+json";
/// The one disk media type KubeVirt keeps (raw+gzip and qcow2 were dropped).
pub const DISK_MEDIA_TYPE: &str = "application/vnd.kubevirt.disk.raw+zstd";
pub const DISK_NAME: &str = "io.kubevirt.disk.name";
pub const DISK_SIZE: &str = "io.kubevirt.disk.size";
pub const TITLE: &str = "org.opencontainers.image.title";
pub const CREATED: &str = "org.opencontainers.image.created";
/// Our own facts, under our own prefix (the spec leaves room on the layer only).
pub const SOURCE_FORMAT: &str = "io.ferrydisk.disk.source-format";
pub const SOURCE_SIZE: &str = "io.ferrydisk.disk.source-size";

/// `bytes` as Kubernetes' `resource.Quantity` writes it in BinarySI form: the largest
/// power-of-1024 suffix that divides it exactly (`10Gi`, `24832Ki`), else plain bytes.
pub fn binary_si(bytes: u64) -> String {
    const SUFFIXES: [&str; 6] = ["Ki", "Mi", "Gi", "Ti", "Pi", "Ei"];
    if bytes == 0 {
        return "0".into();
    }
    let mut value = bytes;
    let mut suffix = "";
    for s in SUFFIXES {
        if !value.is_multiple_of(1024) {
            break;
        }
        value /= 1024;
        suffix = s;
    }
    format!("{value}{suffix}")
}

/// A volume name as a VM names it: a DNS-1123 label (lower-case alphanumerics and '-',
/// at most 63, starting and ending alphanumeric).
pub fn check_volume_name(name: &str) -> Result<(), ArtifactError> {
    let ok = !name.is_empty()
        && name.len() <= 63
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !name.starts_with('-')
        && !name.ends_with('-');
    if ok {
        Ok(())
    } else {
        Err(ArtifactError::VolumeName(name.to_string()))
    }
}

/// The VirtualMachine object `--vm` names, read once, before anything is pushed.
pub fn load_vm(path: &Path) -> Result<Value, ArtifactError> {
    let err = |message: String| ArtifactError::Vm {
        path: path.to_path_buf(),
        message,
    };
    let text = std::fs::read(path).map_err(|e| err(e.to_string()))?;
    let vm: Value = serde_json::from_slice(&text).map_err(|e| err(format!("not JSON: {e}")))?;
    if vm.get("kind").and_then(Value::as_str) != Some("VirtualMachine") {
        return Err(err(format!(
            "not a VirtualMachine object (kind {:?})",
            vm.get("kind")
        )));
    }
    Ok(vm)
}

/// The layer descriptor's annotations for disk `volume` of `size` raw bytes.
pub fn layer_annotations(volume: &str, size: u64, source_format: &str, source_size: u64) -> Value {
    json!({
        DISK_NAME: volume,
        DISK_SIZE: binary_si(size),
        TITLE: format!("{volume}.raw.zst"),
        SOURCE_FORMAT: source_format,
        SOURCE_SIZE: source_size.to_string(),
    })
}

/// The VM object of the config: `vm` (a VirtualMachine as JSON) with what only makes
/// sense in its cluster removed and its DataVolume volumes turned into PVC volumes, as
/// KubeVirt's exporter does; or, without one, the smallest VM that boots `volumes`
/// (the first is the boot disk).
pub fn vm_config(vm: Option<&Value>, volumes: &[&str]) -> Value {
    let Some(vm) = vm else {
        let disks: Vec<Value> = volumes
            .iter()
            .map(|v| json!({"name": v, "disk": {"bus": "virtio"}}))
            .collect();
        let vols: Vec<Value> = volumes
            .iter()
            .map(|v| json!({"name": v, "persistentVolumeClaim": {"claimName": v}}))
            .collect();
        return json!({
            "apiVersion": "kubevirt.io/v1",
            "kind": "VirtualMachine",
            "metadata": {"name": volumes.first().copied().unwrap_or("vm")},
            "spec": {
                "runStrategy": "Halted",
                "template": {"spec": {
                    "domain": {
                        "devices": {"disks": disks},
                        "resources": {"requests": {"memory": "1Gi"}},
                    },
                    "volumes": vols,
                }},
            },
        });
    };
    let mut vm = vm.clone();
    if let Some(meta) = vm.get_mut("metadata").and_then(Value::as_object_mut) {
        for k in [
            "uid",
            "resourceVersion",
            "generation",
            "creationTimestamp",
            "managedFields",
            "selfLink",
            "ownerReferences",
            "finalizers",
            "namespace",
        ] {
            meta.remove(k);
        }
    }
    if let Some(o) = vm.as_object_mut() {
        o.remove("status");
    }
    if let Some(spec) = vm.get_mut("spec").and_then(Value::as_object_mut) {
        spec.remove("dataVolumeTemplates");
    }
    if let Some(volumes) = vm
        .pointer_mut("/spec/template/spec/volumes")
        .and_then(Value::as_array_mut)
    {
        for v in volumes {
            let Some(o) = v.as_object_mut() else { continue };
            if let Some(dv) = o.remove("dataVolume") {
                let claim = dv.get("name").cloned().unwrap_or(Value::Null);
                o.insert(
                    "persistentVolumeClaim".into(),
                    json!({ "claimName": claim }),
                );
            }
        }
    }
    vm
}

/// The index over the artifact's manifests: `artifactType` as theirs, one entry per
/// architecture, only the creation time as an annotation.
pub fn index(entries: Vec<Value>, created: &str) -> Value {
    json!({
        "schemaVersion": 2,
        "mediaType": crate::net::registry::OCI_INDEX,
        "artifactType": ARTIFACT_TYPE,
        "manifests": entries,
        "annotations": {CREATED: created},
    })
}

/// `epoch` (seconds since 1970: `SOURCE_DATE_EPOCH`, so that a build can be
/// reproduced), else now, as RFC 3339 (`2026-12-07T13:20:00Z`).
pub fn created(epoch: Option<u64>) -> String {
    let t = epoch
        .map(|s| std::time::UNIX_EPOCH + std::time::Duration::from_secs(s))
        .unwrap_or_else(std::time::SystemTime::now);
    humantime::format_rfc3339_seconds(t).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_are_binary_si_quantities() {
        assert_eq!(binary_si(10 << 30), "10Gi");
        assert_eq!(binary_si(25_427_968), "24832Ki");
        assert_eq!(binary_si(1 << 20), "1Mi");
        assert_eq!(binary_si(1536 << 20), "1536Mi");
        assert_eq!(binary_si(1000), "1000");
        assert_eq!(binary_si(0), "0");
        assert_eq!(binary_si(1 << 60), "1Ei");
    }

    #[test]
    fn volume_names_are_dns_labels() {
        assert!(check_volume_name("rootdisk").is_ok());
        assert!(check_volume_name("data-1").is_ok());
        assert!(check_volume_name("Root").is_err());
        assert!(check_volume_name("disk.img").is_err());
        assert!(check_volume_name("-x").is_err());
        assert!(check_volume_name("").is_err());
    }

    #[test]
    fn a_vm_loses_its_cluster_fields_and_data_volumes() {
        let vm = json!({
            "apiVersion": "kubevirt.io/v1", "kind": "VirtualMachine",
            "metadata": {"name": "vm1", "namespace": "ns", "uid": "u", "resourceVersion": "7", "labels": {"a": "b"}},
            "spec": {"dataVolumeTemplates": [{}], "template": {"spec": {"volumes": [
                {"name": "rootdisk", "dataVolume": {"name": "vm1-root"}},
                {"name": "cloudinit", "cloudInitNoCloud": {"userData": "x"}},
            ]}}},
            "status": {"ready": true},
        });
        let c = vm_config(Some(&vm), &["rootdisk"]);
        assert_eq!(c["metadata"], json!({"name": "vm1", "labels": {"a": "b"}}));
        assert!(c.get("status").is_none());
        assert!(c["spec"].get("dataVolumeTemplates").is_none());
        assert_eq!(
            c["spec"]["template"]["spec"]["volumes"][0],
            json!({"name": "rootdisk", "persistentVolumeClaim": {"claimName": "vm1-root"}})
        );
        assert_eq!(
            c["spec"]["template"]["spec"]["volumes"][1]["cloudInitNoCloud"]["userData"],
            "x"
        );
    }
}
