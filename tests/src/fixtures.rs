//! Test disks and their oracle: fixtures made with qemu-img and qemu-io, and
//! `qemu-img convert` output to compare against.

use crate::bins::sh;
use std::path::{Path, PathBuf};
use std::process::Command;

/// A temporary directory, removed on drop.
pub fn tmp() -> tempfile::TempDir {
    tempfile::tempdir().expect("tempdir")
}

/// Runs `qemu-img` with `args`, panicking with its output if it fails.
pub fn qemu_img(args: &[&str]) {
    sh(Command::new("qemu-img").args(args));
}

/// Where [`crate::Importer::new`] writes the disk.
pub fn out_disk(dir: &Path) -> PathBuf {
    dir.join("data/disk.img")
}

/// A raw disk of `size` bytes, mostly holes, with recognisable data written by qemu-io
/// at odd offsets (`(offset, len, pattern)`).
pub fn raw_fixture(path: &Path, size: &str, writes: &[(u64, u64, u8)]) {
    sh(Command::new("qemu-img")
        .args(["create", "-q", "-f", "raw"])
        .arg(path)
        .arg(size));
    for (off, len, pat) in writes {
        sh(Command::new("qemu-io")
            .args([
                "-f",
                "raw",
                "-c",
                &format!("write -q -P {pat:#x} {off} {len}"),
            ])
            .arg(path));
    }
}

/// 25 MiB whose every MiB matters (so a resume at the wrong offset, or a splice of two
/// files, is visible), patterned by `seed`: two seeds give two files of the same length.
pub fn dense_fixture_named(dir: &Path, name: &str, seed: u64) -> PathBuf {
    let p = dir.join(name);
    let writes: Vec<(u64, u64, u8)> = (0..24)
        .map(|i| (i * (1 << 20) + 4096, 1 << 20, (i * 7 + seed) as u8))
        .collect();
    raw_fixture(&p, "25M", &writes);
    p
}

/// The default fixture: 64 MiB with three data regions, one not sector-aligned at its end.
pub fn default_fixture(dir: &Path) -> PathBuf {
    let p = dir.join("disk.raw");
    raw_fixture(
        &p,
        "64M",
        &[
            (1 << 20, 3 << 20, 0xab),
            (40 << 20, 512 << 10, 0x11),
            ((64 << 20) - 1536, 1024, 0x5a),
        ],
    );
    p
}

/// `qemu-img convert -O qcow2` of `raw` into `out`.
pub fn qcow2_of(raw: &Path, out: &Path) -> PathBuf {
    qemu_img(&[
        "convert",
        "-O",
        "qcow2",
        raw.to_str().expect("utf8"),
        out.to_str().expect("utf8"),
    ]);
    out.to_path_buf()
}

/// `qemu-img convert -O raw` of `src`: the oracle output disks are compared with.
pub fn qemu_reference(src: &Path, dir: &Path) -> PathBuf {
    qemu_reference_as(src, None, dir)
}

/// [`qemu_reference`] with the source format named (qemu probes a fixed VHD as raw).
pub fn qemu_reference_as(src: &Path, format: Option<&str>, dir: &Path) -> PathBuf {
    let out = dir.join(format!(
        "{}.reference.raw",
        src.file_name().and_then(|n| n.to_str()).unwrap_or("x")
    ));
    let mut c = Command::new("qemu-img");
    c.args(["convert", "-O", "raw"]);
    if let Some(f) = format {
        c.args(["-f", f]);
    }
    sh(c.arg(src).arg(&out));
    out
}

/// A 40 MiB raw disk (`base.raw` in `dir`) with data at odd, unaligned offsets and sizes.
pub fn patterned_disk(dir: &Path) -> PathBuf {
    let p = dir.join("base.raw");
    raw_fixture(
        &p,
        "40M",
        &[
            (12345, 100_000, 0xab),
            (3 << 20, 1 << 20, 0x11),
            ((17 << 20) + 511, 777, 0x5a),
            ((40 << 20) - 4096, 4096, 0xee),
        ],
    );
    // Incompressible data too, so compressed clusters of every size appear.
    let noise: Vec<u8> = (0u32..3_000_000)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(&p)
        .expect("open");
    std::os::unix::fs::FileExt::write_all_at(&f, &noise, 20 << 20).expect("noise");
    p
}

/// A buildah context `<dir>/ctx` holding `raw` as a compressed `disk.qcow2`.
pub fn qcow2_context(dir: &Path, raw: &Path) -> PathBuf {
    let ctx = dir.join("ctx");
    std::fs::create_dir_all(&ctx).expect("ctx");
    sh(Command::new("qemu-img")
        .args(["convert", "-c", "-f", "raw", "-O", "qcow2"])
        .arg(raw)
        .arg(ctx.join("disk.qcow2")));
    ctx
}

/// A loop device over a file pre-filled with 0xff, detached on drop.
pub struct Loop {
    pub dev: String,
}

impl Loop {
    pub fn new(backing: &Path, size: usize) -> Option<Self> {
        Self::with_sector(backing, size, 512)
    }

    /// A loop device with `sector`-byte logical blocks (4096: a 4Kn device), doing direct
    /// I/O to its backing file as a real device would not cache.
    pub fn with_sector(backing: &Path, size: usize, sector: u32) -> Option<Self> {
        std::fs::write(backing, vec![0xffu8; size]).expect("backing");
        Self::attach(backing, sector)
    }

    /// A loop device over an existing file.
    pub fn attach(backing: &Path, sector: u32) -> Option<Self> {
        let out = Command::new("losetup")
            .args(["-f", "--show", "--sector-size", &sector.to_string()])
            .args(if sector == 512 {
                &[][..]
            } else {
                &["--direct-io=on"][..]
            })
            .arg(backing)
            .output()
            .ok()?;
        if !out.status.success() {
            eprintln!(
                "SKIP: losetup unavailable: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            return None;
        }
        Some(Loop {
            dev: String::from_utf8_lossy(&out.stdout).trim().to_string(),
        })
    }
}

impl Drop for Loop {
    fn drop(&mut self) {
        let _ = Command::new("losetup").arg("-d").arg(&self.dev).status();
    }
}
