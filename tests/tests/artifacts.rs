//! OCI artifacts whose disk is a bare blob, not a tar layer: KubeVirt's VM export
//! (VEP 256: `application/vnd.kubevirt.disk.raw+zstd` layers, an empty config) and
//! CDI's import by digest (VEP 395). Written as OCI layouts by tests/support/mkimage.py,
//! pushed with skopeo to the real `docker-registry` (TLS + htpasswd), imported and
//! compared byte for byte with `qemu-img convert`; a tampered blob fails.

use ferrydisk_tests::registry::{mkimage, Registry};
use ferrydisk_tests::*;
use std::path::Path;
use std::process::Command;

fn zst(src: &Path) -> std::path::PathBuf {
    let out = src.with_extension("raw.zst");
    std::fs::write(
        &out,
        sh(Command::new("zstd").args(["-q", "-c"]).arg(src)).stdout,
    )
    .expect("zst");
    out
}

#[test]
fn kubevirt_disk_artifacts_raw_zstd_and_qcow2_by_digest() {
    let d = tmp();
    let raw = default_fixture(d.path());
    let reference = qemu_reference(&raw, d.path());
    let z = zst(&raw);
    let q = d.path().join("second.qcow2");
    qemu_img(&[
        "convert",
        "-c",
        "-O",
        "qcow2",
        raw.to_str().expect("utf8"),
        q.to_str().expect("utf8"),
    ]);
    let reg = Registry::start(true, Some(("user", "pass")));

    // One raw+zstd disk: found by KubeVirt's media type.
    let layout = d.path().join("one");
    mkimage(
        &layout,
        "v1",
        &serde_json::json!({"images": [{
        "artifactType": "application/vnd.kubevirt.vm.v1",
        "blobs": [{"file": z, "mediaType": "application/vnd.kubevirt.disk.raw+zstd",
                   "annotations": {"org.opencontainers.image.title": "rootdisk"}}]}]}),
    );
    reg.push_layout(&layout, "v1", "vm/export:v1");
    let manifest = reg.raw_manifest("vm/export:v1");
    assert_eq!(
        manifest["layers"][0]["mediaType"],
        "application/vnd.kubevirt.disk.raw+zstd"
    );
    let run = tmp();
    let o = reg.importer(run.path(), "vm/export:v1").run();
    o.assert_success();
    assert_same_bytes(&run.path().join("data/disk.img"), &reference);
    assert!(o.stderr.contains("disk blob"), "{}", o.stderr);

    // Two disks: ambiguous without a digest, the named one with it.
    let layout = d.path().join("two");
    mkimage(
        &layout,
        "v1",
        &serde_json::json!({"images": [{
        "artifactType": "application/vnd.kubevirt.vm.v1",
        "blobs": [{"file": z, "mediaType": "application/vnd.kubevirt.disk.raw+zstd"},
                  {"file": q, "mediaType": "application/vnd.kubevirt.disk.qcow2"}]}]}),
    );
    reg.push_layout(&layout, "v1", "vm/two:v1");
    let digest = reg.raw_manifest("vm/two:v1")["layers"][1]["digest"]
        .as_str()
        .expect("digest")
        .to_string();
    let run = tmp();
    let o = reg.importer(run.path(), "vm/two:v1").run();
    o.assert_failure("FERRYDISK_LAYER_DIGEST");
    let o = reg
        .importer(run.path(), "vm/two:v1")
        .env("FERRYDISK_LAYER_DIGEST", &digest)
        .run();
    o.assert_success();
    assert_same_bytes(&run.path().join("data/disk.img"), &reference);
    let o = reg
        .importer(run.path(), "vm/two:v1")
        .env(
            "FERRYDISK_LAYER_DIGEST",
            &format!("sha256:{}", "0".repeat(64)),
        )
        .run();
    o.assert_failure("no layer matches sha256:0000");
}

