//! vmdk, vhd (vpc), vdi conformance: images made by qemu-img/qemu-io, streamed over
//! HTTP (a pipe: no seeking) through the importer, compared byte for byte with
//! `qemu-img convert -f <format> -O raw`. Plus images that name other files, which
//! must be refused before any byte is written.

use ferrydisk_tests::*;
use std::path::{Path, PathBuf};
use std::process::Command;

/// (file, qemu format name)
fn matrix(dir: &Path) -> Vec<(PathBuf, &'static str)> {
    let base = patterned_disk(dir);
    let b = base.to_str().expect("utf8");
    let mut out = Vec::new();
    let mut conv = |name: &str, fmt: &'static str, opts: &str| {
        let p = dir.join(name);
        let mut args = vec!["convert", "-f", "raw", "-O", fmt];
        if !opts.is_empty() {
            args.extend_from_slice(&["-o", opts]);
        }
        args.push(b);
        args.push(p.to_str().expect("utf8"));
        qemu_img(&args);
        out.push((p, fmt));
    };
    conv("sparse.vmdk", "vmdk", "");
    conv("sparse-zeroed.vmdk", "vmdk", "zeroed_grain=on");
    conv("sparse-compat6.vmdk", "vmdk", "compat6=on");
    conv("stream.vmdk", "vmdk", "subformat=streamOptimized");
    conv("dynamic.vhd", "vpc", "");
    conv("dynamic-forcesize.vhd", "vpc", "force_size=on");
    conv("fixed.vhd", "vpc", "subformat=fixed");
    conv(
        "fixed-forcesize.vhd",
        "vpc",
        "subformat=fixed,force_size=on",
    );
    conv("dynamic.vhdx", "vhdx", "");
    conv("small-blocks.vhdx", "vhdx", "block_size=1M,log_size=1M");
    conv("big-blocks.vhdx", "vhdx", "block_size=64M");
    conv("fixed.vhdx", "vhdx", "subformat=fixed");
    conv("dynamic.vdi", "vdi", "");
    conv("static.vdi", "vdi", "static=on");
    // Grown in place by qemu-io: data allocated in write order, not guest order, with
    // odd offsets and zero writes.
    for (name, fmt) in [("io.vmdk", "vmdk"), ("io.vhd", "vpc"), ("io.vdi", "vdi")] {
        let p = dir.join(name);
        qemu_img(&["create", "-q", "-f", fmt, p.to_str().expect("utf8"), "48M"]);
        sh(Command::new("qemu-io")
            .args(["-f", fmt])
            .args(["-c", "write -q -P 0x33 30M 3M"])
            .args(["-c", "write -q -P 0x44 1000 70000"])
            .args(["-c", "write -q -P 0x55 5M 2M"])
            .args(["-c", "write -q -z 5M 64k"])
            .args(["-c", "write -q -P 0x66 46M 2M"])
            .args(["-c", "write -q -P 0x77 12345 100"])
            .arg(&p));
        out.push((p, fmt));
    }
    out
}

#[test]
fn format_matrix_matches_qemu_img_when_streamed() {
    let d = tempfile::tempdir().expect("tmp");
    let images = matrix(d.path());
    let server = HttpServer::start(d.path(), &[]);
    for (img, fmt) in &images {
        let name = img.file_name().and_then(|n| n.to_str()).expect("name");
        let reference = qemu_reference_as(img, Some(fmt), d.path());
        for seekable in [false, true] {
            let run = tempfile::tempdir().expect("tmp");
            let importer = Importer::new(run.path());
            let o = if seekable {
                importer.file(img).run()
            } else {
                importer.http(&server.url(name)).run()
            };
            assert_eq!(o.code, 0, "{name}: {}\n{}", o.termination, o.stderr);
            assert_eq!(cdi_part(&o.termination), Outcome::SUCCESS, "{name}");
            assert!(!o.stderr.contains("spooling"), "{name}: {}", o.stderr);
            assert_same_bytes(&run.path().join("data/disk.img"), &reference);
        }
    }
    eprintln!(
        "{} vmdk/vhd/vhdx/vdi variants byte-identical to qemu-img convert, from a pipe and from a file",
        images.len()
    );
}

/// `qemu-img check` exit status and output for `img`.
fn qemu_check(img: &Path) -> (bool, String) {
    let o = Command::new("qemu-img")
        .args(["check", "-f", "qcow2"])
        .arg(img)
        .output()
        .expect("qemu-img check");
    (
        o.status.success(),
        String::from_utf8_lossy(&o.stdout).into_owned(),
    )
}

