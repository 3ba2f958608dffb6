//! End-to-end regression tests for defects found by hostile testing (issue 11): a
//! server that changes the file under a resumed download, redirect loops and internal
//! redirect targets, symlinked destinations, tar headers sized to exhaust memory, a
//! full volume, panics, and control characters from images.

use ferrydisk_tests::*;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

fn dense(dir: &Path, name: &str, seed: u64) -> PathBuf {
    dense_fixture_named(dir, name, seed)
}

/// A server that drops the first response after 5 MB and from then on serves `changed`
/// in place of the file asked for, sending the `validators` named.
fn swapping_server(dir: &Path, changed: &Path, validators: &str, extra: &[&str]) -> HttpServer {
    let mut args = vec![
        "--drop-after",
        "5000000",
        "--drops",
        "1",
        "--swap",
        changed.to_str().expect("utf8"),
        "--validators",
        validators,
    ];
    args.extend_from_slice(extra);
    HttpServer::start(dir, &args)
}

fn sha256(p: &Path) -> String {
    let o = sh(Command::new("sha256sum").arg(p));
    String::from_utf8_lossy(&o.stdout)
        .split_whitespace()
        .next()
        .expect("sum")
        .to_string()
}

/// The file is replaced after the first connection drops, and the server answers the
/// resume from the new file whatever If-Range says. For every kind of validator (a
/// changed strong ETag, weak ETags, a changed Last-Modified, none at all) the importer
/// must not splice: it starts again from byte 0 and the disk is wholly the new file.
#[test]
fn a_file_changed_under_a_resume_is_never_spliced() {
    for validators in ["etag", "weak", "lastmod", "none"] {
        let d = tmp();
        let a = dense(d.path(), "disk.raw", 3);
        let b = dense(d.path(), "changed.raw", 100);
        // A different mtime, so Last-Modified changes too.
        let old = std::time::SystemTime::now() - Duration::from_secs(7200);
        std::fs::File::options()
            .write(true)
            .open(&a)
            .expect("open")
            .set_modified(old)
            .expect("mtime");
        let server = swapping_server(d.path(), &b, validators, &["--ignore-if-range"]);
        let run = tmp();
        let o = Importer::new(run.path())
            .http(&server.url("disk.raw"))
            .run();
        o.assert_success();
        assert!(
            o.stderr.contains("importing again from byte 0"),
            "{validators}: {}",
            o.stderr
        );
        assert_same_bytes(&out_disk(run.path()), &b);
    }
}

/// The same file behind a resume is still resumed (Last-Modified with the length is a
/// strong enough validator), not downloaded again.
#[test]
fn an_unchanged_file_with_last_modified_only_is_resumed_in_place() {
    let d = tmp();
    let a = dense(d.path(), "disk.raw", 3);
    let log = d.path().join("requests.log");
    let server = HttpServer::start(
        d.path(),
        &[
            "--drop-after",
            "5000000",
            "--drops",
            "2",
            "--validators",
            "lastmod",
            "--log",
            log.to_str().expect("utf8"),
        ],
    );
    let run = tmp();
    let o = Importer::new(run.path())
        .http(&server.url("disk.raw"))
        .run();
    o.assert_success();
    assert!(!o.stderr.contains("from byte 0"), "{}", o.stderr);
    let requests = std::fs::read_to_string(&log).expect("log");
    assert_eq!(
        requests
            .lines()
            .filter(|l| l.contains("range=bytes="))
            .count(),
        2,
        "{requests}"
    );
    assert_same_bytes(&out_disk(run.path()), &a);
}

/// A checksum of the original file: the restarted import gets the new one, the checksum
/// refuses it, and the volume keeps nothing of either.
#[test]
fn checksum_refusal_after_a_restart_leaves_an_empty_disk() {
    let d = tmp();
    let a = dense(d.path(), "disk.raw", 3);
    let b = dense(d.path(), "changed.raw", 100);
    let server = swapping_server(d.path(), &b, "none", &[]);
    let run = tmp();
    let o = Importer::new(run.path())
        .http(&server.url("disk.raw"))
        .env("IMPORTER_CHECKSUM", &format!("sha256:{}", sha256(&a)))
        .run();
    assert_eq!(o.code, 0, "CDI's checksum answer is exit 0: {}", o.stderr);
    assert!(
        o.termination.contains("checksum mismatch"),
        "{}",
        o.termination
    );
    assert_eq!(
        std::fs::metadata(out_disk(run.path())).expect("meta").len(),
        0
    );
}

