//! The upload path under test: a throwaway PKI (CA, upload server cert, the proxy's
//! client certs, the cdi-apiserver key pair), the built `importer upload-server` and
//! `uploadproxy` on 127.0.0.1, real `curl` as the client.

use super::{bin, free_port, sh, spawn_support};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub const CLIENT_NAME: &str = "client.upload-server.cdi.kubevirt.io";

pub struct Pki {
    dir: tempfile::TempDir,
}

impl Default for Pki {
    fn default() -> Self {
        let dir = tempfile::tempdir().expect("tmp");
        let d = dir.path();
        let p = |n: &str| d.join(n).to_str().expect("utf8").to_string();
        let ossl = |args: &[&str]| sh(Command::new("openssl").args(args).stderr(Stdio::null()));
        std::fs::write(d.join("srv.cnf"), "subjectAltName=IP:127.0.0.1,DNS:localhost\nbasicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n").expect("cnf");
        std::fs::write(
            d.join("cl.cnf"),
            "basicConstraints=CA:FALSE\nextendedKeyUsage=clientAuth\n",
        )
        .expect("cnf");
        ossl(&[
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "2",
            "-subj",
            "/CN=upload test CA",
            "-keyout",
            &p("ca.key"),
            "-out",
            &p("ca.crt"),
        ]);
        for (name, cn, ext) in [
            ("srv", "127.0.0.1", "srv.cnf"),
            ("client", CLIENT_NAME, "cl.cnf"),
            ("intruder", "someone-else", "cl.cnf"),
        ] {
            ossl(&[
                "req",
                "-newkey",
                "rsa:2048",
                "-nodes",
                "-subj",
                &format!("/CN={cn}"),
                "-keyout",
                &p(&format!("{name}.key")),
                "-out",
                &p(&format!("{name}.csr")),
            ]);
            ossl(&[
                "x509",
                "-req",
                "-days",
                "2",
                "-in",
                &p(&format!("{name}.csr")),
                "-CA",
                &p("ca.crt"),
                "-CAkey",
                &p("ca.key"),
                "-CAcreateserial",
                "-extfile",
                &p(ext),
                "-out",
                &p(&format!("{name}.crt")),
            ]);
        }
        for k in ["api", "other"] {
            ossl(&["genrsa", "-out", &p(&format!("{k}.key")), "2048"]);
            ossl(&[
                "rsa",
                "-in",
                &p(&format!("{k}.key")),
                "-pubout",
                "-out",
                &p(&format!("{k}.pub")),
            ]);
        }
        Pki { dir }
    }
}

impl Pki {
    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    pub fn key(&self, name: &str) -> Vec<u8> {
        std::fs::read(self.path(name)).expect("key")
    }
}

/// A child process killed on drop.
pub struct Proc {
    pub child: Child,
    pub port: u16,
    pub log: PathBuf,
}