/// The virtual size `qemu-img info` reads from a qcow2.
fn virtual_size(img: &Path) -> u64 {
    let info = sh(Command::new("qemu-img")
        .args(["info", "-f", "qcow2", "--output=json"])
        .arg(img))
    .stdout;
    let info: serde_json::Value = serde_json::from_slice(&info).expect("json");
    info["virtual-size"].as_u64().expect("virtual-size")
}

/// `--output-format qcow2` from every other format (issue #14 item 5): the qcow2 writer
/// turns each matrix image, a raw image and a compressed raw image into a qcow2 that
/// `qemu-img check` finds clean and `qemu-img compare` finds equal to the source; a
/// larger IMPORTER_IMAGE_SIZE becomes the qcow2's virtual size (CDI's resize rule).
#[test]
fn every_format_converts_to_qcow2_output() {
    let d = tempfile::tempdir().expect("tmp");
    let mut images = matrix(d.path());
    let base = d.path().join("base.raw");
    images.push((base.clone(), "raw"));
    let gz = sh(Command::new("gzip").args(["-1", "-c"]).arg(&base)).stdout;
    std::fs::write(d.path().join("base.raw.gz"), gz).expect("write");
    images.push((d.path().join("base.raw.gz"), "raw"));
    let server = HttpServer::start(d.path(), &[]);
    let mut compressed_clusters = 0;
    for ((img, fmt), compress) in images.iter().flat_map(|i| [(i, false), (i, true)]) {
        let name = img.file_name().and_then(|n| n.to_str()).expect("name");
        let reference = if name.ends_with(".gz") {
            base.clone()
        } else {
            qemu_reference_as(img, Some(fmt), d.path())
        };
        let run = tempfile::tempdir().expect("tmp");
        let mut i = Importer::new(run.path())
            .http(&server.url(name))
            .arg("--output-format")
            .arg("qcow2");
        if compress {
            i = i.env("FERRYDISK_QCOW2_COMPRESS", "true");
        }
        i.run().assert_success();
        let out = run.path().join("data/disk.img");
        let (clean, report) = qemu_check(&out);
        assert!(clean, "{name}: qemu-img check: {report}");
        if compress {
            let json: serde_json::Value = serde_json::from_slice(
                &sh(Command::new("qemu-img")
                    .args(["check", "--output=json", "-f", "qcow2"])
                    .arg(&out))
                .stdout,
            )
            .expect("check json");
            compressed_clusters += json["compressed-clusters"].as_u64().unwrap_or(0);
        }
        assert!(report.contains("No errors were found"), "{name}: {report}");
        assert_eq!(
            virtual_size(&out),
            std::fs::metadata(&reference).expect("meta").len(),
            "{name}"
        );
        let cmp = Command::new("qemu-img")
            .args(["compare", "-f", "raw", "-F", "qcow2"])
            .arg(&reference)
            .arg(&out)
            .output()
            .expect("qemu-img compare");
        assert!(
            cmp.status.success(),
            "{name}: {}",
            String::from_utf8_lossy(&cmp.stdout)
        );
        // Zeros are not allocated: the qcow2 holds about what the reference holds.
        assert!(
            allocated(&out) <= allocated(&reference) + (4 << 20),
            "{name}: {} bytes allocated for {} of data",
            allocated(&out),
            allocated(&reference)
        );
    }
    // Resized to the requested size, as CDI resizes a raw disk.
    let run = tempfile::tempdir().expect("tmp");
    Importer::new(run.path())
        .http(&server.url("base.raw.gz"))
        .arg("--output-format")
        .arg("qcow2")
        .env("IMPORTER_IMAGE_SIZE", "1Gi")
        .env("FILESYSTEM_OVERHEAD", "0")
        .run()
        .assert_success();
    let out = run.path().join("data/disk.img");
    assert!(qemu_check(&out).0);
    assert_eq!(virtual_size(&out), 1 << 30);
    sh(Command::new("qemu-img")
        .args(["compare", "-f", "raw", "-F", "qcow2"])
        .arg(&base)
        .arg(&out));
    assert!(
        compressed_clusters > 0,
        "compression wrote compressed clusters"
    );
    eprintln!(
        "{} sources written as qcow2, plain and compressed ({compressed_clusters} compressed clusters): qemu-img check clean, qemu-img compare identical",
        images.len()
    );
}

