//! Object stores for the S3 and GCS source tests: moto's S3 server (a real S3-protocol
//! implementation from PyPI, every request after its bootstrap SigV4-checked), and a GCS
//! stand-in (tests/support/gcs.py: no real GCS can run here) with a service account.

use crate::bins::{root, sh};
use crate::httpserver::spawn_support;
use crate::upload::Pki;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// moto's server on 127.0.0.1, plain or TLS with the test CA's server certificate.
pub struct Moto {
    child: Child,
    pub port: u16,
    pub access_key: String,
    pub secret_key: String,
    ca: Option<PathBuf>,
}

impl Moto {
    pub fn start(dir: &Path, tls: Option<&Pki>) -> Self {
        let port = crate::free_port();
        let mut c = Command::new("python3");
        c.args([
            "-m",
            "moto.server",
            "-H",
            "127.0.0.1",
            "-p",
            &port.to_string(),
        ])
        // The bootstrap's three IAM requests pass unauthenticated; then SigV4 rules.
        .env("INITIAL_NO_AUTH_ACTION_COUNT", "3")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.join("moto.log")).expect("log"));
        if let Some(pki) = tls {
            c.arg("-c")
                .arg(pki.path("srv.crt"))
                .arg("-k")
                .arg(pki.path("srv.key"));
        }
        let child = c.spawn().expect("python3 -m moto.server");
        let deadline = Instant::now() + Duration::from_secs(30);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "moto did not start");
            std::thread::sleep(Duration::from_millis(100));
        }
        let mut m = Moto {
            child,
            port,
            access_key: String::new(),
            secret_key: String::new(),
            ca: tls.map(|p| p.path("ca.crt")),
        };
        let out = m.tool(&["bootstrap", &m.endpoint()]);
        let mut keys = out.split_whitespace();
        m.access_key = keys.next().expect("access key").to_string();
        m.secret_key = keys.next().expect("secret key").to_string();
        m
    }

    pub fn endpoint(&self) -> String {
        let scheme = if self.ca.is_some() { "https" } else { "http" };
        format!("{scheme}://127.0.0.1:{}", self.port)
    }

    fn tool(&self, args: &[&str]) -> String {
        let mut c = Command::new("python3");
        c.arg(root().join("tests/support/s3tool.py")).args(args);
        if let Some(ca) = &self.ca {
            c.env("S3TOOL_CA", ca);
        }
        String::from_utf8_lossy(&sh(&mut c).stdout)
            .trim()
            .to_string()
    }

    /// Uploads `file` as `bucket/key` (creating the bucket), replacing what was there.
    pub fn put(&self, bucket: &str, key: &str, file: &Path) {
        let f = file.display().to_string();
        let ep = self.endpoint();
        self.tool(&[
            "put",
            &ep,
            &self.access_key,
            &self.secret_key,
            bucket,
            key,
            &f,
        ]);
    }

    pub fn presign(&self, bucket: &str, key: &str) -> String {
        let ep = self.endpoint();
        self.tool(&[
            "presign",
            &ep,
            &self.access_key,
            &self.secret_key,
            bucket,
            key,
        ])
    }
}

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The GCS stand-in serving `dir/objects/BUCKET/OBJECT`, and a service-account key file
/// (a fresh RSA key, `token_uri` pointing at the stand-in).
pub struct Gcs {
    child: Child,
    pub port: u16,
    pub objects: PathBuf,
    pub key_file: PathBuf,
}

/// A fresh 2048-bit RSA key, PEM PKCS#8 (what a service-account key file holds).
pub fn rsa_key(path: &Path) {
    sh(Command::new("openssl")
        .args([
            "genpkey",
            "-algorithm",
            "RSA",
            "-pkeyopt",
            "rsa_keygen_bits:2048",
            "-out",
        ])
        .arg(path));
}

pub const SA_EMAIL: &str = "importer@ferrydisk-test.iam.gserviceaccount.com";

impl Gcs {
    pub fn start(dir: &Path) -> Self {
        let objects = dir.join("objects");
        std::fs::create_dir_all(&objects).expect("objects");
        let key = dir.join("sa.key");
        let public = dir.join("sa.pub");
        rsa_key(&key);
        sh(Command::new("openssl")
            .args(["pkey", "-pubout", "-in"])
            .arg(&key)
            .arg("-out")
            .arg(&public));
        let (child, port) = spawn_support(
            "gcs.py",
            &[
                "--dir".as_ref(),
                objects.as_os_str(),
                "--public-key".as_ref(),
                public.as_os_str(),
                "--email".as_ref(),
                SA_EMAIL.as_ref(),
            ],
        );
        let key_file = dir.join("credentials.json");
        let sa = serde_json::json!({
            "type": "service_account",
            "project_id": "ferrydisk-test",
            "private_key_id": "0123456789abcdef",
            "private_key": std::fs::read_to_string(&key).expect("key"),
            "client_email": SA_EMAIL,
            "token_uri": format!("http://127.0.0.1:{port}/token"),
        });
        std::fs::write(&key_file, sa.to_string()).expect("credentials.json");
        Gcs {
            child,
            port,
            objects,
            key_file,
        }
    }