#[test]
fn a_generic_single_blob_artifact_and_a_tampered_blob() {
    let d = tmp();
    let raw = default_fixture(d.path());
    let reference = qemu_reference(&raw, d.path());
    let q = qcow2_of(&raw, &d.path().join("disk.qcow2"));
    let reg = Registry::start(true, Some(("user", "pass")));
    // An artifact of some other tool (oras push disk.qcow2): one non-tar layer.
    let layout = d.path().join("generic");
    mkimage(
        &layout,
        "v1",
        &serde_json::json!({"images": [{
        "artifactType": "application/x-qemu-disk",
        "blobs": [{"file": q, "mediaType": "application/octet-stream"}]}]}),
    );
    reg.push_layout(&layout, "v1", "disks/generic:v1");
    let run = tmp();
    reg.importer(run.path(), "disks/generic:v1")
        .run()
        .assert_success();
    assert_same_bytes(&run.path().join("data/disk.img"), &reference);

    // The registry's copy of the blob altered in place (same length): the digest check
    // while streaming fails the import, and the disk is emptied.
    let digest = reg.raw_manifest("disks/generic:v1")["layers"][0]["digest"]
        .as_str()
        .expect("digest")
        .to_string();
    let blob = reg.blob_path(&digest);
    let mut bytes = std::fs::read(&blob).expect("blob");
    let at = bytes.len() / 2;
    bytes[at] ^= 0xff;
    std::fs::write(&blob, &bytes).expect("tamper");
    let run = tmp();
    let o = reg.importer(run.path(), "disks/generic:v1").run();
    o.assert_failure("digest mismatch");
    assert_eq!(
        std::fs::metadata(run.path().join("data/disk.img"))
            .map(|m| m.len())
            .unwrap_or(0),
        0
    );
}

/// Issue 29: a VMExport-style `export.oci.tar` (what `virtctl vmexport download
/// --format=oci` saves), written here from KubeVirt's spec rather than by our push: an
/// OCI layout tarball whose index has the VM manifest, two raw+zstd disks annotated with
/// their volume names. Each disk imports by `io.kubevirt.disk.name`; without a selector
/// the import is refused with both names.
#[test]
fn a_vmexport_oci_tar_imports_disk_by_disk_by_annotation() {
    let d = tmp();
    let root = dense_fixture_named(d.path(), "root.raw", 11);
    let data = dense_fixture_named(d.path(), "data.raw", 12);
    let vm = serde_json::json!({
        "apiVersion": "kubevirt.io/v1", "kind": "VirtualMachine", "metadata": {"name": "vm1"},
        "spec": {"template": {"spec": {"volumes": [
            {"name": "rootdisk", "persistentVolumeClaim": {"claimName": "vm1-root"}},
            {"name": "datadisk", "persistentVolumeClaim": {"claimName": "vm1-data"}}]}}}});
    let blob = |file: &Path, name: &str| {
        serde_json::json!({
            "file": zst(file),
            "mediaType": "application/vnd.kubevirt.disk.raw+zstd",
            "annotations": {
                "io.kubevirt.disk.name": name,
                "io.kubevirt.disk.size": format!("{}Mi", std::fs::metadata(file).expect("size").len() >> 20),
                "org.opencontainers.image.title": format!("{name}.raw.zst"),
            }
        })
    };
    let layout = d.path().join("export");
    mkimage(
        &layout,
        "",
        &serde_json::json!({
            "index": true,
            "artifactType": "application/vnd.kubevirt.virtualmachine.v1",
            "annotations": {"org.opencontainers.image.created": "2026-12-07T12:00:00Z"},
            "images": [{
                "artifactType": "application/vnd.kubevirt.virtualmachine.v1",
                "config": {"mediaType": "application/vnd.kubevirt.virtualmachine.config.v1+json", "data": vm},
                "blobs": [blob(&root, "rootdisk"), blob(&data, "datadisk")],
            }]
        }),
    );
    let tarball = d.path().join("export.oci.tar");
    sh(Command::new("tar")
        .arg("-C")
        .arg(&layout)
        .arg("-cf")
        .arg(&tarball)
        .arg("."));
    let endpoint = format!("oci-archive:{}", tarball.display());
    for (name, want) in [("rootdisk", &root), ("datadisk", &data)] {
        let run = tmp();
        Importer::new(run.path())
            .env("IMPORTER_SOURCE", "registry")
            .env("IMPORTER_ENDPOINT", &endpoint)
            .env(
                "FERRYDISK_LAYER_ANNOTATIONS",
                &format!("io.kubevirt.disk.name={name}"),
            )
            .arg("--metrics-addr")
            .arg("none")
            .run()
            .assert_success();
        assert_same_bytes(&run.path().join("data/disk.img"), want);
    }
    let run = tmp();
    let o = Importer::new(run.path())
        .env("IMPORTER_SOURCE", "registry")
        .env("IMPORTER_ENDPOINT", &endpoint)
        .arg("--metrics-addr")
        .arg("none")
        .run();
    o.assert_failure("io.kubevirt.disk.name=rootdisk");
    assert!(
        o.termination.contains("io.kubevirt.disk.name=datadisk"),
        "{}",
        o.termination
    );
}
