//! Certificate and token rotation in the upload proxy, as the kubelet does it: secret
//! volumes change by an atomic `..data` symlink flip, projected service-account tokens
//! are rewritten. Nothing is restarted; connections already open are not cut.

use ferrydisk_tests::token::{mint, Claims};
use ferrydisk_tests::upload::{
    curl, proxy_with, upload_server, upload_server_with, KubeApi, Mode, Pki,
};
use ferrydisk_tests::*;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// A kubelet-style secret volume in `dir`: `name -> ..data/name`, `..data -> ..<gen>`.
struct SecretVolume {
    dir: PathBuf,
    generation: u32,
}

impl SecretVolume {
    fn new(dir: &Path, files: &[(&str, &Path)]) -> Self {
        std::fs::create_dir_all(dir).expect("mkdir");
        let mut v = SecretVolume {
            dir: dir.to_path_buf(),
            generation: 0,
        };
        v.flip(files);
        for (name, _) in files {
            std::os::unix::fs::symlink(format!("..data/{name}"), dir.join(name)).expect("link");
        }
        v
    }

    /// Writes a new generation and flips `..data` to it atomically (rename over).
    fn flip(&mut self, files: &[(&str, &Path)]) {
        self.generation += 1;
        let gen = format!("..gen{}", self.generation);
        std::fs::create_dir_all(self.dir.join(&gen)).expect("gen");
        for (name, src) in files {
            std::fs::copy(src, self.dir.join(&gen).join(name)).expect("copy");
        }
        let tmp = self.dir.join("..data_tmp");
        let _ = std::fs::remove_file(&tmp);
        std::os::unix::fs::symlink(&gen, &tmp).expect("link");
        std::fs::rename(&tmp, self.dir.join("..data")).expect("flip");
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }
}

