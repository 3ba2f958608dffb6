//! End-to-end: the built `importer` against a real HTTP server on 127.0.0.1, outputs
//! compared byte for byte with `qemu-img convert -O raw`.

use ferrydisk_tests::*;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

/// `tool <flags> -c src > src.<ext>`
fn compress(src: &Path, tool: &str, flags: &[&str], ext: &str) -> PathBuf {
    let out = src.with_extension(format!("raw.{ext}"));
    let o = sh(Command::new(tool).args(flags).arg("-c").arg(src));
    std::fs::write(&out, o.stdout).expect("write compressed");
    out
}

fn tar_of(dir: &Path, name: &str, files: &[&str], gzip: bool) -> PathBuf {
    let out = dir.join(name);
    let mut c = Command::new("tar");
    c.arg("-C")
        .arg(dir)
        .arg(if gzip { "-czf" } else { "-cf" })
        .arg(&out)
        .args(files);
    sh(&mut c);
    out
}

#[test]
fn every_container_format_matches_qemu_img() {
    let d = tmp();
    let raw = default_fixture(d.path());
    let reference = qemu_reference(&raw, d.path());
    let files = vec![
        raw.clone(),
        compress(&raw, "gzip", &["-1"], "gz"),
        compress(&raw, "xz", &["-1", "-T1"], "xz"),
        compress(&raw, "zstd", &["-q", "-3"], "zst"),
        compress(&raw, "bzip2", &["-1"], "bz2"),
        tar_of(d.path(), "disk.tar", &["disk.raw"], false),
        tar_of(d.path(), "disk.tar.gz", &["disk.raw"], true),
    ];
    let server = HttpServer::start(d.path(), &[]);
    for f in files {
        let name = f
            .file_name()
            .and_then(|n| n.to_str())
            .expect("name")
            .to_string();
        let run = tmp();
        let o = Importer::new(run.path()).http(&server.url(&name)).run();
        o.assert_success();
        assert_same_bytes(&out_disk(run.path()), &reference);
        assert!(o.stderr.contains("detected image"), "{name}: {}", o.stderr);
    }
}

#[test]
fn mostly_zero_image_is_written_sparse() {
    let d = tmp();
    let raw = default_fixture(d.path());
    let server = HttpServer::start(d.path(), &[]);
    let run = tmp();
    Importer::new(run.path())
        .http(&server.url("disk.raw"))
        .run()
        .assert_success();
    let out = out_disk(run.path());
    let (alloc, apparent) = (
        allocated(&out),
        std::fs::metadata(&out).expect("meta").len(),
    );
    assert_eq!(apparent, 64 << 20);
    assert!(
        alloc < 8 << 20,
        "allocated {alloc} of {apparent}: not sparse"
    );
    assert_same_bytes(&out, &qemu_reference(&raw, d.path()));
}

#[test]
fn requested_size_grows_the_disk_by_cdis_resize_rule() {
    let d = tmp();
    let raw = default_fixture(d.path());
    let server = HttpServer::start(d.path(), &[]);
    let run = tmp();
    Importer::new(run.path())
        .http(&server.url("disk.raw"))
        .env("IMPORTER_IMAGE_SIZE", "128Mi")
        .env("FILESYSTEM_OVERHEAD", "0.06")
        .run()
        .assert_success();
    let out = out_disk(run.path());
    // GetUsableSpace(0.06, 128Mi) = RoundDown(ceil(134217728 / 1.06), 1Mi) = 120 MiB.
    assert_eq!(std::fs::metadata(&out).expect("meta").len(), 120 << 20);
    let data = std::fs::read(&out).expect("read");
    let want = std::fs::read(&raw).expect("read");
    assert_eq!(&data[..want.len()], &want[..]);
    assert!(data[want.len()..].iter().all(|&b| b == 0));
}

/// A fixture whose bytes all matter (so a resume at the wrong offset is visible).
fn dense_fixture(dir: &Path) -> PathBuf {
    dense_fixture_named(dir, "dense.raw", 3)
}

