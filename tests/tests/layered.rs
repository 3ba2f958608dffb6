//! Layered qcow2 images (issue #14 item 3): a virter-style image written by the test as
//! an OCI layout, each layer a gzip'd `qemu-img create -b` overlay of the one below
//! (relative backing name `./virter:layer:sha256:<diff id>`) grown with `qemu-io`
//! writes, pushed with skopeo to the real docker-registry and imported. The disk must
//! be exactly `qemu-img convert` of the top overlay; a chain whose backing name leaves
//! the image, or names a layer that is not the one below, is refused with nothing
//! written.

use ferrydisk_tests::registry::{mkimage, Registry};
use ferrydisk_tests::*;
use serde_json::json;
use std::path::{Path, PathBuf};
use std::process::Command;

const VIRTER_LAYER: &str = "application/vnd.com.linbit.virter.layer.v1.qcow2.gzip";

fn sha256_hex(data: &[u8]) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(data))
}

fn qemu_io(dir: &Path, img: &str, cmds: &[&str]) {
    let mut c = Command::new("qemu-io");
    c.current_dir(dir).args(["-f", "qcow2"]);
    for cmd in cmds {
        c.args(["-c", cmd]);
    }
    sh(c.arg(img));
}

/// Builds the chain in `dir`: base, mid (over base), top (over mid), each named as
/// virter names layers so qemu resolves the chain; returns the qcow2 files, bottom
/// first, and their diff ids.
fn chain(dir: &Path, mid_backing: Option<&str>) -> Vec<(PathBuf, String)> {
    let mut out = Vec::new();
    let create = |name: &str, backing: Option<&str>| {
        let mut c = Command::new("qemu-img");
        c.current_dir(dir).args(["create", "-q", "-f", "qcow2"]);
        if let Some(b) = backing {
            c.args(["-u", "-b", b, "-F", "qcow2"]);
        }
        sh(c.arg(name).arg("64M"));
    };
    let settle = |name: &str, out: &mut Vec<(PathBuf, String)>| {
        let p = dir.join(name);
        let id = format!("sha256:{}", sha256_hex(&std::fs::read(&p).expect("read")));
        // The name the layer above uses for it, so qemu resolves the chain here.
        std::fs::copy(&p, dir.join(format!("virter:layer:{id}"))).expect("copy");
        out.push((p, id));
    };
    create("base.qcow2", None);
    qemu_io(
        dir,
        "base.qcow2",
        &[
            "write -q -P 0xaa 0 4M",
            "write -q -P 0xbb 10M 2M",
            "write -q -P 0xcc 60M 4M",
        ],
    );
    settle("base.qcow2", &mut out);
    let base_name = format!("./virter:layer:{}", out[0].1);
    create("mid.qcow2", Some(mid_backing.unwrap_or(&base_name)));
    if mid_backing.is_none() {
        qemu_io(
            dir,
            "mid.qcow2",
            &[
                "write -q -P 0x11 2M 1M",
                "write -q -z 10M 64k",
                "write -q -P 0x22 30M 3M",
                "write -q -P 0x33 12345 777",
            ],
        );
    }
    settle("mid.qcow2", &mut out);
    let mid_name = format!("./virter:layer:{}", out[1].1);
    create("top.qcow2", Some(&mid_name));
    qemu_io(
        dir,
        "top.qcow2",
        &[
            "write -q -P 0x44 0 64k",
            "write -q -P 0x55 31M 64k",
            "write -q -z 61M 1M",
        ],
    );
    settle("top.qcow2", &mut out);
    out
}

/// An OCI layout holding the chain as virter layers (gzip'd qcow2, bottom first).
fn layout(dir: &Path, layers: &[(PathBuf, String)]) -> PathBuf {
    let root = dir.join("layout");
    let blobs = root.join("blobs/sha256");
    std::fs::create_dir_all(&blobs).expect("mkdir");
    let put = |data: &[u8]| {
        let hex = sha256_hex(data);
        std::fs::write(blobs.join(&hex), data).expect("blob");
        (format!("sha256:{hex}"), data.len())
    };
    let mut descs = Vec::new();
    for (p, _) in layers {
        let gz = sh(Command::new("gzip").args(["-1", "-c", "-n"]).arg(p)).stdout;
        let (digest, size) = put(&gz);
        descs.push(json!({"mediaType": VIRTER_LAYER, "digest": digest, "size": size}));
    }
    let config = serde_json::to_vec(&json!({
        "architecture": "amd64",
        "os": "linux",
        "rootfs": {"type": "layers", "diff_ids": layers.iter().map(|(_, id)| id.clone()).collect::<Vec<_>>()},
    }))
    .expect("json");
    let (cdigest, csize) = put(&config);
    let manifest = serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": cdigest, "size": csize},
        "layers": descs,
    }))
    .expect("json");
    let (mdigest, msize) = put(&manifest);
    std::fs::write(
        root.join("oci-layout"),
        br#"{"imageLayoutVersion":"1.0.0"}"#,
    )
    .expect("w");
    std::fs::write(
        root.join("index.json"),
        serde_json::to_vec(&json!({"schemaVersion": 2, "manifests": [{
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "digest": mdigest, "size": msize,
            "annotations": {"org.opencontainers.image.ref.name": "v1"},
        }]}))
        .expect("json"),
    )
    .expect("index");
    root
}

