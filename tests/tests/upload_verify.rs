//! Verified uploads and upload progress: real `curl` -> `uploadproxy` -> `importer
//! upload-server`, digests given as the `checksum` query parameter, an `X-Checksum`
//! header or an RFC 9530 `Content-Digest`, and the upload server's progress metric
//! scraped while a rate-limited `curl -T` is in flight.

use ferrydisk_tests::token::{mint, Claims};
use ferrydisk_tests::upload::{curl, proxy, upload_server, Mode, Pki, Proc};
use ferrydisk_tests::*;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

fn fixture(dir: &Path) -> PathBuf {
    let raw = dir.join("disk.raw");
    raw_fixture(
        &raw,
        "24M",
        &[(1 << 20, 3 << 20, 0xab), ((12 << 20) + 5, 90_000, 0x42)],
    );
    raw
}

/// `sha256sum`-style hex digest of `file` by a coreutils tool.
fn hex_of(tool: &str, file: &Path) -> String {
    let out = sh(Command::new(tool).arg(file)).stdout;
    String::from_utf8_lossy(&out)
        .split_whitespace()
        .next()
        .expect("digest")
        .to_string()
}

fn sha512_base64(file: &Path) -> String {
    let out = sh(Command::new("sh").arg("-c").arg(format!(
        "openssl dgst -sha512 -binary '{}' | base64 -w0",
        file.display()
    )))
    .stdout;
    String::from_utf8_lossy(&out).trim().to_string()
}

fn bearer(pki: &Pki) -> String {
    format!(
        "Authorization: Bearer {}",
        mint(&pki.key("api.key"), &Claims::upload("default", "disk"))
    )
}