/// The termination message carries Deckhouse's report after CDI's fields (issue #14
/// item 6): format, virtual size and image size as `qemu-img info` states them for the
/// image under any compression, a duration and an average speed.
#[test]
fn termination_message_carries_deckhouse_fields() {
    let d = tempfile::tempdir().expect("tmp");
    let base = patterned_disk(d.path());
    let qcow2 = qcow2_of(&base, &d.path().join("disk.qcow2"));
    let vmdk = d.path().join("disk.vmdk");
    qemu_img(&[
        "convert",
        "-f",
        "raw",
        "-O",
        "vmdk",
        base.to_str().expect("utf8"),
        vmdk.to_str().expect("utf8"),
    ]);
    let xz = sh(Command::new("xz").args(["-1", "-T1", "-c"]).arg(&qcow2)).stdout;
    std::fs::write(d.path().join("disk.qcow2.xz"), &xz).expect("write");
    let server = HttpServer::start(d.path(), &[]);
    for (name, image, fmt, wire) in [
        ("disk.qcow2.xz", &qcow2, "qcow2", xz.len() as u64),
        ("disk.vmdk", &vmdk, "vmdk", 0),
        ("base.raw", &base, "raw", 0),
    ] {
        let run = tempfile::tempdir().expect("tmp");
        let o = Importer::new(run.path()).http(&server.url(name)).run();
        o.assert_success();
        let info = deckhouse_part(&o.termination);
        let qemu = sh(Command::new("qemu-img")
            .args(["info", "--output=json", "-f", fmt])
            .arg(image))
        .stdout;
        let qemu: serde_json::Value = serde_json::from_slice(&qemu).expect("json");
        assert_eq!(
            info["source-image-format"], qemu["format"],
            "{name}: {info}"
        );
        assert_eq!(
            info["source-image-virtual-size"], qemu["virtual-size"],
            "{name}: {info}"
        );
        assert_eq!(
            info["source-image-size"].as_u64(),
            Some(std::fs::metadata(image).expect("meta").len()),
            "{name}: {info}"
        );
        assert!(info["duration"].as_u64().unwrap_or(0) > 0, "{name}: {info}");
        assert!(
            info["average-speed"].as_u64().unwrap_or(0) > 0,
            "{name}: {info}"
        );
        if wire > 0 {
            // The speed is of the bytes on the wire (the xz), not of the disk.
            let ns = info["duration"].as_u64().expect("duration") as f64;
            let speed = info["average-speed"].as_u64().expect("speed") as f64;
            let implied = speed * ns / 1e9;
            assert!(
                (implied - wire as f64).abs() <= wire as f64 * 0.05 + 1.0,
                "{name}: {implied} bytes implied by the speed, {wire} sent"
            );
        }
    }
}

#[test]
fn formats_inside_compression_and_tar() {
    let d = tempfile::tempdir().expect("tmp");
    let base = patterned_disk(d.path());
    let b = base.to_str().expect("utf8");
    for (name, fmt, opts) in [
        ("disk.vmdk", "vmdk", "subformat=streamOptimized"),
        ("disk.vhd", "vpc", "subformat=fixed"),
        ("disk.vdi", "vdi", ""),
    ] {
        let p = d.path().join(name);
        let mut args = vec!["convert", "-f", "raw", "-O", fmt];
        if !opts.is_empty() {
            args.extend_from_slice(&["-o", opts]);
        }
        args.extend_from_slice(&[b, p.to_str().expect("utf8")]);
        qemu_img(&args);
    }
    let reference =
        |name: &str, fmt: &str| qemu_reference_as(&d.path().join(name), Some(fmt), d.path());
    let vhd_ref = reference("disk.vhd", "vpc");
    let vdi_ref = reference("disk.vdi", "vdi");
    let vmdk_ref = reference("disk.vmdk", "vmdk");
    let zst = sh(Command::new("zstd")
        .args(["-q", "-c"])
        .arg(d.path().join("disk.vhd")))
    .stdout;
    std::fs::write(d.path().join("disk.vhd.zst"), zst).expect("write");
    let gz = sh(Command::new("gzip")
        .args(["-1", "-c"])
        .arg(d.path().join("disk.vdi")))
    .stdout;
    std::fs::write(d.path().join("disk.vdi.gz"), gz).expect("write");
    sh(Command::new("tar")
        .arg("-C")
        .arg(d.path())
        .arg("-cf")
        .arg(d.path().join("ova.tar"))
        .arg("disk.vmdk"));
    let server = HttpServer::start(d.path(), &[]);
    for (name, want) in [
        ("disk.vhd.zst", &vhd_ref),
        ("disk.vdi.gz", &vdi_ref),
        ("ova.tar", &vmdk_ref),
    ] {
        let run = tempfile::tempdir().expect("tmp");
        Importer::new(run.path())
            .http(&server.url(name))
            .run()
            .assert_success();
        assert_same_bytes(&run.path().join("data/disk.img"), want);
    }
}