fn import(run: &Path, endpoint: &str) -> Outcome {
    Importer::new(run)
        .env("IMPORTER_SOURCE", "registry")
        .env("IMPORTER_ENDPOINT", endpoint)
        .env("INSECURE_TLS", "true")
        .arg("--metrics-addr")
        .arg("none")
        .run()
}

#[test]
fn a_virter_image_flattens_to_qemu_img_convert_of_its_top_overlay() {
    let d = tmp();
    let layers = chain(d.path(), None);
    let reference = d.path().join("reference.raw");
    sh(Command::new("qemu-img")
        .current_dir(d.path())
        .args(["convert", "-O", "raw", "top.qcow2"])
        .arg(&reference));
    let root = layout(d.path(), &layers);
    // From the layout itself, and pushed by skopeo into the registry.
    let run = tmp();
    let o = import(run.path(), &format!("oci:{}:v1", root.display()));
    o.assert_success();
    assert!(o.stderr.contains("flattening its layers"), "{}", o.stderr);
    assert_same_bytes(&run.path().join("data/disk.img"), &reference);

    let reg = Registry::start(false, None);
    reg.push_layout(&root, "v1", "virter/img:v1");
    let m = reg.raw_manifest("virter/img:v1");
    assert_eq!(m["layers"][0]["mediaType"], VIRTER_LAYER);
    let run = tmp();
    import(run.path(), &reg.image("virter/img:v1")).assert_success();
    assert_same_bytes(&run.path().join("data/disk.img"), &reference);

    // qcow2 output of the flattened image: qemu-img check clean, compare identical.
    let run = tmp();
    Importer::new(run.path())
        .env("IMPORTER_SOURCE", "registry")
        .env("IMPORTER_ENDPOINT", &format!("oci:{}:v1", root.display()))
        .arg("--metrics-addr")
        .arg("none")
        .arg("--output-format")
        .arg("qcow2")
        .run()
        .assert_success();
    let out = run.path().join("data/disk.img");
    sh(Command::new("qemu-img")
        .args(["check", "-f", "qcow2"])
        .arg(&out));
    sh(Command::new("qemu-img")
        .args(["compare", "-f", "raw", "-F", "qcow2"])
        .arg(&reference)
        .arg(&out));
}

#[test]
fn a_backing_name_outside_the_image_or_not_the_layer_below_is_refused() {
    // The middle layer names a host file.
    let d = tmp();
    let secret = d.path().join("host-secret.qcow2");
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        secret.to_str().expect("utf8"),
        "64M",
    ]);
    let layers = chain(d.path(), Some(secret.to_str().expect("utf8")));
    let root = layout(d.path(), &layers);
    let run = tmp();
    let o = import(run.path(), &format!("oci:{}:v1", root.display()));
    o.assert_failure("not a layer of this image");
    let disk = std::fs::read(run.path().join("data/disk.img")).unwrap_or_default();
    assert!(disk.is_empty(), "nothing written for a refused chain");

    // The top names a layer that is not the one below it (layers swapped).
    let d = tmp();
    let mut layers = chain(d.path(), None);
    layers.swap(0, 1);
    let root = layout(d.path(), &layers);
    let run = tmp();
    let o = import(run.path(), &format!("oci:{}:v1", root.display()));
    assert_eq!(o.code, 1, "{}\n{}", o.termination, o.stderr);
    assert!(
        o.termination.contains("names backing layer")
            || o.termination.contains("not a layer of this image")
            || o.termination.contains("bottom layer"),
        "{}",
        o.termination
    );
    let disk = std::fs::read(run.path().join("data/disk.img")).unwrap_or_default();
    assert!(disk.is_empty(), "nothing written for a refused chain");
}

/// A containerDisk chain in `dir`: base.qcow2 <- mid.qcow2 (backing `base.qcow2`) <-
/// top.qcow2 (backing `./mid.qcow2`), each grown with qemu-io writes that overlap the
/// ones below (data, zeroes over data, unaligned). Returns the raw reference of the top.
fn disk_chain(dir: &Path) -> PathBuf {
    let create = |name: &str, backing: Option<&str>| {
        let mut c = Command::new("qemu-img");
        c.current_dir(dir).args(["create", "-q", "-f", "qcow2"]);
        if let Some(b) = backing {
            c.args(["-b", b, "-F", "qcow2"]);
        }
        sh(c.arg(name).arg("64M"));
    };
    create("base.qcow2", None);
    qemu_io(
        dir,
        "base.qcow2",
        &["write -q -P 0x11 0 8M", "write -q -P 0x22 40M 8M"],
    );
    create("mid.qcow2", Some("base.qcow2"));
    qemu_io(
        dir,
        "mid.qcow2",
        &[
            "write -q -P 0x33 4M 2M",
            "write -q -z 41M 1M",
            "write -q -P 0x44 63M 1M",
        ],
    );
    create("top.qcow2", Some("./mid.qcow2"));
    qemu_io(
        dir,
        "top.qcow2",
        &[
            "write -q -P 0x55 5M 4096",
            "write -q -z 0 64K",
            "write -q -P 0x66 44M 3M",
        ],
    );
    qemu_reference(&dir.join("top.qcow2"), dir)
}

