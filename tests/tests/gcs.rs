//! The GCS source against a stand-in on 127.0.0.1 (tests/support/gcs.py; no real GCS can
//! run here) that speaks the XML and JSON download APIs and the OAuth JWT-bearer token
//! flow, checking the RS256 signature of our assertion with the test service account's
//! public key. Outputs compared byte for byte with `qemu-img convert`.

use ferrydisk_tests::objstore::{rsa_key, DropProxy, Gcs};
use ferrydisk_tests::*;
use std::path::Path;
use std::process::Command;

fn gcs_import(run: &Path, endpoint: &str, key: Option<&Path>) -> Importer {
    let mut i = Importer::new(run)
        .env("IMPORTER_SOURCE", "gcs")
        .env("IMPORTER_ENDPOINT", endpoint)
        .arg("--metrics-addr")
        .arg("none");
    if let Some(k) = key {
        i = i.env("GOOGLE_APPLICATION_CREDENTIALS", k.to_str().expect("utf8"));
    }
    i
}

#[test]
fn service_account_token_flow_and_both_download_apis() {
    let d = tmp();
    let raw = default_fixture(d.path());
    let q = d.path().join("disk.qcow2");
    qemu_img(&[
        "convert",
        "-c",
        "-O",
        "qcow2",
        raw.to_str().expect("utf8"),
        q.to_str().expect("utf8"),
    ]);
    let reference = qemu_reference(&raw, d.path());
    let gcs = Gcs::start(d.path());
    gcs.put("private", "images/disk.qcow2", &q);

    // XML API path, with the key: one token request, then an authorized GET.
    let run = tmp();
    let url = format!("http://127.0.0.1:{}/private/images/disk.qcow2", gcs.port);
    let o = gcs_import(run.path(), &url, Some(&gcs.key_file)).run();
    o.assert_success();
    assert_same_bytes(&run.path().join("data/disk.img"), &reference);
    let log = gcs.requests();
    assert_eq!(log.matches("token issued").count(), 1, "{log}");
    assert!(
        log.contains("GET /private/images/disk.qcow2 auth=ok"),
        "{log}"
    );

    // JSON API media download.
    let run = tmp();
    let url = format!(
        "http://127.0.0.1:{}/storage/v1/b/private/o/images%2Fdisk.qcow2?alt=media",
        gcs.port
    );
    let o = gcs_import(run.path(), &url, Some(&gcs.key_file)).run();
    o.assert_success();
    assert_same_bytes(&run.path().join("data/disk.img"), &reference);

    // Without a key: anonymous, refused on a private object, 401 named.
    let run = tmp();
    let url = format!("http://127.0.0.1:{}/private/images/disk.qcow2", gcs.port);
    let o = gcs_import(run.path(), &url, None).run();
    o.assert_failure("401 Unauthorized");
    assert!(
        o.termination.contains("GOOGLE_APPLICATION_CREDENTIALS"),
        "{}",
        o.termination
    );

    // A key the token endpoint does not trust (another RSA key, same account): the
    // refusal of the token request is the error, nothing written.
    let other = d.path().join("other.key");
    rsa_key(&other);
    let mut sa: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&gcs.key_file).expect("key")).expect("json");
    sa["private_key"] = std::fs::read_to_string(&other).expect("pem").into();
    let bad = d.path().join("bad.json");
    std::fs::write(&bad, sa.to_string()).expect("bad key");
    let o = gcs_import(run.path(), &url, Some(&bad)).run();
    o.assert_failure("invalid_grant");
    assert!(gcs.requests().contains("token refused"));

    // Not a key at all.
    std::fs::write(&bad, b"{\"type\":\"authorized_user\"}").expect("bad key");
    let o = gcs_import(run.path(), &url, Some(&bad)).run();
    o.assert_failure("GCS credentials");
}

#[test]
fn public_objects_anonymously_with_drops_resumed() {
    let d = tmp();
    let raw = dense_fixture_named(d.path(), "dense.raw", 5);
    let gz = d.path().join("dense.raw.gz");
    std::fs::write(
        &gz,
        sh(Command::new("gzip").args(["-1", "-c"]).arg(&raw)).stdout,
    )
    .expect("gz");
    let gcs = Gcs::start(d.path());
    gcs.put("public", "dense.raw.gz", &gz);
    let proxy = DropProxy::start(d.path(), gcs.port, 30_000, 3, false);
    let run = tmp();
    let url = format!("http://127.0.0.1:{}/public/dense.raw.gz", proxy.port);
    let o = gcs_import(run.path(), &url, None).run();
    o.assert_success();
    assert_eq!(
        o.stderr.matches("connection lost, resuming").count(),
        3,
        "{}",
        o.stderr
    );
    assert_same_bytes(&run.path().join("data/disk.img"), &raw);
    assert!(
        gcs.requests().contains("range=bytes="),
        "{}",
        gcs.requests()
    );
}