/// Images that name another file (a parent or an extent) are refused, the output disk
/// stays empty, and nothing of the named host file is read.
#[test]
fn images_naming_other_files_are_refused() {
    let d = tempfile::tempdir().expect("tmp");
    let secret = d.path().join("host-secret.vmdk");
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "vmdk",
        secret.to_str().expect("utf8"),
        "8M",
    ]);
    sh(Command::new("qemu-io")
        .args(["-f", "vmdk", "-c", "write -q -P 0xc5 0 8M"])
        .arg(&secret));
    // A vmdk child of a host file (parentFileNameHint).
    let child = d.path().join("child.vmdk");
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "vmdk",
        "-b",
        secret.to_str().expect("utf8"),
        "-F",
        "vmdk",
        child.to_str().expect("utf8"),
    ]);
    // A descriptor-only vmdk whose flat extent is a host file.
    std::fs::write(
        d.path().join("flat.vmdk"),
        format!(
            "# Disk DescriptorFile\nversion=1\nCID=fffffffe\nparentCID=ffffffff\ncreateType=\"monolithicFlat\"\nRW 16384 FLAT \"{}\" 0\n",
            secret.display()
        ),
    )
    .expect("write");
    // A vdi whose header names a parent (uuid_parent set), and a vhd made differencing.
    let vdi = d.path().join("child.vdi");
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "vdi",
        vdi.to_str().expect("utf8"),
        "8M",
    ]);
    patch(&vdi, 0x1b8, &[1; 16]);
    let vhd = d.path().join("child.vhd");
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "vpc",
        vhd.to_str().expect("utf8"),
        "8M",
    ]);
    make_vhd_differencing(&vhd);
    let vhdx = d.path().join("child.vhdx");
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "vhdx",
        vhdx.to_str().expect("utf8"),
        "8M",
    ]);
    make_vhdx_differencing(&vhdx);
    let server = HttpServer::start(d.path(), &[]);
    for (name, says) in [
        ("child.vhdx", "parent"),
        ("child.vmdk", "parent"),
        ("flat.vmdk", "descriptor"),
        ("child.vdi", "parent"),
        ("child.vhd", "differencing"),
    ] {
        let run = tempfile::tempdir().expect("tmp");
        let o = Importer::new(run.path()).http(&server.url(name)).run();
        assert_eq!(o.code, 1, "{name}: {}", o.stderr);
        assert!(
            o.termination.contains("refers to another file"),
            "{name}: {}",
            o.termination
        );
        assert!(o.termination.contains(says), "{name}: {}", o.termination);
        let disk = run.path().join("data/disk.img");
        let len = std::fs::metadata(&disk).map(|m| m.len()).unwrap_or(0);
        assert_eq!(len, 0, "{name}: nothing written");
    }
}

fn patch(path: &Path, off: u64, bytes: &[u8]) {
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(path)
        .expect("open");
    std::os::unix::fs::FileExt::write_all_at(&f, bytes, off).expect("patch");
}

/// Sets the disk type of both footer copies to 4 (differencing), fixing the checksums.
fn make_vhd_differencing(path: &Path) {
    let len = std::fs::metadata(path).expect("meta").len();
    for off in [0, len - 512] {
        let mut f = std::fs::read(path).expect("read")[off as usize..off as usize + 512].to_vec();
        f[60..64].copy_from_slice(&4u32.to_be_bytes());
        f[64..68].fill(0);
        let sum = f.iter().fold(0u32, |s, &x| s.wrapping_add(u32::from(x)));
        f[64..68].copy_from_slice(&(!sum).to_be_bytes());
        patch(path, off, &f);
    }
}

