//! The S3 source against moto's S3 server on 127.0.0.1 (every request SigV4-checked):
//! right and wrong keys, path-style and virtual-hosted addressing, a CA-signed TLS
//! endpoint, dropped connections resumed by ranged GETs, and an object replaced
//! mid-download refused. Outputs compared byte for byte with `qemu-img convert`.

use ferrydisk_tests::objstore::{DropProxy, Moto};
use ferrydisk_tests::upload::Pki;
use ferrydisk_tests::*;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

/// A qcow2 (compressed clusters) and a raw.xz of the default fixture, and the oracle.
fn fixtures(dir: &Path) -> (PathBuf, PathBuf, PathBuf) {
    let raw = default_fixture(dir);
    let q = dir.join("disk.qcow2");
    qemu_img(&[
        "convert",
        "-c",
        "-f",
        "raw",
        "-O",
        "qcow2",
        raw.to_str().expect("utf8"),
        q.to_str().expect("utf8"),
    ]);
    let xz = dir.join("disk.raw.xz");
    std::fs::write(
        &xz,
        sh(Command::new("xz").args(["-1", "-T1", "-c"]).arg(&raw)).stdout,
    )
    .expect("xz");
    let reference = qemu_reference(&raw, dir);
    (q, xz, reference)
}

fn s3_import(run: &Path, endpoint: &str, keys: Option<(&str, &str)>) -> Importer {
    let mut i = Importer::new(run)
        .env("IMPORTER_SOURCE", "s3")
        .env("IMPORTER_ENDPOINT", endpoint)
        .arg("--metrics-addr")
        .arg("none");
    if let Some((k, s)) = keys {
        i = i
            .env("IMPORTER_ACCESS_KEY_ID", k)
            .env("IMPORTER_SECRET_KEY", s);
    }
    i
}

#[test]
fn sigv4_keys_and_both_addressing_styles() {
    let d = tmp();
    let (q, xz, reference) = fixtures(d.path());
    let s3 = Moto::start(d.path(), None);
    s3.put("disks", "images/disk.qcow2", &q);
    s3.put("disks", "images/disk raw.xz", &xz);
    let keys = Some((s3.access_key.as_str(), s3.secret_key.as_str()));

    // Path-style at ip:port, as CDI addresses every explicit endpoint.
    let run = tmp();
    let url = format!("{}/disks/images/disk.qcow2", s3.endpoint());
    let o = s3_import(run.path(), &url, keys).run();
    o.assert_success();
    assert_same_bytes(&run.path().join("data/disk.img"), &reference);
    assert!(o.stderr.contains("\"signed\":true"), "{}", o.stderr);

    // Virtual-hosted: the bucket in the host name (disks.localhost, resolved to the
    // loopback as RFC 6761 says), a key with a space in it.
    let run = tmp();
    let url = format!("http://localhost:{}/disks/images/disk%20raw.xz", s3.port);
    let o = s3_import(run.path(), &url, keys)
        .env("FERRYDISK_S3_ADDRESSING", "virtual")
        .run();
    o.assert_success();
    assert_same_bytes(&run.path().join("data/disk.img"), &reference);
    assert!(
        o.stderr.contains("http://disks.localhost:"),
        "the request went virtual-hosted: {}",
        o.stderr
    );

    // A wrong secret: the server's refusal, named, exit 1, nothing written.
    let run = tmp();
    let o = s3_import(
        run.path(),
        &format!("{}/disks/images/disk.qcow2", s3.endpoint()),
        Some((&s3.access_key, "not-the-secret")),
    )
    .run();
    o.assert_failure("Unable to connect to s3 data source");
    assert!(
        o.termination.contains("SignatureDoesNotMatch"),
        "{}",
        o.termination
    );
    assert!(
        !o.termination.contains("not-the-secret"),
        "{}",
        o.termination
    );
    // An unknown key, and no key at all (anonymous: refused on a private bucket).
    let o = s3_import(
        run.path(),
        &format!("{}/disks/images/disk.qcow2", s3.endpoint()),
        Some(("AKIAUNKNOWN000000000", "x")),
    )
    .run();
    o.assert_failure("403 Forbidden");
    let o = s3_import(
        run.path(),
        &format!("{}/disks/images/disk.qcow2", s3.endpoint()),
        None,
    )
    .run();
    o.assert_failure("403 Forbidden");
    assert_eq!(
        std::fs::metadata(run.path().join("data/disk.img"))
            .map(|m| m.len())
            .unwrap_or(0),
        0
    );
}