    /// Places `file` as `bucket/object`.
    pub fn put(&self, bucket: &str, object: &str, file: &Path) {
        let dest = self.objects.join(bucket).join(object);
        std::fs::create_dir_all(dest.parent().expect("parent")).expect("mkdir");
        std::fs::copy(file, &dest).expect("copy");
    }

    pub fn requests(&self) -> String {
        std::fs::read_to_string(self.objects.join("requests.log")).unwrap_or_default()
    }
}

impl Drop for Gcs {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// tests/support/dropproxy.py in front of `port`: the first `drops` connections are cut
/// after `after` bytes; with `hold`, connections after a cut wait for `dir/release`
/// (the proxy writes `dir/cut` at the first cut).
pub struct DropProxy {
    child: Child,
    pub port: u16,
    cut: PathBuf,
    release: PathBuf,
    stats: PathBuf,
}

impl DropProxy {
    pub fn start(dir: &Path, port: u16, after: u64, drops: u32, hold: bool) -> Self {
        Self::spawn(dir, port, after, drops, hold, false, &[])
    }

    /// Cuts the client's bytes towards `port` instead: an upload broken mid-body.
    pub fn start_upward(dir: &Path, port: u16, after: u64, drops: u32) -> Self {
        Self::spawn(dir, port, after, drops, false, true, &[])
    }

    /// Bytes carried in the counted direction so far over all connections, and the
    /// cuts made.
    pub fn carried(&self) -> (u64, u32) {
        let s = std::fs::read_to_string(&self.stats).unwrap_or_default();
        let mut it = s.split_whitespace().map(|v| v.parse::<u64>().unwrap_or(0));
        let bytes = it.next().unwrap_or(0);
        (bytes, it.next().unwrap_or(0) as u32)
    }

    /// The client's bytes towards `port` stall for `secs` after `after` bytes, on the
    /// first `stalls` connections (open and silent, then they carry on).
    pub fn stall_upward(dir: &Path, port: u16, after: u64, stalls: u32, secs: f64) -> Self {
        let secs = secs.to_string();
        Self::spawn(dir, port, after, stalls, false, true, &["--stall", &secs])
    }

    /// The client's bytes towards `port` are paced to `bytes_per_s`: a slow link.
    pub fn slow_upward(dir: &Path, port: u16, bytes_per_s: u64) -> Self {
        let rate = bytes_per_s.to_string();
        Self::spawn(dir, port, u64::MAX >> 1, 0, false, true, &["--rate", &rate])
    }

    fn spawn(
        dir: &Path,
        port: u16,
        after: u64,
        drops: u32,
        hold: bool,
        up: bool,
        extra: &[&str],
    ) -> Self {
        let cut = dir.join("cut");
        let release = dir.join("release");
        let stats = dir.join(format!("drop-stats-{port}"));
        let to = port.to_string();
        let after = after.to_string();
        let drops = drops.to_string();
        let mut args: Vec<&std::ffi::OsStr> = vec![
            "--to".as_ref(),
            to.as_ref(),
            "--after".as_ref(),
            after.as_ref(),
            "--drops".as_ref(),
            drops.as_ref(),
        ];
        args.extend(["--cut-file".as_ref(), cut.as_os_str()]);
        args.extend(["--stats".as_ref(), stats.as_os_str()]);
        if hold {
            args.extend(["--hold-file".as_ref(), release.as_os_str()]);
        }
        if up {
            args.push("--up".as_ref());
        }
        args.extend(extra.iter().map(std::ffi::OsStr::new));
        let (child, port) = spawn_support("dropproxy.py", &args);
        DropProxy {
            child,
            port,
            cut,
            release,
            stats,
        }
    }

    /// Waits for the first cut (the importer is now retrying, held by the proxy).
    pub fn wait_cut(&self, within: Duration) {
        let deadline = Instant::now() + within;
        while !self.cut.exists() {
            assert!(Instant::now() < deadline, "no connection was cut");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn release(&self) {
        std::fs::write(&self.release, b"").expect("release");
    }
}

impl Drop for DropProxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