/// Archive content refused by its checksum leaves the data directory as it was.
#[test]
fn archive_refused_by_its_checksum_leaves_nothing_unpacked() {
    let d = tmp();
    let src = d.path().join("tree");
    std::fs::create_dir_all(src.join("sub")).expect("mkdir");
    std::fs::write(src.join("a.txt"), b"hello").expect("write");
    std::fs::write(src.join("sub/b.bin"), vec![7u8; 100_000]).expect("write");
    sh(Command::new("tar")
        .arg("-C")
        .arg(&src)
        .args(["-czf"])
        .arg(d.path().join("tree.tar.gz"))
        .args(["a.txt", "sub"]));
    let server = HttpServer::start(d.path(), &[]);
    let run = tmp();
    let o = Importer::new(run.path())
        .http(&server.url("tree.tar.gz"))
        .env("IMPORTER_CONTENTTYPE", "archive")
        .env("IMPORTER_CHECKSUM", &format!("sha256:{}", "1".repeat(64)))
        .run();
    assert!(
        o.termination.contains("checksum mismatch"),
        "{}",
        o.termination
    );
    let left: Vec<_> = std::fs::read_dir(run.path().join("data"))
        .expect("data")
        .map(|e| e.expect("entry").file_name())
        .collect();
    assert!(left.is_empty(), "left behind: {left:?}");
    // The same archive with no checksum is unpacked in place.
    let o = Importer::new(run.path())
        .http(&server.url("tree.tar.gz"))
        .env("IMPORTER_CONTENTTYPE", "archive")
        .run();
    o.assert_success();
    assert_eq!(
        std::fs::read(run.path().join("data/sub/b.bin")).expect("b"),
        vec![7u8; 100_000]
    );
    assert!(!run.path().join("data/.ferrydisk-unpacking").exists());
}

#[test]
fn a_redirect_loop_is_terminal_and_quick() {
    let d = tmp();
    let server = HttpServer::start(d.path(), &["--redirect-loop"]);
    let run = tmp();
    let t = Instant::now();
    let o = Importer::new(run.path()).http(&server.url("loop")).run();
    o.assert_failure("redirect");
    assert!(
        o.termination.contains("more than 10 redirects"),
        "{}",
        o.termination
    );
    assert!(o.stderr.contains("\"class\":\"terminal\""), "{}", o.stderr);
    assert!(
        t.elapsed() < Duration::from_secs(10),
        "took {:?}",
        t.elapsed()
    );
}

/// `--refuse-internal-redirects` (on in the deploy manifests) refuses a redirect to a
/// loopback (or link-local, the unit tests cover 169.254.169.254) target; without it the
/// redirect is followed as CDI follows it. Only loopback addresses are used here.
#[test]
fn redirects_to_internal_addresses_can_be_refused() {
    let d = tmp();
    let raw = dense(d.path(), "disk.raw", 3);
    let target_server = HttpServer::start(d.path(), &[]);
    let target = format!("http://127.0.0.1:{}/disk.raw", target_server.port);
    let server = HttpServer::start(d.path(), &["--redirect-to", &target]);
    let run = tmp();
    let o = Importer::new(run.path())
        .http(&server.url("redirect"))
        .env("FERRYDISK_REFUSE_INTERNAL_REDIRECTS", "true")
        .run();
    o.assert_failure("redirect to internal address 127.0.0.1 refused");
    let run = tmp();
    let o = Importer::new(run.path())
        .http(&server.url("redirect"))
        .run();
    o.assert_success();
    assert_same_bytes(&out_disk(run.path()), &raw);
}

/// A `disk.img` symlink left on the volume is not followed.
#[test]
fn a_symlinked_destination_is_not_followed() {
    let d = tmp();
    dense(d.path(), "disk.raw", 3);
    let server = HttpServer::start(d.path(), &[]);
    let run = tmp();
    let victim = run.path().join("victim");
    std::fs::write(&victim, b"precious").expect("victim");
    std::fs::create_dir_all(run.path().join("data")).expect("data");
    std::os::unix::fs::symlink(&victim, out_disk(run.path())).expect("symlink");
    let o = Importer::new(run.path())
        .http(&server.url("disk.raw"))
        .run();
    o.assert_failure("Unable to process data:");
    assert_eq!(std::fs::read(&victim).expect("victim"), b"precious");
}