impl Proc {
    fn start(mut cmd: Command, port: u16, log: PathBuf) -> Self {
        let f = std::fs::File::create(&log).expect("log");
        let child = cmd.stdout(Stdio::null()).stderr(f).spawn().expect("spawn");
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                Instant::now() < deadline,
                "{cmd:?} did not start listening: {}",
                std::fs::read_to_string(&log).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(30));
        }
        Proc { child, port, log }
    }

    /// Waits for the process to exit by itself.
    pub fn wait(&mut self, within: Duration) -> Option<i32> {
        super::wait_exit(&mut self.child, within)
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `importer upload-server` writing into `dir/data`.
pub fn upload_server(pki: &Pki, dir: &Path) -> Proc {
    upload_server_with(pki, dir, &[])
}

/// [`upload_server`] with more environment (`UPLOAD_IMAGE_SIZE`, timeouts).
pub fn upload_server_with(pki: &Pki, dir: &Path, env: &[(&str, &str)]) -> Proc {
    upload_server_on(pki, dir, &dir.join("no-block-device"), env)
}

/// [`upload_server_with`] writing to `block` when it is a block device.
pub fn upload_server_on(pki: &Pki, dir: &Path, block: &Path, env: &[(&str, &str)]) -> Proc {
    std::fs::create_dir_all(dir.join("data")).expect("data");
    let port = free_port();
    let mut c = Command::new(bin("importer"));
    c.env_clear()
        .env("TLS_KEY_FILE", pki.path("srv.key"))
        .env("TLS_CERT_FILE", pki.path("srv.crt"))
        .env("CLIENT_CERT_FILE", pki.path("ca.crt"))
        .env("CLIENT_NAME", CLIENT_NAME)
        .env("LISTEN_ADDRESS", "127.0.0.1")
        .env("LISTEN_PORT", port.to_string())
        .env("PREALLOCATION", "false")
        .arg("upload-server")
        .arg("--data-dir")
        .arg(dir.join("data"))
        .arg("--block-device")
        .arg(block)
        .arg("--termination-log")
        .arg(dir.join("termination-log"));
    c.envs(env.iter().copied());
    Proc::start(c, port, dir.join("upload-server.log"))
}

pub enum Mode<'a> {
    /// `--no-kubernetes`: readiness from the upload server's /healthz.
    Standalone,
    /// Kubernetes mode against the API stand-in at this port with this token file.
    Kube { api_port: u16, token_file: &'a Path },
}

/// `uploadproxy` in front of the upload server on `upstream_port`, presenting the client
/// certificate `client` ("client" or "intruder").
pub fn proxy(pki: &Pki, dir: &Path, upstream_port: u16, mode: Mode<'_>, client: &str) -> Proc {
    proxy_with(pki, dir, upstream_port, mode, client, &[], &[])
}

/// [`proxy`] with more environment, run under `wrapper` (e.g. `prlimit --nofile=..`).
pub fn proxy_with(
    pki: &Pki,
    dir: &Path,
    upstream_port: u16,
    mode: Mode<'_>,
    client: &str,
    env: &[(&str, &str)],
    wrapper: &[&str],
) -> Proc {
    let port = free_port();
    let mut c = proxy_command(
        pki,
        port,
        upstream_port,
        client,
        Some(&pki.path("ca.crt")),
        Some(wrapper),
    );
    match mode {
        Mode::Standalone => {
            c.arg("--no-kubernetes");
        }
        Mode::Kube {
            api_port,
            token_file,
        } => {
            c.arg("--kube-api")
                .arg(format!("http://127.0.0.1:{api_port}"))
                .arg("--kube-token-file")
                .arg(token_file);
        }
    }
    c.envs(env.iter().copied());
    Proc::start(c, port, dir.join(format!("proxy-{port}.log")))
}

/// A standalone `uploadproxy` trusting the upload-server CA bundle in `ca` (a file the
/// test may change) instead of the Pki's.
pub fn proxy_with_ca(
    pki: &Pki,
    dir: &Path,
    upstream_port: u16,
    ca: &Path,
    env: &[(&str, &str)],
) -> Proc {
    let port = free_port();
    let mut c = proxy_command(pki, port, upstream_port, "client", Some(ca), None);
    c.arg("--no-kubernetes").envs(env.iter().copied());
    Proc::start(c, port, dir.join(format!("proxy-{port}.log")))
}

/// The proxy's command line as the tests run it, listening on `port`; `ca: None` leaves
/// the upload-server CA to the ConfigMap (Kubernetes mode).
fn proxy_command(
    pki: &Pki,
    port: u16,
    upstream_port: u16,
    client: &str,
    ca: Option<&Path>,
    wrapper: Option<&[&str]>,
) -> Command {
    let mut c = match wrapper.and_then(|w| w.split_first()) {
        Some((w, rest)) => {
            let mut c = Command::new(w);
            c.args(rest).arg(bin("uploadproxy"));
            c
        }
        None => Command::new(bin("uploadproxy")),
    };
    c.env_clear()
        .env("SERVER_CERT_FILE", pki.path("srv.crt"))
        .env("SERVER_KEY_FILE", pki.path("srv.key"))
        .env(
            "UPLOAD_CLIENT_CERT_FILE",
            pki.path(&format!("{client}.crt")),
        )
        .env("UPLOAD_CLIENT_KEY_FILE", pki.path(&format!("{client}.key")))
        .env(
            "APISERVER_PUBLIC_KEY",
            std::fs::read_to_string(pki.path("api.pub")).expect("pub"),
        )
        .arg("--listen")
        .arg(format!("127.0.0.1:{port}"))
        .arg("--upstream-template")
        .arg(format!("https://127.0.0.1:{upstream_port}"))
        .arg("--ready-timeout")
        .arg("3");
    if let Some(ca) = ca {
        c.arg("--upload-server-ca").arg(ca);
    }
    c
}

/// A Kubernetes-mode `uploadproxy` that takes the upload-server CA bundle from CDI's
/// ConfigMap (`cdi-uploadserver-signer-bundle` in `namespace`) through the API stand-in.
pub fn proxy_with_ca_configmap(
    pki: &Pki,
    dir: &Path,
    upstream_port: u16,
    api: &KubeApi,
    namespace: &str,
    env: &[(&str, &str)],
) -> Proc {
    let port = free_port();
    let mut c = proxy_command(pki, port, upstream_port, "client", None, None);
    c.arg("--kube-api")
        .arg(format!("http://127.0.0.1:{}", api.port))
        .arg("--kube-token-file")
        .arg(&api.token_file)
        .env("POD_NAMESPACE", namespace)
        .envs(env.iter().copied());
    Proc::start(c, port, dir.join(format!("proxy-{port}.log")))
}

/// The Kubernetes API stand-in (tests/support/kubeapi.py) serving PVCs from `dir`.
pub struct KubeApi {
    child: Child,
    pub port: u16,
    pub dir: PathBuf,
    pub token_file: PathBuf,
}

impl KubeApi {
    pub fn start(dir: &Path) -> Self {
        Self::start_with_token(dir, "sa-token-value")
    }

    /// [`KubeApi::start`] accepting the token in `dir/api-token` (re-read per request,
    /// so a test can rotate it) instead of a fixed one.
    pub fn start_rotating(dir: &Path) -> Self {
        std::fs::write(dir.join("api-token"), "sa-token-value\n").expect("token");
        let spec = format!("@{}", dir.join("api-token").display());
        Self::start_with_token(dir, &spec)
    }

    fn start_with_token(dir: &Path, token: &str) -> Self {
        let token_file = dir.join("sa-token");
        std::fs::write(&token_file, "sa-token-value\n").expect("token");
        let pvcs = dir.join("api");
        std::fs::create_dir_all(&pvcs).expect("api dir");
        let (child, port) = spawn_support(
            "kubeapi.py",
            &[
                "--dir".as_ref(),
                pvcs.as_os_str(),
                "--token".as_ref(),
                token.as_ref(),
            ],
        );
        KubeApi {
            child,
            port,
            dir: pvcs,
            token_file,
        }
    }

    /// Writes a real PersistentVolumeClaim object with these annotations.
    pub fn put_pvc(&self, ns: &str, name: &str, annotations: &[(&str, &str)]) {
        let ann: serde_json::Map<String, serde_json::Value> = annotations
            .iter()
            .map(|(k, v)| (k.to_string(), serde_json::Value::from(*v)))
            .collect();
        let pvc = serde_json::json!({
            "apiVersion": "v1", "kind": "PersistentVolumeClaim",
            "metadata": {"name": name, "namespace": ns, "annotations": ann},
            "spec": {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "1Gi"}}}
        });
        let d = self.dir.join(ns).join("persistentvolumeclaims");
        std::fs::create_dir_all(&d).expect("mkdir");
        std::fs::write(d.join(format!("{name}.json")), pvc.to_string()).expect("pvc");
    }
}

impl Drop for KubeApi {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs curl against 127.0.0.1 trusting the test CA; returns (status, body).
pub fn curl(pki: &Pki, args: &[&str]) -> (u16, String) {
    let out = Command::new("curl")
        .args(["-sS", "-o", "-", "-w", "\n%{http_code}", "--cacert"])
        .arg(pki.path("ca.crt"))
        .args(args)
        .output()
        .expect("curl");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", "0"));
    (code.trim().parse().unwrap_or(0), body.to_string())
}
