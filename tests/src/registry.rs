//! A real CNCF distribution registry (Debian's `docker-registry`) on 127.0.0.1, images
//! built with buildah (private storage per test) or written by tests/support/mkimage.py
//! and pushed with skopeo.

use super::tokenserver::{Grant, TokenServer};
use super::upload::Pki;
use super::{free_port, root, sh};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub struct Registry {
    child: Child,
    pub port: u16,
    /// The registry's filesystem storage (tests tamper with blobs here).
    pub storage: PathBuf,
    /// A directory holding the CA certificate, for IMPORTER_CERT_DIR (TLS only).
    pub ca_dir: Option<PathBuf>,
    pub creds: Option<(String, String)>,
    /// The registry's output: its access log, one line per request.
    pub log: PathBuf,
    /// With token authentication: the token server.
    pub token: Option<TokenServer>,
    _dir: tempfile::TempDir,
    _pki: Option<Pki>,
}

/// How a test registry serves.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Tls {
    Off,
    /// A certificate from the test PKI, whose CA is in `ca_dir`.
    PrivateCa,
    /// A self-signed certificate with an RSA key of this many bits; no CA dir.
    SelfSigned(u32),
}

impl Registry {
    pub fn start(tls: bool, creds: Option<(&str, &str)>) -> Self {
        let tls = if tls { Tls::PrivateCa } else { Tls::Off };
        Self::start_with(tls, creds, None)
    }

    /// A TLS registry whose certificate is self-signed with an RSA key of `bits` (what
    /// an insecure registry may serve; ring verifies no RSA key under 2048 bits): no CA
    /// dir, so imports from it run with `INSECURE_TLS=true`.
    pub fn start_self_signed(bits: u32) -> Self {
        Self::start_with(Tls::SelfSigned(bits), None, None)
    }

    /// A registry with Docker's token authentication: `grants` say who may do what;
    /// `creds` (one of them) is what the helpers (skopeo, the importer) log in with.
    pub fn start_token(tls: bool, grants: &'static [Grant], creds: (&str, &str)) -> Self {
        let tls = if tls { Tls::PrivateCa } else { Tls::Off };
        Self::start_with(tls, Some(creds), Some(grants))
    }

