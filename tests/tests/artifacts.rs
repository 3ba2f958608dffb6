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
    o.assert_failure("no layer sha256:0000");
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
