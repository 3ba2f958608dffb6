//! Host-assisted clone fixtures: the real CDI binaries (`../shared/cdi-peer`), unpacked
//! once, and a source volume.

use crate::bins::{root, sh};
use crate::fixtures::default_fixture;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

/// The real CDI binaries, unpacked (idempotently, sha256-checked) into target/cdi-peer.
///
/// `unpack` writes `NAME.tmp` then renames it, so two runs at once race on the same
/// temporary file (seen in CI: two clone tests starting together). It runs once per test
/// process, under `flock` so test binaries run side by side cannot race either.
pub fn cdi_peer() -> PathBuf {
    static UNPACKED: OnceLock<PathBuf> = OnceLock::new();
    UNPACKED
        .get_or_init(|| {
            let dest = root().join("target/cdi-peer");
            std::fs::create_dir_all(root().join("target")).expect("mkdir target");
            sh(Command::new("flock")
                .arg(root().join("target/cdi-peer.lock"))
                .arg(root().join("../shared/cdi-peer/unpack"))
                .arg(&dest));
            dest
        })
        .clone()
}

/// `../shared/cdi-peer/pod-run`: runs a CDI binary as its pod would see the world.
pub fn pod_run() -> PathBuf {
    root().join("../shared/cdi-peer/pod-run")
}

/// A source volume in `dir/source`: a sparse 64 MiB disk image (`disk.img`), a second
/// file at the top and one in a subdirectory, and `lost+found` (never cloned).
pub fn source_volume(dir: &Path) -> PathBuf {
    let vol = dir.join("source");
    std::fs::create_dir_all(vol.join("lost+found")).expect("mkdir");
    std::fs::create_dir_all(vol.join("sub")).expect("mkdir");
    std::fs::write(vol.join("lost+found/junk"), b"not cloned").expect("junk");
    let disk = default_fixture(dir);
    std::fs::rename(&disk, vol.join("disk.img")).expect("rename");
    std::fs::write(vol.join("notes.txt"), b"a second file\n").expect("notes");
    std::fs::write(vol.join("sub/notes.txt"), b"a second file\n").expect("notes");
    vol
}
