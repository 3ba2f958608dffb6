//! End-to-end: containerDisks in a real `docker-registry`, built by buildah or written
//! as OCI layouts and pushed by skopeo, imported by the built `importer` and compared
//! byte for byte with `qemu-img convert -O raw` of the original disk.

use ferrydisk_tests::registry::{mkimage, Buildah, Registry};
use ferrydisk_tests::*;
use serde_json::json;
use std::path::{Path, PathBuf};
use std::process::Command;

/// A 32 MiB disk with data, as raw and as compressed qcow2, in `dir`.
fn disk(dir: &Path, pattern: u8) -> (PathBuf, PathBuf) {
    let raw = dir.join(format!("disk-{pattern:02x}.raw"));
    raw_fixture(
        &raw,
        "32M",
        &[
            (1 << 20, 3 << 20, pattern),
            ((20 << 20) + 7, 5000, pattern ^ 0xff),
        ],
    );
    let q = dir.join(format!("disk-{pattern:02x}.qcow2"));
    sh(Command::new("qemu-img")
        .args(["convert", "-c", "-f", "raw", "-O", "qcow2"])
        .arg(&raw)
        .arg(&q));
    (raw, q)
}

const CONTAINERFILE: &str = "FROM scratch\nADD disk.qcow2 /disk/\nENV INSTANCETYPE_KUBEVIRT_IO_DEFAULT_INSTANCETYPE=u1.small INSTANCETYPE_KUBEVIRT_IO_DEFAULT_PREFERENCE=fedora PATH=/bin\n";

/// A buildah-built containerDisk context: disk.qcow2 plus an unrelated file.
fn context(dir: &Path, pattern: u8) -> (PathBuf, PathBuf) {
    let ctx = dir.join(format!("ctx-{pattern:02x}"));
    std::fs::create_dir_all(&ctx).expect("ctx");
    let (raw, q) = disk(dir, pattern);
    std::fs::copy(&q, ctx.join("disk.qcow2")).expect("copy");
    std::fs::write(ctx.join("motd"), "not a disk\n").expect("motd");
    (ctx, qemu_reference(&raw, dir))
}

fn registry_import(run: &Path, reg: &Registry, repo_tag: &str) -> Importer {
    let mut i = Importer::new(run)
        .env("IMPORTER_SOURCE", "registry")
        .env("IMPORTER_ENDPOINT", &reg.image(repo_tag))
        .arg("--metrics-addr")
        .arg("none");
    if reg.ca_dir.is_none() {
        // CDI sets INSECURE_TLS for registries listed as insecure: plain HTTP fallback.
        i = i.env("INSECURE_TLS", "true");
    }
    i
}

#[test]
fn buildah_image_over_plain_http_with_labels() {
    let d = tmp();
    let (ctx, reference) = context(d.path(), 0xab);
    let reg = Registry::start(false, None);
    let b = Buildah::default();
    b.build(&ctx, CONTAINERFILE, "cd");
    b.push("cd", &reg, "cd/fedora:41", &[]);
    let run = tmp();
    let o = registry_import(run.path(), &reg, "cd/fedora:41").run();
    assert_eq!(o.code, 0, "{}\n{}", o.termination, o.stderr);
    assert_eq!(
        cdi_part(&o.termination),
        r#"{"scratchSpaceRequired":false,"preallocationApplied":false,"labels":{"instancetype.kubevirt.io/default-instancetype":"u1.small","instancetype.kubevirt.io/default-preference":"fedora"},"message":"Import Complete"}"#
    );
    assert_same_bytes(&run.path().join("data/disk.img"), &reference);
}

