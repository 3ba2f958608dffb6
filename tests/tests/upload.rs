//! End-to-end uploads: real `curl` -> `uploadproxy` -> `importer upload-server` on
//! 127.0.0.1 with mTLS between them, tokens signed PS256 as cdi-apiserver signs them,
//! outputs compared byte for byte with `qemu-img convert -O raw`.

use ferrydisk_tests::token::{mint, Claims};
use ferrydisk_tests::upload::{curl, proxy, upload_server, KubeApi, Mode, Pki};
use ferrydisk_tests::*;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

/// A 24 MiB raw disk with data and its variants.
fn images(dir: &Path) -> (PathBuf, Vec<PathBuf>) {
    let raw = dir.join("disk.raw");
    raw_fixture(
        &raw,
        "24M",
        &[(1 << 20, 2 << 20, 0xab), ((10 << 20) + 3, 70_000, 0x42)],
    );
    let q = dir.join("disk.qcow2");
    sh(Command::new("qemu-img")
        .args(["convert", "-c", "-f", "raw", "-O", "qcow2"])
        .arg(&raw)
        .arg(&q));
    let qxz = dir.join("disk.qcow2.xz");
    std::fs::write(
        &qxz,
        sh(Command::new("xz").args(["-1", "-T1", "-c"]).arg(&q)).stdout,
    )
    .expect("xz");
    let zst = dir.join("disk.raw.zst");
    std::fs::write(
        &zst,
        sh(Command::new("zstd").args(["-q", "-c"]).arg(&raw)).stdout,
    )
    .expect("zst");
    (raw.clone(), vec![raw, q, qxz, zst])
}

fn token(pki: &Pki) -> String {
    mint(&pki.key("api.key"), &Claims::upload("default", "disk"))
}

fn bearer(t: &str) -> String {
    format!("Authorization: Bearer {t}")
}

fn disk_of(dir: &Path) -> PathBuf {
    dir.join("data/disk.img")
}

#[test]
fn curl_t_through_the_proxy_for_each_format() {
    let d = tmp();
    let pki = Pki::default();
    let (raw, files) = images(d.path());
    let reference = qemu_reference(&raw, d.path());
    for f in files {
        let run = tmp();
        let mut server = upload_server(&pki, run.path());
        let p = proxy(&pki, run.path(), server.port, Mode::Standalone, "client");
        let url = format!("https://127.0.0.1:{}/v1beta1/upload", p.port);
        let (code, body) = curl(
            &pki,
            &[
                "-H",
                &bearer(&token(&pki)),
                "-T",
                f.to_str().expect("utf8"),
                &url,
            ],
        );
        assert_eq!(code, 200, "{}: {body}\n{}", f.display(), server.log());
        assert_eq!(
            server.wait(Duration::from_secs(10)),
            Some(0),
            "the server exits after a complete upload"
        );
        assert_eq!(
            cdi_part(&std::fs::read_to_string(run.path().join("termination-log")).expect("term")),
            r#"{"preallocationApplied":false,"message":"Upload Complete"}"#
        );
        // Deckhouse's keys follow CDI's: the format under any compression, a duration.
        let info = deckhouse_part(
            &std::fs::read_to_string(run.path().join("termination-log")).expect("term"),
        );
        assert!(
            ["raw", "qcow2"].contains(&info["source-image-format"].as_str().unwrap_or("")),
            "{info}"
        );
        assert!(info["duration"].as_u64().unwrap_or(0) > 0, "{info}");
        assert_same_bytes(&disk_of(run.path()), &reference);
        assert!(
            !p.log().contains(&token(&pki)[..40]),
            "the access log never holds the token"
        );
    }
}

