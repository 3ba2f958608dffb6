//! The static binaries (scripts/build-static) in an empty root: only /etc/hosts and
//! /etc/resolv.conf, as in a FROM-scratch image or a containerDisk the disk server is
//! injected into. No dynamic loader, no NSS, no /dev/urandom.

use ferrydisk_tests::registry::{Buildah, Registry};
use ferrydisk_tests::*;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// An empty root with the binaries, /etc/hosts mapping `registry.ferrydisk.test`.
fn empty_root(bins: &Path, dir: &Path) -> PathBuf {
    let r = dir.join("root");
    for sub in ["etc", "data", "disk", "shared"] {
        std::fs::create_dir_all(r.join(sub)).expect("mkdir");
    }
    std::fs::write(
        r.join("etc/hosts"),
        "127.0.0.1 localhost\n127.0.0.1 registry.ferrydisk.test\n",
    )
    .expect("hosts");
    std::fs::write(r.join("etc/resolv.conf"), "nameserver 127.0.0.1\n").expect("resolv");
    std::fs::copy(bins.join("importer"), r.join("importer")).expect("importer");
    std::fs::copy(bins.join("uploadproxy"), r.join("uploadproxy")).expect("uploadproxy");
    // CDI's init container copies the disk server to /shared/server.
    std::fs::copy(bins.join("serve-disk"), r.join("shared/server")).expect("server");
    r
}

/// The node-pull server is copied into every containerDisk pod (CDI's is 10 MB).
const MAX_DISK_SERVER_BYTES: u64 = 2_000_000;
/// The most memory it may hold while serving a disk.
const MAX_DISK_SERVER_RSS_KIB: u64 = 4096;

#[test]
fn binaries_are_static() {
    let Some(bins) = static_dir() else { return };
    let server = std::fs::metadata(bins.join("serve-disk"))
        .expect("serve-disk")
        .len();
    assert!(
        server <= MAX_DISK_SERVER_BYTES,
        "serve-disk is {server} bytes"
    );
    for b in ["importer", "uploadproxy", "serve-disk"] {
        let out = Command::new("ldd").arg(bins.join(b)).output().expect("ldd");
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            text.contains("statically linked") || text.contains("not a dynamic executable"),
            "{b}: {text}"
        );
        eprintln!(
            "{b}: {} bytes, static",
            std::fs::metadata(bins.join(b)).expect("size").len()
        );
    }
}

#[test]
fn the_disk_server_serves_from_an_empty_root_in_little_memory() {
    let Some(bins) = static_dir() else { return };
    let d = tempfile::tempdir().expect("tmp");
    let root = empty_root(&bins, d.path());
    let raw = d.path().join("disk.raw");
    raw_fixture(&raw, "8M", &[(4096, 100_000, 0x77)]);
    std::fs::copy(&raw, root.join("disk/disk.img")).expect("disk");

    // The disk server, as CDI starts it inside the containerDisk container.
    let port = free_port();
    let mut srv = Command::new("chroot")
        .arg(&root)
        .args([
            "/shared/server",
            "-p",
            &port.to_string(),
            "-image-dir",
            "/disk",
            "-ready-file",
            "/shared/ready",
            "-done-file",
            "/shared/done",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("chroot");
    let deadline = Instant::now() + Duration::from_secs(10);
    while !root.join("shared/ready").exists() {
        assert!(
            Instant::now() < deadline && srv.try_wait().expect("wait").is_none(),
            "server did not get ready"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let got = d.path().join("served.img");
    sh(Command::new("curl")
        .args(["-sSf", "-o"])
        .arg(&got)
        .arg(format!("http://127.0.0.1:{port}/disk.img")));
    assert_same_bytes(&got, &raw);
    // chroot execs the server: its pid is the server's.
    let status = std::fs::read_to_string(format!("/proc/{}/status", srv.id())).expect("status");
    let hwm: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmHWM");
    eprintln!("serve-disk peak RSS serving an 8 MiB disk: {hwm} KiB");
    assert!(
        hwm <= MAX_DISK_SERVER_RSS_KIB,
        "serve-disk peak RSS {hwm} KiB"
    );
    std::fs::write(root.join("shared/done"), "").expect("done");
    assert_eq!(
        wait_exit(&mut srv, Duration::from_secs(10)),
        Some(0),
        "the done file stops the server"
    );
}

#[test]
fn the_importer_and_the_proxy_run_in_an_empty_root() {
    let Some(bins) = static_dir() else { return };
    let d = tempfile::tempdir().expect("tmp");
    let root = empty_root(&bins, d.path());
    let raw = d.path().join("disk.raw");
    raw_fixture(&raw, "8M", &[(4096, 100_000, 0x77)]);

    // The importer, resolving the registry's name from /etc/hosts alone.
    let reg = Registry::start(false, None);
    let ctx = qcow2_context(d.path(), &raw);
    let b = Buildah::default();
    b.build(&ctx, "FROM scratch\nADD disk.qcow2 /disk/\n", "cd");
    b.push("cd", &reg, "cd/static:1", &[]);
    let out = Command::new("chroot")
        .arg(&root)
        .arg("/importer")
        .args([
            "--data-dir",
            "/data",
            "--termination-log",
            "/termination-log",
            "--metrics-addr",
            "127.0.0.1:0",
            "--block-device",
            "/no-device",
        ])
        .env_clear()
        .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin") // to find chroot; the root has none
        .env("IMPORTER_SOURCE", "registry")
        .env(
            "IMPORTER_ENDPOINT",
            format!("docker://registry.ferrydisk.test:{}/cd/static:1", reg.port),
        )
        .env("INSECURE_TLS", "true")
        .env("PREALLOCATION", "false")
        .output()
        .expect("chroot importer");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(
        stderr.contains("serving progress metric over HTTPS"),
        "the self-signed metrics cert needs randomness: {stderr}"
    );
    assert_same_bytes(&root.join("data/disk.img"), &raw);

    let out = Command::new("chroot")
        .arg(&root)
        .args(["/uploadproxy", "--version"])
        .output()
        .expect("chroot uploadproxy");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