#[test]
fn a_containerdisk_overlay_chain_flattens_in_any_layer_and_tar_order() {
    let d = tmp();
    let reference = disk_chain(d.path());
    let f = |n: &str| d.path().join(n).to_str().expect("utf8").to_string();
    let e = |n: &str| json!({"path": format!("disk/{n}"), "file": f(n)});
    let reg = Registry::start(false, None);
    let cases = [
        (
            "one layer, base first",
            json!([[e("base.qcow2"), e("mid.qcow2"), e("top.qcow2")]]),
        ),
        (
            "one layer, top first",
            json!([[e("top.qcow2"), e("mid.qcow2"), e("base.qcow2")]]),
        ),
        (
            "a layer each",
            json!([[e("base.qcow2")], [e("mid.qcow2")], [e("top.qcow2")]]),
        ),
        (
            "top over a two-file layer",
            json!([[e("mid.qcow2"), e("base.qcow2")], [e("top.qcow2")]]),
        ),
    ];
    for (i, (what, layers)) in cases.into_iter().enumerate() {
        let root = d.path().join(format!("layout{i}"));
        mkimage(&root, "v1", &json!({"images": [{"layers": layers}]}));
        let repo = format!("chain/case{i}:v1");
        reg.push_layout(&root, "v1", &repo);
        let run = tmp();
        let o = import(run.path(), &reg.image(&repo));
        assert_eq!(o.code, 0, "{what}: {}\n{}", o.termination, o.stderr);
        assert!(
            o.stderr.contains("flattening the overlay chain top-down"),
            "{what}: {}",
            o.stderr
        );
        assert_same_bytes(&run.path().join("data/disk.img"), &reference);
    }
    // qcow2 output of a flattened chain is a clean qcow2 of the same disk.
    let run = tmp();
    let o = Importer::new(run.path())
        .env("IMPORTER_SOURCE", "registry")
        .env("IMPORTER_ENDPOINT", &reg.image("chain/case0:v1"))
        .env("INSECURE_TLS", "true")
        .arg("--output-format")
        .arg("qcow2")
        .arg("--metrics-addr")
        .arg("none")
        .run();
    o.assert_success();
    let out = run.path().join("data/disk.img");
    qemu_img(&["check", "-q", "-f", "qcow2", out.to_str().expect("utf8")]);
    qemu_img(&[
        "compare",
        "-q",
        "-f",
        "qcow2",
        "-F",
        "raw",
        out.to_str().expect("utf8"),
        reference.to_str().expect("utf8"),
    ]);
}

#[test]
fn a_containerdisk_chain_leaving_the_image_is_refused_with_nothing_written() {
    let d = tmp();
    disk_chain(d.path());
    let f = |n: &str| d.path().join(n).to_str().expect("utf8").to_string();
    // Next to base.qcow2, overlays whose backing file is a host path, a path climbing
    // out of /disk (twice), a file not in the image; and a second, independent disk.
    let backings = [
        Some("/etc/base.qcow2"),
        Some("../base.qcow2"),
        Some("top.qcow2"),
        Some("/disk/../etc/base.qcow2"),
        None,
    ];
    for (i, backing) in backings.into_iter().enumerate() {
        let name = format!("bad{i}.qcow2");
        let mut c = Command::new("qemu-img");
        c.current_dir(d.path())
            .args(["create", "-q", "-f", "qcow2"]);
        if let Some(b) = backing {
            c.args(["-u", "-b", b, "-F", "qcow2"]);
        }
        sh(c.arg(&name).arg("64M"));
        let root = d.path().join(format!("bad-layout{i}"));
        let layers = json!([[
            {"path": "disk/base.qcow2", "file": f("base.qcow2")},
            {"path": format!("disk/{name}"), "file": f(&name)},
        ]]);
        mkimage(&root, "v1", &json!({"images": [{"layers": layers}]}));
        let run = tmp();
        let o = import(run.path(), &format!("oci:{}:v1", root.display()));
        assert_ne!(o.code, 0, "{backing:?}: {}", o.stderr);
        let want = match backing {
            Some(_) => "backing files outside the image are refused",
            None => "more than one disk file under /disk: /disk/base.qcow2, /disk/bad4.qcow2",
        };
        assert!(
            o.termination.contains(want),
            "{backing:?}: {}",
            o.termination
        );
        let disk = std::fs::read(run.path().join("data/disk.img")).unwrap_or_default();
        assert!(disk.iter().all(|&b| b == 0), "{backing:?}: nothing written");
    }
}