    fn start_with(tls: Tls, creds: Option<(&str, &str)>, grants: Option<&'static [Grant]>) -> Self {
        let dir = tempfile::tempdir().expect("tmp");
        let d = dir.path();
        let storage = d.join("storage");
        let port = free_port();
        let mut cfg = format!(
            "version: 0.1\nlog:\n  level: error\nstorage:\n  filesystem:\n    rootdirectory: {}\nhttp:\n  addr: 127.0.0.1:{port}\n",
            storage.display()
        );
        let mut ca_dir = None;
        let pki = (tls == Tls::PrivateCa).then(Pki::default);
        if let Tls::SelfSigned(bits) = tls {
            sh(Command::new("openssl")
                .args([
                    "req",
                    "-x509",
                    "-nodes",
                    "-days",
                    "1",
                    "-subj",
                    "/CN=insecure",
                ])
                .args(["-newkey", &format!("rsa:{bits}")])
                .arg("-keyout")
                .arg(d.join("self.key"))
                .arg("-out")
                .arg(d.join("self.crt")));
            cfg.push_str(&format!(
                "  tls:\n    certificate: {}\n    key: {}\n",
                d.join("self.crt").display(),
                d.join("self.key").display()
            ));
        }
        if let Some(pki) = &pki {
            let ca = d.join("ca");
            std::fs::create_dir(&ca).expect("ca dir");
            std::fs::copy(pki.path("ca.crt"), ca.join("ca.crt")).expect("ca copy");
            cfg.push_str(&format!(
                "  tls:
    certificate: {}
    key: {}
",
                pki.path("srv.crt").display(),
                pki.path("srv.key").display()
            ));
            ca_dir = Some(ca);
        }
        let token = grants.map(|g| TokenServer::start(d, g));
        if let Some(t) = &token {
            cfg.push_str(&t.registry_config());
        } else if let Some((u, p)) = creds {
            let out = sh(Command::new("htpasswd").args(["-Bbn", u, p]));
            std::fs::write(d.join("htpasswd"), out.stdout).expect("htpasswd");
            cfg.push_str(&format!(
                "auth:\n  htpasswd:\n    realm: ferrydisk-test\n    path: {}\n",
                d.join("htpasswd").display()
            ));
        }
        std::fs::write(d.join("config.yml"), cfg).expect("config");
        let log = d.join("registry.log");
        let out = std::fs::File::create(&log).expect("log");
        let child = Command::new("docker-registry")
            .arg("serve")
            .arg(d.join("config.yml"))
            .stdout(Stdio::from(out.try_clone().expect("log")))
            .stderr(Stdio::from(out))
            .spawn()
            .expect("docker-registry (apt-get install docker-registry)");
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "registry did not start");
            std::thread::sleep(Duration::from_millis(50));
        }
        Registry {
            child,
            port,
            storage,
            ca_dir,
            creds: creds.map(|(u, p)| (u.into(), p.into())),
            log,
            token,
            _dir: dir,
            _pki: pki,
        }
    }

    pub fn host(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// `docker://127.0.0.1:<port>/<repo_tag>`
    pub fn image(&self, repo_tag: &str) -> String {
        format!("docker://{}/{repo_tag}", self.host())
    }

    fn creds_args(&self, flag: &str) -> Vec<String> {
        self.creds
            .as_ref()
            .map(|(u, p)| vec![flag.to_string(), format!("{u}:{p}")])
            .unwrap_or_default()
    }

    /// Pushes an OCI layout (all platforms) with skopeo.
    pub fn push_layout(&self, layout: &Path, tag: &str, repo_tag: &str) {
        let mut c = Command::new("skopeo");
        c.args(["copy", "-q", "--all", "--dest-tls-verify=false"])
            .args(self.creds_args("--dest-creds"));
        c.arg(format!("oci:{}:{tag}", layout.display()))
            .arg(self.image(repo_tag));
        sh(&mut c);
    }

    /// Our importer reading `repo_tag` from this registry, with its credentials and CA.
    pub fn importer(&self, run: &Path, repo_tag: &str) -> crate::runner::Importer {
        let mut i = crate::runner::Importer::new(run)
            .env("IMPORTER_SOURCE", "registry")
            .env("IMPORTER_ENDPOINT", &self.image(repo_tag))
            .arg("--metrics-addr")
            .arg("none");
        if let Some((u, p)) = &self.creds {
            i = i
                .env("IMPORTER_ACCESS_KEY_ID", u)
                .env("IMPORTER_SECRET_KEY", p);
        }
        if let Some(ca) = &self.ca_dir {
            i = i.env("IMPORTER_CERT_DIR", ca.to_str().expect("utf8"));
        }
        i
    }

    /// The filesystem path of a blob in the registry's storage.
    pub fn blob_path(&self, digest: &str) -> PathBuf {
        let hex = digest.trim_start_matches("sha256:");
        self.storage.join(format!(
            "docker/registry/v2/blobs/sha256/{}/{hex}/data",
            &hex[..2]
        ))
    }

    /// `skopeo inspect --raw` of an image.
    pub fn raw_manifest(&self, repo_tag: &str) -> serde_json::Value {
        let mut c = Command::new("skopeo");
        c.args(["inspect", "--raw", "--tls-verify=false"])
            .args(self.creds_args("--creds"))
            .arg(self.image(repo_tag));
        serde_json::from_slice(&sh(&mut c).stdout).expect("manifest json")
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// buildah with private storage, chroot isolation, vfs: works without a container engine.
pub struct Buildah {
    dir: tempfile::TempDir,
}

impl Default for Buildah {
    fn default() -> Self {
        Buildah {
            dir: tempfile::tempdir().expect("tmp"),
        }
    }
}

impl Buildah {
    fn cmd(&self) -> Command {
        let mut c = Command::new("buildah");
        c.arg("--root")
            .arg(self.dir.path().join("root"))
            .arg("--runroot")
            .arg(self.dir.path().join("runroot"))
            .args(["--storage-driver", "vfs"]);
        c
    }

    /// Builds `containerfile` (text) in context `ctx` as `name`, one layer per instruction.
    pub fn build(&self, ctx: &Path, containerfile: &str, name: &str) {
        std::fs::write(ctx.join("Containerfile"), containerfile).expect("containerfile");
        sh(self
            .cmd()
            .args(["bud", "-q", "--layers", "--isolation", "chroot", "-t", name])
            .arg(ctx));
    }

    /// Builds `target` of the Containerfile at `file` in context `ctx` as `name`.
    pub fn build_target(&self, ctx: &Path, file: &Path, target: &str, args: &[&str], name: &str) {
        let mut c = self.cmd();
        c.args([
            "bud",
            "-q",
            "--isolation",
            "chroot",
            "--target",
            target,
            "-t",
            name,
        ])
        .arg("-f")
        .arg(file);
        for a in args {
            c.args(["--build-arg", a]);
        }
        sh(c.arg(ctx));
    }

    /// The image's OCI config (`config` of `buildah inspect`).
    pub fn config(&self, name: &str) -> serde_json::Value {
        let out = sh(self.cmd().args(["inspect", "--type", "image"]).arg(name)).stdout;
        let v: serde_json::Value = serde_json::from_slice(&out).expect("inspect json");
        v["OCIv1"]["config"].clone()
    }

    /// A working container of `name`, mounted: its root filesystem.
    pub fn mount(&self, name: &str) -> PathBuf {
        let c =
            String::from_utf8(sh(self.cmd().args(["from", "-q"]).arg(name)).stdout).expect("utf8");
        let m = String::from_utf8(sh(self.cmd().arg("mount").arg(c.trim())).stdout).expect("utf8");
        PathBuf::from(m.trim())
    }

    /// Pushes `name` to any transport buildah knows (`oci:DIR:tag`, ...).
    pub fn push_to(&self, name: &str, dest: &str) {
        sh(self.cmd().args(["push", "-q"]).arg(name).arg(dest));
    }

    /// Pushes `name` to `dest` (`docker://...`), e.g. with `--format docker` or
    /// `--compression-format zstd`.
    pub fn push(&self, name: &str, reg: &Registry, repo_tag: &str, extra: &[&str]) {
        let mut c = self.cmd();
        c.args(["push", "-q", "--tls-verify=false"])
            .args(reg.creds_args("--creds"))
            .args(extra)
            .arg(name)
            .arg(reg.image(repo_tag));
        sh(&mut c);
    }
}

/// Writes an OCI layout from a JSON spec (see tests/support/mkimage.py).
pub fn mkimage(out: &Path, tag: &str, spec: &serde_json::Value) {
    let spec_file = out.with_extension("json");
    std::fs::write(&spec_file, spec.to_string()).expect("spec");
    sh(Command::new("python3")
        .arg(root().join("tests/support/mkimage.py"))
        .arg(out)
        .arg(tag)
        .arg(&spec_file));
}
