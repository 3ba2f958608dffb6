//! qcow2 conformance: a matrix of images made by qemu-img/qemu-io, streamed over HTTP
//! (a pipe: no seeking) through the importer, compared byte for byte with
//! `qemu-img convert -O raw`. Plus hostile images, which must be refused before any
//! byte is written and never leak host-file bytes.

use ferrydisk_tests::*;
use std::path::{Path, PathBuf};
use std::process::Command;

fn qemu_io(img: &Path, cmds: &[&str]) {
    let mut c = Command::new("qemu-io");
    c.args(["-f", "qcow2"]);
    for cmd in cmds {
        c.arg("-c").arg(cmd);
    }
    sh(c.arg(img));
}

fn matrix(dir: &Path) -> Vec<PathBuf> {
    let base = patterned_disk(dir);
    let b = base.to_str().expect("utf8");
    let mut out = Vec::new();
    let mut conv = |name: &str, extra: &[&str]| {
        let p = dir.join(format!("{name}.qcow2"));
        let mut args = vec!["convert", "-f", "raw", "-O", "qcow2"];
        args.extend_from_slice(extra);
        args.push(b);
        args.push(p.to_str().expect("utf8"));
        qemu_img(&args);
        out.push(p);
    };
    for cs in ["512", "4k", "64k", "2M"] {
        conv(
            &format!("plain-{cs}"),
            &["-o", &format!("cluster_size={cs}")],
        );
        conv(
            &format!("deflate-{cs}"),
            &["-c", "-o", &format!("cluster_size={cs}")],
        );
        conv(
            &format!("zstd-{cs}"),
            &[
                "-c",
                "-o",
                &format!("cluster_size={cs},compression_type=zstd"),
            ],
        );
    }
    conv("extl2-64k", &["-o", "cluster_size=64k,extended_l2=on"]);
    conv(
        "extl2-2M-zstd",
        &[
            "-c",
            "-o",
            "cluster_size=2M,extended_l2=on,compression_type=zstd",
        ],
    );
    conv("v2-compat010", &["-o", "compat=0.10"]);
    conv(
        "v2-compat010-compressed",
        &["-c", "-o", "compat=0.10,cluster_size=4k"],
    );
    conv("prealloc-metadata", &["-o", "preallocation=metadata"]);
    conv(
        "prealloc-full",
        &["-o", "preallocation=full,cluster_size=4k"],
    );
    conv("refcount-bits-1", &["-o", "refcount_bits=1"]);
    conv(
        "refcount-bits-64",
        &["-o", "refcount_bits=64,cluster_size=4k"],
    );
    // Images grown in place by qemu-io: writes at odd offsets, zero writes, discards.
    for (name, opts) in [
        ("io-512", "cluster_size=512"),
        ("io-64k", "cluster_size=64k"),
        ("io-2M", "cluster_size=2M"),
        ("io-extl2", "cluster_size=64k,extended_l2=on"),
        ("io-v2", "compat=0.10"),
    ] {
        let p = dir.join(format!("{name}.qcow2"));
        qemu_img(&[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            opts,
            p.to_str().expect("utf8"),
            "48M",
        ]);
        qemu_io(
            &p,
            &[
                "write -q -P 0x33 30M 3M",
                "write -q -P 0x44 1000 70000",
                "write -q -P 0x55 5M 2M",
                "write -q -z 5M 64k",
                "discard -q 6M 128k",
                "write -q -P 0x66 46M 2M",
                "write -q -P 0x77 12345 100",
                "write -q -z 31M 1M",
            ],
        );
        out.push(p);
    }
    out
}

#[test]
fn qcow2_matrix_matches_qemu_img_when_streamed() {
    let d = tempfile::tempdir().expect("tmp");
    let images = matrix(d.path());
    let server = HttpServer::start(d.path(), &[]);
    for img in &images {
        let name = img.file_name().and_then(|n| n.to_str()).expect("name");
        let reference = qemu_reference(img, d.path());
        for seekable in [false, true] {
            let run = tempfile::tempdir().expect("tmp");
            let scratch = run.path().join("scratch");
            std::fs::create_dir(&scratch).expect("scratch");
            let importer = Importer::new(run.path()).arg("--scratch").arg(&scratch);
            let o = if seekable {
                importer.file(img).run()
            } else {
                importer.http(&server.url(name)).run()
            };
            assert_eq!(o.code, 0, "{name}: {}\n{}", o.termination, o.stderr);
            assert_eq!(cdi_part(&o.termination), Outcome::SUCCESS, "{name}");
            // preallocation=full puts most L2 tables after all the data: the one layout
            // here that needs a spool from a pipe. A local file is read again instead.
            assert_eq!(
                o.stderr.contains("spooling"),
                name == "prealloc-full.qcow2" && !seekable,
                "{name}: {}",
                o.stderr
            );
            assert_same_bytes(&run.path().join("data/disk.img"), &reference);
            assert_eq!(
                std::fs::read_dir(&scratch).expect("ls").count(),
                0,
                "the spool leaves nothing behind"
            );
        }
    }
    eprintln!(
        "{} qcow2 variants byte-identical to qemu-img convert, from a pipe and from a file",
        images.len()
    );
}

