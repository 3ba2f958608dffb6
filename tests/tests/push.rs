//! `importer push` against the real `docker-registry` (TLS + htpasswd), checked with the
//! tools registry users have: `skopeo inspect` (labels, media types), `skopeo copy` +
//! `umoci unpack` (the disk file and its owner), our registry import and CDI's real
//! importer (`../shared/cdi-peer`), compared byte for byte with `qemu-img convert`. A
//! second push of the same disk sends no blob data (counted in the registry's access log).

use ferrydisk_tests::clone::{cdi_peer, pod_run};
use ferrydisk_tests::registry::Registry;
use ferrydisk_tests::*;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn push(reg: &Registry, source: &Path, repo_tag: &str, extra: &[&str]) -> Output {
    push_as(("user", "pass"), reg, source, repo_tag, extra)
}

fn push_as(
    (user, pass): (&str, &str),
    reg: &Registry,
    source: &Path,
    repo_tag: &str,
    extra: &[&str],
) -> Output {
    let mut c = Command::new(bin("importer"));
    c.env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("IMPORTER_ACCESS_KEY_ID", user)
        .env("IMPORTER_SECRET_KEY", pass)
        .arg("push")
        .arg("--source")
        .arg(source)
        .arg("--dest")
        .arg(reg.image(repo_tag))
        .arg("--cert-dir")
        .arg(reg.ca_dir.as_ref().expect("tls"))
        .args(extra);
    c.output().expect("run importer push")
}

fn pushed(reg: &Registry, source: &Path, repo_tag: &str, extra: &[&str]) -> serde_json::Value {
    pushed_as(("user", "pass"), reg, source, repo_tag, extra)
}