#[test]
fn multipart_chunked_pipe_async_and_path_token() {
    let d = tmp();
    let pki = Pki::default();
    let (raw, files) = images(d.path());
    let q = files[1].to_str().expect("utf8").to_string();
    // curl -F: the form part named "file" is the image.
    let run = tmp();
    let mut server = upload_server(&pki, run.path());
    let p = proxy(&pki, run.path(), server.port, Mode::Standalone, "client");
    let (code, body) = curl(
        &pki,
        &[
            "-H",
            &bearer(&token(&pki)),
            "-F",
            "other=ignored",
            "-F",
            &format!("file=@{q}"),
            &format!("https://127.0.0.1:{}/v1beta1/upload-form", p.port),
        ],
    );
    assert_eq!(code, 200, "{body}\n{}", server.log());
    assert_eq!(server.wait(Duration::from_secs(10)), Some(0));
    assert_same_bytes(&disk_of(run.path()), &raw);

    // Chunked, from a pipe: no Content-Length.
    let run = tmp();
    let mut server = upload_server(&pki, run.path());
    let p = proxy(&pki, run.path(), server.port, Mode::Standalone, "client");
    let cmd = format!(
        "cat {q} | curl -sS -o /dev/null -w '%{{http_code}}' --cacert {} -H '{}' -T - https://127.0.0.1:{}/v1beta1/upload",
        pki.path("ca.crt").display(),
        bearer(&token(&pki)),
        p.port
    );
    let out = sh(Command::new("bash").arg("-c").arg(&cmd));
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "200",
        "{}",
        server.log()
    );
    assert_eq!(server.wait(Duration::from_secs(10)), Some(0));
    assert_same_bytes(&disk_of(run.path()), &raw);

    // Async: HEAD probes support, the POST answers after the body, the server finishes.
    let run = tmp();
    let mut server = upload_server(&pki, run.path());
    let p = proxy(&pki, run.path(), server.port, Mode::Standalone, "client");
    let url = format!("https://127.0.0.1:{}/v1beta1/upload-async", p.port);
    assert_eq!(
        curl(&pki, &["-I", "-H", &bearer(&token(&pki)), &url]).0,
        200
    );
    let (code, _) = curl(
        &pki,
        &[
            "-H",
            &bearer(&token(&pki)),
            "-X",
            "POST",
            "--data-binary",
            &format!("@{q}"),
            &url,
        ],
    );
    assert_eq!(code, 200);
    assert_eq!(
        server.wait(Duration::from_secs(10)),
        Some(0),
        "{}",
        server.log()
    );
    assert_same_bytes(&disk_of(run.path()), &raw);

    // The token in the URL path: `curl -T disk https://proxy/upload/<token>`.
    let run = tmp();
    let mut server = upload_server(&pki, run.path());
    let p = proxy(&pki, run.path(), server.port, Mode::Standalone, "client");
    let (code, body) = curl(
        &pki,
        &[
            "-T",
            &q,
            &format!("https://127.0.0.1:{}/upload/{}", p.port, token(&pki)),
        ],
    );
    assert_eq!(code, 200, "{body}");
    assert_eq!(server.wait(Duration::from_secs(10)), Some(0));
    assert_same_bytes(&disk_of(run.path()), &raw);
    assert!(p.log().contains("/upload/<token>") && !p.log().contains(&token(&pki)[..40]));
}

#[test]
fn token_rejections_never_reach_the_upload_server() {
    let d = tmp();
    let pki = Pki::default();
    let (_, files) = images(d.path());
    let f = files[0].to_str().expect("utf8").to_string();
    let run = tmp();
    let server = upload_server(&pki, run.path());
    let p = proxy(&pki, run.path(), server.port, Mode::Standalone, "client");
    let url = format!("https://127.0.0.1:{}/v1beta1/upload", p.port);
    let key = pki.key("api.key");
    let c = |f: &dyn Fn(&mut Claims<'_>)| {
        let mut cl = Claims::upload("default", "disk");
        f(&mut cl);
        mint(&key, &cl)
    };
    let cases: Vec<(String, Option<String>, u16)> = vec![
        ("no token".into(), None, 400),
        (
            "malformed header".into(),
            Some("Authorization: Basic abc".into()),
            400,
        ),
        (
            "bad signature".into(),
            Some(bearer(&mint(
                &pki.key("other.key"),
                &Claims::upload("default", "disk"),
            ))),
            401,
        ),
        (
            "wrong issuer".into(),
            Some(bearer(&c(&|cl| cl.issuer = "someone"))),
            401,
        ),
        (
            "expired".into(),
            Some(bearer(&c(&|cl| cl.expires_in = -60))),
            401,
        ),
        (
            "not yet valid".into(),
            Some(bearer(&c(&|cl| cl.not_before_in = 120))),
            401,
        ),
        (
            "wrong operation".into(),
            Some(bearer(&c(&|cl| cl.operation = "Clone"))),
            400,
        ),
        (
            "wrong resource".into(),
            Some(bearer(&c(&|cl| cl.resource = "secrets"))),
            400,
        ),
    ];
    for (what, header, want) in cases {
        let mut args = vec!["-T", f.as_str(), url.as_str()];
        if let Some(h) = &header {
            args.splice(0..0, ["-H", h.as_str()]);
        }
        let (code, body) = curl(&pki, &args);
        assert_eq!(code, want, "{what}: {body}");
    }
    // Within leeway: expired 5 s ago still passes (CDI's 10 s leeway).
    let (code, _) = curl(
        &pki,
        &["-H", &bearer(&c(&|cl| cl.expires_in = -5)), "-T", &f, &url],
    );
    assert_eq!(code, 200);
    assert_eq!(
        server.log().matches("\"upload started\"").count(),
        1,
        "only the valid upload reached the server: {}",
        server.log()
    );
}