#[test]
fn dropped_connections_are_resumed_with_range() {
    let d = tmp();
    let raw = dense_fixture(d.path());
    let log = d.path().join("requests.log");
    let server = HttpServer::start(
        d.path(),
        &[
            "--drop-after",
            "5000000",
            "--drops",
            "3",
            "--log",
            log.to_str().expect("utf8"),
        ],
    );
    let run = tmp();
    let o = Importer::new(run.path())
        .http(&server.url("dense.raw"))
        .run();
    o.assert_success();
    assert_same_bytes(&out_disk(run.path()), &qemu_reference(&raw, d.path()));
    let requests = std::fs::read_to_string(&log).expect("log");
    let ranged = requests
        .lines()
        .filter(|l| l.contains("range=bytes="))
        .count();
    assert_eq!(ranged, 3, "three resumes with Range:\n{requests}");
    assert_eq!(
        o.stderr.matches("connection lost, resuming").count(),
        3,
        "{}",
        o.stderr
    );
}

#[test]
fn without_range_support_the_download_restarts_and_skips() {
    let d = tmp();
    let raw = dense_fixture(d.path());
    let server = HttpServer::start(
        d.path(),
        &["--no-range", "--drop-after", "7000000", "--drops", "2"],
    );
    let run = tmp();
    let o = Importer::new(run.path())
        .http(&server.url("dense.raw"))
        .run();
    o.assert_success();
    assert!(o.stderr.contains("server cannot resume"), "{}", o.stderr);
    assert_same_bytes(&out_disk(run.path()), &qemu_reference(&raw, d.path()));
}

#[test]
fn truncated_body_is_an_error_not_a_success() {
    let d = tmp();
    dense_fixture(d.path());
    let server = HttpServer::start(d.path(), &["--short", "--no-range"]);
    let run = tmp();
    let o = Importer::new(run.path())
        .http(&server.url("dense.raw"))
        .arg("--retries")
        .arg("2")
        .run();
    o.assert_failure("Unable to process data:");
    assert!(
        o.termination
            .contains("failed after 13107200 of 26214400 bytes and 2 retries"),
        "{}",
        o.termination
    );
    assert!(o.stderr.contains("\"class\":\"retryable\""), "{}", o.stderr);
    assert_eq!(
        std::fs::metadata(out_disk(run.path())).expect("meta").len(),
        0,
        "partial disk must be emptied"
    );
}

#[test]
fn corrupt_compressed_streams_are_named_and_fail() {
    let d = tmp();
    let raw = dense_fixture(d.path());
    let mut names = Vec::new();
    for (tool, flags, ext) in [
        ("gzip", &["-1"][..], "gz"),
        ("xz", &["-1", "-T1"][..], "xz"),
        ("zstd", &["-q"][..], "zst"),
        ("bzip2", &["-1"][..], "bz2"),
    ] {
        let f = compress(&raw, tool, flags, ext);
        let mut bytes = std::fs::read(&f).expect("read");
        let mid = bytes.len() / 2;
        for b in &mut bytes[mid..mid + 64] {
            *b ^= 0x5a;
        }
        std::fs::write(&f, bytes).expect("write");
        names.push((
            f.file_name()
                .and_then(|n| n.to_str())
                .expect("name")
                .to_string(),
            ext,
        ));
    }
    let server = HttpServer::start(d.path(), &[]);
    for (name, ext) in names {
        let run = tmp();
        let o = Importer::new(run.path()).http(&server.url(&name)).run();
        let format = match ext {
            "gz" => "gzip",
            "zst" => "zstd",
            "bz2" => "bzip2",
            other => other,
        };
        o.assert_failure(&format!("{format} stream is corrupt"));
        assert!(o.stderr.contains("\"class\":\"terminal\""), "{}", o.stderr);
    }
}

#[test]
fn image_larger_than_the_volume_fails_before_writing() {
    let d = tmp();
    let raw = default_fixture(d.path());
    compress(&raw, "xz", &["-0", "-T1"], "xz");
    let server = HttpServer::start(d.path(), &[]);
    // Raw: the size is known from Content-Length, refused before a byte is written.
    let run = tmp();
    let o = Importer::new(run.path())
        .http(&server.url("disk.raw"))
        .env("IMPORTER_IMAGE_SIZE", "32Mi")
        .run();
    o.assert_failure("virtual image size 67108864 is larger than the reported available storage 33554432. A larger PVC is required");
    assert_eq!(
        std::fs::metadata(out_disk(run.path())).expect("meta").len(),
        0
    );
    // xz declares no size up front: the stream is cut off at the limit (bomb cap).
    let run = tmp();
    let o = Importer::new(run.path())
        .http(&server.url("disk.raw.xz"))
        .env("IMPORTER_IMAGE_SIZE", "32Mi")
        .run();
    o.assert_failure("is larger than the reported available storage 33554432");
    assert_eq!(
        std::fs::metadata(out_disk(run.path())).expect("meta").len(),
        0
    );
}

