//! The command line as a person meets it (issue 28, item 7): `importer --help` and the
//! same binary under the name `ferrydisk` list every role with one line each, while
//! `importer` with flags only still imports as CDI's controller runs it.

use ferrydisk_tests::*;
use std::process::Command;

const ROLES: [&str; 8] = [
    "import",
    "upload-server",
    "serve-disk",
    "size-detection",
    "clone-source",
    "source-update-poller",
    "push",
    "inspect",
];

fn lists_every_role(help: &str) {
    for role in ROLES {
        assert!(
            help.lines().any(|l| l.trim_start().starts_with(role)),
            "{role} missing from:\n{help}"
        );
    }
}

#[test]
fn importer_help_lists_every_role() {
    let o = sh(Command::new(bin("importer")).arg("--help"));
    lists_every_role(&String::from_utf8_lossy(&o.stdout));
}

#[test]
fn the_binary_answers_to_ferrydisk() {
    let d = tmp();
    let link = d.path().join("ferrydisk");
    std::os::unix::fs::symlink(bin("importer"), &link).expect("symlink");
    // Alone: the list of roles, not an import.
    let o = Command::new(&link).output().expect("ferrydisk");
    assert!(o.status.success(), "{o:?}");
    let help = String::from_utf8_lossy(&o.stdout);
    assert!(help.contains("Usage: ferrydisk <COMMAND>"), "{help}");
    lists_every_role(&help);
    // A role named: its own help.
    let o = sh(Command::new(&link).args(["push", "--help"]));
    assert!(String::from_utf8_lossy(&o.stdout).contains("--volume-name"));
    // And a real import under that name.
    let raw = dense_fixture_named(d.path(), "disk.raw", 41);
    let run = d.path().join("run");
    std::fs::create_dir_all(run.join("data")).expect("data");
    let o = Command::new(&link)
        .arg("import")
        .arg("--endpoint")
        .arg(format!("file://{}", raw.display()))
        .arg("--allow-local-files")
        .arg("--data-dir")
        .arg(run.join("data"))
        .arg("--termination-log")
        .arg(run.join("termination-log"))
        .arg("--metrics-addr")
        .arg("none")
        .arg("--block-device")
        .arg(run.join("no-block-device"))
        .env_clear()
        .env("IMPORTER_CONTENTTYPE", "kubevirt")
        .output()
        .expect("import");
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_same_bytes(&run.join("data/disk.img"), &raw);
}
