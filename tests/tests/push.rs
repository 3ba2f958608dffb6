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

/// Saved as an OCI layout directory, an oci-archive and a docker-archive: `skopeo
/// inspect` reads each (labels, the layer digest), `umoci unpack` gives `disk/<name>`
/// owned by 107, our import of each is exactly `qemu-img convert -O raw`, `skopeo copy`
/// takes the archive into a registry. A second tag in the same layout keeps the first
/// and does not write the layer again; a zstd artifact saves and imports too.
#[test]
fn saves_to_oci_layouts_and_archives_that_skopeo_umoci_and_the_import_read() {
    let d = tmp();
    let raw = default_fixture(d.path());
    let reference = qemu_reference(&raw, d.path());
    let q = qcow2_of(&raw, &d.path().join("fedora.qcow2"));
    let qlen = std::fs::metadata(&q).expect("meta").len();
    let layout = d.path().join("layout");
    let oci = format!("oci:{}:41", layout.display());
    let archive = d.path().join("image.tar");
    let oci_archive = format!("oci-archive:{}:41", archive.display());
    let docker = d.path().join("docker.tar");
    let docker_archive = format!("docker-archive:{}:disks/fedora:41", docker.display());
    let name = ["--disk-name", "fedora.qcow2"];
    let first = saved(&q, &oci, &name);
    assert_eq!(first["layerUploaded"], true);
    let again = saved(&q, &format!("oci:{}:latest", layout.display()), &name);
    assert_eq!(again["layerUploaded"], false, "the layout already had it");
    assert_eq!(again["manifestDigest"], first["manifestDigest"]);
    let s = saved(&q, &oci_archive, &name);
    assert_eq!(s["manifestDigest"], first["manifestDigest"]);
    saved(&q, &docker_archive, &name);
    for src in [
        &oci,
        &format!("oci:{}:latest", layout.display()),
        &oci_archive,
        &docker_archive,
    ] {
        let info = sh(Command::new("skopeo").arg("inspect").arg(src));
        let info: serde_json::Value = serde_json::from_slice(&info.stdout).expect("inspect");
        assert_eq!(info["Labels"]["source-image-format"], "qcow2", "{src}");
        assert_eq!(
            info["Labels"]["source-image-size"],
            qlen.to_string(),
            "{src}"
        );
        assert_eq!(info["Layers"][0], first["layerDigest"], "{src}");
        let run = d.path().join(format!("run-{}", src.len()));
        Importer::new(&run)
            .env("IMPORTER_SOURCE", "registry")
            .env("IMPORTER_ENDPOINT", src)
            .arg("--metrics-addr")
            .arg("none")
            .run()
            .assert_success();
        assert_same_bytes(&run.join("data/disk.img"), &reference);
    }
    // umoci reads the layout: the disk file, its owner and bytes.
    let bundle = d.path().join("bundle");
    sh(Command::new("umoci")
        .args(["unpack", "--image"])
        .arg(format!("{}:41", layout.display()))
        .arg(&bundle));
    {
        use std::os::unix::fs::MetadataExt;
        let disk = bundle.join("rootfs/disk/fedora.qcow2");
        let meta = std::fs::metadata(&disk).expect("unpacked disk");
        assert_eq!((meta.uid(), meta.gid()), (107, 107));
        assert_same_bytes(&disk, &q);
    }
    // The oci-archive goes into a registry with skopeo and imports from there.
    let reg = Registry::start(true, Some(("user", "pass")));
    sh(Command::new("skopeo")
        .args([
            "copy",
            "-q",
            "--dest-tls-verify=false",
            "--dest-creds",
            "user:pass",
        ])
        .arg(&oci_archive)
        .arg(reg.image("disks/saved:41")));
    imports_equal(
        &reg,
        "disks/saved:41",
        &d.path().join("from-registry"),
        &reference,
    );

    // A raw volume as a zstd artifact in a layout.
    let art = format!("oci:{}:art", layout.display());
    let s = saved(
        &raw,
        &art,
        &["--layout", "artifact", "--zstd", "--disk-name", "disk.raw"],
    );
    assert_eq!(
        s["layerMediaType"],
        "application/vnd.kubevirt.disk.raw+zstd"
    );
    let run = d.path().join("artifact");
    Importer::new(&run)
        .env("IMPORTER_SOURCE", "registry")
        .env("IMPORTER_ENDPOINT", &art)
        .arg("--metrics-addr")
        .arg("none")
        .run()
        .assert_success();
    assert_same_bytes(&run.join("data/disk.img"), &raw);
    // A docker-archive holds uncompressed tar layers only.
    let out = Command::new(bin("importer"))
        .args(["push", "--zstd", "--source"])
        .arg(&q)
        .arg("--dest")
        .arg(format!(
            "docker-archive:{}:x/y:1",
            d.path().join("z.tar").display()
        ))
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("docker-archive"));
    assert!(!d.path().join("z.tar").exists(), "nothing left behind");
}

