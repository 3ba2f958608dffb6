//! Regression tests for issue 27: remote parties that misbehave on purpose
//! (tests/support/hostile.py, on 127.0.0.1 with 127.0.0.2 standing for "another host").
//! Credentials stay on their origin, no body is read whole, every request times out,
//! a lying registry is not believed, and TLS failures name their cause.

use ferrydisk_tests::upload::Pki;
use ferrydisk_tests::*;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

const MIB: u64 = 1 << 20;
/// What a hostile body may make us hold at most (peak RSS).
const PEAK_KIB: u64 = 64 << 10;

/// tests/support/hostile.py with some misbehaviours, killed on drop.
struct Hostile {
    child: Child,
    port: u16,
    log: PathBuf,
    _dir: tempfile::TempDir,
}

impl Hostile {
    fn start(flags: &[&str]) -> Self {
        let dir = tmp();
        let log = dir.path().join("requests.log");
        let mut child = Command::new("python3")
            .arg(root().join("tests/support/hostile.py"))
            .arg("--log")
            .arg(&log)
            .args(flags)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("hostile.py");
        let mut out = BufReader::new(child.stdout.take().expect("stdout"));
        let mut read_port = |prefix: &str| -> u16 {
            let mut line = String::new();
            out.read_line(&mut line).expect("port line");
            line.trim()
                .strip_prefix(prefix)
                .and_then(|p| p.trim().parse().ok())
                .unwrap_or_else(|| panic!("hostile.py: {line:?}"))
        };
        let port = read_port("PORT ");
        // The other host's port is only ever named by the server's own answers.
        let _ = read_port("PORT2 ");
        Hostile {
            child,
            port,
            log,
            _dir: dir,
        }
    }

    fn requests(&self) -> Vec<serde_json::Value> {
        std::fs::read_to_string(&self.log)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }

    /// The requests that reached 127.0.0.2 ("another host").
    fn at_other_host(&self) -> Vec<serde_json::Value> {
        self.requests()
            .into_iter()
            .filter(|r| r["at"] == "127.0.0.2" && r.get("method").is_some())
            .collect()
    }
}

impl Drop for Hostile {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs `cmd` under /usr/bin/time: its output, peak RSS in KiB, and wall time.
fn measured(cmd: &mut Command, dir: &Path) -> (Output, u64, Duration) {
    let rss = dir.join("rss");
    let program = cmd.get_program().to_owned();
    let args: Vec<_> = cmd.get_args().map(|a| a.to_owned()).collect();
    let envs: Vec<_> = cmd
        .get_envs()
        .map(|(k, v)| (k.to_owned(), v.map(|v| v.to_owned())))
        .collect();
    let mut t = Command::new("/usr/bin/time");
    t.arg("-f")
        .arg("%M")
        .arg("-o")
        .arg(&rss)
        .arg(program)
        .args(args);
    t.env_clear();
    for (k, v) in envs {
        if let Some(v) = v {
            t.env(k, v);
        }
    }
    let started = Instant::now();
    let out = t.output().expect("run");
    let kib = std::fs::read_to_string(&rss)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.trim().parse().ok())
        .next_back()
        .unwrap_or(0);
    (out, kib, started.elapsed())
}

/// `importer push` of a small raw disk to `dest` (`host:port/repo:tag`).
fn push_cmd(dir: &Path, dest: &str, extra: &[&str]) -> Command {
    let disk = dir.join("disk.raw");
    if !disk.exists() {
        std::fs::write(&disk, vec![0x5a; MIB as usize]).expect("disk");
    }
    let mut c = Command::new(bin("importer"));
    c.env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("IMPORTER_ACCESS_KEY_ID", "user")
        .env("IMPORTER_SECRET_KEY", "pass")
        .arg("push")
        .arg("--source")
        .arg(&disk)
        .arg("--dest")
        .arg(format!("docker://{dest}"))
        .args(extra);
    c
}