fn upload(pki: &Pki, p: &Proc, file: &Path, query: &str, headers: &[String]) -> (u16, String) {
    let url = format!("https://127.0.0.1:{}/v1beta1/upload{query}", p.port);
    let mut args: Vec<String> = vec!["-H".into(), bearer(pki)];
    for h in headers {
        args.extend(["-H".into(), h.clone()]);
    }
    args.extend(["-T".into(), file.display().to_string(), url]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    curl(pki, &args)
}

#[test]
fn right_digests_in_every_form_pass_and_a_wrong_one_leaves_an_empty_disk() {
    let d = tmp();
    let pki = Pki::default();
    let raw = fixture(d.path());
    let sha256 = hex_of("sha256sum", &raw);
    let md5 = hex_of("md5sum", &raw);
    let sha1 = hex_of("sha1sum", &raw);
    let mut wrong = sha256.clone();
    wrong.replace_range(
        ..4,
        if &sha256[..4] == "0000" {
            "1111"
        } else {
            "0000"
        },
    );

    let run = tmp();
    let mut server = upload_server(&pki, run.path());
    let p = proxy(&pki, run.path(), server.port, Mode::Standalone, "client");
    let disk = run.path().join("data/disk.img");

    // Wrong: a 400 naming the mismatch, the disk emptied, no termination message, and
    // the server still takes the next upload.
    let (code, body) = upload(&pki, &p, &raw, &format!("?checksum=sha256:{wrong}"), &[]);
    assert_eq!(code, 400, "{body}\n{}", server.log());
    assert!(
        body.contains("checksum mismatch") && body.contains(&wrong) && body.contains(&sha256),
        "{body}"
    );
    assert_eq!(std::fs::metadata(&disk).map(|m| m.len()).unwrap_or(0), 0);
    assert!(!run.path().join("termination-log").exists());
    assert!(
        server.child.try_wait().expect("wait").is_none(),
        "still serving"
    );

    // An invalid digest is refused before any byte is written.
    let (code, body) = upload(&pki, &p, &raw, "?checksum=sha256:abc", &[]);
    assert_eq!(code, 400, "{body}");
    assert!(body.contains("invalid checksum"), "{body}");

    // Right: four digests at once, in all three forms, through the proxy.
    let (code, body) = upload(
        &pki,
        &p,
        &raw,
        &format!("?checksum=sha256:{sha256},md5:{md5}"),
        &[
            format!("X-Checksum: sha1:{sha1}"),
            format!("Content-Digest: sha-512=:{}:", sha512_base64(&raw)),
        ],
    );
    assert_eq!(code, 200, "{body}\n{}", server.log());
    assert_eq!(server.wait(Duration::from_secs(10)), Some(0));
    assert_eq!(
        cdi_part(&std::fs::read_to_string(run.path().join("termination-log")).expect("term")),
        r#"{"preallocationApplied":false,"message":"Upload Complete"}"#
    );
    assert_same_bytes(&disk, &raw);
    let log = server.log();
    assert!(
        log.contains("verifying the upload against the client's digests"),
        "{log}"
    );
    assert!(
        p.log().contains("\"mb_per_s\""),
        "per-upload throughput: {}",
        p.log()
    );
}

/// Scrapes the upload server's `/metrics` (no client certificate, as a scraper has
/// none) and returns the progress value.
fn scrape(pki: &Pki, port: u16) -> Option<f64> {
    let (code, body) = curl(pki, &[&format!("https://127.0.0.1:{port}/metrics")]);
    if code != 200 {
        return None;
    }
    body.lines()
        .find(|l| l.starts_with("kubevirt_cdi_upload_progress_total{ownerUID=\"uid-1\"}"))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

#[test]
fn upload_progress_moves_during_a_rate_limited_upload() {
    let d = tmp();
    let pki = Pki::default();
    let raw = fixture(d.path());
    let run = tmp();
    let mut server =
        ferrydisk_tests::upload::upload_server_with(&pki, run.path(), &[("OWNER_UID", "uid-1")]);
    let p = proxy(&pki, run.path(), server.port, Mode::Standalone, "client");
    assert_eq!(scrape(&pki, server.port), Some(0.0), "idle: 0");
    let url = format!("https://127.0.0.1:{}/v1beta1/upload", p.port);
    // 24 MiB at 6 MB/s: about four seconds in flight.
    let mut client = Command::new("curl")
        .args(["-sS", "-o", "/dev/null", "--limit-rate", "6M", "--cacert"])
        .arg(pki.path("ca.crt"))
        .args(["-H", &bearer(&pki), "-T"])
        .arg(&raw)
        .arg(&url)
        .spawn()
        .expect("curl");
    let mut seen = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    while client.try_wait().expect("wait").is_none() && Instant::now() < deadline {
        if let Some(v) = scrape(&pki, server.port) {
            seen.push(v);
        }
        std::thread::sleep(Duration::from_millis(300));
    }
    assert!(client.wait().expect("curl").success());
    assert_eq!(server.wait(Duration::from_secs(10)), Some(0));
    let moving: Vec<f64> = seen.iter().copied().filter(|v| *v > 0.0).collect();
    assert!(
        moving.len() >= 3,
        "at least three readings mid-upload: {seen:?}"
    );
    assert!(
        seen.windows(2).all(|w| w[0] <= w[1]),
        "never goes down: {seen:?}"
    );
    assert!(
        seen.iter().all(|v| *v < 100.0),
        "100 only once the disk is synced, after the last byte: {seen:?}"
    );
    assert!(moving.first() < moving.last(), "the value moves: {seen:?}");
    let log = server.log();
    assert!(log.contains("\"mb_per_s\""), "{log}");
    assert_same_bytes(&run.path().join("data/disk.img"), &raw);
}

/// Issue 27 (5): a client cannot make the server run hashers by the hundred. 800
/// different sha512 digests in one `X-Checksum` (once: an 8 MiB upload 0.14 s -> 11.9 s)
/// are refused at once with a short 400 that does not echo the header; the same digest
/// repeated is one hasher, and the server takes that upload after the refusal.
#[test]
fn digests_are_capped_at_one_per_algorithm() {
    let d = tmp();
    let pki = Pki::default();
    let raw = fixture(d.path());
    let run = tmp();
    let server = upload_server(&pki, run.path());
    let p = proxy(&pki, run.path(), server.port, Mode::Standalone, "client");
    let many: Vec<String> = (0..800).map(|i| format!("sha512:{i:0128x}")).collect();
    let started = Instant::now();
    let (code, body) = upload(
        &pki,
        &p,
        &raw,
        "",
        &[format!("X-Checksum: {}", many.join(","))],
    );
    assert_eq!(code, 400, "{body}\n{}", server.log());
    assert!(body.contains("at most one per algorithm"), "{body}");
    assert!(body.len() < 1024, "the 400 echoes {} bytes", body.len());
    assert!(started.elapsed() < Duration::from_secs(10));
    let sha512 = hex_of("sha512sum", &raw);
    let same = vec![format!("sha512:{sha512}"); 800].join(",");
    let (code, body) = upload(&pki, &p, &raw, "", &[format!("X-Checksum: {same}")]);
    assert_eq!(code, 200, "{body}\n{}", server.log());
}

/// Issue 27 (8): the proxy's upstream presents a certificate the proxy's CA bundle does
/// not trust: the client is told so at once (unknown authority, the CA bundle to check)
/// instead of "not ready: timed out" after the readiness wait.
#[test]
fn an_upstream_certificate_from_another_ca_is_named() {
    let d = tmp();
    let pki = Pki::default();
    let other = Pki::default();
    let raw = fixture(d.path());
    let run = tmp();
    let server = upload_server(&pki, run.path());
    let p = ferrydisk_tests::upload::proxy_with_ca(
        &pki,
        run.path(),
        server.port,
        &other.path("ca.crt"),
        &[],
    );
    let started = Instant::now();
    let (code, body) = upload(&pki, &p, &raw, "", &[]);
    assert!(code == 502 || code == 503, "{code} {body}");
    assert!(
        started.elapsed() < Duration::from_secs(8),
        "answered at once, not after the readiness wait"
    );
    assert!(
        body.contains("x509: certificate signed by unknown authority")
            && body.contains("CA bundle"),
        "{body}"
    );
}