#[test]
fn unwritable_destination_fails() {
    let d = tmp();
    default_fixture(d.path());
    let server = HttpServer::start(d.path(), &[]);
    let run = tmp();
    let o = Importer::new(run.path())
        .http(&server.url("disk.raw"))
        .arg("--dest")
        .arg(run.path().join("missing-dir/disk.img"))
        .run();
    o.assert_failure("Unable to process data: creating");
}

#[test]
fn basic_auth_right_and_wrong_password_and_no_leaks() {
    let d = tmp();
    let raw = default_fixture(d.path());
    let server = HttpServer::start(d.path(), &["--auth", "alice:s3cr3t-pw"]);
    let run = tmp();
    let o = Importer::new(run.path())
        .http(&server.url("disk.raw"))
        .env("IMPORTER_ACCESS_KEY_ID", "alice")
        .env("IMPORTER_SECRET_KEY", "wr0ng-pw")
        .run();
    o.assert_failure("Unable to connect to http data source:");
    assert!(o.termination.contains("401"), "{}", o.termination);
    assert!(!o.stderr.contains("wr0ng-pw") && !o.termination.contains("wr0ng-pw"));

    let run = tmp();
    let o = Importer::new(run.path())
        .http(&server.url("disk.raw"))
        .env("IMPORTER_ACCESS_KEY_ID", "alice")
        .env("IMPORTER_SECRET_KEY", "s3cr3t-pw")
        .run();
    o.assert_success();
    assert!(!o.stderr.contains("s3cr3t-pw"));
    assert_same_bytes(&out_disk(run.path()), &qemu_reference(&raw, d.path()));

    // Credentials in the URL itself never reach logs or messages either.
    let run = tmp();
    let url = format!(
        "http://alice:url-s3cret@127.0.0.1:{}/missing.raw",
        server.port
    );
    let o = Importer::new(run.path()).http(&url).run();
    o.assert_failure("Unable to connect to http data source:");
    assert!(
        !o.stderr.contains("url-s3cret") && !o.termination.contains("url-s3cret"),
        "{}\n{}",
        o.termination,
        o.stderr
    );
}