/// A push of a small disk to `h` (plain HTTP: `--insecure-tls`), and its outcome.
fn push_to(h: &Hostile, extra: &[&str]) -> Output {
    let d = tmp();
    let mut args = vec!["--insecure-tls", "true"];
    args.extend_from_slice(extra);
    push_cmd(d.path(), &format!("127.0.0.1:{}/disks/a:1", h.port), &args)
        .output()
        .expect("push")
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// An upload Location on another host gets the blob but not the user's credentials.
#[test]
fn push_sends_no_credentials_to_an_upload_location_on_another_host() {
    let h = Hostile::start(&["--basic", "user:pass", "--foreign-location"]);
    let o = push_to(&h, &[]);
    assert!(o.status.success(), "{}", stderr(&o));
    let foreign = h.at_other_host();
    assert!(
        foreign
            .iter()
            .any(|r| r["method"] == "PATCH" || r["method"] == "PUT"),
        "the blob went to the other host: {foreign:?}"
    );
    for r in &foreign {
        assert_eq!(r["secrets"], serde_json::json!([]), "{r}");
    }
    assert!(
        h.requests()
            .iter()
            .any(|r| r["at"] == "127.0.0.1" && r["secrets"] == serde_json::json!(["authorization"])),
        "the registry itself got the credentials"
    );
}

/// An https registry naming a plain-http upload Location: refused before a byte goes.
#[test]
fn push_refuses_an_http_location_from_an_https_registry() {
    let pki = Pki::default();
    let (crt, key) = (pki.path("srv.crt"), pki.path("srv.key"));
    let h = Hostile::start(&[
        "--basic",
        "user:pass",
        "--http-location",
        "--tls",
        crt.to_str().expect("utf8"),
        key.to_str().expect("utf8"),
    ]);
    let d = tmp();
    let ca_dir = d.path().join("ca");
    std::fs::create_dir_all(&ca_dir).expect("ca dir");
    std::fs::copy(pki.path("ca.crt"), ca_dir.join("ca.crt")).expect("ca");
    let o = push_cmd(
        d.path(),
        &format!("127.0.0.1:{}/disks/a:1", h.port),
        &["--cert-dir", ca_dir.to_str().expect("utf8")],
    )
    .output()
    .expect("push");
    assert!(!o.status.success());
    assert!(stderr(&o).contains("plain-http"), "{}", stderr(&o));
    assert!(
        !h.requests().iter().any(|r| r["path"]
            .as_str()
            .is_some_and(|p| p.starts_with("/upload/"))),
        "nothing was sent to the downgraded Location"
    );
}

/// A registry answering HEAD 200 with another length does not hold the blob: it is
/// uploaded, and the push says so.
#[test]
fn push_uploads_a_blob_whose_head_reports_another_length() {
    let h = Hostile::start(&["--head-lies"]);
    let o = push_to(&h, &[]);
    assert!(o.status.success(), "{}", stderr(&o));
    let summary: serde_json::Value =
        serde_json::from_slice(&o.stdout).unwrap_or_else(|e| panic!("{e}: {}", stderr(&o)));
    assert_eq!(summary["layerUploaded"], true, "{summary}");
    assert!(h.requests().iter().any(|r| r["method"] == "PUT"
        && r["path"]
            .as_str()
            .is_some_and(|p| p.starts_with("/upload/"))));
}

/// A registry answering a manifest PUT with another digest: the push fails instead of
/// printing the registry's digest.
#[test]
fn push_refuses_a_registry_that_reports_another_manifest_digest() {
    let h = Hostile::start(&["--digest-lies"]);
    let o = push_to(&h, &[]);
    assert!(
        !o.status.success(),
        "{}",
        String::from_utf8_lossy(&o.stdout)
    );
    let e = stderr(&o);
    assert!(e.contains("reports digest sha256:0000"), "{e}");
    assert!(!String::from_utf8_lossy(&o.stdout).contains("sha256:0000"));
}

/// 300 MiB token responses and error bodies: refused at their bound, in bounded memory.
#[test]
fn push_reads_token_and_error_bodies_bounded() {
    for (flags, needle) in [
        (
            vec!["--bearer", "--huge-token", "314572800"],
            "larger than 1048576 bytes",
        ),
        (
            vec!["--huge-error", "314572800"],
            "500 Internal Server Error",
        ),
    ] {
        let h = Hostile::start(&flags);
        let d = tmp();
        let mut c = push_cmd(
            d.path(),
            &format!("127.0.0.1:{}/disks/a:1", h.port),
            &["--insecure-tls", "true"],
        );
        let (o, kib, _) = measured(&mut c, d.path());
        assert!(!o.status.success(), "{flags:?}");
        assert!(stderr(&o).contains(needle), "{flags:?}: {}", stderr(&o));
        assert!(kib <= PEAK_KIB, "{flags:?}: peak RSS {kib} KiB");
        eprintln!("{flags:?}: refused, peak RSS {kib} KiB");
    }
}

/// A registry that accepts requests and never answers: the push fails at its idle
/// timeout instead of hanging.
#[test]
fn a_silent_registry_fails_the_push_at_the_idle_timeout() {
    let h = Hostile::start(&["--silent"]);
    let d = tmp();
    let mut c = push_cmd(
        d.path(),
        &format!("127.0.0.1:{}/disks/a:1", h.port),
        &["--insecure-tls", "true", "--idle-timeout", "2"],
    );
    let (o, _, wall) = measured(&mut c, d.path());
    assert!(!o.status.success());
    assert!(stderr(&o).contains("idle timeout"), "{}", stderr(&o));
    assert!(wall < Duration::from_secs(30), "{wall:?}");
}

fn registry_import(run: &Path, h: &Hostile) -> Importer {
    Importer::new(run)
        .env("IMPORTER_SOURCE", "registry")
        .env(
            "IMPORTER_ENDPOINT",
            &format!("docker://127.0.0.1:{}/disks/a:1", h.port),
        )
        .env("INSECURE_TLS", "true")
        .arg("--metrics-addr")
        .arg("none")
        .arg("--retries")
        .arg("0")
}

/// A 300 MiB manifest is refused at 4 MiB (as containers/image, and so CDI) by the
/// import and by inspect, in bounded memory.
#[test]
fn a_huge_manifest_is_refused_at_4_mib() {
    let h = Hostile::start(&["--huge-manifest", "314572800"]);
    let run = tmp();
    let (o, kib, _) = measured(&mut registry_import(run.path(), &h).cmd, run.path());
    let term = std::fs::read_to_string(run.path().join("termination-log")).unwrap_or_default();
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    assert!(term.contains("larger than 4194304 bytes"), "{term}");
    assert!(!term.contains('\n'));
    assert!(kib <= PEAK_KIB, "import: peak RSS {kib} KiB");
    let mut inspect = Command::new(bin("importer"));
    inspect
        .env_clear()
        .env("INSECURE_TLS", "true")
        .arg("inspect")
        .arg(format!("docker://127.0.0.1:{}/disks/a:1", h.port));
    let (o, kib, _) = measured(&mut inspect, run.path());
    assert!(!o.status.success());
    assert!(
        stderr(&o).contains("larger than 4194304 bytes"),
        "{}",
        stderr(&o)
    );
    assert!(kib <= PEAK_KIB, "inspect: peak RSS {kib} KiB");
    // The DataImportCron poller reads the same manifest (before any Kubernetes call).
    let mut poller = Command::new(bin("importer"));
    poller
        .env_clear()
        .env("INSECURE_TLS", "true")
        .arg("source-update-poller")
        .args(["-ns", "golden", "-cron", "fedora", "-url"])
        .arg(format!("docker://127.0.0.1:{}/disks/a:1", h.port))
        .current_dir(run.path());
    let (o, kib, _) = measured(&mut poller, run.path());
    assert!(!o.status.success());
    assert!(
        stderr(&o).contains("larger than 4194304 bytes"),
        "{}",
        stderr(&o)
    );
    assert!(kib <= PEAK_KIB, "poller: peak RSS {kib} KiB");
}

/// A config whose descriptor says 2 bytes, served as 300 MiB: reading stops past the
/// declared size.
#[test]
fn a_config_blob_is_read_only_to_its_declared_size() {
    let h = Hostile::start(&["--config-liar", "314572800"]);
    let run = tmp();
    let (o, kib, _) = measured(&mut registry_import(run.path(), &h).cmd, run.path());
    let term = std::fs::read_to_string(run.path().join("termination-log")).unwrap_or_default();
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    assert!(term.contains("longer than the 2 bytes"), "{term}");
    assert!(kib <= PEAK_KIB, "peak RSS {kib} KiB");
}

/// A redirect to another host is followed with none of the secrets: not the basic
/// credentials, not the user's extra headers, not an S3 session token.
#[test]
fn redirects_to_another_host_carry_no_secrets() {
    let d = tmp();
    let disk = dense_fixture_named(d.path(), "disk.raw", 5);
    let h = Hostile::start(&["--disk", disk.to_str().expect("utf8")]);
    let run = tmp();
    Importer::new(run.path())
        .http(&format!("http://127.0.0.1:{}/files/redirect", h.port))
        .env("IMPORTER_ACCESS_KEY_ID", "user")
        .env("IMPORTER_SECRET_KEY", "pass")
        .env("IMPORTER_EXTRA_HEADER_0", "X-Secret: s3cret")
        .run()
        .assert_success();
    assert_same_bytes(&run.path().join("data/disk.img"), &disk);
    let run = tmp();
    Importer::new(run.path())
        .env("IMPORTER_SOURCE", "s3")
        .env(
            "IMPORTER_ENDPOINT",
            &format!("http://127.0.0.1:{}/bucket/redirect", h.port),
        )
        .env("IMPORTER_ACCESS_KEY_ID", "AKIDEXAMPLE")
        .env("IMPORTER_SECRET_KEY", "secret")
        .env("AWS_SESSION_TOKEN", "session-token")
        .env("IMPORTER_EXTRA_HEADER_0", "X-Secret: s3cret")
        .arg("--metrics-addr")
        .arg("none")
        .run()
        .assert_success();
    let all = h.requests();
    let here: Vec<_> = all.iter().filter(|r| r["at"] == "127.0.0.1").collect();
    assert!(here
        .iter()
        .any(|r| r["secrets"] == serde_json::json!(["authorization", "x-secret"])));
    assert!(here.iter().any(|r| r["secrets"]
        == serde_json::json!(["authorization", "x-amz-security-token", "x-secret"])));
    let there = h.at_other_host();
    assert_eq!(there.len(), 2, "{there:?}");
    for r in there {
        assert_eq!(r["secrets"], serde_json::json!([]), "{r}");
    }
}

fn gcs_key(dir: &Path, token_uri: &str) -> PathBuf {
    let key = dir.join("sa.key");
    ferrydisk_tests::objstore::rsa_key(&key);
    let file = dir.join("credentials.json");
    let sa = serde_json::json!({
        "type": "service_account",
        "private_key": std::fs::read_to_string(&key).expect("key"),
        "client_email": "importer@ferrydisk-test.iam.gserviceaccount.com",
        "token_uri": token_uri,
    });
    std::fs::write(&file, sa.to_string()).expect("credentials");
    file
}

/// The GCS token request follows no redirect (the signed assertion goes to token_uri
/// only) and times out on a token endpoint that never answers.
#[test]
fn the_gcs_token_request_is_neither_redirected_nor_unbounded_in_time() {
    let h = Hostile::start(&[]);
    let d = tmp();
    for (path, needle) in [
        ("token-redirect", "not followed"),
        ("token-silent", "idle timeout"),
    ] {
        let key = gcs_key(d.path(), &format!("http://127.0.0.1:{}/{path}", h.port));
        let run = tmp();
        let started = Instant::now();
        let o = Importer::new(run.path())
            .env("IMPORTER_SOURCE", "gcs")
            .env(
                "IMPORTER_ENDPOINT",
                &format!("http://127.0.0.1:{}/bucket/disk.raw", h.port),
            )
            .env(
                "GOOGLE_APPLICATION_CREDENTIALS",
                key.to_str().expect("utf8"),
            )
            .arg("--metrics-addr")
            .arg("none")
            .arg("--retries")
            .arg("0")
            .arg("--idle-timeout")
            .arg("2")
            .run();
        o.assert_failure(needle);
        assert!(started.elapsed() < Duration::from_secs(30), "{path}");
    }
    assert!(
        h.at_other_host().is_empty(),
        "the assertion went to another host: {:?}",
        h.at_other_host()
    );
}

/// A server certificate from a CA the pod does not trust: CDI's x509 words, the fix,
/// and a terminal class, for the http and registry sources.
#[test]
fn an_unknown_certificate_authority_is_named_and_terminal() {
    let pki = Pki::default();
    let d = tmp();
    let disk = dense_fixture_named(d.path(), "disk.raw", 6);
    let (crt, key) = (pki.path("srv.crt"), pki.path("srv.key"));
    let h = Hostile::start(&[
        "--disk",
        disk.to_str().expect("utf8"),
        "--tls",
        crt.to_str().expect("utf8"),
        key.to_str().expect("utf8"),
    ]);
    for (source, endpoint) in [
        ("http", format!("https://127.0.0.1:{}/disk", h.port)),
        (
            "registry",
            format!("docker://127.0.0.1:{}/disks/a:1", h.port),
        ),
        ("gcs", format!("https://127.0.0.1:{}/bucket/disk", h.port)),
    ] {
        let run = tmp();
        let o = Importer::new(run.path())
            .env("IMPORTER_SOURCE", source)
            .env("IMPORTER_ENDPOINT", &endpoint)
            .arg("--metrics-addr")
            .arg("none")
            .run();
        o.assert_failure("x509: certificate signed by unknown authority");
        assert!(
            o.termination.contains("IMPORTER_CERT_DIR"),
            "{}",
            o.termination
        );
        assert!(
            o.stderr.contains("terminal"),
            "{source}: classified terminal: {}",
            o.stderr
        );
    }
}

/// `importer import --help` names the sources that work.
#[test]
fn import_help_names_the_sources_that_work() {
    let o = sh(Command::new(bin("importer")).args(["import", "--help"]));
    let help = String::from_utf8_lossy(&o.stdout);
    assert!(help.contains("http, registry, s3, gcs"), "{help}");
    assert!(!help.contains("s3, gcs, imageio, vddk are CDI"), "{help}");
}

/// A 512 MiB random disk (an incompressible layer) at `dir/big.raw`.
fn big_disk(dir: &Path) -> PathBuf {
    let p = dir.join("big.raw");
    sh(Command::new("sh").arg("-c").arg(format!(
        "head -c {} /dev/urandom > '{}'",
        512 * MIB,
        p.display()
    )));
    p
}

/// Issue 29 (4): a push of a 512 MiB layer cut twice mid-blob by a proxy resumes each
/// time at the offset the registry reports (`GET` on the upload URL, as zot answers it;
/// hostile.py `--resumable` stands in for zot, which cannot run here): every PATCH after
/// a cut starts where the registry said, and the bytes sent add up to at most 1.1x the
/// layer.
#[test]
fn a_cut_push_resumes_at_the_offset_the_registry_reports() {
    let h = Hostile::start(&["--resumable", "--relative-location"]);
    let d = tmp();
    let disk = big_disk(d.path());
    let proxy = ferrydisk_tests::objstore::DropProxy::start_upward(d.path(), h.port, 150 * MIB, 2);
    let o = Command::new(bin("importer"))
        .env_clear()
        .arg("push")
        .arg("--source")
        .arg(&disk)
        .arg("--dest")
        .arg(format!("docker://127.0.0.1:{}/disks/big:1", proxy.port))
        .args(["--insecure-tls", "true"])
        .output()
        .expect("push");
    assert!(o.status.success(), "{}", stderr(&o));
    let summary: serde_json::Value = serde_json::from_slice(&o.stdout).expect("summary");
    let layer = summary["layerSize"].as_u64().expect("size");
    let patches: Vec<(u64, u64)> = h
        .requests()
        .iter()
        .filter_map(|r| Some((r["start"].as_u64()?, r["received"].as_u64()?)))
        .collect();
    assert_eq!(patches.len(), 3, "two cuts, three PATCHes: {patches:?}");
    let mut at = 0;
    for (start, received) in &patches {
        assert_eq!(
            *start, at,
            "each PATCH starts where the registry stood: {patches:?}"
        );
        at = start + received;
    }
    assert_eq!(at, layer);
    let sent: u64 = patches.iter().map(|p| p.1).sum();
    assert!(
        sent * 10 <= layer * 11,
        "{sent} bytes sent for a {layer}-byte layer"
    );
    assert_eq!(
        stderr(&o).matches("resuming at the offset").count(),
        2,
        "{}",
        stderr(&o)
    );
    eprintln!("cut twice: PATCHes {patches:?}, {sent} bytes sent for {layer}");
}

/// The same cuts against the real docker-registry, which drops an upload session cut
/// mid-PATCH (404 on the upload URL): a new session each time, logged, and the image is
/// correct (imported back byte-equal).
#[test]
fn a_cut_push_to_docker_registry_starts_a_new_session_and_ends_correct() {
    let reg = ferrydisk_tests::registry::Registry::start(false, None);
    let d = tmp();
    let disk = big_disk(d.path());
    let proxy =
        ferrydisk_tests::objstore::DropProxy::start_upward(d.path(), reg.port, 150 * MIB, 2);
    let o = Command::new(bin("importer"))
        .env_clear()
        .arg("push")
        .arg("--source")
        .arg(&disk)
        .arg("--dest")
        .arg(format!("docker://127.0.0.1:{}/disks/big:1", proxy.port))
        .args(["--insecure-tls", "true"])
        .output()
        .expect("push");
    let err = stderr(&o);
    assert!(o.status.success(), "{err}");
    assert!(
        err.contains("starting a new upload session") || err.contains("resuming at the offset"),
        "{err}"
    );
    let run = tmp();
    reg.importer(run.path(), "disks/big:1")
        .env("INSECURE_TLS", "true")
        .run()
        .assert_success();
    assert_same_bytes(&run.path().join("data/disk.img"), &disk);
}