#[test]
fn ca_signed_tls_endpoint() {
    let d = tmp();
    let (q, _, reference) = fixtures(d.path());
    let pki = Pki::default();
    let s3 = Moto::start(d.path(), Some(&pki));
    s3.put("disks", "disk.qcow2", &q);
    let keys = Some((s3.access_key.as_str(), s3.secret_key.as_str()));
    let url = format!("{}/disks/disk.qcow2", s3.endpoint());
    assert!(url.starts_with("https://"));

    // Without the CA: refused by certificate verification.
    let run = tmp();
    let o = s3_import(run.path(), &url, keys).run();
    o.assert_failure("Unable to connect to s3 data source");
    assert!(
        o.termination.to_lowercase().contains("certificate"),
        "{}",
        o.termination
    );

    // IMPORTER_CERT_DIR holding the CA (CDI mounts the user's ConfigMap there).
    let certs = d.path().join("certs");
    std::fs::create_dir_all(&certs).expect("certs");
    std::fs::copy(pki.path("ca.crt"), certs.join("ca.pem")).expect("ca");
    let o = s3_import(run.path(), &url, keys)
        .env("IMPORTER_CERT_DIR", certs.to_str().expect("utf8"))
        .run();
    o.assert_success();
    assert_same_bytes(&run.path().join("data/disk.img"), &reference);
}

#[test]
fn three_dropped_connections_are_resumed_with_ranges() {
    let d = tmp();
    let raw = dense_fixture_named(d.path(), "dense.raw", 3);
    let s3 = Moto::start(d.path(), None);
    s3.put("disks", "dense.raw", &raw);
    let proxy = DropProxy::start(d.path(), s3.port, 3 << 20, 3, false);
    let run = tmp();
    let url = format!("http://127.0.0.1:{}/disks/dense.raw", proxy.port);
    let o = s3_import(run.path(), &url, Some((&s3.access_key, &s3.secret_key))).run();
    o.assert_success();
    assert_eq!(
        o.stderr.matches("connection lost, resuming").count(),
        3,
        "{}",
        o.stderr
    );
    assert_same_bytes(&run.path().join("data/disk.img"), &raw);
    let log = std::fs::read_to_string(d.path().join("moto.log")).unwrap_or_default();
    assert!(log.matches("GET /disks/dense.raw").count() >= 4, "{log}");
}

#[test]
fn an_object_replaced_mid_download_is_refused() {
    let d = tmp();
    let first = dense_fixture_named(d.path(), "first.raw", 1);
    let second = dense_fixture_named(d.path(), "second.raw", 2);
    let s3 = Moto::start(d.path(), None);
    s3.put("disks", "disk.raw", &first);
    let proxy = DropProxy::start(d.path(), s3.port, 4 << 20, 1, true);
    let run = tmp();
    let url = format!("http://127.0.0.1:{}/disks/disk.raw", proxy.port);
    let mut child = s3_import(run.path(), &url, Some((&s3.access_key, &s3.secret_key)))
        .env("RUST_LOG", "info")
        .spawn();
    proxy.wait_cut(Duration::from_secs(30));
    s3.put("disks", "disk.raw", &second); // same length, different bytes and ETag
    proxy.release();
    let code = wait_exit(&mut child, Duration::from_secs(60));
    assert_eq!(code, Some(1), "refused, not spliced");
    let term = std::fs::read_to_string(run.path().join("termination-log")).expect("term");
    assert!(term.contains("replaced during the download"), "{term}");
    assert!(!term.contains("Import Complete"));
    assert_eq!(
        std::fs::metadata(run.path().join("data/disk.img"))
            .map(|m| m.len())
            .unwrap_or(0),
        0,
        "no half-written disk"
    );
}