#[test]
fn data_ahead_of_its_tables_without_scratch_asks_for_scratch() {
    let d = tempfile::tempdir().expect("tmp");
    let base = patterned_disk(d.path());
    let q = d.path().join("pf.qcow2");
    qemu_img(&[
        "convert",
        "-f",
        "raw",
        "-O",
        "qcow2",
        "-o",
        "preallocation=full,cluster_size=4k",
        base.to_str().expect("utf8"),
        q.to_str().expect("utf8"),
    ]);
    let server = HttpServer::start(d.path(), &[]);
    let run = tempfile::tempdir().expect("tmp");
    // No --scratch directory: CDI's protocol, exit 0 and the controller adds scratch.
    let o = Importer::new(run.path())
        .http(&server.url("pf.qcow2"))
        .arg("--scratch")
        .arg(run.path().join("no-scratch"))
        .run();
    assert_eq!(o.code, 0, "{}", o.stderr);
    assert_eq!(
        o.termination,
        r#"{"scratchSpaceRequired":true,"preallocationApplied":false,"message":"Import Complete"}"#
    );
    assert_eq!(
        std::fs::metadata(run.path().join("data/disk.img"))
            .expect("meta")
            .len(),
        0
    );
}

#[test]
fn qcow2_inside_xz_and_tar() {
    let d = tempfile::tempdir().expect("tmp");
    let base = patterned_disk(d.path());
    let q = d.path().join("disk.qcow2");
    qemu_img(&[
        "convert",
        "-f",
        "raw",
        "-O",
        "qcow2",
        "-c",
        base.to_str().expect("utf8"),
        q.to_str().expect("utf8"),
    ]);
    let xz = sh(Command::new("xz").args(["-1", "-T1", "-c"]).arg(&q)).stdout;
    std::fs::write(d.path().join("disk.qcow2.xz"), xz).expect("write");
    sh(Command::new("tar")
        .arg("-C")
        .arg(d.path())
        .arg("-czf")
        .arg(d.path().join("disk.tar.gz"))
        .arg("disk.qcow2"));
    let server = HttpServer::start(d.path(), &[]);
    for name in ["disk.qcow2.xz", "disk.tar.gz"] {
        let run = tempfile::tempdir().expect("tmp");
        Importer::new(run.path())
            .http(&server.url(name))
            .run()
            .assert_success();
        assert_same_bytes(&run.path().join("data/disk.img"), &base);
    }
}

/// A host file whose content must never show up in an output disk.
fn secret_file(dir: &Path) -> PathBuf {
    let p = dir.join("host-secret.raw");
    std::fs::write(&p, vec![0x42u8; 1 << 20]).expect("secret");
    p
}

fn assert_refused(server: &HttpServer, name: &str, needle: &str) {
    let run = tempfile::tempdir().expect("tmp");
    let o = Importer::new(run.path()).http(&server.url(name)).run();
    o.assert_failure(needle);
    let out = std::fs::read(run.path().join("data/disk.img")).unwrap_or_default();
    assert!(out.is_empty(), "{name}: refused images leave an empty disk");
    assert!(!out.contains(&0x42), "{name}: host-file bytes in output");
}

