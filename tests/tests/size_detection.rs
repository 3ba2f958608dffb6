//! CDI's size-detection pod (`cdi-image-size-detection -image-path P`, run by the clone
//! controller from the importer image): the image's virtual size, as `qemu-img info`
//! reports it, in the termination message; CDI's exit codes for what went wrong.

use ferrydisk_tests::*;
use std::path::{Path, PathBuf};
use std::process::Command;

/// The importer binary under CDI's name (it dispatches on argv[0]).
fn detector(dir: &Path) -> PathBuf {
    let p = dir.join("cdi-image-size-detection");
    std::os::unix::fs::symlink(bin("importer"), &p).expect("symlink");
    p
}

fn qemu_virtual_size(p: &Path) -> u64 {
    let out = sh(Command::new("qemu-img")
        .args(["info", "--output=json"])
        .arg(p));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    v["virtual-size"].as_u64().expect("virtual-size")
}

/// Runs the detector with CDI's argument spelling; (exit code, termination message).
fn detect(det: &Path, image: &str, term: &Path) -> (i32, String) {
    let _ = std::fs::remove_file(term);
    let out = Command::new(det)
        .args(["-image-path", image])
        .arg("--termination-log")
        .arg(term)
        .output()
        .expect("run");
    (
        out.status.code().unwrap_or(-1),
        std::fs::read_to_string(term).unwrap_or_default(),
    )
}

#[test]
fn sizes_agree_with_qemu_img_info() {
    let d = tmp();
    let det = detector(d.path());
    let term = d.path().join("termination-log");
    let base = patterned_disk(d.path());
    let b = base.to_str().expect("utf8");
    let mut images = vec![base.clone()];
    for (name, args) in [
        ("v3.qcow2", vec!["-c", "-O", "qcow2"]),
        ("v2.qcow2", vec!["-O", "qcow2", "-o", "compat=0.10"]),
        ("sparse.vmdk", vec!["-O", "vmdk"]),
        (
            "stream.vmdk",
            vec!["-O", "vmdk", "-o", "subformat=streamOptimized"],
        ),
        ("dynamic.vhd", vec!["-O", "vpc"]),
        // qemu probes a fixed VHD as raw: its size includes the footer.
        ("fixed.vhd", vec!["-O", "vpc", "-o", "subformat=fixed"]),
        ("disk.vhdx", vec!["-O", "vhdx"]),
        ("disk.vdi", vec!["-O", "vdi"]),
    ] {
        let out = d.path().join(name);
        let mut a = vec!["convert", "-f", "raw"];
        a.extend(args);
        a.extend([b, out.to_str().expect("utf8")]);
        qemu_img(&a);
        images.push(out);
    }
    // A size that is not a whole number of clusters or sectors.
    let odd = d.path().join("odd.qcow2");
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        odd.to_str().expect("utf8"),
        "1000001",
    ]);
    images.push(odd);
    for img in &images {
        let want = qemu_virtual_size(img);
        let (code, msg) = detect(&det, img.to_str().expect("utf8"), &term);
        assert_eq!(code, 0, "{}: {msg}", img.display());
        assert_eq!(msg, want.to_string(), "{}", img.display());
    }
}

/// Issue 27 (7): a raw file that is not a whole number of sectors. qemu-img (and so
/// CDI) counts whole 512-byte sectors: 10 MiB + 1000 bytes is 10,486,784 to it, and the
/// clone controller sizes the target volume from this number.
#[test]
fn a_raw_file_of_partial_sectors_is_sized_as_qemu_img() {
    let d = tmp();
    let det = detector(d.path());
    let term = d.path().join("termination-log");
    let raw = d.path().join("odd.raw");
    std::fs::write(&raw, vec![7u8; (10 << 20) + 1000]).expect("write");
    let want = qemu_virtual_size(&raw);
    assert_eq!(want, 10_486_784, "qemu-img's own figure");
    let (code, msg) = detect(&det, raw.to_str().expect("utf8"), &term);
    assert_eq!(code, 0, "{msg}");
    assert_eq!(msg, want.to_string());
}

#[test]
fn cdi_exit_codes() {
    let d = tmp();
    let det = detector(d.path());
    let term = d.path().join("termination-log");
    // No -image-path: ErrBadArguments.
    let o = Command::new(&det).output().expect("run");
    assert_eq!(o.status.code(), Some(1), "{o:?}");
    // A path that is not there: ErrInvalidFile (qemu-img info fails there too).
    let (code, _) = detect(&det, "/nonexistent/disk.img", &term);
    assert_eq!(code, 2);
    // A header that lies: ErrInvalidFile, nothing written.
    let bad = d.path().join("bad.qcow2");
    let mut h = b"QFI\xfb\0\0\0\x03".to_vec();
    h.resize(512, 0xff);
    std::fs::write(&bad, h).expect("write");
    let (code, msg) = detect(&det, bad.to_str().expect("utf8"), &term);
    assert_eq!((code, msg.as_str()), (2, ""));
    // The termination message cannot be written: ErrBadTermFile.
    let raw = d.path().join("x.raw");
    std::fs::write(&raw, vec![0u8; 4096]).expect("write");
    let (code, _) = detect(
        &det,
        raw.to_str().expect("utf8"),
        &d.path().join("no/such/dir/termination-log"),
    );
    assert_eq!(code, 4);
}
