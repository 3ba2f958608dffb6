//! pullMethod node end to end: a buildah-built containerDisk unpacked with umoci, the disk
//! server started from it as CDI starts it (a copy named `server`, Go-style flags, the
//! image's ENV as its environment), the importer reading through it over loopback.

use ferrydisk_tests::registry::Buildah;
use ferrydisk_tests::*;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

/// Builds a containerDisk and unpacks it: (rootfs, image env, raw reference).
fn unpacked_containerdisk(dir: &Path) -> (PathBuf, Vec<String>, PathBuf) {
    let raw = dir.join("disk.raw");
    raw_fixture(
        &raw,
        "16M",
        &[(1 << 20, 1 << 20, 0x6b), ((9 << 20) + 9, 999, 0x13)],
    );
    let ctx = qcow2_context(dir, &raw);
    let b = Buildah::default();
    b.build(&ctx, "FROM scratch\nADD disk.qcow2 /disk/\nENV INSTANCETYPE_KUBEVIRT_IO_DEFAULT_INSTANCETYPE=u1.small\n", "cd");
    let layout = dir.join("layout");
    b.push_to("cd", &format!("oci:{}:v1", layout.display()));
    let bundle = dir.join("bundle");
    sh(Command::new("umoci")
        .args(["unpack", "--image"])
        .arg(format!("{}:v1", layout.display()))
        .arg(&bundle));
    let config: serde_json::Value =
        serde_json::from_slice(&std::fs::read(bundle.join("config.json")).expect("config"))
            .expect("json");
    let env: Vec<String> = serde_json::from_value(config["process"]["env"].clone()).expect("env");
    (bundle.join("rootfs"), env, raw)
}

/// CDI's init container: `cp /usr/bin/cdi-containerimage-server /shared/server` (the
/// small serve-disk binary in our image).
fn install_server(shared: &Path) -> PathBuf {
    install(shared, "serve-disk")
}

fn install(shared: &Path, binary: &str) -> PathBuf {
    let server = shared.join("server");
    std::fs::copy(bin(binary), &server).expect("cp server");
    server
}

fn start_server(
    server: &Path,
    rootfs: &Path,
    env: &[String],
    shared: &Path,
    port: u16,
) -> std::process::Child {
    let mut c = Command::new(server);
    c.env_clear();
    for kv in env {
        if let Some((k, v)) = kv.split_once('=') {
            c.env(k, v);
        }
    }
    c.args(["-p", &port.to_string(), "-image-dir"])
        .arg(rootfs.join("disk"))
        .arg("-ready-file")
        .arg(shared.join("ready"))
        .arg("-done-file")
        .arg(shared.join("done"))
        .arg("--root")
        .arg(rootfs)
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    spawn_copied(&mut c)
}

fn importer(run: &Path, shared: &Path, port: u16) -> Importer {
    Importer::new(run)
        .env("IMPORTER_SOURCE", "http")
        .env(
            "IMPORTER_ENDPOINT",
            &format!("http://localhost:{port}/disk.img"),
        )
        .env("IMPORTER_PULL_METHOD", "node")
        .env(
            "IMPORTER_READY_FILE",
            shared.join("ready").to_str().expect("utf8"),
        )
        .env(
            "IMPORTER_DONE_FILE",
            shared.join("done").to_str().expect("utf8"),
        )
        .arg("--metrics-addr")
        .arg("none")
}

/// An unpacked containerDisk, the /shared dir with the server copied in, a port.
struct Pull {
    _d: tempfile::TempDir,
    rootfs: PathBuf,
    env: Vec<String>,
    raw: PathBuf,
    shared: PathBuf,
    server: PathBuf,
    port: u16,
}

impl Pull {
    fn new() -> Self {
        Pull::with("serve-disk")
    }

    /// With `binary` copied in as the server.
    fn with(binary: &str) -> Self {
        let d = tmp();
        let (rootfs, env, raw) = unpacked_containerdisk(d.path());
        let shared = d.path().join("shared");
        std::fs::create_dir(&shared).expect("shared");
        let server = install(&shared, binary);
        Pull {
            _d: d,
            rootfs,
            env,
            raw,
            shared,
            server,
            port: free_port(),
        }
    }
}

#[test]
fn node_pull_through_the_disk_server() {
    node_pull_through(Pull::new());
}

/// An image whose controller copies the importer itself as the server still works: the
/// importer answers to `server` as the disk server.
#[test]
fn the_importer_still_serves_the_disk_under_that_name() {
    node_pull_through(Pull::with("importer"));
}

fn node_pull_through(pull: Pull) {
    let Pull {
        _d,
        rootfs,
        env,
        raw,
        shared,
        server,
        port,
    } = pull;
    let mut srv = start_server(&server, &rootfs, &env, &shared, port);
    let run = tmp();
    let o = importer(run.path(), &shared, port).run();
    assert_eq!(o.code, 0, "{}\n{}", o.termination, o.stderr);
    assert_eq!(
        cdi_part(&o.termination),
        r#"{"scratchSpaceRequired":false,"preallocationApplied":false,"labels":{"instancetype.kubevirt.io/default-instancetype":"u1.small"},"message":"Import Complete"}"#
    );
    assert_same_bytes(&run.path().join("data/disk.img"), &raw);
    // The done file ends the server, which removes both handshake files.
    assert_eq!(wait_exit(&mut srv, Duration::from_secs(10)), Some(0));
    assert!(!shared.join("ready").exists() && !shared.join("done").exists());
}

#[test]
fn a_ready_file_after_90_seconds_still_works() {
    let Pull {
        _d,
        rootfs,
        env,
        raw,
        shared,
        server,
        port,
    } = Pull::new();
    let run = tmp();
    // The importer starts first (kubelet is still pulling a big containerDisk)...
    let mut imp = importer(run.path(), &shared, port).spawn();
    std::thread::sleep(Duration::from_secs(90));
    assert!(
        imp.try_wait().expect("wait").is_none(),
        "CDI would have given up after 60 s"
    );
    // ...and the server only now.
    let mut srv = start_server(&server, &rootfs, &env, &shared, port);
    assert_eq!(wait_exit(&mut imp, Duration::from_secs(30)), Some(0));
    assert_same_bytes(&run.path().join("data/disk.img"), &raw);
    assert_eq!(wait_exit(&mut srv, Duration::from_secs(10)), Some(0));
}

#[test]
fn missing_disk_dir_is_a_clear_error() {
    let d = tmp();
    let shared = d.path().join("shared");
    std::fs::create_dir(&shared).expect("shared");
    let server = install_server(&shared);
    let mut srv = start_server(
        &server,
        &d.path().join("empty-root"),
        &[],
        &shared,
        free_port(),
    );
    let code = wait_exit(&mut srv, Duration::from_secs(10));
    let mut err = String::new();
    std::io::Read::read_to_string(srv.stderr.as_mut().expect("stderr"), &mut err).expect("stderr");
    assert_eq!(code, Some(1));
    assert!(
        err.contains("Invalid container image") && err.contains("empty-root/disk"),
        "{err}"
    );
    assert!(!shared.join("ready").exists());
}