#[test]
fn upload_server_refusals_busy_done_intruder_disconnect() {
    let d = tmp();
    let pki = Pki::default();
    let big = d.path().join("big.raw");
    raw_fixture(&big, "64M", &[(0, 64 << 20, 0x11)]);
    let b = big.to_str().expect("utf8").to_string();
    let run = tmp();
    let mut server = upload_server(&pki, run.path());
    // A proxy whose client certificate has the wrong CN: the upload server says 401.
    let intruder = proxy(&pki, run.path(), server.port, Mode::Standalone, "intruder");
    let (code, _) = curl(
        &pki,
        &[
            "-H",
            &bearer(&token(&pki)),
            "-T",
            &b,
            &format!("https://127.0.0.1:{}/v1beta1/upload", intruder.port),
        ],
    );
    assert_eq!(code, 401);
    let p = proxy(&pki, run.path(), server.port, Mode::Standalone, "client");
    let url = format!("https://127.0.0.1:{}/v1beta1/upload", p.port);
    // A client that gives up mid-body leaves nothing complete behind...
    let out = Command::new("curl")
        .args([
            "-sS",
            "-o",
            "/dev/null",
            "--limit-rate",
            "8M",
            "--max-time",
            "2",
            "--cacert",
        ])
        .arg(pki.path("ca.crt"))
        .args(["-H", &bearer(&token(&pki)), "-T", &b, &url])
        .output()
        .expect("curl");
    assert!(!out.status.success(), "curl must have been cut off");
    std::thread::sleep(Duration::from_millis(500));
    assert!(
        server.child.try_wait().expect("wait").is_none(),
        "still serving"
    );
    assert!(!run.path().join("termination-log").exists());
    // ...while one upload runs, a second one is refused with 503...
    let mut slow = Command::new("curl")
        .args(["-sS", "-o", "/dev/null", "--limit-rate", "12M", "--cacert"])
        .arg(pki.path("ca.crt"))
        .args(["-H", &bearer(&token(&pki)), "-T", &b, &url])
        .spawn()
        .expect("curl");
    std::thread::sleep(Duration::from_secs(2)); // the throttled upload is surely running
    let (code, _) = curl(&pki, &["-H", &bearer(&token(&pki)), "-T", &b, &url]);
    assert_eq!(code, 503, "{}", server.log());
    assert!(slow.wait().expect("slow").success());
    assert_eq!(
        server.wait(Duration::from_secs(10)),
        Some(0),
        "{}",
        server.log()
    );
    assert_same_bytes(&disk_of(run.path()), &big);
    // ...and once done the server is gone: the proxy answers 503 for it.
    let (code, _) = curl(&pki, &["-H", &bearer(&token(&pki)), "-T", &b, &url]);
    assert_eq!(code, 503);
}

/// The proxy in Kubernetes mode, against the API stand-in, before one upload server.
struct KubeProxy {
    d: tempfile::TempDir,
    pki: Pki,
    api: KubeApi,
    run: tempfile::TempDir,
    server: ferrydisk_tests::upload::Proc,
    proxy: ferrydisk_tests::upload::Proc,
}

