//! Host-assisted clone into our upload server (`x-cdi-content-type: filesystem-clone`
//! and `blockdevice-clone`), with the real CDI cloner (`../shared/cdi-peer/cdi-cloner`,
//! run by `pod-run` as its pod would be) as the client: byte-equal results, sparseness
//! kept, CDI's answers and termination messages.

use ferrydisk_tests::clone::{cdi_peer, pod_run, source_volume};
use ferrydisk_tests::upload::{upload_server, upload_server_with, Pki, Proc};
use ferrydisk_tests::*;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

/// Runs CDI's cloner on `mount` (a directory, or a file standing for a block device)
/// against `url`, with the client certificate `client` of `pki`. (exit code, its
/// termination message, its log).
fn cdi_cloner(
    pki: &Pki,
    client: &str,
    url: &str,
    content_type: &str,
    mount: &Path,
    work: &Path,
) -> (i32, String, String) {
    let bind = if mount.is_dir() {
        mount.to_path_buf()
    } else {
        mount.parent().expect("parent").to_path_buf()
    };
    let pem = |n: &str| String::from_utf8(pki.key(n)).expect("pem");
    let out = Command::new(pod_run())
        .arg(work)
        .arg(cdi_peer().join("cdi-cloner"))
        .args(["-v=3", "-content-type", content_type, "-mount"])
        .arg(mount)
        .args(["-upload-bytes", "1000000"])
        .env("POD_BINDS", &bind)
        .env("OWNER_UID", "clone-test")
        .env("CLIENT_KEY", pem(&format!("{client}.key")))
        .env("CLIENT_CERT", pem(&format!("{client}.crt")))
        .env("SERVER_CA_CERT", pem("ca.crt"))
        .env("UPLOAD_URL", url)
        .env("PREALLOCATION", "false")
        .output()
        .expect("pod-run");
    let rc = std::fs::read_to_string(work.join("rc"))
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(-1);
    let term = std::fs::read_to_string(work.join("termination-log")).unwrap_or_default();
    (rc, term, String::from_utf8_lossy(&out.stderr).into_owned())
}

/// Our upload server (with `env`) in `d/target` and CDI's cloner streaming `mount` into
/// it with the client certificate `client`: (server, its target dir, the cloner's exit
/// code, termination message and log).
fn cdi_clone_into_ours(
    pki: &Pki,
    d: &Path,
    env: &[(&str, &str)],
    client: &str,
    content_type: &str,
    mount: &Path,
) -> (Proc, PathBuf, i32, String, String) {
    let target = d.join("target");
    let server = upload_server_with(pki, &target, env);
    let url = format!("https://127.0.0.1:{}/v1beta1/upload", server.port);
    let (rc, term, log) = cdi_cloner(pki, client, &url, content_type, mount, &d.join("cloner"));
    (server, target, rc, term, log)
}

#[test]
fn cdi_cloner_filesystem_clone_into_our_upload_server() {
    let pki = Pki::default();
    let d = tmp();
    let vol = source_volume(d.path());
    let (mut server, target, rc, term, log) =
        cdi_clone_into_ours(&pki, d.path(), &[], "client", "filesystem-clone", &vol);
    assert_eq!(rc, 0, "cdi-cloner: {log}\nserver: {}", server.log());
    assert_eq!(term, "Clone Complete");
    assert_eq!(
        server.wait(Duration::from_secs(20)),
        Some(0),
        "{}",
        server.log()
    );
    assert_eq!(
        std::fs::read_to_string(target.join("termination-log")).expect("termination"),
        r#"{"preallocationApplied":true,"message":"Clone Complete"}"#
    );
    let data = target.join("data");
    assert_same_bytes(&data.join("disk.img"), &vol.join("disk.img"));
    assert_eq!(
        std::fs::read(data.join("notes.txt")).expect("notes"),
        b"a second file\n"
    );
    assert!(
        !data.join("lost+found/junk").exists(),
        "lost+found is not cloned"
    );
    // Sparse in, sparse out: 64 MiB with about 3.5 MiB of data.
    let (got, src) = (
        allocated(&data.join("disk.img")),
        allocated(&vol.join("disk.img")),
    );
    assert!(
        got <= src + (1 << 20),
        "allocated {got} bytes, the source {src}"
    );
}

