//! `IMPORTER_SOURCE=imageio` end to end: the real ovirt-imageio daemon (PyPI) serving
//! the data (raw downloads through qemu-nbd, so its extents are the image's allocation;
//! qcow2 snapshots as their own bytes), behind a stand-in for the oVirt engine's REST
//! API (tests/support/ovirt_engine.py: no engine can run here). Disks are compared byte
//! for byte with `qemu-img convert`; the engine's event log shows what the importer
//! asked of it (transfers, finalize, cancel).

use ferrydisk_tests::upload::Pki;
use ferrydisk_tests::*;
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::process::{Child, Command};

const USER: &str = "admin@internal";
const PASSWORD: &str = "s3cret-engine-pw";
const DISK: &str = "9b1d5b6e-disk";
const SIZE: u64 = 64 << 20;

/// The engine stand-in and the daemon it runs, killed on drop.
struct Engine {
    child: Child,
    port: u16,
    events: PathBuf,
    ca_dir: PathBuf,
    _pki: Pki,
}

impl Engine {
    fn start(dir: &Path, disks: Value, behaviour: &str) -> Self {
        Self::start_with(dir, disks, behaviour, json!({}))
    }

    /// With more settings (`imageio_port`, `transfer_port`).
    fn start_with(dir: &Path, disks: Value, behaviour: &str, extra: Value) -> Self {
        let pki = Pki::default();
        let config = dir.join("engine.json");
        let mut c =
            json!({"user": USER, "password": PASSWORD, "disks": disks, "behaviour": behaviour});
        if let (Some(c), Some(extra)) = (c.as_object_mut(), extra.as_object()) {
            c.extend(extra.clone());
        }
        std::fs::write(&config, c.to_string()).expect("config");
        let events = dir.join("events.jsonl");
        let work = dir.join("engine-work");
        std::fs::create_dir_all(&work).expect("mkdir");
        let (child, port) = httpserver::spawn_support(
            "ovirt_engine.py",
            &[
                "--config".as_ref(),
                config.as_os_str(),
                "--events".as_ref(),
                events.as_os_str(),
                "--tls".as_ref(),
                pki.path("srv.crt").as_os_str(),
                pki.path("srv.key").as_os_str(),
                "--workdir".as_ref(),
                work.as_os_str(),
            ],
        );
        let ca_dir = dir.join("ca");
        std::fs::create_dir_all(&ca_dir).expect("mkdir");
        std::fs::copy(pki.path("ca.crt"), ca_dir.join("ca.crt")).expect("ca");
        // What `openssl x509 -CAcreateserial` leaves beside a CA: not a certificate,
        // skipped with a warning as CDI's loadCA skips it.
        std::fs::write(ca_dir.join("ca.srl"), "3F\n").expect("serial");
        Engine {
            child,
            port,
            events,
            ca_dir,
            _pki: pki,
        }
    }

    /// An importer as CDI's controller starts it for this engine, writing into `run`.
    fn importer(&self, run: &Path, current: Option<&str>, previous: Option<&str>) -> Importer {
        let mut i = Importer::new(run)
            .env("IMPORTER_SOURCE", "imageio")
            .env(
                "IMPORTER_ENDPOINT",
                &format!("https://127.0.0.1:{}/ovirt-engine/api", self.port),
            )
            .env("IMPORTER_ACCESS_KEY_ID", USER)
            .env("IMPORTER_SECRET_KEY", PASSWORD)
            .env("IMPORTER_CERT_DIR", self.ca_dir.to_str().expect("utf8"))
            .env("IMPORTER_DISK_ID", DISK)
            .arg("--metrics-addr")
            .arg("none");
        if let Some(c) = current {
            i = i.env("IMPORTER_CURRENT_CHECKPOINT", c);
        }
        if let Some(p) = previous {
            i = i.env("IMPORTER_PREVIOUS_CHECKPOINT", p);
        }
        i
    }

    /// The engine's events, one JSON object each.
    fn events(&self) -> Vec<Value> {
        std::fs::read_to_string(&self.events)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }

    fn count(&self, event: &str) -> usize {
        self.events().iter().filter(|e| e["event"] == event).count()
    }
}

