//! Registry mirrors for air-gapped clusters (issue 29): a containers-registries.conf(5)
//! file (`CONTAINERS_REGISTRIES_CONF`, as containers/image reads it) with a dead mirror,
//! a live one and the origin, each a real `docker-registry` with TLS on 127.0.0.1 (the
//! dead one a closed port); a blocked registry; a mirror that serves another manifest for
//! a digest reference (tests/support/hostile.py). Which registry served the pull is read
//! from the registries' access logs.

use ferrydisk_tests::registry::{mkimage, Registry};
use ferrydisk_tests::*;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// A containerDisk of `raw` pushed to `repo_tag` of each registry.
fn seed(d: &Path, raw: &Path, regs: &[&Registry], repo_tag: &str) {
    let layout = d.join("layout");
    mkimage(
        &layout,
        "v1",
        &serde_json::json!({"images": [{"layers": [[{"path": "disk/disk.img", "file": raw}]]}]}),
    );
    for r in regs {
        r.push_layout(&layout, "v1", repo_tag);
    }
}

/// One CA directory trusting every registry given.
fn cas(d: &Path, regs: &[&Registry]) -> PathBuf {
    let dir = d.join("cas");
    std::fs::create_dir_all(&dir).expect("cas");
    for (i, r) in regs.iter().enumerate() {
        let ca = r.ca_dir.as_ref().expect("tls").join("ca.crt");
        std::fs::copy(ca, dir.join(format!("ca{i}.crt"))).expect("ca");
    }
    dir
}

fn manifest_gets(r: &Registry, repo: &str) -> usize {
    std::fs::read_to_string(&r.log)
        .unwrap_or_default()
        .lines()
        .filter(|l| l.contains(&format!("\"GET /v2/{repo}/manifests/")))
        .count()
}

fn import(run: &Path, origin: &Registry, reference: &str, conf: &Path, cas: &Path) -> Outcome {
    Importer::new(run)
        .env("IMPORTER_SOURCE", "registry")
        .env(
            "IMPORTER_ENDPOINT",
            &format!("docker://{}/{reference}", origin.host()),
        )
        .env("IMPORTER_ACCESS_KEY_ID", "user")
        .env("IMPORTER_SECRET_KEY", "pass")
        .env("IMPORTER_CERT_DIR", cas.to_str().expect("utf8"))
        .env("CONTAINERS_REGISTRIES_CONF", conf.to_str().expect("utf8"))
        .arg("--metrics-addr")
        .arg("none")
        .arg("--retries")
        .arg("0")
        .run()
}

#[test]
fn a_dead_mirror_falls_back_to_a_live_one_and_the_origin_is_not_asked() {
    let d = tmp();
    let raw = dense_fixture_named(d.path(), "disk.raw", 21);
    let origin = Registry::start(true, Some(("user", "pass")));
    let mirror = Registry::start(true, None);
    seed(d.path(), &raw, &[&origin, &mirror], "cd/disk:1");
    let conf = d.path().join("registries.conf");
    std::fs::write(
        &conf,
        format!(
            "[[registry]]\nprefix = \"{o}/cd\"\nlocation = \"{o}/cd\"\n\n\
             [[registry.mirror]]\nlocation = \"127.0.0.1:{dead}/cd\"\n\n\
             [[registry.mirror]]\nlocation = \"{m}/cd\"\n",
            o = origin.host(),
            m = mirror.host(),
            dead = free_port()
        ),
    )
    .expect("conf");
    let cas = cas(d.path(), &[&origin, &mirror]);
    let before = manifest_gets(&origin, "cd/disk");
    let run = tmp();
    let o = import(run.path(), &origin, "cd/disk:1", &conf, &cas);
    o.assert_success();
    assert_same_bytes(&run.path().join("data/disk.img"), &raw);
    assert!(
        manifest_gets(&mirror, "cd/disk") >= 1,
        "the live mirror served"
    );
    assert_eq!(
        manifest_gets(&origin, "cd/disk"),
        before,
        "the origin was not asked"
    );

    // The same registry blocked: refused in one line, nothing asked.
    std::fs::write(
        &conf,
        format!(
            "[[registry]]\nprefix = \"{}\"\nblocked = true\n",
            origin.host()
        ),
    )
    .expect("conf");
    let run = tmp();
    import(run.path(), &origin, "cd/disk:1", &conf, &cas)
        .assert_failure("is blocked by registries.conf");
}

/// hostile.py answers any manifest request with a manifest of its own: for a digest
/// reference that is refused (it does not hash to the digest asked), and the pull
/// falls back to the registry itself.
#[test]
fn a_mirror_serving_another_manifest_for_a_digest_is_refused() {
    let d = tmp();
    let raw = dense_fixture_named(d.path(), "disk.raw", 22);
    let origin = Registry::start(true, Some(("user", "pass")));
    seed(d.path(), &raw, &[&origin], "cd/disk:1");
    let top = sh(Command::new("skopeo")
        .args([
            "inspect",
            "--tls-verify=false",
            "--creds",
            "user:pass",
            "--format",
            "{{.Digest}}",
        ])
        .arg(origin.image("cd/disk:1")));
    let digest = String::from_utf8_lossy(&top.stdout).trim().to_string();
    assert!(digest.starts_with("sha256:"), "{digest}");
    let log = d.path().join("hostile.log");
    let mut liar = Command::new("python3")
        .arg(root().join("tests/support/hostile.py"))
        .arg("--log")
        .arg(&log)
        .args(["--config-liar", "10"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("hostile.py");
    let mut out = BufReader::new(liar.stdout.take().expect("stdout"));
    let mut line = String::new();
    out.read_line(&mut line).expect("port");
    let port: u16 = line
        .trim()
        .trim_start_matches("PORT ")
        .parse()
        .expect("port");
    // Its second line (the other address's port) is read too: a closed pipe would end it.
    let mut second = String::new();
    out.read_line(&mut second).expect("port2");
    let conf = d.path().join("registries.conf");
    std::fs::write(
        &conf,
        format!(
            "[[registry]]\nprefix = \"{o}/cd\"\n\n[[registry.mirror]]\nlocation = \"127.0.0.1:{port}/cd\"\ninsecure = true\n",
            o = origin.host()
        ),
    )
    .expect("conf");
    let cas = cas(d.path(), &[&origin]);
    let run = tmp();
    let o = import(
        run.path(),
        &origin,
        &format!("cd/disk@{digest}"),
        &conf,
        &cas,
    );
    let _ = liar.kill();
    let _ = liar.wait();
    o.assert_success();
    assert_same_bytes(&run.path().join("data/disk.img"), &raw);
    assert!(
        o.stderr.contains("whose digest is"),
        "the mirror's manifest was refused: {}",
        o.stderr
    );
    assert!(
        std::fs::read_to_string(&log)
            .unwrap_or_default()
            .contains("/manifests/sha256:"),
        "the mirror was asked first"
    );
}