#[test]
fn cdi_cloner_block_clone_into_our_upload_server() {
    let pki = Pki::default();
    let d = tmp();
    // A "device": the raw bytes of a disk that happens to look like qcow2 must be
    // written as they are, never converted.
    let raw = default_fixture(d.path());
    let dev = d.path().join("dev/source.img");
    std::fs::create_dir_all(dev.parent().expect("dir")).expect("mkdir");
    qemu_img(&[
        "convert",
        "-f",
        "raw",
        "-O",
        "qcow2",
        raw.to_str().expect("utf8"),
        dev.to_str().expect("utf8"),
    ]);
    let (mut server, target, rc, term, log) =
        cdi_clone_into_ours(&pki, d.path(), &[], "client", "blockdevice-clone", &dev);
    assert_eq!(rc, 0, "cdi-cloner: {log}\nserver: {}", server.log());
    assert_eq!(term, "Clone Complete");
    assert_eq!(
        server.wait(Duration::from_secs(20)),
        Some(0),
        "{}",
        server.log()
    );
    assert_eq!(
        std::fs::read_to_string(target.join("termination-log")).expect("termination"),
        r#"{"preallocationApplied":false,"message":"Clone Complete"}"#
    );
    assert_same_bytes(&target.join("data/disk.img"), &dev);
}

#[test]
fn clone_from_the_wrong_client_writes_nothing() {
    let pki = Pki::default();
    let d = tmp();
    let vol = source_volume(d.path());
    let (mut server, target, rc, _, _) =
        cdi_clone_into_ours(&pki, d.path(), &[], "intruder", "filesystem-clone", &vol);
    assert_ne!(rc, 0, "the cloner sees the refusal");
    assert_eq!(server.wait(Duration::from_secs(1)), None, "still waiting");
    assert!(!target.join("data/disk.img").exists());
    assert!(!target.join("data/notes.txt").exists());
}

#[test]
fn async_clone_is_refused_as_cdi_does() {
    let pki = Pki::default();
    let d = tmp();
    let target = d.path().join("target");
    let server = upload_server(&pki, &target);
    let url = format!("https://127.0.0.1:{}/v1beta1/upload-async", server.port);
    let (code, body) = ferrydisk_tests::upload::curl(
        &pki,
        &[
            "--cert",
            pki.path("client.crt").to_str().expect("utf8"),
            "--key",
            pki.path("client.key").to_str().expect("utf8"),
            "-X",
            "POST",
            "-H",
            "x-cdi-content-type: blockdevice-clone",
            "--data-binary",
            "x",
            &url,
        ],
    );
    assert_eq!(code, 500);
    assert_eq!(body, "Saving stream failed: async clone not supported");
}

#[test]
fn a_clone_stream_cut_midway_leaves_no_success_and_an_empty_target() {
    let pki = Pki::default();
    let d = tmp();
    // A snappy-framed tar of a 64 MiB disk, cut in the middle.
    let vol = source_volume(d.path());
    let mut tb = tar::Builder::new(Vec::new());
    tb.append_path_with_name(vol.join("disk.img"), "disk.img")
        .expect("tar");
    let tarball = tb.into_inner().expect("tar");
    let mut framed = Vec::new();
    {
        let mut w = snap::write::FrameEncoder::new(&mut framed);
        std::io::Write::write_all(&mut w, &tarball).expect("snappy");
    }
    framed.truncate(framed.len() / 2);
    let body = d.path().join("cut.sz");
    std::fs::write(&body, &framed).expect("write");
    let target = d.path().join("target");
    let mut server = upload_server(&pki, &target);
    let url = format!("https://127.0.0.1:{}/v1beta1/upload", server.port);
    let (code, answer) = ferrydisk_tests::upload::curl(
        &pki,
        &[
            "--cert",
            pki.path("client.crt").to_str().expect("utf8"),
            "--key",
            pki.path("client.key").to_str().expect("utf8"),
            "-X",
            "POST",
            "-H",
            "x-cdi-content-type: filesystem-clone",
            "--data-binary",
            &format!("@{}", body.display()),
            &url,
        ],
    );
    assert_eq!(code, 500, "{answer}");
    assert!(answer.starts_with("Saving stream failed: "), "{answer}");
    assert_eq!(server.wait(Duration::from_secs(1)), None, "no success");
    let left: Vec<_> = std::fs::read_dir(target.join("data"))
        .expect("data")
        .collect();
    assert!(left.is_empty(), "nothing left behind: {left:?}");
}