#[test]
fn zstd_layers_docker_v2_and_disk_in_a_later_layer() {
    let d = tmp();
    let (ctx, reference) = context(d.path(), 0x3c);
    let reg = Registry::start(false, None);
    // Base layer with other files, the disk in the layer above it. One buildah storage
    // per format: buildah reuses already-compressed blobs across pushes.
    let containerfile = "FROM scratch\nADD motd /etc/motd\nADD disk.qcow2 /disk/\n";
    for (tag, flags) in [
        ("cd/docker:1", &["--format", "docker"]),
        ("cd/zstd:1", &["--compression-format", "zstd"]),
    ] {
        let b = Buildah::default();
        b.build(&ctx, containerfile, "cd");
        b.push("cd", &reg, tag, flags);
    }
    let m = reg.raw_manifest("cd/zstd:1");
    assert_eq!(m["layers"].as_array().expect("layers").len(), 2);
    assert!(
        m["layers"][1]["mediaType"]
            .as_str()
            .expect("mt")
            .ends_with("zstd"),
        "{m}"
    );
    assert_eq!(
        reg.raw_manifest("cd/docker:1")["mediaType"],
        "application/vnd.docker.distribution.manifest.v2+json"
    );
    for tag in ["cd/zstd:1", "cd/docker:1"] {
        let run = tmp();
        let o = registry_import(run.path(), &reg, tag).run();
        assert_eq!(o.code, 0, "{tag}: {}\n{}", o.termination, o.stderr);
        assert_same_bytes(&run.path().join("data/disk.img"), &reference);
        // The layer below the one holding the disk was never asked for (the
        // registry's own access log says so).
        let (repo, _) = tag.split_once(':').expect("tag");
        let below = reg.raw_manifest(tag)["layers"][0]["digest"]
            .as_str()
            .expect("digest")
            .to_string();
        let log = std::fs::read_to_string(&reg.log).unwrap_or_default();
        let asked = format!("\"GET /v2/{repo}/blobs/{below}");
        assert!(
            !log.contains(&asked),
            "{tag}: the layer below was downloaded"
        );
    }
}

#[test]
fn whiteouts_and_the_topmost_layer_rule() {
    let d = tmp();
    let (a, _) = disk(d.path(), 0x0a);
    let (b, _) = disk(d.path(), 0x0b);
    let reg = Registry::start(false, None);
    let f = |p: &Path| p.to_str().expect("utf8").to_string();
    // bottom: disk/a.raw; middle: disk/b.raw; top: whiteout of disk/b.raw -> a is the disk.
    let layout = d.path().join("wh");
    mkimage(
        &layout,
        "v1",
        &json!({"images": [{"layers": [
            [{"path": "disk/a.raw", "file": f(&a)}],
            [{"path": "disk/b.raw", "file": f(&b)}],
            [{"path": "disk/.wh.b.raw"}, {"path": "etc/hostname", "data": "x"}]
        ]}]}),
    );
    reg.push_layout(&layout, "v1", "cd/whiteout:v1");
    let run = tmp();
    let o = registry_import(run.path(), &reg, "cd/whiteout:v1").run();
    assert_eq!(o.code, 0, "{}\n{}", o.termination, o.stderr);
    assert_same_bytes(&run.path().join("data/disk.img"), &a);

    // An opaque disk/ above hides every lower disk: no disk left.
    let layout = d.path().join("opq");
    mkimage(
        &layout,
        "v1",
        &json!({"images": [{"layers": [[{"path": "disk/a.raw", "file": f(&a)}], [{"path": "disk/.wh..wh..opq"}]]}]}),
    );
    reg.push_layout(&layout, "v1", "cd/opaque:v1");
    let o = registry_import(tmp().path(), &reg, "cd/opaque:v1").run();
    o.assert_failure("no disk found");

    // Hostile: the disk is a symlink to a host file; two disk files in one layer.
    let layout = d.path().join("sym");
    mkimage(
        &layout,
        "v1",
        &json!({"images": [{"layers": [[{"path": "disk/disk.img", "symlink": "/etc/shadow"}]]}]}),
    );
    reg.push_layout(&layout, "v1", "cd/symlink:v1");
    let o = registry_import(tmp().path(), &reg, "cd/symlink:v1").run();
    o.assert_failure("/disk/disk.img in the image is a symbolic link");
    let layout = d.path().join("two");
    mkimage(
        &layout,
        "v1",
        &json!({"images": [{"layers": [[{"path": "disk/a.raw", "file": f(&a)}, {"path": "disk/b.raw", "file": f(&b)}]]}]}),
    );
    reg.push_layout(&layout, "v1", "cd/two:v1");
    let run = tmp();
    let o = registry_import(run.path(), &reg, "cd/two:v1").run();
    o.assert_failure("more than one disk file under /disk: /disk/a.raw, /disk/b.raw");
    assert_eq!(
        std::fs::metadata(run.path().join("data/disk.img"))
            .expect("meta")
            .len(),
        0
    );
}

