//! The built binaries and running commands: where they are, spawning a copied
//! binary, waiting for a child, running a command that must succeed.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output};

/// The workspace root.
pub fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace")
        .to_path_buf()
}

/// A built binary: `$FERRYDISK_BIN_DIR/<name>`, else the newest of target/{release,debug}.
pub fn bin(name: &str) -> PathBuf {
    if let Ok(dir) = std::env::var("FERRYDISK_BIN_DIR") {
        return PathBuf::from(dir).join(name);
    }
    let candidates = ["release", "debug"].map(|p| root().join("target").join(p).join(name));
    candidates
        .iter()
        .filter(|p| p.exists())
        .max_by_key(|p| std::fs::metadata(p).and_then(|m| m.modified()).ok())
        .cloned()
        .unwrap_or_else(|| {
            panic!("{name} is not built: run `cargo build --release` (scripts/test does)")
        })
}

/// Runs a command, panicking with its output if it fails.
pub fn sh(cmd: &mut Command) -> Output {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("running {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// `target/static` (or $FERRYDISK_STATIC_DIR). scripts/test builds it and sets
/// FERRYDISK_REQUIRE_STATIC, so CI fails rather than skips when it is missing.
pub fn static_dir() -> Option<PathBuf> {
    let dir = std::env::var("FERRYDISK_STATIC_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|_| root().join("target/static"));
    if dir.join("importer").exists() {
        return Some(dir);
    }
    assert!(
        std::env::var("FERRYDISK_REQUIRE_STATIC").is_err(),
        "static binaries missing: run scripts/build-static"
    );
    eprintln!(
        "SKIP: no static binaries in {} (scripts/build-static)",
        dir.display()
    );
    None
}

/// Spawns a binary the test has just copied. Another test thread forking while the
/// copy's write handle is open makes the child inherit it, and exec then fails with
/// ETXTBSY until that child has exec'd too: retried briefly.
pub fn spawn_copied(c: &mut Command) -> Child {
    for _ in 0..50 {
        match c.spawn() {
            Err(e) if e.kind() == std::io::ErrorKind::ExecutableFileBusy => {
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            r => return r.expect("spawn"),
        }
    }
    c.spawn().expect("spawn (text file still busy)")
}

/// Waits for `child` to exit by itself; its exit code, or `None` if it is still running.
pub fn wait_exit(child: &mut Child, within: std::time::Duration) -> Option<i32> {
    let deadline = std::time::Instant::now() + within;
    while std::time::Instant::now() < deadline {
        if let Ok(Some(s)) = child.try_wait() {
            return s.code();
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    None
}
