//! Helpers for the end-to-end tests: find the built binaries, start the test HTTP
//! server, make fixtures with qemu-img, run the importer the way a CDI pod does (env
//! vars only), compare disks byte for byte.

pub mod registry;
pub mod token;
pub mod upload;

use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};

/// A port nothing listens on right now, on 127.0.0.1.
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

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port()
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

/// The test HTTP server (tests/support/httpserver.py), killed on drop.
pub struct HttpServer {
    child: Child,
    pub port: u16,
}

/// Starts one of the Python helpers in tests/support (each listens on an ephemeral port
/// of 127.0.0.1 and prints `PORT <n>` first); returns it and that port.
pub fn spawn_support(script: &str, args: &[&std::ffi::OsStr]) -> (Child, u16) {
    let mut child = Command::new("python3")
        .arg(root().join("tests/support").join(script))
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap_or_else(|e| panic!("python3 {script}: {e}"));
    let mut line = String::new();
    BufReader::new(child.stdout.take().expect("stdout"))
        .read_line(&mut line)
        .expect("port line");
    let port = line
        .trim()
        .strip_prefix("PORT ")
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("{script}: bad first line {line:?}"));
    (child, port)
}

impl HttpServer {
    pub fn start(dir: &Path, extra: &[&str]) -> Self {
        let mut args: Vec<&std::ffi::OsStr> = vec!["--dir".as_ref(), dir.as_os_str()];
        args.extend(extra.iter().map(|a| std::ffi::OsStr::new(*a)));
        let (child, port) = spawn_support("httpserver.py", &args);
        HttpServer { child, port }
    }

    pub fn url(&self, file: &str) -> String {
        format!("http://127.0.0.1:{}/{file}", self.port)
    }
}

impl Drop for HttpServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
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

/// Asserts two files hold the same bytes (streamed, so large disks are fine).
pub fn assert_same_bytes(got: &Path, want: &Path) {
    let (mut a, mut b) = (open(got), open(want));
    let (la, lb) = (len(got), len(want));
    assert_eq!(
        la,
        lb,
        "{} is {la} bytes, {} is {lb}",
        got.display(),
        want.display()
    );
    let mut ba = vec![0u8; 1 << 20];
    let mut bb = vec![0u8; 1 << 20];
    let mut off = 0u64;
    loop {
        let n = read_full(&mut a, &mut ba);
        let m = read_full(&mut b, &mut bb);
        assert_eq!(n, m);
        if n == 0 {
            return;
        }
        if ba[..n] != bb[..n] {
            let i = ba[..n]
                .iter()
                .zip(&bb[..n])
                .position(|(x, y)| x != y)
                .unwrap_or(0);
            panic!(
                "{} differs from {} at byte {}",
                got.display(),
                want.display(),
                off + i as u64
            );
        }
        off += n as u64;
    }
}

fn open(p: &Path) -> std::fs::File {
    std::fs::File::open(p).unwrap_or_else(|e| panic!("open {}: {e}", p.display()))
}

fn len(p: &Path) -> u64 {
    std::fs::metadata(p)
        .map(|m| m.len())
        .unwrap_or_else(|e| panic!("stat {}: {e}", p.display()))
}

fn read_full(r: &mut impl Read, buf: &mut [u8]) -> usize {
    let mut n = 0;
    while n < buf.len() {
        match r.read(&mut buf[n..]).expect("read") {
            0 => break,
            k => n += k,
        }
    }
    n
}

/// One importer run configured like a CDI pod: env vars only, plus paths as flags.
pub struct Importer {
    pub cmd: Command,
    pub termination_log: PathBuf,
    block_device: PathBuf,
}

pub struct Outcome {
    pub code: i32,
    pub termination: String,
    pub stderr: String,
}

impl Importer {
    /// An importer writing to `<dir>/data/disk.img` (block device path absent).
    pub fn new(dir: &Path) -> Self {
        let data = dir.join("data");
        std::fs::create_dir_all(&data).expect("data dir");
        let termination_log = dir.join("termination-log");
        let mut cmd = Command::new(bin("importer"));
        cmd.env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("PREALLOCATION", "false")
            .env("IMPORTER_CONTENTTYPE", "kubevirt")
            .env("OWNER_UID", "test-owner")
            .arg("-v=1")
            .arg("--data-dir")
            .arg(&data)
            .arg("--termination-log")
            .arg(&termination_log)
            .arg("--extra-headers-dir")
            .arg(dir.join("no-extra-headers"))
            .arg("--proxy-cert-dir")
            .arg(dir.join("no-proxy-certs"));
        Importer {
            cmd,
            termination_log,
            block_device: dir.join("no-such-block-device"),
        }
    }

    /// The path whose existence selects block mode (CDI's /dev/cdi-block-volume).
    pub fn block_device(mut self, dev: impl Into<PathBuf>) -> Self {
        self.block_device = dev.into();
        self
    }

    /// Starts the importer without waiting for it.
    pub fn spawn(mut self) -> std::process::Child {
        self.cmd.arg("--block-device").arg(&self.block_device);
        self.cmd.spawn().expect("spawn importer")
    }

    pub fn env(mut self, k: &str, v: &str) -> Self {
        self.cmd.env(k, v);
        self
    }

    pub fn arg(mut self, a: impl AsRef<std::ffi::OsStr>) -> Self {
        self.cmd.arg(a);
        self
    }

    /// `http` source from `url`.
    pub fn http(self, url: &str) -> Self {
        self.env("IMPORTER_SOURCE", "http")
            .env("IMPORTER_ENDPOINT", url)
            .arg("--metrics-addr")
            .arg("none")
    }

    /// A local file as the source (`file://`, seekable: formats re-read instead of holding).
    pub fn file(self, path: &Path) -> Self {
        self.http(&format!("file://{}", path.display()))
            .arg("--allow-local-files")
    }

    pub fn run(mut self) -> Outcome {
        let _ = std::fs::remove_file(&self.termination_log);
        self.cmd.arg("--block-device").arg(&self.block_device);
        let out = self.cmd.output().expect("run importer");
        Outcome {
            code: out.status.code().unwrap_or(-1),
            termination: std::fs::read_to_string(&self.termination_log).unwrap_or_default(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    }
}

impl Outcome {
    pub const SUCCESS: &'static str = r#"{"scratchSpaceRequired":false,"preallocationApplied":false,"message":"Import Complete"}"#;

    pub fn assert_success(&self) {
        assert_eq!(
            self.code, 0,
            "importer failed: {}\n{}",
            self.termination, self.stderr
        );
        assert_eq!(self.termination, Self::SUCCESS, "stderr: {}", self.stderr);
    }

    /// Exit 1, one plain-text line containing `needle`, no success JSON.
    pub fn assert_failure(&self, needle: &str) {
        assert_eq!(
            self.code, 1,
            "expected failure, got {}: {}\n{}",
            self.code, self.termination, self.stderr
        );
        assert!(
            !self.termination.contains('\n'),
            "one line: {:?}",
            self.termination
        );
        assert!(
            !self.termination.contains("Import Complete"),
            "{}",
            self.termination
        );
        assert!(
            self.termination.contains(needle),
            "termination {:?} lacks {needle:?}\n{}",
            self.termination,
            self.stderr
        );
    }
}

/// Allocated bytes of a file (st_blocks * 512).
pub fn allocated(p: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(p).map(|m| m.blocks() * 512).unwrap_or(0)
}