impl Drop for Engine {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A raw disk of 64 MiB with data in two places, the rest never written.
fn sparse_raw(path: &Path) {
    raw_fixture(
        path,
        "64M",
        &[(1 << 20, 3 << 20, 0x5a), ((40 << 20) + 4096, 100_000, 0xc3)],
    );
}

fn one_disk(file: &Path, format: &str, snapshots: Value) -> Value {
    json!({DISK: {
        "image_id": "img-active", "storage_domain": "sd-1", "total_size": SIZE,
        "file": file, "format": format, "snapshots": snapshots,
    }})
}

/// `dir/disk.raw` (a sparse raw disk) as the engine's one disk, under `behaviour`.
fn raw_disk_engine(dir: &Path, behaviour: &str) -> (PathBuf, Engine) {
    let raw = dir.join("disk.raw");
    sparse_raw(&raw);
    let engine = Engine::start(dir, one_disk(&raw, "raw", json!({})), behaviour);
    (raw, engine)
}

fn disk_of(run: &Path) -> PathBuf {
    run.join("data/disk.img")
}

#[test]
fn a_whole_disk_downloads_only_its_data_extents_and_the_transfer_is_finalized() {
    let d = tmp();
    let (raw, engine) = raw_disk_engine(d.path(), "normal");
    let run = d.path().join("run");
    let o = engine.importer(&run, None, None).run();
    o.assert_success();
    assert_same_bytes(&disk_of(&run), &raw);
    use std::os::unix::fs::MetadataExt;
    let allocated = std::fs::metadata(disk_of(&run)).expect("meta").blocks() * 512;
    assert!(
        allocated < 8 << 20,
        "{allocated} bytes allocated: zero extents were written"
    );
    let transfers: Vec<Value> = engine
        .events()
        .into_iter()
        .filter(|e| e["event"] == "transfer")
        .collect();
    assert_eq!(transfers.len(), 1, "{transfers:?}");
    assert_eq!(
        (
            &transfers[0]["format"],
            &transfers[0]["target"],
            &transfers[0]["direction"]
        ),
        (&json!("raw"), &json!("disk"), &json!("download"))
    );
    assert_eq!((engine.count("finalize"), engine.count("cancel")), (1, 0));
    assert!(!o.stderr.contains(PASSWORD) && !o.termination.contains(PASSWORD));
}

#[test]
fn a_qcow2_disk_downloads_as_raw_through_its_extents() {
    // A disk whose volume is qcow2 (no snapshot): the transfer is raw, the host's
    // qemu-nbd serves the guest's bytes, and only allocated data is read.
    let d = tmp();
    let raw = d.path().join("disk.raw");
    sparse_raw(&raw);
    let q = qcow2_of(&raw, &d.path().join("disk.qcow2"));
    let engine = Engine::start(d.path(), one_disk(&q, "qcow2", json!({})), "normal");
    let run = d.path().join("run");
    engine.importer(&run, None, None).run().assert_success();
    assert_same_bytes(
        &disk_of(&run),
        &qemu_reference_as(&q, Some("qcow2"), d.path()),
    );
    assert_eq!(engine.count("finalize"), 1);
}

#[test]
fn a_connection_dropped_mid_download_is_resumed_with_ranges() {
    // A TCP proxy between the importer and the daemon cuts the first two connections
    // after 1 MiB: the range reads ask for the rest again.
    let d = tmp();
    let raw = d.path().join("disk.raw");
    sparse_raw(&raw);
    let daemon_port = free_port();
    let cut = ferrydisk_tests::objstore::DropProxy::start(d.path(), daemon_port, 1 << 20, 2, false);
    let engine = Engine::start_with(
        d.path(),
        one_disk(&raw, "raw", json!({})),
        "normal",
        json!({"imageio_port": daemon_port, "transfer_port": cut.port}),
    );
    let run = d.path().join("run");
    let o = engine.importer(&run, None, None).run();
    o.assert_success();
    assert_same_bytes(&disk_of(&run), &raw);
    cut.wait_cut(std::time::Duration::from_secs(1));
    assert_eq!((engine.count("finalize"), engine.count("cancel")), (1, 0));
}

/// The snapshots of a warm migration, built with qemu-img as oVirt keeps them: a raw
/// base (`snap-1`), a qcow2 delta backed by it (`snap-2`, new data and a zero cluster
/// over the base's data), and the active image backed by that (`img-active`). Returns
/// (disks config, the disk after each stage).
fn warm(dir: &Path) -> (Value, [PathBuf; 3]) {
    let vols = dir.join("volumes");
    std::fs::create_dir_all(&vols).expect("mkdir");
    let base = vols.join("snap-1");
    sparse_raw(&base);
    let snap2 = vols.join("snap-2");
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        "snap-1",
        "-F",
        "raw",
        path_str(&snap2),
    ]);
    for cmd in [
        "write -q -P 0x11 8M 1M",
        "write -q -z 1M 64k",
        "write -q -P 0x22 63M 4096",
    ] {
        sh(Command::new("qemu-io")
            .args(["-f", "qcow2", "-c", cmd])
            .arg(&snap2));
    }
    let active = vols.join("img-active");
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        "snap-2",
        "-F",
        "qcow2",
        path_str(&active),
    ]);
    for cmd in [
        "write -q -P 0x33 8M 4096",
        "write -q -z 40M 1M",
        "write -q -P 0x44 3145731 999",
    ] {
        sh(Command::new("qemu-io")
            .args(["-f", "qcow2", "-c", cmd])
            .arg(&active));
    }
    let refs = [
        qemu_reference_as(&base, Some("raw"), dir),
        qemu_reference_as(&snap2, Some("qcow2"), dir),
        qemu_reference_as(&active, Some("qcow2"), dir),
    ];
    let disks = json!({DISK: {
        "image_id": "img-active", "storage_domain": "sd-1", "total_size": SIZE,
        "file": active, "format": "qcow2",
        "snapshots": {
            "snap-1": {"raw": base, "raw_format": "raw", "cow": base, "actual_size": SIZE},
            "snap-2": {"raw": snap2, "raw_format": "qcow2", "cow": snap2, "actual_size": 2 << 20},
        },
    }});
    (disks, refs)
}

