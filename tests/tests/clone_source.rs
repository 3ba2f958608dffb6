//! Host-assisted clone from our cloner (`importer clone-source`, CDI's `cdi-cloner`
//! role) into the real CDI upload server (`../shared/cdi-peer/cdi-uploadserver`, run by
//! `pod-run`) and into ours: byte-equal volumes, holes sent as holes.

use ferrydisk_tests::clone::{cdi_peer, pod_run, source_volume};
use ferrydisk_tests::upload::{upload_server, Pki, CLIENT_NAME};
use ferrydisk_tests::*;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// CDI's upload server under `pod-run` in `work`, listening on 127.0.0.1:`port`.
struct CdiUploadServer {
    child: Child,
    work: PathBuf,
}

impl CdiUploadServer {
    fn start(pki: &Pki, work: &Path) -> (Self, u16) {
        std::fs::create_dir_all(work).expect("work");
        let port = free_port();
        let pki_dir = pki.path("ca.crt").parent().expect("dir").to_path_buf();
        let child = Command::new(pod_run())
            .arg(work)
            .arg(cdi_peer().join("cdi-uploadserver"))
            .arg("-v=3")
            .env("POD_BINDS", &pki_dir)
            .env("TLS_KEY_FILE", pki.path("srv.key"))
            .env("TLS_CERT_FILE", pki.path("srv.crt"))
            .env("CLIENT_CERT_FILE", pki.path("ca.crt"))
            .env("CLIENT_NAME", CLIENT_NAME)
            .env("LISTEN_ADDRESS", "127.0.0.1")
            .env("LISTEN_PORT", port.to_string())
            .env("PREALLOCATION", "false")
            // What CDI's controller sets (an empty cipher list fails HTTP/2 setup).
            .env(
                "TLS_CIPHERS",
                "TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256,TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384,TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256,TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384",
            )
            .env("TLS_MIN_VERSION", "VersionTLS12")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(work.join("server.log")).expect("log"))
            .spawn()
            .expect("pod-run");
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                Instant::now() < deadline,
                "CDI's upload server did not listen"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        (
            CdiUploadServer {
                child,
                work: work.to_path_buf(),
            },
            port,
        )
    }

    fn wait(&mut self) -> (Option<i32>, String) {
        let code = wait_exit(&mut self.child, Duration::from_secs(30));
        let term = std::fs::read_to_string(self.work.join("termination-log")).unwrap_or_default();
        (code, term)
    }
}