/// A tar made by Python's tarfile with one oversized header: a PAX record or a GNU long
/// name of `bytes` bytes before a small disk file.
fn tar_with_big_header(dir: &Path, kind: &str, bytes: usize) -> PathBuf {
    let out = dir.join(format!("{kind}.tar.gz"));
    let script = r#"
import io, sys, tarfile
out, kind, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
fmt = tarfile.PAX_FORMAT if kind == "pax" else tarfile.GNU_FORMAT
with tarfile.open(out, "w:gz", format=fmt, compresslevel=1) as t:
    name = "disk.img" if kind == "pax" else "d/" + "x" * n
    info = tarfile.TarInfo(name)
    data = b"\xab" * 4096
    info.size = len(data)
    if kind == "pax":
        info.pax_headers = {"comment": "y" * n}
    t.addfile(info, io.BytesIO(data))
"#;
    sh(Command::new("python3")
        .arg("-c")
        .arg(script)
        .arg(&out)
        .arg(kind)
        .arg(bytes.to_string()));
    out
}

/// Peak RSS of a finished child, from its `/usr/bin/time -v` report.
fn max_rss_kib(stderr: &str) -> u64 {
    stderr
        .lines()
        .find_map(|l| {
            l.trim()
                .strip_prefix("Maximum resident set size (kbytes): ")
        })
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no time -v report in {stderr}"))
}

#[test]
fn oversized_tar_headers_are_refused_in_bounded_memory() {
    let d = tmp();
    for kind in ["pax", "gnu"] {
        // 64 MiB: 64 times the budget, small enough to build quickly.
        tar_with_big_header(d.path(), kind, 64 << 20);
    }
    // A header within the budget still imports.
    let small = d.path().join("small");
    std::fs::create_dir_all(&small).expect("mkdir");
    let ok = tar_with_big_header(&small, "pax", 100_000);
    std::fs::rename(&ok, d.path().join("ok.tar.gz")).expect("mv");
    let server = HttpServer::start(d.path(), &[]);
    for (kind, content) in [
        ("pax", "kubevirt"),
        ("gnu", "kubevirt"),
        ("pax", "archive"),
        ("gnu", "archive"),
    ] {
        let run = tmp();
        let mut imp = Importer::new(run.path())
            .http(&server.url(&format!("{kind}.tar.gz")))
            .env("IMPORTER_CONTENTTYPE", content);
        let mut timed = Command::new("/usr/bin/time");
        timed
            .arg("-v")
            .arg(imp.cmd.get_program())
            .args(imp.cmd.get_args())
            .env_clear();
        for (k, v) in imp.cmd.get_envs() {
            if let Some(v) = v {
                timed.env(k, v);
            }
        }
        imp.cmd = timed;
        let o = imp.run();
        o.assert_failure("headers before an entry");
        let rss = max_rss_kib(&o.stderr);
        assert!(rss < 64 << 10, "{kind}/{content}: peak RSS {rss} KiB");
    }
    let run = tmp();
    let o = Importer::new(run.path())
        .http(&server.url("ok.tar.gz"))
        .run();
    o.assert_success();
}

/// ENOSPC on the volume: a terminal one-line message that names the destination and says
/// it is full (many small files use more space than their bytes, so the size check
/// before unpacking passes and the filesystem fills up).
#[test]
fn a_full_volume_is_a_clear_terminal_message() {
    let d = tmp();
    let tree = d.path().join("tree");
    std::fs::create_dir_all(&tree).expect("mkdir");
    for i in 0..1500 {
        std::fs::write(tree.join(format!("f{i:04}")), [b'x'; 100]).expect("write");
    }
    sh(Command::new("tar")
        .arg("-C")
        .arg(&tree)
        .arg("-cf")
        .arg(d.path().join("many.tar"))
        .arg("."));
    let server = HttpServer::start(d.path(), &[]);
    let run = tmp();
    let data = run.path().join("data");
    std::fs::create_dir_all(&data).expect("data");
    let mounted = Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=2m", "tmpfs"])
        .arg(&data)
        .status()
        .is_ok_and(|s| s.success());
    if !mounted {
        eprintln!("SKIP: cannot mount a tmpfs here (needs root)");
        return;
    }
    struct Unmount(PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = Command::new("umount").arg(&self.0).status();
        }
    }
    let _guard = Unmount(data.clone());
    let o = Importer::new(run.path())
        .http(&server.url("many.tar"))
        .env("IMPORTER_CONTENTTYPE", "archive")
        .run();
    o.assert_failure("is full");
    assert!(
        o.termination.contains(data.to_str().expect("utf8")),
        "{}",
        o.termination
    );
    assert!(o.stderr.contains("\"class\":\"terminal\""), "{}", o.stderr);
}

#[test]
fn a_panic_writes_a_termination_message() {
    let run = tmp();
    let o = Importer::new(run.path())
        .arg("--internal-panic-test")
        .env("IMPORTER_SOURCE", "none")
        .run();
    o.assert_failure("Unable to process data: internal error: index out of bounds");
}