#[test]
fn multi_arch_index_selects_the_platform() {
    let d = tmp();
    let (amd, _) = disk(d.path(), 0xa1);
    let (arm, _) = disk(d.path(), 0xa2);
    let f = |p: &Path| p.to_str().expect("utf8").to_string();
    let layout = d.path().join("multi");
    mkimage(
        &layout,
        "v1",
        &json!({"index": true, "images": [
            {"architecture": "amd64", "env": ["KUBEVIRT_IO_ARCH=amd64"], "layers": [[{"path": "disk/disk.raw", "file": f(&amd)}]]},
            {"architecture": "arm64", "variant": "v8", "env": ["KUBEVIRT_IO_ARCH=arm64"], "layers": [[{"path": "disk/disk.raw", "file": f(&arm)}]]}
        ]}),
    );
    let reg = Registry::start(false, None);
    reg.push_layout(&layout, "v1", "cd/multi:v1");
    assert_eq!(
        reg.raw_manifest("cd/multi:v1")["manifests"]
            .as_array()
            .expect("index")
            .len(),
        2
    );
    for (arch, want, label) in [
        ("amd64", &amd, "amd64"),
        ("arm64", &arm, "arm64"),
        ("arm64/v8", &arm, "arm64"),
    ] {
        let run = tmp();
        let o = registry_import(run.path(), &reg, "cd/multi:v1")
            .env("IMPORTER_REGISTRY_IMAGE_ARCHITECTURE", arch)
            .run();
        assert_eq!(o.code, 0, "{arch}: {}\n{}", o.termination, o.stderr);
        assert!(
            o.termination
                .contains(&format!(r#""kubevirt.io/arch":"{label}""#)),
            "{}",
            o.termination
        );
        assert_same_bytes(&run.path().join("data/disk.img"), want);
    }
    // Default: the node's architecture (amd64 here).
    let run = tmp();
    registry_import(run.path(), &reg, "cd/multi:v1").run();
    if std::env::consts::ARCH == "x86_64" {
        assert_same_bytes(&run.path().join("data/disk.img"), &amd);
    }
    let o = registry_import(tmp().path(), &reg, "cd/multi:v1")
        .env("IMPORTER_REGISTRY_IMAGE_ARCHITECTURE", "s390x")
        .run();
    o.assert_failure(
        "image index offers no manifest for linux/s390x; it has: linux/amd64, linux/arm64/v8",
    );
}

#[test]
fn single_arch_image_with_another_architecture_requested() {
    let d = tmp();
    let (ctx, _) = context(d.path(), 0x44);
    let reg = Registry::start(false, None);
    let b = Buildah::default();
    b.build(&ctx, CONTAINERFILE, "cd");
    b.push("cd", &reg, "cd/single:1", &[]);
    let o = registry_import(tmp().path(), &reg, "cd/single:1")
        .env("IMPORTER_REGISTRY_IMAGE_ARCHITECTURE", "arm64")
        .run();
    o.assert_failure("doesn't match requested architecture: \"arm64\"");
}

#[test]
fn tls_with_a_private_ca_and_htpasswd_auth() {
    let d = tmp();
    let (ctx, reference) = context(d.path(), 0x77);
    let reg = Registry::start(true, Some(("alice", "s3cr3t")));
    let b = Buildah::default();
    b.build(&ctx, CONTAINERFILE, "cd");
    b.push("cd", &reg, "private/cd:1", &[]);
    let ca = reg.ca_dir.clone().expect("ca");
    let ok = |run: &Path, user: &str, pass: &str| {
        registry_import(run, &reg, "private/cd:1")
            .env("IMPORTER_CERT_DIR", ca.to_str().expect("utf8"))
            .env("IMPORTER_ACCESS_KEY_ID", user)
            .env("IMPORTER_SECRET_KEY", pass)
            .run()
    };
    let run = tmp();
    let o = ok(run.path(), "alice", "s3cr3t");
    assert_eq!(o.code, 0, "{}\n{}", o.termination, o.stderr);
    assert_same_bytes(&run.path().join("data/disk.img"), &reference);
    assert!(!o.stderr.contains("s3cr3t"));

    let o = ok(tmp().path(), "alice", "wr0ng");
    o.assert_failure("failed to pull image");
    assert!(!o.stderr.contains("wr0ng") && !o.termination.contains("wr0ng"));

    // Without the CA the registry's certificate is not trusted.
    let o = registry_import(tmp().path(), &reg, "private/cd:1")
        .env("IMPORTER_ACCESS_KEY_ID", "alice")
        .env("IMPORTER_SECRET_KEY", "s3cr3t")
        .run();
    o.assert_failure("failed to pull image");

    // Credentials from a containers auth file instead of env vars.
    let auth = d.path().join("auth.json");
    std::fs::write(
        &auth,
        json!({"auths": {reg.host(): {"auth": "YWxpY2U6czNjcjN0"}}}).to_string(),
    )
    .expect("auth file");
    let run = tmp();
    let o = registry_import(run.path(), &reg, "private/cd:1")
        .env("IMPORTER_CERT_DIR", ca.to_str().expect("utf8"))
        .env("REGISTRY_AUTH_FILE", auth.to_str().expect("utf8"))
        .run();
    assert_eq!(o.code, 0, "{}\n{}", o.termination, o.stderr);
    assert_same_bytes(&run.path().join("data/disk.img"), &reference);
}

/// With `https_proxy` set, every request to a TLS registry goes through the proxy (a
/// CONNECT tunnel per origin): the direct HTTPS transport for blobs never bypasses it.
/// Without it, the same import reads the blobs directly.
#[test]
fn an_https_proxy_carries_every_request_and_none_bypass_it() {
    let d = tmp();
    let (ctx, reference) = context(d.path(), 0x3c);
    let reg = Registry::start(true, None);
    let b = Buildah::default();
    b.build(&ctx, CONTAINERFILE, "cd");
    b.push("cd", &reg, "proxied/cd:1", &[]);
    let ca = reg.ca_dir.clone().expect("ca");
    let log = d.path().join("connect.log");
    let (mut proxy, port) = ferrydisk_tests::httpserver::spawn_support(
        "connectproxy.py",
        &["--log".as_ref(), log.as_os_str()],
    );
    let run = tmp();
    let o = registry_import(run.path(), &reg, "proxied/cd:1")
        .env("IMPORTER_CERT_DIR", ca.to_str().expect("utf8"))
        .env("https_proxy", &format!("http://127.0.0.1:{port}"))
        .run();
    assert_eq!(o.code, 0, "{}\n{}", o.termination, o.stderr);
    assert_same_bytes(&run.path().join("data/disk.img"), &reference);
    // The importer has exited: every tunnel is closed and counted.
    let mut tunnels = String::new();
    for _ in 0..50 {
        tunnels = std::fs::read_to_string(&log).unwrap_or_default();
        if tunnels.matches("BYTES").count() == tunnels.matches("CONNECT").count() {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    let _ = proxy.kill();
    let _ = proxy.wait();
    assert!(
        tunnels.contains(&format!("CONNECT {}", reg.host())),
        "no tunnel to the registry through the proxy: {tunnels:?}"
    );
    // The layer itself came through the tunnel, not around it.
    let carried: u64 = tunnels
        .lines()
        .filter_map(|l| {
            l.strip_prefix("BYTES ")?
                .split(' ')
                .nth(1)?
                .parse::<u64>()
                .ok()
        })
        .sum();
    let layer = reg.raw_manifest("proxied/cd:1")["layers"][0]["size"]
        .as_u64()
        .expect("layer size");
    assert!(
        carried > layer,
        "{carried} bytes through the proxy, the disk's layer is {layer}: {tunnels:?}"
    );

    // No proxy: the same import, read directly.
    let run = tmp();
    let o = registry_import(run.path(), &reg, "proxied/cd:1")
        .env("IMPORTER_CERT_DIR", ca.to_str().expect("utf8"))
        .run();
    assert_eq!(o.code, 0, "{}\n{}", o.termination, o.stderr);
    assert_same_bytes(&run.path().join("data/disk.img"), &reference);
}

/// `INSECURE_TLS=true` takes any certificate, as CDI's Go client does: one that is
/// self-signed with a 1024-bit RSA key (which ring will not verify a signature with)
/// is taken over TLS, not refused into the plain-HTTP fallback.
#[test]
fn an_insecure_registry_with_a_weak_self_signed_key_is_read_over_tls() {
    let d = tmp();
    let (ctx, reference) = context(d.path(), 0x5a);
    let reg = Registry::start_self_signed(1024);
    let b = Buildah::default();
    b.build(&ctx, CONTAINERFILE, "cd");
    b.push("cd", &reg, "weak/cd:1", &[]);
    let run = tmp();
    let o = registry_import(run.path(), &reg, "weak/cd:1").run();
    assert_eq!(o.code, 0, "{}\n{}", o.termination, o.stderr);
    assert_same_bytes(&run.path().join("data/disk.img"), &reference);
}

#[test]
fn tampered_blob_fails_with_a_digest_error() {
    let d = tmp();
    let (ctx, _) = context(d.path(), 0x99);
    let reg = Registry::start(false, None);
    let b = Buildah::default();
    b.build(&ctx, CONTAINERFILE, "cd");
    b.push("cd", &reg, "cd/tampered:1", &[]);
    let m = reg.raw_manifest("cd/tampered:1");
    let layer = m["layers"][0]["digest"].as_str().expect("digest");
    let path = reg.blob_path(layer);
    let mut blob = std::fs::read(&path).expect("blob");
    // The gzip header's MTIME: the layer still decompresses, only the digest is wrong.
    blob[4] ^= 0xff;
    std::fs::write(&path, blob).expect("tamper");
    let run = tmp();
    let o = registry_import(run.path(), &reg, "cd/tampered:1").run();
    o.assert_failure("digest mismatch");
    assert_eq!(
        std::fs::metadata(run.path().join("data/disk.img"))
            .expect("meta")
            .len(),
        0,
        "no disk is left behind"
    );
}

#[test]
fn local_oci_layout_oci_archive_and_docker_archive() {
    let d = tmp();
    let (ctx, reference) = context(d.path(), 0x5e);
    let reg = Registry::start(false, None);
    let b = Buildah::default();
    b.build(
        &ctx,
        "FROM scratch\nADD motd /etc/motd\nADD disk.qcow2 /disk/\nENV KUBEVIRT_IO_OS=fedora\n",
        "cd",
    );
    b.push("cd", &reg, "cd/local:1", &[]);
    let src = reg.image("cd/local:1");
    let layout = d.path().join("layout");
    let oci_tar = d.path().join("image.oci.tar");
    let docker_tar = d.path().join("image.docker.tar");
    for dest in [
        format!("oci:{}:v1", layout.display()),
        format!("oci-archive:{}:v1", oci_tar.display()),
        format!("docker-archive:{}:cd/local:1", docker_tar.display()),
    ] {
        sh(Command::new("skopeo")
            .args(["copy", "-q", "--src-tls-verify=false"])
            .arg(&src)
            .arg(&dest));
    }
    for endpoint in [
        format!("oci:{}:v1", layout.display()),
        format!("oci-archive:{}:v1", oci_tar.display()),
        format!("docker-archive:{}", docker_tar.display()),
    ] {
        let run = tmp();
        let o = Importer::new(run.path())
            .env("IMPORTER_SOURCE", "registry")
            .env("IMPORTER_ENDPOINT", &endpoint)
            .arg("--metrics-addr")
            .arg("none")
            .run();
        assert_eq!(o.code, 0, "{endpoint}: {}\n{}", o.termination, o.stderr);
        assert!(
            o.termination
                .contains(r#""labels":{"kubevirt.io/os":"fedora"}"#),
            "{endpoint}: {}",
            o.termination
        );
        assert_same_bytes(&run.path().join("data/disk.img"), &reference);
    }
    // A corrupted blob in the layout fails its digest check.
    let manifest: serde_json::Value = serde_json::from_slice(
        &sh(Command::new("skopeo")
            .args(["inspect", "--raw"])
            .arg(format!("oci:{}:v1", layout.display())))
        .stdout,
    )
    .expect("json");
    let top = manifest["layers"][1]["digest"]
        .as_str()
        .expect("digest")
        .trim_start_matches("sha256:")
        .to_string();
    let blob = layout.join("blobs/sha256").join(top);
    let mut bytes = std::fs::read(&blob).expect("blob");
    bytes[4] ^= 0xff;
    std::fs::write(&blob, bytes).expect("tamper");
    let o = Importer::new(tmp().path())
        .env("IMPORTER_SOURCE", "registry")
        .env("IMPORTER_ENDPOINT", &format!("oci:{}:v1", layout.display()))
        .arg("--metrics-addr")
        .arg("none")
        .run();
    o.assert_failure("digest mismatch");
}

#[test]
fn dropped_blob_downloads_resume_with_range() {
    let d = tmp();
    // A disk full of incompressible data, so its layer is megabytes long.
    let raw = d.path().join("noisy.raw");
    raw_fixture(&raw, "16M", &[]);
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    let noise: Vec<u8> = (0..6_000_000)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect();
    std::os::unix::fs::FileExt::write_all_at(
        &std::fs::OpenOptions::new()
            .write(true)
            .open(&raw)
            .expect("open"),
        &noise,
        1 << 20,
    )
    .expect("noise");
    let ctx = d.path().join("ctx");
    std::fs::create_dir(&ctx).expect("ctx");
    sh(Command::new("qemu-img")
        .args(["convert", "-f", "raw", "-O", "qcow2"])
        .arg(&raw)
        .arg(ctx.join("disk.qcow2")));
    let reg = Registry::start(false, None);
    let b = Buildah::default();
    b.build(&ctx, "FROM scratch\nADD disk.qcow2 /disk/\n", "cd");
    b.push("cd", &reg, "cd/flaky:1", &[]);
    // Between importer and registry: a network that breaks three times mid-blob.
    let to = reg.port.to_string();
    let (mut proxy, port) = spawn_support(
        "dropproxy.py",
        &[
            "--to".as_ref(),
            to.as_ref(),
            "--after".as_ref(),
            "300000".as_ref(),
            "--drops".as_ref(),
            "3".as_ref(),
        ],
    );
    let run = tmp();
    let o = Importer::new(run.path())
        .env("IMPORTER_SOURCE", "registry")
        .env(
            "IMPORTER_ENDPOINT",
            &format!("docker://127.0.0.1:{port}/cd/flaky:1"),
        )
        .env("INSECURE_TLS", "true")
        .arg("--metrics-addr")
        .arg("none")
        .run();
    let _ = proxy.kill();
    let _ = proxy.wait();
    assert_eq!(o.code, 0, "{}\n{}", o.termination, o.stderr);
    assert_eq!(
        o.stderr
            .matches("layer download interrupted, resuming")
            .count(),
        3,
        "{}",
        o.stderr
    );
    assert_same_bytes(&run.path().join("data/disk.img"), &raw);
}