#[test]
fn checksum_match_and_mismatch() {
    let d = tmp();
    let raw = default_fixture(d.path());
    let gz = compress(&raw, "gzip", &["-1"], "gz");
    let sum = String::from_utf8(sh(Command::new("sha256sum").arg(&gz)).stdout).expect("utf8");
    let sum = sum.split_whitespace().next().expect("sum").to_string();
    let server = HttpServer::start(d.path(), &[]);
    let run = tmp();
    Importer::new(run.path())
        .http(&server.url("disk.raw.gz"))
        .env("IMPORTER_CHECKSUM", &format!("sha256:{sum}"))
        .run()
        .assert_success();
    let run = tmp();
    let o = Importer::new(run.path())
        .http(&server.url("disk.raw.gz"))
        .env("IMPORTER_CHECKSUM", &format!("sha256:{}", "0".repeat(64)))
        .run();
    // CDI: exit 0 with a JSON message the controller recognises as fatal.
    assert_eq!(o.code, 0, "{}", o.stderr);
    assert!(
        o.termination
            .starts_with(r#"{"message":"Unable to process data: checksum mismatch"#),
        "{}",
        o.termination
    );
    assert_eq!(
        std::fs::metadata(out_disk(run.path())).expect("meta").len(),
        0,
        "mismatched data is removed"
    );
    // Several digests at once (ferrydisk: CDI takes one): all must match.
    let md5 = String::from_utf8(sh(Command::new("md5sum").arg(&gz)).stdout).expect("utf8");
    let md5 = md5.split_whitespace().next().expect("md5").to_string();
    let run = tmp();
    Importer::new(run.path())
        .http(&server.url("disk.raw.gz"))
        .env("IMPORTER_CHECKSUM", &format!("md5:{md5},sha256:{sum}"))
        .run()
        .assert_success();
    let run = tmp();
    let o = Importer::new(run.path())
        .http(&server.url("disk.raw.gz"))
        .env(
            "IMPORTER_CHECKSUM",
            &format!("sha256:{sum},md5:{}", "0".repeat(32)),
        )
        .run();
    assert_eq!(o.code, 0, "{}", o.stderr);
    assert!(
        o.termination
            .contains("checksum mismatch: expected md5:000"),
        "{}",
        o.termination
    );
}

#[test]
fn archive_content_is_unpacked_into_the_data_dir() {
    let d = tmp();
    let tree = d.path().join("tree");
    std::fs::create_dir_all(tree.join("sub")).expect("mkdir");
    std::fs::write(tree.join("sub/a.txt"), b"alpha").expect("write");
    std::fs::write(tree.join("b.bin"), vec![7u8; 100_000]).expect("write");
    std::os::unix::fs::symlink("sub/a.txt", tree.join("link")).expect("symlink");
    sh(Command::new("tar")
        .arg("-C")
        .arg(&tree)
        .arg("-cJf")
        .arg(d.path().join("tree.tar.xz"))
        .arg("."));
    let server = HttpServer::start(d.path(), &[]);
    let run = tmp();
    let o = Importer::new(run.path())
        .http(&server.url("tree.tar.xz"))
        .env("IMPORTER_CONTENTTYPE", "archive")
        .run();
    o.assert_success();
    let data = run.path().join("data");
    assert_eq!(std::fs::read(data.join("sub/a.txt")).expect("a"), b"alpha");
    assert_eq!(
        std::fs::read(data.join("b.bin")).expect("b"),
        vec![7u8; 100_000]
    );
    assert_eq!(std::fs::read(data.join("link")).expect("link"), b"alpha");
    assert!(!data.join("disk.img").exists());
}

#[test]
fn blank_disk_sparse_and_preallocated() {
    let run = tmp();
    let o = Importer::new(run.path())
        .env("IMPORTER_SOURCE", "none")
        .env("IMPORTER_IMAGE_SIZE", "1Gi")
        .env("FILESYSTEM_OVERHEAD", "0.06")
        .arg("--metrics-addr")
        .arg("none")
        .run();
    assert_eq!(o.code, 0, "{}", o.stderr);
    assert_eq!(
        o.termination,
        r#"{"preallocationApplied":false,"message":"Import Complete"}"#
    );
    let out = out_disk(run.path());
    assert_eq!(std::fs::metadata(&out).expect("meta").len(), 966 << 20);
    assert!(allocated(&out) < 1 << 20);

    let run = tmp();
    let o = Importer::new(run.path())
        .env("IMPORTER_SOURCE", "none")
        .env("IMPORTER_IMAGE_SIZE", "64Mi")
        .env("PREALLOCATION", "true")
        .arg("--metrics-addr")
        .arg("none")
        .run();
    assert_eq!(
        o.termination, r#"{"preallocationApplied":true,"message":"Import Complete"}"#,
        "{}",
        o.stderr
    );
    assert!(allocated(&out_disk(run.path())) >= 64 << 20);
}

#[test]
fn block_device_gets_image_and_zeroed_holes() {
    let d = tmp();
    let raw = default_fixture(d.path());
    let reference = qemu_reference(&raw, d.path());
    let Some(lo) = Loop::new(&d.path().join("backing"), 80 << 20) else {
        return;
    };
    let server = HttpServer::start(d.path(), &[]);
    let run = tmp();
    // Selected the way CDI selects it: the block device path exists.
    let o = Importer::new(run.path())
        .http(&server.url("disk.raw"))
        .block_device(&lo.dev)
        .run();
    o.assert_success();
    let dev = std::fs::read(&lo.dev).expect("read device");
    let want = std::fs::read(&reference).expect("ref");
    assert!(
        dev[..want.len()] == want[..],
        "device differs from qemu-img output (old 0xff data left in holes?)"
    );
    assert!(
        dev[want.len()..].iter().all(|&b| b == 0xff),
        "bytes past the image are untouched"
    );
    // Too large for the device: refused before writing.
    let big = d.path().join("big.raw");
    raw_fixture(&big, "100M", &[]);
    let o = Importer::new(tmp().path())
        .http(&server.url("big.raw"))
        .block_device(&lo.dev)
        .run();
    o.assert_failure("is larger than the reported available storage 83886080");
    // Blank + preallocation zeroes the whole device.
    let o = Importer::new(run.path())
        .env("IMPORTER_SOURCE", "none")
        .env("PREALLOCATION", "true")
        .arg("--metrics-addr")
        .arg("none")
        .block_device(&lo.dev)
        .run();
    assert_eq!(
        o.termination, r#"{"preallocationApplied":true,"message":"Import Complete"}"#,
        "{}",
        o.stderr
    );
    assert!(std::fs::read(&lo.dev)
        .expect("read")
        .iter()
        .all(|&b| b == 0));
}

#[test]
fn progress_metric_moves_during_download_in_cdis_format() {
    let d = tmp();
    let raw = dense_fixture(d.path());
    let server = HttpServer::start(d.path(), &["--rate", "3000000"]);
    let run = tmp();
    let port = free_port();
    let mut imp = Importer::new(run.path());
    imp.cmd
        .env("IMPORTER_SOURCE", "http")
        .env("IMPORTER_ENDPOINT", server.url("dense.raw"))
        .arg("--metrics-addr")
        .arg(format!("127.0.0.1:{port}"));
    imp.cmd.stderr(std::process::Stdio::piped());
    let mut child = imp.spawn();
    let re_prefix = "kubevirt_cdi_import_progress_total{ownerUID=\"test-owner\"} ";
    let mut seen = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline && child.try_wait().expect("wait").is_none() {
        let out = Command::new("curl")
            .args(["-sk", "--max-time", "2"])
            .arg(format!("https://127.0.0.1:{port}/metrics"))
            .output()
            .expect("curl");
        let body = String::from_utf8_lossy(&out.stdout);
        if let Some(v) = body.lines().find_map(|l| l.strip_prefix(re_prefix)) {
            seen.push(v.parse::<f64>().expect("number"));
        }
        std::thread::sleep(Duration::from_millis(700));
    }
    let out = child.wait_with_output().expect("wait");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        seen.iter().any(|&v| v > 0.0 && v < 100.0),
        "no intermediate progress in {seen:?}"
    );
    assert!(
        seen.windows(2).all(|w| w[0] <= w[1]),
        "progress went backwards: {seen:?}"
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("\"network_mb_s\"") && stderr.contains("\"write_mb_s\""),
        "progress log lines: {stderr}"
    );
    assert_same_bytes(&out_disk(run.path()), &qemu_reference(&raw, d.path()));
}