/// The subject of the certificate a fresh TLS connection to `port` is served.
fn served_subject(port: u16) -> String {
    let s = Command::new("openssl")
        .args(["s_client", "-connect", &format!("127.0.0.1:{port}")])
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .output()
        .expect("s_client");
    let mut x = Command::new("openssl")
        .args(["x509", "-noout", "-subject"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("x509");
    std::io::Write::write_all(x.stdin.as_mut().expect("stdin"), &s.stdout).expect("pipe");
    String::from_utf8_lossy(&x.wait_with_output().expect("x509").stdout).into_owned()
}

/// A second server certificate for 127.0.0.1 from the same CA, with another CN.
fn second_server_cert(pki: &Pki, dir: &Path) -> (PathBuf, PathBuf) {
    let p = |n: &str| dir.join(n).to_str().expect("utf8").to_string();
    std::fs::write(dir.join("srv2.cnf"), "subjectAltName=IP:127.0.0.1\n").expect("cnf");
    sh(Command::new("openssl")
        .args([
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-subj",
            "/CN=rotated",
        ])
        .args(["-keyout", &p("srv2.key"), "-out", &p("srv2.csr")])
        .stderr(Stdio::null()));
    sh(Command::new("openssl")
        .args(["x509", "-req", "-days", "2", "-in", &p("srv2.csr")])
        .arg("-CA")
        .arg(pki.path("ca.crt"))
        .arg("-CAkey")
        .arg(pki.path("ca.key"))
        .args([
            "-CAcreateserial",
            "-extfile",
            &p("srv2.cnf"),
            "-out",
            &p("srv2.crt"),
        ])
        .stderr(Stdio::null()));
    (dir.join("srv2.crt"), dir.join("srv2.key"))
}

fn bearer(pki: &Pki) -> String {
    format!(
        "Authorization: Bearer {}",
        mint(&pki.key("api.key"), &Claims::upload("default", "disk"))
    )
}

#[test]
fn proxy_server_certificate_follows_the_secret_while_an_upload_runs() {
    let d = tmp();
    let pki = Pki::default();
    let mut secret = SecretVolume::new(
        &d.path().join("server-cert"),
        &[
            ("tls.crt", &pki.path("srv.crt")),
            ("tls.key", &pki.path("srv.key")),
        ],
    );
    let run = tmp();
    let mut server = upload_server(&pki, run.path());
    let crt = secret.path("tls.crt");
    let key = secret.path("tls.key");
    let p = proxy_with(
        &pki,
        run.path(),
        server.port,
        Mode::Standalone,
        "client",
        &[
            ("SERVER_CERT_FILE", crt.to_str().expect("utf8")),
            ("SERVER_KEY_FILE", key.to_str().expect("utf8")),
        ],
        &[],
    );
    assert!(served_subject(p.port).contains("CN = 127.0.0.1"));
    // A slow upload is running when the certificate changes.
    let raw = default_fixture(d.path());
    let url = format!("https://127.0.0.1:{}/v1beta1/upload", p.port);
    let upload = Command::new("curl")
        .args([
            "-sS",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            "--limit-rate",
            "16M",
            "--cacert",
        ])
        .arg(pki.path("ca.crt"))
        .args(["-H", &bearer(&pki), "-T"])
        .arg(&raw)
        .arg(&url)
        .stdout(Stdio::piped())
        .spawn()
        .expect("curl");
    std::thread::sleep(Duration::from_millis(800));
    let (c2, k2) = second_server_cert(&pki, d.path());
    secret.flip(&[("tls.crt", &c2), ("tls.key", &k2)]);
    let deadline = Instant::now() + Duration::from_secs(60);
    while !served_subject(p.port).contains("CN = rotated") {
        assert!(
            Instant::now() < deadline,
            "the new certificate is not served"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let out = upload.wait_with_output().expect("curl");
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "200",
        "{}",
        server.log()
    );
    assert_eq!(server.wait(Duration::from_secs(10)), Some(0));
    assert_same_bytes(
        &run.path().join("data/disk.img"),
        &qemu_reference(&raw, d.path()),
    );
}

#[test]
fn proxy_client_certificate_and_ca_bundle_follow_their_files() {
    let d = tmp();
    let pki = Pki::default();
    // The proxy starts with the wrong client certificate (the upload server refuses it)
    // and a CA bundle that does not sign the upload server.
    let other = Pki::default();
    let mut client = SecretVolume::new(
        &d.path().join("client-cert"),
        &[
            ("tls.crt", &pki.path("intruder.crt")),
            ("tls.key", &pki.path("intruder.key")),
        ],
    );
    let mut ca = SecretVolume::new(&d.path().join("ca"), &[("ca.crt", &other.path("ca.crt"))]);
    let run = tmp();
    let mut server = upload_server(&pki, run.path());
    let (crt, key) = (client.path("tls.crt"), client.path("tls.key"));
    let p = proxy_with(
        &pki,
        run.path(),
        server.port,
        Mode::Standalone,
        "client",
        &[
            ("UPLOAD_CLIENT_CERT_FILE", crt.to_str().expect("utf8")),
            ("UPLOAD_CLIENT_KEY_FILE", key.to_str().expect("utf8")),
            ("FERRYDISK_CA_REFRESH", "1"),
        ],
        &[],
    );
    let raw = default_fixture(d.path());
    let url = format!("https://127.0.0.1:{}/v1beta1/upload", p.port);
    let up = || {
        curl(
            &pki,
            &["-H", &bearer(&pki), "-T", raw.to_str().expect("utf8"), &url],
        )
        .0
    };
    // --upload-server-ca is the Pki's own CA (right), the client certificate is wrong.
    assert_eq!(up(), 401, "{}", server.log());
    client.flip(&[
        ("tls.crt", &pki.path("client.crt")),
        ("tls.key", &pki.path("client.key")),
    ]);
    assert_eq!(up(), 200, "{}", server.log());
    assert_eq!(server.wait(Duration::from_secs(10)), Some(0));
    drop(p);
    // The CA bundle: a proxy trusting the wrong CA cannot reach the upload server (it
    // never looks ready: 503) until the file flips.
    let run = tmp();
    let server = upload_server(&pki, run.path());
    let p = ferrydisk_tests::upload::proxy_with_ca(
        &pki,
        run.path(),
        server.port,
        &ca.path("ca.crt"),
        &[("FERRYDISK_CA_REFRESH", "1")],
    );
    let url = format!("https://127.0.0.1:{}/v1beta1/upload", p.port);
    let up = || {
        curl(
            &pki,
            &["-H", &bearer(&pki), "-T", raw.to_str().expect("utf8"), &url],
        )
        .0
    };
    assert_eq!(up(), 503);
    ca.flip(&[("ca.crt", &pki.path("ca.crt"))]);
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(up(), 200);
}

#[test]
fn proxy_uses_the_rotated_service_account_token() {
    let d = tmp();
    let pki = Pki::default();
    let api = KubeApi::start_rotating(d.path());
    api.put_pvc(
        "default",
        "disk",
        &[
            ("cdi.kubevirt.io/storage.upload.target", ""),
            ("cdi.kubevirt.io/storage.pod.ready", "true"),
        ],
    );
    let run = tmp();
    let mut server = upload_server_with(&pki, run.path(), &[]);
    let p = ferrydisk_tests::upload::proxy(
        &pki,
        run.path(),
        server.port,
        Mode::Kube {
            api_port: api.port,
            token_file: &api.token_file,
        },
        "client",
    );
    // The kubelet rotates the token: the API takes only the new one from now on.
    std::fs::write(d.path().join("api-token"), "rotated-token\n").expect("api token");
    std::fs::write(&api.token_file, "rotated-token\n").expect("pod token");
    let raw = default_fixture(d.path());
    let url = format!("https://127.0.0.1:{}/v1beta1/upload", p.port);
    let (code, body) = curl(
        &pki,
        &["-H", &bearer(&pki), "-T", raw.to_str().expect("utf8"), &url],
    );
    assert_eq!(code, 200, "{body}");
    assert_eq!(server.wait(Duration::from_secs(10)), Some(0));
}

#[test]
fn proxy_ca_bundle_follows_cdis_configmap() {
    let d = tmp();
    let pki = Pki::default();
    let other = Pki::default();
    let api = KubeApi::start(d.path());
    api.put_pvc(
        "default",
        "disk",
        &[
            ("cdi.kubevirt.io/storage.upload.target", ""),
            ("cdi.kubevirt.io/storage.pod.ready", "true"),
        ],
    );
    let put_bundle = |ca: &Path| {
        let cm = serde_json::json!({
            "apiVersion": "v1", "kind": "ConfigMap",
            "metadata": {"name": "cdi-uploadserver-signer-bundle", "namespace": "cdi"},
            "data": {"ca-bundle.crt": std::fs::read_to_string(ca).expect("ca")}
        });
        let dir = api.dir.join("cdi/configmaps");
        std::fs::create_dir_all(&dir).expect("mkdir");
        std::fs::write(
            dir.join("cdi-uploadserver-signer-bundle.json"),
            cm.to_string(),
        )
        .expect("configmap");
    };
    // The bundle names another CA first: the upload server cannot be trusted.
    put_bundle(&other.path("ca.crt"));
    let run = tmp();
    let mut server = upload_server(&pki, run.path());
    let p = ferrydisk_tests::upload::proxy_with_ca_configmap(
        &pki,
        run.path(),
        server.port,
        &api,
        "cdi",
        &[("FERRYDISK_CA_REFRESH", "1")],
    );
    let raw = default_fixture(d.path());
    let url = format!("https://127.0.0.1:{}/v1beta1/upload", p.port);
    let up = || {
        curl(
            &pki,
            &["-H", &bearer(&pki), "-T", raw.to_str().expect("utf8"), &url],
        )
        .0
    };
    assert_ne!(up(), 200);
    // CDI republishes the bundle: the next refresh picks it up, no restart.
    put_bundle(&pki.path("ca.crt"));
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(up(), 200, "{}", server.log());
    assert_eq!(server.wait(Duration::from_secs(10)), Some(0));
}