/// Sets HasParent in the File Parameters metadata item (the metadata region has no
/// checksum). qemu-img puts the region at 3 MiB.
fn make_vhdx_differencing(path: &Path) {
    const FILE_PARAMETERS: [u8; 16] = [
        0x37, 0x67, 0xa1, 0xca, 0x36, 0xfa, 0x43, 0x4d, 0xb3, 0xb6, 0x33, 0xf0, 0xaa, 0x44, 0xe7,
        0x6b,
    ];
    let data = std::fs::read(path).expect("read");
    let region = 3 << 20;
    let table = &data[region..region + 65536];
    assert_eq!(&table[..8], b"metadata");
    let count = u16::from_le_bytes([table[10], table[11]]) as usize;
    let entry = (0..count)
        .map(|i| &table[32 + 32 * i..64 + 32 * i])
        .find(|e| e[..16] == FILE_PARAMETERS)
        .expect("file parameters item");
    let off = u32::from_le_bytes(entry[16..20].try_into().expect("4")) as u64;
    let flags_at = region as u64 + off + 4;
    let flags = data[flags_at as usize] | 2;
    patch(path, flags_at, &[flags]);
}

/// `file://` reads the importer's own filesystem: only with an explicit flag, which a
/// CDI controller never passes (the endpoint comes from the user's DataVolume).
#[test]
fn local_files_need_the_flag() {
    let run = tempfile::tempdir().expect("tmp");
    let o = Importer::new(run.path()).http("file:///etc/passwd").run();
    assert_eq!(o.code, 1, "{}", o.stderr);
    assert!(
        o.termination.contains("--allow-local-files"),
        "{}",
        o.termination
    );
    let len = std::fs::metadata(run.path().join("data/disk.img"))
        .map(|m| m.len())
        .unwrap_or(0);
    assert_eq!(len, 0);
}

/// Formats qemu-img knows but CDI does not accept are refused by name, never imported
/// as if they were raw.
#[test]
fn other_qemu_formats_are_refused_not_taken_as_raw() {
    let d = tempfile::tempdir().expect("tmp");
    let p = |n: &str| d.path().join(n).to_str().expect("utf8").to_string();
    qemu_img(&["create", "-q", "-f", "qed", &p("disk.qed"), "8M"]);
    qemu_img(&["create", "-q", "-f", "parallels", &p("disk.hdd"), "8M"]);
    qemu_img(&[
        "create",
        "-q",
        "--object",
        "secret,id=sec0,data=ferrydisk",
        "-f",
        "luks",
        "-o",
        "key-secret=sec0,iter-time=10",
        &p("disk.luks"),
        "8M",
    ]);
    let server = HttpServer::start(d.path(), &[]);
    for (name, says) in [
        ("disk.qed", "qed"),
        ("disk.hdd", "parallels"),
        ("disk.luks", "luks"),
    ] {
        let run = tempfile::tempdir().expect("tmp");
        let o = Importer::new(run.path()).http(&server.url(name)).run();
        assert_eq!(o.code, 1, "{name}: {}", o.stderr);
        assert!(
            o.termination
                .contains(&format!("{says} data is not supported")),
            "{name}: {}",
            o.termination
        );
    }
}

/// qemu-img 10 ends a streamOptimized vmdk whose data does not compress right after its
/// last grain, with no end-of-stream marker (its grain directory is in the header): the
/// stream is read to its end and checked against those tables; cut before the last
/// grain, it is refused as truncated.
#[test]
fn a_stream_optimized_vmdk_without_an_end_marker() {
    let d = tempfile::tempdir().expect("tmp");
    let raw = d.path().join("disk.raw");
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    let data: Vec<u8> = (0..(4 << 20))
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect();
    let f = std::fs::File::create(&raw).expect("create");
    f.set_len(8 << 20).expect("len");
    std::os::unix::fs::FileExt::write_all_at(&f, &data, 1 << 20).expect("write");
    let vmdk = d.path().join("disk.vmdk");
    qemu_img(&[
        "convert",
        "-f",
        "raw",
        "-O",
        "vmdk",
        "-o",
        "subformat=streamOptimized",
        raw.to_str().expect("utf8"),
        vmdk.to_str().expect("utf8"),
    ]);
    let run = tempfile::tempdir().expect("tmp");
    Importer::new(run.path()).file(&vmdk).run().assert_success();
    assert_same_bytes(&run.path().join("data/disk.img"), &raw);
    // The last grain's marker is where the file's last 64 KiB-ish grain begins: cut
    // there, the stream ends before a grain its tables name.
    let bytes = std::fs::read(&vmdk).expect("read");
    let cut = d.path().join("cut.vmdk");
    std::fs::write(&cut, &bytes[..bytes.len() - 70_000]).expect("write");
    let run = tempfile::tempdir().expect("tmp");
    Importer::new(run.path())
        .file(&cut)
        .run()
        .assert_failure("vmdk image ends at byte");
}