/// Control characters in names an image carries (here a tar entry named with an escape
/// sequence, one of two files) never reach the termination message or logs raw.
#[test]
fn control_characters_from_images_are_escaped() {
    let d = tmp();
    let out = d.path().join("evil.tar");
    let script = r#"
import io, sys, tarfile
with tarfile.open(sys.argv[1], "w") as t:
    for name in ["a.img", "b\x1b[2J\x07.img"]:
        info = tarfile.TarInfo(name)
        info.size = 512
        t.addfile(info, io.BytesIO(b"\x01" * 512))
"#;
    sh(Command::new("python3").arg("-c").arg(script).arg(&out));
    let server = HttpServer::start(d.path(), &[]);
    let run = tmp();
    let o = Importer::new(run.path())
        .http(&server.url("evil.tar"))
        .run();
    o.assert_failure("more than one regular file");
    assert!(
        o.termination.contains("\\u{1b}[2J\\u{7}"),
        "{}",
        o.termination
    );
    assert!(!o.termination.contains('\x1b'), "{:?}", o.termination);
    assert!(!o.stderr.contains('\x1b'), "{:?}", o.stderr);
}

/// What `qemu-img convert -O qcow2 -o extended_l2=on` writes when the data ends inside
/// a cluster: a file that ends inside its last, partly allocated cluster.
#[test]
fn extended_l2_image_ending_inside_its_last_cluster_imports_byte_equal() {
    let d = tmp();
    let raw = d.path().join("e.raw");
    raw_fixture(&raw, "3M", &[(0, 1 << 20, 0xcd), (2 << 20, 12288, 0xef)]);
    let q = d.path().join("e.qcow2");
    sh(Command::new("qemu-img")
        .args([
            "convert",
            "-f",
            "raw",
            "-O",
            "qcow2",
            "-o",
            "extended_l2=on",
        ])
        .arg(&raw)
        .arg(&q));
    assert_ne!(
        std::fs::metadata(&q).expect("meta").len() % 65536,
        0,
        "the fixture must end inside a cluster"
    );
    let server = HttpServer::start(d.path(), &[]);
    let run = tmp();
    Importer::new(run.path())
        .http(&server.url("e.qcow2"))
        .run()
        .assert_success();
    assert_same_bytes(&out_disk(run.path()), &qemu_reference(&q, d.path()));
}

/// Text descriptors qemu recognises (comments, blank lines, then `version=N`) are vmdk,
/// not a raw disk holding the descriptor's text; their extents are other files.
#[test]
fn descriptor_only_vmdk_without_the_usual_first_line_is_refused() {
    let d = tmp();
    std::fs::write(
        d.path().join("desc.vmdk"),
        "# made by hand\nversion=1\nCID=fffffffe\nparentCID=ffffffff\ncreateType=\"monolithicFlat\"\nRW 2048 FLAT \"desc-flat.vmdk\" 0\n",
    )
    .expect("write");
    let server = HttpServer::start(d.path(), &[]);
    let run = tmp();
    let o = Importer::new(run.path())
        .http(&server.url("desc.vmdk"))
        .run();
    o.assert_failure("vmdk");
    assert!(
        o.termination.contains("separate files"),
        "{}",
        o.termination
    );
}

/// A streamOptimized vmdk whose header claims huge grains: 64 MiB grains are refused by
/// name before any buffer is sized from them, and 2^55 sectors (which wrapped to 0 and
/// divided by zero) is a clean refusal too.
#[test]
fn vmdk_with_oversized_grains_is_refused_cleanly() {
    let d = tmp();
    let raw = d.path().join("v.raw");
    raw_fixture(&raw, "8M", &[(0, 1 << 20, 0x42)]);
    let v = d.path().join("v.vmdk");
    sh(Command::new("qemu-img")
        .args([
            "convert",
            "-f",
            "raw",
            "-O",
            "vmdk",
            "-o",
            "subformat=streamOptimized",
        ])
        .arg(&raw)
        .arg(&v));
    let image = std::fs::read(&v).expect("read");
    for (name, sectors) in [("g64m.vmdk", 1u64 << 17), ("g2p55.vmdk", 1u64 << 55)] {
        let mut patched = image.clone();
        patched[20..28].copy_from_slice(&sectors.to_le_bytes());
        std::fs::write(d.path().join(name), patched).expect("write");
    }
    let server = HttpServer::start(d.path(), &[]);
    for name in ["g64m.vmdk", "g2p55.vmdk"] {
        let run = tmp();
        let o = Importer::new(run.path()).http(&server.url(name)).run();
        o.assert_failure("vmdk");
        assert!(
            o.termination.contains("more than 8388608 bytes"),
            "{name}: {}",
            o.termination
        );
        assert!(
            !o.termination.contains("internal error"),
            "{}",
            o.termination
        );
    }
}