#[test]
fn rerun_after_kill_9_produces_a_correct_disk() {
    let d = tmp();
    let raw = dense_fixture(d.path());
    let run = tmp();
    // Garbage larger than the image where the disk goes: must not survive.
    std::fs::create_dir_all(run.path().join("data")).expect("mkdir");
    std::fs::write(out_disk(run.path()), vec![0xeeu8; 40 << 20]).expect("garbage");
    {
        let slow = HttpServer::start(d.path(), &["--rate", "4000000"]);
        let mut child = Importer::new(run.path())
            .http(&slow.url("dense.raw"))
            .spawn();
        std::thread::sleep(Duration::from_millis(2500));
        child.kill().expect("kill -9");
        child.wait().expect("reap");
    }
    let fast = HttpServer::start(d.path(), &[]);
    Importer::new(run.path())
        .http(&fast.url("dense.raw"))
        .run()
        .assert_success();
    assert_same_bytes(&out_disk(run.path()), &qemu_reference(&raw, d.path()));
}

#[test]
fn configuration_errors() {
    let run = tmp();
    let o = Importer::new(run.path())
        .env("PREALLOCATION", "maybe")
        .http("http://127.0.0.1:1/x")
        .run();
    o.assert_failure("PREALLOCATION");
    let o = Importer::new(run.path())
        .env("IMPORTER_SOURCE", "ftp")
        .arg("--metrics-addr")
        .arg("none")
        .run();
    o.assert_failure("Unknown data source: ftp");
    let o = Importer::new(run.path())
        .env("IMPORTER_SOURCE", "s3")
        .arg("--metrics-addr")
        .arg("none")
        .run();
    o.assert_failure("Unable to connect to s3 data source:");
    let o = Importer::new(run.path())
        .http("http://127.0.0.1:1/x")
        .arg("--retries")
        .arg("1")
        .run();
    o.assert_failure("Unable to connect to http data source:");
    assert!(o.stderr.contains("\"class\":\"retryable\""), "{}", o.stderr);
}