#[test]
fn hostile_qcow2_images_are_refused() {
    let d = tempfile::tempdir().expect("tmp");
    let dir = d.path();
    let secret = secret_file(dir);
    let s = secret.to_str().expect("utf8");
    let p = |n: &str| dir.join(n).to_str().expect("utf8").to_string();
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        s,
        "-F",
        "raw",
        &p("backing.qcow2"),
    ]);
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        &format!("data_file={s},data_file_raw=on"),
        &p("datafile.qcow2"),
        "1M",
    ]);
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "--object",
        "secret,id=sec0,data=password",
        "-o",
        "encrypt.format=luks,encrypt.key-secret=sec0",
        &p("encrypted.qcow2"),
        "1M",
    ]);
    // Truncated: a valid image cut in the middle of its data.
    qemu_img(&["create", "-q", "-f", "qcow2", &p("full.qcow2"), "8M"]);
    qemu_io(&dir.join("full.qcow2"), &["write -q -P 0x11 0 4M"]);
    let full = std::fs::read(dir.join("full.qcow2")).expect("read");
    std::fs::write(dir.join("truncated.qcow2"), &full[..full.len() / 2]).expect("write");
    // L1 size field of 2^31.
    let mut big_l1 = full.clone();
    big_l1[36..40].copy_from_slice(&(1u32 << 31).to_be_bytes());
    std::fs::write(dir.join("l1size.qcow2"), big_l1).expect("write");
    // Overlapping tables: the L1 entry points its L2 table at the refcount table
    // (cluster 1 of a 64 KiB-cluster image).
    let mut overlap = full.clone();
    let l1_off = u64::from_be_bytes(full[40..48].try_into().expect("8")) as usize;
    overlap[l1_off..l1_off + 8].copy_from_slice(&0x1_0000u64.to_be_bytes());
    std::fs::write(dir.join("overlap.qcow2"), overlap).expect("write");

    let server = HttpServer::start(dir, &[]);
    assert_refused(&server, "backing.qcow2", "backing file");
    assert_refused(&server, "datafile.qcow2", "external data file");
    assert_refused(&server, "encrypted.qcow2", "encrypted");
    assert_refused(&server, "truncated.qcow2", "qcow2 image ends at byte");
    assert_refused(&server, "l1size.qcow2", "l1_size");
    assert_refused(&server, "overlap.qcow2", "qcow2 image is corrupt");
}

#[test]
fn qcow2_larger_than_the_volume_is_refused_before_writing() {
    let d = tempfile::tempdir().expect("tmp");
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        d.path().join("huge.qcow2").to_str().expect("utf8"),
        "2T",
    ]);
    let server = HttpServer::start(d.path(), &[]);
    let run = tempfile::tempdir().expect("tmp");
    let o = Importer::new(run.path())
        .http(&server.url("huge.qcow2"))
        .env("IMPORTER_IMAGE_SIZE", "1Gi")
        .run();
    o.assert_failure(
        "virtual image size 2199023255552 is larger than the reported available storage 1073741824",
    );
}

/// `--output-format qcow2`: a qcow2 (here also inside xz) is written as it came, after
/// a full validating conversion; a hostile one is still refused; raw becomes qcow2.
#[test]
fn qcow2_kept_as_qcow2_when_asked() {
    let d = tempfile::tempdir().expect("tmp");
    let base = patterned_disk(d.path());
    let b = base.to_str().expect("utf8");
    let q = d.path().join("disk.qcow2");
    qemu_img(&[
        "convert",
        "-f",
        "raw",
        "-O",
        "qcow2",
        "-c",
        b,
        q.to_str().expect("utf8"),
    ]);
    let xz = sh(Command::new("xz").args(["-1", "-T1", "-c"]).arg(&q)).stdout;
    std::fs::write(d.path().join("disk.qcow2.xz"), xz).expect("write");
    let secret = secret_file(d.path());
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
    ]);
    let server = HttpServer::start(d.path(), &[]);
    for name in ["disk.qcow2", "disk.qcow2.xz"] {
        let run = tempfile::tempdir().expect("tmp");
        Importer::new(run.path())
            .http(&server.url(name))
            .arg("--output-format")
            .arg("qcow2")
            .run()
            .assert_success();
        let kept = run.path().join("data/disk.img");
        assert_same_bytes(&kept, &q);
        let raw = qemu_reference_as(&kept, Some("qcow2"), run.path());
        assert_same_bytes(&raw, &base);
    }
    let run = tempfile::tempdir().expect("tmp");
    let o = Importer::new(run.path())
        .http(&server.url("backing.qcow2"))
        .arg("--output-format")
        .arg("qcow2")
        .run();
    o.assert_failure("backing file");
    let out = std::fs::read(run.path().join("data/disk.img")).unwrap_or_default();
    assert!(out.is_empty(), "a refused qcow2 leaves an empty disk");
    let run = tempfile::tempdir().expect("tmp");
    Importer::new(run.path())
        .http(&server.url("base.raw"))
        .arg("--output-format")
        .arg("qcow2")
        .run()
        .assert_success();
    // Any other format goes through the qcow2 writer (tests/tests/formats.rs has them
    // all): qemu reads it back as the raw image.
    let out = run.path().join("data/disk.img");
    assert_eq!(&std::fs::read(&out).expect("read")[..4], b"QFI\xfb");
    let raw = qemu_reference_as(&out, Some("qcow2"), run.path());
    assert_same_bytes(&raw, &base);
}