fn pushed_as(
    creds: (&str, &str),
    reg: &Registry,
    source: &Path,
    repo_tag: &str,
    extra: &[&str],
) -> serde_json::Value {
    let out = push_as(creds, reg, source, repo_tag, extra);
    assert!(
        out.status.success(),
        "push failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("summary json")
}

/// Blob upload requests (PATCHes, and the PUTs that commit them), from the registry's
/// access log.
fn blob_writes(reg: &Registry) -> usize {
    std::fs::read_to_string(&reg.log)
        .unwrap_or_default()
        .lines()
        .filter(|l| {
            (l.contains("\"PATCH /v2/") && l.contains("/blobs/uploads/"))
                || (l.contains("\"PUT /v2/") && l.contains("/blobs/uploads/"))
        })
        .count()
}

/// PATCH requests in the registry's access log: the layer data sent (a small config
/// blob goes up in one PUT).
fn patches(reg: &Registry) -> usize {
    std::fs::read_to_string(&reg.log)
        .unwrap_or_default()
        .lines()
        .filter(|l| l.contains("\"PATCH /v2/"))
        .count()
}

/// Imports `repo_tag` with our importer into `dir` and checks the disk is `want`.
fn imports_equal(reg: &Registry, repo_tag: &str, dir: &Path, want: &Path) {
    reg.importer(dir, repo_tag).run().assert_success();
    assert_same_bytes(&dir.join("data/disk.img"), want);
}

/// `skopeo inspect` of `repo_tag` in `reg` (config labels, Env, architecture).
fn skopeo_inspect(reg: &Registry, repo_tag: &str) -> serde_json::Value {
    let out = sh(Command::new("skopeo")
        .args(["inspect", "--tls-verify=false", "--creds", "user:pass"])
        .arg(reg.image(repo_tag)));
    serde_json::from_slice(&out.stdout).expect("inspect")
}

/// `skopeo copy` of `repo_tag` into an OCI layout under `dir`, then `umoci unpack`;
/// returns the bundle's root filesystem.
fn unpacked(reg: &Registry, repo_tag: &str, dir: &Path) -> std::path::PathBuf {
    let layout = dir.join("layout");
    sh(Command::new("skopeo")
        .args([
            "copy",
            "-q",
            "--src-tls-verify=false",
            "--src-creds",
            "user:pass",
        ])
        .arg(reg.image(repo_tag))
        .arg(format!("oci:{}:unpacked", layout.display())));
    let bundle = dir.join("bundle");
    sh(Command::new("umoci")
        .args(["unpack", "--image"])
        .arg(format!("{}:unpacked", layout.display()))
        .arg(&bundle));
    bundle.join("rootfs")
}

/// The image manifest a tag names: itself, or an index's first entry (an artifact's
/// index has one per architecture).
fn image_manifest(reg: &Registry, repo_tag: &str) -> serde_json::Value {
    let top = reg.raw_manifest(repo_tag);
    match top["manifests"][0]["digest"].as_str() {
        Some(d) => {
            let repo = repo_tag.split(':').next().expect("repo");
            reg.raw_manifest(&format!("{repo}@{d}"))
        }
        None => top,
    }
}

/// Checks what a tag holds against KubeVirt's VM artifact (kubevirt
/// `pkg/storage/oci/oci.go`) field by field: an index with the VM `artifactType`, one
/// linux/amd64 manifest and only the `created` annotation (RFC 3339); a manifest with
/// no annotations, the same `artifactType` and the VM config media type. Returns the
/// manifest and its config (the VM object).
fn kubevirt_vm_artifact(reg: &Registry, repo_tag: &str) -> (serde_json::Value, serde_json::Value) {
    const VM: &str = "application/vnd.kubevirt.virtualmachine.v1";
    let index = reg.raw_manifest(repo_tag);
    assert_eq!(
        index["mediaType"],
        "application/vnd.oci.image.index.v1+json"
    );
    assert_eq!(index["artifactType"], VM);
    let annotations = index["annotations"].as_object().expect("annotations");
    assert_eq!(annotations.len(), 1, "{index}");
    let created = annotations["org.opencontainers.image.created"]
        .as_str()
        .expect("created");
    assert!(created.len() == 20 && created.ends_with('Z'), "{created}");
    let entries = index["manifests"].as_array().expect("manifests");
    assert_eq!(entries.len(), 1);
    assert_eq!(
        entries[0]["platform"],
        serde_json::json!({"architecture": "amd64", "os": "linux"})
    );
    let m = image_manifest(reg, repo_tag);
    assert!(m.get("annotations").is_none(), "{m}");
    assert_eq!(m["artifactType"], VM);
    assert_eq!(
        m["config"]["mediaType"],
        "application/vnd.kubevirt.virtualmachine.config.v1+json"
    );
    let config = serde_json::from_slice(
        &std::fs::read(reg.blob_path(m["config"]["digest"].as_str().expect("config")))
            .expect("config blob"),
    )
    .expect("config json");
    (m, config)
}

/// Issue 29 (5): a tar layer a strict reader accepts, ending with the tar
/// end-of-archive marker (two zero blocks), as containerd v2 and KubeVirt's ImageVolume
/// need (Deckhouse marks such layers `erofs-compatible-layers`): Python's `tarfile` with
/// errors raised reads every member, and the last 1024 bytes are zero.
fn assert_strict_tar(blob: &Path, want: &[&str]) {
    let o = sh(Command::new("python3")
        .arg("-c")
        .arg(
            "import sys, tarfile\n\
         t = tarfile.open(sys.argv[1], mode='r:', errorlevel=2)\n\
         names = [m.name for m in t.getmembers()]\n\
         d = open(sys.argv[1], 'rb')\n\
         d.seek(-1024, 2)\n\
         assert d.read() == bytes(1024), 'no end-of-archive marker'\n\
         print(','.join(names))",
        )
        .arg(blob));
    let names = String::from_utf8_lossy(&o.stdout).trim().to_string();
    assert_eq!(names, want.join(","), "{}", blob.display());
}

/// CDI's real importer (`../shared/cdi-peer`, via `pod-run`) imports a 64 MiB
/// containerDisk from the registry into `work`; returns the disk it wrote.
fn cdi_import(reg: &Registry, repo_tag: &str, work: &Path) -> std::path::PathBuf {
    std::fs::create_dir_all(work).expect("mkdir");
    let o = Command::new(pod_run())
        .arg(work)
        .arg(cdi_peer().join("cdi-importer"))
        .arg("-v=1")
        .env("POD_NET", "host")
        .env("IMPORTER_SOURCE", "registry")
        .env("IMPORTER_ENDPOINT", reg.image(repo_tag))
        .env("IMPORTER_ACCESS_KEY_ID", "user")
        .env("IMPORTER_SECRET_KEY", "pass")
        .env("INSECURE_TLS", "true")
        .env("IMPORTER_CONTENTTYPE", "kubevirt")
        .env("IMPORTER_IMAGE_SIZE", "64Mi")
        .env("FILESYSTEM_OVERHEAD", "0")
        .env("PREALLOCATION", "false")
        .env("OWNER_UID", "push-test")
        .output()
        .expect("pod-run");
    let rc = std::fs::read_to_string(work.join("rc")).unwrap_or_default();
    assert_eq!(
        rc.trim(),
        "0",
        "CDI importer: {} {}",
        std::fs::read_to_string(work.join("termination-log")).unwrap_or_default(),
        String::from_utf8_lossy(&o.stderr)
    );
    work.join("data/disk.img")
}

#[test]
fn containerdisk_push_round_trips_through_skopeo_umoci_and_both_importers() {
    let d = tmp();
    let raw = default_fixture(d.path());
    let reference = qemu_reference(&raw, d.path());
    let q = qcow2_of(&raw, &d.path().join("fedora.qcow2"));
    let reg = Registry::start(true, Some(("user", "pass")));
    let s = pushed(
        &reg,
        &q,
        "disks/fedora:41",
        &["--disk-name", "fedora.qcow2"],
    );
    let qlen = std::fs::metadata(&q).expect("meta").len();
    assert_eq!(s["format"], "qcow2");
    assert_eq!(s["virtualSize"], 64 << 20);
    assert_eq!(s["sourceSize"], qlen);
    assert_eq!(s["layerUploaded"], true);

    // What skopeo sees: an OCI manifest with one tar layer, Deckhouse's labels.
    let m = reg.raw_manifest("disks/fedora:41");
    assert_eq!(m["mediaType"], "application/vnd.oci.image.manifest.v1+json");
    assert_eq!(
        m["layers"][0]["mediaType"],
        "application/vnd.oci.image.layer.v1.tar"
    );
    assert_eq!(m["layers"][0]["digest"], s["layerDigest"]);
    assert_strict_tar(
        &reg.blob_path(s["layerDigest"].as_str().expect("digest")),
        &["disk", "disk/fedora.qcow2"],
    );
    let info = skopeo_inspect(&reg, "disks/fedora:41");
    assert_eq!(info["Labels"]["source-image-format"], "qcow2");
    assert_eq!(
        info["Labels"]["source-image-virtual-size"],
        (64u64 << 20).to_string()
    );
    assert_eq!(info["Labels"]["source-image-size"], qlen.to_string());
    assert_eq!(info["Architecture"], "amd64");

    // skopeo copy + umoci unpack: disk/fedora.qcow2, owned by 107:107, mode 0644, the
    // pushed file's bytes.
    let rootfs = unpacked(&reg, "disks/fedora:41", d.path());
    let disk = rootfs.join("disk/fedora.qcow2");
    {
        use std::os::unix::fs::MetadataExt;
        let meta = std::fs::metadata(&disk).expect("unpacked disk");
        assert_eq!(
            (meta.uid(), meta.gid(), meta.mode() & 0o777),
            (107, 107, 0o644)
        );
    }
    assert_same_bytes(&disk, &q);

    // Our registry import converts it to exactly qemu-img's raw.
    imports_equal(&reg, "disks/fedora:41", &d.path().join("ours"), &reference);

    // CDI's real importer takes the same containerDisk.
    let work = d.path().join("cdi");
    assert_same_bytes(&cdi_import(&reg, "disks/fedora:41", &work), &reference);

    // A second push of the same disk sends no blob: the layer is found by HEAD, the
    // config too, and only the manifest is PUT again.
    let before = blob_writes(&reg);
    assert!(before >= 2, "the first push wrote blobs ({before})");
    let again = pushed(
        &reg,
        &q,
        "disks/fedora:41",
        &["--disk-name", "fedora.qcow2"],
    );
    assert_eq!(again["layerUploaded"], false);
    assert_eq!(again["manifestDigest"], s["manifestDigest"]);
    assert_eq!(blob_writes(&reg), before, "a second push wrote blob data");
}

/// Issue 29: `--layout artifact` writes KubeVirt's VM artifact exactly (kubevirt
/// `pkg/storage/oci/oci.go`, VEP 256), checked field by field with `skopeo inspect
/// --raw`; the disk imports back byte-equal by annotation and by digest.
#[test]
fn artifact_push_is_kubevirts_vm_artifact_field_by_field() {
    let d = tmp();
    // A sparse raw volume: its holes are not read, and come back as zeros.
    let raw = default_fixture(d.path());
    let reference = qemu_reference(&raw, d.path());
    let reg = Registry::start(true, Some(("user", "pass")));
    let s = pushed(
        &reg,
        &raw,
        "vms/exported:1",
        &["--layout", "artifact", "--volume-name", "rootdisk"],
    );
    assert_eq!(
        s["layerMediaType"],
        "application/vnd.kubevirt.disk.raw+zstd"
    );
    let (m, config) = kubevirt_vm_artifact(&reg, "vms/exported:1");
    assert_eq!(config["kind"], "VirtualMachine");
    assert_eq!(
        config["spec"]["template"]["spec"]["volumes"][0]["persistentVolumeClaim"]["claimName"],
        "rootdisk"
    );
    // One layer: the zstd'd raw disk itself, KubeVirt's annotations.
    let layers = m["layers"].as_array().expect("layers");
    assert_eq!(layers.len(), 1);
    let layer = &layers[0];
    assert_eq!(layer["mediaType"], "application/vnd.kubevirt.disk.raw+zstd");
    assert_eq!(layer["annotations"]["io.kubevirt.disk.name"], "rootdisk");
    assert_eq!(layer["annotations"]["io.kubevirt.disk.size"], "64Mi");
    assert_eq!(
        layer["annotations"]["org.opencontainers.image.title"],
        "rootdisk.raw.zst"
    );
    let blob = reg.blob_path(layer["digest"].as_str().expect("digest"));
    let stored = std::fs::metadata(&blob).expect("blob").len();
    assert!(
        stored < 1 << 20,
        "{stored} bytes: the zstd of a sparse volume"
    );
    let plain = d.path().join("blob.raw");
    sh(Command::new("zstd")
        .args(["-q", "-d", "-o"])
        .arg(&plain)
        .arg(&blob));
    assert_same_bytes(&plain, &reference);
    // Imported back by annotation, and by digest.
    let run = d.path().join("by-annotation");
    reg.importer(&run, "vms/exported:1")
        .env(
            "FERRYDISK_LAYER_ANNOTATIONS",
            "io.kubevirt.disk.name=rootdisk",
        )
        .run()
        .assert_success();
    assert_same_bytes(&run.join("data/disk.img"), &reference);
    let run = d.path().join("by-digest");
    reg.importer(&run, "vms/exported:1")
        .env(
            "FERRYDISK_LAYER_DIGEST",
            layer["digest"].as_str().expect("digest"),
        )
        .run()
        .assert_success();
    assert_same_bytes(&run.join("data/disk.img"), &reference);
    let run = d.path().join("no-such-disk");
    reg.importer(&run, "vms/exported:1")
        .arg("--layer-annotation")
        .arg("io.kubevirt.disk.name=datadisk")
        .run()
        .assert_failure("no layer matches io.kubevirt.disk.name=datadisk");
}

#[test]
fn bad_pushes_fail_in_one_line_and_tag_nothing() {
    let d = tmp();
    let raw = default_fixture(d.path());
    let vmdk = d.path().join("disk.vmdk");
    qemu_img(&[
        "convert",
        "-O",
        "vmdk",
        raw.to_str().expect("utf8"),
        vmdk.to_str().expect("utf8"),
    ]);
    let reg = Registry::start(true, Some(("user", "pass")));
    let fails = |out: Output, needle: &str| {
        assert_eq!(out.status.code(), Some(1), "{out:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        let line = err
            .lines()
            .find(|l| l.starts_with("push failed: "))
            .unwrap_or_else(|| panic!("no failure line in {err}"));
        assert!(line.contains(needle), "{line:?} lacks {needle:?}");
        assert!(out.stdout.is_empty(), "no summary on failure");
    };
    fails(
        push(
            &reg,
            &vmdk,
            "d/x:1",
            &["--layout", "artifact", "--convert", "qcow2"],
        ),
        "raw+zstd only",
    );
    fails(
        push(
            &reg,
            &raw,
            "d/x:1",
            &["--layout", "artifact", "--volume-name", "Root.img"],
        ),
        "DNS-1123",
    );
    fails(
        push(&reg, &d.path().join("missing"), "d/x:1", &[]),
        "opening",
    );
    fails(
        push(&reg, &raw, "d/x:1", &["--disk-name", "../etc"]),
        "one plain file name",
    );
    let mut wrong = Command::new(bin("importer"));
    wrong
        .env_clear()
        .env("IMPORTER_ACCESS_KEY_ID", "user")
        .env("IMPORTER_SECRET_KEY", "wrong")
        .args(["push", "--source"])
        .arg(&raw)
        .arg("--dest")
        .arg(reg.image("d/x:1"))
        .arg("--cert-dir")
        .arg(reg.ca_dir.as_ref().expect("tls"));
    fails(wrong.output().expect("run"), "401");
    let mut untrusted = Command::new(bin("importer"));
    untrusted
        .env_clear()
        .env("IMPORTER_ACCESS_KEY_ID", "user")
        .env("IMPORTER_SECRET_KEY", "pass")
        .args(["push", "--source"])
        .arg(&raw)
        .arg("--dest")
        .arg(reg.image("d/x:1"));
    fails(untrusted.output().expect("run"), "certificate");
    // Nothing was tagged.
    let o = Command::new("skopeo")
        .args([
            "inspect",
            "--raw",
            "--tls-verify=false",
            "--creds",
            "user:pass",
        ])
        .arg(reg.image("d/x:1"))
        .output()
        .expect("skopeo");
    assert!(!o.status.success(), "d/x:1 exists after failed pushes");
}

#[test]
fn chunked_upload_sends_one_patch_per_chunk_and_imports_byte_equal() {
    let d = tmp();
    let raw = default_fixture(d.path());
    let reference = qemu_reference(&raw, d.path());
    let reg = Registry::start(true, Some(("user", "pass")));
    let s = pushed(&reg, &raw, "disks/chunked:1", &["--chunk-mib", "5"]);
    let layer = s["layerSize"].as_u64().expect("size");
    let patches = std::fs::read_to_string(&reg.log)
        .unwrap_or_default()
        .lines()
        .filter(|l| l.contains("\"PATCH /v2/disks/chunked/blobs/uploads/"))
        .count() as u64;
    assert_eq!(
        patches,
        layer.div_ceil(5 << 20),
        "{layer} bytes in 5 MiB chunks"
    );
    imports_equal(&reg, "disks/chunked:1", &d.path().join("ours"), &reference);
}

#[test]
fn a_block_volume_pushes_as_a_zstd_containerdisk() {
    let d = tmp();
    let raw = default_fixture(d.path());
    let reference = qemu_reference(&raw, d.path());
    let Some(lo) = ferrydisk_tests::Loop::new(&d.path().join("backing"), 64 << 20) else {
        return;
    };
    // The volume holds the disk (a block PVC after an import): copy it onto the device.
    std::io::copy(
        &mut std::fs::File::open(&raw).expect("raw"),
        &mut std::fs::OpenOptions::new()
            .write(true)
            .open(&lo.dev)
            .expect("device"),
    )
    .expect("copy onto the device");
    let reg = Registry::start(true, Some(("user", "pass")));
    let s = pushed(
        &reg,
        Path::new(&lo.dev),
        "volumes/pvc:1",
        &["--zstd", "--disk-name", "disk.img"],
    );
    assert_eq!(s["format"], "raw");
    assert_eq!(s["sourceSize"], 64 << 20);
    assert_eq!(
        s["layerMediaType"],
        "application/vnd.oci.image.layer.v1.tar+zstd"
    );
    imports_equal(&reg, "volumes/pvc:1", &d.path().join("ours"), &reference);
}

/// `importer push` to a local destination (issue #14 item 4: minivirt's save, pcocc's
/// export): no registry, the summary on stdout.
fn saved(source: &Path, dest: &str, extra: &[&str]) -> serde_json::Value {
    let out = Command::new(bin("importer"))
        .arg("push")
        .arg("--source")
        .arg(source)
        .arg("--dest")
        .arg(dest)
        .args(extra)
        .output()
        .expect("run importer push");
    assert!(
        out.status.success(),
        "save to {dest} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("summary json")
}

/// A qcow2 of the default fixture, and where the saving tests save it.
struct Saving {
    d: tempfile::TempDir,
    raw: PathBuf,
    reference: PathBuf,
    q: PathBuf,
    layout: PathBuf,
}

const QCOW2_NAME: [&str; 2] = ["--disk-name", "fedora.qcow2"];

impl Saving {
    fn new() -> Self {
        let d = tmp();
        let raw = default_fixture(d.path());
        let reference = qemu_reference(&raw, d.path());
        let q = qcow2_of(&raw, &d.path().join("fedora.qcow2"));
        let layout = d.path().join("layout");
        Saving {
            d,
            raw,
            reference,
            q,
            layout,
        }
    }

    fn oci(&self, tag: &str) -> String {
        format!("oci:{}:{tag}", self.layout.display())
    }

    fn oci_archive(&self) -> String {
        format!(
            "oci-archive:{}:41",
            self.d.path().join("image.tar").display()
        )
    }

    fn docker_archive(&self) -> String {
        format!(
            "docker-archive:{}:disks/fedora:41",
            self.d.path().join("docker.tar").display()
        )
    }

    /// Our import of `src` is exactly `qemu-img convert -O raw` of the fixture.
    fn imports_as_reference(&self, src: &str, want: &Path) {
        let run = fresh_dir(&self.d.path().join(format!("run-{}", src.len())));
        Importer::new(&run)
            .env("IMPORTER_SOURCE", "registry")
            .env("IMPORTER_ENDPOINT", src)
            .arg("--metrics-addr")
            .arg("none")
            .run()
            .assert_success();
        assert_same_bytes(&run.join("data/disk.img"), want);
    }
}

/// Saved as an OCI layout directory, an oci-archive and a docker-archive: `skopeo
/// inspect` reads each (labels, the layer digest) and our import of each is exactly
/// `qemu-img convert -O raw`.
#[test]
fn saves_to_oci_layouts_and_archives_that_skopeo_and_the_import_read() {
    let w = Saving::new();
    let qlen = std::fs::metadata(&w.q).expect("meta").len();
    let first = saved(&w.q, &w.oci("41"), &QCOW2_NAME);
    assert_eq!(first["layerUploaded"], true);
    let s = saved(&w.q, &w.oci_archive(), &QCOW2_NAME);
    assert_eq!(s["manifestDigest"], first["manifestDigest"]);
    saved(&w.q, &w.docker_archive(), &QCOW2_NAME);
    for src in [&w.oci("41"), &w.oci_archive(), &w.docker_archive()] {
        let info = sh(Command::new("skopeo").arg("inspect").arg(src));
        let info: serde_json::Value = serde_json::from_slice(&info.stdout).expect("inspect");
        assert_eq!(info["Labels"]["source-image-format"], "qcow2", "{src}");
        assert_eq!(
            info["Labels"]["source-image-size"],
            qlen.to_string(),
            "{src}"
        );
        assert_eq!(info["Layers"][0], first["layerDigest"], "{src}");
        w.imports_as_reference(src, &w.reference);
    }
}

#[test]
fn a_second_tag_in_a_layout_keeps_the_first_and_writes_no_layer_again() {
    let w = Saving::new();
    let first = saved(&w.q, &w.oci("41"), &QCOW2_NAME);
    let again = saved(&w.q, &w.oci("latest"), &QCOW2_NAME);
    assert_eq!(again["layerUploaded"], false, "the layout already had it");
    assert_eq!(again["manifestDigest"], first["manifestDigest"]);
    w.imports_as_reference(&w.oci("41"), &w.reference);
    w.imports_as_reference(&w.oci("latest"), &w.reference);
}

#[test]
fn umoci_unpacks_a_saved_layout_to_the_disk_file_owned_by_107() {
    let w = Saving::new();
    saved(&w.q, &w.oci("41"), &QCOW2_NAME);
    let bundle = w.d.path().join("bundle");
    sh(Command::new("umoci")
        .args(["unpack", "--image"])
        .arg(format!("{}:41", w.layout.display()))
        .arg(&bundle));
    use std::os::unix::fs::MetadataExt;
    let disk = bundle.join("rootfs/disk/fedora.qcow2");
    let meta = std::fs::metadata(&disk).expect("unpacked disk");
    assert_eq!((meta.uid(), meta.gid()), (107, 107));
    assert_same_bytes(&disk, &w.q);
}

#[test]
fn skopeo_copies_a_saved_oci_archive_into_a_registry_that_imports_it() {
    let w = Saving::new();
    saved(&w.q, &w.oci_archive(), &QCOW2_NAME);
    let reg = Registry::start(true, Some(("user", "pass")));
    sh(Command::new("skopeo")
        .args([
            "copy",
            "-q",
            "--dest-tls-verify=false",
            "--dest-creds",
            "user:pass",
        ])
        .arg(w.oci_archive())
        .arg(reg.image("disks/saved:41")));
    imports_equal(
        &reg,
        "disks/saved:41",
        &w.d.path().join("from-registry"),
        &w.reference,
    );
}

#[test]
fn a_raw_volume_saves_as_a_zstd_artifact_in_a_layout() {
    let w = Saving::new();
    let s = saved(
        &w.raw,
        &w.oci("art"),
        &["--layout", "artifact", "--zstd", "--disk-name", "disk.raw"],
    );
    assert_eq!(
        s["layerMediaType"],
        "application/vnd.kubevirt.disk.raw+zstd"
    );
    w.imports_as_reference(&w.oci("art"), &w.raw);
}

#[test]
fn a_docker_archive_refuses_a_zstd_layer_and_leaves_nothing() {
    // A docker-archive holds uncompressed tar layers only.
    let w = Saving::new();
    let z = w.d.path().join("z.tar");
    let out = Command::new(bin("importer"))
        .args(["push", "--zstd", "--source"])
        .arg(&w.q)
        .arg("--dest")
        .arg(format!("docker-archive:{}:x/y:1", z.display()))
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("docker-archive"));
    assert!(!z.exists(), "nothing left behind");
}

const MULTI_ARCH: [&str; 4] = ["--arch", "amd64,arm64/v8", "--env", CUSTOM_ENV];

/// `--arch amd64,arm64/v8` pushes an image index whose platforms share the one layer,
/// and `--env` puts `KUBEVIRT_IO_` keys in the config (PVC labels at import).
#[test]
fn a_multi_arch_index_shares_one_layer_and_carries_env_labels() {
    let w = Saving::new();
    let reg = Registry::start(true, Some(("user", "pass")));
    let s = pushed(&reg, &w.q, "disks/multi:41", &MULTI_ARCH);
    assert_eq!(s["layerUploaded"], true);
    let index = reg.raw_manifest("disks/multi:41");
    assert_eq!(
        index["mediaType"],
        "application/vnd.oci.image.index.v1+json"
    );
    let platforms: Vec<String> = index["manifests"]
        .as_array()
        .expect("manifests")
        .iter()
        .map(|m| {
            let p = &m["platform"];
            let os_arch = format!(
                "{}/{}",
                p["os"].as_str().unwrap_or(""),
                p["architecture"].as_str().unwrap_or("")
            );
            match p["variant"].as_str() {
                Some(v) => format!("{os_arch}/{v}"),
                None => os_arch,
            }
        })
        .collect();
    assert_eq!(platforms, ["linux/amd64", "linux/arm64/v8"]);
    for arch in ["amd64", "arm64"] {
        let run = w.d.path().join(format!("import-{arch}"));
        let o = reg
            .importer(&run, "disks/multi:41")
            .env("IMPORTER_REGISTRY_IMAGE_ARCHITECTURE", arch)
            .run();
        assert_eq!(o.code, 0, "{arch}: {}\n{}", o.termination, o.stderr);
        assert!(
            o.termination
                .contains(r#""instancetype.kubevirt.io/default-instancetype":"u1.small""#),
            "{arch}: {}",
            o.termination
        );
        assert_same_bytes(&run.join("data/disk.img"), &w.reference);
    }
}

/// `--mount-from` has the registry mount the layer into another repository instead of
/// receiving it again (no PATCH in its access log, a `mount=` request instead).
#[test]
fn a_cross_repository_mount_sends_no_layer_data() {
    let w = Saving::new();
    let reg = Registry::start(true, Some(("user", "pass")));
    pushed(&reg, &w.q, "disks/multi:41", &MULTI_ARCH);
    // The two small configs are sent: PUTs without a PATCH.
    let before = patches(&reg);
    let mut args = MULTI_ARCH.to_vec();
    args.extend(["--mount-from", "disks/multi"]);
    let m = pushed(&reg, &w.q, "other/fedora:41", &args);
    assert_eq!(m["layerMounted"], true, "{m}");
    assert_eq!(m["layerUploaded"], false, "{m}");
    assert_eq!(patches(&reg), before, "no layer data sent for a mount");
    let log = std::fs::read_to_string(&reg.log).unwrap_or_default();
    assert!(
        log.contains("mount=sha256"),
        "the registry's log has the mount request"
    );
    let run = w.d.path().join("import-mounted");
    let o = reg.importer(&run, "other/fedora:41").run();
    assert_eq!(o.code, 0, "{}\n{}", o.termination, o.stderr);
    assert_same_bytes(&run.join("data/disk.img"), &w.reference);
}

#[test]
fn a_multi_arch_index_saves_as_a_layout_the_import_picks_from() {
    let w = Saving::new();
    saved(&w.q, &w.oci("41"), &["--arch", "amd64,arm64/v8"]);
    let run = w.d.path().join("import-layout");
    Importer::new(&run)
        .env("IMPORTER_SOURCE", "registry")
        .env("IMPORTER_ENDPOINT", &w.oci("41"))
        .env("IMPORTER_REGISTRY_IMAGE_ARCHITECTURE", "arm64")
        .arg("--metrics-addr")
        .arg("none")
        .run()
        .assert_success();
    assert_same_bytes(&run.join("data/disk.img"), &w.reference);
}

/// Files left in a spool directory.
fn spool_left(dir: &Path) -> usize {
    std::fs::read_dir(dir).map_or(0, |r| r.count())
}

/// The fixture as `fedora.qcow2` and `fedora.qcow2.gz` (and half of it,
/// `cut.qcow2.gz`) over HTTP, the registry, and a spool directory that must be left
/// empty.
struct Sources {
    d: tempfile::TempDir,
    raw: PathBuf,
    reference: PathBuf,
    q: PathBuf,
    http: HttpServer,
    reg: Registry,
    spool: PathBuf,
}

const CUSTOM_ENV: &str = "INSTANCETYPE_KUBEVIRT_IO_DEFAULT_INSTANCETYPE=u1.small";

impl Sources {
    fn new() -> Self {
        let d = tmp();
        let raw = default_fixture(d.path());
        let reference = qemu_reference(&raw, d.path());
        let www = d.path().join("www");
        std::fs::create_dir_all(&www).expect("mkdir");
        let q = qcow2_of(&raw, &www.join("fedora.qcow2"));
        sh(Command::new("gzip").args(["-k", "-1"]).arg(&q));
        let gz = std::fs::read(www.join("fedora.qcow2.gz")).expect("gz");
        std::fs::write(www.join("cut.qcow2.gz"), &gz[..gz.len() / 2]).expect("cut");
        let http = HttpServer::start(&www, &[]);
        let reg = Registry::start(true, Some(("user", "pass")));
        let spool = d.path().join("spool");
        std::fs::create_dir_all(&spool).expect("mkdir");
        Sources {
            d,
            raw,
            reference,
            q,
            http,
            reg,
            spool,
        }
    }

    fn spool_arg(&self) -> &str {
        self.spool.to_str().expect("utf8")
    }

    /// The qcow2.gz over HTTP into `repo` as a containerDisk holding `disk/fedora.qcow2`.
    fn push_web(&self, repo: &str) -> serde_json::Value {
        let url = self.http.url("fedora.qcow2.gz");
        let s = pushed(
            &self.reg,
            Path::new(&url),
            repo,
            &[
                "--disk-name",
                "fedora.qcow2",
                "--spool-dir",
                self.spool_arg(),
                "--env",
                CUSTOM_ENV,
            ],
        );
        assert_eq!(
            spool_left(&self.spool),
            0,
            "the spool is removed after the push"
        );
        s
    }
}

#[test]
fn a_gzip_qcow2_over_http_becomes_a_containerdisk_holding_its_own_bytes() {
    // The labels describe the source; disk/ holds the qcow2's own bytes.
    let w = Sources::new();
    let s = w.push_web("disks/web:1");
    let qlen = std::fs::metadata(&w.q).expect("meta").len();
    assert_eq!(s["format"], "qcow2", "{s}");
    assert_eq!(s["sourceSize"], qlen, "{s}");
    assert_eq!(s["virtualSize"], 64 << 20, "{s}");
    let info = skopeo_inspect(&w.reg, "disks/web:1");
    assert_eq!(info["Labels"]["source-image-format"], "qcow2");
    assert_eq!(info["Labels"]["source-image-size"], qlen.to_string());
    assert_eq!(
        info["Labels"]["source-image-virtual-size"],
        (64u64 << 20).to_string()
    );
    let rootfs = unpacked(&w.reg, "disks/web:1", w.d.path());
    assert_same_bytes(&rootfs.join("disk/fedora.qcow2"), &w.q);
}

#[test]
fn registry_to_registry_converts_to_raw_and_carries_the_kubevirt_env() {
    // The source's KUBEVIRT_IO_ Env comes along and becomes a PVC label at import.
    let w = Sources::new();
    w.push_web("disks/web:1");
    let s = pushed(
        &w.reg,
        Path::new(&w.reg.image("disks/web:1")),
        "disks/raw:1",
        &["--convert", "raw", "--zstd", "--spool-dir", w.spool_arg()],
    );
    assert_eq!(s["format"], "raw", "{s}");
    assert_eq!(
        s["layerMediaType"],
        "application/vnd.oci.image.layer.v1.tar+zstd"
    );
    let info = skopeo_inspect(&w.reg, "disks/raw:1");
    assert!(
        info["Env"]
            .as_array()
            .is_some_and(|e| e.iter().any(|v| v == CUSTOM_ENV)),
        "{info}"
    );
    assert_eq!(info["Labels"]["source-image-format"], "qcow2");
    let run = w.d.path().join("import-raw");
    let o = w.reg.importer(&run, "disks/raw:1").run();
    assert_eq!(o.code, 0, "{}\n{}", o.termination, o.stderr);
    assert!(
        o.termination
            .contains(r#""instancetype.kubevirt.io/default-instancetype":"u1.small""#),
        "{}",
        o.termination
    );
    assert_same_bytes(&run.join("data/disk.img"), &w.reference);
}

#[test]
fn a_local_vmdk_pushed_as_an_artifact_is_converted_to_raw_on_the_way() {
    // No flag needed: a VM artifact's disk is raw+zstd; the blob is the zstd of
    // qemu-img's bytes.
    let w = Sources::new();
    let vmdk = w.d.path().join("disk.vmdk");
    qemu_img(&["convert", "-O", "vmdk", path_str(&w.raw), path_str(&vmdk)]);
    let s = pushed(
        &w.reg,
        &vmdk,
        "vms/vmdk:1",
        &["--layout", "artifact", "--spool-dir", w.spool_arg()],
    );
    assert_eq!(
        s["layerMediaType"],
        "application/vnd.kubevirt.disk.raw+zstd"
    );
    assert_eq!(s["sourceFormat"], "vmdk", "{s}");
    let blob = w.reg.blob_path(s["layerDigest"].as_str().expect("digest"));
    let plain = w.d.path().join("vmdk-blob.raw");
    sh(Command::new("zstd")
        .args(["-q", "-d", "-o"])
        .arg(&plain)
        .arg(&blob));
    assert_same_bytes(&plain, &w.reference);
    imports_equal(
        &w.reg,
        "vms/vmdk:1",
        &w.d.path().join("import-vmdk"),
        &w.reference,
    );
}

#[test]
fn a_truncated_source_fails_in_one_line_tags_nothing_and_leaves_no_spool() {
    let w = Sources::new();
    let out = push(
        &w.reg,
        Path::new(&w.http.url("cut.qcow2.gz")),
        "disks/cut:1",
        &["--spool-dir", w.spool_arg()],
    );
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.lines()
            .any(|l| l.starts_with("push failed: reading http://") && l.contains("cut.qcow2.gz")),
        "{err}"
    );
    assert_eq!(spool_left(&w.spool), 0, "a failed push leaves no spool");
    let o = Command::new("skopeo")
        .args([
            "inspect",
            "--raw",
            "--tls-verify=false",
            "--creds",
            "user:pass",
        ])
        .arg(w.reg.image("disks/cut:1"))
        .output()
        .expect("skopeo");
    assert!(
        !o.status.success(),
        "disks/cut:1 exists after a failed push"
    );
}

#[test]
fn the_upload_server_pushes_what_it_received_to_the_registry() {
    use ferrydisk_tests::token::{mint, Claims};
    use ferrydisk_tests::upload::{curl, proxy, upload_server_with, Mode, Pki};
    let d = tmp();
    let raw = default_fixture(d.path());
    let reference = qemu_reference(&raw, d.path());
    let q = qcow2_of(&raw, &d.path().join("fedora.qcow2"));
    let qlen = std::fs::metadata(&q).expect("meta").len();
    let reg = Registry::start(true, Some(("user", "pass")));
    let pki = Pki::default();
    let run = d.path().join("run");
    let dest = reg.image("dvcr/uploaded:1");
    let ca = reg.ca_dir.as_ref().expect("tls").to_str().expect("utf8");
    let mut server = upload_server_with(
        &pki,
        &run,
        &[
            ("FERRYDISK_PUSH_DEST", dest.as_str()),
            ("FERRYDISK_PUSH_ZSTD", "true"),
            ("IMPORTER_ACCESS_KEY_ID", "user"),
            ("IMPORTER_SECRET_KEY", "pass"),
            ("IMPORTER_CERT_DIR", ca),
        ],
    );
    let p = proxy(&pki, &run, server.port, Mode::Standalone, "client");
    let token = mint(&pki.key("api.key"), &Claims::upload("default", "disk"));
    let (code, body) = curl(
        &pki,
        &[
            "-H",
            &format!("Authorization: Bearer {token}"),
            "-T",
            q.to_str().expect("utf8"),
            &format!("https://127.0.0.1:{}/v1beta1/upload", p.port),
        ],
    );
    assert_eq!(code, 200, "{body}\n{}", server.log());
    assert_eq!(
        server.wait(std::time::Duration::from_secs(30)),
        Some(0),
        "{}",
        server.log()
    );
    assert!(
        server.log().contains("pushed the uploaded disk"),
        "{}",
        server.log()
    );
    // The labels describe the upload (a qcow2), the layer holds the raw volume.
    let info = skopeo_inspect(&reg, "dvcr/uploaded:1");
    assert_eq!(info["Labels"]["source-image-format"], "qcow2", "{info}");
    assert_eq!(info["Labels"]["source-image-size"], qlen.to_string());
    let m = reg.raw_manifest("dvcr/uploaded:1");
    assert_eq!(
        m["layers"][0]["mediaType"],
        "application/vnd.oci.image.layer.v1.tar+zstd"
    );
    imports_equal(
        &reg,
        "dvcr/uploaded:1",
        &d.path().join("import"),
        &reference,
    );
}

/// The disks the streaming tests serve over HTTP, in `<d>/www`: the default fixture as
/// `disk.raw.xz` (multi-block), and `backwards.qcow2`, whose clusters were allocated in
/// reverse guest order. Returns (raw fixture, its reference bytes, www, backwards.qcow2's
/// reference bytes).
fn http_disks(d: &Path) -> (PathBuf, PathBuf, PathBuf, PathBuf) {
    let raw = default_fixture(d);
    let reference = qemu_reference(&raw, d);
    let www = d.join("www");
    std::fs::create_dir_all(&www).expect("mkdir");
    let xz = sh(Command::new("xz").args(["-T2", "-3", "-c"]).arg(&raw)).stdout;
    std::fs::write(www.join("disk.raw.xz"), xz).expect("xz");
    let backwards = www.join("backwards.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", path_str(&backwards), "64M"]);
    for cmd in ["write -q -P 0x5a 40M 1M", "write -q -P 0xa5 1M 1M"] {
        sh(Command::new("qemu-io")
            .args(["-f", "qcow2", "-c", cmd])
            .arg(&backwards));
    }
    let backwards_ref = qemu_reference(&backwards, d);
    (raw, reference, www, backwards_ref)
}

/// Who may do what on the token registry: `user` pushes under `vms/` and may only pull
/// `base/`; `admin` may do anything.
const TOKEN_GRANTS: &[ferrydisk_tests::tokenserver::Grant] = &[
    ("user", "pass", "vms/", &["pull", "push"]),
    ("user", "pass", "base/", &["pull"]),
    ("admin", "apass", "", &["pull", "push"]),
];

#[test]
fn a_token_registry_takes_pushes_and_mounts_with_the_scopes_it_asks_for() {
    // Docker's token authentication (Docker Hub, Quay, Harbor): the real docker-registry
    // checks RS256 tokens from a token server on 127.0.0.1 (tests/src/tokenserver.rs).
    let d = tmp();
    let raw = default_fixture(d.path());
    let reference = qemu_reference(&raw, d.path());
    let q = qcow2_of(&raw, &d.path().join("disk.qcow2"));
    let reg = Registry::start_token(true, TOKEN_GRANTS, ("user", "pass"));
    // The base image, pushed by admin.
    pushed_as(("admin", "apass"), &reg, &q, "base/disk:1", &[]);
    let seeded = patches(&reg);
    // user pushes the same disk under vms/, mounting its layer from base/ (which needs
    // a token for base/disk:pull as well as vms/disk:pull,push): nothing is uploaded.
    let s = pushed(&reg, &q, "vms/disk:1", &["--mount-from", "base/disk"]);
    assert_eq!(s["layerMounted"], true, "{s}");
    assert_eq!(s["layerUploaded"], false, "{s}");
    assert_eq!(patches(&reg), seeded, "no layer data sent for a mount");
    let asked = reg.token.as_ref().expect("token server").asked();
    assert!(
        asked.iter().any(|a| a == "user repository:base/disk:pull"),
        "the token for the mount names the source repository: {asked:?}"
    );
    // Our importer and skopeo read it back with user's token.
    let run = d.path().join("import");
    let o = reg.importer(&run, "vms/disk:1").run();
    assert_eq!(o.code, 0, "{}\n{}", o.termination, o.stderr);
    assert_same_bytes(&run.join("data/disk.img"), &reference);
    assert_eq!(
        reg.raw_manifest("vms/disk:1")["layers"][0]["digest"],
        s["layerDigest"]
    );
    // A mount from a repository user cannot read is not an error: the layer goes up.
    let s = pushed(
        &reg,
        &q,
        "vms/copy:1",
        &["--mount-from", "secret/disk", "--zstd"],
    );
    assert_eq!(
        (s["layerMounted"].clone(), s["layerUploaded"].clone()),
        (false.into(), true.into()),
        "{s}"
    );
    // Pushing where user may only pull, or with a wrong password: one line, exit 1.
    for (creds, repo) in [
        (("user", "pass"), "base/other:1"),
        (("user", "nope"), "vms/x:1"),
    ] {
        let o = push_as(creds, &reg, &q, repo, &[]);
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(1), "{repo}: {err}");
        let line = err
            .lines()
            .find(|l| l.contains("push failed"))
            .unwrap_or("");
        assert!(
            line.contains("401")
                || line.contains("403")
                || line.contains("denied")
                || line.contains("unauthorized"),
            "{repo}: {err}"
        );
    }
}

/// The streaming tests' world: the disks `http_disks` serves over HTTP, the real
/// registry with TLS and htpasswd, and a private TMPDIR that must stay empty.
struct Streaming {
    d: tempfile::TempDir,
    raw: PathBuf,
    reference: PathBuf,
    backwards_ref: PathBuf,
    www: PathBuf,
    tmpdir: PathBuf,
    http: HttpServer,
    reg: Registry,
}

impl Streaming {
    fn new() -> Self {
        let d = tmp();
        let (raw, reference, www, backwards_ref) = http_disks(d.path());
        let http = HttpServer::start(&www, &[]);
        let reg = Registry::start(true, Some(("user", "pass")));
        let tmpdir = d.path().join("tmp");
        std::fs::create_dir_all(&tmpdir).expect("mkdir");
        Streaming {
            d,
            raw,
            reference,
            backwards_ref,
            www,
            tmpdir,
            http,
            reg,
        }
    }

    /// The fixture as qcow2 in the order qemu-img writes it, served as `name`.
    fn serve_qcow2(&self, name: &str) -> PathBuf {
        qcow2_of(&self.raw, &self.www.join(name))
    }

    /// Pushes `source` (a URL path on the HTTP server, or a local path) to `repo`; the
    /// push must succeed and leave nothing in TMPDIR. Returns the summary.
    fn push(&self, source: &str, repo: &str, args: &[&str]) -> serde_json::Value {
        let source = if source.starts_with('/') {
            source.to_string()
        } else {
            self.http.url(source)
        };
        let mut c = Command::new(bin("importer"));
        c.env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("TMPDIR", &self.tmpdir)
            .env("IMPORTER_ACCESS_KEY_ID", "user")
            .env("IMPORTER_SECRET_KEY", "pass")
            .args(["push", "--source", &source, "--dest", &self.reg.image(repo)])
            .arg("--cert-dir")
            .arg(self.reg.ca_dir.as_ref().expect("tls"))
            .args(args);
        let out = c.output().expect("push");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{source} -> {repo}: {err}");
        assert_eq!(
            spool_left(&self.tmpdir),
            0,
            "{source}: nothing left in TMPDIR"
        );
        serde_json::from_slice(&out.stdout).expect("summary")
    }

    /// [`Self::push`] with `--spool-dir` (a directory that must be left empty too).
    fn push_spool_dir(&self, source: &str, repo: &str, args: &[&str]) -> serde_json::Value {
        let spool = self.d.path().join("spool");
        std::fs::create_dir_all(&spool).expect("mkdir");
        let mut args = args.to_vec();
        let spool_arg = spool.to_str().expect("utf8").to_string();
        args.extend(["--spool-dir", &spool_arg]);
        let s = self.push(source, repo, &args);
        assert_eq!(spool_left(&spool), 0, "{source}: no spool left");
        s
    }

    /// The pushed layer is the manifest's, a containerDisk's tar is strict, and the
    /// import gives `want`; a containerDisk also unpacks with umoci to disk/<name>
    /// owned by 107.
    fn check(&self, repo: &str, s: &serde_json::Value, want: &Path, disk_name: &str) {
        let m = image_manifest(&self.reg, repo);
        assert_eq!(m["layers"][0]["digest"], s["layerDigest"]);
        let dir = fresh_dir(
            &self
                .d
                .path()
                .join(format!("check-{}", repo.replace(['/', ':'], "-"))),
        );
        imports_equal(&self.reg, repo, &dir.join("import"), want);
        if s["layerMediaType"] == "application/vnd.oci.image.layer.v1.tar" {
            let disk = format!("disk/{disk_name}");
            assert_strict_tar(
                &self
                    .reg
                    .blob_path(s["layerDigest"].as_str().expect("digest")),
                &["disk", &disk],
            );
            let rootfs = unpacked(&self.reg, repo, &fresh_dir(&dir.join("unpack")));
            let meta = std::fs::metadata(rootfs.join(&disk)).expect("unpacked disk");
            use std::os::unix::fs::MetadataExt;
            assert_eq!((meta.uid(), meta.gid()), (107, 107), "{repo}");
        }
    }
}

/// The route a push took, from its summary: (route, spool reason, passes).
fn route(s: &serde_json::Value) -> (&str, Option<&str>, u64) {
    (
        s["route"].as_str().expect("route"),
        s["spoolReason"].as_str(),
        s["passes"].as_u64().expect("passes"),
    )
}

const RAW_ARTIFACT: &[&str] = &["--layout", "artifact", "--convert", "raw", "--zstd"];
const RAW_CONTAINERDISK: &[&str] = &[
    "--layout",
    "containerdisk",
    "--convert",
    "raw",
    "--disk-name",
    "rootdisk",
];

#[test]
fn a_raw_xz_goes_up_as_an_artifact_in_one_pass() {
    let w = Streaming::new();
    let s = w.push_spool_dir("disk.raw.xz", "one/xz-artifact:1", RAW_ARTIFACT);
    assert_eq!(route(&s), ("streamed", None, 1), "{s}");
    assert_eq!(
        s["layerMediaType"],
        "application/vnd.kubevirt.disk.raw+zstd"
    );
    assert_eq!(s["virtualSize"], 64 << 20);
    w.check("one/xz-artifact:1", &s, &w.reference, "rootdisk");
}

#[test]
fn a_qcow2_in_guest_order_goes_up_as_an_artifact_in_one_pass() {
    let w = Streaming::new();
    w.serve_qcow2("ordered.qcow2");
    let s = w.push_spool_dir("ordered.qcow2", "one/q-artifact:1", RAW_ARTIFACT);
    assert_eq!(route(&s), ("streamed", None, 1), "{s}");
    w.check("one/q-artifact:1", &s, &w.reference, "rootdisk");
}

#[test]
fn a_qcow2_in_guest_order_goes_up_as_a_raw_containerdisk_in_one_pass() {
    // The qcow2 announces its virtual size before its data: the tar header can come
    // first.
    let w = Streaming::new();
    w.serve_qcow2("ordered.qcow2");
    let s = w.push_spool_dir("ordered.qcow2", "one/q-cd:1", RAW_CONTAINERDISK);
    assert_eq!(route(&s), ("streamed", None, 1), "{s}");
    assert_eq!(
        s["layerMediaType"],
        "application/vnd.oci.image.layer.v1.tar"
    );
    w.check("one/q-cd:1", &s, &w.reference, "rootdisk");
}

#[test]
fn a_raw_xz_as_a_containerdisk_spools_when_a_spool_dir_is_given() {
    // Its length is known only at its end, and the tar header needs it first: with
    // --spool-dir the push spools rather than read the source twice.
    let w = Streaming::new();
    let s = w.push_spool_dir("disk.raw.xz", "one/xz-cd:1", RAW_CONTAINERDISK);
    assert_eq!(route(&s), ("spooled", Some("spool-dir"), 2), "{s}");
    w.check("one/xz-cd:1", &s, &w.reference, "rootdisk");
}

#[test]
fn data_out_of_guest_order_spools_as_an_artifact_and_as_a_containerdisk() {
    let w = Streaming::new();
    for (repo, args) in [
        ("one/back-artifact:1", RAW_ARTIFACT),
        ("one/back-cd:1", RAW_CONTAINERDISK),
    ] {
        let s = w.push_spool_dir("backwards.qcow2", repo, args);
        assert_eq!(
            route(&s),
            ("spooled", Some("out-of-order"), 2),
            "{repo}: {s}"
        );
        w.check(repo, &s, &w.backwards_ref, "rootdisk");
    }
}

#[test]
fn a_local_raw_file_converted_to_raw_goes_up_as_stored() {
    // Already raw: `--convert raw` pushes it from the file, as `keep` would, with no
    // spool and no import.
    let w = Streaming::new();
    let raw = w.raw.to_str().expect("utf8").to_string();
    let s = w.push_spool_dir(&raw, "one/local-raw:1", &["--convert", "raw"]);
    assert_eq!(route(&s), ("stored", None, 2), "{s}");
    imports_equal(
        &w.reg,
        "one/local-raw:1",
        &w.d.path().join("import"),
        &w.reference,
    );
}

#[test]
fn a_qcow2_kept_from_a_gzip_source_streams_in_two_passes() {
    // Its length is known only at the end: the first pass measures, the second
    // streams; disk/disk.qcow2 holds the qcow2's own bytes.
    let w = Streaming::new();
    let q = w.serve_qcow2("disk.qcow2");
    sh(Command::new("gzip").args(["-k", "-1"]).arg(&q));
    let s = w.push(
        "disk.qcow2.gz",
        "two/kept:1",
        &["--disk-name", "disk.qcow2"],
    );
    assert_eq!(route(&s), ("streamed", None, 2), "{s}");
    assert_eq!(s["format"], "qcow2");
    let rootfs = unpacked(&w.reg, "two/kept:1", &fresh_dir(&w.d.path().join("u")));
    assert_same_bytes(&rootfs.join("disk/disk.qcow2"), &q);
}

#[test]
fn another_disk_under_an_existing_tag_is_found_missing_and_uploaded() {
    // The tag exists: a digest-only pass comes first, finds a layer the registry does
    // not have, and the import runs again into the upload.
    let w = Streaming::new();
    let args = ["--disk-name", "disk.qcow2"];
    w.serve_qcow2("disk.qcow2");
    w.push("disk.qcow2", "two/retag:1", &args);
    let s = w.push("backwards.qcow2", "two/retag:1", &args);
    assert_eq!(route(&s), ("streamed", None, 3), "{s}");
    assert_eq!(
        (&s["digestFirst"], &s["layerUploaded"]),
        (&true.into(), &true.into())
    );
    imports_equal(
        &w.reg,
        "two/retag:1",
        &w.d.path().join("import"),
        &w.backwards_ref,
    );
}

#[test]
fn a_raw_xz_as_a_raw_containerdisk_streams_in_two_passes() {
    // The tar header needs the length the first pass found. (A one-pass attempt comes
    // first and stops where the data begins, with no length to write: three reads
    // begun, two to the end.)
    let w = Streaming::new();
    let s = w.push("disk.raw.xz", "two/raw:1", &["--convert", "raw"]);
    assert_eq!(route(&s), ("streamed", None, 3), "{s}");
    assert_eq!(s["format"], "raw");
    w.check("two/raw:1", &s, &w.reference, "disk.img");
}

#[test]
fn a_vmdk_becomes_a_qcow2_laid_out_header_first_that_qemu_and_cdi_read() {
    // keep's default for a remote source: qcow2, its header, tables and refcounts
    // computed from the clusters the first pass found, then the data in guest order.
    let w = Streaming::new();
    let vmdk = w.www.join("disk.vmdk");
    qemu_img(&["convert", "-O", "vmdk", path_str(&w.raw), path_str(&vmdk)]);
    let s = w.push("disk.vmdk", "two/vmdk:1", &["--disk-name", "disk.qcow2"]);
    assert_eq!(route(&s), ("streamed", None, 2), "{s}");
    assert_eq!(
        (s["format"].as_str(), s["sourceFormat"].as_str()),
        (Some("qcow2"), Some("vmdk"))
    );
    let info = skopeo_inspect(&w.reg, "two/vmdk:1");
    assert_eq!(info["Labels"]["source-image-format"], "vmdk");
    let rootfs = unpacked(&w.reg, "two/vmdk:1", &fresh_dir(&w.d.path().join("u")));
    let disk = rootfs.join("disk/disk.qcow2");
    qemu_img(&["check", "-f", "qcow2", path_str(&disk)]);
    qemu_img(&[
        "compare",
        "-f",
        "qcow2",
        "-F",
        "raw",
        path_str(&disk),
        path_str(&w.reference),
    ]);
    assert_same_bytes(
        &cdi_import(&w.reg, "two/vmdk:1", &w.d.path().join("cdi")),
        &w.reference,
    );
    w.check("two/vmdk:1", &s, &w.reference, "disk.qcow2");
}

#[test]
fn the_same_disk_pushed_again_or_under_a_new_tag_sends_no_layer_data() {
    // The repository has tags: the layer's digest is computed first (issue 29: dedup on
    // any tag), and the registry, which has it, gets no blob data.
    let w = Streaming::new();
    let vmdk = w.www.join("disk.vmdk");
    qemu_img(&["convert", "-O", "vmdk", path_str(&w.raw), path_str(&vmdk)]);
    let args = ["--disk-name", "disk.qcow2"];
    let first = w.push("disk.vmdk", "two/again:1", &args);
    let before = blob_writes(&w.reg);
    for tag in ["two/again:1", "two/again:2"] {
        let s = w.push("disk.vmdk", tag, &args);
        assert_eq!(route(&s), ("streamed", None, 2), "{tag}: {s}");
        assert_eq!(s["digestFirst"], true, "{tag}: {s}");
        assert_eq!(s["layerUploaded"], false, "{tag}: {s}");
        assert_eq!(s["layerDigest"], first["layerDigest"]);
        assert_eq!(s["manifestDigest"], first["manifestDigest"]);
        assert_eq!(blob_writes(&w.reg), before, "{tag}: blob data was written");
    }
}

#[test]
fn a_zstd_qcow2_containerdisk_streams_in_two_passes() {
    let w = Streaming::new();
    let s = w.push(
        "disk.raw.xz",
        "two/zstd:1",
        &["--convert", "qcow2", "--zstd", "--disk-name", "disk.qcow2"],
    );
    assert_eq!(route(&s), ("streamed", None, 2), "{s}");
    assert_eq!(
        s["layerMediaType"],
        "application/vnd.oci.image.layer.v1.tar+zstd"
    );
    imports_equal(
        &w.reg,
        "two/zstd:1",
        &w.d.path().join("import"),
        &w.reference,
    );
}

#[test]
fn data_out_of_guest_order_spools_without_a_spool_dir() {
    // Only a spool takes it: the one-pass attempt stops, the import runs into a file.
    let w = Streaming::new();
    let s = w.push("backwards.qcow2", "two/backwards:1", &["--convert", "raw"]);
    assert_eq!(route(&s), ("spooled", Some("out-of-order"), 2), "{s}");
    imports_equal(
        &w.reg,
        "two/backwards:1",
        &w.d.path().join("import"),
        &w.backwards_ref,
    );
}

fn fresh_dir(p: &Path) -> std::path::PathBuf {
    std::fs::create_dir_all(p).expect("mkdir");
    p.to_path_buf()
}

fn path_str(p: &Path) -> &str {
    p.to_str().expect("utf8")
}

/// Issue 29: a whole VM as one KubeVirt artifact, two disks from two kinds of source (a
/// qcow2 file, a raw.xz over HTTP), checked field by field against KubeVirt's layout
/// with `skopeo inspect --raw`, and imported back disk by disk by annotation and by
/// digest, byte-equal to `qemu-img convert`.
#[test]
fn a_two_disk_vm_artifact_is_kubevirts_layout_and_imports_disk_by_disk() {
    let d = tmp();
    let root_raw = default_fixture(d.path());
    let root_ref = qemu_reference(&root_raw, d.path());
    let root_q = qcow2_of(&root_raw, &d.path().join("root.qcow2"));
    let data_raw = dense_fixture_named(d.path(), "data.raw", 31);
    sh(Command::new("xz").args(["-T2", "-3", "-k"]).arg(&data_raw));
    let http = HttpServer::start(d.path(), &[]);
    let vm = d.path().join("vm.json");
    std::fs::write(
        &vm,
        serde_json::json!({
            "apiVersion": "kubevirt.io/v1", "kind": "VirtualMachine",
            "metadata": {"name": "vm1", "namespace": "default", "uid": "1234", "resourceVersion": "99"},
            "spec": {"template": {"spec": {
                "domain": {"devices": {"disks": [{"name": "rootdisk"}, {"name": "datadisk"}]}},
                "volumes": [
                    {"name": "rootdisk", "dataVolume": {"name": "vm1-root"}},
                    {"name": "datadisk", "dataVolume": {"name": "vm1-data"}}]}}},
            "status": {"ready": false},
        })
        .to_string(),
    )
    .expect("vm");
    let reg = Registry::start(true, Some(("user", "pass")));
    let out = Command::new(bin("importer"))
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("IMPORTER_ACCESS_KEY_ID", "user")
        .env("IMPORTER_SECRET_KEY", "pass")
        .arg("push")
        .arg("--disk")
        .arg(format!("rootdisk={}", root_q.display()))
        .arg("--disk")
        .arg(format!("datadisk={}", http.url("data.raw.xz")))
        .arg("--vm")
        .arg(&vm)
        .arg("--dest")
        .arg(reg.image("vms/vm1:v1"))
        .arg("--cert-dir")
        .arg(reg.ca_dir.as_ref().expect("tls"))
        .output()
        .expect("push");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    let s: serde_json::Value = serde_json::from_slice(&out.stdout).expect("summary");
    assert_eq!(s["disks"].as_array().map(Vec::len), Some(2), "{s}");

    // The config: the VM with its cluster fields gone and DataVolumes turned into PVCs.
    let (m, config) = kubevirt_vm_artifact(&reg, "vms/vm1:v1");
    assert_eq!(config["metadata"], serde_json::json!({"name": "vm1"}));
    assert!(config.get("status").is_none());
    assert_eq!(
        config["spec"]["template"]["spec"]["volumes"][1],
        serde_json::json!({"name": "datadisk", "persistentVolumeClaim": {"claimName": "vm1-data"}})
    );
    let layers = m["layers"].as_array().expect("layers");
    assert_eq!(layers.len(), 2);
    for (layer, (name, size)) in layers
        .iter()
        .zip([("rootdisk", "64Mi"), ("datadisk", "25Mi")])
    {
        assert_eq!(layer["mediaType"], "application/vnd.kubevirt.disk.raw+zstd");
        assert_eq!(layer["annotations"]["io.kubevirt.disk.name"], name);
        assert_eq!(layer["annotations"]["io.kubevirt.disk.size"], size);
        assert_eq!(
            layer["annotations"]["org.opencontainers.image.title"],
            format!("{name}.raw.zst")
        );
    }
    assert_eq!(
        layers[0]["annotations"]["io.ferrydisk.disk.source-format"],
        "qcow2"
    );
    assert_eq!(
        layers[1]["annotations"]["io.ferrydisk.disk.source-format"],
        "raw"
    );

    // Without a selector: refused with both names. By annotation, and by digest.
    let run = d.path().join("none");
    reg.importer(&run, "vms/vm1:v1")
        .run()
        .assert_failure("io.kubevirt.disk.name=datadisk");
    for (name, want) in [("rootdisk", &root_ref), ("datadisk", &data_raw)] {
        let run = d.path().join(format!("by-name-{name}"));
        reg.importer(&run, "vms/vm1:v1")
            .env(
                "FERRYDISK_LAYER_ANNOTATIONS",
                &format!("io.kubevirt.disk.name={name}"),
            )
            .run()
            .assert_success();
        assert_same_bytes(&run.join("data/disk.img"), want);
    }
    let run = d.path().join("by-digest");
    reg.importer(&run, "vms/vm1:v1")
        .env(
            "FERRYDISK_LAYER_DIGEST",
            layers[1]["digest"].as_str().expect("digest"),
        )
        .run()
        .assert_success();
    assert_same_bytes(&run.join("data/disk.img"), &data_raw);
}