fn path_str(p: &Path) -> &str {
    p.to_str().expect("utf8")
}

#[test]
fn a_warm_migration_applies_each_delta_onto_the_disk_in_place() {
    let d = tmp();
    let (disks, refs) = warm(d.path());
    let engine = Engine::start(d.path(), disks, "normal");
    let run = d.path().join("run");
    // Stage 1: the first snapshot, whole, as raw.
    engine
        .importer(&run, Some("snap-1"), None)
        .run()
        .assert_success();
    assert_same_bytes(&disk_of(&run), &refs[0]);
    // Stage 2: the next snapshot's qcow2 applied onto it (twice: a stage run again
    // gives the same disk).
    for _ in 0..2 {
        let o = engine.importer(&run, Some("snap-2"), Some("snap-1")).run();
        o.assert_success();
        assert_same_bytes(&disk_of(&run), &refs[1]);
    }
    // The last stage: the active image (its id is the checkpoint), final.
    let o = engine
        .importer(&run, Some("img-active"), Some("snap-2"))
        .env("IMPORTER_FINAL_CHECKPOINT", "true")
        .run();
    o.assert_success();
    assert_same_bytes(&disk_of(&run), &refs[2]);
    let formats: Vec<String> = engine
        .events()
        .iter()
        .filter(|e| e["event"] == "transfer")
        .map(|e| {
            format!(
                "{}:{}",
                e["format"].as_str().unwrap_or(""),
                e["target_id"].as_str().unwrap_or("")
            )
        })
        .collect();
    assert_eq!(
        formats,
        [
            "raw:snap-1",
            "cow:snap-2",
            "cow:snap-2",
            "cow:9b1d5b6e-disk"
        ],
        "{:?}",
        engine.events()
    );
    assert_eq!((engine.count("finalize"), engine.count("cancel")), (4, 0));
}

#[test]
fn a_delta_whose_backing_file_is_not_the_previous_checkpoint_is_refused_before_writing() {
    let d = tmp();
    let (disks, refs) = warm(d.path());
    let engine = Engine::start(d.path(), disks, "normal");
    let run = d.path().join("run");
    engine
        .importer(&run, Some("snap-1"), None)
        .run()
        .assert_success();
    let o = engine.importer(&run, Some("snap-2"), Some("snap-0")).run();
    o.assert_failure("snapshot backing file 'snap-1' does not match expected checkpoint 'snap-0'");
    assert_same_bytes(&disk_of(&run), &refs[0]);
    assert_eq!(engine.count("cancel"), 1, "{:?}", engine.events());
}

