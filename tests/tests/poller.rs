//! CDI's DataImportCron poller (`cdi-source-update-poller`): the digest of the image a
//! cron follows, read from a real docker-registry (TLS, htpasswd), recorded as a JSON
//! patch on the DataImportCron through the Kubernetes API. No API server can run here:
//! the API is the stand-in `tests/support/kubeapi.py`, which checks the bearer token and
//! records every patch.

use ferrydisk_tests::registry::{mkimage, Registry};
use ferrydisk_tests::upload::KubeApi;
use ferrydisk_tests::*;
use serde_json::json;
use std::path::Path;
use std::process::Command;

fn kubeconfig(dir: &Path, api_port: u16) -> std::path::PathBuf {
    let p = dir.join("kubeconfig");
    std::fs::write(
        &p,
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: test\n  cluster:\n    server: http://127.0.0.1:{api_port}\nusers:\n- name: poller\n  user:\n    token: sa-token-value\ncontexts:\n- name: test\n  context:\n    cluster: test\n    user: poller\ncurrent-context: test\n"
        ),
    )
    .expect("kubeconfig");
    p
}

/// The sha256 of the manifest bytes the registry serves for `image`, as containers/image
/// (and so CDI) computes the digest.
fn served_digest(reg: &Registry, repo_tag: &str) -> String {
    let (u, p) = reg.creds.clone().expect("creds");
    let out = sh(Command::new("skopeo")
        .args([
            "inspect",
            "--raw",
            "--tls-verify=false",
            "--creds",
            &format!("{u}:{p}"),
        ])
        .arg(reg.image(repo_tag)));
    let file = tempfile::NamedTempFile::new().expect("tmp");
    std::fs::write(file.path(), &out.stdout).expect("write");
    let sum = sh(Command::new("sha256sum").arg(file.path()));
    format!(
        "sha256:{}",
        String::from_utf8_lossy(&sum.stdout)
            .split_whitespace()
            .next()
            .expect("sum")
    )
}

fn poll(dir: &Path, reg: &Registry, kubeconfig: &Path, repo_tag: &str) -> std::process::Output {
    let (u, p) = reg.creds.clone().expect("creds");
    Command::new(bin("importer"))
        .env_clear()
        .arg("source-update-poller")
        .args(["-kubeconfig"])
        .arg(kubeconfig)
        .args([
            "-ns",
            "golden",
            "-cron",
            "fedora",
            "-url",
            &reg.image(repo_tag),
            "-certdir",
        ])
        .arg(reg.ca_dir.as_ref().expect("tls"))
        .env("IMPORTER_ACCESS_KEY_ID", u)
        .env("IMPORTER_SECRET_KEY", p)
        .current_dir(dir)
        .output()
        .expect("poller")
}

#[test]
fn digest_changes_are_patched_onto_the_data_import_cron() {
    let d = tmp();
    let reg = Registry::start(true, Some(("poll", "pw")));
    let disk = d.path().join("disk.raw");
    std::fs::write(&disk, vec![7u8; 4096]).expect("disk");
    let f = disk.to_str().expect("utf8").to_string();
    let layout = d.path().join("layout");
    mkimage(
        &layout,
        "v1",
        &json!({"images": [{"layers": [[{"path": "disk/disk.raw", "file": f}]]}]}),
    );
    reg.push_layout(&layout, "v1", "golden/fedora:latest");
    let api = KubeApi::start(d.path());
    let crons = api.dir.join("golden/dataimportcrons");
    std::fs::create_dir_all(&crons).expect("mkdir");
    std::fs::write(
        crons.join("fedora.json"),
        json!({"apiVersion": "cdi.kubevirt.io/v1beta1", "kind": "DataImportCron",
               "metadata": {"name": "fedora", "namespace": "golden", "annotations": {}}})
        .to_string(),
    )
    .expect("cron");
    let kc = kubeconfig(d.path(), api.port);
    let want = served_digest(&reg, "golden/fedora:latest");

    // First poll: a new digest.
    let o = poll(d.path(), &reg, &kc, "golden/fedora:latest");
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let patches = std::fs::read_to_string(api.dir.join("patches.jsonl")).expect("patches");
    let first: serde_json::Value =
        serde_json::from_str(patches.lines().next().expect("one")).expect("json");
    assert_eq!(first.as_array().map(Vec::len), Some(2), "{first}");
    assert_eq!(first[0]["op"], "add");
    assert_eq!(
        first[0]["path"],
        "/metadata/annotations/cdi.kubevirt.io~1storage.import.lastCronTime"
    );
    let when = first[0]["value"].as_str().expect("time");
    assert!(
        when.ends_with('Z') && when.len() == 20,
        "RFC 3339 seconds: {when}"
    );
    assert_eq!(
        first[1]["path"],
        "/metadata/annotations/cdi.kubevirt.io~1storage.import.sourceDesiredDigest"
    );
    assert_eq!(first[1]["value"], want.as_str());

    // Second poll, same image: only lastCronTime.
    let o = poll(d.path(), &reg, &kc, "golden/fedora:latest");
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let patches = std::fs::read_to_string(api.dir.join("patches.jsonl")).expect("patches");
    let second: serde_json::Value =
        serde_json::from_str(patches.lines().nth(1).expect("two")).expect("json");
    assert_eq!(second.as_array().map(Vec::len), Some(1), "{second}");

    // A missing cron, or a wrong token: exit 1 (Go's log.Fatalf), nothing patched.
    let o = Command::new(bin("importer"))
        .env_clear()
        .args(["source-update-poller", "-ns", "golden", "-cron", "fedora"])
        .output()
        .expect("poller");
    assert_eq!(o.status.code(), Some(1));
    let bad = d.path().join("bad-kubeconfig");
    std::fs::write(
        &bad,
        std::fs::read_to_string(&kc)
            .expect("kc")
            .replace("sa-token-value", "wrong"),
    )
    .expect("write");
    let o = poll(d.path(), &reg, &bad, "golden/fedora:latest");
    assert_eq!(o.status.code(), Some(1));
    assert_eq!(
        std::fs::read_to_string(api.dir.join("patches.jsonl"))
            .expect("patches")
            .lines()
            .count(),
        2
    );
}