/// `--arch amd64,arm64/v8` pushes an image index whose platforms share the one layer,
/// `--env` puts `KUBEVIRT_IO_` keys in the config (PVC labels at import), and
/// `--mount-from` has the registry mount the layer into another repository instead of
/// receiving it again (no PATCH in the access log). A layout saves the index too.
#[test]
fn multi_arch_index_env_labels_and_cross_repository_mount() {
    let d = tmp();
    let raw = default_fixture(d.path());
    let reference = qemu_reference(&raw, d.path());
    let q = qcow2_of(&raw, &d.path().join("fedora.qcow2"));
    let reg = Registry::start(true, Some(("user", "pass")));
    let env = "INSTANCETYPE_KUBEVIRT_IO_DEFAULT_INSTANCETYPE=u1.small";
    let s = pushed(
        &reg,
        &q,
        "disks/multi:41",
        &["--arch", "amd64,arm64/v8", "--env", env],
    );
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
            match p["variant"].as_str() {
                Some(v) => format!(
                    "{}/{}/{v}",
                    p["os"].as_str().unwrap_or(""),
                    p["architecture"].as_str().unwrap_or("")
                ),
                None => format!(
                    "{}/{}",
                    p["os"].as_str().unwrap_or(""),
                    p["architecture"].as_str().unwrap_or("")
                ),
            }
        })
        .collect();
    assert_eq!(platforms, ["linux/amd64", "linux/arm64/v8"]);
    for arch in ["amd64", "arm64"] {
        let run = d.path().join(format!("import-{arch}"));
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
        assert_same_bytes(&run.join("data/disk.img"), &reference);
    }
    // Mounted into another repository: the layer is not sent again (the two small
    // configs are: PUTs without a PATCH).
    let before = patches(&reg);
    let m = pushed(
        &reg,
        &q,
        "other/fedora:41",
        &[
            "--arch",
            "amd64,arm64/v8",
            "--env",
            env,
            "--mount-from",
            "disks/multi",
        ],
    );
    assert_eq!(m["layerMounted"], true, "{m}");
    assert_eq!(m["layerUploaded"], false, "{m}");
    assert_eq!(patches(&reg), before, "no layer data sent for a mount");
    let log = std::fs::read_to_string(&reg.log).unwrap_or_default();
    assert!(
        log.contains("mount=sha256"),
        "the mount request is in the log"
    );
    let run = d.path().join("import-mounted");
    let o = reg.importer(&run, "other/fedora:41").run();
    assert_eq!(o.code, 0, "{}\n{}", o.termination, o.stderr);
    assert_same_bytes(&run.join("data/disk.img"), &reference);
    // The same index saved as a layout.
    let layout = d.path().join("layout");
    saved(
        &q,
        &format!("oci:{}:41", layout.display()),
        &["--arch", "amd64,arm64/v8"],
    );
    let run = d.path().join("import-layout");
    Importer::new(&run)
        .env("IMPORTER_SOURCE", "registry")
        .env("IMPORTER_ENDPOINT", &format!("oci:{}:41", layout.display()))
        .env("IMPORTER_REGISTRY_IMAGE_ARCHITECTURE", "arm64")
        .arg("--metrics-addr")
        .arg("none")
        .run()
        .assert_success();
    assert_same_bytes(&run.join("data/disk.img"), &reference);
}

