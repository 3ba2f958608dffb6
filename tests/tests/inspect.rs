//! `importer inspect` (issue #14 item 6) against the tools registry users check with:
//! `qemu-img info` for the disk, `sha256sum` for the stream, `skopeo inspect` for the
//! image (digest, layers, labels, Env) in a real `docker-registry` with TLS and
//! htpasswd, and a multi-arch index's platforms. Nothing is written anywhere.

use ferrydisk_tests::registry::{mkimage, Buildah, Registry};
use ferrydisk_tests::*;
use serde_json::{json, Value};
use std::path::Path;
use std::process::{Command, Output};

fn inspect(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut c = Command::new(bin("importer"));
    c.arg("inspect").args(args);
    for (k, v) in env {
        c.env(k, v);
    }
    c.output().expect("run importer inspect")
}

fn inspected(args: &[&str], env: &[(&str, &str)]) -> Value {
    let o = inspect(args, env);
    assert!(
        o.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    serde_json::from_slice(&o.stdout).expect("inspect prints JSON")
}

fn qemu_info(img: &Path) -> Value {
    let o = sh(Command::new("qemu-img")
        .args(["info", "--output=json"])
        .arg(img));
    serde_json::from_slice(&o.stdout).expect("json")
}

fn sha256_file(p: &Path) -> String {
    let o = sh(Command::new("sha256sum").arg(p));
    let hex = String::from_utf8_lossy(&o.stdout);
    format!("sha256:{}", hex.split_whitespace().next().expect("digest"))
}

#[test]
fn files_and_http_agree_with_qemu_img_info_and_sha256sum() {
    let d = tmp();
    let raw = patterned_disk(d.path());
    let q = qcow2_of(&raw, &d.path().join("disk.qcow2"));
    let xz = d.path().join("disk.qcow2.xz");
    let out = sh(Command::new("xz").args(["-1", "-T1", "-c"]).arg(&q)).stdout;
    std::fs::write(&xz, out).expect("write");
    let vhd = d.path().join("disk.vhd");
    qemu_img(&[
        "convert",
        "-f",
        "raw",
        "-O",
        "vpc",
        raw.to_str().expect("utf8"),
        vhd.to_str().expect("utf8"),
    ]);
    let server = HttpServer::start(d.path(), &[]);
    let qinfo = qemu_info(&q);
    for (source, layers, image, wire) in [
        (server.url("disk.qcow2.xz"), json!(["xz"]), &q, &xz),
        (
            xz.to_str().expect("utf8").to_string(),
            json!(["xz"]),
            &q,
            &xz,
        ),
        (server.url("disk.qcow2"), json!([]), &q, &q),
        (format!("file://{}", vhd.display()), json!([]), &vhd, &vhd),
    ] {
        let v = inspected(&[&source], &[]);
        let info = qemu_info(image);
        assert_eq!(v["format"], info["format"], "{source}: {v}");
        assert_eq!(v["virtual-size"], info["virtual-size"], "{source}: {v}");
        assert_eq!(v["layers"], layers, "{source}: {v}");
        assert_eq!(
            v["image-size"].as_u64(),
            Some(std::fs::metadata(image).expect("meta").len()),
            "{source}: {v}"
        );
        assert_eq!(
            v["source-size"].as_u64(),
            Some(std::fs::metadata(wire).expect("meta").len()),
            "{source}: {v}"
        );
        assert_eq!(v["sha256"], sha256_file(wire), "{source}: {v}");
    }
    assert_eq!(qinfo["format"], "qcow2");
    // The table form says the same.
    let o = inspect(&["-o", "table", &server.url("disk.qcow2.xz")], &[]);
    assert!(o.status.success());
    let t = String::from_utf8_lossy(&o.stdout);
    assert!(
        t.lines()
            .any(|l| l.starts_with("format") && l.ends_with("qcow2")),
        "{t}"
    );
    assert!(
        t.lines()
            .any(|l| l.starts_with("virtual-size")
                && l.ends_with(&qinfo["virtual-size"].to_string())),
        "{t}"
    );
}

#[test]
fn refused_images_are_refused_with_one_line() {
    let d = tmp();
    let secret = d.path().join("host-secret.raw");
    std::fs::write(&secret, vec![0x42u8; 1 << 20]).expect("secret");
    let backing = d.path().join("backing.qcow2");
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        secret.to_str().expect("utf8"),
        "-F",
        "raw",
        backing.to_str().expect("utf8"),
        "64M",
    ]);
    let o = inspect(&[backing.to_str().expect("utf8")], &[]);
    assert_eq!(o.status.code(), Some(1));
    assert!(o.stdout.is_empty(), "nothing on stdout for a refusal");
    let err = String::from_utf8_lossy(&o.stderr);
    let last = err.lines().last().unwrap_or("");
    assert!(
        last.starts_with("inspect failed: ") && last.contains("backing file"),
        "{err}"
    );
    let o = inspect(&["docker://127.0.0.1:1/nothing:here"], &[]);
    assert_eq!(o.status.code(), Some(1));
}