/// A failing import: one line naming the disk, never the password, and the transfer
/// (if one was created) cancelled so the engine does not keep the disk locked.
fn fails(behaviour: &str, env: &[(&str, &str)], args: &[&str], want: &str, transfers: usize) {
    let d = tmp();
    let (_, engine) = raw_disk_engine(d.path(), behaviour);
    let run = d.path().join("run");
    let mut i = engine.importer(&run, None, None);
    for (k, v) in env {
        i = i.env(k, v);
    }
    for a in args {
        i = i.arg(a);
    }
    let o = i.run();
    o.assert_failure(want);
    assert!(
        o.termination
            .starts_with("Unable to connect to imageio data source: "),
        "{}",
        o.termination
    );
    assert!(!o.stderr.contains(PASSWORD) && !o.termination.contains(PASSWORD));
    assert_eq!(engine.count("transfer"), transfers, "{:?}", engine.events());
    assert_eq!(engine.count("cancel"), transfers, "{:?}", engine.events());
    assert_eq!(engine.count("finalize"), 0);
}

#[test]
fn a_wrong_password_fails_in_one_line_without_the_password() {
    fails(
        "normal",
        &[("IMPORTER_SECRET_KEY", "wr0ng-pw")],
        &[],
        "username or password is incorrect",
        0,
    );
}

#[test]
fn a_missing_disk_or_snapshot_is_named() {
    fails(
        "normal",
        &[("IMPORTER_DISK_ID", "no-such-disk")],
        &[],
        "disk no-such-disk not found",
        0,
    );
    fails(
        "normal",
        &[("IMPORTER_CURRENT_CHECKPOINT", "snap-9")],
        &[],
        "snapshot snap-9 not found on disk 9b1d5b6e-disk",
        0,
    );
}

#[test]
fn a_transfer_stuck_initializing_or_failed_is_cancelled() {
    fails(
        "stuck",
        &[],
        &["--imageio-transfer-timeout", "2"],
        "is still initializing after 2 s",
        1,
    );
    fails("fail", &[], &[], "ended in phase finished_failure", 1);
}

#[test]
fn a_locked_disk_is_waited_for_and_a_proxy_url_is_used_when_no_transfer_url() {
    for behaviour in ["locked-once", "no-transfer-url"] {
        let d = tmp();
        let (raw, engine) = raw_disk_engine(d.path(), behaviour);
        let run = d.path().join("run");
        engine
            .importer(&run, None, None)
            .arg("--imageio-lock-wait")
            .arg("1")
            .run()
            .assert_success();
        assert_same_bytes(&disk_of(&run), &raw);
        assert_eq!(engine.count("finalize"), 1, "{behaviour}");
        let locked = usize::from(behaviour == "locked-once");
        assert_eq!(
            engine.count("locked"),
            locked,
            "{behaviour}: the disk was locked once"
        );
    }
}

#[test]
fn a_warm_migration_onto_a_block_volume_changes_only_what_each_delta_holds() {
    let d = tmp();
    let (disks, refs) = warm(d.path());
    let Some(lp) = Loop::new(&d.path().join("volume"), SIZE as usize) else {
        return;
    };
    let engine = Engine::start(d.path(), disks, "normal");
    let run = d.path().join("run");
    // The device's bytes, read out (a device has no length to compare).
    let mut n = 0;
    let mut dev = || {
        n += 1;
        let out = d.path().join(format!("device-{n}.raw"));
        sh(Command::new("dd")
            .arg(format!("if={}", lp.dev))
            .arg(format!("of={}", out.display()))
            .args(["bs=1M", "status=none"]));
        out
    };
    engine
        .importer(&run, Some("snap-1"), None)
        .block_device(&lp.dev)
        .run()
        .assert_success();
    assert_same_bytes(&dev(), &refs[0]);
    engine
        .importer(&run, Some("snap-2"), Some("snap-1"))
        .block_device(&lp.dev)
        .run()
        .assert_success();
    assert_same_bytes(&dev(), &refs[1]);
    // A refused delta leaves the device as it stands.
    engine
        .importer(&run, Some("img-active"), Some("snap-1"))
        .block_device(&lp.dev)
        .run()
        .assert_failure("does not match expected checkpoint 'snap-1'");
    assert_same_bytes(&dev(), &refs[1]);
    engine
        .importer(&run, Some("img-active"), Some("snap-2"))
        .block_device(&lp.dev)
        .run()
        .assert_success();
    assert_same_bytes(&dev(), &refs[2]);
}