impl Drop for CdiUploadServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Our cloner; (exit code, termination message, stderr).
fn our_cloner(
    pki: &Pki,
    url: &str,
    content_type: &str,
    mount: &Path,
    dir: &Path,
) -> (i32, String, String) {
    let term = dir.join("cloner-termination-log");
    let pem = |n: &str| String::from_utf8(pki.key(n)).expect("pem");
    let out = Command::new(bin("importer"))
        .env_clear()
        .args([
            "clone-source",
            "-v=1",
            "-content-type",
            content_type,
            "-mount",
        ])
        .arg(mount)
        .args([
            "-upload-bytes",
            "67108864",
            "--metrics-addr",
            "none",
            "--termination-log",
        ])
        .arg(&term)
        .env("OWNER_UID", "clone-test")
        .env("CLIENT_KEY", pem("client.key"))
        .env("CLIENT_CERT", pem("client.crt"))
        .env("SERVER_CA_CERT", pem("ca.crt"))
        .env("UPLOAD_URL", url)
        .env("PREALLOCATION", "false")
        .output()
        .expect("cloner");
    (
        out.status.code().unwrap_or(-1),
        std::fs::read_to_string(&term).unwrap_or_default(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn bytes_read(stderr: &str) -> u64 {
    stderr
        .lines()
        .find(|l| l.contains("read the source volume"))
        .and_then(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .and_then(|v| v["bytes"].as_u64())
        .unwrap_or(u64::MAX)
}

#[test]
fn our_cloner_into_cdis_upload_server_filesystem_and_block() {
    let pki = Pki::default();
    let d = tmp();
    let vol = source_volume(d.path());
    // Filesystem volume.
    let (mut server, port) = CdiUploadServer::start(&pki, &d.path().join("cdi-fs"));
    let url = format!("https://127.0.0.1:{port}/v1beta1/upload");
    let (rc, term, log) = our_cloner(&pki, &url, "filesystem-clone", &vol, d.path());
    assert_eq!(rc, 0, "cloner: {log}");
    assert_eq!(term, "Clone Complete");
    // Holes are not sent: about 3.5 MiB of the 64 MiB disk is data.
    assert!(bytes_read(&log) < 8 << 20, "{log}");
    let (code, cdi_term) = server.wait();
    assert_eq!(
        code,
        Some(0),
        "{}",
        std::fs::read_to_string(d.path().join("cdi-fs/server.log")).unwrap_or_default()
    );
    assert_eq!(
        cdi_term,
        r#"{"preallocationApplied":true,"message":"Clone Complete"}"#
    );
    let data = d.path().join("cdi-fs/data");
    assert_same_bytes(&data.join("disk.img"), &vol.join("disk.img"));
    assert_eq!(
        std::fs::read(data.join("sub/notes.txt")).expect("notes"),
        b"a second file\n"
    );
    assert!(
        !data.join("lost+found").exists()
            || std::fs::read_dir(data.join("lost+found"))
                .expect("dir")
                .count()
                == 0
    );
    // Block volume (a file standing for the device).
    let (mut server, port) = CdiUploadServer::start(&pki, &d.path().join("cdi-block"));
    let url = format!("https://127.0.0.1:{port}/v1beta1/upload");
    let (rc, term, log) = our_cloner(
        &pki,
        &url,
        "blockdevice-clone",
        &vol.join("disk.img"),
        d.path(),
    );
    assert_eq!(rc, 0, "cloner: {log}");
    assert_eq!(term, "Clone Complete");
    let (code, _) = server.wait();
    assert_eq!(code, Some(0));
    assert_same_bytes(
        &d.path().join("cdi-block/data/disk.img"),
        &vol.join("disk.img"),
    );
}

#[test]
fn our_cloner_into_our_upload_server_keeps_holes() {
    let pki = Pki::default();
    let d = tmp();
    let vol = source_volume(d.path());
    let target = d.path().join("target");
    let mut server = upload_server(&pki, &target);
    let url = format!("https://127.0.0.1:{}/v1beta1/upload", server.port);
    let (rc, term, log) = our_cloner(&pki, &url, "filesystem-clone", &vol, d.path());
    assert_eq!(rc, 0, "cloner: {log}\nserver: {}", server.log());
    assert_eq!(term, "Clone Complete");
    assert_eq!(
        server.wait(Duration::from_secs(20)),
        Some(0),
        "{}",
        server.log()
    );
    let data = target.join("data");
    assert_same_bytes(&data.join("disk.img"), &vol.join("disk.img"));
    assert!(allocated(&data.join("disk.img")) <= allocated(&vol.join("disk.img")) + (1 << 20));
    assert_eq!(
        std::fs::read(data.join("sub/notes.txt")).expect("notes"),
        b"a second file\n"
    );
}

#[test]
fn our_cloner_fails_as_cdis_does() {
    let pki = Pki::default();
    let d = tmp();
    let vol = source_volume(d.path());
    // Nothing listens: CDI's cloner exits 255 (klog.Fatalf), no termination message.
    let url = format!("https://127.0.0.1:{}/v1beta1/upload", free_port());
    let (rc, term, _) = our_cloner(&pki, &url, "filesystem-clone", &vol, d.path());
    assert_eq!((rc, term.as_str()), (255, ""));
    let (rc, _, log) = our_cloner(&pki, &url, "something-else", &vol, d.path());
    assert_eq!(rc, 255);
    assert!(log.contains("Invalid content-type"), "{log}");
}

#[test]
fn our_cloner_serves_cdis_clone_progress_metric() {
    let pki = Pki::default();
    let d = tmp();
    let vol = source_volume(d.path());
    // A target that accepts the connection and never answers: the clone stays running.
    let stuck = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let url = format!(
        "https://127.0.0.1:{}/v1beta1/upload",
        stuck.local_addr().expect("addr").port()
    );
    let metrics = free_port();
    let pem = |n: &str| String::from_utf8(pki.key(n)).expect("pem");
    let mut cloner = Command::new(bin("importer"))
        .env_clear()
        .args([
            "clone-source",
            "-content-type",
            "filesystem-clone",
            "-mount",
        ])
        .arg(&vol)
        .args(["-upload-bytes", "4000000", "--metrics-addr"])
        .arg(format!("127.0.0.1:{metrics}"))
        .arg("--termination-log")
        .arg(d.path().join("t"))
        .env("OWNER_UID", "metric-test")
        .env("CLIENT_KEY", pem("client.key"))
        .env("CLIENT_CERT", pem("client.crt"))
        .env("SERVER_CA_CERT", pem("ca.crt"))
        .env("UPLOAD_URL", url)
        .env("PREALLOCATION", "false")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("cloner");
    let deadline = Instant::now() + Duration::from_secs(20);
    let body = loop {
        let o = Command::new("curl")
            .args(["-sk", &format!("https://127.0.0.1:{metrics}/metrics")])
            .output()
            .expect("curl");
        if o.status.success() && !o.stdout.is_empty() {
            break String::from_utf8_lossy(&o.stdout).into_owned();
        }
        assert!(Instant::now() < deadline, "no metric served");
        std::thread::sleep(Duration::from_millis(100));
    };
    let _ = cloner.kill();
    let _ = cloner.wait();
    assert!(
        body.contains("# TYPE kubevirt_cdi_clone_progress_total counter"),
        "{body}"
    );
    assert!(
        body.contains("kubevirt_cdi_clone_progress_total{ownerUID=\"metric-test\"}"),
        "{body}"
    );
}