#[test]
fn registry_images_agree_with_skopeo_inspect() {
    let d = tmp();
    let raw = patterned_disk(d.path());
    let ctx = d.path().join("ctx");
    std::fs::create_dir_all(&ctx).expect("ctx");
    let q = qcow2_of(&raw, &ctx.join("disk.qcow2"));
    let reg = Registry::start(true, Some(("user", "pass")));
    let b = Buildah::default();
    b.build(
        &ctx,
        "FROM scratch\nADD disk.qcow2 /disk/\nENV INSTANCETYPE_KUBEVIRT_IO_DEFAULT_INSTANCETYPE=u1.small\nLABEL org.example.os=fedora\n",
        "cd",
    );
    b.push("cd", &reg, "cd/fedora:41", &[]);
    let ca = reg.ca_dir.clone().expect("tls registry");
    let env = [
        ("IMPORTER_ACCESS_KEY_ID", "user"),
        ("IMPORTER_SECRET_KEY", "pass"),
        ("IMPORTER_CERT_DIR", ca.to_str().expect("utf8")),
    ];
    let v = inspected(&[&reg.image("cd/fedora:41")], &env);
    let sk = sh(Command::new("skopeo")
        .args(["inspect", "--tls-verify=false", "--creds", "user:pass"])
        .arg(reg.image("cd/fedora:41")));
    let sk: Value = serde_json::from_slice(&sk.stdout).expect("skopeo json");
    let img = &v["image"];
    assert_eq!(img["digest"], sk["Digest"], "{v}");
    let ours: Vec<&Value> = img["layers"]
        .as_array()
        .expect("layers")
        .iter()
        .map(|l| &l["digest"])
        .collect();
    let theirs: Vec<&Value> = sk["Layers"].as_array().expect("Layers").iter().collect();
    assert_eq!(ours, theirs, "{v}");
    assert_eq!(img["config-labels"], sk["Labels"], "{v}");
    assert_eq!(img["env"], sk["Env"], "{v}");
    assert_eq!(
        v["pvc-labels"],
        json!({"instancetype.kubevirt.io/default-instancetype": "u1.small"})
    );
    let info = qemu_info(&q);
    assert_eq!(v["format"], "qcow2");
    assert_eq!(v["virtual-size"], info["virtual-size"]);
    assert_eq!(v["tar-entry"], "disk/disk.qcow2");
    assert_eq!(
        v["image-size"].as_u64(),
        Some(std::fs::metadata(&q).expect("meta").len())
    );
}

#[test]
fn a_multi_arch_index_lists_its_platforms() {
    let d = tmp();
    let raw = patterned_disk(d.path());
    let f = raw.to_str().expect("utf8").to_string();
    let layout = d.path().join("multi");
    mkimage(
        &layout,
        "v1",
        &json!({"index": true, "images": [
            {"architecture": "amd64", "layers": [[{"path": "disk/disk.raw", "file": f}]]},
            {"architecture": "arm64", "variant": "v8", "layers": [[{"path": "disk/disk.raw", "file": f}]]}
        ]}),
    );
    let reg = Registry::start(false, None);
    reg.push_layout(&layout, "v1", "cd/multi:v1");
    let v = inspected(
        &[&reg.image("cd/multi:v1")],
        &[
            ("INSECURE_TLS", "true"),
            ("IMPORTER_REGISTRY_IMAGE_ARCHITECTURE", "arm64"),
        ],
    );
    assert_eq!(
        v["image"]["platforms"],
        json!(["linux/amd64", "linux/arm64/v8"]),
        "{v}"
    );
    // The index's digest, as skopeo computes it from the raw manifest.
    let rawm = sh(Command::new("skopeo")
        .args(["inspect", "--raw", "--tls-verify=false"])
        .arg(reg.image("cd/multi:v1")))
    .stdout;
    let p = d.path().join("index.json");
    std::fs::write(&p, rawm).expect("write");
    assert_eq!(v["image"]["digest"], sha256_file(&p), "{v}");
    assert_eq!(v["format"], "raw");
    assert_eq!(
        v["virtual-size"].as_u64(),
        Some(std::fs::metadata(&raw).expect("meta").len())
    );
}