impl KubeProxy {
    fn new() -> Self {
        let d = tmp();
        let pki = Pki::default();
        let api = KubeApi::start(d.path());
        let run = tmp();
        let server = upload_server(&pki, run.path());
        let proxy = proxy(
            &pki,
            run.path(),
            server.port,
            Mode::Kube {
                api_port: api.port,
                token_file: &api.token_file,
            },
            "client",
        );
        KubeProxy {
            d,
            pki,
            api,
            run,
            server,
            proxy,
        }
    }

    /// `curl -T file` to `path` with a token for `ns/pvc`: (status, body).
    fn upload(&self, ns: &str, pvc: &str, file: &Path, path: &str) -> (u16, String) {
        let tok = mint(&self.pki.key("api.key"), &Claims::upload(ns, pvc));
        curl(
            &self.pki,
            &[
                "-H",
                &bearer(&tok),
                "-T",
                file.to_str().expect("utf8"),
                &format!("https://127.0.0.1:{}{path}", self.proxy.port),
            ],
        )
    }
}

const UPLOAD_TARGET: (&str, &str) = ("cdi.kubevirt.io/storage.upload.target", "");
const POD_READY: (&str, &str) = ("cdi.kubevirt.io/storage.pod.ready", "true");

#[test]
fn the_proxy_refuses_pvcs_that_take_no_upload_in_cdis_words() {
    let k = KubeProxy::new();
    let (_, files) = images(k.d.path());
    k.api.put_pvc("default", "plain", &[]);
    k.api.put_pvc(
        "default",
        "finished",
        &[
            UPLOAD_TARGET,
            ("cdi.kubevirt.io/storage.pod.phase", "Succeeded"),
        ],
    );
    k.api.put_pvc("default", "notready", &[UPLOAD_TARGET]);
    for (pvc, want) in [
        ("missing", "rejecting Upload Request for PVC missing that doesn&#39;t exist"),
        ("plain", "PVC plain is not an upload target"),
        ("finished", "rejecting Upload Request for PVC finished that already finished uploading"),
        ("notready", "upload server for PVC default/notready is not ready: timed out waiting for the condition"),
    ] {
        let (code, body) = k.upload("default", pvc, &files[1], "/v1alpha1/upload");
        assert_eq!((code, body.as_str()), (503, want), "{pvc}");
    }
}

#[test]
fn a_ready_pvc_is_proxied_to_its_upload_server() {
    let mut k = KubeProxy::new();
    let (raw, files) = images(k.d.path());
    k.api
        .put_pvc("default", "disk", &[UPLOAD_TARGET, POD_READY]);
    let (code, body) = k.upload("default", "disk", &files[1], "/v1alpha1/upload");
    assert_eq!(code, 200, "{body}\n{}", k.server.log());
    assert_eq!(k.server.wait(Duration::from_secs(10)), Some(0));
    assert_same_bytes(&disk_of(k.run.path()), &raw);
}

#[test]
fn an_archive_pvc_takes_the_upload_archive_path_and_is_unpacked() {
    let k = KubeProxy::new();
    k.api.put_pvc(
        "default",
        "files",
        &[
            UPLOAD_TARGET,
            POD_READY,
            ("cdi.kubevirt.io/storage.contentType", "archive"),
        ],
    );
    let tree = k.d.path().join("tree");
    std::fs::create_dir_all(tree.join("etc")).expect("mkdir");
    std::fs::write(tree.join("etc/config"), "x=1\n").expect("write");
    let tarball = k.d.path().join("tree.tar.gz");
    sh(Command::new("tar")
        .arg("-C")
        .arg(&tree)
        .arg("-czf")
        .arg(&tarball)
        .arg("."));
    let (code, body) = k.upload("default", "files", &tarball, "/v1beta1/upload");
    assert_eq!(code, 200, "{body}\n{}", k.server.log());
    assert_eq!(
        std::fs::read_to_string(k.run.path().join("data/etc/config")).expect("unpacked"),
        "x=1\n"
    );
}