/// Files left in a spool directory.
fn spool_left(dir: &Path) -> usize {
    std::fs::read_dir(dir).map_or(0, |r| r.count())
}

#[test]
fn pushes_from_http_and_registry_sources_converting_on_the_way() {
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
    let spool_arg = spool.to_str().expect("utf8");
    let qlen = std::fs::metadata(&q).expect("meta").len();
    let env = "INSTANCETYPE_KUBEVIRT_IO_DEFAULT_INSTANCETYPE=u1.small";

    // HTTP qcow2.gz -> containerDisk: the qcow2's own bytes under disk/, the labels
    // describe the source.
    let url = http.url("fedora.qcow2.gz");
    let s = pushed(
        &reg,
        Path::new(&url),
        "disks/web:1",
        &[
            "--disk-name",
            "fedora.qcow2",
            "--spool-dir",
            spool_arg,
            "--env",
            env,
        ],
    );
    assert_eq!(s["format"], "qcow2", "{s}");
    assert_eq!(s["sourceSize"], qlen, "{s}");
    assert_eq!(s["virtualSize"], 64 << 20, "{s}");
    assert_eq!(spool_left(&spool), 0, "the spool is removed after the push");
    let info = skopeo_inspect(&reg, "disks/web:1");
    assert_eq!(info["Labels"]["source-image-format"], "qcow2");
    assert_eq!(info["Labels"]["source-image-size"], qlen.to_string());
    assert_eq!(
        info["Labels"]["source-image-virtual-size"],
        (64u64 << 20).to_string()
    );
    let rootfs = unpacked(&reg, "disks/web:1", d.path());
    assert_same_bytes(&rootfs.join("disk/fedora.qcow2"), &q);

    // Registry -> registry, converted to raw (zstd layer); the source's KUBEVIRT_IO_
    // env comes along and becomes a PVC label at import.
    let s = pushed(
        &reg,
        Path::new(&reg.image("disks/web:1")),
        "disks/raw:1",
        &["--convert", "raw", "--zstd", "--spool-dir", spool_arg],
    );
    assert_eq!(s["format"], "raw", "{s}");
    assert_eq!(
        s["layerMediaType"],
        "application/vnd.oci.image.layer.v1.tar+zstd"
    );
    let info = skopeo_inspect(&reg, "disks/raw:1");
    assert!(
        info["Env"]
            .as_array()
            .is_some_and(|e| e.iter().any(|v| v == env)),
        "{info}"
    );
    assert_eq!(info["Labels"]["source-image-format"], "qcow2");
    let run = d.path().join("import-raw");
    let o = reg.importer(&run, "disks/raw:1").run();
    assert_eq!(o.code, 0, "{}\n{}", o.termination, o.stderr);
    assert!(
        o.termination
            .contains(r#""instancetype.kubevirt.io/default-instancetype":"u1.small""#),
        "{}",
        o.termination
    );
    assert_same_bytes(&run.join("data/disk.img"), &reference);

    // A local vmdk pushed as an artifact: converted to raw on the way (no flag), its
    // blob the zstd of qemu-img's bytes; the VM artifact keeps the source's format on
    // the layer, under our own key.
    let vmdk = d.path().join("disk.vmdk");
    qemu_img(&[
        "convert",
        "-O",
        "vmdk",
        raw.to_str().expect("utf8"),
        vmdk.to_str().expect("utf8"),
    ]);
    let s = pushed(
        &reg,
        &vmdk,
        "vms/vmdk:1",
        &["--layout", "artifact", "--spool-dir", spool_arg],
    );
    assert_eq!(
        s["layerMediaType"],
        "application/vnd.kubevirt.disk.raw+zstd"
    );
    let blob = reg.blob_path(s["layerDigest"].as_str().expect("digest"));
    let plain = d.path().join("vmdk-blob.raw");
    sh(Command::new("zstd")
        .args(["-q", "-d", "-o"])
        .arg(&plain)
        .arg(&blob));
    assert_same_bytes(&plain, &reference);
    imports_equal(
        &reg,
        "vms/vmdk:1",
        &d.path().join("import-vmdk"),
        &reference,
    );

    // A truncated source fails in one line, tags nothing and leaves no spool.
    let out = push(
        &reg,
        Path::new(&http.url("cut.qcow2.gz")),
        "disks/cut:1",
        &["--spool-dir", spool_arg],
    );
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.lines()
            .any(|l| l.starts_with("push failed: reading http://") && l.contains("cut.qcow2.gz")),
        "{err}"
    );
    assert_eq!(spool_left(&spool), 0, "a failed push leaves no spool");
    let o = Command::new("skopeo")
        .args([
            "inspect",
            "--raw",
            "--tls-verify=false",
            "--creds",
            "user:pass",
        ])
        .arg(reg.image("disks/cut:1"))
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

#[test]
fn a_raw_disk_streams_from_http_without_a_spool_and_falls_back_when_it_cannot() {
    let d = tmp();
    let (raw, reference, www, backwards_ref) = http_disks(d.path());
    qcow2_of(&raw, &www.join("ordered.qcow2"));
    let http = HttpServer::start(&www, &[]);
    let reg = Registry::start(true, Some(("user", "pass")));
    let spool = d.path().join("spool");
    std::fs::create_dir_all(&spool).expect("mkdir");
    let spool_arg = spool.to_str().expect("utf8");
    // (source, layout, expected bytes, streams, why not). A containerDisk's tar header
    // needs the disk's size first: a qcow2 announces it, a raw.xz does not.
    let cases = [
        ("disk.raw.xz", "artifact", &reference, true, ""),
        ("ordered.qcow2", "artifact", &reference, true, ""),
        (
            "backwards.qcow2",
            "artifact",
            &backwards_ref,
            false,
            "not in guest order",
        ),
        ("ordered.qcow2", "containerdisk", &reference, true, ""),
        (
            "disk.raw.xz",
            "containerdisk",
            &reference,
            false,
            "known only at its end",
        ),
        (
            "backwards.qcow2",
            "containerdisk",
            &backwards_ref,
            false,
            "not in guest order",
        ),
    ];
    for (file, layout, want, streams, why) in cases {
        // (this umoci cannot unpack zstd layers, so the containerDisks are plain tar)
        let mut args = vec![
            "--layout",
            layout,
            "--convert",
            "raw",
            "--disk-name",
            "rootdisk",
            "--spool-dir",
            spool_arg,
        ];
        if layout == "artifact" {
            args.push("--zstd");
        }
        let repo = format!("vms/{}-{layout}:1", file.replace('.', "-"));
        let out = push(&reg, Path::new(&http.url(file)), &repo, &args);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{file} {layout}: {err}");
        let s: serde_json::Value = serde_json::from_slice(&out.stdout).expect("summary");
        let media = if layout == "artifact" {
            "application/vnd.kubevirt.disk.raw+zstd"
        } else {
            "application/vnd.oci.image.layer.v1.tar"
        };
        assert_eq!(s["layerMediaType"], media, "{file} {layout}");
        assert_eq!(s["virtualSize"], 64 << 20, "{file} {layout}");
        assert_eq!(
            err.contains("pushed as streamed"),
            streams,
            "{file} {layout}: streamed or not: {err}"
        );
        if !streams {
            assert!(err.contains(why), "{file} {layout}: {err}");
            assert!(
                err.contains("spooling the import"),
                "{file} {layout}: {err}"
            );
        }
        assert_eq!(spool_left(&spool), 0, "{file} {layout}: no spool left");
        let m = image_manifest(&reg, &repo);
        assert_eq!(m["layers"][0]["digest"], s["layerDigest"]);
        if layout == "containerdisk" {
            assert_strict_tar(
                &reg.blob_path(s["layerDigest"].as_str().expect("digest")),
                &["disk", "disk/rootdisk"],
            );
        }
        imports_equal(
            &reg,
            &repo,
            &d.path().join(format!("import-{file}-{layout}")),
            want,
        );
        if layout == "containerdisk" {
            // What other tools see: a tar whose disk/rootdisk is the raw disk.
            let dir = d.path().join(format!("unpack-{file}"));
            std::fs::create_dir_all(&dir).expect("mkdir");
            let rootfs = unpacked(&reg, &repo, &dir);
            let disk = rootfs.join("disk/rootdisk");
            assert_same_bytes(&disk, want);
            let meta = std::fs::metadata(&disk).expect("meta");
            use std::os::unix::fs::MetadataExt;
            assert_eq!((meta.uid(), meta.gid()), (107, 107), "{file}");
        }
    }
    // A local raw file is already raw: `--convert raw` pushes it from the file, as
    // `keep` would, with no spool and no second import.
    let out = push(
        &reg,
        &raw,
        "vms/local-raw:1",
        &["--convert", "raw", "--spool-dir", spool_arg],
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(!err.contains("spooling the import"), "{err}");
    imports_equal(
        &reg,
        "vms/local-raw:1",
        &d.path().join("import-local-raw"),
        &reference,
    );
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

#[test]
fn every_payload_streams_in_two_passes_without_a_spool() {
    // No --spool-dir: what one pass cannot stream (a raw source as a containerDisk, a
    // qcow2 kept from a compressed source, any disk converted to qcow2) is read twice,
    // the first pass measuring, the second streaming. Only data out of guest order
    // spools.
    let d = tmp();
    let (raw, reference, www, backwards_ref) = http_disks(d.path());
    let q = qcow2_of(&raw, &www.join("disk.qcow2"));
    sh(Command::new("gzip").args(["-k", "-1"]).arg(&q));
    let vmdk = www.join("disk.vmdk");
    qemu_img(&["convert", "-O", "vmdk", path_str(&raw), path_str(&vmdk)]);
    let http = HttpServer::start(&www, &[]);
    let reg = Registry::start(true, Some(("user", "pass")));
    let tmpdir = d.path().join("tmp");
    std::fs::create_dir_all(&tmpdir).expect("mkdir");
    let push_tmp = |source: &str, repo: &str, args: &[&str]| {
        let mut c = Command::new(bin("importer"));
        c.env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("TMPDIR", &tmpdir)
            .env("IMPORTER_ACCESS_KEY_ID", "user")
            .env("IMPORTER_SECRET_KEY", "pass")
            .args([
                "push",
                "--source",
                &http.url(source),
                "--dest",
                &reg.image(repo),
            ])
            .arg("--cert-dir")
            .arg(reg.ca_dir.as_ref().expect("tls"))
            .args(args);
        let out = c.output().expect("push");
        let err = String::from_utf8_lossy(&out.stderr).to_string();
        assert!(out.status.success(), "{source} -> {repo}: {err}");
        assert_eq!(spool_left(&tmpdir), 0, "{source}: nothing left in TMPDIR");
        let s: serde_json::Value = serde_json::from_slice(&out.stdout).expect("summary");
        (s, err)
    };
    let two_passes = |err: &str, what: &str| {
        assert!(err.contains("reading the source twice"), "{what}: {err}");
        assert!(err.contains("pushed as streamed"), "{what}: {err}");
        assert!(!err.contains("spooling the import"), "{what}: {err}");
    };

    // A qcow2 kept as it came, from a gzip'd HTTP source (its length is known only at
    // the end): disk/disk.qcow2 holds the qcow2's own bytes.
    let (s, err) = push_tmp(
        "disk.qcow2.gz",
        "two/kept:1",
        &["--disk-name", "disk.qcow2"],
    );
    two_passes(&err, "kept qcow2");
    assert_eq!(s["format"], "qcow2");
    let rootfs = unpacked(&reg, "two/kept:1", &fresh_dir(&d.path().join("u1")));
    assert_same_bytes(&rootfs.join("disk/disk.qcow2"), &q);
    // Another disk under the same tag: the digest pass finds a layer the registry does
    // not have, and the import runs again into the upload.
    let (s, err) = push_tmp(
        "backwards.qcow2",
        "two/kept:1",
        &["--disk-name", "disk.qcow2"],
    );
    assert!(err.contains("does not have this layer"), "{err}");
    assert_eq!(s["layerUploaded"], true);
    imports_equal(
        &reg,
        "two/kept:1",
        &d.path().join("import-retagged"),
        &backwards_ref,
    );

    // A raw.xz as a raw containerDisk: the tar header needs the length the first pass
    // found.
    let (s, err) = push_tmp("disk.raw.xz", "two/raw:1", &["--convert", "raw"]);
    two_passes(&err, "raw containerDisk");
    assert_eq!(s["format"], "raw");
    let rootfs = unpacked(&reg, "two/raw:1", &fresh_dir(&d.path().join("u2")));
    assert_same_bytes(&rootfs.join("disk/disk.img"), &reference);

    // A vmdk converted to qcow2 (keep's default for a remote source): laid out header
    // first from the measured clusters. qemu-img checks it, CDI's importer (qemu-img
    // convert) and ours import it.
    let (s, err) = push_tmp("disk.vmdk", "two/vmdk:1", &["--disk-name", "disk.qcow2"]);
    two_passes(&err, "vmdk as qcow2");
    assert!(err.contains("header and tables first"), "{err}");
    assert_eq!(s["format"], "qcow2");
    let info = skopeo_inspect(&reg, "two/vmdk:1");
    assert_eq!(info["Labels"]["source-image-format"], "vmdk");
    let rootfs = unpacked(&reg, "two/vmdk:1", &fresh_dir(&d.path().join("u3")));
    let disk = rootfs.join("disk/disk.qcow2");
    {
        use std::os::unix::fs::MetadataExt;
        let meta = std::fs::metadata(&disk).expect("unpacked disk");
        assert_eq!((meta.uid(), meta.gid()), (107, 107));
    }
    qemu_img(&["check", "-f", "qcow2", path_str(&disk)]);
    qemu_img(&[
        "compare",
        "-f",
        "qcow2",
        "-F",
        "raw",
        path_str(&disk),
        path_str(&reference),
    ]);
    assert_same_bytes(
        &cdi_import(&reg, "two/vmdk:1", &d.path().join("cdi")),
        &reference,
    );
    imports_equal(
        &reg,
        "two/vmdk:1",
        &d.path().join("import-vmdk"),
        &reference,
    );
    // The same push again: the tag exists, so the layer's digest is computed first and
    // the registry, which has it, gets no blob data.
    let before = blob_writes(&reg);
    let (again, err) = push_tmp("disk.vmdk", "two/vmdk:1", &["--disk-name", "disk.qcow2"]);
    assert!(err.contains("computing the layer's digest first"), "{err}");
    assert_eq!(again["layerUploaded"], false, "{again}");
    assert_eq!(again["layerDigest"], s["layerDigest"]);
    assert_eq!(again["manifestDigest"], s["manifestDigest"]);
    assert_eq!(blob_writes(&reg), before, "a repeated push wrote blob data");
    // The same disk under a new tag (issue 29: dedup on any tag): the repository has
    // tags, so the digest comes first here too and no layer data is sent.
    let started = std::time::Instant::now();
    let (other, err) = push_tmp("disk.vmdk", "two/vmdk:2", &["--disk-name", "disk.qcow2"]);
    assert!(err.contains("computing the layer's digest first"), "{err}");
    assert_eq!(other["layerUploaded"], false, "{other}");
    assert_eq!(other["layerDigest"], s["layerDigest"]);
    assert_eq!(
        blob_writes(&reg),
        before,
        "a push to a new tag wrote blob data"
    );
    eprintln!(
        "the same disk to a new tag: {:?}, no layer data",
        started.elapsed()
    );

    // The same as a zstd qcow2 containerDisk from the raw.xz.
    let (s, err) = push_tmp(
        "disk.raw.xz",
        "two/artifact:1",
        &["--convert", "qcow2", "--zstd", "--disk-name", "disk.qcow2"],
    );
    two_passes(&err, "zstd qcow2 containerDisk");
    assert_eq!(
        s["layerMediaType"],
        "application/vnd.oci.image.layer.v1.tar+zstd"
    );
    imports_equal(
        &reg,
        "two/artifact:1",
        &d.path().join("import-artifact"),
        &reference,
    );

    // Data out of guest order as raw: only a spool takes it, and says so.
    let (_, err) = push_tmp("backwards.qcow2", "two/backwards:1", &["--convert", "raw"]);
    assert!(err.contains("not in guest order"), "{err}");
    assert!(err.contains("spooling the import"), "{err}");
    imports_equal(
        &reg,
        "two/backwards:1",
        &d.path().join("import-backwards"),
        &backwards_ref,
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