#[test]
fn cdi_cloner_filesystem_clone_onto_a_block_volume_writes_its_disk_img() {
    let pki = Pki::default();
    let d = tmp();
    let vol = source_volume(d.path());
    let Some(lo) = Loop::new(&d.path().join("backing"), 64 << 20) else {
        return;
    };
    let (mut server, target, rc, term, log) = cdi_clone_into_ours(
        &pki,
        d.path(),
        &[("DESTINATION", &lo.dev)],
        "client",
        "filesystem-clone",
        &vol,
    );
    assert_eq!(rc, 0, "cdi-cloner: {log}\nserver: {}", server.log());
    assert_eq!(term, "Clone Complete");
    assert_eq!(
        server.wait(Duration::from_secs(20)),
        Some(0),
        "{}",
        server.log()
    );
    assert_eq!(
        std::fs::read_to_string(target.join("termination-log")).expect("termination"),
        r#"{"preallocationApplied":false,"message":"Clone Complete"}"#
    );
    // The device held 0xff everywhere: every byte is now the disk's, holes zeroed.
    let got = d.path().join("device.copy");
    std::fs::write(&got, std::fs::read(&lo.dev).expect("read device")).expect("copy");
    assert_same_bytes(&got, &vol.join("disk.img"));
}

#[test]
fn cdi_cloner_of_an_empty_volume_completes() {
    let pki = Pki::default();
    let d = tmp();
    let vol = d.path().join("empty");
    std::fs::create_dir_all(vol.join("lost+found")).expect("mkdir");
    let (mut server, target, rc, term, log) =
        cdi_clone_into_ours(&pki, d.path(), &[], "client", "filesystem-clone", &vol);
    assert_eq!(rc, 0, "cdi-cloner: {log}\nserver: {}", server.log());
    assert_eq!(term, "Clone Complete");
    assert_eq!(
        server.wait(Duration::from_secs(20)),
        Some(0),
        "{}",
        server.log()
    );
    assert_eq!(
        std::fs::read_dir(target.join("data"))
            .expect("data")
            .count(),
        0
    );
}

#[test]
fn cdi_cloner_block_clone_onto_a_block_volume() {
    let pki = Pki::default();
    let d = tmp();
    let raw = default_fixture(d.path());
    let dev = d.path().join("dev/source.img");
    std::fs::create_dir_all(dev.parent().expect("dir")).expect("mkdir");
    std::fs::copy(&raw, &dev).expect("copy");
    let Some(lo) = Loop::new(&d.path().join("backing"), 64 << 20) else {
        return;
    };
    let (mut server, _, rc, term, log) = cdi_clone_into_ours(
        &pki,
        d.path(),
        &[("DESTINATION", &lo.dev)],
        "client",
        "blockdevice-clone",
        &dev,
    );
    assert_eq!(rc, 0, "cdi-cloner: {log}\nserver: {}", server.log());
    assert_eq!(term, "Clone Complete");
    assert_eq!(
        server.wait(Duration::from_secs(20)),
        Some(0),
        "{}",
        server.log()
    );
    // The device held 0xff everywhere: the source's holes are zeroed on it.
    let got = d.path().join("device.copy");
    std::fs::write(&got, std::fs::read(&lo.dev).expect("read device")).expect("copy");
    assert_same_bytes(&got, &raw);
}
